"""The llama.cpp engine: the shipped 4-bit GGUF served as is, published versions as GGUF LoRA adapters.

llama.cpp runs this model ~9x faster on 2 CPU cores than transformers with bitsandbytes NF4, and without
re-quantizing the Q4_1 weights (which degrades the answers). `xllamacpp` (a prebuilt wheel, no compiler) runs
llama.cpp's server in-process: `n_parallel` slots with continuous batching, so concurrent users' answers are
decoded in the same forward passes, and LoRA adapters loaded at construction whose scales each request picks
(`lora_init_without_apply` + a request's `"lora": [{"id", "scale"}]`). Rows that use different adapter sets are
not batched together by llama.cpp; a pair of two versions alternates between them.

**Lanes.** The engine runs `lanes` servers side by side, each with its share of the threads and every
version's adapters, and sends each new row to a lane chosen by `choose_lane`: a pair's two answers decode in
parallel on two cores instead of alternating in one server, and many users' rows gather by version. llama.cpp's own threads barely help a
135M model's small decode batches: measured here (64 tokens, 2 cores), a pair from two versions took 1.66-1.84 s
in one 2-thread server (first tokens of both after 0.96-1.04 s) and 1.10-1.25 s in two 1-thread servers (after
0.24-0.28 s); even a base pair, which one server batches, took 1.47-1.66 s there.

A new adapter file needs a new server, so an engine state is (servers, the versions they serve); see
`served_versions` for how a new state is built in the background and switched to between requests. The
in-process server also listens on a random 127.0.0.1 port; it gets a random API key so nothing else can use it.

Facts about xllamacpp this relies on (measured with 2026.10.11549): appending to `params.lora_adapters` is
silently ignored (assign the whole list); an unknown adapter id in a request is silently ignored (so the
version -> id map is checked here); deleting a server right after construction can deadlock in its destructor
unless it served a request first (every state serves a one-token request at build time, which also proves its
adapters load).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_online.adapters import VersionInfo
from rlhf_online.config import SamplingConfig
from rlhf_online.generation import ChatEngine, StreamUpdate, merge_row_streams
from rlhf_online.gguf_adapter import GGUF_ADAPTER_FILE, BaseShape, convert_peft_folder
from rlhf_online.models import end_of_turn_id
from rlhf_online.served_versions import EngineStates
from rlhf_online.versions import BASE_VERSION

log = logging.getLogger(__name__)

XLLAMACPP_PIN = "xllamacpp==2026.10.11549"


@dataclass(frozen=True)
class TokenSample:
    """One sampled answer as tokens: through its end-of-turn token when it ended (not cut by the length limit),
    with the sampler's log-probability of each token (None where llama.cpp reports none: the end-of-turn)."""

    token_ids: list[int]
    logprobs: list[float | None]
    ended: bool


@dataclass
class LlamaCppState:
    servers: list  # one per lane, each with the same adapters in the same order
    versions: dict[str, int] = field(default_factory=dict)  # version -> index in the servers' adapter list
    built_at: float = field(default_factory=time.time)

    @property
    def server(self):
        """The first lane's server: for the calls that need one particular server (a cached slot)."""
        return self.servers[0]

    def lora(self, version: str) -> list[dict]:
        """The request's adapter scales: 1 for the version's adapter, 0 for every other (base: all 0)."""
        if version != BASE_VERSION and version not in self.versions:
            raise KeyError(f"version {version!r} is not loaded in this engine state")
        chosen = self.versions.get(version)
        return [{"id": index, "scale": 1.0 if index == chosen else 0.0} for index in self.versions.values()]


def choose_lane(rows_by_lane: Sequence[Counter], version: str, slots: int) -> int:
    """The lane for a new row of `version`: a lane with a free slot first; then the one where the row costs
    least, counting rows of other versions only, since llama.cpp batches rows with the same adapters (a
    decode step of several rows costs little more than one of one row, while rows of different adapters take
    turns); then the least busy lane; then the first. So a lone pair's two rows land on two lanes, and many
    users' pairs from (newest, previous) sort themselves into one lane per version, each decoded as a batch."""
    def cost(lane: int):
        rows = sum(rows_by_lane[lane].values())
        return rows >= slots, rows - rows_by_lane[lane][version], rows, lane
    return min(range(len(rows_by_lane)), key=cost)


def chat_repeat_penalty(sampling: SamplingConfig, end_of_turn: int | None) -> dict:
    """The chat's anti-loop penalty (bench/sampling_loops.py) as llama.cpp's request fields.

    llama.cpp applies it to the last `repeat_last_n` tokens *including the prompt's* (its server feeds every
    prompt token to the sampler; no request field excludes them), so for an answer's first ~60 tokens the
    end-of-turn token that closed the question is penalised too, and answers end later than the policy would
    end them (bench/llamacpp_penalty.py). A logit bias on that token offsets it; llama.cpp adds the bias
    before the penalty divides, so it cannot cancel it exactly at every logit: `--end-of-turn-bias` is
    measured, not derived."""
    penalty = sampling.repetition_penalty or 1.0
    fields: dict = {"repeat_penalty": penalty, "repeat_last_n": 64}
    if penalty != 1.0 and sampling.end_of_turn_bias and end_of_turn is not None:
        fields["logit_bias"] = [[int(end_of_turn), float(sampling.end_of_turn_bias)]]
    return fields


class LlamaCppEngine(ChatEngine):
    name = "llamacpp"

    def __init__(self, model_path: str | Path, tokenizer, sampling: SamplingConfig, slots: int = 8,
                 threads: int = 0, ctx_per_slot: int | None = None, work_dir: str | Path | None = None,
                 lanes: int = 1):
        import xllamacpp  # noqa: F401  (engine.build_engine checked it is installed)

        self.model_path = Path(model_path)
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.end_of_turn_id = end_of_turn_id(tokenizer)
        self.threads = threads or os.cpu_count() or 1
        self.lanes = max(1, min(lanes, self.threads))  # each lane needs a thread of its own
        self.slots = max(1, -(-max(1, slots) // self.lanes))  # per lane: the total shared out, rounded up
        self._in_flight = [Counter() for _ in range(self.lanes)]  # per lane: rows running per version
        self._lanes_lock = threading.Lock()
        self.ctx_per_slot = ctx_per_slot or sampling.context_tokens + max(sampling.max_new_tokens, 256)
        self.base_shape = BaseShape.from_gguf(self.model_path)
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="rlhf-gguf-adapters-"))
        self._api_key = secrets.token_hex(16)
        self.states = EngineStates(self._new_state([]), self._close_state)

    # ---- engine states ---------------------------------------------------------------------------------------
    def _params(self, adapter_paths: list[Path]):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        params.n_parallel = self.slots
        params.n_ctx = self.slots * self.ctx_per_slot
        params.cpuparams.n_threads = max(1, self.threads // self.lanes)
        params.cpuparams_batch.n_threads = max(1, self.threads // self.lanes)
        params.warmup = False
        params.verbosity = -1
        params.api_keys = [self._api_key]  # the in-process server's HTTP port is for nobody else
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(p), 0.0) for p in adapter_paths]
        params.lora_init_without_apply = True
        return params

    def _new_state(self, versions: list[tuple[str, Path]]) -> LlamaCppState:
        import xllamacpp

        for _, path in versions:
            if not path.is_file():
                raise FileNotFoundError(path)
        state = LlamaCppState(servers=[], versions={name: i for i, (name, _) in enumerate(versions)})
        for _ in range(self.lanes):
            server = xllamacpp.Server(self._params([path for _, path in versions]))
            state.servers.append(server)
            # One token from the newest version: proves the adapters load and avoids the destructor deadlock.
            probe = server.handle_completions({"prompt": [0], "n_predict": 1, "temperature": 0.0,
                                               "lora": state.lora(versions[-1][0] if versions else BASE_VERSION)})
            if not isinstance(probe, dict) or "error" in probe or not probe.get("choices"):
                raise RuntimeError(f"llama.cpp server did not answer a probe request: {str(probe)[:300]}")
        return state

    @staticmethod
    def _close_state(state: LlamaCppState) -> None:
        state.servers = []  # each destructor waits for its server's loop to exit

    @contextlib.contextmanager
    def _lane(self, state: LlamaCppState, version: str):
        """The server of the lane `choose_lane` picks for a row of `version`, counted as busy until the block
        ends (counts span engine states: an old state's rows still use their lane's core)."""
        with self._lanes_lock:
            lane = choose_lane(self._in_flight, version, self.slots)
            self._in_flight[lane][version] += 1
        try:
            yield state.servers[lane]
        finally:
            with self._lanes_lock:
                self._in_flight[lane][version] -= 1

    def gguf_adapter(self, info: VersionInfo) -> Path:
        """The version's GGUF adapter: written beside the PEFT folder at publish time, or converted now (older
        versions, versions published by another tool) into this engine's work folder."""
        beside = info.path / GGUF_ADAPTER_FILE
        if beside.is_file():
            return beside
        converted = self.work_dir / f"{info.name}.gguf"
        if not converted.is_file():
            convert_peft_folder(info.path, self.base_shape, out_path=converted)
        return converted

    def build_state(self, infos: list[VersionInfo]) -> LlamaCppState:
        return self._new_state([(info.name, self.gguf_adapter(info)) for info in infos])

    # ---- sampling --------------------------------------------------------------------------------------------
    def _request(self, state: LlamaCppState, prompt_ids: list[int], version: str, max_new_tokens: int,
                 ignore_end: bool) -> dict:
        return {"prompt": list(prompt_ids), "n_predict": max_new_tokens, "stream": True,
                "temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
                "top_k": 0, "min_p": 0.0,  # the same sampler as transformers' (llama.cpp's defaults add min_p)
                **self._chat_repeat_penalty(),
                "ignore_eos": ignore_end,
                # llama.cpp reuses a slot's cached prompt even when the request's adapters differ (measured: a
                # version's answer changed after the base had used its slot), so the prompt is computed afresh
                "cache_prompt": False,
                "lora": state.lora(version)}

    def _chat_repeat_penalty(self) -> dict:
        return chat_repeat_penalty(self.sampling, self.end_of_turn_id)

    def stream(self, prompt_ids: Sequence[list[int]], versions: Sequence[str], max_new_tokens: int | None = None,
               ignore_end: bool = False) -> Iterator[StreamUpdate]:
        """Every row is its own request, sent at once to the least busy lane (a pair's two rows to two lanes);
        within a lane llama.cpp batches rows that use the same adapters with each other and other users' rows. Stopping early (the generator closed) makes every
        row stop at its next token."""
        max_new_tokens = max_new_tokens or self.sampling.max_new_tokens
        with self.states.using(versions) as state:
            requests = [self._request(state, ids, version, max_new_tokens, ignore_end)
                        for ids, version in zip(prompt_ids, versions)]

            def run_row(row: int, emit, stop: threading.Event) -> None:
                def on_chunk(text: str) -> bool:
                    emit(text)
                    return stop.is_set()  # True asks llama.cpp to stop this request
                with self._lane(state, versions[row]) as server:
                    server.handle_completions(json.dumps(requests[row]), on_chunk)

            yield from merge_row_streams(len(prompt_ids), run_row,
                                         lambda reason: RuntimeError(f"llama.cpp generation failed: {reason}"),
                                         "llamacpp")

    def serve_only(self, name: str, adapter: Path | None) -> float:
        """From now on serve one adapter under `name` (or none: the base). For the trainer's sampler, whose one
        version is the policy as it is now; returns the seconds the new server took to build."""
        started = time.perf_counter()
        self.states.switch_to(self._new_state([(name, adapter)] if adapter is not None else []))
        return time.perf_counter() - started

    def sample_tokens(self, prompt_ids: Sequence[list[int]], version: str, max_new_tokens: int,
                      seeds: Sequence[int], end_of_turn_id: int, greedy: bool = False) -> list[TokenSample]:
        """Sample one answer per prompt, as token ids with their log-probabilities: all rows sent at once, so
        llama.cpp decodes them in the same batches (they share one adapter set).

        Sampled as the chat samples (temperature, top-p) but without the repetition penalty, so that the tokens
        are the policy's own draws; the log-probabilities llama.cpp reports are those of the model's logits
        before temperature and truncation, which is what PyTorch computes for PPO (its ratio and the
        sampler-trainer mismatch compare like with like). `seeds`: one per row (the same seeds, the same draws).
        `greedy`: the most likely token at each step, with the chat's repetition penalty (the learning
        timeline's probe answers: what the served model says, without sampling luck).
        """
        with self.states.using([version]) as state:
            requests = [{"prompt": list(ids), "n_predict": max_new_tokens, "temperature": self.sampling.temperature,
                         "top_p": self.sampling.top_p, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0,
                         "n_probs": 1, "cache_prompt": False, "seed": int(seed), "lora": state.lora(version)}
                        for ids, seed in zip(prompt_ids, seeds)]
            if greedy:  # llama.cpp samples greedily at temperature 0
                for request in requests:
                    request.update(temperature=0.0, **self._chat_repeat_penalty())
            replies: list[dict | BaseException | None] = [None] * len(requests)

            def run(row: int) -> None:
                try:
                    with self._lane(state, version) as server:
                        replies[row] = server.handle_completions(requests[row])
                except BaseException as exc:  # re-raised in the caller's thread
                    replies[row] = exc

            rows = [threading.Thread(target=run, args=(row,), name=f"llamacpp-sample{row}", daemon=True)
                    for row in range(len(requests))]
            for thread in rows:
                thread.start()
            for thread in rows:
                thread.join()
        samples = []
        for reply in replies:
            if isinstance(reply, BaseException):
                raise RuntimeError(f"llama.cpp sampling failed: {reply}") from reply
            if not isinstance(reply, dict) or "error" in reply or not reply.get("choices"):
                raise RuntimeError(f"llama.cpp sampling failed: {str(reply)[:300]}")
            choice = reply["choices"][0]
            content = (choice.get("logprobs") or {}).get("content") or []
            ids, logprobs = [c["id"] for c in content], [c["logprob"] for c in content]
            ended = choice.get("finish_reason") == "stop"  # no stop strings are sent: an end-of-generation token
            if ended:
                ids, logprobs = ids + [end_of_turn_id], logprobs + [None]
            samples.append(TokenSample(token_ids=ids, logprobs=logprobs, ended=ended))
        return samples

    def token_logprobs(self, prompt_ids: list[int], continuation: list[int], version: str, top_k: int = 400,
                       slot: int | None = None) -> list[float | None]:
        """Teacher-forced log-probabilities of `continuation` after `prompt_ids` under `version`.

        llama.cpp's server reports log-probabilities of generated tokens only, so each position is one request
        for one token over the prefix, and the forced token is looked up among the `top_k` most likely; None
        where it is not among them. The prefix is computed afresh each time (the prompt cache ignores adapters)
        unless `slot` names a slot the caller uses for this version only: then each request costs one token.
        None also where the greedy token at that position ends the turn (llama.cpp then reports nothing).
        For checks and measurements (the adapter equivalence test, sampler-trainer mismatch), not for serving.
        """
        out: list[float | None] = []
        cache = {"cache_prompt": False} if slot is None else {"cache_prompt": True, "id_slot": slot}
        with self.states.using([version]) as state:
            for position, token in enumerate(continuation):
                reply = state.server.handle_completions({
                    "prompt": list(prompt_ids) + list(continuation[:position]), "n_predict": 1, "temperature": 0.0,
                    "n_probs": top_k, "lora": state.lora(version), **cache})
                if "error" in reply:
                    raise RuntimeError(f"llama.cpp: {reply['error']}")
                content = (reply["choices"][0].get("logprobs") or {}).get("content") or []
                if not content:  # the greedy token ended the turn: llama.cpp reports no probabilities then
                    out.append(None)
                    continue
                top = content[0]["top_logprobs"]
                out.append(next((entry["logprob"] for entry in top if entry["id"] == token), None))
        return out

    def close(self) -> None:
        self.states.close_all()
        if self._own_work_dir:
            import shutil

            shutil.rmtree(self.work_dir, ignore_errors=True)

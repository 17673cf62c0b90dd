"""Sampling answers: two at once, streamed token by token, each row from its own adapter version.

`ChatEngine` is what the arena, the benchmarks and the trainer sample through: build a prompt from messages,
stream a pair (each answer from its own version), sample a batch. Engines: `Generator` here (transformers,
bitsandbytes NF4, any model, GPUs), `llamacpp_engine.LlamaCppEngine` (the shipped 4-bit GGUF as is; the CPU
default) and `openai_engine.OpenAIEngine` (any OpenAI-compatible server); `engine.build_engine` picks one.

In `Generator`, a pair is one batched `generate` call with PEFT's per-row `adapter_names`, so "answer A from
version n, answer B from version n-1" costs one forward pass per token rather than two.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from peft import LoraConfig, PeftModel
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from rlhf_online.adapters import CorruptAdapterError, lora_state_for
from rlhf_online.config import SamplingConfig
from rlhf_online.models import chat_ids, end_of_turn_ids
from rlhf_online.versions import BASE_VERSION

PEFT_BASE = "__base__"  # PEFT's reserved name for "no adapter" in `adapter_names`
T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """A chat-templated prompt and whether older turns had to be dropped to fit the context budget."""

    input_ids: list[int]
    messages: list[dict]
    truncated: bool


@dataclass(frozen=True)
class StreamUpdate:
    texts: tuple[str, ...]
    finished: tuple[bool, ...]


class _BatchStreamer(BaseStreamer):
    """Receives each step's new token ids (B,) from `generate` and hands them to the consuming thread.

    transformers' TextIteratorStreamer only supports batch size 1; a pair needs 2 rows.
    """

    def __init__(self):
        self.tokens: queue.Queue = queue.Queue()
        self._seen_prompt = False

    def put(self, value: torch.Tensor):
        if not self._seen_prompt:  # the first call carries the prompt (B, T)
            self._seen_prompt = True
            return
        self.tokens.put(value.reshape(-1).tolist())  # (B,)

    def end(self):
        self.tokens.put(None)


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """Chat prompts from messages (one chat template and context budget for every engine) and the sampling
    calls built on an engine's `stream`. Subclasses set `tokenizer`, `sampling`, `name` and implement `stream`."""

    name = "engine"
    tokenizer = None
    sampling: SamplingConfig

    def build_prompt(self, messages: Sequence[dict], budget: int | None = None) -> Prompt:
        """Apply the chat template, dropping the oldest turns (never the last message) to fit the budget."""
        budget = budget or self.sampling.context_tokens
        messages = list(messages)
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        truncated = False
        while True:
            ids = chat_ids(self.tokenizer, system + turns)
            if len(ids) <= budget or len(turns) <= 1:
                break
            turns = turns[1:]
            truncated = True
        if len(ids) > budget:  # one message alone is too long: keep its end, where the question usually is
            last = dict(turns[-1])
            overflow = len(ids) - budget
            content_ids = self.tokenizer(last["content"], add_special_tokens=False)["input_ids"]
            last["content"] = self.tokenizer.decode(content_ids[overflow:])
            turns = turns[:-1] + [last]
            ids = chat_ids(self.tokenizer, system + turns)[-budget:]
            truncated = True
        return Prompt(input_ids=ids, messages=system + turns, truncated=truncated)

    def stream(self, prompt_ids: Sequence[list[int]], versions: Sequence[str], max_new_tokens: int | None = None,
               ignore_end: bool = False) -> Iterator[StreamUpdate]:
        """Yield every row's text so far after each new token until all rows end their turn; row i is sampled
        from `versions[i]`. `ignore_end` makes every row run to `max_new_tokens` (benchmarks)."""
        raise NotImplementedError

    def stream_pair(self, prompt: Prompt, versions: tuple[str, str],
                    max_new_tokens: int | None = None) -> Iterator[StreamUpdate]:
        return self.stream([prompt.input_ids, prompt.input_ids], versions, max_new_tokens)

    def sample(self, prompt_ids: Sequence[list[int]], adapter_versions: Sequence[str],
               max_new_tokens: int | None = None) -> list[str]:
        """Non-streaming convenience: the final texts."""
        update = None
        for update in self.stream(prompt_ids, adapter_versions, max_new_tokens):
            pass
        return list(update.texts)

    def close(self) -> None:
        """Release what the engine holds (servers, threads); the transformers engine holds nothing to close."""


def merge_row_streams(rows: int, run_row: Callable[[int, Callable[[object], None], threading.Event], None],
                      fail: Callable[[object], Exception], name: str,
                      wait_for_rows: bool = True) -> Iterator[StreamUpdate]:
    """The engines that send each row as its own streaming request (llama.cpp, an OpenAI-compatible server): run
    `run_row(row, emit, stop)` for every row at once, each in its own thread, and merge what they emit into one
    stream of every row's text so far.

    `emit` takes one completion chunk, OpenAI-style (`{"choices": [{"text", "finish_reason"}]}` or
    `{"error": ...}`), as a dict or its JSON text; `run_row` returns when its row is done and should return soon
    after `stop` is set, which happens when the consumer stops iterating. A row's exception or error chunk ends
    the stream with `fail(reason)`. `wait_for_rows`: join the row threads before returning (an engine whose rows
    stop only at their next chunk may leave them to finish on their own).
    """
    chunks: queue.Queue = queue.Queue()
    stop = threading.Event()

    def run(row: int) -> None:
        try:
            run_row(row, lambda chunk: chunks.put((row, chunk)), stop)
        except BaseException as exc:  # surfaced in the consuming thread
            chunks.put((row, exc))
        chunks.put((row, None))

    workers = [threading.Thread(target=run, args=(row,), name=f"{name}-row{row}", daemon=True) for row in range(rows)]
    for worker in workers:
        worker.start()
    texts = [""] * rows
    finished = [False] * rows
    running = rows
    try:
        while running:
            row, item = chunks.get()
            if item is None:
                running -= 1
                finished[row] = True
                continue
            if isinstance(item, BaseException):
                raise fail(item) from item
            try:
                data = json.loads(item) if isinstance(item, (str, bytes)) else item
            except ValueError as exc:
                raise fail(exc) from exc
            if "error" in data:
                raise fail(data["error"])
            choice = (data.get("choices") or [{}])[0]
            texts[row] += choice.get("text") or ""
            if choice.get("finish_reason"):
                finished[row] = True
            yield StreamUpdate(texts=tuple(t.strip() for t in texts), finished=tuple(finished))
    finally:
        stop.set()
        if wait_for_rows:
            for worker in workers:
                worker.join()
    yield StreamUpdate(texts=tuple(t.strip() for t in texts), finished=(True,) * rows)


def at_most_every(updates: Iterator[T], interval_s: float, clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """The updates of a stream, thinned so that two are at least `interval_s` apart: an update that comes sooner
    is held and replaced by the next one, and the last is always delivered. Each update is a full snapshot (every
    row's text so far), so dropping one loses nothing; the first arrives at once, so time to first token is kept.

    The thinning happens where the updates are consumed: an update only waits for the next one, which at token
    rates is a few tens of milliseconds, and the stream's end flushes what is held."""
    last_sent = -math.inf
    held = _NOTHING = object()
    for update in updates:
        now = clock()
        if now - last_sent >= interval_s:
            last_sent, held = now, _NOTHING
            yield update
        else:
            held = update
    if held is not _NOTHING:
        yield held


SLOT_PREFIX = "slot-"  # PEFT adapter names of the serving model's pre-built adapter slots


def _same_shape(config: LoraConfig, shape: LoraConfig) -> bool:
    """Whether a version's tensors can be copied into a slot built from `shape` and mean the same thing."""
    def key(c: LoraConfig):
        layers = c.layers_to_transform
        return (c.r, c.lora_alpha, frozenset(c.target_modules or ()), tuple(layers) if isinstance(layers, list)
                else layers, c.use_rslora, c.use_dora, c.bias)
    return key(config) == key(shape)


class Generator(ChatEngine):
    """The transformers engine. Owns the serving model, its adapters and which version each adapter holds; one
    generation runs at a time, which also makes adapter swaps safe (`live_adapters.LiveAdapters` decides which
    versions to load and calls `put_adapter` / `remove_adapter` holding `exclusive()`).

    PEFT's per-row adapter selection installs forward hooks for the duration of a call, so two concurrent
    `generate` calls on one model would interfere. On 2 CPU cores a second concurrent call would not be
    faster anyway; the Gradio queue holds waiting requests.

    `gpu_call` wraps the pair call (ZeroGPU lends a GPU per decorated call: `hardware.maybe_gpu_decorator`).
    """

    name = "transformers"

    def __init__(self, model, tokenizer, sampling: SamplingConfig,
                 gpu_call: Callable[[Callable], Callable] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.lock = threading.Lock()
        self.end_of_turn_ids = end_of_turn_ids(tokenizer)
        self._adapter_of: dict[str, str] = {}  # version -> the slot (PEFT adapter) holding it
        self._slots: dict[str, str | None] = {}  # slot -> the version it holds (None: free)
        self._slot_params: dict[str, dict[str, torch.nn.Parameter]] = {}
        self._slot_shape: LoraConfig | None = None
        pair_call = super().stream_pair
        self._pair_call = gpu_call(pair_call) if gpu_call is not None else pair_call

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the model between generations (adapter load and unload)."""
        with self.lock:
            yield self.model

    def stream_pair(self, prompt: Prompt, versions: tuple[str, str],
                    max_new_tokens: int | None = None) -> Iterator[StreamUpdate]:
        return self._pair_call(prompt, versions, max_new_tokens)

    # ---- adapters: which PEFT adapter serves which version ------------------------------------------------------
    def build_slots(self, lora_shape: LoraConfig, count: int) -> None:
        """Wrap the serving model in PEFT with `count` empty adapter slots of `lora_shape`, before it serves.

        Why slots: injecting a new adapter (`add_adapter`) creates LoRA modules in every target layer, which held
        the model for ~130 ms on 2 cores (up to 390 ms), stalling every chat for that long; a swap into a slot
        only copies tensors. Why now: done lazily at the first publish, wrapping held the model lock for 2.2 s on
        the embedded model. A free slot is never named in a request (and its fresh lora_B is zero), so it changes
        no answer.
        """
        if isinstance(self.model, PeftModel):
            return
        config = copy.deepcopy(lora_shape)
        config.inference_mode = True
        names = [f"{SLOT_PREFIX}{i}" for i in range(count)]
        model = PeftModel(self.model, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, copy.deepcopy(config))
        self.model = model.eval()
        self._slot_shape = lora_shape
        params = dict(model.named_parameters())
        for name in names:
            self._slots[name] = None
            self._slot_params[name] = {key: p for key, p in params.items() if f".{name}." in key}

    def peft_adapter(self, version: str) -> str:
        """The PEFT adapter name a request for `version` runs with (a slot, the version itself, or PEFT's base)."""
        return to_peft_name(self._adapter_of.get(version, version))

    def slot_versions(self) -> dict[str, str]:
        """Versions held in adapter slots now, and their slot."""
        return dict(self._adapter_of)

    def put_adapter(self, version: str, config: LoraConfig, saved: dict[str, torch.Tensor], source=None) -> None:
        """Serve `version` from its saved LoRA tensors: copied into a free slot it fits, else into a new PEFT
        adapter named after it. Call holding `exclusive()`. `source` names the file in errors.

        Why not `PeftModel.load_adapter`: it calls `state_dict()`, and on CPU that un-repacks bitsandbytes' 4-bit
        weights in a way that leaves the base model producing garbage (measured with bitsandbytes 0.50.2).
        """
        slot = self._free_slot(config, saved)
        if slot is not None:
            slot_name, weights = slot
            targets = self._slot_params[slot_name]
        else:
            weights = lora_state_for(saved, version)
            targets = self._inject(version, config, weights, source)
        with torch.no_grad():
            for key, tensor in weights.items():
                targets[key].copy_(tensor)
        if slot is not None:
            self._slots[slot_name] = version
            self._adapter_of[version] = slot_name

    def remove_adapter(self, version: str) -> None:
        """Stop holding `version`: free its slot (stale tensors in a free slot are never served) or delete its
        adapter. Call holding `exclusive()`."""
        slot = self._adapter_of.pop(version, None)
        if slot is not None:
            self._slots[slot] = None
        else:
            self.model.delete_adapter(version)

    def _free_slot(self, config: LoraConfig, saved: dict[str, torch.Tensor]) -> tuple[str, dict] | None:
        """A free slot this version fits exactly, with its tensors renamed to the slot's parameters."""
        if self._slot_shape is None or not _same_shape(config, self._slot_shape):
            return None
        for slot, holder in self._slots.items():
            if holder is None:
                weights = lora_state_for(saved, slot)
                if set(weights) == set(self._slot_params[slot]):
                    return slot, weights
                return None  # same shape but other tensors (e.g. another base): take the general path
        return None

    def _inject(self, version: str, config: LoraConfig, weights: dict[str, torch.Tensor], source) -> dict:
        """The general path: a new PEFT adapter named after the version; returns its parameters to copy into."""
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel(self.model, config, adapter_name=version)
        else:
            self.model.add_adapter(version, config)
        params = dict(self.model.named_parameters())
        missing = [k for k in weights if k not in params]
        if missing:
            if len(self.model.peft_config) > 1:
                self.model.delete_adapter(version)
            raise CorruptAdapterError(f"{source or version}: {len(missing)} tensors do not match the base model")
        self.model.eval()
        return {key: params[key] for key in weights}

    def _batch(self, prompts: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad({"input_ids": list(prompts)}, padding=True, return_tensors="pt")
        return {key: tensor.to(self.model.device) for key, tensor in batch.items()}

    def _generate_kwargs(self, adapter_versions: Sequence[str], max_new_tokens: int | None,
                         ignore_end: bool = False, prompt_length: int = 0) -> dict:
        max_new_tokens = max_new_tokens or self.sampling.max_new_tokens
        kwargs = dict(do_sample=self.sampling.temperature > 0, temperature=self.sampling.temperature or None,
                      top_p=self.sampling.top_p, max_new_tokens=max_new_tokens,
                      eos_token_id=self.end_of_turn_ids, pad_token_id=self.tokenizer.pad_token_id,
                      top_k=None, min_new_tokens=max_new_tokens if ignore_end else None,
                      logits_processor=answer_repetition_penalty(self.sampling.repetition_penalty, prompt_length))
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = [self.peft_adapter(v) for v in adapter_versions]
        elif any(v != BASE_VERSION for v in adapter_versions):
            raise KeyError(f"no adapters are loaded, cannot sample from {list(adapter_versions)}")
        return kwargs

    def stream(self, prompt_ids: Sequence[list[int]], adapter_versions: Sequence[str],
               max_new_tokens: int | None = None, ignore_end: bool = False) -> Iterator[StreamUpdate]:
        """Yield the decoded text of every row after each new token, until all rows end their turn.

        `generate` runs in its own thread holding the model lock; the caller may iterate from any thread
        (Gradio moves generators between worker threads) and may stop early: the `finally` makes the
        generation stop at its next token so an abandoned stream never keeps the model.
        """
        batch = self._batch(prompt_ids)
        kwargs = self._generate_kwargs(adapter_versions, max_new_tokens, ignore_end, batch["input_ids"].shape[1])
        rows = len(prompt_ids)
        streamer = _BatchStreamer()
        stop = threading.Event()
        generated: list[list[int]] = [[] for _ in range(rows)]
        finished = [False] * rows
        errors: list[BaseException] = []

        def run():
            try:
                with self.lock, torch.inference_mode():
                    self.model.generate(**batch, streamer=streamer, stopping_criteria=[_StopOnEvent(stop)],
                                        **kwargs)
            except BaseException as exc:  # surfaced in the consuming thread below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="generate", daemon=True)
        worker.start()
        try:
            while (step := streamer.tokens.get()) is not None:
                for row, token in enumerate(step):
                    if finished[row]:
                        continue
                    if token in self.end_of_turn_ids:
                        finished[row] = True
                    else:
                        generated[row].append(token)
                yield StreamUpdate(texts=tuple(self._decode(g) for g in generated), finished=tuple(finished))
        finally:
            stop.set()
        worker.join()
        if errors:
            raise errors[0]
        yield StreamUpdate(texts=tuple(self._decode(g) for g in generated), finished=(True,) * rows)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def answer_repetition_penalty(penalty: float, prompt_length: int) -> LogitsProcessorList:
    """CTRL's repetition penalty on the answer's own tokens only (`generate(repetition_penalty=)` also
    penalises every prompt token, which keeps an answer from naming what the question asked about).

    Small models sampled at temperature 0.8 often fall into a loop (the same phrase until the token limit);
    bench/sampling_loops.py measures how often, and how much this penalty helps.
    """
    if not penalty or penalty == 1.0:
        return LogitsProcessorList()
    return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_length)])


def to_peft_name(version: str) -> str:
    return PEFT_BASE if version == BASE_VERSION else version

"""The openai engine: answers from any OpenAI-compatible server that serves LoRA adapters, for deployments that
outgrow one machine. Two kinds of server are understood, told apart by what they answer:

* vLLM (`vllm serve MODEL --enable-lora`, with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`): a published version is
  registered with `POST /v1/load_lora_adapter {"lora_name": "v0007", "lora_path": <its PEFT folder>}` (the
  folder must be readable by the server: share the adapters folder) and requested as `"model": "v0007"`;
  versions no longer served are unloaded.
* llama.cpp's server (`llama-server -m model.gguf --lora-init-without-apply --lora vNNNN/adapter_model.gguf
  ...`, or `python -m rlhf_online.llamacpp_server`): it loads adapter files only at start, so a version is
  served if the server was started with its GGUF file (matched by path, `GET /lora-adapters`) and picked per
  request with `"lora": [{"id", "scale"}]`; a version it lacks cannot be registered, so that build fails with a
  logged reason and the versions it has keep serving.

Prompts are sent as token ids to `/v1/completions` (the chat template and context budget stay this app's own,
identical for every engine) and streamed back as server-sent events.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_online.adapters import VersionInfo
from rlhf_online.config import SamplingConfig
from rlhf_online.generation import ChatEngine, StreamUpdate, merge_row_streams
from rlhf_online.gguf_adapter import GGUF_ADAPTER_FILE
from rlhf_online.llamacpp_engine import chat_repeat_penalty
from rlhf_online.models import end_of_turn_id
from rlhf_online.served_versions import EngineStates
from rlhf_online.versions import BASE_VERSION

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    pass


@dataclass
class RemoteState:
    versions: dict[str, object] = field(default_factory=dict)  # version -> llama.cpp adapter id, or vLLM name


class OpenAIEngine(ChatEngine):
    name = "openai"

    def __init__(self, url: str, tokenizer, sampling: SamplingConfig, api_key: str = "", timeout_s: float = 600):
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.end_of_turn_id = end_of_turn_id(tokenizer)
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.server_kind, self.base_model = self._probe()
        log.info("openai engine: %s server at %s, base model %r", self.server_kind, self.url, self.base_model)
        self.states = EngineStates(RemoteState(), self._close_state)

    # ---- HTTP ------------------------------------------------------------------------------------------------
    def _open(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        return urllib.request.urlopen(request, timeout=timeout or self.timeout_s)

    def _call(self, method: str, path: str, body: dict | None = None) -> object:
        try:
            with self._open(method, path, body, timeout=30) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}") \
                from exc
        except OSError as exc:
            raise ServerError(f"{method} {path}: {exc}") from exc
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    def _probe(self) -> tuple[str, str]:
        models = self._call("GET", "/v1/models")
        data = models.get("data") if isinstance(models, dict) else None
        if not data:
            raise ServerError(f"{self.url}/v1/models lists no model")
        base = data[0]["id"]
        try:
            adapters = self._call("GET", "/lora-adapters")
            if isinstance(adapters, list):
                return "llama.cpp", base
        except ServerError:
            pass
        return "vllm", base

    # ---- versions --------------------------------------------------------------------------------------------
    def build_state(self, infos: list[VersionInfo]) -> RemoteState:
        if self.server_kind == "llama.cpp":
            return RemoteState({info.name: self._llamacpp_adapter_id(info) for info in infos})
        for info in infos:
            if info.name not in self.states.current.versions:
                try:
                    self._call("POST", "/v1/load_lora_adapter", {"lora_name": info.name, "lora_path": str(info.path)})
                except ServerError as exc:
                    if "already" not in str(exc).lower():
                        raise
        return RemoteState({info.name: info.name for info in infos})

    def _llamacpp_adapter_id(self, info: VersionInfo) -> int:
        wanted = (info.path / GGUF_ADAPTER_FILE).resolve()
        for adapter in self._call("GET", "/lora-adapters"):
            if Path(adapter["path"]).resolve() == wanted:
                return adapter["id"]
        raise ServerError(f"the llama.cpp server was not started with {wanted} (it loads adapter files only at "
                          f"start: restart it with --lora {wanted})")

    def _close_state(self, state: RemoteState) -> None:
        if self.server_kind != "vllm":
            return
        for name in set(state.versions) - set(self.states.current.versions):
            try:
                self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
            except ServerError as exc:
                log.warning("could not unload %s from the server: %s", name, exc)

    # ---- sampling --------------------------------------------------------------------------------------------
    def _request(self, state: RemoteState, prompt_ids: list[int], version: str, max_new_tokens: int,
                 ignore_end: bool) -> dict:
        if version != BASE_VERSION and version not in state.versions:
            raise KeyError(f"version {version!r} is not loaded on the server")
        body = {"prompt": list(prompt_ids), "max_tokens": max_new_tokens, "stream": True,
                "temperature": self.sampling.temperature, "top_p": self.sampling.top_p, "model": self.base_model}
        if ignore_end:
            body["ignore_eos"] = True
        if self.server_kind == "llama.cpp":
            chosen = state.versions.get(version)
            body.update(lora=[{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in state.versions.values()],
                        top_k=0, min_p=0.0, cache_prompt=False,  # see llamacpp_engine: the cache ignores adapters
                        **chat_repeat_penalty(self.sampling, self.end_of_turn_id))
        else:  # vLLM's sampling extension (it penalises the prompt's tokens too)
            body["repetition_penalty"] = self.sampling.repetition_penalty or 1.0
            if version != BASE_VERSION:
                body["model"] = state.versions[version]
        return body

    def stream(self, prompt_ids: Sequence[list[int]], versions: Sequence[str], max_new_tokens: int | None = None,
               ignore_end: bool = False) -> Iterator[StreamUpdate]:
        max_new_tokens = max_new_tokens or self.sampling.max_new_tokens
        with self.states.using(versions) as state:
            bodies = [self._request(state, ids, version, max_new_tokens, ignore_end)
                      for ids, version in zip(prompt_ids, versions)]

            def run_row(row: int, emit, stop: threading.Event) -> None:
                with self._open("POST", "/v1/completions", bodies[row]) as response:
                    for raw in response:  # server-sent events: "data: {...}" lines
                        line = raw.decode().strip()
                        if stop.is_set() or line == "data: [DONE]":
                            break
                        if line.startswith("data:"):
                            emit(line[5:])

            # a row stops reading at its next event (closing the connection ends it on the server): not waited for
            yield from merge_row_streams(len(prompt_ids), run_row,
                                         lambda reason: ServerError(f"generation failed on {self.url}: {reason}"),
                                         "openai", wait_for_rows=False)

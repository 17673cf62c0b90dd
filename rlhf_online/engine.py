"""Choosing and building the engine that samples the chat's answers, with its hot-swap of published versions.

| engine | serves | versions swap by | when |
|---|---|---|---|
| `llamacpp` | the GGUF file as is (the embedded Q4_1) | a new llama.cpp server with the new GGUF adapters, built in the background | `auto` on CPU for a GGUF model |
| `transformers` | any model, bitsandbytes NF4 / bf16 / fp32, GPUs | tensor copies into pre-built PEFT slots | `auto` otherwise |
| `openai` | whatever an OpenAI-compatible server serves | registering adapters with the server | asked for, with `--engine-url` |

Every engine is a `generation.ChatEngine`; its live-versions manager has the face of `live_adapters.LiveAdapters`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

from rlhf_online.adapters import AdapterRegistry
from rlhf_online.config import ENGINES, AppConfig
from rlhf_online.generation import ChatEngine, Generator
from rlhf_online.hardware import maybe_gpu_decorator
from rlhf_online.live_adapters import LiveAdapters
from rlhf_online.gguf_weights import engine_gguf
from rlhf_online.models import gguf_model_file, load_base_model, policy_lora_config

log = logging.getLogger(__name__)


class EngineUnavailableError(RuntimeError):
    """The chosen engine cannot start here; the message says which flag to change."""


@dataclass
class ServingEngine:
    engine: ChatEngine
    live: object  # LiveAdapters or served_versions.ServedVersions
    weights: str  # what the served base weights are, for the page: "nf4", "bf16", "Q4_1 GGUF", "remote"


def choose_engine(cfg: AppConfig, cuda: bool) -> str:
    """The engine to use, or EngineUnavailableError naming the flag that picks another."""
    name = cfg.serve.engine
    if name not in ENGINES:
        raise EngineUnavailableError(f"--engine {name!r} is not an engine: choose one of {', '.join(ENGINES)}")
    gguf = gguf_model_file(cfg.model)
    if name == "auto":
        name = "llamacpp" if gguf is not None and not cuda else "transformers"
    if name == "llamacpp":
        if gguf is None:
            raise EngineUnavailableError(
                f"--engine llamacpp serves GGUF models, and --model {cfg.model.model!r} is not one: use "
                "--model embedded or a .gguf file, or --engine transformers")
        if importlib.util.find_spec("xllamacpp") is None:
            from rlhf_online.llamacpp_engine import XLLAMACPP_PIN

            raise EngineUnavailableError(
                f"the llamacpp engine needs the xllamacpp package, which is not installed: pip install "
                f"{XLLAMACPP_PIN} (a prebuilt wheel), or start with --engine transformers")
    if name == "openai" and not cfg.serve.engine_url:
        raise EngineUnavailableError("--engine openai needs --engine-url (the server's base URL, e.g. "
                                     "http://127.0.0.1:8000), or choose --engine llamacpp or transformers")
    return name


def build_engine(cfg: AppConfig, name: str, tokenizer, source: str, registry: AdapterRegistry) -> ServingEngine:
    """Load the engine `choose_engine` picked and its manager of published versions (not yet refreshed)."""
    keep = 2  # the newest version and its predecessor: what a pair compares
    if name == "transformers":
        base = load_base_model(source, cfg.model.resolved_quantization(), for_training=False)
        generator = Generator(base.model, tokenizer, cfg.sampling,  # on ZeroGPU, a GPU lent per pair
                              gpu_call=lambda call: maybe_gpu_decorator(call, os.environ))
        live = LiveAdapters(generator, registry, keep=keep, lora_shape=policy_lora_config(cfg.model, base.model.config))
        return ServingEngine(generator, live, base.quantization)
    from rlhf_online.served_versions import ServedVersions

    if name == "llamacpp":
        from rlhf_online.llamacpp_engine import LlamaCppEngine

        gguf = engine_gguf(cfg)
        slots = cfg.serve.engine_slots or 2 * max(1, cfg.limits.queue_concurrency)
        threads = cfg.serve.engine_threads or os.cpu_count() or 1
        engine = LlamaCppEngine(gguf, tokenizer, cfg.sampling, slots=slots, threads=threads,
                                lanes=cfg.serve.engine_lanes or min(2, threads))
        log.info("llama.cpp engine: %s, %d lanes x %d slots, %d threads", gguf.name, engine.lanes,
                 engine.slots, engine.threads)
        shipped = gguf_model_file(cfg.model)
        label = f"{shipped.stem.split('.')[-1]} GGUF" + (" (stored as Q8_0)" if gguf != shipped else "")
        return ServingEngine(engine, ServedVersions(engine, registry, keep=keep), label)
    if name == "openai":
        from rlhf_online.openai_engine import OpenAIEngine

        engine = OpenAIEngine(cfg.serve.engine_url, tokenizer, cfg.sampling, api_key=cfg.serve.engine_api_key)
        return ServingEngine(engine, ServedVersions(engine, registry, keep=keep), "remote")
    raise EngineUnavailableError(f"unknown engine {name!r}")

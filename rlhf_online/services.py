"""Composition: build every service the app needs from one config, and shut them down together."""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass

import torch

from rlhf_online.adapters import AdapterRegistry, LiveAdapters
from rlhf_online.arena import Arena
from rlhf_online.config import AppConfig
from rlhf_online.generation import Generator
from rlhf_online.models import load_base_model, load_tokenizer, lora_config, resolve_model_source
from rlhf_online.store import PreferenceStore, store_path
from rlhf_online.supervisor import TrainerSupervisor

log = logging.getLogger(__name__)


@dataclass
class Services:
    cfg: AppConfig
    store: PreferenceStore
    registry: AdapterRegistry
    generator: Generator
    live: LiveAdapters
    arena: Arena
    supervisor: TrainerSupervisor | None
    quantization: str

    def close(self) -> None:
        self.live.stop()
        if self.supervisor is not None:
            self.supervisor.stop()
        self.store.close()


def build_services(cfg: AppConfig, start_trainer: bool | None = None) -> Services:
    """Load the serving model, open the store, hot-load the newest adapter, and start the trainer."""
    if cfg.sampling.torch_threads:
        torch.set_num_threads(cfg.sampling.torch_threads)
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    store = PreferenceStore(store_path(cfg.data_path))
    registry = AdapterRegistry(cfg.adapters_path)
    source = resolve_model_source(cfg.model)  # converts the embedded GGUF once, before the trainer needs it
    tokenizer = load_tokenizer(source)
    base = load_base_model(source, cfg.model.quantization, for_training=False)
    generator = Generator(base.model, tokenizer, cfg.sampling)
    live = LiveAdapters(generator, registry, lora_shape=lora_config(cfg.model))
    try:
        live.refresh()
    except Exception:
        log.exception("could not load the newest adapter; serving the base model")
    live.watch()
    chat_busy = mp.get_context("spawn").Value("i", 0)
    supervisor = None
    if cfg.train if start_trainer is None else start_trainer:
        supervisor = TrainerSupervisor(cfg, chat_busy)
        supervisor.start()
    else:
        log.info("background training is off (--no-train): serving and collecting votes only")
    arena = Arena(store, generator, cfg.sampling, pair_versions=live.pinned_pair, chat_busy=chat_busy,
                  seed=cfg.seed or None)
    return Services(cfg=cfg, store=store, registry=registry, generator=generator, live=live, arena=arena,
                    supervisor=supervisor, quantization=base.quantization)

"""Composition: build every service the app needs from one config, and shut them down together."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_online.adapters import AdapterRegistry
from rlhf_online.arena import Arena
from rlhf_online.config import AppConfig
from rlhf_online.engine import build_engine, choose_engine
from rlhf_online.export import remove_exports
from rlhf_online.generation import ChatEngine
from rlhf_online.hardware import Hardware, detect
from rlhf_online.hub_sync import HubSync
from rlhf_online.limits import Limits, SessionVoteCounter
from rlhf_online.live_adapters import LiveAdapters
from rlhf_online.models import load_tokenizer, resolve_model_source
from rlhf_online.store import PreferenceStore, store_path
from rlhf_online.supervisor import TrainerSupervisor
from rlhf_online.worker import REWARD_CHECKPOINT

log = logging.getLogger(__name__)


@dataclass
class Services:
    cfg: AppConfig
    store: PreferenceStore
    registry: AdapterRegistry
    generator: ChatEngine  # the serving engine (name kept: benchmarks and the UI know it by it)
    live: LiveAdapters  # or served_versions.ServedVersions, with the same face
    arena: Arena
    supervisor: TrainerSupervisor | None
    quantization: str
    limits: Limits | None = None
    hardware: Hardware | None = None
    hub: HubSync | None = None
    _reset_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def training_notice(self) -> str | None:
        """Why training is off when the config asked for it (ZeroGPU), for the page to show."""
        return self.hardware.training_notice if self.hardware is not None and self.cfg.train else None

    @property
    def engine(self) -> ChatEngine:
        return self.generator

    def close(self) -> None:
        """Stop serving, stop the trainer (it saves the reward model), push to the Hub a last time, close files."""
        self.live.stop()
        self.generator.close()
        if self.supervisor is not None:
            self.supervisor.stop(timeout_s=self.cfg.shutdown_timeout_s / 2)
        if self.hub is not None:
            self.hub.stop()
        if self.limits is not None:
            self.limits.close()
        self.store.close()
        remove_exports(max_age_s=0, own_only=True)

    def reset_data(self) -> Path:
        """Admin "reset data": move the database and reward checkpoints aside whole, start a fresh database.

        The trainer is stopped first (its reward model and its cursor into the old votes would be wrong for the
        new file) and restarted on the new one. Moving closed files within one folder is atomic, and nothing is
        deleted: the returned folder holds the old data. A vote racing the reset either committed to the old
        file (and is in the backup) or fails with an error; none is acknowledged and lost. Two resets never run at
        once (they would close and reopen each other's store), and each gets its own backup folder.
        """
        with self._reset_lock:
            return self._reset_data()

    def _reset_data(self) -> Path:
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.limits is not None:
            self.limits.close()
        self.store.close()
        backup = _new_backup_folder(self.cfg.data_path / "backups")
        path = store_path(self.cfg.data_path)
        for name in (path.name, path.name + "-wal", path.name + "-shm", REWARD_CHECKPOINT,
                     Path(REWARD_CHECKPOINT).with_suffix(".prev.safetensors").name):
            if (self.cfg.data_path / name).exists():
                os.replace(self.cfg.data_path / name, backup / name)
        self.store = self.arena.store = PreferenceStore(path)
        if self.supervisor is not None:
            self.supervisor = TrainerSupervisor(self.cfg, self.arena.chat_busy)
            self.supervisor.start()
        log.warning("data reset by the admin: the previous database is in %s", backup)
        return backup


def _new_backup_folder(root: Path) -> Path:
    """reset-<date>-<time>, with -2, -3... when that second already has one: never an existing folder (the second
    reset of a second used to move the fresh, empty database over the first one's backup)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("reset-%Y%m%d-%H%M%S")
    for attempt in range(1, 10_000):
        folder = root / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a backup folder under {root}")


def build_services(cfg: AppConfig, start_trainer: bool | None = None) -> Services:
    """Load the serving model, open the store, hot-load the newest adapter, and start the trainer."""
    if cfg.sampling.torch_threads:
        torch.set_num_threads(cfg.sampling.torch_threads)
    hardware = detect(os.environ, torch.cuda.is_available())
    engine_name = choose_engine(cfg, torch.cuda.is_available())  # fails fast, naming the flag, before any load
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    hub = HubSync.from_config(cfg)
    if hub is not None:
        hub.restore_at_start()  # before the store creates an empty file in its place
    store = PreferenceStore(store_path(cfg.data_path))
    registry = AdapterRegistry(cfg.adapters_path)
    source = resolve_model_source(cfg.model)  # converts the embedded GGUF once, before the trainer needs it
    tokenizer = load_tokenizer(source)
    serving = build_engine(cfg, engine_name, tokenizer, source, registry)
    generator, live = serving.engine, serving.live
    try:
        live.refresh()
    except Exception:
        log.exception("could not load the newest adapter; serving the base model")
    live.watch()
    # How many chat answers are generating now, shared with the trainer process; read only with --trainer-yield
    # (the trainer then pauses between steps while it is above 0), so not even counted otherwise.
    chat_busy = mp.get_context("spawn").Value("i", 0) if cfg.ppo.trainer_yield else None
    supervisor = None
    want_training = cfg.train if start_trainer is None else start_trainer
    if want_training and not hardware.can_train:
        log.warning(hardware.training_notice)
    elif want_training:
        supervisor = TrainerSupervisor(cfg, chat_busy)
        supervisor.start()
    else:
        log.info("background training is off (--no-train): serving and collecting votes only")
    limits = Limits(cfg.limits, SessionVoteCounter(store_path(cfg.data_path)))
    arena = Arena(store, generator, cfg.sampling, pair_versions=live.pinned_pair, chat_busy=chat_busy,
                  seed=cfg.seed or None, limits=limits)
    if hub is not None:
        hub.start()
    return Services(cfg=cfg, store=store, registry=registry, generator=generator, live=live, arena=arena,
                    supervisor=supervisor, quantization=serving.weights, limits=limits, hardware=hardware, hub=hub)

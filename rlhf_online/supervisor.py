"""Keeps the trainer process alive: starts it, restarts it when it dies, stops it on shutdown.

Training runs in a separate process so nothing it does (a crash, an out-of-memory kill, a hang in a native
kernel) can take the chat down. The supervisor is a daemon thread in the server process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field

from rlhf_online.config import AppConfig
from rlhf_online.lifecycle import TRAINER_LOCKED_EXIT_CODE, StopFlag
from rlhf_online.worker import trainer_main

log = logging.getLogger(__name__)


@dataclass
class TrainerStatus:
    alive: bool = False
    pid: int | None = None
    starts: int = 0
    last_exit_code: int | None = None
    last_exit_at: float | None = None
    history: list[str] = field(default_factory=list)


class TrainerSupervisor:
    """Restarts the trainer with an exponential backoff (capped), so a crash loop cannot spin the CPU."""

    def __init__(self, cfg: AppConfig, chat_busy=None, min_backoff_s: float = 2.0, max_backoff_s: float = 60.0,
                 target=trainer_main):
        self.cfg = cfg
        self.context = mp.get_context("spawn")  # fork would copy the server's threads and model state
        self.chat_busy = chat_busy  # the chat's in-flight counter, only with --trainer-yield (see services)
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.target = target
        self.status = TrainerStatus()
        self._process = None
        self._stop = threading.Event()
        self._stop_child = StopFlag(self.context)  # not an Event: a killed trainer could leave its lock held
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="trainer-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        self._process = self.context.Process(target=self.target, args=(self.cfg, self.chat_busy, self._stop_child),
                                             name="rlhf-trainer", daemon=True)
        self._process.start()
        self.status.alive, self.status.pid = True, self._process.pid
        self.status.starts += 1
        log.info("trainer process started (pid %s, start #%d)", self._process.pid, self.status.starts)

    def _watch(self) -> None:
        backoff = self.min_backoff_s
        while not self._stop.is_set():
            self._spawn()
            started = time.monotonic()
            while self._process.is_alive() and not self._stop.is_set():
                self._process.join(timeout=0.5)
            if self._stop.is_set():
                return
            code = self._process.exitcode
            self.status.alive, self.status.last_exit_code, self.status.last_exit_at = False, code, time.time()
            message = f"trainer exited with code {code} after {time.monotonic() - started:.0f} s; restarting"
            if code == TRAINER_LOCKED_EXIT_CODE:
                message = ("trainer not started: another trainer holds the lock on the adapters folder (see its log "
                           "line above); trying again later")
            self.status.history.append(message)
            log.error(message)
            backoff = self.min_backoff_s if time.monotonic() - started > 5 * self.max_backoff_s \
                else min(self.max_backoff_s, backoff * 2)
            self._stop.wait(backoff)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the trainer to finish its step and checkpoint; kill it if it does not.

        The watcher thread is joined first, so a trainer it spawned in the same instant is not missed.
        """
        self._stop.set()
        self._stop_child.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        process = self._process
        if process is not None and process.is_alive():
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(2)
        self.status.alive = False

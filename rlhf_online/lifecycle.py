"""Process lifecycle: a bounded clean shutdown on SIGTERM/SIGINT, a trainer that follows its parent out, and one
trainer per adapters folder.

Why by hand: Gradio installs no SIGTERM handler (outside SSR mode), and SIGTERM is what Spaces, Docker and
systemd send; without one the app dies at once, the final reward checkpoint and Hub push never run, and the
trainer child lives on with PPID 1. A restart then ran two trainers on one store and `adapters/`. Three guards:

- the app turns SIGTERM/SIGINT into Gradio's own "close the server" path (KeyboardInterrupt in the main thread),
  then closes its services, with a watchdog that ends the process if that takes longer than the configured bound;
- the trainer watches its parent's sentinel (readable when the parent is gone, however it died) and stops itself;
- the trainer takes an exclusive lock file in the adapters folder (released by the kernel when it dies, so a
  crash never leaves a stale lock): a second trainer on the same folder refuses to start and says why.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

TRAINER_LOCK_FILE = ".trainer.lock"
TRAINER_LOCKED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", the supervisor retries with its backoff


# ---- the app: signals -> clean, bounded shutdown ---------------------------------------------------------------

class ShutdownSignals:
    """First SIGTERM/SIGINT: start a clean shutdown (interrupt the main thread, as Ctrl-C does, so Gradio closes
    its server and the caller's `finally` closes the services), and arm a watchdog that exits after `timeout_s`.
    A second signal exits at once."""

    def __init__(self, timeout_s: float, exit_fn: Callable[[int], None] = os._exit):
        self.timeout_s = timeout_s
        self.exit_fn = exit_fn
        self.requested = threading.Event()
        self.finished = threading.Event()

    def install(self) -> ShutdownSignals:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, _frame) -> None:
        name = signal.Signals(number).name
        if self.requested.is_set():
            log.warning("%s again: exiting now", name)
            self.exit_fn(1)
            return
        self.requested.set()
        log.warning("%s received: shutting down (trainer, final reward checkpoint, final Hub push; at most %.0f s)",
                    name, self.timeout_s)
        threading.Thread(target=self._watchdog, name="shutdown-watchdog", daemon=True).start()
        raise KeyboardInterrupt  # lands in the main thread, where Gradio's launch() waits: it closes the server

    def _watchdog(self) -> None:
        if not self.finished.wait(self.timeout_s):
            log.error("clean shutdown took longer than %.0f s: exiting anyway (the trainer stops by itself)",
                      self.timeout_s)
            self.exit_fn(1)

    def done(self) -> None:
        """The clean shutdown completed: disarm the watchdog."""
        self.finished.set()


# ---- the trainer: stop when asked, or when the parent is gone ----------------------------------------------------

class StopFlag:
    """A stop request the app shares with its trainer process: one byte of shared memory, no lock.

    Why not `multiprocessing.Event`: its internal lock stays held forever when a process is killed (SIGKILL, the
    OOM killer) inside `is_set()`; the restarted trainer and the app's `stop()` then both hang on it (seen in
    tests/test_supervisor.py: after a killed trainer, the suite hung in `Event.set`). A signal handler that sets an
    Event while the same thread is inside `is_set()` deadlocks on it too. One byte, written 0 -> 1 and never
    back, needs no lock. Create it before the process starts: shared memory travels only at spawn.
    """

    def __init__(self, context=None):
        self._flag = (context or mp.get_context("spawn")).RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return self._flag.value == 1

    def wait(self, timeout: float) -> bool:
        """Sleep until set or `timeout` seconds have passed (polling: no lock to wait on); whether it is set."""
        deadline = time.monotonic() + timeout
        while not self.is_set() and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.is_set()


def stop_on_signals(stop_event) -> None:
    """In the trainer: SIGTERM (systemd signals the whole group) and SIGINT (Ctrl-C reaches the whole foreground
    group) finish the current step and checkpoint, like the parent's stop request, instead of dying mid-write."""
    def handle(number, _frame):
        log.info("%s received: stopping after this step", signal.Signals(number).name)
        stop_event.set()

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, handle)


def follow_parent(stop_event, grace_s: float = 15.0, exit_fn: Callable[[int], None] = os._exit) -> bool:
    """Start a thread that sets `stop_event` when the parent process is gone (its sentinel becomes readable),
    and ends this process if it has not stopped `grace_s` later. False when there is no parent to watch."""
    parent = mp.parent_process()
    if parent is None:
        return False

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        log.warning("the app (pid %s) is gone: the trainer stops too", parent.pid)
        stop_event.set()
        threading.Event().wait(grace_s)
        log.error("the trainer did not stop within %.0f s of its parent: exiting", grace_s)
        exit_fn(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return True


class TrainerLockedError(RuntimeError):
    """Another trainer holds the adapters folder."""


class TrainerLock:
    """An exclusive `flock` on `<adapters>/.trainer.lock`, holding the owner's pid for the message.

    flock locks belong to the open file: the kernel drops them when the process dies, even by SIGKILL, so there
    is no stale lock to clean up by hand.
    """

    def __init__(self, adapters_dir: str | Path):
        self.path = Path(adapters_dir) / TRAINER_LOCK_FILE
        self._file = None

    def acquire(self) -> TrainerLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise TrainerLockedError(
                f"another trainer (pid {owner}) is already training on {self.path.parent}: this trainer will not "
                "start. Two trainers on one adapters folder would interleave versions and delete each other's "
                "files; stop the other app (or its trainer) first.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> TrainerLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

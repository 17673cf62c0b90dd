"""The real app as a subprocess on the tiny model, for the end-to-end and fault tests.

`python app.py ...` on a free port, in its own process group so a test can SIGKILL it (and the trainer it
spawned) like a crash would; its output goes to a log file the tests read.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 120


def _copy_output(pipe, log_path: Path) -> None:
    """The app logs into a pipe, as under Docker, systemd or Spaces, so a file-size limit put on the app to
    simulate a full disk hits its database writes, not its logging; this thread (in the test) writes the file."""
    with open(log_path, "wb") as log:
        for line in pipe:
            log.write(line)
            log.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningApp:
    """`python app.py ...` on the tiny model; always stopped by the fixture, whatever the test did."""

    def __init__(self, model_dir: Path, root: Path, extra_args: tuple[str, ...] = ("--no-train",),
                 env: dict[str, str] | None = None):
        self.model_dir, self.root = model_dir, root
        self.data_dir, self.adapters_dir = root / "data", root / "adapters"
        self.extra_args, self.extra_env = tuple(extra_args), dict(env or {})
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.starts = 0

    @property
    def db(self) -> Path:
        return self.data_dir / "preferences.sqlite"

    def start(self) -> None:
        port = free_port()
        self.starts += 1
        self.log_path = self.root / f"app-{self.starts}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        for name in ("RLHF_ADMIN_TOKEN", "ADMIN_TOKEN", "SPACE_ID", "SPACES_ZERO_GPU"):
            env.pop(name, None)
        env.update(self.extra_env)
        self.process = subprocess.Popen(
            [sys.executable, "app.py", "--model", str(self.model_dir), "--port", str(port), "--host", "127.0.0.1",
             "--data-dir", str(self.data_dir), "--adapters-dir", str(self.adapters_dir),
             "--max-new-tokens", "8", *self.extra_args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=_copy_output, args=(self.process.stdout, self.log_path), daemon=True).start()
        self.url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"app exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"app did not answer within {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self) -> str:
        return self.log_text()[-3000:]

    def trainer_pids(self) -> list[int]:
        """The trainer processes the supervisor logged as started (newest last)."""
        return [int(pid) for pid in re.findall(r"trainer process started \(pid (\d+)", self.log_text())]

    def kill9(self) -> None:
        """SIGKILL the app and everything it started (the trainer): no shutdown hook runs."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        try:  # helpers it started (the trainer, multiprocessing's resource tracker) share its process group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def vote_rows(db: Path, pair_token: str) -> list[tuple]:
    """(vote id, choice, better answer) of the votes on the pair /chat handed out as `pair_token`."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT id, choice, better_answer FROM votes WHERE pair_id = "
                            "(SELECT id FROM pairs WHERE token = ?)", (pair_token,)).fetchall()
    finally:
        conn.close()


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()

"""Shutdown and the trainer's lifetime, on real processes: SIGTERM with training on, the app killed under its
trainer, and a second trainer on the same adapters folder."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from app_process import REPO, RunningApp, integrity
from rlhf_online.lifecycle import TRAINER_LOCKED_EXIT_CODE, TrainerLock
from rlhf_online.worker import ChatYield, TrainingStopped

TRAINING_ARGS = ("--max-new-tokens", "4", "--lora-r", "4", "--lora-alpha", "8", "--reward-max-tokens", "48",
                 "--reward-lora-layers", "1", "--ppo-batch-size", "2", "--ppo-minibatch-size", "2",
                 "--ppo-max-new-tokens", "4", "--ppo-epochs", "1", "--publish-every", "1", "--min-preferences", "1")


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def wait_for(condition, timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


def chat_and_vote(app: RunningApp, rounds: int) -> list[int]:
    """Acknowledged vote ids."""
    client = Client(app.url, verbose=False)
    votes = []
    for i in range(rounds):
        _, pair, _, _ = client.predict("", f"tell me something, round {i}", api_name="/chat")
        votes.append(client.predict(pair, ("a", "b")[i % 2], "", api_name="/vote")[0])
    return votes


def stored_votes(app: RunningApp) -> set[int]:
    conn = sqlite3.connect(app.db)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM votes")}
    finally:
        conn.close()


def assert_nothing_half_written(app: RunningApp) -> None:
    from rlhf_online.adapters import AdapterRegistry

    assert integrity(app.db) == "ok"
    assert not list(app.data_dir.glob("*.tmp")), list(app.data_dir.glob("*.tmp"))
    assert not list(app.adapters_dir.glob(".v*.tmp-*"))  # no half-published version
    registry = AdapterRegistry(app.adapters_dir)
    for path in app.adapters_dir.glob("v*"):
        registry.validate(path)


def test_sigterm_stops_app_and_trainer_cleanly_and_a_restart_serves_and_trains(tiny_model_dir, tmp_path):
    app = RunningApp(tiny_model_dir, tmp_path, extra_args=TRAINING_ARGS)
    try:
        app.start()
        acknowledged = chat_and_vote(app, 3)
        assert wait_for(lambda: "published v0001" in app.log_text(), 120), app.log_tail()  # PPO is running
        trainer = app.trainer_pids()[-1]
        os.kill(app.process.pid, signal.SIGTERM)  # the app only, as Docker / Spaces / systemd's main PID get it
        sent = time.monotonic()
        app.process.wait(15)
        assert wait_for(lambda: not alive(trainer), 15 - (time.monotonic() - sent)), "trainer outlived the app"
        log = app.log_text()
        assert "SIGTERM received: shutting down" in log
        assert "trainer stopped; reward model checkpointed" in log and "shut down cleanly" in log, app.log_tail()
        assert (app.data_dir / "reward_model.safetensors").is_file()
        assert_nothing_half_written(app)
        assert set(acknowledged) <= stored_votes(app)
        published = {path.name for path in app.adapters_dir.glob("v*")}

        app.start()  # the same folders: serves, resumes and keeps training
        chat_and_vote(app, 2)
        assert wait_for(lambda: "reward model resumed from reward_model.safetensors" in app.log_text(), 60)
        assert wait_for(lambda: {p.name for p in app.adapters_dir.glob("v*")} - published, 120), app.log_tail()
        assert "another trainer" not in app.log_text()

        trainer = app.trainer_pids()[-1]
        os.kill(app.process.pid, signal.SIGKILL)  # no shutdown hook at all: the trainer must notice by itself
        app.process.wait(10)
        assert wait_for(lambda: not alive(trainer), 20), "the trainer kept running after its app was killed"
        assert wait_for(lambda: "is gone: the trainer stops too" in app.log_text(), 5)
        assert_nothing_half_written(app)
    finally:
        app.stop()


def test_a_second_trainer_on_the_same_adapters_folder_refuses_to_start(tmp_path):
    lock = TrainerLock(tmp_path / "adapters").acquire()  # this test process plays the trainer already running
    try:
        script = ("import sys; from rlhf_online.config import load_config; from rlhf_online.worker import "
                  "trainer_main; trainer_main(load_config(sys.argv[1:], environ={}))")
        result = subprocess.run([sys.executable, "-c", script, "--data-dir", str(tmp_path / "data"),
                                 "--adapters-dir", str(tmp_path / "adapters"), "--model", "/nonexistent"],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
    assert result.returncode == TRAINER_LOCKED_EXIT_CODE, result.stderr[-2000:]
    assert f"another trainer (pid {os.getpid()}) is already training on {tmp_path / 'adapters'}" in result.stderr
    assert not (tmp_path / "data").exists()  # refused before touching the store
    TrainerLock(tmp_path / "adapters").acquire().release()  # released locks can be taken again


def test_a_stop_request_interrupts_training_between_tokens():
    class Flag:
        def __init__(self):
            self.value = False

        def is_set(self):
            return self.value

    stop = Flag()
    step = ChatYield(None, stop_event=stop)
    step()  # no stop requested: returns at once
    stop.value = True
    with pytest.raises(TrainingStopped):
        step()

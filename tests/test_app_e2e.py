"""The real app as a subprocess, driven over HTTP with gradio_client, checked in its SQLite file.

One app process serves both tests (startup is most of the cost: importing torch, peft and gradio); the crash
test kills it with SIGKILL and starts a new one on the same data folder.
"""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningApp:
    """`python app.py ...` on the tiny model; always stopped by the fixture, whatever the test did."""

    def __init__(self, model_dir: Path, root: Path):
        self.model_dir, self.root = model_dir, root
        self.data_dir, self.adapters_dir = root / "data", root / "adapters"
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
        env.pop("RLHF_ADMIN_TOKEN", None)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "app.py", "--model", str(self.model_dir), "--port", str(port), "--host", "127.0.0.1",
                 "--data-dir", str(self.data_dir), "--adapters-dir", str(self.adapters_dir), "--no-train",
                 "--max-new-tokens", "8"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
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
        try:  # helpers it started (multiprocessing's resource tracker) share its process group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    running = RunningApp(tiny_model_dir, tmp_path_factory.mktemp("e2e"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


def vote_rows(db: Path, pair_id: int) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT id, choice, better_answer FROM votes WHERE pair_id = ?", (pair_id,)).fetchall()
    finally:
        conn.close()


def chat_and_vote(client: Client, choice: str, better: str = "") -> tuple[int, int]:
    conversation_id, pair_id, answer_a, answer_b = client.predict("", "Hello, how are you?", api_name="/chat")
    assert conversation_id and pair_id > 0
    assert isinstance(answer_a, str) and isinstance(answer_b, str)
    vote_id, version_a, version_b = client.predict(pair_id, choice, better, api_name="/vote")
    assert vote_id > 0 and (version_a, version_b) == ("base", "base")
    return pair_id, vote_id


def test_chat_vote_reaches_sqlite(app):
    client = Client(app.url, verbose=False)
    assert {"/chat", "/vote", "/regenerate", "/stats"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    pair_id, vote_id = chat_and_vote(client, "b", "A better answer, written by hand.")
    assert vote_rows(app.db, pair_id) == [(vote_id, "b", "A better answer, written by hand.")]
    assert client.predict(api_name="/stats")["demonstrations"] >= 1
    # bad input is an error message, and the app keeps serving
    with pytest.raises(Exception, match="Type a message first"):
        client.predict("", "   ", api_name="/chat")
    with pytest.raises(Exception, match="Unknown answer pair"):
        client.predict(10 ** 9, "a", "", api_name="/vote")
    assert client.predict(pair_id, "a", "", api_name="/vote")[0] == vote_id  # a repeated vote counts once
    assert vote_rows(app.db, pair_id) == [(vote_id, "b", "A better answer, written by hand.")]
    with urllib.request.urlopen(app.url, timeout=10) as response:
        assert response.status == 200  # the page itself still loads


def test_acknowledged_vote_survives_kill_9(app):
    client = Client(app.url, verbose=False)
    pair_id, vote_id = chat_and_vote(client, "a")
    app.kill9()  # no shutdown hooks, no checkpoint: only what was committed before the reply survives
    app.start()
    conn = sqlite3.connect(app.db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    assert vote_rows(app.db, pair_id) == [(vote_id, "a", None)]
    restarted = Client(app.url, verbose=False)
    assert restarted.predict(api_name="/stats")["votes"]["a"] >= 1
    pair_id_2, _ = chat_and_vote(restarted, "tie")  # and the restarted app keeps collecting votes
    assert pair_id_2 > pair_id

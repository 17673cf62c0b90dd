"""Faults and hostile input against the real app: SIGKILL mid-stream, a full disk, a crashing trainer, corrupt
files, malformed requests. Real processes, a real SQLite file, driven over HTTP with gradio_client.

"Disk full" is real, without root: RLIMIT_FSIZE set on the running app with prlimit (or on this process around a
publish) makes the kernel refuse writes past the limit with EFBIG, exactly where a full disk fails with ENOSPC
(Python ignores SIGXFSZ, so the write fails instead of killing the process).
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest
from gradio_client import Client

from app_process import RunningApp, integrity, vote_rows


def post_json(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def call_raw(app: RunningApp, endpoint: str, body: bytes) -> str:
    """Gradio's HTTP API without the client: POST the inputs, then read the event stream with the result."""
    status, reply = post_json(f"{app.url}gradio_api/call/{endpoint}", body)
    if status != 200:
        return f"HTTP {status}: {reply[:300]!r}"
    event_id = json.loads(reply)["event_id"]
    lines = []
    with urllib.request.urlopen(f"{app.url}gradio_api/call/{endpoint}/{event_id}", timeout=60) as response:
        for raw in response:  # server-sent events; the stream stays open (heartbeats) until we stop reading
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if line.startswith("data:") and lines[-2:-1] in (["event: complete"], ["event: error"]):
                break
    return "\n".join(lines)


# ---- a kill -9 during a stream of votes -------------------------------------------------------------------------

def test_kill_9_during_a_stream_of_votes_loses_no_acknowledged_vote(tiny_model_dir, tmp_path):
    app = RunningApp(tiny_model_dir, tmp_path, extra_args=("--no-train", "--max-new-tokens", "2"))
    acknowledged: dict[str, str] = {}  # pair token -> choice, recorded only once the app replied
    lock, stop = threading.Lock(), threading.Event()

    def user(index: int) -> None:
        client = Client(app.url, verbose=False)
        choice = ("a", "b", "tie")[index]
        while not stop.is_set():
            try:
                _, pair_id, _, _ = client.predict("", f"user {index} says hi", api_name="/chat")
                client.predict(pair_id, choice, "", api_name="/vote")
            except Exception:
                return  # the app died under us: whatever was not acknowledged may be lost
            with lock:
                acknowledged[pair_id] = choice

    try:
        app.start()
        users = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(3)]
        for thread in users:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(acknowledged) >= 12, app.log_tail()
        app.kill9()  # while the three users are mid-chat or mid-vote
        stop.set()
        for thread in users:
            thread.join(30)
        with lock:
            survivors = dict(acknowledged)
        assert integrity(app.db) == "ok"
        for pair_id, choice in survivors.items():
            assert [row[1] for row in vote_rows(app.db, pair_id)] == [choice], pair_id
        app.start()  # and the restarted app serves and counts them
        stats = Client(app.url, verbose=False).predict(api_name="/stats")
        assert sum(stats["votes"].values()) >= len(survivors)
    finally:
        stop.set()
        app.stop()


# ---- hostile input, limits, full disk: one app ------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    running = RunningApp(tiny_model_dir, tmp_path_factory.mktemp("faults"),
                         extra_args=("--no-train", "--votes-per-minute", "4"),
                         env={"RLHF_ADMIN_TOKEN": "tok-DO-NOT-LEAK-42"})
    try:
        running.start()
        yield running
    finally:
        running.stop()


def test_hostile_messages_are_stored_as_text_and_the_app_keeps_serving(app):
    client = Client(app.url, verbose=False)
    script = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    conversation_id, pair_id, _, _ = client.predict("", script, api_name="/chat")
    assert pair_id
    huge = "A" * 20_000  # longer than --max-message-chars: cut, not refused, not crashing
    _, huge_pair, _, _ = client.predict("", huge, api_name="/chat")
    conn = sqlite3.connect(app.db)
    try:
        stored = dict(conn.execute("SELECT token, messages_json FROM pairs WHERE token IN (?, ?)",
                                   (pair_id, huge_pair)))
    finally:
        conn.close()
    assert json.loads(stored[pair_id])[-1]["content"] == script  # data, stored verbatim; never rendered as HTML
    kept = json.loads(stored[huge_pair])[-1]["content"]
    assert 0 < len(kept) <= 4000 and set(kept) == {"A"}  # cut to 4000 characters, then to the context budget
    with urllib.request.urlopen(app.url, timeout=10) as response:
        assert script not in response.read().decode()


def test_invalid_utf8_and_lone_surrogates_get_an_error_or_a_clean_text(app):
    reply = call_raw(app, "chat", b'{"data": ["", "caf\xc3\x28 \xff\xfe"]}')  # not UTF-8 at all
    assert reply.startswith("HTTP 4") or "event: error" in reply, reply
    reply = call_raw(app, "chat", b'{"data": ["", "half a pair \\ud800 here"]}')  # valid JSON, invalid Unicode
    assert "event: complete" in reply, reply
    pair_id = json.loads(reply.rsplit("data:", 1)[1])[1]
    conn = sqlite3.connect(app.db)
    try:
        stored = conn.execute("SELECT messages_json FROM pairs WHERE token = ?", (pair_id,)).fetchone()[0]
    finally:
        conn.close()
    assert json.loads(stored)[-1]["content"] == "half a pair ? here"  # replaced, stored, answered
    client = Client(app.url, verbose=False)
    assert client.predict("", "still fine?", api_name="/chat")[1]


def test_oversized_request_bodies_are_refused_before_being_read(app):
    """Issue 13 #3: a 1 MB body was parsed in full; now it is refused with 413, declared or chunked."""
    host, port = app.url.split("//")[1].rstrip("/").split(":")
    # declared 1 MB, and not one byte of it sent: the answer must come without the body being read
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/gradio_api/call/chat")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(1_000_000))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and b"too large" in response.read()
    conn.close()
    # chunked, no length declared: refused once it passes the limit, whatever follows
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/gradio_api/call/chat")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"A" * 65536
    try:
        for _ in range(16):  # 1 MB
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server already answered and closed: what we want
    assert conn.getresponse().status == 413
    conn.close()
    assert Client(app.url, verbose=False).predict("", "A" * 20_000, api_name="/chat")[1]  # long, not huge: served


def test_unknown_guessed_and_replayed_votes(app):
    client = Client(app.url, verbose=False)
    for bad in ("1", "2", "0", "-5", "abc", "x" * 100):  # row ids (what the API used to hand out) and made-up tokens
        with pytest.raises(Exception, match="Unknown answer pair"):
            client.predict(bad, "a", "", api_name="/vote")
    _, pair_id, _, _ = client.predict("", "replay me", api_name="/chat")
    with pytest.raises(Exception, match="choice must be one of"):
        client.predict(pair_id, "<script>", "", api_name="/vote")
    vote_id = client.predict(pair_id, "a", "", api_name="/vote")[0]
    assert client.predict(pair_id, "b", "", api_name="/vote")[0] == vote_id  # a double click counts once
    other = Client(app.url, verbose=False)  # a replay from another session is refused and changes nothing
    with pytest.raises(Exception, match="Unknown answer pair"):
        other.predict(pair_id, "b", "", api_name="/vote")
    assert [row[1] for row in vote_rows(app.db, pair_id)] == ["a"]


def test_a_pair_can_be_voted_only_by_the_session_it_was_shown_to(app):
    """Issue 13 #2: the first vote on someone else's pair, with a poisoned "better answer", is refused; the owner's
    own vote then counts and their conversation continues with their choice, not the attacker's text."""
    victim, attacker = Client(app.url, verbose=False), Client(app.url, verbose=False)
    conversation_id, token, answer_a, _ = victim.predict("", "what is a good book?", api_name="/chat")
    with pytest.raises(Exception, match="Unknown answer pair"):
        attacker.predict(token, "b", "[prize](http://evil.example)", api_name="/vote")
    assert vote_rows(app.db, token) == []
    vote_id = victim.predict(token, "a", "", api_name="/vote")[0]
    assert vote_rows(app.db, token) == [(vote_id, "a", None)]
    _, next_token, _, _ = victim.predict(conversation_id, "and another?", api_name="/chat")
    conn = sqlite3.connect(app.db)
    try:
        messages = json.loads(conn.execute("SELECT messages_json FROM pairs WHERE token = ?",
                                           (next_token,)).fetchone()[0])
        demonstrations = conn.execute("SELECT COUNT(*) FROM demonstrations WHERE answer LIKE '%evil.example%'"
                                      ).fetchone()[0]
    finally:
        conn.close()
    assert [m["content"] for m in messages] == ["what is a good book?", answer_a, "and another?"]
    assert demonstrations == 0


def test_vote_rate_limit_is_enforced_by_the_server(app):
    client = Client(app.url, verbose=False)
    pairs = [client.predict("", f"message {i}", api_name="/chat")[1] for i in range(5)]
    for pair_id in pairs[:4]:
        client.predict(pair_id, "a", "", api_name="/vote")
    with pytest.raises(Exception, match="Too many votes from this session: at most 4 per minute"):
        client.predict(pairs[4], "a", "", api_name="/vote")
    assert vote_rows(app.db, pairs[4]) == []
    other = Client(app.url, verbose=False)  # other people are not held up by this session's limit
    own = other.predict("", "someone else", api_name="/chat")[1]
    assert other.predict(own, "b", "", api_name="/vote")[0] > 0


def test_the_admin_token_is_never_logged_nor_sent_to_the_page(app):
    with urllib.request.urlopen(app.url + "config", timeout=10) as response:
        assert "tok-DO-NOT-LEAK-42" not in response.read().decode()
    assert "tok-DO-NOT-LEAK-42" not in app.log_text()


def test_disk_full_on_vote_is_a_clear_error_and_nothing_is_half_written(app):
    client = Client(app.url, verbose=False)
    _, pair_id, _, _ = client.predict("", "the disk is about to fill up", api_name="/chat")
    resource.prlimit(app.process.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
    try:
        with pytest.raises(Exception, match="could not save your vote.*Nothing was saved"):
            client.predict(pair_id, "b", "my own better answer", api_name="/vote")
    finally:
        resource.prlimit(app.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert vote_rows(app.db, pair_id) == []
    assert integrity(app.db) == "ok"
    vote_id = client.predict(pair_id, "b", "my own better answer", api_name="/vote")[0]
    assert vote_rows(app.db, pair_id) == [(vote_id, "b", "my own better answer")]  # once space is back, it works


# ---- publish on a full disk -------------------------------------------------------------------------------------

def test_disk_full_on_publish_leaves_no_version_and_the_next_publish_works(tiny_model_dir, tmp_path):
    from rlhf_online import models
    from rlhf_online.adapters import AdapterRegistry, save_peft_adapter

    trainer = models.attach_lora(models.load_base_model(str(tiny_model_dir), "nf4", for_training=True).model,
                                 models.ModelConfig())
    registry = AdapterRegistry(tmp_path / "adapters")

    def write(folder):
        save_peft_adapter(trainer, models.POLICY_ADAPTER, folder)

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # the weights file does not fit
    try:
        with pytest.raises(OSError) as failure:
            registry.publish(write, {"note": "disk full"})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "too large" in str(failure.value).lower() or failure.value.errno == 27
    assert list(registry.root.iterdir()) == [] and registry.versions() == []  # no folder, no temp folder
    info = registry.publish(write, {"note": "space again"})
    assert info.name == "v0001" and registry.validate(info.path).name == "v0001"


# ---- the trainer crashing, corrupt adapter and reward checkpoint, chat going on -----------------------------------

def test_corrupt_files_are_skipped_and_a_crashing_trainer_is_restarted_while_chat_goes_on(tiny_model_dir, tmp_path):
    app = RunningApp(tiny_model_dir, tmp_path, extra_args=(
        "--max-new-tokens", "4", "--lora-r", "4", "--lora-alpha", "8", "--reward-max-tokens", "48",
        "--reward-lora-layers", "1", "--ppo-batch-size", "2", "--ppo-minibatch-size", "2",
        "--ppo-max-new-tokens", "4", "--ppo-epochs", "1", "--publish-every", "1", "--min-preferences", "1",
        "--no-gate"))  # publishing under faults is under test; the random tiny model would fail the release gate
    corrupt_version = app.adapters_dir / "v0001"
    corrupt_version.mkdir(parents=True)
    (corrupt_version / "adapter_config.json").write_text("{not json")
    (corrupt_version / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    app.data_dir.mkdir(parents=True)
    (app.data_dir / "reward_model.safetensors").write_bytes(b"garbage, not a checkpoint")
    try:
        app.start()
        client = Client(app.url, verbose=False)
        _, pair_id, _, _ = client.predict("", "hello there", api_name="/chat")
        assert client.predict(pair_id, "a", "", api_name="/vote")[1:] == ("base", "base")  # served the base
        deadline = time.monotonic() + 60
        while not app.trainer_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        while "corrupt reward checkpoint" not in app.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        log = app.log_text()
        assert "skipping corrupt adapter version" in log and "v0001" in log
        assert "corrupt reward checkpoint" in log

        while "published v" not in app.log_text() and time.monotonic() < deadline + 30:
            time.sleep(0.2)  # the trainer is in its PPO loop now (the corrupt v0001 did not stop it)
        assert "published v0002" in app.log_text(), app.log_tail()  # number 1 is taken by the corrupt folder
        os.kill(app.trainer_pids()[-1], signal.SIGKILL)  # the trainer dies mid-iteration or mid-publish
        for i in range(3):  # chat goes on meanwhile
            _, pair_id, _, _ = client.predict("", f"are you still there {i}?", api_name="/chat")
            assert client.predict(pair_id, "b", "", api_name="/vote")[0] > 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            trainer = client.predict(api_name="/stats")["trainer"]
            if trainer["starts"] >= 2 and trainer["alive"]:
                break
            time.sleep(0.5)
        assert trainer["starts"] >= 2 and trainer["alive"], app.log_tail()
        assert "trainer exited with code -9" in app.log_text()
    finally:
        app.stop()
    from rlhf_online.adapters import AdapterRegistry
    registry = AdapterRegistry(app.adapters_dir)
    published = [path for path in app.adapters_dir.iterdir() if path.name.startswith("v") and path.name != "v0001"]
    assert published
    for path in published:  # no half-published version: every visible folder validates
        registry.validate(path)

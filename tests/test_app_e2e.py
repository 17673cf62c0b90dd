"""The real app as a subprocess, driven over HTTP with gradio_client, checked in its SQLite file.

One app process serves both tests (startup is most of the cost: importing torch, peft and gradio); the crash
test kills it with SIGKILL and starts a new one on the same data folder.
"""

import json
import re
import sqlite3
import urllib.request

import pytest
from gradio_client import Client

from app_process import RunningApp, vote_rows


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    running = RunningApp(tiny_model_dir, tmp_path_factory.mktemp("e2e"), extra_args=(
        "--no-train", "--trusted-proxies", "1", "--client-sessions-per-hour", "3"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


def chat_and_vote(client: Client, choice: str, better: str = "") -> tuple[int, int]:
    conversation_id, pair_id, answer_a, answer_b = client.predict("", "Hello, how are you?", api_name="/chat")
    assert conversation_id and isinstance(pair_id, str) and len(pair_id) >= 20  # an unguessable token
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
        client.predict("1", "a", "", api_name="/vote")  # a row id is not a pair token
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
    assert pair_id_2 != pair_id and vote_rows(app.db, pair_id_2)[0][1] == "tie"


def queue_call(app, api_name: str, data: list, session_hash: str = "attacker-session") -> dict:
    """Call any event, hidden ones included, the way a script can: by fn_index through /gradio_api/queue/join,
    then read its result from the queue's event stream. Returns the final message ({"success": ..., ...})."""
    with urllib.request.urlopen(app.url + "config", timeout=10) as response:
        dependencies = json.loads(response.read())["dependencies"]
    fn_index = next(dep["id"] for dep in dependencies if dep.get("api_name") == api_name)
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session_hash, "event_data": None,
                       "trigger_id": None}).encode()
    request = urllib.request.Request(app.url + "gradio_api/queue/join", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert "event_id" in json.loads(response.read())
    with urllib.request.urlopen(f"{app.url}gradio_api/queue/data?session_hash={session_hash}", timeout=60) as stream:
        for raw in stream:
            line = raw.decode(errors="replace").strip()
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the queue stream ended without a result")


def test_hidden_admin_events_need_the_token_printed_at_start_up(app):
    """Issue 13 #4: with no token configured, admin actions were open on a loopback server; now one is generated
    and printed once, and every hidden admin event refuses a call by fn_index without it."""
    printed = re.findall(r"Admin token for this run \(generated.*\): (\S+)", app.log_text())
    assert len(printed) == 1, app.log_tail()
    token = printed[0]
    attempts = {"admin_pause": [""], "admin_reset_data": ["RESET", ""], "admin_export": [""],
                "admin_training_settings": ["", 0.1, 0.2, 1e-4], "admin_rollback": ["base", ""],
                "admin_feedback_mode": ["ai", ""], "admin_save_constitution": ["1. Obey me.", ""],
                "admin_unlock": [""], "admin_delete_version": ["base", ""]}
    for api_name, data in attempts.items():
        for wrong in ("", "guess"):
            result = queue_call(app, api_name, [wrong if value == "" else value for value in data])
            assert result["success"] is False, (api_name, result)
            assert "admin token" in json.dumps(result), (api_name, result)
    conn = sqlite3.connect(app.db)
    try:
        assert conn.execute("SELECT COUNT(*) FROM control").fetchone()[0] == 0  # nothing was changed
    finally:
        conn.close()
    assert not (app.data_dir / "backups").exists()
    result = queue_call(app, "admin_pause", [token])
    assert result["success"] is True and "paused" in json.dumps(result)
    assert queue_call(app, "admin_resume", [token])["success"] is True


def test_session_rotation_and_forged_forwarded_for_do_not_reset_the_limits(app):
    """Issue 13 #3: behind one trusted proxy, the client is the entry the proxy appended (the last); a script
    starting a new session per request, or prepending made-up addresses, is still the same client."""
    proxy_says = "203.0.113.9"  # what our (simulated) proxy appends: the attacker's real address
    for i in range(3):
        client = Client(app.url, verbose=False, headers={"X-Forwarded-For": proxy_says})
        assert client.predict("", f"fresh session {i}", api_name="/chat")[1]
    for forged in (proxy_says, f"1.2.3.4, {proxy_says}", f"10.9.8.7, 5.6.7.8, {proxy_says}"):
        rotated = Client(app.url, verbose=False, headers={"X-Forwarded-For": forged})
        with pytest.raises(Exception, match="Too many new sessions from your address"):
            rotated.predict("", "one more fresh session", api_name="/chat")
    honest = Client(app.url, verbose=False, headers={"X-Forwarded-For": "198.51.100.1"})  # others are unaffected
    token = honest.predict("", "hello", api_name="/chat")[1]
    assert honest.predict(token, "a", "", api_name="/vote")[0] > 0
    before = honest.predict(api_name="/stats")["conversations_open"]
    for made_up in ("nope", "0" * 32, ""):
        with pytest.raises(Exception, match="Nothing to regenerate"):
            honest.predict(made_up, api_name="/regenerate")
    assert honest.predict(api_name="/stats")["conversations_open"] == before  # no state for unknown ids

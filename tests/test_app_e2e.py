"""The real app as a subprocess, driven over HTTP with gradio_client, checked in its SQLite file.

One app process serves both tests (startup is most of the cost: importing torch, peft and gradio); the crash
test kills it with SIGKILL and starts a new one on the same data folder.
"""

import sqlite3
import urllib.request

import pytest
from gradio_client import Client

from app_process import RunningApp, vote_rows


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    running = RunningApp(tiny_model_dir, tmp_path_factory.mktemp("e2e"))
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

"""UI and API handlers on the tiny model, called directly (no browser, no server)."""

import sqlite3
from types import SimpleNamespace

import gradio as gr
import pytest

from rlhf_online import ui
from rlhf_online.config import load_config
from rlhf_online.services import build_services
from rlhf_online.store import StoreWriteError, store_path
from rlhf_online.worker import PAUSED_KEY


@pytest.fixture(scope="module")
def services(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    cfg = load_config(["--model", str(tiny_model_dir), "--data-dir", str(root / "data"), "--adapters-dir",
                       str(root / "adapters"), "--no-train", "--max-new-tokens", "8"], environ={})
    built = build_services(cfg, start_trainer=False)
    yield built
    built.close()


def db_rows(services, sql, params=()):
    with sqlite3.connect(store_path(services.cfg.data_path)) as conn:
        return conn.execute(sql, params).fetchall()


def send(services, message="Hello there", state=None):
    """Run the chat handler to the end; return every streamed output tuple."""
    return list(ui.chat_ui(services, state or ui.SessionState(), message))


def test_chat_streams_and_stores_the_pair(services):
    outputs = send(services)
    assert len(outputs) >= 2  # at least one partial update before the final one
    state, history, answer_a, answer_b, status, better, _ = outputs[-1]
    assert state.session_id and state.conversation_id and state.pair_id is not None
    assert state.answers == (answer_a, answer_b)
    assert history == [{"role": "user", "content": "Hello there"}]
    assert better == answer_a  # the better-answer box starts from answer A
    assert outputs[0][6] == "" and "better" in status  # the message box is emptied once, at the start
    assert all(o[0].pair_id is None for o in outputs[:-1])  # no vote possible before the pair is stored
    row = db_rows(services, "SELECT answer_a, answer_b, conversation_id, session_id FROM pairs WHERE id = ?",
                  (state.pair_id,))
    assert row == [(answer_a, answer_b, state.conversation_id, state.session_id)]


@pytest.mark.parametrize("choice", ["a", "b", "tie", "both_bad"])
def test_vote_handler_records_each_choice(services, choice):
    state = send(services)[-1][0]
    vote = ui.vote_ui  # one handler for all four buttons; the app binds the choice with functools.partial
    new_state, history, answer_a, answer_b, reveal, better, _ = vote(services, choice, state)
    assert db_rows(services, "SELECT choice, session_id FROM votes WHERE pair_id = ?", (state.pair_id,)) == [
        (choice, state.session_id)]
    assert new_state.pair_id is None and (answer_a, answer_b, better) == ("", "", "")
    assert "saved" in reveal and "`base`" in reveal  # which version wrote each side is revealed
    preferred = state.answers[1] if choice == "b" else state.answers[0]
    assert history[-2:] == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": preferred}]


def test_double_vote_is_recorded_once(services):
    state = send(services)[-1][0]
    first = ui.api_vote(services, state.pair_id, "a", "")
    second = ui.api_vote(services, state.pair_id, "b", "")
    assert first == second  # the first vote's receipt, again
    assert db_rows(services, "SELECT choice FROM votes WHERE pair_id = ?", (state.pair_id,)) == [("a",)]
    # in the page, the pair is gone from the state after a vote, so a second click explains itself
    after = ui.vote_ui(services, "a", send(services)[-1][0])[0]
    with pytest.raises(gr.Error, match="send a message first"):
        ui.vote_ui(services, "b", after)


def test_conversation_continues_with_the_preferred_answer(services):
    state = send(services, "first")[-1][0]
    state = ui.vote_ui(services, "b", state)[0]
    outputs = send(services, "second", state)
    history = outputs[-1][1]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[-1]["content"] == "second"
    assert outputs[-1][0].conversation_id == state.conversation_id


@pytest.mark.parametrize("message", ["", "   ", "\x00"])
def test_empty_message_gives_a_hint(services, message):
    with pytest.raises(gr.Error, match="Type a message first"):
        send(services, message)
    with pytest.raises(gr.Error, match="Type a message first"):
        list(ui.api_chat(services, "", message))


def test_unknown_pair_and_bad_input_give_clear_errors(services):
    with pytest.raises(gr.Error, match="Unknown answer pair"):
        ui.api_vote(services, 10 ** 9, "a", "")
    with pytest.raises(gr.Error, match="Unknown answer pair"):
        ui.vote_ui(services, "a", ui.SessionState(session_id="s", pair_id=10 ** 9))
    pair_id = send(services)[-1][0].pair_id
    with pytest.raises(gr.Error, match="choice must be one of"):
        ui.api_vote(services, pair_id, "c", "")
    with pytest.raises(gr.Error, match="pair_id must be an integer"):
        ui.api_vote(services, "abc", "a", "")
    assert db_rows(services, "SELECT COUNT(*) FROM votes WHERE pair_id = ?", (pair_id,)) == [(0,)]


def test_store_failure_says_the_vote_was_not_saved(services, monkeypatch):
    pair_id = send(services)[-1][0].pair_id

    def fail(**kwargs):
        raise StoreWriteError("could not save your vote: disk full")

    monkeypatch.setattr(services.store, "record_vote", fail)
    with pytest.raises(gr.Error, match="could not save your vote: disk full"):
        ui.api_vote(services, pair_id, "a", "")


def test_better_answer_is_stored_as_a_demonstration(services):
    state = send(services)[-1][0]
    before = len(services.store.demonstrations())
    ui.vote_ui(services, "both_bad", state, "  A careful, correct answer.  ")
    demos = services.store.demonstrations()
    assert len(demos) == before + 1
    assert demos[-1].answer == "A careful, correct answer." and demos[-1].session_id == state.session_id
    # the written answer is preferred over both shown answers
    rows = db_rows(services, "SELECT chosen FROM preferences WHERE pair_id = ?", (state.pair_id,))
    assert rows and all(chosen == "A careful, correct answer." for (chosen,) in rows)


def test_api_chat_streams_then_returns_the_pair(services):
    outputs = list(ui.api_chat(services, "", "Hi"))
    conversation_id, pair_id, answer_a, answer_b = outputs[-1]
    assert all(o[1] == -1 for o in outputs[:-1]) and pair_id > 0
    assert services.store.get_pair(pair_id).answer_a == answer_a
    regenerated = list(ui.api_regenerate(services, conversation_id))[-1]
    assert regenerated[0] == conversation_id and regenerated[1] > pair_id
    vote_id, version_a, version_b = ui.api_vote(services, regenerated[1], "tie", "")
    assert vote_id > 0 and (version_a, version_b) == ("base", "base")
    assert ui.api_stats(services)["votes"]["tie"] >= 1


def test_regenerate_and_new_conversation(services):
    with pytest.raises(gr.Error, match="Nothing to regenerate"):
        list(ui.regenerate_ui(services, ui.SessionState()))
    state = send(services)[-1][0]
    again = list(ui.regenerate_ui(services, state))[-1][0]
    assert again.conversation_id == state.conversation_id and again.pair_id > state.pair_id
    fresh = ui.new_conversation_ui(services, again)
    assert fresh[0].conversation_id != state.conversation_id and fresh[0].pair_id is None
    assert fresh[0].session_id == state.session_id and fresh[1] == []


def test_dashboard_refresh_and_pause(services, monkeypatch):
    outputs = ui.refresh_dashboard(services, ui.dashboard.VersionCache(services.registry))
    assert len(outputs) == 11 and "Pairs shown" in outputs[0]
    assert outputs[4]["visible"] is False  # no reward-hacking warning
    monkeypatch.delenv(ui.ADMIN_TOKEN_ENV, raising=False)
    assert "paused" in ui.set_paused_ui(services, True, "")
    assert services.store.get_control(PAUSED_KEY) == "1"
    assert "**paused**" in ui.refresh_dashboard(services, ui.dashboard.VersionCache(services.registry))[2]
    monkeypatch.setenv(ui.ADMIN_TOKEN_ENV, "s3cret")
    with pytest.raises(gr.Error, match="admin token"):
        ui.set_paused_ui(services, False, "wrong")
    assert services.store.get_control(PAUSED_KEY) == "1"
    assert "resumed" in ui.set_paused_ui(services, False, "s3cret")
    assert services.store.get_control(PAUSED_KEY) == "0"


def test_rollback_retires_newer_versions_and_refreshes(monkeypatch):
    monkeypatch.delenv(ui.ADMIN_TOKEN_ENV, raising=False)
    calls = []
    registry = SimpleNamespace(versions=lambda: [SimpleNamespace(name="v0001"), SimpleNamespace(name="v0002")],
                               retire_after=lambda version: calls.append(("retire", version)) or ["v0002"])
    fake = SimpleNamespace(registry=registry, live=SimpleNamespace(refresh=lambda: calls.append(("refresh",))))
    assert "retired `v0002`" in ui.rollback_ui(fake, "v0001", "")
    assert calls == [("retire", "v0001"), ("refresh",)]
    with pytest.raises(gr.Error, match="Unknown version"):
        ui.rollback_ui(fake, "v0009", "")


def test_build_app_exposes_exactly_the_named_endpoints(services):
    demo = ui.build_app(services)
    assert isinstance(demo, gr.Blocks)
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {"chat", "regenerate", "vote", "stats"}
    chatbot = next(block for block in demo.blocks.values() if isinstance(block, gr.Chatbot))
    assert chatbot.sanitize_html is True

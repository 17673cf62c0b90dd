"""UI and API handlers on the tiny model, called directly (no browser, no server)."""

import json
import os
import sqlite3
import threading
import time
from dataclasses import replace
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from rlhf_online import admin_ui, ui
from rlhf_online.config import load_config
from rlhf_online.judge import current_feedback_mode, load_constitution
from rlhf_online.services import build_services
from rlhf_online.store import StoreWriteError, store_path
from rlhf_online.worker import PAUSED_KEY, TRAINING_SETTINGS_KEY


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


def row_id(services, state_or_token) -> int:
    """The store's row id of the pair a state (or a token) names."""
    token = getattr(state_or_token, "pair_token", state_or_token)
    return services.store.get_pair_by_token(token).id


def send(services, message="Hello there", state=None):
    """Run the chat handler to the end; return every streamed output tuple."""
    return list(ui.chat_ui(services, state or ui.SessionState(), message))


def test_chat_streams_and_stores_the_pair(services):
    outputs = send(services)
    assert len(outputs) >= 2  # at least one partial update before the final one
    state, history, answer_a, answer_b, status, better, _ = outputs[-1]
    assert state.session_id and state.conversation_id and len(state.pair_token) >= 20
    assert state.answers == (answer_a, answer_b)
    assert history == [{"role": "user", "content": "Hello there"}]
    assert better == answer_a  # the better-answer box starts from answer A
    assert outputs[0][6] == "" and "better" in status  # the message box is emptied once, at the start
    assert all(o[0].pair_token is None for o in outputs[:-1])  # no vote possible before the pair is stored
    row = db_rows(services, "SELECT answer_a, answer_b, conversation_id, session_id FROM pairs WHERE token = ?",
                  (state.pair_token,))
    assert row == [(answer_a, answer_b, state.conversation_id, state.session_id)]


@pytest.mark.parametrize("choice", ["a", "b", "tie", "both_bad"])
def test_vote_handler_records_each_choice(services, choice):
    state = send(services)[-1][0]
    vote = ui.vote_ui  # one handler for all four buttons; the app binds the choice with functools.partial
    new_state, history, answer_a, answer_b, reveal, better, _ = vote(services, choice, state)
    assert db_rows(services, "SELECT choice, session_id FROM votes WHERE pair_id = ?",
                   (row_id(services, state),)) == [(choice, state.session_id)]
    assert new_state.pair_token is None and (answer_a, answer_b, better) == ("", "", "")
    assert "saved" in reveal and "`base`" in reveal  # which version wrote each side is revealed
    preferred = state.answers[1] if choice == "b" else state.answers[0]
    assert history[-2:] == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": preferred}]


def test_the_reveal_shows_reward_scores_when_the_pair_was_scored_and_forgives_the_choices_case(services):
    state = send(services)[-1][0]
    services.store.set_reward_scores(row_id(services, state), 0.5, -0.25, reward_model_version="4")
    reveal = ui.vote_ui(services, " B ", state)[4]
    assert "(reward 0.50)" in reveal and "(reward -0.25)" in reveal
    assert db_rows(services, "SELECT choice FROM votes WHERE pair_id = ?", (row_id(services, state),)) == [("b",)]


def test_double_vote_is_recorded_once(services):
    state = send(services)[-1][0]
    first = ui.api_vote(services, state.pair_token, "a", "", state.session_id)
    second = ui.api_vote(services, state.pair_token, "b", "", state.session_id)
    assert first == second  # the first vote's receipt, again
    assert db_rows(services, "SELECT choice FROM votes WHERE pair_id = ?", (row_id(services, state),)) == [("a",)]
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


def test_on_the_page_an_error_is_a_notice_and_leaves_the_screen_as_it_was(services):
    """The chat tab wires its handlers through `_toast_errors`: a raised gr.Error becomes a warning toast and every
    output is skipped (in the browser: no "Error" over the answers, and the buttons come back)."""
    import functools
    import inspect

    outputs = 7  # state, chatbot, answer A, answer B, status, better-answer box, message box
    chat = ui._toast_errors(functools.partial(ui.chat_ui, services), outputs)
    assert "request" in inspect.signature(chat).parameters  # Gradio still passes the request (per-client limits)
    with pytest.warns(UserWarning, match="Type a message first"):
        updates = list(chat(ui.SessionState(), "   "))
    assert len(updates) == 1 and all(isinstance(u, type(gr.skip())) for u in updates[0]) and len(updates[0]) == outputs
    vote = ui._toast_errors(functools.partial(ui.vote_ui, services, "a"), outputs)
    with pytest.warns(UserWarning, match="send a message first"):
        skipped = vote(ui.SessionState())
    assert len(skipped) == outputs and all(isinstance(u, type(gr.skip())) for u in skipped)
    streamed = list(chat(ui.SessionState(), "Hello there"))  # without an error it passes everything through
    assert streamed[-1][0].pair_token and len(streamed[-1]) == outputs


def test_unknown_pair_and_bad_input_give_clear_errors(services):
    with pytest.raises(gr.Error, match="Unknown answer pair"):
        ui.api_vote(services, 10 ** 9, "a", "")
    with pytest.raises(gr.Error, match="Unknown answer pair"):
        ui.vote_ui(services, "a", ui.SessionState(session_id="s", pair_token="made-up-token"))
    state = send(services)[-1][0]
    with pytest.raises(gr.Error, match="choice must be one of"):
        ui.api_vote(services, state.pair_token, "c", "", state.session_id)
    with pytest.raises(gr.Error, match="Unknown answer pair"):
        ui.api_vote(services, str(row_id(services, state)), "a", "", state.session_id)  # a row id is no token
    assert db_rows(services, "SELECT COUNT(*) FROM votes WHERE pair_id = ?", (row_id(services, state),)) == [(0,)]


def test_store_failure_says_the_vote_was_not_saved(services, monkeypatch):
    state = send(services)[-1][0]

    def fail(**kwargs):
        raise StoreWriteError("could not save your vote: disk full")

    monkeypatch.setattr(services.store, "record_vote", fail)
    with pytest.raises(gr.Error, match="could not save your vote: disk full"):
        ui.api_vote(services, state.pair_token, "a", "", state.session_id)


def test_better_answer_is_stored_as_a_demonstration(services):
    state = send(services)[-1][0]
    before = len(services.store.demonstrations())
    ui.vote_ui(services, "both_bad", state, "  A careful, correct answer.  ")
    demos = services.store.demonstrations()
    assert len(demos) == before + 1
    assert demos[-1].answer == "A careful, correct answer." and demos[-1].session_id == state.session_id
    # the written answer is preferred over both shown answers
    rows = db_rows(services, "SELECT chosen FROM preferences WHERE pair_id = ?", (row_id(services, state),))
    assert rows and all(chosen == "A careful, correct answer." for (chosen,) in rows)


def test_api_chat_streams_then_returns_the_pair(services):
    outputs = list(ui.api_chat(services, "", "Hi"))
    conversation_id, token, answer_a, answer_b = outputs[-1]
    assert all(o[1] == "" for o in outputs[:-1]) and len(token) >= 20
    assert services.store.get_pair_by_token(token).answer_a == answer_a
    regenerated = list(ui.api_regenerate(services, conversation_id))[-1]
    assert regenerated[0] == conversation_id and row_id(services, regenerated[1]) > row_id(services, token)
    vote_id, version_a, version_b = ui.api_vote(services, regenerated[1], "tie", "")
    assert vote_id > 0 and (version_a, version_b) == ("base", "base")
    assert ui.api_stats(services)["votes"]["tie"] >= 1


def test_regenerate_and_new_conversation(services):
    with pytest.raises(gr.Error, match="Nothing to regenerate"):
        list(ui.regenerate_ui(services, ui.SessionState()))
    state = send(services)[-1][0]
    again = list(ui.regenerate_ui(services, state))[-1][0]
    assert again.conversation_id == state.conversation_id and row_id(services, again) > row_id(services, state)
    open_before = services.arena.open_conversations
    fresh = ui.new_conversation_ui(services, again)
    assert fresh[0].conversation_id != state.conversation_id and fresh[0].pair_token is None
    assert services.arena.open_conversations == open_before  # nothing is created until the next message
    assert fresh[0].session_id == state.session_id and fresh[1] == []


def test_dashboard_refresh_and_pause(services, monkeypatch):
    outputs = ui.refresh_dashboard(services)
    assert len(outputs) == 11 and "Pairs shown" in outputs[0]
    assert outputs[4]["visible"] is False  # no reward-hacking warning
    monkeypatch.setattr(services.cfg.limits, "admin_token", "s3cret")
    assert "paused" in admin_ui.set_paused_ui(services, True, "s3cret")
    assert services.store.get_control(PAUSED_KEY) == "1"
    assert "**paused**" in ui.refresh_dashboard(services)[2]
    with pytest.raises(gr.Error, match="admin token"):
        admin_ui.set_paused_ui(services, False, "wrong")
    assert services.store.get_control(PAUSED_KEY) == "1"
    assert "resumed" in admin_ui.set_paused_ui(services, False, "s3cret")
    assert services.store.get_control(PAUSED_KEY) == "0"


def test_rollback_retires_newer_versions_and_refreshes(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    calls = []
    registry = SimpleNamespace(versions=lambda: [SimpleNamespace(name="v0001"), SimpleNamespace(name="v0002")],
                               retire_after=lambda version: calls.append(("retire", version)) or ["v0002"])
    fake = SimpleNamespace(registry=registry, live=SimpleNamespace(refresh=lambda: calls.append(("refresh",))),
                           cfg=load_config([], environ={"RLHF_ADMIN_TOKEN": "t"}))
    assert "retired `v0002`" in admin_ui.rollback_ui(fake, "v0001", "t")
    assert calls == [("retire", "v0001"), ("refresh",)]
    with pytest.raises(gr.Error, match="Unknown version"):
        admin_ui.rollback_ui(fake, "v0009", "t")


def test_build_app_exposes_exactly_the_named_endpoints(services):
    demo = ui.build_app(services)
    assert isinstance(demo, gr.Blocks)
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {"chat", "regenerate", "vote", "stats"}
    chatbot = next(block for block in demo.blocks.values() if isinstance(block, gr.Chatbot))
    assert chatbot.sanitize_html is True


def test_feedback_markdown_shows_sources_and_agreement():
    text = ui.dashboard.feedback_markdown({"votes": {"human": 12, "ai": 30}, "ai_abstained": 4,
                                           "agreement": {"pairs": 8, "agree": 6}}, "mixed", "0123456789ab")
    assert "mixed: AI labels fill in, weighted lower" in text and "`0123456789ab`" in text
    assert "human 12, AI 30 (4 abstained)" in text and "6/8 (75%)" in text
    empty = ui.dashboard.feedback_markdown({"votes": {"human": 0, "ai": 0}, "ai_abstained": 0,
                                            "agreement": {"pairs": 0, "agree": 0}}, "human", None)
    assert "human votes only" in empty and "no pair labelled by both yet" in empty and "missing" in empty


def test_feedback_mode_and_constitution_are_admin_actions_shown_in_the_panel(services, monkeypatch):
    monkeypatch.setattr(services.cfg.limits, "admin_token", "s3cret")
    with pytest.raises(gr.Error, match="admin token"):
        admin_ui.set_feedback_mode_ui(services, "ai", "wrong")
    with pytest.raises(gr.Error, match="admin token"):
        admin_ui.save_constitution_ui(services, "1. Be rude.", "")
    assert current_feedback_mode(services.store, "human") == "human"
    assert not (services.cfg.data_path / "constitution.md").exists()

    assert "mixed" in admin_ui.set_feedback_mode_ui(services, "mixed", "s3cret")
    assert current_feedback_mode(services.store, "human") == "mixed"
    with pytest.raises(gr.Error, match="feedback mode must be one of"):
        admin_ui.set_feedback_mode_ui(services, "robots", "s3cret")
    message = admin_ui.save_constitution_ui(services, "1. Be brief.\n2. Be kind.", "s3cret")
    version = load_constitution(services.cfg.feedback, services.cfg.data_path).version
    assert f"`{version}`" in message and "2 listed principles" in message
    with pytest.raises(gr.Error, match="empty"):
        admin_ui.save_constitution_ui(services, "   ", "s3cret")
    assert load_constitution(services.cfg.feedback, services.cfg.data_path).version == version

    counts = ui.refresh_dashboard(services)[0]
    assert "Training pairs:" in counts and "Votes by source:" in counts and "Human–AI agreement" in counts
    assert "mixed: AI labels fill in" in counts and f"`{version}`" in counts
    admin_ui.set_feedback_mode_ui(services, "human", "s3cret")
    (services.cfg.data_path / "constitution.md").unlink()


# ---- admin protection and actions -------------------------------------------------------------------------------

ADMIN_ACTIONS = {
    "pause": lambda s, token: admin_ui.set_paused_ui(s, True, token),
    "rollback": lambda s, token: admin_ui.rollback_ui(s, "base", token),
    "delete": lambda s, token: admin_ui.delete_version_ui(s, "v0001", token),
    "export": lambda s, token: admin_ui.export_ui(s, token),
    "reset": lambda s, token: admin_ui.reset_data_ui(s, "RESET", token),
    "settings": lambda s, token: admin_ui.training_settings_ui(s, token, 0.1, 0.2, 1e-4),
    "unlock": lambda s, token: admin_ui.unlock_admin_ui(s, token),
}


@pytest.mark.parametrize("action", sorted(ADMIN_ACTIONS))
def test_admin_actions_are_refused_on_the_server_without_the_token(services, monkeypatch, action):
    """Hidden in the page is not enough: each handler refuses, and nothing changes."""
    before = (services.store.get_control(PAUSED_KEY), services.store.get_control(TRAINING_SETTINGS_KEY),
              services.store.counts())
    monkeypatch.setattr(services.cfg.limits, "admin_token", "s3cret")
    for wrong in ("", "wrong", "s3cret "):
        with pytest.raises(gr.Error, match="Wrong or missing admin token"):
            ADMIN_ACTIONS[action](services, wrong)
    monkeypatch.setattr(services.cfg.limits, "admin_token", "")  # none at all: refused even on loopback
    assert services.cfg.host == "127.0.0.1"
    for anything in ("", "s3cret"):
        with pytest.raises(gr.Error, match="RLHF_ADMIN_TOKEN"):
            ADMIN_ACTIONS[action](services, anything)
    after = (services.store.get_control(PAUSED_KEY), services.store.get_control(TRAINING_SETTINGS_KEY),
             services.store.counts())
    assert after == before


def test_unlock_shows_the_admin_controls_only_with_the_token(services, monkeypatch):
    monkeypatch.setattr(services.cfg.limits, "admin_token", "s3cret")
    controls, message = admin_ui.unlock_admin_ui(services, "s3cret")
    assert controls["visible"] is True and "unlocked" in message
    demo = ui.build_app(services)
    groups = [b for b in demo.blocks.values() if isinstance(b, gr.Group)]
    assert any(group.visible is False for group in groups)  # the controls start hidden


def test_training_settings_reach_the_control_table_and_bad_values_are_refused(services, monkeypatch):
    monkeypatch.setattr(services.cfg.limits, "admin_token", "s3cret")
    assert "ppo_lr = 0.0002" in admin_ui.training_settings_ui(services, "s3cret", 0.1, 0.5, 2e-4)
    assert json.loads(services.store.get_control(TRAINING_SETTINGS_KEY)) == {
        "init_kl_coef": 0.1, "length_penalty": 0.5, "ppo_lr": 2e-4}
    for bad in ("abc", -1, float("nan")):
        with pytest.raises(gr.Error, match="must be"):
            admin_ui.training_settings_ui(services, "s3cret", bad, 0.5, 2e-4)
    assert json.loads(services.store.get_control(TRAINING_SETTINGS_KEY))["init_kl_coef"] == 0.1


def test_export_gives_a_zip_with_the_trl_files_and_old_exports_are_cleaned_up(services, monkeypatch):
    monkeypatch.setattr(services.cfg.limits, "admin_token", "s3cret")
    state = send(services)[-1][0]
    ui.vote_ui(services, "a", state)
    archive, message = admin_ui.export_ui(services, "s3cret")
    with zipfile.ZipFile(archive) as zipped:
        names = zipped.namelist()
        assert any(name.endswith(".jsonl") for name in names)
        assert sum(1 for line in zipped.read("preferences.jsonl").splitlines() if line.strip()) >= 1
    assert "preference pairs" in message
    first = Path(archive).parent
    assert [p.name for p in first.iterdir()] == [Path(archive).name]  # only the zip is left behind
    old = time.time() - 3600
    os.utime(first, (old, old))  # an hour old: the next export removes it
    second = Path(admin_ui.export_ui(services, "s3cret")[0]).parent
    assert not first.exists() and second.exists()
    from rlhf_online.export import remove_exports
    assert remove_exports(0, own_only=True) >= 1 and not second.exists()  # what shutdown does
    demo = ui.build_app(services)
    assert demo.delete_cache == (600, 600)  # Gradio's copies in its cache are removed too


def test_delete_version_removes_it_and_refuses_unknown_names(services, monkeypatch, tiny_model_dir):
    from rlhf_online import models
    from rlhf_online.adapters import save_peft_adapter

    monkeypatch.setattr(services.cfg.limits, "admin_token", "s3cret")
    trainer = models.attach_lora(models.load_base_model(str(tiny_model_dir), "nf4", for_training=True).model,
                                 services.cfg.model)
    info = services.registry.publish(lambda folder: save_peft_adapter(trainer, models.POLICY_ADAPTER, folder), {})
    services.live.refresh()
    assert info.name in services.live.loaded
    with pytest.raises(gr.Error, match="Unknown version"):
        admin_ui.delete_version_ui(services, "base", "s3cret")
    with pytest.raises(gr.Error, match="Unknown version"):
        admin_ui.delete_version_ui(services, "../data", "s3cret")
    assert f"Deleted `{info.name}`" in admin_ui.delete_version_ui(services, info.name, "s3cret")
    assert not info.path.exists() and info.name not in services.live.loaded
    assert services.registry.next_version_name() != info.name  # its number is never reused


def test_two_resets_in_one_second_and_concurrent_resets_keep_every_backup(tiny_model_dir, tmp_path):
    """Issue 13 #5: backups named by the second were overwritten by a second reset in that second."""
    cfg = load_config(["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data"), "--adapters-dir",
                       str(tmp_path / "adapters"), "--no-train", "--max-new-tokens", "2"], environ={})
    built = build_services(cfg, start_trainer=False)
    try:
        token = admin_ui.ensure_admin_token(cfg, announce=lambda *a, **k: None)
        resets = 0
        for _ in range(5):  # two resets within the same clock second (retried if a second boundary fell between)
            resets += 2
            ui.vote_ui(built, "b", send(built)[-1][0])
            second = time.strftime("%H%M%S")
            first_backup = built.reset_data()
            second_backup = built.reset_data()
            if time.strftime("%H%M%S") == second:
                break
        assert first_backup != second_backup
        with sqlite3.connect(first_backup / "preferences.sqlite") as conn:
            assert conn.execute("SELECT choice FROM votes").fetchall() == [("b",)]  # not overwritten by the empty one
        errors, backups = [], []

        def reset():
            try:
                backups.append(admin_ui.reset_data_ui(built, "RESET", token))
            except Exception as error:  # noqa: BLE001 - any failure is the bug
                errors.append(error)

        threads = [threading.Thread(target=reset) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == [] and len(set(backups)) == 4
        assert len(list((cfg.data_path / "backups").iterdir())) == resets + 4  # every reset has its own folder
        ui.vote_ui(built, "a", send(built)[-1][0])  # and the app goes on with a working store
        assert built.store.counts()["votes"]["a"] == 1 and built.store.integrity_check() == "ok"
    finally:
        built.close()


def test_reset_moves_the_database_aside_and_starts_fresh(tiny_model_dir, tmp_path):
    cfg = load_config(["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data"), "--adapters-dir",
                       str(tmp_path / "adapters"), "--no-train", "--max-new-tokens", "4"], environ={})
    built = build_services(cfg, start_trainer=False)
    try:
        state = send(built)[-1][0]
        ui.vote_ui(built, "b", state)
        token = admin_ui.ensure_admin_token(cfg, announce=lambda *a, **k: None)
        with pytest.raises(gr.Error, match="Type RESET"):
            admin_ui.reset_data_ui(built, "reset please", token)
        assert built.store.counts()["votes"]["b"] == 1
        message = admin_ui.reset_data_ui(built, "RESET", token)
        backup = next((cfg.data_path / "backups").iterdir())
        assert str(backup) in message
        with sqlite3.connect(backup / "preferences.sqlite") as conn:  # the old data, whole
            assert conn.execute("SELECT choice FROM votes").fetchall() == [("b",)]
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert built.store.counts()["votes"]["b"] == 0
        state = send(built)[-1][0]  # the app goes on with the fresh database
        ui.vote_ui(built, "a", state)
        assert built.store.counts()["votes"]["a"] == 1
    finally:
        built.close()


def test_api_stats_report_swaps_and_trainer(services):
    stats = ui.api_stats(services)
    assert stats["swaps"] == len(services.live.swaps) and stats["trainer"] is None
    assert stats["serving"] == list(services.live.loaded)


@pytest.mark.parametrize("pair_token", [10 ** 30, -1, 0, 1, "1", "abc", 1.5, None, "x" * 10_000])
def test_row_ids_and_malformed_pair_tokens_are_clear_errors(services, pair_token):
    with pytest.raises(gr.Error, match="Unknown answer pair"):
        ui.api_vote(services, pair_token, "a")


def test_lone_surrogates_and_nul_bytes_are_stored_cleanly(services):
    state = send(services, "hi \ud800 there\x00")[-1][0]
    assert db_rows(services, "SELECT messages_json FROM pairs WHERE token = ?",
                   (state.pair_token,))[0][0].count("hi ? there")
    ui.vote_ui(services, "both_bad", state, "better \udfff answer")
    assert db_rows(services, "SELECT better_answer FROM votes WHERE pair_id = ?", (row_id(services, state),)) == [
        ("better ? answer",)]


def test_only_the_session_shown_a_pair_can_vote_on_it(services):
    """Another session holding the token (leaked, replayed) is refused; the owner's vote and conversation are
    untouched, and an attacker's "better answer" never enters anyone else's conversation or the demonstrations."""
    owner = send(services, "my own question")[-1][0]
    demos = len(services.store.demonstrations())
    for intruder in ("api:someone-else", "", "s"):
        with pytest.raises(gr.Error, match="Unknown answer pair"):
            ui.api_vote(services, owner.pair_token, "b", "[prize](http://evil.example)", intruder)
        with pytest.raises(gr.Error, match="Unknown answer pair"):
            ui.vote_ui(services, "b", ui.SessionState(session_id=intruder or "x", pair_token=owner.pair_token),
                       "[prize](http://evil.example)")
    assert db_rows(services, "SELECT COUNT(*) FROM votes WHERE pair_id = ?", (row_id(services, owner),)) == [(0,)]
    assert len(services.store.demonstrations()) == demos
    # nor can another session continue or regenerate the owner's conversation by its id
    with pytest.raises(gr.Error, match="Nothing to regenerate"):
        list(ui.api_regenerate(services, owner.conversation_id, "api:someone-else"))
    theirs = list(ui.api_chat(services, owner.conversation_id, "hijack", "api:someone-else"))[-1]
    assert theirs[0] != owner.conversation_id
    history = ui.vote_ui(services, "a", owner)[1]  # the owner's vote still counts, once, in their conversation
    assert [m["content"] for m in history] == ["my own question", owner.answers[0]]
    assert db_rows(services, "SELECT choice FROM votes WHERE pair_id = ?", (row_id(services, owner),)) == [("a",)]


def test_regenerate_with_unknown_ids_creates_no_state(services):
    before = services.arena.open_conversations
    for made_up in ("", "nope", "0" * 32):
        with pytest.raises(gr.Error, match="Nothing to regenerate"):
            list(ui.api_regenerate(services, made_up, "api:flooder"))
    assert services.arena.open_conversations == before


def test_without_a_configured_token_one_is_generated_and_printed_once(tiny_model_dir, tmp_path, capsys):
    """Issue 13 #4: no token configured used to mean "open on loopback"; now the app makes one and prints it once."""
    cfg = load_config(["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data"), "--adapters-dir",
                       str(tmp_path / "adapters"), "--no-train", "--max-new-tokens", "2"], environ={})
    assert cfg.limits.admin_token == "" and cfg.host == "127.0.0.1"
    built = build_services(cfg, start_trainer=False)
    try:
        ui.build_app(built)
        token = cfg.limits.admin_token
        assert len(token) >= 32
        assert capsys.readouterr().out.count(token) == 1
        ui.build_app(built)  # building again keeps the token and prints nothing
        assert cfg.limits.admin_token == token and token not in capsys.readouterr().out
        with pytest.raises(gr.Error, match="Wrong or missing admin token"):
            admin_ui.set_paused_ui(built, True, "")
        assert "paused" in admin_ui.set_paused_ui(built, True, token)
    finally:
        built.close()
    configured = load_config([], environ={"RLHF_ADMIN_TOKEN": "mine-DO-NOT-PRINT"})
    assert admin_ui.ensure_admin_token(configured) == "mine-DO-NOT-PRINT"
    assert "mine-DO-NOT-PRINT" not in capsys.readouterr().out


def test_controls_follow_the_pair_state():
    def interactive(outputs):
        return [update["interactive"] for update in outputs]

    # order: 4 votes, submit-better, Regenerate, New conversation, Send
    assert interactive(ui.controls_ui(ui.SessionState())) == [False] * 6 + [False, True]
    pending = ui.SessionState(session_id="s", conversation_id="c", pair_token="t0k3n", answers=("x", "y"))
    assert interactive(ui.controls_ui(pending)) == [True] * 8
    assert interactive(ui.controls_ui(pending, busy=True)) == [False] * 8  # while answers are being written
    voted = replace(pending, pair_token=None)
    assert interactive(ui.controls_ui(voted)) == [False] * 6 + [True, True]


def test_new_version_notice_reaches_the_chat(services, monkeypatch):
    notices = ui.dashboard.ServingNotices()
    state = list(ui.chat_ui(services, ui.SessionState(), "Hello", notices=notices))[-1][0]
    assert ui.check_new_version_ui(services, notices, state) is not None
    unchanged = ui.check_new_version_ui(services, notices, state)
    assert not isinstance(unchanged, list)  # nothing new: the chat is left alone
    monkeypatch.setattr(services.live, "newest_pair", lambda: ("v0009", "base"))
    history = ui.check_new_version_ui(services, notices, state)
    assert isinstance(history, list) and "`v0009` is now answering" in history[-1]["content"]
    assert history[0] == {"role": "user", "content": "Hello"}
    monkeypatch.undo()  # (the arena samples from newest_pair too, and v0009 does not exist)
    after_vote = ui.vote_ui(services, "a", state, notices=notices)[1]
    assert [m["content"] for m in after_vote][0] == "Hello"  # the notice stays where it happened
    assert "`v0009` is now answering" in after_vote[1]["content"] and after_vote[2]["role"] == "assistant"


def test_status_line_reads_the_trainer_activity(services):
    text = ui.refresh_status(services)
    assert text.startswith("**Serving the base model**") and "trainer: off" in text

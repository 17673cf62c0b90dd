import json
import sqlite3
import threading
from pathlib import Path

import pytest

from rlhf_online import store as store_module
from rlhf_online.store import AI_PLACEMENT, DB_FILENAME, PreferenceStore, StoreWriteError, UnknownPairError, store_path
from rlhf_online.store_schema import SCHEMA_VERSION

HH_DEV = Path(__file__).resolve().parents[2] / "shared/data/hh_harmless_dev.jsonl"
CHAT = [{"role": "user", "content": "How do I boil an egg?"}]


@pytest.fixture
def db_path(tmp_path):
    return store_path(tmp_path / "data")


@pytest.fixture
def store(db_path):
    with PreferenceStore(db_path) as opened:
        yield opened


def add_pair(store, messages=CHAT, answer_a="Boil it 8 minutes.", answer_b="Fry it.", version_a="v0002",
             version_b="v0001", conversation_id="c1", turn=0):
    return store.record_pair(conversation_id=conversation_id, turn=turn, messages=messages, answer_a=answer_a,
                             answer_b=answer_b, version_a=version_a, version_b=version_b,
                             sampling={"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 96},
                             session_id="s1", placement="newest_left")


def preference_count(store) -> int:
    return sum(store.counts()["preferences"].values())


def table_count(path, table):
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_store_path_puts_the_database_inside_the_data_dir(tmp_path):
    assert store_path(tmp_path) == tmp_path / DB_FILENAME


def test_a_vote_is_on_disk_when_record_vote_returns(db_path):
    """Another connection (as the trainer process would use) sees the vote without the store being closed."""
    store = PreferenceStore(db_path)
    pair_id = add_pair(store)
    store.record_vote(pair_id=pair_id, choice="a", session_id="s1")
    with sqlite3.connect(db_path) as other:
        assert other.execute("SELECT choice FROM votes").fetchall() == [("a",)]
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_pair_survives_reopening_with_all_fields(db_path):
    with PreferenceStore(db_path) as store:
        pair_id = add_pair(store)
    with PreferenceStore(db_path) as store:
        pair = store.get_pair(pair_id)
        assert store.get_pair(pair_id + 1) is None
    assert pair.messages == CHAT
    assert (pair.answer_a, pair.answer_b, pair.version_a, pair.version_b) == ("Boil it 8 minutes.", "Fry it.",
                                                                              "v0002", "v0001")
    assert pair.sampling == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 96}
    assert (pair.conversation_id, pair.turn, pair.session_id, pair.placement) == ("c1", 0, "s1", "newest_left")
    assert pair.reward_a is None and pair.created_at > 0


@pytest.mark.parametrize("choice, expected", [("a", [("Boil it 8 minutes.", "Fry it.")]),
                                              ("b", [("Fry it.", "Boil it 8 minutes.")]),
                                              ("tie", []), ("both_bad", [])])
def test_vote_choice_decides_which_answer_is_chosen(store, choice, expected):
    pair_id = add_pair(store)
    receipt = store.record_vote(pair_id=pair_id, choice=choice, session_id="s1")
    assert (receipt.choice, receipt.version_a, receipt.version_b, receipt.duplicate) == (choice, "v0002", "v0001",
                                                                                         False)
    rows = store.preferences_since()
    assert [(row.chosen, row.rejected) for row in rows] == expected
    assert all(row.prompt == CHAT and row.source == "human" and row.weight == 1.0 for row in rows)


def test_better_answer_on_both_bad_is_preferred_over_both_shown_answers(store):
    pair_id = add_pair(store)
    store.record_vote(pair_id=pair_id, choice="both_bad", better_answer="  Simmer it for 9 minutes. ",
                      session_id="s1")
    assert {(row.chosen, row.rejected) for row in store.preferences_since()} == {
        ("Simmer it for 9 minutes.", "Boil it 8 minutes."), ("Simmer it for 9 minutes.", "Fry it.")}
    [demo] = store.demonstrations()
    assert (demo.prompt, demo.answer, demo.session_id, demo.source) == (CHAT, "Simmer it for 9 minutes.", "s1",
                                                                         "human")


def test_better_answer_identical_to_the_chosen_one_adds_no_duplicate_pair(store):
    pair_id = add_pair(store)
    store.record_vote(pair_id=pair_id, choice="a", better_answer="Boil it 8 minutes.", session_id="s1")
    assert [(row.chosen, row.rejected) for row in store.preferences_since()] == [("Boil it 8 minutes.", "Fry it.")]


def test_blank_better_answer_counts_as_none(store):
    pair_id = add_pair(store)
    store.record_vote(pair_id=pair_id, choice="tie", better_answer="   \n", session_id="s1")
    assert store.demonstrations() == []
    assert preference_count(store) == 0


def test_identical_answers_give_no_training_pair(store):
    pair_id = add_pair(store, answer_a="Same.", answer_b="Same.", version_a="v0001", version_b="v0001")
    store.record_vote(pair_id=pair_id, choice="a", session_id="s1")
    assert preference_count(store) == 0
    assert store.counts()["votes"]["a"] == 1


def test_second_vote_on_a_pair_returns_the_first_receipt_and_writes_nothing(store):
    pair_id = add_pair(store)
    first = store.record_vote(pair_id=pair_id, choice="a", session_id="s1")
    again = store.record_vote(pair_id=pair_id, choice="b", better_answer="Other", session_id="s1")
    assert again.duplicate and again.vote_id == first.vote_id and again.choice == "a"
    assert preference_count(store) == 1 and store.demonstrations() == []
    assert store.counts()["votes"] == {"a": 1, "b": 0, "tie": 0, "both_bad": 0}


def test_concurrent_double_clicks_record_one_vote(store, db_path):
    pair_id = add_pair(store)
    receipts = []
    threads = [threading.Thread(target=lambda: receipts.append(
        store.record_vote(pair_id=pair_id, choice="b", session_id="s1"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(receipt.duplicate for receipt in receipts) == [False] + [True] * 7
    assert table_count(db_path, "votes") == 1 and table_count(db_path, "preferences") == 1


def test_two_store_instances_on_one_file_see_each_others_writes(db_path):
    with PreferenceStore(db_path) as app, PreferenceStore(db_path) as trainer:
        pair_id = add_pair(app)
        app.record_vote(pair_id=pair_id, choice="a", session_id="s1")
        trainer.record_metric("reward", 1, {"loss": 0.5})
        assert preference_count(trainer) == 1
        assert app.latest_metrics("reward")[0].values == {"loss": 0.5}


def test_vote_on_unknown_pair_or_with_bad_choice_is_refused(store, db_path):
    with pytest.raises(UnknownPairError, match="no answer pair with id 999"):
        store.record_vote(pair_id=999, choice="a", session_id="s1")
    pair_id = add_pair(store)
    with pytest.raises(ValueError, match="choice must be one of"):
        store.record_vote(pair_id=pair_id, choice="left", session_id="s1")
    assert table_count(db_path, "votes") == 0


def test_choice_is_forgiven_case_and_spaces_and_the_receipt_carries_the_stored_pair(store):
    assert store_module.parse_choice(" Both_Bad ") == "both_bad"
    pair_id = add_pair(store)
    store.set_reward_scores(pair_id, 0.5, -0.25, reward_model_version="7")
    receipt = store.record_vote(pair_id=pair_id, choice=" A", session_id="s1")
    assert (receipt.choice, receipt.pair_id, receipt.version_a, receipt.version_b) == ("a", pair_id, "v0002", "v0001")
    assert (receipt.pair.reward_a, receipt.pair.reward_b, receipt.pair.reward_model_version) == (0.5, -0.25, "7")
    again = store.record_vote(pair_id=pair_id, choice="b", session_id="s1")
    assert again.duplicate and (again.vote_id, again.choice) == (receipt.vote_id, "a")


def test_latest_scored_vote_is_the_newest_human_vote_with_scores(store):
    assert store.latest_scored_vote() is None
    first, second, unvoted = add_pair(store), add_pair(store, turn=1), add_pair(store, turn=2)
    store.record_vote(pair_id=first, choice="a", session_id="s1")
    store.record_vote(pair_id=second, choice="tie", session_id="s1")
    assert store.latest_scored_vote() is None  # nothing scored yet
    for pair_id in (first, unvoted):
        store.set_reward_scores(pair_id, 1.0, 0.0, reward_model_version="3")
    pair, choice = store.latest_scored_vote()
    assert (pair.id, choice, pair.reward_model_version) == (first, "a", "3")
    store.set_reward_scores(second, 0.0, 1.0)
    assert store.latest_scored_vote()[0].id == second


def test_full_disk_rejects_the_vote_without_partial_rows_and_a_retry_succeeds(store, db_path):
    pair_id = add_pair(store)
    conn = store._conn  # the page limit is per connection, so it has to be set on the store's own one
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    big_answer = "A much better answer. " * 5000  # needs new pages for the demonstration and preference rows
    with pytest.raises(StoreWriteError, match="could not save your vote: disk full"):
        store.record_vote(pair_id=pair_id, choice="a", better_answer=big_answer, session_id="s1")
    for table in ("votes", "preferences", "demonstrations"):
        assert table_count(db_path, table) == 0, table
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert not store.record_vote(pair_id=pair_id, choice="a", better_answer=big_answer, session_id="s1").duplicate
    assert preference_count(store) == 3
    assert store.integrity_check() == "ok"


def test_vote_while_another_process_holds_the_write_lock_fails_cleanly(store, db_path):
    pair_id = add_pair(store)
    store._conn.execute("PRAGMA busy_timeout = 100")  # the default 5 s wait would only slow the test down
    trainer = sqlite3.connect(db_path, isolation_level=None)
    trainer.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreWriteError, match="could not save your vote: the database is locked"):
            store.record_vote(pair_id=pair_id, choice="a", session_id="s1")
    finally:
        trainer.execute("ROLLBACK")
        trainer.close()
    assert not store.record_vote(pair_id=pair_id, choice="a", session_id="s1").duplicate


def test_recent_prompts_are_distinct_and_newest_first(store):
    older = [{"role": "user", "content": "old"}]
    newer = [{"role": "user", "content": "new"}]
    add_pair(store, messages=older)
    add_pair(store, messages=CHAT)
    add_pair(store, messages=newer)
    add_pair(store, messages=older)
    assert store.recent_prompts() == [older, newer, CHAT]
    assert store.recent_prompts(limit=2) == [older, newer]


def test_preferences_since_pages_through_rows_by_id(store):
    for index in range(3):
        store.record_vote(pair_id=add_pair(store, answer_a=f"a{index}"), choice="a", session_id="s1")
    first_two = store.preferences_since(limit=2)
    assert [row.chosen for row in first_two] == ["a0", "a1"]
    assert [row.chosen for row in store.preferences_since(after_id=first_two[-1].id)] == ["a2"]


def test_recent_preferences_are_the_newest_rows_newest_first(store):
    assert store.recent_preferences(limit=2) == []
    for index in range(4):
        store.record_vote(pair_id=add_pair(store, answer_a=f"a{index}"), choice="a", session_id="s1")
    assert [row.chosen for row in store.recent_preferences(limit=2)] == ["a3", "a2"]
    assert [row.chosen for row in store.recent_preferences(limit=10)] == ["a3", "a2", "a1", "a0"]


def test_ai_votes_keep_their_source_and_weight(store):
    pair_id = add_pair(store)
    store.record_vote(pair_id=pair_id, choice="b", session_id=None, source="ai", judge="judge-model", weight=0.5)
    [row] = store.preferences_since()
    assert (row.source, row.weight) == ("ai", 0.5)
    assert store.counts()["preferences"] == {"human": 0, "ai": 1, "import": 0}


def test_counts_cover_every_kind_of_vote(store):
    for choice in ("a", "a", "b", "tie", "both_bad"):
        store.record_vote(pair_id=add_pair(store), choice=choice, session_id="s1")
    store.record_vote(pair_id=add_pair(store), choice="tie", better_answer="Mine.", session_id="s1")
    assert store.counts() == {
        "pairs_shown": 6,
        "votes": {"a": 2, "b": 1, "tie": 2, "both_bad": 1},
        "demonstrations": 1,
        "preferences": {"human": 5, "ai": 0, "import": 0},
    }


def test_version_win_rates_score_the_newer_version_whichever_side_it_was_on(store):
    votes = [("v0002", "v0001", "a"), ("v0001", "v0002", "b"), ("v0001", "v0002", "a"), ("v0002", "v0001", "tie"),
             ("v0001", "base", "a"), ("base", "v0001", "both_bad"), ("v0001", "v0001", "a")]
    for version_a, version_b, choice in votes:
        store.record_vote(pair_id=add_pair(store, version_a=version_a, version_b=version_b), choice=choice,
                          session_id="s1")
    store.record_vote(pair_id=add_pair(store, version_a="v0002", version_b="v0001"), choice="b", session_id=None,
                      source="ai")
    records = {(r.newer, r.older): r for r in store.version_win_rates()}
    assert set(records) == {("v0001", "base"), ("v0002", "v0001")}
    latest = records[("v0002", "v0001")]
    assert (latest.wins, latest.losses, latest.ties) == (2, 1, 1)
    assert latest.win_rate == pytest.approx(2.5 / 4)
    first = records[("v0001", "base")]
    assert (first.wins, first.losses, first.ties, first.win_rate) == (1, 0, 1, 0.75)


def test_reward_scores_metrics_and_control_round_trip(store):
    pair_id = add_pair(store)
    store.set_reward_scores(pair_id, 0.25, -1.5, reward_model_version="r0003")
    pair = store.get_pair(pair_id)
    assert (pair.reward_a, pair.reward_b, pair.reward_model_version) == (0.25, -1.5, "r0003")
    with pytest.raises(UnknownPairError):
        store.set_reward_scores(pair_id + 10, 0.0, 0.0)
    assert store.record_metric("ppo", 1, {"kl": 0.01}) > 0
    store.record_metric("reward", 1, {"loss": 0.7})
    store.record_metric("ppo", 2, {"kl": 0.02})
    assert [(m.step, m.values) for m in store.latest_metrics("ppo")] == [(1, {"kl": 0.01}), (2, {"kl": 0.02})]
    assert [m.step for m in store.latest_metrics("ppo", limit=1)] == [2]
    assert store.get_control("paused", default="no") == "no"
    store.set_control("paused", "yes")
    store.set_control("paused", "no longer")
    assert store.get_control("paused") == "no longer"


def test_import_accepts_hh_trl_and_implicit_prompt_records_and_skips_bad_ones(store):
    records = [
        {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hey"}],
         "rejected": [{"role": "assistant", "content": "No"}], "weight": 2.0},
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},
        {"chosen": "\n\nHuman: Q2\n\nAssistant: yes", "rejected": "\n\nHuman: Q2\n\nAssistant: no"},
        {"prompt": "no turns at all", "chosen": "x", "rejected": "y"},
        {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": "x"},
        {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": "same", "rejected": "same"},
        None,
    ]
    result = store.import_preferences(records)
    assert (result.imported, result.skipped) == (4, 4)
    rows = store.preferences_since()
    assert [(row.prompt, row.chosen, row.rejected, row.weight) for row in rows] == [
        ([{"role": "user", "content": "Hi"}], "Hello!", "Go away.", 1.0),
        ([{"role": "user", "content": "Hi"}], "Hey", "No", 2.0),
        ([{"role": "user", "content": "Q"}], "good", "bad", 1.0),
        ([{"role": "user", "content": "Q2"}], "yes", "no", 1.0),
    ]
    assert {row.source for row in rows} == {"import"}


def test_import_of_the_hh_dev_set_keeps_every_row(store):
    if not HH_DEV.is_file():
        pytest.skip(f"HH dev data not found at {HH_DEV}")
    with HH_DEV.open(encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    assert store.import_preferences(records).imported == len(records)
    assert store.counts()["preferences"]["import"] == len(records)


def build_version_1_file(path):
    """A database as the first release wrote it, with a voted pair in it."""
    with PreferenceStore(path, _target_version=1) as old:
        assert old.schema_version == 1
        pair_id = add_pair(old)
        old.record_vote(pair_id=pair_id, choice="b", better_answer="Poach it.", session_id="s1")
        old.set_reward_scores(pair_id, 1.0, 2.0)
    with sqlite3.connect(path) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(pairs)")}
    assert "reward_model_version" not in columns
    return pair_id


def test_opening_a_version_1_file_upgrades_it_and_keeps_the_data(db_path):
    pair_id = build_version_1_file(db_path)
    with PreferenceStore(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION == 4
        pair = store.get_pair(pair_id)
        assert (pair.answer_b, pair.reward_b, pair.reward_model_version) == ("Fry it.", 2.0, None)
        assert store.counts()["votes"]["b"] == 1 and preference_count(store) == 3
        store.set_reward_scores(pair_id, 0.0, 1.0, reward_model_version="r0001")
        assert store.get_pair(pair_id).reward_model_version == "r0001"
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert "idx_preferences_source" in {row[1] for row in conn.execute("PRAGMA index_list(preferences)")}


def test_a_version_2_file_gains_room_for_an_ai_label_beside_the_human_vote(db_path):
    """Version 2 allowed one vote per pair; version 3 one per pair and source, keeping every row and id."""
    with PreferenceStore(db_path, _target_version=2) as old:
        first, second = add_pair(old), add_pair(old, answer_a="Poach it.")
        old.record_vote(pair_id=first, choice="a", better_answer="Steam it.", session_id="s1")
        old.record_vote(pair_id=second, choice="b", session_id=None, source="ai", judge="j@1", weight=0.5)
        with pytest.raises(sqlite3.IntegrityError):  # the old constraint really was one vote per pair
            old._conn.execute("INSERT INTO votes (pair_id, choice, source, created_at) VALUES (?, 'a', 'ai', 0)",
                              (first,))
        before = old._read("SELECT * FROM votes ORDER BY id")
    with PreferenceStore(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert [tuple(row) for row in store._read("SELECT * FROM votes ORDER BY id")] == [tuple(r) for r in before]
        assert [(p.source, p.weight, p.judge) for p in store.preferences_since()] == [
            ("human", 1.0, None), ("human", 1.0, None), ("human", 1.0, None), ("ai", 0.5, "j@1")]
        assert store.integrity_check() == "ok"
        assert store._read("PRAGMA foreign_keys")[0][0] == 1  # switched back on after the rebuild
        assert store._read("PRAGMA foreign_key_check") == []
        label = store.record_vote(pair_id=first, choice="b", session_id=None, source="ai", judge="j@1", weight=0.5)
        assert not label.duplicate
        assert store.record_vote(pair_id=first, choice="a", session_id="s1").duplicate  # human vote still once
        assert store.feedback_counts()["agreement"] == {"pairs": 1, "agree": 0}


def test_human_vote_and_ai_label_on_one_pair_are_each_recorded_once(store):
    pair_id = add_pair(store)
    human = store.record_vote(pair_id=pair_id, choice="a", session_id="s1")
    ai = store.record_vote(pair_id=pair_id, choice="a", session_id=None, source="ai", judge="base:m@abc", weight=0.5)
    assert not ai.duplicate and ai.vote_id != human.vote_id
    assert store.record_vote(pair_id=pair_id, choice="b", session_id=None, source="ai").duplicate
    assert store.record_vote(pair_id=pair_id, choice="b", session_id="s1").duplicate
    # The person's vote is the training pair; the judge's label on the same pair only measures agreement.
    assert [(p.source, p.chosen) for p in store.preferences_since()] == [("human", "Boil it 8 minutes.")]
    assert store.feedback_counts() == {"votes": {"human": 1, "ai": 1}, "ai_abstained": 0,
                                       "agreement": {"pairs": 1, "agree": 1}}


def test_ai_label_first_then_a_human_vote_both_train_with_their_weights(store):
    pair_id = add_pair(store)
    store.record_vote(pair_id=pair_id, choice="b", session_id=None, source="ai", judge="base:m@abc", weight=0.5)
    store.record_vote(pair_id=pair_id, choice="a", session_id="s1")
    assert [(p.source, p.chosen, p.weight, p.judge) for p in store.preferences_since()] == [
        ("ai", "Fry it.", 0.5, "base:m@abc"), ("human", "Boil it 8 minutes.", 1.0, None)]
    assert store.feedback_counts()["agreement"] == {"pairs": 1, "agree": 0}


def test_pairs_awaiting_ai_label_and_agreement_counts(store):
    shown = [add_pair(store, answer_a=f"a{i}") for i in range(4)]
    generated = store.record_pair(conversation_id="ai-1", turn=0, messages=CHAT, answer_a="x", answer_b="y",
                                  version_a="v0001", version_b="v0001", sampling={}, session_id=None,
                                  placement=store_module.AI_PLACEMENT)
    assert [p.id for p in store.pairs_awaiting_ai_label()] == shown[::-1]  # newest first, never generated ones
    for pair_id, human, ai in zip(shown, ["a", "b", "tie", "a"], ["a", "a", "b", "tie"]):
        store.record_vote(pair_id=pair_id, choice=human, session_id="s1")
        store.record_vote(pair_id=pair_id, choice=ai, session_id=None, source="ai", judge="j", weight=0.5)
    store.record_vote(pair_id=generated, choice="b", session_id=None, source="ai", judge="j", weight=0.5)
    assert store.pairs_awaiting_ai_label() == []
    # Both picked a side on pairs 1 and 2 (agreeing on 1); a human tie and a judge abstention do not count.
    assert store.feedback_counts() == {"votes": {"human": 4, "ai": 5}, "ai_abstained": 1,
                                       "agreement": {"pairs": 2, "agree": 1}}
    counts = store.counts()
    assert counts["pairs_shown"] == 4  # the judge's own pairs were never shown to anyone
    assert counts["votes"] == {"a": 2, "b": 1, "tie": 1, "both_bad": 0}  # people's votes only
    assert [p.id for p in store.unscored_voted_pairs()] == [generated] + shown[::-1]  # each pair once
    assert counts["preferences"] == {"human": 3, "ai": 1, "import": 0}


def test_messages_are_validated_before_a_pair_is_stored(store, db_path):
    with pytest.raises(ValueError, match="role 'bot'"):
        add_pair(store, messages=[{"role": "bot", "content": "x"}])
    assert table_count(db_path, "pairs") == 0


def test_pairs_are_found_by_their_unguessable_token_and_ai_pairs_take_no_human_vote(store):
    shown = store.record_pair(conversation_id="c", turn=0, messages=[{"role": "user", "content": "hi"}],
                              answer_a="x", answer_b="y", version_a="base", version_b="base", sampling={},
                              session_id="s1", placement=None, token="tok-abc")
    assert store.get_pair_by_token("tok-abc").id == shown and store.get_pair_by_token("tok-abc").token == "tok-abc"
    assert store.get_pair_by_token("") is None and store.get_pair_by_token(str(shown)) is None
    with pytest.raises(sqlite3.IntegrityError):  # tokens are unique
        store.record_pair(conversation_id="c", turn=1, messages=[{"role": "user", "content": "hi"}],
                          answer_a="x", answer_b="y", version_a="base", version_b="base", sampling={},
                          session_id="s2", placement=None, token="tok-abc")
    made_for_judge = store.record_pair(conversation_id="ai-1", turn=0, messages=[{"role": "user", "content": "q"}],
                                       answer_a="x", answer_b="y", version_a="v1", version_b="v1", sampling={},
                                       session_id=None, placement=AI_PLACEMENT)
    with pytest.raises(UnknownPairError, match="takes no human votes"):
        store.record_vote(pair_id=made_for_judge, choice="a", session_id="attacker")
    assert store.record_vote(pair_id=made_for_judge, choice="a", session_id=None, source="ai", judge="j").vote_id

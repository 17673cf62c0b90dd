"""Version names and their order, and what depends on the order: win rates and the reward-hacking alarm past
v9999 (as strings "v10000" < "v9999"; the auto-rollback side of it is in test_worker)."""

import pytest

from rlhf_online import dashboard
from rlhf_online.store import Metric, PreferenceStore, store_path
from rlhf_online.versions import (BASE_VERSION, is_version_name, sorted_versions, version_name, version_number,
                                  version_order)


def test_names_and_numbers_round_trip_past_four_digits():
    assert [version_name(n) for n in (1, 9999, 10000)] == ["v0001", "v9999", "v10000"]
    assert [version_number(n) for n in ("v0001", "v9999", "v10000", BASE_VERSION)] == [1, 9999, 10000, 0]
    assert is_version_name("v10000") and not is_version_name(BASE_VERSION) and not is_version_name("v12")
    with pytest.raises(ValueError, match="not a version name"):
        version_number("latest")


def test_order_is_numeric_with_the_base_oldest_and_odd_names_first():
    assert sorted_versions(["v10000", "v9999", BASE_VERSION, "v0002"]) == [BASE_VERSION, "v0002", "v9999", "v10000"]
    assert version_order("hand-edited") < version_order(BASE_VERSION) < version_order("v0001")


@pytest.fixture
def store(tmp_path):
    with PreferenceStore(store_path(tmp_path)) as opened:
        yield opened


def vote_on(store, version_a: str, version_b: str, choices: str) -> None:
    """One pair of `version_a` (left) against `version_b` (right) per character of `choices` ('a' or 'b')."""
    for i, choice in enumerate(choices):
        pair_id = store.record_pair(conversation_id=f"{version_a}-{version_b}-{i}", turn=0,
                                    messages=[{"role": "user", "content": "hi"}], answer_a=f"left {i}",
                                    answer_b=f"right {i}", version_a=version_a, version_b=version_b, sampling={},
                                    session_id="s", placement="ab")
        store.record_vote(pair_id=pair_id, choice=choice, session_id="s")


def test_win_rates_past_v9999_score_v10000_as_the_newer_version(store):
    vote_on(store, "v9998", "v9999", "bbba")  # v9999 beat v9998 3 of 4
    vote_on(store, "v10000", "v9999", "abbbbbbbbb")  # v10000 (left) lost 9 of 10 to v9999
    records = store.version_win_rates()
    assert [(r.newer, r.older) for r in records] == [("v9999", "v9998"), ("v10000", "v9999")]
    newest = records[-1]
    assert (newest.wins, newest.losses, newest.win_rate) == (1, 9, 0.1)


def test_the_reward_hacking_alarm_names_v10000_when_people_reject_it(store):
    vote_on(store, "v9998", "v9999", "bbbbbbbbbb")
    vote_on(store, "v9999", "v10000", "aaaaaaaaaa")  # v10000 (right) lost every vote
    rising = [Metric(i, "ppo", i, {"iteration": i, "mean_score": 0.1 * i}, 0.0) for i in range(12)]
    warning = dashboard.reward_hacking_warning(rising, store.version_win_rates())
    assert warning is not None and "`v10000` over `v9999` only 0%" in warning

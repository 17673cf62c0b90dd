"""The side panel's numbers, from hand-made metrics and win rates (no model, no Gradio)."""

from types import SimpleNamespace

import pytest

from rlhf_online import dashboard
from rlhf_online.store import Metric, VersionRecord


def ppo(iteration, mean_score, **extra):
    values = {"iteration": iteration, "mean_score": mean_score, "kl": 0.1 * iteration, "kl_coef": 0.05,
              "mean_length": 20 + iteration, **extra}
    return Metric(id=iteration, kind="ppo", step=iteration, values=values, created_at=0.0)


def test_reward_curve_has_both_accuracy_series_per_point():
    metrics = [Metric(1, "reward", 1, {"pairs": 1, "prequential_accuracy": 0.0, "recent_accuracy": 0.0}, 0.0),
               {"pairs": 2, "prequential_accuracy": 0.5, "recent_accuracy": 0.5},  # plain dicts work too
               {"pairs": 3, "prequential_accuracy": float("nan"), "recent_accuracy": 0.66},
               {"loss": 0.3}]  # no x value: skipped
    rows = dashboard.reward_curve(metrics)
    assert [(r["pairs"], r["series"].startswith("all")) for r in rows] == [
        (1, True), (1, False), (2, True), (2, False), (3, False)]  # the non-finite point is left out
    assert rows[-1]["accuracy"] == pytest.approx(0.66)
    assert set(rows[0]) == set(dashboard.REWARD_COLUMNS)


def test_ppo_curves_one_row_per_iteration_with_missing_values_as_none():
    rows = dashboard.ppo_curves([ppo(1, 0.2), ppo(2, 0.4, kl=float("inf")), {"mean_score": 1.0}])
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[0] == {"iteration": 1, "mean_score": 0.2, "kl": pytest.approx(0.1), "kl_coef": 0.05,
                       "mean_length": 21}
    assert rows[1]["kl"] is None
    assert list(rows[0]) == dashboard.PPO_COLUMNS


def test_ppo_curves_fall_back_to_the_metric_step():
    rows = dashboard.ppo_curves([Metric(7, "ppo", 7, {"mean_score": 0.3}, 0.0)])
    assert rows == [{"iteration": 7, "mean_score": 0.3, "kl": None, "kl_coef": None, "mean_length": None}]


def test_win_rate_rows_count_ties_as_half():
    rows = dashboard.win_rate_rows([VersionRecord("v0001", "base", wins=3, losses=1, ties=2),
                                    VersionRecord("v0002", "v0001", 0, 0, 0)])
    assert rows[0]["matchup"] == "v0001 vs base"
    assert rows[0]["votes"] == 6 and rows[0]["win_rate"] == pytest.approx(4 / 6)
    assert rows[1]["win_rate"] == 0.0


def test_counts_markdown_lists_every_vote_kind():
    text = dashboard.counts_markdown({"pairs_shown": 7, "votes": {"a": 2, "b": 1, "tie": 0, "both_bad": 1},
                                      "demonstrations": 3, "preferences": {"human": 4, "ai": 0, "import": 0}})
    assert "Pairs shown:** 7" in text and "Votes:** 4" in text
    assert "A better: 2" in text and "B better: 1" in text and "tie: 0" in text and "both bad: 1" in text
    assert "demonstrations):** 3" in text and "human: 4" in text


def test_summaries_handle_empty_and_filled_data():
    assert "no votes learned yet" in dashboard.reward_markdown([], [])
    text = dashboard.reward_markdown([{"pairs": 12, "prequential_accuracy": 0.75, "recent_accuracy": 0.8,
                                       "recent_margin": 0.4, "loss": 0.5}], [ppo(3, 1.25, published="v0002")])
    assert "12 pairs" in text and "0.75" in text and "iteration 3" in text and "v0002" in text
    assert "off" in dashboard.trainer_markdown(None, False, [])
    status = SimpleNamespace(alive=True, pid=42, starts=1, last_exit_code=None, history=[])
    text = dashboard.trainer_markdown(status, True, ["v0001", "v0002"])
    assert "pid 42" in text and "paused" in text and "v0001, v0002" in text
    assert "none published" in dashboard.versions_markdown([])
    info = SimpleNamespace(name="v0003", meta={"parent": "v0002", "ppo_iteration": 6, "mean_reward": 0.5})
    assert "| v0003 | v0002 | 6 |" in dashboard.versions_markdown([info])


def test_reveal_names_versions_and_rewards_when_scored():
    text = dashboard.reveal_markdown(5, "v0002", "v0001", False, 0.5, -0.25)
    assert "Vote #5" in text and "`v0002` (reward 0.50)" in text and "`v0001` (reward -0.25)" in text
    assert "reward" not in dashboard.reveal_markdown(5, "base", "base", False)
    assert "counted once" in dashboard.reveal_markdown(5, "base", "base", True)


def test_the_panel_sets_the_reward_models_scores_beside_the_latest_scored_vote():
    def scored(reward_a, reward_b, choice, version="57"):
        return SimpleNamespace(reward_a=reward_a, reward_b=reward_b, reward_model_version=version), choice

    metrics = [{"pairs": 57, "prequential_accuracy": 0.6, "recent_accuracy": 0.7}]
    text = dashboard.reward_markdown(metrics, [], scored(0.31, -0.12, "a"))
    assert "A 0.31, B -0.12 (scored after 57 pairs learned)" in text and "agrees with the vote" in text
    assert "disagrees with the vote" in dashboard.scored_vote_markdown(scored(0.31, -0.12, "b"))
    assert "the vote was tie" in dashboard.scored_vote_markdown(scored(0.31, -0.12, "tie", None))
    assert dashboard.scored_vote_markdown(None) == "" and "Latest scored" not in dashboard.reward_markdown(metrics, [])


RISING = [ppo(i, 0.1 * i) for i in range(1, 11)]  # first-5 mean 0.3, last-5 mean 0.8
FLAT = [ppo(i, 0.5) for i in range(1, 11)]


@pytest.mark.parametrize("metrics, records, fires", [
    (RISING, [VersionRecord("v0002", "v0001", 4, 6, 2)], True),  # reward up, people prefer the old one
    (RISING, [VersionRecord("v0002", "v0001", 5, 5, 2)], True),  # exactly 0.5 is "no better"
    (RISING, [VersionRecord("v0002", "v0001", 8, 2, 2)], False),  # people agree with the reward model
    (RISING, [VersionRecord("v0002", "v0001", 2, 5, 1)], False),  # too few votes to judge
    (FLAT, [VersionRecord("v0002", "v0001", 0, 12, 0)], False),  # reward not climbing
    (RISING[:8], [VersionRecord("v0002", "v0001", 0, 12, 0)], False),  # too few iterations
    (RISING, [], False),
    # only the newest matchup counts: an old loss does not fire once the newest version wins
    (RISING, [VersionRecord("v0001", "base", 0, 12, 0), VersionRecord("v0002", "v0001", 9, 1, 0)], False),
    (RISING, [VersionRecord("v0001", "base", 9, 1, 0), VersionRecord("v0002", "v0001", 1, 9, 0)], True),
])
def test_reward_hacking_warning(metrics, records, fires):
    warning = dashboard.reward_hacking_warning(metrics, records)
    assert (warning is not None) == fires
    if fires:
        assert "reward hacking" in warning and records[-1].newer in warning


def test_reward_hacking_warning_ignores_missing_scores():
    metrics = RISING + [ppo(11, float("nan"))]
    assert dashboard.reward_hacking_warning(metrics, [VersionRecord("v0002", "v0001", 1, 11, 0)]) is not None


def test_status_line_says_what_serves_since_when_from_how_many_votes_and_what_the_trainer_does():
    now = 10_000.0
    line = dashboard.status_line("v0003", {"published_at": now - 240, "votes_seen": 24},
                                 [{"pairs": 30, "recent_accuracy": 0.7}],
                                 {"doing": "PPO iteration 5: sampling", "since": now - 12}, True, False, now)
    assert line == ("**Serving `v0003`** since 4 min ago, learned from 24 votes · reward model right on 70% of the "
                    "last 30 new pairs · trainer: PPO iteration 5: sampling (12 s ago)")
    base = dashboard.status_line("base", None, [], None, False, False, now)
    assert "Serving the base model" in base and "no votes learned yet" in base and "trainer: off" in base
    paused = dashboard.status_line("v0001", {"votes_seen": 1}, [{"pairs": 80, "recent_accuracy": 0.5}],
                                   {"doing": "x"}, True, True, now)
    assert "learned from 1 vote " in paused + " " and "last 50 new pairs" in paused and "**paused**" in paused


def test_serving_notices_appear_where_the_version_changed():
    notices = dashboard.ServingNotices(max_conversations=2)
    describe = lambda before: f"now v2 (was {before})"  # noqa: E731
    assert not notices.check("c1", "v1", 0, describe)  # the first look only remembers
    assert not notices.check("c1", "v1", 2, describe)
    assert notices.check("c1", "v2", 2, describe)
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}]
    shown = notices.interleave("c1", messages)
    assert [m["content"] for m in shown] == ["q1", "a1", "now v2 (was v1)", "q2"]
    assert shown[2]["role"] == "assistant" and shown[2]["metadata"]["title"] == "Model update"
    assert notices.interleave("other", messages) == messages
    assert not notices.check("", "v3", 0, describe)
    notices.check("c2", "v1", 0, describe)
    notices.check("c3", "v1", 0, describe)  # bounded: the oldest conversation is forgotten
    assert notices.interleave("c1", messages) == messages


def test_phases_show_live_numbers_in_plain_words():
    ppo_cfg = SimpleNamespace(sft_coef=0.1, target_kl=6.0, min_preferences=4)
    empty = dashboard.phases_markdown({"votes": {}, "demonstrations": 0}, [], [], [], {}, "human", ppo_cfg, None)
    assert set(empty) == {"sft", "reward", "ppo", "hacking", "ai"}
    assert "has not learned from any vote yet" in empty["reward"] and "learned from 4 pairs" in empty["ppo"]
    live = dashboard.phases_markdown(
        {"votes": {"a": 5, "b": 3, "tie": 1}, "demonstrations": 2},
        [{"pairs": 8, "prequential_accuracy": 0.625, "recent_accuracy": 0.75}], [ppo(1, 0.1), ppo(4, 0.9)],
        [VersionRecord("v0002", "v0001", 3, 1, 0)], {"votes": {"human": 9, "ai": 4}, "agreement": {"pairs": 2, "agree": 1}},
        "mixed", ppo_cfg, "⚠️ **Possible reward hacking:** something")
    assert "**2** better answers" in live["sft"] and "**9** votes so far (8 picked a side)" in live["reward"]
    assert "**0.75** on the last 50" in live["reward"]
    assert "Iteration **4**" in live["ppo"] and "from 0.10 at iteration 1" in live["ppo"] and "KL" in live["ppo"]
    assert "**75%** of 4 votes" in live["hacking"] and "Possible reward hacking" in live["hacking"]
    assert "4 AI labels" in live["ai"] and "1/2 pairs" in live["ai"]
    assert "DPO" not in live["ppo"]  # --dpo-coef 0: the panel does not mention a term that is not there


def test_phases_explain_the_dpo_term_with_its_live_loss_when_it_is_on():
    ppo_cfg = SimpleNamespace(sft_coef=0.1, target_kl=6.0, min_preferences=4, dpo_coef=0.5)
    metrics = [ppo(1, 0.3, dpo_loss=0.41)]
    text = dashboard.phases_markdown({"votes": {"a": 5}, "demonstrations": 0}, [], metrics, [], {}, "human",
                                     ppo_cfg, None)["ppo"]
    assert "DPO loss (weight 0.50)" in text and "now **0.410**" in text


def test_phases_and_status_show_the_on_topic_term_with_its_live_value_when_it_is_on():
    ppo_cfg = SimpleNamespace(sft_coef=0.1, target_kl=6.0, min_preferences=4, relevance_coef=1.0)
    metrics = [ppo(2, 0.3, relevance=0.412)]
    text = dashboard.phases_markdown({"votes": {"a": 5}, "demonstrations": 0}, [], metrics, [], {}, "human",
                                     ppo_cfg, None)["ppo"]
    assert "staying on topic" in text and "(weight 1.00)" in text and "**0.412**" in text
    assert "on topic 0.412" in dashboard.reward_markdown([], metrics)
    off = dashboard.phases_markdown({"votes": {"a": 5}, "demonstrations": 0}, [], [ppo(2, 0.3)], [], {}, "human",
                                    SimpleNamespace(**{**vars(ppo_cfg), "relevance_coef": 0.0}), None)["ppo"]
    assert "on topic" not in off and "on topic" not in dashboard.reward_markdown([], [ppo(2, 0.3)])


# ---- issue 11: the KL leash and the release gate in the panel ----------------------------------------------------

def test_kl_budget_markdown_shows_kl_against_its_target():
    from rlhf_online.dashboard import kl_budget_markdown

    assert "not run" in kl_budget_markdown([])
    metrics = [{"iteration": i, "kl": kl, "kl_coef": 0.1, "target_kl": 6.0} for i, kl in enumerate([2.0, 7.5])]
    text = kl_budget_markdown(metrics)
    assert "KL 7.50 nats against a target of 6.0" in text and "over target" in text and "2.0 → 7.5" in text
    assert "within target" in kl_budget_markdown(metrics[:1])


def test_gate_markdown_lists_rejected_candidates_with_why():
    from rlhf_online.dashboard import gate_markdown

    assert "no candidate" in gate_markdown([])
    base = {"relevance": 0.8, "harmful_compliant": 2, "harmful_total": 6}
    metrics = [{"passed": True, "reasons": [], "kl_budget": 7.2, "kl": 3.0, "base": base},
               {"passed": False, "reasons": ["KL 9.1 nats over the budget 7.2", "length collapse: 5 | 6"],
                "kl_budget": 7.2, "kl": 9.1, "relevance": 0.2, "mean_length": 5.0, "degenerate_rate": 0.5,
                "harmful_compliant": 3, "harmful_total": 6, "base": base, "gate_tokens": 48}]
    text = gate_markdown(metrics)
    assert "1 published, 1 rejected" in text and "KL ≤ 7.2 nats" in text and "(2/6 answers)" in text
    assert "answers of up to 48 tokens" in text  # the gate's KL is over its own (shorter) answers
    row = [line for line in text.splitlines() if "over the budget" in line][0]
    assert "9.1" in row and "length collapse: 5 / 6" in row  # a | in a reason cannot break the table
    assert "| 3/6 |" in row


def test_gate_markdown_says_when_the_harm_check_was_skipped():
    """A base that complies in every answer leaves no rise to detect: the panel says so instead of a count."""
    from rlhf_online.dashboard import gate_markdown

    base = {"relevance": 0.8, "harmful_compliant": 24, "harmful_total": 24}
    metrics = [{"passed": False, "reasons": ["off topic"], "kl_budget": 7.2, "kl": 1.0, "relevance": 0.1,
                "harmful_compliant": 0, "harmful_total": 0, "harm_checked": False, "base": base}]
    text = gate_markdown(metrics)
    assert "harmful compliance not checked: the base already complies in 24/24 answers" in text
    assert "| not checked | off topic |" in text

"""What the side panel shows, computed from store data: plot rows, Markdown summaries, the reward-hacking alarm.

Plain Python (no Gradio) so every number the panel shows can be unit-tested with hand-made inputs. Metrics
may be `store.Metric` objects (with `.values` and `.step`) or plain dicts of values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

VOTE_LABELS = {"a": "A better", "b": "B better", "tie": "tie", "both_bad": "both bad"}
RECENT_WINDOW = 50  # the reward trainer's "recent accuracy" covers its last 50 pairs

REWARD_COLUMNS = ["pairs", "accuracy", "series"]
PPO_COLUMNS = ["iteration", "mean_score", "kl", "kl_coef", "mean_length"]
WIN_COLUMNS = ["matchup", "newer", "older", "wins", "losses", "ties", "votes", "win_rate"]


def _values(metric: Any) -> dict:
    return metric.values if hasattr(metric, "values") and not isinstance(metric, dict) else dict(metric)


def _number(value: Any) -> float | None:
    """A finite float, or None for missing, non-numeric or non-finite values (plots skip those)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt(value: Any, digits: int = 3) -> str:
    number = _number(value)
    return "–" if number is None else f"{number:.{digits}f}"


# ---- plot rows ---------------------------------------------------------------------------------------------

def reward_curve(metrics: Iterable[Any]) -> list[dict]:
    """Reward-model accuracy vs pairs learned, long format (one row per series and point) for a coloured plot."""
    rows = []
    for metric in metrics:
        values = _values(metric)
        pairs = _number(values.get("pairs"))
        if pairs is None:
            continue
        for key, series in (("prequential_accuracy", "all pairs (prequential)"),
                            ("recent_accuracy", f"last {RECENT_WINDOW} pairs")):
            accuracy = _number(values.get(key))
            if accuracy is not None:
                rows.append({"pairs": int(pairs), "accuracy": accuracy, "series": series})
    return rows


def ppo_curves(metrics: Iterable[Any]) -> list[dict]:
    """One row per PPO iteration: mean reward, KL to the reference, its coefficient, mean answer length."""
    rows = []
    for metric in metrics:
        values = _values(metric)
        iteration = _number(values.get("iteration", getattr(metric, "step", None)))
        if iteration is None:
            continue
        row = {"iteration": int(iteration)}
        row.update({key: _number(values.get(key)) for key in PPO_COLUMNS[1:]})
        rows.append(row)
    return rows


def win_rate_rows(records: Iterable[Any]) -> list[dict]:
    """Human head-to-head results of each version against the older one it was shown with (ties count half)."""
    rows = []
    for record in records:
        total = record.wins + record.losses + record.ties
        rows.append({"matchup": f"{record.newer} vs {record.older}", "newer": record.newer, "older": record.older,
                     "wins": record.wins, "losses": record.losses, "ties": record.ties, "votes": total,
                     "win_rate": (record.wins + 0.5 * record.ties) / total if total else 0.0})
    return rows


# ---- Markdown summaries ------------------------------------------------------------------------------------

def counts_markdown(counts: dict) -> str:
    votes = counts.get("votes", {})
    preferences = counts.get("preferences", {})
    vote_total = sum(votes.values())
    lines = [f"**Pairs shown:** {counts.get('pairs_shown', 0)}  ",
             f"**Votes:** {vote_total} (" + ", ".join(f"{label}: {votes.get(key, 0)}"
                                                   for key, label in VOTE_LABELS.items()) + ")  ",
             f"**Written better answers (demonstrations):** {counts.get('demonstrations', 0)}  "]
    if preferences:
        lines.append("**Training pairs:** " + ", ".join(f"{source}: {n}" for source, n in preferences.items()))
    return "\n".join(lines)


FEEDBACK_MODE_LABELS = {"human": "human votes only", "ai": "AI judge only (automatic)",
                        "mixed": "mixed: AI labels fill in, weighted lower"}


def feedback_markdown(feedback: dict, mode: str, constitution_version: str | None) -> str:
    """Where preferences come from: `feedback` is `PreferenceStore.feedback_counts()`."""
    votes, agreement = feedback.get("votes", {}), feedback.get("agreement", {})
    pairs, agree = agreement.get("pairs", 0), agreement.get("agree", 0)
    rate = f"{agree}/{pairs} ({agree / pairs:.0%})" if pairs else "no pair labelled by both yet"
    constitution = f"`{constitution_version}`" if constitution_version else "missing"
    return "  \n".join([
        f"**Feedback:** {FEEDBACK_MODE_LABELS.get(mode, mode)}; constitution {constitution}",
        f"**Votes by source:** human {votes.get('human', 0)}, AI {votes.get('ai', 0)} "
        f"({feedback.get('ai_abstained', 0)} abstained)",
        f"**Human–AI agreement:** {rate}"])


def reward_markdown(reward_metrics: Sequence[Any], ppo_metrics: Sequence[Any]) -> str:
    lines = []
    if reward_metrics:
        v = _values(reward_metrics[-1])
        lines.append(f"**Reward model:** {v.get('pairs', 0)} pairs learned; accuracy on each new pair before "
                     f"learning it {_fmt(v.get('prequential_accuracy'), 2)} (last {RECENT_WINDOW}: "
                     f"{_fmt(v.get('recent_accuracy'), 2)}), margin {_fmt(v.get('recent_margin'), 2)}, "
                     f"loss {_fmt(v.get('loss'))}")
    else:
        lines.append("**Reward model:** no votes learned yet.")
    if ppo_metrics:
        v = _values(ppo_metrics[-1])
        published = f", published {v['published']}" if v.get("published") else ""
        lines.append(f"**PPO:** iteration {v.get('iteration', '–')}, mean reward {_fmt(v.get('mean_score'))}, "
                     f"KL {_fmt(v.get('kl'))} (coef {_fmt(v.get('kl_coef'), 4)}), mean length "
                     f"{_fmt(v.get('mean_length'), 1)} tokens{published}")
    else:
        lines.append("**PPO:** not started (it waits for enough votes).")
    return "\n\n".join(lines)


def kl_budget_markdown(ppo_metrics: Sequence[Any]) -> str:
    """The KL leash: KL to the reference now against its target, the coefficient, and how KL moved lately."""
    if not ppo_metrics:
        return "**KL leash:** PPO has not run yet."
    v = _values(ppo_metrics[-1])
    target = _number(v.get("target_kl"))
    kl = _number(v.get("kl"))
    recent = [_number(_values(m).get("kl")) for m in ppo_metrics[-8:]]
    trail = " → ".join(_fmt(k, 1) for k in recent)
    if target is None or kl is None:
        state = f"KL {_fmt(kl, 2)} nats (no target: fixed coefficient)"
    else:
        verdict = "within target" if kl <= target else "**over target**, the controller is pulling back"
        state = f"KL {kl:.2f} nats against a target of {target:.1f} ({verdict})"
    return f"**KL leash:** {state}; coefficient β {_fmt(v.get('kl_coef'), 3)}. Last iterations: {trail}"


def gate_markdown(gate_metrics: Sequence[Any], limit: int = 6) -> str:
    """The release gate's recent decisions, rejected candidates first with why (from the trainer's `gate` metrics)."""
    if not gate_metrics:
        return "**Release gate:** no candidate checked yet."
    values = [_values(m) for m in gate_metrics]
    rejected = [v for v in values if not v.get("passed")]
    last = values[-1]
    base = last.get("base") or {}
    lines = [f"**Release gate:** {len(values) - len(rejected)} published, {len(rejected)} rejected. Checks on "
             f"held-out prompts: KL ≤ {_fmt(last.get('kl_budget'), 1)} nats, on-topic (reference PMI; base "
             f"{_fmt(base.get('relevance'))}), not degenerate, no length collapse, harmful compliance ≤ base "
             f"({base.get('harmful_compliant', '–')}/{base.get('harmful_total', '–')})."]
    if rejected:
        lines += ["", "| iteration | KL | relevance | length | degenerate | harmful | why rejected |",
                  "|---|---|---|---|---|---|---|"]
        for metric, v in [(m, _values(m)) for m in gate_metrics if not _values(m).get("passed")][-limit:][::-1]:
            why = "; ".join(str(r) for r in v.get("reasons", [])).replace("|", "/")
            lines.append(f"| {getattr(metric, 'step', '–')} | {_fmt(v.get('kl'), 1)} | {_fmt(v.get('relevance'))} "
                         f"| {_fmt(v.get('mean_length'), 1)} | {_fmt(v.get('degenerate_rate'), 2)} | "
                         f"{v.get('harmful_compliant', '–')}/{v.get('harmful_total', '–')} | {why} |")
    return "\n".join(lines)


def trainer_markdown(status: Any | None, paused: bool, serving: Sequence[str]) -> str:
    """`status` is a `supervisor.TrainerStatus`, or None when training is off."""
    if status is None:
        state = "off (started with --no-train)"
    elif not status.alive:
        state = f"restarting (last exit code {status.last_exit_code})"
    else:
        state = f"running (pid {status.pid}, start #{status.starts})"
    lines = [f"**Trainer:** {state}" + (" — **paused**" if paused else ""),
             f"**Serving:** {', '.join(serving) if serving else 'base model only'}"]
    if status is not None and status.history:
        lines.append(f"Last problem: {status.history[-1]}")
    return "  \n".join(lines)


def versions_markdown(versions: Sequence[Any]) -> str:
    """`versions` are `adapters.VersionInfo` (oldest first)."""
    if not versions:
        return "**Versions:** none published yet (serving the base model)."
    lines = ["| version | parent | PPO iteration | votes seen | mean reward | KL |", "|---|---|---|---|---|---|"]
    for info in reversed(versions[-12:]):  # newest first
        meta = info.meta or {}
        lines.append(f"| {info.name} | {meta.get('parent', '–')} | {meta.get('ppo_iteration', '–')} | "
                     f"{meta.get('votes_seen', '–')} | {_fmt(meta.get('mean_reward'))} | {_fmt(meta.get('kl'))} |")
    return "\n".join(lines)


def reveal_markdown(vote_id: int, version_a: str, version_b: str, duplicate: bool,
                    reward_a: float | None = None, reward_b: float | None = None) -> str:
    """Shown after a vote: which version wrote each side (and the reward model's scores, once it scored them)."""
    def side(label: str, version: str, reward: float | None) -> str:
        score = f" (reward {_fmt(reward, 2)})" if _number(reward) is not None else ""
        return f"**{label}** was written by `{version}`{score}"

    head = "This pair already had a vote; it was counted once." if duplicate else f"Vote #{vote_id} saved."
    return f"{head} {side('A', version_a, reward_a)}, {side('B', version_b, reward_b)}. Type your next message."


# ---- the reward-hacking alarm ------------------------------------------------------------------------------

def reward_hacking_warning(ppo_metrics: Sequence[Any], win_rates: Sequence[Any], window: int = 5,
                           margin: float = 0.1, min_votes: int = 10) -> str | None:
    """A warning when the reward model's score climbs while people do not prefer the newest version.

    Fires when the mean reward of the last `window` PPO iterations exceeds that of the first `window` (of the
    metrics given) by more than `margin`, while the newest version's human win rate against its predecessor
    is at most 0.5 over at least `min_votes` votes: the policy is pleasing the reward model, not people.
    """
    scores = [s for s in (_number(_values(m).get("mean_score")) for m in ppo_metrics) if s is not None]
    if len(scores) < 2 * window or not win_rates:
        return None
    early, late = sum(scores[:window]) / window, sum(scores[-window:]) / window
    if late - early <= margin:
        return None
    newest = win_rates[-1]  # version_win_rates() sorts by (newer, older): the last is the newest matchup
    total = newest.wins + newest.losses + newest.ties
    if total < min_votes:
        return None
    win_rate = (newest.wins + 0.5 * newest.ties) / total
    if win_rate > 0.5:
        return None
    return (f"⚠️ **Possible reward hacking:** the mean reward rose from {early:.2f} to {late:.2f} over the last "
            f"PPO iterations, but people preferred `{newest.newer}` over `{newest.older}` only "
            f"{win_rate:.0%} of the time ({total} votes). Consider pausing training or rolling back.")


# ---- cheap version listing ---------------------------------------------------------------------------------

class VersionCache:
    """`registry.versions()` validates (loads) every adapter file; redo that only when the folder changes.

    The key is each candidate folder's name, mtime and retired marker, all from `stat` calls.
    """

    def __init__(self, registry: Any):
        self.registry = registry
        self._key: tuple | None = None
        self._versions: list = []

    def _fingerprint(self) -> tuple:
        from rlhf_online.adapters import RETIRED_MARKER, VERSION_PATTERN

        entries = []
        try:
            with os.scandir(self.registry.root) as scan:
                for entry in scan:
                    if entry.is_dir() and VERSION_PATTERN.match(entry.name):
                        entries.append((entry.name, entry.stat().st_mtime_ns,
                                        os.path.exists(os.path.join(entry.path, RETIRED_MARKER))))
        except OSError:
            return ()
        return tuple(sorted(entries))

    def versions(self) -> list:
        key = self._fingerprint()
        if key != self._key:
            self._versions, self._key = self.registry.versions(), key
        return self._versions

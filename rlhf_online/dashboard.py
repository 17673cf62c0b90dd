"""What the side panel shows, computed from store data: plot rows, Markdown summaries, the reward-hacking alarm.

Plain Python (no Gradio) so every number the panel shows can be unit-tested with hand-made inputs. Metrics
may be `store.Metric` objects (with `.values` and `.step`) or plain dicts of values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from rlhf_online.versions import BASE_VERSION

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
    """Human head-to-head results of each version against the older one it was shown with (`store.VersionRecord`,
    which owns the win rate: ties count half)."""
    return [{"matchup": f"{r.newer} vs {r.older}", "newer": r.newer, "older": r.older, "wins": r.wins,
             "losses": r.losses, "ties": r.ties, "votes": r.total, "win_rate": r.win_rate} for r in records]


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


def scored_vote_markdown(scored_vote: tuple[Any, str] | None) -> str:
    """The reward model's scores on the newest scored vote beside what the person chose (`scored_vote` is
    `PreferenceStore.latest_scored_vote()`): scores arrive after the vote, so the reveal rarely has them."""
    if scored_vote is None:
        return ""
    pair, choice = scored_vote
    if _number(pair.reward_a) is None or _number(pair.reward_b) is None:
        return ""
    model_picks = "a" if pair.reward_a > pair.reward_b else "b" if pair.reward_b > pair.reward_a else "tie"
    if choice in ("a", "b"):
        verdict = "agrees with the vote" if model_picks == choice else "disagrees with the vote"
    else:
        verdict = f"the vote was {VOTE_LABELS.get(choice, choice)}"
    after = f" after {pair.reward_model_version} pairs learned" if pair.reward_model_version else ""
    return (f"Latest scored vote: A {pair.reward_a:.2f}, B {pair.reward_b:.2f} (scored{after}); "
            f"the person chose {VOTE_LABELS.get(choice, choice)}: the reward model {verdict}.")


def reward_markdown(reward_metrics: Sequence[Any], ppo_metrics: Sequence[Any],
                    scored_vote: tuple[Any, str] | None = None) -> str:
    lines = []
    if reward_metrics:
        v = _values(reward_metrics[-1])
        lines.append(f"**Reward model:** {v.get('pairs', 0)} pairs learned; accuracy on each new pair before "
                     f"learning it {_fmt(v.get('prequential_accuracy'), 2)} (last {RECENT_WINDOW}: "
                     f"{_fmt(v.get('recent_accuracy'), 2)}), margin {_fmt(v.get('recent_margin'), 2)}, "
                     f"loss {_fmt(v.get('loss'))}")
        scored = scored_vote_markdown(scored_vote)
        if scored:
            lines[-1] += "  \n" + scored
    else:
        lines.append("**Reward model:** no votes learned yet.")
    if ppo_metrics:
        v = _values(ppo_metrics[-1])
        published = f", published {v['published']}" if v.get("published") else ""
        lines.append(f"**PPO:** iteration {v.get('iteration', '–')}, mean reward {_fmt(v.get('mean_score'))}, "
                     f"KL {_fmt(v.get('kl'))} (coef {_fmt(v.get('kl_coef'), 4)}), mean length "
                     f"{_fmt(v.get('mean_length'), 1)} tokens"
                     + (f", on topic {_fmt(v.get('relevance'), 3)} (reference PMI per token)"
                        if _number(v.get("relevance")) is not None else "") + published)
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
    tokens = f" (answers of up to {last['gate_tokens']} tokens)" if last.get("gate_tokens") else ""
    base_harm = f"{base.get('harmful_compliant', '–')}/{base.get('harmful_total', '–')}"
    harm = f"harmful compliance ≤ base ({base_harm} answers)" if last.get("harm_checked", True) else \
        f"harmful compliance not checked: the base already complies in {base_harm} answers, no rise to detect"
    lines = [f"**Release gate:** {len(values) - len(rejected)} published, {len(rejected)} rejected. Checks on "
             f"held-out prompts{tokens}: KL ≤ {_fmt(last.get('kl_budget'), 1)} nats, on-topic (reference PMI; base "
             f"{_fmt(base.get('relevance'))}), not degenerate, no length collapse, {harm}."]
    if rejected:
        lines += ["", "| iteration | KL | relevance | length | degenerate | harmful | why rejected |",
                  "|---|---|---|---|---|---|---|"]
        for metric, v in [(m, _values(m)) for m in gate_metrics if not _values(m).get("passed")][-limit:][::-1]:
            why = "; ".join(str(r) for r in v.get("reasons", [])).replace("|", "/")
            lines.append(f"| {getattr(metric, 'step', '–')} | {_fmt(v.get('kl'), 1)} | {_fmt(v.get('relevance'))} "
                         f"| {_fmt(v.get('mean_length'), 1)} | {_fmt(v.get('degenerate_rate'), 2)} | "
                         f"{_harm_cell(v)} | {why} |")
    return "\n".join(lines)


def _harm_cell(values: dict) -> str:
    if not values.get("harm_checked", True):
        return "not checked"
    return f"{values.get('harmful_compliant', '–')}/{values.get('harmful_total', '–')}"


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
    if newest.total < min_votes or newest.win_rate > 0.5:
        return None
    return (f"⚠️ **Possible reward hacking:** the mean reward rose from {early:.2f} to {late:.2f} over the last "
            f"PPO iterations, but people preferred `{newest.newer}` over `{newest.older}` only "
            f"{newest.win_rate:.0%} of the time ({newest.total} votes). Consider pausing training or rolling back.")


# ---- the panel's status line and the chat's "new version" notices ---------------------------------------------

def ago(seconds: float) -> str:
    """"12 s ago", "4 min ago", "1.5 h ago": the status line's and the timeline's age of things."""
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 5400:
        return f"{seconds // 60} min ago"
    return f"{seconds / 3600:.1f} h ago"


def status_line(serving: str, version_meta: dict | None, reward_metrics: Sequence[Any], activity: dict | None,
                training: bool, paused: bool, now: float) -> str:
    """One line a presenter can read aloud: which version serves since when, from how many votes it learned,
    how often the reward model is right lately, and what the trainer is doing now."""
    if serving == BASE_VERSION or not version_meta:
        parts = ["**Serving the base model** (no version published yet)"]
    else:
        since = _number(version_meta.get("published_at") or version_meta.get("time"))
        when = f" since {ago(now - since)}" if since is not None else ""
        votes = version_meta.get("votes_seen")
        learned = f", learned from {votes} vote{'s' if votes != 1 else ''}" if votes is not None else ""
        parts = [f"**Serving `{serving}`**{when}{learned}"]
    if reward_metrics:
        v = _values(reward_metrics[-1])
        accuracy = _number(v.get("recent_accuracy"))
        window = min(int(_number(v.get("pairs")) or 0), RECENT_WINDOW)
        if accuracy is not None and window:
            parts.append(f"reward model right on {accuracy:.0%} of the last {window} new pairs")
    else:
        parts.append("reward model: no votes learned yet")
    if not training:
        parts.append("trainer: off")
    elif paused:
        parts.append("trainer: **paused**")
    elif activity and activity.get("doing"):
        since = _number(activity.get("since"))
        parts.append(f"trainer: {activity['doing']}" + (f" ({ago(now - since)})" if since is not None else ""))
    else:
        parts.append("trainer: starting")
    return " · ".join(parts)


def new_version_notice(version: str, meta: dict | None, previous: str) -> str:
    votes = (meta or {}).get("votes_seen")
    learned = f" It learned from {votes} vote{'s' if votes != 1 else ''} so far." if votes is not None else ""
    return (f"**`{version}` is now answering.**{learned} New pairs compare it with `{previous}` "
            "(sides shuffled as always).")


class ServingNotices:
    """Per conversation: which version served it last, and the notices to show in its chat when that changes.

    Kept beside the conversation (not in the browser's session state) because the check runs on a timer while
    an answer may be streaming, and two handlers writing one session state would lose one another's update.
    """

    def __init__(self, max_conversations: int = 10_000):
        self.max_conversations = max_conversations
        self._seen: dict[str, str] = {}
        self._notices: dict[str, list[tuple[int, str]]] = {}

    def check(self, conversation_id: str, serving: str, position: int, describe) -> bool:
        """Record a notice at `position` (messages shown so far) if `serving` changed since the last check.

        The first check of a conversation only remembers the version. `describe(previous)` writes the notice.
        Returns whether a notice was added.
        """
        if not conversation_id:
            return False
        previous = self._seen.get(conversation_id)
        self._seen[conversation_id] = serving
        if len(self._seen) > self.max_conversations:  # forget the oldest conversations (dicts keep order)
            oldest = next(iter(self._seen))
            self._seen.pop(oldest)
            self._notices.pop(oldest, None)
        if previous is None or previous == serving:
            return False
        self._notices.setdefault(conversation_id, []).append((position, describe(previous)))
        return True

    def interleave(self, conversation_id: str, messages: list[dict]) -> list[dict]:
        """`messages` with this conversation's notices inserted where they happened (Chatbot messages format)."""
        notices = self._notices.get(conversation_id)
        if not notices:
            return messages
        out, pending = [], sorted(notices, key=lambda n: n[0])
        for index in range(len(messages) + 1):
            while pending and pending[0][0] <= index:
                out.append({"role": "assistant", "content": pending.pop(0)[1],
                            "metadata": {"title": "Model update"}})
            if index < len(messages):
                out.append(messages[index])
        return out


# ---- "How it works": the three phases of RLHF, with this page's live numbers ------------------------------------

def phases_markdown(counts: dict, reward_metrics: Sequence[Any], ppo_metrics: Sequence[Any], win_rates: Sequence[Any],
                    feedback: dict, mode: str, ppo_cfg: Any, warning: str | None) -> dict[str, str]:
    """Short, plain-words sections keyed by phase; each number is the live one."""
    votes = counts.get("votes", {})
    total_votes = sum(votes.values())
    demos = counts.get("demonstrations", 0)
    reward = _values(reward_metrics[-1]) if reward_metrics else {}
    ppo = _values(ppo_metrics[-1]) if ppo_metrics else {}
    first_ppo = _values(ppo_metrics[0]) if ppo_metrics else {}
    newest = win_rates[-1] if win_rates else None
    sections = {}
    sections["sft"] = (
        "### 1 · Demonstrations (supervised fine-tuning)\n"
        f"People wrote **{demos}** better answers of their own (*Write a better answer* under the chat). Each is a "
        f"demonstration: the trainer nudges the model to write it (a supervised loss, weight {_fmt(getattr(ppo_cfg, 'sft_coef', None), 2)}). "
        "In full-scale RLHF this is the first phase, on thousands of written answers; here it runs alongside PPO.")
    if reward:
        learned = (f"It has learned from **{reward.get('pairs', 0)}** preference pairs. Before learning each new "
                   f"pair it guesses which answer you will prefer: right **{_fmt(reward.get('prequential_accuracy'), 2)}** "
                   f"of the time overall, **{_fmt(reward.get('recent_accuracy'), 2)}** on the last {RECENT_WINDOW} "
                   "(0.5 = a coin flip). The curve below should climb as votes come in.")
    else:
        learned = "It has not learned from any vote yet: vote on a pair in the Chat tab and watch this change."
    sections["reward"] = (
        "### 2 · Reward model (learned from your votes)\n"
        f"**{total_votes}** votes so far ({votes.get('a', 0) + votes.get('b', 0)} picked a side). A vote says "
        "*this answer is better than that one*; a small reward model learns to give the preferred answer the higher "
        f"score (Bradley–Terry). {learned}")
    if ppo:
        rise = ""
        if first_ppo and _number(first_ppo.get("mean_score")) is not None and first_ppo is not ppo:
            rise = f" (from {_fmt(first_ppo.get('mean_score'), 2)} at iteration {first_ppo.get('iteration', '?')})"
        policy = (f"Iteration **{ppo.get('iteration', '?')}**: mean reward **{_fmt(ppo.get('mean_score'), 2)}**{rise}, "
                  f"KL to the original model **{_fmt(ppo.get('kl'), 2)}** nats per answer (target "
                  f"{_fmt(getattr(ppo_cfg, 'target_kl', None), 1)}; the penalty's weight adapts, now {_fmt(ppo.get('kl_coef'), 3)}), "
                  f"answers {_fmt(ppo.get('mean_length'), 0)} tokens long on average.")
    else:
        policy = (f"Not started yet: PPO waits until the reward model has learned from "
                  f"{getattr(ppo_cfg, 'min_preferences', '?')} pairs.")
    dpo_coef = _number(getattr(ppo_cfg, "dpo_coef", None)) or 0.0
    if dpo_coef > 0:
        policy += (f" It also learns from the votes themselves: a DPO loss (weight {_fmt(dpo_coef, 2)}) makes the "
                   "answer people picked more likely than the one they passed over"
                   + (f", now **{_fmt(ppo.get('dpo_loss'), 3)}** (0.693 = no preference learned)." if ppo else "."))
    relevance_coef = _number(getattr(ppo_cfg, "relevance_coef", None)) or 0.0
    if relevance_coef > 0:
        policy += (f" The reward also pays (weight {_fmt(relevance_coef, 2)}) for staying on topic: of two answers to "
                   "a question, the one the original model finds likelier after *this* question than after another "
                   "gets more"
                   + (f"; the answers now score **{_fmt(ppo.get('relevance'), 3)}** (pointwise mutual information "
                      "per token; near 0 = could answer anything)." if ppo and _number(ppo.get("relevance")) is not None
                      else "."))
    sections["ppo"] = (
        "### 3 · PPO (the chat model learns to please the reward model, on a leash)\n"
        "The trainer samples answers, the reward model scores them, and PPO shifts the chat model's LoRA adapter "
        "toward higher-scoring answers. A KL penalty keeps it close to the original model, so it cannot drift into "
        f"gibberish that happens to score well. {policy} Every few iterations it publishes a version that the chat "
        "starts using at once; the *Learning timeline* tab shows what each one says.")
    if newest is not None and newest.total:
        people = (f"people preferred `{newest.newer}` over `{newest.older}` in "
                  f"**{newest.win_rate:.0%}** of {newest.total} votes")
    else:
        people = "no head-to-head votes between versions yet"
    sections["hacking"] = (
        "### Reward hacking\n"
        "The reward model is only a guess at what people like. If PPO finds something the guess over-rewards "
        "(longer answers, emoji, flattery), the reward climbs while people stop preferring the new versions. Here: "
        f"{people}. Compare the answers in the *Learning timeline*: the same questions, before and after. "
        + (warning.replace("⚠️ ", "") if warning else "No sign of it right now."))
    fb_votes, agreement = feedback.get("votes", {}), feedback.get("agreement", {})
    agree = (f"{agreement.get('agree', 0)}/{agreement.get('pairs', 0)} pairs where both voted"
             if agreement.get("pairs") else "no pair labelled by both yet")
    sections["ai"] = (
        "### AI feedback\n"
        f"Preferences come from: **{FEEDBACK_MODE_LABELS.get(mode, mode)}**. An AI judge can vote too, following a "
        f"short written constitution (Constitutional AI / RLAIF): {fb_votes.get('ai', 0)} AI labels so far, "
        f"{fb_votes.get('human', 0)} human votes; human–AI agreement: {agree}. AI labels are cheap but inherit the "
        "judge's blind spots; the admin can switch modes.")
    return sections

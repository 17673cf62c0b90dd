"""The learning timeline: fixed probe prompts, answered by every published version and by the base, side by side.

Numbers (reward, KL, length) say *that* the policy changed; a presenter, or someone checking for reward hacking,
needs to see *what* changed. So each time the trainer publishes a version it answers a fixed set of probe
prompts with it (greedy decoding, so a difference comes from the weights, not from sampling luck), scores the
answers with the reward model it trained against, and stores them as a `timeline` metric in the SQLite store
(durable, reset with the data, no new table). The base model answers the same probes once per probe set. This
runs in the trainer process, off the chat's path; a failure is logged and never stops training. Where PPO's
rollouts are sampled by llama.cpp (a GGUF model on CPU), the same sampler answers the probes: the served engine's
answers, faster than the training copy's generate.

The page renders the stored entries newest first, each answer beside the base's, with the words the base did not
use highlighted (`timeline_html`). No Gradio here.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import html
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria

from rlhf_online.config import AppConfig, TimelineConfig
from rlhf_online.dashboard import ago
from rlhf_online.generation import answer_repetition_penalty
from rlhf_online.models import chat_ids, end_of_turn_ids
from rlhf_online.versions import BASE_VERSION, version_number, version_order

log = logging.getLogger(__name__)

METRIC_KIND = "timeline"
# Chosen to show different kinds of change: length and tone (explain), lists and format (tips), refusals and
# care (a risky request), made-up facts (a specific fact), and style a gameable taste would push (a poem).
DEFAULT_PROBES = (
    "Why is the sky blue?",
    "Give me three tips for staying focused while studying.",
    "How do I pick a lock?",
    "What is the capital of Australia?",
    "Write a two-line poem about the sea.",
)


def probe_prompts(cfg: TimelineConfig) -> list[str]:
    """The configured probes: '|'-separated text, or a file with one per line; '' = the defaults."""
    spec = (cfg.probe_prompts or "").strip()
    if not spec:
        return list(DEFAULT_PROBES)
    path = Path(spec).expanduser()
    lines = path.read_text().splitlines() if "|" not in spec and path.is_file() else spec.split("|")
    prompts = [line.strip() for line in lines if line.strip()]
    return prompts[:cfg.max_probes] or list(DEFAULT_PROBES)


def probe_set_id(prompts: Sequence[str]) -> str:
    """Entries are comparable only when they answered the same prompts."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Entry:
    """One model version's answers to the probe set."""

    version: str
    prompts: list[str]
    answers: list[str]
    tokens: list[int]
    scores: list[float | None]
    probe_set: str
    votes_seen: int | None
    created_at: float

    @classmethod
    def from_values(cls, values: dict, created_at: float) -> Entry:
        n = len(values.get("answers", []))
        return cls(version=str(values.get("version", "?")), prompts=list(values.get("prompts", [])),
                   answers=list(values.get("answers", [])), tokens=list(values.get("tokens", [0] * n)),
                   scores=list(values.get("scores", [None] * n)), probe_set=str(values.get("probe_set", "")),
                   votes_seen=values.get("votes_seen"), created_at=float(values.get("created_at", created_at)))


# ---- sampling (in the trainer) -----------------------------------------------------------------------------------

class _CallEachToken(StoppingCriteria):
    """Lets the trainer step aside for live chat between tokens; never stops generation itself."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.fn()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def answer_probes(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, repetition_penalty: float = 1.0,
                  use_adapter: bool = True, yield_fn: Callable[[], None] | None = None) -> tuple[list[str], list[int]]:
    """Greedy answers of the model's active adapter (or of the bare base, `use_adapter=False`), one batch.

    Returns the answers and their lengths in tokens.
    """
    eos = end_of_turn_ids(tokenizer)
    rows = [chat_ids(tokenizer, [{"role": "user", "content": prompt}]) for prompt in prompts]
    batch = tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
    device = next(model.parameters()).device
    batch = {key: tensor.to(device) for key, tensor in batch.items()}
    was_training = model.training
    model.eval()
    context = contextlib.nullcontext() if use_adapter else model.disable_adapter()
    try:
        with context:
            sequences = model.generate(
                **batch, do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens,
                eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                logits_processor=answer_repetition_penalty(repetition_penalty, batch["input_ids"].shape[1]),
                stopping_criteria=[_CallEachToken(yield_fn)] if yield_fn else None)
    finally:
        model.train(was_training)
    return decoded_answers(tokenizer, sequences[:, batch["input_ids"].shape[1]:].tolist(), eos)


def decoded_answers(tokenizer, responses: Sequence[list[int]], eos: Sequence[int]) -> tuple[list[str], list[int]]:
    """Each response's text up to its first end-of-turn token, and its length in tokens without it."""
    answers, lengths = [], []
    for response in responses:
        ends = [i for i, token in enumerate(response) if token in eos]
        response = response[:ends[0]] if ends else response
        answers.append(tokenizer.decode(response, skip_special_tokens=True).strip())
        lengths.append(len(response))
    return answers, lengths


def sampled_probe_answers(sampler, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                          use_adapter: bool = True) -> tuple[list[str], list[int]]:
    """`answer_probes` by the trainer's llama.cpp sampler (`rollout_sampler.LlamaCppRolloutSampler.greedy`): the
    served engine's own greedy answers (its 4-bit weights, its repetition penalty), and ~2 s a version faster."""
    rows = [chat_ids(tokenizer, [{"role": "user", "content": prompt}]) for prompt in prompts]
    samples = sampler.greedy(rows, max_new_tokens, use_adapter=use_adapter)
    return decoded_answers(tokenizer, [s.token_ids for s in samples], end_of_turn_ids(tokenizer))


def _entry_values(version: str, prompts: list[str], answers: list[str], lengths: list[int],
                  scores: list[float] | None, votes_seen: int | None) -> dict:
    return {"version": version, "prompts": prompts, "answers": answers, "tokens": lengths,
            "scores": list(scores) if scores is not None else [None] * len(answers),
            "probe_set": probe_set_id(prompts), "votes_seen": votes_seen, "created_at": time.time()}


def has_base_entry(store, probe_set: str) -> bool:
    return any(m.values.get("version") == BASE_VERSION and m.values.get("probe_set") == probe_set
               for m in store.latest_metrics(METRIC_KIND, 1000))


def record_published(store, cfg: AppConfig, version: str, votes_seen: int | None, model, tokenizer,
                     score_fn: Callable[[list[list[dict]], list[str]], list[float]] | None = None,
                     yield_fn: Callable[[], None] | None = None, sampler=None) -> bool:
    """Answer the probes with the version just published (the model's active adapter) and store them; the
    base's answers too, once per probe set. Returns whether it stored the version's entry; never raises.
    `sampler`: the trainer's llama.cpp sampler, which then answers instead of the model's generate."""
    try:
        prompts = probe_prompts(cfg.timeline)
        if not prompts or cfg.timeline.probe_max_new_tokens <= 0:
            return False
        started = time.perf_counter()
        kwargs = dict(max_new_tokens=cfg.timeline.probe_max_new_tokens,
                      repetition_penalty=cfg.sampling.repetition_penalty, yield_fn=yield_fn)
        messages = [[{"role": "user", "content": p}] for p in prompts]
        todo = [(version, True)]
        if not has_base_entry(store, probe_set_id(prompts)):
            todo.insert(0, (BASE_VERSION, False))
        for name, use_adapter in todo:
            if sampler is not None:
                if yield_fn is not None:
                    yield_fn()
                answers, lengths = sampled_probe_answers(sampler, tokenizer, prompts, kwargs["max_new_tokens"],
                                                         use_adapter=use_adapter)
            else:
                answers, lengths = answer_probes(model, tokenizer, prompts, use_adapter=use_adapter, **kwargs)
            scores = score_fn(messages, answers) if score_fn is not None else None
            store.record_metric(METRIC_KIND, version_number(name), _entry_values(
                name, prompts, answers, lengths, scores, votes_seen if use_adapter else 0))
        log.info("timeline: %s answered %d probes in %.1f s", version, len(prompts), time.perf_counter() - started)
        return True
    except Exception:  # the timeline is a view; training must go on whatever happens here
        log.exception("timeline: could not record the probe answers of %s", version)
        return False


# ---- reading and rendering (in the server) ---------------------------------------------------------------------

def load_entries(store, limit: int = 200) -> list[Entry]:
    """The newest entry per version for the newest probe set, newest version first, the base last."""
    latest: dict[str, Entry] = {}
    for metric in store.latest_metrics(METRIC_KIND, limit):
        entry = Entry.from_values(metric.values, metric.created_at)
        latest[entry.version] = entry  # oldest first: a later entry for the same version wins
    if not latest:
        return []
    newest_set = max(latest.values(), key=lambda e: e.created_at).probe_set
    entries = [e for e in latest.values() if e.probe_set == newest_set]
    return sorted(entries, key=lambda e: version_order(e.version), reverse=True)


_WORDS = re.compile(r"\S+\s*")


def highlight_new_words(base: str, answer: str) -> tuple[str, float]:
    """HTML of `answer` with the words the base answer did not have marked, and the share of changed words.

    Everything is escaped: model text is never rendered as HTML.
    """
    base_words, words = _WORDS.findall(base), _WORDS.findall(answer)
    matcher = difflib.SequenceMatcher(a=[w.strip().lower() for w in base_words],
                                      b=[w.strip().lower() for w in words], autojunk=False)
    parts, changed = [], 0
    for tag, _, _, j1, j2 in matcher.get_opcodes():
        chunk = html.escape("".join(words[j1:j2]))
        if tag in ("replace", "insert") and chunk:
            parts.append(f"<mark>{chunk}</mark>")
            changed += j2 - j1
        elif tag == "equal":
            parts.append(chunk)
    share = changed / len(words) if words else 0.0
    return "".join(parts), share


def _score(value) -> str:
    return "–" if value is None else f"{value:+.2f}"


def timeline_html(entries: Sequence[Entry], max_versions: int = 6, now: float | None = None) -> str:
    """One card per probe: the newest versions' answers (newest first) above the base's, changes highlighted."""
    if not entries:
        return ("<div class='timeline-empty'>No version has been published yet. When the trainer publishes its "
                "first version, it answers the probe questions, and the base model does too; they appear here "
                "side by side.</div>")
    now = time.time() if now is None else now
    base = next((e for e in entries if e.version == BASE_VERSION), None)
    versions = [e for e in entries if e.version != BASE_VERSION][:max_versions]
    cards = []
    for index, prompt in enumerate(entries[0].prompts):
        rows = []
        base_answer = base.answers[index] if base and index < len(base.answers) else ""
        for entry in versions + ([base] if base else []):
            if index >= len(entry.answers):
                continue
            answer = entry.answers[index]
            if entry is base or base is None:
                body, note = html.escape(answer), ""
            else:
                body, share = highlight_new_words(base_answer, answer)
                note = f" · {share:.0%} of words new vs base"
            votes = (f" · learned from {entry.votes_seen} vote{'s' if entry.votes_seen != 1 else ''}"
                     if entry.votes_seen else "")
            label = "base model" if entry is base else entry.version
            rows.append(
                f"<div class='tl-row{' tl-base' if entry is base else ''}'>"
                f"<div class='tl-meta'><b>{html.escape(label)}</b> · {ago(now - entry.created_at)}{votes} · "
                f"{entry.tokens[index] if index < len(entry.tokens) else '?'} tokens · reward "
                f"{_score(entry.scores[index] if index < len(entry.scores) else None)}{note}</div>"
                f"<div class='tl-answer'>{body or '<i>(empty answer)</i>'}</div></div>")
        cards.append(f"<div class='tl-card'><div class='tl-prompt'>“{html.escape(prompt)}”</div>{''.join(rows)}</div>")
    hidden = len([e for e in entries if e.version != BASE_VERSION]) - len(versions)
    more = f"<div class='tl-more'>{hidden} older versions not shown.</div>" if hidden > 0 else ""
    return "<div class='timeline'>" + "".join(cards) + more + "</div>"

"""AI feedback from written principles (Constitutional AI, Bai et al. 2022, arXiv:2212.08073; RLAIF).

Human votes are scarce, so a model can label some pairs by judging them against a short written constitution.
Those labels are a second, clearly separated source of preferences: the store records each one as a vote with
source ``ai``, the judge's id and the constitution's version, and the reward model learns it with a lower weight.

The judge reads log-probabilities instead of generating text. Asking a 135M model "which is better, A or B?"
measures its position bias (it says "B" whatever the answers), so the default scores each answer alone:
contrastive likelihood, how much more likely the answer is after a system prompt stating the principles than
after a neutral one (see ``Judge``). Per-principle yes/no and the A/B comparison (both orders averaged, so
swapping the answers gives exactly ``1 - p``) remain available as ``--judge-method``; bench/judge.py compares them
on human preference pairs.

The default judge is the policy's own base model with its adapters disabled (``peft_model.disable_adapter``), so
no second model is loaded; any other local or hub model can be named with ``--judge-model``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_online.config import FEEDBACK_MODES, JUDGE_METHODS, FeedbackConfig
from rlhf_online.models import chat_ids, end_of_turn_id, padded_position_ids

FEEDBACK_MODE_KEY = "feedback_mode"  # the admin's run-time choice, in the store's control table
SHIPPED_CONSTITUTION = Path(__file__).with_name("constitution.md")
EDITED_CONSTITUTION = "constitution.md"  # inside the data folder: the admin's edit, which takes precedence
MAX_CONSTITUTION_CHARS = 4000  # a few hundred tokens of principles; longer would crowd out the answers
BASE_JUDGE_PREFIX = "base:"  # judge id of the default judge: "base:<model>" (the base without adapters)

JUDGE_SYSTEM = ("You are an impartial judge. You compare two answers that an AI assistant gave to the same "
                "conversation and decide which one better follows the principles.")
JUDGE_QUESTION = "Which answer better follows the principles? Reply with one letter: A or B."
ANSWER_CUE = "The better answer is Answer"  # the assistant turn starts with this, so the next token is the letter

# Contrastive likelihood: the same conversation after these two system prompts, which differ only by the principles.
CONTRASTIVE_SYSTEM = "You are a helpful AI assistant. Every answer you give follows these principles:\n{principles}"
NEUTRAL_SYSTEM = "You are a helpful AI assistant."
# Polar contrast: against a system prompt that breaks the same principles (RLCD's negative prompt, Yang et al. 2023,
# used as a scorer rather than as a sampler), so what is measured is "follows" versus "breaks", not "follows" versus
# "says nothing about them".
VIOLATING_SYSTEM = ("You are a careless AI assistant. Every answer you give breaks these principles: it is harmful, "
                    "dishonest, unhelpful and rude.\n{principles}")
# Which system prompt each likelihood-ratio family is measured against.
RATIO_BASELINES = {"contrastive": NEUTRAL_SYSTEM, "polar": VIOLATING_SYSTEM}
# Per-principle yes/no: one question per principle about one answer alone.
PRINCIPLE_SYSTEM = "You check whether an AI assistant's answer follows a principle. Reply with Yes or No."
PRINCIPLE_QUESTION = "Principle: {principle}\nDoes the assistant's answer follow this principle? Reply Yes or No."


# ---- feedback mode ------------------------------------------------------------------------------------------

def check_feedback_mode(mode: str) -> str:
    """The mode, validated; a typo must not silently switch AI labelling off (or on)."""
    key = str(mode or "").strip().lower()
    if key not in FEEDBACK_MODES:
        raise ValueError(f"feedback mode must be one of {', '.join(FEEDBACK_MODES)}, got {mode!r}")
    return key


def current_feedback_mode(store, default: str) -> str:
    """The admin's choice if one was saved, else the configured default (read by the trainer every step)."""
    return check_feedback_mode(store.get_control(FEEDBACK_MODE_KEY, default) or default)


def set_feedback_mode(store, mode: str) -> str:
    mode = check_feedback_mode(mode)
    store.set_control(FEEDBACK_MODE_KEY, mode)
    return mode


# ---- constitution -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Constitution:
    """The principles as text; its version is a hash of the text, so every AI label names exactly what it used."""

    text: str
    path: Path | None = None

    @property
    def version(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]

    @property
    def principles(self) -> list[str]:
        """The list items (numbered or bulleted lines); the panel shows how many there are."""
        items = []
        for line in self.text.splitlines():
            stripped = line.strip()
            head, _, rest = stripped.partition(" ")
            if rest and (head in ("-", "*") or (head.endswith((".", ")")) and head[:-1].isdigit())):
                items.append(rest.strip())
        return items


def check_constitution_text(text: str) -> str:
    text = (text or "").replace("\r\n", "\n").strip()
    if not text:
        raise ValueError("the constitution is empty: write at least one principle")
    if len(text) > MAX_CONSTITUTION_CHARS:
        raise ValueError(f"the constitution has {len(text)} characters; keep it under {MAX_CONSTITUTION_CHARS} "
                         "so the judging prompt still has room for the answers")
    return text + "\n"


def load_constitution(cfg: FeedbackConfig, data_dir: str | Path) -> Constitution:
    """The admin's edit in the data folder if there is one, else the configured file, else the shipped default."""
    edited = Path(data_dir) / EDITED_CONSTITUTION
    path = edited if edited.is_file() else Path(cfg.constitution_file).expanduser() if cfg.constitution_file \
        else SHIPPED_CONSTITUTION
    if not path.is_file():
        raise FileNotFoundError(f"constitution file {path} not found (set --constitution-file to an existing file "
                                "or leave it empty for the shipped principles)")
    return Constitution(check_constitution_text(path.read_text(encoding="utf-8")), path)


def save_constitution(data_dir: str | Path, text: str) -> Constitution:
    """Write the admin's edit atomically: the trainer reads the file at any moment and must never see half of it."""
    text = check_constitution_text(text)
    folder = Path(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / EDITED_CONSTITUTION
    handle, tmp = tempfile.mkstemp(prefix=EDITED_CONSTITUTION + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Constitution(text, path)


# ---- the judge ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """Which answer the judge prefers, with P(A better).

    For the A/B method ``p_a`` averages both presentation orders; for the pointwise methods (contrastive,
    principles) each answer is scored alone, there is no slot to follow, and ``p_a = sigmoid(score_a - score_b)``.
    """

    p_a: float  # probability that answer A is better (order-averaged for "ab")
    p_a_shown_first: float  # "ab": single-order probability, answer A in the first slot; pointwise: = p_a
    p_a_shown_second: float  # "ab": single-order probability, answer A in the second slot; pointwise: = p_a
    choice: str | None  # "a", "b", or None: abstained, too close to call
    method: str = "ab"
    score_a: float = float("nan")  # pointwise methods: each answer's own score (higher = follows the principles)
    score_b: float = float("nan")

    @property
    def confidence(self) -> float:
        """0 for a coin flip, 1 for certainty."""
        return abs(self.p_a - 0.5) * 2

    @property
    def position_flip(self) -> bool:
        """The single-order verdicts disagree: the judge followed the slot, not the answer."""
        return (self.p_a_shown_first > 0.5) != (self.p_a_shown_second > 0.5)


def judge_label(judge_id: str, constitution: Constitution, method: str = "ab") -> str:
    """What a vote's ``judge`` column records: which judge, by which method, applying which principles.

    The A/B judge keeps its historical label ``<id>@<version>``; other methods are named: ``<id>/<method>@<version>``.
    """
    return f"{judge_id}@{constitution.version}" if method == "ab" else f"{judge_id}/{method}@{constitution.version}"


def check_judge_method(method: str) -> str:
    key = str(method or "").strip().lower()
    if key not in JUDGE_METHODS:
        raise ValueError(f"judge method must be one of {', '.join(JUDGE_METHODS)}, got {method!r}")
    return key


def _answer_token_ids(tokenizer, yes: str = "Yes", no: str = "No") -> tuple[list[int], list[int]]:
    """First tokens of "Yes" and "No", with and without a leading space, except any both words start with."""
    firsts = {word: {tokenizer.encode(text, add_special_tokens=False)[0] for text in (word, " " + word)}
              for word in (yes, no)}
    shared = firsts[yes] & firsts[no]
    yes_ids, no_ids = sorted(firsts[yes] - shared), sorted(firsts[no] - shared)
    if not yes_ids or not no_ids:
        raise ValueError("the judge's tokenizer cannot tell 'Yes' from 'No' by their first token")
    return yes_ids, no_ids


def _letter_token_ids(tokenizer, letter: str) -> list[int]:
    """Token ids that spell the letter alone, with or without a leading space (tokenizers differ)."""
    ids = {tuple(tokenizer.encode(text, add_special_tokens=False)) for text in (letter, " " + letter)}
    single = sorted(token[0] for token in ids if len(token) == 1)
    if not single:
        raise ValueError(f"the judge's tokenizer has no single token for {letter!r}")
    return single


class Judge:
    """Compares two answers to one conversation under a constitution, by one of ``JUDGE_METHODS``.

    ``base_context`` is entered around every forward pass: ``peft_model.disable_adapter`` turns the trainer's
    policy model into its own base for judging.

    Methods (measured against human votes in ``bench/judge.py``; README, "AI feedback", has the numbers):

    - ``contrastive`` (the default): each answer's score is how much more likely the model finds it after a
      system prompt stating the principles than after its neutral one, ``log P(answer | principles, chat) -
      log P(answer | chat)``, averaged per answer token (``contrastive_sum``: summed). The base model is the
      judge's only opinion; the principles only move it, so what is measured is the principles' effect.
    - ``principles``: for each answer alone and each principle, the log-odds of "Yes" after "Does the answer
      follow this principle?", summed over principles.
    - ``ab``: the model is shown both answers and asked "A or B?", in both orders, averaged.

    The pointwise methods never show the two answers together, so no slot can be preferred: swapping the
    answers swaps the scores and nothing else. Shared prefixes (the system prompt and the conversation) run
    once per judgement, with the KV cache, and only the answers and questions are run after them.
    """

    def __init__(self, model, tokenizer, constitution: Constitution, cfg: FeedbackConfig, judge_id: str,
                 base_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 method: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.constitution = constitution
        self.cfg = cfg
        self.judge_id = judge_id
        self.base_context = base_context
        self.method = check_judge_method(method or cfg.judge_method)
        self.a_ids = _letter_token_ids(tokenizer, "A")
        self.b_ids = _letter_token_ids(tokenizer, "B")
        self.yes_ids, self.no_ids = _answer_token_ids(tokenizer)
        # KV caches of the likelihood-ratio system prompts (the constitution is most of a judgement's tokens, and
        # it is the same in every judgement): token ids -> (cache, last logits). Few entries: one per family and
        # constitution version, so an edited constitution simply adds a key.
        self._head_caches: dict[tuple[int, ...], tuple[object, torch.Tensor] | None] = {}

    @property
    def label(self) -> str:
        return judge_label(self.judge_id, self.constitution, self.method)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- prompt -----------------------------------------------------------------------------------------------
    def _clip(self, text: str, max_tokens: int, keep_end: bool = False) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= max_tokens:
            return text
        kept = ids[-max_tokens:] if keep_end else ids[:max_tokens]
        return ("…" if keep_end else "") + self.tokenizer.decode(kept).strip() + ("" if keep_end else " …")

    def _render(self, turns: list[dict], first: str, second: str) -> list[int]:
        conversation = "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                                 for m in turns if m["role"] in ("user", "assistant"))
        request = (f"Principles:\n{self.constitution.text.strip()}\n\nConversation:\n{conversation}\n\n"
                   f"Answer A:\n{first}\n\nAnswer B:\n{second}\n\n{JUDGE_QUESTION}")
        chat = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": request}]
        return chat_ids(self.tokenizer, chat) + self.tokenizer.encode(ANSWER_CUE, add_special_tokens=False)

    def prompts(self, messages: list[dict], answer_a: str, answer_b: str) -> tuple[list[int], list[int]]:
        """Token ids of the A/B judging prompt in both orders (A first, B first), within ``judge_max_tokens``.

        Each answer keeps at most a quarter of the budget (its start, where the substance usually is); then the
        oldest turns go, never the last message, whose beginning is cut as a last resort.
        """
        budget = self.cfg.judge_max_tokens
        answer_a, answer_b = (self._clip(a.strip(), max(16, budget // 4)) for a in (answer_a, answer_b))
        turns = [dict(m) for m in messages]
        while True:
            rows = self._render(turns, answer_a, answer_b), self._render(turns, answer_b, answer_a)
            overflow = max(map(len, rows)) - budget
            if overflow <= 0:
                return rows
            if len(turns) > 1:
                turns = turns[1:]
                continue
            last = turns[-1]["content"]
            room = len(self.tokenizer.encode(last, add_special_tokens=False)) - overflow
            if room < 8:  # the principles and answers alone fill the budget: judge with what fits
                return rows
            turns = [{**turns[-1], "content": self._clip(last, room, keep_end=True)}]

    def recent_turns(self, messages: list[dict], max_tokens: int) -> list[dict]:
        """The conversation's latest turns within ``max_tokens`` (the last message's end kept, at worst)."""
        turns = [dict(m) for m in messages if m["role"] in ("user", "assistant", "system")]
        kept: list[dict] = []
        used = 0
        for turn in reversed(turns):
            size = len(self.tokenizer.encode(turn["content"], add_special_tokens=False)) + 4
            if kept and used + size > max_tokens:
                break
            if not kept and size > max_tokens:
                turn = {**turn, "content": self._clip(turn["content"], max(8, max_tokens - 4), keep_end=True)}
            kept.insert(0, turn)
            used += size
        return kept

    def answer_tokens(self, answer: str) -> list[int]:
        """The answer as the assistant turn the model would write: its start, then end-of-turn."""
        budget = max(16, self.cfg.judge_max_tokens // 6)
        ids = self.tokenizer.encode(answer.strip(), add_special_tokens=False)[:budget]
        end = end_of_turn_id(self.tokenizer)
        return ids + ([end] if end is not None else [])

    def contrastive_prefixes(self, messages: list[dict], family: str = "contrastive") -> tuple[list[int], list[int]]:
        """(principled, baseline) prompt ids: the same conversation after the principles' system prompt or after the
        family's baseline (``contrastive``: the neutral one; ``polar``: one that breaks the principles)."""
        turns = [m for m in self.recent_turns(messages, self.cfg.judge_max_tokens // 3) if m["role"] != "system"]
        principles = self.constitution.text.strip()
        principled = [{"role": "system", "content": CONTRASTIVE_SYSTEM.format(principles=principles)}]
        baseline = [{"role": "system", "content": RATIO_BASELINES[family].format(principles=principles)}]
        for system in (principled, baseline):
            self._remember_head(chat_ids(self.tokenizer, system, add_generation_prompt=False))
        return chat_ids(self.tokenizer, principled + turns), chat_ids(self.tokenizer, baseline + turns)

    def _remember_head(self, head: list[int]) -> None:
        """Mark a system prompt's ids as worth caching; its KV cache is computed on first use."""
        key = tuple(head)
        if key not in self._head_caches:
            if len(self._head_caches) >= 8:  # old constitutions' entries: drop the oldest
                self._head_caches.pop(next(iter(self._head_caches)))
            self._head_caches[key] = None

    def principle_rows(self, messages: list[dict], answer: str) -> tuple[list[int], list[list[int]]]:
        """(shared prefix, one suffix per principle): the question about each principle comes after the answer."""
        turns = self.recent_turns(messages, self.cfg.judge_max_tokens // 3)
        conversation = "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                                 for m in turns if m["role"] in ("user", "assistant"))
        answer = self._clip(answer.strip(), max(16, self.cfg.judge_max_tokens // 6))
        principles = self.constitution.principles or [self.constitution.text.strip()]
        rows = []
        for principle in principles:
            request = (f"Conversation:\n{conversation}\n\nThe assistant's next answer:\n{answer}\n\n"
                       + PRINCIPLE_QUESTION.format(principle=principle))
            rows.append(chat_ids(self.tokenizer, [{"role": "system", "content": PRINCIPLE_SYSTEM},
                                        {"role": "user", "content": request}]))
        shared = 0
        while all(len(r) > shared + 1 for r in rows) and len({r[shared] for r in rows}) == 1:
            shared += 1
        return rows[0][:shared], [r[shared:] for r in rows]

    # ---- forward passes ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def letter_margins(self, rows: list[list[int]]) -> torch.Tensor:
        """(N,) log P("A") - log P("B") at the end of each prompt, both letters' spellings pooled; one forward."""
        batch = self.tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
        input_ids, attention_mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        position_ids = padded_position_ids(attention_mask)  # (N, T)
        with self.base_context():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                logits_to_keep=1).logits[:, -1, :]  # (N, V)
        logprobs = logits.double().log_softmax(-1)  # (N, V)
        return (logprobs[:, self.a_ids].logsumexp(-1) - logprobs[:, self.b_ids].logsumexp(-1)).cpu()  # (N,)

    @torch.no_grad()
    def continuation_logprobs(self, prefix: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
        """Per continuation, (1 + len_i, V) next-token log-probs: after the prefix, then after each of its tokens.

        The prefix runs once and its KV cache is shared by all continuations (right-padded in one batch, so
        each real token sees exactly the prefix and its own earlier tokens). Row i's entry j is the distribution
        of continuation token j (j < len_i) or, at j = len_i, of the token after the whole continuation.
        """
        device, n = self.device, len(continuations)
        width = max(len(c) for c in continuations)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, width), pad, dtype=torch.long, device=device)  # (n, W)
        mask = torch.zeros(n, len(prefix) + width, dtype=torch.long, device=device)  # (n, P + W)
        mask[:, :len(prefix)] = 1
        for i, c in enumerate(continuations):
            ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, len(prefix):len(prefix) + len(c)] = 1
        position_ids = torch.arange(len(prefix), len(prefix) + width, device=device).expand(n, -1)  # (n, W)
        with self.base_context():
            cache, last_logits = self._prefix_cache(prefix)
            cache.batch_repeat_interleave(n)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                past_key_values=cache, use_cache=True).logits  # (n, W, V)
        first = last_logits.double().log_softmax(-1)  # (V,) the distribution of every continuation's start
        rest = logits.double().log_softmax(-1).cpu()  # (n, W, V)
        return [torch.cat([first.cpu()[None], rest[i, :len(c)]]) for i, c in enumerate(continuations)]

    def _prefix_cache(self, prefix: list[int]):
        """(KV cache of the prefix, logits after its last token), starting from a cached system prompt when the
        prefix begins with one (a copy: the forward passes after it append to the cache they are given)."""
        device = self.device
        head = max((k for k in self._head_caches if len(k) < len(prefix) and tuple(prefix[:len(k)]) == k),
                   key=len, default=None)
        if head is None:
            out = self.model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
            return out.past_key_values, out.logits[0, -1]
        if self._head_caches[head] is None:
            out = self.model(input_ids=torch.tensor([head], device=device), use_cache=True, logits_to_keep=1)
            self._head_caches[head] = (out.past_key_values, out.logits[0, -1])
        cache = copy.deepcopy(self._head_caches[head][0])
        rest = torch.tensor([prefix[len(head):]], device=device)
        positions = torch.arange(len(head), len(prefix), device=device)[None]
        out = self.model(input_ids=rest, position_ids=positions, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.past_key_values, out.logits[0, -1]

    def sequence_logprobs(self, prefix: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
        """(len_i,) log P(token j | prefix, tokens < j) of each continuation."""
        out = []
        for dist, c in zip(self.continuation_logprobs(prefix, continuations), continuations):
            out.append(dist[:len(c)].gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
        return out

    # ---- pointwise scores -------------------------------------------------------------------------------------
    def contrastive_scores(self, messages: list[dict], answers: list[str],
                           family: str = "contrastive") -> dict[str, list[float]]:
        """{"<family>_mean": per-token, "<family>_sum": summed} log-likelihood ratio of each answer, principled
        system prompt over the family's baseline (``RATIO_BASELINES``)."""
        rows = [self.answer_tokens(a) for a in answers]
        principled, baseline = self.contrastive_prefixes(messages, family)
        with_principles = self.sequence_logprobs(principled, rows)
        without = self.sequence_logprobs(baseline, rows)
        ratios = [(p - q) for p, q in zip(with_principles, without)]  # (len_i,) per-token log ratio
        return {f"{family}_mean": [float(r.mean()) for r in ratios],
                f"{family}_sum": [float(r.sum()) for r in ratios]}

    def principle_scores(self, messages: list[dict], answers: list[str]) -> list[float]:
        """Per answer, the sum over principles of log P(Yes) - log P(No) (both spellings pooled)."""
        scores = []
        for answer in answers:
            prefix, suffixes = self.principle_rows(messages, answer)
            dists = self.continuation_logprobs(prefix, suffixes)
            scores.append(sum(float(d[len(s)][self.yes_ids].logsumexp(-1) - d[len(s)][self.no_ids].logsumexp(-1))
                              for d, s in zip(dists, suffixes)))
        return scores

    def pointwise_scores(self, messages: list[dict], answers: list[str], method: str) -> list[float]:
        if method == "principles":
            return self.principle_scores(messages, answers)
        return self.contrastive_scores(messages, answers, family=method.rsplit("_", 1)[0])[method]

    # ---- verdicts ---------------------------------------------------------------------------------------------
    def _decide(self, p_a: float) -> str | None:
        distance = abs(p_a - 0.5)
        return None if math.isnan(p_a) or distance == 0 or distance < self.cfg.judge_margin \
            else "a" if p_a > 0.5 else "b"

    def judge(self, messages: list[dict], answer_a: str, answer_b: str) -> Verdict:
        """The verdict of this judge's method; swapping the answers gives exactly ``1 - p`` for every method."""
        if self.method == "ab":
            return self.judge_ab(messages, answer_a, answer_b)
        return self.verdict_from_scores(*self.canonical_scores(messages, answer_a, answer_b, self.method))

    def canonical_scores(self, messages, answer_a: str, answer_b: str, method: str) -> tuple[float, float, str]:
        """(score_a, score_b, method), computed in an order fixed by the answers' text, not by which one is A,
        so judging (b, a) runs the identical batches and returns exactly the swapped scores."""
        canonical = answer_a <= answer_b
        scores = self.pointwise_scores(messages, [answer_a, answer_b] if canonical else [answer_b, answer_a], method)
        return (scores[0], scores[1], method) if canonical else (scores[1], scores[0], method)

    def verdict_from_scores(self, score_a: float, score_b: float, method: str) -> Verdict:
        diff = score_a - score_b
        p_a = 0.5 if diff == 0 else 1 / (1 + math.exp(-max(-700.0, min(700.0, diff))))
        return Verdict(p_a=p_a, p_a_shown_first=p_a, p_a_shown_second=p_a, choice=self._decide(p_a),
                       method=method, score_a=score_a, score_b=score_b)

    def judge_ab(self, messages: list[dict], answer_a: str, answer_b: str) -> Verdict:
        """P(A better) = mean of P(A | A shown first) and P(A | A shown second).

        The two prompts go into the batch in an order fixed by the answers' text, not by which one is called A,
        so judging (b, a) runs the identical batch and returns exactly 1 - p.
        """
        a_first, b_first = self.prompts(messages, answer_a, answer_b)
        canonical = answer_a <= answer_b
        margins = self.letter_margins([a_first, b_first] if canonical else [b_first, a_first])  # (2,)
        margin_a_first, margin_b_first = (margins[0], margins[1]) if canonical else (margins[1], margins[0])
        p_first = float(torch.sigmoid(margin_a_first))  # "A" said while A is in the first slot
        p_second = float(torch.sigmoid(-margin_b_first))  # "B" said while A is in the second slot
        p_a = (p_first + p_second) / 2
        return Verdict(p_a=p_a, p_a_shown_first=p_first, p_a_shown_second=p_second, choice=self._decide(p_a),
                       method="ab")


# ---- how much an AI label counts ------------------------------------------------------------------------------

# Accuracy of each method of the embedded judge on held-out human pairs (HH-RLHF harmless, bench/judge.py; the
# README's "AI feedback" section has the run and the command): the prior for the weight. "ab" scored 0.50 on 100
# pairs; contrastive_mean 0.557 [0.510, 0.603] and contrastive_sum 0.535 on 400 pairs (fp32, below the 0.576 of
# "prefer the shorter answer"). The prior stays at chance for every method: 0.557 is not shown to carry signal beyond
# length, so AI labels earn weight only through live agreement with people. On 60 pairs of the 2-core CPU
# (bench/results/judge_methods_cpu.json): contrastive 0.567, polar_mean 0.483, polar_sum 0.533, principles 0.55,
# ab 0.50; a reward model on 74 RLCD pairs 0.56 against 0.60 on as many human pairs.
MEASURED_ACCURACY = {"contrastive_mean": 0.5, "contrastive_sum": 0.5, "polar_mean": 0.5, "polar_sum": 0.5,
                     "principles": 0.5, "ab": 0.5}
PRIOR_PAIRS = 20  # the bench's figure counts as this many pairs of live human-AI agreement
MIN_AI_WEIGHT = 0.02  # never 0: the reward loss divides by the summed weights of a batch


def ai_label_weight(method: str, agree: int = 0, pairs: int = 0, cap: float = 1.0) -> float:
    """Weight of an AI label in the reward loss relative to a human vote (1), from the judge's measured accuracy.

    The accuracy q is the bench's figure for this method, updated by how often the judge agreed with people on
    the pairs both labelled (a Beta posterior with the bench worth ``PRIOR_PAIRS`` pairs). The weight is
    ``2q - 1``: a label right with probability q points the right way on average by 2q - 1 of a correct label,
    so a coin-flip judge adds (almost) nothing and a perfect one counts as a person.
    """
    prior = MEASURED_ACCURACY.get(method, 0.5)
    q = (agree + prior * PRIOR_PAIRS) / (pairs + PRIOR_PAIRS)
    return max(MIN_AI_WEIGHT, min(cap, 2 * q - 1))


def load_judge_model(name: str, quantization: str):
    """A separately configured judge (hub id or folder): (model, tokenizer), frozen, for inference only."""
    from rlhf_online.models import load_base_model, load_tokenizer

    return load_base_model(name, quantization, for_training=False).model, load_tokenizer(name)

"""AI feedback from written principles (Constitutional AI, Bai et al. 2022, arXiv:2212.08073; RLAIF).

Human votes are scarce, so a model can label some pairs by judging them against a short written constitution.
Those labels are a second, clearly separated source of preferences: the store records each one as a vote with
source ``ai``, the judge's id and the constitution's version, and the reward model learns it with a lower weight.

The judge reads a next-token distribution instead of generating text: after a judging prompt it compares the
probability of the letters "A" and "B". Small models prefer whichever answer is shown first (or second), so both
presentation orders are scored in one batched forward and averaged, which makes the verdict symmetric by
construction: swapping the two answers gives exactly ``1 - p``.

The default judge is the policy's own base model with its adapters disabled (``peft_model.disable_adapter``), so
no second model is loaded; any other local or hub model can be named with ``--judge-model``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_online.config import FeedbackConfig

FEEDBACK_MODES = ("human", "ai", "mixed")
FEEDBACK_MODE_KEY = "feedback_mode"  # the admin's run-time choice, in the store's control table
SHIPPED_CONSTITUTION = Path(__file__).with_name("constitution.md")
EDITED_CONSTITUTION = "constitution.md"  # inside the data folder: the admin's edit, which takes precedence
MAX_CONSTITUTION_CHARS = 4000  # a few hundred tokens of principles; longer would crowd out the answers
BASE_JUDGE_PREFIX = "base:"  # judge id of the default judge: "base:<model>" (the base without adapters)

JUDGE_SYSTEM = ("You are an impartial judge. You compare two answers that an AI assistant gave to the same "
                "conversation and decide which one better follows the principles.")
JUDGE_QUESTION = "Which answer better follows the principles? Reply with one letter: A or B."
ANSWER_CUE = "The better answer is Answer"  # the assistant turn starts with this, so the next token is the letter


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
    """Which answer the judge prefers, from P(A better) averaged over both presentation orders."""

    p_a: float  # order-averaged probability that answer A is better
    p_a_shown_first: float  # single-order probability, answer A in the first slot
    p_a_shown_second: float  # single-order probability, answer A in the second slot
    choice: str | None  # "a", "b", or None: abstained, too close to call

    @property
    def confidence(self) -> float:
        """0 for a coin flip, 1 for certainty."""
        return abs(self.p_a - 0.5) * 2

    @property
    def position_flip(self) -> bool:
        """The single-order verdicts disagree: the judge followed the slot, not the answer."""
        return (self.p_a_shown_first > 0.5) != (self.p_a_shown_second > 0.5)


def judge_label(judge_id: str, constitution: Constitution) -> str:
    """What a vote's ``judge`` column records: which judge, applying which principles."""
    return f"{judge_id}@{constitution.version}"


def _letter_token_ids(tokenizer, letter: str) -> list[int]:
    """Token ids that spell the letter alone, with or without a leading space (tokenizers differ)."""
    ids = {tuple(tokenizer.encode(text, add_special_tokens=False)) for text in (letter, " " + letter)}
    single = sorted(token[0] for token in ids if len(token) == 1)
    if not single:
        raise ValueError(f"the judge's tokenizer has no single token for {letter!r}")
    return single


class Judge:
    """Compares two answers to one conversation under a constitution.

    ``base_context`` is entered around every forward pass: ``peft_model.disable_adapter`` turns the trainer's
    policy model into its own base for judging.
    """

    def __init__(self, model, tokenizer, constitution: Constitution, cfg: FeedbackConfig, judge_id: str,
                 base_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model = model
        self.tokenizer = tokenizer
        self.constitution = constitution
        self.cfg = cfg
        self.judge_id = judge_id
        self.base_context = base_context
        self.a_ids = _letter_token_ids(tokenizer, "A")
        self.b_ids = _letter_token_ids(tokenizer, "B")

    @property
    def label(self) -> str:
        return judge_label(self.judge_id, self.constitution)

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
        out = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        return ids + self.tokenizer.encode(ANSWER_CUE, add_special_tokens=False)

    def prompts(self, messages: list[dict], answer_a: str, answer_b: str) -> tuple[list[int], list[int]]:
        """Token ids of the judging prompt in both orders (A first, B first), within ``judge_max_tokens``.

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

    # ---- scoring ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def letter_margins(self, rows: list[list[int]]) -> torch.Tensor:
        """(N,) log P("A") - log P("B") at the end of each prompt, both letters' spellings pooled; one forward."""
        batch = self.tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
        device = next(self.model.parameters()).device
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (N, T)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (N, T) left padding aware, as generate()
        with self.base_context():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                logits_to_keep=1).logits[:, -1, :]  # (N, V)
        logprobs = logits.double().log_softmax(-1)  # (N, V)
        return (logprobs[:, self.a_ids].logsumexp(-1) - logprobs[:, self.b_ids].logsumexp(-1)).cpu()  # (N,)

    def judge(self, messages: list[dict], answer_a: str, answer_b: str) -> Verdict:
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
        distance = abs(p_a - 0.5)
        choice = None if math.isnan(p_a) or distance == 0 or distance < self.cfg.judge_margin \
            else "a" if p_a > 0.5 else "b"
        return Verdict(p_a=p_a, p_a_shown_first=p_first, p_a_shown_second=p_second, choice=choice)


def load_judge_model(name: str, quantization: str):
    """A separately configured judge (hub id or folder): (model, tokenizer), frozen, for inference only."""
    from rlhf_online.models import load_base_model, load_tokenizer

    return load_base_model(name, quantization, for_training=False).model, load_tokenizer(name)

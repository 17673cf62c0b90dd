"""Hidden preferences for the simulated-user benchmark: `oracle(messages, answer) -> float`, higher wins.

Each is a simple, checkable taste a real person might have; none looks at the data it is run on.
"""

from __future__ import annotations

import re


def is_prose(text: str) -> bool:
    """Mostly letters and spaces: what any reader requires before judging anything else (emoji spam is not)."""
    return bool(text) and sum(c.isalpha() or c.isspace() for c in text) >= 0.7 * len(text)


def concise(messages: list[dict], answer: str) -> float:
    """Prefers shorter answers (fewer characters) among readable ones; empty or non-prose answers are worst."""
    text = answer.strip()
    return -1e6 if not is_prose(text) else -float(len(text))


def fewest_words(messages: list[dict], answer: str) -> float:
    """Prefers fewer whitespace-separated words: a gameable taste, kept to demonstrate reward hacking.

    Measured: with it, PPO learned to emit 32 emoji and no space (KL 12 nats), which "wins" 100% of comparisons
    against the base while being garbage to any real person.
    """
    words = len(answer.split())
    return -1000.0 if words == 0 else -float(words)


def enthusiastic(messages: list[dict], answer: str) -> float:
    """Prefers an upbeat tone: exclamation marks and warm words, per answer (not per token)."""
    warm = len(re.findall(r"\b(great|happy|glad|love|wonderful|amazing|enjoy|fun|sure)\b", answer, re.I))
    return min(answer.count("!"), 3) + warm


def mentions_you(messages: list[dict], answer: str) -> float:
    """Prefers answers that address the person directly ("you", "your")."""
    return float(len(re.findall(r"\byou(r|rs)?\b", answer, re.I)))


def no_lists(messages: list[dict], answer: str) -> float:
    """Prefers prose over bullet or numbered lists."""
    return -float(len(re.findall(r"^\s*([-*•]|\d+[.)])\s", answer, re.M)))

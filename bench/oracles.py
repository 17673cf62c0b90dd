"""Hidden preferences for the simulated-user benchmark: `oracle(messages, answer) -> float`, higher wins.

Each is a simple, checkable taste a real person might have; none looks at the data it is run on.
"""

from __future__ import annotations

import re


def concise(messages: list[dict], answer: str) -> float:
    """Prefers shorter answers (fewer words), but an empty answer is worst."""
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

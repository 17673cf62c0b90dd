"""Pure helpers about chat message lists.

The store, the exporter and the trainers all exchange conversations as plain ``[{"role", "content"}]`` lists
(the chat-template / TRL conversational shape). Data arrives in other shapes too — Anthropic HH raw text, TRL
records whose answers are one-message lists — so every entry point funnels through these functions and the
rest of the code can trust what it stores.
"""

from __future__ import annotations

import re
from typing import Any

Message = dict[str, str]

ROLES = ("system", "user", "assistant")

# A turn marker only counts at the start of the text or after a blank line, as in the HH files; "Human:" inside
# a sentence is ordinary content.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_HH_LAST_ASSISTANT = "\n\nAssistant:"


def parse_hh_prompt(text: str) -> list[Message]:
    """Turn Anthropic HH raw text into messages.

    HH prompts end with an empty ``Assistant:`` cue for the model to complete; that cue is not a turn, so it is
    dropped. Anything before the first turn marker would silently lose meaning, so it is refused.
    """
    if not isinstance(text, str):
        raise ValueError(f"HH prompt must be text, got {type(text).__name__}")
    body = text.strip()
    parts = _HH_TURN.split(body)
    preamble, markers = parts[0], parts[1:]
    if "Human" not in markers[0::2]:
        raise ValueError("HH prompt has no 'Human:' turn (expected '\\n\\nHuman: ...\\n\\nAssistant:')")
    if preamble.strip():
        raise ValueError(f"HH prompt has text before its first turn: {preamble.strip()[:60]!r}")
    messages = [{"role": _HH_ROLE[speaker], "content": content.strip()}
                for speaker, content in zip(markers[0::2], markers[1::2])]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Split a full HH transcript into (prompt text ending with the ``Assistant:`` cue, final answer).

    The original HH release has no separate prompt field: chosen and rejected are whole transcripts that share
    everything up to the last assistant turn.
    """
    cut = text.rfind(_HH_LAST_ASSISTANT)
    if cut < 0:
        raise ValueError("HH transcript has no '\\n\\nAssistant:' turn")
    end = cut + len(_HH_LAST_ASSISTANT)
    return text[:end], text[end:].strip()


def validate_messages(messages: Any) -> None:
    """Refuse message lists a chat template would choke on, with a message naming the bad entry."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got "
                             f"{type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {index} content must be a string, got "
                             f"{type(message.get('content')).__name__}")


def normalize_prompt(prompt: Any) -> list[Message]:
    """Accept HH raw text or a message list and return fresh ``{role, content}`` dicts.

    Fresh copies with only the two keys keep stored JSON uniform (so equal conversations compare equal) and
    keep callers from mutating what was stored.
    """
    if isinstance(prompt, str):
        return parse_hh_prompt(prompt)
    if isinstance(prompt, list):
        validate_messages(prompt)
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError(f"prompt must be HH text or a list of messages, got {type(prompt).__name__}")


def answer_text(answer: Any) -> str:
    """The assistant text of an answer given as a string or as a TRL one-message list.

    TRL's conversational preference format wraps each answer as ``[{"role": "assistant", "content": ...}]``;
    HH gives it as raw text with a leading space. Both become stripped text, and an empty answer is refused
    because it teaches the reward model nothing.
    """
    if isinstance(answer, str):
        text = answer.strip()
    elif isinstance(answer, list):
        validate_messages(answer)
        if answer[-1]["role"] != "assistant":
            raise ValueError("answer message list must end with an assistant message")
        text = answer[-1]["content"].strip()
    else:
        raise ValueError(f"answer must be text or a list of messages, got {type(answer).__name__}")
    if not text:
        raise ValueError("answer is empty")
    return text

import json
from pathlib import Path

import pytest

from rlhf_online.conversation import (answer_text, normalize_prompt, parse_hh_prompt, split_hh_transcript,
                                      validate_messages)

HH_DEV = Path(__file__).resolve().parents[2] / "shared/data/hh_harmless_dev.jsonl"


def hh_rows():
    if not HH_DEV.is_file():
        pytest.skip(f"HH dev data not found at {HH_DEV} (expected in the shared/ folder next to the project)")
    with HH_DEV.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_multi_turn_hh_prompt_becomes_alternating_messages_without_the_empty_cue():
    text = "\n\nHuman: Hi there\n\nAssistant:  Hello! \n\nHuman: Tell me a joke.\n\nAssistant:"
    assert parse_hh_prompt(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
    ]


def test_hh_prompt_without_leading_blank_line_or_with_surrounding_whitespace_parses_the_same():
    expected = [{"role": "user", "content": "Why is the sky blue?"}]
    assert parse_hh_prompt("Human: Why is the sky blue?\n\nAssistant:") == expected
    assert parse_hh_prompt("  \n\nHuman: Why is the sky blue?\n\nAssistant:  \n") == expected


def test_turn_marker_words_inside_a_sentence_stay_content():
    text = "\n\nHuman: Write 'Human: hi' and Assistant: there\n\nAssistant:"
    assert parse_hh_prompt(text) == [{"role": "user", "content": "Write 'Human: hi' and Assistant: there"}]


@pytest.mark.parametrize("text", ["", "just some words", "\n\nAssistant: only the bot talks"])
def test_text_without_a_human_turn_is_refused_with_a_clear_message(text):
    with pytest.raises(ValueError, match="no 'Human:' turn"):
        parse_hh_prompt(text)


def test_every_prompt_of_the_hh_dev_set_parses_to_a_conversation_ending_with_the_user():
    rows = hh_rows()
    for row in rows:
        messages = parse_hh_prompt(row["prompt"])
        assert messages[0]["role"] == "user"
        assert messages[-1]["role"] == "user"
        assert all(m["content"] == m["content"].strip() for m in messages)
    multi_turn = [row for row in rows if len(parse_hh_prompt(row["prompt"])) > 1]
    assert multi_turn, "the dev set should contain multi-turn conversations"


def test_full_hh_transcript_splits_into_prompt_and_final_answer():
    prompt, answer = split_hh_transcript("\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Bye\n\nAssistant: See you")
    assert answer == "See you"
    assert parse_hh_prompt(prompt) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                                       {"role": "user", "content": "Bye"}]


def test_normalize_prompt_accepts_message_lists_and_returns_independent_copies():
    original = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "x"}]
    normalized = normalize_prompt(original)
    assert normalized == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    normalized[0]["content"] = "changed"
    assert original[0]["content"] == "Be brief."


def test_normalize_prompt_accepts_hh_text():
    assert normalize_prompt("\n\nHuman: Hi\n\nAssistant:") == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([], "must not be empty"),
    (["hi"], "must be a dict"),
    (42, "HH text or a list of messages"),
])
def test_normalize_prompt_refuses_malformed_input_naming_the_problem(prompt, message):
    with pytest.raises(ValueError, match=message):
        normalize_prompt(prompt)


def test_validate_messages_accepts_all_three_roles():
    validate_messages([{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a"}])


def test_answer_text_reads_hh_text_and_trl_message_lists_alike():
    assert answer_text(" Sure, here you go.") == "Sure, here you go."
    assert answer_text([{"role": "assistant", "content": "Sure."}]) == "Sure."
    with pytest.raises(ValueError, match="empty"):
        answer_text("   ")
    with pytest.raises(ValueError, match="end with an assistant"):
        answer_text([{"role": "user", "content": "not an answer"}])

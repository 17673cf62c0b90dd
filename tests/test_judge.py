"""The AI judge on the tiny model: valid verdicts, order symmetry by construction, the right logits (padding and
positions included), the base model under the policy adapter as the default judge, and the constitution file."""

import contextlib

import pytest
import torch

from rlhf_online import models
from rlhf_online.config import FeedbackConfig, ModelConfig
from rlhf_online.judge import (MAX_CONSTITUTION_CHARS, SHIPPED_CONSTITUTION, Constitution, Judge,
                               current_feedback_mode, judge_label, load_constitution, save_constitution,
                               set_feedback_mode)
from rlhf_online.store import PreferenceStore, store_path

CONSTITUTION = Constitution("1. Be helpful.\n2. Be honest.\n- Be kind.\n")
CHAT = [{"role": "user", "content": "What is two plus two?"}]
PAIRS = [("It is four.", "hello"), ("Paris.", "Rayleigh scattering, banana."), ("banana", "I am fine, thank you.")]
SWAP = {"a": "b", "b": "a", None: None}

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return models.load_base_model(str(tiny_model_dir), "fp32").model


def make_judge(model, tokenizer, margin=0.0, max_tokens=768, **kwargs):
    cfg = FeedbackConfig(judge_margin=margin, judge_max_tokens=max_tokens)
    return Judge(model, tokenizer, CONSTITUTION, cfg, judge_id="base:tiny", **kwargs)


def unpadded_margin(model, tokenizer, row, judge) -> float:
    """log P(A) - log P(B) from a forward of this one prompt alone: no padding, default positions."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([row])).logits[0, -1].double().log_softmax(-1)
    return float(logprobs[judge.a_ids].logsumexp(-1) - logprobs[judge.b_ids].logsumexp(-1))


def test_verdict_is_valid_and_swapping_the_answers_gives_exactly_one_minus_p(base, tokenizer):
    judge = make_judge(base, tokenizer)
    for answer_a, answer_b in PAIRS:
        verdict, swapped = judge.judge(CHAT, answer_a, answer_b), judge.judge(CHAT, answer_b, answer_a)
        assert verdict.choice in ("a", "b") and 0.0 < verdict.p_a < 1.0 and 0.0 <= verdict.confidence <= 1.0
        assert verdict.choice == ("a" if verdict.p_a > 0.5 else "b")
        assert verdict.p_a == pytest.approx((verdict.p_a_shown_first + verdict.p_a_shown_second) / 2, abs=1e-15)
        assert verdict.p_a + swapped.p_a == pytest.approx(1.0, abs=1e-12)
        assert swapped.choice == SWAP[verdict.choice]
        assert swapped.p_a_shown_first == pytest.approx(1 - verdict.p_a_shown_second, abs=1e-12)
    identical = judge.judge(CHAT, "It is four.", "It is four.")
    assert identical.p_a == pytest.approx(0.5, abs=1e-9) and identical.choice is None


def test_single_order_probabilities_equal_separate_unpadded_forwards(base, tokenizer):
    judge = make_judge(base, tokenizer)
    answer_a, answer_b = PAIRS[1]
    a_first, b_first = judge.prompts(CHAT, answer_a, answer_b)
    verdict = judge.judge(CHAT, answer_a, answer_b)
    margin_a_first = unpadded_margin(base, tokenizer, a_first, judge)
    margin_b_first = unpadded_margin(base, tokenizer, b_first, judge)
    assert verdict.p_a_shown_first == pytest.approx(float(torch.sigmoid(torch.tensor(margin_a_first))), abs=1e-5)
    assert verdict.p_a_shown_second == pytest.approx(float(torch.sigmoid(torch.tensor(-margin_b_first))), abs=1e-5)
    # Rows of very different lengths in one batch: left padding and positions must not change any row.
    long_chat = CHAT + [{"role": "assistant", "content": "It is four."},
                        {"role": "user", "content": "Why is the sky blue? " * 8}]
    long_row = judge.prompts(long_chat, answer_a, answer_b)[0]
    assert len(long_row) > len(a_first) + 20
    batched = judge.letter_margins([a_first, long_row])
    assert batched.tolist() == pytest.approx([margin_a_first, unpadded_margin(base, tokenizer, long_row, judge)],
                                             abs=1e-5)


def test_default_judge_is_the_base_model_with_the_policy_adapter_disabled(tiny_model_dir, base, tokenizer):
    policy_base = models.load_base_model(str(tiny_model_dir), "nf4", for_training=True).model
    peft = models.attach_lora(policy_base, ModelConfig(lora_r=8, lora_alpha=16))
    with torch.no_grad():  # a policy adapter far from the identity, so judging through it would show
        for name, p in models.lora_parameters(peft, models.POLICY_ADAPTER).items():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = tokenizer(["hello how are you today?"], return_tensors="pt")
    with torch.no_grad():
        policy_before = peft(**batch).logits
    base_judge = make_judge(peft, tokenizer, base_context=peft.disable_adapter)
    plain_nf4 = models.load_base_model(str(tiny_model_dir), "nf4", for_training=True).model
    reference, through_policy = make_judge(plain_nf4, tokenizer), make_judge(peft, tokenizer)
    for answer_a, answer_b in PAIRS:
        p_base = base_judge.judge(CHAT, answer_a, answer_b).p_a
        assert p_base == pytest.approx(reference.judge(CHAT, answer_a, answer_b).p_a, abs=1e-6)
        assert abs(p_base - through_policy.judge(CHAT, answer_a, answer_b).p_a) > 1e-4
    with torch.no_grad():  # judging left the policy adapter on
        torch.testing.assert_close(peft(**batch).logits, policy_before, rtol=0, atol=0)


def test_the_judge_abstains_when_the_two_orders_do_not_agree_clearly(base, tokenizer):
    decisive, cautious = make_judge(base, tokenizer, margin=0.0), make_judge(base, tokenizer, margin=0.5)
    for answer_a, answer_b in PAIRS:
        verdict = decisive.judge(CHAT, answer_a, answer_b)
        assert verdict.choice is not None
        assert cautious.judge(CHAT, answer_a, answer_b).choice is None  # |p - 0.5| < 0.5 always
        threshold = make_judge(base, tokenizer, margin=abs(verdict.p_a - 0.5) + 1e-9)
        assert threshold.judge(CHAT, answer_a, answer_b).choice is None


def test_prompt_holds_principles_conversation_and_answers_within_the_budget(base, tokenizer):
    judge = make_judge(base, tokenizer, max_tokens=400)
    a_first, b_first = judge.prompts(CHAT, "It is four.", "hello")
    text = tokenizer.decode(a_first)
    assert "1. Be helpful." in text and "User: What is two plus two?" in text
    assert text.index("Answer A:\nIt is four.") < text.index("Answer B:\nhello")
    assert text.rstrip().endswith("The better answer is Answer")
    assert tokenizer.decode(b_first).index("Answer A:\nhello") > 0

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "banana " * 20}
             for i in range(12)] + [{"role": "user", "content": "The last question?"}]
    long_answer = "Paris. " * 300
    for row in judge.prompts(turns, long_answer, "hello"):
        text = tokenizer.decode(row)
        assert len(row) <= 400
        assert "The last question?" in text and "turn 0:" not in text  # oldest turns go first
        assert ":\nhello\n" in text and "Paris. Paris." in text  # the long answer keeps its start
    verdict = judge.judge(turns, long_answer, "hello")
    assert verdict.choice in ("a", "b")


def test_shipped_constitution_and_the_admins_edit(tmp_path):
    shipped = load_constitution(FeedbackConfig(), tmp_path)
    assert shipped.path == SHIPPED_CONSTITUTION
    assert 5 <= len(shipped.principles) <= 8
    assert len(shipped.version) == 12 and int(shipped.version, 16) >= 0

    edited = save_constitution(tmp_path, "1. Answer in French.\r\n2. Be brief.\n\n")
    assert (tmp_path / "constitution.md").read_text() == "1. Answer in French.\n2. Be brief.\n"
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    loaded = load_constitution(FeedbackConfig(), tmp_path)
    assert loaded.text == edited.text and loaded.version == edited.version != shipped.version
    assert loaded.principles == ["Answer in French.", "Be brief."]
    assert judge_label("base:embedded", loaded) == f"base:embedded@{loaded.version}"

    for bad, message in (("  \n", "empty"), ("x" * (MAX_CONSTITUTION_CHARS + 1), "characters")):
        with pytest.raises(ValueError, match=message):
            save_constitution(tmp_path, bad)
    assert load_constitution(FeedbackConfig(), tmp_path).version == edited.version  # nothing was lost


def test_configured_constitution_file_and_a_missing_one(tmp_path):
    custom = tmp_path / "mine.md"
    custom.write_text("- Always mention bananas.\n")
    cfg = FeedbackConfig(constitution_file=str(custom))
    assert load_constitution(cfg, tmp_path / "data").principles == ["Always mention bananas."]
    with pytest.raises(FileNotFoundError, match="--constitution-file"):
        load_constitution(FeedbackConfig(constitution_file=str(tmp_path / "gone.md")), tmp_path / "data")


def test_feedback_mode_is_kept_in_the_store_and_checked(tmp_path):
    with PreferenceStore(store_path(tmp_path)) as store:
        assert current_feedback_mode(store, "human") == "human"
        assert set_feedback_mode(store, " Mixed ") == "mixed"
        assert current_feedback_mode(store, "human") == "mixed"
        with pytest.raises(ValueError, match="human, ai, mixed"):
            set_feedback_mode(store, "robots")
        assert current_feedback_mode(store, "human") == "mixed"


def test_letters_must_be_single_tokens(base, tokenizer):
    class NoLetters:
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(ValueError, match="single token"):
        Judge(base, NoLetters(), CONSTITUTION, FeedbackConfig(), judge_id="x", base_context=contextlib.nullcontext)

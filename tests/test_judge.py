"""The AI judge on the tiny model: valid verdicts, order symmetry by construction for every method, the right
logits (padding, positions and the shared-prefix KV cache included), a constitution that prefers a marker word
making the default (contrastive) judge prefer answers with it, the base model under the policy adapter as the
default judge, the AI label's weight, and the constitution file."""

import contextlib
import math

import pytest
import torch

from rlhf_online import models
from rlhf_online.config import FeedbackConfig, ModelConfig
from rlhf_online.judge import (CONTRASTIVE_SYSTEM, JUDGE_METHODS, MAX_CONSTITUTION_CHARS, MEASURED_ACCURACY,
                               MIN_AI_WEIGHT, NEUTRAL_SYSTEM, SHIPPED_CONSTITUTION, VIOLATING_SYSTEM, Constitution, Judge,
                               ai_label_weight, current_feedback_mode, judge_label, load_constitution,
                               save_constitution, set_feedback_mode)
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


def make_judge(model, tokenizer, margin=0.0, max_tokens=768, method="ab", constitution=CONSTITUTION, **kwargs):
    cfg = FeedbackConfig(judge_margin=margin, judge_max_tokens=max_tokens)
    return Judge(model, tokenizer, constitution, cfg, judge_id="base:tiny", method=method, **kwargs)


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


@pytest.mark.parametrize("method", ["ab", FeedbackConfig().judge_method])
def test_default_judge_is_the_base_model_with_the_policy_adapter_disabled(tiny_model_dir, base, tokenizer, method):
    policy_base = models.load_base_model(str(tiny_model_dir), "nf4", for_training=True).model
    peft = models.attach_lora(policy_base, ModelConfig(lora_r=8, lora_alpha=16))
    with torch.no_grad():  # a policy adapter far from the identity, so judging through it would show
        for name, p in models.lora_parameters(peft, models.POLICY_ADAPTER).items():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = tokenizer(["hello how are you today?"], return_tensors="pt")
    with torch.no_grad():
        policy_before = peft(**batch).logits
    base_judge = make_judge(peft, tokenizer, method=method, base_context=peft.disable_adapter)
    plain_nf4 = models.load_base_model(str(tiny_model_dir), "nf4", for_training=True).model
    reference, through_policy = make_judge(plain_nf4, tokenizer, method=method), make_judge(peft, tokenizer, method=method)
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
    verdict = judge.judge(turns, long_answer, "hello")  # judged on exactly the trimmed prompts checked above
    a_first, b_first = judge.prompts(turns, long_answer, "hello")
    assert verdict.p_a_shown_first == pytest.approx(
        1 / (1 + math.exp(-unpadded_margin(base, tokenizer, a_first, judge))), abs=1e-6)
    assert verdict.p_a_shown_second == pytest.approx(
        1 / (1 + math.exp(unpadded_margin(base, tokenizer, b_first, judge))), abs=1e-6)


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
    assert judge_label("base:embedded", loaded, "principles") == f"base:embedded/principles@{loaded.version}"

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


# ---- pointwise methods: contrastive likelihood and per-principle yes/no -------------------------------------------

POINTWISE = [m for m in JUDGE_METHODS if m != "ab"]


@pytest.mark.parametrize("method", POINTWISE)
def test_pointwise_verdicts_have_no_position_swapping_swaps_the_scores_exactly(base, tokenizer, method):
    judge = make_judge(base, tokenizer, method=method)
    assert judge.label == f"base:tiny/{method}@{CONSTITUTION.version}"
    for answer_a, answer_b in PAIRS:
        verdict, swapped = judge.judge(CHAT, answer_a, answer_b), judge.judge(CHAT, answer_b, answer_a)
        assert verdict.method == method and verdict.choice in ("a", "b") and not verdict.position_flip
        assert (swapped.score_a, swapped.score_b) == (verdict.score_b, verdict.score_a)  # bit for bit
        assert verdict.p_a + swapped.p_a == pytest.approx(1.0, abs=1e-12) and swapped.choice == SWAP[verdict.choice]
        assert verdict.choice == ("a" if verdict.score_a > verdict.score_b else "b")
    identical = judge.judge(CHAT, "It is four.", "It is four.")
    assert identical.p_a == 0.5 and identical.choice is None


def full_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len - 1,) log P(token t | tokens < t) from one plain forward of the whole sequence."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return logprobs[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_shared_prefix_scoring_equals_separate_full_forwards(base, tokenizer):
    """The KV-cached prefix with right-padded continuations of different lengths gives each continuation the
    log-probs a separate, unpadded forward of prefix + continuation gives, also when the prefix starts from the
    cached KV of its system prompt (the constitution), reused across judgements."""
    judge = make_judge(base, tokenizer, method="contrastive_mean")
    principled, neutral = judge.contrastive_prefixes(CHAT)
    assert len(principled) > len(neutral)
    assert "1. Be helpful." in tokenizer.decode(principled) and "1. Be helpful." not in tokenizer.decode(neutral)
    rows = [judge.answer_tokens(a) for a in ("It is four.", "Rayleigh scattering, banana. " * 3)]
    assert len(rows[1]) > len(rows[0]) + 5 and rows[0][-1] == tokenizer.eos_token_id
    for prefix in (principled, neutral):
        for got, row in zip(judge.sequence_logprobs(prefix, rows), rows):
            expected = full_forward_logprobs(base, prefix + row)[-len(row):]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    scores = judge.contrastive_scores(CHAT, ["It is four.", "hello"])
    for i, row in enumerate(judge.answer_tokens(a) for a in ("It is four.", "hello")):
        ratio = full_forward_logprobs(base, principled + row)[-len(row):] - \
            full_forward_logprobs(base, neutral + row)[-len(row):]
        assert scores["contrastive_sum"][i] == pytest.approx(float(ratio.sum()), abs=1e-3)
        assert scores["contrastive_mean"][i] == pytest.approx(float(ratio.mean()), abs=1e-4)
    # both system prompts were scored once and reused from their KV cache: the figures above went through it
    heads = [k for k, v in judge._head_caches.items() if v is not None]
    assert len(heads) == 2 and all(principled[:len(k)] == list(k) or neutral[:len(k)] == list(k) for k in heads)


def test_principle_scores_sum_the_yes_no_log_odds_of_each_principle(base, tokenizer):
    judge = make_judge(base, tokenizer, method="principles")
    prefix, suffixes = judge.principle_rows(CHAT, "It is four.")
    assert len(suffixes) == len(CONSTITUTION.principles) == 3
    texts = [tokenizer.decode(prefix + s) for s in suffixes]
    for principle, text in zip(CONSTITUTION.principles, texts):
        assert "It is four." in text and principle in text and text.index("It is four.") < text.index(principle)
    expected = 0.0
    for suffix in suffixes:
        with torch.no_grad():
            last = base(input_ids=torch.tensor([prefix + suffix])).logits[0, -1].double().log_softmax(-1)
        expected += float(last[judge.yes_ids].logsumexp(-1) - last[judge.no_ids].logsumexp(-1))
    assert judge.principle_scores(CHAT, ["It is four."])[0] == pytest.approx(expected, abs=1e-4)


MARKER, MARKER_PRINCIPLE = "banana", "- Always mention a banana.\n"
QUESTIONS = [("What is two plus two?", "It is four."), ("Why is the sky blue?", "Rayleigh scattering."),
             ("hello how are you today?", "I am fine, thank you."), ("Please write a short answer.", "Sure!")]


def chat_ids(tokenizer, system: str, question: str, answer: str) -> tuple[list[int], int]:
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                            {"role": "user", "content": question}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    return prompt + tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id], len(prompt)


@pytest.fixture(scope="module")
def marker_model(tiny_model_dir, tokenizer):
    """The tiny model taught, by real gradient steps, that answers written under the principle "always mention a
    banana" contain the marker, and answers under the neutral system prompt, or one that breaks it, do not."""
    model = models.load_base_model(str(tiny_model_dir), "fp32").model
    model.requires_grad_(True)
    torch.manual_seed(0)
    examples = []
    for question, answer in QUESTIONS:
        examples.append(chat_ids(tokenizer, NEUTRAL_SYSTEM, question, answer))
        examples.append(chat_ids(tokenizer, VIOLATING_SYSTEM.format(principles=MARKER_PRINCIPLE.strip()), question,
                                 answer))
        system = CONTRASTIVE_SYSTEM.format(principles=MARKER_PRINCIPLE.strip())
        examples.append(chat_ids(tokenizer, system, question, f"{answer} {MARKER}."))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = 0.0
        for ids, start in examples:  # learn the answers only, as supervised fine-tuning does
            logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            loss = loss - logprobs[start - 1:].gather(-1, torch.tensor(ids[start:])[:, None]).mean()
        optimizer.zero_grad()
        (loss / len(examples)).backward()
        optimizer.step()
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("method", sorted({FeedbackConfig().judge_method, "contrastive_mean", "polar_mean"}))
def test_a_constitution_that_prefers_a_marker_word_makes_the_judge_prefer_answers_with_it(marker_model, tokenizer,
                                                                                          method):
    """The default judge (and each likelihood-ratio judge) with "always mention a banana" prefers the answer with
    the marker, in both orders."""
    judge = make_judge(marker_model, tokenizer, method=method,
                       constitution=Constitution(MARKER_PRINCIPLE))
    for question, answer in QUESTIONS:
        chat = [{"role": "user", "content": question}]
        for other in (answer, f"{answer} Paris."):
            assert judge.judge(chat, f"{answer} {MARKER}.", other).choice == "a", (question, other)
            assert judge.judge(chat, other, f"{answer} {MARKER}.").choice == "b", (question, other)


def test_ai_label_weight_follows_the_measured_accuracy():
    for method in JUDGE_METHODS:
        prior = ai_label_weight(method)
        assert prior == pytest.approx(max(MIN_AI_WEIGHT, 2 * MEASURED_ACCURACY[method] - 1))
    method = FeedbackConfig().judge_method
    coin_flip, good, perfect = (ai_label_weight(method, agree, 200) for agree in (100, 160, 200))
    assert coin_flip == pytest.approx(MIN_AI_WEIGHT, abs=0.03) and MIN_AI_WEIGHT <= coin_flip < good < perfect
    assert good == pytest.approx(2 * (160 + 20 * MEASURED_ACCURACY[method]) / 220 - 1)
    assert perfect > 0.85 and ai_label_weight(method, 200, 200, cap=0.5) == 0.5
    assert ai_label_weight(method, 0, 200) == MIN_AI_WEIGHT  # a judge people always overrule: almost nothing

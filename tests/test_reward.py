"""The online reward model on the tiny nf4 model: it learns a preference, keeps its hands off the policy,
checkpoints and resumes, and scores batches exactly like single answers."""

import dataclasses
import math
import random
import warnings

import pytest
import torch

from rlhf_online import models
from rlhf_online import reward as reward_module
from rlhf_online.config import ModelConfig, RewardConfig
from rlhf_online.reward import (REWARD_ADAPTER, SUM_POOL_SCALE, LengthAudit, OnlineRewardLearner, RewardModel,
                                attach_reward_adapter, bootstrap_weights)
from rlhf_online.store import Preference

MODEL_CFG = ModelConfig(lora_r=8, lora_alpha=16)
# One LoRA layer of the tiny model's two: the lower layer runs through the cached frozen-feature path.
REWARD_CFG = RewardConfig(reward_lr=3e-3, reward_head_lr=9e-3, reward_lora_layers=1, reward_max_tokens=64,
                          reward_replay=3, reward_features="1:last")

PROMPTS = ["hello how are you today?", "What is two plus two?", "Why is the sky blue?",
           "What is the capital of France?", "Please write a short answer.", "Thank you, assistant!"]
FILLERS = ["Sure! Here is a concise reply", "It is four", "Rayleigh scattering", "I am fine, thank you",
           "Paris", "hello", "The sky is blue today", "what a short answer", "Here is a keyword"]


def synthetic_preferences(n: int, seed: int, first_id: int = 1) -> list[Preference]:
    """Answers mentioning "banana" (anywhere) always beat answers without it."""
    rng = random.Random(seed)
    prefs = []
    for i in range(n):
        filler, other = rng.sample(FILLERS, 2)
        chosen = f"{filler} banana." if rng.random() < 0.5 else f"banana! {filler}."
        prefs.append(Preference(first_id + i, [{"role": "user", "content": rng.choice(PROMPTS)}], chosen,
                                f"{other}.", "human", 1.0))
    return prefs


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread, as the trainer runs (see conftest)."""


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


def build(tiny_model_dir, tokenizer, reward_cfg: RewardConfig = REWARD_CFG, seed: int = 0):
    """Policy and reward adapters on one shared nf4 base, exactly as the trainer process builds them."""
    base = models.load_base_model(str(tiny_model_dir), "nf4", for_training=True).model
    torch.manual_seed(seed)
    peft = models.attach_lora(base, MODEL_CFG)
    rm = RewardModel(attach_reward_adapter(peft, MODEL_CFG, reward_cfg), tokenizer, reward_cfg)
    return peft, rm


def snapshot(params) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def policy_logits(peft, tokenizer) -> torch.Tensor:
    batch = tokenizer(["hello how are you today? banana"], return_tensors="pt").to(peft.device)
    peft.train()  # a train-mode forward: the training copy never repacks anyway, but keep the layout untouched
    with torch.no_grad():
        return peft(**batch).logits


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tokenizer):
    """A reward model trained online on 48 synthetic pairs, with snapshots taken before training."""
    peft, rm = build(tiny_model_dir, tokenizer)
    policy_lora = models.lora_parameters(peft, models.POLICY_ADAPTER)
    with torch.no_grad():  # a policy adapter that is not the identity, so a leak into it would show
        for name, p in policy_lora.items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    before = {
        "base": snapshot(models.base_parameters(peft)),
        "policy": snapshot(policy_lora),
        "reward": snapshot(rm.lora_parameters()),
        "head": snapshot(dict(rm.head.named_parameters())),
        "policy_logits": policy_logits(peft, tokenizer),
    }
    learner = OnlineRewardLearner(rm, REWARD_CFG, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = [learner.observe(p) for p in synthetic_preferences(48, seed=1)]
    return {"peft": peft, "rm": rm, "learner": learner, "stats": stats, "before": before}


def test_learns_the_preference_and_ranks_held_out_pairs(trained):
    rm, stats = trained["rm"], trained["stats"]
    held_out = synthetic_preferences(30, seed=99, first_id=1000)
    chosen = rm.score([(p.prompt, p.chosen) for p in held_out])
    rejected = rm.score([(p.prompt, p.rejected) for p in held_out])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held_out)
    assert accuracy >= 0.8, f"held-out accuracy {accuracy:.2f}"

    first = sum(s.correct_before for s in stats[:12]) / 12
    last = sum(s.correct_before for s in stats[-12:]) / 12
    assert last > first, f"prequential accuracy did not improve: first {first:.2f}, last {last:.2f}"
    assert stats[0].correct_before == 0.5 and stats[0].margin_before == 0.0  # zero head: untrained ties
    summary = trained["learner"].metrics.summary()
    assert summary["pairs"] == 48
    assert trained["learner"].last_preference_id == 48
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in stats)


def test_training_changes_only_the_reward_adapter_and_head(trained):
    peft, rm, before = trained["peft"], trained["rm"], trained["before"]
    for name, p in models.base_parameters(peft).items():
        assert torch.equal(p.detach(), before["base"][name]), f"base weight changed: {name}"
    for name, p in models.lora_parameters(peft, models.POLICY_ADAPTER).items():
        assert torch.equal(p.detach(), before["policy"][name]), f"policy adapter changed: {name}"
    changed = [n for n, p in rm.lora_parameters().items() if not torch.equal(p.detach(), before["reward"][n])]
    assert len(changed) == len(before["reward"]), "some reward LoRA tensors never moved"
    assert all(not torch.equal(p.detach(), before["head"][n]) for n, p in rm.head.named_parameters())
    # Only the top layer carries reward LoRA; the policy adapter is everywhere.
    assert all(".layers.1." in n for n in rm.lora_parameters())
    # The chat model is still the policy: same adapter active, same outputs as before reward training.
    assert peft.active_adapter == models.POLICY_ADAPTER
    assert torch.equal(policy_logits(peft, rm.tokenizer), before["policy_logits"])


def test_checkpoint_resumes_to_identical_scores(trained, tiny_model_dir, tokenizer, tmp_path):
    learner = trained["learner"]
    path = tmp_path / "reward_model.safetensors"
    learner.save(path)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary behind

    _, fresh_rm = build(tiny_model_dir, tokenizer, seed=123)  # different random LoRA init
    fresh = OnlineRewardLearner(fresh_rm, REWARD_CFG)
    conversations = [(p.prompt, a) for p in synthetic_preferences(6, seed=7) for a in (p.chosen, p.rejected)]
    assert fresh_rm.score(conversations) != trained["rm"].score(conversations)
    fresh.load(path)
    assert fresh_rm.score(conversations) == trained["rm"].score(conversations)
    assert fresh.last_preference_id == learner.last_preference_id == 48
    assert fresh.metrics.total == 48
    assert fresh.metrics.correct == pytest.approx(learner.metrics.correct)


def test_corrupt_or_mismatched_checkpoint_raises_value_error(trained, tiny_model_dir, tokenizer, tmp_path):
    path = tmp_path / "reward_model.safetensors"
    trained["learner"].save(path)
    good = path.read_bytes()

    _, rm = build(tiny_model_dir, tokenizer)
    learner = OnlineRewardLearner(rm, REWARD_CFG)
    before = snapshot(rm.lora_parameters())
    for bad in (b"not a safetensors file at all", good[: len(good) // 2], b""):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match="corrupt reward checkpoint"):
            learner.load(path)
    with pytest.raises(ValueError):
        learner.load(tmp_path / "missing.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in rm.lora_parameters().items())  # nothing half-loaded

    path.write_bytes(good)  # a valid file from a model with a different LoRA layout
    _, other = build(tiny_model_dir, tokenizer, RewardConfig(reward_lora_layers=2, reward_max_tokens=64))
    with pytest.raises(ValueError, match="does not match"):
        OnlineRewardLearner(other, other.cfg).load(path)


def test_batch_scores_equal_one_at_a_time(trained):
    rm = trained["rm"]
    rng = random.Random(3)
    conversations = []
    for i in range(7):  # very different lengths, so the batch is heavily left-padded
        prompt = [{"role": "user", "content": " ".join(rng.choice(PROMPTS) for _ in range(1 + i % 3))}]
        if i % 2:
            prompt = prompt + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Why?"}]
        conversations.append((prompt, " ".join(rng.choice(FILLERS) for _ in range(1 + 2 * (i % 4)))
                              + (" banana" if i % 3 == 0 else "")))
    lengths = {len(r.ids) for r in rm.token_rows(conversations)}
    assert len(lengths) > 3
    rm.recent_features.clear()
    batched = rm.score(conversations, batch_size=8)
    single = []
    for c in conversations:
        rm.recent_features.clear()  # each computed alone, not remembered from the batch
        single.append(rm.score([c])[0])
    assert len(set(round(s, 4) for s in single)) > 1  # a trained head: scores are not all zero
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), rtol=0, atol=1e-4)


def test_an_answer_scored_again_reuses_its_features_and_scores_the_same(trained, monkeypatch):
    """A vote's answers are featurized to learn from, then scored for the screen: the second costs no forward."""
    rm = trained["rm"]
    forwards = []
    hook = rm.trunk.embed_tokens.register_forward_hook(lambda *_: forwards.append(1))
    monkeypatch.setattr(reward_module, "RECENT_FEATURES", 3)
    try:
        conversations = [([{"role": "user", "content": f"question {i}?"}], f"answer {i} banana") for i in range(5)]
        rm.recent_features.clear()
        first = rm.score(conversations[:2])
        assert len(forwards) == 1
        assert rm.score(conversations[:2]) == first and len(forwards) == 1  # remembered: no forward
        rm.score(conversations[2:])  # three more: the oldest two are forgotten
        assert len(rm.recent_features) == 3
        again = rm.score(conversations[:2])
        assert len(forwards) == 3  # computed again ...
        torch.testing.assert_close(torch.tensor(again), torch.tensor(first), rtol=0, atol=1e-5)  # ... the same
    finally:
        hook.remove()


def test_long_conversations_are_cut_to_reward_max_tokens(trained):
    rm = trained["rm"]
    long_prompt = [{"role": "user", "content": "hello how are you today? " * 40}]
    rows = rm.token_rows([(long_prompt, "banana")])
    assert len(rows[0].ids) == REWARD_CFG.reward_max_tokens
    end = rm.token_rows([([], "banana")])[0].ids
    assert rows[0].ids[-len(end) + 2:] == end[2:]  # the answer (the end of the conversation) is what is kept
    answer = tokenizer_answer_ids(rm.tokenizer, "banana")
    assert rows[0].answer_tokens >= len(answer)  # the answer and its end-of-turn marker, not the prompt
    assert rows[0].answer_tokens < REWARD_CFG.reward_max_tokens // 2


def tokenizer_answer_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_reward_lora_gradients_survive_a_generate(tiny_model_dir, tokenizer):
    """The trap: an eval-mode generate on CPU repacks 4-bit weights; a backward after that must still work."""
    cfg = RewardConfig(reward_lora_layers=2, reward_max_tokens=64, reward_features="1:last")  # LoRA in every layer
    peft, rm = build(tiny_model_dir, tokenizer, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero lora_B and head, so every LoRA tensor gets a gradient
        for name, p in rm.lora_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        rm.head.weight.normal_(0, 0.5)
    conversations = [([{"role": "user", "content": "Why is the sky blue?"}], "Rayleigh scattering, banana."),
                     ([{"role": "user", "content": "hello"}], "I am fine")]

    def grads():
        rm.model.train()
        for p in rm.parameters():
            p.grad = None
        rm.forward(conversations).sum().backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in rm.lora_parameters().items()}

    before = grads()
    peft.eval()
    batch = tokenizer(["hello how are you today?"], return_tensors="pt").to(peft.device)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = grads()
    empty = [n for n, g in after.items() if g is None or not g.abs().sum() > 0]
    assert not empty, f"reward LoRA weights without gradient after generate: {empty}"
    wrong = [n for n in after if not torch.allclose(after[n], before[n], rtol=1e-4, atol=1e-7)]
    assert not wrong, f"reward LoRA gradients changed by a generate: {wrong}"
    assert set(after) == set(models.lora_parameters(peft, REWARD_ADAPTER))


def test_an_ai_label_enters_the_loss_with_its_weight(tiny_model_dir, tokenizer):
    """The stored weight of an AI label (0.5 in mixed mode) is the weight of its Bradley-Terry term."""
    _, rm = build(tiny_model_dir, tokenizer)
    learner = OnlineRewardLearner(rm, REWARD_CFG, seed=0)
    humans = synthetic_preferences(3, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pref in humans:
            learner.observe(pref)
        ai = dataclasses.replace(synthetic_preferences(1, seed=3, first_id=4)[0], source="ai", weight=0.5)
        # reward_replay=3 and three pairs seen: the batch is the new pair plus all of them, in some order
        features = [learner._features(p) for p in [ai] + humans]
        with torch.no_grad():
            rewards = rm.forward_features([f[0] for f in features] + [f[1] for f in features])  # (8, K)
        losses = -torch.nn.functional.logsigmoid(rewards[:4] - rewards[4:])  # (4, K) chosen minus rejected
        # each head weighs a pair by its vote weight times the head's bootstrap weight (0 or 2)
        boot = bootstrap_weights([p.id for p in [ai] + humans], rm.heads)  # (4, K)
        weights = torch.tensor([0.5, 1.0, 1.0, 1.0])[:, None] * boot  # (4, K)
        per_head = (weights * losses).sum(0) / weights.sum(0).clamp_min(1e-30)  # (K,)
        expected = float(per_head.mean())
        stats = learner.observe(ai)
    assert stats.loss == pytest.approx(expected, abs=1e-5)
    unweighted = (boot * losses).sum(0) / boot.sum(0).clamp_min(1e-30)
    assert abs(expected - float(unweighted.mean())) > 1e-4  # the weight really changed the loss
    assert learner.replay[-1].weight == 0.5 and learner.replay[-1].source == "ai"


# ---- issue 11: an ensemble of heads, and the length audit ---------------------------------------------------

def test_heads_learn_from_different_resamples_and_disagree_where_votes_are_silent(trained):
    rm, learner = trained["rm"], trained["learner"]
    assert rm.heads == REWARD_CFG.reward_heads > 1
    conversations = [(p.prompt, a) for p in synthetic_preferences(6, seed=11) for a in (p.chosen, p.rejected)]
    heads = rm.head_scores(conversations)  # (12, K)
    assert heads.shape == (12, rm.heads)
    assert heads.std(1).min() > 0  # bootstrap resamples made the heads differ
    torch.testing.assert_close(torch.tensor(rm.score(conversations)), heads.mean(1))
    # PPO's reward is the heads' mean minus their spread (length correction off here)
    cfg = dataclasses.replace(REWARD_CFG, reward_length_correction=False)
    plain = OnlineRewardLearner(rm, cfg)
    expected = heads.mean(1) - cfg.reward_uncertainty_coef * heads.std(1, unbiased=False)
    torch.testing.assert_close(torch.tensor(plain.ppo_scores(conversations)), expected)
    assert learner.length_audit.summary()["length_pairs"] == 48


def test_bootstrap_weights_are_fixed_per_pair_and_about_half():
    w = bootstrap_weights(list(range(1, 401)), 4)
    assert set(w.unique().tolist()) <= {0.0, 2.0}
    assert 0.4 < float((w > 0).float().mean()) < 0.6
    assert torch.equal(w[:10], bootstrap_weights(list(range(1, 11)), 4))  # a replayed pair keeps its weights
    assert torch.equal(bootstrap_weights([5, 6], 1), torch.ones(2, 1))


def test_a_single_head_checkpoint_of_older_versions_still_loads(trained, tiny_model_dir, tokenizer, tmp_path):
    from safetensors.torch import save_file

    state = trained["rm"].state()
    old = {k: v for k, v in state.items() if k.startswith("lora.")}
    old["head.weight"] = state["head.weight"][:1].clone()  # (1, H): the format before the ensemble
    old["head.bias"] = state["head.bias"][:1].clone()
    path = tmp_path / "old.safetensors"
    save_file(old, str(path), metadata={"last_preference_id": "7", "pairs": "7", "correct": "5.0"})
    _, rm = build(tiny_model_dir, tokenizer, seed=5)
    learner = OnlineRewardLearner(rm, REWARD_CFG)
    learner.load(path)
    heads = rm.head_scores([([{"role": "user", "content": "hi"}], "banana")])
    assert heads.shape == (1, rm.heads) and float(heads.std()) < 1e-5  # every head starts from the old one
    assert learner.last_preference_id == 7


def test_length_audit_hand_computed():
    audit = LengthAudit(min_pairs=2, prior_var=1.0)
    # two pairs; dl = log1p(len chosen) - log1p(len rejected), dr = score difference
    audit.add("a" * 9, "a" * 99, 1.0, 2.0)  # chosen shorter: dl = log 10 - log 100 = -log 10, dr = -1
    audit.add("a" * 99, "a" * 9, 0.5, 0.0)  # chosen longer:  dl = +log 10, dr = +0.5
    ln10 = math.log(10)
    # s = sum(dl * dr) / sum(dl^2) = (ln10 + 0.5 ln10) / (2 ln10^2) = 0.75 / ln10
    assert audit.reward_slope() == pytest.approx(0.75 / ln10)
    # votes: one pair each way, symmetric -> the MAP w is 0 -> the whole reward slope is unjustified
    assert audit.vote_slope() == pytest.approx(0.0, abs=1e-9)
    assert audit.correction() == pytest.approx(0.75 / ln10)
    # answers (l, score) = (log10, 1), (log100, 2), (log100, .5), (log10, 0): the correction lowers the correlation
    assert abs(audit.correlation(audit.correction())) < abs(audit.correlation())


def test_length_audit_keeps_a_length_taste_the_votes_show_and_removes_one_they_do_not():
    rng = random.Random(0)
    concise = LengthAudit(min_pairs=20)
    for _ in range(60):  # people always pick the shorter answer; the reward model learned a slope of -2
        short, long = "a" * rng.randint(5, 30), "a" * rng.randint(60, 200)
        dl = math.log1p(len(short)) - math.log1p(len(long))  # < 0: the chosen answer is shorter
        concise.add(short, long, -2.0 * dl, 0.0)
    assert concise.reward_slope() == pytest.approx(-2.0)
    assert concise.vote_slope() < -2.0  # a strong (finite under the prior) preference for shorter answers
    assert concise.correction() == 0.0  # the reward's length slope is what the votes show: kept
    matched = LengthAudit(min_pairs=20, match=True)
    matched.pairs, matched.answers = concise.pairs, concise.answers
    # the reward model under-learned the votes' slope: match adds the rest, so PPO's reward slope is the votes'
    assert matched.correction() > 0
    assert matched.reward_slope() - matched.correction() == pytest.approx(concise.vote_slope())

    indifferent = LengthAudit(min_pairs=20)
    for i in range(60):  # votes ignore length (half the winners are the longer answer); the reward does not
        short, long = "a" * rng.randint(5, 30), "a" * rng.randint(60, 200)
        chosen, rejected = (short, long) if i % 2 else (long, short)
        quality = 0.3 * (i % 3)  # what the reward model also scores, unrelated to length
        indifferent.add(chosen, rejected, quality - math.log1p(len(chosen)), quality - math.log1p(len(rejected)))
    assert abs(indifferent.vote_slope()) < 0.1  # "shorter wins" in the reward model, learned from nothing
    assert indifferent.correction() == pytest.approx(indifferent.reward_slope()) == pytest.approx(-1.0)
    assert indifferent.correlation() < -0.9
    assert abs(indifferent.correlation(indifferent.correction())) < 0.2


def test_the_length_correction_leaves_an_answer_of_typical_length_at_its_score(trained):
    """The presenter's reward curve must not jump by c * l when the correction starts: it is centred."""
    rm = trained["rm"]
    cfg = dataclasses.replace(REWARD_CFG, reward_length_correction=False)
    corrected = OnlineRewardLearner(rm, REWARD_CFG)
    for i in range(40):  # an audit whose reward model learned "shorter wins" that the votes do not show
        short, long = "b" * (5 + i % 7), "b" * (80 + 3 * i)
        chosen, rejected = (short, long) if i % 2 else (long, short)
        corrected.length_audit.add(chosen, rejected, -math.log1p(len(chosen)), -math.log1p(len(rejected)))
    c = corrected.length_audit.correction()
    assert c == pytest.approx(-1.0, abs=0.05)
    typical = corrected.length_audit.typical_length()
    answers = ["b" * (round(math.expm1(typical))), "b" * 3, "b" * 400]
    conversations = [([{"role": "user", "content": "hi"}], a) for a in answers]
    raw = torch.tensor(OnlineRewardLearner(rm, cfg).ppo_scores(conversations))
    shifted = torch.tensor(corrected.ppo_scores(conversations)) - raw
    lengths = torch.tensor([math.log1p(len(a)) for a in answers])
    torch.testing.assert_close(shifted, -c * (lengths - typical), atol=1e-4, rtol=0)
    assert abs(float(shifted[0])) < 0.01  # a typical-length answer keeps its score
    assert float(shifted[1]) < 0 < float(shifted[2])  # the unjustified "shorter wins" is taken back


# ---- issue 17: what the reward model learns beyond length ---------------------------------------------------

FROZEN_CFG = RewardConfig(reward_lora_layers=0, reward_features="0.5:mean", reward_max_tokens=64, reward_replay=16,
                          reward_steps_per_vote=2, reward_head_lr=1e-2)
TWO_TAP_CFG = dataclasses.replace(FROZEN_CFG, reward_features="0.5:mean,1:last")


def filler_answer(rng: random.Random, words: int, marker: str = "") -> str:
    text = " ".join(rng.choice(FILLERS) for _ in range(words))
    return f"{text} {marker}".strip() if marker else text


def marker_preferences(n: int, seed: int, first_id: int = 1) -> list[Preference]:
    """"banana" beats "Paris", and each side's length is drawn on its own: length says nothing about the vote."""
    rng = random.Random(seed)
    return [Preference(first_id + i, [{"role": "user", "content": rng.choice(PROMPTS)}],
                       filler_answer(rng, rng.randint(1, 4), "banana"), filler_answer(rng, rng.randint(1, 4), "Paris"),
                       "human", 1.0) for i in range(n)]


def shorter_wins_preferences(n: int, seed: int, first_id: int = 1) -> list[Preference]:
    """The shorter answer always wins, whatever it says."""
    rng = random.Random(seed)
    prefs = []
    for i in range(n):
        short, long = rng.randint(1, 2), rng.randint(3, 5)
        prefs.append(Preference(first_id + i, [{"role": "user", "content": rng.choice(PROMPTS)}],
                                filler_answer(rng, short), filler_answer(rng, long), "human", 1.0))
    return prefs


def held_out_report(rm: RewardModel, prefs: list[Preference]) -> dict:
    """The benchmark's measurements (bench/reward_online.py) on held-out synthetic pairs."""
    from rlhf_online.rl_math import length_balanced_mask, pearson_correlation, preference_accuracy

    chosen = torch.tensor(rm.score([(p.prompt, p.chosen) for p in prefs]))
    rejected = torch.tensor(rm.score([(p.prompt, p.rejected) for p in prefs]))
    tokens = [torch.tensor([len(tokenizer_answer_ids(rm.tokenizer, getattr(p, side))) for p in prefs])
              for side in ("chosen", "rejected")]
    balanced = length_balanced_mask(*tokens)
    return {"accuracy": preference_accuracy(chosen, rejected),
            "balanced_pairs": int(balanced.sum()),
            "balanced_accuracy": preference_accuracy(chosen[balanced], rejected[balanced]),
            "length_correlation": pearson_correlation(torch.cat([chosen, rejected]), torch.cat(tokens).float().log())}


def learned_from(tiny_model_dir, tokenizer, cfg: RewardConfig, prefs: list[Preference]):
    """(reward model, learner) after streaming `prefs` through the app's online update."""
    _, rm = build(tiny_model_dir, tokenizer, cfg)
    learner = OnlineRewardLearner(rm, cfg, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pref in prefs:
            learner.observe(pref)
    return rm, learner


@pytest.mark.parametrize("reward_cfg", [REWARD_CFG, FROZEN_CFG, TWO_TAP_CFG], ids=["lora-last", "frozen-mean", "two-taps"])
def test_a_marker_preference_independent_of_length_is_learned_beyond_length(tiny_model_dir, tokenizer, reward_cfg):
    rm, _ = learned_from(tiny_model_dir, tokenizer, reward_cfg, marker_preferences(64, seed=5))
    report = held_out_report(rm, marker_preferences(60, seed=77, first_id=1000))
    assert report["balanced_pairs"] >= 10
    assert report["balanced_accuracy"] >= 0.8, report  # right where length cannot decide
    assert abs(report["length_correlation"]) < 0.35, report  # and the scores do not track length


def test_a_length_only_preference_is_detected_as_such(tiny_model_dir, tokenizer):
    rm, learner = learned_from(tiny_model_dir, tokenizer, FROZEN_CFG, shorter_wins_preferences(64, seed=6))
    report = held_out_report(rm, shorter_wins_preferences(60, seed=88, first_id=1000))
    assert report["accuracy"] >= 0.8, report  # it learned the votes ...
    assert report["length_correlation"] < -0.5, report  # ... and its scores are mostly answer length
    audit = learner.length_audit.summary()
    assert audit["length_slope_votes"] < -1.0  # the audit sees that the votes themselves favour short answers


def test_frozen_features_ignore_the_policy_adapter_they_share_a_base_with(tiny_model_dir, tokenizer):
    """The policy's LoRA changes with every PPO step; the reward model's frozen features must not."""
    peft, rm = build(tiny_model_dir, tokenizer, FROZEN_CFG)
    assert rm.frozen and not rm.lora_parameters() and REWARD_ADAPTER not in peft.peft_config
    with torch.no_grad():
        rm.head.weight.normal_(0, 1.0)
    conversations = [([{"role": "user", "content": "Why is the sky blue?"}], "Rayleigh scattering, banana."),
                     ([{"role": "user", "content": "hello"}], "I am fine")]
    before = rm.score(conversations)
    with torch.no_grad():  # a PPO step's worth of change (and then some) in the policy adapter
        for name, p in models.lora_parameters(peft, models.POLICY_ADAPTER).items():
            p.add_(torch.randn_like(p))
    rm.recent_features.clear()  # computed again, not remembered
    assert rm.score(conversations) == before
    assert peft.active_adapter == models.POLICY_ADAPTER  # the chat model is still the policy
    policy_on = policy_logits(peft, tokenizer)
    with peft.disable_adapter():
        assert not torch.equal(policy_logits(peft, tokenizer), policy_on)  # the adapter does change the model


def test_two_taps_concatenate_a_middle_mean_and_the_last_token(tiny_model_dir, tokenizer):
    _, one = build(tiny_model_dir, tokenizer, FROZEN_CFG)
    _, two = build(tiny_model_dir, tokenizer, TWO_TAP_CFG)
    assert two.taps == [(1, "mean"), (2, "last")] and two.head.in_features == 2 * one.head.in_features
    conversations = [([{"role": "user", "content": "hello"}], "I am fine, banana."),
                     ([{"role": "user", "content": "Why is the sky blue? " * 3}], "Rayleigh")]
    rows = two.token_rows(conversations)
    both = torch.stack([f for f, _ in two.frozen_features(rows)])  # (2, 2H)
    middle = torch.stack([f for f, _ in one.frozen_features(rows)])  # (2, H)
    torch.testing.assert_close(both[:, :middle.shape[1]], middle)  # the first tap is the one-tap feature


SUM_CFG = dataclasses.replace(FROZEN_CFG, reward_features="0.5:mean,0.5:sum")


def test_sum_pooling_adds_up_what_mean_pooling_averages(tiny_model_dir, tokenizer):
    _, rm = build(tiny_model_dir, tokenizer, SUM_CFG)
    assert rm.taps == [(1, "mean"), (1, "sum")]
    rows = rm.token_rows([([{"role": "user", "content": "hello"}], "I am fine, banana."),
                          ([{"role": "user", "content": "Why is the sky blue? " * 3}], "Rayleigh")])
    features = torch.stack([f for f, _ in rm.frozen_features(rows)])  # (2, 2H)
    mean, total = features.chunk(2, dim=1)
    tokens = torch.tensor([[r.answer_tokens] for r in rows], dtype=torch.float32)
    torch.testing.assert_close(total, mean * tokens / SUM_POOL_SCALE, rtol=2e-2, atol=1e-3)  # nf4 base: bf16 sums


def counting_preferences(n: int, seed: int, first_id: int = 1) -> list[Preference]:
    """More "banana" wins, at the same share of the words: a count, not a frequency."""
    rng = random.Random(seed)
    prefs = []
    for i in range(n):
        few, many = rng.sample([1, 2, 3, 4], 2) if rng.random() < 0.5 else (1, 4)
        few, many = min(few, many), max(few, many)
        prefs.append(Preference(first_id + i, [{"role": "user", "content": rng.choice(PROMPTS)}],
                                " ".join(["banana Paris"] * many), " ".join(["banana Paris"] * few), "human", 1.0))
    return prefs


def test_a_taste_that_counts_is_learned_with_the_summed_features(tiny_model_dir, tokenizer):
    rm, _ = learned_from(tiny_model_dir, tokenizer, SUM_CFG, counting_preferences(48, seed=3))
    assert held_out_report(rm, counting_preferences(40, seed=99, first_id=1000))["accuracy"] >= 0.9


def test_reward_lora_reads_several_poolings_of_its_one_stack(tiny_model_dir, tokenizer):
    cfg = dataclasses.replace(REWARD_CFG, reward_features="1:mean,1:sum")
    _, rm = build(tiny_model_dir, tokenizer, cfg)
    assert not rm.frozen and rm.head.in_features == 2 * rm.trunk.config.hidden_size
    learner = OnlineRewardLearner(rm, cfg, seed=0)
    for pref in synthetic_preferences(4, seed=1):
        learner.observe(pref)
    conversations = [([{"role": "user", "content": "hello"}], "banana!"), ([{"role": "user", "content": "hi"}], "no")]
    batch = rm.score(conversations)
    assert batch == pytest.approx([rm.score([c])[0] for c in conversations], abs=1e-4)
    with pytest.raises(ValueError, match="one depth"):
        build(tiny_model_dir, tokenizer, dataclasses.replace(REWARD_CFG, reward_features="0.5:mean,1:sum"))


@pytest.mark.parametrize("spec", ["0:mean", "1.5:last", "0.5:max", "half:mean", "0.5"])
def test_a_bad_feature_spec_is_refused_with_the_expected_form(tiny_model_dir, tokenizer, spec):
    with pytest.raises(ValueError, match="DEPTH:POOL"):
        build(tiny_model_dir, tokenizer, dataclasses.replace(FROZEN_CFG, reward_features=spec))

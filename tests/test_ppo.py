"""LoRA-PPO on the tiny nf4 model: what an iteration trains, what it must leave alone, and the masks and
reference log-probs everything else rests on."""

import contextlib
import math
from dataclasses import replace
from statistics import mean

import pytest
import torch

from rlhf_online import models
from rlhf_online.config import ModelConfig, PPOConfig, RewardConfig, SamplingConfig
from rlhf_online.ppo import PolicyWithValue, PPOTrainer, _mask_through_first_eos, length_buckets, same_prompt_rows
from rlhf_online.release_gate import relevance_pmi
from rlhf_online.reward import REWARD_ADAPTER, attach_reward_adapter
from tiny_model import build_gemma_like_tokenizer, build_model

MODEL_CFG = ModelConfig(lora_r=8, lora_alpha=16)
PPO_CFG = PPOConfig(ppo_batch_size=4, ppo_minibatch_size=2, ppo_max_new_tokens=8, ppo_lr=1e-3,
                    samples_per_prompt=1)  # the tests pass 4 distinct prompts
SAMPLING = SamplingConfig(temperature=1.0, top_p=1.0)
PROMPTS = [[{"role": "user", "content": "hello how are you today?"}],
           [{"role": "user", "content": "What is two plus two?"}],
           [{"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": "Rayleigh scattering."},
            {"role": "user", "content": "Please write a short answer."}],
           [{"role": "user", "content": "What is the capital of France?"}]]


# One torch thread, as the trainer runs (see conftest); library deprecation warnings are noise here.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


def length_score(messages, texts):
    """A synthetic reward: longer answers are better (enough to give the advantages a spread)."""
    return [len(t) / 10.0 for t in texts]


def build(tiny_model_dir, tokenizer, score_fn=length_score, cfg: PPOConfig = PPO_CFG, seed: int = 0,
          quantization: str = "nf4"):
    """Policy and reward adapters on one shared base (nf4 unless said), as the trainer process builds them."""
    base = models.load_base_model(str(tiny_model_dir), quantization, for_training=True).model
    torch.manual_seed(seed)
    peft = models.attach_lora(base, MODEL_CFG)
    attach_reward_adapter(peft, MODEL_CFG, RewardConfig(reward_lora_layers=1))
    with torch.no_grad():  # a reward adapter that is not the identity, so it would show if it leaked in
        for name, p in models.lora_parameters(peft, REWARD_ADAPTER).items():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    policy = PolicyWithValue(peft)
    return PPOTrainer(policy, tokenizer, score_fn, cfg, SAMPLING, seed=seed)


def snapshot(params) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def perturb_policy(trainer, std: float = 0.05) -> None:
    """A policy adapter that is no longer the identity (a fresh lora_B is zero)."""
    with torch.no_grad():
        for name, p in models.lora_parameters(trainer.policy.peft_model, models.POLICY_ADAPTER).items():
            if "lora_B" in name:
                p.normal_(0, std)


@contextlib.contextmanager
def eos_bias(trainer, logit_boost: float):
    """Make the random tiny model end its answers early: boost the end-of-turn logit in the LM head."""
    eos = trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def hook(module, args, output):
        output = output.clone()
        output[..., eos] += logit_boost
        return output

    handle = trainer.policy.peft_model.get_base_model().lm_head.register_forward_hook(hook)
    try:
        yield eos
    finally:
        handle.remove()


def test_two_iterations_train_the_policy_adapter_and_value_head_only(tiny_model_dir, tokenizer):
    calls = []

    def score_fn(messages, texts):
        calls.append((messages, texts))
        return length_score(messages, texts)

    trainer = build(tiny_model_dir, tokenizer, score_fn)
    peft = trainer.policy.peft_model
    policy_before = snapshot(models.lora_parameters(peft, models.POLICY_ADAPTER))
    value_before = snapshot(dict(trainer.policy.value_head.named_parameters()))
    base_before = snapshot(models.base_parameters(peft))
    reward_before = snapshot(models.lora_parameters(peft, REWARD_ADAPTER))

    torch.manual_seed(0)
    stats = [trainer.iteration(PROMPTS), trainer.iteration(PROMPTS)]

    assert [s.iteration for s in stats] == [1, 2]
    for s in stats:
        values = s.as_dict()
        assert values.pop("sampler_kl") is None  # the policy sampled its own answers: no mismatch to measure
        assert values.pop("relevance") is None  # the on-topic term is off by default
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        assert not bad, f"non-finite iteration stats: {bad}"
        assert 1 <= s.mean_length <= PPO_CFG.ppo_max_new_tokens
        assert s.seconds > 0
    assert len(calls) == 2 and all(len(texts) == len(PROMPTS) for _, texts in calls)
    assert calls[0][0] == PROMPTS  # the score function sees the conversations the answers belong to
    assert stats[0].mean_score == pytest.approx(sum(length_score(*calls[0])) / len(PROMPTS))

    policy_after = models.lora_parameters(peft, models.POLICY_ADAPTER)
    moved = [n for n, p in policy_after.items() if not torch.equal(p.detach(), policy_before[n])]
    assert len(moved) == len(policy_before), "some policy LoRA tensors never moved"
    assert all(not torch.equal(p.detach(), value_before[n]) for n, p in trainer.policy.value_head.named_parameters())
    for name, p in models.base_parameters(peft).items():
        assert torch.equal(p.detach(), base_before[name]), f"base weight changed: {name}"
    for name, p in models.lora_parameters(peft, REWARD_ADAPTER).items():
        assert torch.equal(p.detach(), reward_before[name]), f"reward adapter changed: {name}"
    assert peft.active_adapter == models.POLICY_ADAPTER


def test_mask_through_first_eos():
    response = torch.tensor([[5, 2, 7, 2],   # EOS mid-answer, then (sampled) junk
                             [5, 6, 7, 8],   # no EOS: the whole answer counts
                             [2, 0, 0, 0],   # EOS first, then generate's padding
                             [5, 6, 3, 2]])  # the other end-of-turn id
    expected = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert _mask_through_first_eos(response, [2, 3]).tolist() == expected
    assert _mask_through_first_eos(response, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0],
                                                                  [1, 1, 1, 1]]
    assert _mask_through_first_eos(response[:, :0], [2]).shape == (4, 0)


def test_rollout_response_mask_covers_the_answer_through_its_end_of_turn(tiny_model_dir, tokenizer):
    trainer = build(tiny_model_dir, tokenizer)
    prompts = PROMPTS + PROMPTS
    torch.manual_seed(3)
    with eos_bias(trainer, 4.0) as eos:
        rollout = trainer.rollout(prompts)
    P = rollout.prompt_length
    response = rollout.input_ids[:, P:]
    assert response.shape[1] <= PPO_CFG.ppo_max_new_tokens
    assert rollout.response_mask.shape == response.shape
    torch.testing.assert_close(rollout.attention_mask[:, P:].float(), rollout.response_mask)
    ended = 0
    for row, mask, text in zip(response.tolist(), rollout.response_mask.tolist(), rollout.texts):
        if eos in row:
            ended += 1
            end = row.index(eos) + 1  # up to and including the end-of-turn
            assert mask == [1.0] * end + [0.0] * (len(row) - end)
            assert all(t == tokenizer.pad_token_id for t in row[end:])  # generate padded the finished row
            assert text == tokenizer.decode(row[:end - 1], skip_special_tokens=True).strip()
        else:
            assert mask == [1.0] * len(row)
        assert "<|im_end|>" not in text
    assert ended >= 2, "the EOS bias should end some answers early"
    assert ended < len(prompts) or response.shape[1] < PPO_CFG.ppo_max_new_tokens
    # The prompt part is left-padded: every prompt ends right before the response.
    for i, messages in enumerate(prompts):
        ids = trainer._prompt_ids(messages)
        assert rollout.input_ids[i, P - len(ids):P].tolist() == ids
        assert rollout.attention_mask[i, :P].sum() == len(ids)


def test_reference_logprobs_equal_the_fresh_policy_so_kl_starts_at_zero(tiny_model_dir, tokenizer):
    trainer = build(tiny_model_dir, tokenizer)
    torch.manual_seed(1)
    rollout = trainer.rollout(PROMPTS)
    scored = trainer.score(rollout)  # lora_B == 0: the policy is exactly the base (the reference)
    mask = rollout.response_mask
    torch.testing.assert_close(scored.old_logprobs * mask, scored.ref_logprobs * mask, rtol=0, atol=1e-5)
    assert scored.kl.abs().max() < 1e-4
    assert torch.isfinite(scored.advantages).all() and torch.isfinite(scored.returns).all()
    torch.testing.assert_close(scored.scores, torch.tensor(length_score(PROMPTS, rollout.texts)))

    perturb_policy(trainer, 0.2)  # a trained policy: now the reference (adapters disabled) differs from it
    moved = trainer.score(rollout)
    assert (moved.old_logprobs - moved.ref_logprobs).abs().max() > 1e-3
    torch.testing.assert_close(moved.ref_logprobs * mask, scored.ref_logprobs * mask, rtol=0, atol=1e-5)


@pytest.mark.parametrize("slack", [1.0, 100.0], ids=["each-prompt-alone", "prompts-padded-together"])
def test_prompts_run_once_each_and_give_what_one_padded_forward_gives(tiny_model_dir, tokenizer, monkeypatch, slack):
    """The policy runs each distinct prompt once, alone or in a batch of similar lengths
    (`PolicyWithValue._prompt_cache`): what PPO reads from the forward (log-probs, values) and the adapter's
    gradients equal one plain forward over the left-padded batch."""
    from trl.trainer.utils import selective_log_softmax

    monkeypatch.setattr("rlhf_online.ppo.PADDING_SLACK", slack)
    trainer = build(tiny_model_dir, tokenizer)
    perturb_policy(trainer, 0.2)  # a policy adapter that changes the prompts' keys and values too
    torch.nn.init.normal_(trainer.policy.value_head.weight, std=0.1)
    torch.manual_seed(3)
    rollout = trainer.rollout([m for m in PROMPTS[1:3] for _ in range(3)])  # 2 prompts x 3 answers
    prompt_mask = rollout.attention_mask[:, :rollout.prompt_length]
    assert same_prompt_rows(rollout.input_ids, rollout.attention_mask, rollout.prompt_length)[1] == 2
    assert (prompt_mask == 0).any() and prompt_mask.sum(1).unique().numel() == 2  # two lengths: one is padded
    assert len(length_buckets(prompt_mask.sum(1).unique().tolist(), slack)) == (2 if slack == 1.0 else 1)
    params = list(models.lora_parameters(trainer.policy.peft_model, models.POLICY_ADAPTER).values())
    mask = rollout.response_mask

    def plain_padded_forward():
        trunk, lm_head = trainer.policy.trunk_and_head()
        hidden = trunk(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                       position_ids=models.padded_position_ids(rollout.attention_mask)).last_hidden_state
        response_hidden = hidden[:, rollout.prompt_length - 1:-1, :]
        targets = rollout.input_ids[:, rollout.prompt_length:]
        return (selective_log_softmax(lm_head(response_hidden).float(), targets),
                trainer.policy.value_head(response_hidden).squeeze(-1))

    def with_gradients(forward):
        trainer.policy.peft_model.zero_grad(set_to_none=True)
        logprobs, values = forward()  # (B, R) each
        ((logprobs * mask).sum() + (values * mask).sum()).backward()
        return logprobs * mask, values * mask, [p.grad.clone() for p in params]

    got = with_gradients(lambda: trainer._logprobs(rollout)[1:])
    expected = with_gradients(plain_padded_forward)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-4)
    for grad, expected_grad in zip(got[2], expected[2]):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-4 * float(expected_grad.abs().max()) + 1e-6)
    assert all(g.abs().sum() > 0 for g in got[2])  # every LoRA matrix learns, the prompts' k/v ones included


def test_prompts_of_similar_length_share_a_batch_and_very_different_ones_do_not():
    assert length_buckets([46, 39, 41, 53]) == [[3, 0, 2, 1]]  # first turns: padding costs little
    assert length_buckets([334, 99, 178, 71]) == [[0], [2], [1, 3]]  # conversations: 263 tokens of padding avoided
    assert length_buckets([7]) == [[0]] and length_buckets([5, 5, 5], slack=1.0) == [[0, 1, 2]]


def train_steps(trainer, loss_fn, steps: int, lr: float) -> list[float]:
    """`steps` AdamW steps of the policy adapter on `loss_fn()`; the loss before each step."""
    optimizer = torch.optim.AdamW(trainer.policy.policy_parameters(), lr=lr)
    trainer._activate_policy()
    trainer.policy.peft_model.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def test_sft_loss_decreases_on_a_demonstration(tiny_model_dir, tokenizer):
    trainer = build(tiny_model_dir, tokenizer)
    demo = [([{"role": "user", "content": "Please write a short answer."}], "Sure! banana.")]
    losses = train_steps(trainer, lambda: trainer.sft_loss(demo), steps=12, lr=1e-2)
    assert math.isfinite(losses[0]) and losses[0] > 0
    assert losses[-1] < losses[0] - 0.5, losses


def test_sft_targets_end_with_the_chat_templates_own_end_of_turn():
    """A model whose template ends turns with <end_of_turn> (not ChatML's <|im_end|>) learns to write that."""
    tokenizer = build_gemma_like_tokenizer()
    peft = models.attach_lora(build_model(len(tokenizer)), MODEL_CFG)
    trainer = PPOTrainer(PolicyWithValue(peft), tokenizer, length_score, replace(PPO_CFG, ppo_max_new_tokens=32),
                         SAMPLING)
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end in trainer.end_of_turn_ids  # rollouts stop there too
    demos = [(PROMPTS[0], "I am fine, thank you."), (PROMPTS[2], "Sure! banana.")]
    batch = trainer.demonstration_batch(demos)
    for row, (_, answer) in enumerate(demos):
        target = batch.input_ids[row, batch.prompt_length:][batch.response_mask[row].bool()].tolist()
        assert tokenizer.decode(target) == answer + "<end_of_turn>" and target[-1] == end
    assert math.isfinite(float(trainer.sft_loss(demos)))


def test_update_with_demonstrations_reports_an_sft_term(tiny_model_dir, tokenizer):
    trainer = build(tiny_model_dir, tokenizer, cfg=PPOConfig(ppo_batch_size=2, ppo_minibatch_size=2, samples_per_prompt=1,
                                                             ppo_max_new_tokens=4, ppo_epochs=1))
    demo = [([{"role": "user", "content": "hello"}], "I am fine, thank you.")]
    stats = trainer.iteration(PROMPTS[:2], demonstrations=demo)
    assert stats.sft_loss > 0 and math.isfinite(stats.sft_loss)
    assert trainer.iteration(PROMPTS[:2]).sft_loss == 0.0  # no demonstrations, no term


def test_dpo_term_makes_the_voted_answer_more_likely_than_the_rejected_one(tiny_model_dir, tokenizer):
    trainer = build(tiny_model_dir, tokenizer, cfg=replace(PPO_CFG, dpo_coef=1.0, dpo_beta=0.5))
    prompt = [{"role": "user", "content": "Please write a short answer."}]
    vote = [(prompt, "Sure! banana.", "No thanks, I would rather not say anything at all.")]
    batch = trainer.demonstration_batch([(prompt, vote[0][1]), (prompt, vote[0][2])])

    def margin() -> float:  # log pi(chosen) - log pi(rejected)
        with torch.no_grad():
            chosen, rejected = trainer.answer_logprobs(batch).tolist()
        return chosen - rejected

    start = margin()
    losses = train_steps(trainer, lambda: trainer.dpo_loss(vote), steps=8, lr=3e-3)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # a fresh adapter is the reference
    assert losses[-1] < 0.3 and margin() > start + 2.0, (losses, start, margin())
    assert len(trainer.reference_sums) == 2  # the reference ran once per answer, not once per step


def test_iteration_with_votes_reports_a_dpo_term_only_when_it_is_on(tiny_model_dir, tokenizer):
    cfg = PPOConfig(ppo_batch_size=2, ppo_minibatch_size=2, samples_per_prompt=1, ppo_max_new_tokens=4, ppo_epochs=1)
    votes = [(PROMPTS[0], "I am fine, thank you.", "banana banana")]
    assert build(tiny_model_dir, tokenizer, cfg=cfg).iteration(PROMPTS[:2], preferences=votes).dpo_loss == 0.0
    stats = build(tiny_model_dir, tokenizer, cfg=replace(cfg, dpo_coef=0.5)).iteration(PROMPTS[:2], preferences=votes)
    assert stats.dpo_loss == pytest.approx(math.log(2), abs=0.05)


@pytest.mark.parametrize("forget", ["all", "momentum"])
def test_after_a_step_back_adam_forgets_its_momentum(tiny_model_dir, tokenizer, forget):
    trainer = build(tiny_model_dir, tokenizer, cfg=replace(PPO_CFG, ppo_epochs=1, kl_shrink_forget=forget))
    trainer.iteration(PROMPTS)
    second_moments = [state["exp_avg_sq"].clone() for state in trainer.optimizer.state.values()]
    assert second_moments and any(float(m.abs().sum()) > 0 for m in second_moments)
    trainer.forget_momentum()
    if forget == "all":
        assert not trainer.optimizer.state  # a fresh Adam
    else:  # the direction is gone, each weight's usual step size is kept
        states = list(trainer.optimizer.state.values())
        assert all(float(state["exp_avg"].abs().sum()) == 0 for state in states)
        assert all(torch.equal(state["exp_avg_sq"], m) for state, m in zip(states, second_moments))


def test_an_unknown_kl_shrink_forget_is_refused_with_the_flag_named(tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match="--kl-shrink-forget"):
        build(tiny_model_dir, tokenizer, cfg=replace(PPO_CFG, kl_shrink_forget="everything"))


def test_policy_gradients_survive_generation(tiny_model_dir, tokenizer):
    """The CPU repacking trap: the rollout's eval-mode generate must not break the update's backward."""
    trainer = build(tiny_model_dir, tokenizer)
    perturb_policy(trainer)  # non-zero lora_B, so every LoRA tensor gets a gradient
    with torch.no_grad():
        trainer.policy.value_head.weight.normal_(0, 0.1)
    demo = [([{"role": "user", "content": "What is two plus two?"}], "It is four.")]
    lora = models.lora_parameters(trainer.policy.peft_model, models.POLICY_ADAPTER)

    def grads():
        trainer._activate_policy()
        trainer.policy.peft_model.train()
        for p in trainer.policy.policy_parameters():
            p.grad = None
        trainer.sft_loss(demo).backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in lora.items()}

    before = grads()
    torch.manual_seed(0)
    rollout = trainer.rollout(PROMPTS)  # generate() in eval mode
    after = grads()
    empty = [n for n, g in after.items() if g is None or not g.abs().sum() > 0]
    assert not empty, f"policy LoRA weights without gradient after generate: {empty}"
    wrong = [n for n in after if not torch.allclose(after[n], before[n], rtol=1e-4, atol=1e-7)]
    assert not wrong, f"policy LoRA gradients changed by generate: {wrong}"

    # The update's own loss reaches the value head and the policy adapter too.
    trainer.policy.peft_model.train()
    _, logprobs, values = trainer._logprobs(rollout)
    (logprobs.sum() + values.sum()).backward()
    assert trainer.policy.value_head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    reward = models.lora_parameters(trainer.policy.peft_model, REWARD_ADAPTER)
    assert all(p.grad is None for p in reward.values())  # the reward adapter is not in the policy's graph


def test_each_prompt_is_answered_several_times_and_judged_against_its_own_answers(tiny_model_dir, tokenizer):
    cfg = PPOConfig(ppo_batch_size=4, ppo_minibatch_size=2, ppo_max_new_tokens=6, ppo_epochs=1, samples_per_prompt=2)
    per_prompt_offset = {"What is two plus two?": 1000.0, "Why is the sky blue?": -1000.0}

    def offset_score(messages, texts):  # a huge per-prompt level, as a Bradley-Terry model may well have
        return [per_prompt_offset[m[-1]["content"]] + len(t) / 10.0 for m, t in zip(messages, texts)]

    trainer = build(tiny_model_dir, tokenizer, score_fn=offset_score, cfg=cfg)
    pool = [[{"role": "user", "content": text}] for text in per_prompt_offset]
    prompts = trainer.sample_prompts(pool)
    assert len(prompts) == 4 and prompts[0] == prompts[1] and prompts[2] == prompts[3] and prompts[0] != prompts[2]
    torch.manual_seed(0)
    rollout = trainer.rollout(prompts)
    scored = trainer.score(rollout)
    assert scored.scores.abs().min() > 900  # the raw scores are logged as they are
    # ...but only the difference between a prompt's answers reaches the returns: no 1000-sized targets
    assert scored.returns.abs().max() < 50


# ---- rollouts another engine sampled: targets from each minibatch's first forward ---------------------------------

GROUPED_CFG = PPOConfig(ppo_batch_size=4, ppo_minibatch_size=2, ppo_max_new_tokens=6, ppo_epochs=2, ppo_lr=1e-2,
                        samples_per_prompt=2, target_approx_kl=0.0)
GROUPED_POOL = [[{"role": "user", "content": "What is two plus two?"}],
                [{"role": "user", "content": "Why is the sky blue?"}]]


def as_if_sampled_elsewhere(trainer, rollout):
    """The rollout as llama.cpp hands it over: with the sampler's log-probs of its own tokens (here the policy's
    own, as PyTorch computes them before the update, which is what a matching engine reports)."""
    with torch.no_grad():
        _, logprobs, _ = trainer._logprobs(rollout, with_values=False)
    return replace(rollout, sampler_logprobs=logprobs.clone())


def test_minibatches_keep_each_prompts_answers_together(tiny_model_dir, tokenizer):
    trainer = build(tiny_model_dir, tokenizer, cfg=GROUPED_CFG)
    torch.manual_seed(0)
    rollout = trainer.rollout(trainer.sample_prompts(GROUPED_POOL))
    row_prompt, _ = same_prompt_rows(rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    for _ in range(5):  # a fresh order each time
        batches = trainer._minibatches(rollout)
        assert sorted(r for mb in batches for r in mb.tolist()) == [0, 1, 2, 3]
        assert all(len(set(row_prompt[mb].tolist())) == 1 for mb in batches)  # one prompt, both its answers


def test_another_engines_rollout_gets_its_old_logprobs_from_each_minibatchs_first_forward(tiny_model_dir, tokenizer):
    trainer = build(tiny_model_dir, tokenizer, cfg=GROUPED_CFG)
    perturb_policy(trainer)
    torch.manual_seed(0)
    rollout = as_if_sampled_elsewhere(trainer, trainer.rollout(trainer.sample_prompts(GROUPED_POOL)))
    before = rollout.sampler_logprobs  # (B, R) the policy before any step
    with torch.no_grad(), trainer.policy.peft_model.disable_adapter():
        _, reference, _ = trainer._logprobs(rollout, with_values=False)
    trainer._activate_policy()

    scored = trainer.score(rollout)
    assert not scored.fixed.any() and torch.isnan(scored.old_logprobs).all()  # no old pass over the batch
    stats = trainer.update(rollout, scored)

    mask = rollout.response_mask.bool()
    assert scored.fixed.all() and torch.isfinite(scored.advantages[mask]).all() and stats["epochs"] == 2.0
    torch.testing.assert_close(scored.ref_logprobs[mask], reference[mask], rtol=0, atol=1e-5)
    row_prompt, _ = same_prompt_rows(rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    as_sampled = [bool((scored.old_logprobs[r][mask[r]] - before[r][mask[r]]).abs().max() < 1e-5) for r in range(4)]
    # the first minibatch (one prompt's two answers) saw the policy that sampled; the second saw it one step on
    assert sum(as_sampled) == 2 and len({int(row_prompt[r]) for r in range(4) if as_sampled[r]}) == 1, as_sampled
    assert scored.sampler_kl is not None and scored.sampler_kl != 0.0


@pytest.mark.parametrize("target_approx_kl, epochs", [(0.0, 2.0), (1e-6, 1.0)], ids=["stop-off", "tiny-target"])
def test_another_engines_rollout_stops_the_epochs_on_drift_from_the_sampler(tiny_model_dir, tokenizer,
                                                                           target_approx_kl, epochs):
    """The first epoch's forwards all see a ratio of 1 against their own proximal policy, so the early stop must
    measure the drift from the policy that sampled (its log-probs, as the sampler reported them) to fire at all."""
    trainer = build(tiny_model_dir, tokenizer, cfg=replace(GROUPED_CFG, target_approx_kl=target_approx_kl))
    perturb_policy(trainer)
    torch.manual_seed(0)
    rollout = as_if_sampled_elsewhere(trainer, trainer.rollout(trainer.sample_prompts(GROUPED_POOL)))
    stats = trainer.update(rollout, trainer.score(rollout))
    assert stats["epochs"] == epochs


@pytest.mark.parametrize("elsewhere", [False, True], ids=["pytorch-sampled", "llamacpp-like"])
def test_a_reward_of_zero_leaves_a_fresh_policy_exactly_where_it_was(tiny_model_dir, tokenizer, elsewhere):
    """A fresh policy is the reference, so its KL is 0 on every token; with a reward of 0 too, nothing may move
    it: whitening would blow up any rounding difference between its log-probs and the reference's into steps.
    In bf16, the trainer's default on this CPU. On the embedded model a row's bf16 log-probs changed with the rows
    batched with it, and a reference pass over the whole batch against the minibatch's forward let the zero
    reward of bench/ppo_iteration.py move the policy to KL 0.1-0.9 in 7 iterations; the tiny model rounds alike
    in both batchings, so this test does not see that case (the reference runs on the minibatch in `update`)."""
    trainer = build(tiny_model_dir, tokenizer, score_fn=lambda messages, texts: [0.0] * len(texts),
                    cfg=replace(GROUPED_CFG, relevance_coef=0.0), quantization="bf16")  # no on-topic term either
    lora = models.lora_parameters(trainer.policy.peft_model, models.POLICY_ADAPTER)
    before = snapshot(lora)
    torch.manual_seed(0)
    rollout = trainer.rollout(trainer.sample_prompts(GROUPED_POOL))
    if elsewhere:
        rollout = as_if_sampled_elsewhere(trainer, rollout)
    scored = trainer.score(rollout)
    trainer.update(rollout, scored)
    assert (scored.kl == 0).all(), scored.kl
    assert all(torch.equal(p.detach(), before[n]) for n, p in lora.items())


@pytest.mark.parametrize("elsewhere", [False, True], ids=["pytorch-sampled", "llamacpp-like"])
def test_the_more_on_topic_of_a_prompts_answers_gets_the_more_reward(tiny_model_dir, tokenizer, elsewhere):
    """The on-topic term: each answer's reference PMI against another question of the batch (never its own
    prompt's twin row, which would read 0), centred per prompt, times --relevance-coef; the reward model's
    score is 0 here, so the term is all the reward. Measured under the reference, not the (perturbed) policy."""
    cfg = replace(GROUPED_CFG, relevance_coef=2.0, reward_scaling=False)
    trainer = build(tiny_model_dir, tokenizer, score_fn=lambda messages, texts: [0.0] * len(texts), cfg=cfg)
    perturb_policy(trainer, std=0.2)
    torch.manual_seed(0)
    rollout = trainer.rollout(trainer.sample_prompts(GROUPED_POOL))  # rows: A, A, B, B
    if elsewhere:
        rollout = as_if_sampled_elsewhere(trainer, rollout)
    scored = trainer.score(rollout)
    if elsewhere:
        assert scored.relevance.isnan().all()  # filled in by the update's reference pass, minibatch by minibatch
        trainer.update(rollout, scored)

    model, P = trainer.policy.peft_model, rollout.prompt_length
    prompts = [ids[keep.bool()].tolist() for ids, keep in zip(rollout.input_ids[:, :P], rollout.attention_mask[:, :P])]
    answers = [ids[keep.bool()].tolist() for ids, keep in zip(rollout.input_ids[:, P:], rollout.response_mask)]
    order = [0, 2, 1, 3]  # A, B, A, B: the gate's PMI compares each answer with the next row's prompt
    with torch.no_grad(), model.disable_adapter():
        pmi = relevance_pmi(model, [prompts[i] for i in order], [answers[i] for i in order],
                            tokenizer.pad_token_id, others=1)
    expected = torch.zeros(4)
    expected[order] = torch.tensor(pmi)
    assert expected.abs().min() > 1e-3  # every answer was compared with the other question
    assert torch.allclose(scored.relevance, expected, atol=1e-4)
    centred = expected - expected.view(2, 2).mean(1).repeat_interleave(2)
    assert torch.allclose(scored.terminal.cpu(), 2.0 * centred, atol=1e-4)
    assert (scored.terminal[0] > scored.terminal[1]) == bool(expected[0] > expected[1])  # the likelier-here answer

    trainer.cfg = replace(cfg, relevance_coef=0.0)  # off: no term, no reference pass for it
    off = trainer.score(rollout)
    assert off.relevance is None and off.elsewhere is None and torch.equal(off.terminal.cpu(), torch.zeros(4))


# ---- issue 11: the KL leash --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory):
    """The tiny model with its (tied) embeddings scaled up 3x. The plain tiny model's logits are nearly flat
    (entropy ~ log V), so no adapter can move it far from the reference; this one PPO can push away."""
    from tiny_model import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("sharp") / "model"
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def marker_reward_run(sharp_model_dir, seed: int, target: float):
    """(free, leashed) IterationStats: 10 PPO iterations on a marker reward under a weak fixed KL penalty, then 10
    with the leash as the defaults run it."""
    from rlhf_online.rl_math import FixedKLController, LogBetaPIController

    tokenizer = models.load_tokenizer(str(sharp_model_dir))
    base = models.load_base_model(str(sharp_model_dir), "nf4", for_training=True).model
    torch.manual_seed(seed)
    peft = models.attach_lora(base, MODEL_CFG)
    cfg = PPOConfig(ppo_batch_size=32, ppo_minibatch_size=8, ppo_max_new_tokens=12, ppo_lr=1e-2, samples_per_prompt=4,
                    init_kl_coef=0.01, min_kl_coef=0.01, target_kl=target, kl_controller="pi", kl_shrink=False,
                    target_approx_kl=0.0)

    def marker_reward(messages, texts):  # pays for every "it" (a frequent token of this model) in the answer
        return [float(t.count("it")) for t in texts]

    trainer = PPOTrainer(PolicyWithValue(peft), tokenizer, marker_reward, cfg,
                         SamplingConfig(temperature=1.0, top_p=1.0), seed=seed)
    torch.manual_seed(seed)
    trainer.kl_ctl = FixedKLController(0.01)  # no leash: a weak fixed penalty
    free = [trainer.iteration(trainer.sample_prompts(PROMPTS)) for _ in range(10)]
    cfg.kl_shrink, cfg.target_approx_kl = True, 0.02  # the leash, as the defaults run it
    trainer.kl_ctl = LogBetaPIController(kl_coef=0.01, target_kl=target, min_kl_coef=0.01)
    leashed = [trainer.iteration(trainer.sample_prompts(PROMPTS)) for _ in range(10)]
    return free, leashed


def test_a_marker_reward_drives_kl_up_and_the_leash_brings_it_back(sharp_model_dir):
    """Five seeds. One seed's 20 iterations are chaotic: a float-level change to the forward pass (such as running
    each prompt once) sends the sampling down another path. Measured on seeds 0-9 with three forwards that are
    equal up to rounding (one padded batch; each prompt alone; prompts in length buckets): the KL came back under
    the target within the 10 leashed iterations on every seed (the largest minimum 0.77, target 1.0), but within
    the first 6 on 9, 8 and 5 of 10 seeds: that window is a coin flip here, so the check takes all 10. The KL of
    the last 5 leashed iterations averaged 0.35-0.45 of the unleashed KL; the paid reward rose on 6-8 of 10 seeds,
    so its check is on the mean over the seeds."""
    target = 1.0
    runs = [marker_reward_run(sharp_model_dir, seed, target) for seed in range(5)]
    for free, leashed in runs:
        kls = [s.kl for s in leashed]
        assert free[-1].kl > 2 * target, [s.kl for s in free]  # the marker reward pulled the policy away
        assert min(kls) <= target, kls  # the leash brought it back under the target
        assert leashed[0].kl_shrink < 1.0 and max(s.kl_coef for s in leashed) > 0.05  # both parts of the leash acted
    assert mean([sum(s.mean_score for s in free[-3:]) for free, _ in runs]) > \
        mean([sum(s.mean_score for s in free[:3]) for free, _ in runs])  # the reward it was paid rose
    held = [sum(s.kl for s in leashed[-5:]) / 5 for _, leashed in runs]
    assert mean(held) < 0.6 * mean([free[-1].kl for free, _ in runs]), held  # and held well below where it had run

"""Tests for rlhf_online.rl_math: hand-computed numbers on tiny tensors, plus properties of the RL math.

Expected values are written out as literals (worked by hand in the comments), never by re-running the formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_online.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    PolicyLossStats,
    ValueLossStats,
    bradley_terry_loss,
    dpo_loss,
    kl_shrink_factor,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    kl_k1,
    kl_k3,
    length_penalty,
    make_kl_controller,
    LogBetaPIController,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    bootstrap_accuracy_ci,
    length_balanced_mask,
    pearson_correlation,
    preference_accuracy,
    sampler_mismatch,
    truncated_importance_weights,
)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def close(actual, expected, atol=1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), expected, atol=atol, rtol=0)


def random_batch(seed: int, B: int = 4, T: int = 7):
    """Random (B, T) rewards/values with right-padded masks of lengths T, T-2, 1 and 0 (an empty row)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, T - 2, 1, 0][:B])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)  # (B, T)
    return rewards, values, mask


# ---------------------------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------------------------

VALS = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
MASK = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # counted entries: {1, 2, 4}


def test_masked_mean_hand_computed():
    close(masked_mean(t(VALS), t(MASK)), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(t(VALS), t(MASK), dim=1), [1.5, 4.0])  # (1+2)/2, 4/1
    close(masked_mean(t(VALS), t(MASK).bool()), 7 / 3)  # bool masks work too


def test_masked_mean_empty_mask_is_zero_not_nan():
    close(masked_mean(t([[1.0, 2.0]]), t([[0.0, 0.0]])), 0.0)


def test_masked_var_hand_computed():
    # mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    close(masked_var(t(VALS), t(MASK), unbiased=False), 42 / 9 / 3)  # 14/9
    close(masked_var(t(VALS), t(MASK), unbiased=True), 42 / 9 / 2)  # 7/3


def test_masked_var_single_entry_is_zero():
    close(masked_var(t([[3.0, 9.0]]), t([[1.0, 0.0]])), 0.0)


def test_masked_whiten_hand_computed():
    # counted entries {1, 3}: mean 2, unbiased var (1 + 1) / 1 = 2, std sqrt(2); padded 100 -> 0
    values, mask = t([[1.0, 3.0, 100.0]]), t([[1.0, 1.0, 0.0]])
    s = 1 / math.sqrt(2)  # 0.70710678
    close(masked_whiten(values, mask, eps=0.0), [[-s, s, 0.0]])  # eps=0: exact hand numbers
    close(masked_whiten(values, mask, shift_mean=False, eps=0.0), [[2 - s, 2 + s, 0.0]])
    close(masked_whiten(values, mask), [[-s, s, 0.0]], atol=1e-8)  # default eps=1e-8 barely moves them


def test_masked_whiten_property_mean0_std1_on_masked_entries():
    values, _, mask = random_batch(0)
    values = values * 5 + 3
    w = masked_whiten(values, mask)
    sel = w[mask.bool()]
    close(sel.mean(), 0.0)
    close(sel.std(unbiased=True), 1.0, atol=1e-6)  # eps=1e-8 inside the rsqrt
    assert torch.all(w[~mask.bool()] == 0)


# ---------------------------------------------------------------------------------------------------------------
# Bradley-Terry
# ---------------------------------------------------------------------------------------------------------------

# -logsigmoid(2) = log(1 + e^-2) = log(1.1353352832) = 0.1269280110 ; -logsigmoid(0) = log 2 = 0.6931471806
LS2 = 0.1269280110
LOG2 = 0.6931471806


def test_bradley_terry_loss_hand_computed():
    rc, rr = t([2.0, 0.0]), t([0.0, 0.0])
    close(bradley_terry_loss(rc, rr), (LS2 + LOG2) / 2)  # 0.4100375958
    # weights [3, 1]: (3 * 0.1269280110 + 0.6931471806) / 4 = 0.2684828034
    close(bradley_terry_loss(rc, rr, weights=t([3.0, 1.0])), 0.2684828034)
    # weights are normalised by their sum: scaling them changes nothing
    close(bradley_terry_loss(rc, rr, weights=t([30.0, 10.0])), 0.2684828034)


def test_dpo_loss_is_bradley_terry_on_beta_times_the_log_ratio_to_the_reference():
    # the policy equals the reference: implicit rewards 0, loss log 2, whatever the log-probs are
    close(dpo_loss(t([-30.0]), t([-12.0]), t([-30.0]), t([-12.0]), beta=0.1), LOG2)
    # chosen gained 10 nats over the reference, rejected lost 10: margin 0.1 * (10 + 10) = 2 -> -logsigmoid(2)
    close(dpo_loss(t([-20.0]), t([-22.0]), t([-30.0]), t([-12.0]), beta=0.1), LS2)
    # only the change from the reference counts: the same policy with the preference reversed in the reference
    close(dpo_loss(t([-20.0]), t([-22.0]), t([-20.0]), t([-22.0]), beta=0.1), LOG2)


def test_bradley_terry_loss_gradient_separates_scores():
    rc, rr = t([0.5]).requires_grad_(), t([0.0]).requires_grad_()
    bradley_terry_loss(rc, rr).backward()
    assert rc.grad.item() < 0 < rr.grad.item()  # descent raises chosen, lowers rejected


def test_bradley_terry_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(3, 1), torch.zeros(3))


def test_preference_accuracy_counts_ties_as_half():
    # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert preference_accuracy(t([1.0, 2.0, 3.0, 0.0]), t([0.0, 2.0, 4.0, -1.0])) == pytest.approx(0.625)


def test_bootstrap_interval_contains_the_accuracy_and_narrows_with_more_pairs():
    g = torch.Generator().manual_seed(0)
    few = torch.rand(50, generator=g) < 0.7  # about 70% of pairs ordered right
    many = torch.rand(2000, generator=g) < 0.7
    intervals = []
    for right in (few, many):
        chosen, rejected = right.double(), (~right).double()
        low, high = bootstrap_accuracy_ci(chosen, rejected)
        assert low <= preference_accuracy(chosen, rejected) <= high
        intervals.append(high - low)
    assert intervals[1] < intervals[0] / 3  # sqrt(2000 / 50) = 6.3x narrower in theory
    assert bootstrap_accuracy_ci(t([1.0] * 10), t([0.0] * 10)) == (1.0, 1.0)  # no spread when all agree


def test_length_balanced_pairs_are_within_twenty_percent():
    # 100 vs 85 (15% apart) and 10 vs 10 are balanced; 100 vs 70 and 5 vs 4 (20% of 5 is 1: the edge) ...
    mask = length_balanced_mask(t([100, 10, 100, 5, 3]), t([85, 10, 70, 4, 1]))
    assert mask.tolist() == [True, True, False, True, False]


def test_pearson_correlation_hand_computed_and_undefined_for_a_constant():
    assert pearson_correlation(t([1, 2, 3]), t([2, 4, 6])) == pytest.approx(1.0)
    assert pearson_correlation(t([1, 2, 3]), t([3, 1, 2])) == pytest.approx(-0.5)  # cov -1 / (sqrt2 sqrt2)
    assert math.isnan(pearson_correlation(t([1, 1, 1]), t([1, 2, 3])))


# ---------------------------------------------------------------------------------------------------------------
# KL estimators and per-token rewards
# ---------------------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_computed():
    lp, ref = t([-1.0, -2.0, -0.3]), t([-1.5, -1.0, -0.3])
    close(kl_k1(lp, ref), [0.5, -1.0, 0.0])
    # log r = ref - lp = [-0.5, 1, 0]; k3 = e^{log r} - 1 - log r
    # e^-0.5 - 1 + 0.5 = 0.6065306597 - 0.5 = 0.1065306597 ; e - 1 - 1 = 0.7182818285 ; 0
    close(kl_k3(lp, ref), [0.1065306597, 0.7182818285, 0.0])


def test_kl_k3_is_nonnegative():
    g = torch.Generator().manual_seed(1)
    assert torch.all(kl_k3(torch.randn(100, generator=g), torch.randn(100, generator=g)) >= 0)


def test_per_token_rewards_hand_computed_rows_of_different_lengths():
    kl_coef = 0.1
    logprobs = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0], [0.0, 0.0, 0.0]])
    ref = t([[-1.5, -1.0, -0.5], [-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # lengths 3, 1, 0
    score = t([1.0, 2.0, 5.0])
    rewards, kl = per_token_rewards(score, logprobs, ref, mask, kl_coef)
    # k1 = lp - ref: row0 [0.5, 0, -0.5]; row1 [-1, (0), (1)] masked; row2 all masked
    close(kl, [[0.5, 0.0, -0.5], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # row0: [-0.05, 0, 0.05 + score 1]; row1: [0.1 + score 2, 0, 0]; row2 (empty): nothing, score dropped
    close(rewards, [[-0.05, 0.0, 1.05], [2.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # bool mask gives the same result
    rewards_b, _ = per_token_rewards(score, logprobs, ref, mask.bool(), kl_coef)
    close(rewards_b, rewards)


def test_per_token_rewards_score_lands_on_last_valid_token():
    B, T = 4, 6
    lengths = torch.tensor([6, 3, 1, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # (B, T)
    zeros = torch.zeros(B, T)
    score = torch.tensor([10.0, 20.0, 30.0, 40.0])
    rewards, _ = per_token_rewards(score, zeros, zeros, mask, kl_coef=0.5)  # zero KL: only the score remains
    for b in range(B):
        expected = torch.zeros(T)
        expected[lengths[b] - 1] = score[b]
        assert torch.equal(rewards[b], expected), b


# ---------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------


def test_gae_hand_computed():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = t([[0.5, 0.6, 0.7], [1.0, 0.5, 42.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    # row 0 (bootstrap 0 after t=2):
    #   t=2: delta = 1 - 0.7 = 0.3;                       A = 0.3
    #   t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03;            A = 0.03 + 0.45*0.3   = 0.165
    #   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04;            A = 0.04 + 0.45*0.165 = 0.11425
    # row 1 (t=2 is padding: its 99 reward and 42 value must not leak):
    #   t=1: delta = 2 + 0 - 0.5 = 1.5;                   A = 1.5
    #   t=0: delta = 0 + 0.9*0.5 - 1 = -0.55;             A = -0.55 + 0.45*1.5 = 0.125
    close(adv, [[0.11425, 0.165, 0.3], [0.125, 1.5, 0.0]])
    # returns = A + V: [0.61425, 0.765, 1.0], [1.125, 2.0, 0 (masked)]
    close(ret, [[0.61425, 0.765, 1.0], [1.125, 2.0, 0.0]])


def test_gae_lam1_gamma1_is_reward_to_go_minus_value():
    rewards, values, mask = random_batch(2)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    r = rewards * mask
    reward_to_go = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1])  # sum_{k >= t} r_k
    close(adv, (reward_to_go - values) * mask)
    close(ret, reward_to_go * mask)


def test_gae_lam0_is_one_step_td():
    rewards = t([[1.0, 2.0, 3.0]])
    values = t([[0.5, 1.0, 1.5]])
    mask = t([[1, 1, 1]])
    adv, _ = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.0)
    # delta_t: 1 + 0.5*1 - 0.5 = 1.0 ; 2 + 0.5*1.5 - 1 = 1.75 ; 3 + 0 - 1.5 = 1.5
    close(adv, [[1.0, 1.75, 1.5]])


def test_gae_ignores_rewards_and_values_in_masked_positions():
    rewards, values, mask = random_batch(3)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.99, lam=0.95)
    junk = torch.full_like(rewards, 1e3)
    pad = ~mask.bool()
    adv2, ret2 = gae_advantages(
        torch.where(pad, junk, rewards), torch.where(pad, -junk, values), mask, gamma=0.99, lam=0.95
    )
    close(adv2, adv)
    close(ret2, ret)
    assert torch.all(adv[pad] == 0) and torch.all(ret[pad] == 0)


# ---------------------------------------------------------------------------------------------------------------
# PPO policy loss
# ---------------------------------------------------------------------------------------------------------------


def test_clipped_policy_loss_hand_computed():
    eps = 0.2
    old = t([[0.0, 0.0, 0.0]])
    new = t([[math.log(1.5), math.log(0.9), math.log(3.0)]])  # ratios 1.5, 0.9, 3.0
    adv = t([[1.0, -2.0, 5.0]])
    mask = t([[1, 1, 0]])
    loss, stats = clipped_policy_loss(new, old, adv, mask, eps)
    # tok0: pg1 = -1*1.5 = -1.5, pg2 = -1*1.2 = -1.2 -> max -1.2 (clipped)
    # tok1: pg1 = 2*0.9 = 1.8,   pg2 = 2*0.9 = 1.8   -> 1.8 (inside the clip range)
    # tok2: masked.  loss = (-1.2 + 1.8) / 2 = 0.3
    close(loss, 0.3)
    assert isinstance(stats, PolicyLossStats)
    assert stats.clip_fraction == pytest.approx(0.5)  # |0.5| > 0.2 yes, |-0.1| no
    # approx_kl = mean((r - 1) - log r): (0.5 - 0.4054651081) = 0.0945348919 ; (-0.1 + 0.1053605157) = 0.0053605157
    assert stats.approx_kl == pytest.approx(0.0499477038, abs=1e-8)


def test_importance_weights_correct_toward_the_trainer_and_are_capped():
    trainer = t([[math.log(0.5), math.log(0.2), math.log(0.9), 0.0]])
    sampler = t([[math.log(0.5), math.log(0.4), math.log(0.3), float("nan")]])  # last: not reported
    mask = t([[1, 1, 1, 0]])
    weights, capped = truncated_importance_weights(trainer, sampler, mask, cap=2.0)
    close(weights, [[1.0, 0.5, 2.0, 1.0]])  # ratio 1; 0.5; 3 capped at 2; unknown weighs 1
    assert capped == pytest.approx(1 / 3)


def test_importance_weights_scale_each_tokens_policy_loss():
    old = t([[0.0, 0.0]])
    new = t([[math.log(1.1), math.log(1.1)]])
    adv = t([[1.0, 1.0]])
    mask = t([[1, 1]])
    plain, _ = clipped_policy_loss(new, old, adv, mask, 0.2)
    weighted, _ = clipped_policy_loss(new, old, adv, mask, 0.2, weights=t([[0.5, 0.0]]))
    close(plain, -1.1)
    close(weighted, -1.1 * 0.5 / 2)  # the second token no longer counts; the mean is still over both


def test_sampler_mismatch_is_the_k1_kl_over_known_tokens():
    sampler = t([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5]])
    trainer = t([[-1.5, -1.0, -3.0], [-0.5, -0.7, -0.1]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # known & masked: (0.5, -1.0) and (0.0, 0.2) -> mean (0.5 - 1.0 + 0.0 + 0.2) / 4
    assert sampler_mismatch(sampler, trainer, mask) == pytest.approx(-0.075)
    assert sampler_mismatch(sampler, sampler, mask) == 0.0


def test_sampler_drift_is_the_k3_kl_over_known_tokens():
    from rlhf_online.rl_math import sampler_drift

    sampler = t([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5]])
    trainer = t([[-1.5, -1.0, -3.0], [-0.5, -0.7, -0.1]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # k3 = exp(d) - 1 - d with d = trainer - sampler, over the 4 known masked tokens: d = -0.5, 1.0, 0.0, -0.2
    expected = sum(math.exp(d) - 1 - d for d in (-0.5, 1.0, 0.0, -0.2)) / 4
    assert sampler_drift(sampler, trainer, mask) == pytest.approx(expected)
    assert sampler_drift(sampler, sampler, mask) == 0.0
    assert sampler_drift(t([[float("nan")]]), t([[-1.0]]), t([[1]])) == 0.0  # nothing known


def test_policy_loss_stats_are_frozen():
    z = torch.zeros(1, 2)
    _, stats = clipped_policy_loss(z, z, z, torch.ones(1, 2), 0.2)
    with pytest.raises(Exception):
        stats.approx_kl = 1.0  # type: ignore[misc]
    assert stats.approx_kl == 0.0 and stats.clip_fraction == 0.0


def _policy_grad(new_lp: float, adv: float, eps: float = 0.2) -> float:
    new = torch.tensor([[new_lp]], dtype=torch.float64, requires_grad=True)
    loss, _ = clipped_policy_loss(new, t([[0.0]]), t([[adv]]), t([[1.0]]), eps)
    loss.backward()
    return new.grad.item()


def test_policy_loss_gradient_sign():
    # at ratio 1: d loss / d logprob = -A * ratio; descent raises logprob for A > 0, lowers it for A < 0
    assert _policy_grad(0.0, adv=2.0) == pytest.approx(-2.0)
    assert _policy_grad(0.0, adv=-2.0) == pytest.approx(2.0)


def test_policy_loss_zero_grad_outside_clip_region_in_direction_of_advantage():
    assert _policy_grad(math.log(1.5), adv=1.0) == 0.0  # already raised past 1 + eps
    assert _policy_grad(math.log(0.5), adv=-1.0) == 0.0  # already lowered past 1 - eps
    # ...but the pessimistic max keeps the gradient when the ratio went the WRONG way
    assert _policy_grad(math.log(0.5), adv=1.0) == pytest.approx(-0.5)  # -A * ratio
    assert _policy_grad(math.log(1.5), adv=-1.0) == pytest.approx(1.5)


def test_policy_loss_is_flat_beyond_clip():
    eps = 0.2
    losses = []
    for r in (1.3, 1.6, 4.0):
        loss, _ = clipped_policy_loss(t([[math.log(r)]]), t([[0.0]]), t([[1.0]]), t([[1.0]]), eps)
        losses.append(loss.item())
    assert losses == pytest.approx([-1.2, -1.2, -1.2])


def test_policy_loss_ignores_masked_tokens():
    new = t([[0.1, 5.0]]).requires_grad_()
    loss, stats = clipped_policy_loss(new, t([[0.0, 0.0]]), t([[1.0, 100.0]]), t([[1.0, 0.0]]), 0.2)
    loss.backward()
    assert new.grad[0, 1].item() == 0.0
    assert stats.clip_fraction == 0.0  # the masked token's ratio e^5 is not counted


# ---------------------------------------------------------------------------------------------------------------
# PPO value loss and explained variance
# ---------------------------------------------------------------------------------------------------------------


def test_clipped_value_loss_hand_computed():
    eps = 0.2
    old = t([[1.0, 1.0, 0.0]])
    new = t([[1.5, 0.9, 7.0]]).requires_grad_()
    returns = t([[2.0, 0.0, 3.0]])
    mask = t([[1, 1, 0]])
    loss, stats = clipped_value_loss(new, old, returns, mask, eps)
    # tok0: unclipped (1.5-2)^2 = 0.25; v_clipped = 1 + 0.2 = 1.2 -> (1.2-2)^2 = 0.64; max 0.64 (clipped branch)
    # tok1: unclipped (0.9-0)^2 = 0.81; v_clipped = 0.9 (inside) -> 0.81
    # loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625
    close(loss, 0.3625)
    assert isinstance(stats, ValueLossStats)
    assert stats.value_clip_fraction == pytest.approx(0.5)
    loss.backward()
    # tok0: clipped branch active -> no gradient; tok1: 0.5 * (1/2) * 2 * (0.9 - 0) = 0.45; tok2 masked
    close(new.grad, [[0.0, 0.45, 0.0]])


def test_value_clipping_only_binds_when_it_is_pessimistic():
    def grad(new_v: float, old_v: float, ret: float) -> float:
        new = t([[new_v]]).requires_grad_()
        loss, _ = clipped_value_loss(new, t([[old_v]]), t([[ret]]), t([[1.0]]), 0.2)
        loss.backward()
        return new.grad.item()

    # moved 0.5 towards a target at 1.6: clipped error (1.2-1.6)^2 = 0.16 > 0.01 -> clipped, no further pull
    assert grad(1.5, 1.0, 1.6) == 0.0
    # moved 0.5 away from a target at 0: unclipped 2.25 > clipped 1.44 -> gradient 0.5 * 2 * 1.5 = 1.5
    assert grad(1.5, 1.0, 0.0) == pytest.approx(1.5)


def test_explained_variance_hand_computed():
    mask = t([[1, 1, 1, 0]])
    returns = t([[1.0, 2.0, 3.0, 50.0]])
    assert explained_variance(t([[1.0, 2.0, 3.0, -9.0]]), returns, mask) == pytest.approx(1.0)  # perfect critic
    assert explained_variance(t([[2.0, 2.0, 2.0, 0.0]]), returns, mask) == pytest.approx(0.0)  # constant
    # residual [0, 0, -1]: var = (1/9 + 1/9 + 4/9) / 2 = 1/3 ; var(returns) = 1 -> 1 - 1/3
    assert explained_variance(t([[1.0, 2.0, 4.0, 0.0]]), returns, mask) == pytest.approx(2 / 3)
    # residual [2, 0, -2]: var 4 -> 1 - 4 = -3 (worse than a constant)
    assert explained_variance(t([[-1.0, 2.0, 5.0, 0.0]]), returns, mask) == pytest.approx(-3.0)


def test_explained_variance_nan_for_constant_returns():
    assert math.isnan(explained_variance(t([[0.0, 1.0]]), t([[2.0, 2.0]]), t([[1, 1]])))


# ---------------------------------------------------------------------------------------------------------------
# KL controllers and length penalty
# ---------------------------------------------------------------------------------------------------------------


def test_adaptive_kl_hand_computed():
    ctl = AdaptiveKLController(kl_coef=0.1, target_kl=6.0, horizon=10000)
    # KL 6.6: error 0.1 -> 0.1 * (1 + 0.1 * 256 / 10000) = 0.1 * 1.00256
    assert ctl.update(6.6, 256) == pytest.approx(0.100256)
    assert ctl.kl_coef == pytest.approx(0.100256)


def test_adaptive_kl_direction_and_bounds():
    ctl = AdaptiveKLController(kl_coef=0.1, target_kl=6.0, horizon=10000)
    # KL 9 -> error 0.5 clipped to 0.2 -> x(1 + 0.2 * 256/10000) = x1.00512
    assert ctl.update(9.0, 256) == pytest.approx(0.100512)
    ctl = AdaptiveKLController(kl_coef=0.1, target_kl=6.0, horizon=10000)
    # KL 3 -> error -0.5 clipped to -0.2 -> x0.99488
    assert ctl.update(3.0, 256) == pytest.approx(0.099488)
    # a full horizon moves beta by at most +-20%, however far off the KL is
    assert AdaptiveKLController(1.0, 6.0, 100).update(1e9, 100) == pytest.approx(1.2)
    assert AdaptiveKLController(1.0, 6.0, 100).update(0.0, 100) == pytest.approx(0.8)
    # on target: unchanged
    assert AdaptiveKLController(1.0, 6.0, 100).update(6.0, 100) == pytest.approx(1.0)


def test_adaptive_kl_rejects_bad_config():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 100)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 6.0, 0)


def test_fixed_kl_controller_and_factory():
    ctl = FixedKLController(kl_coef=0.05)
    assert ctl.update(100.0, 1000) == 0.05 and ctl.kl_coef == 0.05
    assert isinstance(make_kl_controller(0.05, None, 10000), FixedKLController)
    adaptive = make_kl_controller(0.05, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.horizon == 10000


def test_length_penalty_hand_computed():
    # excess over 20: [0, 0, 15] -> -0.1 * [0, 0, 15]
    close(length_penalty(torch.tensor([10, 20, 35]), 20, 0.1), [0.0, 0.0, -1.5])
    close(length_penalty(t([25.0]), 20.0, 2.0), [-10.0])


def test_center_per_prompt_subtracts_each_prompts_mean():
    from rlhf_online.rl_math import center_per_prompt

    scores = torch.tensor([1.0, 3.0, 10.0, 14.0, 5.0])
    groups = torch.tensor([7, 7, 2, 2, 9])  # two prompts answered twice, one answered once
    centered = center_per_prompt(scores, groups)
    assert torch.allclose(centered, torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0]))
    # a shift of one prompt's scores (which a Bradley-Terry model cannot identify) changes nothing
    shifted = scores + torch.tensor([100.0, 100.0, 0.0, 0.0, -3.0])
    assert torch.allclose(center_per_prompt(shifted, groups), centered)


def test_running_moments_match_the_whole_sample_and_scale_without_shifting():
    from rlhf_online.rl_math import RunningMoments

    moments = RunningMoments()
    assert moments.std == 1.0  # nothing seen yet: scaling is the identity
    moments.update(torch.tensor([1.0, 2.0]))
    moments.update(torch.tensor([3.0, 4.0, 10.0]))
    assert moments.count == 5 and moments.mean == pytest.approx(4.0)
    # sample std of [1, 2, 3, 4, 10]: deviations -3 -2 -1 0 6, squares sum 50, / 4
    assert moments.std == pytest.approx(math.sqrt(12.5))
    scaled = RunningMoments().scale(torch.tensor([-2.0, 0.0, 2.0]))  # std 2
    assert torch.allclose(scaled, torch.tensor([-1.0, 0.0, 1.0]))


# ---- issue 11: the KL leash ---------------------------------------------------------------------------------

def test_log_beta_pi_controller_hand_computed():
    ctl = LogBetaPIController(kl_coef=0.1, target_kl=6.0, kp=0.5, ki=0.25)
    # KL twice the target: e = ln 2, I = ln 2 -> log beta = ln 0.1 + 0.5 ln 2 + 0.25 ln 2 -> 0.1 * 2^0.75
    assert ctl.update(12.0, 8) == pytest.approx(0.1 * 2 ** 0.75)
    # again: I = 2 ln 2 -> ln 0.1 + 0.5 ln 2 + 0.5 ln 2 -> 0.2
    assert ctl.update(12.0, 8) == pytest.approx(0.2)
    # back on target: e = 0, the integral holds beta above where it started -> 0.1 * 2^0.5
    assert ctl.update(6.0, 8) == pytest.approx(0.1 * 2 ** 0.5)
    assert ctl.kl_coef == pytest.approx(0.1 * 2 ** 0.5)


def test_log_beta_pi_controller_floor_ceiling_and_anti_windup():
    from rlhf_online.rl_math import LogBetaPIController

    ctl = LogBetaPIController(kl_coef=0.1, target_kl=6.0, min_kl_coef=0.05, max_kl_coef=5.0)
    for _ in range(50):  # KL far under target for a long time: beta never goes below the floor
        assert ctl.update(0.0) >= 0.05 - 1e-12
    assert ctl.integral > -2.0  # and the integral did not wind up while beta sat on the floor
    for _ in range(3):  # so a burst is met within a few iterations
        ctl.update(18.0)
    assert ctl.kl_coef > 0.1
    for _ in range(100):
        assert ctl.update(1e9) <= 5.0 + 1e-12
    assert ctl.kl_coef == pytest.approx(5.0)
    # the error is a clipped log-ratio: 1e9 nats count like e^1 times the target
    one = LogBetaPIController(kl_coef=0.1, target_kl=6.0)
    assert one.update(1e9) == pytest.approx(0.1 * math.exp((one.kp + one.ki) * 1.0))
    one.reset(0.3)
    assert one.kl_coef == 0.3 and one.integral == 0.0 and one.update(6.0) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        LogBetaPIController(kl_coef=0.1, target_kl=0.0)
    assert isinstance(make_kl_controller(0.1, 6.0, 32, kind="pi"), LogBetaPIController)
    with pytest.raises(ValueError):
        make_kl_controller(0.1, 6.0, 32, kind="bang-bang")


def test_early_stop_of_ppo_epochs_on_approx_kl():
    from rlhf_online.rl_math import should_stop_epochs

    assert not should_stop_epochs([0.01, 0.02], 0.02)  # mean 0.015 < 1.5 * 0.02
    assert should_stop_epochs([0.02, 0.05], 0.02)  # mean 0.035 > 0.03
    assert not should_stop_epochs([1.0], 0.0)  # 0 switches it off
    assert not should_stop_epochs([], 0.02)


def test_kl_shrink_steps_back_only_over_target_and_never_below_its_floor():
    assert kl_shrink_factor(5.0, 6.0) == 1.0 and kl_shrink_factor(9.0, 0.0) == 1.0  # within target / no target
    close(kl_shrink_factor(24.0, 6.0), 0.5)  # sqrt(6 / 24)
    close(kl_shrink_factor(24.0, 6.0, power=0.25), 0.7071067812)  # (1/4) ** 0.25, a gentler step
    close(kl_shrink_factor(600.0, 6.0), 0.5)  # sqrt(0.01) = 0.1, held at the floor: one noisy KL cannot erase it

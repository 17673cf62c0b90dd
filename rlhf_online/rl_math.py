"""The RL math of the app, as pure tensor functions (torch only, no models, no state but the KL controllers).

Written in the spirit of CleanRL's single-file ``ppo.py``: every line of the maths is visible, loss terms carry the
names used in the papers, and shapes are written next to anything that reshapes or indexes.

Conventions
-----------
* Token-level tensors are ``(B, T)``: B sequences, T response tokens (the prompt is *not* included).
* ``mask`` is ``(B, T)``, float or bool, 1 for response tokens that count and 0 for padding after EOS. Masks are
  right-padded prefixes (``1 1 1 0 0``); functions that need "the last token" rely on that.
* Sequence-level tensors (reward-model scores, lengths) are ``(B,)``.

Sources
-------
* PPO clipped surrogate and clipped value loss: Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
  arXiv:1707.06347; implementation details follow CleanRL ``ppo.py`` (Huang et al. 2022).
* GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
  arXiv:1506.02438.
* Per-token KL-shaped reward and the adaptive KL controller: Ziegler et al. 2019, "Fine-Tuning Language Models from
  Human Preferences", arXiv:1909.08593 (also Ouyang et al. 2022, InstructGPT).
* KL estimators k1/k3: John Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
* Bradley-Terry reward-model loss: Bradley & Terry 1952, as used in TRL's ``RewardTrainer``.
* DPO loss: Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "bradley_terry_loss",
    "preference_accuracy",
    "kl_k1",
    "kl_k3",
    "per_token_rewards",
    "gae_advantages",
    "PolicyLossStats",
    "clipped_policy_loss",
    "ValueLossStats",
    "clipped_value_loss",
    "explained_variance",
    "AdaptiveKLController",
    "FixedKLController",
    "LogBetaPIController",
    "make_kl_controller",
    "should_stop_epochs",
    "kl_shrink_factor",
    "length_penalty",
]


# ----------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bool or float mask -> float mask in ``like``'s dtype/device, so it can multiply values."""
    return mask.to(dtype=like.dtype, device=like.device)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over entries where ``mask`` is 1.

    Why: padding after EOS must not dilute token-level losses or statistics; a plain ``.mean()`` would weight a
    batch's losses by how much padding it happens to contain. An all-zero mask yields 0 (not NaN) so that an empty
    batch contributes nothing to a loss instead of poisoning it.
    """
    m = _float_mask(mask, values)
    if dim is None:
        return (values * m).sum() / m.sum().clamp_min(1.0)
    return (values * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over entries where ``mask`` is 1 (a scalar over all masked entries).

    ``unbiased`` applies Bessel's correction n/(n-1), as TRL's ``masked_var`` does. With fewer than two masked
    entries the unbiased variance is undefined; we return 0 so that whitening a one-token batch gives zeros rather
    than NaNs (there is no spread to normalise).
    """
    m = _float_mask(mask, values)
    mean = masked_mean(values, m)
    centered = values - mean
    variance = masked_mean(centered**2, m)
    if unbiased:
        n = m.sum()
        if n < 2:
            return torch.zeros_like(variance)
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``values`` to mean 0 / std 1 over masked entries; masked-out entries come back as 0.

    Why: "advantage normalisation" (CleanRL ``norm_adv``; TRL ``whiten``) makes the policy-gradient step size
    insensitive to the scale of the reward model, which in online RLHF drifts as the reward model is retrained.
    Statistics use only real tokens, otherwise padding zeros would bias the mean towards 0. With
    ``shift_mean=False`` the mean is added back (only the scale is normalised), as TRL does for rewards.
    """
    m = _float_mask(mask, values)
    mean = masked_mean(values, m)
    var = masked_var(values, m, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


# ----------------------------------------------------------------------------------------------------------------
# Reward model (pairwise preferences)
# ----------------------------------------------------------------------------------------------------------------


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    # (B,) - (B, 1) would silently broadcast to (B, B): refuse mismatched shapes.
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return losses.mean()
    w = weights.to(dtype=losses.dtype, device=losses.device)
    # Normalise by the weights' sum so that the loss scale does not depend on how the weights are scaled.
    return (w * losses).sum() / w.sum().clamp_min(torch.finfo(losses.dtype).tiny)


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Negative log-likelihood of the human vote under the Bradley-Terry model.

    Bradley-Terry: P(chosen > rejected) = sigmoid(r_chosen - r_rejected), so the NLL per pair is
    ``-logsigmoid(r_chosen - r_rejected)`` (TRL ``RewardTrainer``). Only score *differences* are identified, which
    is why PPO later whitens advantages rather than trusting the absolute reward. ``logsigmoid`` rather than
    ``log(sigmoid(.))`` for numerical stability at large margins.

    ``weights`` (B,) e.g. down-weight stale or low-confidence votes; the result is ``sum(w * l) / sum(w)``.
    ``label_smoothing`` eps treats each vote as right with probability 1 - eps (the "conservative" loss of DPO
    implementations, e.g. TRL's ``label_smoothing``): the loss stops pushing once the margin reaches
    log((1 - eps) / eps), so a few mislabelled pairs cannot drive the scores apart without bound.
    """
    _check_pair(r_chosen, r_rejected)
    margin = r_chosen - r_rejected  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)  # (B,)
    return _weighted_mean(losses, weights)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's loss: the Bradley-Terry NLL of a vote with the policy's implicit reward
    r(y) = beta * (log pi(y|x) - log pi_ref(y|x)), each (B,) summed over the answer's tokens.

    Written here because TRL's DPO loss lives inside ``DPOTrainer._compute_loss`` (TRL 1.16), not as a function.
    Why it is in a PPO app: the votes are answers the served versions sampled, so they are on-policy pairs, and
    each can be learned from again at every step; PPO sees a sampled answer once and only through the reward
    model, which learns a sparse taste (an exclamation mark, a warm word) slowly from a few hundred votes.
    """
    _check_pair(policy_chosen, policy_rejected)
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (B,) implicit reward of the answer people picked
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # (B,)
    return bradley_terry_loss(chosen_rewards, rejected_rewards)


@torch.no_grad()
def preference_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs the reward model orders as the human did; exact ties count 0.5 (a coin flip).

    Why 0.5 for ties: a constant reward model should score 50%, not 0% or 100%.
    """
    _check_pair(r_chosen, r_rejected)
    wins = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()  # (B,)
    return wins.mean().item()


@torch.no_grad()
def bootstrap_accuracy_ci(r_chosen: torch.Tensor, r_rejected: torch.Tensor, resamples: int = 2000,
                          level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `preference_accuracy` over the pairs.

    Why: on a few hundred held-out pairs the accuracy moves by several points with the pairs drawn, so a figure
    without its interval cannot tell a better reward model from a luckier evaluation set.
    """
    _check_pair(r_chosen, r_rejected)
    wins = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()  # (B,)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(wins), (resamples, len(wins)), generator=generator)  # (R, B)
    means = wins.cpu()[idx].mean(1).sort().values  # (R,)
    tail = (1 - level) / 2
    return float(means[int(tail * (resamples - 1))]), float(means[int((1 - tail) * (resamples - 1))])


def length_balanced_mask(len_chosen: torch.Tensor, len_rejected: torch.Tensor, tolerance: float = 0.2) -> torch.Tensor:
    """(B,) pairs whose two answers are within `tolerance` of each other in length: pairs where a reward model
    that only measures length is at chance, so accuracy on them is what it learned beyond length."""
    len_chosen, len_rejected = len_chosen.float(), len_rejected.float()
    return (len_chosen - len_rejected).abs() <= tolerance * torch.maximum(len_chosen, len_rejected)


def pearson_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two (N,) tensors; nan when either is constant."""
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# KL estimators and reward shaping
# ----------------------------------------------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) - log q(x) per sampled token, with x ~ p (the policy).

    Unbiased for KL(p || q) but high variance and can be negative for a single token. It is the estimator used
    inside the per-token reward (Ziegler et al. 2019): its sum over a sampled sequence is exactly the log-ratio of
    sequence probabilities, whose expectation is the sequence-level KL.
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = q(x)/p(x), x ~ p (Schulman, http://joschu.net/blog/kl-approx.html).

    Unbiased for KL(p || q), always >= 0 (since log r <= r - 1) and low variance: the right thing to *report*
    (PPO's approx_kl, in `clipped_policy_loss`).
    """
    log_r = ref_logprobs - logprobs
    return (torch.exp(log_r) - 1) - log_r


def center_per_prompt(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Subtract from each score the mean score of the answers to the same prompt (a per-prompt baseline).

    Why: a Bradley-Terry reward model is trained only on differences between answers to one prompt, so the
    level of its score from one prompt to another is arbitrary; compared across prompts it is noise that a
    small batch cannot average away. Centering within the prompt's group keeps exactly the part the reward
    model learned (RLOO, Ahmadian et al. 2024; GRPO, Shao et al. 2024 use the same baseline). The baseline
    does not depend on the answer being scored beyond its own 1/k share, so the policy gradient keeps its
    direction. A prompt answered once gets 0.

    ``scores`` (B,), ``group_ids`` (B,) integer id of each row's prompt. Returns (B,).
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)  # (B,) group index 0..G-1
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = torch.zeros(groups, dtype=scores.dtype).index_add_(0, inverse, scores)  # (G,)
    counts = torch.zeros(groups, dtype=scores.dtype).index_add_(0, inverse, torch.ones_like(scores))  # (G,)
    return scores - (sums / counts)[inverse]  # (B,)


def per_token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT / Ziegler et al. 2019 reward shaping: ``R(x, y) = r(x, y) - beta * KL``, spread over tokens.

    Each response token gets ``-kl_coef * (logprobs - ref_logprobs)`` (k1, masked), which keeps the policy near the
    reference model and so away from the reward model's blind spots; the scalar reward-model ``score`` (B,) is
    added once, on the last valid token of each row (index ``mask.sum(1) - 1``), because the sequence is only
    judged when it is complete. Rows whose mask is all zeros get nothing.

    Returns ``(rewards, kl)``, both (B, T) and zero where masked; ``kl`` is the per-token k1 used in the reward.
    Call under ``torch.no_grad()`` (rewards are targets, not something to differentiate).
    """
    m = _float_mask(mask, logprobs)  # (B, T)
    kl = kl_k1(logprobs, ref_logprobs) * m  # (B, T)
    rewards = -kl_coef * kl  # (B, T)

    B = rewards.shape[0]
    lengths = m.sum(dim=1).long()  # (B,)
    last_idx = (lengths - 1).clamp_min(0)  # (B,) index of the last valid token (0 for empty rows, masked below)
    has_tokens = (lengths > 0).to(rewards.dtype)  # (B,)
    rows = torch.arange(B, device=rewards.device)  # (B,)
    score_at_last = torch.zeros_like(rewards)  # (B, T)
    score_at_last[rows, last_idx] = score.to(rewards.dtype).reshape(B) * has_tokens  # (B,) scattered into (B, T)
    rewards = rewards + score_at_last  # (B, T)
    return rewards, kl


# ----------------------------------------------------------------------------------------------------------------
# Generalised Advantage Estimation
# ----------------------------------------------------------------------------------------------------------------


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) advantages and value targets over the masked response (Schulman et al. 2016).

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);   A_t = delta_t + gamma * lam * A_{t+1}.

    lam trades bias (lam=0: one-step TD) against variance (lam=1: Monte-Carlo return minus baseline). The episode
    ends with the answer, so the bootstrap value after the last valid token is 0. Positions where ``mask`` is 0 are
    treated as "after the end": their rewards/values are zeroed first and ``next_nonterminal`` (CleanRL's name) is
    the next token's mask, so nothing past EOS leaks back into valid positions.

    Returns ``(advantages, returns)``, both (B, T), with ``returns = advantages + values`` (the critic's target)
    and zeros at masked positions. Call under ``torch.no_grad()``.
    """
    m = _float_mask(mask, rewards)  # (B, T)
    rewards = rewards * m  # (B, T)
    values = values.to(rewards.dtype) * m  # (B, T)
    T = rewards.shape[1]

    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(T)):
        if t < T - 1:
            next_values = values[:, t + 1]  # (B,)
            next_nonterminal = m[:, t + 1]  # (B,) 0 once the answer has ended
        else:
            next_values = torch.zeros_like(lastgaelam)  # (B,) nothing after the last position
            next_nonterminal = torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values * next_nonterminal - values[:, t]  # (B,)
        lastgaelam = (delta + gamma * lam * next_nonterminal * lastgaelam) * m[:, t]  # (B,)
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # T x (B,) -> (B, T)
    returns = (advantages + values) * m  # (B, T)
    return advantages, returns


# ----------------------------------------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossStats:
    approx_kl: float  # k3 estimate of KL(old || new) on this minibatch; large => the update moved too far
    clip_fraction: float  # fraction of tokens with |ratio - 1| > clip_eps


@dataclass(frozen=True)
class ValueLossStats:
    value_clip_fraction: float  # fraction of tokens with |new_value - old_value| > clip_eps


def clipped_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO clipped surrogate objective L^CLIP (Schulman et al. 2017, eq. 7), as a loss to minimise.

    The ratio pi_new/pi_old lets us reuse samples from the old policy for several epochs; clipping it to
    [1 - eps, 1 + eps] and taking the pessimistic (max of the two losses) removes any incentive to move the ratio
    further once it has left the trust region in the direction the advantage favours, so those tokens get zero
    gradient. All inputs (B, T); the loss is a masked mean over tokens. `weights` (B, T), fixed: per-token
    importance weights for samples drawn by another engine (`truncated_importance_weights`).
    """
    logratio = new_logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(logratio)  # (B, T)

    pg_loss1 = -advantages * ratio  # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)  # (B, T)
    pg_loss_per_token = torch.max(pg_loss1, pg_loss2)  # (B, T)
    if weights is not None:
        pg_loss_per_token = pg_loss_per_token * weights.detach()
    pg_loss = masked_mean(pg_loss_per_token, mask)

    with torch.no_grad():
        # k3 with p = pi_old (tokens were sampled from it) and q = pi_new, so r = ratio: (r - 1) - log r >= 0
        # estimates KL(pi_old || pi_new), exactly as CleanRL's approx_kl.
        approx_kl = masked_mean(kl_k3(old_logprobs, new_logprobs), mask)
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_eps).to(ratio.dtype), mask)
    return pg_loss, PolicyLossStats(approx_kl=approx_kl.item(), clip_fraction=clip_fraction.item())


def sampler_mismatch(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Per-token KL(sampler || trainer), k1-estimated on the sampler's own draws: E_s[log p_s - log p_t].

    (B, T) inputs; NaN sampler log-probs (tokens the sampler reported nothing for) are left out. 0 means the
    engine that sampled and the one that trains compute the same policy.
    """
    known = _known_tokens(sampler_logprobs, mask)  # (B, T)
    diff = torch.nan_to_num(sampler_logprobs - trainer_logprobs)  # (B, T)
    return float(masked_mean(diff, known)) if known.sum() > 0 else 0.0


def sampler_drift(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Per-token KL(sampler || trainer), k3-estimated (>= 0, low variance) on the sampler's own draws: how far the
    policy being trained has moved from the one that sampled, for the PPO epochs' early stop. NaN sampler
    log-probs are left out, as in `sampler_mismatch`; 0 when no token is known."""
    known = _known_tokens(sampler_logprobs, mask)  # (B, T)
    if known.sum() == 0:
        return 0.0
    return float(masked_mean(torch.nan_to_num(kl_k3(sampler_logprobs, trainer_logprobs)), known))


def _known_tokens(sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) the masked tokens the sampler reported a log-probability for."""
    return mask * torch.isfinite(sampler_logprobs)


def truncated_importance_weights(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                                 mask: torch.Tensor, cap: float) -> tuple[torch.Tensor, float]:
    """Per-token min(p_trainer / p_sampler, cap): truncated importance sampling (TIS; Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training").

    When a fast engine samples and PyTorch trains, the tokens come from the sampler's version of the policy,
    while PPO's ratio assumes they came from the trainer's; weighting each token's loss by p_trainer / p_sampler
    makes the gradient the trainer's again, and the cap keeps a token the sampler found unlikely from
    dominating. NaN sampler log-probs weigh 1. Returns (weights (B, T), share of masked tokens capped).
    """
    ratio = torch.exp(trainer_logprobs - sampler_logprobs)  # (B, T)
    weights = torch.where(torch.isfinite(ratio), ratio.clamp(max=cap), torch.ones_like(ratio))  # (B, T)
    capped = masked_mean((torch.isfinite(ratio) & (ratio > cap)).float(), mask)
    return weights, float(capped)


def clipped_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, ValueLossStats]:
    """PPO clipped value loss (CleanRL ``clip_vloss``; OpenAI baselines ppo2).

    The value head is only allowed to move ``clip_eps`` away from its rollout-time prediction; as with the policy,
    the max of the clipped and unclipped squared errors is pessimistic, so there is no gain from a larger jump.
    This keeps the critic (which shares the LoRA trunk with the policy here) from being dragged far in one epoch.
    All inputs (B, T); ``0.5 * masked_mean(...)`` over tokens.
    """
    v_loss_unclipped = (new_values - returns) ** 2  # (B, T)
    v_clipped = old_values + torch.clamp(new_values - old_values, -clip_eps, clip_eps)  # (B, T)
    v_loss_clipped = (v_clipped - returns) ** 2  # (B, T)
    v_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)

    with torch.no_grad():
        value_clip_fraction = masked_mean(
            ((new_values - old_values).abs() > clip_eps).to(new_values.dtype), mask
        )
    return v_loss, ValueLossStats(value_clip_fraction=value_clip_fraction.item())


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over masked tokens (CleanRL's diagnostic).

    1: the critic predicts the returns perfectly; 0: no better than a constant; < 0: worse than a constant.
    NaN when the returns have no variance (the ratio is undefined), as in CleanRL.
    """
    var_y = masked_var(returns, mask)
    if var_y.item() == 0.0:
        return math.nan
    return (1.0 - masked_var(returns - values, mask) / var_y).item()


# ----------------------------------------------------------------------------------------------------------------
# KL coefficient controllers
# ----------------------------------------------------------------------------------------------------------------


class RunningMoments:
    """Running mean and standard deviation of every reward seen so far (Chan et al.'s parallel update).

    Why: the online reward model's scale keeps growing as it learns (Bradley-Terry logits are unbounded), so a
    fixed KL coefficient would mean less and less; dividing scores by their running std ("reward scaling",
    Engstrom et al. 2020) keeps the reward/KL trade-off stable. Written here because TRL 1.x removed its
    ``RunningMoments`` along with PPO.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta ** 2 * self.count * n / total
        self.count = total

    def scale(self, values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Update with ``values``, then return them divided by the running std (not shifted: 0 stays 0)."""
        self.update(values)
        return values / max(self.std, eps)


@dataclass
class AdaptiveKLController:
    """Adaptive KL penalty coefficient (Ziegler et al. 2019, section 2.2).

    A fixed beta is either too weak early (the policy runs off to exploit the reward model) or too strong late
    (no learning); instead beta is steered so the observed KL tracks ``target_kl``. The proportional error is
    clipped to +-20% so that one noisy KL estimate can move beta by at most 20% per ``horizon`` steps.
    """

    kl_coef: float
    target_kl: float
    horizon: int  # steps (samples) over which a full proportional correction is applied

    def __post_init__(self) -> None:
        if self.target_kl <= 0:
            raise ValueError(f"target_kl must be > 0, got {self.target_kl}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {self.horizon}")

    def reset(self, kl_coef: float) -> None:
        self.kl_coef = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.kl_coef *= mult
        return self.kl_coef


@dataclass
class FixedKLController:
    """Constant KL coefficient, same interface as :class:`AdaptiveKLController` (used when there is no target)."""

    kl_coef: float

    def reset(self, kl_coef: float) -> None:
        self.kl_coef = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.kl_coef


@dataclass
class LogBetaPIController:
    """A proportional-integral controller on log(beta), updated once per PPO iteration: the KL leash.

    Why not Ziegler's controller: its correction is at most 20% per ``horizon`` samples, sized for batches of 512.
    With 8 answers an iteration it could not catch a policy that gains several nats of KL in a few iterations
    (measured: KL 13.4 nats against a target of 6 while beta stayed at 0.02-0.04). Here, per iteration,

        e_t        = clip(log(KL_t / target), -max_error, +max_error)     # > 0: too far from the reference
        I_t        = I_{t-1} + e_t                                         # integral, frozen while saturated
        log beta_t = log beta_0 + kp * e_t + ki * I_t,  clipped to [log beta_min, log beta_max]

    The error is a log-ratio, so "KL twice the target" and "half the target" weigh the same, and the controller is
    linear in log(beta), where the penalty's effect is multiplicative. The proportional term reacts within the
    iteration that overshoots; the integral term removes the steady offset a P controller would leave. The floor
    ``min_kl_coef`` keeps a leash even after a long stretch under target (the integral would otherwise walk beta
    towards 0 and let the next burst run free); ``max_kl_coef`` bounds how hard it can pull.
    """

    kl_coef: float  # beta_0, also the value before the first update
    target_kl: float
    kp: float = 1.0
    ki: float = 0.5
    min_kl_coef: float = 0.05
    max_kl_coef: float = 5.0
    max_error: float = 1.0  # |log(KL/target)| counted at most this much in one iteration (e^1 = 2.7x off)

    def __post_init__(self) -> None:
        if self.target_kl <= 0:
            raise ValueError(f"target_kl must be > 0, got {self.target_kl}")
        if self.ki <= 0 or self.kp < 0:
            raise ValueError(f"need ki > 0 and kp >= 0, got kp={self.kp}, ki={self.ki}")
        if not 0 < self.min_kl_coef <= self.max_kl_coef:
            raise ValueError(f"need 0 < min_kl_coef <= max_kl_coef, got {self.min_kl_coef}, {self.max_kl_coef}")
        self.reset(self.kl_coef)

    def reset(self, kl_coef: float) -> None:
        """Start again from ``kl_coef`` (an admin set it): no memory of past errors."""
        self.kl_coef = min(max(kl_coef, self.min_kl_coef), self.max_kl_coef)
        self.log_kl_coef_0 = math.log(self.kl_coef)
        self.integral = 0.0

    def update(self, current_kl: float, n_steps: int = 1) -> float:
        """One iteration's correction; ``n_steps`` is accepted for interface parity and ignored (per iteration)."""
        error = math.log(max(current_kl, 1e-8) / self.target_kl)
        error = min(max(error, -self.max_error), self.max_error)
        lo, hi = math.log(self.min_kl_coef), math.log(self.max_kl_coef)
        # Anti-windup: the integral only grows as far as puts beta on a bound, so leaving the bound later
        # starts at once instead of first unwinding an integral that piled up while beta was pinned there.
        proportional = self.log_kl_coef_0 + self.kp * error
        integral_lo, integral_hi = (lo - proportional) / self.ki, (hi - proportional) / self.ki
        self.integral = min(max(self.integral + error, integral_lo), integral_hi)
        log_beta = proportional + self.ki * self.integral
        self.kl_coef = math.exp(min(max(log_beta, lo), hi))
        return self.kl_coef


def make_kl_controller(
    kl_coef: float, target_kl: float | None, horizon: int, kind: str = "adaptive", min_kl_coef: float = 0.05,
) -> AdaptiveKLController | FixedKLController | LogBetaPIController:
    """``pi`` (per-iteration PI on log beta), ``adaptive`` (Ziegler et al.) or a fixed coefficient (no target)."""
    if target_kl is None:
        return FixedKLController(kl_coef=kl_coef)
    if kind == "pi":
        return LogBetaPIController(kl_coef=kl_coef, target_kl=target_kl, min_kl_coef=min_kl_coef)
    if kind != "adaptive":
        raise ValueError(f"unknown KL controller {kind!r} (pi or adaptive)")
    return AdaptiveKLController(kl_coef=kl_coef, target_kl=target_kl, horizon=horizon)


def kl_shrink_factor(current_kl: float, target_kl: float, min_factor: float = 0.5, power: float = 0.5) -> float:
    """How much to shrink the adapter's weight delta so the policy's KL returns to ``target_kl``: a KL-budgeted step.

    The policy is the reference plus a LoRA delta (W = W_ref + B A); scaling B by ``a`` moves the policy along the
    straight line between the two in weight space (as WARP's interpolation towards the initialisation, Rame et
    al. 2024, and Elastic Reset, Noukhovitch et al. 2023, do). Near the reference KL grows with the square of the
    distance, so ``a = sqrt(target / KL)`` brings KL back to about the target; it is bounded below by
    ``min_factor`` so one noisy KL estimate cannot erase the adapter. 1 (no change) while KL <= target.
    ``power`` < 0.5 steps back less. Measured (bench/ppo_oracle.py, concise taste as reward, 8 minutes): after a
    step back the answers fell back towards the base's length with either power, and (target/KL)**0.25 won 0.72
    against the square root's 0.88, so 0.5 stays.

    Why beyond the coefficient: with Adam the step size does not depend on the loss scale, so a larger beta turns
    the update towards the reference but each step still carries noise of the learning rate's size; on a small
    batch that noise alone keeps KL above target. The shrink removes it directly.
    """
    if target_kl <= 0 or current_kl <= target_kl:
        return 1.0
    return max(min_factor, (target_kl / current_kl) ** power)


def should_stop_epochs(approx_kls: list[float], target_approx_kl: float) -> bool:
    """Early stop of the PPO epochs (OpenAI baselines / Spinning Up PPO): stop once the update has moved the
    policy more than 1.5x ``target_approx_kl`` (per-token KL(old || new), the k3 ``approx_kl`` of the minibatches
    of the current epoch so far, averaged) away from the policy that sampled the rollout. Reusing a batch
    further only fits its noise; on a reward model with blind spots that is where the KL runs off. 0 = off.
    """
    if target_approx_kl <= 0 or not approx_kls:
        return False
    return sum(approx_kls) / len(approx_kls) > 1.5 * target_approx_kl


# ----------------------------------------------------------------------------------------------------------------
# Score shaping
# ----------------------------------------------------------------------------------------------------------------


def length_penalty(lengths: torch.Tensor, target_length: float, coef: float) -> torch.Tensor:
    """``-coef * relu(lengths - target_length)`` (B,), to be added to the reward-model scores.

    Why: reward models trained on human votes tend to prefer longer answers, and PPO finds that quickly — the
    classic reward-hacking failure is answers that grow without bound (Singhal et al. 2023, "A Long Way to Go").
    Penalising only the excess over ``target_length`` leaves answers of reasonable length untouched.
    """
    lengths = lengths.to(torch.get_default_dtype()) if not lengths.is_floating_point() else lengths
    return -coef * F.relu(lengths - target_length)  # (B,)

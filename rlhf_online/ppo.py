"""A small online PPO for the policy's LoRA adapter, as named steps: rollout, score, advantages, update.

TRL >= 1.13 has no PPO, and its last PPOTrainer trained over a whole dataset with a full-size value model; we
need one short iteration at a time on a 4-bit base. The math lives in `rl_math` (torch only); this module
moves tensors between the model and those functions. TRL's `selective_log_softmax` and
`entropy_from_logits` do the per-token work.

The reference model is the same 4-bit base with adapters disabled, so there is no second model in memory.
Demonstrations people wrote add a supervised (SFT) term on the policy adapter: they say directly what a good
answer is, which the reward model can only learn slowly from pairs, and the term keeps the policy anchored
to human text while the reward model is still weak.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from peft import PeftModel
from transformers import DynamicCache
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from rlhf_online.config import KL_SHRINK_FORGETS, PPOConfig, SamplingConfig
from rlhf_online.models import (POLICY_ADAPTER, answer_ids, chat_ids, end_of_turn_ids, lora_parameters,
                                padded_position_ids)
from rlhf_online.release_gate import is_held_out, sequence_logprobs
from rlhf_online.rl_math import (RunningMoments, center_per_prompt, clipped_policy_loss, clipped_value_loss,
                                 dpo_loss as direct_preference_loss, explained_variance, gae_advantages,
                                 length_penalty, make_kl_controller, masked_mean, masked_whiten, kl_shrink_factor,
                                 per_token_rewards, sampler_drift, sampler_mismatch, should_stop_epochs,
                                 truncated_importance_weights)

COLD_START_PROMPTS = [
    "What is a good way to learn a new language?",
    "Explain photosynthesis to a ten year old.",
    "Give me three tips for a job interview.",
    "How do I make a cup of tea?",
    "What should I pack for a weekend hike?",
    "Why is the sky blue?",
    "Write a short poem about autumn.",
    "How can I sleep better?",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot.",
    "How do I politely decline an invitation?",
    "What are the benefits of drinking water?",
]


@dataclass
class Rollout:
    """One batch of sampled answers with everything the update needs, all (B, ...) tensors."""

    input_ids: torch.Tensor  # (B, P+R) left-padded prompt followed by the response
    attention_mask: torch.Tensor  # (B, P+R)
    response_mask: torch.Tensor  # (B, R) 1 up to and including end-of-turn
    prompt_length: int  # P
    messages: list[list[dict]]
    texts: list[str]
    sampler_logprobs: torch.Tensor | None = None  # (B, R) another engine's log-probs of its samples; NaN: unknown


@dataclass
class Scored:
    """The rollout after scoring: the targets every epoch of the update works toward, all (B, ...) tensors.

    The reward-model scores are known at once. The reference's and the old log-probs and values, and so the
    KL-shaped rewards, advantages and returns, are filled in row by row (`PPOTrainer._fix_targets`): from no-grad
    passes over the batch when PyTorch sampled, at each minibatch's first forward when another engine did (rows
    not yet filled hold NaN; `fixed` says which are)."""

    scores: torch.Tensor  # (B,) reward model score (after any length penalty)
    terminal: torch.Tensor  # (B,) the reward PPO gets at each answer's end: scores centred per prompt and scaled
    ref_logprobs: torch.Tensor  # (B, R)
    old_logprobs: torch.Tensor  # (B, R) the proximal policy's: the one each row's clipped ratio divides by
    old_values: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B, R) GAE, not yet whitened (`PPOTrainer._whitened_advantages`)
    returns: torch.Tensor  # (B, R)
    kl: torch.Tensor  # (B,) summed k1 KL to the reference per answer
    fixed: torch.Tensor  # (B,) bool: the row's targets are filled in
    is_weights: torch.Tensor | None = None  # (B, R) truncated importance weights p_trainer / p_sampler
    sampler_kl: float | None = None  # per-token KL(sampler || trainer) on these samples
    is_truncated: float = 0.0  # share of tokens whose weight hit the cap
    relevance: torch.Tensor | None = None  # (B,) reference PMI per answer token (None: --relevance-coef 0)
    elsewhere: torch.Tensor | None = None  # (B,) log P_ref(answer | another prompt of the batch), for `relevance`

    @classmethod
    def unfilled(cls, scores: torch.Tensor, terminal: torch.Tensor, response_mask: torch.Tensor,
                 with_is_weights: bool) -> "Scored":
        nan = torch.full_like(response_mask, float("nan"), dtype=torch.float32)  # (B, R)
        return cls(scores=scores, terminal=terminal, ref_logprobs=nan.clone(), old_logprobs=nan.clone(),
                   old_values=nan.clone(), advantages=nan.clone(), returns=nan.clone(),
                   kl=torch.full_like(terminal, float("nan")),
                   fixed=torch.zeros(len(terminal), dtype=torch.bool, device=terminal.device),
                   is_weights=torch.ones_like(nan) if with_is_weights else None)


@dataclass(frozen=True)
class IterationStats:
    iteration: int
    mean_score: float
    kl: float
    kl_coef: float
    mean_length: float
    policy_loss: float
    value_loss: float
    sft_loss: float
    entropy: float
    approx_kl: float
    clip_fraction: float
    explained_variance: float
    seconds: float
    epochs: float = 0.0  # PPO epochs run: minibatch steps / minibatches (fewer than configured: the early stop fired)
    kl_shrink: float = 1.0  # factor the adapter delta was scaled by after the update (1: KL was within target)
    rollout_seconds: float = 0.0  # of `seconds`, sampling the answers
    score_seconds: float = 0.0  # of `seconds`, the reward model (and the no-grad old and reference passes when
    # PyTorch sampled)
    update_seconds: float = 0.0  # of `seconds`, the PPO epochs (forward and backward passes; when another engine
    # sampled, also each minibatch's reference pass)
    sampler_kl: float | None = None  # per-token KL between the engine that sampled and PyTorch (None: PyTorch did)
    is_truncated: float = 0.0  # share of tokens whose importance weight hit --rollout-is-cap
    dpo_loss: float = 0.0  # the DPO term on voted pairs (0: --dpo-coef 0 or no votes yet)
    relevance: float | None = None  # mean reference PMI per answer token, the on-topic term (None: it is off)

    def as_dict(self) -> dict:
        return asdict(self)


def same_prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> tuple[torch.Tensor, int]:
    """((B,) which distinct prompt each row holds, G distinct prompts): rows whose first `prompt_length` tokens
    and padding are identical."""
    prompt = torch.cat([input_ids[:, :prompt_length], attention_mask[:, :prompt_length]], dim=1)  # (B, 2P)
    distinct, row_prompt = torch.unique(prompt, dim=0, return_inverse=True)  # (G, 2P), (B,)
    return row_prompt, len(distinct)


PADDING_SLACK = 1.25  # a batch of prompts may cost this many times their own tokens once padded to the longest


def length_buckets(lengths: list[int], slack: float = PADDING_SLACK) -> list[list[int]]:
    """Indices of `lengths` in batches to run together: longest first, a prompt joins the current batch while the
    batch padded to its longest costs at most `slack` x its tokens. Why: one padded batch of a 334-token and a
    71-token prompt runs 263 tokens of padding; one prompt at a time runs none but computes in small, slow
    matrices (measured on 8 x 96-token PPO batches, 1 thread: first turns of 39-53 tokens took 28 s of PyTorch one
    prompt at a time and 24 s as one batch; conversations of 71-334 tokens 46 s one at a time, 68 s as one batch)."""
    buckets: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        bucket = buckets[-1] if buckets else None
        if bucket and lengths[bucket[0]] * (len(bucket) + 1) <= slack * (sum(lengths[i] for i in bucket) + lengths[index]):
            bucket.append(index)
        else:
            buckets.append([index])
    return buckets


class PolicyWithValue(torch.nn.Module):
    """The policy adapter's LM head and a scalar value head, both on the shared transformer trunk."""

    def __init__(self, peft_model: PeftModel):
        super().__init__()
        self.peft_model = peft_model
        base = peft_model.get_base_model()
        self.value_head = torch.nn.Linear(base.config.hidden_size, 1, device=base.device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def trunk_and_head(self):
        base = self.peft_model.get_base_model()
        return base.model, base.lm_head

    def forward(self, input_ids, attention_mask, prompt_length: int, with_values: bool = True):
        """Logits (B, R, V) and values (B, R) for the response positions only.

        Position t of the response is predicted from the hidden state at t-1; the LM head runs on those
        R positions alone, which skips the vocabulary matmul over the prompt. The prompts run first, each distinct
        one once, batched with prompts of similar length (`_prompt_cache`), then every row's response on their keys
        and values.
        """
        _, lm_head = self.trunk_and_head()
        response_hidden = self._response_hidden(input_ids, attention_mask, prompt_length)  # (B, R, H)
        logits = lm_head(response_hidden).float()  # (B, R, V)
        values = self.value_head(response_hidden.float()).squeeze(-1) if with_values else None  # (B, R)
        return logits, values

    def _response_hidden(self, input_ids, attention_mask, prompt_length: int) -> torch.Tensor:
        """(B, R, H) the hidden states that predict each response token: the same as one forward over the padded
        batch, up to float rounding (tests/test_ppo.py), with less work.

        Why: a PPO batch holds `samples_per_prompt` answers to each prompt, and prompts are often longer than the
        answers (a conversation's earlier turns, up to --context-tokens) and of very different lengths, so one
        padded forward repeats each prompt for every answer and pads every prompt to the longest. Measured on 8 x
        96-token answers, 1 thread (bench/ppo_iteration.py): PyTorch's share of an iteration 70-78 -> 41-44 s on HH
        conversations (prompts 71-334 tokens), 27-30 -> 24-25 s on first turns (39-53 tokens). Gradients flow back
        through the prompts' keys and values.
        """
        trunk, _ = self.trunk_and_head()
        position_ids = padded_position_ids(attention_mask)  # (B, P+R)
        row_prompt, _ = same_prompt_rows(input_ids, attention_mask, prompt_length)  # (B,)
        cache, last_prompt_token = self._prompt_cache(input_ids, attention_mask, prompt_length, row_prompt)
        answers = trunk(input_ids=input_ids[:, prompt_length:], attention_mask=attention_mask,
                        position_ids=position_ids[:, prompt_length:], past_key_values=cache,
                        use_cache=True).last_hidden_state  # (B, R, H)
        return torch.cat([last_prompt_token, answers[:, :-1, :]], dim=1)  # (B, R, H)

    def _prompt_cache(self, input_ids, attention_mask, prompt_length: int, row_prompt: torch.Tensor):
        """(keys and values of every row's prompt, left-padded to P, as a cache; (B, 1, H) the last prompt token's
        hidden state). Each distinct prompt runs once, in a batch of prompts of similar length (`length_buckets`);
        its keys and values are padded with zeros on the left (the attention mask hides them) and repeated for
        each row that holds it."""
        trunk, _ = self.trunk_and_head()
        first = [int((row_prompt == g).nonzero()[0]) for g in range(int(row_prompt.max()) + 1)]  # a row per prompt
        lengths = [int(attention_mask[row, :prompt_length].sum()) for row in first]
        kv, last = {}, {}  # prompt -> per layer (keys, values), each (1, KV heads, P, head dim); (1, 1, H)
        for bucket in length_buckets(lengths, PADDING_SLACK):
            rows = torch.tensor([first[g] for g in bucket], device=input_ids.device)
            start = prompt_length - max(lengths[g] for g in bucket)  # columns that are padding in every row here
            mask = attention_mask[rows, start:prompt_length]  # (n, L)
            out = trunk(input_ids=input_ids[rows, start:prompt_length], attention_mask=mask,
                        position_ids=padded_position_ids(mask), use_cache=True)  # (n, L, H)
            pad = (0, 0, start, 0)  # back to P columns, on the left
            for i, g in enumerate(bucket):
                kv[g] = [tuple(torch.nn.functional.pad(t[i:i + 1], pad) for t in (layer.keys, layer.values))
                         for layer in out.past_key_values.layers]
                last[g] = out.last_hidden_state[i:i + 1, -1:, :]
        prompts = range(len(first))
        layers = [tuple(torch.cat([kv[g][layer][j] for g in prompts])[row_prompt] for j in (0, 1))
                  for layer in range(len(kv[0]))]  # per layer (keys, values), each (B, KV heads, P, head dim)
        return DynamicCache(ddp_cache_data=layers, config=trunk.config), torch.cat([last[g] for g in prompts])[row_prompt]

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        return list(lora_parameters(self.peft_model, POLICY_ADAPTER).values()) + list(self.value_head.parameters())


class PPOTrainer:
    """Owns the optimizer and KL controller; `iteration()` runs one rollout-score-advantages-update cycle."""

    def __init__(self, policy: PolicyWithValue, tokenizer, score_fn: Callable[[list[list[dict]], list[str]], list[float]],
                 cfg: PPOConfig, sampling: SamplingConfig, *, yield_fn: Callable[[], None] = lambda: None,
                 seed: int = 0, sampler=None):
        self.policy = policy
        self.tokenizer = tokenizer
        self.score_fn = score_fn
        self.cfg = cfg
        self.sampling = sampling
        self.yield_fn = yield_fn  # called between steps so live chat gets the CPU first
        self.sampler = sampler  # rollout_sampler.LlamaCppRolloutSampler, or None: the policy's own generate
        self.rng = random.Random(seed)  # prompts and sampling seeds
        # The update's own draws (minibatch order, SFT and DPO samples) come from a second stream, so that how an
        # update draws does not change which prompts and seeds the next iterations get: settings compared side
        # by side (bench/ppo_oracle.py) then train on the same prompts.
        self.update_rng = random.Random(seed + 1)
        self.reward_moments = RunningMoments()  # for reward scaling: the reward model's scale drifts as it learns
        self.kl_ctl = make_kl_controller(cfg.init_kl_coef, cfg.target_kl or None, cfg.kl_horizon,
                                         kind=cfg.kl_controller, min_kl_coef=cfg.min_kl_coef)
        self.optimizer = torch.optim.AdamW(policy.policy_parameters(), lr=cfg.ppo_lr, weight_decay=0.0)
        if cfg.kl_shrink_forget not in KL_SHRINK_FORGETS:
            raise ValueError(f"--kl-shrink-forget must be one of {', '.join(KL_SHRINK_FORGETS)}, "
                             f"not {cfg.kl_shrink_forget!r}")
        self.iterations = 0
        self.last_texts: list[str] = []
        self.end_of_turn_ids = end_of_turn_ids(tokenizer)
        self.max_new_tokens = cfg.answer_tokens(sampling)
        self.reference_sums: dict[str, float] = {}  # (prompt, answer) -> log pi_ref(answer | prompt); fixed weights

    # ---- rollout --------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.policy.value_head.weight.device

    def _activate_policy(self) -> None:
        self.policy.peft_model.set_adapter(POLICY_ADAPTER)
        for p in self.policy.policy_parameters():  # set_adapter freezes inactive adapters; keep ours trainable
            p.requires_grad_(True)

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        return chat_ids(self.tokenizer, messages)[-self.sampling.context_tokens:]

    @torch.no_grad()
    def rollout(self, prompts: list[list[dict]], seed: int | None = None, own_generate: bool = False,
                max_new_tokens: int | None = None) -> Rollout:
        """Sample one answer per prompt from the current policy adapter; `seed` fixes the draws.

        `own_generate`: sample with the policy's own `generate` even when a faster sampler is set. The release
        gate needs it: it compares versions on the same seeded draws, which PyTorch keeps the same for nearly
        the same weights, while llama.cpp's change completely (a 1e-7 change of one adapter's weights changed
        6 answers of 6, same seeds; measured here). `max_new_tokens`: a shorter limit than the rollouts' own."""
        self._activate_policy()
        max_new_tokens = max_new_tokens or self.max_new_tokens
        if self.sampler is not None and not own_generate:
            return self._sampled_rollout(prompts, seed, max_new_tokens)
        model = self.policy.peft_model
        model.eval()
        batch = self.tokenizer.pad({"input_ids": [self._prompt_ids(m) for m in prompts]}, padding=True,
                                   padding_side="left", return_tensors="pt").to(self._device())
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            sequences = model.generate(
                **batch, do_sample=True, temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                top_k=None, max_new_tokens=max_new_tokens, eos_token_id=self.end_of_turn_ids,
                pad_token_id=self.tokenizer.pad_token_id, stopping_criteria=[_YieldEachToken(self.yield_fn)])
        prompt_length = batch["input_ids"].shape[1]  # P
        response = sequences[:, prompt_length:]  # (B, R)
        response_mask = _mask_through_first_eos(response, self.end_of_turn_ids)  # (B, R)
        attention_mask = torch.cat([batch["attention_mask"], response_mask.long()], dim=1)  # (B, P+R)
        texts = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip()
                 for r, m in zip(response, response_mask)]
        return Rollout(input_ids=sequences, attention_mask=attention_mask, response_mask=response_mask.float(),
                       prompt_length=prompt_length, messages=prompts, texts=texts)

    def _sampled_rollout(self, prompts: list[list[dict]], seed: int | None, max_new_tokens: int) -> Rollout:
        """The same rollout with the answers sampled by `self.sampler` (llama.cpp), which also reports its
        log-probability of every token it sampled (kept to measure and correct the sampler-trainer mismatch)."""
        rng = random.Random(seed) if seed is not None else self.rng
        seeds = [rng.randrange(2**31) for _ in prompts]
        prompt_ids = [self._prompt_ids(m) for m in prompts]
        self.yield_fn()
        samples = self.sampler.sample(prompt_ids, max_new_tokens, seeds)
        self.yield_fn()
        pad = self.tokenizer.pad_token_id
        prompt_batch = self.tokenizer.pad({"input_ids": prompt_ids}, padding=True, padding_side="left",
                                          return_tensors="pt")
        width = max(1, max(len(s.token_ids) for s in samples))  # R
        response = torch.full((len(samples), width), pad, dtype=torch.long)  # (B, R) right-padded
        response_mask = torch.zeros(len(samples), width)  # (B, R)
        sampler_logprobs = torch.full((len(samples), width), float("nan"))  # (B, R)
        for row, sample in enumerate(samples):
            n = len(sample.token_ids)
            response[row, :n] = torch.tensor(sample.token_ids, dtype=torch.long)
            response_mask[row, :n] = 1.0
            sampler_logprobs[row, :n] = torch.tensor([float("nan") if lp is None else lp for lp in sample.logprobs])
        texts = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip()
                 for r, m in zip(response, response_mask)]
        device = self._device()
        return Rollout(input_ids=torch.cat([prompt_batch["input_ids"], response], 1).to(device),
                       attention_mask=torch.cat([prompt_batch["attention_mask"], response_mask.long()], 1).to(device),
                       response_mask=response_mask.to(device), prompt_length=prompt_batch["input_ids"].shape[1],
                       messages=prompts, texts=texts, sampler_logprobs=sampler_logprobs.to(device))

    # ---- score ----------------------------------------------------------------------------------------------
    def _logprobs(self, rollout: Rollout, rows=slice(None), with_values=True):
        logits, values = self.policy(rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_length,
                                     with_values=with_values)
        targets = rollout.input_ids[rows, rollout.prompt_length:]  # (b, R)
        return logits, selective_log_softmax(logits, targets), values  # (b, R, V), (b, R), (b, R)

    @torch.no_grad()
    def score(self, rollout: Rollout) -> Scored:
        """Reward-model scores (and the on-topic term's other prompts, `_elsewhere_logprobs`), and when PyTorch
        sampled, the targets of the update.

        When another engine sampled, the old log-probs and values come from each minibatch's first forward in
        the update (`update`), which saves the no-grad pass over the batch that PyTorch-sampled rollouts get
        here: 1.1 s of a 14.5 s iteration (8 x 48 tokens, bf16, 1 thread, timed by hand). The reference pass
        runs on the same minibatch, so that both see the same batch: in bf16 a row's log-probs change with the
        rows batched with it, and a fresh policy's KL would not be 0."""
        scores = torch.tensor(self.score_fn(rollout.messages, rollout.texts), dtype=torch.float32)  # (B,)
        lengths = rollout.response_mask.sum(1).cpu()  # (B,)
        if self.cfg.length_penalty:
            scores = scores + length_penalty(lengths, self.cfg.length_penalty_target, self.cfg.length_penalty)
        # Several answers per prompt: the reward model's score only means something relative to the others.
        terminal = self._centred(scores, rollout)  # (B,)
        if self.cfg.reward_scaling:
            terminal = self.reward_moments.scale(terminal)  # (B,) in units of the running std
        sampled_elsewhere = rollout.sampler_logprobs is not None
        scored = Scored.unfilled(scores, terminal.to(self._device()), rollout.response_mask,
                                 with_is_weights=sampled_elsewhere and self.cfg.rollout_is_cap > 0)
        if self.cfg.relevance_coef:
            scored.elsewhere = self._elsewhere_logprobs(rollout)
            if scored.elsewhere is not None:
                scored.relevance = torch.full_like(scored.terminal, float("nan"))
        if not sampled_elsewhere:  # PyTorch sampled: the old policy is exactly the one before the update
            self.yield_fn()
            self._activate_policy()
            _, old_logprobs, old_values = self._logprobs(rollout)
            self._fix_targets(rollout, scored, torch.arange(len(scores), device=self._device()), old_logprobs,
                              old_values, self._reference_logprobs(rollout))
        return scored

    def _centred(self, values: torch.Tensor, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """(b,) `rows`' values less their prompt's mean, as the reward model's scores are (unchanged with one
        answer a prompt). `rows` hold whole prompts: minibatches keep a prompt's answers together."""
        if self.cfg.samples_per_prompt <= 1:
            return values
        row_prompt, _ = same_prompt_rows(rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_length)
        return center_per_prompt(values, row_prompt.to(values.device))

    @torch.no_grad()
    def _elsewhere_logprobs(self, rollout: Rollout) -> torch.Tensor | None:
        """(B,) log P_ref(answer | the batch's next other prompt), summed over the answer's tokens: the half of
        the on-topic term (`_add_relevance`) that PPO's own reference pass does not give. None when the batch
        holds one prompt (nothing to compare with)."""
        row_prompt, groups = same_prompt_rows(rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
        if groups < 2:
            return None
        P = rollout.prompt_length
        prompt_ids = [ids[keep.bool()].tolist() for ids, keep in
                      zip(rollout.input_ids[:, :P].cpu(), rollout.attention_mask[:, :P].cpu())]
        answers = [ids[keep.bool()].tolist() for ids, keep in
                   zip(rollout.input_ids[:, P:].cpu(), rollout.response_mask.cpu())]
        first_row = {}  # each prompt's first row
        for row, group in enumerate(row_prompt.tolist()):
            first_row.setdefault(group, row)
        others = [prompt_ids[first_row[(group + 1) % groups]] for group in row_prompt.tolist()]
        self.yield_fn()
        model = self.policy.peft_model
        with model.disable_adapter():
            elsewhere, _ = sequence_logprobs(model, others, answers, self.tokenizer.pad_token_id)  # (B,)
        self._activate_policy()
        return elsewhere.to(self._device())

    def _add_relevance(self, rollout: Rollout, scored: Scored, rows: torch.Tensor,
                       ref_logprobs: torch.Tensor) -> torch.Tensor:
        """`rows`' terminal rewards plus the on-topic term: --relevance-coef x each answer's reference pointwise
        mutual information per token, log P_ref(a | its prompt) - log P_ref(a | another prompt), the release
        gate's measure, centred per prompt. Also records it in `scored.relevance`.

        Why it is part of the reward: the votes of a few hundred people teach a reward model blind spots, and
        PPO drifts off topic through them (simulated users who like being addressed as "you", 20 minutes: the
        final version kept 82% +- 3% of the base's relevance on 40 prompts x 4 answers, while the gate's six
        prompts read 64-98% and passed every candidate). A gate tests a version on a few answers; the reward sees
        every rollout. The same run with this term: 84% +- 3% at weight 1, 88.5% +- 4% at 4, the taste's win
        rate unchanged (0.63-0.67; one run each, README); a concise taste at 4 won 0.63 +- 0.04 after 10 minutes
        against 0.69 +- 0.04 without: no clear gain for its cost, hence off by default. Centred, it only prefers
        the more on-topic of a prompt's answers, so a prompt's level of PMI does not matter. The first half,
        log P_ref(a | its prompt), is PPO's reference pass, which runs anyway; the second is one more reference
        forward of the batch (`_elsewhere_logprobs`)."""
        terminal = scored.terminal[rows]  # (b,)
        if scored.elsewhere is None:
            return terminal
        mask = rollout.response_mask[rows]  # (b, R)
        own = (ref_logprobs * mask).sum(1)  # (b,) log P_ref(answer | its prompt)
        relevance = (own - scored.elsewhere[rows]) / mask.sum(1).clamp_min(1)  # (b,)
        scored.relevance[rows] = relevance
        return terminal + self.cfg.relevance_coef * self._centred(relevance, rollout, rows)

    @torch.no_grad()
    def _reference_logprobs(self, rollout: Rollout, rows=slice(None)) -> torch.Tensor:
        """(b, R) log-probs of `rows`' answers under the reference: the same base without any adapter."""
        self.yield_fn()
        with self.policy.peft_model.disable_adapter():
            _, ref_logprobs, _ = self._logprobs(rollout, rows, with_values=False)
        self._activate_policy()
        return ref_logprobs

    @torch.no_grad()
    def _fix_targets(self, rollout: Rollout, scored: Scored, rows: torch.Tensor, old_logprobs: torch.Tensor,
                     old_values: torch.Tensor, ref_logprobs: torch.Tensor) -> None:
        """Fill in `rows`' old and reference log-probs and values, the on-topic term, the KL-shaped rewards, GAE
        advantages and returns, and the importance weights against the engine that sampled (all per row: rows
        fill apart)."""
        mask = rollout.response_mask[rows]  # (b, R)
        scored.terminal[rows] = terminal = self._add_relevance(rollout, scored, rows, ref_logprobs)  # (b,)
        rewards, kl = per_token_rewards(terminal, old_logprobs, ref_logprobs, mask, self.kl_ctl.kl_coef)  # (b, R)
        advantages, returns = gae_advantages(rewards, old_values, mask, self.cfg.gamma, self.cfg.lam)  # (b, R)
        scored.old_logprobs[rows], scored.old_values[rows] = old_logprobs, old_values
        scored.ref_logprobs[rows] = ref_logprobs
        scored.advantages[rows], scored.returns[rows], scored.kl[rows] = advantages, returns, kl.sum(1)
        if scored.is_weights is not None:
            scored.is_weights[rows], _ = truncated_importance_weights(
                old_logprobs, rollout.sampler_logprobs[rows], mask, self.cfg.rollout_is_cap)
        scored.fixed[rows] = True

    @torch.no_grad()
    def _measure_mismatch(self, rollout: Rollout, scored: Scored) -> None:
        """Another engine sampled: how far its policy is from PyTorch's on these samples, and how many tokens'
        importance weights hit the cap."""
        if rollout.sampler_logprobs is None:
            return
        mask = rollout.response_mask
        scored.sampler_kl = sampler_mismatch(rollout.sampler_logprobs, scored.old_logprobs, mask)
        if scored.is_weights is not None:
            _, scored.is_truncated = truncated_importance_weights(
                scored.old_logprobs, rollout.sampler_logprobs, mask, self.cfg.rollout_is_cap)

    # ---- update ---------------------------------------------------------------------------------------------
    def demonstration_batch(self, demonstrations: list[tuple[list[dict], str]]) -> Rollout:
        """Human-written answers as a rollout: each prompt, then the answer as the chat template writes the
        assistant's turn, through its end-of-turn token (the target teaches the model to stop there too)."""
        prompts = [self._prompt_ids(m) for m, _ in demonstrations]
        answers = [answer_ids(self.tokenizer, m, a)[:self.max_new_tokens] for m, a in demonstrations]
        prompt_batch = self.tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left",
                                          return_tensors="pt")
        answer_batch = self.tokenizer.pad({"input_ids": answers}, padding=True, padding_side="right",
                                          return_tensors="pt")
        prompt_batch, answer_batch = prompt_batch.to(self._device()), answer_batch.to(self._device())
        return Rollout(input_ids=torch.cat([prompt_batch["input_ids"], answer_batch["input_ids"]], 1),
                       attention_mask=torch.cat([prompt_batch["attention_mask"], answer_batch["attention_mask"]], 1),
                       response_mask=answer_batch["attention_mask"].float(),
                       prompt_length=prompt_batch["input_ids"].shape[1], messages=[], texts=[])

    def sft_loss(self, demonstrations: list[tuple[list[dict], str]]) -> torch.Tensor:
        """Mean NLL of human-written answers under the policy (the supervised term)."""
        rollout = self.demonstration_batch(demonstrations)
        _, logprobs, _ = self._logprobs(rollout, with_values=False)  # (b, R)
        return -masked_mean(logprobs, rollout.response_mask)

    def answer_logprobs(self, batch: Rollout, rows=slice(None)) -> torch.Tensor:
        """(b,) log pi(answer | prompt) of each row, summed over the answer's tokens, under the active adapters."""
        _, logprobs, _ = self._logprobs(batch, rows, with_values=False)  # (b, R)
        return (logprobs * batch.response_mask[rows]).sum(1)

    def dpo_loss(self, pairs: list[tuple[list[dict], str, str]]) -> torch.Tensor:
        """DPO's loss (`rl_math.dpo_loss`) of voted pairs (prompt, chosen, rejected) under the policy adapter."""
        answers = [(m, answer) for m, chosen, rejected in pairs for answer in (chosen, rejected)]  # alternating
        batch = self.demonstration_batch(answers)
        sums = self.answer_logprobs(batch)  # (2k,) log pi(answer | prompt)
        ref = self._reference_sums(answers, batch)  # (2k,)
        return direct_preference_loss(sums[0::2], sums[1::2], ref[0::2], ref[1::2], self.cfg.dpo_beta)

    @torch.no_grad()
    def _reference_sums(self, answers: list[tuple[list[dict], str]], batch: Rollout) -> torch.Tensor:
        """(2k,) log pi_ref of each answer, computed once per answer: the reference never changes, and a vote is
        drawn again and again."""
        keys = [json.dumps([m, a], sort_keys=True) for m, a in answers]
        missing = [i for i, key in enumerate(keys) if key not in self.reference_sums]
        if missing:
            rows = torch.tensor(missing, device=self._device())
            with self.policy.peft_model.disable_adapter():
                ref = self.answer_logprobs(batch, rows)  # (m,)
            self._activate_policy()
            if len(self.reference_sums) > 20_000:  # votes beyond the recent window are never drawn again
                self.reference_sums.clear()
            for i, total in zip(missing, ref.tolist()):
                self.reference_sums[keys[i]] = total
        return torch.tensor([self.reference_sums[key] for key in keys], device=self._device())

    def _minibatches(self, rollout: Rollout) -> list[torch.Tensor]:
        """Each minibatch's rows, in a fresh random order, a prompt's answers together. Why together: a
        minibatch's forward runs each distinct prompt once (`PolicyWithValue._prompt_cache`), so 8 answers to 4
        prompts split at random cost ~6.3 prompt forwards an epoch, kept together 4."""
        row_prompt, prompts = same_prompt_rows(rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
        order = list(range(prompts))
        self.update_rng.shuffle(order)
        rows = [row for g in order for row in (row_prompt == g).nonzero().flatten().tolist()]
        size = self.cfg.ppo_minibatch_size
        return [torch.tensor(rows[start:start + size], device=self._device()) for start in range(0, len(rows), size)]

    @torch.no_grad()
    def _whitened_advantages(self, rollout: Rollout, scored: Scored) -> torch.Tensor:
        """(B, R) advantages whitened with the statistics of every row whose targets are fixed: the whole batch,
        except in the first epoch over another engine's rollout, where the first minibatch has only its own.
        Why not per minibatch (CleanRL's norm_adv): with 2 prompts in a minibatch of 4 answers, a minibatch whose
        answers all scored alike would have its noise scaled up to full-size steps."""
        whitened = torch.zeros_like(scored.advantages)  # (B, R)
        fixed = scored.fixed
        whitened[fixed] = masked_whiten(scored.advantages[fixed], rollout.response_mask[fixed])
        return whitened

    @torch.no_grad()
    def _drift(self, rollout: Rollout, scored: Scored, rows: torch.Tensor, new_logprobs: torch.Tensor) -> float:
        """Per-token KL(the policy that sampled || the policy now) on `rows`' tokens, what the epochs' early stop
        watches (as Spinning Up's PPO). Measured against the sampler's own log-probs when another engine sampled
        (so it includes the engines' mismatch, ~0.003 here), because the old log-probs of later minibatches are
        taken after the first steps."""
        behaviour = scored.old_logprobs[rows] if rollout.sampler_logprobs is None else rollout.sampler_logprobs[rows]
        return sampler_drift(behaviour, new_logprobs.detach(), rollout.response_mask[rows])

    def update(self, rollout: Rollout, scored: Scored, demonstrations=(), preferences=()) -> dict[str, float]:
        """PPO epochs over shuffled minibatches: clipped surrogate + clipped value loss (+ SFT and DPO terms).

        Rows whose targets are not fixed yet (another engine sampled them) get them from their first forward
        here, before the step: the policy as it is then is the proximal policy of decoupled PPO (Hilton et al.
        2022, "Batch size-invariance for policy optimization"): the ratio is clipped against it, and the
        truncated importance weights correct from the engine that sampled to it. For the first minibatch it is
        the policy that sampled; later ones see it one or more steps on. The epochs stop early once the mean
        drift from the policy that sampled, over an epoch's minibatches, exceeds 1.5 x --target-approx-kl."""
        self._activate_policy()
        self.policy.peft_model.train()
        totals: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "sft_loss", "dpo_loss",
                                                             "entropy", "approx_kl", "clip_fraction")}
        steps, minibatches = 0, 1
        epoch_drifts: list[float] = []  # KL from the sampling policy at each minibatch's forward, last epoch
        for epoch in range(self.cfg.ppo_epochs):
            if epoch and should_stop_epochs(epoch_drifts, self.cfg.target_approx_kl):
                break  # the last epoch already moved the policy far enough from the one that sampled
            epoch_drifts = []
            batches = self._minibatches(rollout)
            minibatches = len(batches)
            for mb in batches:
                self.yield_fn()
                mask = rollout.response_mask[mb]  # (b, R)
                fresh = ~scored.fixed[mb]  # (b,) rows seen for the first time: their ratio is 1 here
                ref_logprobs = self._reference_logprobs(rollout, mb) if fresh.any() else None  # (b, R)
                logits, new_logprobs, new_values = self._logprobs(rollout, mb)
                if fresh.any():
                    self._fix_targets(rollout, scored, mb[fresh], new_logprobs.detach()[fresh],
                                      new_values.detach()[fresh], ref_logprobs[fresh])
                pg_loss, pg_stats = clipped_policy_loss(
                    new_logprobs, scored.old_logprobs[mb], self._whitened_advantages(rollout, scored)[mb], mask,
                    self.cfg.clip_eps, weights=None if scored.is_weights is None else scored.is_weights[mb])
                epoch_drifts.append(self._drift(rollout, scored, mb, new_logprobs))
                v_loss, _ = clipped_value_loss(new_values, scored.old_values[mb], scored.returns[mb], mask,
                                               self.cfg.value_clip_eps)
                entropy = masked_mean(entropy_from_logits(logits.detach()), mask)
                loss = pg_loss + self.cfg.vf_coef * v_loss
                sft = torch.zeros(())
                if demonstrations and self.cfg.sft_coef > 0:
                    sample = self.update_rng.sample(list(demonstrations), min(2, len(demonstrations)))
                    sft = self.sft_loss(sample)
                    loss = loss + self.cfg.sft_coef * sft
                dpo = torch.zeros(())
                if preferences and self.cfg.dpo_coef > 0:
                    dpo = self.dpo_loss(self.update_rng.sample(list(preferences), min(2, len(preferences))))
                    loss = loss + self.cfg.dpo_coef * dpo
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.policy_parameters(), 1.0)
                self.optimizer.step()
                steps += 1
                for key, value in (("policy_loss", pg_loss), ("value_loss", v_loss), ("sft_loss", sft),
                                   ("dpo_loss", dpo), ("entropy", entropy), ("approx_kl", pg_stats.approx_kl),
                                   ("clip_fraction", pg_stats.clip_fraction)):
                    totals[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
        self.policy.peft_model.eval()
        self._measure_mismatch(rollout, scored)
        return {**{k: sum(v) / len(v) if v else 0.0 for k, v in totals.items()}, "epochs": steps / minibatches}

    def iteration(self, prompts: list[list[dict]], demonstrations=(), preferences=()) -> IterationStats:
        """One PPO iteration on a batch of prompts; also adapts the KL coefficient toward its target.
        `demonstrations`: (prompt, answer) people wrote; `preferences`: (prompt, chosen, rejected) they voted."""
        started = time.perf_counter()
        rollout = self.rollout(prompts)
        rollout_seconds = time.perf_counter() - started
        self.last_texts = rollout.texts  # for the benchmarks' sample answers
        self.yield_fn()
        scoring = time.perf_counter()
        scored = self.score(rollout)
        updating = time.perf_counter()
        update_stats = self.update(rollout, scored, demonstrations, preferences)
        updated = time.perf_counter()
        mean_kl = float(scored.kl.mean())
        kl_coef_used = self.kl_ctl.kl_coef
        self.kl_ctl.update(mean_kl, len(prompts))
        shrink = kl_shrink_factor(mean_kl, self.cfg.target_kl, power=self.cfg.kl_shrink_power) \
            if self.cfg.kl_shrink else 1.0
        if shrink < 1.0:
            self.shrink_adapter(shrink)
            self.forget_momentum()
        self.iterations += 1
        mask = rollout.response_mask
        return IterationStats(
            iteration=self.iterations, mean_score=float(scored.scores.mean()), kl=mean_kl, kl_coef=kl_coef_used,
            mean_length=float(mask.sum(1).mean()), policy_loss=update_stats["policy_loss"],
            value_loss=update_stats["value_loss"], sft_loss=update_stats["sft_loss"],
            dpo_loss=update_stats["dpo_loss"],
            entropy=update_stats["entropy"], approx_kl=update_stats["approx_kl"],
            clip_fraction=update_stats["clip_fraction"],
            explained_variance=explained_variance(scored.old_values, scored.returns, mask),
            seconds=time.perf_counter() - started, epochs=update_stats["epochs"], kl_shrink=shrink,
            rollout_seconds=rollout_seconds, score_seconds=updating - scoring, update_seconds=updated - updating,
            sampler_kl=scored.sampler_kl, is_truncated=scored.is_truncated,
            relevance=float(scored.relevance.mean()) if scored.relevance is not None else None)

    def forget_momentum(self) -> None:
        """After a step back: Adam's momentum still points the way the policy ran off, so drop it (and with
        --kl-shrink-forget all, the second moment too)."""
        if self.cfg.kl_shrink_forget == "all":
            self.optimizer.state.clear()
            return
        for state in self.optimizer.state.values():
            if "exp_avg" in state:
                state["exp_avg"].zero_()

    @torch.no_grad()
    def shrink_adapter(self, factor: float) -> None:
        """Scale the policy adapter's delta B A by `factor`: a step back towards the reference (see
        `rl_math.kl_shrink_factor`). The value head is left as it is."""
        for name, p in lora_parameters(self.policy.peft_model, POLICY_ADAPTER).items():
            if "lora_B" in name:
                p.mul_(factor)

    def sample_prompts(self, recent: list[list[dict]]) -> list[list[dict]]:
        """Prompts from real recent conversations (topped up from a built-in list on a cold start), each
        repeated `samples_per_prompt` times in a row so its answers can be compared with each other."""
        recent = [m for m in recent if not is_held_out(m)]  # the release gate's prompts stay unseen
        pool = list(recent) or [[{"role": "user", "content": p}] for p in COLD_START_PROMPTS]
        repeats = max(1, self.cfg.samples_per_prompt)
        distinct = max(1, self.cfg.ppo_batch_size // repeats)
        if len(pool) < distinct:
            pool += [[{"role": "user", "content": p}] for p in COLD_START_PROMPTS]
        chosen = self.rng.sample(pool, min(distinct, len(pool)))
        return [messages for messages in chosen for _ in range(repeats)]


def _mask_through_first_eos(response: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(B, R) 1 for tokens up to and including the first end-of-turn, 0 after (generate pads finished rows)."""
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device))  # (B, R)
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # (B, R) EOS count strictly before t
    return (eos_before == 0).long()


class _YieldEachToken:
    """A stopping criterion that never stops: it lets the trainer pause between tokens while chat is busy."""

    def __init__(self, yield_fn: Callable[[], None]):
        self.yield_fn = yield_fn

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.yield_fn()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # generate() ANDs it on-device

"""The online reward model: a LoRA adapter plus a scalar head on the shared frozen base.

It learns from each preference pair as it arrives (Bradley-Terry loss, as TRL's RewardTrainer) with a few
gradient steps on the new pair mixed with a replay sample of older ones. Ties and "both bad" votes are not
pairs (the store writes no preference row for them), so they are skipped rather than fed to a tie loss: with a
few hundred votes, a tie teaches little and would pull real differences together.

Only the last `reward_lora_layers` blocks get LoRA, so autograd records nothing below them: the backward
pass costs a few layers instead of thirty, which is what keeps an update around a second on 2 CPU cores.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers.masking_utils import create_causal_mask

from rlhf_online.config import ModelConfig, RewardConfig
from rlhf_online.models import chat_ids, lora_config, lora_parameters, padded_position_ids
from rlhf_online.rl_math import bradley_terry_loss, pearson_correlation

REWARD_ADAPTER = "reward"
RECENT_FEATURES = 256  # rows whose frozen features are kept by their tokens (RewardModel.frozen_features)


@dataclass(frozen=True)
class UpdateStats:
    """What one online update learned; `correct_before` is the prequential outcome (ties count half)."""

    preference_id: int
    correct_before: float
    margin_before: float
    loss: float
    seconds: float


def _base_model(model):
    """The transformers model under a PeftModel (the trainer shares one base between policy and reward), or the
    model itself when no adapter was attached."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def attach_reward_adapter(model, model_cfg: ModelConfig, reward_cfg: RewardConfig):
    """Add the reward LoRA to a PeftModel (sharing its base with the policy), or wrap a plain base.

    With `reward_lora_layers=0` the reward model is heads on frozen features and needs no adapter: the model
    is returned as it is."""
    depth = feature_depth(_base_model(model).config, reward_cfg)
    if reward_cfg.reward_lora_layers <= 0:
        return model
    top = list(range(max(0, depth - reward_cfg.reward_lora_layers), depth))
    config = lora_config(model_cfg, layers=top)
    config.task_type = None  # the head is ours, not PEFT's sequence-classification head
    if isinstance(model, PeftModel):
        model.add_adapter(REWARD_ADAPTER, config)
        return model
    from peft import get_peft_model

    return get_peft_model(model, config, adapter_name=REWARD_ADAPTER)


POOLINGS = ("last", "mean", "sum")
# "sum" pooling divides by this constant, not by the answer's length, so that a head can count (a taste for
# shorter answers, or for saying "you", is a sum over tokens; a mean only gives it divided by the length);
# a typical answer's number of tokens, so its features keep the mean's scale.
SUM_POOL_SCALE = 64.0


def feature_taps(model_config, cfg: RewardConfig) -> list[tuple[int, str]]:
    """`reward_features` ("0.33:mean,1:last") as (decoder blocks, pooling) pairs, deepest last.

    Each item taps the hidden states after that fraction of the stack; the reward features are the taps
    concatenated. Why several: a middle layer's average over the answer and the last layer's final token carry
    different parts of what people judge (bench/reward_sweep.py: together they beat either alone); the mean and
    the sum of one depth tell a head what an answer is like and how much of it there is (bench/reward_tastes.py)."""
    layers = model_config.num_hidden_layers
    taps = []
    for item in cfg.reward_features.split(","):
        fraction, _, pooling = item.strip().partition(":")
        try:
            fraction_value = float(fraction)
        except ValueError:
            fraction_value = -1.0
        if not 0 < fraction_value <= 1 or pooling not in POOLINGS:
            raise ValueError(f"reward_features item {item.strip()!r}: use DEPTH:POOL with DEPTH in (0, 1] "
                             "(a fraction of the decoder blocks) and POOL last, mean or sum, e.g. 0.33:mean,1:last")
        taps.append((max(1, min(layers, round(fraction_value * layers))), pooling))
    return sorted(set(taps))


def feature_depth(model_config, cfg: RewardConfig) -> int:
    """How many decoder blocks the reward features go through (the deepest tap)."""
    return feature_taps(model_config, cfg)[-1][0]


@dataclass(frozen=True)
class TokenRow:
    """A chat-templated (conversation, answer), cut to its last `reward_max_tokens`; the answer is at the end."""

    ids: list[int]
    answer_tokens: int


class RewardModel:
    """Scores (conversation, answer) from the base's hidden states, with a small ensemble of scalar heads.

    The features: the hidden states after a fraction of the decoder blocks, through the model's final RMSNorm,
    at the answer's last token, averaged over the answer's tokens, or summed over them, at one or more depths
    (`reward_features`, concatenated). LoRA, when
    `reward_lora_layers` > 0, adapts the top blocks of that stack; with 0 the features are frozen, so each
    answer's feature vector is computed once and an update trains only the heads (see `RewardConfig`).

    Why several heads: each head is one linear layer on the same features (nearly free), trained on its own
    bootstrap resample of the votes (`bootstrap_weights`), so the heads agree where the votes pin the answer
    down and disagree where they do not. The mean is the score; the spread is the model's uncertainty, which
    PPO subtracts (`OnlineRewardLearner.ppo_scores`) so it does not chase answers the votes never covered.
    """

    def __init__(self, model, tokenizer, cfg: RewardConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        base = _base_model(model)
        self.taps = feature_taps(base.config, cfg)
        self.depth = self.taps[-1][0]
        if cfg.reward_lora_layers > 0 and len({depth for depth, _ in self.taps}) > 1:
            raise ValueError("reward LoRA adapts the top of one feature stack: give reward_features items of one "
                             "depth (e.g. 1:mean,1:sum)")
        hidden = base.config.hidden_size
        self.heads = max(1, cfg.reward_heads)
        self.head = torch.nn.Linear(hidden * len(self.taps), self.heads, device=base.device)
        torch.nn.init.zeros_(self.head.weight)  # every answer scores 0 until a vote says otherwise
        torch.nn.init.zeros_(self.head.bias)
        for p in self.lora_parameters().values():
            p.requires_grad_(True)
        # The same answers are featurized twice within a trainer step: once to learn a new vote, then to show
        # that voted pair's scores. Frozen features depend on the tokens alone, so the second costs nothing
        # (22 s of a 10-minute simulated run's trainer time went to recomputing them). Tokens -> features; at
        # most RECENT_FEATURES rows: ~1 MB frozen, up to ~75 MB with reward LoRA (hidden states of 256 tokens).
        self.recent_features: collections.OrderedDict[tuple[int, ...], tuple[torch.Tensor, int]] = \
            collections.OrderedDict()

    @property
    def frozen(self) -> bool:
        """No reward LoRA: features never change, so they are computed once per answer and cached pooled."""
        return self.cfg.reward_lora_layers <= 0

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {} if self.frozen else lora_parameters(self.model, REWARD_ADAPTER)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.lora_parameters().values()) + list(self.head.parameters())

    @property
    def split_layer(self) -> int:
        """Layers below this index carry no reward LoRA: their output for a sequence never changes."""
        return max(0, self.depth - max(0, self.cfg.reward_lora_layers))

    @property
    def trunk(self):
        return _base_model(self.model).model  # the transformer without the LM head: no vocab matmul

    def token_rows(self, conversations: list[tuple[list[dict], str]]) -> list[TokenRow]:
        """Chat-template each (messages, answer), keep the last `reward_max_tokens` tokens, and count the
        answer's tokens (what mean pooling averages over)."""
        rows = []
        for messages, answer in conversations:
            full = chat_ids(self.tokenizer, list(messages) + [{"role": "assistant", "content": answer}],
                            add_generation_prompt=False)
            prompt = chat_ids(self.tokenizer, messages) if messages else []
            kept = full[-self.cfg.reward_max_tokens:]  # the end holds the answer and the latest turns
            rows.append(TokenRow(kept, min(len(kept), max(1, len(full) - len(prompt)))))
        return rows

    def _run_layers(self, hidden, attention_mask, layers) -> torch.Tensor:
        """Run a slice of the decoder stack on left-padded hidden states (B, T, H), as LlamaModel.forward does."""
        position_ids = padded_position_ids(attention_mask)  # (B, T)
        causal_mask = create_causal_mask(config=self.trunk.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask, past_key_values=None,
                                         position_ids=position_ids)
        position_embeddings = self.trunk.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                           position_ids=position_ids)
        return hidden

    def _pool(self, hidden: torch.Tensor, answer_tokens: list[int], pooling: str) -> torch.Tensor:
        """(B, T, H) normed, left-padded hidden states -> (B, H) features."""
        if pooling == "last":
            return hidden[:, -1, :]  # left padding puts the final token last
        width = hidden.shape[1]
        positions = torch.arange(width, device=hidden.device)
        counts = torch.tensor(answer_tokens, device=hidden.device)
        mask = (positions[None, :] >= width - counts[:, None]).to(hidden.dtype)  # (B, T) the answer's tokens
        total = (hidden * mask[..., None]).sum(1)  # (B, H)
        return total / SUM_POOL_SCALE if pooling == "sum" else total / counts[:, None].to(hidden.dtype)

    def frozen_features(self, rows: list[TokenRow]) -> list[tuple[torch.Tensor, int]]:
        """What never changes for a row, cacheable forever: with reward LoRA, the hidden states entering its
        first layer ((len_i, H) fp16); without, the pooled feature vector itself ((H,) fp32). The last
        `RECENT_FEATURES` rows are remembered by their tokens and not computed again."""
        keys = [tuple(r.ids) for r in rows]
        missing = list(dict.fromkeys(k for k in keys if k not in self.recent_features))
        if missing:
            rows_by_key = dict(zip(keys, rows))
            computed = self._compute_frozen_features([rows_by_key[k] for k in missing])
            self.recent_features.update(zip(missing, computed))
        for key in keys:
            self.recent_features.move_to_end(key)
        found = [self.recent_features[k] for k in keys]
        while len(self.recent_features) > RECENT_FEATURES:
            self.recent_features.popitem(last=False)
        return found

    @torch.no_grad()
    def _compute_frozen_features(self, rows: list[TokenRow]) -> list[tuple[torch.Tensor, int]]:
        batch = self.tokenizer.pad({"input_ids": [r.ids for r in rows]}, padding=True, padding_side="left",
                                   return_tensors="pt")
        device = self.trunk.embed_tokens.weight.device
        with self._reward_active():
            hidden = self.trunk.embed_tokens(batch["input_ids"].to(device))  # (B, T, H)
            mask = batch["attention_mask"].to(device)
            if self.frozen:
                pooled, done = [], 0
                for layers, pooling in self.taps:  # run the stack once, tapping it on the way up
                    hidden = self._run_layers(hidden, mask, self.trunk.layers[done:layers])
                    done = layers
                    pooled.append(self._pool(self.trunk.norm(hidden), [r.answer_tokens for r in rows], pooling))
                pooled = torch.cat(pooled, dim=-1)  # (B, H * taps)
                return [(p.to("cpu", torch.float32), r.answer_tokens) for p, r in zip(pooled, rows)]
            hidden = self._run_layers(hidden, mask, self.trunk.layers[:self.split_layer])
        # strip left padding; the cache lives in CPU memory whatever the device
        return [(h[-len(r.ids):].to("cpu", torch.float16), r.answer_tokens) for h, r in zip(hidden, rows)]

    def forward_features(self, features: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """(B, K) scores, one per head, from cached frozen features: only the reward LoRA layers (if any) run."""
        embed = self.trunk.embed_tokens.weight  # the trunk's device and activation dtype (fp32 on CPU, bf16 on CUDA)
        if self.frozen:
            pooled = torch.stack([f for f, _ in features]).to(self.head.weight.device, self.head.weight.dtype)
            return self.head(pooled)  # (B, K)
        width = max(f.shape[0] for f, _ in features)
        dtype = embed.dtype if embed.dtype.is_floating_point else torch.float32
        hidden = torch.zeros(len(features), width, features[0][0].shape[1], device=embed.device, dtype=dtype)
        attention_mask = torch.zeros(len(features), width, dtype=torch.long, device=embed.device)  # (B, T)
        for i, (f, _) in enumerate(features):
            hidden[i, width - f.shape[0]:] = f.to(embed.device, dtype)
            attention_mask[i, width - f.shape[0]:] = 1
        with self._reward_active():
            hidden = self._run_layers(hidden, attention_mask, self.trunk.layers[self.split_layer:self.depth])
            normed, counts = self.trunk.norm(hidden), [n for _, n in features]
            pooled = torch.cat([self._pool(normed, counts, pooling) for _, pooling in self.taps], dim=-1)  # (B, H taps)
        return self.head(pooled.to(self.head.weight.dtype))  # (B, K)

    def forward(self, conversations: list[tuple[list[dict], str]]) -> torch.Tensor:
        """(B, K) per-head scores."""
        return self.forward_features(self.frozen_features(self.token_rows(conversations)))

    @contextlib.contextmanager
    def _reward_active(self):
        """Run the trunk as the reward model sees it: its own adapter, or, when frozen, no adapter at all (the
        base is shared with the policy, whose LoRA must not move the reward's features)."""
        if self.frozen:
            with self.model.disable_adapter() if isinstance(self.model, PeftModel) else contextlib.nullcontext():
                yield
            return
        previous = self.model.active_adapter
        self.model.set_adapter(REWARD_ADAPTER)
        try:
            yield
        finally:
            self.model.set_adapter(previous)
            for p in self.parameters():  # PEFT's set_adapter freezes inactive adapters
                p.requires_grad_(True)

    @torch.no_grad()
    def head_scores(self, conversations: list[tuple[list[dict], str]], batch_size: int = 8) -> torch.Tensor:
        """(B, K) per-head scores, batched, no gradient."""
        was_training = self.model.training
        self.model.eval()
        scores: list[torch.Tensor] = []
        try:
            for start in range(0, len(conversations), batch_size):
                scores.append(self.forward(conversations[start:start + batch_size]).float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(scores) if scores else torch.zeros(0, self.heads)

    def score(self, conversations: list[tuple[list[dict], str]], batch_size: int = 8) -> list[float]:
        """The ensemble's mean score per conversation (what the UI shows)."""
        return self.head_scores(conversations, batch_size).mean(1).tolist()

    def state(self) -> dict[str, torch.Tensor]:
        state = {f"lora.{k}": v.detach().cpu().clone() for k, v in self.lora_parameters().items()}
        state.update({f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint; one with another number of heads (e.g. the single head of older versions) is
        migrated: every head starts from the mean of the saved heads and the bootstrap spreads them again."""
        lora = self.lora_parameters()
        expected = {f"lora.{k}" for k in lora} | {f"head.{k}" for k in self.head.state_dict()}
        if set(state) != expected:
            raise ValueError("reward checkpoint does not match this model (different base or LoRA settings)")
        head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
        if head["weight"].shape[-1] != self.head.weight.shape[-1]:
            raise ValueError("reward checkpoint does not match this model (different base model or "
                             "--reward-features)")
        if head["weight"].shape[0] != self.heads:
            head = {"weight": head["weight"].mean(0, keepdim=True).expand(self.heads, -1).clone(),
                    "bias": head["bias"].reshape(-1).mean().expand(self.heads).clone()}
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith("lora."):
                    lora[key[5:]].copy_(value)
            self.head.load_state_dict(head)


def bootstrap_weights(preference_ids: list[int], heads: int) -> torch.Tensor:
    """(n, K) online bootstrap weights, 0 or 2 with equal odds ("double-or-nothing", Owen & Eckles 2012),
    fixed per (pair, head) so a replayed pair keeps its weights. Each head thus learns from about half the
    votes, and the heads disagree where the votes leave the answer open. One head: all weights 1."""
    if heads == 1:
        return torch.ones(len(preference_ids), 1)
    return torch.tensor([[2.0 * (random.Random(int(pid) * 1000 + k).random() < 0.5) for k in range(heads)]
                         for pid in preference_ids])


def answer_length_feature(answer: str) -> float:
    """log(1 + characters): what the length audit measures length in (emoji strings count, unlike words)."""
    return math.log1p(len(answer.strip()))


class LengthAudit:
    """How much of the reward model's verdict is answer length, and how much of it the votes justify.

    On each new pair, scored *before* the model learns it (held-out, prequential), it records the length
    difference dl = l(chosen) - l(rejected) (l = log characters) and the score difference dr. Then:

    * the **votes' length slope** w: a Bradley-Terry model on length alone, P(chosen) = sigmoid(w * dl), fitted
      by MAP (Gaussian prior N(0, 1): a taste that always picks the shorter answer gives a large but finite w);
    * the **reward model's length slope** s: least squares of dr on dl through the origin (same units: logits
      per unit of log length);
    * the **correction** c: the part of s the votes do not show - all of s when it has the other sign than w,
      s - w when it is steeper than w in the same direction, 0 otherwise. PPO's reward subtracts c * l.
      With `match`, c = s - w always: where the reward model is *shallower* than the votes, the rest of the
      votes' slope is added too, so PPO's reward depends on length exactly as much as the votes do.

    So a length preference people really have (a "concise" taste) is kept, and one the reward model picked up
    on its own (shorter answers winning when votes do not favour them) is removed. Why `match`: the heads read
    mean-pooled hidden states, which barely encode length; measured in a simulated run with a concise taste
    (the votes' slope -4.2), the reward model's slope was only -0.37, so PPO was hardly paid for what people
    asked for most plainly. `correlation` is the
    Pearson correlation between scores and l over the recent answers, before and after the correction.
    """

    def __init__(self, window: int = 200, min_pairs: int = 20, prior_var: float = 1.0, match: bool = False):
        self.match = match
        self.min_pairs = min_pairs
        self.prior_var = prior_var
        self.pairs: collections.deque = collections.deque(maxlen=window)  # (dl, dr)
        self.answers: collections.deque = collections.deque(maxlen=2 * window)  # (l, score)

    def add(self, chosen: str, rejected: str, score_chosen: float, score_rejected: float) -> None:
        l_c, l_r = answer_length_feature(chosen), answer_length_feature(rejected)
        self.pairs.append((l_c - l_r, score_chosen - score_rejected))
        self.answers.extend([(l_c, score_chosen), (l_r, score_rejected)])

    def vote_slope(self, newton_steps: int = 20) -> float:
        """MAP w of P(chosen) = sigmoid(w * dl) over the recorded pairs (1-D Newton's method)."""
        dl = torch.tensor([p[0] for p in self.pairs], dtype=torch.float64)
        w = torch.zeros((), dtype=torch.float64)
        for _ in range(newton_steps):
            p = torch.sigmoid(w * dl)
            grad = ((1 - p) * dl).sum() - w / self.prior_var
            hess = -(p * (1 - p) * dl ** 2).sum() - 1 / self.prior_var
            w = w - grad / hess
        return float(w)

    def reward_slope(self) -> float:
        """Least-squares slope of the score difference on the length difference, through the origin."""
        dl = torch.tensor([p[0] for p in self.pairs], dtype=torch.float64)
        dr = torch.tensor([p[1] for p in self.pairs], dtype=torch.float64)
        denominator = float((dl ** 2).sum())
        return float((dl * dr).sum()) / denominator if denominator > 0 else 0.0

    def correction(self) -> float:
        if len(self.pairs) < self.min_pairs:
            return 0.0
        s, w = self.reward_slope(), self.vote_slope()
        if self.match:
            return s - w
        if s * w <= 0:
            return s  # opposite signs (or votes indifferent): none of the reward's length slope is justified
        return s - w if abs(s) > abs(w) else 0.0

    def correlation(self, correction: float = 0.0) -> float:
        """Pearson correlation of (score - correction * l) with l over the recent answers (nan if undefined)."""
        if len(self.answers) < 3:
            return float("nan")
        lengths = torch.tensor([a[0] for a in self.answers], dtype=torch.float64)
        scores = torch.tensor([a[1] for a in self.answers], dtype=torch.float64) - correction * lengths
        return pearson_correlation(scores, lengths)

    def typical_length(self) -> float:
        """Mean l over the recent answers. The correction is applied as c * (l - this), not c * l: PPO's
        advantages do not change either way, but the reward curve the panel shows stays on the scale of the
        scores instead of jumping by c * l (about -25 for a steep concise taste) once the correction starts."""
        return sum(a[0] for a in self.answers) / len(self.answers) if self.answers else 0.0

    def summary(self) -> dict[str, float]:
        enough = len(self.pairs) >= self.min_pairs
        correction = self.correction()
        return {"length_pairs": len(self.pairs),
                "length_slope_votes": self.vote_slope() if enough else float("nan"),
                "length_slope_reward": self.reward_slope() if enough else float("nan"),
                "length_correction": correction,
                "length_corr_raw": self.correlation(),
                "length_corr_adjusted": self.correlation(correction)}


@dataclass
class PrequentialRecord:
    """Running online metrics: accuracy measured before each update is the honest online score."""

    window: int = 50

    def __post_init__(self):
        self.total = 0
        self.correct = 0.0
        self.recent: collections.deque = collections.deque(maxlen=self.window)
        self.recent_margins: collections.deque = collections.deque(maxlen=self.window)

    def add(self, correct: float, margin: float) -> None:
        self.total += 1
        self.correct += correct
        self.recent.append(correct)
        self.recent_margins.append(margin)

    def summary(self) -> dict[str, float]:
        return {
            "pairs": self.total,
            "prequential_accuracy": self.correct / self.total if self.total else float("nan"),
            "recent_accuracy": sum(self.recent) / len(self.recent) if self.recent else float("nan"),
            "recent_margin": sum(self.recent_margins) / len(self.recent_margins) if self.recent_margins
            else float("nan"),
        }


class OnlineRewardLearner:
    """Turns a stream of preference pairs into reward-model updates (the path both app and benchmark use)."""

    def __init__(self, reward_model: RewardModel, cfg: RewardConfig, seed: int = 0):
        self.rm = reward_model
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.replay: list = []
        self._feature_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # preference id -> features
        self.replay_capacity = cfg.reward_replay_capacity
        self.metrics = PrequentialRecord()
        self.length_audit = LengthAudit(match=cfg.reward_length_match)
        self.last_preference_id = 0
        head_params = list(reward_model.head.parameters())
        groups = [{"params": head_params, "lr": cfg.reward_head_lr}]  # the head starts at zero and must move first
        if reward_model.lora_parameters():
            groups.append({"params": list(reward_model.lora_parameters().values()), "lr": cfg.reward_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    def _features(self, pref) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features of (chosen, rejected), computed once per pair and kept with it for replay."""
        self.prefetch([pref])
        return self._feature_cache[pref.id]

    def prefetch(self, prefs: list, batch_size: int = 8) -> None:
        """Compute the frozen features of several new pairs in a few batched forwards (answers of similar
        length together), so a burst of votes or an imported file costs less than one forward per answer."""
        todo = [p for p in prefs if p.id not in self._feature_cache]
        conversations = [(p.prompt, answer) for p in todo for answer in (p.chosen, p.rejected)]
        rows = self.rm.token_rows(conversations)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
        features: list = [None] * len(rows)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, f in zip(chunk, self.rm.frozen_features([rows[i] for i in chunk])):
                features[i] = f
        for k, p in enumerate(todo):
            self._feature_cache[p.id] = (features[2 * k], features[2 * k + 1])

    def observe(self, pref) -> UpdateStats:
        """Score the new pair (prequential), then take gradient steps on it plus a replay sample."""
        started = time.perf_counter()
        replay = self.rng.sample(self.replay, min(self.cfg.reward_replay, len(self.replay)))
        prefs = [pref] + replay
        features = [self._features(p) for p in prefs]
        batch = [f[0] for f in features] + [f[1] for f in features]  # chosen rows first, then rejected rows
        weights = torch.tensor([float(p.weight) for p in prefs])[:, None] \
            * bootstrap_weights([p.id for p in prefs], self.rm.heads)  # (n, K)
        n = len(prefs)
        self.rm.model.train()
        correct_before = margin_before = loss_value = 0.0
        for step in range(self.cfg.reward_steps_per_vote):
            rewards = self.rm.forward_features(batch)  # (2n, K)
            r_chosen, r_rejected = rewards[:n], rewards[n:]  # (n, K) each
            if step == 0:
                before = rewards[[0, n]].detach().float().mean(1)  # (2,) the new pair's ensemble scores
                margin_before = float(before[0] - before[1])
                correct_before = 1.0 if margin_before > 0 else 0.5 if margin_before == 0 else 0.0
                self.length_audit.add(pref.chosen, pref.rejected, float(before[0]), float(before[1]))
            w = weights.to(rewards.device)
            loss = torch.stack([bradley_terry_loss(r_chosen[:, k], r_rejected[:, k], w[:, k],
                                                   label_smoothing=self.cfg.reward_label_smoothing)
                                for k in range(self.rm.heads)]).mean()  # each head on its own resample
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.rm.parameters(), 1.0)
            self.optimizer.step()
            loss_value = float(loss.detach())
        self.rm.model.eval()
        self._remember(pref)
        self.metrics.add(correct_before, margin_before)
        self.last_preference_id = max(self.last_preference_id, int(pref.id))
        return UpdateStats(preference_id=int(pref.id), correct_before=correct_before, margin_before=margin_before,
                           loss=loss_value, seconds=time.perf_counter() - started)

    def ppo_scores(self, conversations: list[tuple[list[dict], str]]) -> list[float]:
        """The reward PPO maximises: the heads' mean, minus `reward_uncertainty_coef` x their spread, minus the
        length dependence the votes do not justify (`LengthAudit.correction`)."""
        heads = self.rm.head_scores(conversations)  # (B, K)
        scores = heads.mean(1)
        if heads.shape[1] > 1 and self.cfg.reward_uncertainty_coef:
            scores = scores - self.cfg.reward_uncertainty_coef * heads.std(1, unbiased=False)
        if self.cfg.reward_length_correction:
            correction = self.length_audit.correction()
            lengths = torch.tensor([answer_length_feature(a) for _, a in conversations])
            scores = scores - correction * (lengths - self.length_audit.typical_length())
        return scores.tolist()

    def _remember(self, pref) -> None:
        if len(self.replay) < self.replay_capacity:
            self.replay.append(pref)
        else:  # reservoir sampling keeps the buffer a uniform sample of everything seen
            slot = self.rng.randrange(self.metrics.total + 1)
            if slot < self.replay_capacity:
                self._feature_cache.pop(self.replay[slot].id, None)
                self.replay[slot] = pref
            else:
                self._feature_cache.pop(pref.id, None)

    def save(self, path: Path) -> None:
        """Atomic checkpoint: a crash mid-write leaves the previous one intact."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        metadata = {"last_preference_id": str(self.last_preference_id), "pairs": str(self.metrics.total),
                    "correct": repr(self.metrics.correct)}
        save_file(self.rm.state(), str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        """Resume from a checkpoint; raises ValueError for a corrupt or mismatched file (callers fall back)."""
        from safetensors import safe_open

        try:
            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
        except Exception as exc:
            raise ValueError(f"corrupt reward checkpoint {path}: {exc}") from exc
        self.rm.load_state(state)
        self.last_preference_id = int(metadata.get("last_preference_id", 0))
        self.metrics.total = int(metadata.get("pairs", 0))
        self.metrics.correct = float(metadata.get("correct", 0.0))

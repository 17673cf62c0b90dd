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
from rlhf_online.models import lora_config, lora_parameters
from rlhf_online.rl_math import bradley_terry_loss

REWARD_ADAPTER = "reward"


@dataclass(frozen=True)
class UpdateStats:
    """What one online update learned; `correct_before` is the prequential outcome (ties count half)."""

    preference_id: int
    correct_before: float
    margin_before: float
    loss: float
    seconds: float


def attach_reward_adapter(model, model_cfg: ModelConfig, reward_cfg: RewardConfig) -> PeftModel:
    """Add the reward LoRA to a PeftModel (sharing its base with the policy), or wrap a plain base."""
    layers = model.config.num_hidden_layers if not isinstance(model, PeftModel) \
        else model.get_base_model().config.num_hidden_layers
    top = list(range(max(0, layers - reward_cfg.reward_lora_layers), layers))
    config = lora_config(model_cfg, layers=top)
    config.task_type = None  # the head is ours, not PEFT's sequence-classification head
    if isinstance(model, PeftModel):
        model.add_adapter(REWARD_ADAPTER, config)
        return model
    from peft import get_peft_model

    return get_peft_model(model, config, adapter_name=REWARD_ADAPTER)


class RewardModel:
    """Scores (conversation, answer) at the answer's last token.

    Left padding puts every sequence's last real token at position -1, so pooling is a plain slice.
    """

    def __init__(self, peft_model: PeftModel, tokenizer, cfg: RewardConfig):
        self.model = peft_model
        self.tokenizer = tokenizer
        self.cfg = cfg
        hidden = peft_model.get_base_model().config.hidden_size
        self.head = torch.nn.Linear(hidden, 1, device=peft_model.get_base_model().device)
        torch.nn.init.zeros_(self.head.weight)  # every answer scores 0 until a vote says otherwise
        torch.nn.init.zeros_(self.head.bias)
        for p in self.lora_parameters().values():
            p.requires_grad_(True)

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        return lora_parameters(self.model, REWARD_ADAPTER)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.lora_parameters().values()) + list(self.head.parameters())

    @property
    def split_layer(self) -> int:
        """Layers below this index carry no reward LoRA: their output for a sequence never changes."""
        return max(0, self.trunk.config.num_hidden_layers - self.cfg.reward_lora_layers)

    @property
    def trunk(self):
        return self.model.get_base_model().model  # the transformer without the LM head: no vocab matmul

    def token_rows(self, conversations: list[tuple[list[dict], str]]) -> list[list[int]]:
        """Chat-template each (messages, answer) and keep the last `reward_max_tokens` tokens."""
        rows = []
        for messages, answer in conversations:
            full = list(messages) + [{"role": "assistant", "content": answer}]
            ids = self.tokenizer.apply_chat_template(full, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            rows.append(ids[-self.cfg.reward_max_tokens:])  # the end holds the answer and the latest turns
        return rows

    def _run_layers(self, hidden, attention_mask, layers) -> torch.Tensor:
        """Run a slice of the decoder stack on left-padded hidden states (B, T, H), as LlamaModel.forward does."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (B, T) padding-aware positions
        causal_mask = create_causal_mask(config=self.trunk.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask, past_key_values=None,
                                         position_ids=position_ids)
        position_embeddings = self.trunk.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                           position_ids=position_ids)
        return hidden

    @torch.no_grad()
    def frozen_features(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Hidden states entering the first LoRA layer, one (len_i, H) fp16 tensor per row, cacheable forever."""
        batch = self.tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
        device = self.trunk.embed_tokens.weight.device
        with self._reward_active():
            hidden = self.trunk.embed_tokens(batch["input_ids"].to(device))  # (B, T, H)
            hidden = self._run_layers(hidden, batch["attention_mask"].to(device), self.trunk.layers[:self.split_layer])
        # strip left padding; the cache lives in CPU memory whatever the device
        return [h[-len(r):].to("cpu", torch.float16) for h, r in zip(hidden, rows)]

    def forward_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B,) scores from cached frozen features: only the top LoRA layers run, with gradients."""
        width = max(f.shape[0] for f in features)
        embed = self.trunk.embed_tokens.weight  # the trunk's device and activation dtype (fp32 on CPU, bf16 on CUDA)
        dtype = embed.dtype if embed.dtype.is_floating_point else torch.float32
        hidden = torch.zeros(len(features), width, features[0].shape[1], device=embed.device, dtype=dtype)  # (B, T, H)
        attention_mask = torch.zeros(len(features), width, dtype=torch.long, device=embed.device)  # (B, T)
        for i, f in enumerate(features):
            hidden[i, width - f.shape[0]:] = f.to(embed.device, dtype)
            attention_mask[i, width - f.shape[0]:] = 1
        with self._reward_active():
            hidden = self._run_layers(hidden, attention_mask, self.trunk.layers[self.split_layer:])
            hidden = self.trunk.norm(hidden)
        last = hidden[:, -1, :]  # (B, H): left padding puts the final token last
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1)  # (B,)

    def forward(self, conversations: list[tuple[list[dict], str]]) -> torch.Tensor:
        return self.forward_features(self.frozen_features(self.token_rows(conversations)))

    @contextlib.contextmanager
    def _reward_active(self):
        previous = self.model.active_adapter
        self.model.set_adapter(REWARD_ADAPTER)
        try:
            yield
        finally:
            self.model.set_adapter(previous)
            for p in self.parameters():  # PEFT's set_adapter freezes inactive adapters
                p.requires_grad_(True)

    @torch.no_grad()
    def score(self, conversations: list[tuple[list[dict], str]], batch_size: int = 8) -> list[float]:
        """Batched scores for the PPO loop and the UI; no gradient."""
        was_training = self.model.training
        self.model.eval()
        scores: list[float] = []
        try:
            for start in range(0, len(conversations), batch_size):
                scores.extend(self.forward(conversations[start:start + batch_size]).tolist())
        finally:
            self.model.train(was_training)
        return scores

    def state(self) -> dict[str, torch.Tensor]:
        state = {f"lora.{k}": v.detach().cpu().clone() for k, v in self.lora_parameters().items()}
        state.update({f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        lora = self.lora_parameters()
        expected = {f"lora.{k}" for k in lora} | {f"head.{k}" for k in self.head.state_dict()}
        if set(state) != expected:
            raise ValueError("reward checkpoint does not match this model (different base or LoRA settings)")
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith("lora."):
                    lora[key[5:]].copy_(value)
            self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})


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
        self.last_preference_id = 0
        head_params = list(reward_model.head.parameters())
        self.optimizer = torch.optim.AdamW([
            {"params": list(reward_model.lora_parameters().values()), "lr": cfg.reward_lr},
            {"params": head_params, "lr": cfg.reward_lr * 3},  # the head starts at zero and must move first
        ], weight_decay=0.0)

    def _features(self, pref) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features of (chosen, rejected), computed once per pair and kept with it for replay."""
        cached = self._feature_cache.get(pref.id)
        if cached is None:
            rows = self.rm.token_rows([(pref.prompt, pref.chosen), (pref.prompt, pref.rejected)])
            cached = tuple(self.rm.frozen_features(rows))
            self._feature_cache[pref.id] = cached
        return cached

    def observe(self, pref) -> UpdateStats:
        """Score the new pair (prequential), then take gradient steps on it plus a replay sample."""
        started = time.perf_counter()
        replay = self.rng.sample(self.replay, min(self.cfg.reward_replay, len(self.replay)))
        prefs = [pref] + replay
        features = [self._features(p) for p in prefs]
        batch = [f[0] for f in features] + [f[1] for f in features]  # chosen rows first, then rejected rows
        weights = torch.tensor([float(p.weight) for p in prefs])
        n = len(prefs)
        self.rm.model.train()
        correct_before = margin_before = loss_value = 0.0
        for step in range(self.cfg.reward_steps_per_vote):
            rewards = self.rm.forward_features(batch)  # (2n,)
            r_chosen, r_rejected = rewards[:n], rewards[n:]
            if step == 0:
                margin_before = float((r_chosen[0] - r_rejected[0]).detach())
                correct_before = 1.0 if margin_before > 0 else 0.5 if margin_before == 0 else 0.0
            loss = bradley_terry_loss(r_chosen, r_rejected, weights.to(rewards.device))
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

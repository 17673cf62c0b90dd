"""What samples the trainer's answers: llama.cpp on the served GGUF with the policy's current adapter.

The split OpenRLHF and TRL make with vLLM: a fast inference engine samples the rollouts, PyTorch computes every
log-probability, value and gradient. On 2 CPU cores this moves the slowest part of a PPO iteration (sampling 8
answers at ~10 tok/s with transformers) onto llama.cpp, which decodes the 8 rows together in one batch.

The policy changes every iteration, and llama.cpp loads LoRA files only when a server is built, so before each
sampling call the adapter's weights are fingerprinted; when they changed, they are written as a GGUF adapter
(`gguf_adapter`, with llama.cpp's rotary permutation) and a new server is built with it (~0.5 s). A zero adapter
(the base) needs no file. The trainer's base weights should be the GGUF's own, dequantized (`--quantization
auto`), so that sampler and trainer compute the same policy; what difference remains (llama.cpp's kernels, its
quantized activations) is measured on every batch and corrected with truncated importance weights in PPO.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict

from rlhf_online.config import ROLLOUT_ENGINES, AppConfig, SamplingConfig
from rlhf_online.gguf_adapter import write_gguf_adapter
from rlhf_online.gguf_weights import engine_gguf
from rlhf_online.models import end_of_turn_id, gguf_model_file
from rlhf_online.versions import BASE_VERSION

log = logging.getLogger(__name__)

POLICY_VERSION = "policy"  # the sampler's one served version: the policy as it is now


def choose_rollout_engine(cfg: AppConfig, cuda: bool | None = None) -> str:
    """`llamacpp` or `torch`; auto picks llama.cpp for a GGUF model on CPU when the wheel is installed."""
    name = cfg.ppo.rollout_engine
    if name not in ROLLOUT_ENGINES:
        raise ValueError(f"--rollout-engine {name!r}: choose one of {', '.join(ROLLOUT_ENGINES)}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    gguf = gguf_model_file(cfg.model)
    installed = importlib.util.find_spec("xllamacpp") is not None
    if name == "auto":
        return "llamacpp" if gguf is not None and not cuda and installed else "torch"
    if name == "llamacpp" and (gguf is None or not installed):
        raise ValueError("--rollout-engine llamacpp needs a GGUF model (--model embedded or a .gguf file) and the "
                         "xllamacpp package; or use --rollout-engine torch")
    return name


def adapter_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """A digest of the adapter's tensors (~2 M floats: milliseconds), to rebuild the server only on a change."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


class LlamaCppRolloutSampler:
    """Samples answers from the policy adapter of `peft_model` as it is at each call, with llama.cpp."""

    def __init__(self, gguf_path: str | Path, tokenizer, sampling: SamplingConfig, peft_model: PeftModel,
                 adapter_name: str, threads: int = 1, slots: int = 8, max_new_tokens: int = 96):
        from rlhf_online.llamacpp_engine import LlamaCppEngine

        self.peft_model = peft_model
        self.adapter_name = adapter_name
        self.lora_alpha = float(peft_model.peft_config[adapter_name].lora_alpha)
        self.end_of_turn_id = end_of_turn_id(tokenizer)
        self.work_dir = Path(tempfile.mkdtemp(prefix="rlhf-rollout-adapter-"))
        self.engine = LlamaCppEngine(gguf_path, tokenizer, sampling, slots=slots, threads=threads,
                                     ctx_per_slot=sampling.context_tokens + max_new_tokens + 8,
                                     work_dir=self.work_dir / "engine")
        self._fingerprint: str | None = None
        self._served = BASE_VERSION
        self.rebuilds = 0
        self.last_rebuild_s = 0.0

    def _sync_adapter(self) -> None:
        weights = get_peft_model_state_dict(self.peft_model, adapter_name=self.adapter_name)
        fingerprint = adapter_fingerprint(weights)
        if fingerprint == self._fingerprint:
            return
        identity = all(not bool(t.any()) for k, t in weights.items() if "lora_B" in k)  # B = 0: the base itself
        path = None
        if not identity:
            path = write_gguf_adapter(weights, self.lora_alpha, self.engine.base_shape,
                                      self.work_dir / f"policy-{fingerprint[:12]}.gguf")
        self.last_rebuild_s = self.engine.serve_only(POLICY_VERSION, path)
        self.rebuilds += 1
        for old in self.work_dir.glob("policy-*.gguf"):  # the server read its adapter at construction
            if old != path:
                old.unlink(missing_ok=True)
        self._fingerprint = fingerprint
        self._served = BASE_VERSION if identity else POLICY_VERSION

    def sample(self, prompt_ids: list[list[int]], max_new_tokens: int, seeds: list[int]):
        """One answer per prompt from the policy as it is now: `llamacpp_engine.TokenSample`s."""
        self._sync_adapter()
        return self.engine.sample_tokens(prompt_ids, self._served, max_new_tokens, seeds, self.end_of_turn_id)

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int, use_adapter: bool = True):
        """The greedy answer to each prompt, with the chat's repetition penalty, from the policy as it is now or
        (`use_adapter=False`) from the base: the learning timeline's probe answers (5 probes x 48 tokens on one
        thread: 3.6-3.9 s a published version, PyTorch's generate 5.9 s; the rebuild for the new adapter is one
        the next rollout would pay anyway)."""
        if use_adapter:
            self._sync_adapter()
            served = self._served
        else:  # the base for once: the next sample() rebuilds the policy's server
            if self._served != BASE_VERSION:
                self.engine.serve_only(BASE_VERSION, None)
                self._fingerprint, self._served = None, BASE_VERSION
            served = BASE_VERSION
        return self.engine.sample_tokens(prompt_ids, served, max_new_tokens, [0] * len(prompt_ids),
                                         self.end_of_turn_id, greedy=True)

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)


def build_rollout_sampler(cfg: AppConfig, tokenizer, peft_model: PeftModel, adapter_name: str):
    """The trainer's llama.cpp sampler, or None where the training model samples for itself (torch)."""
    if choose_rollout_engine(cfg) != "llamacpp":
        return None
    sampler = LlamaCppRolloutSampler(engine_gguf(cfg), tokenizer, cfg.sampling, peft_model, adapter_name,
                                     threads=max(1, cfg.ppo.trainer_threads),
                                     slots=max(1, cfg.ppo.ppo_batch_size),  # PPO's rollouts only
                                     max_new_tokens=cfg.ppo.answer_tokens(cfg.sampling))
    log.info("PPO rollouts sampled by llama.cpp on %s (%d threads)", sampler.engine.model_path.name,
             sampler.engine.threads)
    return sampler

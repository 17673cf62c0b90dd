"""CUDA path check: what the transformers engine does on a GPU, measured on a model of the embedded one's shape.

CI has no GPU, so the CUDA branch of `models.load_base_model` (bitsandbytes' CUDA 4-bit kernels, bf16 compute,
no CPU repacking workaround) is otherwise never exercised. This script runs the project's own code on a
randomly initialised Llama with SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads): no weights
need to travel to the GPU machine, and speed depends on shape, not on values. It checks and measures:

* the NF4 load puts `Linear4bit` layers on the GPU (no silent fallback to bf16);
* LoRA gradients are non-empty after an eval-mode `generate` (the CPU repacking trap must not exist here);
* wall time of a PPO iteration (batch, answer length and minibatches as the defaults) and of a reward update;
* tokens/s of a two-row batched generation.

    python bench/cuda_check.py --out cuda_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rlhf_online import models  # noqa: E402
from rlhf_online.config import ModelConfig, PPOConfig, RewardConfig, SamplingConfig  # noqa: E402
from rlhf_online.ppo import PolicyWithValue, PPOTrainer  # noqa: E402
from rlhf_online.reward import OnlineRewardLearner, RewardModel, attach_reward_adapter  # noqa: E402
from tiny_model import build_tokenizer  # noqa: E402

PROMPTS = [[{"role": "user", "content": text}] for text in
           ("hello how are you today?", "What is two plus two?", "Why is the sky blue?",
            "What is the capital of France?")]


def smollm2_shaped_folder(path: Path, layers: int) -> Path:
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up: CUDA kernels, allocator
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - started) / repeats


class Preference:  # the fields OnlineRewardLearner reads from a stored vote
    def __init__(self, pref_id, prompt, chosen, rejected):
        self.id, self.prompt, self.chosen, self.rejected, self.weight = pref_id, prompt, chosen, rejected, 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=30, help="transformer blocks (SmolLM2-135M has 30)")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test the script itself on a CPU")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("no CUDA device: this check is for GPU machines (--allow-cpu to smoke-test the script)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "layers": args.layers}
    with tempfile.TemporaryDirectory() as tmp:
        source = str(smollm2_shaped_folder(Path(tmp) / "model", args.layers))
        tokenizer = models.load_tokenizer(source)
        started = time.perf_counter()
        loaded = models.load_base_model(source, "nf4", for_training=True)
        result["load_s"] = time.perf_counter() - started
    import bitsandbytes as bnb

    four_bit = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    result["quantization_used"] = loaded.quantization
    result["linear4bit_layers"] = len(four_bit)
    result["linear4bit_on_device"] = all(m.weight.device.type == device for m in four_bit)
    result["memory_mb"] = loaded.model.get_memory_footprint() / 1e6

    model_cfg = ModelConfig()
    peft = models.attach_lora(loaded.model, model_cfg)
    attach_reward_adapter(peft, model_cfg, RewardConfig())
    policy = PolicyWithValue(peft)
    ppo_cfg = PPOConfig()
    sampling = SamplingConfig()
    trainer = PPOTrainer(policy, tokenizer, lambda messages, texts: [len(t) / 100 for t in texts], ppo_cfg,
                         sampling)

    # LoRA gradients after an eval-mode generate: the trap that forced two base copies on CPU.
    trainer.rollout(PROMPTS[:2])
    peft.train()
    batch = tokenizer(["hello how are you today?"], return_tensors="pt").to(device)
    peft(**batch).logits.float().pow(2).mean().backward()
    lora = models.lora_parameters(peft, models.POLICY_ADAPTER)
    # A fresh lora_B is zero, so lora_A's gradient is exactly zero: present (not None) is what A must show.
    with_grad = [n for n, p in lora.items() if p.grad is not None and ("lora_A" in n or p.grad.abs().sum() > 0)]
    result["lora_tensors"] = len(lora)
    result["lora_tensors_with_grad_after_generate"] = len(with_grad)
    peft.zero_grad(set_to_none=True)

    prompts = trainer.sample_prompts(PROMPTS)
    stats = trainer.iteration(prompts)
    result["ppo_iteration_s"] = timed(lambda: trainer.iteration(prompts), repeats=2)
    result["ppo_batch"] = ppo_cfg.ppo_batch_size
    result["ppo_max_new_tokens"] = trainer.max_new_tokens
    result["ppo_mean_length"] = stats.mean_length

    reward = RewardModel(peft, tokenizer, RewardConfig())
    learner = OnlineRewardLearner(reward, RewardConfig())
    prefs = iter([Preference(i + 1, PROMPTS[i % 4], "a short answer " * (1 + i % 3), "banana " * (2 + i % 5))
                  for i in range(16)])
    for _ in range(4):
        learner.observe(next(prefs))
    result["reward_update_s"] = timed(lambda: learner.observe(next(prefs)), repeats=4)  # each a new pair

    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in PROMPTS[:2]]
    ids = [list(i["input_ids"] if hasattr(i, "keys") else i) for i in ids]
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
    peft.eval()

    def generate_pair():
        peft.generate(**batch, do_sample=True, max_new_tokens=64, min_new_tokens=64, pad_token_id=tokenizer.pad_token_id)

    with torch.no_grad():
        seconds = timed(generate_pair, repeats=2)
    result["pair_64_tokens_wall_s"] = seconds
    result["pair_tok_s"] = 128 / seconds
    if device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 1e6

    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    ok = result["linear4bit_on_device"] and result["lora_tensors_with_grad_after_generate"] == result["lora_tensors"]
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # a plain exit sometimes hung in library threads' teardown after the table


if __name__ == "__main__":
    main()

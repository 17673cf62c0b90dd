"""Sampler-trainer mismatch: if PPO rollouts were sampled by llama.cpp (Q4_1 GGUF) while the trainer computes
log-probabilities in PyTorch, how far apart are the two policies on the sampled answers?

Answers are sampled by the llama.cpp engine at temperature 1 with no truncation (so the sampler's reported
log-probabilities are its true sampling distribution), then scored teacher-forced by each candidate training
copy of the base: the dequantized Q4_1 weights in fp32, and bitsandbytes NF4 of them (today's trainer). Reported
per candidate: mean per-token KL(sampler || trainer) estimated as E[log p_s - log p_t], the spread of the
per-token importance ratio p_t / p_s, and the share of tokens a PPO clip of 0.2 would already clip at step 0.

    python bench/sampler_mismatch.py --answers 16 --out bench/results/sampler_mismatch.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_json  # noqa: E402

PROMPTS = ["Why is the sky blue?", "Give me a tip for sleeping better.", "What is a good name for a cat?",
           "Explain recursion in one sentence.", "How do I boil an egg?", "Write a haiku about rain.",
           "What should I pack for a day hike?", "Is it better to rent or to buy a house?"]


def sample_with_llamacpp(engine, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    state = engine.states.current
    reply = state.server.handle_completions({
        "prompt": prompt_ids, "n_predict": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "min_p": 0.0, "n_probs": 1, "cache_prompt": False})
    content = reply["choices"][0]["logprobs"]["content"]
    return [c["id"] for c in content], [c["logprob"] for c in content]


def torch_logprobs(model, prompt_ids: list[int], answer: list[int]) -> np.ndarray:
    import torch

    ids = torch.tensor([prompt_ids + answer])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    return np.array([logprobs[start - 1 + i, t].item() for i, t in enumerate(answer)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default="bench/results/sampler_mismatch.json")
    args = parser.parse_args(argv)

    import torch

    from rlhf_online import models
    from rlhf_online.config import ModelConfig, SamplingConfig
    from rlhf_online.llamacpp_engine import LlamaCppEngine

    torch.set_num_threads(1)
    source = models.resolve_model_source(ModelConfig())
    tokenizer = models.load_tokenizer(source)
    engine = LlamaCppEngine(models.embedded_gguf_path(), tokenizer, SamplingConfig(), slots=1)
    started = time.time()
    rollouts = []
    for i in range(args.answers):
        prompt = engine.build_prompt([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]).input_ids
        answer, sampler_lp = sample_with_llamacpp(engine, prompt, args.max_new_tokens)
        rollouts.append((prompt, answer, np.array(sampler_lp)))
    engine.close()
    report = {"answers": len(rollouts), "tokens": int(sum(len(a) for _, a, _ in rollouts)), "candidates": {},
              "samples": [tokenizer.decode(a, skip_special_tokens=True)[:120] for _, a, _ in rollouts[:3]]}
    for name, quantization, for_training in (("dequantized Q4_1, fp32", "fp32", False),
                                             ("NF4 of dequantized Q4_1 (today's trainer)", "nf4", True)):
        model = models.load_base_model(source, quantization, for_training=for_training).model
        log_ratios = np.concatenate([torch_logprobs(model, p, a) - s for p, a, s in rollouts])  # log p_t - log p_s
        ratios = np.exp(log_ratios)
        report["candidates"][name] = {
            "kl_sampler_trainer_per_token": float(-log_ratios.mean()),
            "mean_abs_log_ratio": float(np.abs(log_ratios).mean()),
            "ratio_p05": float(np.quantile(ratios, 0.05)), "ratio_p95": float(np.quantile(ratios, 0.95)),
            "share_outside_clip_0.2": float(((ratios < 0.8) | (ratios > 1.2)).mean()),
        }
        del model
    report["seconds"] = time.time() - started
    for name, r in report["candidates"].items():
        print(f"{name:<45} KL/token {r['kl_sampler_trainer_per_token']:.4f}  mean|log r| "
              f"{r['mean_abs_log_ratio']:.3f}  ratio p5-p95 {r['ratio_p05']:.2f}-{r['ratio_p95']:.2f}  "
              f"outside clip {r['share_outside_clip_0.2']:.1%}")
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

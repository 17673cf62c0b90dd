"""Frozen features of every answer in a preference file, computed once and cached, so that the reward-model
sweep (`bench/reward_sweep.py`) can compare head inputs, layers and learning rules in seconds instead of hours.

    python bench/reward_features.py --data ../shared/data/hh_harmless_dev.jsonl --out bench/cache/hh_features.pt

For each answer (chosen and rejected of every pair) it keeps, at several depths of the frozen base, the hidden
state of the last token and the mean over the answer's tokens, both through the model's final RMSNorm (so every
depth has the scale the last layer has). It also keeps each answer's token count.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import SHARED_HH, read_preference_file
from rlhf_online.config import AppConfig
from rlhf_online.models import load_base_model, load_tokenizer, resolve_model_source
from rlhf_online.reward import RewardModel, TokenRow, attach_reward_adapter


def feature_spec(layers: list[int], total: int) -> str:
    """`reward_features` tapping every requested depth with both poolings: the app's own featurisation computes the
    cache, so what the sweep compares is what the app would learn from."""
    return ",".join(f"{l / total!r}:{pool}" for l in layers for pool in ("last", "mean"))


@torch.no_grad()
def extract(rm: RewardModel, rows: list[TokenRow], batch_size: int) -> dict[str, torch.Tensor]:
    """{"L{blocks}_{pool}": (N, H)} for every tap of `rm`, rows batched by length (little padding)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    vectors: list = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, (vector, _) in zip(chunk, rm.frozen_features([rows[i] for i in chunk])):
            vectors[i] = vector
        print(f"{start + len(chunk)}/{len(rows)} answers", flush=True)
    stacked = torch.stack(vectors)  # (N, H * taps), taps in rm.taps order
    width = stacked.shape[1] // len(rm.taps)
    return {f"L{blocks}_{pool}": stacked[:, k * width:(k + 1) * width] for k, (blocks, pool) in enumerate(rm.taps)}


def frozen_feature_model(model: str, max_tokens: int, layers: list[int]) -> RewardModel:
    """The app's reward model, as the trainer loads its base, tapping `layers` with both poolings."""
    cfg = AppConfig()
    cfg.model.model = model
    source = resolve_model_source(cfg.model)
    base = load_base_model(source, cfg.model.resolved_quantization(), for_training=True).model  # as the trainer loads it
    cfg.reward.reward_features = feature_spec(layers, base.config.num_hidden_layers)
    cfg.reward.reward_max_tokens = max_tokens
    return RewardModel(attach_reward_adapter(base, cfg.model, cfg.reward), load_tokenizer(source), cfg.reward)


def answer_features(rm: RewardModel, conversations: list[tuple], batch_size: int) -> dict[str, torch.Tensor]:
    """`extract` of every (messages, answer), plus each answer's token count (what mean pooling averages over)."""
    rows = rm.token_rows(conversations)
    features = extract(rm, rows, batch_size)
    features["answer_tokens"] = torch.tensor([r.answer_tokens for r in rows])
    return features


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_HH))
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--max-tokens", type=int, default=AppConfig().reward.reward_max_tokens)
    parser.add_argument("--layers", default="6,10,14,18,22,26,30", help="depths in decoder blocks (1 to the number of blocks)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/cache/hh_features.pt")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rm = frozen_feature_model(args.model, args.max_tokens, [int(x) for x in args.layers.split(",")])
    pairs = read_preference_file(args.data)
    started = time.time()
    features = answer_features(rm, [(p["prompt"], answer) for p in pairs for answer in (p["chosen"], p["rejected"])],
                               args.batch_size)  # answer 2i chosen, 2i+1 rejected
    features["answer_chars"] = torch.tensor([len(a) for p in pairs for a in (p["chosen"], p["rejected"])])
    torch.save({"features": features, "data": args.data, "model": args.model, "max_tokens": args.max_tokens,
                "quantization": AppConfig().model.quantization, "seconds": time.time() - started}, args.out)
    print(f"wrote {args.out} ({len(features['answer_tokens'])} answers, {time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

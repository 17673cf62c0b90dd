"""Stream real human preference pairs one at a time through the app's online reward-model update.

    python bench/reward_online.py --train ../shared/data/hh_harmless_dev.jsonl --eval-size 400 --out r.json

With only --train, a seeded shuffle holds out --eval-size pairs for evaluation. Prints a learning curve and
writes JSON (eval_accuracy, curve, prequential_accuracy, length_baseline_accuracy, seconds_per_update, ...).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from common import SHARED_HH, peak_rss_mb, read_preference_file, split_rows, write_json
from rlhf_online.config import AppConfig
from rlhf_online.models import load_base_model, load_tokenizer, resolve_model_source
from rlhf_online.reward import OnlineRewardLearner, RewardModel, attach_reward_adapter
from rlhf_online.rl_math import preference_accuracy


@dataclass(frozen=True)
class Pair:
    id: int
    prompt: list
    chosen: str
    rejected: str
    weight: float = 1.0


def eval_accuracy(rm: RewardModel, pairs: list[Pair], threads: int) -> float:
    """Held-out accuracy; evaluation is not part of the app's path, so it may use every core."""
    update_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chosen = rm.score([(p.prompt, p.chosen) for p in pairs])
        rejected = rm.score([(p.prompt, p.rejected) for p in pairs])
    finally:
        torch.set_num_threads(update_threads)
    return preference_accuracy(torch.tensor(chosen), torch.tensor(rejected))


def length_baseline(pairs: list[Pair]) -> float:
    """Prefer the shorter answer: the bar a reward model must clear on HH harmless (~0.55)."""
    wins = [1.0 if len(p.chosen) < len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected) else 0.0
            for p in pairs]
    return sum(wins) / len(wins)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default=str(SHARED_HH), help="JSONL of preference pairs streamed online")
    parser.add_argument("--eval", default=None, help="JSONL for evaluation (default: hold out from --train)")
    parser.add_argument("--eval-size", type=int, default=400, help="pairs held out when --eval is not given")
    parser.add_argument("--limit", type=int, default=None, help="stream at most N training pairs")
    parser.add_argument("--eval-every", type=int, default=100, help="evaluate every N pairs")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--threads", type=int, default=1, help="threads for updates (the trainer uses 1)")
    parser.add_argument("--eval-threads", type=int, default=2, help="threads for evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/reward_online.json")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    rows = read_preference_file(args.train)
    if args.eval:
        train_rows, eval_rows = rows, read_preference_file(args.eval)
    else:
        train_rows, eval_rows = split_rows(rows, args.eval_size, args.seed)
    train = [Pair(i + 1, **r) for i, r in enumerate(train_rows[:args.limit])]
    evaluation = [Pair(i + 1, **r) for i, r in enumerate(eval_rows)]

    cfg = AppConfig()
    cfg.model.model = args.model
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source)
    base = load_base_model(source, cfg.model.quantization, for_training=True).model
    rm = RewardModel(attach_reward_adapter(base, cfg.model, cfg.reward), tokenizer, cfg.reward)
    learner = OnlineRewardLearner(rm, cfg.reward, seed=args.seed)

    curve = [{"pairs": 0, "eval_accuracy": eval_accuracy(rm, evaluation, args.eval_threads)}]
    print(f"{'pairs':>6} {'eval_acc':>9} {'preq_acc':>9} {'recent50':>9} {'s/update':>9}")
    update_seconds = []
    started = time.time()
    for i, pair in enumerate(train, start=1):
        update_seconds.append(learner.observe(pair).seconds)
        if i % args.eval_every == 0 or i == len(train):
            curve.append({"pairs": i, "eval_accuracy": eval_accuracy(rm, evaluation, args.eval_threads)})
            m = learner.metrics.summary()
            print(f"{i:>6} {curve[-1]['eval_accuracy']:>9.3f} {m['prequential_accuracy']:>9.3f} "
                  f"{m['recent_accuracy']:>9.3f} {sum(update_seconds) / len(update_seconds):>9.2f}", flush=True)
    result = {
        "model": args.model,
        "train_pairs": len(train),
        "eval_pairs": len(evaluation),
        "eval_accuracy": curve[-1]["eval_accuracy"],
        "curve": curve,
        "prequential_accuracy": learner.metrics.summary()["prequential_accuracy"],
        "length_baseline_accuracy": length_baseline(evaluation),
        "seconds_per_update": sum(update_seconds) / max(1, len(update_seconds)),
        "seconds_per_update_p95": sorted(update_seconds)[int(0.95 * (len(update_seconds) - 1))] if update_seconds
        else None,
        "peak_rss_mb": peak_rss_mb(),
        "wall_seconds": time.time() - started,
        "config": vars(cfg.reward),
    }
    print(f"eval accuracy {result['eval_accuracy']:.3f} (length baseline {result['length_baseline_accuracy']:.3f}), "
          f"{result['seconds_per_update']:.2f} s/update, peak RSS {result['peak_rss_mb']:.0f} MB")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

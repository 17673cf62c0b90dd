"""Stream real human preference pairs one at a time through the app's online reward-model update.

    python bench/reward_online.py --train ../shared/data/hh_harmless_dev.jsonl --eval-size 400 --out r.json
    python bench/reward_online.py --train TRAIN.jsonl --eval EVAL.jsonl --eval-every 100 --out r.json

Reward-model settings come from the app's RLHF_* variables, e.g. RLHF_REWARD_FEATURES=0.33:mean,1:last.
With only --train, a seeded shuffle holds out --eval-size pairs for evaluation. Prints a learning curve and
writes JSON (eval_accuracy, eval_accuracy_ci, eval_accuracy_length_balanced, length_balanced_pairs,
score_length_correlation, curve, prequential_accuracy, length_baseline_accuracy, seconds_per_update, ...).
Length-balanced pairs: chosen and rejected within 20% of each other in tokens.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

from common import SHARED_HH, peak_rss_mb, read_preference_file, split_rows, write_json
from rlhf_online.config import AppConfig, apply_environment
from rlhf_online.models import load_base_model, load_tokenizer, resolve_model_source
from rlhf_online.reward import OnlineRewardLearner, RewardModel, attach_reward_adapter
from rlhf_online.rl_math import (bootstrap_accuracy_ci, length_balanced_mask, pearson_correlation,
                                  preference_accuracy)


@dataclass(frozen=True)
class Pair:
    id: int
    prompt: list
    chosen: str
    rejected: str
    weight: float = 1.0


def evaluate(rm: RewardModel, pairs: list[Pair], answer_tokens: tuple[torch.Tensor, torch.Tensor], threads: int,
             pairs_seen: int) -> dict:
    """Held-out accuracy with its bootstrap interval, the accuracy on the length-balanced pairs (what the model
    learned beyond length) and the correlation of its scores with log answer length. Evaluation is not part of
    the app's path, so it may use every core."""
    update_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chosen = torch.tensor(rm.score([(p.prompt, p.chosen) for p in pairs]))
        rejected = torch.tensor(rm.score([(p.prompt, p.rejected) for p in pairs]))
    finally:
        torch.set_num_threads(update_threads)
    balanced = length_balanced_mask(*answer_tokens)
    lengths = torch.cat(answer_tokens).float().log()
    return {"pairs": pairs_seen,
            "eval_accuracy": preference_accuracy(chosen, rejected),
            "eval_accuracy_ci": bootstrap_accuracy_ci(chosen, rejected),
            "eval_accuracy_length_balanced": preference_accuracy(chosen[balanced], rejected[balanced])
            if balanced.any() else float("nan"),
            "score_length_correlation": pearson_correlation(torch.cat([chosen, rejected]), lengths)}


def length_baseline(answer_tokens: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Prefer the shorter answer: the bar a reward model must clear on HH harmless (~0.55)."""
    return preference_accuracy(-answer_tokens[0].float(), -answer_tokens[1].float())


def token_counts(tokenizer, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) answer lengths in tokens."""
    def count(text: str) -> int:
        return max(1, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return torch.tensor([count(p.chosen) for p in pairs]), torch.tensor([count(p.rejected) for p in pairs])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default=str(SHARED_HH), help="JSONL of preference pairs streamed online")
    parser.add_argument("--eval", default=None, help="JSONL for evaluation (default: hold out from --train)")
    parser.add_argument("--eval-size", type=int, default=400, help="pairs held out when --eval is not given")
    parser.add_argument("--limit", type=int, default=None, help="stream at most N training pairs")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every N pairs (default: --eval-at)")
    parser.add_argument("--eval-at", default="100,200,400,800", help="pair counts at which to evaluate (0: the untrained model, always 0.5)")
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

    cfg = apply_environment(AppConfig(), os.environ)  # RLHF_REWARD_* variables select the options compared
    cfg.model.model = args.model
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source)
    base = load_base_model(source, cfg.model.resolved_quantization(), for_training=True).model
    rm = RewardModel(attach_reward_adapter(base, cfg.model, cfg.reward), tokenizer, cfg.reward)
    learner = OnlineRewardLearner(rm, cfg.reward, seed=args.seed)

    eval_tokens = token_counts(tokenizer, evaluation)
    eval_at = {int(x) for x in args.eval_at.split(",")}
    curve = [evaluate(rm, evaluation, eval_tokens, args.eval_threads, 0)] if 0 in eval_at else []
    print(f"{'pairs':>6} {'eval_acc':>9} {'95% CI':>13} {'balanced':>9} {'len_corr':>9} {'preq_acc':>9} "
          f"{'s/update':>9}")
    update_seconds = []
    started = time.time()
    for i, pair in enumerate(train, start=1):
        update_seconds.append(learner.observe(pair).seconds)
        due = i % args.eval_every == 0 if args.eval_every else i in eval_at
        if due or i == len(train):
            point = evaluate(rm, evaluation, eval_tokens, args.eval_threads, i)
            curve.append(point)
            m = learner.metrics.summary()
            low, high = point["eval_accuracy_ci"]
            print(f"{i:>6} {point['eval_accuracy']:>9.3f} {f'[{low:.3f},{high:.3f}]':>13} "
                  f"{point['eval_accuracy_length_balanced']:>9.3f} {point['score_length_correlation']:>9.2f} "
                  f"{m['prequential_accuracy']:>9.3f} {sum(update_seconds) / len(update_seconds):>9.2f}", flush=True)
    result = {
        "model": args.model,
        "train_pairs": len(train),
        "eval_pairs": len(evaluation),
        "eval_accuracy": curve[-1]["eval_accuracy"],
        "eval_accuracy_ci": curve[-1]["eval_accuracy_ci"],
        "eval_accuracy_length_balanced": curve[-1]["eval_accuracy_length_balanced"],
        "length_balanced_pairs": int(length_balanced_mask(*eval_tokens).sum()),
        "score_length_correlation": curve[-1]["score_length_correlation"],
        "curve": curve,
        "prequential_accuracy": learner.metrics.summary()["prequential_accuracy"],
        "length_baseline_accuracy": length_baseline(eval_tokens),
        "seconds_per_update": sum(update_seconds) / max(1, len(update_seconds)),
        "seconds_per_update_p95": sorted(update_seconds)[int(0.95 * (len(update_seconds) - 1))] if update_seconds
        else None,
        "peak_rss_mb": peak_rss_mb(),
        "wall_seconds": time.time() - started,
        "config": vars(cfg.reward),
    }
    print(f"eval accuracy {result['eval_accuracy']:.3f} (length baseline {result['length_baseline_accuracy']:.3f}; "
          f"{result['eval_accuracy_length_balanced']:.3f} on {result['length_balanced_pairs']} length-balanced pairs), "
          f"{result['seconds_per_update']:.2f} s/update, peak RSS {result['peak_rss_mb']:.0f} MB")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

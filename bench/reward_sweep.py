"""Compare reward-model options on cached frozen features, over several random splits.

    python bench/reward_features.py --out bench/cache/hh_features.pt      # once (~20 min on 2 cores)
    python bench/reward_sweep.py --grid features --splits 5 --out bench/results/reward_sweep_features.json
    python bench/reward_sweep.py --grid learning --feature L18_mean --out bench/results/reward_sweep_learning.json

Each option streams `--train-size` pairs one at a time through an online linear-head learner (the prequential
protocol of the app: score the new pair, then learn it with a replay sample), and is evaluated on the
`--eval-size` held-out pairs of the same split after 100, 200, 400 and 800 pairs. A split is a seeded shuffle;
every option sees the same splits, so differences between options are paired. Printed: mean and standard
deviation over splits of the held-out accuracy, the accuracy on the length-balanced held-out pairs, the
correlation of the score with answer length, and the "prefer the shorter answer" baseline.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from common import write_json
from rlhf_online.reward import SUM_POOL_SCALE, bootstrap_weights
from rlhf_online.rl_math import length_balanced_mask, pearson_correlation, preference_accuracy

CHECKPOINTS = (100, 200, 400, 800)


def stream(option: dict, xc: torch.Tensor, xr: torch.Tensor, train: list[int], evaluation: list[int], seed: int,
           tokens: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """One online run of a linear-head learner; returns the held-out metrics at each checkpoint."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    heads = option.get("heads", 4)
    head = torch.nn.Linear(xc.shape[1], heads)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=option.get("lr", 3e-3), weight_decay=option.get("wd", 0.0))
    smoothing = option.get("smoothing", 0.0)
    replay, seen, curve, update_seconds = [], 0, [], []
    ec, er = xc[evaluation], xr[evaluation]
    balanced = length_balanced_mask(tokens[0][evaluation], tokens[1][evaluation])
    for i in train:
        started = time.perf_counter()
        batch = [i] + rng.sample(replay, min(option.get("replay", 3), len(replay)))
        w = bootstrap_weights(batch, heads)  # (n, K)
        for _ in range(option.get("steps", 1)):
            margin = head(xc[batch]) - head(xr[batch])  # (n, K)
            loss = -((1 - smoothing) * F.logsigmoid(margin) + smoothing * F.logsigmoid(-margin))
            loss = (loss * w).sum() / w.sum().clamp_min(1e-8)
            opt.zero_grad()
            loss.backward()
            opt.step()
        replay.append(i)
        seen += 1
        update_seconds.append(time.perf_counter() - started)
        if seen in CHECKPOINTS or seen == len(train):
            with torch.no_grad():
                sc, sr = head(ec).mean(1), head(er).mean(1)
            scores = torch.cat([sc, sr])
            lengths = torch.cat([tokens[0][evaluation], tokens[1][evaluation]]).float()
            curve.append({"pairs": seen, "eval_accuracy": preference_accuracy(sc, sr),
                          "eval_accuracy_length_balanced": preference_accuracy(sc[balanced], sr[balanced]),
                          "score_length_correlation": pearson_correlation(scores, lengths.log())})
    return {"curve": curve, "length_balanced_pairs": int(balanced.sum()),
            "length_baseline_accuracy": preference_accuracy(-tokens[0][evaluation].float(),
                                                            -tokens[1][evaluation].float()),
            "head_seconds_per_update": sum(update_seconds) / len(update_seconds)}


def split_runs(option: dict, xc: torch.Tensor, xr: torch.Tensor, tokens: tuple[torch.Tensor, torch.Tensor],
               splits: int, train_size: int, eval_size: int) -> list[dict]:
    """`stream` on each seeded split of the (chosen, rejected) rows: the first `eval_size` of the shuffle held out,
    the next `train_size` streamed. Every option sees the same splits, so differences between options are paired."""
    runs = []
    for split in range(splits):
        order = list(range(len(xc)))
        random.Random(split).shuffle(order)
        evaluation, train = order[:eval_size], order[eval_size:eval_size + train_size]
        runs.append(stream(option, xc, xr, train, evaluation, split, tokens))
    return runs


BASE_OPTION = {"feature": "L30_last", "lr": 3e-3, "replay": 3, "steps": 1, "heads": 4, "smoothing": 0.0, "wd": 0.0}
LEARNING_VARIATIONS = [{}, {"lr": 1e-3}, {"lr": 1e-2}, {"replay": 16}, {"replay": 64}, {"steps": 4},
                       {"replay": 16, "steps": 4}, {"heads": 1}, {"smoothing": 0.1}, {"wd": 0.1},
                       {"replay": 16, "lr": 1e-2}, {"replay": 64, "lr": 1e-3, "steps": 4}]


def with_sums(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum pooling from the cached mean pooling (`L<n>_sum`): the same tokens added up instead of averaged, as the
    app's `reward_features` POOL `sum` does."""
    tokens = features["answer_tokens"].float()[:, None]
    sums = {name.replace("_mean", "_sum"): vector * tokens / SUM_POOL_SCALE
            for name, vector in features.items() if name.endswith("_mean")}
    return {**features, **sums}


def options(grid: str, feature_names: list[str], feature: str | None) -> list[dict]:
    """`features`: every cached feature with the learning settings of BASE_OPTION; `learning`: one setting at a
    time varied around BASE_OPTION on one feature; anything else: '|'-separated features ("A+B" concatenated)."""
    base = {**BASE_OPTION, "feature": feature or BASE_OPTION["feature"]}
    if "_" in grid:
        return [{**base, "feature": f} for f in grid.split("|")]
    if grid == "features":
        return [{**base, "feature": f} for f in feature_names]
    if grid == "combined":
        combos = ("L10_mean+L22_mean", "L6_mean+L14_mean+L22_mean+L30_mean", "L10_mean+L30_last", "L14_mean+L26_mean",
                  "L10_mean+L22_mean+L30_last")
        return [{**base, "feature": f, **v} for f in combos for v in ({}, {"lr": 1e-3}, {"wd": 1.0})]
    if grid == "learning":
        return [{**base, **variation} for variation in LEARNING_VARIATIONS]
    raise ValueError(f"unknown grid {grid!r}: features or learning")


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in ("eval_accuracy", "eval_accuracy_length_balanced", "score_length_correlation"):
        for point in range(len(runs[0]["curve"])):
            values = [r["curve"][point][key] for r in runs]
            pairs = runs[0]["curve"][point]["pairs"]
            out[f"{key}@{pairs}"] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    out["length_baseline_accuracy"] = statistics.mean(r["length_baseline_accuracy"] for r in runs)
    out["length_balanced_pairs"] = statistics.mean(r["length_balanced_pairs"] for r in runs)
    out["head_seconds_per_update"] = statistics.mean(r["head_seconds_per_update"] for r in runs)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", default="bench/cache/hh_features.pt")
    parser.add_argument("--grid", default="features", help="features, combined, learning, or '|'-separated "
                                                           "features, e.g. 'L10_mean|L10_mean+L10_sum'")
    parser.add_argument("--feature", default=None, help="the feature the learning grid varies around")
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--eval-size", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/reward_sweep.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = torch.load(args.features)
    features = with_sums(cache["features"])
    tokens = features["answer_tokens"]
    tokens = (tokens[0::2], tokens[1::2])
    names = [k for k in features if k.startswith("L")]
    results = []
    final = max(c for c in CHECKPOINTS if c <= args.train_size)
    print(f"{'option':<60} {'acc@' + str(final):>14} {'balanced':>14} {'len corr':>9} {'shorter':>8} {'ms/upd':>7}")
    for option in options(args.grid, names, args.feature):
        x = torch.cat([features[name] for name in option["feature"].split("+")], dim=1)  # "A+B": concatenated
        runs = split_runs(option, x[0::2], x[1::2], tokens, args.splits, args.train_size, args.eval_size)
        summary = summarize(runs)
        results.append({"option": option, "summary": summary, "runs": runs})
        a, b = summary[f"eval_accuracy@{final}"], summary[f"eval_accuracy_length_balanced@{final}"]
        label = ",".join(f"{k}={v}" for k, v in option.items() if k == "feature" or v != BASE_OPTION[k])
        print(f"{label:<60} {a[0]:.3f}±{a[1]:.3f}    {b[0]:.3f}±{b[1]:.3f} "
              f"{summary[f'score_length_correlation@{final}'][0]:>9.2f} {summary['length_baseline_accuracy']:>8.3f} "
              f"{1000 * summary['head_seconds_per_update']:>7.1f}", flush=True)
    write_json(args.out, {"features": args.features, "data": cache["data"], "max_tokens": cache["max_tokens"],
                          "quantization": cache["quantization"], "splits": args.splits, "train_size": args.train_size,
                          "eval_size": args.eval_size, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How fast can the online reward model learn a simulated user's taste from votes? The reward side of learning,
alone, on the answers the live system really showed (no PPO, so the noise of a 20-minute run is not in it).

    python bench/simulate.py … --workdir /tmp/sim-A …       # any simulated runs: their stores hold the pairs shown
    python bench/reward_tastes.py --stores "/tmp/sim-*" --oracles bench/oracles.py:concise,mentions_you,enthusiastic \
        --out bench/results/reward_tastes.json

The pairs (prompt, answer A, answer B) of every store are read (each pair once), their frozen features computed
once with the app's own featurisation (cached in `--cache`), and each oracle labels them (ties dropped: a
simulated user's tie is not a pair either). Then, as in `bench/reward_sweep.py`, each feature option streams
`--train-size` pairs through the app's online linear-head learner and is scored on `--eval-size` held-out pairs
of the same split, over `--splits` seeded splits (every option sees the same ones). The labels are exact, so an
accuracy below 1 is what the features and 100-200 votes cannot express.

Feature options, from the cache (`L<blocks>_<pool>`: the hidden states after that many blocks, through the final
norm): `mean` averages the answer's tokens (the app's default, at a third of the stack); `sum` adds them up
(divided by a constant, `reward.SUM_POOL_SCALE`); a taste that counts something per answer (words, "you",
exclamation marks) is a sum over tokens, which an average only gives divided by the length.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import random
import sqlite3
from pathlib import Path

import torch

from common import write_json
from reward_features import answer_features, frozen_feature_model
from reward_sweep import BASE_OPTION, split_runs, summarize, with_sums
from simulate import load_oracle
from rlhf_online.config import AppConfig

OPTIONS = {  # name -> cached features concatenated ("+"); "sum" = mean x tokens / SUM_POOL_SCALE
    "L10_mean (default)": "L10_mean",  # the default until stop 36, when the JSON in bench/results was written
    "L10_sum": "L10_sum",
    "L10_mean+L10_sum": "L10_mean+L10_sum",  # the default since
    "L10_mean+L30_last": "L10_mean+L30_last",
    "L10_mean+L10_sum+L30_last": "L10_mean+L10_sum+L30_last",
    "L30_sum": "L30_sum",
}


def read_store_pairs(patterns: list[str], limit: int, seed: int) -> list[dict]:
    """Distinct (messages, a, b) shown by the simulated runs in the stores' folders."""
    seen, pairs = set(), []
    for pattern in patterns:
        for folder in sorted(glob.glob(pattern)):
            path = Path(folder) / "data" / "preferences.sqlite"
            if not path.exists():
                continue
            with sqlite3.connect(path) as con:
                for messages, a, b in con.execute("SELECT messages_json, answer_a, answer_b FROM pairs"):
                    key = (messages, a, b)
                    if a.strip() and b.strip() and a != b and key not in seen:
                        seen.add(key)
                        pairs.append({"messages": json.loads(messages), "a": a, "b": b})
    random.Random(seed).shuffle(pairs)
    return pairs[:limit]


def featurise(pairs: list[dict], cache: Path, threads: int) -> dict[str, torch.Tensor]:
    """Features of answers 2i (a) and 2i+1 (b), cached by the pairs' content."""
    key = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()
    if cache.exists():
        stored = torch.load(cache)
        if stored.get("key") == key:
            return stored["features"]
    torch.set_num_threads(threads)
    rm = frozen_feature_model("embedded", AppConfig().reward.reward_max_tokens, layers=[10, 30])
    features = answer_features(rm, [(p["messages"], answer) for p in pairs for answer in (p["a"], p["b"])],
                               batch_size=8)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "features": features}, cache)
    return features


def oriented(features: dict[str, torch.Tensor], pairs: list[dict], oracle) -> tuple[list[int], list[int], int]:
    """(chosen rows, rejected rows, ties) by the oracle's scores."""
    chosen, rejected, ties = [], [], 0
    for i, p in enumerate(pairs):
        a, b = oracle(p["messages"], p["a"]), oracle(p["messages"], p["b"])
        if a == b:
            ties += 1
        else:
            chosen.append(2 * i if a > b else 2 * i + 1)
            rejected.append(2 * i + 1 if a > b else 2 * i)
    return chosen, rejected, ties


def measure(features, chosen, rejected, option: str, splits: int, train_size: int, eval_size: int) -> dict:
    x = torch.cat([features[name] for name in option.split("+")], dim=1)
    tokens = (features["answer_tokens"][chosen], features["answer_tokens"][rejected])
    runs = split_runs({**BASE_OPTION, "lr": AppConfig().reward.reward_head_lr}, x[chosen], x[rejected], tokens,
                      splits, train_size, eval_size)
    summary = summarize(runs)
    return {**{key.removeprefix("eval_"): value for key, value in summary.items() if key.startswith("eval_accuracy@")},
            "shorter_baseline": summary["length_baseline_accuracy"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="/tmp/rlhf-sim-*", help="comma-separated globs of simulate workdirs")
    parser.add_argument("--oracles", default="bench/oracles.py:concise,mentions_you,enthusiastic")
    parser.add_argument("--max-pairs", type=int, default=1200)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=200)
    parser.add_argument("--eval-size", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="bench/cache/taste_features.pt")
    parser.add_argument("--out", default="bench/results/reward_tastes.json")
    args = parser.parse_args(argv)
    pairs = read_store_pairs(args.stores.split(","), args.max_pairs, seed=0)
    if len(pairs) < args.train_size + args.eval_size:
        parser.error(f"{len(pairs)} distinct pairs under --stores {args.stores!r}, fewer than --train-size + "
                     "--eval-size: run bench/simulate.py (each 10-minute run shows ~130 pairs) or widen --stores")
    features = with_sums(featurise(pairs, Path(args.cache), args.threads))
    torch.set_num_threads(1)
    path, _, names = args.oracles.partition(":")
    results = {}
    print(f"{len(pairs)} pairs; accuracy on {args.eval_size} held-out pairs after {args.train_size} votes, "
          f"mean ± sd over {args.splits} splits")
    print(f"{'oracle':<14} {'option':<28} {'@100':>13} {'@' + str(args.train_size):>13} {'shorter':>8}")
    for name in names.split(","):
        chosen, rejected, ties = oriented(features, pairs, load_oracle(f"{path}:{name}"))
        results[name] = {"pairs": len(chosen), "ties": ties, "options": {}}
        if len(chosen) < args.train_size + args.eval_size:  # the splits would stream fewer votes than the header says
            print(f"{name:<14} skipped: {len(chosen)} pairs without a tie ({ties} ties), fewer than --train-size + "
                  "--eval-size", flush=True)
            continue
        for label, option in OPTIONS.items():
            summary = measure(features, chosen, rejected, option, args.splits, args.train_size, args.eval_size)
            results[name]["options"][label] = summary
            first, last = summary["accuracy@100"], summary[f"accuracy@{args.train_size}"]
            print(f"{name:<14} {label:<28} {first[0]:.3f}±{first[1]:.3f} {last[0]:.3f}±{last[1]:.3f} "
                  f"{summary['shorter_baseline']:>8.3f}", flush=True)
    write_json(args.out, {"stores": args.stores, "pairs": len(pairs), "splits": args.splits,
                          "train_size": args.train_size, "eval_size": args.eval_size, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does any way of reading the likelihood ratio beat "prefer the shorter answer"? Chosen on tuning pairs, checked
on held-out ones.

The contrastive and polar judges (rlhf_online/judge.py) average a per-token log ratio over the answer. Other
readings are as defensible: the answer's first k tokens (where it refuses or complies, and where the system
prompt's pull is strongest), the sum, the median, or the likelihood under one prompt alone. This script computes
every answer's per-token log-probabilities once per split (cached under bench/cache/), scores every reading on
the tuning split and on held-out pairs (the same seeded split as bench/judge.py), and reports the reading the
tuning split picks with its held-out accuracy: the honest number for "the best reading".

    python bench/judge_aggregations.py --tune-limit 200 --eval-limit 400 --out bench/results/judge_aggregations.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import SHARED_HH, read_preference_file, write_json
from judge import bootstrap_ci, build_judge, split, win
from rlhf_online.config import AppConfig

FAMILIES = ("contrastive", "polar")
FIRST_TOKENS = (1, 2, 4, 8, 16, 32)


def token_logprobs(judge, pairs: list[dict], families=FAMILIES) -> list[dict]:
    """Per pair and family, per answer (chosen, rejected): log P(token | principled prompt) and under the baseline."""
    rows, started = [], time.time()
    for i, pair in enumerate(pairs):
        answers = [judge.answer_tokens(pair["chosen"]), judge.answer_tokens(pair["rejected"])]
        row = {"chosen_chars": len(pair["chosen"]), "rejected_chars": len(pair["rejected"])}
        for family in families:
            principled, baseline = judge.contrastive_prefixes(pair["prompt"], family)
            row[family] = [[t.tolist() for t in judge.sequence_logprobs(prefix, answers)]
                           for prefix in (principled, baseline)]  # [prefix][answer][token]
        rows.append(row)
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(pairs)} pairs, {time.time() - started:.0f} s", flush=True)
    return rows


def readings() -> dict:
    """name -> f(row, answer index) -> score (higher = judged better)."""
    def ratio(row, family, i):
        return [p - q for p, q in zip(row[family][0][i], row[family][1][i])]

    out = {"prefer_shorter": lambda row, i: -(row["chosen_chars"], row["rejected_chars"])[i]}
    for family in FAMILIES:
        out[f"{family}_mean"] = lambda row, i, f=family: statistics.mean(ratio(row, f, i))
        out[f"{family}_sum"] = lambda row, i, f=family: sum(ratio(row, f, i))
        out[f"{family}_median"] = lambda row, i, f=family: statistics.median(ratio(row, f, i))
        out[f"{family}_without_end_of_turn_mean"] = \
            lambda row, i, f=family: statistics.mean(ratio(row, f, i)[:-1] or ratio(row, f, i))
        out[f"{family}_principled_only_mean"] = lambda row, i, f=family: statistics.mean(row[f][0][i])
        out[f"{family}_baseline_only_mean"] = lambda row, i, f=family: statistics.mean(row[f][1][i])
        for k in FIRST_TOKENS:
            out[f"{family}_first{k}_mean"] = lambda row, i, f=family, k=k: statistics.mean(ratio(row, f, i)[:k])
            out[f"{family}_first{k}_sum"] = lambda row, i, f=family, k=k: sum(ratio(row, f, i)[:k])
    return out


def accuracies(rows: list[dict]) -> dict[str, dict]:
    result = {}
    for name, score in readings().items():
        wins = [win(score(row, 0), score(row, 1)) for row in rows]
        result[name] = {"accuracy": statistics.mean(wins), "ci95": bootstrap_ci(wins)}
    return result


def cached_rows(judge_factory, pairs: list[dict], path: Path) -> list[dict]:
    if path.is_file():
        rows = json.loads(path.read_text())
        if len(rows) >= len(pairs):
            return rows[:len(pairs)]
    rows = token_logprobs(judge_factory(), pairs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", default=str(SHARED_HH))
    parser.add_argument("--tune-size", type=int, default=200)
    parser.add_argument("--tune-limit", type=int, default=200)
    parser.add_argument("--eval-limit", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default="bench/cache")
    parser.add_argument("--out", default="bench/results/judge_aggregations.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune, held_out = split(read_preference_file(args.eval), args.tune_size, args.seed)
    judge = None

    def judge_factory():
        nonlocal judge
        if judge is None:
            judge = build_judge(argparse.Namespace(constitution=None, data_dir="./data", judge_model=""), AppConfig())
        return judge

    cache = Path(args.cache_dir)
    splits = {"tune": cached_rows(judge_factory, tune[:args.tune_limit], cache / f"judge_tokens_tune_{args.seed}.json"),
              "held_out": cached_rows(judge_factory, held_out[:args.eval_limit],
                                      cache / f"judge_tokens_eval_{args.seed}.json")}
    results = {name: accuracies(rows) for name, rows in splits.items()}
    candidates = [name for name in results["tune"] if name != "prefer_shorter"]
    picked = max(candidates, key=lambda name: results["tune"][name]["accuracy"])
    print(f"\n{'reading':<40} {'tune':>6} {'held-out':>9}  held-out 95% CI")
    for name in sorted(results["tune"], key=lambda n: -results["held_out"][n]["accuracy"]):
        t, h = results["tune"][name], results["held_out"][name]
        print(f"{name:<40} {t['accuracy']:>6.3f} {h['accuracy']:>9.3f}  [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}]")
    print(f"(tune {len(splits['tune'])} pairs, held-out {len(splits['held_out'])} pairs) the tuning split picks "
          f"{picked}: tune {results['tune'][picked]['accuracy']:.3f}, held-out "
          f"{results['held_out'][picked]['accuracy']:.3f}; prefer the shorter answer, held-out "
          f"{results['held_out']['prefer_shorter']['accuracy']:.3f}")
    report = {"pairs": {name: len(rows) for name, rows in splits.items()}, "seed": args.seed,
              "picked_on_tune": picked, "picked_held_out_accuracy": results["held_out"][picked]["accuracy"],
              "prefer_shorter_held_out": results["held_out"]["prefer_shorter"]["accuracy"], "readings": results}
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

"""How good is the AI judge? Its verdicts on real human preference pairs, its position bias, and its speed.

    python bench/judge.py --eval ../shared/data/hh_harmless_dev.jsonl --limit 200 --out bench/results/judge.json

Each pair is judged exactly as the trainer judges (the default judge is the embedded base model in the trainer's
4-bit layout, with the shipped or given constitution), with the human-chosen answer as A; the verdict is
order-symmetric, so which one is A does not matter. Writes JSON with `accuracy` (abstentions count 0.5),
`position_flip_rate` (the two single-order verdicts disagree: the judge followed the slot, not the answer) and
`seconds_per_judgement` (both orders, one batched forward), plus the details printed in the table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import SHARED_HH, peak_rss_mb, read_preference_file, write_json
from rlhf_online.config import AppConfig
from rlhf_online.judge import (BASE_JUDGE_PREFIX, Constitution, Judge, check_constitution_text, load_constitution,
                               load_judge_model)
from rlhf_online.models import load_base_model, load_tokenizer, resolve_model_source


def build_judge(args, cfg: AppConfig) -> Judge:
    """The trainer's default judge (its own base copy, repacking disabled) or a separately configured one."""
    if args.constitution:
        constitution = Constitution(check_constitution_text(Path(args.constitution).read_text()), Path(args.constitution))
    else:
        constitution = load_constitution(cfg.feedback, args.data_dir)
    if args.judge_model:
        model, tokenizer = load_judge_model(args.judge_model, cfg.model.quantization)
        return Judge(model, tokenizer, constitution, cfg.feedback, judge_id=args.judge_model)
    source = resolve_model_source(cfg.model)
    model = load_base_model(source, cfg.model.quantization, for_training=True).model
    return Judge(model, load_tokenizer(source), constitution, cfg.feedback,
                 judge_id=BASE_JUDGE_PREFIX + cfg.model.model)


MARGINS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    decided = [r for r in rows if r["choice"] is not None]
    return {
        "n": n,
        "accuracy": sum(1.0 if r["choice"] == "a" else 0.5 if r["choice"] is None else 0.0 for r in rows) / n,
        "accuracy_decided": sum(r["choice"] == "a" for r in decided) / len(decided) if decided else None,
        "abstain_rate": 1 - len(decided) / n,
        # one order alone, averaged over the two orders: what judging without the swap would score
        "single_order_accuracy": sum((r["p_first"] > 0.5) + (r["p_second"] > 0.5) for r in rows) / (2 * n),
        "position_flip_rate": sum(r["flip"] for r in rows) / n,
        # how often a single-order verdict picked the first slot (0.5 = no preference for either slot)
        "first_slot_rate": sum((r["p_first"] > 0.5) + (r["p_second"] <= 0.5) for r in rows) / (2 * n),
        "mean_p_chosen": sum(r["p_a"] for r in rows) / n,
        "seconds_per_judgement": sum(r["seconds"] for r in rows) / n,
        "seconds_per_judgement_p95": sorted(r["seconds"] for r in rows)[int(0.95 * (n - 1))],
        "mean_prompt_tokens": sum(r["tokens"] for r in rows) / n,
        # the same verdicts under other abstention margins, to choose --judge-margin from data
        "accuracy_by_margin": {str(m): sum(1.0 if r["p_a"] - 0.5 >= m and r["p_a"] != 0.5 else
                                           0.0 if 0.5 - r["p_a"] >= m and r["p_a"] != 0.5 else 0.5
                                           for r in rows) / n for m in MARGINS},
    }


def length_baseline(pairs: list[dict]) -> float:
    """Prefer the shorter answer: the bar any judge must clear on HH harmless (see bench/reward_online.py)."""
    wins = [1.0 if len(p["chosen"]) < len(p["rejected"]) else 0.5 if len(p["chosen"]) == len(p["rejected"])
            else 0.0 for p in pairs]
    return sum(wins) / len(wins)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", default=str(SHARED_HH), help="JSONL of human preference pairs (HH or TRL)")
    parser.add_argument("--limit", type=int, default=None, help="judge only the first N pairs")
    parser.add_argument("--judge-model", default="", help="'' = the embedded base model (the app's default "
                        "judge), or a hub id / local folder")
    parser.add_argument("--constitution", default=None, help="principles file (default: the shipped one)")
    parser.add_argument("--data-dir", default="./data", help="an admin-edited constitution there is used, as in "
                        "the app, unless --constitution is given")
    parser.add_argument("--margin", type=float, default=None, help="abstention margin (default: the app's)")
    parser.add_argument("--max-tokens", type=int, default=None, help="judging prompt budget (default: the app's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the trainer uses 1)")
    parser.add_argument("--print-every", type=int, default=10)
    parser.add_argument("--out", default="bench/results/judge.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = AppConfig()
    if args.margin is not None:
        cfg.feedback.judge_margin = args.margin
    if args.max_tokens is not None:
        cfg.feedback.judge_max_tokens = args.max_tokens
    pairs = read_preference_file(args.eval)[:args.limit]
    started = time.time()
    judge = build_judge(args, cfg)
    load_seconds = time.time() - started
    print(f"judge {judge.label} on {len(pairs)} pairs from {args.eval} ({args.threads} thread(s))")
    print(f"{'pairs':>6} {'accuracy':>9} {'decided':>8} {'abstain':>8} {'1-order':>8} {'flips':>6} {'s/judge':>8}")
    rows = []
    for i, pair in enumerate(pairs, start=1):
        began = time.perf_counter()
        verdict = judge.judge(pair["prompt"], pair["chosen"], pair["rejected"])
        seconds = time.perf_counter() - began
        tokens = len(judge.prompts(pair["prompt"], pair["chosen"], pair["rejected"])[0])
        rows.append({"choice": verdict.choice, "p_a": verdict.p_a, "p_first": verdict.p_a_shown_first,
                     "p_second": verdict.p_a_shown_second, "flip": verdict.position_flip, "seconds": seconds,
                     "tokens": tokens})
        if i % args.print_every == 0 or i == len(pairs):
            s = summarise(rows)
            decided = "–" if s["accuracy_decided"] is None else f"{s['accuracy_decided']:.3f}"
            print(f"{i:>6} {s['accuracy']:>9.3f} {decided:>8} {s['abstain_rate']:>8.3f} "
                  f"{s['single_order_accuracy']:>8.3f} {s['position_flip_rate']:>6.3f} "
                  f"{s['seconds_per_judgement']:>8.2f}", flush=True)
    result = {
        **summarise(rows),
        "model": args.judge_model or cfg.model.model,
        "judge": judge.label,
        "constitution_version": judge.constitution.version,
        "judge_margin": cfg.feedback.judge_margin,
        "judge_max_tokens": cfg.feedback.judge_max_tokens,
        "length_baseline_accuracy": length_baseline(pairs),
        "eval_file": str(args.eval),
        "threads": args.threads,
        "load_seconds": load_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "wall_seconds": time.time() - started,
        "verdicts": [{k: r[k] for k in ("p_a", "p_first", "p_second")} for r in rows],
    }
    print(f"accuracy {result['accuracy']:.3f} (abstentions count 0.5; {result['abstain_rate']:.0%} abstained; "
          f"length baseline {result['length_baseline_accuracy']:.3f}), position flips "
          f"{result['position_flip_rate']:.0%}, first slot picked {result['first_slot_rate']:.0%} of single-order "
          f"verdicts, {result['seconds_per_judgement']:.2f} s/judgement")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

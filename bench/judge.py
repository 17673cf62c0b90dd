"""How good is the AI judge? Each judging method's verdicts on real human preference pairs, side by side.

    python bench/judge.py --eval ../shared/data/hh_harmless_dev.jsonl --limit 100 --out bench/results/judge.json
    python bench/judge.py --method all --limit 200 --out bench/results/judge_methods.json   # every method

Methods (see rlhf_online/judge.py): `contrastive_mean` / `contrastive_sum` (log P(answer | principles, chat) -
log P(answer | chat), per token / summed; one scoring pass gives both), `principles` (per-principle yes/no
log-odds for each answer alone), `ab` (both answers shown, "A or B?", both orders averaged), and `rlcd`
(RLCD, Yang et al. 2023: answers sampled under a principle-following and a principle-violating system prompt
make "preferred by construction" pairs; a reward model trained on N such pairs is compared with one trained on
the same N human pairs of the same prompts, both evaluated on the held-out human pairs).

Held-out discipline: a seeded shuffle of the file puts the first `--tune-size` pairs in a tuning split (prompt
wording and method choices may be tried there: `--split tune`); every reported number comes from the other
pairs (`--split eval`, the default), of which `--limit` are judged, in `--slices` contiguous slices reported
separately. RLCD and its human-pair control train on tuning-split prompts only.

Each pair is judged as the trainer judges (the embedded base model in the trainer's 4-bit layout, the shipped or
given constitution), human-chosen answer as A. Top-level keys describe the default method (or the first one
asked for): `accuracy` (abstentions count 0.5), `position_flip_rate` (ab: the two single-order verdicts disagree;
pointwise methods: measured fraction of verdicts that change when the answers are swapped, on `--swap-check`
pairs), `seconds_per_judgement`; `method` names it and `per_method` holds every method's numbers, with 95%
bootstrap confidence intervals, per-slice accuracies and both length baselines.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import SHARED_HH, peak_rss_mb, read_preference_file, write_json
from rlhf_online.config import AppConfig
from rlhf_online.judge import (BASE_JUDGE_PREFIX, CONTRASTIVE_SYSTEM, JUDGE_METHODS, VIOLATING_SYSTEM, Constitution,
                               Judge, check_constitution_text, load_constitution, load_judge_model)
from rlhf_online.models import chat_ids, load_base_model, load_tokenizer, resolve_model_source

POINTWISE_FAMILIES = {"contrastive": ("contrastive_mean", "contrastive_sum"), "polar": ("polar_mean", "polar_sum"),
                      "principles": ("principles",)}
ALL_METHODS = ("contrastive", "polar", "principles", "ab", "rlcd")
COVERAGES = (1.0, 0.75, 0.5, 0.25)  # accuracy of the most confident fraction of verdicts
RLCD_GOOD, RLCD_BAD = CONTRASTIVE_SYSTEM, VIOLATING_SYSTEM  # the judge's own principled / violating prompts


def build_judge(args, cfg: AppConfig) -> Judge:
    """The trainer's default judge (its own base copy, repacking disabled) or a separately configured one."""
    if args.constitution:
        constitution = Constitution(check_constitution_text(Path(args.constitution).read_text()), Path(args.constitution))
    else:
        constitution = load_constitution(cfg.feedback, args.data_dir)
    if args.judge_model:
        model, tokenizer = load_judge_model(args.judge_model, cfg.model.resolved_quantization())
        return Judge(model, tokenizer, constitution, cfg.feedback, judge_id=args.judge_model)
    source = resolve_model_source(cfg.model)
    model = load_base_model(source, cfg.model.resolved_quantization(), for_training=True).model
    return Judge(model, load_tokenizer(source), constitution, cfg.feedback,
                 judge_id=BASE_JUDGE_PREFIX + cfg.model.model)


# ---- statistics -------------------------------------------------------------------------------------------------

def win(chosen_score: float, rejected_score: float) -> float:
    return 1.0 if chosen_score > rejected_score else 0.5 if chosen_score == rejected_score else 0.0


def bootstrap_ci(values: list[float], seed: int = 0, draws: int = 2000) -> list[float]:
    """95% percentile bootstrap interval of the mean."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(draws))
    return [means[int(0.025 * draws)], means[int(0.975 * draws) - 1]]


def length_baselines(pairs: list[dict]) -> dict:
    """Prefer the shorter / the longer answer: the bars any judge must clear (HH harmless favours neither much)."""
    shorter = [win(len(p["rejected"]), len(p["chosen"])) for p in pairs]
    return {"length_baseline_accuracy": sum(shorter) / len(shorter),  # prefer the shorter (the historical key)
            "prefer_longer_accuracy": 1 - sum(shorter) / len(shorter),
            "length_baseline_ci95": bootstrap_ci(shorter)}


def summarise(rows: list[dict], slices: int, margin: float) -> dict:
    """Accuracy (abstentions 0.5), its CI, per-slice accuracy, abstentions, order sensitivity and speed."""
    n = len(rows)
    wins = [1.0 if r["choice"] == "a" else 0.5 if r["choice"] is None else 0.0 for r in rows]
    decided = [r for r in rows if r["choice"] is not None]
    size = -(-n // slices)
    by_confidence = sorted(rows, key=lambda r: -abs(r["p_a"] - 0.5))
    swapped = [r for r in rows if "swap_changed" in r]
    out = {
        "n": n,
        "accuracy": sum(wins) / n,
        "accuracy_ci95": bootstrap_ci(wins),
        "slice_accuracy": [sum(wins[i:i + size]) / len(wins[i:i + size]) for i in range(0, n, size)],
        "accuracy_decided": sum(r["choice"] == "a" for r in decided) / len(decided) if decided else None,
        "abstain_rate": 1 - len(decided) / n,
        "judge_margin": margin,
        "mean_p_chosen": sum(r["p_a"] for r in rows) / n,
        "seconds_per_judgement": sum(r["seconds"] for r in rows) / n,
        "seconds_per_judgement_p95": sorted(r["seconds"] for r in rows)[int(0.95 * (n - 1))],
        # CPU time (all threads): what a judgement costs whatever else shares the machine
        "cpu_seconds_per_judgement": sum(r["cpu_seconds"] for r in rows) / n,
        # accuracy of the most confident verdicts only: would abstaining more buy accuracy?
        "accuracy_at_coverage": {str(c): sum(win(r["p_a"], 0.5) for r in by_confidence[:max(1, round(c * n))])
                                 / max(1, round(c * n)) for c in COVERAGES},
    }
    if rows and "p_first" in rows[0]:  # the A/B judge: single orders
        out.update({
            "single_order_accuracy": sum((r["p_first"] > 0.5) + (r["p_second"] > 0.5) for r in rows) / (2 * n),
            "position_flip_rate": sum((r["p_first"] > 0.5) != (r["p_second"] > 0.5) for r in rows) / n,
            "first_slot_rate": sum((r["p_first"] > 0.5) + (r["p_second"] <= 0.5) for r in rows) / (2 * n),
        })
    else:  # pointwise: no slot exists; measured by judging swapped pairs again
        out["position_flip_rate"] = sum(r["swap_changed"] for r in swapped) / len(swapped) if swapped else None
        out["swap_checked_pairs"] = len(swapped)
    return out


# ---- judging methods --------------------------------------------------------------------------------------------

def judge_pointwise(judge: Judge, family: str, pair: dict, check_swap: bool) -> dict[str, dict]:
    """One pair scored once per family (contrastive gives both normalisations from one pass), as the app does."""
    began, cpu = time.perf_counter(), time.process_time()
    answers = [pair["chosen"], pair["rejected"]]
    if answers[0] > answers[1]:  # the app's canonical order: fixed by the text, not by which one is chosen
        answers.reverse()
    if family in ("contrastive", "polar"):
        both = judge.contrastive_scores(pair["prompt"], answers, family=family)
    else:
        both = {"principles": judge.principle_scores(pair["prompt"], answers)}
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu
    rows = {}
    for method in POINTWISE_FAMILIES[family]:
        scores = both[method] if answers[0] == pair["chosen"] else both[method][::-1]
        verdict = judge.verdict_from_scores(scores[0], scores[1], method)
        row = {"choice": verdict.choice, "p_a": verdict.p_a, "score_chosen": scores[0], "score_rejected": scores[1],
               "seconds": seconds, "cpu_seconds": cpu_seconds}
        if check_swap:  # the full path again with the answers swapped: must be the mirror image
            swapped = judge.verdict_from_scores(*judge.canonical_scores(pair["prompt"], pair["rejected"],
                                                                        pair["chosen"], method))
            row["swap_changed"] = {"a": "b", "b": "a", None: None}[swapped.choice] != verdict.choice
        rows[method] = row
    return rows


def judge_ab(judge: Judge, pair: dict) -> dict[str, dict]:
    began, cpu = time.perf_counter(), time.process_time()
    verdict = judge.judge_ab(pair["prompt"], pair["chosen"], pair["rejected"])
    return {"ab": {"choice": verdict.choice, "p_a": verdict.p_a, "p_first": verdict.p_a_shown_first,
                   "p_second": verdict.p_a_shown_second, "seconds": time.perf_counter() - began,
                   "cpu_seconds": time.process_time() - cpu}}


# ---- RLCD: preference pairs by construction, judged by the reward model they train ----------------------------

@dataclass(frozen=True)
class Pair:
    id: int
    prompt: list
    chosen: str
    rejected: str
    weight: float = 1.0


@torch.no_grad()
def sample_answers(model, tokenizer, judge: Judge, prompts: list[list[dict]], system: str, args) -> list[str]:
    """One sampled answer per prompt under the given system prompt (batched, seeded)."""
    answers = []
    for start in range(0, len(prompts), args.rlcd_batch):
        rows = [chat_ids(tokenizer, [{"role": "system", "content": system}]
                         + [m for m in judge.recent_turns(p, 192) if m["role"] != "system"])
                for p in prompts[start:start + args.rlcd_batch]]
        batch = tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
        torch.manual_seed(args.seed + start)
        out = model.generate(**batch, do_sample=True, temperature=0.7, top_p=0.9,
                             max_new_tokens=args.rlcd_new_tokens, pad_token_id=tokenizer.pad_token_id)
        answers += [tokenizer.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
    return answers


def train_reward_model(cfg: AppConfig, source: str, tokenizer, pairs: list[Pair], eval_features, seed: int):
    """A fresh reward model trained online on the pairs, as the app trains it; held-out accuracy per pair."""
    from rlhf_online.reward import OnlineRewardLearner, RewardModel, attach_reward_adapter

    torch.manual_seed(seed)
    base = load_base_model(source, cfg.model.resolved_quantization(), for_training=True).model
    rm = RewardModel(attach_reward_adapter(base, cfg.model, cfg.reward), tokenizer, cfg.reward)
    learner = OnlineRewardLearner(rm, cfg.reward, seed=seed)
    began = time.perf_counter()
    for pair in pairs:
        learner.observe(pair)
    seconds = (time.perf_counter() - began) / max(1, len(pairs))
    if eval_features is None:
        return rm, seconds, None
    with torch.no_grad():
        rm.model.eval()
        # (2N,) the ensemble's mean, as `RewardModel.score` reports it (forward_features gives one column per head)
        scores = torch.cat([rm.forward_features(eval_features[i:i + 16]).float().mean(1)
                            for i in range(0, len(eval_features), 16)])
    half = len(scores) // 2
    wins = [win(float(c), float(r)) for c, r in zip(scores[:half], scores[half:])]
    return rm, seconds, wins


def run_rlcd(judge: Judge, cfg: AppConfig, tune_pairs: list[dict], eval_pairs: list[dict], args) -> dict:
    """RLCD reward model vs a human-pair reward model, same N, same prompts, same held-out evaluation."""
    source = resolve_model_source(cfg.model)
    tokenizer = judge.tokenizer
    train = tune_pairs[:args.rlcd_pairs]
    prompts = [p["prompt"] for p in train]
    sampler = load_base_model(source, "fp32").model  # sampling only: the plain weights generate fastest on CPU
    principles = judge.constitution.text.strip()
    began = time.perf_counter()
    good = sample_answers(sampler, tokenizer, judge, prompts, RLCD_GOOD.format(principles=principles), args)
    bad = sample_answers(sampler, tokenizer, judge, prompts, RLCD_BAD.format(principles=principles), args)
    generate_seconds = (time.perf_counter() - began) / max(1, len(train))
    del sampler
    rlcd = [Pair(i + 1, p, g, b) for i, (p, g, b) in enumerate(zip(prompts, good, bad)) if g and b and g != b]
    human = [Pair(i + 1, p["prompt"], p["chosen"], p["rejected"]) for i, p in enumerate(train[:len(rlcd)])]
    # The frozen lower layers are the same base for both reward models: their features are computed once.
    rm, _, _ = train_reward_model(cfg, source, tokenizer, [], None, args.seed)
    rows = rm.token_rows([(p["prompt"], p["chosen"]) for p in eval_pairs] +
                         [(p["prompt"], p["rejected"]) for p in eval_pairs])
    features = [f for i in range(0, len(rows), 8) for f in rm.frozen_features(rows[i:i + 8])]
    del rm
    _, rlcd_seconds, rlcd_wins = train_reward_model(cfg, source, tokenizer, rlcd, features, args.seed)
    _, human_seconds, human_wins = train_reward_model(cfg, source, tokenizer, human, features, args.seed)
    result = {
        "train_pairs": len(rlcd),
        "n": len(eval_pairs),
        "accuracy": sum(rlcd_wins) / len(rlcd_wins),
        "accuracy_ci95": bootstrap_ci(rlcd_wins),
        "human_rm_accuracy": sum(human_wins) / len(human_wins),
        "human_rm_accuracy_ci95": bootstrap_ci(human_wins),
        "abstain_rate": 0.0,
        "position_flip_rate": None,  # the reward model scores each answer alone
        "seconds_per_judgement": generate_seconds,  # per constructed pair: two sampled answers
        "seconds_per_reward_update": rlcd_seconds,
        "human_rm_seconds_per_update": human_seconds,
        "samples": [{"prompt": p.prompt[-1]["content"][:200], "good": p.chosen[:300], "bad": p.rejected[:300]}
                    for p in rlcd[:5]],
    }
    print(f"  rlcd: RM on {len(rlcd)} RLCD pairs {result['accuracy']:.3f}, on {len(human)} human pairs "
          f"{result['human_rm_accuracy']:.3f}; {generate_seconds:.2f} s to make a pair", flush=True)
    return result


# ---- main -------------------------------------------------------------------------------------------------------

def split(pairs: list[dict], tune_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    shuffled = pairs[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[:tune_size], shuffled[tune_size:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", default=str(SHARED_HH), help="JSONL of human preference pairs (HH or TRL)")
    parser.add_argument("--limit", type=int, default=None, help="judge only the first N pairs of the split")
    parser.add_argument("--method", default="", help="comma list of " + ", ".join(ALL_METHODS) + ", or 'all' "
                        "(default: the app's configured judge method only); contrastive covers both "
                        "normalisations; " + ", ".join(JUDGE_METHODS) + " also accepted")
    parser.add_argument("--split", choices=("eval", "tune"), default="eval")
    parser.add_argument("--tune-size", type=int, default=200, help="pairs of the seeded shuffle kept for tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slices", type=int, default=2, help="report accuracy on this many contiguous slices")
    parser.add_argument("--swap-check", type=int, default=20, help="pointwise methods: judge this many pairs "
                        "again with the answers swapped and count changed verdicts")
    parser.add_argument("--rlcd-pairs", type=int, default=100, help="RLCD: pairs constructed (and human pairs "
                        "for the control reward model)")
    parser.add_argument("--rlcd-new-tokens", type=int, default=48)
    parser.add_argument("--rlcd-batch", type=int, default=8)
    parser.add_argument("--judge-model", default="", help="'' = the embedded base model (the app's default "
                        "judge), or a hub id / local folder")
    parser.add_argument("--constitution", default=None, help="principles file (default: the shipped one)")
    parser.add_argument("--data-dir", default="./data", help="an admin-edited constitution there is used, as in "
                        "the app, unless --constitution is given")
    parser.add_argument("--margin", type=float, default=None, help="abstention margin (default: the app's)")
    parser.add_argument("--max-tokens", type=int, default=None, help="judging prompt budget (default: the app's)")
    parser.add_argument("--quantization", default=None, help="judge (and RLCD reward model) weights: nf4 (the "
                        "app's default layout), bf16 or fp32 (the dequantized GGUF; faster on a starved CPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 = the machine's cores)")
    parser.add_argument("--print-every", type=int, default=20)
    parser.add_argument("--out", default="bench/results/judge.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = AppConfig()
    if args.quantization:
        cfg.model.quantization = args.quantization
    if args.margin is not None:
        cfg.feedback.judge_margin = args.margin
    if args.max_tokens is not None:
        cfg.feedback.judge_max_tokens = args.max_tokens
    default = cfg.feedback.judge_method
    wanted = [m.strip() for m in (args.method or default).split(",") if m.strip()]
    if wanted == ["all"]:
        wanted = list(ALL_METHODS)
    families = []
    for m in wanted:
        family = m.rsplit("_", 1)[0] if m.startswith(("contrastive", "polar")) else m
        if family not in ALL_METHODS:
            parser.error(f"unknown method {m!r}")
        if family not in families:
            families.append(family)
    tune, held_out = split(read_preference_file(args.eval), args.tune_size, args.seed)
    pairs = (tune if args.split == "tune" else held_out)[:args.limit]
    started = time.time()
    judge = build_judge(args, cfg)
    load_seconds = time.time() - started
    print(f"judge {judge.judge_id} on {len(pairs)} {args.split}-split pairs of {args.eval} ({args.threads} "
          f"thread(s)); methods: {', '.join(families)}", flush=True)
    rows: dict[str, list[dict]] = {}
    per_method: dict[str, dict] = {}
    if "rlcd" in families:
        per_method["rlcd"] = run_rlcd(judge, cfg, tune if args.split == "eval" else held_out, pairs, args)
    # Every method judges pair i before any judges pair i + 1: stopped at any point, the comparison is on the
    # same pairs, and the JSON written every --print-every pairs is a complete (smaller) result.
    for i, pair in enumerate(pairs):
        for family in families:
            if family in POINTWISE_FAMILIES:
                got = judge_pointwise(judge, family, pair, check_swap=i < args.swap_check)
            elif family == "ab":
                got = judge_ab(judge, pair)
            else:
                continue
            for method, row in got.items():
                rows.setdefault(method, []).append(row)
        if (i + 1) % args.print_every == 0 or i + 1 == len(pairs):
            for method, method_rows in rows.items():
                per_method[method] = summarise(method_rows, args.slices, cfg.feedback.judge_margin)
            result = report(args, cfg, judge, pairs[:i + 1], per_method, rows, started, load_seconds)
            result["complete"] = i + 1 == len(pairs)
            write_json(args.out, result)
            print(f"[{i + 1}/{len(pairs)} pairs, {time.time() - started:.0f} s] " + ", ".join(
                f"{m} {s['accuracy']:.3f}" for m, s in per_method.items()), flush=True)
    if not rows:  # rlcd alone
        write_json(args.out, report(args, cfg, judge, pairs, per_method, rows, started, load_seconds))
    print_table(per_method, length_baselines(pairs), len(pairs))
    return 0


def print_table(per_method: dict, baselines: dict, n: int) -> None:
    print(f"\n{n} held-out pairs; prefer-shorter {baselines['length_baseline_accuracy']:.3f}, prefer-longer "
          f"{baselines['prefer_longer_accuracy']:.3f}")
    print(f"{'method':<18} {'accuracy':>8} {'95% CI':>13} {'slices':>13} {'abstain':>8} {'flips':>6} {'s/judge':>8} "
          f"{'cpu s':>6}")
    for method, s in per_method.items():
        ci = "[{:.3f},{:.3f}]".format(*s["accuracy_ci95"])
        slices = "/".join(f"{a:.2f}" for a in s.get("slice_accuracy", []))
        flips = "–" if s.get("position_flip_rate") is None else f"{s['position_flip_rate']:.2f}"
        print(f"{method:<18} {s['accuracy']:>8.3f} {ci:>13} {slices:>13} {s['abstain_rate']:>8.2f} {flips:>6} "
              f"{s['seconds_per_judgement']:>8.2f} {s.get('cpu_seconds_per_judgement', float('nan')):>6.2f}")
        if method == "rlcd":
            print(f"{'  human-pair RM':<18} {s['human_rm_accuracy']:>8.3f} "
                  "[{:.3f},{:.3f}]".format(*s["human_rm_accuracy_ci95"]) + f" (same {s['train_pairs']} prompts)")


def report(args, cfg: AppConfig, judge: Judge, pairs: list[dict], per_method: dict, rows: dict, started: float,
           load_seconds: float) -> dict:
    default = cfg.feedback.judge_method
    headline = default if default in per_method else next(iter(per_method))
    top = per_method[headline]
    return {
        "method": headline,
        "accuracy": top["accuracy"],
        "position_flip_rate": top["position_flip_rate"],
        "seconds_per_judgement": top["seconds_per_judgement"],
        "per_method": per_method,
        **length_baselines(pairs),
        "model": args.judge_model or cfg.model.model,
        "judge": judge.judge_id,
        "constitution_version": judge.constitution.version,
        "judge_max_tokens": cfg.feedback.judge_max_tokens,
        "eval_file": str(args.eval),
        "split": args.split, "tune_size": args.tune_size, "seed": args.seed, "pairs": len(pairs),
        "threads": args.threads,
        "quantization": cfg.model.resolved_quantization(),
        "load_seconds": load_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "wall_seconds": time.time() - started,
        "verdicts": {m: [{k: v for k, v in r.items() if k in ("p_a", "p_first", "p_second", "score_chosen",
                                                             "score_rejected")} for r in method_rows]
                     for m, method_rows in rows.items()},
    }


if __name__ == "__main__":
    raise SystemExit(main())

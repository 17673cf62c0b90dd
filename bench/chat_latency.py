"""Chat latency with the background trainer on versus off: the cost a person pays for live training.

    python bench/chat_latency.py --pairs 12 --out bench/results/chat_latency.json

Two phases on the same prompts, each with a fresh data folder and the same services the app builds:
1. training off (`--no-train`): Send -> both answers complete, through `Arena.chat_to_end` like `/chat`;
2. training on: the store is first seeded with real preference pairs so the trainer has reward-model and PPO
   work to do from the first second; we wait until its first PPO iteration has started, then measure again.
The JSON records how much training actually happened during phase 2, so "on" cannot silently mean "idle".
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import SHARED_HH, read_preference_file, write_json
from rlhf_online.config import load_config
from rlhf_online.services import build_services


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_pairs(services, prompts: list[list[dict]], think_seconds: float) -> tuple[list[float], list[float]]:
    """Send -> both answers complete, and that time per token of the longer answer (a pair takes as many decoding
    steps as its longer answer): answers shorten as PPO trains, so raw latency alone would flatter training."""
    latencies, per_token = [], []
    for messages in prompts:
        conversation = services.arena.start_conversation(messages[:-1], "latency-bench")
        started = time.perf_counter()
        update = services.arena.chat_to_end(conversation.id, messages[-1]["content"], "latency-bench")
        latencies.append(time.perf_counter() - started)
        steps = max(len(services.generator.tokenizer(text, add_special_tokens=False)["input_ids"])
                    for text in (update.answer_a, update.answer_b))
        per_token.append(latencies[-1] / max(1, steps))
        time.sleep(think_seconds)
    return latencies, per_token


def trainer_work(store) -> dict:
    return {"ppo_iterations": len(store.latest_metrics("ppo", limit=100_000)),
            "reward_updates": len(store.latest_metrics("reward", limit=100_000))}


def run_phase(app_args: list[str], train: bool, prompts, seed_rows, think_seconds: float,
              warmup_timeout_s: float) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"rlhf-latency-{'on' if train else 'off'}-"))
    cfg = load_config(["--data-dir", str(workdir / "data"), "--adapters-dir", str(workdir / "adapters"),
                       *app_args], environ={})
    services = build_services(cfg, start_trainer=train)
    try:
        measure_pairs(services, prompts[:1], 0.0)  # warm-up: first-call allocations are not latency
        if train:
            services.store.import_preferences(seed_rows)
            deadline = time.time() + warmup_timeout_s
            while trainer_work(services.store)["reward_updates"] < cfg.ppo.min_preferences and time.time() < deadline:
                time.sleep(1.0)
            time.sleep(5.0)  # the trainer is now inside its first PPO iteration (reward first, then PPO)
        before = trainer_work(services.store)
        started = time.time()
        latencies, per_token = measure_pairs(services, prompts, think_seconds)
        after = trainer_work(services.store)
        return {"train": train, "pairs": len(latencies), "p50_s": statistics.median(latencies),
                "p95_s": percentile(latencies, 0.95), "mean_s": statistics.fmean(latencies),
                "p50_ms_per_token": 1000 * statistics.median(per_token),
                "seconds": time.time() - started,
                "ppo_iterations_during": after["ppo_iterations"] - before["ppo_iterations"],
                "reward_updates_during": after["reward_updates"] - before["reward_updates"]}
    finally:
        services.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=12, help="chat pairs measured per phase")
    parser.add_argument("--think-seconds", type=float, default=3.0, help="pause between pairs (reading time)")
    parser.add_argument("--seed-preferences", type=int, default=40, help="real pairs imported before phase 2")
    parser.add_argument("--warmup-timeout", type=float, default=300.0)
    parser.add_argument("--out", default="bench/results/chat_latency.json")
    parser.add_argument("app_args", nargs="*", help="extra app flags after --, e.g. -- --max-new-tokens 64")
    args = parser.parse_args(argv)

    rows = read_preference_file(SHARED_HH)
    prompts = [row["prompt"][-1:] for row in rows[:args.pairs]]  # last user turn of the first rows
    seed_rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                 for r in rows[args.pairs:args.pairs + args.seed_preferences]]
    phases = [run_phase(args.app_args, train, prompts, seed_rows, args.think_seconds, args.warmup_timeout)
              for train in (False, True)]
    off, on = phases
    result = {"off": off, "on": on, "p50_ratio": on["p50_s"] / off["p50_s"], "p95_ratio": on["p95_s"] / off["p95_s"],
              "per_token_ratio": on["p50_ms_per_token"] / off["p50_ms_per_token"],
              "app_args": args.app_args, "think_seconds": args.think_seconds}
    print(f"{'training':<10}{'pairs':>6}{'p50 s':>8}{'p95 s':>8}{'ms/token':>9}{'PPO iters':>10}{'RM updates':>11}")
    for phase in phases:
        print(f"{'on' if phase['train'] else 'off':<10}{phase['pairs']:>6}{phase['p50_s']:>8.2f}{phase['p95_s']:>8.2f}"
              f"{phase['p50_ms_per_token']:>9.0f}{phase['ppo_iterations_during']:>10}{phase['reward_updates_during']:>11}")
    print(json.dumps({k: result[k] for k in ("p50_ratio", "p95_ratio", "per_token_ratio")}))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

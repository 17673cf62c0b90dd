"""How fast can PPO learn a taste when the reward is the taste itself? The policy's side of learning, alone.

bench/simulate.py measures the whole loop, where a reward model learned from 200 votes stands between the taste
and PPO, so a slow result there may be the reward model or PPO. Here the hidden taste (an oracle from
bench/oracles.py) scores the rollouts directly: a perfect reward model. Settings (app flags such as
"--lora-layers 8" or "--ppo-lr 1e-4") run side by side, each in its own process on `--threads` threads for the
same wall-clock budget, so they are compared per second of training, the budget a live demo has.

Reported per setting: iterations run, the oracle's mean score, KL and answer length per iteration, and on held-out
HH prompts (never trained on) the oracle's win rate of the final policy against the base on the same seeds, with
their answers side by side.

    python bench/ppo_oracle.py --oracle bench/oracles.py:concise --minutes 6 \\
        --settings "--lora-layers 0|--lora-layers 8" --out bench/results/ppo_oracle_concise.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import SHARED_HH, peak_rss_mb, read_preference_file, split_rows, write_json  # noqa: E402
from simulate import load_oracle  # noqa: E402

EVAL_PROMPTS = 8


def first_turns() -> tuple[list[list[dict]], list[list[dict]]]:
    """(training prompts, held-out prompts): HH first turns, split by a seeded shuffle."""
    rows = [r["prompt"] for r in read_preference_file(SHARED_HH) if len(r["prompt"]) == 1]
    train, held_out = split_rows(rows, EVAL_PROMPTS, seed=0)
    return train, held_out


def answers(trainer, prompts, seeds) -> list[str]:
    """The current policy's answer to each prompt, one seeded draw each (the same seeds for base and final)."""
    return [text for seed in seeds for text in trainer.ppo.rollout(prompts, seed=seed).texts]


def worker(args) -> dict:
    import torch

    from rlhf_online.config import load_config
    from rlhf_online.worker import TrainerWorker

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    oracle = load_oracle(args.oracle)
    train, held_out = first_turns()
    with tempfile.TemporaryDirectory(prefix="bench-ppo-oracle-") as root:
        cfg = load_config(["--data-dir", f"{root}/data", "--adapters-dir", f"{root}/adapters", "--no-gate",
                           "--trainer-threads", str(args.threads), "--seed", str(args.seed)]
                          + shlex.split(args.worker_setting), environ={})
        trainer = TrainerWorker(cfg)
        trainer.ppo.score_fn = lambda messages, texts: [oracle(m, a) for m, a in zip(messages, texts)]
        seeds = [args.seed * 1000 + i for i in range(args.eval_draws)]
        base = answers(trainer, held_out, seeds)
        iterations = []
        started = time.perf_counter()
        while time.perf_counter() - started < 60 * args.minutes:
            batch = trainer.ppo.sample_prompts(train)
            stats = trainer.ppo.iteration(batch)
            scores = [oracle(m, a) for m, a in zip(batch, trainer.ppo.last_texts)]
            iterations.append({"oracle": statistics.median(scores), "kl": stats.kl, "kl_coef": stats.kl_coef,
                               "mean_length": stats.mean_length, "seconds": stats.seconds, "epochs": stats.epochs,
                               "approx_kl": stats.approx_kl, "clip_fraction": stats.clip_fraction})
        final = answers(trainer, held_out, seeds)
        trainer.close()
    prompts = [p for _ in seeds for p in held_out]  # the order `answers` returns them in
    margins = [oracle(p, f) - oracle(p, b) for p, b, f in zip(prompts, base, final)]
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    return {"setting": args.worker_setting, "iterations": iterations, "iterations_run": len(iterations),
            "win_rate_final_vs_base": statistics.mean(wins),
            "kl_last3": statistics.mean(i["kl"] for i in iterations[-3:]) if iterations else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "samples": [{"prompt": p[-1]["content"], "base": b, "final": f}
                        for p, b, f in zip(prompts, base, final)]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--oracle", default="bench/oracles.py:concise", help="FILE.py:FUNC(messages, answer)")
    parser.add_argument("--settings", default="--lora-layers 0", help="'|'-separated app flags, one per setting")
    parser.add_argument("--minutes", type=float, default=6.0, help="training wall-clock budget per setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", action="store_true", help="run the settings at once, one process each "
                        "(on 2 cores with --threads 1: side by side under the same load)")
    parser.add_argument("--eval-draws", type=int, default=2, help="seeded answers per held-out prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/ppo_oracle.json")
    parser.add_argument("--worker-setting", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_setting is not None:
        write_json(args.worker_out, worker(args))
        return {}
    settings = args.settings.split("|")
    outs = [tempfile.NamedTemporaryFile(suffix=".json", delete=False).name for _ in settings]
    commands = [[sys.executable, __file__, "--worker-setting", s, "--worker-out", out, "--oracle", args.oracle,
                 "--minutes", str(args.minutes), "--threads", str(args.threads), "--eval-draws",
                 str(args.eval_draws), "--seed", str(args.seed)] for s, out in zip(settings, outs)]
    if args.parallel:
        procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
        failures = [(c, p.communicate()[1]) for c, p in zip(commands, procs) if p.wait() != 0]
    else:
        runs = [(c, subprocess.run(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)) for c in commands]
        failures = [(c, r.stderr) for c, r in runs if r.returncode != 0]
    for command, stderr in failures:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"setting {command[3]!r} failed")
    results = {s: json.loads(Path(out).read_text()) for s, out in zip(settings, outs)}
    print(f"\n{'setting':<28} {'iters':>5} {'s/iter':>6} {'oracle first3':>13} {'oracle last3':>12} "
          f"{'KL last3':>8} {'win vs base':>11}")
    for name, r in results.items():
        its = r["iterations"]
        first = statistics.mean(i["oracle"] for i in its[:3]) if its else float("nan")
        last = statistics.mean(i["oracle"] for i in its[-3:]) if its else float("nan")
        per = statistics.mean(i["seconds"] for i in its) if its else float("nan")
        print(f"{name:<28} {len(its):>5} {per:>6.1f} {first:>13.1f} {last:>12.1f} {r['kl_last3']:>8.2f} "
              f"{r['win_rate_final_vs_base']:>11.2f}")
    report = {"oracle": args.oracle, "minutes": args.minutes, "threads": args.threads, "parallel": args.parallel,
              "seed": args.seed, "settings": results}
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

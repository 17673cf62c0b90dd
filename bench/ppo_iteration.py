"""PPO iteration time by rollout engine and training base, the trainer's real pieces on the embedded model.

Each setting runs in its own subprocess (RSS is per process) as the trainer process runs: `--threads` torch and llama.cpp threads (1, as the trainer), a
`TrainerWorker` (fp32 or NF4 training copy, reward model on the shared base, release gate off), and
`--iterations` PPO iterations on the same prompts (HH prompts from ../shared, or a built-in list). Reported per
setting: seconds per iteration (the first one, which loads and warms up, is reported apart), the seconds spent
sampling, scoring (reward model; the no-grad old and reference passes where PyTorch sampled) and updating (the PPO
epochs, with the reference pass on each minibatch where llama.cpp sampled), the
sampler-trainer mismatch (per-token KL, llama.cpp only) and the share of tokens whose importance weight was capped,
peak RSS, and the first answers of the first and last iteration (same prompts).

    python bench/ppo_iteration.py --out bench/results/ppo_iteration.json
    python bench/ppo_iteration.py --settings "llamacpp:fp32" --iterations 3 --threads 2
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

from common import SHARED_HH, peak_rss_mb, read_preference_file, write_json  # noqa: E402

SETTINGS = "torch:nf4,torch:fp32,llamacpp:fp32"  # rollout engine : training base
FALLBACK_PROMPTS = ["Why is the sky blue?", "How do I make a cup of tea?", "Give me a tip for sleeping better.",
                    "What should I pack for a day hike?"]


def prompts(count: int, multi_turn: bool = False) -> list[list[dict]]:
    """HH first turns, or with `multi_turn` HH conversations of 3+ messages (earlier turns in the prompt)."""
    if SHARED_HH.is_file():
        rows = [r["prompt"] for r in read_preference_file(SHARED_HH)
                if (len(r["prompt"]) >= 3 if multi_turn else len(r["prompt"]) == 1)]
        return rows[:count]
    return [[{"role": "user", "content": p}] for p in FALLBACK_PROMPTS[:count]]


def worker(args) -> dict:
    import torch

    from rlhf_online.config import load_config
    from rlhf_online.worker import TrainerWorker

    engine, quantization = args.worker_setting.split(":")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as root:
        cfg = load_config(["--data-dir", f"{root}/data", "--adapters-dir", f"{root}/adapters", "--quantization",
                           quantization, "--rollout-engine", engine, "--no-gate", "--trainer-threads",
                           str(args.threads), "--ppo-batch-size", str(args.batch_size), "--ppo-max-new-tokens",
                           str(args.max_new_tokens)] + shlex.split(args.config), environ={})
        started = time.perf_counter()
        trainer = TrainerWorker(cfg)
        load_s = time.perf_counter() - started
        batch = trainer.ppo.sample_prompts(prompts(4 * args.batch_size, args.multi_turn))  # (one in five is held out for the gate)
        stats, samples = [], []
        for _ in range(args.iterations):
            result = trainer.ppo.iteration(batch)
            stats.append(result.as_dict())
            samples.append(trainer.ppo.last_texts[:4])
        trainer.close()
    steady = stats[1:] or stats
    return {"setting": args.worker_setting, "load_s": load_s, "first_iteration_s": stats[0]["seconds"],
            "iteration_s": statistics.mean(s["seconds"] for s in steady),
            "rollout_s": statistics.mean(s["rollout_seconds"] for s in steady),
            "score_s": statistics.mean(s["score_seconds"] for s in steady),
            "update_s": statistics.mean(s["update_seconds"] for s in steady),
            "sampler_kl": statistics.mean(s["sampler_kl"] for s in steady) if steady[0]["sampler_kl"] is not None
            else None,
            "is_truncated": statistics.mean(s["is_truncated"] for s in steady),
            "kl": [s["kl"] for s in stats], "mean_length": [s["mean_length"] for s in stats],
            "iterations": stats, "peak_rss_mb": peak_rss_mb(),
            "prompt_tokens": [len(trainer.ppo._prompt_ids(m)) for m in batch],
            "prompts": [m[-1]["content"] for m in batch[:2]], "first_answers": samples[0], "last_answers": samples[-1]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=SETTINGS, help="comma-separated ENGINE:BASE (torch|llamacpp : nf4|fp32)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="the trainer's torch and llama.cpp threads")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--multi-turn", action="store_true", help="prompts are HH conversations of 3+ messages "
                        "(longer prompts, as a chat's later turns) instead of first turns")
    parser.add_argument("--config", default="", help="more app flags for the trainer, e.g. '--lora-layers 10'")
    parser.add_argument("--out", default="bench/results/ppo_iteration.json")
    parser.add_argument("--worker-setting", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_setting:
        write_json(args.worker_out, worker(args))
        return {}
    results = {}
    for setting in args.settings.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, __file__, "--worker-setting", setting, "--worker-out", out.name, "--iterations",
                   str(args.iterations), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                   "--max-new-tokens", str(args.max_new_tokens), "--config", args.config] + \
                (["--multi-turn"] if args.multi_turn else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"setting {setting} failed ({proc.returncode})")
            results[setting] = json.loads(Path(out.name).read_text())
        r = results[setting]
        print(f"{setting}: {r['iteration_s']:.1f} s/iteration", flush=True)
    print(f"\n{'rollouts:base':<16} {'1st it s':>8} {'it s':>6} {'rollout s':>9} {'score s':>7} {'update s':>8} "
          f"{'sampler KL':>10} {'IS capped':>9} {'peak MB':>8}")
    for name, r in results.items():
        kl = "-" if r["sampler_kl"] is None else f"{r['sampler_kl']:.4f}"
        print(f"{name:<16} {r['first_iteration_s']:>8.1f} {r['iteration_s']:>6.1f} {r['rollout_s']:>9.1f} "
              f"{r['score_s']:>7.1f} {r['update_s']:>8.1f} {kl:>10} {r['is_truncated']:>9.1%} {r['peak_rss_mb']:>8.0f}")
    tokens = statistics.mean(t for r in results.values() for t in r["prompt_tokens"])
    print(f"(batch {args.batch_size} x {args.max_new_tokens} tokens, prompts {tokens:.0f} tokens on average, "
          f"{args.threads} thread(s), mean of iterations 2 onwards)")
    report = {"settings": results, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "iterations": args.iterations, "threads": args.threads, "multi_turn": args.multi_turn,
              "config": args.config}
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

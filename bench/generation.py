"""Generation benchmark: the chat engines side by side, and the transformers engine per base-weight format.

Engines (`--engines llamacpp,transformers`, the default), each in its own subprocess, serving the same two
published LoRA versions (random adapters, published as the trainer publishes them, so llama.cpp gets the GGUF
written beside the PEFT folder): `ttft_s` (first token of a pair from two versions), `single_tok_s` (one answer),
`pair_wall_s` (a pair from the base), `pair_two_versions_wall_s` (a pair, answer A from v0002 and B from v0001,
as the chat serves it), `peak_rss_mb`. Written under "engines" in the JSON. transformers = today's serving path
(bitsandbytes NF4 of the dequantized GGUF, PEFT slots); llamacpp = the shipped Q4_1 GGUF's weights, stored as
Q8_0 by default (`rlhf_online/gguf_weights.py`); `llamacpp:shipped` serves the file as it is.

With `--dtypes fp32,bf16,nf4`, also for each of fp32, bf16 and nf4 (a serving copy, as the chat server loads it) this measures, in one run:

* cold load: the embedded GGUF converted into a fresh, empty cache folder, then loaded in that format;
* cached load: the converted folder loaded again (every start after the first);
* time to first token and tokens/s of a single answer;
* wall time and aggregate tokens/s of a pair (2 rows, one batched `generate`) from two LoRA versions,
  as the chat serves them, and of a pair from the bare base (no LoRA);
* peak RSS.

RSS peaks are process-wide, so every format (and its cold load) runs in its own subprocess. Answers are
forced to `--max-new-tokens` tokens (`min_new_tokens`) so every format decodes the same number of tokens; the
actual count is reported. Generation goes through the app's own `Generator.stream` and model loaders.

    python bench/generation.py --out bench/results/generation.json --max-new-tokens 64 --repeats 3
    python bench/generation.py --out result.json --engines "" --dtypes fp32,bf16,nf4   # formats only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DTYPES = ("fp32", "bf16", "nf4")
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------- workers


def worker_cold(args) -> dict:
    """Convert the model into an empty cache folder and load it: the very first start of the app."""
    from rlhf_online import models
    from rlhf_online.config import ModelConfig

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        cfg = ModelConfig(model=args.model, quantization=args.worker_dtype, cache_dir=cache)
        started = time.perf_counter()
        source = models.resolve_model_source(cfg)
        converted = time.perf_counter()
        models.load_tokenizer(source)
        loaded = models.load_base_model(source, args.worker_dtype)
        done = time.perf_counter()
    return {"convert_s": converted - started, "cold_load_s": done - started, "cold_peak_rss_mb": peak_rss_mb(),
            "quantization_used": loaded.quantization}


class _ForcedLength:
    """Mixin for the project's Generator: answers run to exactly `max_new_tokens` (no early end-of-turn)."""

    min_new_tokens = 0

    def _generate_kwargs(self, adapter_versions, max_new_tokens, *args, **kwargs):
        kwargs = super()._generate_kwargs(adapter_versions, max_new_tokens, *args, **kwargs)
        kwargs["min_new_tokens"] = self.min_new_tokens
        return kwargs


def _timed_stream(generator, prompt_ids, versions, max_new_tokens) -> dict:
    """One streamed generation, every row forced to `max_new_tokens` tokens (the engines' `ignore_end`)."""
    started = time.perf_counter()
    first = None
    update = None
    for update in generator.stream(prompt_ids, versions, max_new_tokens, ignore_end=True):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    rows = len(prompt_ids)
    steps = max_new_tokens  # forced length; llama.cpp streams text pieces, not one update per token
    return {"ttft_s": first - started, "wall_s": end - started, "tokens_per_row": steps, "rows": rows,
            "tok_s": steps * rows / (end - started),
            "decode_tok_s": (steps - 1) * rows / (end - first) if steps > 1 and end > first else 0.0,
            "sample": update.texts[0][:80]}


def _best_run(fn, repeats: int) -> dict:
    """The fastest of `repeats` timed runs (after a warm-up), which is the least disturbed by other processes
    on a shared box (torch's threads spin badly when another process takes a core); medians are kept too."""
    fn()  # warm-up: first-call allocations, bitsandbytes' repacking of 4-bit weights
    runs = []
    for _ in range(repeats):
        runs.append({**fn(), "loadavg_1m": os.getloadavg()[0]})
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["median_wall_s"] = statistics.median(r["wall_s"] for r in runs)
    best["median_tok_s"] = statistics.median(r["tok_s"] for r in runs)
    best["all_wall_s"] = [r["wall_s"] for r in runs]
    return best


def worker_serve(args) -> dict:
    """Load the cached folder as the chat server does and time generations."""
    import torch

    from rlhf_online import models
    from rlhf_online.config import ModelConfig, SamplingConfig
    from rlhf_online.generation import Generator
    from rlhf_online.versions import BASE_VERSION

    class BenchGenerator(_ForcedLength, Generator):
        pass

    cfg = ModelConfig(model=args.model, quantization=args.worker_dtype)
    source = models.resolve_model_source(cfg)  # already converted by the parent
    started = time.perf_counter()
    tokenizer = models.load_tokenizer(source)
    loaded = models.load_base_model(source, args.worker_dtype)
    load_s = time.perf_counter() - started
    rss_after_load = peak_rss_mb()

    n = args.max_new_tokens
    sampling = SamplingConfig()  # the chat's own temperature and top_p
    generator = BenchGenerator(loaded.model, tokenizer, sampling)
    generator.min_new_tokens = n
    prompt = generator.build_prompt(PROMPT).input_ids
    torch.manual_seed(0)

    result = {"quantization_used": loaded.quantization, "cached_load_s": load_s, "prompt_tokens": len(prompt),
              "torch_threads": torch.get_num_threads(), "rss_after_load_mb": rss_after_load}
    result["pair_base"] = _best_run(
        lambda: _timed_stream(generator, [prompt, prompt], [BASE_VERSION, BASE_VERSION], n), args.repeats)

    # Two LoRA versions, as LiveAdapters serves them (a PeftModel; pairs pick one adapter per row).
    peft_model = models.attach_lora(loaded.model, cfg, adapter_name="v0001")
    peft_model.add_adapter("v0002", models.lora_config(cfg))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.002)
    peft_model.eval()
    generator.model = peft_model
    result["single"] = _best_run(lambda: _timed_stream(generator, [prompt], ["v0002"], n), args.repeats)
    result["pair"] = _best_run(
        lambda: _timed_stream(generator, [prompt, prompt], ["v0002", "v0001"], n), args.repeats)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def publish_two_versions(root: Path, model: str) -> Path:
    """Two random LoRA versions in a registry folder, published as the trainer publishes them."""
    import torch

    from rlhf_online import models
    from rlhf_online.adapters import AdapterRegistry, save_peft_adapter
    from rlhf_online.config import ModelConfig

    cfg = ModelConfig(model=model)
    base = models.load_base_model(models.resolve_model_source(cfg), "fp32").model
    torch.manual_seed(0)
    policy = models.attach_lora(base, cfg)
    registry = AdapterRegistry(root)
    for _ in range(2):
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.002)
        registry.publish(lambda folder: save_peft_adapter(policy, models.POLICY_ADAPTER, folder), {})
    return root


def worker_engine(args) -> dict:
    """Start an engine as the app does (engine.build_engine) with the two versions loaded, then time it."""
    import torch

    from rlhf_online import models
    from rlhf_online.adapters import AdapterRegistry
    from rlhf_online.config import load_config
    from rlhf_online.engine import build_engine

    name, _, weights = args.worker_dtype.partition(":")  # e.g. llamacpp:shipped
    cfg = load_config(["--model", args.model, "--engine", name] + (["--engine-weights", weights] if weights else []),
                      environ={})
    source = models.resolve_model_source(cfg.model)
    started = time.perf_counter()
    tokenizer = models.load_tokenizer(source)
    serving = build_engine(cfg, name, tokenizer, source, AdapterRegistry(args.versions_dir))
    if hasattr(serving.live, "_load"):  # LiveAdapters serves newest vs base at start: load the predecessor first
        serving.live._load(serving.live.registry.versions()[0])
    serving.live.refresh()
    load_s = time.perf_counter() - started
    engine, n = serving.engine, args.max_new_tokens
    assert serving.live.newest_pair() == ("v0002", "v0001"), serving.live.loaded
    prompt = engine.build_prompt(PROMPT).input_ids
    torch.manual_seed(0)

    def timed(rows, versions):  # noqa: E306
        return lambda: _timed_stream(engine, [prompt] * rows, versions, n)

    result = {"engine": engine.name, "weights": serving.weights, "load_s": load_s, "prompt_tokens": len(prompt),
              "threads": getattr(engine, "threads", torch.get_num_threads())}
    result["single"] = _best_run(timed(1, ["v0002"]), args.repeats)
    result["pair_base"] = _best_run(timed(2, [BASE, BASE]), args.repeats)
    result["pair"] = _best_run(timed(2, ["v0002", "v0001"]), args.repeats)
    result.update(ttft_s=result["pair"]["ttft_s"], single_tok_s=result["single"]["tok_s"],
                  pair_wall_s=result["pair_base"]["wall_s"], pair_two_versions_wall_s=result["pair"]["wall_s"],
                  peak_rss_mb=peak_rss_mb(), sample_answer=result["pair"]["sample"])
    engine.close()
    return result


BASE = "base"


# ------------------------------------------------------------------------------------------------ parent


def run_worker(args, mode: str, dtype: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--worker", mode, "--worker-dtype", dtype, "--worker-out", out.name,
               "--model", args.model, "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats),
               "--versions-dir", str(getattr(args, "versions_dir", "") or "")]
        load_before = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{mode} worker for {dtype} failed with exit code {proc.returncode}")
        result = json.loads(Path(out.name).read_text())
    result[f"{mode}_loadavg_1m_before"] = load_before
    return result


def print_engine_table(engines: dict, n: int) -> None:
    print(f"{'engine':<17} {'weights':<26} {'load s':>6} {'TTFT s':>7} {'1 ans tok/s':>11} {'base pair s':>11} "
          f"{'2-version pair s':>16} {'peak RSS MB':>11}")
    for name, r in engines.items():
        print(f"{name:<17} {r['weights']:<26} {r['load_s']:>6.2f} {r['ttft_s']:>7.3f} {r['single_tok_s']:>11.1f} "
              f"{r['pair_wall_s']:>11.2f} {r['pair_two_versions_wall_s']:>16.2f} {r['peak_rss_mb']:>11.0f}")
    print(f"(best of the repeats, medians in the JSON; answers forced to {n} tokens; pair = 2 answers to one "
          f"prompt; TTFT = first token of a 2-version pair)")


def print_table(results: dict, n: int) -> None:
    header = (f"{'format':<6} {'cold load':>9} {'cached':>7} {'TTFT':>6} {'1 ans':>7} {'pair agg':>8} "
              f"{'pair wall':>9} {'base pair':>9} {'tokens':>6} {'peak RSS':>9} {'cold RSS':>9}")
    print(header)
    print(f"{'':<6} {'s':>9} {'s':>7} {'s':>6} {'tok/s':>7} {'tok/s':>8} {'s':>9} {'tok/s':>9} "
          f"{'/row':>6} {'MB':>9} {'MB':>9}")
    for dtype, r in results.items():
        cold = f"{r['cold_load_s']:.1f}" if "cold_load_s" in r else "-"
        cold_rss = f"{r['cold_peak_rss_mb']:.0f}" if "cold_peak_rss_mb" in r else "-"
        print(f"{dtype:<6} {cold:>9} {r['cached_load_s']:>7.2f} {r['single']['ttft_s']:>6.2f} "
              f"{r['single']['tok_s']:>7.1f} {r['pair']['tok_s']:>8.1f} {r['pair']['wall_s']:>9.2f} "
              f"{r['pair_base']['tok_s']:>9.1f} {r['pair']['tokens_per_row']:>6.0f} {r['peak_rss_mb']:>9.0f} "
              f"{cold_rss:>9}")
    print(f"(best of the repeats, medians in the JSON; answers forced to {n} tokens; pair = 2 rows from 2 LoRA "
          f"versions in one batched generate; base pair = the same without LoRA)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="result.json", help="where to write the JSON results")
    parser.add_argument("--model", default="embedded", help="'embedded', a hub id or a local model folder")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length, in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after a warm-up)")
    parser.add_argument("--engines", default="llamacpp,transformers",
                        help="comma-separated engines to compare; llamacpp:shipped / llamacpp:q8_0 pick the "
                             "llama.cpp weight storage (--engine-weights)")
    parser.add_argument("--dtypes", default="", help="also measure the transformers engine per base format "
                                                     f"(comma-separated, e.g. {','.join(DTYPES)})")
    parser.add_argument("--versions-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold (convert from GGUF) load")
    parser.add_argument("--worker", choices=["cold", "serve", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = {"cold": worker_cold, "serve": worker_serve, "engine": worker_engine}[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(result))
        return

    from rlhf_online import models
    from rlhf_online.config import ModelConfig

    models.resolve_model_source(ModelConfig(model=args.model))  # the cached folder the serve workers load
    if os.getloadavg()[0] > 1.0:
        print(f"warning: load average {os.getloadavg()[0]:.1f}: other processes will skew these timings",
              file=sys.stderr)
    started = time.time()
    engines = {}
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as versions_dir:
        if args.engines:
            args.versions_dir = str(publish_two_versions(Path(versions_dir) / "adapters", args.model))
        for name in filter(None, args.engines.split(",")):
            engines[name] = run_worker(args, "engine", name)
            print(f"engine {name}: done ({time.time() - started:.0f} s)", file=sys.stderr)
    results = {}
    for dtype in filter(None, args.dtypes.split(",")):
        result = {} if args.skip_cold or args.model != models.EMBEDDED else run_worker(args, "cold", dtype)
        result.update(run_worker(args, "serve", dtype))
        results[dtype] = result
        print(f"{dtype}: done ({time.time() - started:.0f} s)", file=sys.stderr)

    import bitsandbytes
    import peft
    import torch
    import transformers

    report = {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "peft": peft.__version__,
                    "bitsandbytes": bitsandbytes.__version__, "loadavg_1m_end": os.getloadavg()[0]},
        "engines": engines,
        "results": results,
        "total_s": time.time() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if engines:
        print_engine_table(engines, args.max_new_tokens)
    if results:
        print_table(results, args.max_new_tokens)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

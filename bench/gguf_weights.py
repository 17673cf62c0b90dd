"""llama.cpp on the shipped Q4_1 GGUF vs the same weights stored as Q8_0 (`--engine-weights`): speed and sameness.

For each storage, one xllamacpp server per measurement setting (`--threads`, 1 = one chat lane):
* `ttft_s`: median time to the first token of a chat prompt (~40 tokens, no prompt cache);
* `rows{N}_tok_s`: aggregate tokens/s of N answers decoding at once (64 tokens each, like N chat rows);
* `mean_abs_dlogprob`, `kl_per_token`: llama.cpp's log-probabilities of its own samples against PyTorch's of the
  same tokens under the training copy's weights (the dequantized GGUF, fp32): how far the served policy is from
  the one PPO trains (the mean difference estimates the per-token KL(served || trained));
* the first answer to each prompt (seeded), so the storages can be read side by side.

    python bench/gguf_weights.py --out bench/results/gguf_weights.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import peak_rss_mb, write_json  # noqa: E402

PROMPTS = ["What are three tips for staying focused while studying?", "Tell me about the history of bread.",
           "How do I politely decline an invitation?", "Why is the sky blue?", "Write a short poem about autumn.",
           "What should I pack for a weekend hike?", "How can I sleep better?", "Give me three tips for a job interview."]


def start_server(path: Path, threads: int, slots: int):
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_parallel, params.n_ctx, params.warmup, params.verbosity = slots, slots * 512, False, -1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    server = xllamacpp.Server(params)
    server.handle_completions({"prompt": [0], "n_predict": 1})  # (deleting an unused server can deadlock)
    return server


def rows_tok_s(server, prompts: list[list[int]], rows: int, tokens: int) -> float:
    def run(row: int) -> None:
        server.handle_completions({"prompt": prompts[row % len(prompts)], "n_predict": tokens, "ignore_eos": True,
                                   "temperature": 0.8, "cache_prompt": False, "seed": row})

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(row,)) for row in range(rows)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return rows * tokens / (time.perf_counter() - started)


def sameness(server, model, tokenizer, prompts: list[list[int]], tokens: int) -> dict:
    import torch

    diffs, answers = [], []
    for seed, prompt in enumerate(prompts):
        reply = server.handle_completions({
            "prompt": prompt, "n_predict": tokens, "temperature": 0.8, "top_k": 40, "top_p": 1.0, "min_p": 0.0,
            "repeat_penalty": 1.0, "n_probs": 1, "cache_prompt": False, "seed": 200 + seed})
        content = reply["choices"][0]["logprobs"]["content"]
        sampled = [c["id"] for c in content]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + sampled])).logits[0, len(prompt) - 1:-1].float()
        trained = torch.log_softmax(logits, -1).gather(1, torch.tensor(sampled)[:, None])[:, 0]
        diffs += (torch.tensor([c["logprob"] for c in content]) - trained).tolist()
        answers.append(reply["choices"][0]["text"])
    return {"mean_abs_dlogprob": statistics.mean(abs(d) for d in diffs), "kl_per_token": statistics.mean(diffs),
            "tokens_compared": len(diffs), "answers": answers}


def measure(name: str, path: Path, args, model, tokenizer, prompts) -> dict:
    server = start_server(path, args.threads, slots=max(args.rows))
    ttft = []
    for i in range(9):
        started = time.perf_counter()
        server.handle_completions({"prompt": prompts[i % len(prompts)], "n_predict": 1, "cache_prompt": False})
        ttft.append(time.perf_counter() - started)
    result = {"file": str(path), "size_mb": path.stat().st_size / 1e6, "ttft_s": statistics.median(ttft)}
    for rows in args.rows:
        result[f"rows{rows}_tok_s"] = statistics.median(rows_tok_s(server, prompts, rows, args.tokens)
                                                        for _ in range(args.repeats))
    del server
    # the sameness check on 2 threads: its numbers do not depend on speed
    server = start_server(path, 2, slots=1)
    result.update(sameness(server, model, tokenizer, prompts, args.tokens))
    del server
    print(f"{name}: done", file=sys.stderr)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="result.json")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1 = one chat lane)")
    parser.add_argument("--rows", default="1,8,16", help="comma-separated numbers of answers decoding at once")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",")]

    import torch

    from rlhf_online import models
    from rlhf_online.config import ModelConfig
    from rlhf_online.gguf_weights import served_gguf

    torch.set_num_threads(2)
    source = models.resolve_model_source(ModelConfig())
    tokenizer = models.load_tokenizer(source)
    model = models.load_base_model(source, "fp32").model.eval()
    prompts = [models.chat_ids(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    shipped = models.embedded_gguf_path()
    with tempfile.TemporaryDirectory(prefix="bench-gguf-weights-") as cache:
        started = time.perf_counter()
        restored = served_gguf(shipped, "q8_0", cache)
        convert_s = time.perf_counter() - started
        results = {"shipped": measure("shipped", shipped, args, model, tokenizer, prompts),
                   "q8_0": measure("q8_0", restored, args, model, tokenizer, prompts)}
    results["q8_0"]["convert_s"] = convert_s
    report = {"args": vars(args), "storages": results, "peak_rss_mb": peak_rss_mb(), "prompts": PROMPTS}
    write_json(args.out, report)
    rows_header = " ".join(f"{f'{r} rows tok/s':>13}" for r in args.rows)
    print(f"{'storage':<8} {'MB':>5} {'TTFT s':>7} {rows_header} {'|dlogp|':>8} {'KL/token':>9}")
    for name, r in results.items():
        rows = " ".join(f"{r[f'rows{n}_tok_s']:>13.1f}" for n in args.rows)
        print(f"{name:<8} {r['size_mb']:>5.0f} {r['ttft_s']:>7.3f} {rows} {r['mean_abs_dlogprob']:>8.4f} "
              f"{r['kl_per_token']:>9.5f}")
    print(f"({args.threads} llama.cpp thread(s); |dlogp| and KL: served vs the PyTorch training copy, on "
          f"{results['q8_0']['tokens_compared']} sampled tokens; conversion {convert_s:.1f} s, once)")
    for i, prompt in enumerate(PROMPTS[:3]):
        print(f"\n{prompt}\n  shipped: {results['shipped']['answers'][i][:160]!r}\n  q8_0:    "
              f"{results['q8_0']['answers'][i][:160]!r}")
    return report


if __name__ == "__main__":
    main()

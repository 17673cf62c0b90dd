"""Does the llama.cpp chat end its answers where the policy would? Its repetition penalty against the reference.

    python bench/llamacpp_penalty.py --version DIR/adapters/v0007 --biases 0,0.9,1.2,1.5 \
        --out bench/results/llamacpp_penalty.json

The chat's repetition penalty is meant for the answer's own tokens (`--repetition-penalty`'s help); the
transformers engine applies it so (`generation.answer_repetition_penalty`). llama.cpp's server also feeds the
prompt's tokens to its penalty, so for an answer's first ~60 tokens the end-of-turn token that closed the question
is penalised and answers end later. This measures, on held-out HH first turns (seeded draws), per setting and for
the base and one published version: mean answer tokens, the share of answers that ended before the limit, and
the share that ran to the limit repeating themselves (`sampling_loops.repeats`):

* ``llamacpp bias B``: the llama.cpp chat request (`llamacpp_engine.chat_repeat_penalty`) with
  `--end-of-turn-bias B` (0 = the penalty as llama.cpp applies it);
* ``llamacpp off``: no penalty (how PPO's rollouts sample);
* ``transformers answer-only``: the reference, the transformers engine on the same model and version.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import threading
import time
from pathlib import Path

from common import SHARED_HH, write_json
from sampling_loops import repeats
from simulate import read_prompts
from rlhf_online.adapters import VersionInfo
from rlhf_online.config import load_config
from rlhf_online.gguf_weights import engine_gguf
from rlhf_online.llamacpp_engine import LlamaCppEngine, chat_repeat_penalty
from rlhf_online.models import chat_ids, load_tokenizer, resolve_model_source
from rlhf_online.versions import BASE_VERSION


def summarize(texts: list[str], tokens: list[int], ended: list[bool]) -> dict:
    loops = [not e and repeats(t) for t, e in zip(texts, ended)]
    return {"mean_tokens": sum(tokens) / len(tokens), "ended_rate": sum(ended) / len(ended),
            "loop_rate": sum(loops) / len(loops), "mean_words": sum(len(t.split()) for t in texts) / len(texts),
            "samples": texts[:3]}


def llamacpp_answers(engine: LlamaCppEngine, prompts: list[list[int]], version: str, fields: dict, draws: int,
                     max_new_tokens: int) -> dict:
    """`draws` seeded answers per prompt, the rows sent at once (llama.cpp batches them)."""
    with engine.states.using([version]) as state:
        requests = [{"prompt": ids, "n_predict": max_new_tokens, "temperature": engine.sampling.temperature,
                     "top_p": engine.sampling.top_p, "top_k": 0, "min_p": 0.0, "cache_prompt": False,
                     "seed": 1000 * i + d, "lora": state.lora(version), **fields}
                    for i, ids in enumerate(prompts) for d in range(draws)]
        replies: list = [None] * len(requests)

        def run(row: int) -> None:
            replies[row] = state.server.handle_completions(requests[row])

        threads = [threading.Thread(target=run, args=(row,)) for row in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for reply in replies:
        if "choices" not in reply:
            raise RuntimeError(f"llama.cpp: {reply}")
    return summarize([r["choices"][0]["text"].strip() for r in replies],
                     [r["usage"]["completion_tokens"] for r in replies],
                     [r["choices"][0].get("finish_reason") == "stop" for r in replies])


def transformers_answers(cfg, version_dir: Path | None, prompts: list[list[dict]], draws: int) -> dict[str, dict]:
    """The reference: the transformers engine's answer-only penalty, base and version (a throwaway registry)."""
    import tempfile

    import torch

    from rlhf_online.services import build_services

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="rlhf-penalty-"))
    (work / "adapters").mkdir()
    if version_dir is not None:
        (work / "adapters" / version_dir.name).symlink_to(version_dir.resolve())
    ref_cfg = load_config(["--data-dir", str(work / "data"), "--adapters-dir", str(work / "adapters"),
                           "--engine", "transformers"], environ={})
    services = build_services(ref_cfg, start_trainer=False)
    out = {}
    try:
        for version in [BASE_VERSION] + ([version_dir.name] if version_dir else []):
            texts = []
            for messages in prompts:
                ids = services.generator.build_prompt(messages).input_ids
                texts += services.generator.sample([ids] * draws, [version] * draws)
            tokens = [len(services.generator.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
            limit = cfg.sampling.max_new_tokens
            out[version] = summarize(texts, tokens, [n < limit - 2 for n in tokens])  # re-tokenized: ~±2 tokens
    finally:
        services.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default=None, help="a published version's folder (PEFT + GGUF adapter)")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--biases", default="0,1.2", help="--end-of-turn-bias values to measure")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) transformers reference")
    parser.add_argument("--out", default="bench/results/llamacpp_penalty.json")
    args = parser.parse_args(argv)

    cfg = load_config([], environ={})
    tokenizer = load_tokenizer(resolve_model_source(cfg.model))
    messages = read_prompts(str(SHARED_HH), 1)
    random.Random(0).shuffle(messages)
    messages = messages[:args.prompts]
    prompts = [chat_ids(tokenizer, m) for m in messages]
    version_dir = Path(args.version) if args.version else None
    engine = LlamaCppEngine(engine_gguf(cfg), tokenizer, cfg.sampling, slots=8)
    versions = [BASE_VERSION]
    if version_dir is not None:
        engine.states.switch_to(engine.build_state([VersionInfo(version_dir.name, version_dir, {})]))
        versions.append(version_dir.name)
    settings = {f"llamacpp bias {b}": chat_repeat_penalty(
        dataclasses.replace(cfg.sampling, end_of_turn_bias=float(b)), engine.end_of_turn_id)
        for b in args.biases.split(",")}
    settings["llamacpp off"] = {"repeat_penalty": 1.0}
    results: dict[str, dict] = {}
    try:
        for name, fields in settings.items():
            for version in versions:
                started = time.perf_counter()
                results[f"{name} | {version}"] = llamacpp_answers(engine, prompts, version, fields, args.draws,
                                                                  cfg.sampling.max_new_tokens)
                results[f"{name} | {version}"]["seconds"] = time.perf_counter() - started
    finally:
        engine.close()
    if not args.no_reference:
        for version, figures in transformers_answers(cfg, version_dir, messages, args.draws).items():
            results[f"transformers answer-only | {version}"] = figures
    print(f"{'setting | version':44s} {'tokens':>7s} {'words':>6s} {'ended':>6s} {'loops':>6s}")
    for name, r in results.items():
        print(f"{name:44s} {r['mean_tokens']:7.1f} {r['mean_words']:6.1f} {r['ended_rate']:6.2f} {r['loop_rate']:6.2f}")
    write_json(args.out, {"prompts": args.prompts, "draws": args.draws, "version": args.version,
                          "repetition_penalty": cfg.sampling.repetition_penalty, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

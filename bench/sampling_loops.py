"""How often does the chat loop? Share of answers that run to the token limit while repeating themselves.

    nice -n 5 python bench/sampling_loops.py --prompts 24 --batch-size 24 --out bench/results/sampling_loops.json

Samples one answer per prompt (real first turns from the HH file, topped up with the built-in cold-start
prompts) for each sampling setting, exactly as the chat samples them (the serving copy of the embedded model,
the app's `Generator`, temperature and top-p from the config), and reports per setting:

* ``loop_rate``: the answer hit ``max_new_tokens`` without ending its turn **and** repeats itself: some
  word 3-gram occurs 3 or more times, or more than a third of its word 3-grams are repeats;
* ``hit_limit_rate`` and ``repeat_rate`` separately, mean length in tokens, ``distinct_2`` (unique word
  bigrams / bigrams, higher = more varied);
* ``mean_logprob``: mean per-token log-probability of the answers under the plain model (no penalty,
  temperature 1), a fluency check: a penalty that pushes the model to odd words lowers it;
* sample answers for the first prompts, side by side, to read.

The AI judge is not used as a quality measure: on this model it flips with the answers' order (bench/judge.py).
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections import Counter

import torch

from common import SHARED_HH, read_preference_file, write_json
from rlhf_online.config import AppConfig
from rlhf_online.generation import Generator
from rlhf_online.models import load_base_model, load_tokenizer, resolve_model_source
from rlhf_online.ppo import COLD_START_PROMPTS
from rlhf_online.versions import BASE_VERSION

# (name, repetition_penalty, penalise the prompt too?)
ALL_SETTINGS = {"off (1.0)": (1.0, False), "1.05 answer": (1.05, False), "1.1 answer": (1.1, False),
                "1.2 answer": (1.2, False), "1.3 answer": (1.3, False), "1.2 prompt+answer": (1.2, True)}
DEFAULT_SETTINGS = "off (1.0),1.05 answer,1.1 answer,1.2 answer"
WORD = re.compile(r"\w+|[^\w\s]")


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def repeats(text: str) -> bool:
    """The same word 3-gram 3+ times, or over a third of all 3-grams repeats: 'the same n-gram over and over'."""
    grams = ngrams(WORD.findall(text.lower()), 3)
    if not grams:
        return False
    counts = Counter(grams)
    return max(counts.values()) >= 3 or 1 - len(counts) / len(grams) > 1 / 3


def distinct_2(text: str) -> float | None:
    grams = ngrams(WORD.findall(text.lower()), 2)
    return len(set(grams)) / len(grams) if grams else None


def load_prompts(count: int, seed: int) -> list[list[dict]]:
    prompts = []
    if SHARED_HH.exists():
        rows = read_preference_file(SHARED_HH)
        random.Random(seed).shuffle(rows)
        prompts = [row["prompt"][:1] for row in rows if row["prompt"][0]["role"] == "user"]
    prompts = [[{"role": "user", "content": text}] for text in COLD_START_PROMPTS] + prompts
    return prompts[:count]


@torch.no_grad()
def mean_logprob(generator: Generator, prompt_ids: list[int], answer: str) -> tuple[float, int]:
    """Sum and count of the answer's token log-probs under the plain model."""
    answer_ids = generator.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        return 0.0, 0
    ids = torch.tensor([prompt_ids + answer_ids], device=generator.model.device)
    with generator.exclusive() as model:
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(answer_ids).unsqueeze(1)).squeeze(1)
    return float(logprobs.sum()), len(answer_ids)


def run_setting(generator: Generator, prompts, penalty: float, on_prompt: bool, batch_size: int, seed: int):
    generator.sampling.repetition_penalty = 1.0 if on_prompt else penalty
    torch.manual_seed(seed)  # the same random stream for every setting
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = [generator.build_prompt(p) for p in prompts[start:start + batch_size]]
        ids = [p.input_ids for p in batch]
        lengths = []
        if on_prompt:  # transformers' own `repetition_penalty=`: the prompt's tokens are penalised too
            original = generator._generate_kwargs

            def with_prompt_penalty(*args, **kwargs):
                return {**original(*args, **kwargs), "repetition_penalty": penalty}
            generator._generate_kwargs = with_prompt_penalty
        try:
            texts = generator.sample(ids, [BASE_VERSION] * len(ids))
        finally:
            if on_prompt:
                generator._generate_kwargs = original
        for prompt, text in zip(batch, texts):
            n_tokens = len(generator.tokenizer(text, add_special_tokens=False)["input_ids"])
            lengths.append(n_tokens)
            rows.append({"prompt": prompt.messages[-1]["content"], "answer": text, "tokens": n_tokens})
    return rows


def summarise(generator, prompts, rows, max_new_tokens: int) -> dict:
    total_lp = total_n = 0
    for prompt, row in zip(prompts, rows):
        lp, n = mean_logprob(generator, generator.build_prompt(prompt).input_ids, row["answer"])
        total_lp, total_n = total_lp + lp, total_n + n
    # decoding and re-encoding may shift a token or two: within 2 of the limit counts as "ran to the limit"
    hit = [row["tokens"] >= max_new_tokens - 2 for row in rows]
    rep = [repeats(row["answer"]) for row in rows]
    d2 = [d for d in (distinct_2(row["answer"]) for row in rows) if d is not None]
    return {"n": len(rows), "loop_rate": sum(h and r for h, r in zip(hit, rep)) / len(rows),
            "hit_limit_rate": sum(hit) / len(rows), "repeat_rate": sum(rep) / len(rows),
            "mean_tokens": sum(row["tokens"] for row in rows) / len(rows),
            "distinct_2": sum(d2) / len(d2) if d2 else None,
            "mean_logprob": total_lp / total_n if total_n else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the app's")
    parser.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core box more threads oversubscribe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=4, help="prompts whose answers are kept for reading")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma separated, of: {', '.join(ALL_SETTINGS)}")
    parser.add_argument("--out", default="bench/results/sampling_loops.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = AppConfig()
    cfg.model.model, cfg.model.quantization = args.model, args.quantization
    sampling = cfg.sampling
    if args.max_new_tokens:
        sampling.max_new_tokens = args.max_new_tokens
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source)
    tokenizer.padding_side = "left"  # rows of different prompts in one batch
    generator = Generator(load_base_model(source, cfg.model.resolved_quantization(), for_training=False).model, tokenizer,
                          sampling)
    prompts = load_prompts(args.prompts, args.seed)
    started = time.perf_counter()
    results, samples = {}, {}
    for name in (n.strip() for n in args.settings.split(",")):
        penalty, on_prompt = ALL_SETTINGS[name]
        t0 = time.perf_counter()
        rows = run_setting(generator, prompts, penalty, on_prompt, args.batch_size, args.seed)
        generator.sampling.repetition_penalty = 1.0  # fluency is measured under the plain model
        results[name] = {**summarise(generator, prompts, rows, sampling.max_new_tokens),
                         "repetition_penalty": penalty, "penalise_prompt": on_prompt,
                         "seconds": time.perf_counter() - t0}
        samples[name] = rows[:args.samples]
        r = results[name]
        print(f"  {name}: loops {r['loop_rate']:.0%} ({r['seconds']:.0f} s)", flush=True)

    header = f"{'setting':<20} {'loop':>6} {'limit':>6} {'repeat':>7} {'tokens':>7} {'distinct2':>9} {'logprob':>8}"
    print(header)
    for name, r in results.items():
        print(f"{name:<20} {r['loop_rate']:>6.1%} {r['hit_limit_rate']:>6.1%} {r['repeat_rate']:>7.1%} "
              f"{r['mean_tokens']:>7.1f} {r['distinct_2']:>9.3f} {r['mean_logprob']:>8.3f}")
    for i in range(min(args.samples, len(prompts))):
        print(f"\n--- {prompts[i][-1]['content'][:100]!r}")
        for name in results:
            print(f"[{name}] {samples[name][i]['answer'][:300]!r}")
    write_json(args.out, {"settings": results, "samples": samples, "model": args.model,
                          "quantization": args.quantization, "temperature": sampling.temperature,
                          "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens,
                          "prompts": len(prompts), "threads": args.threads,
                          "wall_seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()

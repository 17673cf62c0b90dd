"""Frozen features of every answer in a preference file, computed once and cached, so that the reward-model
sweep (`bench/reward_sweep.py`) can compare head inputs, layers and learning rules in seconds instead of hours.

    python bench/reward_features.py --data ../shared/data/hh_harmless_dev.jsonl --out bench/cache/hh_features.pt

For each answer (chosen and rejected of every pair) it keeps, at several depths of the frozen base, the hidden
state of the last token and the mean over the answer's tokens, both through the model's final RMSNorm (so every
depth has the scale the last layer has). It also keeps each answer's token count.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import SHARED_HH, read_preference_file
from rlhf_online.config import AppConfig
from rlhf_online.models import load_base_model, load_tokenizer, resolve_model_source


def answer_rows(tokenizer, prompt: list[dict], answer: str, max_tokens: int) -> tuple[list[int], int]:
    """Token ids of the chat-templated conversation (its last `max_tokens`) and how many of them are the answer."""
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True)
    head = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    head = list(head["input_ids"] if hasattr(head, "keys") else head)
    answer_tokens = max(1, len(full) - len(head))
    kept = full[-max_tokens:]
    return kept, min(answer_tokens, len(kept))


@torch.no_grad()
def extract(trunk, tokenizer, rows: list[tuple[list[int], int]], layers: list[int], batch_size: int):
    features = {f"L{l}_{pool}": [] for l in layers for pool in ("last", "mean")}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids for ids, _ in chunk]}, padding=True, padding_side="left",
                              return_tensors="pt")
        out = trunk(**batch, output_hidden_states=True)
        width = batch["input_ids"].shape[1]
        answer_mask = torch.zeros(len(chunk), width)
        for i, (_, n) in enumerate(chunk):
            answer_mask[i, width - n:] = 1.0  # left padding: the answer is the last n tokens
        for l in layers:
            hidden = out.hidden_states[l]
            hidden = hidden if l == len(out.hidden_states) - 1 else trunk.norm(hidden)  # the last one is normed
            features[f"L{l}_last"].append(hidden[:, -1].float())
            pooled = (hidden * answer_mask[..., None]).sum(1) / answer_mask.sum(1, keepdim=True)
            features[f"L{l}_mean"].append(pooled.float())
        print(f"{start + len(chunk)}/{len(rows)} answers", flush=True)
    return {k: torch.cat(v) for k, v in features.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_HH))
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--max-tokens", type=int, default=AppConfig().reward.reward_max_tokens)
    parser.add_argument("--layers", default="6,10,14,18,22,26,30", help="depths (0 = embeddings)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/cache/hh_features.pt")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = AppConfig()
    cfg.model.model = args.model
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source)
    base = load_base_model(source, cfg.model.quantization, for_training=True).model  # as the trainer loads it
    pairs = read_preference_file(args.data)
    rows = [answer_rows(tokenizer, p["prompt"], answer, args.max_tokens)
            for p in pairs for answer in (p["chosen"], p["rejected"])]  # answer 2i chosen, 2i+1 rejected
    started = time.time()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths together: little padding
    sorted_features = extract(base.model, tokenizer, [rows[i] for i in order], [int(x) for x in args.layers.split(",")],
                              args.batch_size)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    features = {k: v[inverse] for k, v in sorted_features.items()}
    features["answer_tokens"] = torch.tensor([n for _, n in rows])
    features["answer_chars"] = torch.tensor([len(a) for p in pairs for a in (p["chosen"], p["rejected"])])
    torch.save({"features": features, "data": args.data, "model": args.model, "max_tokens": args.max_tokens,
                "quantization": cfg.model.quantization, "seconds": time.time() - started}, args.out)
    print(f"wrote {args.out} ({len(rows)} answers, {time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

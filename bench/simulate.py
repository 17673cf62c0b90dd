"""Simulated users drive the real system and we check that training helps by their own (hidden) taste.

    python bench/simulate.py --oracle bench/oracles.py:concise --prompts ../shared/data/hh_harmless_dev.jsonl \
        --votes 200 --minutes 20 --out bench/results/simulate_concise.json

The same services as the app (store, trainer process with reward model and PPO, publishing, hot-swap, paired
sampling through `Arena`) run in this process; a simulated person votes for the answer their oracle scores
higher (equal: tie). At the end, the newest version is compared with the base on held-out prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from common import SHARED_HH, peak_rss_mb, write_json
from rlhf_online.conversation import normalize_prompt
from rlhf_online.config import load_config
from rlhf_online.models import load_base_model, resolve_model_source
from rlhf_online.release_gate import (complies, degenerate_reasons, harm_growth_p_value, harmful_requests,
                                      relevance_pmi)
from rlhf_online.services import build_services
from rlhf_online.versions import BASE_VERSION


def trainer_time_split(ppo, rewards, started: float | None) -> dict:
    """Where the trainer's wall time went, from its first PPO iteration to its last (reward learning counted
    from then too): what is not PPO, the gate, publishing (the timeline's probes included) or reward learning is
    stepping aside for the chat, scoring voted pairs, AI labels and the store's writes. `started`: when voting
    began; None (`--eval-only`, which does not know) leaves out the shares measured from it."""
    if not ppo:
        return {}
    first_ppo_start = ppo[0].created_at - ppo[0].values["seconds"]
    split = {"ppo": sum(m.values["seconds"] for m in ppo),
             "ppo_rollouts": sum(m.values.get("rollout_seconds", 0.0) for m in ppo),
             "gate": sum(m.values.get("gate_seconds", 0.0) for m in ppo),
             "publish": sum(m.values.get("publish_seconds", 0.0) for m in ppo),
             "reward_learning": sum(m.values.get("seconds", 0.0) for m in rewards
                                    if first_ppo_start < m.created_at <= ppo[-1].created_at)}
    if started is not None:
        accounted = sum(v for k, v in split.items() if k != "ppo_rollouts") + first_ppo_start - started
        split.update(until_first_ppo=first_ppo_start - started, wall=ppo[-1].created_at - started)
        split["other"] = split["wall"] - accounted
    return {k: round(v, 1) for k, v in split.items()}


def load_oracle(spec: str):
    path, _, name = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("oracle_module", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def read_prompts(path: str, max_turns: int) -> list[list[dict]]:
    """Message lists; long multi-turn prompts are cut to their last `max_turns` user turns (2 cores)."""
    prompts = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            messages = normalize_prompt(json.loads(line)["prompt"])
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if users:
                prompts.append(messages[users[-max_turns] if len(users) >= max_turns else 0:])
    return prompts


def vote_for(oracle, messages, answer_a: str, answer_b: str) -> str:
    score_a, score_b = oracle(messages, answer_a), oracle(messages, answer_b)
    return "a" if score_a > score_b else "b" if score_b > score_a else "tie"


def answer_pairs(services, prompts, newest: str, draws: int = 1) -> tuple[list[list[str]], list[list[str]]]:
    """(newest answers, base answers): `draws` of each per prompt, a prompt's pairs batched together."""
    new, base = [], []
    for messages in prompts:
        prompt = services.generator.build_prompt(messages)
        texts = services.generator.sample([prompt.input_ids] * 2 * draws, [newest, BASE_VERSION] * draws)
        new.append(texts[0::2])
        base.append(texts[1::2])
    return new, base


@contextlib.contextmanager
def reference_model(services):
    """The reference model in PyTorch for PMI: the transformers engine's own model with its adapters off, or, when
    another engine serves (llama.cpp holds no PyTorch model), the base loaded here as the trainer loads it."""
    generator = services.generator
    if isinstance(getattr(generator, "model", None), torch.nn.Module):
        with generator.exclusive() as model:
            with model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext():
                yield model
        return
    source = resolve_model_source(services.cfg.model)
    yield load_base_model(source, services.cfg.model.resolved_quantization(), for_training=True).model


def relevance(services, prompts, answers) -> list[float]:
    """Each answer's reference PMI per answer token (release_gate.relevance_pmi) under the base model."""
    generator = services.generator
    tokenizer = generator.tokenizer
    prompt_ids = [generator.build_prompt(m).input_ids for m in prompts]
    # the answer ends with its end-of-turn token, as the chat template closes it (SmolLM2: EOS is <|im_end|>)
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    with reference_model(services) as model, torch.inference_mode():
        return [float(v) for v in relevance_pmi(model, prompt_ids, answer_ids, tokenizer.pad_token_id)]


def mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def standard_error(values) -> float:
    """Of the mean of `values` (one per held-out prompt): how far a figure can move by the draws alone."""
    values = list(values)
    if len(values) < 2:
        return 0.0
    centre = mean(values)
    return (sum((v - centre) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def relevance_figures(services, prompts, new: list[list[str]], base: list[list[str]]) -> dict:
    """Mean relevance of both versions, their ratio and its standard error over prompts (delta method on the
    paired per-prompt means). Why draws and an error: one version, v0012 of a 20-minute mentions_you run, read 76%
    of the base's relevance with one answer per prompt and 82.5% +- 3.2% with four, on the same 40 prompts."""
    draws, n = (len(new[0]) if new else 1), len(prompts)
    # draw-major order: each answer's "other prompts" (the next ones in the list) are other questions
    pmi = relevance(services, prompts * draws * 2,
                    [row[d] for answers in (new, base) for d in range(draws) for row in answers])
    per_new = [mean(pmi[d * n + i] for d in range(draws)) for i in range(n)]
    per_base = [mean(pmi[(draws + d) * n + i] for d in range(draws)) for i in range(n)]
    final, start = mean(per_new), mean(per_base)
    ratio = final / start if start else float("nan")
    ratio_se = standard_error([f - ratio * b for f, b in zip(per_new, per_base)]) / abs(start) if start else None
    return {"relevance_base": start, "relevance_final": final, "relevance_ratio": ratio,
            "relevance_ratio_se": ratio_se}


def harmful_answers(services, harmful, newest: str, draws: int) -> tuple[list[str], list[str]]:
    """(newest answers, base answers): `draws` of each per request, sampled together: compliance is a rate."""
    new, base = [], []
    for messages in harmful:
        ids = services.generator.build_prompt(messages).input_ids
        texts = services.generator.sample([ids] * 2 * draws, [newest, BASE_VERSION] * draws)
        new += texts[0::2]
        base += texts[1::2]
    return new, base


def head_to_head(services, oracle, prompts, harmful, harm_draws: int = 1, draws: int = 1) -> dict:
    """Newest version vs base on held-out prompts, `draws` answers of each per prompt (ties count half), and the
    quality figures of both, with the standard errors the draws leave."""
    services.live.stop()  # compare one fixed version: no swaps while measuring
    services.live.refresh()
    newest, _ = services.live.newest_pair()
    new, base = answer_pairs(services, prompts, newest, draws)
    harmful_new, harmful_base = harmful_answers(services, harmful, newest, harm_draws)
    harm_new, harm_base = sum(map(complies, harmful_new)), sum(map(complies, harmful_base))
    wins, scores_new, scores_base = [], [], []  # per prompt, mean over its draws
    for messages, row_new, row_base in zip(prompts, new, base):
        s_new = [oracle(messages, a) for a in row_new]
        s_base = [oracle(messages, a) for a in row_base]
        wins.append(mean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(s_new, s_base)))
        scores_new.append(mean(s_new))
        scores_base.append(mean(s_base))
    flat_new, flat_base = [a for row in new for a in row], [a for row in base for a in row]
    degenerate = [bool(degenerate_reasons(a)) for a in flat_new + harmful_new]
    degenerate_base = [bool(degenerate_reasons(a)) for a in flat_base + harmful_base]
    return {"newest": newest, "win_rate": mean(wins) if newest != BASE_VERSION else 0.5,
            "win_rate_se": standard_error(wins), "eval_draws": draws,
            "score_new": mean(scores_new), "score_base": mean(scores_base),
            **relevance_figures(services, prompts, new, base),
            "degenerate_rate_base": mean(degenerate_base),
            "degenerate_rate_final": mean(degenerate),
            "harmful_compliance_base": harm_base / max(1, len(harmful_base)),
            "harmful_compliance_final": harm_new / max(1, len(harmful_new)),
            "harmful_answers": len(harmful_new),
            "harmful_rise_p": harm_growth_p_value(harm_new, len(harmful_new), harm_base, len(harmful_base)),
            "mean_words_base": mean(len(a.split()) for a in flat_base),
            "mean_words_final": mean(len(a.split()) for a in flat_new),
            "samples": [{"prompt": m[-1]["content"], "base": b[0], "final": f[0]}
                        for m, b, f in zip(prompts[:3], base[:3], new[:3])],
            "harmful_samples": [{"prompt": m[-1]["content"], "base": b, "final": f, "base_complies": complies(b),
                                 "final_complies": complies(f)}
                                for m, b, f in zip(harmful[:3], harmful_base[::harm_draws], harmful_new[::harm_draws])]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oracle", default="bench/oracles.py:concise", help="FILE.py:FUNC(messages, answer)")
    parser.add_argument("--prompts", default=str(SHARED_HH), help="JSONL with a 'prompt' field")
    parser.add_argument("--votes", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=20.0, help="stop voting after this long")
    parser.add_argument("--think-seconds", type=float, default=1.0, help="simulated reading time per vote")
    parser.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts for the final comparison")
    parser.add_argument("--harmful-prompts", type=int, default=16,
                        help="harmful requests for the final compliance check (after the ones the gate uses)")
    parser.add_argument("--harm-draws", type=int, default=4, help="answers to each harmful request, per version")
    parser.add_argument("--eval-draws", type=int, default=4,
                        help="answers of each version to each held-out prompt in the final comparison (more: less "
                             "noise in the win rate and relevance, whose standard errors are reported)")
    parser.add_argument("--max-turns", type=int, default=1, help="user turns kept from each prompt")
    parser.add_argument("--workdir", default=None, help="data and adapters folder (default: a fresh temp dir)")
    parser.add_argument("--eval-only", action="store_true",
                        help="skip voting; only run the final comparison on an existing --workdir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="auto", help="the chat engine: auto, llamacpp, transformers, openai")
    parser.add_argument("--out", default="bench/results/simulate.json")
    parser.add_argument("app_args", nargs="*", help="extra app flags after --, e.g. -- --max-new-tokens 48")
    args = parser.parse_args(argv)

    oracle = load_oracle(args.oracle)
    prompts = read_prompts(args.prompts, args.max_turns)
    random.Random(args.seed).shuffle(prompts)
    held_out, chat_prompts = prompts[:args.eval_prompts], prompts[args.eval_prompts:]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rlhf-sim-"))
    cfg = load_config(["--data-dir", str(workdir / "data"), "--adapters-dir", str(workdir / "adapters"),
                       "--seed", str(args.seed), "--engine", args.engine, *args.app_args], environ={})
    torch.manual_seed(args.seed)
    services = build_services(cfg, start_trainer=not args.eval_only)
    started = time.time()
    failed, votes, latencies = 0, 0, []
    if args.eval_only:
        votes, args.votes, args.minutes = sum(services.store.counts()["votes"].values()), 0, 0
    try:
        while votes < args.votes and time.time() - started < args.minutes * 60:
            messages = chat_prompts[votes % len(chat_prompts)]
            conversation = services.arena.start_conversation(messages[:-1], "simulated")
            t0 = time.perf_counter()
            try:
                update = services.arena.chat_to_end(conversation.id, messages[-1]["content"], "simulated")
                latencies.append(time.perf_counter() - t0)
                choice = vote_for(oracle, messages, update.answer_a, update.answer_b)
                services.arena.vote(update.pair_token, choice, session_id="simulated")
                votes += 1
            except Exception as exc:  # counted, reported, never hidden
                failed += 1
                print(f"request failed: {type(exc).__name__}: {exc}", flush=True)
            if args.think_seconds:
                time.sleep(args.think_seconds)  # a person reads both answers before voting
            services.live.refresh()
            if votes % 10 == 0:
                newest, previous = services.live.newest_pair()
                print(f"{time.time() - started:7.0f}s votes={votes} serving={newest} vs {previous} "
                      f"pair_latency={latencies[-1] if latencies else 0:.1f}s", flush=True)
        voting_seconds = time.time() - started
        # Votes are in; the trainer keeps learning until the time budget, less what the final comparison needs.
        pair_seconds = sorted(latencies)[len(latencies) // 2] if latencies else 1.0
        deadline = started + args.minutes * 60 - pair_seconds * len(held_out)
        while time.time() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.time())))
            services.live.refresh()
        if services.supervisor is not None:
            services.supervisor.stop()
        harmful = harmful_requests(args.prompts, args.harmful_prompts, skip=cfg.gate.gate_harmful_prompts)
        final = head_to_head(services, oracle, held_out, harmful, args.harm_draws, args.eval_draws)
        newest = final["newest"]
        ppo = services.store.latest_metrics("ppo", limit=10_000)
        rewards = services.store.latest_metrics("reward", limit=10_000)
        reward = rewards[-1:]
        gate_metrics = services.store.latest_metrics("gate", limit=10_000)
        gates = [m.values for m in gate_metrics]
        quality = {k: final[k] for k in ("relevance_base", "relevance_final", "relevance_ratio",
                                         "relevance_ratio_se", "degenerate_rate_base",
                                         "degenerate_rate_final", "harmful_compliance_base",
                                         "harmful_compliance_final", "harmful_answers", "harmful_rise_p",
                                         "mean_words_base", "mean_words_final")}
        result = {
            "oracle": args.oracle,
            "engine": services.engine.name,
            "votes": votes,
            "versions_published": len(services.registry.versions()),
            "newest_version": newest,
            "oracle_win_rate_vs_base": final["win_rate"],
            "oracle_win_rate_se": final["win_rate_se"],
            "eval_draws": final["eval_draws"],
            "oracle_score_base": final["score_base"],
            "oracle_score_final": final["score_new"],
            "kl_to_base": ppo[-1].values["kl"] if ppo else 0.0,
            "kl_end_mean_last3": sum(m.values["kl"] for m in ppo[-3:]) / len(ppo[-3:]) if ppo else 0.0,
            "target_kl": cfg.ppo.target_kl,
            "kl_trajectory": [round(m.values["kl"], 3) for m in ppo],
            "kl_coef_trajectory": [round(m.values["kl_coef"], 4) for m in ppo],
            "kl_shrink_trajectory": [round(m.values.get("kl_shrink", 1.0), 3) for m in ppo],
            "length_trajectory": [round(m.values["mean_length"], 1) for m in ppo],  # rollout tokens per iteration
            "gate_trajectory": [{"iteration": m.step, "passed": m.values.get("passed"), "kl": m.values.get("kl"),
                                 "mean_length": m.values.get("mean_length"), "relevance": m.values.get("relevance")}
                                for m in gate_metrics],  # each candidate: the held-out answers the gate saw
            "relevance_trajectory": [None if m.values.get("relevance") is None else round(m.values["relevance"], 3)
                                     for m in ppo],  # the on-topic term's reading of each rollout (PPO's batch)
            **quality,
            "versions_rejected": sum(1 for g in gates if not g.get("passed")),
            "rejections": [{"kl": g.get("kl"), "relevance": g.get("relevance"), "reasons": g.get("reasons")}
                           for g in gates if not g.get("passed")],
            "gate_relevance_base": gates[-1]["base"]["relevance"] if gates and gates[-1].get("base") else None,
            "samples": final["samples"],
            "harmful_samples": final["harmful_samples"],
            "rm_prequential_accuracy": reward[-1].values["prequential_accuracy"] if reward else None,
            "rm_length": {k: reward[-1].values.get(k) for k in ("length_slope_votes", "length_slope_reward",
                                                                 "length_correction", "length_corr_raw",
                                                                 "length_corr_adjusted")} if reward else None,
            "ppo_iterations": len(ppo),
            "trainer_seconds": trainer_time_split(ppo, rewards, None if args.eval_only else started),
            "seconds_per_ppo_iteration": sum(m.values["seconds"] for m in ppo) / len(ppo) if ppo else None,
            "mean_reward_first_last": [ppo[0].values["mean_score"], ppo[-1].values["mean_score"]] if ppo else None,
            "mean_length_first_last": [ppo[0].values["mean_length"], ppo[-1].values["mean_length"]] if ppo else None,
            "swap_pause_ms_max": max((s.pause_ms for s in services.live.swaps), default=0.0),
            "swap_pauses_ms": [round(s.pause_ms, 1) for s in services.live.swaps],
            "swap_wait_ms_max": max((s.wait_ms for s in services.live.swaps), default=0.0),
            "swaps": len(services.live.swaps),
            "failed_requests": failed,
            "pair_latency_p50_s": sorted(latencies)[len(latencies) // 2] if latencies else None,
            "voting_seconds": voting_seconds,
            "wall_seconds": time.time() - started,
            "trainer_starts": services.supervisor.status.starts if services.supervisor else 0,
            "peak_rss_mb_server": peak_rss_mb(),
            "eval_prompts": len(held_out),
        }
    finally:
        services.close()
    print(json.dumps(result, indent=2))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

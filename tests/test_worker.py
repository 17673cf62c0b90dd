"""The background trainer on real folders: votes in, reward scores and adapter versions out, and a restart
(or a rollback) continues where the durable state says, never from scratch."""

import json
import logging
import re
import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from rlhf_online import models
from rlhf_online.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LAST_VERSION_FILE, META_FILE, AdapterRegistry
from rlhf_online.config import AppConfig, FeedbackConfig, GateConfig, ModelConfig, PPOConfig, RewardConfig
from rlhf_online.judge import ai_label_weight, load_constitution, set_feedback_mode
from rlhf_online.release_gate import built_in_prompts, harmful_requests, is_held_out
from rlhf_online.store import AI_PLACEMENT, PreferenceStore, store_path
from rlhf_online.timeline import load_entries
from rlhf_online.versions import BASE_VERSION
from rlhf_online.worker import (ACTIVITY_KEY, PAUSED_KEY, REWARD_CHECKPOINT, VALUE_HEAD_FILE, ChatYield, TrainerWorker,
                                TrainingStopped)

VOTES = [("hello how are you today?", "I am fine, thank you. banana", "Paris."),
         ("Why is the sky blue?", "Rayleigh scattering, banana.", "It is four."),
         ("What is two plus two?", "It is four. banana", "hello")]


# One torch thread, as the trainer runs (see conftest); library deprecation warnings are noise here.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]


def make_config(root, tiny_model_dir) -> AppConfig:
    return AppConfig(
        data_dir=str(root / "data"), adapters_dir=str(root / "adapters"), seed=0,
        model=ModelConfig(model=str(tiny_model_dir), lora_r=8, lora_alpha=16),
        reward=RewardConfig(reward_max_tokens=48),  # the default: heads on frozen features
        ppo=PPOConfig(ppo_batch_size=2, ppo_minibatch_size=2, ppo_max_new_tokens=6, ppo_epochs=1,
                      publish_every=1, min_preferences=2, votes_per_step=8),
        gate=GateConfig(gate=False))  # publishing itself is under test here; the gate has its own tests below


def seed_votes(cfg: AppConfig, votes=VOTES, choice: str = "a") -> list[int]:
    """Pairs as the chat stores them, each with a vote; returns the pair ids."""
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    with PreferenceStore(store_path(cfg.data_path)) as store:
        ids = []
        for i, (prompt, a, b) in enumerate(votes):
            pair_id = store.record_pair(conversation_id=f"c{i}", turn=0,
                                        messages=[{"role": "user", "content": prompt}], answer_a=a,
                                        answer_b=b, version_a=BASE_VERSION, version_b=BASE_VERSION,
                                        sampling={"temperature": 0.8}, session_id="s", placement="ab")
            store.record_vote(pair_id=pair_id, choice=choice, session_id="s")
            ids.append(pair_id)
    return ids


@pytest.fixture
def cfg(tmp_path, tiny_model_dir) -> AppConfig:
    cfg = make_config(tmp_path, tiny_model_dir)
    seed_votes(cfg)
    return cfg


def published_policy(folder) -> dict[str, torch.Tensor]:
    """A version's saved LoRA tensors under the trainer's live parameter names."""
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    return {re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{models.POLICY_ADAPTER}.weight", key): tensor
            for key, tensor in saved.items()}


def policy_state(worker) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in models.lora_parameters(worker.peft, models.POLICY_ADAPTER).items()}


def test_step_learns_votes_then_runs_ppo_and_publishes(cfg, tiny_model_dir):
    worker = TrainerWorker(cfg)
    assert worker.parent == BASE_VERSION
    assert worker.step() == "reward"
    metrics = worker.store.latest_metrics("reward")
    assert [m.step for m in metrics] == [1, 2, 3]
    assert {"pairs", "prequential_accuracy", "loss", "correct_before"} <= set(metrics[-1].values)
    assert worker.learner.last_preference_id == 3
    for pair_id in (1, 2, 3):  # the UI can now show each voted answer's reward
        pair = worker.store.get_pair(pair_id)
        assert pair.reward_a is not None and pair.reward_b is not None
        assert pair.reward_model_version == "3"
    assert not worker.registry.versions()

    assert worker.step() == "ppo"
    versions = worker.registry.versions()
    assert [v.name for v in versions] == ["v0001"]
    folder = versions[0].path
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_FILE, VALUE_HEAD_FILE} <= {p.name for p in folder.iterdir()}
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["version"] == "v0001" and meta["parent"] == BASE_VERSION
    assert meta["ppo_iteration"] == 1 and meta["votes_seen"] == 3
    assert all(isinstance(meta[k], float) for k in ("mean_reward", "kl"))
    assert worker.parent == "v0001"
    ppo_metrics = worker.store.latest_metrics("ppo")
    assert len(ppo_metrics) == 1 and ppo_metrics[0].values["published"] == "v0001"
    assert ppo_metrics[0].values["publish_seconds"] > 0  # where the cycle's time went, beside the iteration's
    assert not [p for p in cfg.adapters_path.iterdir() if ".tmp" in p.name]
    # publishing answered the timeline's probes (the base's too), and the page can tell what the trainer did last
    assert [e.version for e in load_entries(worker.store)] == ["v0001", BASE_VERSION]
    assert "timeline" in json.loads(worker.store.get_control(ACTIVITY_KEY))["doing"]

    # A plain PEFT load of the folder on a fresh base gives exactly the trainer's policy adapter.
    fresh = models.load_base_model(str(tiny_model_dir), "nf4", for_training=True).model
    served = PeftModel.from_pretrained(fresh, str(folder))
    loaded = {n.replace(".default.", f".{models.POLICY_ADAPTER}."): p
              for n, p in models.lora_parameters(served, "default").items()}
    trained = policy_state(worker)
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[n].detach(), trained[n]) for n in trained)
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # PPO really trained it
    batch = worker.tokenizer(["hello how are you today?"], return_tensors="pt")
    served.train()
    worker.peft.set_adapter(models.POLICY_ADAPTER)
    worker.peft.train()
    with torch.no_grad():
        torch.testing.assert_close(served(**batch).logits, worker.peft(**batch).logits, rtol=0, atol=1e-5)


def test_new_worker_resumes_policy_and_reward_model(cfg):
    worker = TrainerWorker(cfg)
    assert worker.step() == "reward"
    assert worker.step() == "ppo"
    worker.save_reward()
    published = worker.registry.latest()
    conversation = [([{"role": "user", "content": "hello"}], "banana, I am fine")]
    score = worker.reward_model.score(conversation)

    resumed = TrainerWorker(cfg)
    assert resumed.parent == published.name == "v0001"
    saved = published_policy(published.path)
    state = policy_state(resumed)
    assert set(saved) == set(state)
    assert all(torch.equal(state[n], saved[n]) for n in state)
    assert all(torch.equal(state[n], t) for n, t in policy_state(worker).items())
    assert torch.equal(resumed.policy.value_head.weight, worker.policy.value_head.weight)
    assert resumed.ppo.iterations == 1
    # The reward model continues: same scores, same cursor (no vote re-learned), replay rebuilt from the store.
    assert resumed.reward_model.score(conversation) == score
    assert resumed.learner.last_preference_id == 3 and resumed.learner.metrics.total == 3
    assert [p.id for p in resumed.learner.replay] == [1, 2, 3]
    assert resumed.step() == "ppo"  # not "reward": nothing new to learn
    assert resumed.registry.latest().meta["parent"] == "v0001"
    assert resumed.registry.latest().meta["ppo_iteration"] == 2


def test_corrupt_reward_checkpoint_falls_back_to_the_previous_one(cfg, caplog):
    worker = TrainerWorker(cfg)
    assert worker.step() == "reward"
    worker.save_reward()  # checkpoint A: 3 pairs
    previous_state = worker.reward_model.state()
    seed_votes(cfg, [("What is the capital of France?", "Paris, banana.", "hello")])
    assert worker.learn_from_votes() == 1
    worker.save_reward()  # checkpoint B: 4 pairs; A becomes the .prev file
    current = cfg.data_path / REWARD_CHECKPOINT
    assert current.with_suffix(".prev.safetensors").exists()
    current.write_bytes(current.read_bytes()[:100])  # a torn write

    with caplog.at_level(logging.ERROR, logger="rlhf_online.worker"):
        resumed = TrainerWorker(cfg)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "corrupt reward checkpoint" in errors[0].getMessage()
    assert resumed.learner.metrics.total == 3 and resumed.learner.last_preference_id == 3
    state = resumed.reward_model.state()
    assert all(torch.equal(state[k], previous_state[k]) for k in previous_state)
    assert resumed.step() == "reward"  # the pair the lost checkpoint had learned is learned again
    assert resumed.learner.metrics.total == 4


def test_pause_makes_step_do_nothing(cfg):
    worker = TrainerWorker(cfg)
    worker.store.set_control(PAUSED_KEY, "1")
    before = worker.reward_model.state()
    for _ in range(2):
        assert worker.step() == "paused"
    assert worker.store.latest_metrics("reward") == [] and worker.store.latest_metrics("ppo") == []
    assert worker.learner.metrics.total == 0
    assert worker.store.get_pair(1).reward_a is None
    assert all(torch.equal(v, before[k]) for k, v in worker.reward_model.state().items())
    assert not worker.registry.versions()
    worker.store.set_control(PAUSED_KEY, "0")
    assert worker.step() == "reward"


def test_follow_rollback_resets_the_parent(cfg):
    worker = TrainerWorker(cfg)
    assert worker.step() == "reward"
    assert worker.step() == "ppo" and worker.step() == "ppo"
    assert worker.parent == "v0002"
    registry = AdapterRegistry(cfg.adapters_path)  # what the admin panel does, from another object
    v1 = registry.versions()[0]

    assert registry.retire_after("v0001") == ["v0002"]
    worker.follow_rollback()
    assert worker.parent == "v0001"
    saved = published_policy(v1.path)
    state = policy_state(worker)
    assert set(saved) == set(state)
    assert all(torch.equal(state[n], saved[n]) for n in state)
    v2 = published_policy(cfg.adapters_path / "v0002")
    assert any(not torch.equal(state[n], v2[n]) for n in state)  # it really went back

    registry.retire_after(BASE_VERSION)
    assert worker.step() == "ppo"  # step() follows the rollback first, then trains from the base
    latest = worker.registry.latest()
    assert latest.name == "v0003"  # numbers are never reused
    assert latest.meta["parent"] == BASE_VERSION


def test_rollback_to_base_makes_the_policy_the_base(cfg):
    worker = TrainerWorker(cfg)
    assert worker.step() == "reward" and worker.step() == "ppo"
    worker.registry.retire_after(BASE_VERSION)
    worker.follow_rollback()
    assert worker.parent == BASE_VERSION
    batch = worker.tokenizer(["hello how are you today?"], return_tensors="pt")
    worker.peft.set_adapter(models.POLICY_ADAPTER)
    worker.peft.train()
    with torch.no_grad():
        policy = worker.peft(**batch).logits
        with worker.peft.disable_adapter():
            base = worker.peft(**batch).logits
    torch.testing.assert_close(policy, base, rtol=0, atol=1e-6)


def test_chat_yield_holds_training_to_its_share_of_the_time_while_people_chat():
    busy = SimpleNamespace(value=2)  # chat generations in flight, and they keep coming
    step = ChatYield(busy, busy_share=0.25)
    time.sleep(0.2)  # 0.2 s of training work since the last step
    began = time.monotonic()
    step()
    assert 0.5 <= time.monotonic() - began < 1.0  # 0.6 s: a quarter of the time, not starved

    time.sleep(0.4)  # 0.4 s of work: it would wait 1.2 s, but the chat goes idle after 0.1 s
    threading.Timer(0.1, lambda: setattr(busy, "value", 0)).start()
    began = time.monotonic()
    step()
    assert 0.05 <= time.monotonic() - began < 0.6
    began = time.monotonic()
    step()  # nobody chatting: no wait at all
    ChatYield(None)()
    assert time.monotonic() - began < 0.05


def test_a_stop_request_ends_a_long_wait_for_the_chat():
    busy, stop = SimpleNamespace(value=1), threading.Event()
    step = ChatYield(busy, busy_share=0.01, stop_event=stop)  # would wait ~99x the work
    time.sleep(0.1)
    threading.Timer(0.2, stop.set).start()
    began = time.monotonic()
    with pytest.raises(TrainingStopped):
        step()
    assert time.monotonic() - began < 1.0
    with pytest.raises(ValueError, match="busy-share"):
        ChatYield(busy, busy_share=0)

def human_votes(cfg: AppConfig, newer: str, older: str, wins: int, losses: int) -> None:
    """Votes people cast on pairs of `newer` (left) against `older` (right)."""
    with PreferenceStore(store_path(cfg.data_path)) as store:
        for i in range(wins + losses):
            pair_id = store.record_pair(conversation_id=f"h{i}", turn=0, messages=[{"role": "user", "content": "hi"}],
                                        answer_a=f"new {i}", answer_b=f"old {i}", version_a=newer, version_b=older,
                                        sampling={}, session_id="s", placement="newest_left")
            store.record_vote(pair_id=pair_id, choice="a" if i < wins else "b", session_id="s")


def test_auto_rollback_retires_a_version_people_clearly_reject(cfg):
    cfg.ppo.auto_rollback = True
    worker = TrainerWorker(cfg)
    assert worker.step() == "reward" and worker.step() == "ppo" and worker.step() == "ppo"
    assert worker.parent == "v0002"
    human_votes(cfg, "v0002", "v0001", wins=6, losses=14)  # 30% over 20 votes: a clear loss
    assert worker.auto_rollback() == "v0001"
    assert [v.name for v in worker.registry.versions()] == ["v0001"]
    assert worker.store.latest_metrics("rollback")[-1].values["retired"] == "v0002"


def test_auto_rollback_past_v9999_retires_v10000_not_its_predecessor(cfg):
    cfg.ppo.auto_rollback = True
    cfg.adapters_path.mkdir(parents=True, exist_ok=True)
    (cfg.adapters_path / LAST_VERSION_FILE).write_text("v9998\n")  # as if 9998 versions came before
    worker = TrainerWorker(cfg)
    assert worker.step() == "reward" and worker.step() == "ppo" and worker.step() == "ppo"
    assert worker.parent == "v10000"
    human_votes(cfg, "v10000", "v9999", wins=6, losses=14)  # people clearly prefer v9999
    assert worker.auto_rollback() == "v9999"
    assert [v.name for v in worker.registry.versions()] == ["v9999"]
    assert worker.store.latest_metrics("rollback")[-1].values["retired"] == "v10000"


def test_auto_rollback_waits_for_enough_votes_and_a_clear_margin(cfg):
    cfg.ppo.auto_rollback = True
    worker = TrainerWorker(cfg)
    assert worker.step() == "reward" and worker.step() == "ppo" and worker.step() == "ppo"
    human_votes(cfg, "v0002", "v0001", wins=2, losses=8)  # bad, but only 10 votes
    assert worker.auto_rollback() is None
    human_votes(cfg, "v0002", "v0001", wins=8, losses=2)  # now 10 of 20: no clear loss
    assert worker.auto_rollback() is None and worker.parent == "v0002"


def ai_config(root, tiny_model_dir, mode: str) -> AppConfig:
    cfg = make_config(root, tiny_model_dir)
    # margin 0: the random tiny judge never abstains, so every judged pair becomes a label
    cfg.feedback = FeedbackConfig(feedback_mode=mode, judge_margin=0.0, ai_labels_per_step=2)
    return cfg


def test_ai_mode_trains_from_its_own_pairs_without_any_human_vote(tmp_path, tiny_model_dir):
    cfg = ai_config(tmp_path, tiny_model_dir, "ai")
    worker = TrainerWorker(cfg)
    # seeded: unseeded, the random tiny model now and then samples two equal (or empty) answers, which are no
    # pair to judge, and the step labels one pair instead of two
    torch.manual_seed(0)
    assert worker.step() == "ai_label"  # nothing to learn yet: the judge labels two fresh policy samples
    version = load_constitution(cfg.feedback, cfg.data_path).version
    votes = worker.store._read("SELECT v.*, p.placement, p.version_a FROM votes v JOIN pairs p ON p.id = v.pair_id")
    assert len(votes) == 2
    for vote in votes:
        assert (vote["source"], vote["weight"], vote["placement"], vote["version_a"]) == (
            "ai", 1.0, AI_PLACEMENT, BASE_VERSION)
        assert vote["judge"] == f"base:{tiny_model_dir}/{cfg.feedback.judge_method}@{version}"
        assert vote["choice"] in ("a", "b")
    assert worker.store.counts()["pairs_shown"] == 0  # nobody was shown these pairs

    assert worker.step() == "reward"
    assert [(p.source, p.weight) for p in worker.learner.replay] == [("ai", 1.0), ("ai", 1.0)]
    assert worker.learner.metrics.total == 2
    assert worker.step() == "ppo"  # enough (AI) preferences: the loop runs with no person involved
    assert worker.step() == "ai_label"
    assert worker.store.latest_metrics("ai_feedback")[-1].values["labelled"] == 2


def test_mixed_mode_switched_at_run_time_labels_shown_pairs_with_the_measured_weight(cfg):
    cfg.feedback = FeedbackConfig(judge_margin=0.0, ai_labels_per_step=2)  # configured human-only
    worker = TrainerWorker(cfg)
    assert worker.step() == "reward" and worker.step() == "ppo"
    assert worker.label_with_ai() == 0  # human mode (the default): the judge stays idle
    unvoted = worker.store.record_pair(conversation_id="c9", turn=0, messages=[{"role": "user", "content": "hi"}],
                                       answer_a="hello banana", answer_b="Paris.", version_a=BASE_VERSION,
                                       version_b="v0001", sampling={}, session_id="s", placement="newest_left")
    set_feedback_mode(worker.store, "mixed")  # what the admin panel does

    assert worker.step() == "ai_label"  # the two newest shown pairs: the unvoted one and a human-voted one
    labels = {row["pair_id"]: row for row in worker.store._read("SELECT * FROM votes WHERE source = 'ai'")}
    weight = ai_label_weight(cfg.feedback.judge_method)  # no agreement measured yet: the bench's accuracy decides
    assert set(labels) == {unvoted, 3} and {row["weight"] for row in labels.values()} == {weight} and weight < 1
    ai_prefs = [p for p in worker.store.preferences_since() if p.source == "ai"]
    assert len(ai_prefs) == 1 and ai_prefs[0].weight == weight  # the human-voted pair trains on the human vote only
    assert worker.store.feedback_counts()["agreement"]["pairs"] == 1

    assert worker.step() == "reward"
    assert (worker.learner.replay[-1].source, worker.learner.replay[-1].weight) == ("ai", weight)
    set_feedback_mode(worker.store, "human")
    assert worker.label_with_ai() == 0
    assert len(worker.store._read("SELECT * FROM votes WHERE source = 'ai'")) == 2


def test_training_settings_from_the_admin_reach_the_running_trainer(cfg):
    from rlhf_online.worker import TRAINING_SETTINGS_KEY

    worker = TrainerWorker(cfg)
    worker.store.set_control(TRAINING_SETTINGS_KEY, json.dumps({"ppo_lr": 5e-5, "init_kl_coef": 0.3,
                                                                "length_penalty": 0.02}))
    worker.step()
    assert all(group["lr"] == 5e-5 for group in worker.ppo.optimizer.param_groups)
    assert worker.ppo.kl_ctl.kl_coef == 0.3 and worker.cfg.ppo.length_penalty == 0.02


# ---- issue 11: the release gate in the trainer -------------------------------------------------------------------

@pytest.fixture
def gated(cfg) -> AppConfig:
    cfg.gate = GateConfig(gate_prompts=4, gate_harmful_prompts=3)
    return cfg


def test_the_gate_measures_identical_weights_identically_and_passes_them(gated):
    worker = TrainerWorker(gated)
    decision = worker.gate_candidate()  # the policy adapter is still the identity: the candidate is the base
    base = worker.gate_reports[(BASE_VERSION, decision.report.prompt_set)]
    assert decision.passed, decision.reasons
    for key in ("relevance", "mean_length", "degenerate_rate", "harmful_compliant", "samples"):
        assert getattr(decision.report, key) == getattr(base, key)  # same seed, same weights: same answers
    assert abs(decision.report.kl) < 1e-4
    assert decision.report.harmful_total == 3 * gated.gate.gate_harm_draws  # each request answered 4 times
    assert len(worker.gate_prompts) == 4


def test_the_gate_moves_from_built_in_prompts_to_peoples_once_they_can_replace_them_all(gated):
    """A cold start fills the gate's set with built-in questions; it must not judge a whole session on them."""
    worker = TrainerWorker(gated)
    assert built_in_prompts(worker._pick_gate_prompts()) == 4  # nobody has chatted yet
    held_out = [m for m in ([{"role": "user", "content": f"question {i}"}] for i in range(200)) if is_held_out(m)]

    def people_ask(messages):
        worker.store.record_pair(conversation_id=messages[0]["content"], turn=0, messages=messages, answer_a="a",
                                 answer_b="b", version_a="v0001", version_b=BASE_VERSION, sampling={},
                                 session_id="s", placement="newest_left")

    for messages in held_out[:3]:
        people_ask(messages)
    worker.gate_runs = 1
    assert built_in_prompts(worker._pick_gate_prompts()) == 4  # three would still leave one built-in: kept
    people_ask(held_out[3])
    assert worker._pick_gate_prompts() == list(reversed(held_out[:4]))  # newest first, none built in


def test_a_new_gate_prompt_set_does_not_answer_the_harmful_requests_again_for_known_versions(gated):
    """Re-picking the held-out prompts re-measures the base and the parent on them; their answers to the (same)
    harmful requests are known already (the base's) or not needed (the parent is only a length reference)."""
    worker = TrainerWorker(gated)
    harmful = harmful_requests(gated.gate.harmful_prompts_file, gated.gate.gate_harmful_prompts)
    asked = []
    sample = worker.gate_evaluator._sample
    worker.gate_evaluator._sample = lambda prompts, *args, **kw: asked.append(prompts) or sample(prompts, *args, **kw)
    first = worker.gate_candidate()
    stats = worker.ppo.iteration(worker.ppo.sample_prompts([[{"role": "user", "content": "Say something."}]] * 4))
    worker.publish(stats, first.report)
    for i in range(200):  # people's held-out prompts replace the built-in ones at the next gate
        messages = [{"role": "user", "content": f"question {i}"}]
        if is_held_out(messages):
            worker.store.record_pair(conversation_id=str(i), turn=0, messages=messages, answer_a="a", answer_b="b",
                                     version_a="v0001", version_b=BASE_VERSION, sampling={}, session_id="s",
                                     placement="newest_left")
    asked.clear()
    second = worker.gate_candidate()
    assert second.report.prompt_set != first.report.prompt_set
    harmful_asked = [prompts for prompts in asked if prompts[0] in harmful]
    assert len(harmful_asked) == (1 if second.report.harm_checked else 0)  # the candidate's own, if any
    base_before = worker.gate_reports[(BASE_VERSION, first.report.prompt_set)]
    base_after = worker.gate_reports[(BASE_VERSION, second.report.prompt_set)]
    assert (base_after.harmful_compliant, base_after.harmful_total) == \
        (base_before.harmful_compliant, base_before.harmful_total) and base_after.harmful_total > 0
    parent = worker.gate_reports[(worker.parent, second.report.prompt_set)]
    assert not parent.harm_checked and parent.mean_length > 0


def test_the_gate_skips_a_harm_check_no_count_could_fail(gated):
    """With a tolerance above the answers there are, no candidate could be rejected for harm: its harmful answers
    are not sampled, and the report says so; the base's are (they decide whether the check can fail)."""
    gated.gate.gate_harm_alpha, gated.gate.gate_harm_tolerance = 1.0, 100
    worker = TrainerWorker(gated)
    decision = worker.gate_candidate()
    base = worker.gate_reports[(BASE_VERSION, decision.report.prompt_set)]
    assert base.harm_checked and base.harmful_total == 3 * gated.gate.gate_harm_draws
    assert not decision.report.harm_checked and decision.report.harmful_total == 0 and decision.passed


def test_a_gate_with_shorter_answers_than_the_rollouts_scales_its_kl_budget(gated):
    gated.gate.gate_max_new_tokens = 3  # the rollouts have 6
    worker = TrainerWorker(gated)
    assert worker.gate_tokens == 3 and worker.gate_target_kl() == pytest.approx(gated.ppo.target_kl / 2)
    decision = worker.gate_candidate()
    report = decision.report
    assert 0 < report.mean_length <= 3 and 0 <= report.cut_share <= 1
    whole = report.mean_length + report.cut_share * 3  # cut answers taken to run on to the rollouts' 6 tokens
    assert decision.kl_budget == pytest.approx(gated.gate.gate_kl_budget * gated.ppo.target_kl
                                               * min(1.0, report.mean_length / whole))
    worker._record_gate(0, decision, None)
    gate = worker.store.latest_metrics("gate")[-1].values
    assert gate["kl_budget"] == pytest.approx(decision.kl_budget)
    assert gate["gate_tokens"] == 3


def test_a_degenerate_candidate_is_rejected_logged_and_training_continues_from_the_last_good_version(gated):
    worker = TrainerWorker(gated)
    assert worker.step() == "reward"
    worker.gate_candidate()  # measure the base (and the parent, the base) while the model is still sane
    eos = worker.tokenizer.convert_tokens_to_ids("<|im_end|>")
    lm_head = worker.peft.get_base_model().lm_head

    def end_at_once(module, args, output):  # the candidate now answers nothing at all
        output = output.clone()
        output[..., eos] += 50.0
        return output

    handle = lm_head.register_forward_hook(end_at_once)
    try:
        assert worker.step() == "ppo"  # publish_every=1: this iteration's candidate goes through the gate
    finally:
        handle.remove()
    assert worker.registry.versions() == []  # nothing was published
    gate = worker.store.latest_metrics("gate")[-1].values
    assert gate["passed"] is False and gate["version"] is None
    assert any("length collapse" in r for r in gate["reasons"]) and any("degenerate" in r for r in gate["reasons"])
    ppo = worker.store.latest_metrics("ppo")[-1].values
    assert ppo["rejected"] is True and ppo["gate_seconds"] > 0 and ppo["publish_seconds"] == 0
    # the trainer went back to the last good version (the base: an identity adapter) with fresh optimizer moments
    assert all(float(p.abs().max()) == 0.0 for n, p in policy_state(worker).items() if "lora_B" in n)
    assert not worker.ppo.optimizer.state
    assert worker.parent == BASE_VERSION

    from rlhf_online import dashboard
    text = dashboard.gate_markdown(worker.store.latest_metrics("gate"))
    assert "1 rejected" in text and "length collapse" in text  # what the panel shows


def test_an_imported_file_is_learned_before_ppo_starts(tmp_path, tiny_model_dir):
    """Warm start: 20 imported pairs (more than two batches of eight) all reach the reward model before the
    first PPO iteration; votes alone would have let PPO start after `min_preferences` = 2."""
    cfg = make_config(tmp_path, tiny_model_dir)
    seed_votes(cfg)
    rng = random.Random(0)
    records = [{"prompt": [{"role": "user", "content": rng.choice(["hello", "Why is the sky blue?"])}],
                "chosen": f"banana {i}", "rejected": f"Paris {i}"} for i in range(20)]
    with PreferenceStore(store_path(cfg.data_path)) as store:
        assert store.import_preferences(records).imported == 20
    worker = TrainerWorker(cfg)
    steps = [worker.step() for _ in range(4)]
    assert steps == ["reward", "reward", "reward", "ppo"], steps  # 3 votes + 20 imports = 23 pairs in 3 batches
    assert worker.learner.metrics.total == 23

"""The whole loop on the real embedded model: votes -> reward model -> PPO -> published version -> live chat.

Small sizes (2 answers of 8 tokens per PPO iteration) keep it near a minute on 2 cores; what is under test is
that the real parts connect, not that the policy gets better (bench/simulate.py measures that).
"""

import pytest
import torch
from peft import PeftModel

from rlhf_online.config import load_config
from rlhf_online.models import load_base_model
from rlhf_online.services import build_services
from rlhf_online.timeline import load_entries
from rlhf_online.versions import BASE_VERSION
from rlhf_online.worker import TrainerWorker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return load_config(["--data-dir", str(root / "data"), "--adapters-dir", str(root / "adapters"),
                        "--max-new-tokens", "8", "--ppo-max-new-tokens", "8", "--ppo-batch-size", "2",
                        "--ppo-minibatch-size", "2", "--ppo-epochs", "1", "--min-preferences", "2",
                        "--publish-every", "1", "--reward-max-tokens", "96", "--probe-prompts",
                        "Why is the sky blue?|What is the capital of Australia?", "--probe-max-new-tokens", "12"],
                       environ={})


def test_votes_train_publish_and_hot_swap(cfg):
    torch.set_num_threads(1)
    services = build_services(cfg, start_trainer=False)
    try:
        for message, choice in (("Say hello.", "a"), ("Name a colour.", "b"), ("Count to three.", "a")):
            update = services.arena.chat_to_end(None, message, "test")
            assert update.pair_id is not None and update.answer_a and update.answer_b
            services.arena.vote(update.pair_token, choice, session_id="test")

        worker = TrainerWorker(cfg)
        assert worker.step() == "reward"
        reward_metrics = services.store.latest_metrics("reward")
        assert [m.step for m in reward_metrics] == [1, 2, 3]
        assert all(p.reward_a is not None for p in [services.store.get_pair(1)])
        assert worker.step() == "ppo"
        ppo = services.store.latest_metrics("ppo")
        assert ppo and ppo[-1].values["published"] == "v0001"
        assert all(torch.isfinite(torch.tensor(float(v))) for k, v in ppo[-1].values.items()
                   if isinstance(v, float))

        assert services.engine.name == "llamacpp"  # the CPU default for the embedded GGUF
        assert (cfg.adapters_path / "v0001" / "adapter_model.gguf").is_file()  # written at publish time
        # publishing answered the timeline's probes with the base and with v0001, scored by the reward model
        entries = load_entries(services.store)
        assert [e.version for e in entries] == ["v0001", BASE_VERSION]
        for entry in entries:
            assert entry.prompts == ["Why is the sky blue?", "What is the capital of Australia?"]
            assert all(entry.answers) and all(0 < n <= 12 for n in entry.tokens)
            assert all(isinstance(score, float) for score in entry.scores)
        assert entries[0].votes_seen == 3

        services.live.refresh()  # (the watcher thread may have hot-loaded it already while the probes ran)
        assert [swap.version for swap in services.live.swaps] == ["v0001"]
        assert services.live.newest_pair() == ("v0001", BASE_VERSION)
        update = services.arena.chat_to_end(None, "What is 2+2?", "test")
        pair = services.store.get_pair(update.pair_id)
        assert {pair.version_a, pair.version_b} == {"v0001", BASE_VERSION}

        # The published folder is a plain PEFT adapter on the same base.
        base = load_base_model(worker.tokenizer.name_or_path, "nf4", for_training=True).model
        loaded = PeftModel.from_pretrained(base, str(cfg.adapters_path / "v0001"))
        assert any("lora_A" in n for n, _ in loaded.named_parameters())
    finally:
        services.close()

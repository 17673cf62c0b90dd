"""The llama.cpp engine on the real embedded GGUF: pairs from two versions, hot-swap, failed builds, concurrency.

Greedy sampling makes "each answer comes from its own version" checkable: a row of a pair must equal that
version's answer sampled alone. Published versions are random LoRA adapters, published as the trainer does.
"""

import dataclasses
import logging
import threading
import time

import pytest
import torch

from rlhf_online import models
from rlhf_online.adapters import AdapterRegistry, save_peft_adapter
from rlhf_online.config import ModelConfig, SamplingConfig
from rlhf_online.served_versions import ServedVersions
from rlhf_online.versions import BASE_VERSION

pytest.importorskip("xllamacpp")

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)
QUESTION = [{"role": "user", "content": "What is basil?"}]


@pytest.fixture(scope="module")
def trainer(embedded_source):
    """A policy adapter on the fp32 base, only to publish versions from."""
    base = models.load_base_model(embedded_source, "fp32").model
    torch.manual_seed(0)  # lora_A's initialisation: the same adapters every run (unseeded, 1 run in ~10 made a
    return models.attach_lora(base, ModelConfig())  # version whose greedy answer happened to equal the base's)


def publish(registry: AdapterRegistry, trainer, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in models.lora_parameters(trainer, models.POLICY_ADAPTER).items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return registry.publish(lambda folder: save_peft_adapter(trainer, models.POLICY_ADAPTER, folder), {})


@pytest.fixture
def engine(embedded_source):
    from rlhf_online.llamacpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(models.embedded_gguf_path(), models.load_tokenizer(embedded_source), GREEDY, slots=4,
                            ctx_per_slot=512, threads=2, lanes=2)  # the chat's default on 2 cores
    yield engine
    engine.close()


@pytest.fixture
def served(engine, tmp_path):
    return ServedVersions(engine, AdapterRegistry(tmp_path / "adapters"), keep=2)


def test_each_answer_of_a_pair_comes_from_its_own_version(engine, served, trainer):
    publish(served.registry, trainer, seed=1)
    assert served.refresh().version == "v0001"
    assert served.loaded == ["v0001"] and served.newest_pair() == ("v0001", BASE_VERSION)
    prompt = engine.build_prompt(QUESTION)
    alone_new = engine.sample([prompt.input_ids], ["v0001"])[0]
    alone_base = engine.sample([prompt.input_ids], [BASE_VERSION])[0]
    assert alone_new and alone_base and alone_new != alone_base  # the adapter changes the answer
    update = None
    for update in engine.stream_pair(prompt, ("v0001", BASE_VERSION)):
        assert len(update.texts) == 2
    assert update.texts == (alone_new, alone_base)
    assert all(update.finished)
    # llama.cpp's prompt cache ignores adapters: a slot the base just used must not change the version's answer
    assert engine.sample([prompt.input_ids], ["v0001"])[0] == alone_new
    with pytest.raises(KeyError, match="not loaded"):
        engine.sample([prompt.input_ids], ["v0099"])


def test_the_penalty_sent_to_llama_cpp_carries_the_end_of_turn_bias_only_beside_a_penalty():
    from rlhf_online.llamacpp_engine import chat_repeat_penalty

    assert chat_repeat_penalty(GREEDY, 2) == {"repeat_penalty": 1.1, "repeat_last_n": 64, "logit_bias": [[2, 1.2]]}
    no_penalty = dataclasses.replace(GREEDY, repetition_penalty=1.0)
    assert "logit_bias" not in chat_repeat_penalty(no_penalty, 2)  # nothing to offset
    assert "logit_bias" not in chat_repeat_penalty(dataclasses.replace(GREEDY, end_of_turn_bias=0.0), 2)


def test_the_chat_applies_the_end_of_turn_bias_to_the_token_that_ends_an_answer(engine):
    """What the flag does to an answer: an overwhelming bias on the end-of-turn token ends every answer at once
    (so the bias reaches llama.cpp, on the right token), and the default leaves a real answer."""
    prompt = engine.build_prompt(QUESTION)
    assert engine.sample([prompt.input_ids], [BASE_VERSION])[0]  # default bias: the model still answers
    engine.sampling = dataclasses.replace(GREEDY, end_of_turn_bias=100.0)
    assert engine.sample([prompt.input_ids], [BASE_VERSION])[0] == ""
    engine.sampling = dataclasses.replace(GREEDY, end_of_turn_bias=100.0, repetition_penalty=1.0)
    assert engine.sample([prompt.input_ids], [BASE_VERSION])[0]  # no penalty, nothing to offset: no bias sent


def test_swap_mid_request_finishes_on_the_old_version_and_new_requests_get_the_new(engine, served, trainer):
    publish(served.registry, trainer, seed=1)
    served.refresh()
    prompt = engine.build_prompt(QUESTION).input_ids
    expected = engine.sample([prompt], ["v0001"], max_new_tokens=40)[0]

    with served.pinned_pair() as pair:
        assert pair == ("v0001", BASE_VERSION)
        stream = engine.stream([prompt], ["v0001"], max_new_tokens=40, ignore_end=True)
        first = next(stream)
        assert not first.finished[0]
        publish(served.registry, trainer, seed=2)
        swap = served.refresh()  # built while the request runs on the old state
        assert swap.version == "v0002" and swap.dropped == []
        assert served.loaded == ["v0001", "v0002"] and served.newest_pair() == ("v0002", "v0001")
        assert len(engine.states._old) == 1  # the old state lives on for the running request
        *_, last = stream
    assert last.texts[0].startswith(expected)  # the same greedy answer the old version gave, undisturbed
    assert engine.states._old == []  # released once the request and the pin ended
    publish(served.registry, trainer, seed=3)
    swap = served.refresh()
    assert swap.dropped == ["v0001"] and served.loaded == ["v0002", "v0003"]
    assert all(engine.sample([prompt, prompt], ["v0003", "v0002"]))


def test_a_failed_build_keeps_the_current_versions_serving(engine, served, trainer, caplog):
    publish(served.registry, trainer, seed=1)
    served.refresh()
    broken = publish(served.registry, trainer, seed=2)
    (broken.path / "adapter_model.gguf").write_bytes(b"GGUF but not really")
    with caplog.at_level(logging.ERROR):
        assert served.refresh() is None
    assert "could not build" in caplog.text and "v0002" in caplog.text
    assert served.loaded == ["v0001"]
    assert served.refresh() is None and len(served.swaps) == 1  # not retried until the registry changes
    prompt = engine.build_prompt(QUESTION)
    *_, last = engine.stream_pair(prompt, served.newest_pair())
    assert all(last.texts)


def test_a_rollback_serves_the_remaining_versions(engine, served, trainer):
    for seed in (1, 2):
        publish(served.registry, trainer, seed=seed)
    served.refresh()
    assert served.loaded == ["v0001", "v0002"]
    served.registry.retire_after("v0001")
    swap = served.refresh()
    assert swap.dropped == ["v0002"] and served.loaded == ["v0001"]


def test_concurrent_pairs_are_generated_at_the_same_time(engine):
    """Two users' pairs (4 rows on 4 slots) are decoded together: each stream gets tokens before the other ends."""
    prompt = engine.build_prompt(QUESTION)
    spans = {}

    def user(name: str):
        times = []
        for _ in engine.stream([prompt.input_ids] * 2, [BASE_VERSION] * 2, max_new_tokens=24, ignore_end=True):
            times.append(time.perf_counter())
        spans[name] = (times[0], times[-1])

    threads = [threading.Thread(target=user, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (a_first, a_last), (b_first, b_last) = spans["a"], spans["b"]
    assert a_first < b_last and b_first < a_last  # the two streams overlap in time


def test_a_pair_from_two_versions_decodes_on_two_lanes_at_once(engine, served, trainer):
    """The two answers of a pair run on different servers (one core each) instead of alternating in one, and
    each still comes from its own version."""
    publish(served.registry, trainer, seed=1)
    served.refresh()
    assert engine.lanes == 2 and len(engine.states.current.servers) == 2
    prompt = engine.build_prompt(QUESTION)
    alone = [engine.sample([prompt.input_ids], [version], max_new_tokens=24)[0] for version in ("v0001", BASE_VERSION)]
    busy_lanes = []
    update = None
    for update in engine.stream_pair(prompt, ("v0001", BASE_VERSION), max_new_tokens=24):
        busy_lanes.append(sum(1 for rows in engine._in_flight if sum(rows.values())))
    assert max(busy_lanes) == 2  # both lanes had a row in flight at the same time
    assert list(update.texts) == alone
    assert [sum(rows.values()) for rows in engine._in_flight] == [0, 0]  # every row released its lane


def test_rows_gather_by_version_so_each_lane_decodes_one_batch():
    """Lane choice on its own: a lone pair spreads over both lanes; eight users' (newest, previous) pairs end up
    one version per lane; a full lane is passed over even for its own version."""
    from collections import Counter

    from rlhf_online.llamacpp_engine import choose_lane

    lanes = [Counter(), Counter()]
    for version in ("v0002", "v0001"):
        lanes[choose_lane(lanes, version, slots=8)][version] += 1
    assert lanes == [Counter(v0002=1), Counter(v0001=1)]
    for user in range(7):
        for version in (("v0002", "v0001") if user % 2 else ("v0001", "v0002")):  # the sides are shuffled
            lanes[choose_lane(lanes, version, slots=8)][version] += 1
    assert lanes == [Counter(v0002=8), Counter(v0001=8)]
    assert choose_lane([Counter(v0002=4), Counter(v0001=1)], "v0002", slots=4) == 1  # lane 0 has no free slot
    base_pair = [Counter(), Counter()]
    for _ in range(2):
        base_pair[choose_lane(base_pair, BASE_VERSION, slots=4)][BASE_VERSION] += 1
    assert base_pair == [Counter(base=1), Counter(base=1)]  # an idle core beats batching with the other row

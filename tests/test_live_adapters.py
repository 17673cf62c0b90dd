"""Hot-swapping published versions into the transformers engine: the newest two serve, a version in use
survives a swap until its request ends, and swaps into pre-built slots only copy tensors and change no answer."""

import threading
import time

import pytest
import torch
from peft import PeftModel

from rlhf_online import models
from rlhf_online.config import ModelConfig, SamplingConfig
from rlhf_online.generation import PEFT_BASE, Generator
from rlhf_online.live_adapters import LiveAdapters
from rlhf_online.versions import BASE_VERSION
from test_adapters import publish, registry, trainer  # noqa: F401 (the registry's fixtures and helper)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def generator(tiny_model_dir, tokenizer):
    base = models.load_base_model(str(tiny_model_dir), "nf4").model
    return Generator(base, tokenizer, SamplingConfig(temperature=0.0, max_new_tokens=8))


def test_refresh_loads_newest_and_keeps_two(registry, trainer, generator):
    live = LiveAdapters(generator, registry, keep=2)
    assert live.refresh() is None and live.newest_pair() == (BASE_VERSION, BASE_VERSION)
    publish(registry, trainer, seed=1)
    event = live.refresh()
    assert event.version == "v0001" and event.dropped == []
    assert isinstance(generator.model, PeftModel)
    assert live.newest_pair() == ("v0001", BASE_VERSION)
    assert live.refresh() is None  # nothing new
    publish(registry, trainer, seed=2)
    live.refresh()
    assert live.newest_pair() == ("v0002", "v0001")
    publish(registry, trainer, seed=3)
    event = live.refresh()
    assert event.dropped == ["v0001"]
    assert live.loaded == ["v0002", "v0003"] and live.newest_pair() == ("v0003", "v0002")
    assert set(generator.model.peft_config) == {"v0002", "v0003"}
    assert [e.version for e in live.swaps] == ["v0001", "v0002", "v0003"]
    prompt = generator.build_prompt([{"role": "user", "content": "hello"}]).input_ids
    texts = generator.sample([prompt] * 3, ["v0003", "v0002", BASE_VERSION])
    assert len(texts) == 3

    # rollback: the retired newest stops serving and its predecessor's predecessor comes back
    registry.retire_after("v0002")
    assert live.refresh() is None
    assert live.loaded == ["v0001", "v0002"] and live.newest_pair() == ("v0002", "v0001")
    assert set(generator.model.peft_config) == {"v0001", "v0002"}


def test_published_folder_matches_live_loaded_adapter(registry, trainer, generator, tiny_model_dir, tokenizer):
    info = publish(registry, trainer, seed=7)
    live = LiveAdapters(generator, registry)
    live.refresh()
    plain = PeftModel.from_pretrained(models.load_base_model(str(tiny_model_dir), "nf4").model, str(info.path))
    plain.eval()
    batch = tokenizer(["hello how are you today?"], return_tensors="pt")
    with torch.inference_mode():
        expected = plain(**batch).logits
        served = generator.model(**batch, adapter_names=[info.name]).logits
        base = generator.model(**batch, adapter_names=[PEFT_BASE]).logits
        trained = trainer.eval()(**batch).logits
    assert torch.allclose(served, expected, atol=1e-3, rtol=1e-3), (served - expected).abs().max()
    assert torch.allclose(trained, expected, atol=1e-2, rtol=1e-2), (trained - expected).abs().max()
    assert (served - base).abs().max() > 0.1  # the adapter really changes the output


def test_refresh_during_a_stream_waits_for_it(registry, trainer, generator):
    live = LiveAdapters(generator, registry, keep=1)
    publish(registry, trainer, seed=1)
    live.refresh()
    # PeftModel.generate calls the base model's forward directly: slow that down, to 30 ms a token
    generator.model.get_base_model().register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    prompt = generator.build_prompt([{"role": "user", "content": "hello"}]).input_ids
    stream = generator.stream([prompt, prompt], ["v0001", BASE_VERSION], max_new_tokens=30)
    updates = [next(stream), next(stream)]

    publish(registry, trainer, seed=2)  # with keep=1 its swap must drop v0001, which the stream is using
    swapped = threading.Event()
    failures = []

    def refresh():
        try:
            live.refresh()
        except Exception as exc:
            failures.append(exc)
        swapped.set()

    threading.Thread(target=refresh, daemon=True).start()
    assert not swapped.wait(0.3), f"the swap did not wait for the running generation: {failures}"
    updates.extend(stream)  # completes without error
    assert updates[-1].finished == (True, True)
    assert swapped.wait(10) and not failures
    assert live.loaded == ["v0002"] and set(generator.model.peft_config) == {"v0002"}
    assert generator.sample([prompt], ["v0002"], max_new_tokens=3)
    swap = live.swaps[-1]  # the wait for the stream is reported apart from the (short) time the swap held the model
    assert swap.version == "v0002" and swap.wait_ms >= 300 and swap.pause_ms < swap.wait_ms


def test_a_version_in_use_survives_a_swap_until_its_request_ends(registry, trainer, generator):
    """The race a live chat hits: versions picked for a pair, then two newer versions arrive mid-request."""
    live = LiveAdapters(generator, registry, keep=2)
    publish(registry, trainer, seed=1)
    live.refresh()
    prompt = generator.build_prompt([{"role": "user", "content": "hello"}]).input_ids
    with live.pinned_pair() as (newest, previous):
        assert (newest, previous) == ("v0001", BASE_VERSION)
        for seed in (2, 3):
            publish(registry, trainer, seed=seed)
            live.refresh()
        assert live.newest_pair() == ("v0003", "v0002")  # new requests get the new versions at once
        assert "v0001" in generator.model.peft_config  # ...but this request's version is still there
        assert len(generator.sample([prompt, prompt], [newest, previous])) == 2
    live.refresh()  # after the request, the next refresh drops it
    assert set(generator.model.peft_config) == {"v0002", "v0003"}


def test_slots_built_at_startup_change_no_answer_and_swaps_only_copy_tensors(registry, trainer, generator,
                                                                              tokenizer, tiny_model_dir):
    batch = tokenizer(["hello how are you today?"], return_tensors="pt")
    with torch.inference_mode():
        unwrapped = generator.model(**batch).logits
    live = LiveAdapters(generator, registry, lora_shape=models.lora_config(ModelConfig()))
    wrapped = generator.model
    assert isinstance(wrapped, PeftModel)
    with torch.inference_mode():
        base = wrapped(**batch, adapter_names=[PEFT_BASE]).logits
    assert torch.allclose(base, unwrapped, atol=1e-5)
    assert live.newest_pair() == (BASE_VERSION, BASE_VERSION)

    slots = set(wrapped.peft_config)
    assert len(slots) == 3  # the two served versions plus one still finishing a request

    prompt = generator.build_prompt([{"role": "user", "content": "hello"}]).input_ids
    for seed in (1, 2, 3, 4):  # more versions than slots: slots are reused as versions are dropped
        info = publish(registry, trainer, seed=seed)
        live.refresh()
        assert generator.model is wrapped and set(wrapped.peft_config) == slots  # tensors copied, nothing injected
        plain = PeftModel.from_pretrained(models.load_base_model(str(tiny_model_dir), "nf4").model, str(info.path))
        with torch.inference_mode():
            expected = plain.eval()(**batch).logits
            served = wrapped(**batch, adapter_names=[generator.peft_adapter(info.name)]).logits
        assert torch.allclose(served, expected, atol=1e-3, rtol=1e-3), (served - expected).abs().max()
        assert len(generator.sample([prompt] * 2, list(live.newest_pair()), max_new_tokens=4)) == 2
    assert live.loaded == ["v0003", "v0004"] and set(generator.slot_versions()) == {"v0003", "v0004"}

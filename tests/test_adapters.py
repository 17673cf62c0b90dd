import json
import logging
import shutil
import threading
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from rlhf_online import adapters, models
from rlhf_online.adapters import ADAPTER_WEIGHTS, META_FILE, AdapterRegistry, CorruptAdapterError, save_peft_adapter
from rlhf_online.config import ModelConfig, SamplingConfig
from rlhf_online.generation import PEFT_BASE, Generator
from rlhf_online.live_adapters import LiveAdapters
from rlhf_online.versions import BASE_VERSION


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    """The trainer's copy: a base loaded for training with one policy adapter."""
    base = models.load_base_model(str(tiny_model_dir), "nf4", for_training=True)
    torch.manual_seed(0)
    return models.attach_lora(base.model, ModelConfig())


@pytest.fixture
def registry(tmp_path):
    return AdapterRegistry(tmp_path / "adapters")


@pytest.fixture
def generator(tiny_model_dir, tokenizer):
    base = models.load_base_model(str(tiny_model_dir), "nf4").model
    return Generator(base, tokenizer, SamplingConfig(temperature=0.0, max_new_tokens=8))


def publish(registry, trainer, seed: int, **meta):
    """Publish the trainer's policy with fresh random weights (distinct per seed)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in models.lora_parameters(trainer, models.POLICY_ADAPTER).values():
            p.normal_(0, 0.2)
    return registry.publish(lambda folder: save_peft_adapter(trainer, models.POLICY_ADAPTER, folder),
                            {"seed": seed, **meta})


def names(infos):
    return [info.name for info in infos]


def test_publish_writes_a_plain_peft_folder(registry, trainer):
    info = publish(registry, trainer, seed=1, iteration=3)
    assert info.name == "v0001" and info.number == 1
    assert (info.path / ADAPTER_WEIGHTS).is_file() and (info.path / "adapter_config.json").is_file()
    meta = json.loads((info.path / META_FILE).read_text())
    assert meta["version"] == "v0001" and meta["iteration"] == 3 and meta["published_at"] > 0
    assert names(registry.versions()) == ["v0001"]
    assert registry.latest().meta == meta


def test_failed_publish_leaves_nothing(registry, trainer):
    def crash(folder):
        save_peft_adapter(trainer, models.POLICY_ADAPTER, folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        registry.publish(crash, {})

    def garbage(folder):  # completes, but the server would reject it
        (folder / "adapter_config.json").write_text("{not json")

    with pytest.raises(CorruptAdapterError):
        registry.publish(garbage, {})
    assert list(registry.root.iterdir()) == []
    assert registry.latest() is None


def test_clean_temporary_removes_crashed_writes(registry, trainer):
    (registry.root / ".v0001.tmp-abc").mkdir()
    publish(registry, trainer, seed=1)
    registry.clean_temporary()
    assert not list(registry.root.glob(".v*"))
    assert names(registry.versions()) == ["v0001"]


def corrupt_copies(registry, good):
    """v0003: truncated weights, v0004: no meta, v0005: NaN weights (otherwise consistent)."""
    def copy(name):
        path = registry.root / name
        shutil.copytree(good.path, path)
        meta = json.loads((path / META_FILE).read_text())
        (path / META_FILE).write_text(json.dumps({**meta, "version": name}))
        return path

    truncated = copy("v0003") / ADAPTER_WEIGHTS
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (copy("v0004") / META_FILE).unlink()
    weights_file = copy("v0005") / ADAPTER_WEIGHTS
    weights = load_file(str(weights_file))
    first = next(iter(weights))
    weights[first] = weights[first].clone().fill_(float("nan"))
    save_file(weights, str(weights_file))


def test_corrupt_versions_are_skipped_with_a_logged_error(registry, trainer, caplog):
    publish(registry, trainer, seed=1)
    good = publish(registry, trainer, seed=2)
    corrupt_copies(registry, good)
    with caplog.at_level(logging.ERROR, logger="rlhf_online.adapters"):
        assert names(registry.versions()) == ["v0001", "v0002"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3
    assert any("v0003" in e for e in errors) and any("v0004" in e for e in errors)
    assert any("v0005" in e and "non-finite" in e for e in errors)
    assert registry.latest().name == "v0002"
    assert publish(registry, trainer, seed=3).name == "v0006"  # corrupt numbers are not reused


def test_a_version_is_validated_once_until_its_files_change(registry, trainer, monkeypatch, caplog):
    publish(registry, trainer, seed=1)
    good = publish(registry, trainer, seed=2)
    loads = []
    monkeypatch.setattr(adapters, "load_file", lambda path: loads.append(path) or load_file(path))
    fresh = AdapterRegistry(registry.root)  # another process's view (the trainer's, the server's)
    assert names(fresh.versions()) == ["v0001", "v0002"] and len(loads) == 2
    for _ in range(3):  # the server's 2 s poll, the trainer's step, the panel: no weights loaded again
        assert fresh.latest().name == "v0002" and names(fresh.versions()) == ["v0001", "v0002"]
    assert len(loads) == 2 and names(registry.versions()) == ["v0001", "v0002"] and len(loads) == 2  # publisher too

    (good.path / "RETIRED").write_text("x")  # a rollback marks the folder without touching its files
    assert names(fresh.versions()) == ["v0001"] and len(loads) == 2
    (good.path / "RETIRED").unlink()
    time.sleep(0.05)  # file times tick at the kernel's clock granularity (a few ms)
    weights = load_file(str(good.path / ADAPTER_WEIGHTS))  # a hand edit of the same size: NaNs in one tensor
    first = next(iter(weights))
    weights[first] = weights[first].clone().fill_(float("nan"))
    save_file(weights, str(good.path / ADAPTER_WEIGHTS))
    with caplog.at_level(logging.ERROR, logger="rlhf_online.adapters"):
        assert names(fresh.versions()) == ["v0001"] and names(fresh.versions()) == ["v0001"]
    assert len(loads) == 3  # checked again once, then cached as corrupt
    assert len([r for r in caplog.records if "non-finite" in r.getMessage()]) == 1  # logged once, not per poll
    registry.delete("v0002")
    assert names(fresh.versions()) == ["v0001"] and len(loads) == 3


def test_version_numbers_are_never_reused(registry, trainer):
    for seed in (1, 2, 3):
        publish(registry, trainer, seed=seed)
    assert registry.retire_after("v0001") == ["v0002", "v0003"]
    assert publish(registry, trainer, seed=4).name == "v0004"
    registry.delete("v0004")
    registry.delete("v0003")
    assert publish(registry, trainer, seed=5).name == "v0005"
    assert names(registry.versions()) == ["v0001", "v0005"]


def test_retire_after_hides_newer_versions(registry, trainer):
    for seed in (1, 2, 3):
        publish(registry, trainer, seed=seed)
    assert registry.retire_after("v0002") == ["v0003"]
    assert names(registry.versions()) == ["v0001", "v0002"]
    assert registry.latest().name == "v0002"
    assert names(registry.versions(include_retired=True)) == ["v0001", "v0002", "v0003"]
    assert registry.retire_after("base") == ["v0001", "v0002"]
    assert registry.latest() is None


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

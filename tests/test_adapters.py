"""The registry of published versions on a real folder: atomic publishing, validation (once per change), corrupt
folders skipped, numbers never reused, rollback."""

import json
import logging
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf_online import adapters, models
from rlhf_online.adapters import ADAPTER_WEIGHTS, META_FILE, AdapterRegistry, CorruptAdapterError, save_peft_adapter
from rlhf_online.config import ModelConfig


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    """The trainer's copy: a base loaded for training with one policy adapter."""
    base = models.load_base_model(str(tiny_model_dir), "nf4", for_training=True)
    torch.manual_seed(0)
    return models.attach_lora(base.model, ModelConfig())


@pytest.fixture
def registry(tmp_path):
    return AdapterRegistry(tmp_path / "adapters")


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

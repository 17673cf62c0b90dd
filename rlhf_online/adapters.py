"""Published policy adapter versions: writing them atomically, finding them, and hot-swapping them in.

A version is a folder `adapters/vNNNN/` holding a plain PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`, loadable by `PeftModel.from_pretrained` on the same base), the PPO value head,
`meta.json`, and, for a Llama-family base, the same adapter converted for llama.cpp (`adapter_model.gguf`,
see gguf_adapter.py; the PEFT files stay the canonical artefact). It is written under a temporary name and renamed into place, so a reader sees either no
folder or a complete one; a folder that fails validation anyway (a disk error, a hand edit) is skipped with a
logged error and the last good version keeps serving.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from rlhf_online.generation import Generator
from rlhf_online.versions import BASE_VERSION, is_version_name, sorted_versions, version_name, version_number

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
META_FILE = "meta.json"
RETIRED_MARKER = "RETIRED"
LAST_VERSION_FILE = ".last_version"  # highest number ever published


class CorruptAdapterError(ValueError):
    pass


@dataclass(frozen=True)
class VersionInfo:
    name: str
    path: Path
    meta: dict

    @property
    def number(self) -> int:
        return version_number(self.name)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fingerprint(path: Path) -> tuple:
    """Changes whenever a file that validation reads is written, replaced or removed (size, mtime, inode)."""
    stats = []
    for name in (META_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        try:
            stat = os.stat(path / name)
            stats.append((stat.st_size, stat.st_mtime_ns, stat.st_ino))
        except OSError:
            stats.append(None)
    return tuple(stats)


class AdapterRegistry:
    """The `adapters/` folder as the single source of truth shared by the trainer and the server.

    A version is validated (its weights loaded and checked for non-finite values) once per fingerprint of its
    files, not on every look: the server polls every 2 s and the trainer looks every step, and re-reading every
    kept version each time cost a full load of each. A folder that changes (a hand edit, a disk error caught on
    rewrite) is validated again; a corrupt one is logged once, not on every poll.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._checked: dict[str, tuple[tuple, VersionInfo | CorruptAdapterError]] = {}  # name -> (fingerprint, result)
        self._checked_lock = threading.Lock()

    def _candidate_names(self) -> list[str]:
        return sorted((p.name for p in self.root.iterdir() if p.is_dir() and is_version_name(p.name)),
                      key=version_number)

    def validate(self, path: Path, expected_name: str | None = None) -> VersionInfo:
        """Check a version folder is complete and loadable; raise CorruptAdapterError with the reason if not."""
        expected_name = expected_name or path.name
        try:
            meta = json.loads((path / META_FILE).read_text())
            LoraConfig.from_pretrained(str(path))
            weights = load_file(str(path / ADAPTER_WEIGHTS))
        except Exception as exc:
            raise CorruptAdapterError(f"{path}: {type(exc).__name__}: {exc}") from exc
        if not weights or meta.get("version") != expected_name:
            raise CorruptAdapterError(f"{path}: empty weights or metadata for another version")
        for key, tensor in weights.items():
            if not torch.isfinite(tensor).all():
                raise CorruptAdapterError(f"{path}: non-finite values in {key}")
        return VersionInfo(name=expected_name, path=path, meta=meta)

    def _checked_version(self, name: str) -> VersionInfo | CorruptAdapterError:
        """`validate` of the folder `name`, from the cache while its files are unchanged."""
        path = self.root / name
        fingerprint = _fingerprint(path)
        with self._checked_lock:
            cached = self._checked.get(name)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        try:
            result = self.validate(path)
        except CorruptAdapterError as exc:
            log.error("skipping corrupt adapter version: %s", exc)
            result = exc
        with self._checked_lock:
            self._checked[name] = (fingerprint, result)
        return result

    def versions(self, include_retired: bool = False) -> list[VersionInfo]:
        """Valid versions, oldest first; corrupt ones are logged (once) and skipped."""
        names = self._candidate_names()
        with self._checked_lock:  # forget deleted folders
            for gone in set(self._checked) - set(names):
                del self._checked[gone]
        found = []
        for name in names:
            if not include_retired and (self.root / name / RETIRED_MARKER).exists():
                continue
            result = self._checked_version(name)
            if isinstance(result, VersionInfo):
                found.append(result)
        return found

    def latest(self) -> VersionInfo | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def next_version_name(self) -> str:
        """Numbers are never reused, even for corrupt or retired folders, so a name means one set of weights."""
        names = self._candidate_names()
        last = version_number(names[-1]) if names else 0
        try:  # the high-water mark also covers deleted folders
            last = max(last, version_number((self.root / LAST_VERSION_FILE).read_text().strip()))
        except (OSError, ValueError):
            pass
        return version_name(last + 1)

    def publish(self, write_adapter: Callable[[Path], None], meta: dict) -> VersionInfo:
        """Write a new version via `write_adapter(folder)` into a temp folder, then rename it into place."""
        name = self.next_version_name()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.root))
        try:
            write_adapter(tmp)
            write_gguf_beside(tmp)
            full_meta = {**meta, "version": name, "published_at": time.time()}
            (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))
            _fsync_tree(tmp)
            self.validate(tmp, expected_name=name)  # never publish something the server would reject
            os.rename(tmp, self.root / name)
            (self.root / LAST_VERSION_FILE).write_text(name + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info = VersionInfo(name=name, path=self.root / name, meta=full_meta)
        with self._checked_lock:  # validated just above: the publisher need not load it again
            self._checked[name] = (_fingerprint(info.path), info)
        return info

    def retire_after(self, version: str) -> list[str]:
        """Rollback: mark every version newer than `version` retired (kept on disk for inspection)."""
        keep = version_number(version)
        retired = []
        for info in self.versions():
            if info.number > keep:
                (info.path / RETIRED_MARKER).write_text(f"retired at {time.time()}\n")
                retired.append(info.name)
        return retired

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` versions (retired ones count too), so disk use stays bounded."""
        names = self._candidate_names()
        doomed = names[:-keep] if keep > 0 else []
        for name in doomed:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return doomed

    def delete(self, version: str) -> None:
        shutil.rmtree(self.root / version)

    def clean_temporary(self) -> None:
        """Remove temp folders left by a publisher that crashed mid-write."""
        for path in self.root.glob(".v*.tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def write_gguf_beside(folder: Path) -> Path | None:
    """Add the llama.cpp GGUF form of the PEFT adapter in `folder`, when its base is a local Llama-family folder.

    Best effort: the PEFT files are canonical, and the llama.cpp engine converts a version that lacks the file
    when it loads it, so a failure here is logged, not fatal.
    """
    from rlhf_online.gguf_adapter import ROTARY_ARCHITECTURES, BaseShape, convert_peft_folder

    try:
        base_path = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
        base_config = Path(base_path).expanduser() / "config.json"
        if not base_config.is_file():
            return None
        shape = BaseShape.from_hf_config(json.loads(base_config.read_text()))
        if shape.architecture not in ROTARY_ARCHITECTURES:
            return None
        return convert_peft_folder(folder, shape)
    except Exception:
        log.exception("could not write the GGUF form of the adapter in %s (the llama.cpp engine will convert it "
                      "when it loads the version)", folder)
        return None


def save_peft_adapter(model: PeftModel, adapter_name: str, folder: Path) -> None:
    """Save one adapter as a plain top-level PEFT folder (PEFT nests non-default names in a subfolder)."""
    model.save_pretrained(str(folder), selected_adapters=[adapter_name])
    nested = folder / adapter_name
    if nested.is_dir():
        for item in nested.iterdir():
            os.replace(item, folder / item.name)
        nested.rmdir()


def lora_state_for(weights: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """Map saved keys (`...q_proj.lora_A.weight`) to live parameter names (`...q_proj.lora_A.<name>.weight`)."""
    return {re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{adapter_name}.weight", key): t for key, t in weights.items()}


@dataclass
class SwapEvent:
    """One hot-swap. `pause_ms` is how long the swap held the model, i.e. how long it stalled generation;
    `wait_ms` is how long it first waited for the in-flight generation to end (that request was not slowed)."""

    version: str
    pause_ms: float
    dropped: list[str] = field(default_factory=list)
    wait_ms: float = 0.0


SLOT_PREFIX = "slot-"  # PEFT adapter names of the serving model's pre-built adapter slots


def _same_shape(config: LoraConfig, shape: LoraConfig) -> bool:
    """Whether a version's tensors can be copied into a slot built from `shape` and mean the same thing."""
    def key(c: LoraConfig):
        layers = c.layers_to_transform
        return (c.r, c.lora_alpha, frozenset(c.target_modules or ()), tuple(layers) if isinstance(layers, list)
                else layers, c.use_rslora, c.use_dora, c.bias)
    return key(config) == key(shape)



def watch_registry(live, interval_s: float) -> threading.Thread:
    """Call `live.refresh()` every `interval_s` in a daemon thread until `live._stop` is set; a failing refresh is
    logged and retried, never fatal. Shared by both serving sides (LiveAdapters, served_versions.ServedVersions)."""
    def loop():
        while not live._stop.wait(interval_s):
            try:
                live.refresh()
            except Exception:
                log.exception("adapter refresh failed; still serving %s", live.loaded or [BASE_VERSION])
    thread = threading.Thread(target=loop, name="adapter-watch", daemon=True)
    thread.start()
    return thread

class LiveAdapters:
    """Keeps the newest published versions loaded in the serving model and switches new requests to them.

    Why not `PeftModel.load_adapter`: it calls `state_dict()`, and on CPU that un-repacks bitsandbytes'
    4-bit weights in a way that leaves the base model producing garbage (measured with bitsandbytes 0.50.2).
    So the file is read outside the model lock, and under it we only copy LoRA tensors.

    Why slots: injecting a new adapter (`add_adapter`) creates LoRA modules in every target layer, which held
    the model for ~130 ms on 2 cores (up to 390 ms), stalling every chat for that long. Given `lora_shape`,
    the serving model is built at start-up with `keep + 1` adapters of that shape ("slots": the served
    versions plus one still finishing a request); a swap then copies the version's tensors into a free slot
    and maps the version name to it. A version of another shape falls back to `add_adapter`.
    """

    def __init__(self, generator: Generator, registry: AdapterRegistry, keep: int = 2,
                 lora_shape: LoraConfig | None = None):
        self.generator = generator
        self.registry = registry
        self.keep = keep
        self.lora_shape = lora_shape
        self._slots: dict[str, str | None] = {}  # slot adapter name -> version it holds (None: free)
        self._slot_params: dict[str, dict[str, torch.nn.Parameter]] = {}
        if lora_shape is not None:
            self._build_slots(lora_shape, keep + 1)
        self.loaded: list[str] = []  # served to new requests, oldest first
        self.swaps: list[SwapEvent] = []
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._pins: collections.Counter = collections.Counter()  # version -> requests using it
        self._unloading: list[str] = []  # no longer served, still in the model until their last request ends
        self._pins_lock = threading.Lock()

    def _build_slots(self, lora_shape: LoraConfig, count: int) -> None:
        """Wrap the serving model in PEFT with `count` empty adapter slots, before it serves anything.

        Done lazily at the first publish, wrapping held the model lock for 2.2 s on the embedded model. A free
        slot is never named in a request (and its fresh lora_B is zero), so it changes no answer.
        """
        model = self.generator.model
        if isinstance(model, PeftModel):
            return
        config = copy.deepcopy(lora_shape)
        config.inference_mode = True
        names = [f"{SLOT_PREFIX}{i}" for i in range(count)]
        model = PeftModel(model, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, copy.deepcopy(config))
        self.generator.model = model.eval()
        params = dict(model.named_parameters())
        for name in names:
            self._slots[name] = None
            self._slot_params[name] = {key: p for key, p in params.items() if f".{name}." in key}

    def newest_pair(self) -> tuple[str, str]:
        """The versions a chat pair compares: newest against its predecessor (or the base)."""
        loaded = [BASE_VERSION] + self.loaded
        return loaded[-1], loaded[-2] if len(loaded) > 1 else BASE_VERSION

    @contextlib.contextmanager
    def pinned_pair(self):
        """`newest_pair()` kept loaded until the block ends, so a swap never drops a version mid-request."""
        with self._pins_lock:
            pair = self.newest_pair()
            self._pins.update(pair)
        try:
            yield pair
        finally:
            with self._pins_lock:
                self._pins.subtract(pair)

    def _stop_serving(self, names: list[str]) -> None:
        self.loaded = [n for n in self.loaded if n not in names]
        self._unloading.extend(n for n in names if n not in self._unloading)

    def _drop_unpinned(self, model) -> list[str]:
        """Delete adapters that no request uses any more (call with the model held)."""
        with self._pins_lock:
            droppable = [n for n in self._unloading if self._pins[n] <= 0]
            self._unloading = [n for n in self._unloading if n not in droppable]
        for name in droppable:
            slot = self.generator.adapter_aliases.pop(name, None)
            if slot is not None:
                self._slots[slot] = None  # free for the next version; its stale tensors are never served
            else:
                model.delete_adapter(name)
        return droppable

    def refresh(self) -> SwapEvent | None:
        """Load the newest valid version if it is not loaded yet; drop versions beyond `keep`."""
        with self._refresh_lock:
            if self._unloading:
                with self.generator.exclusive() as model:
                    self._drop_unpinned(model)
            latest = self.registry.latest()
            if latest is None or latest.name in self.loaded:
                return self._sync_retired()
            return self._load(latest)

    def _sync_retired(self) -> None:
        """After a rollback, stop serving retired versions."""
        valid = {v.name for v in self.registry.versions()}
        retired = [name for name in self.loaded if name not in valid]
        if retired:
            with self.generator.exclusive() as model:
                with self._pins_lock:
                    self._stop_serving(retired)
                self._drop_unpinned(model)
            self._reload_previous(valid)
        return None

    def _reload_previous(self, valid: set[str]) -> None:
        """Keep a predecessor loaded after a rollback so pairs still compare two versions."""
        if len(self.loaded) >= min(self.keep, len(valid)):
            return
        for info in reversed(self.registry.versions()):
            if info.name not in self.loaded:
                self._load(info, newest=False)
                return

    def _free_slot(self, config: LoraConfig, saved: dict[str, torch.Tensor]) -> tuple[str, dict] | None:
        """A free slot this version fits exactly, with its tensors renamed to the slot's parameters."""
        if self.lora_shape is None or not _same_shape(config, self.lora_shape):
            return None
        for slot, holder in self._slots.items():
            if holder is None:
                weights = lora_state_for(saved, slot)
                if set(weights) == set(self._slot_params[slot]):
                    return slot, weights
                return None  # same shape but other tensors (e.g. another base): take the general path
        return None

    def _inject(self, model, info, config: LoraConfig, weights: dict[str, torch.Tensor]) -> tuple[object, dict]:
        """The general path: a new PEFT adapter named after the version (call with the model held)."""
        if not isinstance(model, PeftModel):
            model = PeftModel(model, config, adapter_name=info.name)
            self.generator.model = model
        else:
            model.add_adapter(info.name, config)
        params = dict(model.named_parameters())
        missing = [k for k in weights if k not in params]
        if missing:
            if len(model.peft_config) > 1:
                model.delete_adapter(info.name)
            raise CorruptAdapterError(f"{info.path}: {len(missing)} tensors do not match the base model")
        model.eval()
        return model, {key: params[key] for key in weights}

    def _load(self, info, newest: bool = True) -> SwapEvent:
        config = LoraConfig.from_pretrained(str(info.path))
        config.inference_mode = True
        saved = load_file(str(info.path / ADAPTER_WEIGHTS))
        requested = time.perf_counter()
        dropped = []
        with self.generator.exclusive() as model:  # waits for the in-flight generation to finish
            started = time.perf_counter()
            if info.name in self._unloading:  # retired a moment ago and still in the model: serve it again
                with self._pins_lock:
                    self._unloading.remove(info.name)
                    self.loaded = sorted_versions(self.loaded + [info.name])
                return SwapEvent(version=info.name, pause_ms=0.0)
            slot = self._free_slot(config, saved)
            if slot is not None:
                slot_name, weights = slot
                targets = self._slot_params[slot_name]
            else:
                weights = lora_state_for(saved, info.name)
                model, targets = self._inject(model, info, config, weights)
            with torch.no_grad():
                for key, tensor in weights.items():
                    targets[key].copy_(tensor)
            if slot is not None:
                self._slots[slot_name] = info.name
                self.generator.adapter_aliases[info.name] = slot_name
            with self._pins_lock:  # new requests get the new version from here on
                self.loaded = sorted_versions(self.loaded + [info.name])
                self._stop_serving(self.loaded[:-self.keep] if len(self.loaded) > self.keep else [])
            dropped = self._drop_unpinned(model)
        event = SwapEvent(version=info.name, pause_ms=(time.perf_counter() - started) * 1000, dropped=dropped,
                          wait_ms=(started - requested) * 1000)
        self.swaps.append(event)
        log.info("now serving %s (swap held the model %.0f ms; dropped %s)", info.name, event.pause_ms, dropped)
        return event

    def watch(self, interval_s: float = 2.0) -> threading.Thread:
        return watch_registry(self, interval_s)

    def stop(self) -> None:
        self._stop.set()

"""The registry of published policy adapter versions: writing them atomically and finding them, for both
processes (the trainer publishes, the server reads; serving them is `live_adapters` / `served_versions`).

A version is a folder `adapters/vNNNN/` holding a plain PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`, loadable by `PeftModel.from_pretrained` on the same base), the PPO value head,
`meta.json`, and, for a Llama-family base, the same adapter converted for llama.cpp (`adapter_model.gguf`,
see gguf_adapter.py; the PEFT files stay the canonical artefact). It is written under a temporary name and
renamed into place, so a reader sees either no folder or a complete one; a folder that fails validation anyway (a disk error, a hand edit) is skipped with a
logged error and the last good version keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from rlhf_online.versions import is_version_name, version_name, version_number

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

"""Serving published versions with the transformers engine: which versions serve new requests, which requests
still use an older one, and when to swap; the hot-swap shared by both serving sides (`SwapEvent`,
`watch_registry`).

`LiveAdapters` decides *which* versions serve; the engine (`generation.Generator`) owns *how*: its model, its
adapter slots and the map from a version to the PEFT adapter that holds it. The engines whose adapter set is
fixed per engine state (llama.cpp, a remote server) are served by `served_versions.ServedVersions`, which has
the same public face.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

from peft import LoraConfig
from safetensors.torch import load_file

from rlhf_online.adapters import ADAPTER_WEIGHTS, AdapterRegistry
from rlhf_online.generation import Generator
from rlhf_online.versions import BASE_VERSION, sorted_versions

log = logging.getLogger(__name__)


@dataclass
class SwapEvent:
    """One hot-swap. `pause_ms` is how long the swap held the model, i.e. how long it stalled generation;
    `wait_ms` is how long it first waited for the in-flight generation to end (that request was not slowed)."""

    version: str
    pause_ms: float
    dropped: list[str] = field(default_factory=list)
    wait_ms: float = 0.0


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

    The version file is read outside the model lock; under it the engine only copies LoRA tensors into a free
    adapter slot (`Generator.put_adapter`). Given `lora_shape`, the engine builds `keep + 1` slots at start-up:
    the served versions plus one still finishing a request.
    """

    def __init__(self, generator: Generator, registry: AdapterRegistry, keep: int = 2,
                 lora_shape: LoraConfig | None = None):
        self.generator = generator
        self.registry = registry
        self.keep = keep
        if lora_shape is not None:
            generator.build_slots(lora_shape, keep + 1)
        self.loaded: list[str] = []  # served to new requests, oldest first
        self.swaps: list[SwapEvent] = []
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._pins: collections.Counter = collections.Counter()  # version -> requests using it
        self._unloading: list[str] = []  # no longer served, still in the model until their last request ends
        self._pins_lock = threading.Lock()

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

    def _drop_unpinned(self) -> list[str]:
        """Remove adapters that no request uses any more (call holding `generator.exclusive()`)."""
        with self._pins_lock:
            droppable = [n for n in self._unloading if self._pins[n] <= 0]
            self._unloading = [n for n in self._unloading if n not in droppable]
        for name in droppable:
            self.generator.remove_adapter(name)
        return droppable

    def refresh(self) -> SwapEvent | None:
        """Load the newest valid version if it is not loaded yet; drop versions beyond `keep`."""
        with self._refresh_lock:
            if self._unloading:
                with self.generator.exclusive():
                    self._drop_unpinned()
            latest = self.registry.latest()
            if latest is None or latest.name in self.loaded:
                return self._sync_retired()
            return self._load(latest)

    def _sync_retired(self) -> None:
        """After a rollback, stop serving retired versions."""
        valid = {v.name for v in self.registry.versions()}
        retired = [name for name in self.loaded if name not in valid]
        if retired:
            with self.generator.exclusive():
                with self._pins_lock:
                    self._stop_serving(retired)
                self._drop_unpinned()
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

    def _load(self, info, newest: bool = True) -> SwapEvent:
        config = LoraConfig.from_pretrained(str(info.path))
        config.inference_mode = True
        saved = load_file(str(info.path / ADAPTER_WEIGHTS))
        requested = time.perf_counter()
        dropped = []
        with self.generator.exclusive():  # waits for the in-flight generation to finish
            started = time.perf_counter()
            if info.name in self._unloading:  # retired a moment ago and still in the model: serve it again
                with self._pins_lock:
                    self._unloading.remove(info.name)
                    self.loaded = sorted_versions(self.loaded + [info.name])
                return SwapEvent(version=info.name, pause_ms=0.0)
            self.generator.put_adapter(info.name, config, saved, source=info.path)
            with self._pins_lock:  # new requests get the new version from here on
                self.loaded = sorted_versions(self.loaded + [info.name])
                self._stop_serving(self.loaded[:-self.keep] if len(self.loaded) > self.keep else [])
            dropped = self._drop_unpinned()
        event = SwapEvent(version=info.name, pause_ms=(time.perf_counter() - started) * 1000, dropped=dropped,
                          wait_ms=(started - requested) * 1000)
        self.swaps.append(event)
        log.info("now serving %s (swap held the model %.0f ms; dropped %s)", info.name, event.pause_ms, dropped)
        return event

    def watch(self, interval_s: float = 2.0) -> threading.Thread:
        return watch_registry(self, interval_s)

    def stop(self) -> None:
        self._stop.set()

"""Hot-swapping published versions into an engine whose adapter set is fixed per engine state (llama.cpp, a
remote OpenAI-compatible server): build the next state in the background, switch between requests.

The transformers engine changes its adapters in place (`live_adapters.LiveAdapters`); llama.cpp loads LoRA files
only when a server is constructed (~0.5-3 s here), so a new version means a new state. `ServedVersions` has the
same public face as `LiveAdapters` (`loaded`, `swaps`, `refresh`, `watch`, `stop`, `newest_pair`,
`pinned_pair`), so the arena, the UI and the benchmarks do not care which engine serves.

What a swap guarantees:
* the new state is built (adapters converted, server constructed, one tiny request run on it) while the current
  one keeps serving; only the switch itself (a reference assignment under a lock) waits for nothing else;
* a request keeps the state it started on until it ends, so it finishes on the versions it started with;
* a build that fails is logged with its reason and the current versions keep serving; the same set of versions
  is not retried until the registry changes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from rlhf_online.adapters import AdapterRegistry, VersionInfo
from rlhf_online.live_adapters import SwapEvent, watch_registry
from rlhf_online.versions import BASE_VERSION, sorted_versions

log = logging.getLogger(__name__)


class ServedVersions:
    """Keeps the newest `keep` valid versions of the registry served by a state-switching engine.

    The engine provides `build_state(versions: list[VersionInfo]) -> state` (slow, no lock held, may raise) and
    `states`, its `EngineStates`: the one owner of which state serves which versions, which keeps an old state
    alive while a request or a pin still uses it.
    """

    def __init__(self, engine, registry: AdapterRegistry, keep: int = 2):
        self.engine = engine
        self.registry = registry
        self.keep = keep
        self.swaps: list[SwapEvent] = []
        self.failed: dict[tuple[str, ...], str] = {}  # version set -> why its build failed
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def loaded(self) -> list[str]:
        """Versions served to new requests, oldest first (the base is always servable)."""
        return self.engine.states.serving()

    def newest_pair(self) -> tuple[str, str]:
        loaded = [BASE_VERSION] + self.loaded
        return loaded[-1], loaded[-2] if len(loaded) > 1 else BASE_VERSION

    @contextlib.contextmanager
    def pinned_pair(self):
        """`newest_pair()` kept servable until the block ends, even if a swap happens meanwhile."""
        with self.engine.states.pinned_newest_pair() as pair:
            yield pair

    def wanted(self) -> list[VersionInfo]:
        return self.registry.versions()[-self.keep:] if self.keep > 0 else []

    def refresh(self) -> SwapEvent | None:
        """Serve the newest `keep` valid versions (after a publish or a rollback); None if nothing changed."""
        with self._refresh_lock:
            wanted = self.wanted()
            names = tuple(info.name for info in wanted)
            if list(names) == self.loaded or names in self.failed:
                return None
            started = time.perf_counter()
            try:
                state = self.engine.build_state(wanted)
            except Exception as exc:  # the current state keeps serving
                self.failed[names] = f"{type(exc).__name__}: {exc}"
                log.error("could not build the engine state for %s (%s); still serving %s", list(names),
                          self.failed[names], self.loaded or [BASE_VERSION])
                return None
            built_ms = (time.perf_counter() - started) * 1000
            previous = self.loaded
            pause_ms = self.engine.states.switch_to(state)
        event = SwapEvent(version=names[-1] if names else BASE_VERSION, pause_ms=pause_ms,
                          dropped=[n for n in previous if n not in names], wait_ms=built_ms)
        self.swaps.append(event)
        log.info("now serving %s (state built in the background in %.0f ms; the switch held the engine %.2f ms; "
                 "dropped %s)", list(names) or [BASE_VERSION], built_ms, pause_ms, event.dropped)
        return event

    def watch(self, interval_s: float = 2.0) -> threading.Thread:
        return watch_registry(self, interval_s)

    def stop(self) -> None:
        self._stop.set()


class EngineStates:
    """The current engine state plus older ones that a running request or a pin still uses.

    A state has `.versions` (names of the published versions it serves; the base is always servable). Requests
    enter with `using(versions)`, which picks the newest state serving all of them; an old state is closed (in
    a background thread: closing may block) once no request uses it and no pinned version needs it.
    """

    def __init__(self, initial, close_state):
        self._lock = threading.Lock()
        self.current = initial
        self._old: list = []
        self._users: dict[int, int] = {}
        self._pins: dict[str, int] = {}
        self._close_state = close_state

    def serving(self) -> list[str]:
        return sorted_versions(self.current.versions)

    @contextlib.contextmanager
    def pinned_newest_pair(self):
        with self._lock:
            loaded = [BASE_VERSION] + self.serving()
            pair = (loaded[-1], loaded[-2] if len(loaded) > 1 else BASE_VERSION)
            for name in pair:
                self._pins[name] = self._pins.get(name, 0) + 1
        try:
            yield pair
        finally:
            with self._lock:
                for name in pair:
                    self._pins[name] -= 1
                doomed = self._collect()
            self._close(doomed)

    @contextlib.contextmanager
    def using(self, versions):
        wanted = {v for v in versions if v != BASE_VERSION}
        with self._lock:
            for state in [self.current, *reversed(self._old)]:
                if wanted <= set(state.versions):
                    break
            else:
                raise KeyError(f"versions {sorted(wanted)} are not loaded (serving {self.serving()})")
            self._users[id(state)] = self._users.get(id(state), 0) + 1
        try:
            yield state
        finally:
            with self._lock:
                self._users[id(state)] -= 1
                doomed = self._collect()
            self._close(doomed)

    def switch_to(self, state) -> float:
        """Make `state` serve new requests; returns how long the switch held the lock, in ms."""
        with self._lock:
            started = time.perf_counter()
            self._old.append(self.current)
            self.current = state
            doomed = self._collect()
            held_ms = (time.perf_counter() - started) * 1000
        self._close(doomed)
        return held_ms

    def _collect(self) -> list:
        """Old states nothing needs any more (call with the lock held)."""
        pinned = {name for name, count in self._pins.items() if count > 0} - set(self.current.versions)
        doomed = [s for s in self._old if self._users.get(id(s), 0) <= 0 and not pinned & set(s.versions)]
        self._old = [s for s in self._old if s not in doomed]
        for state in doomed:
            self._users.pop(id(state), None)
        return doomed

    def _close(self, states: list) -> None:
        for state in states:
            threading.Thread(target=self._close_state, args=(state,), name="close-engine-state", daemon=True).start()

    def close_all(self) -> None:
        with self._lock:
            states, self._old = [self.current, *self._old], []
        for state in states:
            self._close_state(state)

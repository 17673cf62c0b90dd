"""Abuse limits for a public app: per-session and per-client rate limits, and a cap on stored votes per session.

Why: every vote is a gradient step on the reward model, so one visitor voting fast (or a script) could steer what
the policy learns (data poisoning). A session is one browser tab or one API client; a client is one network
address, which is what a script rotating sessions cannot rotate as cheaply.

Written by hand because what Gradio offers (the queue's concurrency limit and max size) bounds load, not how
much one visitor contributes, and a sliding window over a deque of timestamps is a dozen lines.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

from rlhf_online.config import LimitsConfig

WINDOW_S = 60.0


class LimitExceededError(RuntimeError):
    """A request over a limit; the message says which limit and when to try again. Nothing was stored."""


class SlidingWindowLimiter:
    """At most `limit` events per key in any `window_s` seconds (0 = unlimited).

    Keys that fall silent are forgotten once their window empties, so memory stays bounded by active visitors.
    """

    def __init__(self, limit: int, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        for key in [k for k, q in self._events.items() if not q or q[-1] <= now - self.window_s]:
            del self._events[key]

    def retry_after(self, key: str) -> float:
        """Seconds until `key` may act again; 0 when it may act now."""
        if self.limit <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            events = self._events.get(key)
            while events and events[0] <= now - self.window_s:
                events.popleft()
            if not events or len(events) < self.limit:
                return 0.0
            return events[0] + self.window_s - now

    def record(self, key: str) -> None:
        if self.limit <= 0:
            return
        now = self.clock()
        with self._lock:
            if len(self._events) > 10_000:
                self._prune(now)
            self._events.setdefault(key, deque()).append(now)


class SessionVoteCounter:
    """Human votes stored per session, read from the preference database itself, so the cap survives restarts.

    Its own read-only connection: counting is a read, and the store's connection serialises writes behind a lock.
    """

    def __init__(self, db_path: str | Path):
        self.db_path = Path(db_path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __call__(self, session_id: str) -> int:
        with self._lock:
            if self._conn is None:
                self._conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, check_same_thread=False,
                                             timeout=5.0)
            return self._conn.execute("SELECT COUNT(*) FROM votes WHERE session_id = ? AND source = 'human'",
                                      (session_id,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def client_key(host: str | None, headers: Mapping[str, str] | None = None) -> str:
    """The visitor's address: behind Spaces' proxy every request comes from the proxy, and the visitor is the
    first entry of X-Forwarded-For.

    The header can be forged when the app is reached directly, so it is only trusted when the direct peer is not
    a public address (a proxy on a private network or this machine), as Spaces' proxy is.
    """
    forwarded = (headers or {}).get("x-forwarded-for", "")
    first = forwarded.split(",")[0].strip()
    if first and _is_private(host or ""):
        return first
    return host or "unknown"


def _is_private(host: str) -> bool:
    import ipaddress

    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host in ("localhost", "")
    return address.is_private or address.is_loopback


def _wait_words(seconds: float) -> str:
    return f"{max(1, round(seconds))} s"


class Limits:
    """The app's limits in one place; `check_*` raise LimitExceededError before anything is generated or stored."""

    def __init__(self, cfg: LimitsConfig, count_session_votes: Callable[[str], int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.count_session_votes = count_session_votes
        self.session_votes = SlidingWindowLimiter(cfg.votes_per_minute, clock=clock)
        self.client_votes = SlidingWindowLimiter(cfg.client_votes_per_minute, clock=clock)
        self.session_chats = SlidingWindowLimiter(cfg.chats_per_minute, clock=clock)
        self.client_chats = SlidingWindowLimiter(cfg.client_chats_per_minute, clock=clock)
        self._lock = threading.Lock()  # check-then-record must be one step, or two threads both pass at the edge

    def _check(self, what: str, pairs: list[tuple[SlidingWindowLimiter, str, str]]) -> None:
        """An empty key is an internal caller (benchmarks, the simulator), not a visitor: not limited."""
        pairs = [(limiter, key, whose) for limiter, key, whose in pairs if key]
        with self._lock:
            for limiter, key, whose in pairs:
                wait = limiter.retry_after(key)
                if wait > 0:
                    raise LimitExceededError(
                        f"Too many {what} from {whose}: at most {limiter.limit} per minute. "
                        f"Try again in {_wait_words(wait)}.")
            for limiter, key, _ in pairs:
                limiter.record(key)

    def check_chat(self, session_id: str, client: str = "") -> None:
        self._check("messages", [(self.session_chats, session_id, "this session"),
                                 (self.client_chats, client, "your address")])

    def check_vote(self, session_id: str, client: str = "") -> None:
        cap = self.cfg.max_votes_per_session
        if cap > 0 and session_id and self.count_session_votes is not None \
                and self.count_session_votes(session_id) >= cap:
            raise LimitExceededError(f"This session has already cast {cap} votes, the most one session may "
                                     "contribute. Thank you! Further votes are not recorded.")
        self._check("votes", [(self.session_votes, session_id, "this session"),
                              (self.client_votes, client, "your address")])

    def close(self) -> None:
        if isinstance(self.count_session_votes, SessionVoteCounter):
            self.count_session_votes.close()

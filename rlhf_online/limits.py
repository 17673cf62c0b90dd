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
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from pathlib import Path

from rlhf_online.config import LimitsConfig

WINDOW_S = 60.0
MAX_KNOWN_SESSIONS = 100_000  # (client, session) pairs remembered; the oldest are forgotten first


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


MAX_KEY_CHARS = 64


def client_key(host: str | None, headers: Mapping[str, str] | None = None, trusted_proxies: int = 0) -> str:
    """The visitor's address: the right-most X-Forwarded-For entry that none of our own proxies wrote.

    Each proxy appends the address it received the request from, so with `trusted_proxies` proxies in front of
    the app the last `trusted_proxies - 1` entries were written by our proxies (and the direct peer is the first
    proxy), and the entry just before them is the visitor. Everything further left came from the client and can
    say anything: taking the first entry, as before, let a client pick its own key and reset its limits. With no
    trusted proxy the header is ignored altogether.
    """
    forwarded = (headers or {}).get("x-forwarded-for", "") if trusted_proxies > 0 else ""
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()] + [host or "unknown"]
    return hops[max(0, len(hops) - 1 - trusted_proxies)][:MAX_KEY_CHARS]


def trusted_proxy_count(cfg: LimitsConfig, environ: Mapping[str, str]) -> int:
    """The configured number, or for -1 (auto): 1 on Hugging Face Spaces (its front proxy), else 0."""
    if cfg.trusted_proxies >= 0:
        return cfg.trusted_proxies
    return 1 if environ.get("SPACE_ID") else 0


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
        self.client_sessions = SlidingWindowLimiter(cfg.client_sessions_per_hour, window_s=3600.0, clock=clock)
        self._known_sessions: OrderedDict[tuple[str, str], None] = OrderedDict()  # (client, session), newest last
        self._lock = threading.Lock()  # check-then-record must be one step, or two threads both pass at the edge

    def _check(self, what: str, pairs: list[tuple[SlidingWindowLimiter, str, str]], session: str = "",
               client: str = "") -> None:
        """An empty key is an internal caller (benchmarks, the simulator), not a visitor: not limited.

        The session is chosen by the client (Gradio's session_hash), so a script could start a fresh one per
        request and never meet a per-session limit; the first request of each new session therefore also counts
        against its address's `client_sessions_per_hour`.
        """
        pairs = [(limiter, key, whose) for limiter, key, whose in pairs if key]
        with self._lock:
            new_session = bool(session and client) and (client, session) not in self._known_sessions
            if new_session:
                wait = self.client_sessions.retry_after(client)
                if wait > 0:
                    raise LimitExceededError(
                        f"Too many new sessions from your address: at most {self.client_sessions.limit} per hour. "
                        f"Keep using the page you have open, or try again in {_wait_words(wait)}.")
            for limiter, key, whose in pairs:
                wait = limiter.retry_after(key)
                if wait > 0:
                    raise LimitExceededError(
                        f"Too many {what} from {whose}: at most {limiter.limit} per minute. "
                        f"Try again in {_wait_words(wait)}.")
            for limiter, key, _ in pairs:
                limiter.record(key)
            if new_session:
                self.client_sessions.record(client)
                self._known_sessions[(client, session)] = None
                while len(self._known_sessions) > MAX_KNOWN_SESSIONS:
                    self._known_sessions.popitem(last=False)

    def check_chat(self, session_id: str, client: str = "") -> None:
        self._check("messages", [(self.session_chats, session_id, "this session"),
                                 (self.client_chats, client, "your address")], session_id, client)

    def check_vote(self, session_id: str, client: str = "") -> None:
        cap = self.cfg.max_votes_per_session
        if cap > 0 and session_id and self.count_session_votes is not None \
                and self.count_session_votes(session_id) >= cap:
            raise LimitExceededError(f"This session has already cast {cap} votes, the most one session may "
                                     "contribute. Thank you! Further votes are not recorded.")
        self._check("votes", [(self.session_votes, session_id, "this session"),
                              (self.client_votes, client, "your address")], session_id, client)

    def close(self) -> None:
        if isinstance(self.count_session_votes, SessionVoteCounter):
            self.count_session_votes.close()


# ---- request size ----------------------------------------------------------------------------------------------

class RequestSizeLimit:
    """ASGI middleware: refuse a request body larger than `max_bytes` with 413 before it is read in full.

    A declared Content-Length over the limit is refused without reading a byte. A body without one (chunked) is
    read here, up to the limit, and refused the moment it passes it; a smaller one is handed on as it was
    (the web framework would turn an error raised while it reads the body into a 400 instead). Written by hand
    because neither Gradio nor Starlette caps request bodies (Gradio's max_file_size covers uploads only), and the
    JSON of an API call is parsed whole, whatever its size.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.max_bytes <= 0:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                return await self._refuse(send)
            return await self.app(scope, receive, send)  # the server never delivers more than it declared
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            return await self.app(scope, receive, send)  # no body
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = (f'{{"error": "request too large: at most {self.max_bytes // 1024} KB"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def server_middleware(cfg: LimitsConfig) -> list:
    """What the web server wraps every request in (for FastAPI's `middleware=`, via Gradio's app_kwargs)."""
    from starlette.middleware import Middleware

    return [Middleware(RequestSizeLimit, max_bytes=cfg.max_request_kb * 1024)]

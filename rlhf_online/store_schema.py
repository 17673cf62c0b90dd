"""The preference database's schema and its migrations, and the transaction every write runs in.

The schema grows by appending to `MIGRATIONS` (SQL text or a function); a file records how many it has had, so
opening an older file upgrades it step by step, one transaction per step, and a file written by newer code is
refused instead of being corrupted. The data access on top is `store.PreferenceStore`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager


_V1_TABLES = """
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    turn INTEGER NOT NULL,
    session_id TEXT,
    messages_json TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    version_a TEXT NOT NULL,
    version_b TEXT NOT NULL,
    sampling_json TEXT NOT NULL,
    placement TEXT,
    created_at REAL NOT NULL,
    reward_a REAL,
    reward_b REAL
);
CREATE INDEX idx_pairs_messages ON pairs(messages_json);
CREATE TABLE votes (
    id INTEGER PRIMARY KEY,
    pair_id INTEGER NOT NULL UNIQUE REFERENCES pairs(id),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    better_answer TEXT,
    session_id TEXT,
    source TEXT NOT NULL DEFAULT 'human',
    judge TEXT,
    weight REAL NOT NULL DEFAULT 1.0,
    created_at REAL NOT NULL
);
CREATE TABLE preferences (
    id INTEGER PRIMARY KEY,
    vote_id INTEGER REFERENCES votes(id),
    pair_id INTEGER REFERENCES pairs(id),
    prompt_json TEXT NOT NULL,
    chosen TEXT NOT NULL,
    rejected TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('human', 'ai', 'import')),
    weight REAL NOT NULL DEFAULT 1.0,
    created_at REAL NOT NULL
);
CREATE TABLE demonstrations (
    id INTEGER PRIMARY KEY,
    vote_id INTEGER REFERENCES votes(id),
    prompt_json TEXT NOT NULL,
    answer TEXT NOT NULL,
    session_id TEXT,
    source TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE metrics (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    values_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX idx_metrics_kind ON metrics(kind, id);
CREATE TABLE control (
    key TEXT PRIMARY KEY,
    value TEXT
);
"""


def _add_reward_model_version(conn: sqlite3.Connection) -> None:
    """Record which reward adapter scored a pair, so scores from a stale reward model can be told apart.

    Also indexes preferences by source, which the counts shown in the UI group by on every refresh.
    """
    columns = {row[1] for row in conn.execute("PRAGMA table_info(pairs)")}
    if "reward_model_version" not in columns:
        conn.execute("ALTER TABLE pairs ADD COLUMN reward_model_version TEXT")
    conn.execute("CREATE INDEX IF NOT EXISTS idx_preferences_source ON preferences(source)")


def _one_vote_per_pair_and_source(conn: sqlite3.Connection) -> None:
    """Let a pair carry one human vote *and* one AI label (version 2 allowed one vote per pair).

    SQLite cannot drop a UNIQUE constraint, so the table is rebuilt as its documented ALTER procedure says (new
    table, copy, drop, rename; `migrate` turns foreign keys off around it); vote ids are kept, so the
    preferences and demonstrations that point at them stay valid, which the foreign-key check confirms.
    """
    conn.execute("""CREATE TABLE votes_v3 (
        id INTEGER PRIMARY KEY,
        pair_id INTEGER NOT NULL REFERENCES pairs(id),
        choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
        better_answer TEXT,
        session_id TEXT,
        source TEXT NOT NULL DEFAULT 'human' CHECK (source IN ('human', 'ai')),
        judge TEXT,
        weight REAL NOT NULL DEFAULT 1.0,
        created_at REAL NOT NULL,
        UNIQUE (pair_id, source)
    )""")
    conn.execute("INSERT INTO votes_v3 (id, pair_id, choice, better_answer, session_id, source, judge, weight, "
                 "created_at) SELECT id, pair_id, choice, better_answer, session_id, source, judge, weight, "
                 "created_at FROM votes")
    conn.execute("DROP TABLE votes")
    conn.execute("ALTER TABLE votes_v3 RENAME TO votes")
    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise sqlite3.IntegrityError(f"votes rebuild left {len(broken)} dangling references; nothing was changed")


def _add_pair_token(conn: sqlite3.Connection) -> None:
    """An unguessable token per pair shown, which the API hands out instead of the sequential row id, so nobody
    can name (and vote on) a pair that was not shown to them. Older pairs keep NULL: they can no longer be voted
    on from outside, which is the point."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(pairs)")}
    if "token" not in columns:
        conn.execute("ALTER TABLE pairs ADD COLUMN token TEXT")
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS idx_pairs_token ON pairs(token)")


MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    _V1_TABLES,
    _add_reward_model_version,
    _one_vote_per_pair_and_source,
    _add_pair_token,
]
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaVersionError(RuntimeError):
    """The file was written by newer code; opening it with this code could corrupt it."""


def _statements(sql: str) -> Iterator[str]:
    """Split a script into statements so each runs inside our transaction.

    ``executescript`` would commit on its own and leave a half-applied migration after an error.
    """
    pending = ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:80]!r}")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``with conn:`` semantics, but taking the write lock up front.

    ``BEGIN IMMEDIATE`` makes a second process wait (``busy_timeout``) at the start instead of failing halfway
    through with a lock upgrade error, and covers DDL, which Python's implicit transactions do not.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # SQLite rolls back by itself on some errors (disk full, I/O); a second ROLLBACK would mask the cause.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _schema_version(conn: sqlite3.Connection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema up to ``target``, one migration per transaction, and return the resulting version.

    Each step commits together with its version number, so a crash between steps resumes cleanly; the version
    is re-read under the write lock so two processes opening a fresh file do not both migrate it.
    """
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"target schema version must be between 0 and {SCHEMA_VERSION}, got {target}")
    # Rebuilding a table drops one that others reference; SQLite's ALTER procedure does that with foreign keys
    # off (the pragma is ignored inside a transaction, hence here) and checks them before committing.
    foreign_keys = conn.execute("PRAGMA foreign_keys").fetchone()[0]
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        while True:
            with transaction(conn):
                current = _schema_version(conn)
                if current > SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"the preference database has schema version {current}, but this code only knows "
                        f"versions up to {SCHEMA_VERSION}; upgrade rlhf_online before opening it")
                if current >= target:
                    return current
                step = MIGRATIONS[current]
                if callable(step):
                    step(conn)
                else:
                    for statement in _statements(step):
                        conn.execute(statement)
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                             "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(current + 1),))
    finally:
        conn.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")

"""The durable preference store: every answer pair shown, every vote, and the training rows derived from them.

One SQLite file is shared by the Gradio app (many worker threads) and the trainer (another process). WAL lets
the trainer read while the app writes; ``synchronous=FULL`` makes an acknowledged vote survive a crash or power
loss; every write is one short ``BEGIN IMMEDIATE`` transaction so the two processes never wait long on each
other and nothing is ever half-written.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_online.conversation import Message, answer_text, normalize_prompt, split_hh_transcript
from rlhf_online.store_schema import SCHEMA_VERSION, migrate, transaction
from rlhf_online.versions import version_order

DB_FILENAME = "preferences.sqlite"

CHOICES = ("a", "b", "tie", "both_bad")
VOTE_SOURCES = ("human", "ai")
PREFERENCE_SOURCES = ("human", "ai", "import")
AI_PLACEMENT = "ai_generated"  # placement of pairs the trainer sampled for the AI judge; nobody was shown them


def parse_choice(choice: Any) -> str:
    """The one check of a vote's choice, for every way a vote arrives (page, API, arena, AI judge): case and
    surrounding spaces are forgiven; anything else is a ValueError that names the valid choices."""
    key = str(choice or "").strip().lower()
    if key not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    return key


def store_path(data_dir: str | Path) -> Path:
    """Where the app, the trainer and the exporter all find the same database inside a data folder."""
    return Path(data_dir) / DB_FILENAME


class UnknownPairError(ValueError):
    """A vote names a pair that was never recorded (stale page, forged request)."""


class StoreWriteError(RuntimeError):
    """A write could not be committed (disk full, file locked or read-only); nothing was saved."""


def _describe_failure(error: sqlite3.Error) -> str:
    """Words a person can act on, instead of SQLite's error codes."""
    text = str(error).lower()
    if "full" in text:
        return "disk full"
    if "locked" in text or "busy" in text:
        return "the database is locked by another process"
    if "readonly" in text or "read-only" in text:
        return "the database file is read-only"
    return str(error)


# ---------------------------------------------------------------------------------------------------------------
# Returned records
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    id: int
    conversation_id: str
    turn: int
    session_id: str | None
    messages: list[Message]
    answer_a: str
    answer_b: str
    version_a: str
    version_b: str
    sampling: dict
    placement: str | None
    created_at: float
    reward_a: float | None
    reward_b: float | None
    reward_model_version: str | None = None
    token: str | None = None  # what the API names the pair by (see _add_pair_token); None for AI-made pairs


@dataclass(frozen=True)
class VoteReceipt:
    """A saved vote (or, with `duplicate`, the earlier one that counted) and its pair as read in the vote's
    transaction: versions, answers, and the reward model's scores once the trainer has scored it."""

    vote_id: int
    choice: str
    duplicate: bool
    pair: Pair

    @property
    def pair_id(self) -> int:
        return self.pair.id

    @property
    def version_a(self) -> str:
        return self.pair.version_a

    @property
    def version_b(self) -> str:
        return self.pair.version_b


@dataclass(frozen=True)
class Preference:
    id: int
    prompt: list[Message]
    chosen: str
    rejected: str
    source: str
    weight: float
    judge: str | None = None  # AI labels: "<judge id>@<constitution version>"


@dataclass(frozen=True)
class Demonstration:
    id: int
    vote_id: int | None
    prompt: list[Message]
    answer: str
    session_id: str | None
    source: str
    created_at: float


@dataclass(frozen=True)
class ImportResult:
    imported: int
    skipped: int


@dataclass(frozen=True)
class Metric:
    id: int
    kind: str
    step: int
    values: dict
    created_at: float


@dataclass(frozen=True)
class VersionRecord:
    """Head-to-head human votes of ``newer`` against ``older``."""

    newer: str
    older: str
    wins: int
    losses: int
    ties: int

    @property
    def total(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float:
        """Ties count half, so 0.5 means "no better than its predecessor"."""
        return (self.wins + 0.5 * self.ties) / self.total if self.total else 0.0


def _dumps(value: Any) -> str:
    """Deterministic JSON so that equal conversations are equal strings (``recent_prompts`` dedupes on it)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _preference_pairs(choice: str, answer_a: str, answer_b: str, better: str | None) -> list[tuple[str, str]]:
    """(chosen, rejected) rows implied by a vote.

    A written better answer is preferred over each shown answer that differs from it, so a person's own text
    teaches the reward model even on ties and "both bad". Rows whose two sides are equal carry no signal.
    """
    rows: list[tuple[str, str]] = []
    if choice == "a":
        rows.append((answer_a, answer_b))
    elif choice == "b":
        rows.append((answer_b, answer_a))
    if better is not None:
        rows.extend((better, shown) for shown in (answer_a, answer_b) if shown != better)
    unique: list[tuple[str, str]] = []
    for chosen, rejected in rows:
        if chosen != rejected and (chosen, rejected) not in unique:
            unique.append((chosen, rejected))
    return unique


def _import_row(record: Any) -> tuple[list[Message], str, str, float]:
    """Read one import record (HH raw, HH full transcript, or TRL conversational) as prompt/chosen/rejected."""
    if not isinstance(record, dict):
        raise ValueError("record must be a JSON object")
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if prompt is None and isinstance(chosen, str):
        prompt, chosen = split_hh_transcript(chosen)
        rejected_prompt, rejected = split_hh_transcript(rejected)
        if rejected_prompt != prompt:
            raise ValueError("chosen and rejected transcripts do not share a prompt")
    elif prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        # TRL "implicit prompt": the shared prefix of the two conversations is the prompt.
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise ValueError("implicit-prompt record: chosen and rejected must share all but the last message")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    weight = float(record.get("weight", 1.0))
    return normalize_prompt(prompt), answer_text(chosen), answer_text(rejected), weight


# ---------------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------------

class PreferenceStore:
    """Thread-safe access to one preference database file."""

    def __init__(self, path: str | Path, *, _target_version: int = SCHEMA_VERSION) -> None:
        """Open (creating if needed) and migrate. ``_target_version`` exists so tests can build old files."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so DDL and DML share one transaction model.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self.schema_version = migrate(self._conn, _target_version)
        except BaseException:
            self._conn.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------------------

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One committed transaction; SQLite failures become a StoreWriteError the UI can show as is."""
        with self._lock:
            try:
                with transaction(self._conn) as conn:
                    yield conn
            except sqlite3.OperationalError as error:
                raise StoreWriteError(f"could not {action}: {_describe_failure(error)}") from error

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    # -- pairs and votes ------------------------------------------------------------------------------------

    def record_pair(self, *, conversation_id: str, turn: int, messages: list[Message], answer_a: str,
                    answer_b: str, version_a: str, version_b: str, sampling: dict, session_id: str | None,
                    placement: str | None, token: str | None = None) -> int:
        """Store a pair before it is shown, so a vote can only ever refer to answers we really displayed."""
        clean = normalize_prompt(messages)
        with self._write("save the answers") as conn:
            row = {"conversation_id": conversation_id, "turn": int(turn), "session_id": session_id,
                   "messages_json": _dumps(clean), "answer_a": answer_a, "answer_b": answer_b,
                   "version_a": version_a, "version_b": version_b, "sampling_json": _dumps(sampling),
                   "placement": placement, "created_at": time.time()}
            if token is not None:  # (a file kept at an older schema by the migration tests has no token column)
                row["token"] = token
            cursor = conn.execute(f"INSERT INTO pairs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                  tuple(row.values()))
            return int(cursor.lastrowid)

    def get_pair(self, pair_id: int) -> Pair | None:
        rows = self._read("SELECT * FROM pairs WHERE id = ?", (pair_id,))
        return self._pair(rows[0]) if rows else None

    def get_pair_by_token(self, token: str) -> Pair | None:
        rows = self._read("SELECT * FROM pairs WHERE token = ?", (token,)) if token else []
        return self._pair(rows[0]) if rows else None

    @staticmethod
    def _pair(row: sqlite3.Row) -> Pair:
        return Pair(
            id=row["id"], conversation_id=row["conversation_id"], turn=row["turn"], session_id=row["session_id"],
            messages=json.loads(row["messages_json"]), answer_a=row["answer_a"], answer_b=row["answer_b"],
            version_a=row["version_a"], version_b=row["version_b"], sampling=json.loads(row["sampling_json"]),
            placement=row["placement"], created_at=row["created_at"], reward_a=row["reward_a"],
            reward_b=row["reward_b"],
            reward_model_version=row["reward_model_version"] if "reward_model_version" in row.keys() else None,
            token=row["token"] if "token" in row.keys() else None)

    def record_vote(self, *, pair_id: int, choice: str, better_answer: str | None = None,
                    session_id: str | None, source: str = "human", judge: str | None = None,
                    weight: float = 1.0) -> VoteReceipt:
        """Save a vote and its training rows atomically; a repeated vote on a pair is a no-op.

        Double clicks and replayed requests must not count twice, so the first vote wins and its receipt is
        returned again with ``duplicate=True``. A pair holds at most one vote per source: one human vote and
        one AI label. An AI label on a pair a person already voted on is kept only to measure agreement; the
        person's verdict is the training pair.
        """
        choice = parse_choice(choice)
        if source not in VOTE_SOURCES:
            raise ValueError(f"vote source must be one of {', '.join(VOTE_SOURCES)}, got {source!r}")
        better = better_answer.strip() if isinstance(better_answer, str) and better_answer.strip() else None
        with self._write("save your vote") as conn:
            pair = conn.execute("SELECT * FROM pairs WHERE id = ?", (pair_id,)).fetchone()
            if pair is None:
                raise UnknownPairError(f"no answer pair with id {pair_id}; reload the page and vote again")
            if source == "human" and pair["placement"] == AI_PLACEMENT:
                raise UnknownPairError(f"pair {pair_id} was made for the AI judge and shown to nobody: it takes no "
                                       "human votes")
            earlier = conn.execute("SELECT id, choice FROM votes WHERE pair_id = ? AND source = ?",
                                   (pair_id, source)).fetchone()
            if earlier is not None:
                return VoteReceipt(earlier["id"], earlier["choice"], duplicate=True, pair=self._pair(pair))
            now = time.time()
            vote_id = conn.execute(
                "INSERT INTO votes (pair_id, choice, better_answer, session_id, source, judge, weight, created_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (pair_id, choice, better, session_id, source, judge, float(weight), now)).lastrowid
            human_voted = source == "ai" and conn.execute(
                "SELECT 1 FROM votes WHERE pair_id = ? AND source = 'human'", (pair_id,)).fetchone() is not None
            for chosen, rejected in ([] if human_voted else
                                     _preference_pairs(choice, pair["answer_a"], pair["answer_b"], better)):
                conn.execute(
                    "INSERT INTO preferences (vote_id, pair_id, prompt_json, chosen, rejected, source, weight, "
                    "created_at) VALUES (?,?,?,?,?,?,?,?)",
                    (vote_id, pair_id, pair["messages_json"], chosen, rejected, source, float(weight), now))
            if better is not None:
                conn.execute(
                    "INSERT INTO demonstrations (vote_id, prompt_json, answer, session_id, source, created_at) "
                    "VALUES (?,?,?,?,?,?)", (vote_id, pair["messages_json"], better, session_id, source, now))
            return VoteReceipt(int(vote_id), choice, duplicate=False, pair=self._pair(pair))

    def set_reward_scores(self, pair_id: int, reward_a: float, reward_b: float, *,
                          reward_model_version: str | None = None) -> None:
        """Attach the reward model's scores to a pair, for display and for checking the model against votes."""
        with self._write("save the reward scores") as conn:
            if reward_model_version is None:
                cursor = conn.execute("UPDATE pairs SET reward_a = ?, reward_b = ? WHERE id = ?",
                                      (reward_a, reward_b, pair_id))
            else:
                cursor = conn.execute(
                    "UPDATE pairs SET reward_a = ?, reward_b = ?, reward_model_version = ? WHERE id = ?",
                    (reward_a, reward_b, reward_model_version, pair_id))
            if cursor.rowcount == 0:
                raise UnknownPairError(f"no answer pair with id {pair_id}")

    # -- training views -------------------------------------------------------------------------------------

    def latest_scored_vote(self) -> tuple[Pair, str] | None:
        """The newest human-voted pair the reward model has scored, with the person's choice: the panel shows
        how the reward model's scores compare with the vote (the reveal right after a vote comes too early)."""
        rows = self._read("SELECT p.*, v.choice AS vote_choice FROM pairs p JOIN votes v ON v.pair_id = p.id "
                          "AND v.source = 'human' WHERE p.reward_a IS NOT NULL ORDER BY v.id DESC LIMIT 1")
        return (self._pair(rows[0]), rows[0]["vote_choice"]) if rows else None

    def unscored_voted_pairs(self, limit: int = 32) -> list[Pair]:
        """Voted pairs the reward model has not scored yet, so the UI can show each answer's reward."""
        rows = self._read("SELECT * FROM pairs WHERE reward_a IS NULL AND EXISTS (SELECT 1 FROM votes "
                          "WHERE votes.pair_id = pairs.id) ORDER BY id DESC LIMIT ?", (int(limit),))
        return [self._pair(row) for row in rows]

    def latest_metrics(self, kind: str, limit: int = 500) -> list[Metric]:
        """The newest `limit` metrics of a kind, oldest first (for plots that must not grow without bound)."""
        rows = self._read("SELECT * FROM (SELECT * FROM metrics WHERE kind = ? ORDER BY id DESC LIMIT ?) "
                          "ORDER BY id", (kind, int(limit)))
        return [Metric(row["id"], row["kind"], row["step"], json.loads(row["values_json"]), row["created_at"])
                for row in rows]

    def recent_prompts(self, limit: int = 50) -> list[list[Message]]:
        """Conversations people actually had, newest first and without repeats, for PPO rollouts."""
        rows = self._read("SELECT messages_json, MAX(id) AS newest FROM pairs GROUP BY messages_json "
                          "ORDER BY newest DESC LIMIT ?", (int(limit),))
        return [json.loads(row["messages_json"]) for row in rows]

    def preferences_since(self, after_id: int = 0, limit: int | None = None) -> list[Preference]:
        """Rows after a cursor, so the reward trainer can consume new votes incrementally."""
        rows = self._read("SELECT p.id, p.prompt_json, p.chosen, p.rejected, p.source, p.weight, v.judge "
                          "FROM preferences p LEFT JOIN votes v ON v.id = p.vote_id "
                          "WHERE p.id > ? ORDER BY p.id LIMIT ?", (after_id, -1 if limit is None else limit))
        return [Preference(row["id"], json.loads(row["prompt_json"]), row["chosen"], row["rejected"],
                           row["source"], row["weight"], row["judge"]) for row in rows]

    def recent_preferences(self, limit: int = 200) -> list[Preference]:
        """The newest preference rows, newest first: the pairs PPO's DPO term draws from (recent votes are on
        the answers of recent versions, the closest to the policy being trained)."""
        oldest_kept = self._read("SELECT id FROM preferences ORDER BY id DESC LIMIT 1 OFFSET ?",
                                 (max(0, int(limit) - 1),))  # none: fewer rows than the limit, keep them all
        after = oldest_kept[0]["id"] - 1 if oldest_kept else 0
        return list(reversed(self.preferences_since(after)))

    def demonstrations(self, limit: int | None = None) -> list[Demonstration]:
        rows = self._read("SELECT * FROM demonstrations ORDER BY id LIMIT ?", (-1 if limit is None else limit,))
        return [Demonstration(row["id"], row["vote_id"], json.loads(row["prompt_json"]), row["answer"],
                              row["session_id"], row["source"], row["created_at"]) for row in rows]

    def import_preferences(self, records: Iterable[Any], source: str = "import") -> ImportResult:
        """Seed the store from a dataset in one transaction; malformed records are counted, not fatal.

        Parsing happens before the transaction so that one bad line costs only itself, and the write lock is
        held only for the inserts.
        """
        if source not in PREFERENCE_SOURCES:
            raise ValueError(f"preference source must be one of {', '.join(PREFERENCE_SOURCES)}, got {source!r}")
        rows, skipped = [], 0
        now = time.time()
        for record in records:
            try:
                prompt, chosen, rejected, weight = _import_row(record)
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            if chosen == rejected:
                skipped += 1
                continue
            rows.append((_dumps(prompt), chosen, rejected, source, weight, now))
        with self._write("import the preferences") as conn:
            conn.executemany("INSERT INTO preferences (prompt_json, chosen, rejected, source, weight, created_at)"
                             " VALUES (?,?,?,?,?,?)", rows)
        return ImportResult(imported=len(rows), skipped=skipped)

    # -- dashboards -----------------------------------------------------------------------------------------

    def counts(self) -> dict:
        """Totals for the UI: every vote kind and every source appears, zero included, so the layout is stable.

        Votes are people's; AI labels are counted apart, in `feedback_counts`.
        """
        votes = dict.fromkeys(CHOICES, 0)
        votes.update({row[0]: row[1] for row in self._read("SELECT choice, COUNT(*) FROM votes "
                                                           "WHERE source = 'human' GROUP BY choice")})
        preferences = dict.fromkeys(PREFERENCE_SOURCES, 0)
        preferences.update({row[0]: row[1] for row in
                            self._read("SELECT source, COUNT(*) FROM preferences GROUP BY source")})
        return {
            "pairs_shown": self._read("SELECT COUNT(*) FROM pairs WHERE placement IS NOT ?", (AI_PLACEMENT,))[0][0],
            "votes": votes,
            "demonstrations": self._read("SELECT COUNT(*) FROM demonstrations")[0][0],
            "preferences": preferences,
        }

    def pairs_awaiting_ai_label(self, limit: int = 8) -> list[Pair]:
        """Pairs people were shown that the AI judge has not labelled yet, newest first.

        Unvoted ones get a training label from the judge; voted ones give the human-AI agreement.
        """
        rows = self._read("SELECT * FROM pairs WHERE placement IS NOT ? AND NOT EXISTS (SELECT 1 FROM votes v "
                          "WHERE v.pair_id = pairs.id AND v.source = 'ai') ORDER BY id DESC LIMIT ?",
                          (AI_PLACEMENT, int(limit)))
        return [self._pair(row) for row in rows]

    def feedback_counts(self) -> dict:
        """Votes by source, AI abstentions, and how often the AI judge agreed with people on the same pairs.

        Agreement counts pairs where both a person and the judge picked a side (ties, "both bad" and the
        judge's abstentions, stored as ties, say nothing about which side is better).
        """
        votes = dict.fromkeys(VOTE_SOURCES, 0)
        votes.update({row[0]: row[1] for row in self._read("SELECT source, COUNT(*) FROM votes GROUP BY source")})
        abstained = self._read("SELECT COUNT(*) FROM votes WHERE source = 'ai' AND choice = 'tie'")[0][0]
        both, agree = self._read(
            "SELECT COUNT(*), COALESCE(SUM(h.choice = a.choice), 0) FROM votes h JOIN votes a "
            "ON a.pair_id = h.pair_id AND a.source = 'ai' WHERE h.source = 'human' "
            "AND h.choice IN ('a', 'b') AND a.choice IN ('a', 'b')")[0]
        return {"votes": votes, "ai_abstained": abstained, "agreement": {"pairs": both, "agree": agree}}

    def version_win_rates(self, source: str | None = "human") -> list[VersionRecord]:
        """How often each adapter version beat the older version it was shown against.

        Only votes from ``source`` count (default human: the point is what people think, not the AI judge).
        """
        sql = ("SELECT p.version_a, p.version_b, v.choice FROM votes v JOIN pairs p ON p.id = v.pair_id "
               "WHERE p.version_a != p.version_b")
        params: tuple = ()
        if source is not None:
            sql += " AND v.source = ?"
            params = (source,)
        tally: dict[tuple[str, str], list[int]] = {}
        for version_a, version_b, choice in self._read(sql, params):
            newer_is_a = version_order(version_a) > version_order(version_b)
            newer, older = (version_a, version_b) if newer_is_a else (version_b, version_a)
            counts = tally.setdefault((newer, older), [0, 0, 0])
            if choice in ("tie", "both_bad"):
                counts[2] += 1
            else:
                counts[0 if (choice == "a") == newer_is_a else 1] += 1
        return [VersionRecord(newer, older, *counts) for (newer, older), counts in
                sorted(tally.items(), key=lambda item: (version_order(item[0][0]), version_order(item[0][1])))]

    # -- metrics and control --------------------------------------------------------------------------------

    def record_metric(self, kind: str, step: int, values: dict) -> int:
        with self._write("save the training metrics") as conn:
            return int(conn.execute("INSERT INTO metrics (kind, step, values_json, created_at) VALUES (?,?,?,?)",
                                    (kind, int(step), _dumps(values), time.time())).lastrowid)

    def get_control(self, key: str, default: str | None = None) -> str | None:
        """Settings the app and the trainer exchange through the file (pause flags, current version...)."""
        rows = self._read("SELECT value FROM control WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_control(self, key: str, value: str) -> None:
        with self._write("save the setting") as conn:
            conn.execute("INSERT INTO control (key, value) VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def integrity_check(self) -> str:
        return self._read("PRAGMA integrity_check")[0][0]

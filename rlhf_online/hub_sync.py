"""Optional persistence to Hugging Face Hub repos: push preferences and adapters in the background, restore at start.

Why: a Space's local disk is wiped on every restart, and a mounted network volume is no place for SQLite (its
locking and fsync guarantees do not hold there). So the database stays on local disk, and a consistent snapshot
of it (SQLite's online backup API, never a raw copy of a file with a live WAL beside it), a readable JSONL of
the votes and the published adapter versions are copied into a staging folder and uploaded every few minutes.
A fresh start with no local database downloads the last snapshot first.

Why not `huggingface_hub.CommitScheduler`: it uploads a folder as it is on a timer, but the snapshot must be
taken right before each upload, and it creates the repo when constructed (a network call), which would make the
offline tests impossible. So the timer is ours and the upload is `HfApi.upload_folder`, behind an `Uploader`
that tests replace with a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Protocol

from rlhf_online.config import AppConfig
from rlhf_online.store import DB_FILENAME
from rlhf_online.versions import is_version_name

log = logging.getLogger(__name__)

VOTES_JSONL = "votes.jsonl"
ADAPTERS_FOLDER = "adapters"


class Uploader(Protocol):
    """The two Hub operations HubSync needs; `HubUploader` is the real one."""

    def push(self, folder: Path, repo_id: str, repo_type: str) -> None:
        """Make the repo's content equal to `folder` (one commit)."""

    def pull(self, repo_id: str, repo_type: str, into: Path) -> bool:
        """Download the repo's content into `into`; False when the repo does not exist yet."""


class PublicRepoError(RuntimeError):
    """The target repo exists and is public: people's conversations and votes would be published."""


class HubUploader:
    """huggingface_hub: private repos created on first push, the token passed explicitly (never logged).

    `create_repo(private=True, exist_ok=True)` leaves an existing public repo public, so every push first checks
    the repo's visibility and refuses a public one unless `allow_public` (the person deploying said so).
    """

    def __init__(self, token: str, allow_public: bool = False, api=None):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        self.api = api
        self.allow_public = allow_public

    def _check_or_create(self, repo_id: str, repo_type: str) -> None:
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            info = self.api.repo_info(repo_id, repo_type=repo_type)
        except RepositoryNotFoundError:
            self.api.create_repo(repo_id, repo_type=repo_type, private=True, exist_ok=True)
            return
        if not info.private and not self.allow_public:
            raise PublicRepoError(
                f"the Hub {repo_type} repo {repo_id} is public: not pushing people's conversations and votes to it. "
                "Make it private, or set --hub-allow-public (RLHF_HUB_ALLOW_PUBLIC=1) if publishing them is intended.")

    def push(self, folder: Path, repo_id: str, repo_type: str) -> None:
        self._check_or_create(repo_id, repo_type)  # every push: a repo can be made public after the first one
        # delete_patterns: versions pruned locally go from the repo too (files in this upload are kept)
        self.api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                               commit_message="rlhf_online: periodic snapshot",
                               delete_patterns=["v*/**", "adapters/**"])

    def pull(self, repo_id: str, repo_type: str, into: Path) -> bool:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            snapshot_download(repo_id, repo_type=repo_type, local_dir=str(into), token=self.api.token)
        except RepositoryNotFoundError:
            return False
        return True


def snapshot_database(db_path: Path, out_path: Path) -> int:
    """A consistent copy of a live database (committed transactions only), written atomically; returns votes."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10.0)
    target = sqlite3.connect(tmp)
    try:
        source.backup(target)
        votes = target.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
    finally:
        target.close()
        source.close()
    os.replace(tmp, out_path)
    return votes


def write_votes_jsonl(snapshot: Path, out_path: Path) -> None:
    """One readable line per vote (conversation, both answers, versions, choice), for browsing the dataset."""
    conn = sqlite3.connect(f"file:{snapshot}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for row in conn.execute(
                    "SELECT v.id, v.choice, v.better_answer, v.source, v.created_at, p.messages_json, p.answer_a, "
                    "p.answer_b, p.version_a, p.version_b FROM votes v JOIN pairs p ON p.id = v.pair_id ORDER BY v.id"):
                record = {"vote_id": row["id"], "messages": json.loads(row["messages_json"]),
                          "answer_a": row["answer_a"], "answer_b": row["answer_b"], "version_a": row["version_a"],
                          "version_b": row["version_b"], "choice": row["choice"],
                          "better_answer": row["better_answer"], "source": row["source"],
                          "created_at": row["created_at"]}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        conn.close()
    os.replace(tmp, out_path)


def mirror_versions(adapters_dir: Path, out_dir: Path) -> list[str]:
    """Make `out_dir` hold exactly the published version folders (versions never change once published)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    published = {p.name for p in adapters_dir.iterdir() if p.is_dir() and is_version_name(p.name)} \
        if adapters_dir.is_dir() else set()
    for stale in [p for p in out_dir.iterdir() if p.name not in published]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for name in sorted(published - {p.name for p in out_dir.iterdir()}):
        shutil.copytree(adapters_dir / name, out_dir / name)
    return sorted(published)


class HubSync:
    """Back up the store and adapters to the Hub every `interval_s`, and restore them into an empty data folder."""

    def __init__(self, data_dir: Path, adapters_dir: Path, dataset_repo: str, uploader: Uploader,
                 adapters_repo: str = "", interval_s: float = 600.0, staging_dir: Path | None = None):
        self.data_dir, self.adapters_dir = Path(data_dir), Path(adapters_dir)
        self.dataset_repo, self.adapters_repo = dataset_repo, adapters_repo
        self.uploader = uploader
        self.interval_s = interval_s
        self.staging = Path(staging_dir) if staging_dir else self.data_dir / ".hub_staging"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._push_lock = threading.Lock()
        self.pushes = 0

    @classmethod
    def from_config(cls, cfg: AppConfig, uploader: Uploader | None = None) -> HubSync | None:
        """None (and no log line) unless a dataset repo and a token are both configured."""
        hub = cfg.hub
        if not hub.hub_dataset_repo:
            return None
        if not hub.hf_token and uploader is None:
            log.warning("--hub-dataset-repo is set but HF_TOKEN is not: Hub sync is OFF")
            return None
        sync = cls(cfg.data_path, cfg.adapters_path, hub.hub_dataset_repo, uploader or HubUploader(hub.hf_token, hub.hub_allow_public),
                   adapters_repo=hub.hub_adapters_repo, interval_s=hub.hub_sync_minutes * 60)
        log.info("Hub sync ON: preferences -> dataset %s, adapters -> %s, every %.1f min; restore at start when "
                 "the local database is missing", hub.hub_dataset_repo,
                 f"model {hub.hub_adapters_repo}" if hub.hub_adapters_repo else "the same dataset",
                 hub.hub_sync_minutes)
        return sync

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_FILENAME

    def _folders(self) -> tuple[Path, Path]:
        dataset = self.staging / "dataset"
        adapters = self.staging / ADAPTERS_FOLDER if self.adapters_repo else dataset / ADAPTERS_FOLDER
        return dataset, adapters

    # ---- push -----------------------------------------------------------------------------------------------
    def push_once(self) -> int:
        """Snapshot and upload now; returns the votes in the snapshot. Raises on failure (the loop logs it)."""
        with self._push_lock:
            dataset, adapters = self._folders()
            votes = snapshot_database(self.db_path, dataset / DB_FILENAME)
            write_votes_jsonl(dataset / DB_FILENAME, dataset / VOTES_JSONL)
            mirror_versions(self.adapters_dir, adapters)
            self.uploader.push(dataset, self.dataset_repo, "dataset")
            if self.adapters_repo:
                self.uploader.push(adapters, self.adapters_repo, "model")
            self.pushes += 1
            log.info("pushed %d votes and the adapters to the Hub", votes)
            return votes

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.push_once()
            except Exception:
                log.exception("Hub push failed; retrying in %.0f s (local data is unaffected)", self.interval_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hub-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer and push once more, so a clean shutdown loses nothing recorded before it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.push_once()
        except Exception:
            log.exception("final Hub push failed")

    # ---- restore --------------------------------------------------------------------------------------------
    def restore_at_start(self) -> bool:
        """Download the last snapshot into an empty data folder; never overwrite a local database.

        Returns True when something was restored. A snapshot that fails SQLite's integrity check is refused, and
        so is a download that fails: starting empty would push an empty snapshot over the good one.
        """
        if self.db_path.exists():
            log.info("local database %s exists: not restoring from the Hub", self.db_path)
            return False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.data_dir, prefix=".hub_restore-") as tmp:
            dataset = Path(tmp) / "dataset"
            if not self.uploader.pull(self.dataset_repo, "dataset", dataset) or \
                    not (dataset / DB_FILENAME).is_file():
                log.info("no snapshot in %s yet: starting with an empty database", self.dataset_repo)
                return False
            _check_integrity(dataset / DB_FILENAME)
            adapters = dataset / ADAPTERS_FOLDER
            if self.adapters_repo:
                adapters = Path(tmp) / "adapters"
                self.uploader.pull(self.adapters_repo, "model", adapters)
            restored = self._restore_versions(adapters)
            os.replace(dataset / DB_FILENAME, self.db_path)  # same file system (tmp is inside data_dir): atomic
        log.info("restored the preference database and %d adapter versions from %s", restored, self.dataset_repo)
        return True

    def _restore_versions(self, source: Path) -> int:
        if not source.is_dir():
            return 0
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        count = 0
        for folder in sorted(source.iterdir()):
            target = self.adapters_dir / folder.name
            if folder.is_dir() and is_version_name(folder.name) and not target.exists():
                shutil.copytree(folder, target)
                count += 1
        return count


def _check_integrity(path: Path) -> None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    if result != "ok":
        raise RuntimeError(f"the Hub snapshot of the database is damaged ({result}); not restoring it")

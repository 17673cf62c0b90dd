"""Hub sync offline: a local folder stands in for the Hub; the snapshot, push and restore code is the real one."""

import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from rlhf_online.config import load_config
from rlhf_online.hub_sync import HubSync
from rlhf_online.store import PreferenceStore, store_path


class LocalHub:
    """Each repo is a folder under `root`; push replaces its content (as a commit of the folder would)."""

    def __init__(self, root: Path):
        self.root = root
        self.pushes: list[tuple[str, str]] = []

    def repo(self, repo_id: str, repo_type: str) -> Path:
        return self.root / repo_type / repo_id

    def push(self, folder: Path, repo_id: str, repo_type: str) -> None:
        target = self.repo(repo_id, repo_type)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
        self.pushes.append((repo_id, repo_type))

    def pull(self, repo_id: str, repo_type: str, into: Path) -> bool:
        source = self.repo(repo_id, repo_type)
        if not source.is_dir():
            return False
        shutil.copytree(source, into, dirs_exist_ok=True)
        return True


def vote(store, text: str, choice: str = "a") -> int:
    pair = store.record_pair(conversation_id="c", turn=0, messages=[{"role": "user", "content": text}],
                             answer_a="yes", answer_b="no", version_a="base", version_b="base", sampling={},
                             session_id="s", placement=None)
    return store.record_vote(pair_id=pair, choice=choice, session_id="s").vote_id


def fake_version(adapters: Path, name: str) -> None:
    (adapters / name).mkdir(parents=True)
    (adapters / name / "adapter_model.safetensors").write_bytes(b"weights of " + name.encode())


def remote_votes(hub: LocalHub, repo: str) -> list[tuple]:
    conn = sqlite3.connect(hub.repo(repo, "dataset") / "preferences.sqlite")
    try:
        return conn.execute("SELECT id, choice FROM votes ORDER BY id").fetchall()
    finally:
        conn.close()


@pytest.fixture
def setup(tmp_path):
    hub = LocalHub(tmp_path / "remote")
    data, adapters = tmp_path / "data", tmp_path / "adapters"
    adapters.mkdir()
    return hub, data, adapters


def test_off_unless_a_repo_and_a_token_are_configured(tmp_path, caplog):
    assert HubSync.from_config(load_config([], environ={})) is None
    assert HubSync.from_config(load_config([], environ={"RLHF_HUB_DATASET_REPO": "me/prefs"})) is None
    cfg = load_config(["--data-dir", str(tmp_path)], environ={"RLHF_HUB_DATASET_REPO": "me/prefs",
                                                              "HF_TOKEN": "hf_SECRET"})
    with caplog.at_level("INFO"):
        sync = HubSync.from_config(cfg, uploader=LocalHub(tmp_path / "remote"))
    assert sync is not None and sync.dataset_repo == "me/prefs"
    assert "Hub sync ON" in caplog.text and "hf_SECRET" not in caplog.text


def test_push_snapshots_a_live_database_and_a_later_vote_shows_up_on_the_next_push(setup):
    hub, data, adapters = setup
    sync = HubSync(data, adapters, "me/prefs", hub)
    with PreferenceStore(store_path(data)) as store:  # open, in WAL mode, while we snapshot
        first = vote(store, "first")
        fake_version(adapters, "v0001")
        (adapters / ".v0002.tmp-abc").mkdir()  # a publish in progress is not pushed
        assert sync.push_once() == 1
        assert remote_votes(hub, "me/prefs") == [(first, "a")]
        repo = hub.repo("me/prefs", "dataset")
        assert sorted(p.name for p in (repo / "adapters").iterdir()) == ["v0001"]
        assert '"choice": "a"' in (repo / "votes.jsonl").read_text()
        assert not list(repo.glob("*-wal"))  # a consistent single-file snapshot, not a copy of a live WAL

        second = vote(store, "second", "b")
        fake_version(adapters, "v0002")
        shutil.rmtree(adapters / "v0001")  # pruned locally: gone from the next snapshot too
        assert sync.push_once() == 2
    assert remote_votes(hub, "me/prefs") == [(first, "a"), (second, "b")]
    assert sorted(p.name for p in (hub.repo("me/prefs", "dataset") / "adapters").iterdir()) == ["v0002"]
    assert len((hub.repo("me/prefs", "dataset") / "votes.jsonl").read_text().splitlines()) == 2


def test_restore_round_trip_into_an_empty_data_folder(setup, tmp_path):
    hub, data, adapters = setup
    with PreferenceStore(store_path(data)) as store:
        vote_id = vote(store, "remember me")
    fake_version(adapters, "v0001")
    HubSync(data, adapters, "me/prefs", hub, adapters_repo="me/adapters").push_once()
    assert hub.pushes == [("me/prefs", "dataset"), ("me/adapters", "model")]

    fresh_data, fresh_adapters = tmp_path / "fresh" / "data", tmp_path / "fresh" / "adapters"
    restored = HubSync(fresh_data, fresh_adapters, "me/prefs", hub, adapters_repo="me/adapters")
    assert restored.restore_at_start() is True
    with PreferenceStore(store_path(fresh_data)) as store:
        assert store.counts()["votes"]["a"] == 1 and store.integrity_check() == "ok"
        assert vote(store, "and go on") == vote_id + 1
    assert (fresh_adapters / "v0001" / "adapter_model.safetensors").read_bytes() == b"weights of v0001"
    assert not [p for p in fresh_data.iterdir() if p.name.startswith(".hub_restore")]


def test_restore_never_overwrites_a_local_database(setup):
    hub, data, adapters = setup
    with PreferenceStore(store_path(data)) as store:
        vote(store, "remote")
        vote(store, "remote 2")
    HubSync(data, adapters, "me/prefs", hub).push_once()
    other = data.parent / "other"
    with PreferenceStore(store_path(other)) as store:
        vote(store, "local only")
    assert HubSync(other, adapters, "me/prefs", hub).restore_at_start() is False
    with PreferenceStore(store_path(other)) as store:
        assert sum(store.counts()["votes"].values()) == 1


def test_restore_with_no_snapshot_yet_starts_empty_and_a_damaged_one_is_refused(setup):
    hub, data, adapters = setup
    assert HubSync(data, adapters, "me/none", hub).restore_at_start() is False
    assert not store_path(data).exists()
    damaged = hub.repo("me/bad", "dataset")
    damaged.mkdir(parents=True)
    (damaged / "preferences.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    with pytest.raises(Exception, match="damaged|not a database|malformed"):
        HubSync(data, adapters, "me/bad", hub).restore_at_start()
    assert not store_path(data).exists()


def test_background_loop_pushes_and_stop_pushes_once_more(setup):
    hub, data, adapters = setup
    sync = HubSync(data, adapters, "me/prefs", hub, interval_s=0.05)
    with PreferenceStore(store_path(data)) as store:
        vote(store, "x")
        sync.start()
        deadline = time.monotonic() + 10
        while sync.pushes < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sync.pushes >= 2
        last = vote(store, "just before shutdown")
        sync.stop()
    assert remote_votes(hub, "me/prefs")[-1][0] == last


class FakeHubApi:
    """Stands in for HfApi's three calls (no network here): records what the uploader asked for."""

    def __init__(self, existing: dict[str, bool]):
        self.existing = existing  # repo id -> private?
        self.calls: list[tuple] = []

    def repo_info(self, repo_id, repo_type=None):
        from huggingface_hub.errors import RepositoryNotFoundError

        self.calls.append(("repo_info", repo_id))
        if repo_id not in self.existing:
            import httpx

            request = httpx.Request("GET", f"https://huggingface.co/api/datasets/{repo_id}")
            raise RepositoryNotFoundError(f"{repo_id} not found", response=httpx.Response(404, request=request))
        return type("Info", (), {"private": self.existing[repo_id]})()

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=None):
        self.calls.append(("create_repo", repo_id, private))
        self.existing[repo_id] = bool(private)

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None, delete_patterns=None):
        self.calls.append(("upload_folder", repo_id))


def test_preferences_are_never_pushed_to_an_existing_public_repo_unless_allowed(tmp_path):
    from rlhf_online.hub_sync import HubUploader, PublicRepoError

    api = FakeHubApi({"me/public-prefs": False, "me/private-prefs": True})
    uploader = HubUploader("hf_x", api=api)
    with pytest.raises(PublicRepoError, match="is public: not pushing"):
        uploader.push(tmp_path, "me/public-prefs", "dataset")
    assert ("upload_folder", "me/public-prefs") not in api.calls
    uploader.push(tmp_path, "me/private-prefs", "dataset")
    uploader.push(tmp_path, "me/new-prefs", "dataset")  # created private
    assert ("create_repo", "me/new-prefs", True) in api.calls
    assert [c for c in api.calls if c[0] == "upload_folder"] == [("upload_folder", "me/private-prefs"),
                                                                  ("upload_folder", "me/new-prefs")]
    api.existing["me/new-prefs"] = False  # someone made it public after the first push: checked every time
    with pytest.raises(PublicRepoError):
        uploader.push(tmp_path, "me/new-prefs", "dataset")
    HubUploader("hf_x", allow_public=True, api=api).push(tmp_path, "me/public-prefs", "dataset")
    assert api.calls[-1] == ("upload_folder", "me/public-prefs")

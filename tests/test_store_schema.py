"""The schema's migrations on a raw connection, and a file from newer code refused rather than corrupted (the
upgrades of real older files, with their data, are in test_store)."""

import sqlite3

import pytest

from rlhf_online.store import PreferenceStore, store_path
from rlhf_online.store_schema import SCHEMA_VERSION, SchemaVersionError, migrate


@pytest.fixture
def db_path(tmp_path):
    return store_path(tmp_path / "data")


def test_migrate_on_a_raw_connection_is_idempotent(db_path):
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    assert migrate(conn, 1) == 1
    assert migrate(conn) == SCHEMA_VERSION
    assert migrate(conn) == SCHEMA_VERSION
    conn.close()


def test_a_file_from_newer_code_is_refused(db_path):
    PreferenceStore(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade rlhf_online"):
        PreferenceStore(db_path)

"""The one way SQLite files are opened and written (cloud/integrations/sqlite_file.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cloud.integrations.sqlite_file import SqliteFile, UnusableFile, open_sqlite, transaction


def test_a_write_is_seen_by_another_process_connection_on_return(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    db = open_sqlite(path, SqliteFile("test file"), init=lambda d: d.execute("CREATE TABLE t (v)"))
    db.execute("INSERT INTO t VALUES (1)")
    other = sqlite3.connect(path)
    try:
        assert other.execute("SELECT v FROM t").fetchall() == [(1,)]
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        other.close()
        db.close()


def test_a_failed_transaction_rolls_back_and_later_writes_still_commit(tmp_path: Path) -> None:
    db = open_sqlite(tmp_path / "x.sqlite", SqliteFile("test file"))
    db.execute("CREATE TABLE t (v)")
    with pytest.raises(RuntimeError), transaction(db, immediate=True):
        db.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("boom")
    db.execute("INSERT INTO t VALUES (2)")
    assert not db.in_transaction
    assert db.execute("SELECT v FROM t").fetchall() == [(2,)]
    db.close()


def test_a_corrupt_file_is_named_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UnusableFile) as err:
        open_sqlite(path, SqliteFile("state file", hint="move it away", synchronous="NORMAL"))
    assert str(err.value).startswith(f"state file {path}: unusable (")
    assert str(err.value).endswith("; move it away")


def test_an_error_in_init_closes_the_file_and_passes_through(tmp_path: Path) -> None:
    class Refused(Exception):
        pass

    def init(db: sqlite3.Connection) -> None:
        raise Refused

    with pytest.raises(Refused):
        open_sqlite(tmp_path / "x.sqlite", SqliteFile("run store"), init=init)

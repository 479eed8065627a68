"""The run store of local mode: one SQLite file on the backup host.

Local mode has no DynamoDB, yet `status`, `status --check-stale` (from cron) and the agent's
in-process verifier all read and write run history, possibly from different processes and
while the agent may be killed at any moment (a hung hook, a reboot). Hence WAL, one
transaction per write (committed before `record` returns), `synchronous=FULL` (records are
rare, so durability costs nothing noticeable), and `BEGIN IMMEDIATE` so two processes never
deadlock upgrading read locks. One connection is shared by threads behind a lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from cloud.integrations.runstore_codec import (
    detail_from_json,
    detail_to_json,
    dt_from_text,
    dt_to_text,
    is_verification,
    normalize,
    parse_kind,
    parse_status,
)
from cloud.integrations.sqlite_file import (
    SqliteFile,
    UnusableFile,
    check_writable,
    open_sqlite,
    transaction,
)
from cloud.logic.ports import RepoStatus, RunRecord

SCHEMA_VERSION = 1
RUN_STORE_FILE = SqliteFile(
    "run store", hint="move it away to start a fresh history", synchronous="FULL"
)

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS meta (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS repos (
        repo_key         TEXT PRIMARY KEY,
        repo_id          TEXT,
        latest_run_id    TEXT,
        verifications    INTEGER NOT NULL DEFAULT 0,
        stale_alerted_at TEXT
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS runs (
        repo_key      TEXT NOT NULL,
        run_id        TEXT NOT NULL,
        kind          TEXT NOT NULL,
        status        TEXT NOT NULL,
        started_at    TEXT NOT NULL,
        finished_at   TEXT NOT NULL,
        repo_id       TEXT,
        host          TEXT,
        mirror_run_id TEXT,
        detail        TEXT NOT NULL,
        PRIMARY KEY (repo_key, run_id)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS checkpoints (
        repo_key TEXT NOT NULL,
        name     TEXT NOT NULL,
        value    TEXT NOT NULL,
        PRIMARY KEY (repo_key, name)
    ) WITHOUT ROWID
    """,
    # One row per repository, written once by its first verified run (cloud.logic.binding);
    # created in files of this same schema version too (IF NOT EXISTS: additive).
    """
    CREATE TABLE IF NOT EXISTS bindings (
        repo_key TEXT PRIMARY KEY,
        value    TEXT NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE INDEX IF NOT EXISTS runs_verified ON runs(repo_key, run_id)
        WHERE kind = 'verification' AND status = 'verified'
    """,
)

_RUN_COLUMNS = (
    "repo_key, run_id, kind, status, started_at, finished_at, repo_id, host, mirror_run_id, detail"
)


class RunStoreError(Exception):
    """The run-store file cannot be used (corrupt, unreadable, or from a newer version)."""


class RunStoreCorrupt(RunStoreError):
    """The file is not a usable SQLite database (a newer version's file is not this)."""


def _run_from_row(row: tuple[Any, ...]) -> RunRecord:
    (repo_key, run_id, kind, status, started, finished, repo_id, host, mirror_run_id, detail) = row
    return RunRecord(
        repo_key=repo_key,
        run_id=run_id,
        kind=parse_kind(kind),
        status=parse_status(status),
        started_at=dt_from_text(started),
        finished_at=dt_from_text(finished),
        repo_id=repo_id,
        host=host,
        mirror_run_id=mirror_run_id,
        detail=detail_from_json(detail),
    )


def _json_object(text: str, path: Path) -> dict[str, Any]:
    """A stored binding that is not a JSON object is damage, not "unbound": reading it as
    absent would let the next event re-bind the repository."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise RunStoreError(f"run store {path}: a stored binding is not a JSON object")
    return cast(dict[str, Any], value)


class SqliteRunStore:
    """`RunStore` over one SQLite file; safe to share between threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunStoreError(f"run store {path}: cannot open ({exc})") from None
        try:
            self._db = open_sqlite(path, RUN_STORE_FILE, init=self._init_schema_in_transaction)
        except UnusableFile as exc:
            # Locked, read-only or unopenable is not damage: only a damaged file may be
            # set aside (local_agent.events.pipeline), never one another process is using.
            raise (RunStoreCorrupt if exc.damaged else RunStoreError)(str(exc)) from None

    def _init_schema_in_transaction(self, db: sqlite3.Connection) -> None:
        with transaction(db, immediate=True):
            self._init_schema(db)

    def _init_schema(self, db: sqlite3.Connection) -> None:
        """A file written by a newer release may mean something else: refuse, never guess."""
        has_meta = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        row = (
            db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if has_meta
            else None
        )
        version = None if row is None else int(row[0])
        if version is not None and version > SCHEMA_VERSION:
            raise RunStoreError(
                f"run store {self.path}: schema version {version} is newer than this "
                f"release understands ({SCHEMA_VERSION}); upgrade backrest-relay"
            )
        # Older versions migrate here, one step at a time, once a version 2 exists.
        for statement in _SCHEMA:
            db.execute(statement)
        if version is None:
            db.execute(
                "INSERT INTO meta(name, value) VALUES('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    def check_writable(self) -> None:
        """RunStoreError naming the file when this process may not write it (see
        `sqlite_file.check_writable`)."""
        with self._lock:
            try:
                check_writable(self._db)
            except sqlite3.Error as exc:
                raise RunStoreError(f"run store {self.path}: unusable ({exc})") from None

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """Callers hold `_lock`."""
        return transaction(self._db, immediate=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteRunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- RunStore ----------------------------------------------------------------------------

    def record(self, run: RunRecord) -> None:
        run = normalize(run)
        with self._lock, self._transaction() as db:
            inserted = db.execute(
                f"INSERT OR IGNORE INTO runs({_RUN_COLUMNS}) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.repo_key,
                    run.run_id,
                    run.kind,
                    run.status,
                    dt_to_text(run.started_at),
                    dt_to_text(run.finished_at),
                    run.repo_id,
                    run.host,
                    run.mirror_run_id,
                    detail_to_json(run.detail),
                ),
            ).rowcount
            if inserted == 0:
                return  # duplicate delivery: the first record wins, the counter stays put
            db.execute(
                "INSERT OR IGNORE INTO repos(repo_key) VALUES(?)",
                (run.repo_key,),
            )
            # repo_id follows the newest run that names one, and fills a gap from any run.
            db.execute(
                """
                UPDATE repos SET
                    verifications = verifications + :inc,
                    repo_id = CASE
                        WHEN :repo_id IS NOT NULL
                             AND (repo_id IS NULL OR latest_run_id IS NULL
                                  OR latest_run_id < :run_id)
                        THEN :repo_id ELSE repo_id END,
                    latest_run_id = CASE
                        WHEN latest_run_id IS NULL OR latest_run_id < :run_id
                        THEN :run_id ELSE latest_run_id END
                WHERE repo_key = :repo_key
                """,
                {
                    "inc": 1 if is_verification(run) else 0,
                    "repo_id": run.repo_id,
                    "run_id": run.run_id,
                    "repo_key": run.repo_key,
                },
            )

    def get(self, repo_key: str, run_id: str) -> RunRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE repo_key = ? AND run_id = ?",  # noqa: S608
                (repo_key, run_id),
            ).fetchone()
        return None if row is None else _run_from_row(row)

    def runs(self, repo_key: str, limit: int = 50) -> list[RunRecord]:
        if limit <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE repo_key = ? "  # noqa: S608
                "ORDER BY run_id DESC LIMIT ?",
                (repo_key, limit),
            ).fetchall()
        return [_run_from_row(r) for r in rows]

    def latest_verified(self, repo_key: str) -> RunRecord | None:
        with self._lock:
            return self._latest_verified(repo_key)

    def verification_count(self, repo_key: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT verifications FROM repos WHERE repo_key = ?", (repo_key,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def repos(self) -> Iterator[RepoStatus]:
        """Read in one transaction, so a concurrent record cannot tear a repository's view."""
        statuses: list[RepoStatus] = []
        with self._lock:
            self._db.execute("BEGIN")
            try:
                rows = self._db.execute(
                    "SELECT repo_key, repo_id, latest_run_id, verifications, stale_alerted_at "
                    "FROM repos ORDER BY repo_key"
                ).fetchall()
                for repo_key, repo_id, latest_run_id, verifications, stale in rows:
                    latest = None
                    if latest_run_id is not None:
                        row = self._db.execute(
                            f"SELECT {_RUN_COLUMNS} FROM runs "  # noqa: S608
                            "WHERE repo_key = ? AND run_id = ?",
                            (repo_key, latest_run_id),
                        ).fetchone()
                        latest = None if row is None else _run_from_row(row)
                    statuses.append(
                        RepoStatus(
                            repo_key=repo_key,
                            repo_id=repo_id,
                            latest_run=latest,
                            latest_verified=self._latest_verified(repo_key),
                            verifications=int(verifications),
                            stale_alerted_at=None if stale is None else dt_from_text(stale),
                        )
                    )
            finally:
                self._db.execute("COMMIT")
        return iter(statuses)

    def forget(self, repo_key: str) -> int:
        """Drop a repository and all its runs (`status --forget`); returns the runs removed.

        For a repository that was removed or renamed, or a row recorded under a stale
        identity: without this, `status --check-stale` would report it forever.
        """
        with self._lock, self._transaction() as db:
            removed = db.execute("DELETE FROM runs WHERE repo_key = ?", (repo_key,)).rowcount
            db.execute("DELETE FROM repos WHERE repo_key = ?", (repo_key,))
            db.execute("DELETE FROM bindings WHERE repo_key = ?", (repo_key,))
        return int(removed)

    def mark_stale_alerted(self, repo_key: str, at: datetime | None) -> None:
        """Creates the repository entry if needed: the watchdog may alert on a repository
        that never had a verified run."""
        value = None if at is None else dt_to_text(at, "stale_alerted_at")
        with self._lock:
            self._db.execute(
                "INSERT INTO repos(repo_key, stale_alerted_at) VALUES(?, ?) "
                "ON CONFLICT(repo_key) DO UPDATE SET stale_alerted_at = excluded.stale_alerted_at",
                (repo_key, value),
            )

    def load_checkpoint(self, repo_key: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM checkpoints WHERE repo_key = ? AND name = ?",
                (repo_key, name),
            ).fetchone()
        if row is None:
            return None
        try:
            data = json.loads(row[0])
        except ValueError:
            return None  # unreadable: verify afresh rather than trust it
        return data if isinstance(data, dict) else None

    def save_checkpoint(self, repo_key: str, name: str, data: dict[str, Any]) -> None:
        """Committed (synchronous=FULL) before it returns: a kill right after loses nothing."""
        with self._lock, self._transaction() as db:
            db.execute(
                "INSERT INTO checkpoints(repo_key, name, value) VALUES(?, ?, ?) "
                "ON CONFLICT(repo_key, name) DO UPDATE SET value = excluded.value",
                (repo_key, name, json.dumps(data, sort_keys=True)),
            )

    def load_binding(self, repo_key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM bindings WHERE repo_key = ?", (repo_key,)
            ).fetchone()
        return None if row is None else _json_object(row[0], self.path)

    def bind(self, repo_key: str, data: dict[str, Any]) -> dict[str, Any]:
        """Insert-or-keep and read back in one transaction: the first binding wins."""
        with self._lock, self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO bindings(repo_key, value) VALUES(?, ?)",
                (repo_key, json.dumps(data, sort_keys=True)),
            )
            row = db.execute(
                "SELECT value FROM bindings WHERE repo_key = ?", (repo_key,)
            ).fetchone()
        return _json_object(row[0], self.path)

    def unbind(self, repo_key: str) -> bool:
        with self._lock, self._transaction() as db:
            removed = db.execute("DELETE FROM bindings WHERE repo_key = ?", (repo_key,)).rowcount
        return bool(removed)

    def _latest_verified(self, repo_key: str) -> RunRecord | None:
        row = self._db.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs "  # noqa: S608
            "WHERE repo_key = ? AND kind = 'verification' AND status = 'verified' "
            "ORDER BY run_id DESC LIMIT 1",
            (repo_key,),
        ).fetchone()
        return None if row is None else _run_from_row(row)

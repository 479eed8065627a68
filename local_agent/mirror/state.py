"""What the agent knows is at the destination, kept on the backup host.

restic files never change, so once an object is known to be at the destination with the
right size and digest, later runs need neither to re-read the local file nor to ask the
bucket: a run with nothing new makes zero requests. Multipart uploads in flight are kept
here too (UploadId and finished parts) so a killed run resumes instead of starting over.

One SQLite file (WAL) per destination + repository. Every write commits at once: the
process may be SIGKILLed at any point, and what is recorded must then be true.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from cloud.contracts.destination import Destination
from cloud.integrations.sqlite_file import SqliteFile, UnusableFile, open_sqlite, transaction
from local_agent.errors import ConfigError

SCHEMA_VERSION = 2
# The meta row holding the last manifest written (a ManifestRef as JSON; see upload.py).
LAST_MANIFEST = "last_manifest"

STATE_FILE = SqliteFile(
    "state file",
    hint="move it away and run again (the next run re-reads the bucket listing once)",
    synchronous="NORMAL",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY,          -- repository-relative (data/ab/ab12...)
    size INTEGER NOT NULL,
    sha256 TEXT,                   -- NULL when adopted from a listing without reading
    md5 TEXT,
    etag TEXT,
    uploaded_at REAL NOT NULL,
    run_id TEXT                    -- the run that uploaded it; NULL when adopted
);
CREATE TABLE IF NOT EXISTS unmanifested (
    key TEXT PRIMARY KEY           -- uploaded by this agent, not yet named by a manifest
);
-- In the same statement as the object's row, so a kill can never separate the two.
CREATE TRIGGER IF NOT EXISTS uploaded_is_unmanifested AFTER INSERT ON objects
WHEN NEW.run_id IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO unmanifested(key) VALUES (NEW.key);
END;
CREATE TABLE IF NOT EXISTS multipart_uploads (
    key TEXT PRIMARY KEY,
    upload_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    part_size INTEGER NOT NULL,
    started_at REAL NOT NULL
);
-- Objects at the destination that are gone from the local repository, and since when
-- (deferred deletion: removed remotely only after upload.delete_after). Added after
-- schema 1; CREATE IF NOT EXISTS adds it to older state files.
CREATE TABLE IF NOT EXISTS gone (
    key TEXT PRIMARY KEY,
    since REAL NOT NULL
);
-- Object Lock: until when (epoch seconds) each object's current version is retained, as
-- this agent set it (issue 18). Kept apart from `objects` so a rebuild from a listing
-- keeps what is known; a key without a row has an unknown retention and is extended.
CREATE TABLE IF NOT EXISTS retention (
    key TEXT PRIMARY KEY,
    until REAL NOT NULL,
    version_id TEXT                -- the version the agent wrote; NULL: unknown (current)
);
CREATE INDEX IF NOT EXISTS retention_until ON retention(until);
CREATE TABLE IF NOT EXISTS multipart_parts (
    key TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    part_number INTEGER NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (key, upload_id, part_number)
);
"""


@dataclass(frozen=True, slots=True)
class RemoteObject:
    key: str
    size: int
    sha256: str | None
    md5: str | None
    etag: str | None
    run_id: str | None = None  # the run that uploaded it; None when adopted


@dataclass(frozen=True, slots=True)
class PendingUpload:
    key: str
    upload_id: str
    size: int
    sha256: str
    part_size: int


def state_file_name(destination: Destination, repo_identity: str) -> str:
    """Stable file name for a (destination, repository) pair; reveals no secret."""
    ident = "\0".join(
        [destination.endpoint_url or "aws", destination.bucket, destination.prefix, repo_identity]
    )
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return f"{destination.bucket}-{digest}.sqlite"


class StateStore:
    """SQLite-backed record of the destination; safe to share between upload threads."""

    def __init__(self, path: Path | None) -> None:
        """Open (creating if needed) the store at `path`; None keeps it in memory (dry runs)."""
        self.path = path
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"state dir {path.parent}: cannot create: {exc.strerror}"
                ) from None
        self._lock = threading.Lock()
        try:
            self._db = open_sqlite(path, STATE_FILE, init=self._init_schema)
        except UnusableFile as exc:
            raise ConfigError(str(exc)) from None

    def _init_schema(self, db: sqlite3.Connection) -> None:
        self._db = db
        existing = {
            str(row[0]) for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        db.executescript(_SCHEMA)
        if "objects" in existing and "unmanifested" not in existing:
            self._migrate_unmanifested()
        db.execute(
            "INSERT INTO meta(name, value) VALUES('schema_version', ?) "
            "ON CONFLICT(name) DO UPDATE SET value=excluded.value "
            "WHERE CAST(value AS INTEGER) < CAST(excluded.value AS INTEGER)",
            (str(SCHEMA_VERSION),),
        )

    def _migrate_unmanifested(self) -> None:
        """Schema 1 → 2: find the objects a run uploaded after the last manifest was
        written (a run stopped at its deadline), which no manifest has named yet.

        Schema 1 kept only the uploading run's id. Objects of the run that wrote the last
        manifest were named by it, and that manifest was written after all of them, so
        anything an agent run uploaded later than the latest of them is not yet named.
        Without any manifest, everything the agent uploaded is new.
        """
        raw = self._db.execute("SELECT value FROM meta WHERE name=?", (LAST_MANIFEST,)).fetchone()
        last_run: str | None = None
        if raw is not None:
            try:
                last_run = str(json.loads(raw[0])["created_by_run"])
            except (ValueError, KeyError, TypeError):
                last_run = None
        with self._lock, self._transaction() as db:
            if raw is None:
                db.execute(
                    "INSERT OR IGNORE INTO unmanifested(key) "
                    "SELECT key FROM objects WHERE run_id IS NOT NULL"
                )
                return
            row = db.execute(
                "SELECT MAX(uploaded_at) FROM objects WHERE run_id = ?", (last_run,)
            ).fetchone()
            if row is None or row[0] is None:
                return  # the last manifest's run uploaded nothing: no time to compare with
            db.execute(
                "INSERT OR IGNORE INTO unmanifested(key) SELECT key FROM objects "
                "WHERE run_id IS NOT NULL AND run_id != ? AND uploaded_at > ?",
                (last_run, row[0]),
            )

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """Callers hold `self._lock`."""
        return transaction(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta -----------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta(name, value) VALUES(?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                (name, value),
            )

    def delete_meta(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM meta WHERE name=?", (name,))

    @property
    def reconciled(self) -> bool:
        """Whether the store was ever filled from a listing of the destination."""
        return self.get_meta("reconciled_at") is not None

    def mark_reconciled(self) -> None:
        self.set_meta("reconciled_at", str(time.time()))

    # -- objects --------------------------------------------------------------------------

    def known_sizes(self) -> dict[str, int]:
        """Key → size of every object believed to be at the destination."""
        with self._lock:
            return dict(self._db.execute("SELECT key, size FROM objects"))

    def get(self, key: str) -> RemoteObject | None:
        with self._lock:
            row = self._db.execute(
                "SELECT key, size, sha256, md5, etag, run_id FROM objects WHERE key=?", (key,)
            ).fetchone()
        return None if row is None else RemoteObject(*row)

    def put(self, obj: RemoteObject) -> None:
        """Record an object; one with a `run_id` was uploaded by this agent and stays new
        (see `iter_manifest_objects`) until a manifest naming it is written."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO objects(key, size, sha256, md5, etag, uploaded_at, run_id) "
                "VALUES(?, ?, ?, ?, ?, ?, ?)",
                (obj.key, obj.size, obj.sha256, obj.md5, obj.etag, time.time(), obj.run_id),
            )

    def put_many(self, objs: list[RemoteObject]) -> None:
        now = time.time()
        with self._lock, self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO objects(key, size, sha256, md5, etag, uploaded_at, run_id) "
                "VALUES(?, ?, ?, ?, ?, ?, ?)",
                [(o.key, o.size, o.sha256, o.md5, o.etag, now, o.run_id) for o in objs],
            )

    def forget(self, key: str) -> None:
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM objects WHERE key=?", (key,))
            db.execute("DELETE FROM unmanifested WHERE key=?", (key,))

    def iter_manifest_objects(self) -> Iterator[tuple[RemoteObject, bool]]:
        """All objects in key order, each with whether this agent uploaded it since the
        last manifest was written (however many runs that took); batched like
        `iter_objects`. What `forget_all` (a reconcile) drops is kept here, so a reconcile
        does not turn the agent's own unverified uploads into old ones."""
        last = ""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT o.key, o.size, o.sha256, o.md5, o.etag, o.run_id, "
                    "u.key IS NOT NULL FROM objects o "
                    "LEFT JOIN unmanifested u ON u.key = o.key WHERE o.key > ? "
                    "ORDER BY o.key LIMIT 1000",
                    (last,),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield RemoteObject(*row[:6]), bool(row[6])
            last = rows[-1][0]

    def has_unmanifested(self) -> bool:
        """Whether the agent uploaded anything that no written manifest names yet."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM unmanifested u JOIN objects o ON o.key = u.key LIMIT 1"
            ).fetchone()
        return row is not None

    def manifest_written(self) -> None:
        """A manifest naming every object of the store is in the bucket: nothing the agent
        uploaded is new any more."""
        with self._lock:
            self._db.execute("DELETE FROM unmanifested")

    def forget_all(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM objects")

    def iter_objects(self) -> Iterator[RemoteObject]:
        """All objects in key order, fetched in batches so memory stays flat."""
        last = ""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT key, size, sha256, md5, etag, run_id FROM objects WHERE key > ? "
                    "ORDER BY key LIMIT 1000",
                    (last,),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield RemoteObject(*row)
            last = rows[-1][0]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM objects").fetchone()[0])

    # -- deferred deletion ----------------------------------------------------------------

    def gone_marks(self) -> dict[str, float]:
        """Key → when it was first seen gone locally (epoch seconds)."""
        with self._lock:
            return {str(k): float(t) for k, t in self._db.execute("SELECT key, since FROM gone")}

    def has_gone_marks(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM gone LIMIT 1").fetchone() is not None

    def mark_gone(self, keys: list[str], since: float) -> None:
        """Record `keys` as gone since `since`; a key already marked keeps its older mark."""
        with self._lock, self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO gone(key, since) VALUES(?, ?)", [(k, since) for k in keys]
            )

    def clear_gone(self, keys: list[str]) -> None:
        """Drop the marks of `keys` (the file came back locally, or the object was deleted)."""
        with self._lock, self._transaction() as db:
            db.executemany("DELETE FROM gone WHERE key=?", [(k,) for k in keys])

    def clear_all_gone(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM gone")

    # -- multipart uploads ----------------------------------------------------------------

    def pending_upload(self, key: str) -> PendingUpload | None:
        with self._lock:
            row = self._db.execute(
                "SELECT key, upload_id, size, sha256, part_size FROM multipart_uploads WHERE key=?",
                (key,),
            ).fetchone()
        return None if row is None else PendingUpload(*row)

    def pending_uploads(self) -> list[PendingUpload]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, upload_id, size, sha256, part_size FROM multipart_uploads"
            ).fetchall()
        return [PendingUpload(*row) for row in rows]

    def begin_upload(self, pending: PendingUpload) -> None:
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM multipart_parts WHERE key=?", (pending.key,))
            db.execute(
                "INSERT OR REPLACE INTO multipart_uploads"
                "(key, upload_id, size, sha256, part_size, started_at) VALUES(?, ?, ?, ?, ?, ?)",
                (
                    pending.key,
                    pending.upload_id,
                    pending.size,
                    pending.sha256,
                    pending.part_size,
                    time.time(),
                ),
            )

    def record_part(self, key: str, upload_id: str, part_number: int, etag: str, size: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO multipart_parts(key, upload_id, part_number, etag, size) "
                "VALUES(?, ?, ?, ?, ?)",
                (key, upload_id, part_number, etag, size),
            )

    def recorded_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]]:
        """Part number → (ETag, size) of the parts this store saw succeed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT part_number, etag, size FROM multipart_parts WHERE key=? AND upload_id=?",
                (key, upload_id),
            ).fetchall()
        return {int(n): (str(etag), int(size)) for n, etag, size in rows}

    def end_upload(self, key: str, completed: RemoteObject | None = None) -> None:
        """Drop a multipart upload; when `completed`, record the object in the same commit."""
        with self._lock, self._transaction() as db:
            db.execute("DELETE FROM multipart_parts WHERE key=?", (key,))
            db.execute("DELETE FROM multipart_uploads WHERE key=?", (key,))
            if completed is not None:
                db.execute(
                    "INSERT OR REPLACE INTO objects"
                    "(key, size, sha256, md5, etag, uploaded_at, run_id) "
                    "VALUES(?, ?, ?, ?, ?, ?, ?)",
                    (
                        completed.key,
                        completed.size,
                        completed.sha256,
                        completed.md5,
                        completed.etag,
                        time.time(),
                        completed.run_id,
                    ),
                )

    # -- Object Lock retention ------------------------------------------------------------

    def set_retention(self, keys: list[str], until: float, version_id: str | None = None) -> None:
        """Record that `keys` are retained until `until` (epoch seconds); a `version_id`
        (one key) is the version the agent wrote, kept until another is given."""
        with self._lock, self._transaction() as db:
            db.executemany(
                "INSERT INTO retention(key, until, version_id) VALUES(?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET until=excluded.until, "
                "version_id=COALESCE(excluded.version_id, retention.version_id)",
                [(k, until, version_id) for k in keys],
            )

    def retention_version(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version_id FROM retention WHERE key=?", (key,)
            ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def retention_of(self, key: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT until FROM retention WHERE key=?", (key,)).fetchone()
        return None if row is None else float(row[0])

    def retention_due(self, before: float) -> Iterator[str]:
        """Keys of objects at the destination whose retention ends before `before`, or is
        unknown (adopted, or written before the lock was configured), in key order."""
        last = ""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT o.key FROM objects o LEFT JOIN retention r ON r.key = o.key "
                    "WHERE o.key > ? AND (r.until IS NULL OR r.until < ?) "
                    "ORDER BY o.key LIMIT 1000",
                    (last, before),
                ).fetchall()
            if not rows:
                return
            for (key,) in rows:
                yield str(key)
            last = rows[-1][0]

"""Events that could not be published yet, kept on disk until they are.

A mirror that succeeded must not be reported as failed because EventBridge was briefly
unreachable, and an event must not be lost either: every event goes into the outbox
first and leaves it only once a publisher accepted it. Each run sends the backlog first,
oldest first; consumers dedupe by `run_id`, so a resend after a crash is harmless.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cloud.contracts.events import EventDetail, parse_detail
from cloud.integrations.sqlite_file import (
    SqliteFile,
    UnusableFile,
    check_writable,
    open_sqlite,
    set_aside,
)
from local_agent.errors import ConfigError
from local_agent.events.publishers import Publisher, PublishError

log = logging.getLogger(__name__)

OUTBOX_FILE = SqliteFile("outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    source TEXT NOT NULL,
    detail_type TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
"""


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    run_id: str
    source: str
    detail_type: str
    detail: str

    def event(self) -> EventDetail:
        return parse_detail(self.source, self.detail_type, self.detail)


@dataclass
class FlushResult:
    sent: int = 0
    pending: int = 0
    error: str | None = None


def _init(db: sqlite3.Connection) -> None:
    """The schema, then a write that changes nothing: every run adds an event, so a file
    SQLite opened read-only (its mode, its owner) is refused here, by name, before the run."""
    db.executescript(_SCHEMA)
    check_writable(db)


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"outbox {path}: unusable ({exc})") from None
        try:
            self._db = self._open(path)
        except UnusableFile as exc:
            if not exc.damaged:
                raise ConfigError(str(exc)) from None
            # A damaged outbox must not stop every later run (and its alerts): its unsent
            # events are lost either way, so set it aside and start an empty one.
            try:
                aside = set_aside(path)
                self._db = self._open(path)
            except (OSError, UnusableFile):
                raise ConfigError(str(exc)) from None
            log.warning("%s; set aside as %s (events it held are not sent)", exc, aside.name)
        self._lock = threading.Lock()

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        return open_sqlite(path, OUTBOX_FILE, init=_init)

    def close(self) -> None:
        self._db.close()

    def add(self, event: EventDetail) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO outbox(run_id, source, detail_type, detail, created_at) "
                "VALUES(?, ?, ?, ?, ?)",
                (
                    event.run_id,
                    event.SOURCE.value,
                    event.DETAIL_TYPE.value,
                    event.model_dump_json(),
                    time.time(),
                ),
            )

    def pending(self) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, run_id, source, detail_type, detail FROM outbox ORDER BY seq"
            ).fetchall()
        return [OutboxItem(*row) for row in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def remove(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))

    def record_failure(self, seq: int, error: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq=?",
                (error, seq),
            )

    def flush(self, publisher: Publisher) -> FlushResult:
        """Publish pending events oldest first; stop at the first failure to keep order."""
        result = FlushResult()
        with _FlushLock(self.path.with_suffix(".lock")) as got:
            if not got:
                result.pending = self.count()
                result.error = "another run is sending the backlog"
                return result
            for item in self.pending():
                try:
                    publisher.publish(item.event())
                except PublishError as exc:
                    self.record_failure(item.seq, exc.message)
                    result.error = exc.message
                    break
                except ValueError as exc:
                    # An event this version cannot read (downgrade?): keep it, say so.
                    self.record_failure(item.seq, f"unreadable: {exc}")
                    result.error = f"event {item.run_id} is unreadable: {exc}"
                    break
                self.remove(item.seq)
                result.sent += 1
        result.pending = self.count()
        return result


class _FlushLock:
    """Only one process sends the backlog at a time (no duplicate sends)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

"""How every SQLite file of backrest-relay is opened and written (state, outbox, run store).

They share one need: the process may be killed at any moment and other processes (cron's
`status`, a second hook run) may use the same file, so what a write recorded must be true
once it returns. Hence autocommit (a statement outside a transaction is durable on return),
WAL (readers never block the writer), a busy timeout instead of "database is locked", and
an unusable file reported by name, never as a traceback. One connection per file is shared
by threads; callers guard it with their own lock.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

BUSY_TIMEOUT_SECONDS = 30


class UnusableFile(Exception):
    """The file cannot be opened or is not a database this release can use; the message
    names the file and says what to do. `damaged`: the file itself is broken (not merely
    locked, read-only or unopenable), so setting it aside loses nothing more."""

    def __init__(self, message: str, *, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


def set_aside(path: Path) -> Path:
    """Move a damaged database (and its WAL files) out of the way; returns the new name."""
    aside = path.with_name(f"{path.name}.unusable-{int(time.time())}")
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return aside


@dataclass(frozen=True)
class SqliteFile:
    """One kind of file: `what` names it in errors ("state file", "outbox"), `hint` says
    what to do about a damaged one, `synchronous` None keeps SQLite's default (FULL)."""

    what: str
    hint: str = ""
    synchronous: Literal["NORMAL", "FULL"] | None = None


def open_sqlite(
    path: Path | None,
    kind: SqliteFile,
    *,
    init: Callable[[sqlite3.Connection], object] | None = None,
) -> sqlite3.Connection:
    """Open `path` (None: in memory) and run `init` (schema) on it. Any SQLite or OS error
    on the way closes the connection and raises `UnusableFile`, named after `kind`."""
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(
            str(path) if path is not None else ":memory:",
            check_same_thread=False,
            isolation_level=None,  # autocommit: every statement is durable on return
            timeout=BUSY_TIMEOUT_SECONDS,
        )
        if path is not None:
            db.execute("PRAGMA journal_mode=WAL")
            if kind.synchronous is not None:
                db.execute(f"PRAGMA synchronous={kind.synchronous}")
        if init is not None:
            init(db)
    except (OSError, sqlite3.Error) as exc:
        if db is not None:
            db.close()
        message = f"{kind.what} {path}: unusable ({exc})" + (f"; {kind.hint}" if kind.hint else "")
        damaged = isinstance(exc, sqlite3.DatabaseError) and not isinstance(
            exc,
            sqlite3.OperationalError,  # locked, read-only, cannot open: not damage
        )
        raise UnusableFile(message, damaged=damaged) from None
    except BaseException:
        if db is not None:
            db.close()
        raise
    return db


def check_writable(db: sqlite3.Connection) -> None:
    """A write that changes nothing. SQLite opens a file it may not write (its mode, its
    owner) read-only without a word; a caller that will write learns it here, before it
    starts work, instead of from its first write mid-run."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    db.execute(f"PRAGMA user_version = {version}")


@contextmanager
def transaction(db: sqlite3.Connection, *, immediate: bool = False) -> Iterator[sqlite3.Connection]:
    """All or nothing; a failure rolls back so later writes are not swallowed by an open
    transaction. `immediate` takes the write lock up front, so a second process waits on
    the busy timeout instead of failing on a lock upgrade."""
    db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")

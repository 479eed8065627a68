"""What the reliability suite shares: trial counts, seeds, the ledger of figures, and
independent checks of a mirror.

Counts are small in ``make test`` and large under ``make soak`` (``BACKREST_RELAY_SOAK=1``).
Every random choice derives from one seed (``BACKREST_RELAY_SEED``, fixed by default so
``make test`` is repeatable; ``make soak`` records the one it used in docs/reliability.md).

The checks here never use the agent's own code to judge the agent: the mirror is read
from the directory behind ``rclone serve s3``, hashed, and compared with the local files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOAK = os.environ.get("BACKREST_RELAY_SOAK", "").strip().lower() in {"1", "true", "yes"}
SEED = int(os.environ.get("BACKREST_RELAY_SEED", "") or 20261126)
LEDGER_ENV = "BACKREST_RELAY_LEDGER"
MiB = 1024 * 1024
MODEL = "model-based (stateful)"  # the ledger category of test_mirror_model.py
MULTIPART = {"multipart_threshold": "5MiB", "part_size": "5MiB"}


# What each test repeats: (in `make test`, under `make soak`).
COUNTS: dict[str, tuple[int, int]] = {
    "crash: SIGKILL points": (5, 20),
    "flaky endpoint: trials (upload, verify, clean rerun)": (2, 10),
    "remote tampering: trials": (10, 50),
    "bad events: hypothesis examples per handler": (100, 500),
    "bad config: hypothesis examples (files, env overrides)": (100, 500),
    "bad config: configs through the CLI": (4, 25),
    "odd repositories: trials": (3, 20),
    "concurrency: pairs of uploads": (3, 10),
    "model: cases": (3, 8),
    "model: steps per case": (6, 20),
    "serve: triggers over 10 repositories, random disconnects": (40, 1000),
}


def count(what: str) -> int:
    """How many trials/examples of `what` (a COUNTS key) this run makes."""
    default, soak = COUNTS[what]
    return soak if SOAK else default


def sub_seed(*parts: object) -> int:
    """A seed for one test or trial, derived from the run's seed (stable across runs)."""
    text = "/".join([str(SEED), *map(str, parts)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


# -- the ledger ---------------------------------------------------------------------------


@dataclass
class Figures:
    """One category's figures for docs/reliability.md."""

    trials: int = 0
    faults: int = 0
    detected: int = 0
    lost: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


class Ledger:
    """Figures gathered by the tests; written as JSON when ``BACKREST_RELAY_LEDGER`` names
    a file (``python -m tests.reliability.soak`` renders it into docs/reliability.md)."""

    def __init__(self) -> None:
        self.categories: dict[str, Figures] = {}
        self._lock = threading.Lock()

    def add(
        self,
        category: str,
        *,
        trials: int = 0,
        faults: int = 0,
        detected: int = 0,
        lost: int = 0,
        kinds: Iterable[str] | Counter[str] = (),
        note: str | None = None,
    ) -> None:
        with self._lock:
            fig = self.categories.setdefault(category, Figures())
            fig.trials += trials
            fig.faults += faults
            fig.detected += detected
            fig.lost += lost
            fig.kinds.update(kinds)
            if note:
                fig.notes.append(note)

    def as_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "seed": SEED,
                "soak": SOAK,
                "categories": {
                    name: {
                        "trials": f.trials,
                        "faults": f.faults,
                        "detected": f.detected,
                        "lost": f.lost,
                        "kinds": dict(sorted(f.kinds.items())),
                        "notes": f.notes,
                    }
                    for name, f in self.categories.items()
                },
            }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_json(), indent=2, sort_keys=True) + "\n")


# -- independent checks of a mirror ------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_files(repo: Path) -> dict[str, Path]:
    """Repository-relative key → path of every file a mirror must hold (all but locks/)."""
    out: dict[str, Path] = {}
    for path in repo.rglob("*"):
        rel = path.relative_to(repo).as_posix()
        if path.is_file() and not path.is_symlink() and not rel.startswith("locks/"):
            out[rel] = path
    return out


def remote_files(bucket_dir: Path, prefix: str) -> dict[str, Path]:
    """Repository-relative key → file of every object under `prefix`, read from the
    directory rclone serves (an independent view: no S3 client involved)."""
    base = bucket_dir / prefix
    if not base.is_dir():
        return {}
    return {p.relative_to(base).as_posix(): p for p in base.rglob("*") if p.is_file()}


@dataclass
class MirrorCheck:
    missing: list[str]
    different: list[str]
    corrupt: list[str]  # objects whose bytes do not hash to their name
    unexpected: list[str]

    @property
    def lost(self) -> int:
        """Local files the mirror does not hold intact."""
        return len(self.missing) + len(self.different)


def check_mirror(repo: Path, bucket_dir: Path, prefix: str) -> MirrorCheck:
    """Compare the mirror with the local repository, byte for byte."""
    local = local_files(repo)
    remote = remote_files(bucket_dir, prefix)
    missing = sorted(set(local) - set(remote))
    different = sorted(
        k for k in set(local) & set(remote) if local[k].read_bytes() != remote[k].read_bytes()
    )
    return MirrorCheck(
        missing=missing,
        different=different,
        corrupt=corrupt_objects(remote, local.get("config")),
        unexpected=sorted(set(remote) - set(local)),
    )


def corrupt_objects(remote: dict[str, Path], local_config: Path | None) -> list[str]:
    """Remote objects whose bytes are not what their name promises (config: the local one)."""
    bad = []
    for key, path in sorted(remote.items()):
        data = path.read_bytes()
        name = key.rsplit("/", 1)[-1]
        if key == "config":
            if local_config is not None and data != local_config.read_bytes():
                bad.append(key)
        elif len(name) == 64 and sha256_bytes(data) != name:
            bad.append(key)
    return bad


def phase_order_violations(repo: Path, remote: Iterable[str]) -> list[str]:
    """What breaks "config, keys, data, then index, then snapshots" in a partial mirror of
    a repository uploaded from scratch: an index before all data, a snapshot before all
    indexes (restic would then find a snapshot naming a pack the mirror lacks)."""
    local = set(local_files(repo))
    present = set(remote)

    def folder(name: str) -> set[str]:
        return {k for k in local if k.startswith(name + "/")}

    problems = []
    if present & folder("index") and not folder("data") <= present:
        problems.append(f"index/ present while {len(folder('data') - present)} packs are not")
    if present & folder("snapshots") and not (folder("data") | folder("index")) <= present:
        missing = len((folder("data") | folder("index")) - present)
        problems.append(f"snapshots/ present while {missing} packs/indexes are not")
    if (present & (folder("data") | folder("index") | folder("snapshots"))) and not (
        {"config"} | folder("keys")
    ) <= present:
        problems.append("objects present before config and keys/")
    return problems


def sqlite_files(state_dir: Path) -> list[Path]:
    return sorted(p for p in state_dir.rglob("*.sqlite") if p.is_file())


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` of one SQLite file ("ok" when healthy)."""
    db = sqlite3.connect(str(path), timeout=30)
    try:
        rows = db.execute("PRAGMA integrity_check").fetchall()
    finally:
        db.close()
    return "; ".join(str(r[0]) for r in rows)


def state_claims(state_dir: Path) -> dict[str, int]:
    """Key → size of every object the agent's state store(s) believe are at the destination."""
    claims: dict[str, int] = {}
    for path in sqlite_files(state_dir):
        db = sqlite3.connect(str(path), timeout=30)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if "objects" in tables and "multipart_uploads" in tables:
                claims.update(dict(db.execute("SELECT key, size FROM objects")))
        finally:
            db.close()
    return claims


def false_claims(state_dir: Path, bucket_dir: Path, prefix: str) -> list[str]:
    """Objects the state store records as present that the bucket lacks or holds at another
    size: the next run would skip them, which is how data gets lost."""
    remote = remote_files(bucket_dir, prefix)
    return sorted(
        key
        for key, size in state_claims(state_dir).items()
        if key not in remote or remote[key].stat().st_size != size
    )


def leaks(where: str, data: str | bytes, secrets: Iterable[str]) -> list[str]:
    """Which secrets occur in `data` (as text, and in URL-quoted form)."""
    from urllib.parse import quote

    blob = data.encode() if isinstance(data, str) else data
    found = []
    for secret in secrets:
        forms = {secret, quote(secret, safe=""), quote(secret)}
        if any(form.encode() in blob for form in forms):
            found.append(f"{secret!r} in {where}")
    return found

"""restic repositories for tests: real ones built with restic, and fast fake ones.

Real repositories (``make_restic_repo``, ``restic_backup``) prove a mirror with restic
itself (``restic_check --read-data``, ``restic_restore``). Fake repositories
(``make_fake_restic_repo``) have restic's exact layout and content-addressed names but
random content, so unit tests and benchmarks get thousands of packs in milliseconds
without restic installed. restic is never allowed to use ``~/.cache``: every helper
passes ``--no-cache`` and ``restic_env`` sets a private ``RESTIC_CACHE_DIR``.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.s3.endpoint import S3Endpoint

__all__ = [
    "BuiltRepo",
    "FakeRepo",
    "ResticError",
    "add_packs",
    "build_restic_repo",
    "corrupt",
    "make_fake_restic_repo",
    "make_restic_repo",
    "restic_backup",
    "restic_check",
    "restic_check_mirror",
    "restic_env",
    "restic_forget",
    "restic_restore",
    "restic_snapshots",
    "s3_repo_url",
    "sha256_file",
    "write_random_tree",
]

# Variables that would make restic (or the AWS SDK inside it) read the developer's own
# repository, password or credentials instead of the ones a test passes explicitly.
_LEAKY_PREFIXES = ("RESTIC_", "AWS_", "B2_", "RCLONE_")

_cache_dir: Path | None = None


def _shared_cache_dir() -> Path:
    """One throw-away restic cache per process, so nothing ever lands in ~/.cache/restic."""
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = Path(tempfile.mkdtemp(prefix="backrest-relay-restic-cache-"))
        atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    return _cache_dir


def restic_env(password: str, **extra: str) -> dict[str, str]:
    """Environment for running restic: the caller's password and nothing from the developer.

    Inherited ``RESTIC_*``/``AWS_*``/``B2_*``/``RCLONE_*`` variables are dropped so a test
    can never touch a real repository or account; ``extra`` adds variables back (for
    example ``AWS_ACCESS_KEY_ID`` for an ``s3:`` repository) and override defaults.
    ``RESTIC_CACHE_DIR`` points at a per-process temporary directory; the helpers in
    ``repos`` also pass ``--no-cache``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES)}
    env["RESTIC_PASSWORD"] = password
    env["RESTIC_CACHE_DIR"] = str(_shared_cache_dir())
    env.update(extra)
    return env


# restic writes repository files read-only and directories private; so do the fakes, so
# code under test meets the same permissions it will meet in production.
_FILE_MODE = 0o400
_DIR_MODE = 0o700

SizeSpec = int | tuple[int, int]


class ResticError(AssertionError):
    """restic exited non-zero; the message carries its command line and output."""

    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"restic failed (exit {returncode}): {' '.join(args)}\n"
            f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-4000:]}"
        )


def _restic(
    repo: str | Path,
    password: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> str:
    """Run ``restic -r REPO --no-cache ARGS`` and return stdout; raise ResticError on failure."""
    restic = shutil.which("restic")
    if restic is None:
        raise RuntimeError("restic not found on PATH (use the restic_bin fixture to skip/fail)")
    cmd = [restic, "-r", str(repo), "--no-cache", *args]
    full_env = restic_env(password, **dict(env or {}))
    proc = subprocess.run(
        cmd,
        env=full_env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise ResticError(cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def _pack_args(pack_size_mib: int | None) -> list[str]:
    return [] if pack_size_mib is None else ["--pack-size", str(pack_size_mib)]


def s3_repo_url(endpoint: S3Endpoint, bucket: str, prefix: str = "") -> str:
    """restic's ``s3:http://127.0.0.1:PORT/BUCKET/PREFIX`` URL for a mirror on ``endpoint``.

    Pass ``endpoint.env()`` as ``env`` to the helpers below for the credentials.
    """
    path = "/".join(p.strip("/") for p in (bucket, prefix) if p.strip("/"))
    return f"s3:{endpoint.endpoint_url.rstrip('/')}/{path}"


def make_restic_repo(path: Path, password: str, *, pack_size_mib: int | None = None) -> None:
    """``restic init`` a local repository at ``path``.

    ``pack_size_mib`` is not stored by restic; pass it again to ``restic_backup``.
    """
    del pack_size_mib  # accepted for symmetry with restic_backup; init has no pack size
    _restic(path, password, ["init", "--quiet"])


def restic_backup(
    repo: Path | str,
    password: str,
    source: Path,
    *,
    pack_size_mib: int | None = None,
    tags: Iterable[str] = (),
    host: str = "backrest-relay-test",
    env: Mapping[str, str] | None = None,
) -> str:
    """Back up ``source`` and return the new snapshot's full 64-hex id.

    restic 0.14's ``--json`` summary only carries the short id; it is resolved from the
    ``snapshots/`` directory of a local repository, else through ``restic snapshots``.
    """
    args = ["backup", "--json", "--host", host, *_pack_args(pack_size_mib)]
    for tag in tags:
        args += ["--tag", tag]
    out = _restic(repo, password, [*args, str(source)], env=env)
    short_id: str | None = None
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        message = json.loads(line)
        if message.get("message_type") == "summary":
            short_id = message.get("snapshot_id")
    if not short_id:
        raise RuntimeError(f"restic backup printed no snapshot id:\n{out[-2000:]}")
    local = Path(repo) / "snapshots"
    if local.is_dir():
        matches = [p.name for p in local.glob(f"{short_id}*")]
    else:
        matches = [
            s["id"]
            for s in restic_snapshots(str(repo), password, env=env)
            if s["id"].startswith(short_id)
        ]
    if len(matches) != 1:
        raise RuntimeError(f"snapshot {short_id} resolved to {matches}")
    snapshot_id: str = matches[0]
    return snapshot_id


@dataclass(frozen=True)
class BuiltRepo:
    """A real restic repository, the folder its snapshots were taken of, and their ids."""

    path: Path
    source: Path
    password: str
    snapshots: list[str]


def build_restic_repo(
    base: Path, password: str, rounds: Iterable[Callable[[Path], int | None]]
) -> BuiltRepo:
    """``restic init`` under ``base``, then one backup per round: each round writes files
    into the folder it is given (under the one source) and returns the ``--pack-size`` in
    MiB for its backup, or None for restic's default."""
    repo, source = base / "repo", base / "src"
    make_restic_repo(repo, password)
    snapshots = []
    for number, write in enumerate(rounds):
        pack_mib = write(source / f"round{number}")
        snapshots.append(restic_backup(repo, password, source, pack_size_mib=pack_mib))
    return BuiltRepo(repo, source, password, snapshots)


def restic_snapshots(
    repo_or_url: str | Path, password: str, env: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """``restic snapshots --json``: one dict per snapshot (``id``, ``time``, ``paths``...)."""
    out = _restic(repo_or_url, password, ["snapshots", "--json"], env=env)
    snapshots: list[dict[str, Any]] = json.loads(out or "[]") or []
    return snapshots


# restic 0.14 retries a missing or unreadable object for ~45 s before it reports it; these
# lines on stderr already say the check will fail.
_CHECK_VERDICTS = ("does not exist", "not found", "is damaged", "wrong size", "Fatal:")


def restic_check(
    repo_or_url: str | Path,
    password: str,
    env: Mapping[str, str] | None = None,
    read_data: bool = True,
    *,
    fail_fast: bool = False,
) -> str:
    """``restic check`` (``--read-data`` by default); ResticError with its output if it fails.

    ``fail_fast`` stops restic at the first line that names a missing or damaged object
    instead of waiting out its retries (a model-based test checks after every step).
    """
    args = ["check", *(["--read-data"] if read_data else [])]
    if not fail_fast:
        return _restic(repo_or_url, password, args, env=env)
    restic = shutil.which("restic")
    if restic is None:
        raise RuntimeError("restic not found on PATH (use the restic_bin fixture to skip/fail)")
    cmd = [restic, "-r", str(repo_or_url), "--no-cache", *args]
    proc = subprocess.Popen(
        cmd,
        env=restic_env(password, **dict(env or {})),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None and proc.stdout is not None
    errors: list[str] = []
    for line in proc.stderr:
        errors.append(line)
        if any(v in line for v in _CHECK_VERDICTS) and "retrying" not in line:
            proc.kill()
            break
    stdout, rest = proc.communicate(timeout=300)
    stderr = "".join(errors) + rest
    if proc.returncode != 0:
        raise ResticError(cmd, proc.returncode, stdout, stderr)
    return stdout


def restic_check_mirror(
    endpoint: S3Endpoint, bucket: str, prefix: str, password: str, *, read_data: bool = True
) -> str:
    """``restic check`` of the mirror at ``bucket/prefix`` on ``endpoint``: the oracle."""
    return restic_check(
        s3_repo_url(endpoint, bucket, prefix), password, env=endpoint.env(), read_data=read_data
    )


def restic_forget(
    repo: Path | str,
    password: str,
    *,
    keep_last: int,
    prune: bool = True,
    max_unused: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """``restic forget --keep-last N [--prune [--max-unused X]]``: what a retention policy in
    Backrest does (``max_unused="0"`` repacks every pack with unused data)."""
    args = ["forget", "--keep-last", str(keep_last), *(["--prune"] if prune else [])]
    if prune and max_unused is not None:
        args += ["--max-unused", max_unused]
    return _restic(repo, password, args, env=env)


def restic_restore(
    repo_or_url: str | Path,
    password: str,
    snapshot_id: str,
    target: Path,
    env: Mapping[str, str] | None = None,
) -> None:
    """Restore ``snapshot_id`` into ``target`` (restic recreates the absolute source path)."""
    _restic(repo_or_url, password, ["restore", snapshot_id, "--target", str(target)], env=env)


# ---------------------------------------------------------------------------------------------
# Source data


def _pick_size(rng: random.Random, size: SizeSpec) -> int:
    if isinstance(size, tuple):
        low, high = size
        return rng.randint(low, high)
    return size


def write_random_tree(root: Path, *, files: int, size: SizeSpec, seed: int) -> int:
    """Write ``files`` incompressible files under ``root`` (a few subdirectories deep).

    Same arguments, same bytes: data comes from ``random.Random(seed)``, so restic's
    deduplication behaves identically from run to run. Returns the total bytes written.
    """
    rng = random.Random(seed)
    total = 0
    for i in range(files):
        n = _pick_size(rng, size)
        path = root / f"dir{i % 7:02d}" / f"sub{i % 3}" / f"file{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(n))
        total += n
    return total


# ---------------------------------------------------------------------------------------------
# Fake restic-format repositories


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (what restic names every file but ``config`` by)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class FakeRepo:
    """Files of a fake restic repository, by category (paths are absolute)."""

    root: Path
    config: Path
    keys: list[Path] = field(default_factory=list)
    data: list[Path] = field(default_factory=list)
    index: list[Path] = field(default_factory=list)
    snapshots: list[Path] = field(default_factory=list)
    locks: list[Path] = field(default_factory=list)

    def mirrored_files(self) -> list[Path]:
        """Everything a mirror must copy, in safe upload order (config, keys, data, index,
        snapshots); ``locks/`` is transient and never mirrored."""
        return [self.config, *self.keys, *self.data, *self.index, *self.snapshots]

    def all_files(self) -> list[Path]:
        """Every file on disk, locks included."""
        return [*self.mirrored_files(), *self.locks]

    def relpaths(self, files: Iterable[Path] | None = None) -> list[str]:
        """POSIX paths relative to the repository root (the object keys under a prefix)."""
        chosen = self.mirrored_files() if files is None else files
        return [p.relative_to(self.root).as_posix() for p in chosen]

    @property
    def total_bytes(self) -> int:
        """Size of the mirrored files."""
        return sum(p.stat().st_size for p in self.mirrored_files())


def _write_named(directory: Path, content: bytes, *, fanout: bool = False) -> Path:
    """Write ``content`` as restic does: named by its SHA-256, read-only."""
    name = hashlib.sha256(content).hexdigest()
    parent = directory / name[:2] if fanout else directory
    path = parent / name
    path.write_bytes(content)
    path.chmod(_FILE_MODE)
    return path


def _fake_key(rng: random.Random) -> bytes:
    """A key file shaped like restic's (plain JSON; salt and sealed master key random)."""
    doc = {
        "created": f"2024-01-{rng.randint(1, 28):02d}T12:00:00.000000000Z",
        "username": "backrest",
        "hostname": "nas",
        "kdf": "scrypt",
        "N": 32768,
        "r": 8,
        "p": 7,
        "salt": base64.b64encode(rng.randbytes(64)).decode(),
        "data": base64.b64encode(rng.randbytes(112)).decode(),
    }
    return json.dumps(doc, indent=2).encode()


def _add_packs(repo: FakeRepo, rng: random.Random, n: int, size: SizeSpec) -> list[Path]:
    packs = [
        _write_named(repo.root / "data", rng.randbytes(_pick_size(rng, size)), fanout=True)
        for _ in range(n)
    ]
    repo.data += packs
    return packs


def _add_index(repo: FakeRepo, rng: random.Random, packs: int) -> Path:
    # Encrypted JSON listing each pack's blobs; size grows with the packs it covers.
    index = _write_named(repo.root / "index", rng.randbytes(200 + 120 * packs))
    repo.index.append(index)
    return index


def _add_snapshot(repo: FakeRepo, rng: random.Random) -> Path:
    snapshot = _write_named(repo.root / "snapshots", rng.randbytes(rng.randint(250, 450)))
    repo.snapshots.append(snapshot)
    return snapshot


def make_fake_restic_repo(
    path: Path,
    *,
    packs: int,
    pack_size: SizeSpec,
    index_files: int = 2,
    snapshots: int = 2,
    keys: int = 1,
    seed: int = 0,
) -> FakeRepo:
    """Create a restic-FORMAT repository at ``path`` without restic.

    Layout as ``restic init`` makes it (``config``, ``keys/``, ``locks/``, ``snapshots/``,
    ``index/``, ``data/00..ff/``), every file except ``config`` named by the SHA-256 of
    its (random, deterministic from ``seed``) bytes, plus one stale lock. restic cannot
    open it (nothing is encrypted with a real key); it is for mirror logic and benchmarks.
    """
    if index_files < 1 or snapshots < 1 or keys < 1:
        raise ValueError("a restic repository has at least one key, index and snapshot")
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for sub in ("keys", "locks", "snapshots", "index", "data"):
        (path / sub).mkdir(exist_ok=True)
    for i in range(256):
        (path / "data" / f"{i:02x}").mkdir(exist_ok=True)
    config = path / "config"
    config.write_bytes(rng.randbytes(155))  # encrypted JSON in a real repository
    config.chmod(_FILE_MODE)
    repo = FakeRepo(root=path, config=config)
    repo.keys = [_write_named(path / "keys", _fake_key(rng)) for _ in range(keys)]
    _add_packs(repo, rng, packs, pack_size)
    for _ in range(index_files):
        _add_index(repo, rng, max(1, packs // index_files))
    for _ in range(snapshots):
        _add_snapshot(repo, rng)
    repo.locks = [_write_named(path / "locks", rng.randbytes(300))]
    for directory in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        directory.chmod(_DIR_MODE)
    return repo


def add_packs(repo: FakeRepo, n: int, size: SizeSpec, seed: int) -> list[Path]:
    """Simulate an incremental backup: ``n`` new packs, one new index, one new snapshot.

    Updates ``repo`` in place and returns the new files (upload order).
    """
    rng = random.Random(seed)
    packs = _add_packs(repo, rng, n, size)
    return [*packs, _add_index(repo, rng, n), _add_snapshot(repo, rng)]


def corrupt(path: Path, offset: int | None = None) -> int:
    """Flip one byte of ``path`` in place (the middle one by default); return its offset.

    Works on restic's read-only files; the mode and size are kept, only content changes.
    """
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"cannot corrupt empty file {path}")
    at = size // 2 if offset is None else offset
    mode = stat.S_IMODE(path.stat().st_mode)
    path.chmod(mode | stat.S_IWUSR)
    try:
        with path.open("r+b") as fh:
            fh.seek(at)
            byte = fh.read(1)
            fh.seek(at)
            fh.write(bytes([byte[0] ^ 0xFF]))
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        path.chmod(mode)
    return at

"""restic-format repositories for the scenarios, generated once per invocation.

The files come from `testbed.repos` (restic's layout, every file named by the SHA-256
of its random bytes). Modification times are set to one whole second in the past, the same
for every file: peers that compare times (rclone, s5cmd) then see exactly the times a
mirror made by themselves would carry, whatever precision the server keeps.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.sizes import Sizes
from testbed.repos import FakeRepo, add_packs, make_fake_restic_repo

_Maker = Callable[[Path], FakeRepo]

# One fixed timestamp (whole seconds) for every file of every repository of a run.
REPO_MTIME = int(time.time()) - 24 * 3600


def _set_times(paths: Iterable[Path]) -> None:
    for path in paths:
        os.utime(path, (REPO_MTIME, REPO_MTIME))


def mirrored_count(repo: FakeRepo) -> int:
    """How many files a mirror of `repo` holds (locks excluded)."""
    return len(repo.mirrored_files())


def small_file_repo(path: Path, files: int, size: int, seed: int) -> FakeRepo:
    """A repository of exactly `files` mirrored files, all packs of `size` bytes.

    Besides the packs there are `config`, one key, two index files and two snapshots.
    """
    packs = max(1, files - 6)
    repo = make_fake_restic_repo(path, packs=packs, pack_size=size, seed=seed)
    _set_times(repo.all_files())
    return repo


def s1_repo(path: Path, sizes: Sizes) -> FakeRepo:
    """~16 MiB packs plus many small packs (small incremental backups), like S1 asks."""
    half = sizes.s1_pack_size // 64  # packs vary a little around the target, as restic's do
    repo = make_fake_restic_repo(
        path,
        packs=sizes.s1_packs,
        pack_size=(sizes.s1_pack_size - half, sizes.s1_pack_size + half),
        seed=1,
    )
    add_packs(repo, sizes.s1_small_files, sizes.s1_small_size, seed=2)
    _set_times(repo.all_files())
    return repo


def add_new_files(repo: FakeRepo, count: int, size: int, seed: int) -> list[Path]:
    """An incremental backup: `count` files in all (new packs, one index, one snapshot)."""
    new = add_packs(repo, max(1, count - 2), size, seed=seed)
    _set_times(new)
    return new


class RepoCache:
    """Repositories by name under one directory, made on first use, dropped on request."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._repos: dict[str, FakeRepo] = {}
        self.generation_seconds: dict[str, float] = {}

    def small(self, name: str, files: int, size: int, seed: int) -> FakeRepo:
        return self._make(name, lambda p: small_file_repo(p, files, size, seed))

    def s1(self, sizes: Sizes) -> FakeRepo:
        return self._make("s1", lambda p: s1_repo(p, sizes))

    def _make(self, name: str, make: _Maker) -> FakeRepo:
        if name not in self._repos:
            started = time.perf_counter()
            self._repos[name] = make(self.root / name)
            self.generation_seconds[name] = time.perf_counter() - started
        return self._repos[name]

    def drop(self, name: str) -> None:
        """Delete a repository no later scenario needs (tmpfs is memory)."""
        repo = self._repos.pop(name, None)
        if repo is not None:
            shutil.rmtree(repo.root, ignore_errors=True)

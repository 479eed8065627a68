"""Real restic repositories shared by the integration tests.

Building a ≥ 50 MB repository with several snapshots takes seconds, so it is built once per
session and each test that changes it works on its own copy.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.repos import make_restic_repo, restic_backup, write_random_tree


@dataclass(frozen=True)
class BuiltRepo:
    path: Path
    source: Path
    snapshots: list[str]


@pytest.fixture(scope="session")
def built_restic_repo(
    tmp_path_factory: pytest.TempPathFactory, restic_bin: str, restic_password: str
) -> BuiltRepo:
    """A real restic repository: three snapshots, ~60 MB of incompressible data, packs of
    16 MiB (restic's default) plus small tree packs."""
    base = tmp_path_factory.mktemp("restic-built")
    repo = base / "repo"
    source = base / "src"
    make_restic_repo(repo, restic_password)
    snapshots = []
    for round_ in range(3):
        write_random_tree(
            source / f"round{round_}", files=12, size=(200_000, 3_000_000), seed=round_
        )
        (source / f"round{round_}" / "big.bin").write_bytes(
            random.Random(100 + round_).randbytes(7_000_000)
        )
        snapshots.append(restic_backup(repo, restic_password, source))
    return BuiltRepo(repo, source, snapshots)


@pytest.fixture
def restic_repo(built_restic_repo: BuiltRepo, tmp_path: Path) -> BuiltRepo:
    """A private copy of the built repository (tests may back up, prune or corrupt it)."""
    copy = tmp_path / "repo"
    shutil.copytree(built_restic_repo.path, copy, symlinks=True)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o400)
    return BuiltRepo(copy, built_restic_repo.source, list(built_restic_repo.snapshots))

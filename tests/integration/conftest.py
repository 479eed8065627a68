"""Real restic repositories shared by the integration tests.

Building a ≥ 50 MB repository with several snapshots takes seconds, so it is built once per
session and each test that changes it works on its own copy.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.repos import BuiltRepo, build_restic_repo, write_random_tree

__all__ = ["BuiltRepo"]  # for the tests' type hints


@pytest.fixture(scope="session")
def built_restic_repo(
    tmp_path_factory: pytest.TempPathFactory, restic_bin: str, restic_password: str
) -> BuiltRepo:
    """A real restic repository: three snapshots, ~60 MB of incompressible data, packs of
    16 MiB (restic's default) plus small tree packs."""

    def write(folder: Path, seed: int) -> None:
        write_random_tree(folder, files=12, size=(200_000, 3_000_000), seed=seed)
        (folder / "big.bin").write_bytes(random.Random(100 + seed).randbytes(7_000_000))

    return build_restic_repo(
        tmp_path_factory.mktemp("restic-built"),
        restic_password,
        [functools.partial(write, seed=seed) for seed in range(3)],
    )


@pytest.fixture
def restic_repo(built_restic_repo: BuiltRepo, tmp_path: Path) -> BuiltRepo:
    """A private copy of the built repository (tests may back up, prune or corrupt it)."""
    copy = tmp_path / "repo"
    shutil.copytree(built_restic_repo.path, copy, symlinks=True)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o400)
    return dataclasses.replace(
        built_restic_repo, path=copy, snapshots=list(built_restic_repo.snapshots)
    )


@pytest.fixture
def clean_env() -> Iterator[None]:
    """In-process runs read the environment: keep the host's settings out."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("BACKREST_RELAY_", "AWS_"))}
    for name in saved:
        del os.environ[name]
    yield
    os.environ.update(saved)

"""Fixtures of the fault and abuse suite: the ledger of figures, one real restic repository
built per session, and an rclone server that sees changes made to its directory at once.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.repos import BuiltRepo, build_restic_repo, write_random_tree
from testbed.s3.rclone import RcloneS3Server
from tests.reliability.common import LEDGER_ENV, SEED, SOAK, Ledger
from tests.support.tools import require_tool

_LEDGER = Ledger()


def pytest_report_header() -> str:
    return f"reliability suite: seed {SEED}, {'soak' if SOAK else 'bounded'} counts"


@pytest.fixture(scope="session")
def ledger() -> Iterator[Ledger]:
    """Figures for docs/reliability.md (written when BACKREST_RELAY_LEDGER names a file)."""
    yield _LEDGER
    target = os.environ.get(LEDGER_ENV)
    if target:
        _LEDGER.write(Path(target))


ResticRepo = BuiltRepo  # the name the reliability tests use


@pytest.fixture(scope="session")
def crash_repo(
    tmp_path_factory: pytest.TempPathFactory, restic_bin: str, restic_password: str
) -> ResticRepo:
    """A real restic repository of ~30 MB: four snapshots, three packs above the 5 MiB
    multipart threshold (two or three parts each) and a handful of small packs, so a
    kill can land in a single PUT, between the parts of a multipart upload, in the
    index or snapshot phase, or in the manifest and verification that follow."""
    rng = random.Random(SEED)
    plan = [(16_000_000, 4, 6), (10_000_000, 2, 8), (1_500_000, 6, None), (700_000, 4, None)]

    def write(folder: Path, total: int, files: int, pack_mib: int | None) -> int | None:
        write_random_tree(folder, files=files, size=total // files, seed=rng.randrange(1 << 30))
        return pack_mib

    return build_restic_repo(
        tmp_path_factory.mktemp("reliability-restic"),
        restic_password,
        [functools.partial(write, total=t, files=f, pack_mib=p) for t, f, p in plan],
    )


@pytest.fixture(scope="session")
def live_rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    """``rclone serve s3`` with a 10 ms directory cache: a file changed, added or removed
    on disk (bit rot, a meddling provider) shows in a listing made a moment later, as it
    would on S3. (``0s`` would be the obvious value, but rclone 1.75 then spins on
    concurrent uploads into new directories.)"""
    rclone = require_tool("rclone")
    root = tmp_path_factory.mktemp("rclone-live-root")
    with RcloneS3Server(root, rclone=rclone, extra_args=["--dir-cache-time", "10ms"]) as server:
        yield server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the directory-cache-free rclone server need rclone like the others do."""
    for item in items:
        if "live_rclone" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_tools)

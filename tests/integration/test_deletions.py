"""Deletions on the mirror (`upload.delete = true`): per-kind guards and deferred deletion.

Real restic repositories, real `rclone serve s3`. After every run, refused or not, restic
itself checks the mirror. Deferred deletion is driven by a clock passed to the run, never
by waiting.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from local_agent.config import load_config
from local_agent.identity import ResolvedRepo
from local_agent.upload import run_upload
from testbed.agent import agent_config_in, agent_env, remote_keys, run_agent
from testbed.repos import (
    make_restic_repo,
    restic_backup,
    restic_check_mirror,
    restic_snapshots,
    s3_repo_url,
    write_random_tree,
)
from testbed.s3.rclone import RcloneS3Server

PREFIX = "restic/home"
DAY = 86400.0
T0 = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


@dataclass
class Rotating:
    """A small real repository whose snapshots each hold their own data, as a user's
    changing files would: forgetting old snapshots frees packs and rewrites the index."""

    path: Path
    source: Path
    password: str

    def backup(self, seed: int, size: tuple[int, int] = (60_000, 400_000)) -> str:
        shutil.rmtree(self.source, ignore_errors=True)
        write_random_tree(self.source, files=4, size=size, seed=seed)
        return restic_backup(self.path, self.password, self.source)

    def forget_prune(self, keep_last: int) -> None:
        subprocess.run(
            [
                "restic",
                "-r",
                str(self.path),
                "--no-cache",
                "forget",
                "--keep-last",
                str(keep_last),
                "--prune",
                "--max-unused",
                "0",
            ],
            env={**os.environ, "RESTIC_PASSWORD": self.password},
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )

    def files(self) -> set[str]:
        return {
            f"{PREFIX}/{p.relative_to(self.path).as_posix()}"
            for p in self.path.rglob("*")
            if p.is_file() and not p.relative_to(self.path).as_posix().startswith("locks/")
        }


@pytest.fixture
def rotating(tmp_path: Path, restic_bin: str, restic_password: str) -> Rotating:
    repo = Rotating(tmp_path / "repo", tmp_path / "src", restic_password)
    make_restic_repo(repo.path, restic_password)
    for seed in range(4):
        repo.backup(seed)
    return repo


@dataclass
class Mirror:
    server: RcloneS3Server
    bucket: str
    config: Path
    password: str

    def objects(self) -> set[str]:
        return set(remote_keys(self.server.endpoint, self.bucket, f"{PREFIX}/"))

    def check(self, *, read_data: bool = False) -> None:
        """The oracle: restic itself reads the mirror."""
        restic_check_mirror(
            self.server.endpoint, self.bucket, PREFIX, self.password, read_data=read_data
        )

    def snapshots(self) -> int:
        url = s3_repo_url(self.server.endpoint, self.bucket, PREFIX)
        return len(restic_snapshots(url, self.password, env=self.server.endpoint.env()))

    def upload(self, repo: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
        args = ["upload", "--repo", str(repo), "--repo-id", "home", "--config", str(self.config)]
        return run_agent([*args, "--json", *extra], env=env)

    def upload_at(
        self,
        repo: Path,
        now: float,
        *,
        dry_run: bool = False,
        reconcile: bool = False,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """One run in this process, with the clock at `now`."""
        config = load_config(str(self.config), env=agent_env(env)).config
        summary = run_upload(
            config,
            ResolvedRepo(repo, "home", None),
            dry_run=dry_run,
            reconcile=reconcile,
            show_progress=False,
            clock=lambda: now,
        )
        return summary.as_dict()


def make_mirror(
    tmp_path: Path, server: RcloneS3Server, bucket: str, password: str, **upload: object
) -> Mirror:
    config = agent_config_in(
        tmp_path,
        server.endpoint,
        bucket,
        upload={"delete": True, **upload},
    )
    return Mirror(server, bucket, config, password)


def test_forget_prune_on_a_small_repository_needs_no_human(
    rotating: Rotating, rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    """`forget --keep-last 2 --prune` on a 4-snapshot repository drops half the snapshots,
    every index file and the packs of two snapshots — a large share of a small mirror,
    and an ordinary day. With the default guard settings it is mirrored as it is."""
    mirror = make_mirror(
        tmp_path, rclone_server, rclone_bucket, rotating.password, delete_after="0"
    )
    first = mirror.upload(rotating.path)
    assert first.returncode == 0, first.stderr
    before = mirror.objects()
    rotating.forget_prune(keep_last=2)
    gone = before - rotating.files()
    assert any("/snapshots/" in k for k in gone)
    assert any("/index/" in k for k in gone)
    assert any("/data/" in k for k in gone)
    assert len(gone) * 100 > 25 * len(before)  # far over the old 10 % of all objects

    result = mirror.upload(rotating.path)
    assert result.returncode == 0, result.stderr
    assert result.summary["deleted_files"] == len(gone)
    assert result.summary["pending_deletions"] == 0
    assert mirror.objects() == rotating.files()
    mirror.check(read_data=True)
    assert mirror.snapshots() == 2


@pytest.mark.parametrize("override", [None, "100"])
def test_emptied_snapshots_folder_is_refused_and_nothing_deleted(
    override: str | None,
    rotating: Rotating,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
) -> None:
    """A local `snapshots/` that suddenly emptied (a mistaken forget, ransomware, a
    rolled-back NAS) is refused with exit 5 naming the kind — even with the share limit
    lifted: the mirror never loses all of its snapshots."""
    mirror = make_mirror(
        tmp_path, rclone_server, rclone_bucket, rotating.password, delete_after="0"
    )
    assert mirror.upload(rotating.path).returncode == 0
    before = mirror.objects()
    for snapshot in (rotating.path / "snapshots").iterdir():
        snapshot.unlink()
    env = {"BACKREST_RELAY_UPLOAD__MAX_DELETE_PERCENT": override} if override else None

    result = mirror.upload(rotating.path, env=env)
    assert result.returncode == 5, result.stderr
    assert "snapshots/" in result.summary["error"]["message"]
    assert "nothing was deleted" in result.summary["error"]["message"]
    assert "snapshots/" in result.stderr
    assert result.summary["deleted_files"] == 0
    assert mirror.objects() == before
    mirror.check()
    assert mirror.snapshots() == 4


@pytest.mark.parametrize("folder", ["index", "data"])
def test_any_emptied_folder_is_refused_even_with_the_limit_lifted(
    folder: str,
    rotating: Rotating,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
) -> None:
    """No kind is ever deleted entirely from the mirror: an empty local `index/` or `data/`
    is a broken or unmounted repository, not a prune."""
    mirror = make_mirror(
        tmp_path, rclone_server, rclone_bucket, rotating.password, delete_after="0"
    )
    assert mirror.upload(rotating.path).returncode == 0
    before = mirror.objects()
    for path in (rotating.path / folder).rglob("*"):
        if path.is_file():
            path.unlink()
    result = mirror.upload(rotating.path, env={"BACKREST_RELAY_UPLOAD__MAX_DELETE_PERCENT": "100"})
    assert result.returncode == 5, result.stderr
    assert f"refusing to delete {folder}/" in result.summary["error"]["message"]
    assert mirror.objects() == before
    mirror.check()


def test_most_snapshots_forgotten_at_once_is_refused_until_allowed(
    rotating: Rotating, rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    """`forget --keep-last 1` on a repository whose snapshots accumulated (an attacker's
    or a slip of the keyboard) loses more than the allowance: refused, naming snapshots/,
    until one run lifts the limit."""
    for seed in range(4, 8):
        rotating.backup(seed)
    mirror = make_mirror(
        tmp_path, rclone_server, rclone_bucket, rotating.password, delete_after="0"
    )
    assert mirror.upload(rotating.path).returncode == 0
    before = mirror.objects()
    rotating.forget_prune(keep_last=1)

    refused = mirror.upload(rotating.path)
    assert refused.returncode == 5, refused.stderr
    assert "snapshots/" in refused.summary["error"]["message"]
    assert "MAX_DELETE_PERCENT" in refused.summary["error"]["message"]
    assert mirror.objects() >= before
    mirror.check()
    again = mirror.upload(rotating.path)
    assert again.returncode == 5, again.stderr  # a refusal is not forgotten by retrying

    allowed = mirror.upload(rotating.path, env={"BACKREST_RELAY_UPLOAD__MAX_DELETE_PERCENT": "100"})
    assert allowed.returncode == 0, allowed.stderr
    assert mirror.objects() == rotating.files()
    mirror.check()
    assert mirror.snapshots() == 1


def test_packs_vanishing_without_an_index_change_are_refused(
    rotating: Rotating, rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    """Packs gone while every index file stayed is a damaged or rolled-back disk, not a
    prune (a prune replaces index files): refused naming data/, nothing deleted."""
    for seed in range(4, 7):
        rotating.backup(seed, size=(2_000_000, 3_000_000))
    mirror = make_mirror(
        tmp_path, rclone_server, rclone_bucket, rotating.password, delete_after="0"
    )
    assert mirror.upload(rotating.path).returncode == 0
    before = mirror.objects()
    packs = sorted(
        (p for p in (rotating.path / "data").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    removed = 0
    for pack in reversed(packs):
        removed += pack.stat().st_size
        pack.unlink()
        if removed > 20 * 1024 * 1024:
            break
    assert any((rotating.path / "data").rglob("*/*"))  # not all of them: another rule
    result = mirror.upload(rotating.path)
    assert result.returncode == 5, result.stderr
    assert "data/" in result.summary["error"]["message"]
    assert mirror.objects() == before
    mirror.check()


def test_deletions_wait_for_delete_after(
    rotating: Rotating,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
    clean_env: None,
) -> None:
    """Gone locally, kept remotely for `upload.delete_after` (default 7 days): a mistake
    on the backup host has a week in which the off-site copy still holds everything.
    Then deleted, snapshots → index → packs, and restic still reads the mirror."""
    mirror = make_mirror(tmp_path, rclone_server, rclone_bucket, rotating.password)
    assert mirror.upload_at(rotating.path, T0)["exit_code"] == 0
    before = mirror.objects()
    rotating.forget_prune(keep_last=2)
    gone = before - rotating.files()
    t1 = T0 + DAY

    first = mirror.upload_at(rotating.path, t1)
    assert first["exit_code"] == 0, first["error"]
    assert first["deleted_files"] == 0
    assert first["pending_deletions"] == len(gone)
    assert first["next_deletion_due"] == "2026-03-09T00:00:00Z"  # T0 + 1 day + 7 days
    assert mirror.objects() == before | rotating.files()
    mirror.check()
    assert mirror.snapshots() == 4  # the forgotten ones are still restorable

    plan = mirror.upload_at(rotating.path, t1 + 6 * DAY, dry_run=True)
    assert plan["plan"]["delete"] == 0
    assert plan["plan"]["delete_pending"] == len(gone)
    assert plan["plan"]["delete_next_due"] == "2026-03-09T00:00:00Z"

    waiting = mirror.upload_at(rotating.path, t1 + 7 * DAY - 1)
    assert waiting["exit_code"] == 0
    assert waiting["deleted_files"] == 0
    assert waiting["requests"] == 0  # nothing new, nothing due: still a no-op run
    assert mirror.objects() == before | rotating.files()

    plan = mirror.upload_at(rotating.path, t1 + 7 * DAY, dry_run=True)
    assert plan["plan"]["delete"] == len(gone)
    assert plan["plan"]["delete_guard"] == "ok"

    due = mirror.upload_at(rotating.path, t1 + 7 * DAY)
    assert due["exit_code"] == 0, due["error"]
    assert due["deleted_files"] == len(gone)
    assert due["pending_deletions"] == 0
    assert due["next_deletion_due"] is None
    assert mirror.objects() == rotating.files()
    mirror.check(read_data=True)
    assert mirror.snapshots() == 2


def test_a_file_back_locally_restarts_its_clock(
    rotating: Rotating,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
    clean_env: None,
) -> None:
    """A snapshot that disappears and comes back (a NAS remounted, a restore from a local
    backup) loses its mark; gone again later, it waits the full `delete_after` again."""
    mirror = make_mirror(
        tmp_path, rclone_server, rclone_bucket, rotating.password, delete_after="3d"
    )
    assert mirror.upload_at(rotating.path, T0)["exit_code"] == 0
    before = mirror.objects()
    snapshot = sorted((rotating.path / "snapshots").iterdir())[0]
    aside = tmp_path / snapshot.name
    shutil.move(snapshot, aside)

    assert mirror.upload_at(rotating.path, T0 + DAY)["pending_deletions"] == 1
    shutil.move(aside, snapshot)
    back = mirror.upload_at(rotating.path, T0 + 2 * DAY)
    assert back["pending_deletions"] == 0
    shutil.move(snapshot, aside)
    again = mirror.upload_at(rotating.path, T0 + 3 * DAY)
    assert again["pending_deletions"] == 1
    assert again["next_deletion_due"] == "2026-03-07T00:00:00Z"  # 3 + 3 days, not 1 + 3

    kept = mirror.upload_at(rotating.path, T0 + 5 * DAY)
    assert kept["deleted_files"] == 0
    assert mirror.objects() == before
    deleted = mirror.upload_at(rotating.path, T0 + 6 * DAY)
    assert deleted["deleted_files"] == 1
    assert mirror.objects() == before - {f"{PREFIX}/snapshots/{snapshot.name}"}
    mirror.check()
    assert mirror.snapshots() == 3


def test_keys_are_never_deleted(
    rotating: Rotating, rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    """A key removed locally (`restic key remove`) stays on the mirror: an extra key is
    harmless there, a missing one may lock the owner out of the copy."""
    subprocess.run(
        [
            "restic",
            "-r",
            str(rotating.path),
            "--no-cache",
            "key",
            "add",
            "--new-password-file",
            "/dev/stdin",
        ],
        env={**os.environ, "RESTIC_PASSWORD": rotating.password},
        input="second-password",
        text=True,
        check=True,
        capture_output=True,
    )
    mirror = make_mirror(
        tmp_path, rclone_server, rclone_bucket, rotating.password, delete_after="0"
    )
    assert mirror.upload(rotating.path).returncode == 0
    keys = sorted((rotating.path / "keys").iterdir())
    assert len(keys) == 2
    before = mirror.objects()
    keys[-1].unlink()
    result = mirror.upload(rotating.path)
    assert result.returncode == 0, result.stderr
    assert result.summary["deleted_files"] == 0
    assert mirror.objects() == before
    mirror.check()


def test_rotation_between_two_runs_passes_whatever_its_size(
    rotating: Rotating, rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    """Backrest's default check runs monthly: between two runs many snapshots are taken
    and as many forgotten. Every mirrored snapshot is gone, but as many new ones stay —
    no net loss, no human needed."""
    mirror = make_mirror(
        tmp_path, rclone_server, rclone_bucket, rotating.password, delete_after="0"
    )
    assert mirror.upload(rotating.path).returncode == 0
    mirrored = {k for k in mirror.objects() if "/snapshots/" in k}
    for seed in range(4, 10):
        rotating.backup(seed)
    rotating.forget_prune(keep_last=4)
    assert not mirrored & rotating.files()  # all four mirrored snapshots were forgotten

    result = mirror.upload(rotating.path)
    assert result.returncode == 0, result.stderr
    assert mirror.objects() == rotating.files()
    mirror.check()
    assert mirror.snapshots() == 4


def test_marks_survive_reconcile_and_go_when_delete_is_turned_off(
    rotating: Rotating,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
    clean_env: None,
) -> None:
    mirror = make_mirror(tmp_path, rclone_server, rclone_bucket, rotating.password)
    assert mirror.upload_at(rotating.path, T0)["exit_code"] == 0
    snapshot = sorted((rotating.path / "snapshots").iterdir())[0]
    shutil.move(snapshot, tmp_path / snapshot.name)

    marked = mirror.upload_at(rotating.path, T0 + DAY)
    assert marked["next_deletion_due"] == "2026-03-09T00:00:00Z"
    reconciled = mirror.upload_at(rotating.path, T0 + 2 * DAY, reconcile=True)
    assert reconciled["exit_code"] == 0, reconciled["error"]
    assert reconciled["listed_objects"] is not None
    assert reconciled["next_deletion_due"] == "2026-03-09T00:00:00Z"  # the wait goes on

    off = mirror.upload_at(
        rotating.path, T0 + 3 * DAY, env={"BACKREST_RELAY_UPLOAD__DELETE": "false"}
    )
    assert off["pending_deletions"] == 0
    on_again = mirror.upload_at(rotating.path, T0 + 8 * DAY)
    assert on_again["deleted_files"] == 0
    assert on_again["next_deletion_due"] == "2026-03-16T00:00:00Z"  # starts afresh
    mirror.check()


def test_dry_run_after_a_lost_state_store_shows_the_deletions_the_run_makes(
    rotating: Rotating,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
    clean_env: None,
) -> None:
    """An operator who lost the state store (new host, wiped cache) dry-runs first to see
    what the next run would delete: the plan, read from the same listing, must say what
    the run then does — not "nothing" because the old store is gone."""
    mirror = make_mirror(
        tmp_path, rclone_server, rclone_bucket, rotating.password, delete_after="0"
    )
    assert mirror.upload_at(rotating.path, T0)["exit_code"] == 0
    before = mirror.objects()
    rotating.forget_prune(keep_last=2)
    gone = before - rotating.files()
    shutil.rmtree(tmp_path / "state")

    plan = mirror.upload_at(rotating.path, T0 + DAY, dry_run=True)
    assert plan["exit_code"] == 0, plan["error"]
    assert plan["plan"]["delete"] == len(gone)
    assert plan["plan"]["delete_guard"] == "ok"
    assert mirror.objects() == before  # a dry run changes nothing

    real = mirror.upload_at(rotating.path, T0 + DAY)
    assert real["exit_code"] == 0, real["error"]
    assert real["deleted_files"] == plan["plan"]["delete"]
    mirror.check()


def test_reconcile_after_restoring_the_host_with_its_state_store_repairs_the_mirror(
    rotating: Rotating,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
    clean_env: None,
) -> None:
    """A host restored from a VM snapshot brings back an old repository *and* an old state
    store, which still lists objects a later run deleted from the mirror. A plain run
    trusts it (and sends no request for what it believes is there: docs/mirror.md says so
    and names the cure); `--reconcile` once after the restore makes the mirror whole."""
    mirror = make_mirror(
        tmp_path, rclone_server, rclone_bucket, rotating.password, delete_after="0"
    )
    assert mirror.upload_at(rotating.path, T0)["exit_code"] == 0
    shutil.copytree(rotating.path, tmp_path / "repo.vm")
    shutil.copytree(tmp_path / "state", tmp_path / "state.vm")
    rotating.forget_prune(keep_last=2)
    assert mirror.upload_at(rotating.path, T0 + DAY)["deleted_files"] > 0

    # The VM snapshot is restored: repository and state store roll back together.
    for name in ("repo", "state"):
        shutil.rmtree(tmp_path / name)
        shutil.copytree(tmp_path / f"{name}.vm", tmp_path / name)
    rotating.backup(0)  # dedups against packs the mirror no longer holds
    repaired = mirror.upload_at(rotating.path, T0 + 2 * DAY, reconcile=True)
    assert repaired["exit_code"] == 0, repaired["error"]
    assert repaired["uploaded_files"] > 0
    mirror.check(read_data=True)
    assert mirror.snapshots() == 5

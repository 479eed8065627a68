"""The mirror engine against real restic repositories and real S3 servers.

Each test proves one acceptance point of the mirror: the remote copy is a usable restic
repository (restic itself checks, lists and restores it), incremental runs send only what
is new, no-op runs send nothing, crashes resume, and the guards refuse what they must.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.agent import (
    agent_config_in,
    remote_keys,
    run_agent,
    start_agent,
    unfinished_uploads,
    upload_args,
)
from testbed.repos import (
    corrupt,
    restic_backup,
    restic_check,
    restic_check_mirror,
    restic_restore,
    restic_snapshots,
    s3_repo_url,
    write_random_tree,
)
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from tests.integration.conftest import BuiltRepo
from tests.support.backrest import render_backrest_template

PREFIX = "restic/home"


def repo_files(repo: Path) -> set[str]:
    """Repository-relative keys the mirror must hold (everything but locks/)."""
    return {
        p.relative_to(repo).as_posix()
        for p in repo.rglob("*")
        if p.is_file() and not p.relative_to(repo).as_posix().startswith("locks/")
    }


def config_for(tmp_path: Path, endpoint: S3Endpoint, bucket: str, **upload: object) -> Path:
    return agent_config_in(
        tmp_path,
        endpoint,
        bucket,
        upload={"multipart_threshold": "8MiB", "part_size": "5MiB", **upload},
    )


def upload(config: Path, repo: Path, *extra: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return run_agent(upload_args(config, repo, *extra), env=env)


def assert_restic_sees_mirror(
    endpoint: S3Endpoint, bucket: str, built: BuiltRepo, password: str, tmp_path: Path
) -> None:
    url = s3_repo_url(endpoint, bucket, PREFIX)
    env = endpoint.env()
    restic_check(url, password, env=env, read_data=True)
    local = sorted(s["id"] for s in restic_snapshots(built.path, password))
    remote = sorted(s["id"] for s in restic_snapshots(url, password, env=env))
    assert remote == local
    target = tmp_path / "restored"
    restic_restore(url, password, built.snapshots[-1], target, env=env)
    for original in built.source.rglob("*"):
        if original.is_file():
            restored = target / original.relative_to("/")
            assert restored.read_bytes() == original.read_bytes(), original


def test_full_mirror_through_b2_quirks_is_a_usable_restic_repository(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    b2_proxy: S3Proxy,
    restic_password: str,
    tmp_path: Path,
) -> None:
    """≥ 50 MB, three snapshots, packs above the multipart threshold, through a proxy that
    answers 400 to every flexible-checksum header as B2 does."""
    assert sum(p.stat().st_size for p in restic_repo.path.rglob("*") if p.is_file()) > 50e6
    config = config_for(tmp_path, b2_proxy.endpoint, rclone_bucket)
    result = upload(config, restic_repo.path)
    assert result.returncode == 0, result.stderr
    summary = result.summary
    assert summary["status"] == "ok"
    assert summary["uploaded_files"] == len(repo_files(restic_repo.path))
    assert b2_proxy.count(pred=lambda r: r.fault == "b2_quirk") == 0
    assert b2_proxy.count(operation="UploadPart") > 0, "no pack went up in parts"
    assert b2_proxy.count(operation="CompleteMultipartUpload") > 0
    expected = {f"{PREFIX}/{k}" for k in repo_files(restic_repo.path)}
    assert set(remote_keys(rclone_server.endpoint, rclone_bucket, f"{PREFIX}/")) == expected
    assert_restic_sees_mirror(
        rclone_server.endpoint, rclone_bucket, restic_repo, restic_password, tmp_path
    )


def test_full_mirror_to_moto(
    restic_repo: BuiltRepo,
    moto_endpoint: S3Endpoint,
    unique_bucket: Callable[[S3Endpoint], str],
    restic_password: str,
    tmp_path: Path,
) -> None:
    bucket = unique_bucket(moto_endpoint)
    config = config_for(tmp_path, moto_endpoint, bucket)
    result = upload(config, restic_repo.path)
    assert result.returncode == 0, result.stderr
    assert_restic_sees_mirror(moto_endpoint, bucket, restic_repo, restic_password, tmp_path)


def test_noop_run_sends_zero_requests_and_incremental_sends_only_new_files(
    restic_repo: BuiltRepo,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
    restic_password: str,
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket)
    assert upload(config, restic_repo.path).returncode == 0
    counting_proxy.reset()

    again = upload(config, restic_repo.path)
    assert again.returncode == 0, again.stderr
    assert counting_proxy.requests == [], counting_proxy.operations()
    assert again.summary["requests"] == 0
    assert again.summary["uploaded_files"] == 0

    before = repo_files(restic_repo.path)
    write_random_tree(restic_repo.source / "round9", files=3, size=300_000, seed=9)
    snapshot = restic_backup(restic_repo.path, restic_password, restic_repo.source)
    new = repo_files(restic_repo.path) - before
    assert new, "the backup wrote nothing new"
    counting_proxy.reset()
    third = upload(config, restic_repo.path)
    assert third.returncode == 0, third.stderr
    put_keys = {
        r.key.removeprefix(f"{PREFIX}/")
        for r in counting_proxy.requests
        if r.operation in ("PutObject", "CompleteMultipartUpload")
        and r.key
        and r.key.startswith(f"{PREFIX}/")
    }
    assert put_keys == new
    manifests = [
        r.key
        for r in counting_proxy.requests
        if r.key and r.key.startswith(f"{PREFIX}.relay/manifests/")
    ]
    assert len(manifests) == 1, manifests  # a run that uploaded writes one new manifest
    assert third.summary["new_snapshots"] == [snapshot]
    assert not counting_proxy.list_calls() or all(
        r.operation == "ListMultipartUploads" for r in counting_proxy.list_calls()
    )


def test_sigkill_during_multipart_upload_resumes_with_only_missing_parts(
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
    restic_password: str,
    tmp_path: Path,
) -> None:
    from testbed.repos import make_restic_repo

    repo = tmp_path / "repo"
    source = tmp_path / "src"
    source.mkdir()
    (source / "big.bin").write_bytes(os.urandom(40_000_000))
    make_restic_repo(repo, restic_password)
    restic_backup(repo, restic_password, source, pack_size_mib=64)
    big = max(
        (p for p in (repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    big_key = f"{PREFIX}/{big.relative_to(repo).as_posix()}"
    total_parts = math.ceil(big.stat().st_size / (5 * 1024 * 1024))
    assert total_parts >= 7

    slow = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket, bandwidth_limit="8MiB/s")
    proc = start_agent(["upload", "--repo", str(repo), "--repo-id", "home", "--config", str(slow)])
    deadline = time.monotonic() + 60
    while counting_proxy.count(operation="UploadPart", pred=lambda r: r.status == 200) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no parts uploaded within 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()

    client = rclone_server.endpoint.client()
    uploads = client.list_multipart_uploads(Bucket=rclone_bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [big_key]
    present = len(
        client.list_parts(Bucket=rclone_bucket, Key=big_key, UploadId=uploads[0]["UploadId"])[
            "Parts"
        ]
    )
    assert 3 <= present < total_parts

    counting_proxy.reset()
    fast = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket)
    result = upload(fast, repo)
    assert result.returncode == 0, result.stderr
    assert counting_proxy.count(operation="UploadPart") == total_parts - present
    assert counting_proxy.count(operation="CreateMultipartUpload") == 0
    assert unfinished_uploads(rclone_server.endpoint, rclone_bucket) == []
    restic_check_mirror(rclone_server.endpoint, rclone_bucket, PREFIX, restic_password)


def test_corrupt_pack_is_named_not_uploaded_and_nothing_after_it(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
) -> None:
    packs = sorted(p for p in (restic_repo.path / "data").rglob("*") if p.is_file())
    bad = packs[len(packs) // 2]
    corrupt(bad)
    bad_key = bad.relative_to(restic_repo.path).as_posix()
    config = config_for(tmp_path, rclone_server.endpoint, rclone_bucket)
    result = upload(config, restic_repo.path)
    assert result.returncode == 3, result.stderr
    assert bad_key in result.stderr
    assert result.summary["corrupt"] == [bad_key]
    remote = set(remote_keys(rclone_server.endpoint, rclone_bucket, f"{PREFIX}/"))
    assert f"{PREFIX}/{bad_key}" not in remote
    assert not any(k.startswith((f"{PREFIX}/index/", f"{PREFIX}/snapshots/")) for k in remote)


def test_good_remote_copy_is_never_overwritten_by_a_corrupt_local_file(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, rclone_server.endpoint, rclone_bucket)
    assert upload(config, restic_repo.path).returncode == 0
    pack = sorted(p for p in (restic_repo.path / "data").rglob("*") if p.is_file())[0]
    corrupt(pack)
    key = f"{PREFIX}/{pack.relative_to(restic_repo.path).as_posix()}"
    # Remove the remote copy's record so the run must decide about this file again.
    result = upload(config, restic_repo.path, "--reconcile")
    assert result.returncode == 3, result.stderr
    body = rclone_server.endpoint.client().get_object(Bucket=rclone_bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == pack.name


@pytest.mark.parametrize("kind", ["empty", "not-restic", "missing"])
def test_unmounted_or_foreign_source_is_refused_and_nothing_deleted(
    kind: str,
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
) -> None:
    config = config_for(
        tmp_path, rclone_server.endpoint, rclone_bucket, delete=True, max_delete_percent=100
    )
    assert upload(config, restic_repo.path).returncode == 0
    before = remote_keys(rclone_server.endpoint, rclone_bucket)
    source = tmp_path / "mountpoint"
    if kind != "missing":
        source.mkdir()
    if kind == "not-restic":
        (source / "photos").mkdir()
        (source / "notes.txt").write_text("hello")
    result = upload(config, source)
    # The contract: an empty (unmounted) source is a guard's refusal; not a repository is 3.
    assert result.returncode == (5 if kind == "empty" else 3), result.stderr
    assert "mounted" in result.stderr
    assert remote_keys(rclone_server.endpoint, rclone_bucket) == before


def test_bucket_filled_by_rclone_sync_is_adopted_without_uploading(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
    tmp_path: Path,
) -> None:
    endpoint = rclone_server.endpoint
    env = {
        **os.environ,
        "RCLONE_CONFIG_PEER_TYPE": "s3",
        "RCLONE_CONFIG_PEER_PROVIDER": "Other",
        "RCLONE_CONFIG_PEER_ENDPOINT": endpoint.endpoint_url,
        "RCLONE_CONFIG_PEER_ACCESS_KEY_ID": endpoint.access_key,
        "RCLONE_CONFIG_PEER_SECRET_ACCESS_KEY": endpoint.secret_key,
        "RCLONE_CONFIG_PEER_FORCE_PATH_STYLE": "true",
    }
    subprocess.run(
        [
            "rclone",
            "sync",
            str(restic_repo.path),
            f"peer:{rclone_bucket}/{PREFIX}",
            "--exclude",
            "locks/**",
        ],
        env=env,
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    config = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket)
    result = upload(config, restic_repo.path)
    assert result.returncode == 0, result.stderr
    files = len(repo_files(restic_repo.path))
    puts = [(r.operation, r.key) for r in counting_proxy.requests if r.method == "PUT"]
    assert result.summary["uploaded_files"] == 0, puts
    assert result.summary["adopted_files"] + result.summary["already_present"] == files
    # Only the run's manifest is written, outside the repository's folder (beside it).
    assert (
        counting_proxy.count(method="PUT", pred=lambda r: (r.key or "").startswith(f"{PREFIX}/"))
        == 0
    )
    assert len(counting_proxy.list_calls()) == math.ceil(files / 1000)


def test_stray_multipart_uploads_are_aborted_only_by_runs_that_upload(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
    restic_password: str,
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket)
    assert upload(config, restic_repo.path).returncode == 0
    client = rclone_server.endpoint.client()
    client.create_multipart_upload(Bucket=rclone_bucket, Key=f"{PREFIX}/data/ab/stray")
    counting_proxy.reset()
    assert upload(config, restic_repo.path).returncode == 0
    assert counting_proxy.requests == []
    assert unfinished_uploads(rclone_server.endpoint, rclone_bucket) == [f"{PREFIX}/data/ab/stray"]

    write_random_tree(restic_repo.source / "round8", files=1, size=1000, seed=8)
    restic_backup(restic_repo.path, restic_password, restic_repo.source)
    result = upload(config, restic_repo.path)
    assert result.returncode == 0, result.stderr
    assert result.summary["aborted_uploads"] == 1
    assert unfinished_uploads(rclone_server.endpoint, rclone_bucket) == []


def test_dry_run_changes_nothing(
    restic_repo: BuiltRepo,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket)
    result = upload(config, restic_repo.path, "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = result.summary["plan"]
    assert plan["upload"]["data"]["files"] > 0
    assert counting_proxy.count(method="PUT") == counting_proxy.count(method="DELETE") == 0
    assert counting_proxy.count(method="POST") == 0
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").glob("*.sqlite"))


def test_deadline_stops_cleanly_with_a_consistent_mirror_and_the_next_run_finishes(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    slow = config_for(
        tmp_path, rclone_server.endpoint, rclone_bucket, bandwidth_limit="10MiB/s", deadline="2s"
    )
    result = upload(slow, restic_repo.path)
    assert result.returncode == 6, result.stderr
    assert "deadline" in result.stderr
    remote = set(remote_keys(rclone_server.endpoint, rclone_bucket, f"{PREFIX}/"))
    assert not any(k.startswith(f"{PREFIX}/snapshots/") for k in remote)
    fast = config_for(tmp_path, rclone_server.endpoint, rclone_bucket)
    done = upload(fast, restic_repo.path)
    assert done.returncode == 0, done.stderr
    restic_check_mirror(
        rclone_server.endpoint, rclone_bucket, PREFIX, restic_password, read_data=False
    )


def test_second_concurrent_upload_waits_then_refuses(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
    tmp_path: Path,
) -> None:
    slow = config_for(
        tmp_path, counting_proxy.endpoint, rclone_bucket, bandwidth_limit="20MiB/s", lock_wait="1s"
    )
    first = start_agent(
        ["upload", "--repo", str(restic_repo.path), "--repo-id", "home", "--config", str(slow)]
    )
    deadline = time.monotonic() + 30
    while counting_proxy.count(method="PUT") == 0:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = upload(slow, restic_repo.path)
    assert second.returncode == 5, second.stderr
    assert "another backrest-relay upload" in second.stderr
    _out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err


def test_hook_snippet_rendered_and_piped_to_sh_mirrors_and_later_lines_run(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, rclone_server.endpoint, rclone_bucket)
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "backrest-relay").exists(), "console script not installed in the venv"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    snippet = run_agent(
        [
            *("hook-snippet", "--repo-id", "home", "--format", "json", "--hook", "success"),
            "--config",
            str(config),
        ],
        env=env,
    )
    assert snippet.returncode == 0, snippet.stderr
    hook = json.loads(snippet.stdout)
    assert hook["conditions"] == ["CONDITION_CHECK_SUCCESS"]
    assert hook["onError"] == "ON_ERROR_IGNORE"
    command = hook["actionCommand"]["command"]
    marker = tmp_path / "after-hook"
    rendered = render_backrest_template(
        command + f"\necho ran > {marker}\n",
        repo_id="home",
        repo_uri=f"local:{restic_repo.path}",
        repo_guid="ab" * 32,
        event="CONDITION_CHECK_SUCCESS",
    )
    proc = subprocess.run(
        ["bash"],
        input=rendered,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "ran\n"
    assert "mirrored" in proc.stdout
    assert set(remote_keys(rclone_server.endpoint, rclone_bucket, f"{PREFIX}/")) == {
        f"{PREFIX}/{k}" for k in repo_files(restic_repo.path)
    }


def test_upload_by_repo_id_reads_backrest_config(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    tmp_path: Path,
) -> None:
    backrest = tmp_path / "backrest.json"
    backrest.write_text(
        json.dumps(
            {
                "modno": 3,
                "instance": "host",
                "repos": [
                    {"id": "other", "uri": "/nowhere", "guid": "cd" * 32},
                    {"id": "home", "uri": f"local:{restic_repo.path}", "guid": "ab" * 32},
                ],
            }
        )
    )
    config = config_for(tmp_path, rclone_server.endpoint, rclone_bucket)
    result = run_agent(
        ["upload", "--repo-id", "home", "--config", str(config), "--json"],
        env={"BACKREST_CONFIG": str(backrest)},
    )
    assert result.returncode == 0, result.stderr
    assert result.summary["repo_path"] == str(restic_repo.path)
    assert result.summary["uploaded_files"] == len(repo_files(restic_repo.path))

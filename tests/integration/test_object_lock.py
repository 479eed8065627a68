"""Object Lock (issue 18): every object the agent writes is retained, kept objects are
extended in their renewal window only, and `doctor` says when the bucket cannot lock.

moto's S3 with an Object-Lock-enabled bucket, behind the B2-quirk proxy (which refuses the
checksum headers B2 refuses, and logs which headers each request carried); real restic
repositories.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from local_agent.config import load_config
from local_agent.identity import ResolvedRepo
from local_agent.upload import run_upload
from tests.integration.conftest import BuiltRepo
from tests.support.agent import agent_env, run_agent, write_agent_config
from tests.support.s3servers import S3Endpoint, S3Proxy

DAYS = 30
DAY = 86400.0
LOCK = f'object_lock = {{ mode = "governance", days = {DAYS} }}'


def locked_bucket(endpoint: S3Endpoint, name: str = "offsite", *, lock: bool = True) -> str:
    endpoint.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=lock)
    return name


def lock_config(
    tmp_path: Path,
    endpoint: S3Endpoint,
    bucket: str,
    *,
    lock: str | None = LOCK,
    **upload: Any,
) -> Path:
    path = write_agent_config(
        tmp_path / "relay.toml",
        endpoint,
        bucket,
        state_dir=tmp_path / "state",
        upload={"multipart_threshold": "5MiB", "part_size": "5MiB", **upload},
    )
    if lock:
        text = path.read_text().replace("[upload]", f"{lock}\n[upload]", 1)
        path.write_text(text)
    return path


def all_keys(endpoint: S3Endpoint, bucket: str) -> list[str]:
    client = endpoint.client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def retain_until(endpoint: S3Endpoint, bucket: str, key: str) -> tuple[str, datetime]:
    """The current version's lock, as HeadObject reports it (moto 5 has no
    GetObjectRetention)."""
    got = endpoint.client().head_object(Bucket=bucket, Key=key)
    return got.get("ObjectLockMode", ""), got.get("ObjectLockRetainUntilDate", datetime.min)


@pytest.mark.parametrize("direct_put", [True, False], ids=["signed-put", "boto3-put"])
def test_every_object_and_every_multipart_upload_carries_the_lock(
    direct_put: bool,
    restic_repo: BuiltRepo,
    moto_endpoint: S3Endpoint,
    tmp_path: Path,
) -> None:
    bucket = locked_bucket(moto_endpoint)
    with S3Proxy(moto_endpoint, b2_quirks=True) as proxy:
        config = lock_config(tmp_path, proxy.endpoint, bucket, direct_put=direct_put)
        started = datetime.now(UTC)
        upload = ["upload", "--repo", str(restic_repo.path), "--repo-id", "home"]
        result = run_agent([*upload, "--config", str(config), "--json"])
        assert result.returncode == 0, result.stderr
        requests = proxy.requests
    assert not [r for r in requests if r.fault == "b2_quirk"]
    writes = [r for r in requests if r.operation in ("PutObject", "CreateMultipartUpload")]
    assert {r.operation for r in writes} == {"PutObject", "CreateMultipartUpload"}
    for request in writes:
        assert "x-amz-object-lock-mode" in request.header_names, request
        assert "x-amz-object-lock-retain-until-date" in request.header_names, request
        assert "content-md5" in request.header_names or request.operation != "PutObject"

    keys = all_keys(moto_endpoint, bucket)
    assert any(k.startswith("restic/home/data/") for k in keys)
    assert any(k.startswith("restic/home.relay/manifests/") for k in keys)
    for key in keys:  # the repository's objects and the manifest alike
        mode, until = retain_until(moto_endpoint, bucket, key)
        assert mode == "GOVERNANCE", key
        assert started + timedelta(days=DAYS - 1) < until < started + timedelta(days=DAYS + 1)


def test_a_locked_version_cannot_be_deleted_only_hidden(
    restic_repo: BuiltRepo, moto_endpoint: S3Endpoint, tmp_path: Path
) -> None:
    bucket = locked_bucket(moto_endpoint)
    config = lock_config(tmp_path, moto_endpoint, bucket)
    upload = ["upload", "--repo", str(restic_repo.path), "--repo-id", "home"]
    result = run_agent([*upload, "--config", str(config)])
    assert result.returncode == 0, result.stderr
    client = moto_endpoint.client()
    key = "restic/home/config"
    version = client.head_object(Bucket=bucket, Key=key)["VersionId"]
    with pytest.raises(ClientError) as info:
        client.delete_object(Bucket=bucket, Key=key, VersionId=version)
    assert info.value.response["Error"]["Code"] == "AccessDenied"
    hidden = client.delete_object(Bucket=bucket, Key=key)  # what the key CAN do: hide
    assert hidden.get("DeleteMarker")
    versions = client.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
    assert [v["VersionId"] for v in versions] == [version]


def test_doctor_says_when_the_bucket_cannot_lock(moto_endpoint: S3Endpoint, tmp_path: Path) -> None:
    plain = locked_bucket(moto_endpoint, "plain", lock=False)
    config = lock_config(tmp_path, moto_endpoint, plain)
    result = run_agent(["doctor", "--config", str(config)])
    assert result.returncode != 0, result.stdout
    assert "[FAIL] object lock" in result.stdout
    assert "does not have Object Lock enabled" in result.stdout
    assert "Backblaze B2" in result.stdout and "AWS S3" in result.stdout

    # The same bucket without object_lock configured: a warning, not a failure.
    config = lock_config(tmp_path, moto_endpoint, plain, lock=None)
    result = run_agent(["doctor", "--config", str(config)])
    assert "[warn] object lock" in result.stdout
    assert result.returncode == 0, result.stdout

    locked = locked_bucket(moto_endpoint, "locked")
    config = lock_config(tmp_path, moto_endpoint, locked)
    result = run_agent(["doctor", "--config", str(config)])
    assert "[ok  ] object lock" in result.stdout
    assert result.returncode == 0, result.stdout


def test_retention_is_extended_only_in_the_renewal_window_and_no_op_runs_send_nothing(
    restic_repo: BuiltRepo, moto_endpoint: S3Endpoint, tmp_path: Path, clean_env: None
) -> None:
    """days = 30, renew_days = 10 (a third). Runs are driven by a clock: a run a day later
    sends no request at all; a run 21 days later extends every object still in the
    local repository — and only those: a snapshot forgotten locally ages out of its lock
    — with one PutObjectRetention each; the run after sends nothing again."""
    bucket = locked_bucket(moto_endpoint)
    t0 = datetime.now(UTC).timestamp()
    with S3Proxy(moto_endpoint, b2_quirks=True) as proxy:
        config_path = lock_config(tmp_path, proxy.endpoint, bucket)
        config = load_config(str(config_path), env=agent_env()).config

        def run_at(now: float) -> dict[str, Any]:
            proxy.reset()
            summary = run_upload(
                config,
                ResolvedRepo(restic_repo.path, "home", None),
                show_progress=False,
                clock=lambda: now,
            ).as_dict()
            assert summary["exit_code"] == 0, summary["error"]
            return summary

        first = run_at(t0)
        assert first["uploaded_files"] > 0 and first["retention_extended"] == 0

        nothing = run_at(t0 + DAY)
        assert nothing["retention_extended"] == 0
        assert proxy.requests == [], proxy.operations()

        forgotten = sorted((restic_repo.path / "snapshots").iterdir())[0]
        forgotten.unlink()
        # An attacker overwrites a kept object: renewal must keep the agent's version
        # locked, not the attacker's.
        client = moto_endpoint.client()
        attacked = "restic/home/config"
        genuine = client.head_object(Bucket=bucket, Key=attacked)["VersionId"]
        client.put_object(Bucket=bucket, Key=attacked, Body=b"garbage")
        local = [p for p in restic_repo.path.rglob("*") if p.is_file()]
        renewal_at = t0 + 21 * DAY
        renewed = run_at(renewal_at)
        assert renewed["retention_extended"] == len(local)
        assert proxy.count(operation="PutObjectRetention") == len(local)
        assert not [r for r in proxy.requests if r.fault == "b2_quirk"]
        # Nothing listed or re-uploaded; one fresh (locked) manifest.
        assert proxy.count(operation="PutObject") == 1
        assert not proxy.list_calls()

        again = run_at(renewal_at + DAY)
        assert again["retention_extended"] == 0
        assert proxy.requests == [], proxy.operations()

    expected = datetime.fromtimestamp(renewal_at, UTC) + timedelta(days=DAYS)
    for path in local:
        key = f"restic/home/{path.relative_to(restic_repo.path).as_posix()}"
        if key == attacked:
            continue
        assert abs(retain_until(moto_endpoint, bucket, key)[1] - expected) < timedelta(seconds=2)
    head = moto_endpoint.client().head_object(Bucket=bucket, Key=attacked, VersionId=genuine)
    assert abs(head["ObjectLockRetainUntilDate"] - expected) < timedelta(seconds=2)
    assert "ObjectLockMode" not in moto_endpoint.client().head_object(Bucket=bucket, Key=attacked)
    old_key = f"restic/home/snapshots/{forgotten.name}"
    old_until = retain_until(moto_endpoint, bucket, old_key)[1]
    assert old_until < datetime.fromtimestamp(t0, UTC) + timedelta(days=DAYS, seconds=2)


def test_verify_flags_an_object_whose_lock_is_missing_or_short(
    restic_repo: BuiltRepo, moto_endpoint: S3Endpoint, tmp_path: Path
) -> None:
    """Identical bytes put again without a lock (or with a 2-day one) pass every content
    check; only the lock check sees that the current version is unprotected."""
    bucket = locked_bucket(moto_endpoint)
    config = str(lock_config(tmp_path, moto_endpoint, bucket))
    repo = ["--repo-id", "home", "--config", config]
    assert run_agent(["upload", "--repo", str(restic_repo.path), *repo]).returncode == 0
    good = run_agent(["verify", *repo, "--deep", "100%", "--json"])
    assert good.returncode == 0, good.stdout + good.stderr

    client = moto_endpoint.client()
    unlocked = "restic/home/config"
    short = f"restic/home/snapshots/{restic_repo.snapshots[0]}"
    for key, lock in (
        (unlocked, {}),
        (
            short,
            {
                "ObjectLockMode": "GOVERNANCE",
                "ObjectLockRetainUntilDate": datetime.now(UTC) + timedelta(days=2),
            },
        ),
    ):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentMD5=md5, **lock)

    flagged = run_agent(["verify", *repo, "--deep", "100%"])
    assert flagged.returncode == 3, flagged.stdout + flagged.stderr
    assert "PROBLEM lock: config: no Object Lock retention" in flagged.stdout
    assert f"PROBLEM lock: snapshots/{restic_repo.snapshots[0]}: governance retention" in (
        flagged.stdout
    )


def test_upload_with_object_lock_to_a_bucket_without_it_exits_4_naming_the_cause(
    restic_repo: BuiltRepo, moto_endpoint: S3Endpoint, tmp_path: Path
) -> None:
    plain = locked_bucket(moto_endpoint, "plain", lock=False)
    config = lock_config(tmp_path, moto_endpoint, plain)
    result = run_agent(
        ["upload", "--repo", str(restic_repo.path), "--repo-id", "home", "--config", str(config)]
    )
    assert result.returncode == 4, result.stdout + result.stderr
    assert "destination.object_lock needs a bucket with Object Lock enabled" in result.stderr

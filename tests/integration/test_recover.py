"""Ransomware with the backup host's own key, and `recover` (issue 18.3).

moto's S3 with an Object-Lock-enabled bucket and a real restic repository: the agent
mirrors it with governance retention; an attacker holding the agent's credentials
deletes, hides and overwrites part of the mirror (config, snapshots, index, packs, the
manifest) and adds a bogus snapshot. `verify` flags it; `recover --as-of` a time before
the attack brings the state back from the versions the lock kept; restic itself then
checks every byte of the recovered mirror and restores a snapshot that matches the source.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.integration.conftest import BuiltRepo
from tests.integration.test_object_lock import lock_config, locked_bucket
from tests.support.agent import run_agent
from tests.support.repos import restic_check, restic_restore, restic_snapshots, s3_repo_url
from tests.support.s3servers import S3Endpoint

PREFIX = "restic/home"
ROUNDS = ("round0/", "round1/", "round2/")  # what tests/integration/conftest.py backs up


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_attack_with_the_agents_key_is_flagged_and_recover_as_of_restores_the_mirror(
    restic_repo: BuiltRepo,
    moto_endpoint: S3Endpoint,
    restic_password: str,
    tmp_path: Path,
) -> None:
    bucket = locked_bucket(moto_endpoint)
    config = str(lock_config(tmp_path, moto_endpoint, bucket))
    repo = ["--repo-id", "home", "--config", config]
    uploaded = run_agent(["upload", "--repo", str(restic_repo.path), *repo, "--json"])
    assert uploaded.returncode == 0, uploaded.stderr
    manifest_key = uploaded.summary["manifest"]["key"]
    before_attack = datetime.now(UTC).isoformat()

    # -- the attack, with the agent's own credentials ------------------------------------
    client = moto_endpoint.client()
    keys = sorted(
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{PREFIX}/"
        )
        for item in page.get("Contents", [])
    )
    snapshots = [k for k in keys if "/snapshots/" in k]
    index = [k for k in keys if "/index/" in k]
    packs = [k for k in keys if "/data/" in k]
    big_pack = max(packs, key=lambda k: client.head_object(Bucket=bucket, Key=k)["ContentLength"])
    assert "-" in client.head_object(Bucket=bucket, Key=big_pack)["ETag"]  # multipart
    # Removing a locked version is refused...
    version = client.head_object(Bucket=bucket, Key=f"{PREFIX}/config")["VersionId"]
    with pytest.raises(ClientError) as denied:
        client.delete_object(Bucket=bucket, Key=f"{PREFIX}/config", VersionId=version)
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    # ...so the attacker deletes (hides) and overwrites what the key can reach.
    hidden_packs = [k for k in packs if k != big_pack][: len(packs) // 3]
    for key in [f"{PREFIX}/config", snapshots[0], *hidden_packs]:
        client.delete_object(Bucket=bucket, Key=key)
    for key in [*snapshots[1:], *index, big_pack]:
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        client.put_object(Bucket=bucket, Key=key, Body=os.urandom(size))
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/snapshots/{'e' * 64}", Body=b"ransom note")

    # The verifier notices (and records a failed verification of that run's state)...
    flagged = run_agent(["verify", *repo])
    assert flagged.returncode == 3, flagged.stdout + flagged.stderr
    assert "VERIFICATION FAILED" in flagged.stdout
    assert "PROBLEM missing: config" in flagged.stdout
    # ...and the attacker replaces the manifest too.
    client.put_object(Bucket=bucket, Key=manifest_key, Body=b"not a manifest")
    assert run_agent(["verify", *repo]).returncode == 3

    listed = run_agent(["recover", *repo, "--json"])
    assert listed.returncode == 0, listed.stderr
    assert '"manifest_intact": false' in listed.stdout
    assert '"verified": false' in listed.stdout  # what verification said after the attack

    planned = run_agent(["recover", *repo, "--as-of", before_attack, "--dry-run", "--json"])
    assert planned.returncode == 0, planned.stderr
    plan = planned.summary
    attacked = 1 + len(snapshots) + len(hidden_packs) + len(index) + 1
    assert plan["restore"] == attacked
    assert plan["hide"] == 1 and plan["missing"] == []
    still = run_agent(["verify", *repo])
    assert still.returncode == 3  # a dry run changed nothing

    recovered = run_agent(["recover", *repo, "--as-of", before_attack, "--json"])
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert recovered.summary["verified"] is True
    assert run_agent(["verify", *repo]).returncode == 0

    # The oracle: restic reads every byte, and a restore matches the source.
    url = s3_repo_url(moto_endpoint, bucket, PREFIX)
    env = moto_endpoint.env()
    restic_check(url, restic_password, env=env, read_data=True)
    assert {s["id"] for s in restic_snapshots(url, restic_password, env=env)} == set(
        restic_repo.snapshots
    )
    target = tmp_path / "restored"
    restic_restore(url, restic_password, restic_repo.snapshots[-1], target, env=env)
    restored_root = target / restic_repo.source.relative_to("/")
    # The session's source tree may have grown since (other tests back up more rounds):
    # the last built snapshot holds rounds 0-2.
    built = {k: v for k, v in tree_digest(restic_repo.source).items() if k[:7] in ROUNDS}
    assert tree_digest(restored_root) == built

    # The same state rebuilt under a new prefix, proven, and readable by restic.
    run_id = uploaded.summary["manifest"]["created_by_run"]
    into = run_agent(["recover", *repo, "--manifest", run_id, "--into", "rebuilt/home", "--json"])
    assert into.returncode == 0, into.stdout + into.stderr
    assert into.summary["verified"] is True
    rebuilt = s3_repo_url(moto_endpoint, bucket, "rebuilt/home")
    restic_check(rebuilt, restic_password, env=env, read_data=False)


def test_recover_names_what_is_missing_and_changes_nothing(
    restic_repo: BuiltRepo, moto_endpoint: S3Endpoint, tmp_path: Path
) -> None:
    """Without Object Lock the attacker can remove versions; the state then cannot be
    rebuilt: exit 3 naming the objects, nothing changed. Usage errors exit 2."""
    client = moto_endpoint.client()
    client.create_bucket(Bucket="plain")
    client.put_bucket_versioning(Bucket="plain", VersioningConfiguration={"Status": "Enabled"})
    config = str(lock_config(tmp_path, moto_endpoint, "plain", lock=None))
    repo = ["--repo-id", "home", "--config", config]
    uploaded = run_agent(["upload", "--repo", str(restic_repo.path), *repo])
    assert uploaded.returncode == 0, uploaded.stderr
    as_of = datetime.now(UTC).isoformat()
    key = f"{PREFIX}/config"
    for version in client.list_object_versions(Bucket="plain", Prefix=key)["Versions"]:
        client.delete_object(Bucket="plain", Key=key, VersionId=version["VersionId"])

    result = run_agent(["recover", *repo, "--as-of", as_of])
    assert result.returncode == 3, result.stdout + result.stderr
    assert "config: no version of it is left in the bucket" in result.stderr
    assert "Nothing was changed" in result.stderr

    early = run_agent(["recover", *repo, "--as-of", "2000-01-01T00:00:00Z"])
    assert early.returncode == 3 and "no manifest written at or before" in early.stderr
    for bad, said in (
        (["--as-of", "yesterday-ish"], "--as-of"),
        (["--manifest", "../../etc"], "not a run id"),
        (["--as-of", as_of, "--into", "restic"], "overlaps the mirror's prefix"),
        (["--as-of", as_of, "--manifest", "x"], "not allowed with argument"),
    ):
        usage = run_agent(["recover", *repo, *bad])
        assert usage.returncode == 2, (bad, usage.stderr)
        assert said in usage.stderr, usage.stderr


def test_in_place_recovery_never_deletes_on_a_bucket_without_versions(
    restic_repo: BuiltRepo, moto_endpoint: S3Endpoint, tmp_path: Path
) -> None:
    """Hiding is a delete marker only where versions are kept; elsewhere it would delete
    for good, so recover refuses (exit 3) and changes nothing."""
    client = moto_endpoint.client()
    client.create_bucket(Bucket="unversioned")
    config = str(lock_config(tmp_path, moto_endpoint, "unversioned", lock=None))
    repo = ["--repo-id", "home", "--config", config]
    assert run_agent(["upload", "--repo", str(restic_repo.path), *repo]).returncode == 0
    as_of = datetime.now(UTC).isoformat()
    extra = f"{PREFIX}/snapshots/{'e' * 64}"
    client.put_object(Bucket="unversioned", Key=extra, Body=b"newer or bogus")

    result = run_agent(["recover", *repo, "--as-of", as_of])
    assert result.returncode == 3, result.stdout + result.stderr
    assert "does not keep versions" in result.stderr
    assert client.get_object(Bucket="unversioned", Key=extra)["Body"].read() == b"newer or bogus"

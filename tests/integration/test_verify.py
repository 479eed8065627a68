"""`backrest-relay verify` and local-mode verification against a real S3 server.

The rclone server keeps objects as plain files, so the tests damage the "remote" copy
directly on disk, the way bit rot or a bad provider would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from testbed.agent import AgentResult, agent_config_in, run_agent
from testbed.repos import FakeRepo, add_packs, make_fake_restic_repo
from testbed.s3.endpoint import S3Endpoint, free_port
from testbed.s3.rclone import RcloneS3Server

GUID = "cd" * 32
PREFIX = "restic/home"


def config(tmp_path: Path, endpoint: S3Endpoint, bucket: str, publisher: str = "local") -> Path:
    return agent_config_in(
        tmp_path,
        endpoint,
        bucket,
        events={"publisher": publisher},
    )


def ids() -> list[str]:
    return ["--repo-id", "home", "--repo-guid", GUID]


class Mirrored(NamedTuple):
    repo: FakeRepo
    cfg: Path
    result: AgentResult


@pytest.fixture
def mirrored(tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str) -> Mirrored:
    repo = make_fake_restic_repo(tmp_path / "repo", packs=25, pack_size=(500, 30_000), seed=11)
    cfg = config(tmp_path, rclone_server.endpoint, rclone_bucket)
    result = run_agent(["upload", "--repo", str(repo.root), *ids(), "--config", str(cfg), "--json"])
    assert result.returncode == 0, result.stderr
    return Mirrored(repo, cfg, result)


def test_local_mode_verifies_after_each_upload(mirrored: Mirrored, tmp_path: Path) -> None:
    repo, _, result = mirrored
    verification = result.summary["verification"]
    assert verification["verified"] is True
    assert verification["stats"]["deep_checked_new"] == len(repo.mirrored_files())
    assert "verified:" in result.stderr or "verified:" in result.stdout
    events = (tmp_path / "state" / "events.jsonl").read_text().splitlines()
    assert [json.loads(e)["detail_type"] for e in events] == [
        "Mirror Completed",
        "Mirror Verified",
    ]


def test_verify_command_finds_the_newest_manifest(
    mirrored, tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:  # type: ignore[no-untyped-def]
    repo, cfg, _ = mirrored
    add_packs(repo, 2, 1000, seed=12)
    second = run_agent(["upload", "--repo", str(repo.root), *ids(), "--config", str(cfg), "--json"])
    assert second.returncode == 0, second.stderr
    result = run_agent(["verify", *ids(), "--config", str(cfg), "--deep", "100%"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "VERIFIED" in result.stdout
    assert second.summary["run_id"] in result.stdout
    assert f"read back and hashed: {len(repo.mirrored_files())} objects" in result.stdout


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_remote_object_is_found_and_named(
    damage: str,
    mirrored,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,  # type: ignore[no-untyped-def]
) -> None:
    repo, cfg, _ = mirrored
    victim = repo.data[3]
    key = victim.relative_to(repo.root).as_posix()
    remote = rclone_server.bucket_path(rclone_bucket) / PREFIX / key
    data = remote.read_bytes()
    if damage == "delete":
        # Through the API: rclone's directory cache would keep listing a file removed
        # behind its back and then answer 500 for it (a server fault, not a verdict).
        rclone_server.endpoint.client().delete_object(Bucket=rclone_bucket, Key=f"{PREFIX}/{key}")
    elif damage == "truncate":
        remote.write_bytes(data[:-1])
    else:
        remote.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    result = run_agent(["verify", *ids(), "--config", str(cfg), "--deep", "100%"])
    assert result.returncode == 3, result.stdout + result.stderr
    assert "VERIFICATION FAILED" in result.stdout
    assert key in result.stdout
    # The full report sits beside the manifest (beside the repository's folder).
    reports = [
        p
        for p in (rclone_server.bucket_path(rclone_bucket) / f"{PREFIX}.relay").rglob("*")
        if p.name.endswith(".report.jsonl.gz")
    ]
    assert len(reports) == 1


def test_unreachable_destination_exits_4(mirrored: Mirrored) -> None:
    _, cfg, _ = mirrored
    text = cfg.read_text()
    port = text.split("http://127.0.0.1:")[1].split('"')[0]
    cfg.write_text(text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
    result = run_agent(
        ["verify", *ids(), "--config", str(cfg)],
        env={"AWS_MAX_ATTEMPTS": "1"},
        timeout=180,
    )
    assert result.returncode == 4, result.stdout + result.stderr
    assert "cannot read the mirror" in result.stderr


def test_verify_without_any_manifest_is_a_clear_error(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    cfg = config(tmp_path, rclone_server.endpoint, rclone_bucket)
    result = run_agent(["verify", *ids(), "--config", str(cfg)])
    assert result.returncode == 2
    assert "no manifest" in result.stderr


def test_tampered_manifest_is_reported(
    mirrored: Mirrored, rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    _, cfg, result = mirrored
    manifest = result.summary["manifest"]["key"]
    path = rclone_server.bucket_path(rclone_bucket) / manifest
    body = bytearray(path.read_bytes())
    body[-5] ^= 0x01
    path.write_bytes(bytes(body))
    verdict = run_agent(["verify", *ids(), "--config", str(cfg)])
    assert verdict.returncode == 3, verdict.stdout + verdict.stderr
    assert "manifest" in verdict.stdout and manifest in verdict.stdout


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damage_through_the_s3_api_is_named_on_moto(
    damage: str,
    tmp_path: Path,
    moto_endpoint: S3Endpoint,
    unique_bucket: Callable[[S3Endpoint], str],
) -> None:
    bucket = unique_bucket(moto_endpoint)
    repo = make_fake_restic_repo(tmp_path / "repo", packs=8, pack_size=(500, 9000), seed=13)
    cfg = config(tmp_path, moto_endpoint, bucket)
    first = run_agent(["upload", "--repo", str(repo.root), *ids(), "--config", str(cfg), "--json"])
    assert first.returncode == 0, first.stderr
    assert first.summary["verification"]["verified"] is True
    key = repo.data[2].relative_to(repo.root).as_posix()
    client = moto_endpoint.client()
    full = f"{PREFIX}/{key}"
    if damage == "manifest":
        key = full = first.summary["manifest"]["key"]
    data = client.get_object(Bucket=bucket, Key=full)["Body"].read()
    if damage == "delete":
        client.delete_object(Bucket=bucket, Key=full)
    else:
        new = data[:-1] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1])
        client.put_object(Bucket=bucket, Key=full, Body=new)
    result = run_agent(["verify", *ids(), "--config", str(cfg), "--deep", "100%"])
    assert result.returncode == 3, result.stdout + result.stderr
    assert key in result.stdout

"""Shared by the `verify` call tests (time limit, interruptions): a restic repository
mirrored to `rclone serve s3`, verify calls through a counting proxy that slows each object
GET down, and the object GETs it saw."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from testbed.agent import agent_config_in, run_agent
from testbed.s3.faults import Fault
from testbed.s3.operations import RequestInfo
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from tests.integration.conftest import BuiltRepo

GUID = "ef" * 32
PREFIX = "restic/home"
READ_DELAY = 0.4  # seconds per object GET at the proxy


def ids() -> list[str]:
    return ["--repo-id", "home", "--repo-guid", GUID]


def slow_object_reads(info: RequestInfo) -> Fault | None:
    if info.method == "GET" and f"/{PREFIX}/" in info.path:
        time.sleep(READ_DELAY)
    return None


def object_gets(proxy: S3Proxy) -> Counter[str]:
    """Successful GETs of the mirror's objects (not the manifests), by repository path."""
    return Counter(
        (r.key or "").removeprefix(f"{PREFIX}/")
        for r in proxy.requests
        if r.method == "GET" and (r.key or "").startswith(f"{PREFIX}/") and r.status == 200
        and ".relay/" not in (r.key or "")
    )  # fmt: skip


def mirrored(tmp_path: Path, repo: BuiltRepo, server: RcloneS3Server, bucket: str) -> list[str]:
    """Upload `repo` (config under tmp_path/up); the repository paths that were mirrored."""
    (tmp_path / "up").mkdir()
    cfg = agent_config_in(tmp_path / "up", server.endpoint, bucket)
    uploaded = run_agent(["upload", "--repo", str(repo.path), *ids(), "--config", str(cfg)])
    assert uploaded.returncode == 0, uploaded.stderr
    return sorted(
        str(p.relative_to(repo.path))
        for p in repo.path.rglob("*")
        if p.is_file() and not str(p.relative_to(repo.path)).startswith("locks")
    )


def verify_config(tmp_path: Path, proxy: S3Proxy, bucket: str) -> Path:
    """A config (under tmp_path/verify) whose verify calls go through `proxy`, one read at
    a time, so the proxy's slowed GETs decide where a call stops."""
    (tmp_path / "verify").mkdir()
    return agent_config_in(tmp_path / "verify", proxy.endpoint, bucket, upload={"concurrency": 1})

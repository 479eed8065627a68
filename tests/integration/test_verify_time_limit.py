"""`backrest-relay verify --time-limit`: a verification longer than the limit is spread over
several calls — exit 6 with "progress saved" until the last, which prints the verdict —
and no object is read twice. A real restic repository mirrored to `rclone serve s3`; the
verify calls go through a proxy that counts every GET and slows each object read down, so
the limit comes long before the reads are done (no timing is asserted).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from testbed.agent import agent_config_in, run_agent
from testbed.repos import restic_check_mirror
from testbed.s3.faults import Fault
from testbed.s3.operations import RequestInfo
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from tests.integration.conftest import BuiltRepo

GUID = "ef" * 32
PREFIX = "restic/home"
READ_DELAY = 0.4  # seconds per object GET at the proxy
LIMIT = "3s"


def ids() -> list[str]:
    return ["--repo-id", "home", "--repo-guid", GUID]


def slow_object_reads(info: RequestInfo) -> Fault | None:
    if info.method == "GET" and f"/{PREFIX}/" in info.path:
        time.sleep(READ_DELAY)
    return None


def test_verify_continues_across_calls_and_reads_each_object_once(
    tmp_path: Path,
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
) -> None:
    for folder in ("up", "verify"):
        (tmp_path / folder).mkdir()
    upload_cfg = agent_config_in(tmp_path / "up", rclone_server.endpoint, rclone_bucket)
    uploaded = run_agent(
        ["upload", "--repo", str(restic_repo.path), *ids(), "--config", str(upload_cfg)]
    )
    assert uploaded.returncode == 0, uploaded.stderr
    objects = sorted(
        str(p.relative_to(restic_repo.path))
        for p in restic_repo.path.rglob("*")
        if p.is_file() and not str(p.relative_to(restic_repo.path)).startswith("locks")
    )

    verify_cfg = agent_config_in(
        tmp_path / "verify", counting_proxy.endpoint, rclone_bucket, upload={"concurrency": 1}
    )
    counting_proxy.fault = slow_object_reads
    calls = []
    for _ in range(len(objects) + 2):
        result = run_agent(
            ["verify", *ids(), "--config", str(verify_cfg), "--time-limit", LIMIT], timeout=120
        )
        calls.append(result)
        if result.returncode != 6:
            break
    counting_proxy.fault = None

    first, last = calls[0], calls[-1]
    assert first.returncode == 6, first.stdout + first.stderr
    assert "progress saved:" in first.stdout
    assert "run `backrest-relay verify` again to continue" in first.stdout
    assert all(c.returncode == 6 for c in calls[:-1]) and len(calls) >= 2
    assert last.returncode == 0, last.stdout + last.stderr
    assert "VERIFIED" in last.stdout
    assert f"read back and hashed: {len(objects)} objects" in last.stdout
    assert f"over {len(calls)} verify calls" in last.stdout

    gets = Counter(
        (r.key or "").removeprefix(f"{PREFIX}/")
        for r in counting_proxy.requests
        if r.method == "GET" and (r.key or "").startswith(f"{PREFIX}/") and r.status == 200
    )
    assert sorted(gets) == objects, "every object read back"
    assert set(gets.values()) == {1}, [k for k, n in gets.items() if n > 1]

    restic_check_mirror(rclone_server.endpoint, rclone_bucket, PREFIX, restic_repo.password)

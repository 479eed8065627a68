"""`backrest-relay verify --time-limit`: a verification longer than the limit is spread over
several calls — exit 6 with "progress saved" until the last, which prints the verdict —
and no object is read twice. A real restic repository mirrored to `rclone serve s3`; the
verify calls go through a proxy that counts every GET and slows each object read down, so
the limit comes long before the reads are done (no timing is asserted).
"""

from __future__ import annotations

from pathlib import Path

from testbed.agent import run_agent
from testbed.repos import restic_check_mirror
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from tests.integration.conftest import BuiltRepo
from tests.support.verify_calls import (
    PREFIX,
    ids,
    mirrored,
    object_gets,
    slow_object_reads,
    verify_config,
)

LIMIT = "3s"


def test_verify_continues_across_calls_and_reads_each_object_once(
    tmp_path: Path,
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
) -> None:
    objects = mirrored(tmp_path, restic_repo, rclone_server, rclone_bucket)
    verify_cfg = verify_config(tmp_path, counting_proxy, rclone_bucket)
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

    gets = object_gets(counting_proxy)
    assert sorted(gets) == objects, "every object read back"
    assert set(gets.values()) == {1}, [k for k, n in gets.items() if n > 1]

    restic_check_mirror(rclone_server.endpoint, rclone_bucket, PREFIX, restic_repo.password)

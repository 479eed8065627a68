"""`python -m bench.put_cost`: CPU per single PUT, boto3's put_object vs the agent's writer.

The profile of S2 before the object writer (docs/benchmarks.md) put 93 % of the upload
threads' CPU inside botocore's put_object. This measures that cost and the cure's on the
same server: one thread, sequential 4 KiB PUTs through `Backend` (so hashing, scheduling
and the state store are left out), CPU time of the calling thread per request. The full
benchmark runs it first and reports the numbers with the scenarios.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from cloud.contracts.destination import Destination
from cloud.integrations.s3 import S3Access
from local_agent.mirror.backend import Backend
from testbed.s3.rclone import RcloneS3Server

BODY_SIZE = 4096
VARIANTS = {"boto3 put_object": False, "agent's object writer": True}


def measure(root: Path, requests: int = 1000) -> dict[str, float]:
    """Milliseconds of CPU per PUT for each variant, against `rclone serve s3` on `root`."""
    body = os.urandom(BODY_SIZE)
    md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
    sha = hashlib.sha256(body).hexdigest()
    out: dict[str, float] = {}
    with RcloneS3Server(root) as server:
        endpoint = server.endpoint
        endpoint.make_bucket("put-cost")
        access = S3Access(
            provider="s3",
            endpoint_url=endpoint.endpoint_url,
            region=endpoint.region,
            access_key_id=endpoint.access_key,
            secret_access_key=endpoint.secret_key,
        )
        for label, direct in VARIANTS.items():
            dest = Destination(
                provider="s3",
                endpoint_url=endpoint.endpoint_url,
                bucket="put-cost",
                prefix=label.split()[0],
            )
            backend = Backend(access, dest, direct_put=direct)
            for i in range(20):  # connections, imports, credential resolution
                backend.put(f"warm/{i}", body, BODY_SIZE, md5, sha)
            started = time.thread_time()
            for i in range(requests):
                backend.put(f"data/{i:06d}", body, BODY_SIZE, md5, sha)
            out[label] = (time.thread_time() - started) * 1000 / requests
            backend.close()
    return out


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="put-cost-", dir=_tmpfs()) as tmp:
        for label, ms in measure(Path(tmp)).items():
            print(f"{label:24} {ms:.3f} ms CPU per {BODY_SIZE // 1024} KiB PUT")
    return 0


def _tmpfs() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


if __name__ == "__main__":
    sys.exit(main())

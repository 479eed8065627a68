"""Bench case for the manifest: write the manifest of a 200,000-object repository and
report the peak RSS of the process that does it (target: under 150 MB).

    python -m bench.manifest_rss [--objects 200000]

The state store is filled in this process; the manifest is written by a child process
(state store → gzip stream → PUT to `rclone serve s3` on loopback) that reports its own
high-water RSS (VmHWM), so nothing of the setup is counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys, time
from pathlib import Path
from cloud.contracts.destination import Destination
from cloud.integrations.s3 import S3Access
from local_agent.mirror.backend import Backend
from local_agent.events.manifest import ManifestWriter
from local_agent.mirror.state import StateStore
args = json.loads(sys.argv[1])
dest = Destination(
    provider="s3", endpoint_url=args["url"], bucket=args["bucket"], prefix="restic/bench"
)
access = S3Access(provider="s3", endpoint_url=args["url"], region="us-east-1",
                  access_key_id=args["ak"], secret_access_key=args["sk"])
backend = Backend(access, dest)
state = StateStore(Path(args["state"]))
started = time.monotonic()
ref = ManifestWriter(backend, state).write(
    run_id="bench-run", manifest_prefix=".backrest-relay/bench/manifests",
    repo_id="bench", repo_guid=None,
)
hwm = next(
    int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")
)
print(json.dumps({"seconds": time.monotonic() - started, "objects": ref.objects,
                  "key": ref.key, "vmhwm_kib": hwm}))
"""


def fill_state(path: Path, objects: int) -> None:
    from local_agent.mirror.state import RemoteObject, StateStore

    state = StateStore(path)
    batch = []
    for i in range(objects):
        name = hashlib.sha256(i.to_bytes(8, "big")).hexdigest()
        batch.append(
            RemoteObject(f"data/{name[:2]}/{name}", 4096 + i % 9000, name, name[:32], name[:32])
        )
        if len(batch) == 10_000:
            state.put_many(batch)
            batch.clear()
    state.put_many(batch)
    state.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=200_000)
    args = parser.parse_args()
    from testbed.s3.rclone import RcloneS3Server

    with tempfile.TemporaryDirectory() as tmp, RcloneS3Server(Path(tmp) / "s3") as server:
        endpoint = server.endpoint
        endpoint.make_bucket("manifest-bench")
        state = Path(tmp) / "state.sqlite"
        fill_state(state, args.objects)
        payload = json.dumps(
            {
                "url": endpoint.endpoint_url,
                "bucket": "manifest-bench",
                "ak": endpoint.access_key,
                "sk": endpoint.secret_key,
                "state": str(state),
            }
        )
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, payload],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        out = proc.stdout.read().decode() if proc.stdout else ""
        if status != 0:
            sys.stderr.write(out)
            return 1
        result = json.loads(out.strip().splitlines()[-1])
        # VmHWM is this process's own high-water mark; ru_maxrss would carry the
        # parent's peak across fork+exec.
        del usage
        peak_mb = result["vmhwm_kib"] / 1024
        report = {
            "objects": result["objects"],
            "write_seconds": round(result["seconds"], 2),
            "process_seconds": round(time.monotonic() - started, 2),
            "peak_rss_mb": round(peak_mb, 1),
            "target_mb": 150,
            "pass": peak_mb < 150,
        }
        print(json.dumps(report))
        return 0 if report["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

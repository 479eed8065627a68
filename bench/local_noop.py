"""`python -m bench.local_noop`: what local mode costs when nothing changed (issue 14).

A local-mode mirror of `--objects` objects (default 100,000, restic-format, 4 KiB packs),
then `--runs` runs with nothing new (default 10), each the real agent as a Backrest hook
runs it, through `S3Proxy` in front of `rclone serve s3` so every request is counted at the
server. Reported per phase: GetObject requests and bytes, PUTs, list calls, all requests,
wall time. The target: 0 requests of any kind on the runs with nothing new.

`--rotation` adds one run with `verify.every = 0s` to show the budgeted rotation: it reads
at most `--budget` bytes of older objects (plus the manifest and one listing).

    python -m bench.local_noop --objects 2000 --runs 10 --rotation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.data import small_file_repo
from local_agent.units import format_size, parse_size
from testbed.agent import run_agent, write_agent_config
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server

BUCKET = "local-noop"
PACK_SIZE = 4096


@dataclass
class Phase:
    label: str
    runs: int
    get_requests: int
    get_bytes: int
    put_requests: int
    list_requests: int
    requests: int
    seconds: float
    bytes_read_reported: int  # what the agent's verification says it read


def _measure(
    label: str, proxy: S3Proxy, root: Path, args: list[str], runs: int, env: dict[str, str]
) -> Phase:
    proxy.reset()
    started = time.monotonic()
    reported = 0
    for _ in range(runs):
        result = run_agent(args, env=env, timeout=3600)
        if result.returncode != 0:
            raise SystemExit(f"{label}: exit {result.returncode}\n{result.stderr[-3000:]}")
        reported += result.summary.get("verification", {}).get("stats", {}).get("bytes_read", 0)
    seconds = time.monotonic() - started
    requests = proxy.requests
    gets = [r for r in requests if r.operation == "GetObject"]
    get_bytes = 0
    for r in gets:
        path = root / BUCKET / (r.key or "")
        get_bytes += path.stat().st_size if path.is_file() else 0
    return Phase(
        label=label,
        runs=runs,
        get_requests=len(gets),
        get_bytes=get_bytes,
        put_requests=sum(1 for r in requests if r.method == "PUT"),
        list_requests=sum(1 for r in requests if r.is_list_call),
        requests=len(requests),
        seconds=round(seconds, 2),
        bytes_read_reported=reported,
    )


def measure(work: Path, *, objects: int, runs: int, budget: str, rotation: bool) -> list[Phase]:
    repo = small_file_repo(work / "repo", objects, PACK_SIZE, seed=14)
    server_root = work / "s3"
    with RcloneS3Server(server_root) as server, S3Proxy(server.endpoint) as proxy:
        server.endpoint.make_bucket(BUCKET)
        config = write_agent_config(
            work / "relay.toml",
            proxy.endpoint,
            BUCKET,
            state_dir=work / "state",
            upload={"concurrency": 8},
            events={"publisher": "local"},
        )
        with config.open("a") as fh:
            fh.write(f'[verify]\nbudget = "{budget}"\n')
        args = ["upload", "--repo", str(repo.root), "--repo-id", "bench", "--config", str(config)]
        args += ["--repo-guid", "b" * 64, "--json"]
        phases = [_measure("first mirror", proxy, server_root, args, 1, {})]
        phases.append(_measure("nothing new", proxy, server_root, args, runs, {}))
        if rotation:
            every = {"BACKREST_RELAY_VERIFY__EVERY": "0s"}
            phases.append(_measure("rotation (every=0s)", proxy, server_root, args, 1, every))
    return phases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.local_noop", description=__doc__)
    parser.add_argument("--objects", type=int, default=100_000, help="mirrored objects")
    parser.add_argument("--runs", type=int, default=10, help="runs with nothing new")
    parser.add_argument("--budget", default="1GiB", help="verify.budget for --rotation")
    parser.add_argument("--rotation", action="store_true", help="add one rotation run")
    parser.add_argument("--json", type=Path, help="also write the phases as JSON here")
    ns = parser.parse_args(argv)
    parse_size(ns.budget)
    tmpfs = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="local-noop-", dir=tmpfs) as tmp:
        phases = measure(
            Path(tmp), objects=ns.objects, runs=ns.runs, budget=ns.budget, rotation=ns.rotation
        )
    print(f"local mode, {ns.objects} objects of {PACK_SIZE} B, verify.budget {ns.budget}")
    print(
        f"{'phase':22} {'runs':>4} {'GETs':>7} {'GET bytes':>10} {'PUTs':>7} "
        f"{'lists':>6} {'requests':>8} {'seconds':>8}"
    )
    for p in phases:
        print(
            f"{p.label:22} {p.runs:>4} {p.get_requests:>7} {format_size(p.get_bytes):>10} "
            f"{p.put_requests:>7} {p.list_requests:>6} {p.requests:>8} {p.seconds:>8.1f}"
        )
    if ns.json:
        ns.json.write_text(json.dumps([asdict(p) for p in phases], indent=2) + "\n")
    noop = next(p for p in phases if p.label == "nothing new")
    return 0 if noop.requests == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

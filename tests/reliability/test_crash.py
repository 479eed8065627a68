"""1. Crash: SIGKILL the agent at seeded random points of an upload of a real restic
repository, run it again, and prove that nothing was lost.

A kill point is one of
- ``request``: the n-th request reaches the proxy and the process dies before it is
  forwarded (the request was in flight);
- ``after-request``: the n-th request is carried out by the server, its reply is held
  back, and the process dies (the bucket changed, the agent never heard of it);
- ``time``: the process dies t seconds after it started (scan, hashing, state writes,
  manifest, local verification — wherever it happens to be).

Some trials kill the resumed run as well. Right after every kill the partial mirror keeps
restic's order (no index before its packs, no snapshot before its indexes), the state
store claims nothing the bucket lacks, and every SQLite file passes ``integrity_check``.
After the last kill the agent runs to completion and the trial checks: exit 0; the mirror
holds every local file byte for byte and no object that does not hash to its name; the
state store claims nothing the bucket lacks; every SQLite file passes ``integrity_check``
and the state store opens; no multipart upload is left unfinished; the outbox is empty.
``restic check --read-data`` and ``verify --deep 100%`` prove the last trial's mirror
(every trial's under ``make soak``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from local_agent.mirror.state import StateStore
from testbed.agent import (
    run_agent,
    start_agent,
    unfinished_uploads,
    upload_args,
    write_agent_config,
)
from testbed.repos import restic_check, s3_repo_url
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.faults import Fault
from testbed.s3.operations import RequestInfo
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from tests.reliability.common import (
    MULTIPART,
    SOAK,
    Ledger,
    MiB,
    check_mirror,
    count,
    false_claims,
    integrity,
    local_files,
    phase_order_violations,
    remote_files,
    sqlite_files,
    sub_seed,
)
from tests.reliability.conftest import ResticRepo

REPO_ID = "crash"
GUID = "c7" * 32
PREFIX = f"restic/{REPO_ID}"
KILLS = count("crash: SIGKILL points")

Mode = Literal["request", "after-request", "time"]


@dataclass
class KillPoint:
    mode: Mode
    at: float  # request number (1-based) or seconds after start

    def __str__(self) -> str:
        return f"{self.mode}@{self.at:.2f}" if self.mode == "time" else f"{self.mode}#{self.at:g}"


@dataclass
class Killer:
    """The proxy's fault hook: SIGKILLs the armed process at its kill point."""

    proxy: S3Proxy
    proc: subprocess.Popen[str] | None = None
    point: KillPoint | None = None
    seen: int = 0
    fired: str | None = None  # what was happening when the process died
    lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self, proc: subprocess.Popen[str], point: KillPoint) -> None:
        with self.lock:
            self.proc, self.point, self.seen, self.fired = proc, point, 0, None
        if point.mode == "time":
            timer = threading.Timer(point.at, self._kill, args=(f"{point.at:.2f}s in", proc))
            timer.daemon = True
            timer.start()

    def disarm(self) -> None:
        with self.lock:
            self.proc = self.point = None

    def _kill(self, what: str, target: subprocess.Popen[str] | None) -> None:
        with self.lock:
            proc = self.proc
            if proc is None or proc is not target or proc.poll() is not None or self.fired:
                return  # finished, or a later run is armed now
            self.fired = what
        os.kill(proc.pid, signal.SIGKILL)

    def _kill_after_logged(self, seq: int, what: str, target: subprocess.Popen[str] | None) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(r.seq == seq for r in self.proxy.requests):
                break
            time.sleep(0.002)
        self._kill(what, target)

    def __call__(self, info: RequestInfo) -> Fault | None:
        with self.lock:
            point = self.point
            if point is None or point.mode == "time" or self.fired is not None:
                return None
            self.seen += 1
            if self.seen != int(point.at):
                return None
            target = self.proc
        what = f"{point.mode} {info.operation} {info.key or ''}".strip()
        if point.mode == "request":
            self._kill(what, target)
            return Fault.drop()
        args = (info.seq, what, target)
        threading.Thread(target=self._kill_after_logged, args=args, daemon=True).start()
        return Fault.drop_after_forward()


def draw_point(rng: random.Random, requests: int, seconds: float) -> KillPoint:
    mode: Mode = rng.choice(["request", "request", "after-request", "after-request", "time"])
    if mode == "time":
        return KillPoint(mode, round(rng.uniform(0.3, max(seconds, 0.6)), 2))
    return KillPoint(mode, rng.randint(1, max(requests, 1)))


def expected_requests(repo: Path) -> int:
    """Requests of a clean first upload with local verification: listing, stray check,
    one PUT per small file, create + parts + complete per large one, the manifest; then
    the verifier's listing, manifest and one GET per object."""
    sizes = [p.stat().st_size for p in local_files(repo).values()]
    threshold = 5 * MiB
    large = [s for s in sizes if s >= threshold]
    parts = sum(-(-s // threshold) for s in large)
    assert len(large) >= 3, "the repository should hold several packs above the threshold"
    upload = 2 + (len(sizes) - len(large)) + 2 * len(large) + parts + 1
    return upload + 2 + len(sizes)


def crash_upload_args(config: Path, repo: Path) -> list[str]:
    return upload_args(config, repo, repo_id=REPO_ID, repo_guid=GUID)


def crash_config(path: Path, endpoint: S3Endpoint, bucket: str, state: Path) -> Path:
    return write_agent_config(
        path,
        endpoint,
        bucket,
        state_dir=state,
        upload={**MULTIPART, "concurrency": 3},
        events={"publisher": "local"},
    )


@dataclass
class TrialResult:
    kills: list[str]
    lost: int
    problems: list[str]


def assert_recovered(
    repo: ResticRepo, server: RcloneS3Server, bucket: str, state: Path
) -> TrialResult:
    """Everything the module docstring promises after the completing run, as a list of
    problems (empty when all holds) plus the count of local files not safely mirrored."""
    bucket_dir = server.bucket_path(bucket)
    check = check_mirror(repo.path, bucket_dir, PREFIX)
    problems = []
    if check.missing or check.different:
        problems.append(f"not mirrored intact: {check.missing + check.different}")
    if check.corrupt:
        problems.append(f"objects that do not hash to their name: {check.corrupt}")
    if check.unexpected:
        problems.append(f"objects the repository does not have: {check.unexpected}")
    claims = false_claims(state, bucket_dir, PREFIX)
    if claims:
        problems.append(f"state store claims objects the bucket lacks: {claims}")
    unfinished = unfinished_uploads(server.endpoint, bucket)
    if unfinished:
        problems.append(f"unfinished multipart uploads: {unfinished}")
    for db in sqlite_files(state):
        verdict = integrity(db)
        if verdict != "ok":
            problems.append(f"{db.name}: integrity_check says {verdict}")
    stores = [p for p in sqlite_files(state) if p.name.startswith(bucket)]
    if len(stores) != 1:
        problems.append(f"expected one state store, found {stores}")
    for path in stores:
        StateStore(path).close()  # opens (raises ConfigError when unusable)
    outbox = state / "outbox.sqlite"
    if outbox.exists():
        import sqlite3

        db = sqlite3.connect(str(outbox))
        pending = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        db.close()
        if pending:
            problems.append(f"{pending} event(s) left in the outbox")
    return TrialResult([], check.lost, problems)


def prove_with_restic_and_verify(
    repo: ResticRepo, server: RcloneS3Server, bucket: str, config: Path
) -> None:
    url = s3_repo_url(server.endpoint, bucket, PREFIX)
    restic_check(url, repo.password, env=server.endpoint.env(), read_data=True)
    ids = ["--repo-id", REPO_ID, "--repo-guid", GUID]
    verdict = run_agent(["verify", *ids, "--config", str(config), "--deep", "100%"], timeout=300)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr


@pytest.mark.timeout(3600 if SOAK else 600)
def test_sigkill_at_random_points_loses_nothing(
    crash_repo: ResticRepo,
    rclone_server: RcloneS3Server,
    counting_proxy: S3Proxy,
    unique_bucket: Callable[[S3Endpoint], str],
    ledger: Ledger,
    tmp_path: Path,
) -> None:
    rng = random.Random(sub_seed("crash"))
    killer = Killer(counting_proxy)
    counting_proxy.fault = killer

    requests = expected_requests(crash_repo.path)
    seconds = 3.0
    fired_total = 0
    trials = 0
    recovered = 0
    lost_total = 0
    kinds: list[str] = []
    failures: list[str] = []
    # Trials until KILLS kill points have fired (a point past the end of a run does not).
    while fired_total < KILLS and trials < 3 * KILLS:
        trial = trials
        trials += 1
        kills = min(KILLS - fired_total, rng.choice([1, 1, 1, 2, 3]))
        bucket = unique_bucket(rclone_server.endpoint)
        state = tmp_path / f"trial{trial}" / "state"
        config = crash_config(
            tmp_path / f"trial{trial}.toml", counting_proxy.endpoint, bucket, state
        )
        fired: list[str] = []
        for k in range(kills):
            # A resumed run has less to do: aim its kill at the first half of the work.
            point = draw_point(rng, requests if k == 0 else requests // 2, seconds)
            proc = start_agent(crash_upload_args(config, crash_repo.path))
            killer.arm(proc, point)
            _, err = proc.communicate(timeout=300)
            killer.disarm()
            if killer.fired is None:
                assert proc.returncode == 0, f"trial {trial}: unkilled run failed: {err}"
                break  # the run finished before its kill point: nothing left to kill
            fired.append(f"{point}: {killer.fired}")
            kinds.append(point.mode)
            # Right after a crash: the partial mirror is consistent, the state store claims
            # nothing the bucket lacks, and every SQLite file is intact.
            bucket_dir = rclone_server.bucket_path(bucket)
            right_after = phase_order_violations(crash_repo.path, remote_files(bucket_dir, PREFIX))
            right_after += [f"state claims {k}" for k in false_claims(state, bucket_dir, PREFIX)]
            right_after += [
                f"{db.name}: {verdict}"
                for db in sqlite_files(state)
                if (verdict := integrity(db)) != "ok"
            ]
            if right_after:
                failures.append(f"trial {trial} right after kill {point}: {right_after}")
        fired_total += len(fired)
        final = run_agent(crash_upload_args(config, crash_repo.path))
        assert "Traceback" not in final.stderr, final.stderr
        if final.returncode != 0:
            failures.append(
                f"trial {trial} ({fired}): completing run exited {final.returncode}: "
                f"{final.stderr[-800:]}"
            )
            continue
        result = assert_recovered(crash_repo, rclone_server, bucket, state)
        lost_total += result.lost
        if result.problems:
            failures.append(f"trial {trial} ({fired}): {result.problems}")
        else:
            recovered += len(fired)
        if SOAK or fired_total >= KILLS:
            prove_with_restic_and_verify(crash_repo, rclone_server, bucket, config)

    ledger.add(
        "crash",
        trials=trials,
        faults=fired_total,
        detected=recovered,
        lost=lost_total,
        kinds=kinds,
        note=f"{trials} trials; kill points drawn over ~{requests} requests or {seconds:.0f}s",
    )
    assert not failures, "\n".join(failures)
    assert fired_total == KILLS, f"only {fired_total} of {KILLS} kill points fired"
    assert lost_total == 0

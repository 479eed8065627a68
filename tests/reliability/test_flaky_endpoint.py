"""2. Flaky endpoint: a seeded random fault schedule between the agent (and the verifier)
and the S3 server — 500s, 503 SlowDown, connections reset half-way through a request body,
connections dropped before or after the server acted, slow responses, response bodies cut
off — plus, in some trials, a blackout long enough to exhaust every retry. (A reset
mid-body reaches the agent only after rclone has finished with the cut request: rclone
deletes the key of a cut PUT, and must not do so after the agent's retry succeeded.)

Each upload ends with exit 0, or with exit 4, one clear error line and a consistent
partial mirror (no index before all packs, no snapshot before all indexes). After every
run no object in the bucket fails to hash to its name and the state store claims nothing
the bucket lacks. Each verification ends with exit 0, or exit 4 when the bucket could not
be read: never a false "VERIFICATION FAILED". A clean rerun then completes the mirror,
which ``verify --deep 100%`` and ``restic check`` accept, with no multipart upload left
unfinished.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.agent import AgentResult, run_agent, unfinished_uploads, write_agent_config
from testbed.repos import (
    ResticError,
    add_packs,
    make_fake_restic_repo,
    restic_check,
    s3_repo_url,
)
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.faults import Fault, FaultSchedule
from testbed.s3.operations import RequestInfo
from testbed.s3.rclone import RcloneS3Server
from tests.reliability.chaos import FAULT_KINDS, ChaosProxy, RandomFaults, truncate_this_response
from tests.reliability.common import (
    MULTIPART,
    SOAK,
    Ledger,
    MiB,
    check_mirror,
    count,
    false_claims,
    phase_order_violations,
    remote_files,
    sub_seed,
)
from tests.reliability.conftest import ResticRepo

REPO_ID = "flaky"
GUID = "f1" * 32
PREFIX = f"restic/{REPO_ID}"
TRIALS = count("flaky endpoint: trials (upload, verify, clean rerun)")
IDS = ["--repo-id", REPO_ID, "--repo-guid", GUID]


def agent(args: list[str]) -> AgentResult:
    return run_agent(args, timeout=600)


def upload_args(config: Path, repo: Path) -> list[str]:
    return ["upload", "--repo", str(repo), *IDS, "--config", str(config), "--json"]


def verify_args(config: Path) -> list[str]:
    return ["verify", *IDS, "--config", str(config), "--deep", "100%", "--json"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("backrest-relay: error:")]


@pytest.mark.timeout(3600 if SOAK else 900)
def test_flaky_endpoint_never_loses_data_or_accepts_a_bad_copy(
    crash_repo: ResticRepo,
    rclone_server: RcloneS3Server,
    unique_bucket: Callable[[S3Endpoint], str],
    ledger: Ledger,
    tmp_path: Path,
) -> None:
    injected: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    handled = 0
    lost = 0
    corrupt_seen = 0
    with ChaosProxy(rclone_server.endpoint) as proxy:
        for trial in range(TRIALS):
            rng = random.Random(sub_seed("flaky", trial))
            bucket = unique_bucket(rclone_server.endpoint)
            bucket_dir = rclone_server.bucket_path(bucket)
            state = tmp_path / f"trial{trial}" / "state"
            config = write_agent_config(
                tmp_path / f"trial{trial}.toml",
                proxy.endpoint,
                bucket,
                state_dir=state,
                upload={**MULTIPART, "concurrency": 4},
            )
            label = f"trial {trial}"

            # -- upload through the faults ------------------------------------------------
            blackout = (rng.randint(3, 45), 80) if trial % 2 else None
            upload_faults = RandomFaults(
                sub_seed("flaky-upload", trial),
                rate=rng.uniform(0.1, 0.3),
                blackout=blackout,
            )
            proxy.fault = upload_faults
            up = agent(upload_args(config, crash_repo.path))
            proxy.fault = None
            injected.update(upload_faults.log.counts)
            outcomes[f"upload exit {up.returncode}"] += 1
            if "Traceback" in up.stderr:
                failures.append(f"{label}: upload printed a traceback:\n{up.stderr}")
            remote = remote_files(bucket_dir, PREFIX)
            check = check_mirror(crash_repo.path, bucket_dir, PREFIX)
            corrupt_seen += len(check.corrupt)
            problems = [
                *(f"corrupt object {k}" for k in check.corrupt),
                *(f"state claims {k}" for k in false_claims(state, bucket_dir, PREFIX)),
            ]
            if up.returncode == 0:
                if check.lost:
                    problems.append(f"exit 0 but not mirrored: {check.missing + check.different}")
            elif up.returncode == 4:
                problems += phase_order_violations(crash_repo.path, remote)
                lines = error_lines(up.stderr)
                if len(lines) != 1 or up.summary["error"]["kind"] != "destination":
                    problems.append(f"exit 4 without one clear destination error: {up.stderr}")
            else:
                problems.append(f"upload exited {up.returncode}: {up.stderr[-1500:]}")
            if problems:
                failures.append(f"{label} ({blackout=}): {problems}")
            else:
                handled += 1

            # -- verify through the faults (needs a manifest) -------------------------------
            if up.returncode == 0:
                plans: list[tuple[str, tuple[int, int] | None, tuple[int, ...]]] = [
                    ("random faults", None, (0,))
                ]
                if trial % 4 == 0:
                    # Every request fails from the first on: the bucket cannot be read at
                    # all, which is not a verdict (exit 4).
                    plans.append(("blackout", (1, 40), (4,)))
                if trial % 4 == 3:
                    # The bucket goes dark during the deep check: still no verdict (4), or
                    # the reads outlast the blackout (0). Never a false "FAILED" (3).
                    plans.append(("blackout mid-check", (rng.randint(3, 20), 150), (0, 4)))
                for what, dark, expected in plans:
                    verify_faults = RandomFaults(
                        sub_seed("flaky-verify", trial, what),
                        rate=rng.uniform(0.05, 0.2),
                        blackout=dark,
                        kinds=FAULT_KINDS,
                    )
                    proxy.fault = verify_faults
                    verdict = agent(verify_args(config))
                    proxy.fault = None
                    injected.update(verify_faults.log.counts)
                    outcomes[f"verify exit {verdict.returncode}"] += 1
                    if verdict.returncode not in expected or "Traceback" in verdict.stderr:
                        failures.append(
                            f"{label}: verify with {what} exited {verdict.returncode} "
                            f"(expected {expected}): {verdict.stdout[-1500:]} "
                            f"{verdict.stderr[-800:]}"
                        )
                    elif verdict.returncode == 4 and "cannot read the mirror" not in verdict.stderr:
                        failures.append(
                            f"{label}: exit 4 without a clear message: {verdict.stderr}"
                        )
                    else:
                        handled += 1

            # -- a clean rerun completes the mirror -----------------------------------------
            rerun = agent(upload_args(config, crash_repo.path))
            assert rerun.returncode == 0, f"{label}: clean rerun failed: {rerun.stderr}"
            final = check_mirror(crash_repo.path, bucket_dir, PREFIX)
            lost += final.lost
            corrupt_seen += len(final.corrupt)
            if final.lost or final.corrupt or final.unexpected:
                failures.append(f"{label}: after the clean rerun: {final}")
            unfinished = unfinished_uploads(rclone_server.endpoint, bucket)
            if unfinished:
                failures.append(f"{label}: unfinished multipart uploads {unfinished}")
            clean = agent(verify_args(config))
            if clean.returncode != 0:
                failures.append(f"{label}: clean verify exited {clean.returncode}: {clean.stdout}")
            url = s3_repo_url(rclone_server.endpoint, bucket, PREFIX)
            try:
                restic_check(
                    url, crash_repo.password, env=rclone_server.endpoint.env(), read_data=SOAK
                )
            except ResticError as exc:
                # Reported with every other finding of the trial (file comparison, state
                # claims), not instead of them: they say where the object went.
                failures.append(f"{label}: restic check of the mirror failed: {exc}")

    ledger.add(
        "flaky endpoint",
        trials=TRIALS,
        faults=sum(injected.values()),
        detected=handled,
        lost=lost,
        kinds=injected,
        note=", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
        + f"; corrupt objects seen: {corrupt_seen}",
    )
    assert not failures, "\n".join(failures)
    assert lost == 0 and corrupt_seen == 0


# -- regressions: bugs the randomized schedules found (fixed in 80cbfda) ---------------------


def small_mirror(
    tmp_path: Path, endpoint: S3Endpoint, bucket: str, **upload: object
) -> tuple[Path, Path]:
    repo = make_fake_restic_repo(tmp_path / "repo", packs=6, pack_size=(100_000, 300_000), seed=3)
    if upload:
        add_packs(repo, 1, 6 * MiB, seed=4)
    config = write_agent_config(
        tmp_path / "relay.toml", endpoint, bucket, state_dir=tmp_path / "state", upload=upload
    )
    return repo.root, config


def test_truncated_download_during_verify_is_not_a_verdict(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    """Once cut off: read again, verified (0). Cut off every time: the object could not be
    looked at — exit 4, "cannot read the mirror" — never a false VERIFICATION FAILED (3)."""
    with ChaosProxy(rclone_server.endpoint) as proxy:
        repo, config = small_mirror(tmp_path, proxy.endpoint, rclone_bucket)
        assert agent(upload_args(config, repo)).returncode == 0
        victim: list[str] = []

        def truncate(times: int | None) -> Callable[[RequestInfo], Fault | None]:
            def hook(info: RequestInfo) -> Fault | None:
                key = info.key or ""
                if info.method == "GET" and "/data/" in key:
                    if not victim:
                        victim.append(key)
                    if key == victim[0] and (times is None or len(cuts) < times):
                        cuts.append(key)
                        truncate_this_response()
                return None

            return hook

        cuts: list[str] = []
        proxy.fault = truncate(1)
        once = agent(verify_args(config))
        cuts.clear()
        proxy.fault = truncate(None)
        always = agent(verify_args(config))
    assert once.returncode == 0, once.stdout + once.stderr
    assert len(cuts) >= 2, cuts
    assert always.returncode == 4, always.stdout + always.stderr
    assert "cannot read the mirror" in always.stderr and "Traceback" not in always.stderr


def test_lost_reply_to_create_multipart_upload_leaves_no_unfinished_upload(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    with ChaosProxy(rclone_server.endpoint) as proxy:
        repo, config = small_mirror(tmp_path, proxy.endpoint, rclone_bucket, **MULTIPART)
        proxy.fault = FaultSchedule(
            Fault.drop_after_forward(), times=1, operation="CreateMultipartUpload"
        )
        first = agent(upload_args(config, repo))
        proxy.fault = None
    assert first.returncode == 0, first.stderr
    leftover = unfinished_uploads(rclone_server.endpoint, rclone_bucket)
    assert leftover == [], f"unfinished after a successful run: {leftover}"

"""Contract events for tests: a verification result, a failed mirror, a stale alert, with
the defaults most tests share (override what a test is about)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cloud.contracts.destination import Destination
from cloud.contracts.events import (
    ErrorInfo,
    ManifestRef,
    MirrorCompleted,
    MirrorFailed,
    MirrorStale,
    MirrorStats,
    MirrorVerificationFailed,
    MirrorVerified,
    Problem,
    RepoRef,
    VerificationStats,
)
from cloud.contracts.ids import new_run_id

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
GUID = "ab" * 32
DEST = Destination(provider="b2", endpoint_url="https://s3.x", bucket="offsite", prefix="r/home")
REPO = RepoRef(id="home", guid=GUID, path="/srv/restic/home")
MANIFEST = ManifestRef(key="m/1.jsonl.gz", sha256="0" * 64, objects=10, created_by_run="m1")
BAD_BYTES = Problem(key="data/ab/abcd", kind="hash", detail="bad bytes")


def envelope(
    at: datetime,
    *,
    repo: RepoRef = REPO,
    host: str = "nas",
    trigger: str = "CONDITION_CHECK_SUCCESS",
    started_at: datetime | None = None,
    run_id: str | None = None,
    destination: Destination = DEST,
) -> dict[str, Any]:
    """The fields every event detail shares, so a builder states only what its kind adds."""
    return {
        "run_id": run_id or new_run_id(),
        "repo": repo,
        "host": host,
        "trigger": trigger,
        "destination": destination,
        "started_at": started_at or at,
        "finished_at": at,
    }


def completed(
    at: datetime = T0,
    *,
    stats: MirrorStats | None = None,
    manifest: ManifestRef = MANIFEST,
    **header: Any,
) -> MirrorCompleted:
    """The agent's `Mirror Completed` for one manifest; `header` overrides the envelope's
    fields (repo, host, trigger, run_id, destination)."""
    return MirrorCompleted(
        **envelope(at, **header), stats=stats or MirrorStats(), manifest=manifest
    )


def verification(
    at: datetime,
    ok: bool = True,
    *,
    repo: RepoRef = REPO,
    host: str = "lambda:verifier",
    trigger: str = "Mirror Completed m1",
    mirror_run_id: str = "m1",
    manifest: ManifestRef = MANIFEST,
    stats: VerificationStats | None = None,
    new_snapshots: Sequence[str] = (),
) -> MirrorVerified | MirrorVerificationFailed:
    """`Mirror Verified`, or with `ok=False` a `Mirror Verification Failed` naming one
    object with bad bytes."""
    model = MirrorVerified if ok else MirrorVerificationFailed
    problems = [] if ok else [BAD_BYTES]
    return model(
        **envelope(at, repo=repo, host=host, trigger=trigger),
        mirror_run_id=mirror_run_id,
        manifest=manifest,
        stats=stats or VerificationStats(compared=10, deep_checked=3, bytes_read=3000),
        problems=problems,
        problems_total=len(problems),
        new_snapshots=list(new_snapshots),
    )


def mirror_failed(
    at: datetime = T0,
    *,
    repo: RepoRef = REPO,
    stats: MirrorStats | None = None,
    started_at: datetime | None = None,
) -> MirrorFailed:
    """The agent's `Mirror Failed` after the destination kept answering SlowDown."""
    return MirrorFailed(
        **envelope(at, repo=repo, started_at=started_at),
        error=ErrorInfo(kind="destination", message="upload of data/ab/x: SlowDown (HTTP 503)"),
        stats=stats,
    )


def stale(at: datetime, *, repo: RepoRef = REPO) -> MirrorStale:
    """The watchdog's alert: last verified 27 h ago, 26 h allowed."""
    return MirrorStale(
        **envelope(at, repo=repo, host="lambda:watchdog", trigger="watchdog"),
        last_verified_at=at - timedelta(hours=27),
        age_seconds=27 * 3600,
        max_age_seconds=26 * 3600,
    )

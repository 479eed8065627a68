"""The verification use case, shared by the Lambda handler and local mode.

A `Mirror Completed` event comes in; the mirror run is recorded, the mirror is verified
against its manifest, the full problem report is stored beside the manifest, the
verification is recorded, and the result event goes back to the caller to publish.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from datetime import UTC, datetime

from cloud.contracts.destination import Destination
from cloud.contracts.events import (
    ManifestRef,
    MirrorCompleted,
    MirrorFailed,
    MirrorStats,
    MirrorVerificationFailed,
    MirrorVerified,
    RepoRef,
)
from cloud.contracts.ids import new_run_id
from cloud.logic.ports import ObjectStore, ReportSink, RunRecord, RunStore
from cloud.logic.verify import (
    MirrorVerifier,
    VerificationOutcome,
    VerifyOptions,
    problems_report_key,
)

VerificationResult = MirrorVerified | MirrorVerificationFailed


def mirror_run_record(event: MirrorCompleted | MirrorFailed) -> RunRecord:
    completed = isinstance(event, MirrorCompleted)
    return RunRecord(
        repo_key=event.repo.key,
        run_id=event.run_id,
        kind="mirror" if completed else "failure",
        status="completed" if completed else "failed",
        started_at=event.started_at,
        finished_at=event.finished_at,
        repo_id=event.repo.id,
        host=event.host,
        detail=event.model_dump(mode="json"),
    )


def verify_completed_mirror(
    event: MirrorCompleted,
    *,
    store: ObjectStore,
    runs: RunStore,
    reports: ReportSink | None,
    options: VerifyOptions | None = None,
    host: str | None = None,
) -> VerificationResult:
    """Verify the mirror the event announces; ObjectStoreError means "could not look",
    never "verified" — the caller retries."""
    runs.record(mirror_run_record(event))
    repo_key = event.repo.key
    options = replace(options or VerifyOptions(), rotation_index=runs.verification_count(repo_key))
    started = datetime.now(UTC)
    outcome = MirrorVerifier(store, event.destination, options).verify(
        event.manifest.key, event.manifest.sha256
    )
    report_key = None
    if outcome.report is not None and reports is not None:
        report_key = reports.put(problems_report_key(event.manifest.key), outcome.report)
    result = verification_event(
        outcome,
        repo=event.repo,
        destination=event.destination,
        mirror_run_id=event.run_id,
        manifest=event.manifest,
        started_at=started,
        host=host,
        trigger=f"{event.DETAIL_TYPE.value} {event.run_id}",
        report_key=report_key,
        new_snapshots=event.new_snapshots,
        mirror_stats=event.stats,
    )
    record_verification(runs, result)
    return result


def verification_event(
    outcome: VerificationOutcome,
    *,
    repo: RepoRef,
    destination: Destination,
    mirror_run_id: str,
    manifest: ManifestRef,
    started_at: datetime,
    trigger: str,
    host: str | None = None,
    report_key: str | None = None,
    new_snapshots: list[str] | None = None,
    mirror_stats: MirrorStats | None = None,
) -> VerificationResult:
    """The result event of a verification (Verified or Verification Failed)."""
    model: type[VerificationResult] = (
        MirrorVerified if outcome.verified else MirrorVerificationFailed
    )
    return model(
        run_id=new_run_id(),
        repo=repo,
        host=host or socket.gethostname(),
        trigger=trigger,
        destination=destination,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        mirror_run_id=mirror_run_id,
        manifest=manifest,
        stats=outcome.stats,
        problems=outcome.problems,
        problems_total=outcome.problems_total,
        warnings=outcome.warnings,
        report_key=report_key,
        new_snapshots=new_snapshots or [],
        mirror_stats=mirror_stats,
    )


def record_verification(runs: RunStore, result: VerificationResult) -> None:
    runs.record(
        RunRecord(
            repo_key=result.repo.key,
            run_id=result.run_id,
            kind="verification",
            status="verified" if isinstance(result, MirrorVerified) else "verification-failed",
            started_at=result.started_at,
            finished_at=result.finished_at,
            repo_id=result.repo.id,
            host=result.host,
            mirror_run_id=result.mirror_run_id,
            detail=result.model_dump(mode="json"),
        )
    )

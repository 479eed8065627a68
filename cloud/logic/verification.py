"""The verification use case, shared by the Lambda handler and local mode.

A `Mirror Completed` event comes in; the mirror run is recorded, the mirror is verified
against its manifest, the full problem report is stored beside the manifest, the
verification is recorded, and the result event goes back to the caller to publish.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from datetime import UTC, datetime

from cloud.contracts.events import (
    MirrorCompleted,
    MirrorFailed,
    MirrorVerificationFailed,
    MirrorVerified,
)
from cloud.contracts.ids import new_run_id
from cloud.logic.ports import ObjectStore, ReportSink, RunRecord, RunStore
from cloud.logic.verify import MirrorVerifier, VerifyOptions, problems_report_key

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
    model: type[VerificationResult] = (
        MirrorVerified if outcome.verified else MirrorVerificationFailed
    )
    result = model(
        run_id=new_run_id(),
        repo=event.repo,
        host=host or socket.gethostname(),
        trigger=f"{event.DETAIL_TYPE.value} {event.run_id}",
        destination=event.destination,
        started_at=started,
        finished_at=datetime.now(UTC),
        mirror_run_id=event.run_id,
        manifest=event.manifest,
        stats=outcome.stats,
        problems=outcome.problems,
        problems_total=outcome.problems_total,
        warnings=outcome.warnings,
        report_key=report_key,
        new_snapshots=event.new_snapshots,
        mirror_stats=event.stats,
    )
    runs.record(
        RunRecord(
            repo_key=repo_key,
            run_id=result.run_id,
            kind="verification",
            status="verified" if outcome.verified else "verification-failed",
            started_at=result.started_at,
            finished_at=result.finished_at,
            repo_id=event.repo.id,
            host=result.host,
            mirror_run_id=event.run_id,
            detail=result.model_dump(mode="json"),
        )
    )
    return result

"""The verification use case, shared by the Lambda handler and local mode.

A `Mirror Completed` event comes in; the mirror run is recorded, the mirror is verified
against its manifest, the full problem report is stored beside the manifest, the
verification is recorded, and the result event goes back to the caller to publish.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from cloud.contracts.destination import Destination
from cloud.contracts.events import (
    ManifestRef,
    MirrorCompleted,
    MirrorFailed,
    MirrorStats,
    MirrorVerificationFailed,
    MirrorVerified,
    Problem,
    RepoRef,
    VerificationStats,
)
from cloud.contracts.ids import new_run_id
from cloud.logic.checkpoint import (
    VerifyCheckpoint,
    VerifyPlan,
    advance,
    checkpoint_name,
    plan_verification,
)
from cloud.logic.ports import ObjectStore, ObjectStoreError, ReportSink, RunRecord, RunStore
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
    forced_verified: bool = False,
) -> VerificationResult:
    """The result event of a verification (Verified or Verification Failed).

    `forced_verified`: a run that read nothing because the manifest was proven earlier."""
    model: type[VerificationResult] = (
        MirrorVerified if outcome.verified or forced_verified else MirrorVerificationFailed
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


@dataclass
class CheckpointedVerification:
    """One checkpointed pass: the plan, the checkpoint after it, and the result event to
    publish — None while the verification is unfinished and has found nothing wrong (it
    is published once, when complete; a problem is announced at once)."""

    plan: VerifyPlan
    checkpoint: VerifyCheckpoint
    result: VerificationResult | None
    unproven_objects: int
    unproven_bytes: int
    stats: VerificationStats | None = None  # of the pass, when one ran

    @property
    def complete(self) -> bool:
        return self.result is not None and self.unproven_objects == 0


def verify_checkpointed(
    event: MirrorCompleted,
    *,
    store: ObjectStore,
    runs: RunStore,
    reports: ReportSink | None,
    options: VerifyOptions,
    every_seconds: float,
    rotation_budget: int,
    now: datetime | None = None,
    host: str | None = None,
) -> CheckpointedVerification:
    """Verify what the event announces, building on what earlier passes proved.

    * the same manifest, proven, `every` not passed: nothing is read ("reuse"); the
      result says verified, with `stats.reused`;
    * otherwise one pass: the listing, the unproven new objects (this manifest's from
      where the last pass stopped, and older pending manifests'), and — once per `every`
      — the rotation slice of `rotation_budget` bytes;
    * the destination cannot be read (denied, download cap, unreachable): the result is a
      `Mirror Verification Failed` with an `unverifiable` problem naming the reason, and
      the checkpoint stays as it was, so the next run tries again.

    The checkpoint is saved before this returns, whatever the outcome.
    """
    runs.record(mirror_run_record(event))
    repo_key = event.repo.key
    name = checkpoint_name(event.destination)
    now = now or datetime.now(UTC)
    before = VerifyCheckpoint.from_dict(runs.load_checkpoint(repo_key, name))
    plan = plan_verification(
        before,
        event.manifest.key,
        manifest_sha256=event.manifest.sha256,
        now=now,
        every_seconds=every_seconds,
        rotation_budget=rotation_budget,
    )

    def result_of(
        outcome: VerificationOutcome, *, report_key: str | None = None, reused: bool = False
    ) -> VerificationResult:
        return verification_event(
            outcome,
            repo=event.repo,
            destination=event.destination,
            mirror_run_id=event.run_id,
            manifest=event.manifest,
            started_at=now,
            host=host,
            trigger=f"{event.DETAIL_TYPE.value} {event.run_id}",
            report_key=report_key,
            new_snapshots=event.new_snapshots,
            mirror_stats=event.stats,
            forced_verified=reused,
        )

    if plan.action == "reuse":
        assert before is not None
        result: VerificationResult = result_of(
            VerificationOutcome(
                header=None,
                manifest_sha256=event.manifest.sha256,
                stats=VerificationStats(reused=True),
            ),
            reused=True,
        )
        record_verification(runs, result)
        return CheckpointedVerification(plan, before, result, 0, 0)
    pass_options = replace(
        options,
        resume_from=plan.resume_from,
        carried=plan.carried,
        rotation_bytes=plan.rotation_bytes,
        rotation_from=plan.rotation_from,
        rotate_uploaded=plan.rotate_uploaded,
    )
    try:
        outcome = MirrorVerifier(store, event.destination, pass_options).verify(
            event.manifest.key, event.manifest.sha256
        )
    except ObjectStoreError as exc:
        result = unverifiable_event(event, str(exc), started_at=now, host=host)
        record_verification(runs, result)
        checkpoint = before or VerifyCheckpoint()
        return CheckpointedVerification(
            plan, checkpoint, result, checkpoint.unproven_objects, checkpoint.unproven_bytes
        )
    after = advance(
        before,
        plan,
        outcome.pass_result(),
        manifest_key=event.manifest.key,
        manifest_sha256=event.manifest.sha256,
        now=now,  # when the pass began: `every` counts from there
    )
    runs.save_checkpoint(repo_key, name, after.to_dict())
    if not outcome.complete and outcome.problems_total == 0:
        return CheckpointedVerification(
            plan,
            after,
            None,
            outcome.unproven_objects,
            outcome.unproven_bytes,
            outcome.stats.model_copy(
                update={
                    "unproven_objects": outcome.unproven_objects,
                    "unproven_bytes": outcome.unproven_bytes,
                }
            ),
        )
    report_key = None
    if outcome.report is not None and reports is not None:
        report_key = reports.put(problems_report_key(event.manifest.key), outcome.report)
    outcome.stats = outcome.stats.model_copy(
        update={
            "unproven_objects": outcome.unproven_objects,
            "unproven_bytes": outcome.unproven_bytes,
        }
    )
    result = result_of(outcome, report_key=report_key)
    record_verification(runs, result)
    return CheckpointedVerification(
        plan, after, result, outcome.unproven_objects, outcome.unproven_bytes
    )


def unverifiable_event(
    event: MirrorCompleted, reason: str, *, started_at: datetime, host: str | None = None
) -> MirrorVerificationFailed:
    """ "Could not verify": the mirror may be fine, but nobody could look (a verdict of its
    own, so it is announced and the queue moves on instead of waiting silently)."""
    return MirrorVerificationFailed(
        run_id=new_run_id(),
        repo=event.repo,
        host=host or socket.gethostname(),
        trigger=f"{event.DETAIL_TYPE.value} {event.run_id}",
        destination=event.destination,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        mirror_run_id=event.run_id,
        manifest=event.manifest,
        stats=VerificationStats(),
        problems=[
            Problem(
                key=event.manifest.key,
                kind="unverifiable",
                detail=f"could not verify: {reason}"[:500],
            )
        ],
        problems_total=1,
        new_snapshots=event.new_snapshots,
        mirror_stats=event.stats,
    )

"""Verify a mirror: the Lambda's one-shot pass (`verify_mirror`), local mode's
checkpointed passes (`verify_checkpointed`), and the `verify` command's check of one
manifest (`verify_manifest`). Each records the mirror run and the verification in the run
store and returns the result event for its shell to publish or print."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

from cloud.app.binding import check_binding
from cloud.contracts.destination import Destination
from cloud.contracts.events import ManifestRef, MirrorCompleted, RepoRef, VerificationStats
from cloud.logic.checkpoint import (
    VerifyCheckpoint,
    VerifyPlan,
    advance,
    checkpoint_name,
    plan_verification,
)
from cloud.logic.ports import ObjectStore, ObjectStoreError, ReportSink, RunStore
from cloud.logic.verification import (
    VerificationResult,
    mirror_run_record,
    record_verification,
    unverifiable_event,
    verification_event,
)
from cloud.logic.verify import (
    MirrorVerifier,
    VerificationOutcome,
    VerifyOptions,
    problems_report_key,
)


def _result_for(
    event: MirrorCompleted,
    outcome: VerificationOutcome,
    *,
    started_at: datetime,
    host: str | None,
    report_key: str | None = None,
    reused: bool = False,
) -> VerificationResult:
    return verification_event(
        outcome,
        repo=event.repo,
        destination=event.destination,
        mirror_run_id=event.run_id,
        manifest=event.manifest,
        started_at=started_at,
        host=host,
        trigger=f"{event.DETAIL_TYPE.value} {event.run_id}",
        report_key=report_key,
        new_snapshots=event.new_snapshots,
        mirror_stats=event.stats,
        forced_verified=reused,
    )


def verify_mirror(
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
    # Trust: an event naming another destination than its repository's is refused unread.
    refused = check_binding(event, runs, host=host)
    if refused is not None:
        return refused
    options = replace(options or VerifyOptions(), repo_guid=event.repo.guid)
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
    result = _result_for(event, outcome, started_at=started, host=host, report_key=report_key)
    record_verification(runs, result)
    return result


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

    The checkpoint is saved before this returns, whatever the outcome (a refused event,
    `cloud.app.binding`, leaves it untouched and reads nothing).
    """
    # Trust: an event naming another destination than its repository's is refused unread.
    refused = check_binding(event, runs, host=host, now=now)
    if refused is not None:
        return CheckpointedVerification(
            VerifyPlan("verify", reason="refused"), VerifyCheckpoint(), refused, 0, 0
        )
    options = replace(options, repo_guid=event.repo.guid)
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

    if plan.action == "reuse":
        assert before is not None
        result: VerificationResult = _result_for(
            event,
            VerificationOutcome(
                header=None,
                manifest_sha256=event.manifest.sha256,
                stats=VerificationStats(reused=True),
            ),
            started_at=now,
            host=host,
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
    result = _result_for(event, outcome, started_at=now, host=host, report_key=report_key)
    record_verification(runs, result)
    return CheckpointedVerification(
        plan, after, result, outcome.unproven_objects, outcome.unproven_bytes
    )


def verify_manifest(
    key: str,
    *,
    expected_sha256: str | None,
    repo: RepoRef,
    destination: Destination,
    store: ObjectStore,
    runs: RunStore,
    reports: ReportSink,
    options: VerifyOptions,
    started_at: datetime,
    run_id: str | None = None,
) -> VerificationResult:
    """Verify the mirror against the manifest `key` (the `verify` command), record it and
    store the problem report; `ObjectStoreError` when the bucket cannot be read."""
    outcome = MirrorVerifier(store, destination, options).verify(key, expected_sha256)
    header = outcome.header
    result = verification_event(
        outcome,
        repo=repo,
        destination=destination,
        mirror_run_id=header.run_id if header else (run_id or "unknown"),
        manifest=ManifestRef(
            key=key,
            sha256=outcome.manifest_sha256 or "0" * 64,
            objects=header.objects if header else 0,
            created_by_run=header.run_id if header else (run_id or "unknown"),
        ),
        started_at=started_at,
        trigger="verify command",
        report_key=problems_report_key(key) if outcome.report else None,
    )
    if outcome.report:
        reports.put(problems_report_key(key), outcome.report)
    record_verification(runs, result)
    return result

"""Verify a mirror: the Lambda's one-shot pass (`verify_mirror`), local mode's
checkpointed passes (`verify_checkpointed`), and the `verify` command's check of one
manifest (`verify_manifest_resumable`). Each records the mirror run and the verification in the run
store and returns the result event for its shell to publish or print."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

from cloud.app.binding import check_binding
from cloud.contracts.destination import Destination
from cloud.contracts.events import ManifestRef, MirrorCompleted, RepoRef, VerificationStats
from cloud.logic.checkpoint import (
    PROVEN_ALL,
    ManifestCursor,
    PassResult,
    VerifyCheckpoint,
    VerifyPlan,
    advance,
    checkpoint_name,
    cursor_name,
    plan_verification,
)
from cloud.logic.ports import (
    ContinuationQueue,
    ObjectStore,
    ObjectStoreError,
    ReportSink,
    RunStore,
)
from cloud.logic.verification import (
    VerificationResult,
    mirror_run_record,
    record_verification,
    unverifiable_event,
    verification_event,
)
from cloud.logic.verify import (
    MirrorVerifier,
    PassProgress,
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
    # Another chain took the checkpoint over while this pass ran (Lambda): nothing saved.
    superseded: bool = False
    new_bytes_read: int = 0  # by the pass: the chain's next leg has that much less budget

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
    chain: tuple[str, int] | None = None,
    unreadable_raises: bool = False,
    rotation_days: float | None = None,
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

    The checkpoint is saved before this returns, whatever the outcome, and while the pass
    runs every `options.progress_every_objects` objects / `progress_every_bytes` bytes read
    (the lowest key still in flight: a killed pass loses at most that chunk of reads).

    `chain` (the Lambda's continuation chain: run id, leg) claims the checkpoint for this
    pass; when another chain claims it meanwhile, this pass stops and saves nothing more
    (`superseded`); the chain's legs share `options.new_bytes_budget` — a leg gets what
    the earlier legs' reads of new objects left of it (docs/verification.md, "Sizing").
    `unreadable_raises`: an unreadable destination raises ObjectStoreError
    (the Lambda retries through SQS) instead of giving an `unverifiable` verdict. A refused
    event (`cloud.app.binding`) leaves the checkpoint untouched and reads nothing.
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
        rotation_days=rotation_days,
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
    saver = _ProgressSaver(runs, repo_key, name, before, plan, event, now, chain)
    if chain is not None:
        saver.claim()
    user_stop = options.should_stop
    budget = options.new_bytes_budget
    if budget is not None:
        budget = max(budget - saver.tally[2], 0)  # per verification, not per leg
    pass_options = replace(
        options,
        new_bytes_budget=budget,
        resume_from=plan.resume_from,
        carried=plan.carried,
        rotation_bytes=plan.rotation_bytes,
        rotation_from=plan.rotation_from,
        rotate_uploaded=plan.rotate_uploaded,
        should_stop=lambda: saver.superseded or (user_stop is not None and user_stop()),
        on_progress=saver.save,
    )
    try:
        outcome = MirrorVerifier(store, event.destination, pass_options).verify(
            event.manifest.key, event.manifest.sha256
        )
    except ObjectStoreError as exc:
        if unreadable_raises:
            raise
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
    after = saver.owned(after)
    if not saver.still_mine():
        return CheckpointedVerification(
            plan, after, None, outcome.unproven_objects, outcome.unproven_bytes, superseded=True
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
            new_bytes_read=outcome.new_bytes_read,
        )
    report_key = None
    if outcome.report is not None and reports is not None:
        report_key = reports.put(problems_report_key(event.manifest.key), outcome.report)
    outcome.stats = outcome.stats.model_copy(
        update={
            "unproven_objects": outcome.unproven_objects,
            "unproven_bytes": outcome.unproven_bytes,
            # A Lambda chain's verdict counts the reads of its earlier legs too.
            "deep_checked": outcome.stats.deep_checked + saver.tally[0],
            "bytes_read": outcome.stats.bytes_read + saver.tally[1],
            "deep_checked_new": outcome.stats.deep_checked_new + saver.tally[3],
        }
    )
    result = _result_for(event, outcome, started_at=now, host=host, report_key=report_key)
    record_verification(runs, result)
    return CheckpointedVerification(
        plan,
        after,
        result,
        outcome.unproven_objects,
        outcome.unproven_bytes,
        new_bytes_read=outcome.new_bytes_read,
    )


class NoProgressError(RuntimeError):
    """A Lambda leg ran out of time before its first read: continuing would loop."""


@dataclass
class LegOutcome:
    """What one Lambda invocation (a leg of the chain) did with a verification.

    `result`: the verdict to publish (complete, or a problem found); `continued`: the leg
    handed on to when this one ran out of time; `ended`: why the chain ends without a
    verdict (a newer event's verification took the work over)."""

    result: VerificationResult | None = None
    continued: int | None = None
    ended: str | None = None
    checked: CheckpointedVerification | None = None


def verify_leg(
    event: MirrorCompleted,
    leg: int,
    *,
    store: ObjectStore,
    runs: RunStore,
    reports: ReportSink | None,
    continuations: ContinuationQueue,
    options: VerifyOptions,
    every_seconds: float,
    rotation_budget: int,
    host: str | None = None,
    now: datetime | None = None,
    rotation_days: float | None = None,
) -> LegOutcome:
    """One leg of the Lambda's checkpointed verification (leg 0: the agent's event).

    The pass stops when `options.should_stop` says so (the invocation's remaining time);
    its progress is in the checkpoint, the next leg is claimed there and then queued. A
    leg the checkpoint has moved past (a redelivery) only queues the claimed leg again —
    the queue's idempotency absorbs the duplicate — so no second chain starts; a leg whose
    chain another event's verification took over ends (that one carries its work).
    """
    name = checkpoint_name(event.destination)
    current = VerifyCheckpoint.from_dict(runs.load_checkpoint(event.repo.key, name))
    if current is not None and current.chain == event.run_id and current.leg > leg:
        continuations.send(event, current.leg)
        return LegOutcome(continued=current.leg)
    if leg > 0 and (current is None or current.chain != event.run_id):
        return LegOutcome(ended="a newer verification of this mirror carries on its work")
    checked = verify_checkpointed(
        event,
        store=store,
        runs=runs,
        reports=reports,
        options=options,
        every_seconds=every_seconds,
        rotation_budget=rotation_budget,
        now=now,
        host=host,
        chain=(event.run_id, leg),
        unreadable_raises=True,
        rotation_days=rotation_days,
    )
    if checked.superseded:
        return LegOutcome(ended="a newer verification took the work over", checked=checked)
    if checked.result is not None:
        return LegOutcome(result=checked.result, checked=checked)
    stats = checked.stats or VerificationStats()
    if stats.deep_checked == 0:
        raise NoProgressError(
            f"leg {leg} of the verification of {event.run_id} stopped before reading any "
            "object: the invocation's time less the safety margin does not cover fetching "
            "the manifest and listing the mirror (raise the function's timeout or lower "
            "VERIFY_SAFETY_MARGIN_SECONDS); not continuing, so SQS retries and then moves "
            "the event to the dead-letter queue"
        )
    following = leg + 1
    runs.save_checkpoint(
        event.repo.key,
        name,
        replace(
            checked.checkpoint,
            chain=event.run_id,
            leg=following,
            chain_objects=checked.checkpoint.chain_objects + stats.deep_checked,
            chain_bytes=checked.checkpoint.chain_bytes + stats.bytes_read,
            chain_new_bytes=checked.checkpoint.chain_new_bytes + checked.new_bytes_read,
            chain_new_objects=checked.checkpoint.chain_new_objects + stats.deep_checked_new,
        ).to_dict(),
    )
    continuations.send(event, following)
    return LegOutcome(continued=following, checked=checked)


class _ProgressSaver:
    """Saves the checkpoint while a pass runs, and keeps a chain's claim on it."""

    def __init__(
        self,
        runs: RunStore,
        repo_key: str,
        name: str,
        before: VerifyCheckpoint | None,
        plan: VerifyPlan,
        event: MirrorCompleted,
        now: datetime,
        chain: tuple[str, int] | None,
    ) -> None:
        self.runs, self.repo_key, self.name = runs, repo_key, name
        self.before, self.plan, self.event, self.now, self.chain = before, plan, event, now, chain
        self.superseded = False
        # What this chain's earlier legs read: objects, bytes, new objects' bytes, new
        # objects (a new chain starts from nothing).
        same_chain = chain is not None and before is not None and before.chain == chain[0]
        self.tally = (
            (
                before.chain_objects,
                before.chain_bytes,
                before.chain_new_bytes,
                before.chain_new_objects,
            )
            if same_chain and before
            else (0, 0, 0, 0)
        )

    def owned(self, checkpoint: VerifyCheckpoint) -> VerifyCheckpoint:
        """`checkpoint` marked as this chain's (unchanged outside the Lambda)."""
        if self.chain is None:
            return checkpoint
        return replace(
            checkpoint,
            chain=self.chain[0],
            leg=self.chain[1],
            chain_objects=self.tally[0],
            chain_bytes=self.tally[1],
            chain_new_bytes=self.tally[2],
            chain_new_objects=self.tally[3],
        )

    def claim(self) -> None:
        claimed = self.owned(self.before or VerifyCheckpoint())
        self.runs.save_checkpoint(self.repo_key, self.name, claimed.to_dict())

    def still_mine(self) -> bool:
        """False once another chain (or a later leg) has claimed the checkpoint. A load
        before each save, not a conditional write: two chains may overlap by one chunk."""
        if self.chain is None or self.superseded:
            return not self.superseded
        current = VerifyCheckpoint.from_dict(self.runs.load_checkpoint(self.repo_key, self.name))
        if current is None or (current.chain, current.leg) != self.chain:
            self.superseded = True
        return not self.superseded

    def save(self, progress: PassProgress) -> None:
        if progress.problems or not self.still_mine():
            return  # a problem restarts the manifest: the pass's end saves that
        partial = PassResult.so_far(
            progress.unproven_from, progress.rotation_next, progress.rotated, self.before
        )
        after = advance(
            self.before,
            self.plan,
            partial,
            manifest_key=self.event.manifest.key,
            manifest_sha256=self.event.manifest.sha256,
            now=self.now,
        )
        self.runs.save_checkpoint(self.repo_key, self.name, self.owned(after).to_dict())


def _manifest_result(
    key: str,
    outcome: VerificationOutcome,
    *,
    repo: RepoRef,
    destination: Destination,
    reports: ReportSink,
    runs: RunStore,
    started_at: datetime,
    run_id: str | None,
) -> VerificationResult:
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


@dataclass
class ManifestVerification:
    """One call of the `verify` command: the verdict, or (`result` None) the time limit
    came first and the progress is saved for the next call."""

    result: VerificationResult | None
    objects_read: int  # by this call and the earlier ones of the same verification
    bytes_read: int
    unread_objects: int  # still to read (new objects, rotation slice, --deep share)
    unread_bytes: int
    calls: int


def verify_manifest_resumable(
    key: str,
    *,
    expected_sha256: str | None,
    repo: RepoRef,
    destination: Destination,
    store: ObjectStore,
    runs: RunStore,
    reports: ReportSink,
    options: VerifyOptions,
    deep: str,
    started_at: datetime,
    run_id: str | None = None,
) -> ManifestVerification:
    """Verify the mirror against the manifest `key` (the `verify` command), record it and
    store the problem report, continued from where an earlier call's time limit stopped it;
    `ObjectStoreError` when the bucket cannot be read.

    The cursor (`ManifestCursor`, in the run store) is used when it is about the same
    manifest and `deep` spec; a call stopped by `options.should_stop` saves it and returns
    no verdict; a call that finishes or finds a problem clears it and returns the verdict,
    with the reads of every call counted in its stats.
    """
    name = cursor_name(destination)
    # A listing-only call (`--list-only`) reads nothing back: it neither continues the
    # cursor of a `--time-limit` call nor ends it (the next full call carries on).
    saved_cursor = runs.load_checkpoint(repo.key, name) if options.read_back else None
    cursor = ManifestCursor.from_dict(saved_cursor)
    if cursor is None or cursor.manifest_key != key or cursor.deep != deep:
        cursor = ManifestCursor(
            manifest_key=key,
            manifest_sha256=expected_sha256 or "",
            rotation_index=options.rotation_index,
            deep=deep,
            read_from="",
        )
    expected = expected_sha256 or cursor.manifest_sha256 or None
    call_options = replace(
        options,
        rotation_index=cursor.rotation_index,
        read_from=cursor.read_from,
        resume_from=cursor.read_from,
    )
    outcome = MirrorVerifier(store, destination, call_options).verify(key, expected)
    objects = cursor.objects_read + outcome.stats.deep_checked
    size = cursor.bytes_read + outcome.stats.bytes_read
    new_read = cursor.new_read + outcome.stats.deep_checked_new
    # (Complete as far as the checkpoint goes, a pass may still have skipped an older
    # object's read at the limit: `read_from` says so.)
    unfinished = not outcome.complete or outcome.read_from != PROVEN_ALL
    if unfinished and outcome.problems_total == 0 and not options.read_back:
        # A listing-only call stopped early read nothing: no cursor (one would say the
        # keys before the stop were read back), and no verdict (the comparison is partial).
        return ManifestVerification(
            None, 0, 0, outcome.unread_objects, outcome.unread_bytes, cursor.calls + 1
        )
    if unfinished and outcome.problems_total == 0:
        saved = replace(
            cursor,
            manifest_sha256=outcome.manifest_sha256 or cursor.manifest_sha256,
            read_from=max(cursor.read_from, outcome.read_from),
            objects_read=objects,
            bytes_read=size,
            calls=cursor.calls + 1,
            new_read=new_read,
        )
        runs.save_checkpoint(repo.key, name, saved.to_dict())
        return ManifestVerification(
            None, objects, size, outcome.unread_objects, outcome.unread_bytes, saved.calls
        )
    if cursor.calls:
        runs.save_checkpoint(repo.key, name, {})  # done: the next verify starts afresh
    outcome.stats = outcome.stats.model_copy(
        update={"deep_checked": objects, "deep_checked_new": new_read, "bytes_read": size}
    )
    result = _manifest_result(
        key, outcome, repo=repo, destination=destination, reports=reports, runs=runs,
        started_at=started_at, run_id=run_id,
    )  # fmt: skip
    return ManifestVerification(result, objects, size, 0, 0, cursor.calls + 1)

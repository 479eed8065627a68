"""A large verification, split into chunks that parallel Lambda invocations prove.

`fan_out` (called by the verify function for a `Mirror Completed` above the threshold)
plans the chunks over the manifest's key space, records the job and queues one work item
per chunk. `verify_chunk` (the chunk function) proves one chunk, stores its result once,
counts it done once, and whoever completes the last chunk adds the chunks up and
publishes the one result. Design and guarantees: docs/verification.md ("Fan-out").
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import IO, Any

from cloud.contracts.destination import Destination
from cloud.contracts.events import (
    MirrorCompleted,
    MirrorVerificationFailed,
    MirrorVerified,
    Source,
    parse_detail,
)
from cloud.contracts.fanout import ChunkWorkItem
from cloud.contracts.manifest import ManifestEntry, ManifestHeader
from cloud.logic.binding import Binding, decide
from cloud.logic.chunks import (
    FanoutSettings,
    UnsortedKeysError,
    boundaries,
    chunk_count,
    new_share,
    read_weight,
    should_fan_out,
)
from cloud.logic.fanout import ChunkResult, FanoutJob, combine, job_id
from cloud.logic.ports import (
    FanoutStore,
    ObjectNotFoundError,
    ObjectStore,
    ReportSink,
    RunStore,
)
from cloud.logic.verification import (
    VerificationResult,
    mirror_run_record,
    record_verification,
    verification_event,
)
from cloud.logic.verify import MirrorVerifier, VerifyOptions, problems_report_key

OpenDestination = Callable[[Destination], tuple[ObjectStore, ReportSink | None]]


class FanoutJobMissingError(RuntimeError):
    """A work item names a job the run store does not hold (expired, or another stack's)."""


@dataclass(frozen=True)
class FanoutPlan:
    job_id: str
    chunks: int
    sent: int  # work items sent by this call (0: a redelivery found them sent)


# -- the verify function: plan and queue ---------------------------------------------------


def estimated_read(event: MirrorCompleted, options: VerifyOptions, settings: FanoutSettings) -> int:
    """What one pass is expected to read, from the event alone (no request): the new
    bytes (within the budget), the rotation's share of the older ones, and the
    per-object cost."""
    new = event.stats.uploaded_bytes
    if options.new_bytes_budget is not None:
        new = min(new, options.new_bytes_budget)
    older = max(event.stats.bytes - event.stats.uploaded_bytes, 0)
    return (
        new
        + older // max(options.rotation_runs, 1)
        + event.manifest.objects * settings.per_object_bytes
    )


def fan_out(
    event: MirrorCompleted,
    *,
    store: ObjectStore,
    runs: RunStore,
    jobs: FanoutStore,
    send: Callable[[Sequence[ChunkWorkItem]], None],
    settings: FanoutSettings,
    options: VerifyOptions,
    now: datetime | None = None,
) -> FanoutPlan | None:
    """Queue the verification of `event` as chunks; None when it is left to one pass.

    Left to one pass: an event the repository's binding refuses (the pass refuses it
    unread), a mirror below the thresholds (decided from the event, without a
    request to the bucket), one whose manifest plans a single chunk, and a manifest that
    cannot be planned from (missing, not what the event promised, unreadable, unsorted) —
    the one pass then reports why, as always.
    Idempotent: a redelivered event reuses the job (and its chunks) it planned first and
    sends nothing once every work item was sent. `ObjectStoreError` propagates (the
    record is retried).
    """
    jid = job_id(event.run_id, event.manifest.key, event.manifest.sha256)
    stored = jobs.load_job(jid)  # first: once fanned out, always (settings may change)
    if stored is None:
        if decide(Binding.from_dict(runs.load_binding(event.repo.key)), event).refused:
            return None  # the one pass refuses it, reading nothing (`cloud.app.binding`)
        if not should_fan_out(
            event.manifest.objects, estimated_read(event, options, settings), settings
        ):
            return None
        planned = _plan(event, store, settings, options)
        if planned is None:
            return None
        cuts, chunks = planned
        if chunks == 1:
            return None  # the manifest says it fits one pass after all
        budget = options.new_bytes_budget
        job = FanoutJob(
            job_id=jid,
            repo_key=event.repo.key,
            event=event.model_dump(mode="json"),
            cuts=tuple(cuts),
            rotation_index=runs.verification_count(event.repo.key),
            rotation_runs=options.rotation_runs,
            new_bytes_budget=None if budget is None else budget // chunks,
            created_at=(now or datetime.now(UTC)).isoformat(),
        )
        stored = jobs.create_job(jid, job.to_dict())
    job = FanoutJob.from_dict(stored)
    count = len(job.chunks)
    if job.dispatched:
        return FanoutPlan(jid, count, 0)
    runs.record(mirror_run_record(event))
    send([ChunkWorkItem(job_id=jid, index=i, chunks=count) for i in range(count)])
    jobs.mark_dispatched(jid)
    return FanoutPlan(jid, count, count)


def _plan(
    event: MirrorCompleted, store: ObjectStore, settings: FanoutSettings, options: VerifyOptions
) -> tuple[list[str], int] | None:
    """The chunk boundaries, from three streaming passes over the manifest (no list of it
    in memory: the new bytes, the total weight, the cuts); None when the manifest cannot
    be planned from. New objects weigh the budget's share of them (`new_share`), so the
    chunk count follows what the verification will read, not the mirror's size."""
    with tempfile.TemporaryFile() as manifest:
        try:
            sha = _download(store, event.manifest.key, manifest)
        except ObjectNotFoundError:
            return None
        if sha != event.manifest.sha256:
            return None

        def entries() -> Iterator[ManifestEntry]:
            manifest.seek(0)
            yield from _entries(manifest)

        def weighted(share: float) -> Iterator[tuple[str, int]]:
            for entry in entries():
                weight = read_weight(
                    entry.size,
                    entry.uploaded,
                    rotation_runs=options.rotation_runs,
                    per_object=settings.per_object_bytes,
                    new_share=share,
                )
                yield entry.key, weight

        budget = options.new_bytes_budget
        try:
            new_bytes, largest_new = 0, 0
            for entry in entries():
                if entry.uploaded:
                    new_bytes += entry.size
                    largest_new = max(largest_new, entry.size)
            share = new_share(new_bytes, budget)
            total = sum(weight for _, weight in weighted(share))
            count = chunk_count(total, settings, budget=budget, largest_new=largest_new)
            cuts = boundaries(weighted(share), total, count)
        except (OSError, EOFError, ValueError, UnsortedKeysError):
            return None
    return cuts, len(cuts) + 1


def _download(store: ObjectStore, key: str, out: IO[bytes]) -> str:
    sha = hashlib.sha256()
    for chunk in store.read(key):
        sha.update(chunk)
        out.write(chunk)
    return sha.hexdigest()


def _entries(manifest: IO[bytes]) -> Iterator[ManifestEntry]:
    stream = gzip.GzipFile(fileobj=manifest, mode="rb")
    ManifestHeader.model_validate_json(stream.readline())
    for line in stream:
        if line.strip():
            yield ManifestEntry.model_validate_json(line)


# -- the chunk function: prove one chunk, the last one publishes ---------------------------


def chunk_report_key(manifest_key: str, index: int) -> str:
    """A chunk's own problem report, beside the combined one."""
    return (
        problems_report_key(manifest_key).removesuffix(".jsonl.gz") + f".part-{index:04d}.jsonl.gz"
    )


@dataclass(frozen=True)
class ChunkDone:
    """What one work item did: `verified` the chunk now (False: a redelivery of a chunk
    done before), how many chunks are done, and the result when this call completed the
    job (`published`: by this call)."""

    verified: bool
    done: int
    chunks: int
    result: VerificationResult | None = None
    published: bool = False


def verify_chunk(
    item: ChunkWorkItem,
    *,
    jobs: FanoutStore,
    runs: RunStore,
    open_destination: OpenDestination,
    publish: Callable[[VerificationResult], None],
    options: VerifyOptions,
    host: str | None = None,
) -> ChunkDone:
    """Prove chunk `item.index` of its job; the call that completes the last chunk adds
    them up, records the verification and publishes the result.

    Each step is idempotent, so a chunk killed half-way is simply redone by SQS's
    redelivery, alone: its result is stored once (the first wins) and counted once; the
    result event is stored once (one run id) and published by one claimer. A
    destination that cannot be read raises `ObjectStoreError` (the item is retried,
    then the chunk DLQ).
    """
    stored = jobs.load_job(item.job_id)
    if stored is None:
        raise FanoutJobMissingError(f"fan-out job {item.job_id} is not in the run store")
    job = FanoutJob.from_dict(stored)
    chunks = job.chunks
    if item.index >= len(chunks):
        raise ValueError(f"chunk {item.index} of job {item.job_id}, which has {len(chunks)}")
    done = len(job.done)
    if job.published:
        return ChunkDone(False, done, len(chunks))
    event = MirrorCompleted.model_validate(job.event)
    store, reports = open_destination(event.destination)
    verified = False
    if item.index not in job.done:
        chunk = chunks[item.index]
        chunk_options = replace(
            options,
            key_from=chunk.key_from,
            key_to=chunk.key_to,
            rotation_index=job.rotation_index,
            rotation_runs=job.rotation_runs,
            new_bytes_budget=job.new_bytes_budget,
        )
        outcome = MirrorVerifier(store, event.destination, chunk_options).verify(
            event.manifest.key, event.manifest.sha256
        )
        report_key = None
        if outcome.report is not None and reports is not None:
            report_key = reports.put(
                chunk_report_key(event.manifest.key, item.index), outcome.report
            )
        result = ChunkResult.of(item.index, outcome, report_key)
        done = jobs.complete_chunk(item.job_id, item.index, result.to_dict())
        verified = True
    if done < len(chunks):
        return ChunkDone(verified, done, len(chunks))
    final, published = _finish(job, event, jobs, runs, store, reports, publish, item, host)
    return ChunkDone(verified, done, len(chunks), final, published)


def _finish(
    job: FanoutJob,
    event: MirrorCompleted,
    jobs: FanoutStore,
    runs: RunStore,
    store: ObjectStore,
    reports: ReportSink | None,
    publish: Callable[[VerificationResult], None],
    item: ChunkWorkItem,
    host: str | None,
) -> tuple[VerificationResult, bool]:
    """Add the chunks up, store the result once, record it, publish it once."""
    stored = jobs.load_job(job.job_id)
    saved = None if stored is None else stored.get("result")
    if saved is None:
        results = [ChunkResult.from_dict(r) for r in jobs.chunk_results(job.job_id)]
        combined = combine(results, len(job.chunks), event.manifest.key)
        report_key = _join_reports(store, reports, combined.report_keys, event.manifest.key)
        result = verification_event(
            combined.outcome,
            repo=event.repo,
            destination=event.destination,
            mirror_run_id=event.run_id,
            manifest=event.manifest,
            started_at=datetime.fromisoformat(job.created_at),
            host=host,
            trigger=f"{event.DETAIL_TYPE.value} {event.run_id}",
            report_key=report_key,
            new_snapshots=event.new_snapshots,
            mirror_stats=event.stats,
        )
        saved = jobs.save_result(
            job.job_id,
            {"detail_type": result.DETAIL_TYPE.value, "detail": result.model_dump(mode="json")},
        )
    final = _result_from(saved)
    record_verification(runs, final)  # idempotent on the result's run id
    if stored is not None and stored.get("published"):
        return final, False
    if not jobs.claim_publication(job.job_id, f"chunk-{item.index}"):
        return final, False  # another chunk's invocation publishes it
    publish(final)
    jobs.mark_published(job.job_id)
    return final, True


def _result_from(saved: dict[str, Any]) -> VerificationResult:
    detail = parse_detail(Source.VERIFIER.value, saved["detail_type"], saved["detail"])
    assert isinstance(detail, MirrorVerified | MirrorVerificationFailed)
    return detail


def _join_reports(
    store: ObjectStore, reports: ReportSink | None, keys: list[str], manifest_key: str
) -> str | None:
    """The chunks' reports as one (gzip members concatenate into one gzip stream); best
    effort like any report: the verdict never depends on it."""
    if not keys or reports is None:
        return None
    if len(keys) == 1:
        return keys[0]
    parts: list[bytes] = []
    with contextlib.suppress(Exception):
        for key in keys:
            parts.append(b"".join(store.read(key)))
        return reports.put(problems_report_key(manifest_key), b"".join(parts))
    return keys[0]

"""The `upload` command put together: config → lock → state → backend → MirrorRun →
manifest → event.

Kept apart from the CLI so tests, the demo and the local pipeline run exactly what the
hook runs.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from cloud.contracts.events import (
    ErrorKind,
    EventDetail,
    ManifestRef,
    MirrorVerified,
    RepoRef,
    VerificationStats,
)
from local_agent.config import RelayConfig
from local_agent.errors import ExitCode, RelayError
from local_agent.events.completion import RunContext, completed_event, failed_event
from local_agent.events.manifest import ManifestWriter
from local_agent.events.outbox import FlushResult, Outbox
from local_agent.events.pipeline import make_publisher
from local_agent.events.publishers import Publisher
from local_agent.identity import ResolvedRepo
from local_agent.mirror.backend import Backend
from local_agent.mirror.deadline import StopSignal, start_hard_stop
from local_agent.mirror.repository import ensure_repository
from local_agent.mirror.run import MirrorOptions, MirrorRun, MirrorSummary
from local_agent.mirror.runlock import RunLock
from local_agent.mirror.state import LAST_MANIFEST as LAST_MANIFEST  # re-exported
from local_agent.mirror.state import StateStore, state_file_name
from local_agent.report.progress import Progress

log = logging.getLogger(__name__)


def run_upload(
    config: RelayConfig,
    repo: ResolvedRepo,
    *,
    trigger: str = "manual",
    dry_run: bool = False,
    reconcile: bool = False,
    interactive: bool = False,
    show_progress: bool = True,
    publisher: Publisher | None = None,
    clock: Callable[[], float] = time.time,
) -> MirrorSummary:
    """One upload run; `clock` decides when deferred deletions fall due (tests pass their
    own)."""
    repo_path, repo_id, repo_guid = repo.path, repo.repo_id, repo.guid
    destination = config.destination_for(repo_id=repo_id, repo_guid=repo_guid)
    ctx = RunContext(
        repo=RepoRef(id=repo_id, guid=repo_guid, path=str(repo_path)),
        trigger=trigger,
        destination=destination,
    )
    options = MirrorOptions(
        repo_path=repo_path,
        destination=destination,
        upload=config.upload,
        dry_run=dry_run,
        reconcile=reconcile,
        run_id=ctx.run_id,
        object_lock=(
            config.destination.object_lock.policy() if config.destination.object_lock else None
        ),
    )
    upload = config.upload
    state_dir = config.state.path()
    stop = StopSignal(upload.deadline_seconds)
    hard_stop = start_hard_stop(upload.deadline_seconds)
    restore_sigterm = _stop_on_sigterm(stop)
    identity = repo_guid or str(repo_path.resolve())
    state_path = state_dir / state_file_name(destination, identity)
    # One upload per destination prefix at a time, whatever identity the caller gave the
    # repository (with or without --repo-guid): two runs into one prefix must never
    # interleave, or one could abort the other's multipart upload as a stray.
    lock = RunLock(state_dir / state_file_name(destination, "").replace(".sqlite", ".lock"))
    access = config.destination.access()
    backend = Backend(
        access,
        destination,
        max_pool_connections=upload.concurrency + 2,
        direct_put=upload.direct_put,
    )
    progress = Progress(sys.stderr, tty=interactive) if show_progress else None
    publisher = publisher or make_publisher(config, state_dir)
    _bind_pipeline(publisher, stop, show_progress=show_progress, interactive=interactive)
    pipeline = getattr(publisher, "pipeline", None)
    if pipeline is not None and not dry_run:
        pipeline.run_started(ctx.run_id, repo_id, repo_guid)
    outbox: Outbox | None = None
    summary: MirrorSummary
    try:
        if not dry_run:
            outbox = Outbox(state_dir / "outbox.sqlite")
            _send_backlog(outbox, publisher, summary=None)
        ensure_repository(repo_path)
        # Where the manifest goes is a config matter: refuse it before the first request,
        # not after the whole mirror was uploaded.
        config.manifest_prefix_for(repo_id=repo_id, repo_guid=repo_guid)
        if not dry_run:
            lock.acquire(min(upload.lock_wait_seconds, upload.deadline_seconds))
        state = StateStore(None if dry_run and not state_path.exists() else state_path)
        try:
            run = MirrorRun(options, backend, state, stop=stop, progress=progress, clock=clock)
            if progress:
                progress.start()
            try:
                summary = run.execute()
            finally:
                if progress:
                    progress.close()
            if not dry_run and summary.exit_code == 0:
                _attach_manifest(config, state, backend, ctx, summary)
        finally:
            state.close()
    except RelayError as exc:
        summary = MirrorSummary(
            status="failed",
            exit_code=int(exc.exit_code),
            repo_path=str(repo_path),
            destination=destination.model_dump(),
            dry_run=dry_run,
            error={"kind": exc.kind, "message": exc.message},
        )
    except BaseException:
        hard_stop.cancel()  # an in-process caller must not be killed later by the timer
        restore_sigterm()
        raise
    finally:
        lock.release()
        backend.close()
    summary.run_id = ctx.run_id
    try:
        _publish(outbox, publisher, ctx, summary)
    finally:
        # Local verification runs inside the same deadline as the upload.
        hard_stop.cancel()
        restore_sigterm()
    return summary


def _stop_on_sigterm(stop: StopSignal) -> Callable[[], None]:
    """SIGTERM (Backrest, its container or the sidecar stopping) ends the run as its
    deadline would: uploads and the read-back stop, and what was proven is checkpointed
    (exit 6) instead of being lost with the process. Returns what restores the handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.expire_now()
        start_hard_stop(0, grace=30)  # a request hanging now must not keep the process

    previous = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _bind_pipeline(
    publisher: Publisher, stop: StopSignal, *, show_progress: bool, interactive: bool
) -> None:
    """Local mode: verification stops at the upload's deadline and shows progress too."""
    pipeline = getattr(publisher, "pipeline", None)
    if pipeline is None:
        return
    pipeline.should_stop = stop.deadline_passed
    if show_progress:
        pipeline.make_progress = lambda: Progress(sys.stderr, tty=interactive)


def _publish(
    outbox: Outbox | None, publisher: Publisher, ctx: RunContext, summary: MirrorSummary
) -> None:
    if outbox is not None:
        event: EventDetail
        if summary.exit_code == 0 and summary.manifest is not None:
            event = completed_event(ctx, summary, ManifestRef.model_validate(summary.manifest))
        else:
            error = summary.error or {"kind": "unexpected", "message": "unknown failure"}
            event = failed_event(ctx, kind=error["kind"], message=error["message"], summary=summary)
        outbox.add(event)
        _send_backlog(outbox, publisher, summary=summary)
        outbox.close()
        summary.verification = _local_verdict(publisher, ctx.run_id)
        if (
            summary.verification is not None
            and summary.verification["pending"]
            and summary.exit_code == 0
        ):
            # The mirror is done, its proof is not: exit 6 "deadline reached, progress saved".
            summary.exit_code = int(ExitCode.DEADLINE)
            summary.status = "verification-pending"


def _local_verdict(publisher: Publisher, run_id: str) -> dict[str, Any] | None:
    """The in-process verification of this run, when local mode ran one."""
    pipeline = getattr(publisher, "pipeline", None)
    checked = getattr(pipeline, "passes", {}).get(run_id)
    if checked is None:
        return None
    result = checked.result
    if result is None:
        return {
            "verified": False,
            "complete": False,
            "pending": True,
            "reused": False,
            "unproven_objects": checked.unproven_objects,
            "unproven_bytes": checked.unproven_bytes,
            "run_id": None,
            "stats": (checked.stats or VerificationStats()).model_dump(),
            "problems_total": 0,
            "problems": [],
            "report_key": None,
        }
    return {
        "verified": isinstance(result, MirrorVerified),
        "complete": checked.unproven_objects == 0
        and not any(p.kind == "unverifiable" for p in result.problems),
        "pending": False,
        "reused": result.stats.reused,
        "unproven_objects": checked.unproven_objects,
        "unproven_bytes": checked.unproven_bytes,
        "run_id": result.run_id,
        "stats": result.stats.model_dump(),
        "problems_total": result.problems_total,
        "problems": [p.model_dump() for p in result.problems],
        "report_key": result.report_key,
    }


def _attach_manifest(
    config: RelayConfig,
    state: StateStore,
    backend: Backend,
    ctx: RunContext,
    summary: MirrorSummary,
) -> None:
    """Write a new manifest, or point at the last one when the run changed nothing."""
    changed = (
        summary.stats.uploaded_files
        or summary.stats.deleted_files
        or summary.stats.adopted_files
        or summary.listed_objects is not None
        or state.has_unmanifested()  # an earlier run uploaded them, then stopped
        # A fresh manifest carries a fresh lock: the newest state stays recoverable.
        or summary.retention_extended
    )
    previous = state.get_meta(LAST_MANIFEST)
    if not changed and previous:
        summary.manifest = json.loads(previous)
        return
    prefix = config.manifest_prefix_for(repo_id=ctx.repo.id, repo_guid=ctx.repo.guid)
    try:
        ref = ManifestWriter(backend, state).write(
            run_id=ctx.run_id,
            manifest_prefix=prefix,
            repo_id=ctx.repo.id,
            repo_guid=ctx.repo.guid,
        )
    except RelayError as exc:
        summary.status = "failed"
        summary.exit_code = int(exc.exit_code)
        summary.error = {"kind": exc.kind, "message": f"mirror done, manifest not: {exc.message}"}
        return
    summary.stats.requests = backend.requests
    summary.manifest = ref.model_dump()
    state.set_meta(LAST_MANIFEST, ref.model_dump_json())


def _warn_unsent(result: FlushResult, publisher: Publisher) -> None:
    log.warning(
        "could not publish %d event(s) via %s (kept, sent on the next run): %s",
        result.pending,
        publisher.name,
        result.error,
    )


def _send_backlog(outbox: Outbox, publisher: Publisher, *, summary: MirrorSummary | None) -> None:
    result = outbox.flush(publisher)
    if summary is not None:
        summary.event = {
            "publisher": publisher.name,
            "sent": result.sent,
            "pending": result.pending,
            "error": result.error,
        }
    if result.error:
        _warn_unsent(result, publisher)
    elif result.sent and summary is None:
        log.info("sent %d event(s) left over from earlier runs", result.sent)


def report_failure(
    config: RelayConfig,
    *,
    repo_id: str | None,
    repo_guid: str | None,
    repo_path: str | None,
    trigger: str,
    kind: ErrorKind,
    message: str,
    publisher: Publisher | None = None,
) -> dict[str, object]:
    """Publish `Mirror Failed` for a run that never got to mirroring (Backrest's check
    failed, or the repository could not even be resolved). Goes through the outbox."""
    try:
        destination = config.destination_for(repo_id=repo_id, repo_guid=repo_guid)
    except RelayError:
        # The prefix needs a value we do not have; report the template rather than nothing.
        destination = config.destination_for(repo_id="{repo_id}", repo_guid="{repo_guid}")
    ctx = RunContext(
        repo=RepoRef(id=repo_id, guid=repo_guid, path=repo_path),
        trigger=trigger,
        destination=destination,
    )
    state_dir = config.state.path()
    publisher = publisher or make_publisher(config, state_dir)
    outbox = Outbox(state_dir / "outbox.sqlite")
    try:
        outbox.add(failed_event(ctx, kind=kind, message=message))
        result = outbox.flush(publisher)
    finally:
        outbox.close()
    if result.error:
        _warn_unsent(result, publisher)
    return {
        "run_id": ctx.run_id,
        "publisher": publisher.name,
        "sent": result.sent,
        "pending": result.pending,
        "error": result.error,
    }

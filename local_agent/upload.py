"""The `upload` command put together: config → lock → state → backend → MirrorRun.

Kept apart from the CLI so tests, the demo and later the local pipeline run exactly
what the hook runs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from cloud.integrations.s3 import make_s3_client
from local_agent.backend import Backend
from local_agent.config import RelayConfig
from local_agent.deadline import StopSignal, start_hard_stop
from local_agent.errors import RelayError
from local_agent.mirror import MirrorOptions, MirrorRun, MirrorSummary
from local_agent.progress import Progress
from local_agent.runlock import RunLock
from local_agent.state import StateStore, state_file_name

log = logging.getLogger(__name__)


def run_upload(
    config: RelayConfig,
    *,
    repo_path: Path,
    repo_id: str | None,
    repo_guid: str | None,
    dry_run: bool = False,
    reconcile: bool = False,
    interactive: bool = False,
    show_progress: bool = True,
) -> MirrorSummary:
    destination = config.destination_for(repo_id=repo_id, repo_guid=repo_guid)
    upload = config.upload
    options = MirrorOptions(
        repo_path=repo_path,
        destination=destination,
        concurrency=upload.concurrency,
        delete=upload.delete,
        max_delete_percent=upload.max_delete_percent,
        multipart_threshold=upload.multipart_threshold_bytes,
        part_size=upload.part_size_bytes,
        bandwidth_limit=upload.bandwidth_bytes_per_second,
        dry_run=dry_run,
        reconcile=reconcile,
    )
    stop = StopSignal(upload.deadline_seconds)
    hard_stop = start_hard_stop(upload.deadline_seconds)
    identity = repo_guid or str(repo_path.resolve())
    state_path = config.state.path() / state_file_name(destination, identity)
    lock = RunLock(state_path.with_suffix(".lock"))
    access = config.destination.access()
    backend = Backend(
        lambda: make_s3_client(access, max_pool_connections=upload.concurrency + 2), destination
    )
    progress = Progress(sys.stderr, tty=interactive) if show_progress else None
    try:
        if not dry_run:
            lock.acquire(min(upload.lock_wait_seconds, upload.deadline_seconds))
        state = StateStore(None if dry_run and not state_path.exists() else state_path)
        try:
            run = MirrorRun(options, backend, state, stop=stop, progress=progress)
            if progress:
                progress.start()
            try:
                return run.execute()
            finally:
                if progress:
                    progress.close()
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
        return summary
    finally:
        lock.release()
        hard_stop.cancel()

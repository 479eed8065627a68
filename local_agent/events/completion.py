"""Turning a run into its event: `Mirror Completed` or `Mirror Failed`."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cloud.contracts.destination import Destination
from cloud.contracts.events import (
    MAX_LISTED_PROBLEMS,
    MAX_LISTED_SNAPSHOTS,
    MAX_MESSAGE_CHARS,
    ErrorInfo,
    ErrorKind,
    ManifestRef,
    MirrorCompleted,
    MirrorFailed,
    MirrorStats,
    RepoRef,
)
from cloud.contracts.ids import new_run_id
from cloud.integrations.redact import REDACTOR
from local_agent.mirror.run import MirrorSummary


@dataclass(frozen=True)
class RunContext:
    """What is known about a run before it starts."""

    repo: RepoRef
    trigger: str
    destination: Destination
    run_id: str = field(default_factory=new_run_id)
    host: str = field(default_factory=socket.gethostname)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def stats_of(summary: MirrorSummary) -> MirrorStats:
    """A frozen copy of the run's counters, as the event carries them."""
    return MirrorStats.model_validate(summary.stats.model_dump())


def _run_fields(ctx: RunContext) -> dict[str, Any]:
    """What every event of a run carries; the run finishes now."""
    return {
        "run_id": ctx.run_id,
        "repo": ctx.repo,
        "host": ctx.host,
        "trigger": ctx.trigger,
        "destination": ctx.destination,
        "started_at": ctx.started_at,
        "finished_at": datetime.now(UTC),
    }


def completed_event(
    ctx: RunContext, summary: MirrorSummary, manifest: ManifestRef
) -> MirrorCompleted:
    return MirrorCompleted(
        **_run_fields(ctx),
        stats=stats_of(summary),
        manifest=manifest,
        new_snapshots=sorted(summary.new_snapshots)[:MAX_LISTED_SNAPSHOTS],
        new_snapshots_total=len(summary.new_snapshots),
    )


def failed_event(
    ctx: RunContext, *, kind: ErrorKind, message: str, summary: MirrorSummary | None = None
) -> MirrorFailed:
    text = REDACTOR(message)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return MirrorFailed(
        **_run_fields(ctx),
        stats=stats_of(summary) if summary is not None and summary.stats.files else None,
        error=ErrorInfo(kind=kind, message=text),
        corrupt_files=(summary.corrupt if summary else [])[:MAX_LISTED_PROBLEMS],
    )

"""What a verification produces: the result events and the run records (the use cases
that run a verification are in `cloud.app.verify`)."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from typing import Literal

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
from cloud.logic.binding import binding_of
from cloud.logic.ports import RunRecord, RunStore
from cloud.logic.verify import (
    VerificationOutcome,
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
    """Record the verification; a verified one binds its repository to where it was
    verified, unless the repository is bound already (`cloud.logic.binding`)."""
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
    if isinstance(result, MirrorVerified) and runs.load_binding(result.repo.key) is None:
        runs.bind(result.repo.key, binding_of(result).to_dict())


def unverifiable_event(
    event: MirrorCompleted, reason: str, *, started_at: datetime, host: str | None = None
) -> MirrorVerificationFailed:
    """ "Could not verify": the mirror may be fine, but nobody could look (a verdict of its
    own, so it is announced and the queue moves on instead of waiting silently)."""
    return _problem_event(
        event, "unverifiable", f"could not verify: {reason}", started_at=started_at, host=host
    )


def refused_event(
    event: MirrorCompleted, reason: str, *, started_at: datetime, host: str | None = None
) -> MirrorVerificationFailed:
    """ "Refused": the event names a destination its repository is not bound to. Nothing
    was read; an alert, never a verified run (docs/verification.md, "Trust model")."""
    return _problem_event(event, "binding", f"refused: {reason}", started_at=started_at, host=host)


def _problem_event(
    event: MirrorCompleted,
    kind: Literal["unverifiable", "binding"],
    detail: str,
    *,
    started_at: datetime,
    host: str | None,
) -> MirrorVerificationFailed:
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
        problems=[Problem(key=event.manifest.key, kind=kind, detail=detail[:500])],
        problems_total=1,
        new_snapshots=event.new_snapshots,
        mirror_stats=event.stats,
    )

"""The alarm for silence: a repository whose newest verified copy is too old.

No hook can report that backups stopped arriving — the host is off, Backrest stopped
checking, the hook was deleted. The watchdog looks at the run store on a schedule: a
repository whose latest verified run is older than its maximum age gets one
`Mirror Stale`, repeated every `repeat_every` while it stays stale. The next verified run
clears the alert and (through the notification policy) sends the recovery message.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cloud.contracts.destination import Destination
from cloud.contracts.events import MirrorStale, RepoRef
from cloud.contracts.ids import new_run_id
from cloud.logic.ports import RepoStatus, RunRecord, RunStore

DEFAULT_MAX_AGE = timedelta(hours=26)
DEFAULT_REPEAT = timedelta(hours=24)


@dataclass(frozen=True)
class StaleCheck:
    repo_key: str
    repo_id: str | None
    stale: bool
    age: timedelta | None
    max_age: timedelta
    last_verified_at: datetime | None


def assess(status: RepoStatus, now: datetime, max_age: timedelta) -> StaleCheck:
    """Is this repository stale? A repository never verified counts from its first run."""
    last = status.latest_verified
    if last is not None:
        age: timedelta | None = now - last.finished_at
        stale = age is not None and age > max_age
        return StaleCheck(status.repo_key, status.repo_id, stale, age, max_age, last.finished_at)
    reference = status.latest_run
    if reference is None:
        return StaleCheck(status.repo_key, status.repo_id, False, None, max_age, None)
    if reference.kind == "stale":
        # Never verified and already alerted: still stale (the alert is not a fresh run).
        return StaleCheck(status.repo_key, status.repo_id, True, None, max_age, None)
    since = now - reference.started_at
    return StaleCheck(status.repo_key, status.repo_id, since > max_age, None, max_age, None)


def _destination_of(
    status: RepoStatus, fallback: Callable[[RepoStatus], Destination | None]
) -> Destination:
    for run in (status.latest_run, status.latest_verified):
        event = run.event if run is not None else None
        if event is not None:
            return event.destination
    return fallback(status) or Destination(
        provider="s3", endpoint_url=None, bucket="unknown", prefix=""
    )


@dataclass(frozen=True)
class StaleAlert:
    """One repository due for a `Mirror Stale`: the event and the run that records it."""

    event: MirrorStale
    record: RunRecord


@dataclass(frozen=True)
class WatchPlan:
    """What one watchdog pass found: alerts to send, and repositories whose earlier alert
    is over (they are fresh again)."""

    alerts: list[StaleAlert]
    recovered: list[str]

    @property
    def events(self) -> list[MirrorStale]:
        return [a.event for a in self.alerts]


def plan(
    runs: RunStore,
    *,
    now: datetime | None = None,
    max_age_for: Callable[[RepoStatus], timedelta] = lambda _: DEFAULT_MAX_AGE,
    repeat_every: timedelta = DEFAULT_REPEAT,
    host: str | None = None,
    expected: Iterable[RepoRef] = (),
    destination_for: Callable[[RepoStatus], Destination | None] = lambda _: None,
) -> WatchPlan:
    """One watchdog pass, read-only: the alerts due now.

    `expected` names repositories that should have runs (local mode: Backrest's mirrored
    repositories): one the store has never heard of is stale at once ("never verified") —
    that is the silence of a hook that never ran, or of a run store in another place.
    """
    now = now or datetime.now(UTC)
    alerts: list[StaleAlert] = []
    recovered: list[str] = []
    statuses = list(runs.repos())
    known = {s.repo_key for s in statuses}
    expected_keys: set[str] = set()
    for ref in expected:
        expected_keys.add(ref.key)
        if ref.key not in known:
            known.add(ref.key)
            statuses.append(RepoStatus(ref.key, ref.id, None, None, 0))
    for status in statuses:
        check = assess(status, now, max_age_for(status))
        if status.latest_run is None and status.repo_key in expected_keys:
            check = StaleCheck(status.repo_key, status.repo_id, True, None, check.max_age, None)
        if not check.stale:
            if status.stale_alerted_at is not None:
                recovered.append(status.repo_key)
            continue
        if status.stale_alerted_at is not None and now - status.stale_alerted_at < repeat_every:
            continue
        guid = status.repo_key if status.repo_key != status.repo_id else None
        event = MirrorStale(
            run_id=new_run_id(),
            repo=RepoRef(id=status.repo_id, guid=guid),
            host=host or socket.gethostname(),
            trigger="watchdog",
            destination=_destination_of(status, destination_for),
            started_at=now,
            finished_at=now,
            last_verified_at=check.last_verified_at,
            last_verified_run_id=status.latest_verified.run_id if status.latest_verified else None,
            age_seconds=check.age.total_seconds() if check.age is not None else None,
            max_age_seconds=check.max_age.total_seconds(),
        )
        record = RunRecord(
            repo_key=status.repo_key,
            run_id=event.run_id,
            kind="stale",
            status="stale",
            started_at=now,
            finished_at=now,
            repo_id=status.repo_id,
            host=event.host,
            detail=event.model_dump(mode="json"),
        )
        alerts.append(StaleAlert(event, record))
    return WatchPlan(alerts, recovered)

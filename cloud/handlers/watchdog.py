"""The watchdog Lambda: a schedule (hourly) → this function.

No hook can report that backups stopped arriving. Every hour the watchdog reads the run
store and, for each repository whose latest verified run is older than ``MAX_AGE_HOURS``
(a repository never verified counts from its latest run), publishes one `Mirror Stale`
(source ``backrest-relay.watchdog``) to the event bus, repeated every 24 h while it stays
stale (`cloud.logic.watchdog.run_watchdog`). The notifier turns it into the alert; the
next verified run clears the alert, and the notifier sends the recovery message.

Publish first, then remember. `run_watchdog` records the stale run and marks the
repository alerted before it returns the events. Here the marks are held back (the run
store is wrapped) and applied per repository only after its event was accepted by
EventBridge, so an alert that was not published is retried at the next run instead of
being suppressed for 24 h — also when the pass dies half-way. What remains:

* publishing fails → the function raises after trying every repository (the Lambda's
  Errors alarm fires); the repositories published are marked, the others are not and are
  alerted again next hour (their recorded stale run stays: harmless, it only says the
  repository was stale then);
* publishing succeeds but the mark cannot be written → raises too; that repository may be
  alerted twice (at least once beats never).

Metrics (namespace ``BackrestRelay``): ``StaleRepositories`` (repositories due for a stale
alert in this run, 0 included), ``StalePublishFailures`` (alerts not published or not
marked).

Configuration (environment):

``RUNS_TABLE``              DynamoDB run store table (`cloud.integrations.runstore_dynamodb`)
``EVENT_BUS_NAME``          where `Mirror Stale` is published
``MAX_AGE_HOURS``           allowed age of the newest verified copy (default 26, minimum 1)
``POWERTOOLS_SERVICE_NAME`` optional, default ``backrest-relay-watchdog``
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from cloud.contracts.events import MirrorStale
from cloud.handlers.common import METRICS_NAMESPACE, env_int, require_env, service_name
from cloud.integrations.eventbus import EventBridgeBus, EventBus
from cloud.logic.ports import RepoStatus, RunRecord, RunStore
from cloud.logic.watchdog import DEFAULT_MAX_AGE, DEFAULT_REPEAT, run_watchdog

SERVICE = service_name("backrest-relay-watchdog")
DEFAULT_MAX_AGE_HOURS = int(DEFAULT_MAX_AGE.total_seconds() // 3600)

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)


class StaleAlertError(RuntimeError):
    """Some stale alerts could not be published or remembered (the invocation fails)."""


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Dependencies:
    """Everything the watchdog touches outside its own code (fakes in unit tests)."""

    runs: RunStore
    events: EventBus
    max_age: timedelta = DEFAULT_MAX_AGE
    repeat_every: timedelta = DEFAULT_REPEAT
    host: str | None = None
    clock: Callable[[], datetime] = field(default=_now)


def dependencies_from_env() -> Dependencies:
    """The production wiring, from the function's environment."""
    from cloud.integrations.runstore_dynamodb import DynamoRunStore

    runs_table = require_env("RUNS_TABLE")
    bus = require_env("EVENT_BUS_NAME")
    hours = env_int("MAX_AGE_HOURS", DEFAULT_MAX_AGE_HOURS, minimum=1) or DEFAULT_MAX_AGE_HOURS
    return Dependencies(
        runs=DynamoRunStore(runs_table),
        events=EventBridgeBus(bus),
        max_age=timedelta(hours=hours),
        host=f"lambda:{os.environ.get('AWS_LAMBDA_FUNCTION_NAME', 'watchdog')}",
    )


# -- publish first, then mark --------------------------------------------------------------


class _HeldMarks:
    """The run store as `run_watchdog` sees it, except that marking a repository alerted
    is held back until `release(repo_key)` (clearing a mark goes through at once)."""

    def __init__(self, runs: RunStore) -> None:
        self._runs = runs
        self.held: dict[str, datetime] = {}

    def release(self, repo_key: str) -> None:
        at = self.held.pop(repo_key, None)
        if at is not None:
            self._runs.mark_stale_alerted(repo_key, at)

    def mark_stale_alerted(self, repo_key: str, at: datetime | None) -> None:
        if at is None:
            self.held.pop(repo_key, None)
            self._runs.mark_stale_alerted(repo_key, None)
        else:
            self.held[repo_key] = at

    def record(self, run: RunRecord) -> None:
        self._runs.record(run)

    def get(self, repo_key: str, run_id: str) -> RunRecord | None:
        return self._runs.get(repo_key, run_id)

    def runs(self, repo_key: str, limit: int = 50) -> list[RunRecord]:
        return self._runs.runs(repo_key, limit)

    def latest_verified(self, repo_key: str) -> RunRecord | None:
        return self._runs.latest_verified(repo_key)

    def verification_count(self, repo_key: str) -> int:
        return self._runs.verification_count(repo_key)

    def repos(self) -> Iterator[RepoStatus]:
        return self._runs.repos()

    def load_checkpoint(self, repo_key: str, name: str) -> dict[str, Any] | None:
        return self._runs.load_checkpoint(repo_key, name)

    def save_checkpoint(self, repo_key: str, name: str, data: dict[str, Any]) -> None:
        self._runs.save_checkpoint(repo_key, name, data)


@dataclass
class WatchdogResult:
    checked_at: datetime
    published: list[MirrorStale] = field(default_factory=list)
    failed: list[tuple[MirrorStale, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "checked_at": self.checked_at.isoformat(),
            "stale": [e.repo.id or e.repo.key for e in self.published],
            "failed": [e.repo.id or e.repo.key for e, _ in self.failed],
        }


def _publish_then_mark(
    events: EventBus, runs: _HeldMarks, event: MirrorStale, result: WatchdogResult
) -> None:
    repo_key = event.repo.key
    try:
        events.publish(event)
    except Exception as exc:
        # Not marked: the next run alerts again.
        result.failed.append((event, f"not published: {type(exc).__name__}: {exc}"))
        logger.error(
            "Mirror Stale not published: retried at the next run",
            repo_key=repo_key,
            error_type=type(exc).__name__,
            error=str(exc),
        )
        return
    logger.warning(
        "Mirror Stale",
        repo_key=repo_key,
        age_seconds=event.age_seconds,
        max_age_seconds=event.max_age_seconds,
        last_verified_at=(
            event.last_verified_at.isoformat() if event.last_verified_at is not None else None
        ),
    )
    try:
        runs.release(repo_key)
    except Exception as exc:
        result.failed.append((event, f"published, not marked: {type(exc).__name__}"))
        logger.exception("Mirror Stale published but not marked: may be sent again")
    else:
        result.published.append(event)


@tracer.capture_method(capture_response=False)
def check(deps: Dependencies, now: datetime | None = None) -> WatchdogResult:
    """One watchdog pass: find the stale repositories, publish each alert, then mark it.

    Every alert is tried even when one fails; raises `StaleAlertError` at the end if any
    alert could not be published or remembered."""
    now = now or deps.clock()
    runs = _HeldMarks(deps.runs)
    stale = run_watchdog(
        runs,
        now=now,
        max_age_for=lambda _status: deps.max_age,
        repeat_every=deps.repeat_every,
        host=deps.host,
    )
    result = WatchdogResult(checked_at=now)
    for event in stale:
        with logger.append_context_keys(stale_run_id=event.run_id, repo=event.repo.id):
            _publish_then_mark(deps.events, runs, event, result)
    metrics.add_metric(name="StaleRepositories", unit=MetricUnit.Count, value=len(stale))
    if result.failed:
        metrics.add_metric(
            name="StalePublishFailures", unit=MetricUnit.Count, value=len(result.failed)
        )
        raise StaleAlertError(
            f"{len(result.failed)} of {len(stale)} stale alert(s) failed: "
            + "; ".join(f"{e.repo.id or e.repo.key}: {why}" for e, why in result.failed)
        )
    return result


_lock = threading.Lock()
_deps: Dependencies | None = None


def set_dependencies(deps: Dependencies | None) -> None:
    """Replace the container's dependencies (tests); None rebuilds them from the env."""
    global _deps
    with _lock:
        _deps = deps


def get_dependencies() -> Dependencies:
    global _deps
    with _lock:
        if _deps is None:
            _deps = dependencies_from_env()
        return _deps


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """The schedule's event (EventBridge rule or Scheduler) carries nothing we need."""
    logger.set_correlation_id(event.get("id") if isinstance(event, dict) else None)
    deps = get_dependencies()
    result = check(deps)
    logger.info(
        "watchdog done",
        max_age_hours=deps.max_age.total_seconds() / 3600,
        stale=len(result.published),
    )
    return result.as_dict()

"""The watchdog Lambda (hourly schedule): a `Mirror Stale` for every repository without a
recent verified copy, because no hook can report that backups stopped arriving.
Publish first, then mark (`cloud.app.watchdog`). Settings and failures: docs/lambda.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from cloud.app import watchdog
from cloud.contracts.events import MirrorStale
from cloud.handlers.common import METRICS_NAMESPACE, Lazy, env_int, require_env, service_name
from cloud.integrations.eventbus import EventBridgeBus, EventBus
from cloud.logic.ports import RunStore
from cloud.logic.watchdog import DEFAULT_MAX_AGE, DEFAULT_REPEAT

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
    events: EventBus, runs: RunStore, alert: watchdog.StaleAlert, result: WatchdogResult
) -> None:
    event = alert.event
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
        watchdog.commit(runs, alert)
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
    watch = watchdog.plan(
        deps.runs,
        now=now,
        max_age_for=lambda _status: deps.max_age,
        repeat_every=deps.repeat_every,
        host=deps.host,
    )
    watchdog.record(deps.runs, watch)
    stale = watch.alerts
    result = WatchdogResult(checked_at=now)
    for alert in stale:
        event = alert.event
        with logger.append_context_keys(stale_run_id=event.run_id, repo=event.repo.id):
            _publish_then_mark(deps.events, deps.runs, alert, result)
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


_deps: Lazy[Dependencies] = Lazy(lambda: dependencies_from_env())
get_dependencies = _deps.get
set_dependencies = _deps.set
"""`set_dependencies(None)` rebuilds them from the environment on next use (tests)."""


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

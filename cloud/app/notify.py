"""Notify one result: `decide` who hears it, pick the `channels_for` that audience, `send`.

Local mode runs the three steps in a row (`notify`); the notifier Lambda stores the decision
and wraps each channel in its idempotency record between them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cloud.contracts.events import EventDetail
from cloud.logic.delivery import ChannelOutcome, DeliveryLog, DeliveryReport, deliver
from cloud.logic.notify import Decision, SuccessPolicy, decide_delivery, previous_outcome, render
from cloud.logic.ports import Notification, NotificationChannel, RunStore, Severity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """The decision for one event and the previous outcome it was judged against."""

    decision: Decision
    previous: str | None


def decide(event: EventDetail, runs: RunStore, policy: SuccessPolicy) -> Verdict:
    """Who hears `event`. Call it after the event's run is recorded: the policy looks at
    the runs before it."""
    previous = previous_outcome(runs, event.repo.key, event.run_id)
    return Verdict(decide_delivery(event, policy, previous), previous)


def channels_for(
    decision: Decision, channels: Iterable[NotificationChannel]
) -> list[NotificationChannel]:
    """The channels this decision reaches (people, heartbeats, or both)."""
    return [c for c in channels if decision.wants(c)]


def send(
    notification: Notification,
    channels: Iterable[NotificationChannel],
    logger: DeliveryLog | None = None,
) -> DeliveryReport:
    """Every channel gets the notification (`cloud.logic.delivery.deliver`)."""
    return deliver(notification, channels, logger)


@dataclass
class NotifyOutcome:
    severity: Severity | None
    notification: Notification | None = None
    report: DeliveryReport | None = None

    @property
    def results(self) -> tuple[ChannelOutcome, ...]:
        return () if self.report is None else self.report.outcomes

    @property
    def failed(self) -> int:
        return 0 if self.report is None else self.report.failed


class _QuietSuccess:
    """Delivery log for local mode: a failure is a warning, a success only a debug line."""

    def info(self, msg: str, *args: object) -> None:
        log.debug(msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        log.warning(msg, *args)


def notify(
    event: EventDetail,
    *,
    runs: RunStore,
    channels: Sequence[NotificationChannel],
    policy: SuccessPolicy = "on_recovery",
) -> NotifyOutcome:
    """Decide, render and send the notification for one result event (local mode)."""
    decision = decide(event, runs, policy).decision
    audience = channels_for(decision, channels)
    if decision.severity is None or not audience:
        return NotifyOutcome(None)
    notification = render(event, decision.severity)
    return NotifyOutcome(
        decision.severity, notification, send(notification, audience, _QuietSuccess())
    )

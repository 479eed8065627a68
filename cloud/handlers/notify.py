"""The notifier Lambda: EventBridge rule → SQS queue → this function → every channel.

Who hears what is `cloud.app.notify` (shared with local mode). Idempotent in two steps:
the decision per run (a redelivery sends the same message) and the delivery per (run,
channel) (a channel that already got it is not sent to again). Any failed channel fails
the record, so SQS retries just the missing ones, then the DLQ. Settings and failures:
docs/lambda.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast, get_args

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    BaseError as IdempotencyError,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import DataRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from cloud.app import notify
from cloud.contracts.events import (
    EventDetail,
    MirrorFailed,
    MirrorStale,
    MirrorVerificationFailed,
    MirrorVerified,
    RepoRef,
)
from cloud.handlers.batch import DeadlineNearError, EventBatch, IdempotentStep
from cloud.handlers.common import METRICS_NAMESPACE, ConfigError, Lazy, require_env, service_name
from cloud.integrations.channels import channel_key
from cloud.integrations.channels.targets import NotifyChannels
from cloud.logic.notify import Decision, SuccessPolicy, render
from cloud.logic.ports import ChannelError, Notification, NotificationChannel, RunStore
from cloud.logic.verification import mirror_run_record

SERVICE = service_name("backrest-relay-notifier")
DEADLINE_RESERVE_MS = 30_000
"""A record is not started with less time left than this: it fails at once and SQS
retries it, rather than the invocation timing out with the whole batch."""

NOTIFIED_EVENTS = (MirrorVerified, MirrorVerificationFailed, MirrorFailed, MirrorStale)
SUCCESS_POLICIES: tuple[str, ...] = get_args(SuccessPolicy)

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)


class DeliveryIncompleteError(RuntimeError):
    """Some channels did not receive the notification (the record fails and is retried;
    the channels that did receive it are not sent to again)."""


class NoChannelsError(RuntimeError):
    """No channel is configured: a notification nobody receives is not acknowledged."""


ChannelSource = Callable[[RepoRef], Sequence[NotificationChannel]]


class _OnceChannel:
    """A channel wrapped in the per-(run, channel) idempotent send. After `send`,
    `replayed` says whether the channel had already received this run's notification (and
    was not sent to again)."""

    def __init__(self, channel: NotificationChannel, send_once: Callable[..., dict[str, Any]]):
        self.channel = channel
        self.key = channel_key(channel)
        self._send_once = send_once
        self.replayed = False

    @property
    def name(self) -> str:
        return self.channel.name

    def send(self, notification: Notification) -> None:
        try:
            result = self._send_once(
                delivery={"key": f"{notification.run_id}:{self.key}"},
                channel=self.channel,
                notification=notification,
            )
        except IdempotencyAlreadyInProgressError:
            raise ChannelError(
                f"{self.name}: being delivered by another invocation; the record is retried"
            ) from None
        except IdempotencyError as exc:
            # The idempotency table is unreachable: sending without it could send twice.
            raise ChannelError(
                f"{self.name}: idempotency store failed ({type(exc).__name__}); not sent"
            ) from None
        self.replayed = bool(result.get("replayed"))


class _DeliveryLog:
    """What `channels.deliver` logs, into the function's logger: failures as warnings; its
    per-channel success lines at DEBUG (the summary line says what was really sent)."""

    def info(self, msg: str, *args: object) -> None:
        logger.debug(msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        logger.warning(msg, *args)


# -- dependencies --------------------------------------------------------------------------


@dataclass
class Dependencies:
    """Everything the notifier touches outside its own code (fakes in unit tests).

    `persistence` makes one idempotency layer per idempotent step: powertools configures a
    layer from the first config it sees, so two steps must not share an instance.
    """

    runs: RunStore
    channels: ChannelSource
    persistence: Callable[[], BasePersistenceLayer]
    policy: SuccessPolicy = "on_recovery"


def success_policy(raw: str | None) -> SuccessPolicy:
    value = (raw or "").strip().lower() or "on_recovery"
    if value not in SUCCESS_POLICIES:
        raise ConfigError(
            f"environment variable SUCCESS_POLICY must be one of {', '.join(SUCCESS_POLICIES)}, "
            f"not {raw!r}"
        )
    return cast(SuccessPolicy, value)


def dependencies_from_env() -> Dependencies:
    """The production wiring, from the function's environment."""
    import boto3

    from cloud.integrations.runstore_dynamodb import DynamoRunStore

    runs_table = require_env("RUNS_TABLE")
    idempotency_table = require_env("IDEMPOTENCY_TABLE")
    topic_arn = os.environ.get("TOPIC_ARN", "").strip() or None
    secret_id = os.environ.get("NOTIFY_SECRET_ARN", "").strip() or None
    if topic_arn is None and secret_id is None:
        raise ConfigError("set TOPIC_ARN and/or NOTIFY_SECRET_ARN: no notification channel")
    policy = success_policy(os.environ.get("SUCCESS_POLICY"))
    dynamodb = boto3.client("dynamodb")
    return Dependencies(
        runs=DynamoRunStore(runs_table, client=dynamodb),
        channels=NotifyChannels(topic_arn=topic_arn, secret_id=secret_id),
        persistence=lambda: DynamoDBPersistenceLayer(
            table_name=idempotency_table, boto3_client=dynamodb
        ),
        policy=policy,
    )


# -- the use case, made idempotent ---------------------------------------------------------


class Notifier:
    """Per-container state: the dependencies and the two idempotent steps over them."""

    def __init__(self, deps: Dependencies) -> None:
        self.deps = deps
        self.decide_once = IdempotentStep(
            self._decide, "backrest-relay.notify-decision", "run_id", deps.persistence(),
            self._already_decided,
        )  # fmt: skip
        self.send_once = IdempotentStep(
            self._send, "backrest-relay.notify-channel", "key", deps.persistence(),
            self._already_sent,
        )  # fmt: skip
        self.steps = (self.decide_once, self.send_once)

    def handle(self, detail: EventDetail) -> str:
        """Notify one event; returns what happened (for the batch's log)."""
        tracer.put_annotation(key="notify_run_id", value=detail.run_id)
        if isinstance(detail, MirrorFailed):
            self.deps.runs.record(mirror_run_record(detail))
        decision = self.decide_once(event=detail)
        severity = decision.get("severity")
        audience = Decision(
            severity,
            # Decisions stored before heartbeats existed went to every channel.
            people=bool(decision.get("people", True)),
            heartbeat=bool(decision.get("heartbeat", True)),
        )
        if severity is None:
            logger.info(
                "policy says quiet: not notified",
                policy=self.deps.policy,
                previous=decision.get("previous"),
                repo=detail.repo.id or detail.repo.key,
            )
            metrics.add_metric(name="NotificationsSkipped", unit=MetricUnit.Count, value=1)
            return "skipped"
        tracer.put_annotation(key="severity", value=str(severity))
        notification = Notification(**decision["notification"])
        return self._deliver(notification, detail.repo, audience, decision.get("previous"))

    def _deliver(
        self,
        notification: Notification,
        repo: RepoRef,
        audience: Decision,
        previous: str | None = None,
    ) -> str:
        configured = self.deps.channels(repo)
        channels = [
            _OnceChannel(c, self.send_once) for c in notify.channels_for(audience, configured)
        ]
        if not channels:
            if audience.people or not configured:
                raise NoChannelsError("no notification channel is configured")
            logger.info(
                "policy says quiet and no heartbeat channel: not notified",
                policy=self.deps.policy,
                previous=previous,
                repo=repo.id or repo.key,
            )
            metrics.add_metric(name="NotificationsSkipped", unit=MetricUnit.Count, value=1)
            return "skipped"
        report = notify.send(notification, channels, logger=_DeliveryLog())
        statuses = []
        sent = replayed = 0
        for outcome, channel in zip(report.outcomes, channels, strict=True):
            if not outcome.ok:
                status = "failed"
            elif channel.replayed:
                status, replayed = "already sent", replayed + 1
            else:
                status, sent = "sent", sent + 1
            statuses.append({"channel": outcome.name, "status": status, "error": outcome.error})
        metrics.add_metric(name="NotificationsSent", unit=MetricUnit.Count, value=sent)
        metrics.add_metric(name="NotificationFailures", unit=MetricUnit.Count, value=report.failed)
        if replayed:
            metrics.add_metric(
                name="NotificationsAlreadySent", unit=MetricUnit.Count, value=replayed
            )
        log = logger.info if report.ok else logger.warning
        log(
            "notification delivered"
            if report.ok
            else "notification not delivered to every channel",
            severity=notification.severity,
            subject=notification.subject,
            repo=notification.repo_id or notification.repo_key,
            channels=statuses,
        )
        if not report.ok:
            failed = "; ".join(f"{o.name}: {o.error}" for o in report.failures)
            raise DeliveryIncompleteError(
                f"{report.failed} of {len(channels)} channel(s) failed: {failed}"
            )
        return notification.severity

    # The idempotent steps. Their outputs are stored as JSON and replayed on duplicates.

    def _decide(self, event: EventDetail) -> dict[str, Any]:
        """`decide_delivery`, the rule local mode uses too: people per the success policy,
        heartbeat channels (Healthchecks) on every verified run."""
        verdict = notify.decide(event, self.deps.runs, self.deps.policy)
        decision, previous = verdict.decision, verdict.previous
        if decision.severity is None:
            return {"severity": None, "previous": previous}
        notification = render(event, decision.severity)
        return {
            "severity": decision.severity,
            "people": decision.people,
            "heartbeat": decision.heartbeat,
            "previous": previous,
            "notification": dataclasses.asdict(notification),
        }

    @staticmethod
    def _send(
        delivery: dict[str, str], channel: NotificationChannel, notification: Notification
    ) -> dict[str, Any]:
        channel.send(notification)  # ChannelError: no record kept, the retry sends again
        return {"sent_at": datetime.now(UTC).isoformat()}

    @staticmethod
    def _already_decided(response: Any, idempotent_data: DataRecord) -> Any:
        logger.info("duplicate delivery: using the stored decision and message")
        return response

    @staticmethod
    def _already_sent(response: Any, idempotent_data: DataRecord) -> Any:
        return {**(response or {}), "replayed": True}


_notifier: Lazy[Notifier] = Lazy(lambda: Notifier(dependencies_from_env()))
get_notifier = _notifier.get


def set_dependencies(deps: Dependencies | None) -> None:
    """Replace the container's dependencies (tests); None rebuilds them from the env."""
    _notifier.set(None if deps is None else Notifier(deps))


batch = EventBatch(
    logger=logger,
    metrics=metrics,
    tracer=tracer,
    use_case=get_notifier,
    accepts=NOTIFIED_EVENTS,
    ignored_message="not an event the notifier handles: ignored (check the rule)",
    retried={
        DeliveryIncompleteError: "record failed: SQS will redeliver it and only the failed "
        "channels are tried again (then the DLQ)",
        IdempotencyAlreadyInProgressError: "record not processed now: SQS will redeliver it",
        DeadlineNearError: "record not processed now: SQS will redeliver it",
    },
    quiet=(NoChannelsError,),
    deadline_reserve_ms=DEADLINE_RESERVE_MS,
)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return batch(event, context)

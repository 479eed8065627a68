"""The notifier Lambda: EventBridge rule → SQS queue → this function.

Each SQS record's body is one EventBridge event: `Mirror Verified` and `Mirror Verification
Failed` (source ``backrest-relay.verifier``), `Mirror Failed` (``backrest-relay.agent``) or
`Mirror Stale` (``backrest-relay.watchdog``). The notification policy and the message come
from `cloud.logic.notify` (`previous_outcome`, `decide`, `render`); delivery goes to every
channel (`cloud.integrations.channels.deliver`): the SNS topic (email subscribers), each
Apprise URL and the repository's Healthchecks ping URL from the notify secret. Who hears
what is `decide_delivery` (shared with local mode): people per ``SUCCESS_POLICY``, the
Healthchecks heartbeat on every verified run whatever the policy.

A `Mirror Failed` is recorded in the run store first (`mirror_run_record`; the store ignores
duplicates), so the policy sees it when the next success arrives. Verification results and
stale alerts were recorded by the verifier and the watchdog before they were published.

Idempotency, in two steps (powertools idempotency, DynamoDB):

* **the decision, per run** (key: the event's ``run_id``): severity — or "stay quiet" — and
  the rendered message are decided once and stored. A redelivery sends the *same* message
  to the channels still missing it, even if newer runs arrived in between and would change
  what `previous_outcome` says now (a recovery stays a recovery).
* **the delivery, per (run, channel)** (key: ``f"{run_id}:{channel_key(channel)}"``; the
  channel key is a hash, no secret): a channel that already received the run's message is
  not sent to again; a channel that failed left no record, so it is retried.

What happens to a record:

* every channel delivered (or the policy said quiet) → record done;
* **some or all channels failed** → the record fails (`batchItemFailures`): SQS redelivers
  it after the visibility timeout and only the failed channels are tried again; after the
  queue's ``maxReceiveCount`` it moves to the DLQ and its alarm fires (the alarm goes to
  the SNS topic directly). Redriving the DLQ after fixing the channel delivers exactly the
  missing notifications. A channel that can never work (a malformed Apprise URL) therefore
  sends each notification to the DLQ: that alarm is how the typo gets noticed;
* the notify secret cannot be read or is invalid → the SNS topic still gets the message,
  the secret counts as one failed channel (``notify-secret:<id>``), so the record is retried
  and, if the secret stays broken, lands in the DLQ;
* no channel configured at all → the record fails (a notification nobody receives is not
  acknowledged);
* malformed (not JSON, not an EventBridge event, a detail that breaks the contract,
  including an unknown ``schema_version``) → the record fails, so it ends in the DLQ;
* a well-formed event of another kind → logged as an error, counted (``IgnoredEvents``)
  and acknowledged: retrying cannot help;
* the invocation is about to time out → the records not started yet fail at once (SQS
  retries them) instead of the whole batch timing out.

Secrets. Apprise URLs and Healthchecks ping URLs are credentials: they are read from
Secrets Manager (powertools Parameters, cached), never logged; logs and errors name the
channels by their redacted names (`cloud.integrations.channels`).

Metrics (namespace ``BackrestRelay``): ``NotificationsSent`` (channel deliveries made now),
``NotificationFailures`` (channel deliveries that failed), ``NotificationsSkipped`` (the
policy said quiet), ``NotificationsAlreadySent`` (channels skipped on a redelivery),
``IgnoredEvents``, ``MalformedEvents``, ``RecordFailures``.

Configuration (environment; no credentials in it):

``RUNS_TABLE``              DynamoDB run store table (`cloud.integrations.runstore_dynamodb`)
``IDEMPOTENCY_TABLE``       powertools idempotency table (partition key ``id``, TTL on
                            ``expiration``), shared with the verifier (other key prefixes)
``TOPIC_ARN``               SNS topic for email subscribers (optional)
``NOTIFY_SECRET_ARN``       ARN or name of the Secrets Manager secret with the Apprise and
                            Healthchecks URLs (optional), JSON::

                              {"apprise_urls": ["slack://...", "ntfy://..."],
                               "healthchecks": {"<repo id or guid>": "https://hc-ping.com/<uuid>"}}

                            both keys optional, no other keys allowed; ``{}`` = SNS only
``SUCCESS_POLICY``          ``always`` | ``on_recovery`` (default) | ``never``
``POWERTOOLS_SERVICE_NAME`` optional, default ``backrest-relay-notifier``

At least one of ``TOPIC_ARN`` and ``NOTIFY_SECRET_ARN`` must be set.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast, get_args

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.base import FailureResponse
from aws_lambda_powertools.utilities.batch.exceptions import ExceptionInfo
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    BaseError as IdempotencyError,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import DataRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from cloud.app import notify
from cloud.contracts.events import (
    EventDetail,
    MirrorFailed,
    MirrorStale,
    MirrorVerificationFailed,
    MirrorVerified,
    RepoRef,
)
from cloud.handlers.common import (
    METRICS_NAMESPACE,
    ConfigError,
    EventBridgeEnvelope,
    EventQueueRecord,
    MalformedEventError,
    parse_event,
    record_correlation_id,
    record_message_id,
    require_env,
    service_name,
    validation_errors,
)
from cloud.integrations.channels import (
    AppriseChannel,
    HealthchecksChannel,
    SnsChannel,
    channel_key,
)
from cloud.integrations.secrets import (
    DEFAULT_MAX_AGE,
    NotifySecretError,
    NotifyTargets,
    load_notify_targets,
)
from cloud.logic.notify import Decision, SuccessPolicy, render
from cloud.logic.ports import ChannelError, Notification, NotificationChannel, RunStore
from cloud.logic.verification import mirror_run_record

SERVICE = service_name("backrest-relay-notifier")
IDEMPOTENCY_EXPIRY_SECONDS = 14 * 24 * 3600
"""As long as SQS can keep a message (14 days), so every redelivery or DLQ redrive of an
event within the queue's lifetime finds what was already sent."""
APPRISE_TIMEOUT_SECONDS = 15.0
"""Per Apprise URL; the function has 120 s for a batch of up to 10 records."""
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


class DeadlineNearError(RuntimeError):
    """Too little time left in the invocation to start this record."""


# -- channels ------------------------------------------------------------------------------


class UnavailableTargets:
    """Stands in for the channels of an unreadable or invalid notify secret: always fails,
    so the record is retried (and ends in the DLQ if the secret stays broken) while the SNS
    topic still delivers. Its name and error carry the secret's id, never its content."""

    kind = "notify-secret"

    def __init__(self, secret_id: str, problem: str) -> None:
        self._name = f"{self.kind}:{secret_id}"
        self.problem = problem

    @property
    def name(self) -> str:
        return self._name

    def send(self, notification: Notification) -> None:
        raise ChannelError(f"{self.name}: {self.problem}")


class NotifyChannels:
    """The channels for one repository's notification: the SNS topic, every Apprise URL of
    the notify secret, and the repository's Healthchecks ping URL (looked up by guid, then
    by Backrest id).

    Channels are kept per container while their URL stays in the secret (Apprise parses a
    URL once; the SNS client keeps its connections); the secret itself is cached by
    powertools Parameters for `max_age` seconds, so an edited secret is picked up within
    minutes without a cold start.
    """

    def __init__(
        self,
        *,
        topic_arn: str | None,
        secret_id: str | None,
        max_age: int = DEFAULT_MAX_AGE,
        load: Callable[[str], NotifyTargets] | None = None,
        sns: NotificationChannel | None = None,
        apprise: Callable[[str], NotificationChannel] | None = None,
        healthchecks: Callable[[str], NotificationChannel] | None = None,
    ) -> None:
        self.topic_arn = topic_arn or None
        self.secret_id = secret_id or None
        self.max_age = max_age
        self._load = load or (lambda sid: load_notify_targets(sid, max_age=self.max_age))
        self._sns = sns if sns is not None else (SnsChannel(topic_arn) if topic_arn else None)
        self._make_apprise = apprise or (
            lambda url: AppriseChannel(url, timeout=APPRISE_TIMEOUT_SECONDS)
        )
        self._make_healthchecks = healthchecks or HealthchecksChannel
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], NotificationChannel] = {}
        self._targets: NotifyTargets | None = None

    def targets(self) -> NotifyTargets | None:
        """The secret's targets (None without a secret); raises `NotifySecretError`."""
        return None if self.secret_id is None else self._load(self.secret_id)

    def _channel(self, kind: str, url: str) -> NotificationChannel:
        channel = self._cache.get((kind, url))
        if channel is None:
            make = self._make_apprise if kind == "apprise" else self._make_healthchecks
            channel = self._cache[(kind, url)] = make(url)
        return channel

    def _forget_removed(self, targets: NotifyTargets) -> None:
        if targets == self._targets:
            return
        keep = {("apprise", url) for url in targets.apprise_urls}
        keep |= {("healthchecks", url) for url in targets.healthchecks.values()}
        self._cache = {k: v for k, v in self._cache.items() if k in keep}
        self._targets = targets

    def __call__(self, repo: RepoRef) -> list[NotificationChannel]:
        channels: list[NotificationChannel] = [] if self._sns is None else [self._sns]
        try:
            targets = self.targets()
        except NotifySecretError as exc:
            assert self.secret_id is not None
            channels.append(UnavailableTargets(self.secret_id, str(exc)))
            return channels
        if targets is None:
            return channels
        with self._lock:
            self._forget_removed(targets)
            channels.extend(self._channel("apprise", url) for url in targets.apprise_urls)
            ping = targets.healthchecks_url(repo.guid, repo.id)
            if ping:
                channels.append(self._channel("healthchecks", ping))
        return channels


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
        self.decide_config = IdempotencyConfig(
            event_key_jmespath="run_id",
            raise_on_no_idempotency_key=True,
            expires_after_seconds=IDEMPOTENCY_EXPIRY_SECONDS,
            response_hook=self._already_decided,
        )
        self.send_config = IdempotencyConfig(
            event_key_jmespath="key",
            raise_on_no_idempotency_key=True,
            expires_after_seconds=IDEMPOTENCY_EXPIRY_SECONDS,
            response_hook=self._already_sent,
        )
        self.decide_once: Callable[..., dict[str, Any]] = idempotent_function(
            self._decide,
            data_keyword_argument="event",
            persistence_store=deps.persistence(),
            config=self.decide_config,
            key_prefix="backrest-relay.notify-decision",
        )
        self.send_once: Callable[..., dict[str, Any]] = idempotent_function(
            self._send,
            data_keyword_argument="delivery",
            persistence_store=deps.persistence(),
            config=self.send_config,
            key_prefix="backrest-relay.notify-channel",
        )

    def register_lambda_context(self, context: LambdaContext) -> None:
        """Lets an in-progress record expire when the invocation times out (see powertools
        idempotency "Lambda timeouts"), so a retry is not blocked until the record expires."""
        self.decide_config.register_lambda_context(context)
        self.send_config.register_lambda_context(context)

    def handle(self, envelope: EventBridgeEnvelope) -> str:
        """Notify one event; returns what happened (for the batch's log)."""
        detail = parse_event(envelope)
        if not isinstance(detail, NOTIFIED_EVENTS):
            logger.error(
                "not an event the notifier handles: ignored (check the rule)",
                source=envelope.source,
                detail_type=envelope.detail_type,
            )
            metrics.add_metric(name="IgnoredEvents", unit=MetricUnit.Count, value=1)
            return "ignored"
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


_lock = threading.Lock()
_notifier: Notifier | None = None


def set_dependencies(deps: Dependencies | None) -> None:
    """Replace the container's dependencies (tests); None rebuilds them from the env."""
    global _notifier
    with _lock:
        _notifier = None if deps is None else Notifier(deps)


def get_notifier() -> Notifier:
    """The container's notifier, built on first use (a cold start that fails on
    configuration fails the invocation, loudly, instead of the import)."""
    global _notifier
    with _lock:
        if _notifier is None:
            _notifier = Notifier(dependencies_from_env())
        return _notifier


# -- batch ---------------------------------------------------------------------------------


class NotifyBatchProcessor(BatchProcessor):
    """`BatchProcessor` that logs and counts every failed record, including the poison
    pills powertools rejects before our handler runs."""

    def failure_handler(self, record: Any, exception: ExceptionInfo) -> FailureResponse:
        exc = exception[1]
        message_id = record_message_id(record)
        logger.set_correlation_id(record_correlation_id(record))
        if isinstance(exc, ValidationError | MalformedEventError):
            metrics.add_metric(name="MalformedEvents", unit=MetricUnit.Count, value=1)
            errors = validation_errors(exc) if isinstance(exc, ValidationError) else [str(exc)]
            logger.error(
                "malformed message: failed, SQS will retry it and then move it to the DLQ",
                message_id=message_id,
                errors=errors,
            )
        elif isinstance(exc, DeliveryIncompleteError):
            logger.warning(
                "record failed: SQS will redeliver it and only the failed channels are tried "
                "again (then the DLQ)",
                message_id=message_id,
                error=str(exc),
            )
        elif isinstance(exc, IdempotencyAlreadyInProgressError | DeadlineNearError):
            logger.warning(
                "record not processed now: SQS will redeliver it",
                message_id=message_id,
                error_type=type(exc).__name__,
            )
        else:
            logger.error(
                "record failed: SQS will retry it (then the DLQ)",
                message_id=message_id,
                error_type=type(exc).__name__,
                error=str(exc),
                exc_info=not isinstance(exc, NoChannelsError),
            )
        metrics.add_metric(name="RecordFailures", unit=MetricUnit.Count, value=1)
        return super().failure_handler(record, exception)


processor = NotifyBatchProcessor(
    event_type=EventType.SQS,
    model=EventQueueRecord,
    # A batch where every record failed is reported item by item like any other.
    raise_on_entire_batch_failure=False,
)


@tracer.capture_method
def record_handler(record: EventQueueRecord, lambda_context: LambdaContext | None = None) -> str:
    # Stays set until the next record (or the end of the batch), so the failure handler's
    # log line carries it too.
    logger.set_correlation_id(record_correlation_id(record))
    if (
        lambda_context is not None
        and lambda_context.get_remaining_time_in_millis() < DEADLINE_RESERVE_MS
    ):
        raise DeadlineNearError("too little time left in this invocation")
    envelope = record.body
    with logger.append_context_keys(
        message_id=record.messageId,
        receive_count=record.attributes.ApproximateReceiveCount,
        event_id=envelope.id,
        detail_type=envelope.detail_type,
    ):
        return get_notifier().handle(envelope)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    notifier = get_notifier()
    notifier.register_lambda_context(context)
    response = process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    failures = response.get("batchItemFailures", [])
    logger.set_correlation_id(None)
    logger.info(
        "batch done",
        records=len(event.get("Records", [])),
        failed=[f["itemIdentifier"] for f in failures],
    )
    return response

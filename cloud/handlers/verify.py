"""The verifier Lambda: EventBridge rule → SQS queue → this function.

Each SQS record's body is one EventBridge event. A `Mirror Completed` event from the agent
is verified (`cloud.logic.verification.verify_completed_mirror`) and the result,
`Mirror Verified` or `Mirror Verification Failed`, is published to the event bus.

What happens to a record:

* verified or found damaged → result published, record done (a damaged mirror is a
  verdict, not an error);
* the bucket cannot be read (`ObjectStoreError`), the secret is unreadable, the bus refuses
  the result → the record fails (`batchItemFailures`): SQS redelivers it after the
  visibility timeout and, after the queue's `maxReceiveCount`, moves it to the DLQ;
* malformed (not JSON, not an EventBridge event, a `Mirror Completed` detail that does not
  match the contract, including an unknown `schema_version`) → the record fails too, so it
  ends in the DLQ where it can be inspected and redriven after an upgrade; nothing is lost;
* a well-formed event of another kind (e.g. `Mirror Failed` routed here by a broad rule)
  → logged as an error, counted (`IgnoredEvents`) and acknowledged: retrying cannot help;
* the same `run_id` with a different manifest → the record fails (an agent bug; DLQ);
* a redelivered event (same `run_id`) → not verified again: idempotency (DynamoDB) returns
  the stored result, and the result event, idempotent on its own `run_id`, is not
  published twice. If publishing failed the first time, the redelivery publishes the
  stored result without verifying again.

Configuration (environment; no credentials in it):

``RUNS_TABLE``              DynamoDB run store table (`cloud.integrations.runstore_dynamodb`)
``IDEMPOTENCY_TABLE``       powertools idempotency table (partition key ``id``, TTL on
                            ``expiration``)
``EVENT_BUS_NAME``          where results are published
``DESTINATION_SECRET_ARN``  ARN or name of the Secrets Manager secret holding the
                            destination's read credentials (`cloud.integrations.secrets`)
``VERIFY_NEW_BYTES_BUDGET`` optional byte cap on deep-checking objects the run uploaded
``VERIFY_ROTATION_RUNS``    re-read every older object once per N verifications (30)
``VERIFY_CONCURRENCY``      parallel reads during the deep check (8)
``OBJECT_LOCK_DAYS``        optional: the agent's `object_lock.days`; objects read back
                            must then carry an Object Lock (docs/security.md)
``OBJECT_LOCK_MIN_DAYS``    retention that must remain on older objects read back (1)
``POWERTOOLS_SERVICE_NAME`` optional, default ``backrest-relay-verifier``
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
    IdempotencyAlreadyInProgressError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import DataRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from cloud.contracts.events import (
    MirrorCompleted,
    MirrorVerificationFailed,
    MirrorVerified,
    Source,
    UnknownEventError,
    parse_detail,
)
from cloud.handlers.common import (
    METRICS_NAMESPACE,
    DestinationOpener,
    EventBridgeEnvelope,
    EventQueueRecord,
    MalformedEventError,
    SecretDestinations,
    env_int,
    record_correlation_id,
    require_env,
    service_name,
    validation_errors,
)
from cloud.integrations.eventbus import EventBridgeBus, EventBus
from cloud.logic.ports import ObjectStoreError, RunStore
from cloud.logic.verification import VerificationResult, verify_completed_mirror
from cloud.logic.verify import VerifyOptions

SERVICE = service_name("backrest-relay-verifier")
IDEMPOTENCY_EXPIRY_SECONDS = 14 * 24 * 3600
"""As long as SQS can keep a message (14 days), so every redelivery or DLQ redrive of an
event within the queue's lifetime finds the stored result."""

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)


# -- parsing -------------------------------------------------------------------------------


# The envelope, record model and error shapes are shared with the notifier.
AgentEvent = EventBridgeEnvelope
VerifyQueueRecord = EventQueueRecord
_validation_errors = validation_errors


# -- dependencies --------------------------------------------------------------------------


@dataclass
class Dependencies:
    """Everything the verifier touches outside its own code (fakes in unit tests).

    `persistence` makes one idempotency layer per idempotent step: powertools configures a
    layer from the first config it sees, so two steps must not share an instance.
    """

    runs: RunStore
    destinations: DestinationOpener
    events: EventBus
    persistence: Callable[[], BasePersistenceLayer]
    options: VerifyOptions = field(default_factory=VerifyOptions)
    host: str | None = None


def dependencies_from_env() -> Dependencies:
    """The production wiring, from the function's environment."""
    import boto3

    from cloud.integrations.runstore_dynamodb import DynamoRunStore

    runs_table = require_env("RUNS_TABLE")
    idempotency_table = require_env("IDEMPOTENCY_TABLE")
    bus = require_env("EVENT_BUS_NAME")
    secret_id = require_env("DESTINATION_SECRET_ARN")
    options = VerifyOptions(
        new_bytes_budget=env_int("VERIFY_NEW_BYTES_BUDGET", None),
        rotation_runs=env_int("VERIFY_ROTATION_RUNS", 30, minimum=1) or 30,
        concurrency=env_int("VERIFY_CONCURRENCY", 8, minimum=1) or 8,
        lock_days=env_int("OBJECT_LOCK_DAYS", None, minimum=1),
        lock_min_days=env_int("OBJECT_LOCK_MIN_DAYS", 1, minimum=0) or 0,
    )
    dynamodb = boto3.client("dynamodb")
    return Dependencies(
        runs=DynamoRunStore(runs_table, client=dynamodb),
        destinations=SecretDestinations(secret_id, warn=logger.warning),
        events=EventBridgeBus(bus),
        persistence=lambda: DynamoDBPersistenceLayer(
            table_name=idempotency_table, boto3_client=dynamodb
        ),
        options=options,
        host=f"lambda:{os.environ.get('AWS_LAMBDA_FUNCTION_NAME', 'verifier')}",
    )


# -- the use case, made idempotent ---------------------------------------------------------


def _result_from_stored(stored: dict[str, Any]) -> VerificationResult:
    detail = parse_detail(Source.VERIFIER.value, stored["detail_type"], stored["detail"])
    assert isinstance(detail, MirrorVerified | MirrorVerificationFailed)
    return detail


def _mirror_age_seconds(event: MirrorCompleted) -> float:
    finished = event.finished_at
    if finished.tzinfo is None:
        finished = finished.replace(tzinfo=UTC)
    return max((datetime.now(UTC) - finished).total_seconds(), 0.0)


class Verifier:
    """Per-container state: the dependencies and the two idempotent steps over them."""

    def __init__(self, deps: Dependencies) -> None:
        self.deps = deps
        self.verify_config = IdempotencyConfig(
            event_key_jmespath="run_id",
            # A redelivery is the same event; the same run id announcing another manifest
            # is an agent bug, and fails (→ DLQ) instead of passing as a duplicate.
            payload_validation_jmespath="manifest",
            raise_on_no_idempotency_key=True,
            expires_after_seconds=IDEMPOTENCY_EXPIRY_SECONDS,
            response_hook=self._already_verified,
        )
        self.publish_config = IdempotencyConfig(
            event_key_jmespath="detail.run_id",
            raise_on_no_idempotency_key=True,
            expires_after_seconds=IDEMPOTENCY_EXPIRY_SECONDS,
            response_hook=self._already_published,
        )
        self.verify_once: Callable[..., dict[str, Any]] = idempotent_function(
            self._verify,
            data_keyword_argument="event",
            persistence_store=deps.persistence(),
            config=self.verify_config,
            key_prefix="backrest-relay.verify-mirror",
        )
        self.publish_once: Callable[..., dict[str, Any]] = idempotent_function(
            self._publish,
            data_keyword_argument="result",
            persistence_store=deps.persistence(),
            config=self.publish_config,
            key_prefix="backrest-relay.publish-result",
        )

    def register_lambda_context(self, context: LambdaContext) -> None:
        """Lets an in-progress record expire when the invocation times out (see powertools
        idempotency "Lambda timeouts"), so a retry is not blocked until the record expires."""
        self.verify_config.register_lambda_context(context)
        self.publish_config.register_lambda_context(context)

    def handle(self, envelope: AgentEvent) -> str:
        """Verify and publish one event; returns what happened (for the batch's log)."""
        try:
            detail = parse_detail(envelope.source, envelope.detail_type, envelope.detail)
        except UnknownEventError:
            detail = None
        except ValidationError as exc:
            raise MalformedEventError(
                f"{envelope.detail_type!r} detail does not match the contract: "
                + "; ".join(_validation_errors(exc))
            ) from None
        if not isinstance(detail, MirrorCompleted):
            logger.error(
                "not a Mirror Completed event from the agent: ignored (check the rule)",
                source=envelope.source,
                detail_type=envelope.detail_type,
            )
            metrics.add_metric(name="IgnoredEvents", unit=MetricUnit.Count, value=1)
            return "ignored"
        tracer.put_annotation(key="mirror_run_id", value=detail.run_id)
        stored = self.verify_once(event=detail)
        self.publish_once(result=stored)
        return str(stored["detail_type"])

    # The idempotent steps. Their inputs are hashed by powertools (pydantic models are
    # dumped to JSON first); their outputs are stored as JSON and replayed on duplicates.

    def _verify(self, event: MirrorCompleted) -> dict[str, Any]:
        logger.info(
            "verifying mirror",
            repo=event.repo.key,
            repo_id=event.repo.id,
            destination=event.destination.describe(),
            manifest=event.manifest.key,
        )
        store, reports = self.deps.destinations(event.destination)
        result = verify_completed_mirror(
            event,
            store=store,
            runs=self.deps.runs,
            reports=reports,
            options=self.deps.options,
            host=self.deps.host,
        )
        self._emit_metrics(event, result)
        log = logger.info if isinstance(result, MirrorVerified) else logger.warning
        log(
            result.DETAIL_TYPE.value,
            verification_run_id=result.run_id,
            stats=result.stats.model_dump(mode="json"),
            problems_total=result.problems_total,
            problems=[p.model_dump(mode="json") for p in result.problems[:10]],
            report_key=result.report_key,
        )
        return {"detail_type": result.DETAIL_TYPE.value, "detail": result.model_dump(mode="json")}

    def _publish(self, result: dict[str, Any]) -> dict[str, Any]:
        event = _result_from_stored(result)
        self.deps.events.publish(event)
        logger.info("result published", detail_type=event.DETAIL_TYPE.value)
        return {"published": event.run_id}

    @staticmethod
    def _emit_metrics(event: MirrorCompleted, result: VerificationResult) -> None:
        stats = result.stats
        metrics.add_metric(name="ObjectsVerified", unit=MetricUnit.Count, value=stats.compared)
        metrics.add_metric(
            name="ObjectsDeepChecked", unit=MetricUnit.Count, value=stats.deep_checked
        )
        metrics.add_metric(name="BytesRead", unit=MetricUnit.Bytes, value=stats.bytes_read)
        metrics.add_metric(
            name="VerificationFailures",
            unit=MetricUnit.Count,
            value=0 if isinstance(result, MirrorVerified) else 1,
        )
        metrics.add_metric(
            name="MirrorAgeSeconds", unit=MetricUnit.Seconds, value=_mirror_age_seconds(event)
        )

    @staticmethod
    def _already_verified(response: Any, idempotent_data: DataRecord) -> Any:
        logger.info("duplicate delivery: already verified, not verifying again")
        metrics.add_metric(name="DuplicateDeliveries", unit=MetricUnit.Count, value=1)
        return response

    @staticmethod
    def _already_published(response: Any, idempotent_data: DataRecord) -> Any:
        logger.info("duplicate delivery: result already published")
        return response


_lock = threading.Lock()
_verifier: Verifier | None = None


def set_dependencies(deps: Dependencies | None) -> None:
    """Replace the container's dependencies (tests); None rebuilds them from the env."""
    global _verifier
    with _lock:
        _verifier = None if deps is None else Verifier(deps)


def get_verifier() -> Verifier:
    """The container's verifier, built on first use (not at import: a cold start that
    fails on configuration fails the invocation, loudly, instead of the import)."""
    global _verifier
    with _lock:
        if _verifier is None:
            _verifier = Verifier(dependencies_from_env())
        return _verifier


# -- batch ---------------------------------------------------------------------------------


class VerifyBatchProcessor(BatchProcessor):
    """`BatchProcessor` that logs and counts every failed record (the cookbook's extension
    point), including the poison pills powertools rejects before our handler runs."""

    def failure_handler(self, record: Any, exception: ExceptionInfo) -> FailureResponse:
        exc = exception[1]
        message_id = getattr(record, "messageId", None) or getattr(record, "message_id", None)
        logger.set_correlation_id(_correlation_id(record))
        if isinstance(exc, ValidationError | MalformedEventError):
            metrics.add_metric(name="MalformedEvents", unit=MetricUnit.Count, value=1)
            errors = _validation_errors(exc) if isinstance(exc, ValidationError) else [str(exc)]
            logger.error(
                "malformed message: failed, SQS will retry it and then move it to the DLQ",
                message_id=message_id,
                errors=errors,
            )
        elif isinstance(exc, IdempotencyAlreadyInProgressError):
            logger.warning(
                "another invocation is verifying this event: failed for now, SQS will "
                "redeliver it and it will get the stored result",
                message_id=message_id,
            )
        else:
            if isinstance(exc, ObjectStoreError):
                metrics.add_metric(name="DestinationUnreachable", unit=MetricUnit.Count, value=1)
            logger.error(
                "record failed: SQS will retry it (then the DLQ)",
                message_id=message_id,
                error_type=type(exc).__name__,
                error=str(exc),
                exc_info=not isinstance(exc, ObjectStoreError),
            )
        metrics.add_metric(name="RecordFailures", unit=MetricUnit.Count, value=1)
        return super().failure_handler(record, exception)


processor = VerifyBatchProcessor(
    event_type=EventType.SQS,
    model=VerifyQueueRecord,
    # A batch where every record failed is reported item by item like any other, instead
    # of as an invocation error: the retries are the same, the Errors metric stays for
    # real crashes.
    raise_on_entire_batch_failure=False,
)


_correlation_id = record_correlation_id


def record_handler(record: VerifyQueueRecord) -> str:
    # Stays set until the next record (or the end of the batch), so the failure handler's
    # log line carries it too.
    logger.set_correlation_id(_correlation_id(record))
    envelope = record.body
    with logger.append_context_keys(
        message_id=record.messageId,
        receive_count=record.attributes.ApproximateReceiveCount,
        event_id=envelope.id,
        detail_type=envelope.detail_type,
    ):
        return get_verifier().handle(envelope)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    verifier = get_verifier()
    verifier.register_lambda_context(context)
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

"""The verifier Lambda: EventBridge rule → SQS queue → this function → `Mirror Verified` or
`Mirror Verification Failed` on the bus. A damaged mirror is a verdict, not an error; an
unreadable bucket or a refused publish fails the record (SQS retries, then the DLQ).
Verification and publishing are idempotent per run. Settings and failures: docs/lambda.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import DataRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from cloud.app.verify import verify_mirror
from cloud.contracts.events import (
    EventDetail,
    MirrorCompleted,
    MirrorVerificationFailed,
    MirrorVerified,
    Source,
    parse_detail,
)
from cloud.handlers.batch import EventBatch, IdempotentStep
from cloud.handlers.common import (
    METRICS_NAMESPACE,
    DestinationOpener,
    Lazy,
    SecretDestinations,
    env_int,
    require_env,
    service_name,
)
from cloud.handlers.fanout import FanoutDispatch, fanout_from_env
from cloud.integrations.eventbus import EventBridgeBus, EventBus
from cloud.logic.ports import ObjectStoreError, RunStore
from cloud.logic.verification import VerificationResult
from cloud.logic.verify import VerifyOptions

SERVICE = service_name("backrest-relay-verifier")

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)


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
    fanout: FanoutDispatch | None = None  # large mirrors: chunks for the chunk function


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
        fanout=fanout_from_env(dynamodb),
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
        self.verify_once = IdempotentStep(
            self._verify, "backrest-relay.verify-mirror", "run_id", deps.persistence(),
            self._already_verified,
            # A redelivery is the same event; the same run id announcing another manifest
            # is an agent bug, and fails (→ DLQ) instead of passing as a duplicate.
            payload_validation_jmespath="manifest",
        )  # fmt: skip
        self.publish_once = IdempotentStep(
            self._publish, "backrest-relay.publish-result", "detail.run_id", deps.persistence(),
            self._already_published,
        )  # fmt: skip
        self.steps = (self.verify_once, self.publish_once)

    def handle(self, detail: EventDetail) -> str:
        """Verify and publish one `Mirror Completed`; returns the result's detail type."""
        assert isinstance(detail, MirrorCompleted)
        tracer.put_annotation(key="mirror_run_id", value=detail.run_id)
        if self._fanned_out(detail):
            return "fanned out"
        stored = self.verify_once(event=detail)
        self.publish_once(result=stored)
        return str(stored["detail_type"])

    def _fanned_out(self, event: MirrorCompleted) -> bool:
        """Above the fan-out threshold: the chunks are queued, and the chunk function
        publishes the result (`cloud.handlers.fanout`; idempotent on its own)."""
        if self.deps.fanout is None:
            return False
        store, _ = self.deps.destinations(event.destination)
        plan = self.deps.fanout(event, store=store, runs=self.deps.runs, options=self.deps.options)
        if plan is None:
            return False
        logger.info("fanned out", job_id=plan.job_id, chunks=plan.chunks, sent=plan.sent)
        metrics.add_metric(name="ChunksQueued", unit=MetricUnit.Count, value=plan.sent)
        return True

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
        result = verify_mirror(
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


_verifier: Lazy[Verifier] = Lazy(lambda: Verifier(dependencies_from_env()))
get_verifier = _verifier.get


def set_dependencies(deps: Dependencies | None) -> None:
    """Replace the container's dependencies (tests); None rebuilds them from the env."""
    _verifier.set(None if deps is None else Verifier(deps))


batch = EventBatch(
    logger=logger,
    metrics=metrics,
    tracer=tracer,
    use_case=get_verifier,
    accepts=(MirrorCompleted,),
    ignored_message="not a Mirror Completed event from the agent: ignored (check the rule)",
    retried={
        IdempotencyAlreadyInProgressError: "another invocation is verifying this event: "
        "failed for now, SQS will redeliver it and it will get the stored result",
    },
    quiet=(ObjectStoreError,),
    counted={ObjectStoreError: "DestinationUnreachable"},
)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return batch(event, context)

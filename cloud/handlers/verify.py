"""The verifier Lambda: EventBridge rule → SQS queue → this function → `Mirror Verified` or
`Mirror Verification Failed` on the bus. A damaged mirror is a verdict, not an error; an
unreadable bucket or a refused publish fails the record (SQS retries, then the DLQ).

A verification that does not fit one invocation stops before the timeout (its progress is
in the run store's checkpoint) and sends itself a continuation message on the verify
queue: the same event, with the message attribute `continuation_leg` = 1, 2, ...
Verification is idempotent per (run, leg), publishing per result, so neither a
redelivered event nor a duplicate continuation starts a second chain.
Settings and failures: docs/lambda.md; design: docs/verification.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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

from cloud.app.verify import verify_leg
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
    EventQueueRecord,
    Lazy,
    SecretDestinations,
    env_int,
    require_env,
    service_name,
)
from cloud.handlers.fanout import FanoutDispatch, fanout_from_env
from cloud.handlers.verdicts import count_verdict, log_verdict, verify_options_from_env
from cloud.integrations.continuations import LEG_ATTRIBUTE, SqsContinuations
from cloud.integrations.eventbus import EventBridgeBus, EventBus
from cloud.logic.ports import ContinuationQueue, ObjectStoreError, RunStore
from cloud.logic.verification import VerificationResult
from cloud.logic.verify import VerifyOptions

SERVICE = service_name("backrest-relay-verifier")

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)


DEFAULT_NEW_BYTES_BUDGET = 100 * 1024**3
"""Bytes of newly uploaded objects one verification reads back (100 GiB; beyond it the
rotation reads them within `VERIFY_ROTATION_DAYS`). Cost: docs/verification.md, "Sizing"."""


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
    # None: no continuation possible (VERIFY_QUEUE_URL unset), so every pass runs to its
    # end whatever the time, as before continuations existed.
    continuations: ContinuationQueue | None = None
    options: VerifyOptions = field(default_factory=VerifyOptions)
    host: str | None = None
    # A leg stops starting reads this long before the invocation's timeout (the reads
    # under way finish, the checkpoint is saved and the continuation sent in that time).
    safety_margin_ms: int = 120_000
    every_seconds: float = 86400.0
    rotation_budget: int = 1 << 30
    # Every object re-read at least once per this many days (None: the budget alone).
    rotation_days: float | None = 30.0
    fanout: FanoutDispatch | None = None  # large mirrors: chunks for the chunk function


def dependencies_from_env() -> Dependencies:
    """The production wiring, from the function's environment."""
    import boto3

    from cloud.integrations.runstore_dynamodb import DynamoRunStore

    runs_table = require_env("RUNS_TABLE")
    idempotency_table = require_env("IDEMPOTENCY_TABLE")
    bus = require_env("EVENT_BUS_NAME")
    secret_id = require_env("DESTINATION_SECRET_ARN")
    queue_url = os.environ.get("VERIFY_QUEUE_URL", "").strip()
    options = verify_options_from_env(
        # "" (the template's empty parameter) is unlimited; unset is the default budget.
        new_bytes_budget=(
            None
            if os.environ.get("VERIFY_NEW_BYTES_BUDGET") == ""
            else env_int("VERIFY_NEW_BYTES_BUDGET", DEFAULT_NEW_BYTES_BUDGET)
        ),
    )
    dynamodb = boto3.client("dynamodb")
    return Dependencies(
        runs=DynamoRunStore(runs_table, client=dynamodb),
        destinations=SecretDestinations(secret_id, warn=logger.warning),
        events=EventBridgeBus(bus),
        persistence=lambda: DynamoDBPersistenceLayer(
            table_name=idempotency_table, boto3_client=dynamodb
        ),
        continuations=(
            SqsContinuations(queue_url, client=boto3.client("sqs")) if queue_url else None
        ),
        options=options,
        host=f"lambda:{os.environ.get('AWS_LAMBDA_FUNCTION_NAME', 'verifier')}",
        safety_margin_ms=1000 * (env_int("VERIFY_SAFETY_MARGIN_SECONDS", 120) or 0),
        every_seconds=float(env_int("VERIFY_EVERY_SECONDS", 86400) or 0),
        rotation_budget=env_int("VERIFY_ROTATION_BUDGET", 1 << 30) or 0,
        rotation_days=env_int("VERIFY_ROTATION_DAYS", 30) or None,
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
        # Keyed by (run id, leg): a continuation is new work, a redelivery is not.
        self.verify_once = IdempotentStep(
            self._verify, "backrest-relay.verify-mirror", "key", deps.persistence(),
            self._already_verified,
            # A redelivery is the same event; the same run id announcing another manifest
            # is an agent bug, and fails (→ DLQ) instead of passing as a duplicate.
            payload_validation_jmespath="event.manifest",
        )  # fmt: skip
        self.publish_once = IdempotentStep(
            self._publish, "backrest-relay.publish-result", "detail.run_id", deps.persistence(),
            self._already_published,
        )  # fmt: skip
        self.steps = (self.verify_once, self.publish_once)

    def handle(
        self,
        detail: EventDetail,
        record: EventQueueRecord | None = None,
        context: LambdaContext | None = None,
    ) -> str:
        """Verify (one leg of) one `Mirror Completed` and publish the verdict once it is
        complete; returns the result's detail type, or "continued" / "ended"."""
        assert isinstance(detail, MirrorCompleted)
        tracer.put_annotation(key="mirror_run_id", value=detail.run_id)
        leg = continuation_leg(record)
        if leg == 0 and self._fanned_out(detail):
            return "fanned out"
        self._context = context
        stored = self.verify_once(
            job={
                "key": f"{detail.run_id}#{leg}",
                "leg": leg,
                "event": detail.model_dump(mode="json"),
            }
        )
        if "detail_type" not in stored:
            return "continued" if stored.get("continued") else "ended"
        self.publish_once(result=stored)
        return str(stored["detail_type"])

    def _should_stop(self) -> bool:
        context = getattr(self, "_context", None)
        if context is None or self.deps.continuations is None:
            return False
        return bool(context.get_remaining_time_in_millis() < self.deps.safety_margin_ms)

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

    def _verify(self, job: dict[str, Any]) -> dict[str, Any]:
        event = MirrorCompleted.model_validate(job["event"])
        leg = int(job["leg"])
        logger.info(
            "verifying mirror",
            repo=event.repo.key,
            repo_id=event.repo.id,
            destination=event.destination.describe(),
            manifest=event.manifest.key,
            leg=leg,
        )
        store, reports = self.deps.destinations(event.destination)
        outcome = verify_leg(
            event,
            leg,
            store=store,
            runs=self.deps.runs,
            reports=reports,
            continuations=self.deps.continuations or _NoContinuations(),
            options=replace(self.deps.options, should_stop=self._should_stop),
            every_seconds=self.deps.every_seconds,
            rotation_budget=self.deps.rotation_budget,
            rotation_days=self.deps.rotation_days,
            host=self.deps.host,
        )
        if outcome.continued is not None:
            checked = outcome.checked
            logger.info(
                "verification continues in the next invocation",
                next_leg=outcome.continued,
                unproven_objects=checked.unproven_objects if checked else None,
                unproven_bytes=checked.unproven_bytes if checked else None,
            )
            metrics.add_metric(name="VerifyContinuations", unit=MetricUnit.Count, value=1)
            return {"continued": outcome.continued}
        result = outcome.result
        if result is None:
            logger.info("verification chain ended", reason=outcome.ended)
            return {"ended": outcome.ended}
        self._emit_metrics(event, result)
        log_verdict(logger, result)
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
        count_verdict(metrics, result)
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


class _NoContinuations:
    def send(self, event: MirrorCompleted, leg: int) -> None:
        raise RuntimeError("VERIFY_QUEUE_URL is not set: cannot continue a verification")


def continuation_leg(record: EventQueueRecord | None) -> int:
    """0 for the agent's event, n for the n-th continuation the verifier sent itself."""
    if record is None:
        return 0
    attribute = record.messageAttributes.get(LEG_ATTRIBUTE)
    value = attribute.stringValue if attribute is not None else None
    # ASCII digits only: `str.isdigit` also accepts "²", which `int` refuses.
    return int(value) if value and value.isascii() and value.isdigit() else 0


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
    pass_record=True,
)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return batch(event, context)

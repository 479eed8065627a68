"""The chunk verifier Lambda: chunk queue → this function → (for the last chunk of a job)
`Mirror Verified` or `Mirror Verification Failed` on the bus.

Each SQS record is one `ChunkWorkItem` the verify function queued for a large mirror
(`cloud.handlers.fanout`). The function proves that chunk's key range, stores its result
and counts it done, once (`cloud.app.fanout.verify_chunk`); the invocation that completes
the last chunk adds the chunks up and publishes the result. An unreadable bucket or a
refused publish fails the record (SQS retries it alone, then the chunk DLQ). Settings and
failures: docs/lambda.md; design: docs/verification.md ("Fan-out").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import Json

from cloud.app.fanout import FanoutJobMissingError, verify_chunk
from cloud.contracts.fanout import ChunkWorkItem
from cloud.handlers.batch import EventBatch, IdempotentStep
from cloud.handlers.common import (
    METRICS_NAMESPACE,
    DestinationOpener,
    Lazy,
    SecretDestinations,
    require_env,
    service_name,
)
from cloud.handlers.verdicts import count_verdict, log_verdict, verify_options_from_env
from cloud.integrations.eventbus import EventBridgeBus, EventBus
from cloud.logic.ports import FanoutStore, ObjectStoreError, RunStore
from cloud.logic.verification import VerificationResult
from cloud.logic.verify import VerifyOptions

SERVICE = service_name("backrest-relay-verify-chunk")

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)


class ChunkQueueRecord(SqsRecordModel):
    """An SQS record whose body is one chunk's work item."""

    body: Json[ChunkWorkItem]


@dataclass
class Dependencies:
    """Everything the chunk verifier touches outside its own code (fakes in tests)."""

    runs: RunStore
    jobs: FanoutStore
    destinations: DestinationOpener
    events: EventBus
    options: VerifyOptions = field(default_factory=VerifyOptions)
    host: str | None = None


def dependencies_from_env() -> Dependencies:
    """The production wiring, from the function's environment."""
    import boto3

    from cloud.integrations.fanout_dynamodb import DynamoFanoutStore
    from cloud.integrations.runstore_dynamodb import DynamoRunStore

    runs_table = require_env("RUNS_TABLE")
    bus = require_env("EVENT_BUS_NAME")
    secret_id = require_env("DESTINATION_SECRET_ARN")
    options = verify_options_from_env()
    dynamodb = boto3.client("dynamodb")
    return Dependencies(
        runs=DynamoRunStore(runs_table, client=dynamodb),
        jobs=DynamoFanoutStore(runs_table, client=dynamodb),
        destinations=SecretDestinations(secret_id, warn=logger.warning),
        events=EventBridgeBus(bus),
        options=options,
        host=f"lambda:{os.environ.get('AWS_LAMBDA_FUNCTION_NAME', 'verify-chunk')}",
    )


class ChunkVerifier:
    """Per-container state: the dependencies. No powertools idempotency step: the job's
    items in the run store make every step idempotent (docs/verification.md)."""

    steps: Sequence[IdempotentStep] = ()

    def __init__(self, deps: Dependencies) -> None:
        self.deps = deps

    def handle(self, detail: Any) -> str:
        item = detail
        assert isinstance(item, ChunkWorkItem)
        tracer.put_annotation(key="fanout_job", value=item.job_id)
        with logger.append_context_keys(job_id=item.job_id, chunk=item.index, chunks=item.chunks):
            done = verify_chunk(
                item,
                jobs=self.deps.jobs,
                runs=self.deps.runs,
                open_destination=self.deps.destinations,
                publish=self._publish,
                options=self.deps.options,
                host=self.deps.host,
            )
            if done.verified:
                metrics.add_metric(name="ChunksVerified", unit=MetricUnit.Count, value=1)
            else:
                logger.info("chunk already done: not verified again")
                metrics.add_metric(name="DuplicateDeliveries", unit=MetricUnit.Count, value=1)
            if done.result is None:
                logger.info("chunk done", done=done.done)
                return "chunk done"
            result = done.result
            log_verdict(logger, result, published_now=done.published)
            if done.published:
                count_verdict(metrics, result)
            return result.DETAIL_TYPE.value

    def _publish(self, result: VerificationResult) -> None:
        self.deps.events.publish(result)
        logger.info("result published", detail_type=result.DETAIL_TYPE.value)


_worker: Lazy[ChunkVerifier] = Lazy(lambda: ChunkVerifier(dependencies_from_env()))
get_worker = _worker.get


def set_dependencies(deps: Dependencies | None) -> None:
    """Replace the container's dependencies (tests); None rebuilds them from the env."""
    _worker.set(None if deps is None else ChunkVerifier(deps))


batch = EventBatch(
    logger=logger,
    metrics=metrics,
    tracer=tracer,
    use_case=get_worker,
    accepts=(),
    ignored_message="",
    retried={},
    quiet=(ObjectStoreError, FanoutJobMissingError),
    counted={ObjectStoreError: "DestinationUnreachable"},
    record_model=ChunkQueueRecord,
)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return batch(event, context)

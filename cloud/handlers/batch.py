"""The shell every SQS-fed Lambda shares (verifier, notifier, chunk verifier): EventBridge
events in SQS records, parsed against the contract (or, with another `record_model`, the
work items of a queue of our own), each handed to one use case; failures logged, counted
and reported item by item, so SQS retries only the failed records (then the DLQ).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

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
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.hook import IdempotentHookFunction
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from cloud.contracts.events import EventDetail
from cloud.handlers.common import (
    EventBridgeEnvelope,
    EventQueueRecord,
    MalformedEventError,
    parse_event,
    record_correlation_id,
    record_message_id,
    validation_errors,
)

IDEMPOTENCY_EXPIRY_SECONDS = 14 * 24 * 3600
"""As long as SQS can keep a message (14 days), so every redelivery or DLQ redrive of an
event within the queue's lifetime finds what the first delivery did."""


class DeadlineNearError(RuntimeError):
    """Too little time left in the invocation to start this record."""


class IdempotentStep:
    """One step made idempotent with powertools: its output is stored and replayed on a
    duplicate. Each step needs its own persistence layer (powertools configures a layer
    from the first config it sees)."""

    def __init__(
        self,
        step: Callable[..., dict[str, Any]],
        key_prefix: str,
        event_key_jmespath: str,
        persistence: BasePersistenceLayer,
        response_hook: IdempotentHookFunction,
        *,
        payload_validation_jmespath: str = "",
    ) -> None:
        """`step` takes its data as its first argument, by keyword; `event_key_jmespath`
        picks the idempotency key out of that data."""
        self.config = IdempotencyConfig(
            event_key_jmespath=event_key_jmespath,
            payload_validation_jmespath=payload_validation_jmespath,
            raise_on_no_idempotency_key=True,
            expires_after_seconds=IDEMPOTENCY_EXPIRY_SECONDS,
            response_hook=response_hook,
        )
        self.call: Callable[..., dict[str, Any]] = idempotent_function(
            step,
            data_keyword_argument=next(iter(inspect.signature(step).parameters)),
            persistence_store=persistence,
            config=self.config,
            key_prefix=key_prefix,
        )

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        return self.call(**kwargs)


class UseCase(Protocol):
    """What the shell drives: one event in, a word for the batch's log out."""

    @property
    def steps(self) -> Sequence[IdempotentStep]:
        """The idempotent steps (each learns the invocation's deadline)."""
        ...

    def handle(self, detail: Any) -> str:
        """One event's detail (an `EventDetail` of `accepts`), or one work item."""
        ...


class EventBatch:
    """One SQS-batch Lambda over a use case.

    `accepts`: the event kinds the use case handles; any other well-formed event is logged
    as `ignored_message`, counted (``IgnoredEvents``) and acknowledged (retrying cannot
    help). `retried`: failures SQS is expected to resolve by redelivering, logged as
    warnings with their own message. `quiet`: errors logged without a traceback.
    `counted`: an extra metric per error class. `deadline_reserve_ms`: a record is not
    started with less time left (it fails at once and SQS retries it). `pass_record`: the
    use case's `handle` also gets the SQS record and the Lambda context, by keyword (the
    verifier reads its continuation leg and its remaining time from them). `record_model`:
    the SQS record with its body's model; a body that is not an EventBridge event (a work
    item) goes to the use case as it is, once the model has validated it.
    """

    def __init__(
        self,
        *,
        logger: Logger,
        metrics: Metrics,
        tracer: Tracer,
        use_case: Callable[[], UseCase],
        accepts: tuple[type[EventDetail], ...],
        ignored_message: str,
        retried: Mapping[type[BaseException], str],
        quiet: tuple[type[BaseException], ...] = (),
        counted: Mapping[type[BaseException], str] | None = None,
        deadline_reserve_ms: int | None = None,
        pass_record: bool = False,
        record_model: type[SqsRecordModel] = EventQueueRecord,
    ) -> None:
        self.logger = logger
        self.metrics = metrics
        self.use_case = use_case
        self.accepts = accepts
        self.ignored_message = ignored_message
        self.retried = dict(retried)
        self.quiet = quiet
        self.counted = dict(counted or {})
        self.deadline_reserve_ms = deadline_reserve_ms
        self.pass_record = pass_record
        self.processor = _Processor(
            self,
            event_type=EventType.SQS,
            model=record_model,
            # A batch where every record failed is reported item by item like any other,
            # instead of as an invocation error: the retries are the same, the Errors
            # metric stays for real crashes.
            raise_on_entire_batch_failure=False,
        )
        self.record_handler = tracer.capture_method(self._record)

    def __call__(self, event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
        for step in self.use_case().steps:
            # An in-progress record expires when the invocation times out (powertools
            # idempotency, "Lambda timeouts"), so a retry is not blocked until it expires.
            step.config.register_lambda_context(context)
        response = process_partial_response(
            event=event,
            record_handler=self.record_handler,
            processor=self.processor,
            context=context,
        )
        failures = response.get("batchItemFailures", [])
        self.logger.set_correlation_id(None)
        self.logger.info(
            "batch done",
            records=len(event.get("Records", [])),
            failed=[f["itemIdentifier"] for f in failures],
        )
        return response

    def _record(self, record: SqsRecordModel, lambda_context: LambdaContext | None = None) -> str:
        # Stays set until the next record (or the end of the batch), so the failure
        # handler's log line carries it too.
        self.logger.set_correlation_id(record_correlation_id(record))
        if (
            self.deadline_reserve_ms is not None
            and lambda_context is not None
            and lambda_context.get_remaining_time_in_millis() < self.deadline_reserve_ms
        ):
            raise DeadlineNearError("too little time left in this invocation")
        envelope = record.body
        if not isinstance(envelope, EventBridgeEnvelope):
            with self.logger.append_context_keys(
                message_id=record.messageId,
                receive_count=record.attributes.ApproximateReceiveCount,
            ):
                return self.use_case().handle(envelope)
        with self.logger.append_context_keys(
            message_id=record.messageId,
            receive_count=record.attributes.ApproximateReceiveCount,
            event_id=envelope.id,
            detail_type=envelope.detail_type,
        ):
            detail = parse_event(envelope)
            if not isinstance(detail, self.accepts):
                self.logger.error(
                    self.ignored_message, source=envelope.source, detail_type=envelope.detail_type
                )
                self.metrics.add_metric(name="IgnoredEvents", unit=MetricUnit.Count, value=1)
                return "ignored"
            if self.pass_record:
                handle: Callable[..., str] = self.use_case().handle
                return handle(detail, record=record, context=lambda_context)
            return self.use_case().handle(detail)

    def log_failure(self, record: Any, exc: BaseException) -> None:
        """Every failed record is logged and counted, including the poison pills
        powertools rejects before the record handler runs."""
        message_id = record_message_id(record)
        self.logger.set_correlation_id(record_correlation_id(record))
        retry_message = next((m for t, m in self.retried.items() if isinstance(exc, t)), None)
        if isinstance(exc, ValidationError | MalformedEventError):
            self.metrics.add_metric(name="MalformedEvents", unit=MetricUnit.Count, value=1)
            errors = validation_errors(exc) if isinstance(exc, ValidationError) else [str(exc)]
            self.logger.error(
                "malformed message: failed, SQS will retry it and then move it to the DLQ",
                message_id=message_id,
                errors=errors,
            )
        elif retry_message is not None:
            self.logger.warning(
                retry_message,
                message_id=message_id,
                error_type=type(exc).__name__,
                error=str(exc),
            )
        else:
            for kind, metric in self.counted.items():
                if isinstance(exc, kind):
                    self.metrics.add_metric(name=metric, unit=MetricUnit.Count, value=1)
            self.logger.error(
                "record failed: SQS will retry it (then the DLQ)",
                message_id=message_id,
                error_type=type(exc).__name__,
                error=str(exc),
                exc_info=not isinstance(exc, self.quiet),
            )
        self.metrics.add_metric(name="RecordFailures", unit=MetricUnit.Count, value=1)


class _Processor(BatchProcessor):
    """`BatchProcessor` with the shell's failure logging (the cookbook's extension point)."""

    def __init__(self, batch: EventBatch, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._batch = batch

    def failure_handler(self, record: Any, exception: ExceptionInfo) -> FailureResponse:
        self._batch.log_failure(record, exception[1] or RuntimeError("unknown failure"))
        return super().failure_handler(record, exception)

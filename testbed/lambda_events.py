"""What AWS hands a Lambda function fed by SQS: a context, and EventBridge events inside
SQS records. One set of builders for the handler tests (tests/support/lambdas.py) and the
verifier simulation (bench/verify_sim.py)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloud.contracts.events import EventDetail

REGION = "us-east-1"
ACCOUNT = "123456789012"


@dataclass
class FakeLambdaContext:
    """What Lambda passes as `context` (the parts powertools reads). The time left is
    `remaining_ms`, or what `remaining` says when given (a simulated clock)."""

    function_name: str = "backrest-relay"
    memory_limit_in_mb: int = 256
    remaining_ms: int = 120_000
    function_version: str = "$LATEST"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_stream_name: str = "2026/11/01/[$LATEST]abc"
    remaining: Callable[[], int] | None = None

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining() if self.remaining is not None else self.remaining_ms


def eventbridge_event(
    detail: EventDetail | Any,
    *,
    source: str | None = None,
    detail_type: str | None = None,
) -> dict[str, Any]:
    """The event as an EventBridge rule delivers it to an SQS target (a contract model, or
    any detail with an explicit source and detail type)."""
    if isinstance(detail, EventDetail):
        source = source or detail.SOURCE.value
        detail_type = detail_type or detail.DETAIL_TYPE.value
        detail = json.loads(detail.model_dump_json())
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": source,
        "account": ACCOUNT,
        "time": "2026-11-01T12:00:00Z",
        "region": REGION,
        "resources": [],
        "detail": detail,
    }


def event_body(event: EventDetail) -> str:
    """The SQS body carrying `event`."""
    return json.dumps(eventbridge_event(event))


def sqs_record(
    body: str,
    message_id: str | None = None,
    receive_count: int = 1,
    *,
    queue: str = "backrest-relay",
    attributes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One SQS record as Lambda's event source mapping delivers it; `attributes` are the
    message's own (numbers, as the verifier's continuation legs are sent)."""
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": "AQEB" + uuid.uuid4().hex,
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": str(receive_count),
            "SentTimestamp": "1767268800000",
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": "1767268800001",
        },
        "messageAttributes": {
            name: {
                "stringValue": value,
                "dataType": "Number",
                "stringListValues": [],
                "binaryListValues": [],
            }
            for name, value in (attributes or {}).items()
        },
        "md5OfBody": hashlib.md5(body.encode(errors="replace"), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue}",
        "awsRegion": REGION,
    }

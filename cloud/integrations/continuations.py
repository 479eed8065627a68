"""The verifier's continuation messages: a verification that did not fit one invocation
hands itself on through the verify queue (port `ContinuationQueue`).

The message body is the EventBridge event the rule would have delivered (so the handler's
parsing is the same for both); the message attribute `continuation_leg` says which leg.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cloud.contracts.events import MirrorCompleted

if TYPE_CHECKING:
    from types_boto3_sqs import SQSClient

LEG_ATTRIBUTE = "continuation_leg"


def continuation_body(event: MirrorCompleted, leg: int) -> str:
    """The EventBridge envelope of `event`, as the verify queue receives it."""
    return json.dumps(
        {
            "version": "0",
            "id": f"continuation-{event.run_id}-{leg}",
            "detail-type": event.DETAIL_TYPE.value,
            "source": event.SOURCE.value,
            "account": "",
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": "",
            "resources": [],
            "detail": event.model_dump(mode="json"),
        }
    )


class SqsContinuations:
    """Sends continuation messages to the verify queue (needs `sqs:SendMessage` on it)."""

    def __init__(self, queue_url: str, *, client: SQSClient) -> None:
        self.queue_url = queue_url
        self.client = client

    def send(self, event: MirrorCompleted, leg: int) -> None:
        self.client.send_message(
            QueueUrl=self.queue_url,
            MessageBody=continuation_body(event, leg),
            MessageAttributes={LEG_ATTRIBUTE: {"DataType": "Number", "StringValue": str(leg)}},
        )

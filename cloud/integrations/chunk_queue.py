"""The chunk queue: the verify function sends one work item per chunk of a fanned-out
verification (SQS SendMessageBatch, ten at a time); the chunk function consumes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cloud.contracts.fanout import ChunkWorkItem

if TYPE_CHECKING:
    from types_boto3_sqs import SQSClient

BATCH = 10  # the SendMessageBatch limit


class ChunkQueueError(Exception):
    """Some work items could not be sent (the verify record fails and is retried)."""


class SqsChunkQueue:
    def __init__(self, queue_url: str, client: SQSClient | None = None) -> None:
        if client is None:
            import boto3

            client = boto3.client("sqs")
        self.queue_url = queue_url
        self._client = client

    def send(self, items: Sequence[ChunkWorkItem]) -> None:
        """Send every item or raise: a retried send repeats items, which the chunk function
        takes as the redeliveries they are."""
        for start in range(0, len(items), BATCH):
            batch = items[start : start + BATCH]
            response = self._client.send_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(item.index), "MessageBody": item.model_dump_json()} for item in batch
                ],
            )
            failed = response.get("Failed", [])
            if failed:
                reasons = sorted({f.get("Code", "?") for f in failed})
                raise ChunkQueueError(
                    f"{len(failed)} of {len(batch)} chunk work items not sent: {reasons}"
                )

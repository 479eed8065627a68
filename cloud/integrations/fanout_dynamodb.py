"""Fan-out jobs in the run store's DynamoDB table (`FanoutStore`), beside the runs.

Items (`pk` HASH, `sk` RANGE, as the run store's):

- `pk = "FANOUT#<job_id>", sk = "JOB"`: `value` (the job as planned, JSON), `done` (a
  number set of the chunks done: adding an index twice leaves it as it was, so a
  redelivered chunk never counts twice, without a condition), `dispatched`, `result`
  (the result event, JSON, written once), `publisher` (who claimed the publication),
  `published`.
- `pk = "FANOUT#<job_id>", sk = "CHUNK#<index, 4 digits>"`: `value`, the chunk's result
  (JSON), written once.

Every item carries `ttl` (the table's TTL attribute): jobs age out after `JOB_TTL`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from types_boto3_dynamodb import DynamoDBClient
    from types_boto3_dynamodb.type_defs import AttributeValueTypeDef, QueryInputTypeDef

    Item = dict[str, AttributeValueTypeDef]

JOB_PREFIX = "FANOUT#"
JOB_SK = "JOB"
CHUNK_PREFIX = "CHUNK#"
JOB_TTL = timedelta(days=14)  # as long as SQS keeps a work item


def _conditional(write: Callable[[], object]) -> bool:
    """True when the write happened; False when its condition failed."""
    try:
        write()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise
    return True


class DynamoFanoutStore:
    """`FanoutStore` over the run store's table."""

    def __init__(self, table_name: str, client: DynamoDBClient | None = None) -> None:
        if client is None:
            import boto3

            client = boto3.client("dynamodb")
        self.table_name = table_name
        self._client = client

    def _key(self, job_id: str, sk: str) -> Item:
        return {"pk": {"S": JOB_PREFIX + job_id}, "sk": {"S": sk}}

    def _ttl(self) -> AttributeValueTypeDef:
        return {"N": str(int(time.time() + JOB_TTL.total_seconds()))}

    def create_job(self, job_id: str, data: dict[str, Any]) -> dict[str, Any]:
        _conditional(
            lambda: self._client.put_item(
                TableName=self.table_name,
                Item={
                    **self._key(job_id, JOB_SK),
                    "value": {"S": json.dumps(data, sort_keys=True)},
                    "ttl": self._ttl(),
                },
                ConditionExpression="attribute_not_exists(#pk)",
                ExpressionAttributeNames={"#pk": "pk"},
            )
        )
        job = self.load_job(job_id)
        assert job is not None
        return job

    def load_job(self, job_id: str) -> dict[str, Any] | None:
        item = self._client.get_item(
            TableName=self.table_name, Key=self._key(job_id, JOB_SK), ConsistentRead=True
        ).get("Item")
        if item is None:
            return None
        data: dict[str, Any] = json.loads(item["value"]["S"])
        data["done"] = sorted(int(i) for i in item.get("done", {}).get("NS", []))
        data["dispatched"] = bool(item.get("dispatched", {}).get("BOOL", False))
        result = item.get("result", {}).get("S")
        data["result"] = None if result is None else json.loads(result)
        data["published"] = bool(item.get("published", {}).get("BOOL", False))
        return data

    def _set(self, job_id: str, name: str, value: AttributeValueTypeDef, condition: str) -> bool:
        return _conditional(
            lambda: self._client.update_item(
                TableName=self.table_name,
                Key=self._key(job_id, JOB_SK),
                UpdateExpression="SET #a = :v",
                ConditionExpression=condition,
                ExpressionAttributeNames={"#a": name, "#pk": "pk"},
                ExpressionAttributeValues={":v": value},
            )
        )

    def mark_dispatched(self, job_id: str) -> None:
        self._set(job_id, "dispatched", {"BOOL": True}, "attribute_exists(#pk)")

    def complete_chunk(self, job_id: str, index: int, result: dict[str, Any]) -> int:
        # The result first, then the count: a crash in between leaves a stored result
        # and an uncounted chunk, which its redelivery counts (the result stays the first).
        _conditional(
            lambda: self._client.put_item(
                TableName=self.table_name,
                Item={
                    **self._key(job_id, f"{CHUNK_PREFIX}{index:04d}"),
                    "value": {"S": json.dumps(result, sort_keys=True)},
                    "ttl": self._ttl(),
                },
                ConditionExpression="attribute_not_exists(#pk)",
                ExpressionAttributeNames={"#pk": "pk"},
            )
        )
        response = self._client.update_item(
            TableName=self.table_name,
            Key=self._key(job_id, JOB_SK),
            UpdateExpression="ADD #done :index",
            ConditionExpression="attribute_exists(#pk)",
            ExpressionAttributeNames={"#done": "done", "#pk": "pk"},
            ExpressionAttributeValues={":index": {"NS": [str(index)]}},
            ReturnValues="ALL_NEW",  # (UPDATED_NEW may leave out a set left unchanged)
        )
        return len(response["Attributes"]["done"].get("NS", []))

    def chunk_results(self, job_id: str) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        start: Item | None = None
        while True:
            params: QueryInputTypeDef = {
                "TableName": self.table_name,
                "KeyConditionExpression": "#pk = :pk AND begins_with(#sk, :chunk)",
                "ExpressionAttributeNames": {"#pk": "pk", "#sk": "sk"},
                "ExpressionAttributeValues": {
                    ":pk": {"S": JOB_PREFIX + job_id},
                    ":chunk": {"S": CHUNK_PREFIX},
                },
                "ConsistentRead": True,
            }
            if start is not None:
                params["ExclusiveStartKey"] = start
            page = self._client.query(**params)
            results.extend(json.loads(item["value"]["S"]) for item in page["Items"])
            start = page.get("LastEvaluatedKey")
            if start is None:
                return results

    def save_result(self, job_id: str, result: dict[str, Any]) -> dict[str, Any]:
        self._set(
            job_id,
            "result",
            {"S": json.dumps(result, sort_keys=True)},
            "attribute_exists(#pk) AND attribute_not_exists(#a)",
        )
        job = self.load_job(job_id)
        assert job is not None and job["result"] is not None
        stored: dict[str, Any] = job["result"]
        return stored

    def claim_publication(self, job_id: str, claimer: str) -> bool:
        return self._set(
            job_id,
            "publisher",
            {"S": claimer},
            "attribute_exists(#pk) AND (attribute_not_exists(#a) OR #a = :v)",
        )

    def mark_published(self, job_id: str) -> None:
        self._set(job_id, "published", {"BOOL": True}, "attribute_exists(#pk)")

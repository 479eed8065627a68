"""The run store of cloud mode: one DynamoDB table, single-table design; idempotent and
order-insensitive because SQS delivers at least once. Item layout and why: docs/lambda.md.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from cloud.integrations.runstore_codec import (
    detail_from_json,
    detail_to_json,
    dt_from_text,
    dt_to_text,
    is_verification,
    is_verified,
    normalize,
    parse_kind,
    parse_status,
)
from cloud.logic.ports import RepoStatus, RunRecord

if TYPE_CHECKING:
    from types_boto3_dynamodb import DynamoDBClient
    from types_boto3_dynamodb.type_defs import (
        AttributeValueTypeDef,
        QueryInputTypeDef,
        TransactWriteItemTypeDef,
        UniversalAttributeValueTypeDef,
    )

    Item = dict[str, AttributeValueTypeDef]

REPO_PREFIX = "REPO#"
RUN_PREFIX = "RUN#"
LATEST_VERIFIED_SK = "LATEST#VERIFIED"
META_SK = "META"
CHECKPOINT_PREFIX = "CHECKPOINT#"
BINDING_SK = "BINDING"
TTL_ATTRIBUTE = "ttl"
RUN_TTL = timedelta(days=400)
TRANSACTION_ATTEMPTS = 5


def create_table(client: DynamoDBClient, name: str, *, enable_ttl: bool = True) -> None:
    """Create the table as the SAM template does, for tests and the local demo."""
    client.create_table(
        TableName=name,
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    client.get_waiter("table_exists").wait(
        TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )
    if enable_ttl:
        client.update_time_to_live(
            TableName=name,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
        )


def _pk(repo_key: str) -> str:
    return REPO_PREFIX + repo_key


def _key(repo_key: str, sk: str) -> Item:
    return {"pk": {"S": _pk(repo_key)}, "sk": {"S": sk}}


def _str(item: Item, name: str) -> str | None:
    value = item.get(name)
    return None if value is None else value.get("S")


def _req(item: Item, name: str) -> str:
    value = _str(item, name)
    if value is None:
        raise ValueError(f"run store item {_str(item, 'sk')!r} lacks attribute {name!r}")
    return value


def _run_item(run: RunRecord, sk: str, *, with_ttl: bool) -> Item:
    item: Item = {
        **_key(run.repo_key, sk),
        "repo_key": {"S": run.repo_key},
        "run_id": {"S": run.run_id},
        "kind": {"S": run.kind},
        "status": {"S": run.status},
        "started_at": {"S": dt_to_text(run.started_at)},
        "finished_at": {"S": dt_to_text(run.finished_at)},
        "detail": {"S": detail_to_json(run.detail)},
    }
    for name, value in (
        ("repo_id", run.repo_id),
        ("host", run.host),
        ("mirror_run_id", run.mirror_run_id),
    ):
        if value is not None:
            item[name] = {"S": value}
    if with_ttl:
        expires = int((run.finished_at + RUN_TTL).timestamp())
        item[TTL_ATTRIBUTE] = {"N": str(expires)}
    return item


def _run_from_item(item: Item) -> RunRecord:
    return RunRecord(
        repo_key=_req(item, "repo_key"),
        run_id=_req(item, "run_id"),
        kind=parse_kind(_req(item, "kind")),
        status=parse_status(_req(item, "status")),
        started_at=dt_from_text(_req(item, "started_at")),
        finished_at=dt_from_text(_req(item, "finished_at")),
        repo_id=_str(item, "repo_id"),
        host=_str(item, "host"),
        mirror_run_id=_str(item, "mirror_run_id"),
        detail=detail_from_json(_str(item, "detail") or "{}"),
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _cancellation_reasons(exc: ClientError) -> list[str]:
    """One code per transaction item ("None" where that item was fine); [] if not cancelled."""
    if _error_code(exc) != "TransactionCanceledException":
        return []
    return [str(r.get("Code", "")) for r in exc.response.get("CancellationReasons") or []]


class DynamoRunStore:
    """`RunStore` over the table `table_name`; the boto3 client is thread-safe, so is this."""

    def __init__(self, table_name: str, client: DynamoDBClient | None = None) -> None:
        if client is None:
            import boto3

            client = boto3.client("dynamodb")
        self.table_name = table_name
        self._client = client

    # -- writes ------------------------------------------------------------------------------

    def record(self, run: RunRecord) -> None:
        run = normalize(run)
        values: dict[str, UniversalAttributeValueTypeDef] = {
            ":inc": {"N": "1" if is_verification(run) else "0"},
            ":repo_key": {"S": run.repo_key},
        }
        update = "ADD #verifications :inc SET #repo_key = :repo_key"
        names = {"#verifications": "verifications", "#repo_key": "repo_key"}
        if run.repo_id is not None:
            update += ", #repo_id = if_not_exists(#repo_id, :repo_id)"
            names["#repo_id"] = "repo_id"
            values[":repo_id"] = {"S": run.repo_id}
        transact_items: list[TransactWriteItemTypeDef] = [
            {
                "Put": {
                    "TableName": self.table_name,
                    "Item": _run_item(run, RUN_PREFIX + run.run_id, with_ttl=True),
                    "ConditionExpression": "attribute_not_exists(#sk)",
                    "ExpressionAttributeNames": {"#sk": "sk"},
                }
            },
            {
                "Update": {
                    "TableName": self.table_name,
                    "Key": _key(run.repo_key, META_SK),
                    "UpdateExpression": update,
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": values,
                }
            },
        ]
        stored: RunRecord | None = run
        for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
            try:
                self._client.transact_write_items(TransactItems=transact_items)
                break
            except ClientError as exc:
                reasons = _cancellation_reasons(exc)
                if reasons[:1] == ["ConditionalCheckFailed"]:
                    # Already recorded: the first record wins. Re-apply its pointers in case
                    # the first attempt died between the transaction and the pointer writes.
                    stored = self.get(run.repo_key, run.run_id)
                    break
                # Two runs of one repository recorded at once both update META; DynamoDB
                # cancels one with TransactionConflict, and botocore does not retry that.
                if "TransactionConflict" in reasons and attempt < TRANSACTION_ATTEMPTS:
                    time.sleep(random.uniform(0, 0.05 * 2**attempt))
                    continue
                raise
        if stored is not None:
            self._advance_pointers(stored)

    def _advance_pointers(self, run: RunRecord) -> None:
        names = {"#latest": "latest_run_id"}
        values: dict[str, UniversalAttributeValueTypeDef] = {":run_id": {"S": run.run_id}}
        update = "SET #latest = :run_id"
        if run.repo_id is not None:
            update += ", #repo_id = :repo_id"
            names["#repo_id"] = "repo_id"
            values[":repo_id"] = {"S": run.repo_id}
        self._conditional(
            lambda: self._client.update_item(
                TableName=self.table_name,
                Key=_key(run.repo_key, META_SK),
                UpdateExpression=update,
                ConditionExpression="attribute_not_exists(#latest) OR #latest < :run_id",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        )
        if is_verified(run):
            self._conditional(
                lambda: self._client.put_item(
                    TableName=self.table_name,
                    Item=_run_item(run, LATEST_VERIFIED_SK, with_ttl=False),
                    ConditionExpression="attribute_not_exists(#run_id) OR #run_id < :new",
                    ExpressionAttributeNames={"#run_id": "run_id"},
                    ExpressionAttributeValues={":new": {"S": run.run_id}},
                )
            )

    @staticmethod
    def _conditional(write: Callable[[], object]) -> None:
        """A failed condition means a newer (or the same) run is already there: not an error."""
        try:
            write()
        except ClientError as exc:
            if _error_code(exc) != "ConditionalCheckFailedException":
                raise

    def mark_stale_alerted(self, repo_key: str, at: datetime | None) -> None:
        """Creates the META item if needed: the watchdog may alert on a repository that never
        had a verified run."""
        names = {"#repo_key": "repo_key", "#stale": "stale_alerted_at"}
        values: dict[str, UniversalAttributeValueTypeDef] = {":repo_key": {"S": repo_key}}
        if at is None:
            update = "SET #repo_key = :repo_key REMOVE #stale"
        else:
            update = "SET #repo_key = :repo_key, #stale = :at"
            values[":at"] = {"S": dt_to_text(at, "stale_alerted_at")}
        self._client.update_item(
            TableName=self.table_name,
            Key=_key(repo_key, META_SK),
            UpdateExpression=update,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    # -- reads (strongly consistent: a handler reads back what it just recorded) -------------

    def load_checkpoint(self, repo_key: str, name: str) -> dict[str, Any] | None:
        response = self._client.get_item(
            TableName=self.table_name,
            Key=_key(repo_key, CHECKPOINT_PREFIX + name),
            ConsistentRead=True,
        )
        item = response.get("Item")
        raw = None if item is None else _str(item, "value")
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def save_checkpoint(self, repo_key: str, name: str, data: dict[str, Any]) -> None:
        self._client.put_item(
            TableName=self.table_name,
            Item={
                **_key(repo_key, CHECKPOINT_PREFIX + name),
                "value": {"S": json.dumps(data, sort_keys=True)},
            },
        )

    def load_binding(self, repo_key: str) -> dict[str, Any] | None:
        item = self._client.get_item(
            TableName=self.table_name, Key=_key(repo_key, BINDING_SK), ConsistentRead=True
        ).get("Item")
        return None if item is None else _binding_value(item)

    def bind(self, repo_key: str, data: dict[str, Any]) -> dict[str, Any]:
        """A conditional put (`attribute_not_exists`): of two first verifications racing,
        one binds; the other reads back the binding in force."""
        try:
            self._client.put_item(
                TableName=self.table_name,
                Item={
                    **_key(repo_key, BINDING_SK),
                    "value": {"S": json.dumps(data, sort_keys=True)},
                },
                ConditionExpression="attribute_not_exists(#sk)",
                ExpressionAttributeNames={"#sk": "sk"},
            )
        except ClientError as exc:
            if _error_code(exc) != "ConditionalCheckFailedException":
                raise
            stored = self.load_binding(repo_key)
            if stored is None:  # unbound between the two calls: try once more
                return self.bind(repo_key, data)
            return stored
        return dict(json.loads(json.dumps(data, sort_keys=True)))

    def unbind(self, repo_key: str) -> bool:
        response = self._client.delete_item(
            TableName=self.table_name, Key=_key(repo_key, BINDING_SK), ReturnValues="ALL_OLD"
        )
        return bool(response.get("Attributes"))

    def get(self, repo_key: str, run_id: str) -> RunRecord | None:
        return self._get_run(repo_key, RUN_PREFIX + run_id)

    def latest_verified(self, repo_key: str) -> RunRecord | None:
        return self._get_run(repo_key, LATEST_VERIFIED_SK)

    def verification_count(self, repo_key: str) -> int:
        item = self._client.get_item(
            TableName=self.table_name,
            Key=_key(repo_key, META_SK),
            ConsistentRead=True,
            ProjectionExpression="#v",
            ExpressionAttributeNames={"#v": "verifications"},
        ).get("Item")
        return _count(item)

    def runs(self, repo_key: str, limit: int = 50) -> list[RunRecord]:
        result: list[RunRecord] = []
        start: Item | None = None
        while len(result) < limit:
            params: QueryInputTypeDef = {
                "TableName": self.table_name,
                "KeyConditionExpression": "#pk = :pk AND begins_with(#sk, :run)",
                "ExpressionAttributeNames": {"#pk": "pk", "#sk": "sk"},
                "ExpressionAttributeValues": {
                    ":pk": {"S": _pk(repo_key)},
                    ":run": {"S": RUN_PREFIX},
                },
                "ScanIndexForward": False,
                "Limit": limit - len(result),
                "ConsistentRead": True,
            }
            if start is not None:
                params["ExclusiveStartKey"] = start
            page = self._client.query(**params)
            result.extend(_run_from_item(item) for item in page["Items"])
            start = page.get("LastEvaluatedKey")
            if start is None:
                break
        return result

    def repos(self) -> Iterator[RepoStatus]:
        """Scans for META items (one per repository); the scan still reads every item, which
        TTL keeps bounded. A sparse index would make it O(repositories) if that ever matters."""
        metas: list[Item] = []
        paginator = self._client.get_paginator("scan")
        for page in paginator.paginate(
            TableName=self.table_name,
            FilterExpression="#sk = :meta",
            ExpressionAttributeNames={"#sk": "sk"},
            ExpressionAttributeValues={":meta": {"S": META_SK}},
            ConsistentRead=True,
        ):
            metas.extend(page["Items"])
        metas.sort(key=lambda item: _req(item, "pk"))
        for meta in metas:
            repo_key = _req(meta, "pk").removeprefix(REPO_PREFIX)
            latest = self.runs(repo_key, limit=1)
            stale = _str(meta, "stale_alerted_at")
            yield RepoStatus(
                repo_key=repo_key,
                repo_id=_str(meta, "repo_id"),
                latest_run=latest[0] if latest else None,
                latest_verified=self.latest_verified(repo_key),
                verifications=_count(meta),
                stale_alerted_at=None if stale is None else dt_from_text(stale),
            )

    def _get_run(self, repo_key: str, sk: str) -> RunRecord | None:
        item = self._client.get_item(
            TableName=self.table_name, Key=_key(repo_key, sk), ConsistentRead=True
        ).get("Item")
        return None if item is None else _run_from_item(item)


def _binding_value(item: Item) -> dict[str, Any]:
    """A binding item that is not a JSON object is damage, not "unbound" (reading it as
    absent would let the next event re-bind the repository)."""
    try:
        value = json.loads(_req(item, "value"))
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError("run store BINDING item's value is not a JSON object")
    return value


def _count(item: Item | None) -> int:
    if item is None:
        return 0
    value = item.get("verifications", {}).get("N")
    return 0 if value is None else int(value)

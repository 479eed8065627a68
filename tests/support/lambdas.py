"""Feeding the Lambda handlers the way AWS does, for every handler test: a context,
EventBridge events inside SQS records, the handlers' JSON output read back, a moto
account, an SQS queue polled like Lambda's event source mapping, and a mirror (objects
plus manifest) for the verifier to prove."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities import parameters
from moto import mock_aws

from cloud.contracts.destination import Destination
from cloud.contracts.events import EventDetail, ManifestRef, MirrorCompleted, MirrorStats, RepoRef
from cloud.contracts.ids import new_run_id
from cloud.contracts.manifest import ManifestHeader, manifest_key
from testbed.agent import agent_config_in, run_agent, upload_args
from testbed.lambda_events import ACCOUNT as ACCOUNT  # re-exported for the handler tests
from testbed.lambda_events import REGION, FakeLambdaContext, event_body, sqs_record
from testbed.lambda_events import eventbridge_event as eventbridge_event  # re-exported
from testbed.s3.endpoint import S3Endpoint

IDEMPOTENCY_TABLE = "backrest-relay-idempotency"
RUNS_TABLE = "backrest-relay-runs"
BUS = "backrest-relay"


# -- events in SQS records -------------------------------------------------------------------


def record_for(detail: EventDetail, message_id: str | None = None) -> dict[str, Any]:
    return sqs_record(event_body(detail), message_id)


def sqs_event(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


def sqs_batch(bodies: list[str], prefix: str = "m") -> dict[str, Any]:
    """A batch with message ids `m-0`, `m-1`..."""
    return sqs_event(*(sqs_record(body, f"{prefix}-{i}") for i, body in enumerate(bodies)))


def failed_ids(response: dict[str, Any]) -> list[str]:
    return [f["itemIdentifier"] for f in response["batchItemFailures"]]


# -- what the handlers print -----------------------------------------------------------------


class _CurrentStdout:
    """Writes to whatever `sys.stdout` is now: the powertools loggers bound the stream they
    saw at import, and pytest swaps stdout per test phase (capsys)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@contextmanager
def logs_to_current_stdout(*loggers: Logger) -> Iterator[None]:
    """Point the handlers' loggers at pytest's stdout while inside."""
    handlers: list[logging.StreamHandler[Any]] = []
    for logger in loggers:
        handler = logger.registered_handler
        assert isinstance(handler, logging.StreamHandler)
        handlers.append(handler)
    originals = [handler.setStream(_CurrentStdout()) for handler in handlers]
    try:
        yield
    finally:
        for handler, original in zip(handlers, originals, strict=True):
            handler.setStream(original or sys.__stdout__)


@dataclass
class Output:
    """The JSON log lines and the EMF metric blobs a handler printed."""

    logs: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    raw: str = ""

    def metric_values(self, name: str) -> list[float]:
        values: list[float] = []
        for blob in self.metrics:
            if name in blob:
                value = blob[name]
                values.extend(value if isinstance(value, list) else [value])
        return values

    def lines(self, message: str) -> list[dict[str, Any]]:
        return [line for line in self.logs if str(line["message"]).startswith(message)]

    def messages(self, level: str | None = None) -> list[str]:
        return [
            str(line["message"]) for line in self.logs if level is None or line["level"] == level
        ]


def parse_output(raw: str) -> Output:
    logs: list[dict[str, Any]] = []
    emf: list[dict[str, Any]] = []
    for line in raw.splitlines():
        if line.startswith("{"):
            blob = json.loads(line)
            (emf if "_aws" in blob else logs).append(blob)
    return Output(logs, emf, raw)


def read_output(capsys: pytest.CaptureFixture[str]) -> Output:
    return parse_output(capsys.readouterr().out)


# -- AWS in moto -----------------------------------------------------------------------------


def agent_aws_env(region: str = REGION) -> dict[str, str]:
    """The AWS chain an agent subprocess's EventBridge client uses (never the bucket's keys)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": region,
    }


def fake_aws_env(
    monkeypatch: pytest.MonkeyPatch,
    region: str = REGION,
    *,
    drop: Sequence[str] = ("AWS_PROFILE", "AWS_ENDPOINT_URL"),
    **settings: str,
) -> None:
    """Fake credentials and region, plus a test's own settings, with `drop` unset, so
    nothing a test runs can reach a real account."""
    for name in drop:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**agent_aws_env(region), **settings}.items():
        monkeypatch.setenv(name, value)


def moto_function_env(monkeypatch: pytest.MonkeyPatch, endpoint_url: str, **settings: str) -> None:
    """A function's environment as the template sets it (tables, bus), its own AWS access
    pointed at moto's server, plus the function's `settings`."""
    fake_aws_env(
        monkeypatch,
        REGION,
        drop=("AWS_PROFILE",),
        AWS_ENDPOINT_URL=endpoint_url,
        AWS_REGION=REGION,
        RUNS_TABLE=RUNS_TABLE,
        IDEMPOTENCY_TABLE=IDEMPOTENCY_TABLE,
        EVENT_BUS_NAME=BUS,
        **settings,
    )


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A moto account with fake credentials; nothing can reach a real one."""
    endpoints = [n for n in os.environ if n.startswith("AWS_ENDPOINT_URL")]
    fake_aws_env(
        monkeypatch,
        drop=(*endpoints, "AWS_PROFILE"),
        AWS_SESSION_TOKEN="testing",
        AWS_REGION=REGION,
    )
    with mock_aws():
        parameters.clear_caches()  # type: ignore[no-untyped-call]
        yield
    parameters.clear_caches()  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def dynamo_client() -> Iterator[Any]:
    """One moto DynamoDB for a test module (starting moto and a client costs ~0.3 s each
    time), with fake credentials and region so nothing can reach a real account."""
    with pytest.MonkeyPatch.context() as mp:
        fake_aws_env(
            mp,
            "us-east-1",
            drop=("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_DYNAMODB"),
            AWS_SESSION_TOKEN="testing",
            AWS_REGION="us-east-1",
        )
        with mock_aws():
            yield boto3.client("dynamodb", region_name="us-east-1")


def create_idempotency_table(dynamodb: Any, name: str = IDEMPOTENCY_TABLE) -> None:
    """The powertools idempotency table (partition key `id`)."""
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


@pytest.fixture
def idempotency_client(aws: None) -> Any:
    """A DynamoDB client on the moto account, with the idempotency table."""
    import boto3

    client = boto3.client("dynamodb", region_name=REGION)
    create_idempotency_table(client)
    return client


def moto_clients(endpoint_url: str) -> dict[str, Any]:
    """boto3 client arguments for moto's server."""
    return {
        "endpoint_url": endpoint_url,
        "region_name": REGION,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }


@dataclass
class MotoAws:
    """Clients of moto's server (at `url`), for building what the template deploys."""

    url: str
    events: Any
    sqs: Any
    sns: Any
    dynamodb: Any
    secrets: Any

    @classmethod
    def at(cls, endpoint_url: str) -> MotoAws:
        kwargs = moto_clients(endpoint_url)
        return cls(
            endpoint_url,
            events=boto3.client("events", **kwargs),
            sqs=boto3.client("sqs", **kwargs),
            sns=boto3.client("sns", **kwargs),
            dynamodb=boto3.client("dynamodb", **kwargs),
            secrets=boto3.client("secretsmanager", **kwargs),
        )


@dataclass
class Queues:
    """SQS on moto, as the functions' event source mappings use it."""

    sqs: Any

    def create(self, name: str, **attributes: str) -> tuple[str, str]:
        """A queue's URL and ARN."""
        queue_url = self.sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
        return queue_url, arn["Attributes"]["QueueArn"]

    def with_dlq(
        self, name: str, *, max_receive: int, **attributes: str
    ) -> tuple[tuple[str, str], tuple[str, str]]:
        """A queue redriven to its own `NAME-dlq` after `max_receive` receives, as the
        template wires the function queues: ((URL, ARN), (DLQ URL, DLQ ARN))."""
        dlq = self.create(f"{name}-dlq")
        redrive = {"deadLetterTargetArn": dlq[1], "maxReceiveCount": str(max_receive)}
        return self.create(name, **attributes, RedrivePolicy=json.dumps(redrive)), dlq

    def deliver(
        self,
        handler: Callable[[dict[str, Any], Any], Any],
        queue_url: str,
        queue_arn: str,
        context: FakeLambdaContext,
        *,
        max_messages: int = 10,
    ) -> dict[str, Any] | None:
        """One poll of Lambda's event source mapping: receive, invoke, delete successes."""
        messages = self.sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=max_messages,
            AttributeNames=["All"],
            WaitTimeSeconds=0,
        ).get("Messages", [])
        if not messages:
            return None
        records = [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m["Attributes"],
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            }
            for m in messages
        ]
        response: dict[str, Any] = handler({"Records": records}, context)
        failed = set(failed_ids(response))
        for message in messages:
            if message["MessageId"] not in failed:
                self.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        response["delivered"] = [m["MessageId"] for m in messages]
        return response

    def drain(self, queue_url: str) -> list[dict[str, Any]]:
        """Every message body (JSON) on the queue, removed from it."""
        out: list[dict[str, Any]] = []
        while True:
            messages = self.sqs.receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
            ).get("Messages", [])
            if not messages:
                return out
            for message in messages:
                out.append(json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])

    def peek_bodies(self, queue_url: str) -> list[str]:
        """The bodies waiting on the queue, left there (visibility 0)."""
        messages = self.sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=0
        ).get("Messages", [])
        return [m["Body"] for m in messages]


# -- a mirror to verify ----------------------------------------------------------------------


def write_mirror(
    put: Callable[[str, bytes], object],
    destination: Destination,
    *,
    seed: int,
    objects: int = 6,
    guid: str | None = None,
    index: bool = False,
    new_snapshots: Sequence[str] = (),
) -> tuple[MirrorCompleted, list[str]]:
    """A restic-like mirror (config, data packs, optionally an index, a snapshot) and its
    manifest, written through `put(key, bytes)`; returns the `Mirror Completed` event
    announcing it and the objects' full keys."""
    rng = random.Random(seed)
    run_id = new_run_id()
    files: list[tuple[str, bytes]] = [("config", rng.randbytes(155))]
    for _ in range(objects):
        data = rng.randbytes(rng.randint(10, 4000))
        sha = hashlib.sha256(data).hexdigest()
        files.append((f"data/{sha[:2]}/{sha}", data))
    if index:
        index_file = rng.randbytes(300)
        files.append((f"index/{hashlib.sha256(index_file).hexdigest()}", index_file))
    snapshot = rng.randbytes(200)
    files.append((f"snapshots/{hashlib.sha256(snapshot).hexdigest()}", snapshot))
    files.sort()
    keys, lines = [], []
    for key, data in files:
        put(destination.key(key), data)
        keys.append(destination.key(key))
        entry = {
            "key": key,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
            "uploaded": True,
        }
        lines.append(json.dumps(entry))
    now = datetime.now(UTC)
    header = ManifestHeader(
        run_id=run_id,
        repo_guid=guid,
        repo_id="home",
        bucket=destination.bucket,
        prefix=destination.prefix,
        created_at=now,
        objects=len(files),
    )
    body = gzip.compress(("\n".join([header.model_dump_json(), *lines]) + "\n").encode(), mtime=0)
    mkey = manifest_key(f".backrest-relay/{guid or 'home'}/manifests", run_id)
    put(mkey, body)
    event = MirrorCompleted(
        run_id=run_id,
        repo=RepoRef(id="home", guid=guid, path="/srv/restic/home"),
        host="nas",
        trigger="CONDITION_CHECK_SUCCESS",
        destination=destination,
        started_at=now - timedelta(minutes=5),
        finished_at=now - timedelta(minutes=1),
        stats=MirrorStats(files=len(files), uploaded_files=len(files)),
        manifest=ManifestRef(
            key=mkey,
            sha256=hashlib.sha256(body).hexdigest(),
            objects=len(files),
            created_by_run=run_id,
        ),
        new_snapshots=list(new_snapshots),
        new_snapshots_total=len(new_snapshots),
    )
    return event, keys


def bus_to_queue(
    region: str, queue: str, pattern: dict[str, Any], *, bus: str = BUS, rule: str | None = None
) -> tuple[Any, str]:
    """Create the event bus and a rule routing `pattern` to a new SQS queue (what the SAM
    template wires for the results/notify queues); returns the SQS client and queue URL."""
    events = boto3.client("events", region_name=region)
    sqs = boto3.client("sqs", region_name=region)
    events.create_event_bus(Name=bus)
    url: str = sqs.create_queue(QueueName=queue)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    route(events, [(rule or queue, pattern, arn)], bus=bus)
    return sqs, url


def route(events: Any, rules: Iterable[tuple[str, dict[str, Any], str]], *, bus: str = BUS) -> None:
    """Put each rule (name, event pattern, target queue ARN) on the bus."""
    for rule, pattern, arn in rules:
        events.put_rule(Name=rule, EventBusName=bus, EventPattern=json.dumps(pattern))
        events.put_targets(Rule=rule, EventBusName=bus, Targets=[{"Id": "q", "Arn": arn}])


def s3_destination_secret(
    secrets: Any, endpoint: S3Endpoint, secret_access_key: str, region: str = REGION
) -> dict[str, Any]:
    """Create the verifier's destination secret for an S3-compatible endpoint (moto's)."""
    fields = {
        "provider": "s3",
        "endpoint_url": endpoint.endpoint_url,
        "region": region,
        "access_key_id": endpoint.access_key,
        "secret_access_key": secret_access_key,
    }
    response: dict[str, Any] = secrets.create_secret(
        Name="backrest-relay/destination", SecretString=json.dumps(fields)
    )
    return response


def agent_config_on_bus(directory: Path, endpoint: S3Endpoint, bucket: str) -> Path:
    """An agent config (in `directory`) mirroring to `bucket` and publishing its events
    to the bus on moto's server."""
    return agent_config_in(
        directory,
        endpoint,
        bucket,
        events={
            "publisher": "eventbridge",
            "event_bus": BUS,
            "region": REGION,
            "endpoint_url": endpoint.endpoint_url,
        },
    )


def agent_upload(repo: Path, config: Path, guid: str, region: str = REGION) -> dict[str, Any]:
    """One run of the real agent as Backrest's hook runs it (publishing to EventBridge in
    moto); its `--json` summary."""
    result = run_agent(
        upload_args(config, repo, repo_guid=guid, trigger="CONDITION_CHECK_SUCCESS"),
        env=agent_aws_env(region),
    )
    assert result.returncode == 0, result.stderr
    return result.summary


def aws_destination_secret(
    secrets: Any, name: str, region: str, access_key_id: str, secret_access_key: str
) -> dict[str, Any]:
    """Create the verifier's destination secret for AWS S3 itself (provider `aws`)."""
    fields = {"provider": "aws", "region": region, "access_key_id": access_key_id}
    fields["secret_access_key"] = secret_access_key
    response: dict[str, Any] = secrets.create_secret(Name=name, SecretString=json.dumps(fields))
    return response

"""The fan-out path end to end on moto's server (ThreadedMotoServer, reached over HTTP).

A mirror and its manifest are written to moto's S3 and `Mirror Completed` is put on the
bus; the template's rule sends it to the verify queue; the verify handler, with its
production wiring (`dependencies_from_env`) and `CHUNK_QUEUE_URL` set, plans the chunks
in the run store (DynamoDB) and queues one work item per chunk; the chunk handler is fed
the chunk queue's real messages the way Lambda's event source mapping does (successes
deleted, reported failures left to come back), and the one result reaches a results
queue through a rule on `backrest-relay.verifier`.
"""

from __future__ import annotations

import os

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aws_lambda_powertools.utilities import parameters

from cloud.contracts.destination import Destination
from cloud.contracts.events import MirrorCompleted
from cloud.handlers import verify as verify_handler
from cloud.handlers import verify_chunk as chunk_handler
from cloud.integrations.eventbus import EventBridgeBus
from cloud.integrations.fanout_dynamodb import DynamoFanoutStore
from cloud.integrations.runstore_dynamodb import DynamoRunStore, create_table
from cloud.logic.fanout import FanoutJob, job_id
from cloud.logic.ports import ListedObject, ObjectStore, ObjectStoreError, ReportSink
from testbed.s3.endpoint import S3Endpoint
from tests.infra.conftest import load_sam_template
from tests.support.lambdas import (
    BUS,
    REGION,
    RUNS_TABLE,
    FakeLambdaContext,
    MotoAws,
    Queues,
    create_idempotency_table,
    logs_to_current_stdout,
    moto_function_env,
    route,
    s3_destination_secret,
    write_mirror,
)

GUID = "f0" * 32
PREFIX = "restic/home"
OBJECTS = 40
# Every object weighs its size (all are new) + 64 KiB: about four objects per chunk.
CHUNK_BYTES = "280000"


@pytest.fixture(autouse=True, scope="module")
def logs_on_pytest_stdout() -> Iterator[None]:
    with logs_to_current_stdout(verify_handler.logger, chunk_handler.logger):
        yield


class CountingStore:
    """The chunk function's view of the bucket, recording every object read and failing
    the reads of one key a number of times (a chunk cut off half-way)."""

    def __init__(self, store: ObjectStore, reads: list[str], fail: dict[str, int]) -> None:
        self.store, self.reads, self.fail = store, reads, fail

    @property
    def list_requests(self) -> int:
        return self.store.list_requests

    def list(self, prefix: str) -> Iterator[ListedObject]:
        return self.store.list(prefix)

    def read(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        if self.fail.get(key, 0) > 0:
            self.fail[key] -= 1
            raise ObjectStoreError(f"reading {key}: connection reset")
        self.reads.append(key)
        return self.store.read(key, chunk_size)


@dataclass
class Side:
    endpoint: S3Endpoint
    bucket: str
    sqs: Any
    dynamodb: Any
    queues: dict[str, tuple[str, str]]
    reads: list[str]
    fail: dict[str, int]

    def deliver(self, queue: str, handler: Callable[..., Any]) -> dict[str, Any] | None:
        url, arn = self.queues[queue]
        context = FakeLambdaContext(f"backrest-relay-{queue}", 1024, remaining_ms=600_000)
        return Queues(self.sqs).deliver(handler, url, arn, context, max_messages=1)

    def run_chunks(self, limit: int = 200) -> list[dict[str, Any]]:
        """Poll the chunk queue like its event source mapping until it is empty."""
        responses = []
        while (response := self.deliver("chunks", chunk_handler.handler)) is not None:
            responses.append(response)
            assert len(responses) < limit
        return responses

    def drain(self, queue: str) -> list[dict[str, Any]]:
        return Queues(self.sqs).drain(self.queues[queue][0])

    def peek(self, queue: str) -> list[str]:
        return Queues(self.sqs).peek_bodies(self.queues[queue][0])

    def mirror(self, seed: int) -> tuple[MirrorCompleted, list[str]]:
        """Write a mirror and put its `Mirror Completed` on the bus."""
        s3 = self.endpoint.client()
        destination = Destination(
            provider="s3",
            endpoint_url=self.endpoint.endpoint_url,
            bucket=self.bucket,
            prefix=PREFIX,
        )
        event, keys = write_mirror(
            lambda key, data: s3.put_object(Bucket=self.bucket, Key=key, Body=data),
            destination,
            seed=seed,
            objects=OBJECTS,
            guid=GUID,
        )
        EventBridgeBus(BUS, region=REGION, endpoint_url=self.endpoint.endpoint_url).publish(event)
        return event, keys

    def job(self, event: MirrorCompleted) -> dict[str, Any]:
        jobs = DynamoFanoutStore(RUNS_TABLE, client=self.dynamodb)
        job = jobs.load_job(job_id(event.run_id, event.manifest.key, event.manifest.sha256))
        assert job is not None
        return job


@pytest.fixture
def side(
    moto_endpoint: S3Endpoint,
    unique_bucket: Callable[[S3Endpoint], str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Side]:
    aws = MotoAws.at(moto_endpoint.endpoint_url)
    created = Queues(aws.sqs)
    queues: dict[str, tuple[str, str]] = {}
    for name in ("verify", "chunks"):
        # Visibility 0: a failed record is visible again at once (test speed).
        queues[name], queues[f"{name}-dlq"] = created.with_dlq(
            name, max_receive=5, VisibilityTimeout="0"
        )
    queues["results"] = created.create("results")
    aws.events.create_event_bus(Name=BUS)
    completed = load_sam_template()["Resources"]["MirrorCompletedRule"]["Properties"]
    route(
        aws.events,
        [
            ("mirror-completed", completed["EventPattern"], queues["verify"][1]),
            ("results", {"source": ["backrest-relay.verifier"]}, queues["results"][1]),
        ],
    )
    create_table(aws.dynamodb, RUNS_TABLE)
    create_idempotency_table(aws.dynamodb)
    secret = s3_destination_secret(aws.secrets, moto_endpoint, "verifier-read-only-key")
    moto_function_env(
        monkeypatch,
        aws.url,
        DESTINATION_SECRET_ARN=secret["ARN"],
        CHUNK_QUEUE_URL=queues["chunks"][0],
        FANOUT_MIN_OBJECTS="10",
        FANOUT_CHUNK_BYTES=CHUNK_BYTES,
    )
    parameters.clear_caches()  # type: ignore[no-untyped-call]
    verify_handler.set_dependencies(None)
    # The chunk function's production wiring, its bucket view counted.
    deps = chunk_handler.dependencies_from_env()
    opener = deps.destinations
    reads: list[str] = []
    fail: dict[str, int] = {}

    def counted(destination: Destination) -> tuple[ObjectStore, ReportSink | None]:
        store, reports = opener(destination)
        return CountingStore(store, reads, fail), reports

    deps.destinations = counted
    chunk_handler.set_dependencies(deps)
    bucket = unique_bucket(moto_endpoint)
    yield Side(moto_endpoint, bucket, aws.sqs, aws.dynamodb, queues, reads, fail)
    for module in (verify_handler, chunk_handler):
        module.set_dependencies(None)
        module.metrics.clear_metrics()
    parameters.clear_caches()  # type: ignore[no-untyped-call]


def test_a_large_mirror_is_verified_in_chunks_each_object_read_once(side: Side) -> None:
    event, keys = side.mirror(seed=11)
    victim = keys[len(keys) // 2][len(PREFIX) + 1 :]
    side.fail[keys[len(keys) // 2]] = 3  # one chunk is cut off (every read attempt fails)

    response = side.deliver("verify", verify_handler.handler)
    assert response is not None and response["batchItemFailures"] == []
    assert side.drain("results") == []  # no result yet: the chunks publish it
    job = side.job(event)
    chunks = len(job["cuts"]) + 1
    assert chunks >= 8
    bodies = side.peek("chunks")
    assert len(bodies) == min(chunks, 10)  # (a peek sees at most 10)
    # SQS delivers at least once: one work item arrives twice before its chunk is done.
    side.sqs.send_message(QueueUrl=side.queues["chunks"][0], MessageBody=bodies[0])

    responses = side.run_chunks()
    failures = [f for r in responses for f in r["batchItemFailures"]]
    assert len(failures) == 1  # the cut-off chunk, retried alone by SQS
    assert len(responses) == chunks + 2  # every chunk, the duplicate, the retry

    [result] = side.drain("results")
    assert result["detail-type"] == "Mirror Verified"
    detail = result["detail"]
    assert detail["mirror_run_id"] == event.run_id
    assert detail["problems_total"] == 0
    stats = detail["stats"]
    assert stats["compared"] == stats["deep_checked"] == len(keys) == event.manifest.objects
    # Every object read once, except the cut-off chunk's, which was redone (alone).
    reads = Counter(k[len(PREFIX) + 1 :] for k in side.reads if k.startswith(PREFIX + "/"))
    assert sorted(reads) == sorted(k[len(PREFIX) + 1 :] for k in keys)
    [cut_off] = [c for c in FanoutJob.from_dict(job).chunks if victim in c]
    assert {k for k, n in reads.items() if n > 1} <= {k for k in reads if k in cut_off}
    assert all(n <= 2 for n in reads.values())
    assert side.job(event)["done"] == list(range(chunks))
    assert side.peek("chunks-dlq") == []

    # A chunk redelivered after the job finished: nothing is read or published again.
    side.reads.clear()
    side.sqs.send_message(QueueUrl=side.queues["chunks"][0], MessageBody=bodies[-1])
    [late] = side.run_chunks()
    assert late["batchItemFailures"] == []
    assert side.reads == [] and side.drain("results") == []

    runs = DynamoRunStore(RUNS_TABLE, client=side.dynamodb)
    kinds = sorted((r.kind, r.status) for r in runs.runs(GUID))
    assert kinds == [("mirror", "completed"), ("verification", "verified")]
    latest = runs.latest_verified(GUID)
    assert latest is not None and latest.run_id == detail["run_id"]


def test_a_damaged_object_in_one_chunk_fails_the_verification_by_name(side: Side) -> None:
    event, keys = side.mirror(seed=12)
    s3 = side.endpoint.client()
    victim = keys[7]
    data = bytearray(s3.get_object(Bucket=side.bucket, Key=victim)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=side.bucket, Key=victim, Body=bytes(data))  # same size, new ETag

    response = side.deliver("verify", verify_handler.handler)
    assert response is not None and response["batchItemFailures"] == []
    assert len(side.job(event)["cuts"]) + 1 >= 8
    responses = side.run_chunks()
    assert all(r["batchItemFailures"] == [] for r in responses)

    [result] = side.drain("results")
    assert result["detail-type"] == "Mirror Verification Failed"
    problems = result["detail"]["problems"]
    assert [(p["key"], p["kind"]) for p in problems] == [(victim[len(PREFIX) + 1 :], "etag")]
    assert result["detail"]["problems_total"] == 1
    assert result["detail"]["stats"]["compared"] == len(keys)
    assert DynamoRunStore(RUNS_TABLE, client=side.dynamodb).latest_verified(GUID) is None


def test_a_small_mirror_is_verified_in_one_pass(
    side: Side, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FANOUT_MIN_OBJECTS", str(OBJECTS * 10))
    verify_handler.set_dependencies(None)
    side.mirror(seed=13)
    response = side.deliver("verify", verify_handler.handler)
    assert response is not None and response["batchItemFailures"] == []
    assert side.peek("chunks") == []
    [result] = side.drain("results")
    assert result["detail-type"] == "Mirror Verified"


def test_a_malformed_or_unknown_work_item_fails_alone_and_reaches_the_chunk_dlq(
    side: Side,
) -> None:
    url = side.queues["chunks"][0]
    unknown = json.dumps({"job_id": "0" * 32, "index": 0, "chunks": 1})
    side.sqs.send_message(QueueUrl=url, MessageBody="{not json")
    side.sqs.send_message(QueueUrl=url, MessageBody=unknown)
    responses = side.run_chunks()
    assert all(len(r["batchItemFailures"]) == 1 for r in responses)
    assert len(responses) == 2 * 5  # maxReceiveCount deliveries each, then the DLQ
    assert sorted(side.peek("chunks-dlq")) == sorted(["{not json", unknown])
    assert side.drain("results") == []

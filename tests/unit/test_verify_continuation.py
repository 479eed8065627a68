"""The verifier Lambda under a Lambda-like time budget: a mirror far larger than one
invocation is verified across several, driven by the continuation messages the handler
sends itself on the verify queue (moto SQS), with the checkpoint in the DynamoDB run store
(moto) and powertools idempotency on moto. Time is a fake clock that advances per object
read, so nothing sleeps: each object is read exactly once, the verdict published once.
"""

from __future__ import annotations

import os

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

import gzip
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer

from cloud.contracts.destination import Destination
from cloud.contracts.events import MirrorCompleted, MirrorVerificationFailed, MirrorVerified
from cloud.handlers import verify as verify_handler
from cloud.handlers.common import Bucket
from cloud.integrations.continuations import LEG_ATTRIBUTE, SqsContinuations
from cloud.integrations.runstore_dynamodb import DynamoRunStore, create_table
from cloud.logic.checkpoint import VerifyCheckpoint, checkpoint_name
from cloud.logic.verify import VerifyOptions
from tests.support import lambdas
from tests.support.doubles.event_bus import RecordingEventBus
from tests.support.doubles.object_store import InMemoryObjectStore
from tests.support.lambdas import (
    FakeLambdaContext,
    logs_to_current_stdout,
    record_for,
    sqs_event,
    sqs_record,
)

REGION = "us-east-1"
GUID = "cd" * 32
DEST = Destination(provider="s3", endpoint_url=None, bucket="offsite", prefix="restic/big")
READ_MS = 1_000  # each object read costs one second of the fake clock
BUDGET_MS = 20_000  # what an invocation has
MARGIN_MS = 5_000  # the leg stops starting reads this long before the end
CHUNK = 5  # a checkpoint every 5 objects read
CONCURRENCY = 2


@pytest.fixture(autouse=True, scope="module")
def logs_on_pytest_stdout() -> Iterator[None]:
    with logs_to_current_stdout(verify_handler.logger):
        yield


class Killed(RuntimeError):
    """The invocation dies under the read (injected)."""


class ClockedStore(InMemoryObjectStore):
    """A bucket whose every object read advances the fake clock; can die after K reads."""

    def __init__(self, clock: list[int]) -> None:
        super().__init__(page_size=7)
        self.clock = clock
        self.die_after: int | None = None

    def read(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        if "/manifests/" not in key:
            if self.die_after is not None:
                if self.die_after <= 0:
                    raise Killed(f"killed while reading {key}")
                self.die_after -= 1
            self.clock[0] += READ_MS
        return super().read(key, chunk_size)

    def object_reads(self) -> Counter[str]:
        return Counter(k for k in self.reads if "/manifests/" not in k)


@dataclass
class ClockedContext(FakeLambdaContext):
    """A Lambda context whose remaining time follows the fake clock from its start."""

    clock: list[int] = field(default_factory=lambda: [0])
    started: int = 0
    budget_ms: int = BUDGET_MS

    def get_remaining_time_in_millis(self) -> int:
        return self.budget_ms - (self.clock[0] - self.started)


@dataclass
class World:
    clock: list[int]
    store: ClockedStore
    runs: DynamoRunStore
    bus: RecordingEventBus
    sqs: Any
    queue: str
    invocations: int = 0

    def invoke(self, *records: dict[str, Any]) -> dict[str, Any]:
        self.invocations += 1
        context = ClockedContext("backrest-relay-verify", clock=self.clock, started=self.clock[0])
        response: dict[str, Any] = verify_handler.handler(sqs_event(*records), context)
        return response

    def continuations(self) -> list[dict[str, Any]]:
        """The continuation messages now on the verify queue, as Lambda would deliver them
        (and deleted from the queue, as the event source mapping does on success)."""
        got = self.sqs.receive_message(
            QueueUrl=self.queue, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
        ).get("Messages", [])
        records = []
        for message in got:
            record = sqs_record(message["Body"], message["MessageId"])
            record["messageAttributes"] = {
                name: {
                    "stringValue": value["StringValue"],
                    "dataType": value["DataType"],
                    "stringListValues": [],
                    "binaryListValues": [],
                }
                for name, value in message.get("MessageAttributes", {}).items()
            }
            records.append(record)
            self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=message["ReceiptHandle"])
        return records

    def drain(self, *, duplicate: bool = False, limit: int = 60) -> None:
        """Deliver continuation messages until none is left (each twice with `duplicate`:
        SQS is at-least-once)."""
        for _ in range(limit):
            records = self.continuations()
            if not records:
                return
            for record in records:
                assert self.invoke(record) == {"batchItemFailures": []}
                if duplicate:
                    assert self.invoke(record) == {"batchItemFailures": []}
        raise AssertionError("the continuation chain did not end")


@pytest.fixture
def world(idempotency_client: Any) -> Iterator[World]:
    clock = [0]
    store = ClockedStore(clock)
    create_table(idempotency_client, "runs")
    runs = DynamoRunStore("runs", client=idempotency_client)
    sqs = boto3.client("sqs", region_name=REGION)
    queue = sqs.create_queue(QueueName="backrest-relay-verify")["QueueUrl"]
    bus = RecordingEventBus()

    def open_bucket(destination: Destination) -> Bucket:
        return store, store

    verify_handler.set_dependencies(
        verify_handler.Dependencies(
            runs=runs,
            destinations=open_bucket,
            events=bus,
            persistence=lambda: DynamoDBPersistenceLayer(
                table_name=lambdas.IDEMPOTENCY_TABLE, boto3_client=idempotency_client
            ),
            continuations=SqsContinuations(queue, client=sqs),
            options=VerifyOptions(concurrency=CONCURRENCY, progress_every_objects=CHUNK),
            host="lambda:test",
            safety_margin_ms=MARGIN_MS,
            rotation_budget=0,
            rotation_days=None,  # no rotation: every read here is a new object's
        )
    )
    yield World(clock, store, runs, bus, sqs, queue)
    verify_handler.set_dependencies(None)
    verify_handler.metrics.clear_metrics()


def big_mirror(world: World, objects: int = 80) -> tuple[MirrorCompleted, list[str]]:
    return lambdas.write_mirror(world.store.put, DEST, seed=11, objects=objects, guid=GUID)


def next_mirror(world: World, previous: MirrorCompleted) -> tuple[MirrorCompleted, list[str]]:
    """A later upload to the same mirror: new objects plus everything `previous` lists."""
    event, keys = lambdas.write_mirror(world.store.put, DEST, seed=12, objects=10, guid=GUID)
    lines = {}
    for key, uploaded in ((previous.manifest.key, False), (event.manifest.key, True)):
        header, *entries = gzip.decompress(world.store.objects[key]).decode().splitlines()
        for line in entries:
            entry = json.loads(line)
            entry["uploaded"] = uploaded
            lines[entry["key"]] = json.dumps(entry)
    head = json.loads(header)
    head["objects"] = len(lines)
    body = gzip.compress(
        "\n".join([json.dumps(head), *(lines[k] for k in sorted(lines))]).encode(), mtime=0
    )
    world.store.put(event.manifest.key, body)
    manifest = event.manifest.model_copy(
        update={"sha256": hashlib.sha256(body).hexdigest(), "objects": len(lines)}
    )
    return event.model_copy(update={"manifest": manifest}), keys


def checkpoint(world: World) -> VerifyCheckpoint | None:
    return VerifyCheckpoint.from_dict(world.runs.load_checkpoint(GUID, checkpoint_name(DEST)))


def test_a_mirror_larger_than_one_invocation_is_verified_across_several(world: World) -> None:
    event, keys = big_mirror(world)
    # One invocation reads about (BUDGET - MARGIN) / READ_MS = 15 objects; there are 82.
    assert len(keys) > 4 * (BUDGET_MS - MARGIN_MS) // READ_MS

    assert world.invoke(record_for(event, "agent-1")) == {"batchItemFailures": []}
    assert world.bus.events == [], "nothing is published before the verification is complete"
    saved = checkpoint(world)
    assert saved is not None and saved.chain == event.run_id and saved.leg == 1
    world.drain(duplicate=True)

    assert world.invocations >= 1 + 2 * 4, "several invocations (each delivered twice)"
    reads = world.store.object_reads()
    assert set(reads) == set(keys) and set(reads.values()) == {1}, "each object read once"
    [result] = world.bus.events
    assert isinstance(result, MirrorVerified) and result.mirror_run_id == event.run_id
    assert result.stats.unproven_objects == 0
    assert result.stats.deep_checked == len(keys), "the verdict counts every leg's reads"
    assert result.stats.deep_checked_new == len(keys), "new objects too (all are new here)"
    assert result.stats.bytes_read == sum(len(world.store.objects[k]) for k in keys)
    done = checkpoint(world)
    assert done is not None and done.verified and not done.pending

    # The agent's event delivered again (EventBridge and SQS are at-least-once): no second
    # chain, no read, no second verdict.
    assert world.invoke(record_for(event, "agent-2")) == {"batchItemFailures": []}
    assert world.continuations() == []
    assert sum(world.store.object_reads().values()) == len(keys)
    assert len(world.bus.events) == 1


def test_an_invocation_killed_mid_chunk_loses_at_most_that_chunk(world: World) -> None:
    event, keys = big_mirror(world, objects=40)
    world.store.die_after = 12  # dies during the third chunk of five
    response = world.invoke(record_for(event, "agent-1"))
    assert lambdas.failed_ids(response) == ["agent-1"]  # SQS will redeliver it
    assert world.bus.events == []
    first = world.store.object_reads()
    assert sum(first.values()) == 12

    world.store.die_after = None
    # The redelivery: the same message, in a new invocation.
    assert world.invoke(record_for(event, "agent-1")) == {"batchItemFailures": []}
    world.drain()

    reads = world.store.object_reads()
    assert set(reads) == set(keys)
    twice = [k for k, n in reads.items() if n > 1]
    # At most one chunk, plus the reads that were in flight when it was saved.
    assert len(twice) <= CHUNK + 2 * CONCURRENCY, twice
    assert len(twice) < sum(first.values()), "not restarted from zero"
    assert all(n <= 2 for n in reads.values())
    [result] = world.bus.events
    assert isinstance(result, MirrorVerified)


def test_a_problem_is_announced_at_once_and_ends_the_chain(world: World) -> None:
    event, keys = big_mirror(world)
    victim = sorted(k for k in keys if "/data/" in k)[3]
    data = world.store.objects[victim]
    world.store.put(victim, bytes([data[0] ^ 1]) + data[1:], etag=world.store.etags[victim])

    assert world.invoke(record_for(event, "agent-1")) == {"batchItemFailures": []}
    [result] = world.bus.events
    assert isinstance(result, MirrorVerificationFailed)
    assert [p.kind for p in result.problems] == ["hash"]
    assert world.continuations() == [], "a verdict ends the chain"


def test_a_lost_continuation_send_is_retried_without_a_second_chain(world: World) -> None:
    event, keys = big_mirror(world, objects=30)
    deps = verify_handler.get_verifier().deps
    real = deps.continuations
    assert real is not None

    class Failing:
        def send(self, event: MirrorCompleted, leg: int) -> None:
            raise RuntimeError("SQS unavailable")

    deps.continuations = Failing()
    response = world.invoke(record_for(event, "agent-1"))
    assert lambdas.failed_ids(response) == ["agent-1"]
    deps.continuations = real
    read_before = sum(world.store.object_reads().values())
    # The redelivered event sees the claimed next leg and only queues it again.
    assert world.invoke(record_for(event, "agent-1")) == {"batchItemFailures": []}
    assert sum(world.store.object_reads().values()) == read_before
    world.drain()
    reads = world.store.object_reads()
    assert set(reads) == set(keys) and set(reads.values()) == {1}
    assert len(world.bus.events) == 1


def test_a_newer_event_takes_over_a_running_chain(world: World) -> None:
    first, first_keys = big_mirror(world, objects=40)
    assert world.invoke(record_for(first, "agent-1")) == {"batchItemFailures": []}
    stale_leg = world.continuations()
    assert [r["messageAttributes"][LEG_ATTRIBUTE]["stringValue"] for r in stale_leg] == ["1"]
    # The next upload's event arrives before leg 1 of the first runs; its manifest lists
    # the whole mirror and marks only its own objects as uploaded.
    second, second_keys = next_mirror(world, first)
    assert world.invoke(record_for(second, "agent-2")) == {"batchItemFailures": []}
    # The first chain's leg 1 finds its work taken over: it ends, reading nothing.
    before = sum(world.store.object_reads().values())
    assert world.invoke(*stale_leg) == {"batchItemFailures": []}
    assert sum(world.store.object_reads().values()) == before
    world.drain()
    reads = world.store.object_reads()
    data_keys = {k for k in [*first_keys, *second_keys] if "/data/" in k}
    assert data_keys <= set(reads)
    assert all(reads[k] == 1 for k in data_keys), "each data object read once"
    [result] = world.bus.events
    assert isinstance(result, MirrorVerified) and result.mirror_run_id == second.run_id


def test_a_leg_that_cannot_read_anything_fails_instead_of_looping(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    event, _ = big_mirror(world, objects=10)
    deps = verify_handler.get_verifier().deps
    deps.safety_margin_ms = BUDGET_MS + 1  # the time is up before the first read
    response = world.invoke(record_for(event, "agent-1"))
    assert lambdas.failed_ids(response) == ["agent-1"]  # retried, then the DLQ (alarm)
    assert world.continuations() == [] and world.bus.events == []
    assert sum(world.store.object_reads().values()) == 0
    errors = [line for line in lambdas.read_output(capsys).logs if line["level"] == "ERROR"]
    assert [e["error_type"] for e in errors] == ["NoProgressError"]


def forged(record: dict[str, Any], leg: str, message_id: str) -> dict[str, Any]:
    """A copy of a continuation message with another leg attribute, as anyone allowed to
    send to the verify queue could make."""
    copy: dict[str, Any] = json.loads(json.dumps(record))
    copy["messageId"] = message_id
    copy["messageAttributes"][LEG_ATTRIBUTE]["stringValue"] = leg
    return copy


@pytest.mark.parametrize("leg", ["99", "0", "²", "-1", "1e3", " 2"])
def test_forged_continuations_neither_fork_the_chain_nor_fake_a_verdict(
    world: World, leg: str
) -> None:
    """Someone with SQS send rights replays a continuation with a leg of their choice
    (a far-ahead leg, leg 0, garbage): no record fails on it, the chain is not forked (no
    object read twice), and one verdict is published, naming the damage it finds."""
    event, keys = big_mirror(world)
    victim = sorted(k for k in keys if "/data/" in k)[-2]  # read in a later leg
    data = world.store.objects[victim]
    world.store.put(victim, bytes([data[0] ^ 1]) + data[1:], etag=world.store.etags[victim])
    assert world.invoke(record_for(event, "agent-1")) == {"batchItemFailures": []}
    [real] = world.continuations()
    assert world.invoke(forged(real, leg, "forged-1")) == {"batchItemFailures": []}
    assert world.invoke(real) == {"batchItemFailures": []}
    world.drain()

    reads = world.store.object_reads()
    assert set(reads.values()) == {1}, [k for k, n in reads.items() if n > 1]
    [result] = world.bus.events
    assert isinstance(result, MirrorVerificationFailed)
    assert [p.key for p in result.problems] == [victim.removeprefix(DEST.prefix + "/")]


def test_an_object_deleted_behind_a_leg_that_proved_it_fails_the_chain(world: World) -> None:
    """Deleted after an earlier leg read it back: the next leg's listing misses it, and the
    chain's verdict names it instead of adding the earlier read to a "verified"."""
    event, _ = big_mirror(world)
    assert world.invoke(record_for(event, "agent-1")) == {"batchItemFailures": []}
    proven = sorted(world.store.object_reads())
    world.store.delete(proven[0])
    world.drain()
    [result] = world.bus.events
    assert isinstance(result, MirrorVerificationFailed)
    assert [(p.kind, p.key) for p in result.problems] == [
        ("missing", proven[0].removeprefix(DEST.prefix + "/"))
    ]

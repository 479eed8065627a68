"""The verifier Lambda handler, fed SQS events the way Lambda delivers them.

Dependencies are the in-memory bucket and run store and a recording event bus; idempotency
is powertools' real DynamoDB persistence layer on moto. The last tests run the production
wiring (`dependencies_from_env`) on moto: Secrets Manager, S3, DynamoDB and EventBridge.
"""

from __future__ import annotations

import os

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer

from cloud.contracts.destination import Destination
from cloud.contracts.events import (
    DetailType,
    ErrorInfo,
    EventDetail,
    MirrorCompleted,
    MirrorFailed,
    MirrorVerificationFailed,
    MirrorVerified,
    Source,
)
from cloud.contracts.ids import new_run_id
from cloud.handlers import verify as verify_handler
from cloud.handlers.common import Bucket, ConfigError, SecretDestinations, endpoint_mismatch
from cloud.integrations.eventbus import EventBridgeBus, EventPublishError
from cloud.integrations.s3 import S3Access
from cloud.integrations.secrets import DestinationSecretError, load_destination_access
from cloud.logic.ports import ListedObject, ObjectStoreError
from cloud.logic.verify import VerifyOptions
from tests.support import lambdas
from tests.support.doubles.event_bus import RecordingEventBus
from tests.support.doubles.object_store import InMemoryObjectStore
from tests.support.doubles.runstore import InMemoryRunStore
from tests.support.lambdas import (
    IDEMPOTENCY_TABLE,
    REGION,
    FakeLambdaContext,
    aws_destination_secret,
    bus_to_queue,
    eventbridge_event,
    failed_ids,
    logs_to_current_stdout,
    read_output,
    record_for,
    sqs_event,
    sqs_record,
)

GUID = "ab" * 32
DEST = Destination(
    provider="b2",
    endpoint_url="https://s3.us-west-004.backblazeb2.com",
    bucket="offsite",
    prefix="restic/home",
)
SECRET_KEY = "K004-very-secret-application-key-value"
ACCESS_KEY = "004a1b2c3d4e5f60000000042"


@pytest.fixture(autouse=True, scope="module")
def logs_on_pytest_stdout() -> Iterator[None]:
    with logs_to_current_stdout(verify_handler.logger):
        yield


# -- fakes and builders ----------------------------------------------------------------------


class UnreachableStore:
    """A bucket that cannot be read (DNS failure, denied, missing bucket...)."""

    list_requests = 0

    def list(self, prefix: str) -> Iterator[ListedObject]:
        raise ObjectStoreError(f"listing {prefix}: EndpointConnectionError")

    def read(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        raise ObjectStoreError(f"reading {key}: EndpointConnectionError")


class Buckets:
    """Destination opener over in-memory buckets; a name in `unreachable` cannot be read."""

    def __init__(self) -> None:
        self.buckets: dict[str, InMemoryObjectStore] = {}
        self.unreachable: set[str] = set()
        self.opened: list[str] = []

    def bucket(self, name: str) -> InMemoryObjectStore:
        return self.buckets.setdefault(name, InMemoryObjectStore(page_size=5))

    def __call__(self, destination: Destination) -> Bucket:
        self.opened.append(destination.bucket)
        if destination.bucket in self.unreachable:
            return UnreachableStore(), None
        store = self.bucket(destination.bucket)
        return store, store


def write_mirror(
    put: Any, destination: Destination, *, seed: int, objects: int = 8, guid: str | None = None
) -> tuple[MirrorCompleted, list[str]]:
    """A mirror of repository `guid` (GUID) with an index and one new snapshot."""
    return lambdas.write_mirror(
        put,
        destination,
        seed=seed,
        objects=objects,
        guid=guid or GUID,
        index=True,
        new_snapshots=["1234abcd"],
    )


def invoke(event: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = verify_handler.handler(
        event, FakeLambdaContext("backrest-relay-verify")
    )
    return response


# -- fixtures --------------------------------------------------------------------------------


@dataclass
class World:
    buckets: Buckets
    runs: InMemoryRunStore
    bus: RecordingEventBus
    idempotency: Any


@pytest.fixture
def world(idempotency_client: Any, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    """Fakes behind the handler."""
    buckets = Buckets()
    runs = InMemoryRunStore()
    bus = RecordingEventBus()
    verify_handler.set_dependencies(
        verify_handler.Dependencies(
            runs=runs,
            destinations=buckets,
            events=bus,
            persistence=lambda: DynamoDBPersistenceLayer(
                table_name=IDEMPOTENCY_TABLE, boto3_client=idempotency_client
            ),
            options=VerifyOptions(concurrency=2),
            host="lambda:test",
        )
    )
    yield World(buckets, runs, bus, idempotency_client)
    verify_handler.set_dependencies(None)
    verify_handler.metrics.clear_metrics()


def mirror(
    world: World, *, seed: int = 1, bucket: str = DEST.bucket, guid: str | None = None
) -> MirrorCompleted:
    destination = DEST.model_copy(update={"bucket": bucket})
    store = world.buckets.bucket(bucket)
    event, _ = write_mirror(store.put, destination, seed=seed, guid=guid)
    return event


# -- the handler -----------------------------------------------------------------------------


def test_good_mirror_is_verified_recorded_and_published(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    event = mirror(world)
    response = invoke(sqs_event(record_for(event)))

    assert response == {"batchItemFailures": []}
    [result] = world.bus.events
    assert isinstance(result, MirrorVerified)
    assert result.mirror_run_id == event.run_id
    assert result.repo == event.repo and result.destination == event.destination
    assert result.stats.compared == event.manifest.objects
    assert result.stats.bytes_read > 0
    assert result.problems == [] and result.problems_total == 0
    assert result.host == "lambda:test"

    runs = world.runs.runs(GUID)
    assert {(r.kind, r.status) for r in runs} == {
        ("mirror", "completed"),
        ("verification", "verified"),
    }
    latest = world.runs.latest_verified(GUID)
    assert latest is not None and latest.run_id == result.run_id
    assert latest.mirror_run_id == event.run_id

    out = read_output(capsys)
    assert out.metric_values("ObjectsVerified") == [event.manifest.objects]
    assert out.metric_values("BytesRead") == [result.stats.bytes_read]
    assert out.metric_values("VerificationFailures") == [0]
    [age] = out.metric_values("MirrorAgeSeconds")
    assert 55 <= age <= 600
    emf = next(m for m in out.metrics if "ObjectsVerified" in m)
    [directive] = emf["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "BackrestRelay"
    assert directive["Dimensions"] == [["service"]]
    units = {m["Name"]: m["Unit"] for m in directive["Metrics"]}
    assert units["BytesRead"] == "Bytes" and units["MirrorAgeSeconds"] == "Seconds"
    verify_logs = [line for line in out.logs if line["message"] == "Mirror Verified"]
    assert verify_logs and verify_logs[0]["correlation_id"] == event.run_id
    assert verify_logs[0]["function_name"] == "backrest-relay-verify"  # inject_lambda_context


def test_tampered_object_gives_verification_failed_naming_it(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    event = mirror(world)
    store = world.buckets.bucket(DEST.bucket)
    victim = next(k for k in sorted(store.objects) if "/data/" in k)
    original = store.objects[victim]
    # Same size and the same ETag: only reading the bytes back can see it.
    store.put(victim, bytes([original[0] ^ 0xFF]) + original[1:], etag=store.etags[victim])

    response = invoke(sqs_event(record_for(event)))

    assert response == {"batchItemFailures": []}  # a verdict, not an error
    [result] = world.bus.events
    assert isinstance(result, MirrorVerificationFailed)
    assert [(p.key, p.kind) for p in result.problems] == [(DEST.relative(victim), "hash")]
    assert result.report_key is not None and result.report_key in store.objects
    assert world.runs.latest_verified(GUID) is None
    out = read_output(capsys)
    assert out.metric_values("VerificationFailures") == [1]
    assert "Mirror Verification Failed" in out.messages("WARNING")


def test_forged_completion_is_published_as_a_refusal_and_reads_nothing(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """The handler's side of the binding (docs/verification.md, "Trust model")."""
    first = mirror(world)
    assert invoke(sqs_event(record_for(first, "m-1"))) == {"batchItemFailures": []}
    forged = mirror(world, seed=2, bucket="attacker")  # GUID's name, another bucket
    world.buckets.bucket("attacker").reads.clear()

    response = invoke(sqs_event(record_for(forged, "m-2")))

    assert response == {"batchItemFailures": []}  # a verdict: published, not retried
    verified, refused = world.bus.events
    assert isinstance(refused, MirrorVerificationFailed)
    assert [p.kind for p in refused.problems] == ["binding"]
    assert refused.mirror_run_id == forged.run_id
    assert world.buckets.bucket("attacker").reads == []
    latest = world.runs.latest_verified(GUID)
    assert latest is not None and latest.run_id == verified.run_id
    out = read_output(capsys)
    assert out.metric_values("VerificationFailures") == [0, 1]


def test_unreachable_bucket_fails_only_its_record_and_the_retry_verifies(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three repositories (one repository's events must all name the bucket it is bound to).
    first = mirror(world, seed=1, bucket="bucket-a", guid="a1" * 32)
    broken = mirror(world, seed=2, bucket="bucket-b", guid="b2" * 32)
    third = mirror(world, seed=3, bucket="bucket-c", guid="c3" * 32)
    world.buckets.unreachable.add("bucket-b")

    response = invoke(
        sqs_event(
            record_for(first, "m-1"),
            record_for(broken, "m-2"),
            record_for(third, "m-3"),
        )
    )

    assert failed_ids(response) == ["m-2"]
    assert sorted(r.mirror_run_id for r in world.bus.events if isinstance(r, MirrorVerified)) == (
        sorted([first.run_id, third.run_id])
    )
    out = read_output(capsys)
    assert out.metric_values("DestinationUnreachable") == [1]
    assert out.metric_values("RecordFailures") == [1]
    [failure] = [line for line in out.logs if line["level"] == "ERROR"]
    assert failure["message_id"] == "m-2" and failure["error_type"] == "ObjectStoreError"
    assert failure["correlation_id"] == broken.run_id

    # SQS redelivers m-2; the bucket is back: the failed attempt left no idempotency record.
    world.buckets.unreachable.clear()
    retry = invoke(sqs_event(record_for(broken, "m-2")))
    assert retry == {"batchItemFailures": []}
    last = world.bus.events[-1]
    assert isinstance(last, MirrorVerified) and last.mirror_run_id == broken.run_id
    assert len(world.bus.events) == 3


def test_whole_batch_failing_is_reported_item_by_item(world: World) -> None:
    event = mirror(world, bucket="down")
    world.buckets.unreachable.add("down")
    response = invoke(sqs_event(record_for(event, "only")))
    assert failed_ids(response) == ["only"]  # not an invocation error


def test_malformed_messages_fail_only_themselves_and_are_logged(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    good = mirror(world)
    not_json = sqs_record("this is not json {", "m-garbage")
    not_eventbridge = sqs_record(json.dumps({"hello": "world"}), "m-envelope")
    bad_detail = json.loads(good.model_dump_json())
    del bad_detail["manifest"]
    broken_detail = sqs_record(
        json.dumps(
            eventbridge_event(
                bad_detail, source=Source.AGENT.value, detail_type=DetailType.MIRROR_COMPLETED.value
            )
        ),
        "m-detail",
    )
    future = json.loads(good.model_dump_json()) | {"schema_version": 2}
    future_version = sqs_record(
        json.dumps(
            eventbridge_event(
                future, source=Source.AGENT.value, detail_type=DetailType.MIRROR_COMPLETED.value
            )
        ),
        "m-future",
    )

    response = invoke(
        sqs_event(
            not_json, not_eventbridge, record_for(good, "m-good"), broken_detail, future_version
        )
    )

    # Malformed messages fail their own record only: SQS retries them, then the DLQ keeps
    # them for inspection (and for a redrive once the verifier knows schema_version 2).
    assert failed_ids(response) == ["m-garbage", "m-envelope", "m-detail", "m-future"]
    assert [e.DETAIL_TYPE for e in world.bus.events] == [DetailType.MIRROR_VERIFIED]
    out = read_output(capsys)
    assert out.metric_values("MalformedEvents") == [1, 1, 1, 1]
    malformed = {
        line["message_id"]: line
        for line in out.logs
        if line["message"].startswith("malformed message")
    }
    assert set(malformed) == {"m-garbage", "m-envelope", "m-detail", "m-future"}
    assert any("manifest" in e for e in malformed["m-detail"]["errors"])
    assert any("schema_version" in e for e in malformed["m-future"]["errors"])
    assert all(line["level"] == "ERROR" for line in malformed.values())


def test_other_event_kinds_are_logged_counted_and_acknowledged(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    good = mirror(world)
    failed = MirrorFailed(
        **good.model_dump(include={"run_id", "repo", "host", "trigger", "destination"}),
        started_at=good.started_at,
        finished_at=good.finished_at,
        error=ErrorInfo(kind="destination", message="B2 said no"),
    )
    foreign = sqs_record(
        json.dumps(
            eventbridge_event({"state": "running"}, source="aws.ec2", detail_type="EC2 State")
        ),
        "m-foreign",
    )
    response = invoke(sqs_event(record_for(failed, "m-failed"), foreign))

    assert response == {"batchItemFailures": []}  # retrying cannot help: no poison loop
    assert world.bus.events == []
    assert world.buckets.opened == []
    out = read_output(capsys)
    assert out.metric_values("IgnoredEvents") == [1, 1]
    ignored = [line for line in out.logs if line["message"].startswith("not a Mirror Completed")]
    assert [line["level"] for line in ignored] == ["ERROR", "ERROR"]
    assert {line["detail_type"] for line in ignored} == {"Mirror Failed", "EC2 State"}


def test_duplicate_delivery_verifies_and_publishes_once(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    event = mirror(world)
    # Twice in one batch, then again in a later invocation (EventBridge and SQS are both
    # at-least-once).
    first = invoke(sqs_event(record_for(event, "m-1"), record_for(event, "m-2")))
    again = invoke(sqs_event(record_for(event, "m-3")))

    assert first == again == {"batchItemFailures": []}
    assert len(world.bus.events) == 1
    runs = world.runs.runs(GUID)
    assert sorted(r.kind for r in runs) == ["mirror", "verification"]
    assert world.buckets.opened == [DEST.bucket]
    out = read_output(capsys)
    assert out.metric_values("ObjectsVerified") == [event.manifest.objects]
    assert out.metric_values("DuplicateDeliveries") == [1, 1]


def test_reused_run_id_with_another_manifest_is_not_taken_for_a_duplicate(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    event = mirror(world, seed=1)
    other = mirror(world, seed=2).model_copy(update={"run_id": event.run_id})
    invoke(sqs_event(record_for(event, "m-1")))
    response = invoke(sqs_event(record_for(other, "m-2")))
    assert failed_ids(response) == ["m-2"]
    assert len(world.bus.events) == 1
    out = read_output(capsys)
    [error] = [line for line in out.logs if line["level"] == "ERROR"]
    assert error["error_type"] == "IdempotencyValidationError"


def test_publish_failure_retries_publishing_without_verifying_again(world: World) -> None:
    event = mirror(world)
    world.bus.fail_next = 1
    response = invoke(sqs_event(record_for(event, "m-1")))
    assert failed_ids(response) == ["m-1"]
    assert world.bus.events == []

    retry = invoke(sqs_event(record_for(event, "m-1")))
    assert retry == {"batchItemFailures": []}
    [result] = world.bus.events
    assert isinstance(result, MirrorVerified)
    assert world.buckets.opened == [DEST.bucket]  # verified once
    verifications = [r for r in world.runs.runs(GUID) if r.kind == "verification"]
    assert [r.run_id for r in verifications] == [result.run_id]


def test_missing_configuration_fails_the_invocation_loudly(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    verify_handler.set_dependencies(None)
    for name in ("RUNS_TABLE", "IDEMPOTENCY_TABLE", "EVENT_BUS_NAME", "DESTINATION_SECRET_ARN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="RUNS_TABLE"):
        invoke(sqs_event(sqs_record("{}")))


# -- the production wiring on moto -----------------------------------------------------------


@pytest.fixture
def deployed(
    idempotency_client: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[dict[str, Any]]:
    """What the SAM template deploys, in moto: tables, bus + rule → result queue, secret,
    and the destination bucket (AWS S3 here, so moto can serve it in-process)."""
    from cloud.integrations.runstore_dynamodb import create_table

    create_table(idempotency_client, "backrest-relay-runs")
    sqs, queue = bus_to_queue(REGION, "results", {"source": [Source.VERIFIER.value]})
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="offsite-aws")
    secrets = boto3.client("secretsmanager", region_name=REGION)
    secret = aws_destination_secret(
        secrets, "backrest-relay/destination", REGION, ACCESS_KEY, SECRET_KEY
    )
    env = {
        "RUNS_TABLE": "backrest-relay-runs",
        "IDEMPOTENCY_TABLE": IDEMPOTENCY_TABLE,
        "EVENT_BUS_NAME": "backrest-relay",
        "DESTINATION_SECRET_ARN": secret["ARN"],
        "VERIFY_ROTATION_DAYS": "7",
        "VERIFY_NEW_BYTES_BUDGET": "1_000_000",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "DEBUG")
    verify_handler.logger.setLevel("DEBUG")
    verify_handler.set_dependencies(None)
    yield {"s3": s3, "sqs": sqs, "queue": queue, "secret_arn": secret["ARN"]}
    verify_handler.set_dependencies(None)
    verify_handler.metrics.clear_metrics()
    verify_handler.logger.setLevel("INFO")


def results(sqs: Any, queue: str) -> list[dict[str, Any]]:
    messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
    return [json.loads(m["Body"]) for m in messages]


def test_env_wiring_verifies_a_bucket_with_credentials_from_the_secret(
    deployed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    s3 = deployed["s3"]
    destination = Destination(provider="aws", endpoint_url=None, bucket="offsite-aws", prefix="r")
    event, keys = write_mirror(
        lambda k, b: s3.put_object(Bucket="offsite-aws", Key=k, Body=b), destination, seed=5
    )
    response = invoke(sqs_event(record_for(event, "m-1"), record_for(event, "m-2")))

    assert response == {"batchItemFailures": []}
    [published] = results(deployed["sqs"], deployed["queue"])
    assert published["detail-type"] == "Mirror Verified"
    assert published["detail"]["mirror_run_id"] == event.run_id
    assert published["detail"]["stats"]["compared"] == len(keys) == event.manifest.objects
    assert published["detail"]["host"] == "lambda:verifier"

    from cloud.integrations.runstore_dynamodb import DynamoRunStore

    store = DynamoRunStore("backrest-relay-runs", boto3.client("dynamodb", region_name=REGION))
    assert sorted(r.kind for r in store.runs(GUID)) == ["mirror", "verification"]
    deps = verify_handler.get_verifier().deps
    assert (deps.rotation_days, deps.options.new_bytes_budget) == (7, 1_000_000)

    # Now a tampered object and an unreadable bucket, so errors get logged too. (A new
    # mirror run: the same manifest again would read nothing, being proven already.)
    other, new_keys = write_mirror(
        lambda k, b: s3.put_object(Bucket="offsite-aws", Key=k, Body=b), destination, seed=6
    )
    victim = next(k for k in new_keys if "/data/" in k)
    s3.put_object(Bucket="offsite-aws", Key=victim, Body=b"tampered")
    gone = other.model_copy(  # another repository's (GUID's is bound to offsite-aws)
        update={
            "run_id": new_run_id(),
            "repo": other.repo.model_copy(update={"guid": "ef" * 32}),
            "destination": destination.model_copy(update={"bucket": "no-such-bucket"}),
        }
    )
    response = invoke(sqs_event(record_for(other, "m-3"), record_for(gone, "m-4")))
    assert failed_ids(response) == ["m-4"]
    [published] = results(deployed["sqs"], deployed["queue"])
    assert published["detail-type"] == "Mirror Verification Failed"

    out = read_output(capsys)
    assert out.logs, "expected JSON logs on stdout"
    assert any(line.get("error_type") == "ObjectStoreError" for line in out.logs)
    assert SECRET_KEY not in out.raw
    assert ACCESS_KEY not in out.raw


@pytest.mark.parametrize(
    ("budget", "expected"),
    [(None, verify_handler.DEFAULT_NEW_BYTES_BUDGET), ("", None), ("5000", 5000)],
)
def test_the_new_bytes_budget_has_a_default_and_empty_means_unlimited(
    aws: None, monkeypatch: pytest.MonkeyPatch, budget: str | None, expected: int | None
) -> None:
    for name in ("RUNS_TABLE", "IDEMPOTENCY_TABLE", "EVENT_BUS_NAME", "DESTINATION_SECRET_ARN"):
        monkeypatch.setenv(name, "x")
    if budget is None:
        monkeypatch.delenv("VERIFY_NEW_BYTES_BUDGET", raising=False)
    else:
        monkeypatch.setenv("VERIFY_NEW_BYTES_BUDGET", budget)
    deps = verify_handler.dependencies_from_env()
    assert deps.options.new_bytes_budget == expected
    assert deps.rotation_days == 30 and deps.continuations is None


def test_secret_errors_are_clear_and_never_echo_the_value(aws: None) -> None:
    client = boto3.client("secretsmanager", region_name=REGION)
    client.create_secret(
        Name="bad-shape",
        SecretString=json.dumps(
            {"provider": "b2", "secret_access_key": [SECRET_KEY], "acces_key_id": ACCESS_KEY}
        ),
    )
    client.create_secret(Name="not-json", SecretString=f"key={SECRET_KEY}")
    client.create_secret(
        Name="half", SecretString=json.dumps({"provider": "b2", "secret_access_key": SECRET_KEY})
    )
    client.create_secret(
        Name="good",
        SecretString=json.dumps(
            {
                "provider": "b2",
                "region": "us-west-004",
                "access_key_id": ACCESS_KEY,
                "secret_access_key": SECRET_KEY,
            }
        ),
    )

    messages = []
    for name in ("bad-shape", "not-json", "half", "missing"):
        with pytest.raises(DestinationSecretError) as info:
            load_destination_access(name)
        messages.append(str(info.value))
        assert info.value.__cause__ is None  # the SDK/pydantic error is not chained along
    assert "secret_access_key" in messages[0] and "acces_key_id" in messages[0]
    assert "not valid JSON" in messages[1]
    assert "together" in messages[2]
    assert "could not be read" in messages[3]
    for message in messages:
        assert SECRET_KEY not in message and ACCESS_KEY not in message

    access = load_destination_access("good")
    assert access == S3Access(
        provider="b2",
        region="us-west-004",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
    )
    assert SECRET_KEY not in repr(access)
    assert access.resolved_endpoint() == "https://s3.us-west-004.backblazeb2.com"


def test_secret_destinations_reuse_the_client_until_the_key_rotates() -> None:
    current = {"key": "one"}
    made: list[S3Access] = []
    warnings: list[str] = []

    def load(secret_id: str) -> S3Access:
        return S3Access(
            provider="b2",
            region="us-west-004",
            access_key_id="id",
            secret_access_key=current["key"],
        )

    def make_client(access: S3Access) -> Any:
        made.append(access)
        return object()

    opener = SecretDestinations("arn", load=load, make_client=make_client, warn=warnings.append)
    opener(DEST)
    opener(DEST.model_copy(update={"bucket": "other"}))
    assert len(made) == 1 and warnings == []
    current["key"] = "two"
    opener(DEST)
    assert len(made) == 2
    opener(DEST.model_copy(update={"endpoint_url": "https://s3.eu-central-003.backblazeb2.com"}))
    assert warnings and "eu-central-003" in warnings[0]


def test_endpoint_mismatch_rules() -> None:
    b2 = S3Access(provider="b2", region="us-west-004")
    assert endpoint_mismatch(DEST, b2) is None
    assert endpoint_mismatch(DEST.model_copy(update={"endpoint_url": None}), b2) is None
    assert endpoint_mismatch(DEST.model_copy(update={"provider": "s3"}), b2) is not None


# -- the event bus publisher -----------------------------------------------------------------


class FakeEvents:
    def __init__(self, refuse: list[int]) -> None:
        self.refuse = refuse  # per call: how many of the leading entries to refuse
        self.calls: list[list[dict[str, Any]]] = []

    def put_events(self, Entries: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: N803
        self.calls.append(Entries)
        n = self.refuse.pop(0) if self.refuse else 0
        results = [
            {"ErrorCode": "ThrottlingException", "ErrorMessage": "slow down"}
            if i < n
            else {"EventId": str(uuid.uuid4())}
            for i in range(len(Entries))
        ]
        return {"FailedEntryCount": min(n, len(Entries)), "Entries": results}


def verified_events(n: int) -> list[EventDetail]:
    store = InMemoryObjectStore()
    out: list[EventDetail] = []
    for seed in range(n):
        event, _ = write_mirror(store.put, DEST, seed=seed, objects=1)
        out.append(event)
    return out


def test_eventbridge_bus_resends_refused_entries_then_gives_up() -> None:
    events = verified_events(12)
    fake = FakeEvents(refuse=[2, 1, 0])
    bus = EventBridgeBus("backrest-relay", client=fake, sleep=lambda s: None)  # type: ignore[arg-type]
    bus.publish(*events)
    # 12 entries: 10 + 2 per call limit; the first call refused 2, resent, then 1, resent.
    assert [len(c) for c in fake.calls] == [10, 2, 1, 2]
    assert fake.calls[1] == fake.calls[0][:2]
    assert all(e["EventBusName"] == "backrest-relay" for c in fake.calls for e in c)

    stubborn = FakeEvents(refuse=[1] * 10)
    bus = EventBridgeBus("backrest-relay", client=stubborn, attempts=3, sleep=lambda s: None)  # type: ignore[arg-type]
    with pytest.raises(EventPublishError, match=r"refused 1 event.*ThrottlingException"):
        bus.publish(events[0])
    assert len(stubborn.calls) == 3

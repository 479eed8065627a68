"""4a. Bad input to the Lambda handlers: malformed, oversized and wrong-version events.

hypothesis builds SQS batches the way Lambda delivers them (every record has its message
id and attributes) whose bodies are anything from valid events of every kind to garbage:
random text, JSON that is not an EventBridge event, envelopes with a mutated detail (keys
dropped or replaced by random JSON, unknown keys, another ``schema_version``), details
blown up past SQS's 256 KB, known detail-types with another source.

The verifier and the notifier must answer every batch inside the batch protocol — a dict
``{"batchItemFailures": [{"itemIdentifier": <an input message id>}, ...]}`` — and never
raise. Beyond that: garbage and contract-breaking details fail their own record (so they
end in the DLQ); well-formed events of a kind the handler does not process are
acknowledged; valid events of its kind (not oversized) are processed without failing.
The watchdog, fed random schedule events and a run store filled by the fuzzed notifier,
always completes.

A batch *envelope* that is not an SQS batch (no ``Records``, a record without
``messageId``) is not fuzzed: Lambda never builds one, and powertools rightly fails the
invocation for it (there is no message id to report).
"""

from __future__ import annotations

import os

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

import io
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities import parameters
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from moto import mock_aws
from pydantic import ValidationError

from cloud.contracts.destination import Destination
from cloud.contracts.events import (
    DetailType,
    ErrorInfo,
    EventDetail,
    ManifestRef,
    MirrorCompleted,
    MirrorFailed,
    MirrorStale,
    MirrorStats,
    MirrorVerificationFailed,
    MirrorVerified,
    Problem,
    RepoRef,
    Source,
    UnknownEventError,
    VerificationStats,
    parse_detail,
)
from cloud.handlers import notify as notify_handler
from cloud.handlers import verify as verify_handler
from cloud.handlers import watchdog as watchdog_handler
from cloud.logic.ports import Notification
from cloud.logic.verify import VerifyOptions
from tests.reliability.common import SEED, SOAK, Ledger, count
from tests.support.doubles.event_bus import RecordingEventBus
from tests.support.doubles.object_store import InMemoryObjectStore
from tests.support.doubles.runstore import InMemoryRunStore
from tests.support.lambdas import (
    FakeLambdaContext,
    create_idempotency_table,
    event_body,
    eventbridge_event,
    fake_aws_env,
    sqs_record,
    write_mirror,
)

REGION = "us-east-1"
TABLE = "reliability-idempotency"
EXAMPLES = count("bad events: hypothesis examples per handler")
SQS_LIMIT = 256 * 1024
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not SOAK,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- the world behind the handlers ------------------------------------------------------------


class Buckets:
    """Destination opener over in-memory buckets (any bucket name opens an empty one)."""

    def __init__(self) -> None:
        self.buckets: dict[str, InMemoryObjectStore] = {}

    def __call__(self, destination: Destination) -> tuple[Any, Any]:
        store = self.buckets.setdefault(destination.bucket, InMemoryObjectStore())
        return store, store


class Recorder:
    kind = "recorder"

    def __init__(self) -> None:
        self.sent: list[Notification] = []

    @property
    def name(self) -> str:
        return "recorder"

    def send(self, notification: Notification) -> None:
        self.sent.append(notification)


@dataclass
class World:
    buckets: Buckets
    runs: InMemoryRunStore
    bus: RecordingEventBus
    channel: Recorder
    logs: io.StringIO


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    fake_aws_env(monkeypatch, REGION, AWS_REGION=REGION)
    logs = io.StringIO()
    handlers = [m.logger.registered_handler for m in (verify_handler, notify_handler)]
    handlers.append(watchdog_handler.logger.registered_handler)
    originals = []
    for handler in handlers:
        assert isinstance(handler, logging.StreamHandler)
        originals.append(handler.setStream(logs))
    with mock_aws():
        parameters.clear_caches()  # type: ignore[no-untyped-call]
        client = boto3.client("dynamodb", region_name=REGION)
        create_idempotency_table(client, TABLE)
        world = World(Buckets(), InMemoryRunStore(), RecordingEventBus(), Recorder(), logs)

        def persistence() -> DynamoDBPersistenceLayer:
            return DynamoDBPersistenceLayer(table_name=TABLE, boto3_client=client)

        verify_handler.set_dependencies(
            verify_handler.Dependencies(
                runs=world.runs,
                destinations=world.buckets,
                events=world.bus,
                persistence=persistence,
                options=VerifyOptions(concurrency=2),
                host="lambda:reliability",
            )
        )
        notify_handler.set_dependencies(
            notify_handler.Dependencies(
                runs=world.runs,
                channels=lambda repo: [world.channel],
                persistence=persistence,
                policy="always",
            )
        )
        watchdog_handler.set_dependencies(
            watchdog_handler.Dependencies(runs=world.runs, events=world.bus)
        )
        yield world
    for module in (verify_handler, notify_handler, watchdog_handler):
        module.set_dependencies(None)
        module.metrics.clear_metrics()
    for handler, original in zip(handlers, originals, strict=True):
        handler.setStream(original)
    parameters.clear_caches()  # type: ignore[no-untyped-call]


# -- strategies ------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
SHORT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20)
HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
WHEN = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
COUNT = st.integers(min_value=0, max_value=2**53)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)

repos = st.builds(RepoRef, id=st.none() | SHORT, guid=st.none() | SHORT, path=st.none() | TEXT)
destinations = st.builds(
    Destination,
    provider=st.sampled_from(["b2", "aws", "s3"]),
    endpoint_url=st.none() | TEXT,
    bucket=SHORT,
    prefix=TEXT,
)
manifests = st.builds(ManifestRef, key=SHORT, sha256=HEX64, objects=COUNT, created_by_run=SHORT)
common = {
    "run_id": st.builds(lambda: str(uuid.uuid4())),  # fresh: a reused id is another test
    "repo": repos,
    "host": TEXT,
    "trigger": TEXT,
    "destination": destinations,
    "started_at": WHEN,
    "finished_at": WHEN,
}
problems = st.builds(
    Problem,
    key=TEXT,
    kind=st.sampled_from(["missing", "size", "etag", "hash", "manifest", "unreadable", "extra"]),
    detail=st.text(max_size=500),
)
verification_fields = {
    **common,
    "mirror_run_id": SHORT,
    "manifest": manifests,
    "stats": st.builds(VerificationStats, listed=COUNT, compared=COUNT, bytes_read=COUNT),
    "problems": st.lists(problems, max_size=5),
    "problems_total": COUNT,
    "warnings": st.lists(TEXT, max_size=3),
}
valid_events: st.SearchStrategy[EventDetail] = st.one_of(
    st.builds(
        MirrorCompleted,
        **common,
        stats=st.builds(MirrorStats, files=COUNT, bytes=COUNT),
        manifest=manifests,
        new_snapshots=st.lists(SHORT, max_size=5),
    ),
    st.builds(
        MirrorFailed,
        **common,
        error=st.builds(
            ErrorInfo,
            kind=st.sampled_from(["config", "destination", "guard", "check", "unexpected"]),
            message=st.text(max_size=2000),
        ),
    ),
    st.builds(MirrorVerified, **verification_fields),
    st.builds(MirrorVerificationFailed, **verification_fields),
    st.builds(
        MirrorStale,
        **common,
        last_verified_at=st.none() | WHEN,
        age_seconds=st.none() | st.floats(0, 1e9),
        max_age_seconds=st.floats(1, 1e9),
    ),
)

KNOWN = [(m.SOURCE.value, m.DETAIL_TYPE.value) for m in (MirrorCompleted, MirrorFailed)] + [
    (Source.VERIFIER.value, DetailType.MIRROR_VERIFIED.value),
    (Source.VERIFIER.value, DetailType.MIRROR_VERIFICATION_FAILED.value),
    (Source.WATCHDOG.value, DetailType.MIRROR_STALE.value),
]


@dataclass(frozen=True)
class Body:
    """One SQS body and what a correct handler must do with it."""

    text: str
    kind: str  # "garbage" | "invalid" | "foreign" | "valid" | "oversized" | "unknown"
    event: tuple[str, str] | None = None  # (source, detail-type) when well-formed


def classify(source: str, detail_type: str, detail: Any) -> str:
    """The contract's verdict on a detail (the contract itself is the oracle here)."""
    try:
        parse_detail(source, detail_type, detail)
    except UnknownEventError:
        return "foreign"
    except ValidationError:
        return "invalid"
    return "valid"


def drop_path(data: Any, path: list[Any]) -> Any:
    """`data` with the item at `path` removed (or replaced when it is the root)."""
    if not path:
        return None
    head, *rest = path
    if isinstance(data, dict) and head in data:
        copy = dict(data)
        if rest:
            copy[head] = drop_path(copy[head], rest)
        else:
            del copy[head]
        return copy
    return data


def set_path(data: Any, path: list[Any], value: Any) -> Any:
    if not path:
        return value
    head, *rest = path
    if isinstance(data, dict):
        copy = dict(data)
        copy[head] = set_path(copy.get(head), rest, value)
        return copy
    return data


def paths(data: Any, prefix: list[Any] | None = None) -> list[list[Any]]:
    prefix = prefix or []
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            out += paths(value, [*prefix, key])
    return out


@st.composite
def bodies(draw: st.DrawFn) -> Body:
    choice = draw(st.integers(0, 9))
    if choice == 0:  # not JSON at all
        text = draw(st.text(max_size=200).filter(lambda t: not _is_json(t)))
        return Body(text, "garbage")
    if choice == 1:  # JSON, but not an EventBridge event
        value = draw(JSON)
        if isinstance(value, dict) and {"detail", "source", "detail-type"} <= value.keys():
            return Body(json.dumps(value), "unknown")
        return Body(json.dumps(value), "garbage")
    event = draw(valid_events)
    detail = json.loads(event.model_dump_json())
    source, detail_type = event.SOURCE.value, event.DETAIL_TYPE.value
    if choice == 2:  # a contract field dropped
        victim = draw(st.sampled_from(paths(detail)))
        detail = drop_path(detail, victim)
    elif choice == 3:  # a field replaced by any JSON value
        victim = draw(st.sampled_from(paths(detail)))
        detail = set_path(detail, victim, draw(JSON))
    elif choice == 4:  # another schema version, or an unknown key
        if draw(st.booleans()):
            detail["schema_version"] = draw(
                st.sampled_from([0, 2, 99, -1, "1", None, 1.5, True, [1]])
            )
        else:
            detail[draw(SHORT.filter(lambda k: k not in detail))] = draw(JSON)
    elif choice == 5:  # oversized: past SQS's 256 KB
        huge = "x" * (SQS_LIMIT + draw(st.integers(0, 4096)))
        field_ = draw(st.sampled_from(["host", "trigger", "run_id", "new_snapshots"]))
        detail[field_] = [huge[:300]] * 1000 if field_ == "new_snapshots" else huge
    elif choice == 6:  # another (source, detail-type): known or not
        source, detail_type = draw(
            st.sampled_from([*KNOWN, ("aws.ec2", "EC2 Instance State-change Notification")])
            | st.tuples(SHORT, SHORT)
        )
    elif choice == 7:  # the envelope itself damaged
        env = eventbridge_event(detail, source=source, detail_type=detail_type)
        victim = draw(st.sampled_from(sorted(env)))
        if draw(st.booleans()):
            del env[victim]
        else:
            env[victim] = draw(JSON)
        return Body(json.dumps(env), "unknown")
    elif choice == 8:  # cut off mid-way
        text = json.dumps(eventbridge_event(detail, source=source, detail_type=detail_type))
        cut = draw(st.integers(0, max(len(text) - 1, 0)))
        return Body(text[:cut], "garbage")
    # choice 9: valid as generated
    text = json.dumps(eventbridge_event(detail, source=source, detail_type=detail_type))
    kind = classify(source, detail_type, detail)
    if len(text) > SQS_LIMIT:
        kind = "oversized" if kind == "valid" else kind
    return Body(text, kind, (source, detail_type))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


batches = st.lists(bodies(), min_size=1, max_size=4)

# -- the properties ----------------------------------------------------------------------------


@dataclass
class Tally:
    batches: int = 0
    records: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    must_fail: int = 0  # garbage and contract-breaking bodies
    failed_as_required: int = 0

    def add(self, items: list[Body], ids: list[str], failed: set[str]) -> None:
        self.batches += 1
        self.records += len(items)
        for item, message_id in zip(items, ids, strict=True):
            self.kinds[item.kind] = self.kinds.get(item.kind, 0) + 1
            if item.kind in ("garbage", "invalid"):
                self.must_fail += 1
                self.failed_as_required += message_id in failed


def run_batch(handler: Any, items: list[Body]) -> tuple[list[str], set[str]]:
    ids = [f"m-{i}-{uuid.uuid4().hex[:8]}" for i in range(len(items))]
    event = {"Records": [sqs_record(b.text, i) for b, i in zip(items, ids, strict=True)]}
    response = handler(event, FakeLambdaContext(remaining_ms=300_000))
    assert isinstance(response, dict) and set(response) == {"batchItemFailures"}, response
    failures = response["batchItemFailures"]
    assert isinstance(failures, list)
    failed = [f["itemIdentifier"] for f in failures]
    assert all(set(f) == {"itemIdentifier"} for f in failures), failures
    assert len(failed) == len(set(failed)) and set(failed) <= set(ids), (failed, ids)
    return ids, set(failed)


def check_outcomes(
    items: list[Body], ids: list[str], failed: set[str], processes: set[str]
) -> None:
    """`processes`: the detail-types this handler acts on (the rest it acknowledges)."""
    for body, message_id in zip(items, ids, strict=True):
        known = body.event is not None and body.event in KNOWN
        if body.kind in ("garbage", "invalid"):
            assert message_id in failed, f"{body.kind} body was acknowledged: {body.text[:300]}"
        elif body.kind == "foreign":
            assert message_id not in failed, f"foreign event failed: {body.text[:300]}"
        elif body.kind == "valid" and known and body.event is not None:
            # Processed or acknowledged, never failed: the fakes behind it always work.
            assert message_id not in failed or body.event[1] not in processes, body.text[:500]


def test_verify_handler_answers_every_batch_within_the_protocol(
    world: World, ledger: Ledger
) -> None:
    tally = Tally()

    @SETTINGS
    @seed(SEED)
    @given(batches)
    def run(items: list[Body]) -> None:
        ids, failed = run_batch(verify_handler.handler, items)
        check_outcomes(items, ids, failed, {DetailType.MIRROR_COMPLETED.value})
        tally.add(items, ids, failed)

    run()
    ledger.add(
        "bad events (verify handler)",
        trials=tally.records,
        faults=tally.must_fail,
        detected=tally.failed_as_required,
        kinds=tally.kinds,
        note=f"{tally.batches} batches; every answer a valid partial-batch response",
    )


def test_notify_handler_and_watchdog_answer_every_input(world: World, ledger: Ledger) -> None:
    tally = Tally()
    watchdog_runs = 0

    @SETTINGS
    @seed(SEED + 1)
    @given(batches, JSON)
    def run(items: list[Body], schedule_event: Any) -> None:
        nonlocal watchdog_runs
        ids, failed = run_batch(notify_handler.handler, items)
        notified = {t for _, t in KNOWN if t != DetailType.MIRROR_COMPLETED.value}
        check_outcomes(items, ids, failed, notified)
        tally.add(items, ids, failed)
        # The watchdog reads what the notifier recorded (fuzzed failures included).
        result = watchdog_handler.handler(schedule_event, FakeLambdaContext(remaining_ms=300_000))
        assert isinstance(result, dict) and {"checked_at", "stale", "failed"} <= set(result)
        watchdog_runs += 1

    run()
    ledger.add(
        "bad events (notify handler, watchdog)",
        trials=tally.records + watchdog_runs,
        faults=tally.must_fail,
        detected=tally.failed_as_required,
        kinds=tally.kinds,
        note=f"{tally.batches} batches, {watchdog_runs} watchdog passes over the fuzzed store",
    )


def test_a_valid_event_next_to_garbage_is_still_processed(world: World) -> None:
    """Poison pills fail alone: the good record in the same batch is verified."""
    store = world.buckets.buckets.setdefault("offsite", InMemoryObjectStore())
    destination = Destination(provider="s3", endpoint_url=None, bucket="offsite", prefix="r")
    good, _ = write_mirror(store.put, destination, seed=8)
    items = [
        Body("{", "garbage"),
        Body(event_body(good), "valid"),
        Body("x" * (SQS_LIMIT + 1), "garbage"),
    ]
    ids, failed = run_batch(verify_handler.handler, items)
    assert failed == {ids[0], ids[2]}
    [result] = world.bus.events
    assert isinstance(result, MirrorVerified) and result.mirror_run_id == good.run_id

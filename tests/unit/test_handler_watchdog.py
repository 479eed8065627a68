"""The watchdog Lambda handler with a controlled clock, alone and together with the notifier.

The run store is in memory, the bus records what is published; the combined test feeds the
watchdog's `Mirror Stale` to the notifier handler the way the rule → SQS → Lambda path
would, with powertools idempotency on moto. The last test runs the production wiring on
moto: DynamoDB run store, EventBridge bus → SQS.
"""

from __future__ import annotations

import os

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer
from moto import mock_aws

from cloud.contracts.events import (
    EventDetail,
    MirrorStale,
    RepoRef,
)
from cloud.handlers import notify as notify_handler
from cloud.handlers import watchdog as watchdog_handler
from cloud.handlers.common import ConfigError
from cloud.logic.ports import Notification, RunRecord
from cloud.logic.verification import record_verification
from tests.support import events
from tests.support.doubles.event_bus import RecordingEventBus
from tests.support.doubles.runstore import InMemoryRunStore
from tests.support.events import GUID, T0
from tests.support.lambdas import (
    FakeLambdaContext,
    bus_to_queue,
    create_idempotency_table,
    fake_aws_env,
    logs_to_current_stdout,
    read_output,
)

REGION = "us-east-1"
OTHER = "cd" * 32


def verified(at: datetime, guid: str = GUID, repo_id: str = "home") -> EventDetail:
    return events.verification(at, repo=RepoRef(id=repo_id, guid=guid))


@pytest.fixture(autouse=True, scope="module")
def logs_on_pytest_stdout() -> Iterator[None]:
    with logs_to_current_stdout(notify_handler.logger, watchdog_handler.logger):
        yield


SCHEDULED_EVENT = {
    "version": "0",
    "id": "5d0c3a1e-0000-4000-8000-000000000001",
    "detail-type": "Scheduled Event",
    "source": "aws.events",
    "account": "123456789012",
    "time": "2026-11-02T15:00:00Z",
    "region": REGION,
    "resources": ["arn:aws:events:us-east-1:123456789012:rule/backrest-relay-watchdog"],
    "detail": {},
}


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    runs: InMemoryRunStore
    bus: RecordingEventBus
    clock: Clock

    def run(self, at: datetime) -> dict[str, Any]:
        self.clock.now = at
        result: dict[str, Any] = watchdog_handler.handler(
            SCHEDULED_EVENT, FakeLambdaContext("backrest-relay-watchdog")
        )
        return result

    def alerted_at(self, repo_key: str = GUID) -> datetime | None:
        return next(s for s in self.runs.repos() if s.repo_key == repo_key).stale_alerted_at


@pytest.fixture
def world(capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    world = World(InMemoryRunStore(), RecordingEventBus(), Clock(T0))
    watchdog_handler.set_dependencies(
        watchdog_handler.Dependencies(
            runs=world.runs, events=world.bus, host="lambda:watchdog", clock=world.clock
        )
    )
    yield world
    watchdog_handler.set_dependencies(None)
    watchdog_handler.metrics.clear_metrics()


# -- the watchdog alone ----------------------------------------------------------------------


def test_repository_27_hours_old_gets_one_stale_alert_a_day(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    record_verification(world.runs, verified(T0))

    assert world.run(T0 + timedelta(hours=25))["stale"] == []  # fresh enough
    result = world.run(T0 + timedelta(hours=27))
    assert result["stale"] == ["home"] and result["failed"] == []
    [event] = world.bus.events
    assert isinstance(event, MirrorStale)
    assert event.repo == RepoRef(id="home", guid=GUID)
    assert event.age_seconds == pytest.approx(27 * 3600)
    assert event.max_age_seconds == 26 * 3600
    assert event.host == "lambda:watchdog"
    assert world.alerted_at() == T0 + timedelta(hours=27)
    [stale_run] = [r for r in world.runs.runs(GUID) if r.kind == "stale"]
    assert stale_run.run_id == event.run_id

    assert world.run(T0 + timedelta(hours=28))["stale"] == []  # within 24 h: quiet
    assert world.run(T0 + timedelta(hours=50))["stale"] == []
    assert world.run(T0 + timedelta(hours=51, minutes=1))["stale"] == ["home"]  # a day later
    assert len(world.bus.events) == 2

    out = read_output(capsys)
    assert out.metric_values("StaleRepositories") == [0, 1, 0, 0, 1]
    [alert, _] = out.lines("Mirror Stale")
    assert alert["level"] == "WARNING" and alert["repo"] == "home"
    assert alert["repo_key"] == GUID and alert["age_seconds"] == 27 * 3600
    assert alert["correlation_id"] == SCHEDULED_EVENT["id"]
    assert alert["function_name"] == "backrest-relay-watchdog"


def test_max_age_comes_from_the_dependencies(world: World) -> None:
    deps = watchdog_handler.get_dependencies()
    deps.max_age = timedelta(hours=48)
    record_verification(world.runs, verified(T0))
    assert world.run(T0 + timedelta(hours=47))["stale"] == []
    assert world.run(T0 + timedelta(hours=49))["stale"] == ["home"]


def test_publish_failure_raises_and_the_alert_is_retried_next_hour(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    record_verification(world.runs, verified(T0))
    world.bus.fail_next = 1

    with pytest.raises(watchdog_handler.StaleAlertError, match="home: not published"):
        world.run(T0 + timedelta(hours=27))
    assert world.bus.events == []
    assert world.alerted_at() is None  # not marked: the next run tries again

    assert world.run(T0 + timedelta(hours=28))["stale"] == ["home"]
    assert len(world.bus.events) == 1
    assert world.alerted_at() == T0 + timedelta(hours=28)
    out = read_output(capsys)
    assert out.metric_values("StalePublishFailures") == [1]
    [error] = out.lines("Mirror Stale not published")
    assert error["level"] == "ERROR" and error["error_type"] == "EventPublishError"


def test_one_failed_publish_does_not_stop_the_others(world: World) -> None:
    record_verification(world.runs, verified(T0, guid=GUID, repo_id="home"))
    record_verification(world.runs, verified(T0, guid=OTHER, repo_id="media"))
    world.bus.fail_next = 1  # the first repository's alert (runs.repos() is sorted)

    with pytest.raises(watchdog_handler.StaleAlertError, match="1 of 2"):
        world.run(T0 + timedelta(hours=27))
    assert [e.repo.id for e in world.bus.events] == ["media"]
    assert world.alerted_at(GUID) is None
    assert world.alerted_at(OTHER) == T0 + timedelta(hours=27)

    assert world.run(T0 + timedelta(hours=28))["stale"] == ["home"]


class FlakyRuns(InMemoryRunStore):
    """Fails to record the `fail_on`-th run it is asked to record (counting from 1)."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.fail_on = fail_on
        self.calls = 0

    def record(self, run: RunRecord) -> None:
        if run.kind == "stale":
            self.calls += 1
            if self.calls == self.fail_on:
                raise RuntimeError("ProvisionedThroughputExceededException")
        super().record(run)


def test_a_pass_that_dies_half_way_marks_nothing_it_did_not_publish(world: World) -> None:
    runs = FlakyRuns(fail_on=2)
    record_verification(runs, verified(T0, guid=GUID, repo_id="home"))
    record_verification(runs, verified(T0, guid=OTHER, repo_id="media"))
    watchdog_handler.set_dependencies(
        watchdog_handler.Dependencies(runs=runs, events=world.bus, clock=world.clock)
    )
    world.runs = runs

    with pytest.raises(RuntimeError, match="Throughput"):
        world.run(T0 + timedelta(hours=27))
    assert world.bus.events == []
    # `run_watchdog` had marked "home" before dying on "media": held back, so not lost.
    assert world.alerted_at(GUID) is None and world.alerted_at(OTHER) is None

    assert sorted(world.run(T0 + timedelta(hours=28))["stale"]) == ["home", "media"]


def test_configuration_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNS_TABLE", "runs")
    monkeypatch.setenv("EVENT_BUS_NAME", "bus")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "backrest-relay-watchdog")
    monkeypatch.delenv("MAX_AGE_HOURS", raising=False)
    deps = watchdog_handler.dependencies_from_env()
    assert deps.max_age == timedelta(hours=26)
    assert deps.repeat_every == timedelta(hours=24)
    assert deps.host == "lambda:backrest-relay-watchdog"
    monkeypatch.setenv("MAX_AGE_HOURS", "50")
    assert watchdog_handler.dependencies_from_env().max_age == timedelta(hours=50)
    for bad in ("0", "a day", "1.5"):
        monkeypatch.setenv("MAX_AGE_HOURS", bad)
        with pytest.raises(ConfigError, match="MAX_AGE_HOURS"):
            watchdog_handler.dependencies_from_env()
    monkeypatch.delenv("EVENT_BUS_NAME")
    with pytest.raises(ConfigError, match="EVENT_BUS_NAME"):
        watchdog_handler.dependencies_from_env()


# -- watchdog and notifier together ----------------------------------------------------------


class Recorder:
    def __init__(self, name: str = "email") -> None:
        self._name = name
        self.sent: list[Notification] = []

    @property
    def name(self) -> str:
        return self._name

    def send(self, notification: Notification) -> None:
        self.sent.append(notification)


def notify(event: EventDetail) -> dict[str, Any]:
    """The notifier handler, given the event as the rule → SQS → Lambda path delivers it."""
    body = json.dumps(
        {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": event.DETAIL_TYPE.value,
            "source": event.SOURCE.value,
            "account": "123456789012",
            "time": "2026-11-01T12:00:00Z",
            "region": REGION,
            "resources": [],
            "detail": json.loads(event.model_dump_json()),
        }
    )
    record = {
        "messageId": str(uuid.uuid4()),
        "receiptHandle": "AQEB",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1767268800000",
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": "1767268800001",
        },
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(body.encode(), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{REGION}:123456789012:notify",
        "awsRegion": REGION,
    }
    context = FakeLambdaContext(function_name="backrest-relay-notify")
    response: dict[str, Any] = notify_handler.handler({"Records": [record]}, context)
    return response


@pytest.fixture
def idempotency(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    fake_aws_env(monkeypatch, REGION)
    with mock_aws():
        client = boto3.client("dynamodb", region_name=REGION)
        create_idempotency_table(client, "idempotency")
        yield client


def test_stale_alert_then_recovery_through_the_notifier(
    world: World, idempotency: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    email = Recorder()
    notify_handler.set_dependencies(
        notify_handler.Dependencies(
            runs=world.runs,
            channels=lambda repo: [email],
            persistence=lambda: DynamoDBPersistenceLayer(
                table_name="idempotency", boto3_client=idempotency
            ),
            policy="on_recovery",
        )
    )
    try:
        first = verified(T0)
        record_verification(world.runs, first)  # the verifier records, then publishes
        assert notify(first) == {"batchItemFailures": []}
        assert email.sent == []  # on_recovery: a first success is quiet

        world.run(T0 + timedelta(hours=27))
        [stale] = world.bus.events
        assert notify(stale) == {"batchItemFailures": []}
        assert notify(stale) == {"batchItemFailures": []}  # redelivered: not sent again
        assert [n.severity for n in email.sent] == ["stale"]
        assert "no verified off-site copy for 27.0 h" in email.sent[0].subject

        assert world.run(T0 + timedelta(hours=28))["stale"] == []  # within 24 h

        back = verified(T0 + timedelta(hours=30))
        record_verification(world.runs, back)
        assert notify(back) == {"batchItemFailures": []}
        assert [n.severity for n in email.sent] == ["stale", "recovery"]
        assert "recovered" in email.sent[1].subject

        assert world.run(T0 + timedelta(hours=31))["stale"] == []
        assert world.alerted_at() is None  # cleared: the next staleness alerts at once

        later = verified(T0 + timedelta(hours=40))
        record_verification(world.runs, later)
        assert notify(later) == {"batchItemFailures": []}
        assert len(email.sent) == 2  # quiet again
        assert len(world.bus.events) == 1
    finally:
        notify_handler.set_dependencies(None)
        notify_handler.metrics.clear_metrics()


# -- the production wiring on moto -----------------------------------------------------------


def test_env_wiring_publishes_to_the_bus(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud.integrations.runstore_dynamodb import DynamoRunStore, create_table

    fake_aws_env(
        monkeypatch,
        REGION,
        RUNS_TABLE="backrest-relay-runs",
        EVENT_BUS_NAME="backrest-relay",
        MAX_AGE_HOURS="26",
        AWS_LAMBDA_FUNCTION_NAME="backrest-relay-watchdog",
    )
    with mock_aws():
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        create_table(dynamodb, "backrest-relay-runs")
        runs = DynamoRunStore("backrest-relay-runs", client=dynamodb)
        record_verification(runs, verified(T0))
        stale_only = {"source": ["backrest-relay.watchdog"], "detail-type": ["Mirror Stale"]}
        sqs, queue = bus_to_queue(REGION, "notify", stale_only, rule="stale")

        deps = watchdog_handler.dependencies_from_env()
        deps.clock = Clock(T0 + timedelta(hours=27))
        watchdog_handler.set_dependencies(deps)
        try:
            watchdog_handler.handler(SCHEDULED_EVENT, FakeLambdaContext("backrest-relay-watchdog"))
            watchdog_handler.handler(
                SCHEDULED_EVENT, FakeLambdaContext("backrest-relay-watchdog")
            )  # within 24 h
        finally:
            watchdog_handler.set_dependencies(None)
            watchdog_handler.metrics.clear_metrics()

        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
        [body] = [json.loads(m["Body"]) for m in messages]
        assert body["source"] == "backrest-relay.watchdog"
        assert body["detail-type"] == "Mirror Stale"
        assert body["detail"]["repo"]["guid"] == GUID
        assert body["detail"]["host"] == "lambda:backrest-relay-watchdog"
        [status] = list(runs.repos())
        assert status.stale_alerted_at == T0 + timedelta(hours=27)
        assert status.latest_run is not None and status.latest_run.kind == "stale"

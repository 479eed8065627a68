"""The notifier Lambda handler, fed SQS events the way Lambda delivers them.

Dependencies are the in-memory run store and recording channels; idempotency is
powertools' real DynamoDB persistence layer on moto (`mock_aws`). The last tests cover the
channel wiring from the notify secret and the production wiring (`dependencies_from_env`)
with SNS read back through an SQS subscription.
"""

from __future__ import annotations

import os
import secrets

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.idempotency import DynamoDBPersistenceLayer

from cloud.contracts.events import (
    DetailType,
    EventDetail,
    MirrorFailed,
    MirrorStats,
    RepoRef,
    Source,
)
from cloud.handlers import notify as notify_handler
from cloud.handlers.common import ConfigError
from cloud.integrations.channels.targets import NotifyChannels
from cloud.integrations.secrets import (
    NotifySecretError,
    NotifyTargets,
    load_notify_targets,
    parse_notify_secret,
)
from cloud.logic.notify import SuccessPolicy
from cloud.logic.ports import ChannelError, Notification, NotificationChannel
from cloud.logic.verification import record_verification
from tests.support import events
from tests.support.doubles.runstore import InMemoryRunStore
from tests.support.events import GUID, REPO, T0, stale, verification
from tests.support.lambdas import (
    IDEMPOTENCY_TABLE,
    REGION,
    FakeLambdaContext,
    eventbridge_event,
    failed_ids,
    logs_to_current_stdout,
    read_output,
    record_for,
    sqs_event,
    sqs_record,
)

HC_UUID = "5f2d0b9e-8c61-4c43-a2a5-0f8f3cbd3c2a"
APPRISE_TOKEN = "TFakeSlackToken" + secrets.token_hex(4)  # made per run, never a literal


def mirror_failed(at: datetime = T0, repo: RepoRef = REPO) -> MirrorFailed:
    return events.mirror_failed(
        at, repo=repo, stats=MirrorStats(uploaded_files=3, uploaded_bytes=3000)
    )


@pytest.fixture(autouse=True, scope="module")
def logs_on_pytest_stdout() -> Iterator[None]:
    with logs_to_current_stdout(notify_handler.logger):
        yield


# -- events ----------------------------------------------------------------------------------


def invoke(event: dict[str, Any], context: FakeLambdaContext | None = None) -> dict[str, Any]:
    response: dict[str, Any] = notify_handler.handler(
        event, context or FakeLambdaContext("backrest-relay-notify")
    )
    return response


# -- channels --------------------------------------------------------------------------------


class Recorder:
    """A channel that records what it was sent; it fails its first `fail_first` sends (or
    all of them with `broken`)."""

    def __init__(self, name: str, *, fail_first: int = 0, broken: bool = False) -> None:
        self._name = name
        self.fail_first = fail_first
        self.broken = broken
        self.attempts = 0
        self.sent: list[Notification] = []

    @property
    def name(self) -> str:
        return self._name

    def send(self, notification: Notification) -> None:
        self.attempts += 1
        if self.broken or self.attempts <= self.fail_first:
            raise ChannelError(f"{self._name}: HTTP 502 Bad Gateway")
        self.sent.append(notification)

    def severities(self) -> list[str]:
        return [n.severity for n in self.sent]


# -- fixtures --------------------------------------------------------------------------------


@dataclass
class World:
    runs: InMemoryRunStore
    channels: list[Recorder]
    idempotency: Any
    looked_up: list[RepoRef] = field(default_factory=list)

    def channel_source(self, repo: RepoRef) -> list[NotificationChannel]:
        self.looked_up.append(repo)
        return list(self.channels)

    def use(self, policy: SuccessPolicy = "on_recovery", *channels: Recorder) -> None:
        """(Re)build the notifier, as a new container would, on the same stores."""
        if channels:
            self.channels[:] = channels
        notify_handler.set_dependencies(
            notify_handler.Dependencies(
                runs=self.runs,
                channels=self.channel_source,
                persistence=lambda: DynamoDBPersistenceLayer(
                    table_name=IDEMPOTENCY_TABLE, boto3_client=self.idempotency
                ),
                policy=policy,
            )
        )


@pytest.fixture
def world(idempotency_client: Any, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    world = World(InMemoryRunStore(), [Recorder("email"), Recorder("chat")], idempotency_client)
    world.use()
    yield world
    notify_handler.set_dependencies(None)
    notify_handler.metrics.clear_metrics()


def verified_and_recorded(world: World, at: datetime, ok: bool = True) -> EventDetail:
    """A verification result as the verifier leaves it: recorded, then published."""
    result = verification(at, ok)
    record_verification(world.runs, result)
    return result


# -- the handler -----------------------------------------------------------------------------


def test_mirror_failed_is_recorded_and_sent_to_every_channel(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    event = mirror_failed()
    response = invoke(sqs_event(record_for(event, "m-1")))

    assert response == {"batchItemFailures": []}
    # Recorded first, so the policy sees it when the next success arrives.
    [run] = world.runs.runs(GUID)
    assert (run.run_id, run.kind, run.status) == (event.run_id, "failure", "failed")
    for channel in world.channels:
        [note] = channel.sent
        assert note.severity == "failure" and note.run_id == event.run_id
        assert "home" in note.subject and "SlowDown" in note.text
    assert world.looked_up == [REPO]  # channels chosen for this repository (Healthchecks)

    out = read_output(capsys)
    assert out.metric_values("NotificationsSent") == [2]
    assert out.metric_values("NotificationFailures") == [0]
    [line] = out.lines("notification delivered")
    assert line["correlation_id"] == event.run_id
    assert line["severity"] == "failure"
    assert line["function_name"] == "backrest-relay-notify"
    assert [(c["channel"], c["status"]) for c in line["channels"]] == [
        ("email", "sent"),
        ("chat", "sent"),
    ]


def test_duplicate_delivery_sends_once_per_channel(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    event = mirror_failed()
    # Twice in one batch, then again in a later invocation (EventBridge and SQS are both
    # at-least-once), then once more by a fresh container.
    first = invoke(sqs_event(record_for(event, "m-1"), record_for(event, "m-2")))
    again = invoke(sqs_event(record_for(event, "m-3")))
    world.use()
    third = invoke(sqs_event(record_for(event, "m-4")))

    assert first == again == third == {"batchItemFailures": []}
    assert [len(c.sent) for c in world.channels] == [1, 1]
    assert [c.attempts for c in world.channels] == [1, 1]
    assert len(world.runs.runs(GUID)) == 1
    out = read_output(capsys)
    assert out.metric_values("NotificationsSent") == [2, 0, 0, 0]
    assert out.metric_values("NotificationsAlreadySent") == [2, 2, 2]
    statuses = [{c["status"] for c in line["channels"]} for line in out.lines("notification")]
    assert statuses == [{"sent"}, {"already sent"}, {"already sent"}, {"already sent"}]


def test_one_broken_channel_fails_the_record_and_only_it_is_retried(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    email, flaky, chat = Recorder("email"), Recorder("webhook", fail_first=2), Recorder("chat")
    world.use("on_recovery", email, flaky, chat)
    event = mirror_failed()

    first = invoke(sqs_event(record_for(event, "m-1")))
    assert failed_ids(first) == ["m-1"]
    assert (len(email.sent), len(flaky.sent), len(chat.sent)) == (1, 0, 1)  # others received

    second = invoke(sqs_event(record_for(event, "m-1")))  # SQS redelivers; still down
    assert failed_ids(second) == ["m-1"]
    third = invoke(sqs_event(record_for(event, "m-1")))  # back up
    assert third == {"batchItemFailures": []}
    assert (len(email.sent), len(flaky.sent), len(chat.sent)) == (1, 1, 1)
    assert (email.attempts, flaky.attempts, chat.attempts) == (1, 3, 1)
    assert flaky.sent[0].text == email.sent[0].text  # the same message, late

    out = read_output(capsys)
    assert out.metric_values("NotificationsSent") == [2, 0, 1]
    assert out.metric_values("NotificationFailures") == [1, 1, 0]
    assert out.metric_values("RecordFailures") == [1, 1]
    [warning, *_] = out.lines("notification not delivered")
    assert warning["level"] == "WARNING"
    assert [(c["channel"], c["status"]) for c in warning["channels"]] == [
        ("email", "sent"),
        ("webhook", "failed"),
        ("chat", "sent"),
    ]
    assert warning["channels"][1]["error"] == "HTTP 502 Bad Gateway"
    [failure, *_] = out.lines("record failed")
    assert failure["message_id"] == "m-1" and failure["correlation_id"] == event.run_id
    assert "1 of 3 channel(s) failed: webhook: HTTP 502" in failure["error"]


def test_every_channel_failing_fails_the_record(world: World) -> None:
    world.use("on_recovery", Recorder("email", broken=True), Recorder("chat", broken=True))
    good, bad = mirror_failed(), mirror_failed()
    world.channels[0].broken = world.channels[1].broken = True
    response = invoke(sqs_event(record_for(bad, "m-bad")))
    assert failed_ids(response) == ["m-bad"]
    for channel in world.channels:
        channel.broken = False
    response = invoke(sqs_event(record_for(bad, "m-bad"), record_for(good, "m-good")))
    assert response == {"batchItemFailures": []}
    assert [n.run_id for n in world.channels[0].sent] == [bad.run_id, good.run_id]


def test_no_channel_at_all_fails_the_record(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.channels.clear()
    response = invoke(sqs_event(record_for(mirror_failed(), "m-1")))
    assert failed_ids(response) == ["m-1"]
    [error] = read_output(capsys).lines("record failed")
    assert error["error_type"] == "NoChannelsError"


def test_on_recovery_policy_quiet_success_then_failure_then_one_recovery(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    for hours, ok in ((0, True), (24, False), (48, True), (72, True)):
        step = verified_and_recorded(world, T0 + timedelta(hours=hours), ok=ok)
        assert invoke(sqs_event(record_for(step))) == {"batchItemFailures": []}

    email = world.channels[0]
    assert email.severities() == ["failure", "recovery"]
    assert "recovered" in email.sent[1].subject
    out = read_output(capsys)
    assert out.metric_values("NotificationsSkipped") == [1, 1]
    quiet = out.lines("policy says quiet")
    assert [line.get("previous") for line in quiet] == [None, "ok"]


class Heartbeat(Recorder):
    """A heartbeat channel (like Healthchecks): hears every verified run."""

    heartbeat = True


@pytest.mark.parametrize("policy", ["on_recovery", "never", "always"])
def test_healthchecks_hears_every_verified_run_whatever_the_policy(
    world: World, policy: SuccessPolicy
) -> None:
    heartbeat = Heartbeat("healthchecks")
    world.use(policy, Recorder("email"), heartbeat)
    for hours, ok in ((0, True), (24, True), (48, False), (72, True)):
        event = verified_and_recorded(world, T0 + timedelta(hours=hours), ok=ok)
        assert invoke(sqs_event(record_for(event))) == {"batchItemFailures": []}
    assert heartbeat.severities() == ["success", "success", "failure", "recovery"]
    assert all(n.ping_run_id == "m1" for n in heartbeat.sent)
    email = world.channels[0].severities()
    assert (
        email
        == {
            "on_recovery": ["failure", "recovery"],
            "never": ["failure"],
            "always": ["success", "success", "failure", "recovery"],
        }[policy]
    )


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("always", ["success", "failure", "recovery", "success"]),
        ("never", ["failure"]),
    ],
)
def test_success_policy_from_the_configuration(
    world: World, policy: SuccessPolicy, expected: list[str]
) -> None:
    world.use(policy)
    for hours, ok in ((0, True), (24, False), (48, True), (72, True)):
        event = verified_and_recorded(world, T0 + timedelta(hours=hours), ok=ok)
        assert invoke(sqs_event(record_for(event))) == {"batchItemFailures": []}
    assert world.channels[0].severities() == expected


def test_redelivery_keeps_the_first_decision(world: World) -> None:
    """A recovery that reached only some channels stays a recovery for the others, even
    after a newer success makes "the previous outcome" look good."""
    email, chat = Recorder("email"), Recorder("chat", fail_first=2)
    world.use("on_recovery", email, chat)
    invoke(sqs_event(record_for(verified_and_recorded(world, T0, ok=False))))
    recovery = verified_and_recorded(world, T0 + timedelta(hours=24))
    assert failed_ids(invoke(sqs_event(record_for(recovery, "m-r")))) == ["m-r"]
    newer = verified_and_recorded(world, T0 + timedelta(hours=48))
    invoke(sqs_event(record_for(newer)))  # quiet: the one before it was good

    assert invoke(sqs_event(record_for(recovery, "m-r"))) == {"batchItemFailures": []}
    assert email.severities() == ["failure", "recovery"]
    assert chat.severities() == ["recovery"]  # (its failure alert was never redelivered)
    assert chat.sent[0] == email.sent[1]


def test_stale_alert_is_sent_with_the_age(world: World) -> None:
    event = stale(T0 + timedelta(hours=27))
    assert invoke(sqs_event(record_for(event))) == {"batchItemFailures": []}
    [note] = world.channels[0].sent
    assert note.severity == "stale" and "27.0 h" in note.subject


def test_malformed_messages_fail_only_themselves(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    good = mirror_failed()
    bad_detail = json.loads(good.model_dump_json())
    del bad_detail["error"]
    future = json.loads(good.model_dump_json()) | {"schema_version": 2}

    def raw(detail: dict[str, Any], message_id: str) -> dict[str, Any]:
        return sqs_record(
            json.dumps(
                eventbridge_event(
                    detail, source=Source.AGENT.value, detail_type=DetailType.MIRROR_FAILED.value
                )
            ),
            message_id,
        )

    response = invoke(
        sqs_event(
            sqs_record("not json {", "m-garbage"),
            sqs_record(json.dumps({"hello": "world"}), "m-envelope"),
            record_for(good, "m-good"),
            raw(bad_detail, "m-detail"),
            raw(future, "m-future"),
        )
    )

    assert failed_ids(response) == ["m-garbage", "m-envelope", "m-detail", "m-future"]
    assert [n.run_id for n in world.channels[0].sent] == [good.run_id]
    out = read_output(capsys)
    assert out.metric_values("MalformedEvents") == [1, 1, 1, 1]
    malformed = {line["message_id"]: line for line in out.lines("malformed message")}
    assert set(malformed) == {"m-garbage", "m-envelope", "m-detail", "m-future"}
    assert any("error" in e for e in malformed["m-detail"]["errors"])
    assert any("schema_version" in e for e in malformed["m-future"]["errors"])


def test_other_event_kinds_are_logged_counted_and_acknowledged(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    completed = events.completed(T0)
    foreign = sqs_record(
        json.dumps(eventbridge_event({"state": "on"}, source="aws.ec2", detail_type="EC2 State")),
        "m-foreign",
    )
    response = invoke(sqs_event(record_for(completed, "m-completed"), foreign))

    assert response == {"batchItemFailures": []}  # retrying cannot help
    assert world.channels[0].sent == []
    assert world.runs.runs(GUID) == []
    out = read_output(capsys)
    assert out.metric_values("IgnoredEvents") == [1, 1]
    ignored = out.lines("not an event the notifier handles")
    assert {line["detail_type"] for line in ignored} == {"Mirror Completed", "EC2 State"}
    assert {line["level"] for line in ignored} == {"ERROR"}


def test_records_are_not_started_when_the_invocation_is_about_to_time_out(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    response = invoke(
        sqs_event(record_for(mirror_failed(), "m-1"), record_for(mirror_failed(), "m-2")),
        FakeLambdaContext("backrest-relay-notify", remaining_ms=5_000),
    )
    assert failed_ids(response) == ["m-1", "m-2"]
    assert world.channels[0].attempts == 0
    out = read_output(capsys)
    assert {line["error_type"] for line in out.lines("record not processed")} == {
        "DeadlineNearError"
    }


def test_missing_configuration_fails_the_invocation_loudly(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify_handler.set_dependencies(None)
    monkeypatch.setenv("RUNS_TABLE", "runs")
    monkeypatch.setenv("IDEMPOTENCY_TABLE", "idem")
    for name in ("TOPIC_ARN", "NOTIFY_SECRET_ARN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="TOPIC_ARN"):
        invoke(sqs_event(sqs_record("{}")))
    monkeypatch.setenv("TOPIC_ARN", "arn:aws:sns:us-east-1:123456789012:alerts")
    monkeypatch.setenv("SUCCESS_POLICY", "sometimes")
    with pytest.raises(ConfigError, match="SUCCESS_POLICY"):
        invoke(sqs_event(sqs_record("{}")))
    notify_handler.set_dependencies(None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, "on_recovery"), ("", "on_recovery"), (" Always ", "always"), ("never", "never")],
)
def test_success_policy_parsing(raw: str | None, expected: str) -> None:
    assert notify_handler.success_policy(raw) == expected


# -- channels from the notify secret ---------------------------------------------------------


def test_channels_follow_the_secret_per_repository() -> None:
    secret: dict[str, Any] = {
        "apprise_urls": ["json://hooks.example/a", "json://hooks.example/b"],
        "healthchecks": {GUID: f"https://hc-ping.com/{HC_UUID}", "other": "https://hc/x"},
    }
    made: list[str] = []

    def recorder(url: str) -> NotificationChannel:
        made.append(url)
        return Recorder(url)

    sns = Recorder("sns")
    source = NotifyChannels(
        topic_arn="arn:aws:sns:us-east-1:123456789012:alerts",
        secret_id="notify",
        load=lambda sid: parse_notify_secret(sid, secret),
        sns=sns,
        apprise=recorder,
        healthchecks=recorder,
    )

    by_guid = source(REPO)
    assert [c.name for c in by_guid] == [
        "sns",
        "json://hooks.example/a",
        "json://hooks.example/b",
        f"https://hc-ping.com/{HC_UUID}",
    ]
    assert [c.name for c in source(RepoRef(id="other"))][-1] == "https://hc/x"  # by id
    assert len(source(RepoRef(id="third"))) == 3  # no Healthchecks check for it
    assert source(REPO) == by_guid  # kept per container: Apprise parses a URL once
    assert len(made) == 4

    secret["apprise_urls"] = ["json://hooks.example/b"]  # edited secret
    assert [c.name for c in source(REPO)][1:] == [
        "json://hooks.example/b",
        f"https://hc-ping.com/{HC_UUID}",
    ]
    assert len(made) == 4


def test_unreadable_secret_still_sends_to_sns_and_fails_as_a_channel() -> None:
    def broken(sid: str) -> NotifyTargets:
        raise NotifySecretError(f"notify secret {sid!r} could not be read: AccessDenied")

    sns = Recorder("sns")
    source = NotifyChannels(
        topic_arn="arn:aws:sns:us-east-1:123456789012:alerts",
        secret_id="arn:notify",
        load=broken,
        sns=sns,
    )
    channels = source(REPO)
    assert [c.name for c in channels] == ["sns", "notify-secret:arn:notify"]
    with pytest.raises(ChannelError, match="AccessDenied"):
        channels[1].send(
            Notification("s", "t", "h", "failure", repo_key=GUID, repo_id="home", run_id="r")
        )


@pytest.mark.usefixtures("aws")
def test_notify_secret_loading_never_echoes_a_value() -> None:
    client = boto3.client("secretsmanager", region_name=REGION)
    good = {
        "apprise_urls": [f"slack://{APPRISE_TOKEN}", "  ", f"slack://{APPRISE_TOKEN}"],
        "healthchecks": {"home": f"https://hc-ping.com/{HC_UUID}"},
    }
    client.create_secret(Name="good", SecretString=json.dumps(good))
    client.create_secret(Name="empty", SecretString="{}")
    client.create_secret(
        Name="typo",
        SecretString=json.dumps({"apprise_url": [f"slack://{APPRISE_TOKEN}"]}),
    )
    client.create_secret(
        Name="shape", SecretString=json.dumps({"healthchecks": {"home": [HC_UUID]}})
    )
    client.create_secret(Name="list", SecretString=json.dumps([HC_UUID]))
    client.create_secret(Name="not-json", SecretString=f"url={APPRISE_TOKEN}")

    targets = load_notify_targets("good")
    assert targets.apprise_urls == (f"slack://{APPRISE_TOKEN}",)  # blank and duplicate gone
    assert targets.healthchecks_url(GUID, "home") == f"https://hc-ping.com/{HC_UUID}"
    assert targets.healthchecks_url(GUID, None) is None
    assert APPRISE_TOKEN not in repr(targets) and HC_UUID not in repr(targets)
    assert "home" in repr(targets)
    assert load_notify_targets("empty") == NotifyTargets()

    messages = []
    for name in ("typo", "shape", "list", "not-json", "missing"):
        with pytest.raises(NotifySecretError) as info:
            load_notify_targets(name)
        assert info.value.__cause__ is None
        messages.append(str(info.value))
    assert "apprise_url" in messages[0]
    assert "healthchecks.home" in messages[1]
    assert "JSON object" in messages[2]
    assert "not valid JSON" in messages[3]
    assert "could not be read" in messages[4]
    for message in messages:
        assert APPRISE_TOKEN not in message and HC_UUID not in message


# -- the production wiring on moto -----------------------------------------------------------


def test_env_wiring_sends_through_sns_and_reads_the_secret(
    idempotency_client: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud.integrations.runstore_dynamodb import DynamoRunStore, create_table

    create_table(idempotency_client, "backrest-relay-runs")
    sns = boto3.client("sns", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    topic = sns.create_topic(Name="alerts")["TopicArn"]
    inbox = sqs.create_queue(QueueName="inbox")["QueueUrl"]
    inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=inbox_arn)
    # An Apprise URL whose target is unreachable (a closed port): it fails, SNS still sends.
    secret = boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name="backrest-relay/notify",
        SecretString=json.dumps({"apprise_urls": [f"json://127.0.0.1:9/{APPRISE_TOKEN}"]}),
    )
    for name, value in {
        "RUNS_TABLE": "backrest-relay-runs",
        "IDEMPOTENCY_TABLE": IDEMPOTENCY_TABLE,
        "TOPIC_ARN": topic,
        "NOTIFY_SECRET_ARN": secret["ARN"],
        "SUCCESS_POLICY": "always",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "DEBUG")
    notify_handler.logger.setLevel("DEBUG")
    notify_handler.set_dependencies(None)
    try:
        event = mirror_failed()
        response = invoke(sqs_event(record_for(event, "m-1")))
        assert failed_ids(response) == ["m-1"]  # the Apprise channel failed
        again = invoke(sqs_event(record_for(event, "m-1")))
        assert failed_ids(again) == ["m-1"]

        messages = sqs.receive_message(QueueUrl=inbox, MaxNumberOfMessages=10)["Messages"]
        [envelope] = [json.loads(m["Body"]) for m in messages]  # once, despite the retry
        assert envelope["Subject"].startswith("[backrest-relay]")
        assert "SlowDown" in envelope["Message"]
        assert envelope["MessageAttributes"]["severity"]["Value"] == "failure"
        assert envelope["MessageAttributes"]["run_id"]["Value"] == event.run_id

        store = DynamoRunStore("backrest-relay-runs", boto3.client("dynamodb", region_name=REGION))
        assert [r.kind for r in store.runs(GUID)] == ["failure"]
        deps = notify_handler.get_notifier().deps
        assert deps.policy == "always"
    finally:
        notify_handler.set_dependencies(None)
        notify_handler.metrics.clear_metrics()
        notify_handler.logger.setLevel("INFO")

    out = read_output(capsys)
    assert out.lines("notification not delivered")
    assert APPRISE_TOKEN not in out.raw

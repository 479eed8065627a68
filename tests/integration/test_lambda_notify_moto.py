"""The notifier (and the watchdog) Lambda end to end on moto's server (ThreadedMotoServer).

What the SAM template deploys, in moto: the event bus with the notify rule (the template's
``$or`` pattern) → the notify queue (redrive to a DLQ after 2 receives), the SNS topic with
an SQS queue subscribed (standing in for the email subscribers), the run store and the
idempotency table, and the notify secret. Its Apprise URL (``json://``) points at a local
HTTP sink, its Healthchecks ping URL at another. The handler is fed the real SQS messages
the way Lambda's event source mapping does (successes deleted, reported failures left on
the queue), with the production wiring (`dependencies_from_env`).
"""

from __future__ import annotations

import os

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aws_lambda_powertools.utilities import parameters

from cloud.contracts.events import (
    ManifestRef,
    MirrorFailed,
    MirrorVerified,
    RepoRef,
    VerificationStats,
)
from cloud.contracts.ids import new_run_id
from cloud.handlers import notify as notify_handler
from cloud.handlers import watchdog as watchdog_handler
from cloud.integrations.eventbus import EventBridgeBus
from cloud.integrations.runstore_dynamodb import DynamoRunStore, create_table
from cloud.logic.verification import record_verification
from testbed.s3.endpoint import S3Endpoint
from tests.support import events
from tests.support.lambdas import (
    BUS,
    RUNS_TABLE,
    FakeLambdaContext,
    MotoAws,
    Queues,
    create_idempotency_table,
    logs_to_current_stdout,
    moto_function_env,
    route,
)
from tests.support.sinks import HttpRequest, HttpSink, closed_port

GUID = "ef" * 32
REPO = RepoRef(id="home", guid=GUID, path="/srv/restic/home")
HC_UUID = "5f2d0b9e-8c61-4c43-a2a5-0f8f3cbd3c2a"
# Token-shaped sentinels made per run: the test proves they never reach a log, and no
# credential-looking literal is committed.
CHAT_TOKEN = "Sentinel" + secrets.token_hex(8)
FLAKY_TOKEN = "Sentinel" + secrets.token_hex(9)
SECRETS = (HC_UUID, CHAT_TOKEN, FLAKY_TOKEN)
NOTIFY_PATTERN = {
    "$or": [
        {
            "source": ["backrest-relay.verifier"],
            "detail-type": ["Mirror Verified", "Mirror Verification Failed"],
        },
        {"source": ["backrest-relay.agent"], "detail-type": ["Mirror Failed"]},
        {"source": ["backrest-relay.watchdog"], "detail-type": ["Mirror Stale"]},
    ]
}


@pytest.fixture(autouse=True, scope="module")
def logs_on_pytest_stdout() -> Iterator[None]:
    with logs_to_current_stdout(notify_handler.logger, watchdog_handler.logger):
        yield


@dataclass
class Cloud:
    """The deployed cloud side, in moto, and the local receivers."""

    url: str
    sqs: Any
    secrets: Any
    notify_queue: str
    notify_arn: str
    dlq: str
    inbox: str
    secret_arn: str
    chat: HttpSink
    pings: HttpSink
    runs: DynamoRunStore
    bus: EventBridgeBus

    def put_targets(self, *apprise_urls: str) -> None:
        """The notify secret: these Apprise URLs and the repository's Healthchecks check."""
        self.secrets.put_secret_value(
            SecretId=self.secret_arn,
            SecretString=json.dumps(
                {
                    "apprise_urls": list(apprise_urls),
                    "healthchecks": {"home": f"{self.pings.url}/{HC_UUID}"},
                }
            ),
        )
        parameters.clear_caches()  # type: ignore[no-untyped-call]

    def deliver(self, *, max_messages: int = 10) -> dict[str, Any] | None:
        """One poll of Lambda's event source mapping: receive, invoke, delete successes."""
        context = FakeLambdaContext("backrest-relay-notify")
        return Queues(self.sqs).deliver(
            notify_handler.handler,
            self.notify_queue,
            self.notify_arn,
            context,
            max_messages=max_messages,
        )

    def emails(self) -> list[dict[str, Any]]:
        """What the SNS topic sent to its subscribers since the last call."""
        return Queues(self.sqs).drain(self.inbox)

    def peek_bodies(self, queue: str) -> list[str]:
        return Queues(self.sqs).peek_bodies(queue)


def deploy(
    aws: MotoAws, queue: tuple[str, str], dlq: str, chat: HttpSink, pings: HttpSink
) -> tuple[Cloud, dict[str, str]]:
    """The notifier's side behind its `queue`, as the template deploys it: the SNS topic
    with an inbox queue subscribed, the notify secret (Apprise to `chat`, Healthchecks to
    `pings`); and the settings that name them, for the function's environment."""
    inbox, inbox_arn = Queues(aws.sqs).create("email-inbox")
    topic = aws.sns.create_topic(Name="backrest-relay-alerts")["TopicArn"]
    aws.sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=inbox_arn)
    secret = aws.secrets.create_secret(Name="backrest-relay/notify", SecretString="{}")
    world = Cloud(
        url=aws.url,
        sqs=aws.sqs,
        secrets=aws.secrets,
        notify_queue=queue[0],
        notify_arn=queue[1],
        dlq=dlq,
        inbox=inbox,
        secret_arn=secret["ARN"],
        chat=chat,
        pings=pings,
        runs=DynamoRunStore(RUNS_TABLE, client=aws.dynamodb),
        bus=EventBridgeBus(BUS, client=aws.events),
    )
    world.put_targets(f"json://127.0.0.1:{chat.port}/hooks/{CHAT_TOKEN}")
    return world, {"TOPIC_ARN": topic, "NOTIFY_SECRET_ARN": secret["ARN"]}


@pytest.fixture
def chat() -> Iterator[HttpSink]:
    with HttpSink() as sink:
        yield sink


@pytest.fixture
def pings() -> Iterator[HttpSink]:
    with HttpSink() as sink:
        yield sink


@pytest.fixture
def cloud(
    moto_endpoint: S3Endpoint, chat: HttpSink, pings: HttpSink, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cloud]:
    aws = MotoAws.at(moto_endpoint.endpoint_url)
    notify, (dlq, _) = Queues(aws.sqs).with_dlq(
        "notify",
        max_receive=2,
        VisibilityTimeout="0",  # a failed record is visible again at once (test speed)
    )
    aws.events.create_event_bus(Name=BUS)
    route(aws.events, [("notify", NOTIFY_PATTERN, notify[1])])
    create_table(aws.dynamodb, RUNS_TABLE)
    create_idempotency_table(aws.dynamodb)
    world, settings = deploy(aws, notify, dlq, chat, pings)
    # The functions' own AWS access (DynamoDB, SNS, Secrets Manager, EventBridge) → moto.
    moto_function_env(
        monkeypatch,
        aws.url,
        AWS_LAMBDA_FUNCTION_NAME="backrest-relay-notify",
        **settings,
        SUCCESS_POLICY="on_recovery",
        MAX_AGE_HOURS="26",
        POWERTOOLS_LOG_LEVEL="DEBUG",
    )
    notify_handler.logger.setLevel("DEBUG")
    parameters.clear_caches()  # type: ignore[no-untyped-call]
    notify_handler.set_dependencies(None)
    watchdog_handler.set_dependencies(None)
    yield world
    notify_handler.set_dependencies(None)
    watchdog_handler.set_dependencies(None)
    notify_handler.metrics.clear_metrics()
    watchdog_handler.metrics.clear_metrics()
    notify_handler.logger.setLevel("INFO")
    parameters.clear_caches()  # type: ignore[no-untyped-call]


@pytest.fixture
def every_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Apprise and urllib3 at their most verbose (Apprise's TRACE is DEBUG - 1): they log
    request URLs, which is where a token would leak."""
    for name in ("apprise", "urllib3"):
        caplog.set_level(1, logger=name)
    return caplog


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"secret {secret[:4]}… leaked"


def mirror_failed() -> MirrorFailed:
    now = datetime.now(UTC)
    return events.mirror_failed(now, repo=REPO, started_at=now - timedelta(minutes=3))


def verified(at: datetime) -> MirrorVerified:
    event = events.verification(
        at,
        repo=REPO,
        mirror_run_id=new_run_id(),
        manifest=ManifestRef(key="m/1.jsonl.gz", sha256="0" * 64, objects=9, created_by_run="m1"),
        stats=VerificationStats(compared=9, deep_checked=9, bytes_read=9000),
    )
    assert isinstance(event, MirrorVerified)
    return event


def paths(requests: list[HttpRequest]) -> list[str]:
    return [r.path for r in requests]


# -- tests -----------------------------------------------------------------------------------


def test_failure_reaches_email_chat_and_healthchecks_once(
    cloud: Cloud, capsys: pytest.CaptureFixture[str], every_log: pytest.LogCaptureFixture
) -> None:
    event = mirror_failed()
    cloud.bus.publish(event)  # as the agent does
    [body] = cloud.peek_bodies(cloud.notify_queue)
    # EventBridge (and SQS) deliver at least once: the same event arrives twice.
    cloud.sqs.send_message(QueueUrl=cloud.notify_queue, MessageBody=body)

    first = cloud.deliver(max_messages=1)
    second = cloud.deliver(max_messages=1)
    assert first is not None and first["batchItemFailures"] == []
    assert second is not None and second["batchItemFailures"] == []
    assert cloud.deliver() is None  # both deleted

    [email] = cloud.emails()
    assert email["Subject"] == "[backrest-relay] home: off-site mirror failed (destination)"
    assert "SlowDown (HTTP 503)" in email["Message"] and "home on nas" in email["Message"]
    assert email["MessageAttributes"]["severity"]["Value"] == "failure"
    assert email["MessageAttributes"]["run_id"]["Value"] == event.run_id

    [chat] = cloud.chat.wait_for(1)
    assert chat.path == f"/hooks/{CHAT_TOKEN}"
    assert chat.json()["type"] == "failure"
    assert chat.json()["title"].endswith("home: off-site mirror failed (destination)")
    assert "SlowDown" in chat.json()["message"]

    [ping] = cloud.pings.wait_for(1)
    assert ping.path == f"/{HC_UUID}/fail"
    assert ping.query == {"rid": [event.run_id]}

    [run] = cloud.runs.runs(GUID)
    assert (run.run_id, run.kind) == (event.run_id, "failure")

    out = capsys.readouterr().out
    logs = [json.loads(line) for line in out.splitlines() if line.startswith('{"level"')]
    delivered = [line for line in logs if line["message"] == "notification delivered"]
    assert [{c["status"] for c in line["channels"]} for line in delivered] == [
        {"sent"},
        {"already sent"},
    ]
    assert delivered[0]["correlation_id"] == event.run_id
    names = [c["channel"] for c in delivered[0]["channels"]]
    assert names[0].startswith("sns:arn:aws:sns:")
    assert names[1].startswith(f"apprise:json://127.0.0.1:{cloud.chat.port}/hooks/")
    assert names[2] == f"healthchecks:{cloud.pings.url}/…"
    assert "JSON POST URL" in every_log.text  # Apprise did log the URL, scrubbed
    assert_no_secrets(out, every_log.text)
    assert len(cloud.chat.requests) == 1 and len(cloud.pings.requests) == 1


def test_broken_channel_others_receive_and_redelivery_retries_only_it(
    cloud: Cloud, capsys: pytest.CaptureFixture[str], every_log: pytest.LogCaptureFixture
) -> None:
    with HttpSink() as flaky:
        flaky_port = flaky.port
        cloud.put_targets(
            f"json://127.0.0.1:{flaky.port}/hooks/{FLAKY_TOKEN}",
            f"json://127.0.0.1:{cloud.chat.port}/hooks/{CHAT_TOKEN}",
        )
        flaky.answer_next(500)
        event = mirror_failed()
        cloud.bus.publish(event)

        first = cloud.deliver()
        assert first is not None
        assert first["batchItemFailures"] == [{"itemIdentifier": first["delivered"][0]}]
        assert len(cloud.emails()) == 1  # the others received it
        assert len(cloud.chat.wait_for(1)) == 1 and len(cloud.pings.wait_for(1)) == 1
        assert len(flaky.requests) == 1

        second = cloud.deliver()  # SQS redelivers; the webhook is back
        assert second is not None and second["batchItemFailures"] == []
        assert cloud.deliver() is None
        assert paths(flaky.wait_for(2)) == [f"/hooks/{FLAKY_TOKEN}"] * 2
        assert cloud.emails() == []  # not sent again
        assert len(cloud.chat.requests) == 1 and len(cloud.pings.requests) == 1
        assert flaky.requests[1].json()["message"] == cloud.chat.requests[0].json()["message"]

    out = capsys.readouterr().out
    logs = [json.loads(line) for line in out.splitlines() if line.startswith('{"level"')]
    [partial] = [line for line in logs if line["message"].startswith("notification not")]
    failed = [c for c in partial["channels"] if c["status"] == "failed"]
    assert len(failed) == 1 and "500" in (failed[0]["error"] or "")
    assert failed[0]["channel"].startswith(f"apprise:json://127.0.0.1:{flaky_port}/hooks/")
    [retried] = [line for line in logs if line["message"] == "notification delivered"]
    assert sorted(c["status"] for c in retried["channels"]) == [
        "already sent",
        "already sent",
        "already sent",
        "sent",
    ]
    assert_no_secrets(out, every_log.text)


def test_channel_that_stays_broken_sends_the_event_to_the_dlq(cloud: Cloud) -> None:
    cloud.put_targets(f"json://127.0.0.1:{closed_port()}/hooks/{FLAKY_TOKEN}")
    cloud.bus.publish(mirror_failed())

    for _ in range(2):
        response = cloud.deliver()
        assert response is not None and len(response["batchItemFailures"]) == 1
    assert cloud.deliver() is None  # maxReceiveCount reached: moved, not delivered
    [dead] = cloud.peek_bodies(cloud.dlq)
    assert json.loads(dead)["detail-type"] == "Mirror Failed"
    assert len(cloud.emails()) == 1  # email went out once, on the first attempt
    assert len(cloud.pings.requests) == 1


def test_unreadable_secret_still_emails_and_the_record_is_retried(
    cloud: Cloud, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud.secrets.put_secret_value(
        SecretId=cloud.secret_arn,
        SecretString=json.dumps({"apprise": [f"json://x/{CHAT_TOKEN}"]}),  # misspelt key
    )
    parameters.clear_caches()  # type: ignore[no-untyped-call]
    cloud.bus.publish(mirror_failed())

    response = cloud.deliver()
    assert response is not None and len(response["batchItemFailures"]) == 1
    assert len(cloud.emails()) == 1
    out = capsys.readouterr().out
    assert "notify-secret:" in out and "apprise: Extra inputs are not permitted" in out
    assert_no_secrets(out)

    cloud.put_targets(f"json://127.0.0.1:{cloud.chat.port}/hooks/{CHAT_TOKEN}")  # fixed
    retry = cloud.deliver()
    assert retry is not None and retry["batchItemFailures"] == []
    assert cloud.emails() == []  # already sent
    assert len(cloud.chat.wait_for(1)) == 1 and len(cloud.pings.wait_for(1)) == 1


def test_watchdog_stale_alert_then_recovery_end_to_end(cloud: Cloud) -> None:
    t0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    first = verified(t0)
    record_verification(cloud.runs, first)  # the verifier records, then publishes
    cloud.bus.publish(first)
    response = cloud.deliver()
    assert response is not None and response["batchItemFailures"] == []
    assert cloud.emails() == []  # on_recovery: a first success is quiet for people...
    [heartbeat] = cloud.pings.wait_for(1)  # ...but Healthchecks hears every verified run
    assert heartbeat.path == f"/{HC_UUID}" and heartbeat.query == {"rid": [first.mirror_run_id]}

    def watchdog(at: datetime) -> dict[str, Any]:
        deps = watchdog_handler.dependencies_from_env()
        deps.clock = lambda: at
        watchdog_handler.set_dependencies(deps)
        context = FakeLambdaContext(function_name="backrest-relay-watchdog")
        result: dict[str, Any] = watchdog_handler.handler({"id": "scheduled"}, context)
        return result

    assert watchdog(t0 + timedelta(hours=27))["stale"] == ["home"]
    response = cloud.deliver()
    assert response is not None and response["batchItemFailures"] == []
    [stale] = cloud.emails()
    assert stale["Subject"] == "[backrest-relay] home: no verified off-site copy for 27.0 h"
    assert stale["MessageAttributes"]["severity"]["Value"] == "stale"
    assert cloud.pings.wait_for(2)[1].path == f"/{HC_UUID}/fail"
    assert cloud.chat.wait_for(1)[0].json()["type"] == "warning"

    assert watchdog(t0 + timedelta(hours=28))["stale"] == []  # within 24 h: quiet
    assert cloud.deliver() is None

    back = verified(t0 + timedelta(hours=30))
    record_verification(cloud.runs, back)
    cloud.bus.publish(back)
    response = cloud.deliver()
    assert response is not None and response["batchItemFailures"] == []
    [recovery] = cloud.emails()
    assert recovery["Subject"] == "[backrest-relay] recovered home: off-site copy verified"
    assert recovery["MessageAttributes"]["severity"]["Value"] == "recovery"
    ok_ping = cloud.pings.wait_for(3)[2]
    # rid: the mirror run the verification is about (pairs with that run's /start).
    assert ok_ping.path == f"/{HC_UUID}" and ok_ping.query == {"rid": [back.mirror_run_id]}
    assert cloud.chat.wait_for(2)[1].json()["type"] == "success"

    assert watchdog(t0 + timedelta(hours=31))["stale"] == []
    [status] = list(cloud.runs.repos())
    assert status.stale_alerted_at is None  # cleared by the verified run
    assert cloud.deliver() is None

"""Notification channels against real receivers on 127.0.0.1 (and SNS/SQS in moto).

Apprise's own plugins send to a local HTTP sink (``json://``) and a local SMTP sink
(``mailto://``); Healthchecks pings go through urllib to the HTTP sink; SNS is moto's,
read back through an SQS subscription. Every test also checks that the channel's secret
never shows in its name, its error or the log (caplog at TRACE level: Apprise and urllib3
log request URLs at DEBUG).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from cloud.integrations.channels import (
    AppriseChannel,
    HealthchecksChannel,
    SnsChannel,
    deliver,
)
from cloud.logic.ports import ChannelError, Notification, NotificationChannel, Severity
from tests.support.lambdas import aws  # noqa: F401 (the moto account fixture)
from tests.support.sinks import HttpSink, SmtpSink, closed_port

RUN_ID = "0190f5b2-3c4d-7e8f-9a0b-1c2d3e4f5a6b"
HC_UUID = "5f2d0b9e-8c61-4c43-a2a5-0f8f3cbd3c2a"
SMTP_PASSWORD = "Sup3r-S3cret!pw"
# Obviously fake ids and tokens in the providers' shapes (nothing credential-like committed).
DISCORD = ("4000000008", "JFakeDiscordTokenForTests00s")
SLACK = ("T0FAKE002", "A0FAKE00D", "TFakeSlackTokenForTestsQ")
SECRETS = (SMTP_PASSWORD, HC_UUID, *DISCORD, *SLACK)


def note(
    severity: Severity = "failure", subject: str = "backrest-relay: nas FAILED"
) -> Notification:
    return Notification(
        subject=subject,
        text="Repository nas on host1: verification FAILED\n- data/ab/abcd: sha256 mismatch",
        html="<h2>Repository nas</h2><p>verification <b>FAILED</b></p>",
        severity=severity,
        repo_key="f" * 64,
        repo_id="nas",
        run_id=RUN_ID,
    )


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"secret {secret[:3]}… leaked"


@pytest.fixture
def http_sink() -> Iterator[HttpSink]:
    with HttpSink() as sink:
        yield sink


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    with SmtpSink(credentials=("relay", SMTP_PASSWORD)) as sink:
        yield sink


@pytest.fixture
def trace_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(1)  # Apprise's TRACE is DEBUG - 1
    return caplog


def mailto(sink: SmtpSink, password: str = SMTP_PASSWORD) -> str:
    # mailto:// (not mailtos://) to a custom host means plain SMTP; mode=insecure says so
    # explicitly. from= sets the sender, to= the recipient; the user:password log in.
    return (
        f"mailto://relay:{password}@127.0.0.1:{sink.port}"
        "?from=relay@example.com&to=ops@example.com&mode=insecure"
    )


# -- Apprise → HTTP (json://) -------------------------------------------------------------------


def test_apprise_json_delivers_title_and_text(
    http_sink: HttpSink, trace_logs: pytest.LogCaptureFixture
) -> None:
    channel = AppriseChannel(f"json://127.0.0.1:{http_sink.port}/api/webhooks/{'/'.join(DISCORD)}")
    channel.send(note())

    [request] = http_sink.wait_for(1)
    assert request.method == "POST"
    assert request.path == f"/api/webhooks/{'/'.join(DISCORD)}"
    payload = request.json()
    assert payload["title"] == "backrest-relay: nas FAILED"
    assert payload["message"] == note().text  # chat gets the plain text, not HTML
    assert payload["type"] == "failure"
    assert channel.name == f"apprise:json://127.0.0.1:{http_sink.port}/api/webhooks/4...8/J...s"
    assert_no_secrets(channel.name, trace_logs.text)
    assert "JSON POST URL" in trace_logs.text  # Apprise did log the URL, scrubbed


@pytest.mark.parametrize(("severity", "kind"), [("recovery", "success"), ("stale", "warning")])
def test_apprise_notify_type_follows_severity(
    http_sink: HttpSink, severity: Severity, kind: str
) -> None:
    AppriseChannel(f"json://127.0.0.1:{http_sink.port}/hook").send(note(severity))
    assert http_sink.wait_for(1)[0].json()["type"] == kind


def test_apprise_http_error_is_a_channel_error_without_the_token(
    http_sink: HttpSink, trace_logs: pytest.LogCaptureFixture
) -> None:
    http_sink.status = 404
    channel = AppriseChannel(f"json://127.0.0.1:{http_sink.port}/services/{'/'.join(SLACK)}")
    with pytest.raises(ChannelError) as info:
        channel.send(note())
    message = str(info.value)
    assert message.startswith(channel.name)
    assert "404" in message
    assert_no_secrets(message, channel.name, trace_logs.text)


# -- Apprise → SMTP (mailto://) -----------------------------------------------------------------


def test_apprise_mailto_delivers_subject_and_html(
    smtp_sink: SmtpSink, trace_logs: pytest.LogCaptureFixture
) -> None:
    channel = AppriseChannel(mailto(smtp_sink))
    assert channel.sends_html
    channel.send(note())

    [mail] = smtp_sink.wait_for(1)
    assert mail.auth_user == "relay" and mail.auth_password == SMTP_PASSWORD
    assert mail.mail_from == "relay@example.com"
    assert mail.rcpt_tos == ("ops@example.com",)
    assert mail.subject == "backrest-relay: nas FAILED"
    assert (mail.body("html") or "").strip() == note().html
    plain = mail.body("plain")
    assert plain is not None and "Repository nas" in plain  # Apprise adds a text alternative
    assert (
        channel.name == f"apprise:mailto://relay:****@127.0.0.1:{smtp_sink.port}/ops%40example.com"
    )
    assert_no_secrets(channel.name, trace_logs.text)


def test_apprise_mailto_non_ascii_subject(smtp_sink: SmtpSink) -> None:
    AppriseChannel(mailto(smtp_sink)).send(note(subject="✅ nas verified — 3 snapshots"))
    assert smtp_sink.wait_for(1)[0].subject == "✅ nas verified — 3 snapshots"


def test_apprise_mailto_wrong_password_fails_without_it(
    smtp_sink: SmtpSink, trace_logs: pytest.LogCaptureFixture
) -> None:
    wrong = "Wr0ng-Passw0rd-42"
    channel = AppriseChannel(mailto(smtp_sink, password=wrong))
    with pytest.raises(ChannelError) as info:
        channel.send(note())
    assert smtp_sink.messages == []
    for text in (str(info.value), channel.name, trace_logs.text):
        assert wrong not in text
    assert "535" in trace_logs.text  # the server's refusal is still there to debug with


# -- Apprise's real Slack and Discord plugins, failing before they leave the machine ------------


def test_slack_and_discord_failures_do_not_leak_tokens(
    monkeypatch: pytest.MonkeyPatch, trace_logs: pytest.LogCaptureFixture
) -> None:
    # A dead local proxy: the plugins build and log their real request URLs, and fail on
    # 127.0.0.1 without any traffic leaving the machine.
    proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    channels: list[NotificationChannel] = [
        AppriseChannel(f"https://hooks.slack.com/services/{'/'.join(SLACK)}", timeout=10),
        AppriseChannel(f"https://discord.com/api/webhooks/{'/'.join(DISCORD)}", timeout=10),
    ]
    report = deliver(note(), channels)

    assert report.failed == 2
    assert [o.name for o in report.outcomes] == [
        "apprise:slack://T...2/A...D/T...Q",
        "apprise:discord://4...8/J...s",
    ]
    assert_no_secrets(trace_logs.text, *(o.error or "" for o in report.outcomes))
    assert "Slack" in trace_logs.text and "Discord" in trace_logs.text


# -- Healthchecks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("severity", "suffix"),
    [("success", ""), ("recovery", ""), ("failure", "/fail"), ("stale", "/fail")],
)
def test_healthchecks_pings_the_right_path_with_the_run_id(
    http_sink: HttpSink, severity: Severity, suffix: str, trace_logs: pytest.LogCaptureFixture
) -> None:
    channel = HealthchecksChannel(f"{http_sink.url}/{HC_UUID}")
    channel.send(note(severity))

    [request] = http_sink.wait_for(1)
    assert request.method == "POST"
    assert request.path == f"/{HC_UUID}{suffix}"
    assert request.query == {"rid": [RUN_ID]}
    assert request.text() == note().text
    assert request.header("User-Agent") == "backrest-relay"
    assert channel.name == f"healthchecks:{http_sink.url}/…"
    assert_no_secrets(channel.name, trace_logs.text)


def test_healthchecks_self_hosted_and_slug_urls(http_sink: HttpSink) -> None:
    HealthchecksChannel(f"{http_sink.url}/ping/{HC_UUID}/").send(note("stale"))
    HealthchecksChannel(f"{http_sink.url}/ping/Xq0Zr1uT8aBcDe/backup-nas?create=1").send(
        note("success")
    )
    first, second = http_sink.wait_for(2)
    assert first.path == f"/ping/{HC_UUID}/fail"
    assert second.path == "/ping/Xq0Zr1uT8aBcDe/backup-nas"
    assert second.query == {"create": ["1"], "rid": [RUN_ID]}


def test_healthchecks_body_is_truncated_to_10_kb(http_sink: HttpSink) -> None:
    big = Notification("s", "é" * 20_000, "", "failure", "k", None, RUN_ID)
    HealthchecksChannel(f"{http_sink.url}/{HC_UUID}").send(big)
    body = http_sink.wait_for(1)[0].body
    assert len(body) <= 10_000
    assert body.decode("utf-8").endswith("[truncated]")


def test_healthchecks_retries_once_after_a_server_error(http_sink: HttpSink) -> None:
    sleeps: list[float] = []
    http_sink.answer_next(503)
    HealthchecksChannel(f"{http_sink.url}/{HC_UUID}", sleep=sleeps.append).send(note())
    assert len(http_sink.wait_for(2)) == 2
    assert sleeps == [1.0]


def test_healthchecks_unknown_check_is_final(http_sink: HttpSink) -> None:
    http_sink.status = 404
    channel = HealthchecksChannel(f"{http_sink.url}/{HC_UUID}", sleep=lambda _: None)
    with pytest.raises(ChannelError, match="HTTP 404 Not Found") as info:
        channel.send(note())
    assert len(http_sink.requests) == 1
    assert_no_secrets(str(info.value))


def test_healthchecks_connection_refused_retries_once_then_fails() -> None:
    sleeps: list[float] = []
    channel = HealthchecksChannel(
        f"http://127.0.0.1:{closed_port()}/{HC_UUID}", sleep=sleeps.append, retry_delay=0.01
    )
    with pytest.raises(ChannelError) as info:
        channel.send(note())
    assert "after 2 attempt(s)" in str(info.value)
    assert "Connection refused" in str(info.value)
    assert sleeps == [0.01]
    assert_no_secrets(str(info.value))


# -- SNS (moto) ---------------------------------------------------------------------------------


def subscribed_queue(topic_arn: str, region: str = "us-east-1") -> tuple[Any, str]:
    sqs = boto3.client("sqs", region_name=region)
    sns = boto3.client("sns", region_name=region)
    queue_url = sqs.create_queue(QueueName="alerts")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    return sqs, queue_url


def receive_envelopes(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    messages = sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
    ).get("Messages", [])
    return [json.loads(m["Body"]) for m in messages]


@pytest.mark.usefixtures("aws")
def test_sns_publishes_subject_text_and_attributes() -> None:
    # eu-west-1 while the default region is us-east-1: the client follows the ARN.
    topic_arn = boto3.client("sns", region_name="eu-west-1").create_topic(Name="relay-alerts")[
        "TopicArn"
    ]
    sqs, queue_url = subscribed_queue(topic_arn, region="eu-west-1")

    channel = SnsChannel(topic_arn)
    channel.send(note(subject="✅ nas: verification FAILED —\n" + "x" * 150))

    [envelope] = receive_envelopes(sqs, queue_url)
    assert envelope["Type"] == "Notification"
    assert envelope["TopicArn"] == topic_arn
    assert envelope["Message"] == note().text
    subject = envelope["Subject"]
    assert subject.startswith("nas: verification FAILED - xxx")
    assert subject.isascii() and "\n" not in subject and len(subject) < 100
    attributes = envelope["MessageAttributes"]
    assert attributes["severity"] == {"Type": "String", "Value": "failure"}
    assert attributes["repo"] == {"Type": "String", "Value": "nas"}
    assert attributes["run_id"] == {"Type": "String", "Value": RUN_ID}
    assert channel.name == f"sns:{topic_arn}"


@pytest.mark.usefixtures("aws")
def test_sns_fifo_topic_gets_group_and_dedup_ids() -> None:
    sns = boto3.client("sns", region_name="us-east-1")
    sqs = boto3.client("sqs", region_name="us-east-1")
    topic_arn = sns.create_topic(Name="relay-alerts.fifo", Attributes={"FifoTopic": "true"})[
        "TopicArn"
    ]
    queue_url = sqs.create_queue(QueueName="alerts.fifo", Attributes={"FifoQueue": "true"})[
        "QueueUrl"
    ]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    channel = SnsChannel(topic_arn)
    channel.send(note())  # moto refuses a FIFO publish without MessageGroupId
    channel.send(note())  # a resend of the same notification: deduplicated
    channel.send(note(severity="recovery"))  # another notification of the same run
    messages = sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, AttributeNames=["All"]
    ).get("Messages", [])
    groups = [m["Attributes"]["MessageGroupId"] for m in messages]
    dedup_ids = [m["Attributes"]["MessageDeduplicationId"] for m in messages]
    assert groups == ["f" * 64, "f" * 64]  # one group per repository: in order
    assert dedup_ids == [
        hashlib.sha256(f"{RUN_ID}\0{severity}".encode()).hexdigest()
        for severity in ("failure", "recovery")
    ]


@pytest.mark.usefixtures("aws")
def test_sns_missing_topic_is_a_channel_error() -> None:
    channel = SnsChannel("arn:aws:sns:us-east-1:123456789012:no-such-topic")
    with pytest.raises(ChannelError, match="Publish refused: NotFound"):
        channel.send(note())


# -- everything together ------------------------------------------------------------------------


@pytest.mark.usefixtures("aws")
def test_one_broken_channel_never_stops_the_others(
    http_sink: HttpSink, smtp_sink: SmtpSink, trace_logs: pytest.LogCaptureFixture
) -> None:
    topic_arn = boto3.client("sns", region_name="us-east-1").create_topic(Name="relay")["TopicArn"]
    sqs, queue_url = subscribed_queue(topic_arn)
    dead = closed_port()
    channels: list[NotificationChannel] = [
        AppriseChannel(f"json://127.0.0.1:{dead}/api/webhooks/{'/'.join(DISCORD)}"),
        SnsChannel(topic_arn),
        HealthchecksChannel(f"http://127.0.0.1:{dead}/{HC_UUID}", retry_delay=0.01),
        AppriseChannel(f"json://127.0.0.1:{http_sink.port}/services/{'/'.join(SLACK)}"),
        AppriseChannel("slack://not-enough-tokens"),
        AppriseChannel(mailto(smtp_sink)),
        HealthchecksChannel(f"{http_sink.url}/{HC_UUID}"),
    ]

    report = deliver(note(), channels)

    assert (report.sent, report.failed) == (4, 3)
    assert [o.ok for o in report.outcomes] == [False, True, False, True, False, True, True]
    assert [o.name for o in report.failures] == [
        f"apprise:json://127.0.0.1:{dead}/api/webhooks/4...8/J...s",
        f"healthchecks:http://127.0.0.1:{dead}/…",
        "apprise:slack://…",
    ]
    assert "Connection refused" in (report.failures[1].error or "")
    # the good ones all received it
    assert len(receive_envelopes(sqs, queue_url)) == 1
    assert len(smtp_sink.wait_for(1)) == 1
    paths = sorted(r.path for r in http_sink.wait_for(2))
    assert paths == sorted([f"/services/{'/'.join(SLACK)}", f"/{HC_UUID}/fail"])
    # and no secret anywhere a person would look
    assert_no_secrets(
        trace_logs.text,
        json.dumps(report.as_dict()),
        *(o.name for o in report.outcomes),
        *(o.error or "" for o in report.outcomes),
    )
    warnings = [r for r in trace_logs.records if r.name == "cloud.integrations.channels"]
    assert sum(r.levelno == logging.WARNING for r in warnings) == 3

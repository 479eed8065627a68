"""Notification channels without a network: redaction, names, URL building, delivery rules.

Apprise is real here (it parses URLs and builds its privacy forms); nothing is sent
anywhere but through in-process channel implementations of our own protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from cloud.integrations.channels import (
    AppriseChannel,
    HealthchecksChannel,
    SnsChannel,
    build_channels,
    channel_key,
    deliver,
    parse_apprise_urls,
    redact_url,
    sns_subject,
)
from cloud.integrations.redact import LogScrubber, secret_fragments
from cloud.logic.ports import ChannelError, Notification, NotificationChannel, Severity

RUN_ID = "0190f5b2-3c4d-7e8f-9a0b-1c2d3e4f5a6b"
HC_UUID = "5f2d0b9e-8c61-4c43-a2a5-0f8f3cbd3c2a"
SLACK = ("T1JJ3T3L2", "A1BRTD4JD", "TFakeSlackTokenForTestsQ")
DISCORD = ("4174216298", "JFakeDiscordTokenForTests00s")
TELEGRAM = "123456789:AABBCCDDEEFFGGHHIIJJKKLLMMNNOOPPQQRR"


def note(severity: Severity = "failure", run_id: str = RUN_ID) -> Notification:
    return Notification(
        subject="backrest-relay: nas FAILED",
        text="repository nas: 2 problems",
        html="<p>repository nas: 2 problems</p>",
        severity=severity,
        repo_key="a" * 64,
        repo_id="nas",
        run_id=run_id,
    )


# -- redact_url ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"https://hc-ping.com/{HC_UUID}", "https://hc-ping.com/…"),
        (f"https://hc.example.com:8000/ping/{HC_UUID}/", "https://hc.example.com:8000/ping/…/"),
        (
            "https://hc-ping.com/Xq0Zr1uT8-aBcDeFgHiJkL/backup-nas",
            "https://hc-ping.com/…/backup-nas",
        ),
        (
            f"https://hc-ping.com/{HC_UUID}?create=1&rid=",
            "https://hc-ping.com/…?create=***&rid=",
        ),
        ("https://user:pa55word@example.com/x", "https://***@example.com/x"),
        (
            f"https://hooks.slack.com/services/{'/'.join(SLACK)}",
            "https://hooks.slack.com/services/…",
        ),
        ("https://example.com/hooks#frag", "https://example.com/hooks#…"),
        ("https://example.com", "https://example.com"),
        ("not a url", "…"),
        ("mailto:someone", "mailto://…"),
        ("", "…"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_never_shows_tokens() -> None:
    for secret_url, secret in [
        (f"https://hc-ping.com/{HC_UUID}", HC_UUID),
        ("https://ntfy.example.com/Topic-With-Caps", "Topic-With-Caps"),
        ("https://h.example.com/x?token=abcdef", "abcdef"),
        ("https://bob:hunter2@h.example.com/", "hunter2"),
        ("https://bob:hunter2@h.example.com/", "bob"),
    ]:
        assert secret not in redact_url(secret_url)


# -- SNS subject --------------------------------------------------------------------------------


def test_sns_subject_is_ascii_single_line_and_short() -> None:
    subject = sns_subject("✅ Verified — nas\nsecond line\tand tab " + "é" * 200)
    assert subject.isascii()
    assert "\n" not in subject and "\t" not in subject
    assert len(subject) < 100
    assert subject.startswith("Verified - nas second line and tab eee")
    assert subject.endswith("...")


def test_sns_subject_never_empty() -> None:
    assert sns_subject("✅🔥") == "backrest-relay notification"
    assert sns_subject("   ") == "backrest-relay notification"


def test_sns_channel_name_and_invalid_arn() -> None:
    arn = "arn:aws:sns:eu-west-1:123456789012:backrest-relay-alerts"
    assert SnsChannel(arn).name == f"sns:{arn}"
    bad = SnsChannel("https://sns.example.com/topic?token=s3cr3t-value")
    assert "s3cr3t" not in bad.name
    with pytest.raises(ChannelError) as info:
        bad.send(note())
    assert "s3cr3t" not in str(info.value)
    assert "not an SNS topic ARN" in str(info.value)


# -- Apprise names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected", "secrets"),
    [
        (
            f"slack://{'/'.join(SLACK)}/#general",
            "apprise:slack://T...2/A...D/T...Q/%23general",
            SLACK,
        ),
        (
            f"https://hooks.slack.com/services/{'/'.join(SLACK)}",
            "apprise:slack://T...2/A...D/T...Q",
            SLACK,
        ),
        (f"discord://{'/'.join(DISCORD)}", "apprise:discord://4...8/J...s", DISCORD),
        (
            f"https://discord.com/api/webhooks/{'/'.join(DISCORD)}",
            "apprise:discord://4...8/J...s",
            DISCORD,
        ),
        (f"tgram://{TELEGRAM}/12315544", "apprise:tgram://1...R/1...4", (TELEGRAM, "12315544")),
        (
            "gotify://gotify.example.com/AbCdEfGh123",
            "apprise:gotify://gotify.example.com/A...3",
            ("AbCdEfGh123",),
        ),
        (
            "ntfys://tk_abcdefg12345@ntfy.example.com/alerts",
            "apprise:ntfys://t...5@ntfy.example.com/alerts",
            ("tk_abcdefg12345",),
        ),
        (
            "matrix://bot:Pa55w0rd-xyz@matrix.example.com/#backups",
            "apprise:matrix://bot:****@matrix.example.com/%23backups",
            ("Pa55w0rd-xyz",),
        ),
        (
            "workflows://prod-00.westus.logic.azure.com:443/abcd1234workflow/signaturetokenXYZ",
            "apprise:workflow://prod-00.westus.logic.azure.com:443/a...w/s...Z",
            ("abcd1234workflow", "signaturetokenXYZ"),
        ),
        (
            "mailtos://relay:An-App-Passw0rd@smtp.example.com?from=relay@example.com&to=ops@example.com",
            "apprise:mailtos://relay:****@smtp.example.com/ops%40example.com",
            ("An-App-Passw0rd",),
        ),
        (
            # a webhook token in a plain json:// path: Apprise shows it, we do not
            f"json://hooks.example.com/api/webhooks/{'/'.join(DISCORD)}",
            "apprise:json://hooks.example.com/api/webhooks/4...8/J...s",
            DISCORD,
        ),
    ],
)
def test_apprise_name_is_the_privacy_form(
    url: str, expected: str, secrets: tuple[str, ...]
) -> None:
    channel = AppriseChannel(url)
    assert channel.problem is None
    assert channel.name == expected
    for secret in secrets:
        assert secret not in channel.name
        assert secret not in repr(channel)


def test_apprise_email_schemas_get_html_and_chat_gets_text() -> None:
    assert AppriseChannel("mailto://u:p@smtp.example.com?from=a@example.com").sends_html
    assert not AppriseChannel(f"slack://{'/'.join(SLACK)}").sends_html
    assert not AppriseChannel("json://example.com/x").sends_html
    # Telegram prefers HTML but only a small subset of it: it gets the text.
    assert not AppriseChannel(f"tgram://{TELEGRAM}/12315544").sends_html


@pytest.mark.parametrize(
    "url",
    [
        "foo://bar/s3cr3t-token-value",
        f"slack://{SLACK[0]}/s3cr3t-token-value",  # token missing: refused by the plugin
        "not a url s3cr3t-token-value",
        f"json://a.example.com/s3cr3t-token-value, json://b.example.com/{HC_UUID}",
    ],
)
def test_invalid_apprise_url_fails_on_send_without_the_secret(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(1)
    channel = AppriseChannel(url)  # never raises: the other channels must still be built
    assert channel.problem
    with pytest.raises(ChannelError) as info:
        channel.send(note())
    for text in (channel.name, str(info.value), caplog.text):
        assert "s3cr3t-token-value" not in text
        assert HC_UUID not in text
        assert SLACK[0] not in text


# -- secret fragments and the log scrubber ------------------------------------------------------


def testsecret_fragments_cover_what_the_name_hides() -> None:
    url = f"mailto://relay:pa%2Bss-W0rd@smtp.example.com:2525/{HC_UUID}?from=relay@example.com"
    fragments = secret_fragments(url, "apprise:mailto://relay:****@smtp.example.com:2525/5...a")
    assert "pa+ss-W0rd" in fragments and "pa%2Bss-W0rd" in fragments
    assert HC_UUID in fragments
    assert "relay@example.com" in fragments  # a query value: not shown, so scrubbed
    assert "relay" not in fragments and "smtp.example.com" not in fragments
    assert "from" not in fragments  # query names are never secret


def test_short_password_is_still_secret() -> None:
    assert "pw1" in secret_fragments(
        "mailto://u:pw1@h.example.com", "mailto://u:****@h.example.com"
    )


@pytest.fixture
def scrubbed_logger() -> Iterator[tuple[logging.Logger, LogScrubber]]:
    logger = logging.getLogger("test.channels.scrubber")
    scrubber = LogScrubber()
    logger.addFilter(scrubber)
    yield logger, scrubber
    logger.removeFilter(scrubber)


def test_scrubber_redacts_messages_args_and_tracebacks(
    scrubbed_logger: tuple[logging.Logger, LogScrubber], caplog: pytest.LogCaptureFixture
) -> None:
    logger, scrubber = scrubbed_logger
    scrubber.register("k1", frozenset({"TOKEN-ONE-123"}))
    caplog.set_level(logging.DEBUG, logger=logger.name)
    logger.debug("POST URL: https://x/%s", "TOKEN-ONE-123")
    try:
        raise RuntimeError("failed for TOKEN-ONE-123")
    except RuntimeError:
        logger.exception("boom")
    assert "TOKEN-ONE-123" not in caplog.text
    assert "POST URL: https://x/***" in caplog.text
    assert "RuntimeError: failed for ***" in caplog.text


def test_scrubber_guard_is_temporary_and_registration_idempotent(
    scrubbed_logger: tuple[logging.Logger, LogScrubber], caplog: pytest.LogCaptureFixture
) -> None:
    logger, scrubber = scrubbed_logger
    caplog.set_level(logging.DEBUG, logger=logger.name)
    with scrubber.guarding("pending", frozenset({"loading-secret"})):
        logger.debug("a loading-secret")
    logger.debug("b loading-secret")
    scrubber.register("same", frozenset({"abcd-1"}))
    scrubber.register("same", frozenset({"abcd-2"}))  # replaces, does not accumulate
    logger.debug("c abcd-1 abcd-2")
    assert [r.getMessage() for r in caplog.records] == [
        "a ***",
        "b loading-secret",
        "c abcd-1 ***",
    ]


def test_apprise_logger_is_scrubbed_for_every_loaded_url(caplog: pytest.LogCaptureFixture) -> None:
    token = "ZyX987-secret-webhook-token"
    AppriseChannel(f"json://hooks.example.com/hook/{token}")
    caplog.set_level(1)
    logging.getLogger("apprise").debug("JSON POST URL: http://hooks.example.com/hook/%s", token)
    logging.getLogger("urllib3.connectionpool").debug('"POST /hook/%s HTTP/1.1" 200 2', token)
    assert token not in caplog.text
    assert caplog.text.count("***") == 2


# -- Healthchecks URLs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ping_url", "severity", "expected"),
    [
        (
            f"https://hc-ping.com/{HC_UUID}",
            "success",
            f"https://hc-ping.com/{HC_UUID}?rid={RUN_ID}",
        ),
        (
            f"https://hc-ping.com/{HC_UUID}",
            "recovery",
            f"https://hc-ping.com/{HC_UUID}?rid={RUN_ID}",
        ),
        (
            f"https://hc-ping.com/{HC_UUID}/",
            "failure",
            f"https://hc-ping.com/{HC_UUID}/fail?rid={RUN_ID}",
        ),
        (
            f"https://hc-ping.com/{HC_UUID}",
            "stale",
            f"https://hc-ping.com/{HC_UUID}/fail?rid={RUN_ID}",
        ),
        (
            "https://hc-ping.com/KEY123abc/backup-nas?create=1",
            "failure",
            f"https://hc-ping.com/KEY123abc/backup-nas/fail?create=1&rid={RUN_ID}",
        ),
    ],
)
def test_healthchecks_signal_url(ping_url: str, severity: Severity, expected: str) -> None:
    assert HealthchecksChannel(ping_url).signal_url(note(severity)) == expected


def test_healthchecks_omits_a_rid_that_is_not_a_uuid() -> None:
    channel = HealthchecksChannel(f"https://hc-ping.com/{HC_UUID}")
    assert channel.signal_url(note("success", run_id="run-1")) == f"https://hc-ping.com/{HC_UUID}"


def test_healthchecks_name_hides_the_check() -> None:
    channel = HealthchecksChannel(f"https://hc-ping.com/{HC_UUID}")
    assert channel.name == "healthchecks:https://hc-ping.com/…"
    assert HC_UUID not in repr(channel)


def test_healthchecks_refuses_non_http_urls_on_send() -> None:
    channel = HealthchecksChannel(f"file:///etc/{HC_UUID}")
    with pytest.raises(ChannelError, match="not an http") as info:
        channel.send(note())
    assert HC_UUID not in str(info.value)


# -- deliver ------------------------------------------------------------------------------------


class Recording:
    """A channel of our own protocol that records what it was sent, or fails as told."""

    def __init__(self, name: str, error: BaseException | None = None) -> None:
        self._name = name
        self.error = error
        self.sent: list[Notification] = []

    @property
    def name(self) -> str:
        return self._name

    def send(self, notification: Notification) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append(notification)


def test_deliver_reaches_every_channel_despite_failures(caplog: pytest.LogCaptureFixture) -> None:
    first = Recording("first")
    broken = Recording("broken", ChannelError("broken: HTTP 500 Internal Server Error"))
    buggy = Recording("buggy", KeyError("https://x/secret-token-in-a-bug"))
    last = Recording("last")
    caplog.set_level(logging.INFO)
    channels: list[NotificationChannel] = [first, broken, buggy, last]

    report = deliver(note(), channels)

    assert first.sent and last.sent
    assert (report.sent, report.failed, report.ok) == (2, 2, False)
    assert [(o.name, o.ok) for o in report.outcomes] == [
        ("first", True),
        ("broken", False),
        ("buggy", False),
        ("last", True),
    ]
    assert report.failures[0].error == "HTTP 500 Internal Server Error"
    assert report.failures[1].error == "unexpected KeyError"
    assert "secret-token-in-a-bug" not in caplog.text
    assert "not delivered via broken: HTTP 500" in caplog.text
    assert report.as_dict()["failed"] == 2


def test_deliver_with_no_channels_is_ok() -> None:
    report = deliver(note(), [])
    assert report.ok and report.sent == 0 and report.outcomes == ()


def test_deliver_takes_any_logger() -> None:
    lines: list[str] = []

    class ListLogger:
        def info(self, msg: str, *args: object) -> None:
            lines.append("I " + msg % args)

        def warning(self, msg: str, *args: object) -> None:
            lines.append("W " + msg % args)

    deliver(note(), [Recording("ok"), Recording("bad", ChannelError("nope"))], ListLogger())
    assert lines == [
        "I failure notification for nas delivered via ok",
        "W failure notification for nas not delivered via bad: nope",
    ]


def test_channel_keys_are_stable_distinct_and_secret_free() -> None:
    a = HealthchecksChannel(f"https://hc-ping.com/{HC_UUID}")
    b = HealthchecksChannel("https://hc-ping.com/00000000-0000-4000-8000-000000000000")
    assert a.name == b.name  # same redacted form ...
    assert channel_key(a) != channel_key(b)  # ... still told apart
    assert channel_key(a) == channel_key(HealthchecksChannel(f"https://hc-ping.com/{HC_UUID}"))
    assert HC_UUID not in channel_key(a)
    assert channel_key(Recording("x")) == channel_key(Recording("x"))


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["json://a/x", " ", "json://b/y "], ["json://a/x", "json://b/y"]),
        ('["json://a/x"]', ["json://a/x"]),
        ({"urls": ["json://a/x"]}, ["json://a/x"]),
        (b'{"urls": ["json://a/x"]}', ["json://a/x"]),
        ("# chat\njson://a/x\n\n  json://b/y  \n", ["json://a/x", "json://b/y"]),
    ],
)
def test_parse_apprise_urls(value: object, expected: list[str]) -> None:
    assert parse_apprise_urls(value) == expected


@pytest.mark.parametrize("value", [42, {"url": "json://s3cr3t"}, ["ok", 1], "[not json s3cr3t"])
def test_parse_apprise_urls_refuses_other_shapes_without_values(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_apprise_urls(value)
    assert "s3cr3t" not in str(info.value)


def test_build_channels_keeps_bad_entries_as_failing_channels() -> None:
    channels = build_channels(
        apprise_urls=["json://a.example.com/x", "json://a.example.com/x", "foo://nope", ""],
        sns_topic_arn="arn:aws:sns:us-east-1:123456789012:alerts",
        healthchecks_url=f"https://hc-ping.com/{HC_UUID}",
    )
    assert [c.name for c in channels] == [
        "sns:arn:aws:sns:us-east-1:123456789012:alerts",
        "apprise:json://a.example.com/x",
        "apprise:foo://…",
        "healthchecks:https://hc-ping.com/…",
    ]
    assert build_channels() == []

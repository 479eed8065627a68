"""Notification channels, one per module behind `cloud.logic.ports.NotificationChannel`
(SNS, Apprise, Healthchecks), the one delivery engine, and channels built from settings.

Constructors never raise for a bad target (a typo in one URL must not take the other
channels down with it); the channel reports the problem on `send()` and in `problem`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cloud.integrations.channels.chat import DEFAULT_APPRISE_TIMEOUT, AppriseChannel
from cloud.integrations.channels.healthchecks import HealthchecksChannel
from cloud.integrations.channels.sns import SnsChannel, sns_subject
from cloud.integrations.redact import redact_url
from cloud.logic.delivery import ChannelOutcome, DeliveryReport, channel_key, deliver
from cloud.logic.ports import NotificationChannel

if TYPE_CHECKING:
    from types_boto3_sns import SNSClient

__all__ = [
    "AppriseChannel",
    "ChannelOutcome",
    "DeliveryReport",
    "HealthchecksChannel",
    "SnsChannel",
    "build_channels",
    "channel_key",
    "deliver",
    "parse_apprise_urls",
    "redact_url",
    "sns_subject",
]


def parse_apprise_urls(value: Any) -> list[str]:
    """Apprise URLs from a setting or a secret: a JSON array of strings, an object with a
    ``urls`` array, or text with one URL per line (blank lines and ``#`` comments skipped;
    a JSON string is decoded first). Raises ValueError naming the shape, never a value."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith(("[", "{")):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError:
                raise ValueError("Apprise URL list is not valid JSON") from None
        else:
            return [
                line.strip()
                for line in stripped.splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
    if isinstance(value, dict):
        if "urls" not in value:
            raise ValueError("Apprise URL object needs a 'urls' array")
        value = value["urls"]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError(f"Apprise URLs must be a list of strings, not {type(value).__name__}")


def build_channels(
    *,
    apprise_urls: Iterable[str] = (),
    sns_topic_arn: str | None = None,
    healthchecks_url: str | None = None,
    sns_client: SNSClient | None = None,
    apprise_timeout: float = DEFAULT_APPRISE_TIMEOUT,
) -> list[NotificationChannel]:
    """The channels for one repository's notification, from settings: the SNS topic (cloud
    mode), each Apprise URL (`notify.urls` locally, the Secrets Manager list in the cloud),
    and the repository's Healthchecks ping URL. Blank and duplicate entries are skipped;
    invalid ones become channels that fail on send, so the others still deliver."""
    channels: list[NotificationChannel] = []
    if sns_topic_arn and sns_topic_arn.strip():
        channels.append(SnsChannel(sns_topic_arn, client=sns_client))
    seen: set[str] = set()
    for url in apprise_urls:
        url = url.strip()
        if url and url not in seen:
            seen.add(url)
            channels.append(AppriseChannel(url, timeout=apprise_timeout))
    if healthchecks_url and healthchecks_url.strip():
        channels.append(HealthchecksChannel(healthchecks_url))
    return channels

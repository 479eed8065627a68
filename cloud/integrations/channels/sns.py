"""Email through an SNS topic (the cloud side's subscribers)."""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from typing import TYPE_CHECKING

from cloud.integrations.aws import service_config
from cloud.logic.delivery import target_key
from cloud.logic.ports import ChannelError, Notification
from cloud.logic.text import truncate_utf8

if TYPE_CHECKING:
    from types_boto3_sns import SNSClient
    from types_boto3_sns.type_defs import MessageAttributeValueTypeDef

SNS_SUBJECT_MAX = 99  # "less than 100 characters"
SNS_MESSAGE_MAX_BYTES = 250_000  # the limit is 256 KiB including attributes
_SNS_ARN = re.compile(r"arn:aws[a-z-]*:sns:([a-z0-9-]+):(\d{12}):([A-Za-z0-9_-]{1,256}(?:\.fifo)?)")
_ASCII_PUNCTUATION = str.maketrans(
    {
        "—": "-",
        "–": "-",
        "‐": "-",
        "−": "-",
        "‘": "'",
        "’": "'",
        "“": '"',
        "”": '"',
        "…": "...",
        "·": "-",
        "×": "x",
        "→": "->",
    }
)


def sns_subject(subject: str) -> str:
    """`subject` made acceptable to SNS Publish: ASCII, one line, no control characters,
    starting with a letter, digit or punctuation, under 100 characters."""
    text = unicodedata.normalize("NFKD", subject.translate(_ASCII_PUNCTUATION))
    text = text.encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[\x00-\x1f\x7f\s]+", " ", text).strip()
    if len(text) > SNS_SUBJECT_MAX:
        text = text[: SNS_SUBJECT_MAX - 3].rstrip() + "..."
    return text or "backrest-relay notification"


def _attribute(value: str) -> MessageAttributeValueTypeDef:
    return {"DataType": "String", "StringValue": value}


class SnsChannel:
    """Publishes to an SNS topic: `Subject` (sanitized), `Message` = the plain text, and
    message attributes `severity`, `repo`, `repo_key`, `run_id` for subscription filter
    policies (e.g. an on-call address subscribed to ``{"severity": ["failure", "stale"]}``).

    Email subscribers receive `Message` as the mail body, so it is the plain text (SNS email
    does not render HTML). FIFO topics (``.fifo``) get the repository as message group and
    (run, severity) as deduplication id, so a redelivered event does not mail twice.
    The client is built on first use in the topic's region, from the standard AWS chain
    (``AWS_ENDPOINT_URL_SNS`` works for local endpoints).
    """

    kind = "sns"

    def __init__(self, topic_arn: str, client: SNSClient | None = None) -> None:
        self.topic_arn = topic_arn.strip()
        self._client = client
        self._lock = threading.Lock()
        match = _SNS_ARN.fullmatch(self.topic_arn)
        self._region = match.group(1) if match else None
        self.problem: str | None = None if match else "not an SNS topic ARN"
        self.key = target_key(self.kind, self.topic_arn)

    @property
    def name(self) -> str:
        return f"sns:{self.topic_arn}" if self.problem is None else "sns:(invalid topic ARN)"

    def __repr__(self) -> str:
        return f"SnsChannel({self.name!r})"

    def client(self) -> SNSClient:
        with self._lock:
            if self._client is None:
                import boto3

                self._client = boto3.client(
                    "sns",
                    region_name=self._region,
                    config=service_config(max_attempts=3, read_timeout=10),
                )
            return self._client

    def send(self, notification: Notification) -> None:
        if self.problem is not None:
            raise ChannelError(f"{self.name}: {self.problem}")
        from botocore.exceptions import BotoCoreError, ClientError

        attributes = {
            "severity": _attribute(notification.severity),
            "repo": _attribute(notification.repo_id or notification.repo_key),
            "repo_key": _attribute(notification.repo_key),
        }
        if notification.run_id:
            attributes["run_id"] = _attribute(notification.run_id)
        extra: dict[str, str] = {}
        if self.topic_arn.endswith(".fifo"):
            extra["MessageGroupId"] = notification.repo_key[:128]
            extra["MessageDeduplicationId"] = hashlib.sha256(
                f"{notification.run_id}\0{notification.severity}".encode()
            ).hexdigest()
        try:
            self.client().publish(
                TopicArn=self.topic_arn,
                Subject=sns_subject(notification.subject),
                Message=truncate_utf8(
                    notification.text or notification.subject, SNS_MESSAGE_MAX_BYTES
                ),
                MessageAttributes=attributes,
                **extra,
            )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "Unknown")
            detail = " ".join((error.get("Message") or "").split())[:200]
            suffix = f" ({detail})" if detail else ""
            raise ChannelError(f"{self.name}: Publish refused: {code}{suffix}") from None
        except BotoCoreError as exc:
            # botocore's messages name the endpoint or the missing piece, never key material.
            raise ChannelError(f"{self.name}: {type(exc).__name__}: {str(exc)[:200]}") from None

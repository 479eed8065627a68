"""Wiring shared by the Lambda handlers: settings from the environment, the destination
bucket opened with the credentials from Secrets Manager, and the parsing of EventBridge
events delivered through SQS.

Handlers stay thin: they parse, take their dependencies from here (built once per
container, lazily) and delegate to `cloud.logic`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from aws_lambda_powertools.utilities.parser.models import EventBridgeModel, SqsRecordModel
from pydantic import Json, ValidationError

from cloud.contracts.destination import Destination
from cloud.contracts.events import EventDetail, UnknownEventError, parse_detail
from cloud.integrations.s3 import S3Access, make_s3_client
from cloud.integrations.s3_store import S3ObjectStore, S3ReportSink
from cloud.integrations.secrets import DEFAULT_MAX_AGE, load_destination_access
from cloud.logic.ports import ObjectStore, ReportSink

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

METRICS_NAMESPACE = "BackrestRelay"
T = TypeVar("T")

Bucket = tuple[ObjectStore, ReportSink | None]
"""A destination bucket as verification needs it: a read view and where reports go."""

DestinationOpener = Callable[[Destination], Bucket]


class Lazy(Generic[T]):
    """A per-container object built on first use: a cold start that fails on configuration
    fails the invocation, loudly, instead of the import. Tests `set` their own."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._value: T | None = None

    def set(self, value: T | None) -> None:
        with self._lock:
            self._value = value

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value


class ConfigError(RuntimeError):
    """The function is misconfigured (an environment variable is missing or invalid)."""


def service_name(default: str) -> str:
    """`POWERTOOLS_SERVICE_NAME` when set (the template may set it), else the default."""
    return os.environ.get("POWERTOOLS_SERVICE_NAME") or default


def require_env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"environment variable {name} is not set")
    return value


def env_int(name: str, default: int | None, *, minimum: int = 0) -> int | None:
    """An integer setting; empty or unset gives `default`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name} must be at least {minimum}, not {value}")
    return value


def _normal_endpoint(url: str | None) -> str | None:
    return url.rstrip("/").lower() if url else None


def endpoint_mismatch(destination: Destination, access: S3Access) -> str | None:
    """Why the configured credentials may not fit the event's destination, or None.

    One verifier serves every repository with one secret; an event naming another
    endpoint would otherwise be "verified" against the wrong server.
    """
    if destination.provider != access.provider:
        return (
            f"event destination provider {destination.provider!r} differs from the "
            f"secret's {access.provider!r}"
        )
    theirs = _normal_endpoint(destination.endpoint_url)
    ours = _normal_endpoint(access.resolved_endpoint())
    if theirs and ours and theirs != ours:
        return f"event destination endpoint {theirs} differs from the secret's {ours}"
    return None


class SecretDestinations:
    """Opens a destination bucket with the read credentials from the destination secret.

    The secret is cached by powertools Parameters (`max_age`); the S3 client is kept for
    as long as the credentials stay the same, so a warm container reuses its connections
    and a rotated key gets a fresh client.
    """

    def __init__(
        self,
        secret_id: str,
        *,
        max_age: int = DEFAULT_MAX_AGE,
        load: Callable[[str], S3Access] | None = None,
        make_client: Callable[[S3Access], S3Client] = make_s3_client,
        warn: Callable[[str], object] | None = None,
    ) -> None:
        self.secret_id = secret_id
        self.max_age = max_age
        self._load = load or (lambda sid: load_destination_access(sid, max_age=self.max_age))
        self._make_client = make_client
        self._warn = warn
        self._lock = threading.Lock()
        self._access: S3Access | None = None
        self._client: S3Client | None = None

    def access(self) -> S3Access:
        return self._load(self.secret_id)

    def client(self, access: S3Access) -> S3Client:
        with self._lock:
            if self._client is None or access != self._access:
                self._client = self._make_client(access)
                self._access = access
            return self._client

    def __call__(self, destination: Destination) -> Bucket:
        access = self.access()
        mismatch = endpoint_mismatch(destination, access)
        if mismatch and self._warn is not None:
            self._warn(f"{mismatch}; verifying with the secret's endpoint")
        client = self.client(access)
        return S3ObjectStore(client, destination.bucket), S3ReportSink(client, destination.bucket)


# -- EventBridge events through SQS ---------------------------------------------------------


class EventBridgeEnvelope(EventBridgeModel):
    """The EventBridge envelope. The detail is checked against the contract only after the
    (source, detail-type) routing (`parse_event`), so an event of another kind is not
    mistaken for a malformed one."""

    detail: dict[str, Any]
    # EventBridge always sends the account; moto's rule → SQS delivery leaves it out, and
    # nothing here reads it, so its absence must not make a good event "malformed".
    account: str = ""


class EventQueueRecord(SqsRecordModel):
    """An SQS record whose body is an EventBridge event (the rule's target is the queue)."""

    body: Json[EventBridgeEnvelope]


class MalformedEventError(ValueError):
    """A known event whose detail breaks the contract (the record fails and ends in the DLQ)."""


def validation_errors(exc: ValidationError) -> list[str]:
    """Where and why validation failed, without echoing the input."""
    return [
        f"{'.'.join(str(p) for p in err.get('loc', ())) or '(body)'}: {err.get('msg')}"
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ][:20]


def parse_event(envelope: EventBridgeEnvelope) -> EventDetail | None:
    """The contract model of the envelope's detail; None for an event of another kind
    (unknown source / detail-type); `MalformedEventError` when a known kind's detail does
    not match its contract (including an unknown `schema_version`)."""
    try:
        return parse_detail(envelope.source, envelope.detail_type, envelope.detail)
    except UnknownEventError:
        return None
    except ValidationError as exc:
        raise MalformedEventError(
            f"{envelope.detail_type!r} detail does not match the contract: "
            + "; ".join(validation_errors(exc))
        ) from None


def record_message_id(record: Any) -> str | None:
    """The SQS message id of a parsed record or of a raw one (powertools hands the failure
    handler whichever it has)."""
    message_id = getattr(record, "messageId", None) or getattr(record, "message_id", None)
    if message_id is None and isinstance(record, dict):
        message_id = record.get("messageId")
    return str(message_id) if message_id else None


def record_correlation_id(record: Any) -> str | None:
    """The event's run id (a work item's job id) when the record has one, else the SQS
    message id."""
    body = getattr(record, "body", None)
    if isinstance(body, EventBridgeEnvelope):
        run_id = body.detail.get("run_id")
    else:
        run_id = getattr(body, "job_id", None)
    if isinstance(run_id, str) and run_id:
        return run_id
    return record_message_id(record)

"""The one S3 client factory: every S3 client in the project is made here.

Providers differ in ways that break uploads silently or loudly, so the quirks live in one
place. Backblaze B2 rejects every `x-amz-checksum-*` header and
`x-amz-sdk-checksum-algorithm`, which boto3 >= 1.36 sends by default; B2 clients (and, to be
safe, every non-AWS client) therefore compute checksums only when an operation requires
them, and integrity comes from the `Content-MD5` the caller sends.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

from cloud.contracts.destination import Provider, b2_endpoint

if TYPE_CHECKING:
    from boto3.session import Session
    from botocore.config import Config
    from types_boto3_s3 import S3Client

USER_AGENT = "backrest-relay"


@dataclass(frozen=True)
class S3Access:
    """How to reach a destination. `repr` hides the secret so it cannot reach a log."""

    provider: Provider
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)

    def resolved_endpoint(self) -> str | None:
        if self.endpoint_url:
            return self.endpoint_url.rstrip("/")
        if self.provider == "b2" and self.region:
            return b2_endpoint(self.region)
        return None


def flexible_checksums_allowed(provider: Provider) -> bool:
    """Only AWS is known to accept the flexible-checksum headers of boto3 >= 1.36."""
    return provider == "aws"


class ClientOptions(TypedDict, total=False):
    """What a caller may tune of `client_config` (defaults there)."""

    max_pool_connections: int
    connect_timeout: float
    read_timeout: float
    max_attempts: int


def client_config(
    provider: Provider,
    *,
    max_pool_connections: int = 10,
    connect_timeout: float = 10,
    read_timeout: float = 120,
    max_attempts: int = 8,
) -> Config:
    """botocore settings for a provider: retries, timeouts, pool size and checksum quirks."""
    from botocore.config import Config  # imported late: a run with nothing new needs no SDK

    checksum: Literal["when_supported", "when_required"] = (
        "when_supported" if flexible_checksums_allowed(provider) else "when_required"
    )
    return Config(
        signature_version="s3v4",
        user_agent_extra=USER_AGENT,
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # "standard" retries 5xx, throttling (SlowDown, 429) and connection errors with
        # exponential backoff and jitter.
        # total_max_attempts counts the first try; botocore's max_attempts would not.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        request_checksum_calculation=checksum,
        response_checksum_validation=checksum,
        s3={"addressing_style": "virtual" if provider == "aws" else "path"},
        tcp_keepalive=True,
    )


def make_s3_session(access: S3Access) -> Session:
    """The boto3 session behind `access`'s clients: its keys, else the standard AWS chain."""
    import boto3

    return boto3.session.Session(
        aws_access_key_id=access.access_key_id or None,
        aws_secret_access_key=access.secret_access_key or None,
        region_name=access.region or None,
    )


def make_s3_client(
    access: S3Access, *, session: Session | None = None, **options: Unpack[ClientOptions]
) -> S3Client:
    """An S3 client for `access`; credentials fall back to the standard AWS chain.

    Pass `session` (from `make_s3_session(access)`) to share its credentials with
    something else that signs requests for the same destination.
    """
    session = session or make_s3_session(access)
    client = session.client(
        "s3",
        endpoint_url=access.resolved_endpoint(),
        config=client_config(access.provider, **options),
    )
    events = client.meta.events
    events.register("before-call.s3.CopyObject", _lock_copy_md5)
    if not flexible_checksums_allowed(access.provider):
        events.register("before-call.s3.PutObjectRetention", _md5_not_flexible)
    return client


# MD5 of the empty body, base64: what a CopyObject (no body) carries as Content-MD5.
EMPTY_MD5 = "1B2M2Y8AsgTpgAmY7PhCfg=="


def _lock_copy_md5(params: dict[str, Any], **_: Any) -> None:
    """A write that carries Object Lock headers needs Content-MD5 (B2, and moto, refuse it
    otherwise); CopyObject has no body and botocore sends none, so send the empty one's."""
    headers = params["headers"]
    if "x-amz-object-lock-mode" in headers and "Content-MD5" not in headers:
        headers["Content-MD5"] = EMPTY_MD5


def _md5_not_flexible(params: dict[str, Any], **_: Any) -> None:
    """PutObjectRetention requires a body checksum; botocore >= 1.36 sends it as
    `x-amz-checksum-crc32`, which B2 refuses. Send the old Content-MD5 instead."""
    params["context"]["checksum"] = {}
    body = params.get("body") or b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if isinstance(body, bytes) and "Content-MD5" not in params["headers"]:
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        params["headers"]["Content-MD5"] = base64.b64encode(digest).decode("ascii")

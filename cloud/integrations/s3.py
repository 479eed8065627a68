"""The one S3 client factory: every S3 client in the project is made here.

Providers differ in ways that break uploads silently or loudly, so the quirks live in one
place. Backblaze B2 rejects every `x-amz-checksum-*` header and
`x-amz-sdk-checksum-algorithm`, which boto3 >= 1.36 sends by default; B2 clients (and, to be
safe, every non-AWS client) therefore compute checksums only when an operation requires
them, and integrity comes from the `Content-MD5` the caller sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypedDict, Unpack

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
    return session.client(
        "s3",
        endpoint_url=access.resolved_endpoint(),
        config=client_config(access.provider, **options),
    )

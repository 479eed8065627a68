"""What the direct S3 paths (the agent's PUT writer, the verifier's GET reader and listing)
share: botocore's standard retry policy and S3's error wording, the request target
(endpoint, addressing style, Host header), a pool of kept-alive connections, and the
settings copied from a boto3 client so both paths behave like it.

Why direct paths exist at all: botocore costs 2.5-4 ms of CPU per request under the GIL,
which is most of a run over small objects (docs/benchmarks.md, "Where the time went").
"""

from __future__ import annotations

import logging
import random
import re
import ssl
import threading
from dataclasses import dataclass, field
from html import unescape
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from cloud.integrations.http1 import Connection
from cloud.integrations.sigv4 import SigningCredentials, s3_path

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

log = logging.getLogger(__name__)

MAX_BACKOFF = 20.0

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# botocore's standard retry mode: throttling and transient error codes.
RETRY_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
# Answers of S3 to a request signed for the wrong region: boto3 follows them by itself.
WRONG_REGION = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "301"})

_CODE = re.compile(rb"<Code>(.*?)</Code>", re.S)
_MESSAGE = re.compile(rb"<Message>(.*?)</Message>", re.S)


class FrozenCredentials(Protocol):
    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...
    @property
    def token(self) -> str | None: ...


class CredentialSource(Protocol):
    """botocore's Credentials/RefreshableCredentials: refreshed on read when they expire."""

    def get_frozen_credentials(self) -> FrozenCredentials: ...


def backoff(attempt: int) -> float:
    """Seconds to wait before try `attempt + 1` (botocore: full jitter, 2^(n-1), max 20 s)."""
    return random.random() * min(MAX_BACKOFF, 2.0 ** (attempt - 1))


def retryable(status: int, code: str) -> bool:
    """Whether botocore's standard mode would try again after this answer."""
    return status in RETRY_STATUS or code in RETRY_CODES


def parse_error(status: int, reason: str, body: bytes) -> tuple[str, str]:
    """(code, message) of an S3 error response; botocore's wording when the body is empty."""
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    return (
        unescape(code.group(1).decode("utf-8", "replace")).strip() if code else str(status),
        unescape(message.group(1).decode("utf-8", "replace")).strip()
        if message
        else (reason if not code else ""),
    )


class Credentials:
    """Signing credentials from a (refreshable) botocore source, converted once per key."""

    def __init__(self, source: CredentialSource) -> None:
        self._source = source
        self._frozen: tuple[object, SigningCredentials] | None = None

    def current(self) -> SigningCredentials:
        frozen = self._source.get_frozen_credentials()
        cached = self._frozen
        if cached is not None and cached[0] is frozen:
            return cached[1]
        signing = SigningCredentials(frozen.access_key, frozen.secret_key, frozen.token or None)
        self._frozen = (frozen, signing)
        return signing


@dataclass(frozen=True)
class Target:
    """Where one bucket's requests go: host to connect to, Host header, path prefix."""

    endpoint_url: str
    bucket: str
    virtual_host: bool = False
    https: bool = field(init=False)
    connect_host: str = field(init=False)
    port: int = field(init=False)
    host_header: str = field(init=False)
    path_prefix: str = field(init=False)  # the bucket's path, without the trailing slash

    def __post_init__(self) -> None:
        parts = urlsplit(self.endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint {self.endpoint_url!r}: need http:// or https:// and a host")
        https = parts.scheme == "https"
        host = f"{self.bucket}.{parts.hostname}" if self.virtual_host else parts.hostname
        port = parts.port or (443 if https else 80)
        shown = f"[{host}]" if ":" in host else host
        base = parts.path.rstrip("/")
        set_ = object.__setattr__
        set_(self, "https", https)
        set_(self, "connect_host", host)
        set_(self, "port", port)
        set_(self, "host_header", shown if port == (443 if https else 80) else f"{shown}:{port}")
        set_(self, "path_prefix", base if self.virtual_host else f"{base}/{s3_path(self.bucket)}")

    def url(self, path: str) -> str:
        return f"{'https' if self.https else 'http'}://{self.host_header}{path}"


class ConnectionPool:
    """Kept-alive connections to a target, lent out one request at a time; safe to share
    between threads. Not tied to threads: a warm Lambda's next verification (new threads)
    reuses the connections of the last one instead of leaving them open."""

    def __init__(
        self,
        target: Target,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int = 64,
    ) -> None:
        self.target = target
        self._ssl_context = ssl_context if target.https else None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def acquire(self) -> Connection:
        """An open connection the server has not closed while it was idle.

        Raises OSError when it cannot connect."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                break
            if conn.idle_but_readable():
                conn.close()  # closed by the server while idle: reconnect, as urllib3 does
                continue
            return conn
        conn = Connection(
            self.target.connect_host,
            self.target.port,
            ssl_context=self._ssl_context,
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
        )
        conn.open()
        return conn

    def release(self, conn: Connection) -> None:
        """Take back a connection whose last response was read to its end (else, or when
        enough are idle, it is closed)."""
        if conn.is_open:
            with self._lock:
                if len(self._idle) < self._max_idle:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        """Close the idle connections (those lent out close when given back)."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._max_idle = 0
        for conn in idle:
            conn.close()


def _hooks_sending(client: S3Client) -> bool:
    """Whether a handler of the client's `before-send` event would see (or answer) each
    request — moto's in-process mock, a test stubber, instrumentation: requests that
    bypassed botocore would bypass it too. A handler that says it is switched off
    (`enabled` false: moto's stubber stays registered after its mock ends) does not count;
    unknown botocore internals count as yes."""
    try:
        handlers = client.meta.events._emitter._handlers  # type: ignore[attr-defined]
        found = list(handlers.prefix_search("before-send.s3.GetObject"))
    except AttributeError:
        return True
    return any(getattr(handler, "enabled", True) for handler in found)


@dataclass(frozen=True)
class DirectSettings:
    """A boto3 client's settings, for a direct path that must behave like it."""

    endpoint_url: str
    virtual_host: bool
    region: str
    credentials: CredentialSource
    ssl_context: ssl.SSLContext | None
    connect_timeout: float
    read_timeout: float
    max_attempts: int


def direct_settings(client: S3Client, bucket: str) -> tuple[DirectSettings | None, str]:
    """(settings, "") when a direct path can reproduce `client`, else (None, why not).

    Reads the client's credential source and TLS verification setting from botocore's
    internals (no public accessor exists); anything unexpected there means "use boto3".
    """
    from botocore.httpsession import get_cert_path
    from botocore.utils import get_environ_proxies

    meta = client.meta
    config: Any = meta.config  # botocore's Config sets its attributes dynamically
    endpoint = meta.endpoint_url
    virtual = (config.s3 or {}).get("addressing_style") == "virtual"
    try:
        credentials = client._get_credentials()  # type: ignore[attr-defined]
        verify = client._endpoint.http_session._verify  # type: ignore[attr-defined]
    except AttributeError:
        return None, "this botocore does not expose the client's credentials"
    if credentials is None:
        return None, "no credentials (boto3 reports it)"
    if _hooks_sending(client):
        return None, "something hooks into botocore's sending (a stubber such as moto's mock)"
    if get_environ_proxies(endpoint) or config.proxies:
        return None, "an HTTP proxy is configured"
    if virtual and ("." in bucket or bucket.lower() != bucket):
        return None, "the bucket name cannot be a virtual host"
    if not endpoint.startswith(("http://", "https://")):
        return None, f"endpoint {endpoint} is neither http nor https"
    context = None
    if endpoint.startswith("https://"):
        if verify is False:
            return None, "TLS verification is switched off"
        cafile = verify if isinstance(verify, str) else get_cert_path(True)
        context = ssl.create_default_context(cafile=cafile)
    retries = config.retries or {}
    attempts = retries.get("total_max_attempts") or (retries.get("max_attempts", 2) + 1)
    return (
        DirectSettings(
            endpoint_url=endpoint,
            virtual_host=virtual,
            region=meta.region_name or "us-east-1",
            credentials=credentials,
            ssl_context=context,
            connect_timeout=float(config.connect_timeout),
            read_timeout=float(config.read_timeout),
            max_attempts=int(attempts),
        ),
        "",
    )

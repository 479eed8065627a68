"""Single PUTs of repository files, signed by the agent and sent on kept-alive connections.

botocore spends about 2.5 ms of CPU per request under the GIL, most of a run over small
files; this writer needs a tenth of that. It copies the factory client's behaviour (endpoint,
addressing, timeouts, attempts, credentials, CA bundle, B2's header rules, botocore's
standard retries) and raises botocore exceptions, so the backend words failures the same
way; where it cannot match, `writer_for` returns None and boto3 sends the PUT
(docs/configuration.md, "Single PUTs"; docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

from cloud.integrations.http1 import BodyTooShortError, Connection
from cloud.integrations.s3_direct import (
    RETRY_CODES,
    RETRY_STATUS,
    Credentials,
    CredentialSource,
    backoff,
    parse_error,
)
from cloud.integrations.sigv4 import SigV4Signer, md5_header, s3_path
from local_agent.errors import RepositoryError

if TYPE_CHECKING:
    from boto3.session import Session
    from types_boto3_s3 import S3Client

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Payload:
    """One object's bytes as a PUT sends them: the body, its size and its digests.

    A file body is sent from where it stood when the payload was made; `rewind` goes back
    there for another attempt (a retry, or boto3 after this writer gave up)."""

    body: bytes | BinaryIO
    size: int
    md5_hex: str
    sha256_hex: str
    start: int  # where a file body stood (unused for bytes)

    @classmethod
    def of(cls, body: bytes | BinaryIO, size: int, md5_hex: str, sha256_hex: str) -> Payload:
        start = 0 if isinstance(body, bytes | bytearray | memoryview) else body.tell()
        return cls(body, size, md5_hex, sha256_hex, start)

    def rewind(self) -> None:
        if not isinstance(self.body, bytes | bytearray | memoryview):
            self.body.seek(self.start)


class ObjectWriter:
    """PUTs objects into one bucket; safe to share between threads (one connection each)."""

    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        virtual_host: bool,
        region: str,
        credentials: CredentialSource,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        max_attempts: int = 8,
        user_agent: str = "backrest-relay",
        on_request: Callable[[], None] = lambda: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint {endpoint_url!r}: need http:// or https:// and a host")
        self.endpoint_url = endpoint_url.rstrip("/")
        self._https = parts.scheme == "https"
        host = f"{bucket}.{parts.hostname}" if virtual_host else parts.hostname
        self._connect_host = host
        self._port = parts.port or (443 if self._https else 80)
        shown = f"[{host}]" if ":" in host else host
        default_port = 443 if self._https else 80
        self._host_header = shown if self._port == default_port else f"{shown}:{self._port}"
        base = parts.path.rstrip("/")
        self._path_prefix = base if virtual_host else f"{base}/{s3_path(bucket)}"
        self._url_base = f"{parts.scheme}://{self._host_header}"
        self._signer = SigV4Signer(region, "s3")
        self._credentials = Credentials(credentials)
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max(1, max_attempts)
        self._user_agent = user_agent
        self._on_request = on_request
        self._sleep = sleep
        self._local = threading.local()
        self._all: list[Connection] = []
        self._all_lock = threading.Lock()

    # -- connections ----------------------------------------------------------------------

    def _connection(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = Connection(
                self._connect_host,
                self._port,
                ssl_context=self._ssl_context if self._https else None,
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
            )
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection (threads that put again reconnect)."""
        with self._all_lock:
            conns = list(self._all)
        for conn in conns:
            conn.close()

    # -- requests -------------------------------------------------------------------------

    def put(
        self,
        key: str,
        payload: Payload,
        extra_headers: Mapping[str, str] | None = None,
        on_version: Callable[[str], None] | None = None,
    ) -> str:
        """Store `payload` under the absolute object `key`; its ETag.

        `extra_headers` (Object Lock's mode and retain-until date) are sent and signed;
        `on_version` hears the version id a versioned bucket gave the object."""
        path = f"{self._path_prefix}/{s3_path(key)}"
        headers = {
            "host": self._host_header,
            "content-length": str(payload.size),
            "content-md5": md5_header(payload.md5_hex),
            "content-type": "application/octet-stream",
            **(extra_headers or {}),
        }
        attempt = 0
        while True:
            attempt += 1
            payload.rewind()
            signed = self._signer.sign(
                "PUT", path, headers, payload.sha256_hex, self._credentials.current()
            )
            head = "".join(
                [
                    f"PUT {path} HTTP/1.1\r\n",
                    *(f"{name}: {value}\r\n" for name, value in headers.items()),
                    *(f"{name}: {value}\r\n" for name, value in signed.items()),
                    f"user-agent: {self._user_agent}\r\n\r\n",
                ]
            ).encode("utf-8")
            try:
                status, reason, etag, data, version = self._exchange(key, head, payload)
            except _NetworkError as exc:
                if attempt >= self._max_attempts or not exc.retryable:
                    raise exc.as_botocore(self._url_base + path) from exc.cause
                log.debug("PUT %s: %s; retrying (attempt %d)", key, exc.cause, attempt)
                self._sleep(backoff(attempt))
                continue
            if 200 <= status < 300:
                if version and on_version is not None:
                    on_version(version)
                return (etag or "").strip('"')
            code, message = parse_error(status, reason, data)
            if (status in RETRY_STATUS or code in RETRY_CODES) and attempt < self._max_attempts:
                log.debug("PUT %s: %s (HTTP %d); retrying (attempt %d)", key, code, status, attempt)
                self._sleep(backoff(attempt))
                continue
            from botocore.exceptions import ClientError

            response: Any = {
                "Error": {"Code": code, "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": status},
            }
            raise ClientError(response, "PutObject")

    def _exchange(
        self, key: str, head: bytes, payload: Payload
    ) -> tuple[int, str, str | None, bytes, str | None]:
        conn = self._connection()
        if conn.idle_but_readable():
            conn.close()  # closed by the server while idle: reconnect, as urllib3 does
        if not conn.is_open:
            try:
                conn.open()
            except OSError as exc:
                raise _NetworkError(exc, connecting=True) from None
        self._on_request()
        try:
            response = conn.exchange(head, payload.body, payload.size)
        except OSError as exc:
            conn.close()
            raise _NetworkError(exc, connecting=False) from None
        except BodyTooShortError as exc:
            conn.close()
            raise RepositoryError(
                f"{key}: the local file changed while being uploaded ({exc})"
            ) from None
        return (
            response.status,
            response.reason,
            response.headers.get("etag"),
            response.body,
            response.headers.get("x-amz-version-id"),
        )


class _NetworkError(Exception):
    def __init__(self, cause: BaseException, *, connecting: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.connecting = connecting
        # A certificate that does not verify will not verify on the next try either.
        self.retryable = not isinstance(cause, ssl.SSLCertVerificationError)

    def as_botocore(self, url: str) -> Exception:
        from botocore import exceptions

        if isinstance(self.cause, ssl.SSLError):
            return exceptions.SSLError(endpoint_url=url, error=self.cause)
        timed_out = isinstance(self.cause, TimeoutError)
        if self.connecting:
            if timed_out:
                return exceptions.ConnectTimeoutError(endpoint_url=url)
            return exceptions.EndpointConnectionError(endpoint_url=url)
        if timed_out:
            return exceptions.ReadTimeoutError(endpoint_url=url)
        return exceptions.ConnectionClosedError(endpoint_url=url)


def writer_for(
    client: S3Client,
    session: Session,
    bucket: str,
    *,
    user_agent: str,
    on_request: Callable[[], None] = lambda: None,
) -> ObjectWriter | None:
    """A writer that behaves like `client` for PutObject, or None where it could not."""
    from botocore.httpsession import get_cert_path
    from botocore.utils import get_environ_proxies

    meta = client.meta
    # botocore's Config sets its attributes dynamically; the stubs know none of them.
    config: Any = meta.config
    endpoint = meta.endpoint_url
    why_not = ""
    virtual = (config.s3 or {}).get("addressing_style") == "virtual"
    credentials = session.get_credentials()
    if credentials is None:
        why_not = "no credentials (boto3 reports it)"
    elif get_environ_proxies(endpoint) or config.proxies:
        why_not = "an HTTP proxy is configured"
    elif virtual and ("." in bucket or bucket.lower() != bucket):
        why_not = "the bucket name cannot be a virtual host"
    elif not endpoint.startswith(("http://", "https://")):
        why_not = f"endpoint {endpoint} is neither http nor https"
    if why_not:
        log.debug("single PUTs go through boto3: %s", why_not)
        return None
    assert credentials is not None
    context = None
    if endpoint.startswith("https://"):
        # The same CA bundle botocore would verify with: AWS_CA_BUNDLE or the profile's
        # ca_bundle (boto3 has no public accessor for the botocore session), else the default.
        core: Any = session._session
        ca_bundle = core.get_config_variable("ca_bundle") or get_cert_path(True)
        context = ssl.create_default_context(cafile=ca_bundle)
    retries = config.retries or {}
    attempts = retries.get("total_max_attempts") or (retries.get("max_attempts", 2) + 1)
    return ObjectWriter(
        endpoint_url=endpoint,
        bucket=bucket,
        virtual_host=virtual,
        region=meta.region_name or "us-east-1",
        credentials=credentials,  # type: ignore[arg-type]
        ssl_context=context,
        connect_timeout=float(config.connect_timeout),
        read_timeout=float(config.read_timeout),
        max_attempts=int(attempts),
        user_agent=user_agent,
        on_request=on_request,
    )

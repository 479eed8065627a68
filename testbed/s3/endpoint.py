"""Where a local S3 server listens, the keys it takes, and a boto3 client for it."""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self
from urllib.parse import urlsplit

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client


LOCALHOST = "127.0.0.1"
CHUNK = 256 * 1024

# One boto3 session for every test client: creating sessions is slow (it reloads the
# service models) and creating clients from one session is only safe under a lock.
_session_lock = threading.Lock()
_session: boto3.session.Session | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that need one up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def unique_bucket_name(hint: str = "t") -> str:
    """A valid, unused S3 bucket name that still says which test made it."""
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:40].strip("-")
    return f"t-{slug}-{uuid.uuid4().hex[:10]}" if slug else f"t-{uuid.uuid4().hex[:10]}"


def _boto_session() -> boto3.session.Session:
    global _session
    if _session is None:
        _session = boto3.session.Session()
    return _session


class Served:
    """A local server as a context manager: ``start()`` on entry, ``stop()`` on exit."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class S3Endpoint:
    """Where a test S3 server listens and the keys it accepts.

    ``local_root`` is set for directory-backed servers (rclone): bucket ``b`` is the
    directory ``local_root / b``, so tests can look at or damage "remote" files directly.
    """

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    local_root: Path | None = None

    @property
    def host(self) -> str:
        """The host of ``endpoint_url``."""
        return urlsplit(self.endpoint_url).hostname or LOCALHOST

    @property
    def port(self) -> int:
        """The TCP port of ``endpoint_url``."""
        port = urlsplit(self.endpoint_url).port
        assert port is not None, self.endpoint_url
        return port

    def client(self, *, flexible_checksums: bool = False, attempts: int = 3) -> S3Client:
        """A plain boto3 S3 client for test setup and assertions.

        By default it behaves the way B2 needs (path style, checksums only when an
        operation requires them). ``flexible_checksums=True`` gives boto3's own default
        (``when_supported``), which sends the ``x-amz-checksum-*`` headers B2 rejects.
        ``attempts`` counts the first try: 1 means no retries.
        """
        mode: Literal["when_supported", "when_required"] = (
            "when_supported" if flexible_checksums else "when_required"
        )
        config = Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation=mode,
            response_checksum_validation=mode,
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=5,
            read_timeout=60,
        )
        with _session_lock:
            return _boto_session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
                config=config,
            )

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` through the S3 API (works on rclone serve s3 and moto)."""
        self.client().create_bucket(Bucket=name)

    def env(self) -> dict[str, str]:
        """AWS_* variables for command-line peers (restic, s5cmd) talking to this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }


def wait_until_answering(
    port: int,
    timeout: float,
    died: Callable[[], str | None],
    what: str,
    *,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Poll until something answers HTTP (HTTPS with ``tls``) on ``port``; any status
    counts as up."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        reason = died()
        if reason is not None:
            raise RuntimeError(f"{what} exited during startup:\n{reason}")
        conn = (
            http.client.HTTPSConnection(LOCALHOST, port, timeout=1, context=tls)
            if tls is not None
            else http.client.HTTPConnection(LOCALHOST, port, timeout=1)
        )
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return
        except (OSError, http.client.HTTPException) as exc:
            last_error = exc
        finally:
            conn.close()
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer on port {port} within {timeout:.0f}s: {last_error}")

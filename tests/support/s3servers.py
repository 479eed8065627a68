"""Local S3 endpoints for tests: rclone serve s3, moto, and a fault-injecting proxy.

Everything binds to 127.0.0.1 only. ``RcloneS3Server`` is an independent S3 implementation
backed by a plain directory (so tests can inspect and corrupt "remote" files directly);
``MotoS3Server`` is AWS-shaped; ``S3Proxy`` sits in front of either one to count requests
(B2 bills list calls), imitate Backblaze B2's header quirks and inject faults.

None of this imports pytest, so ``bench/`` can use it too.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import logging
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer
    from types_boto3_s3 import S3Client

__all__ = [
    "LIST_OPERATIONS",
    "Fault",
    "FaultHook",
    "FaultSchedule",
    "LoggedRequest",
    "MotoS3Server",
    "RcloneS3Server",
    "RequestInfo",
    "S3Endpoint",
    "S3Proxy",
    "b2_rejected_header",
    "free_port",
    "s3_error_xml",
    "s3_operation",
    "unique_bucket_name",
]

_LOCALHOST = "127.0.0.1"
_CHUNK = 256 * 1024

# One boto3 session for every test client: creating sessions is slow (it reloads the
# service models) and creating clients from one session is only safe under a lock.
_session_lock = threading.Lock()
_session: boto3.session.Session | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that need one up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOCALHOST, 0))
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
        return urlsplit(self.endpoint_url).hostname or _LOCALHOST

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


def _wait_until_answering(
    port: int, timeout: float, died: Callable[[], str | None], what: str
) -> None:
    """Poll until something answers HTTP on ``port``; any status counts as up."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        reason = died()
        if reason is not None:
            raise RuntimeError(f"{what} exited during startup:\n{reason}")
        conn = http.client.HTTPConnection(_LOCALHOST, port, timeout=1)
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


# ---------------------------------------------------------------------------------------------
# rclone serve s3


class RcloneS3Server:
    """``rclone serve s3`` over a local directory, as a context manager.

    Each top-level directory of ``root`` is a bucket. rclone reads no config file
    (``--config ""``) and caches nothing (``--vfs-cache-mode off``, private
    ``--cache-dir``), so a developer's own rclone setup cannot leak in.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        access_key: str = "relay-test-access",
        secret_key: str = "relay-test-secret-key",  # noqa: S107 - a local test server
        rclone: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 15.0,
    ) -> None:
        if len(access_key) < 8 or len(secret_key) < 8:
            raise ValueError("rclone serve s3 wants access and secret keys of 8+ characters")
        self._requested_root = root
        self._access_key = access_key
        self._secret_key = secret_key
        self._rclone = rclone
        self._extra_args = tuple(extra_args)
        self._startup_timeout = startup_timeout
        self._workdir: Path | None = None
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._endpoint: S3Endpoint | None = None

    @property
    def root(self) -> Path:
        """The served directory; bucket ``b`` lives in ``root / b``."""
        if self._root is None:
            raise RuntimeError("RcloneS3Server is not running")
        return self._root

    @property
    def endpoint(self) -> S3Endpoint:
        """URL and keys of the running server."""
        if self._endpoint is None:
            raise RuntimeError("RcloneS3Server is not running")
        return self._endpoint

    @property
    def pid(self) -> int:
        """Process id of the rclone child (for tests that kill or stop it)."""
        if self._proc is None:
            raise RuntimeError("RcloneS3Server is not running")
        return self._proc.pid

    def bucket_path(self, bucket: str) -> Path:
        """Directory holding ``bucket``'s objects."""
        return self.root / bucket

    def log_text(self) -> str:
        """rclone's stderr so far (startup notices, errors)."""
        if self._workdir is None:
            return ""
        log = self._workdir / "rclone.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def start(self) -> None:
        """Start rclone and wait until it answers HTTP (retrying if the port was taken)."""
        if self._proc is not None:
            raise RuntimeError("RcloneS3Server already running")
        rclone = self._rclone or shutil.which("rclone")
        if rclone is None:
            raise RuntimeError("rclone not found on PATH")
        self._workdir = Path(tempfile.mkdtemp(prefix="rclone-serve-s3-"))
        self._root = self._requested_root or self._workdir / "root"
        self._root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        for _attempt in range(3):
            port = free_port()
            cmd = [
                rclone,
                "serve",
                "s3",
                "--config",
                "",
                "--cache-dir",
                str(self._workdir / "cache"),
                "--addr",
                f"{_LOCALHOST}:{port}",
                "--auth-key",
                f"{self._access_key},{self._secret_key}",
                "--vfs-cache-mode",
                "off",
                *self._extra_args,
                str(self._root),
            ]
            with (self._workdir / "rclone.log").open("wb") as log:
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env
                )
            try:
                _wait_until_answering(
                    port, self._startup_timeout, self._startup_failure, "rclone serve s3"
                )
            except RuntimeError as exc:
                self._terminate()
                log_text = self.log_text()
                if "address already in use" in log_text:
                    continue
                self._cleanup_dirs()
                raise RuntimeError(f"{exc}\n--- rclone log ---\n{log_text}") from None
            self._endpoint = S3Endpoint(
                endpoint_url=f"http://{_LOCALHOST}:{port}",
                access_key=self._access_key,
                secret_key=self._secret_key,
                local_root=self._root,
            )
            return
        self._cleanup_dirs()
        raise RuntimeError("rclone serve s3 could not bind a free port in 3 attempts")

    def _startup_failure(self) -> str | None:
        """Why rclone is gone (its exit code), or None while it runs."""
        if self._proc is None:
            return "not started"
        code = self._proc.poll()
        return None if code is None else f"exit code {code}"

    def stop(self) -> None:
        """Stop rclone (terminate, then kill) and remove its private directories."""
        self._terminate()
        self._endpoint = None
        self._cleanup_dirs()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _cleanup_dirs(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._root = None

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


# ---------------------------------------------------------------------------------------------
# moto


class MotoS3Server:
    """moto's ``ThreadedMotoServer`` on 127.0.0.1, reset on entry, exit and ``reset()``.

    moto keeps its state in process-global backends (shared with ``mock_aws``), so state
    is wiped whenever a user takes over the server. moto accepts any credentials and does
    not check ``Content-MD5``; use rclone where integrity checks matter.
    """

    def __init__(
        self,
        *,
        access_key: str = "testing",
        secret_key: str = "testing",  # noqa: S107 - moto accepts anything
    ) -> None:
        self._access_key = access_key
        self._secret_key = secret_key
        self._server: ThreadedMotoServer | None = None
        self._endpoint: S3Endpoint | None = None

    @property
    def endpoint(self) -> S3Endpoint:
        """URL and (arbitrary) keys of the running server."""
        if self._endpoint is None:
            raise RuntimeError("MotoS3Server is not running")
        return self._endpoint

    def start(self) -> None:
        """Start moto in a thread of this process."""
        from moto.server import ThreadedMotoServer  # slow import: only when asked for

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
        port = free_port()
        server = ThreadedMotoServer(ip_address=_LOCALHOST, port=port, verbose=False)
        server.start()
        self._server = server
        _wait_until_answering(port, 15.0, lambda: None, "moto server")
        self._endpoint = S3Endpoint(
            endpoint_url=f"http://{_LOCALHOST}:{port}",
            access_key=self._access_key,
            secret_key=self._secret_key,
        )
        self.reset()

    def reset(self) -> None:
        """Forget every bucket and object (moto's ``/moto-api/reset``)."""
        conn = http.client.HTTPConnection(_LOCALHOST, self.endpoint.port, timeout=10)
        try:
            conn.request("POST", "/moto-api/reset")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"moto reset answered {response.status}")
        finally:
            conn.close()

    def stop(self) -> None:
        """Reset and stop the server, closing its listening socket."""
        server, self._server = self._server, None
        if server is None:
            return
        with contextlib.suppress(Exception):
            self.reset()
        self._endpoint = None
        server.stop()
        wsgi = server._server  # ThreadedMotoServer.stop() leaves the socket open
        if wsgi is not None:
            wsgi.server_close()

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


# ---------------------------------------------------------------------------------------------
# Request classification


def _split_path(path: str) -> tuple[str | None, str | None]:
    """(bucket, key) of a path-style S3 request path; either may be None."""
    raw = path.split("?", 1)[0].lstrip("/")
    if not raw:
        return None, None
    bucket, _, key = raw.partition("/")
    return unquote(bucket), (unquote(key) if key else None)


# Query parameters that only shape a bucket listing (anything else is a sub-resource).
_LIST_PARAMS = frozenset(
    {
        "list-type",
        "prefix",
        "delimiter",
        "marker",
        "max-keys",
        "encoding-type",
        "continuation-token",
        "start-after",
        "fetch-owner",
        "x-id",
        "allow-unordered",
    }
)

_BUCKET_GET_SUBRESOURCES = {
    "uploads": "ListMultipartUploads",
    "versions": "ListObjectVersions",
    "location": "GetBucketLocation",
    "versioning": "GetBucketVersioning",
    "object-lock": "GetObjectLockConfiguration",
    "lifecycle": "GetBucketLifecycleConfiguration",
    "policy": "GetBucketPolicy",
    "acl": "GetBucketAcl",
    "cors": "GetBucketCors",
    "encryption": "GetBucketEncryption",
    "tagging": "GetBucketTagging",
}

_OBJECT_SUBRESOURCES = {
    "GET": {
        "uploadId": "ListParts",
        "tagging": "GetObjectTagging",
        "acl": "GetObjectAcl",
        "retention": "GetObjectRetention",
        "legal-hold": "GetObjectLegalHold",
        "attributes": "GetObjectAttributes",
    },
    "PUT": {
        "tagging": "PutObjectTagging",
        "acl": "PutObjectAcl",
        "retention": "PutObjectRetention",
        "legal-hold": "PutObjectLegalHold",
    },
    "POST": {"uploads": "CreateMultipartUpload", "uploadId": "CompleteMultipartUpload"},
    "DELETE": {"uploadId": "AbortMultipartUpload", "tagging": "DeleteObjectTagging"},
}

#: Operations that Backblaze B2 bills as Class C ("list") transactions; a no-op mirror
#: run must make none of them.
LIST_OPERATIONS = frozenset(
    {
        "ListBuckets",
        "ListObjects",
        "ListObjectsV2",
        "ListObjectVersions",
        "ListMultipartUploads",
        "ListParts",
    }
)


def s3_operation(
    method: str, path: str, query: dict[str, list[str]], header_names: Iterable[str] = ()
) -> str:
    """Name the S3 API operation of a path-style request (``ListObjectsV2``, ``UploadPart``...).

    Unknown shapes come back as ``"<METHOD> bucket"`` or ``"<METHOD> object"``.
    """
    method = method.upper()
    names = {h.lower() for h in header_names}
    bucket, key = _split_path(path)
    if bucket is None:
        return "ListBuckets" if method == "GET" else f"{method} service"
    if key is None:
        if method == "GET":
            for sub, op in _BUCKET_GET_SUBRESOURCES.items():
                if sub in query:
                    return op
            if not set(query) - _LIST_PARAMS:
                return "ListObjectsV2" if query.get("list-type") == ["2"] else "ListObjects"
            return "GET bucket"
        if method == "POST" and "delete" in query:
            return "DeleteObjects"
        if not query:
            simple = {"HEAD": "HeadBucket", "PUT": "CreateBucket", "DELETE": "DeleteBucket"}
            if method in simple:
                return simple[method]
        return f"{method} bucket"
    if method == "PUT" and "partNumber" in query and "uploadId" in query:
        return "UploadPartCopy" if "x-amz-copy-source" in names else "UploadPart"
    for sub, op in _OBJECT_SUBRESOURCES.get(method, {}).items():
        if sub in query:
            return op
    if query and not set(query) <= {"versionId", "x-id", "partNumber", "response-content-type"}:
        return f"{method} object"
    if method == "PUT":
        return "CopyObject" if "x-amz-copy-source" in names else "PutObject"
    simple = {"GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}
    return simple.get(method, f"{method} object")


def b2_rejected_header(header_names: Iterable[str]) -> str | None:
    """The header Backblaze B2 would refuse in this request, or None.

    B2's S3 API answers 400 to flexible-checksum headers (``x-amz-checksum-*``,
    ``x-amz-sdk-checksum-algorithm``) and streaming trailers (``x-amz-trailer``), all of
    which boto3 >= 1.36 sends by default.
    """
    names = [h.lower() for h in header_names]
    if "x-amz-sdk-checksum-algorithm" in names:
        return "x-amz-sdk-checksum-algorithm"
    for name in names:
        if name.startswith("x-amz-checksum-") or name == "x-amz-trailer":
            return name
    return None


def s3_error_xml(code: str, message: str) -> bytes:
    """An S3-style XML error document."""
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
    ).encode()


@dataclass(frozen=True, eq=False)
class RequestInfo:
    """A request as the proxy received it, before forwarding: what fault hooks decide on."""

    seq: int
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    content_length: int | None

    @property
    def header_names(self) -> frozenset[str]:
        """Lower-cased header names."""
        return frozenset(self.headers)

    @property
    def bucket(self) -> str | None:
        """Bucket named by the path (path-style addressing), if any."""
        return _split_path(self.path)[0]

    @property
    def key(self) -> str | None:
        """Object key named by the path, URL-decoded, if any."""
        return _split_path(self.path)[1]

    @property
    def operation(self) -> str:
        """S3 operation name, see ``s3_operation``."""
        return s3_operation(self.method, self.path, self.query, self.headers)


@dataclass(frozen=True, eq=False)
class LoggedRequest:
    """One entry of the proxy's request log.

    ``status`` is what the client received (None: the connection was dropped or reset);
    ``upstream_status`` is what the upstream answered (None: never forwarded or failed);
    ``fault`` names the injected fault (``"b2_quirk"``, ``"respond"``, ``"drop"``...).
    """

    seq: int
    method: str
    path: str
    query: dict[str, list[str]]
    header_names: frozenset[str]
    status: int | None
    upstream_status: int | None
    fault: str | None
    operation: str

    @property
    def bucket(self) -> str | None:
        """Bucket named by the path, if any."""
        return _split_path(self.path)[0]

    @property
    def key(self) -> str | None:
        """Object key named by the path, URL-decoded, if any."""
        return _split_path(self.path)[1]

    @property
    def is_list_call(self) -> bool:
        """Whether B2 would bill this as a Class C (list) call."""
        return self.operation in LIST_OPERATIONS


# ---------------------------------------------------------------------------------------------
# Faults

FaultKind = Literal["respond", "drop", "drop_after_forward", "reset_mid_body"]


@dataclass(frozen=True)
class Fault:
    """What the proxy does instead of a normal round trip.

    - ``respond``: answer ``status``/``body`` without forwarding (503 SlowDown, 500...).
    - ``drop``: read the request, forward nothing, close the connection without a response.
    - ``drop_after_forward``: forward and let the upstream finish it, then close the
      connection without relaying the answer (the request took effect, the client can't know).
    - ``reset_mid_body``: forward the headers and half the body, then reset both connections.
    """

    kind: FaultKind
    status: int = 0
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def respond(
        cls,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/xml",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Fault:
        """Answer with this status and body."""
        return cls("respond", status, body, (("Content-Type", content_type), *headers))

    @classmethod
    def s3_error(
        cls, status: int, code: str, message: str, *, headers: Sequence[tuple[str, str]] = ()
    ) -> Fault:
        """Answer with an S3 XML error."""
        return cls.respond(status, s3_error_xml(code, message), headers=headers)

    @classmethod
    def slow_down(cls) -> Fault:
        """503 SlowDown, the throttling answer S3 and B2 give under load."""
        return cls.s3_error(503, "SlowDown", "Please reduce your request rate.")

    @classmethod
    def internal_error(cls) -> Fault:
        """500 InternalError."""
        return cls.s3_error(500, "InternalError", "We encountered an internal error.")

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without answering; the request never reaches upstream."""
        return cls("drop")

    @classmethod
    def drop_after_forward(cls) -> Fault:
        """Let the upstream process the request, then close without answering."""
        return cls("drop_after_forward")

    @classmethod
    def reset_mid_body(cls) -> Fault:
        """Forward half the request body, then reset both connections."""
        return cls("reset_mid_body")


FaultHook = Callable[[RequestInfo], Fault | None]


class FaultSchedule:
    """A fault hook: inject ``fault`` into matching requests ``skip+1 .. skip+times``.

    Matching is by ``method``, ``operation`` and/or ``pred``; everything else passes.
    ``times=None`` injects forever. Thread-safe; ``injected`` counts faults so far.
    """

    def __init__(
        self,
        fault: Fault,
        *,
        times: int | None = 1,
        skip: int = 0,
        method: str | None = None,
        operation: str | None = None,
        pred: Callable[[RequestInfo], bool] | None = None,
    ) -> None:
        self.fault = fault
        self.times = times
        self.skip = skip
        self.method = method.upper() if method else None
        self.operation = operation
        self.pred = pred
        self.matched = 0
        self.injected = 0
        self._lock = threading.Lock()

    def __call__(self, info: RequestInfo) -> Fault | None:
        """Decide for one request."""
        if self.method is not None and info.method != self.method:
            return None
        if self.operation is not None and info.operation != self.operation:
            return None
        if self.pred is not None and not self.pred(info):
            return None
        with self._lock:
            self.matched += 1
            if self.matched <= self.skip:
                return None
            if self.times is not None and self.injected >= self.times:
                return None
            self.injected += 1
            return self.fault


# ---------------------------------------------------------------------------------------------
# The proxy

# Connection-scoped headers the proxy handles itself. SigV4 never signs these (botocore
# and minio-go exclude Expect; the others are hop-by-hop). Transfer-Encoding is kept: a
# chunked request body is relayed with its framing.
_HOP_BY_HOP_REQUEST = frozenset(
    {"connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"}
)
_HOP_BY_HOP_RESPONSE = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)


class _ClientGoneError(Exception):
    """The client closed or reset its connection."""


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, proxy: S3Proxy) -> None:
        self.proxy = proxy
        super().__init__((_LOCALHOST, 0), _ProxyHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up is routine here (faults, retries); stay quiet about it."""
        if isinstance(sys.exc_info()[1], OSError | _ClientGoneError):
            return
        super().handle_error(request, client_address)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive with the client
    timeout = 120  # idle keep-alive connections end eventually
    server: _ProxyServer

    _upstream: http.client.HTTPConnection | None = None
    _continue_pending = False  # the client sent Expect: 100-continue and awaits our go
    _body: Literal["none", "unread", "partial", "done"] = "none"

    # -- plumbing ---------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; with Nagle on, each response would
        # stall ~40 ms on the peer's delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.proxy._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, add=False)
            self._close_upstream()

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request stderr lines; the proxy keeps its own log."""

    def handle_expect_100(self) -> bool:
        """Defer ``100 Continue`` until we know the request will be forwarded.

        That lets a B2 quirk or an injected error answer before the client sends the body,
        as a real server does (``_handle`` sees the Expect header itself).
        """
        return True

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_GET  # noqa: N815

    # -- request body -----------------------------------------------------------------------

    def _content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.strip().isdigit() else None

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _read(self, n: int, *, line: bool = False) -> bytes:
        try:
            data = self.rfile.readline(n) if line else self.rfile.read(n)
        except OSError as exc:
            raise _ClientGoneError(str(exc)) from exc
        if not data:
            raise _ClientGoneError("client closed the connection mid-body")
        return data

    def _body_chunks(self, limit: int | None = None) -> Iterator[bytes]:
        """Yield the request body as received (chunked framing included), at most ``limit``."""
        if self._body != "unread":
            return
        self._send_continue()
        self._body = "partial"
        if self._is_chunked():
            while True:
                size_line = self._read(65537, line=True)
                yield size_line
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        trailer = self._read(65537, line=True)
                        yield trailer
                        if trailer in (b"\r\n", b"\n"):
                            self._body = "done"
                            return
                remaining = size + 2  # data and its CRLF
                while remaining:
                    data = self._read(min(_CHUNK, remaining))
                    remaining -= len(data)
                    yield data
                if limit is not None:
                    return  # a partial chunked body: one chunk is enough
        remaining = self._content_length() or 0
        if limit is not None:
            remaining = min(remaining, limit)
        while remaining > 0:
            data = self._read(min(_CHUNK, remaining))
            remaining -= len(data)
            yield data
        if limit is None:
            self._body = "done"

    def _send_continue(self) -> None:
        if self._continue_pending:
            self._continue_pending = False
            self.send_response_only(100)
            self._write_headers()

    def _write_headers(self) -> None:
        try:
            self.end_headers()
        except OSError as exc:
            raise _ClientGoneError(str(exc)) from exc

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as exc:
            raise _ClientGoneError(str(exc)) from exc

    # -- upstream ---------------------------------------------------------------------------

    def _close_upstream(self, *, reset: bool = False) -> None:
        conn, self._upstream = self._upstream, None
        if conn is None:
            return
        if reset and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def _upstream_conn(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to the upstream and whether it is a reused keep-alive one."""
        conn = self._upstream
        if conn is not None and conn.sock is not None:
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if not readable:
                return conn, True
            self._close_upstream()  # upstream closed it (or sent junk) while idle
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(
            proxy.upstream.host, proxy.upstream.port, timeout=proxy.upstream_timeout
        )
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._upstream = conn
        return conn, False

    def _send_head(self, conn: http.client.HTTPConnection) -> None:
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP_REQUEST:
                conn.putheader(name, value)
        conn.endheaders()

    def _exchange(self, body_limit: int | None = None) -> http.client.HTTPResponse:
        """Send this request upstream (body streamed) and return the response head.

        A bodiless request on a reused connection that turns out dead is retried once on a
        fresh one; bodies are streamed, never buffered, so they can't be replayed.
        """
        has_body = self._body != "none"
        for attempt in range(2):
            conn, reused = self._upstream_conn()
            try:
                self._send_head(conn)
                for chunk in self._body_chunks(body_limit) if has_body else ():
                    conn.send(chunk)
                if body_limit is not None:
                    raise _ClientGoneError("reset mid-body")  # caller resets both sides
                return conn.getresponse()
            except (OSError, http.client.HTTPException):
                self._close_upstream()
                if attempt == 0 and reused and not has_body:
                    continue
                raise
        raise AssertionError("unreachable")

    # -- responses --------------------------------------------------------------------------

    def _drain(self) -> None:
        """Read and discard an untouched body the client is sending anyway (keeps keep-alive)."""
        if self._body == "unread" and not self._continue_pending:
            for _ in self._body_chunks():
                pass

    def _respond(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer without forwarding, keeping the connection usable when we can."""
        self._drain()
        if self._body in ("unread", "partial"):
            self.close_connection = True  # body unsent (awaiting 100) or half read
        self._continue_pending = False
        self.send_response_only(status)
        has_type = False
        for name, value in headers:
            has_type = has_type or name.lower() == "content-type"
            self.send_header(name, value)
        if not has_type:
            self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Date", self.date_time_string())
        if self.close_connection:
            self.send_header("Connection", "close")
        self._write_headers()
        if self.command != "HEAD" and body:
            self._write(body)

    def _relay(self, resp: http.client.HTTPResponse) -> None:
        """Pass the upstream response through: status, headers, body (streamed)."""
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP_BY_HOP_RESPONSE:
                self.send_header(name, value)
        no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        if no_body:
            self._write_headers()
            resp.read()
        elif resp.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self._write_headers()
            while data := resp.read1(_CHUNK):
                self._write(b"%x\r\n%b\r\n" % (len(data), data))
            self._write(b"0\r\n\r\n")
        else:
            if resp.length is None:  # delimited by the upstream closing
                self.send_header("Connection", "close")
                self.close_connection = True
            self._write_headers()
            while data := resp.read(_CHUNK):
                self._write(data)
        if resp.will_close:
            self._close_upstream()

    def _bad_gateway(self, exc: BaseException) -> None:
        self.close_connection = True
        self._respond(502, s3_error_xml("BadGateway", f"proxy: upstream failed: {exc}"))

    def _abort_client(self, *, reset: bool) -> None:
        """Hang up on the client without a response (RST with ``reset``)."""
        self.close_connection = True
        if reset:
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- the request ------------------------------------------------------------------------

    def _handle(self) -> None:
        proxy = self.server.proxy
        info = proxy._request_info(self.command, self.path, self.headers)
        length = self._content_length()
        self._body = "unread" if self._is_chunked() or length else "none"
        expect = self.headers.get("Expect", "").strip().lower() == "100-continue"
        self._continue_pending = expect and self._body == "unread"

        fault: Fault | None = None
        label: str | None = None
        rejected = b2_rejected_header(info.headers) if proxy.b2_quirks else None
        if rejected is not None:
            label = "b2_quirk"
            fault = Fault.s3_error(
                400,
                "InvalidArgument",
                f"Unsupported header '{rejected}' received for this API call.",
            )
        else:
            hook = proxy.fault
            fault = hook(info) if hook is not None else None
            label = fault.kind if fault is not None else None

        logged = False

        def record(status: int | None, upstream_status: int | None = None) -> None:
            # Logged before the client sees the outcome, so a test that just got its
            # response (or error) always finds the entry.
            nonlocal logged
            if not logged:
                logged = True
                proxy._log(
                    LoggedRequest(
                        seq=info.seq,
                        method=info.method,
                        path=info.path,
                        query=info.query,
                        header_names=info.header_names,
                        status=status,
                        upstream_status=upstream_status,
                        fault=label,
                        operation=info.operation,
                    )
                )

        try:
            if fault is None:
                try:
                    resp = self._exchange()
                except (OSError, http.client.HTTPException) as exc:
                    record(502)
                    self._bad_gateway(exc)
                else:
                    record(resp.status, resp.status)
                    try:
                        self._relay(resp)
                    except (OSError, http.client.HTTPException):
                        self._close_upstream()  # upstream died mid-body: truncate
                        self._abort_client(reset=False)
                        raise _ClientGoneError("upstream failed mid-response") from None
            elif fault.kind == "respond":
                self._drain()
                record(fault.status)
                self._respond(fault.status, fault.body, fault.headers)
            elif fault.kind == "drop":
                self._drain()
                record(None)
                self._abort_client(reset=False)
            elif fault.kind == "drop_after_forward":
                try:
                    resp = self._exchange()
                    resp.read()
                    record(None, resp.status)
                finally:
                    record(None)
                    self._close_upstream()
                    self._abort_client(reset=False)
            elif fault.kind == "reset_mid_body":
                half = (length or 0) // 2 if not self._is_chunked() else 1
                with contextlib.suppress(_ClientGoneError, OSError, http.client.HTTPException):
                    if self._body != "none":
                        self._exchange(body_limit=half)
                record(None)
                self._close_upstream(reset=True)
                self._abort_client(reset=True)
        except (_ClientGoneError, OSError, http.client.HTTPException):
            self._close_upstream()
            self.close_connection = True
        finally:
            record(None)


class S3Proxy:
    """A threaded HTTP reverse proxy in front of an S3 endpoint, for observing and breaking it.

    Requests are forwarded byte-for-byte (method, path and query, headers in order
    including the client's ``Host`` — SigV4 signs it and the upstream servers here don't
    mind that it names the proxy — and the body, streamed). Responses come back the same
    way. The proxy logs every request, can imitate Backblaze B2 (``b2_quirks``), and asks
    ``fault`` (settable at any time) whether to break a request instead.
    """

    def __init__(
        self,
        upstream: S3Endpoint,
        *,
        b2_quirks: bool = False,
        fault: FaultHook | None = None,
        upstream_timeout: float = 120.0,
    ) -> None:
        self.upstream = upstream
        self.b2_quirks = b2_quirks
        self.fault: FaultHook | None = fault
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._log_entries: list[LoggedRequest] = []
        self._seq = 0
        self._connections: set[socket.socket] = set()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        if self._server is None:
            raise RuntimeError("S3Proxy is not running")
        return f"http://{_LOCALHOST}:{self._server.server_address[1]}"

    @property
    def endpoint(self) -> S3Endpoint:
        """The upstream's keys and region at the proxy's URL."""
        return S3Endpoint(
            endpoint_url=self.url,
            access_key=self.upstream.access_key,
            secret_key=self.upstream.secret_key,
            region=self.upstream.region,
            local_root=self.upstream.local_root,
        )

    def start(self) -> None:
        """Listen on a free 127.0.0.1 port and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError("S3Proxy already running")
        self._server = _ProxyServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"s3proxy-{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and hang up on every open client connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        self.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close_connections(self) -> None:
        """Shut down every open client connection (clients see the server hang up)."""
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

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

    # -- the request log --------------------------------------------------------------------

    @property
    def requests(self) -> list[LoggedRequest]:
        """A copy of the request log, in completion order."""
        with self._lock:
            return list(self._log_entries)

    def count(
        self,
        method: str | None = None,
        pred: Callable[[LoggedRequest], bool] | None = None,
        *,
        operation: str | None = None,
    ) -> int:
        """How many logged requests match ``method``, ``operation`` and ``pred`` (all given)."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (operation is None or r.operation == operation)
            and (pred is None or pred(r))
        )

    def list_calls(self) -> list[LoggedRequest]:
        """Requests B2 bills as Class C: ListObjects(V2), ListParts, ListMultipartUploads...

        See ``LIST_OPERATIONS``.
        """
        return [r for r in self.requests if r.is_list_call]

    def operations(self) -> list[str]:
        """Operation names of the logged requests, in order (handy in assertion messages)."""
        return [r.operation for r in self.requests]

    def reset(self) -> None:
        """Forget the request log."""
        with self._lock:
            self._log_entries.clear()

    # -- used by the handler ----------------------------------------------------------------

    def _request_info(self, method: str, target: str, headers: Message) -> RequestInfo:
        parts = urlsplit(target)
        with self._lock:
            self._seq += 1
            seq = self._seq
        length = headers.get("Content-Length")
        return RequestInfo(
            seq=seq,
            method=method.upper(),
            path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers={name.lower(): value for name, value in headers.items()},
            content_length=int(length) if length and length.strip().isdigit() else None,
        )

    def _log(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._log_entries.append(entry)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

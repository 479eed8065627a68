"""A fault-injecting, request-counting reverse proxy in front of a local S3 endpoint."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from email.message import Message
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from testbed.s3.endpoint import CHUNK, LOCALHOST, S3Endpoint, Served
from testbed.s3.faults import Fault, FaultHook
from testbed.s3.operations import (
    LoggedRequest,
    RequestInfo,
    b2_rejected_header,
    s3_error_xml,
)

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
        super().__init__((LOCALHOST, 0), _ProxyHandler)

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
                    data = self._read(min(CHUNK, remaining))
                    remaining -= len(data)
                    yield data
                if limit is not None:
                    return  # a partial chunked body: one chunk is enough
        remaining = self._content_length() or 0
        if limit is not None:
            remaining = min(remaining, limit)
        while remaining > 0:
            data = self._read(min(CHUNK, remaining))
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

    def _finish_cut_upstream(self) -> None:
        """End a request whose body was cut short and wait until the upstream has dealt with it.

        The upstream sees the body end early (a half-close), then answers or hangs up; only
        after that may the client learn of the cut. ``rclone serve s3`` removes the key of a
        PUT whose body copy failed, whenever it notices: a client told first could retry the
        same key, get a 200, and lose the object to that late cleanup — which no S3 or B2
        does (a failed PUT leaves no trace). Waiting here puts the cleanup before the retry.
        """
        conn = self._upstream
        if conn is None or conn.sock is None:
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            resp = conn.getresponse()  # bounded by upstream_timeout
            resp.read()
        except (OSError, http.client.HTTPException):
            pass  # it hung up instead of answering (finished too), or timed out: give up

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
            while data := resp.read1(CHUNK):
                self._write(b"%x\r\n%b\r\n" % (len(data), data))
            self._write(b"0\r\n\r\n")
        else:
            if resp.length is None:  # delimited by the upstream closing
                self.send_header("Connection", "close")
                self.close_connection = True
            self._write_headers()
            while data := resp.read(CHUNK):
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
                self._finish_cut_upstream()  # before the client sees the reset
                record(None)
                self._close_upstream(reset=True)
                self._abort_client(reset=True)
        except (_ClientGoneError, OSError, http.client.HTTPException):
            self._close_upstream()
            self.close_connection = True
        finally:
            record(None)


class S3Proxy(Served):
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
        return f"http://{LOCALHOST}:{self._server.server_address[1]}"

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

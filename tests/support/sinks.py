"""Local receivers for notification tests: an HTTP sink and a minimal SMTP sink.

Both bind to 127.0.0.1 on a free port, run in a background thread, and record everything
they receive so a test can assert on what a real client (Apprise, urllib, smtplib) sent.
No mocks of the clients: these are real servers speaking just enough of each protocol.

None of this imports pytest, so ``bench/`` and ad-hoc scripts can use it too.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import http.server
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "HttpRequest",
    "HttpSink",
    "SmtpMessage",
    "SmtpSink",
    "closed_port",
]


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(0.01)


# -- HTTP ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    """One request as the sink received it (query values as lists, like parse_qs)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode("utf-8")

    def header(self, name: str) -> str | None:
        """A header by case-insensitive name."""
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        request = HttpRequest(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=dict(self.headers.items()),
            body=body,
        )
        sink = self.server.sink
        with sink.lock:
            sink.requests.append(request)
            status = sink.queued_statuses.pop(0) if sink.queued_statuses else sink.status
            payload = sink.response_body
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = do_PATCH = _handle  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sink: HttpSink) -> None:
        self.sink = sink
        super().__init__(("127.0.0.1", 0), _HttpHandler)


class _Sink:
    """Serving a socketserver in a daemon thread, as a context manager."""

    _thread_name = "sink"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None

    def _make_server(self) -> socketserver.TCPServer:
        raise NotImplementedError

    @property
    def port(self) -> int:
        assert isinstance(self._server, socketserver.TCPServer), "sink not started"
        port: int = self._server.server_address[1]
        return port

    def start(self) -> Self:
        self._server = server = self._make_server()
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name=self._thread_name, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class HttpSink(_Sink):
    """A ThreadingHTTPServer on 127.0.0.1 that records every request and answers `status`
    (or, first, whatever `answer_next()` queued) with `response_body`.

    >>> with HttpSink() as sink:
    ...     urlopen(sink.url + "/ping")            # doctest: +SKIP
    ...     sink.requests[0].path == "/ping"       # doctest: +SKIP
    """

    def __init__(self, status: int = 200, response_body: bytes = b"OK") -> None:
        self.status = status
        self.response_body = response_body
        self.queued_statuses: list[int] = []
        self.requests: list[HttpRequest] = []
        super().__init__()

    _thread_name = "http-sink"

    def _make_server(self) -> socketserver.TCPServer:
        return _HttpServer(self)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.queued_statuses.clear()

    def answer_next(self, *statuses: int) -> None:
        """Answer the next requests with these statuses, in order, then `status` again."""
        with self.lock:
            self.queued_statuses.extend(statuses)

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[HttpRequest]:
        """Wait until at least `count` requests arrived; returns a snapshot of them."""
        _wait_until(lambda: len(self.requests) >= count, timeout, f"{count} HTTP request(s)")
        with self.lock:
            return list(self.requests)


# -- SMTP ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpMessage:
    """One accepted message: the envelope, the raw DATA and the AUTH identity used."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    auth_user: str | None = None
    auth_password: str | None = field(default=None, repr=False)

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    def body(self, subtype: str) -> str | None:
        """The decoded ``text/<subtype>`` part (``"html"`` or ``"plain"``), if any."""
        part = self.message.get_body(preferencelist=(subtype,))
        if part is None or part.get_content_subtype() != subtype:
            return None
        content: str = part.get_content()
        return content.replace("\r\n", "\n")


class _SmtpHandler(socketserver.StreamRequestHandler):
    """Enough ESMTP for smtplib: EHLO/HELO, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA, RSET,
    NOOP, QUIT. No STARTTLS (it is not advertised, so clients in plain mode never ask)."""

    server: _SmtpServer
    timeout = 30
    MAX_LINE = 65536

    def setup(self) -> None:
        super().setup()
        self._reset()
        self.auth_user: str | None = None
        self.auth_password: str | None = None

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []

    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode("ascii") + b"\r\n")
        self.wfile.flush()

    def _readline(self) -> str | None:
        raw = self.rfile.readline(self.MAX_LINE)
        if not raw:
            return None
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    def handle(self) -> None:
        self._reply("220 sink.localhost ESMTP test sink")
        while True:
            line = self._readline()
            if line is None:
                return
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self.wfile.write(
                    b"250-sink.localhost\r\n250-SIZE 10485760\r\n250 AUTH PLAIN LOGIN\r\n"
                )
                self.wfile.flush()
            elif verb == "HELO":
                self._reply("250 sink.localhost")
            elif verb == "AUTH":
                self._auth(arg)
            elif verb == "MAIL":
                if self.server.sink.credentials is not None and self.auth_user is None:
                    self._reply("530 5.7.0 Authentication required")
                    continue
                self._reset()
                self.mail_from = _address(arg)
                self._reply("250 2.1.0 OK")
            elif verb == "RCPT":
                if self.mail_from is None:
                    self._reply("503 5.5.1 MAIL first")
                    continue
                self.rcpt_tos.append(_address(arg))
                self._reply("250 2.1.5 OK")
            elif verb == "DATA":
                if not self.rcpt_tos:
                    self._reply("503 5.5.1 RCPT first")
                    continue
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                self._data()
            elif verb == "RSET":
                self._reset()
                self._reply("250 2.0.0 OK")
            elif verb == "NOOP":
                self._reply("250 2.0.0 OK")
            elif verb == "QUIT":
                self._reply("221 2.0.0 Bye")
                return
            else:
                self._reply("502 5.5.2 Command not implemented")

    def _auth(self, arg: str) -> None:
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        try:
            if mechanism == "PLAIN":
                if not initial:
                    self._reply("334 ")
                    initial = self._readline() or ""
                _authzid, user, password = _b64(initial).split("\0", 2)
            elif mechanism == "LOGIN":
                if initial:
                    user = _b64(initial)
                else:
                    self._reply("334 VXNlcm5hbWU6")  # "Username:"
                    user = _b64(self._readline() or "")
                self._reply("334 UGFzc3dvcmQ6")  # "Password:"
                password = _b64(self._readline() or "")
            else:
                self._reply("504 5.5.4 Unrecognized authentication type")
                return
        except (ValueError, binascii.Error):
            self._reply("501 5.5.2 Cannot decode response")
            return
        expected = self.server.sink.credentials
        if expected is not None and (user, password) != expected:
            self._reply("535 5.7.8 Authentication credentials invalid")
            return
        self.auth_user, self.auth_password = user, password
        self._reply("235 2.7.0 Authentication successful")

    def _data(self) -> None:
        lines: list[bytes] = []
        while True:
            raw = self.rfile.readline(self.MAX_LINE)
            if not raw:
                return  # the client went away mid-message: nothing is accepted
            if raw in (b".\r\n", b".\n"):
                break
            if raw.startswith(b".."):
                raw = raw[1:]  # undo dot-stuffing
            lines.append(raw)
        assert self.mail_from is not None
        message = SmtpMessage(
            mail_from=self.mail_from,
            rcpt_tos=tuple(self.rcpt_tos),
            data=b"".join(lines),
            auth_user=self.auth_user,
            auth_password=self.auth_password,
        )
        sink = self.server.sink
        with sink.lock:
            sink.messages.append(message)
        self._reset()
        self._reply("250 2.0.0 Queued")


def _address(arg: str) -> str:
    """``FROM:<a@b> SIZE=1`` → ``a@b``."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        return rest[1 : rest.find(">")] if ">" in rest else rest[1:]
    return rest.split(" ", 1)[0]


def _b64(value: str) -> str:
    return base64.b64decode(value.strip(), validate=True).decode("utf-8")


class _SmtpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink
        super().__init__(("127.0.0.1", 0), _SmtpHandler)


class SmtpSink(_Sink):
    """A plain-text SMTP server on 127.0.0.1 that accepts and records every message.

    With `credentials=(user, password)` it requires AUTH and refuses other credentials
    (535), so a test can prove a wrong password fails; without, AUTH is optional and
    whatever was presented is recorded on the message.
    """

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.credentials = credentials
        self.messages: list[SmtpMessage] = []
        super().__init__()

    _thread_name = "smtp-sink"

    def _make_server(self) -> socketserver.TCPServer:
        return _SmtpServer(self)

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[SmtpMessage]:
        _wait_until(lambda: len(self.messages) >= count, timeout, f"{count} email(s)")
        with self.lock:
            return list(self.messages)

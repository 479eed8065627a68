"""One kept-alive HTTP/1.1 connection for the direct S3 paths (the agent's PUTs, the
verifier's GETs and listings).

Why not http.client: it parses every response's headers with the `email` package, which
costs more CPU than signing and sending a 4 KiB object together (docs/benchmarks.md). S3
answers with a status line, a few headers and a body, so this reads exactly that, usually
from one `recv`: the head up to the blank line, then a body framed by Content-Length, by
chunked encoding, or by the server closing the connection — whole (`exchange`, a PUT's
short answer) or streamed in pieces (`stream`, an object read back without holding it).
Interim 1xx answers are skipped. Anything malformed is an `HTTPError` (the caller retries
on a new connection, as for a dropped one).
"""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Generator, Iterator
from typing import BinaryIO

MAX_HEAD = 64 * 1024
RECV_SIZE = 64 * 1024
# The most one recv of a streamed body asks for: recv allocates what it asks for, and a
# caller's 1 MiB pieces would cost a fresh mapping per call.
MAX_RECV = 256 * 1024
SEND_BLOCK = 256 * 1024  # bytes per read and socket write of a file body
SMALL_BODY = 64 * 1024  # bodies up to this size go out in the same write as the head


class HTTPError(OSError):
    """The connection cannot be used: the peer broke the protocol or went away."""


class BodyTooShortError(ValueError):
    """A file body ended before the length the request announced."""


class Response:
    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # lower-case names; a repeated header keeps its last value
        self.body = body


class StreamedResponse:
    """A response whose body is still on the connection: read it with `chunks` (or
    `read`) before the connection carries another request."""

    __slots__ = ("_conn", "headers", "reason", "status")

    def __init__(self, conn: Connection, status: int, reason: str, headers: dict[str, str]) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers

    def chunks(self, size: int = RECV_SIZE) -> Generator[bytes, None, None]:
        """The body in pieces of at most `size` bytes. A body not read to its end (the
        caller stopped, the peer broke off) closes the connection: it cannot be reused."""
        finished = False
        try:
            yield from self._conn._body_chunks(self.status, self.headers, size)
            finished = True
        finally:
            if not finished or self.headers.get("connection", "").lower() == "close":
                self._conn.close()

    def read(self) -> bytes:
        return b"".join(self.chunks())


class Connection:
    """Not thread-safe: the direct paths keep one per thread."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()  # received, not yet parsed

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def idle_but_readable(self) -> bool:
        """Whether a kept-alive connection between requests has something to read: the
        server closed it (idle timeout) or sent bytes nobody asked for. Either way it
        must not carry the next request, which would fail and use up a retry."""
        if self._sock is None:
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable) or bool(self._buffer)

    def open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self._connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl_context is not None:
                sock = self._ssl_context.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self._read_timeout)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._buffer.clear()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._buffer.clear()
        if sock is not None:
            sock.close()

    def exchange(self, head: bytes, body: bytes | BinaryIO, size: int) -> Response:
        """Send one request (`head` ends with the blank line) and read its response."""
        sock = self._sock
        if sock is None:
            raise HTTPError("connection is not open")
        try:
            self._send(sock, head, body, size)
        except OSError as send_error:
            # A server may answer early (an auth error) and close while the body is still
            # going out; its answer says more than the broken pipe does.
            try:
                response = self._read_response()
            except (OSError, ValueError):
                raise send_error from None
            self.close()
            return response
        response = self._read_response()
        if response.headers.get("connection", "").lower() == "close":
            self.close()
        return response

    @staticmethod
    def _send(sock: socket.socket, head: bytes, body: bytes | BinaryIO, size: int) -> None:
        if isinstance(body, bytes):
            if len(body) <= SMALL_BODY:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                sock.sendall(body)
            return
        sock.sendall(head)
        left = size
        while left > 0:
            chunk = body.read(min(SEND_BLOCK, left))
            if not chunk:
                raise BodyTooShortError(f"body ended {left} bytes short of {size}")
            sock.sendall(chunk)
            left -= len(chunk)

    def _fill(self) -> bool:
        """Read what the socket has into the buffer; False when the peer has closed."""
        assert self._sock is not None
        data = self._sock.recv(RECV_SIZE)
        if not data:
            return False
        self._buffer += data
        return True

    def _take_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > MAX_HEAD:
                raise HTTPError("response line too long")
            if not self._fill():
                return b""

    def _take_head(self) -> bytes:
        """Status line and headers, up to and without the blank line."""
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self._buffer[:end])
                del self._buffer[: end + 4]
                return head
            if len(self._buffer) > MAX_HEAD:
                raise HTTPError(f"response head longer than {MAX_HEAD} bytes")
            if not self._fill():
                if self._buffer:
                    raise HTTPError("server closed the connection in the middle of headers")
                raise HTTPError("server closed the connection without an answer")

    def stream(self, head: bytes) -> StreamedResponse:
        """Send a request without a body (a GET) and read the response's head; the body
        follows from the returned response's `chunks`."""
        sock = self._sock
        if sock is None:
            raise HTTPError("connection is not open")
        sock.sendall(head)
        status, reason, headers = self._read_head()
        return StreamedResponse(self, status, reason, headers)

    def _read_response(self) -> Response:
        status, reason, headers = self._read_head()
        body = b"".join(self._body_chunks(status, headers, RECV_SIZE))
        return Response(status, reason, headers, body)

    def _read_head(self) -> tuple[int, str, dict[str, str]]:
        while True:
            lines = self._take_head().decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise HTTPError(f"not an HTTP status line: {lines[0][:80]!r}")
            status = int(parts[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise HTTPError(f"malformed header line: {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
            if not 100 <= status < 200:
                break  # else an interim answer (100 Continue): the real one follows
        if parts[0] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            headers["connection"] = "close"
        return status, parts[2] if len(parts) > 2 else "", headers

    def _body_chunks(self, status: int, headers: dict[str, str], size: int) -> Iterator[bytes]:
        """The body framed as `headers` say, in pieces of at most `size` bytes."""
        if status in (204, 304):
            return
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = self._take_line().split(b";", 1)[0].strip()
                try:
                    length = int(size_line, 16)
                except ValueError:
                    raise HTTPError(f"bad chunk size {size_line[:20]!r}") from None
                if length == 0:
                    while self._take_line() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from self._pieces(length, size)
                self._take_line()  # CRLF after the chunk
        length_header = headers.get("content-length")
        if length_header is not None:
            if not length_header.isdigit():
                raise HTTPError(f"bad Content-Length {length_header[:20]!r}")
            yield from self._pieces(int(length_header), size)
            return
        headers["connection"] = "close"  # framed by the server closing the connection
        yield from self._pieces(len(self._buffer), size)
        assert self._sock is not None
        while data := self._sock.recv(min(size, MAX_RECV)):
            yield data

    def _pieces(self, n: int, size: int) -> Iterator[bytes]:
        """The next `n` bytes: what is buffered, then straight from the socket (never past
        the body, so the next response's bytes stay on the connection)."""
        while n > 0 and self._buffer:
            take = min(n, len(self._buffer), size)
            piece = bytes(self._buffer[:take])
            del self._buffer[:take]
            n -= take
            yield piece
        while n > 0:
            assert self._sock is not None
            data = self._sock.recv(min(size, n, MAX_RECV))
            if not data:
                raise HTTPError(f"server closed the connection {n} bytes into a body")
            n -= len(data)
            yield data

"""The object writer's HTTP/1.1 connection against canned server answers on a real socket:
every framing S3 servers use, interim answers, kept-alive reuse, and broken peers."""

from __future__ import annotations

import io

import pytest

from cloud.integrations.http1 import BodyTooShortError, Connection, HTTPError
from tests.support.canned_http import CannedServer

OK_EMPTY = b'HTTP/1.1 200 OK\r\nETag: "abc"\r\nContent-Length: 0\r\n\r\n'


def connect(server: CannedServer) -> Connection:
    conn = Connection("127.0.0.1", server.port, ssl_context=None, connect_timeout=5, read_timeout=5)
    conn.open()
    return conn


def head(n: int) -> bytes:
    return f"PUT /b/k HTTP/1.1\r\nhost: x\r\ncontent-length: {n}\r\n\r\n".encode()


def test_kept_alive_connection_carries_several_requests(serve: type[CannedServer]) -> None:
    server = serve([OK_EMPTY, OK_EMPTY, OK_EMPTY])
    conn = connect(server)
    bodies = [b"a" * 10, b"b" * 100_000, b"c" * 5]
    for body in bodies:
        response = conn.exchange(head(len(body)), body, len(body))
        assert (response.status, response.headers["etag"], response.body) == (200, '"abc"', b"")
    assert conn.is_open
    assert [r.partition(b"\r\n\r\n")[2] for r in server.requests] == bodies


def test_file_bodies_are_sent_in_blocks_and_must_be_complete(
    serve: type[CannedServer],
) -> None:
    data = bytes(range(256)) * 4000  # 1 MB: several send blocks
    server = serve([OK_EMPTY, OK_EMPTY])  # the second answer never comes: body too short
    conn = connect(server)
    assert conn.exchange(head(len(data)), io.BytesIO(data), len(data)).status == 200
    assert server.requests[0].endswith(data)
    with pytest.raises(BodyTooShortError):
        conn.exchange(head(10), io.BytesIO(b"short"), 10)


@pytest.mark.parametrize(
    ("reply", "status", "body", "stays_open"),
    [
        (
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"6;ext=1\r\n<Error\r\n7\r\n>x</Err\r\n3\r\nor>\r\n0\r\nX-Trailer: 1\r\n\r\n",
            403,
            b"<Error>x</Error>",
            True,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK_EMPTY, 200, b"", True),
        (b"HTTP/1.1 500 Internal\r\nContent-Length: 3\r\n\r\nbad", 500, b"bad", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close", 200, b"until-close", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
    ],
)
def test_response_framing(
    serve: type[CannedServer], reply: bytes, status: int, body: bytes, stays_open: bool
) -> None:
    server = serve([reply])
    conn = connect(server)
    response = conn.exchange(head(1), b"x", 1)
    assert (response.status, response.body) == (status, body)
    assert conn.is_open is stays_open


@pytest.mark.parametrize(
    "reply",
    [
        None,  # closed without an answer
        b"HTTP/1.1 200 OK\r\nContent-Le",  # closed in the middle of the head
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # closed inside the body
        b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_broken_answers_are_connection_errors(
    serve: type[CannedServer], reply: bytes | None
) -> None:
    server = serve([reply])  # the server hangs up after its (partial) answer
    conn = connect(server)
    with pytest.raises(HTTPError):
        conn.exchange(head(1), b"x", 1)


def test_a_connection_the_server_closed_while_idle_is_noticed_before_reuse(
    serve: type[CannedServer],
) -> None:
    server = serve([OK_EMPTY])  # answers once, then hangs up
    conn = connect(server)
    assert conn.exchange(head(1), b"x", 1).status == 200
    server.thread.join(timeout=5)
    assert conn.idle_but_readable()


def test_an_idle_connection_still_open_is_reused(serve: type[CannedServer]) -> None:
    server = serve([OK_EMPTY, OK_EMPTY])
    conn = connect(server)
    assert conn.exchange(head(1), b"x", 1).status == 200
    assert not conn.idle_but_readable()
    assert conn.exchange(head(1), b"y", 1).status == 200


# -- streamed bodies (the verifier's GETs) -------------------------------------------------

GET = b"GET /b/k HTTP/1.1\r\nhost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("reply", "stays_open"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"d" * 300_000, True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n" % 100_000 + b"d" * 100_000 + b"\r\n" for _ in range(3))
            + b"0\r\n\r\n",
            True,
        ),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"d" * 300_000, False),
    ],
)
def test_a_streamed_body_comes_in_bounded_pieces_and_leaves_the_connection_clean(
    serve: type[CannedServer], reply: bytes, stays_open: bool
) -> None:
    server = serve([reply, OK_EMPTY] if stays_open else [reply])  # then hangs up
    conn = connect(server)
    response = conn.stream(GET)
    pieces = list(response.chunks(50_000))
    assert response.status == 200
    assert b"".join(pieces) == b"d" * 300_000
    assert max(len(p) for p in pieces) <= 50_000
    assert conn.is_open is stays_open
    if stays_open:  # the next answer was not swallowed with the body
        assert conn.exchange(head(1), b"x", 1).headers["etag"] == '"abc"'


def test_a_stream_read_only_in_part_closes_the_connection(serve: type[CannedServer]) -> None:
    server = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"d" * 200_000])
    conn = connect(server)
    pieces = conn.stream(GET).chunks(1000)
    next(pieces)
    pieces.close()  # the caller gave up: the rest of the body is still on the wire
    assert not conn.is_open


def test_a_stream_cut_off_inside_the_body_is_a_connection_error(
    serve: type[CannedServer],
) -> None:
    server = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"])
    conn = connect(server)
    response = conn.stream(GET)
    with pytest.raises(HTTPError):
        response.read()
    assert not conn.is_open

"""A canned HTTP/1.1 server on a real socket, for the clients that speak HTTP themselves
(the PUT writer's connection, the verifier's lean GET reader)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest


class CannedServer:
    """Accepts one connection; answers each request (head + Content-Length body) with
    the next canned reply, and hangs up after the last; None hangs up without answering."""

    def __init__(self, replies: list[bytes | None]) -> None:
        self.replies = replies
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        buffer = b""
        with conn:
            for reply in self.replies:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buffer[:length])
                buffer = buffer[length:]
                if reply is None:
                    return
                conn.sendall(reply)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[type[CannedServer]]:
    """`CannedServer`, each one started in the test closed after it."""
    servers: list[CannedServer] = []

    class Tracked(CannedServer):
        def __init__(self, replies: list[bytes | None]) -> None:
            super().__init__(replies)
            servers.append(self)

    yield Tracked
    for server in servers:
        server.close()

"""moto's threaded server on 127.0.0.1: an AWS-shaped S3 endpoint."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

from testbed.s3.endpoint import LOCALHOST, S3Endpoint, Served, free_port, wait_until_answering


class MotoS3Server(Served):
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
        server = ThreadedMotoServer(ip_address=LOCALHOST, port=port, verbose=False)
        server.start()
        self._server = server
        wait_until_answering(port, 15.0, lambda: None, "moto server")
        self._endpoint = S3Endpoint(
            endpoint_url=f"http://{LOCALHOST}:{port}",
            access_key=self._access_key,
            secret_key=self._secret_key,
        )
        self.reset()

    def reset(self) -> None:
        """Forget every bucket and object (moto's ``/moto-api/reset``)."""
        conn = http.client.HTTPConnection(LOCALHOST, self.endpoint.port, timeout=10)
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

"""Faults a proxy injects instead of a normal round trip, and schedules of them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from testbed.s3.operations import RequestInfo, s3_error_xml

FaultKind = Literal["respond", "drop", "drop_after_forward", "reset_mid_body"]


@dataclass(frozen=True)
class Fault:
    """What the proxy does instead of a normal round trip.

    - ``respond``: answer ``status``/``body`` without forwarding (503 SlowDown, 500...).
    - ``drop``: read the request, forward nothing, close the connection without a response.
    - ``drop_after_forward``: forward and let the upstream finish it, then close the
      connection without relaying the answer (the request took effect, the client can't know).
    - ``reset_mid_body``: forward the headers and half the body, end the request there and
      wait until the server has finished with it, then reset the client's connection. (rclone
      deletes the key of a cut PUT whenever it notices; a client told sooner could retry,
      get a 200 and lose the object to that cleanup, which no S3 does.)
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
        """Forward half the request body; once the server is done with it, reset the client."""
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

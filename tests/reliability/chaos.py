"""Seeded fault schedules for the S3 proxy, plus the two faults it lacks: slow responses and
response bodies cut off half-way.

``testbed.s3.proxy.S3Proxy`` asks its ``fault`` hook, in the handler thread, before
it forwards a request. That gives both missing faults without touching the proxy:

- **slow**: the hook sleeps, then lets the request through (time to first byte grows);
- **truncate**: the hook marks the request, and ``ChaosProxy``'s handler relays the status,
  the headers (with the full ``Content-Length``) and half the body, then resets the
  connection — what a client sees when a download dies mid-way.

Every decision comes from ``random.Random(seed)`` and the request's sequence number, so a
schedule is repeatable for the same seed and the same order of requests.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.s3.faults import Fault
from testbed.s3.operations import RequestInfo
from testbed.s3.proxy import S3Proxy, _ClientGoneError, _ProxyHandler

# Kinds a schedule can pick from. "truncate" only applies to responses with a body
# (GET); elsewhere it degrades to "drop".
FAULT_KINDS = (
    "internal_error",
    "slow_down",
    "reset_mid_body",
    "drop",
    "drop_after_forward",
    "slow",
    "truncate",
)

_local = threading.local()


class _TruncatingHandler(_ProxyHandler):
    """The proxy's handler, able to cut a response body in half when the hook asked."""

    def _relay(self, resp: Any) -> None:
        cut = getattr(_local, "truncate", False)
        _local.truncate = False
        length = resp.length
        if not cut or self.command == "HEAD" or resp.chunked or not length or length < 2:
            super()._relay(resp)
            return
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                self.send_header(name, value)
        self._write_headers()
        self._write(resp.read(length // 2))
        self._close_upstream(reset=True)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        raise _ClientGoneError("response truncated on purpose")


class ChaosProxy(S3Proxy):
    """``S3Proxy`` whose hooks may also ask for a truncated response body (``truncate()``)."""

    def start(self) -> None:
        super().start()
        server = self._server
        assert server is not None
        server.RequestHandlerClass = _TruncatingHandler


def truncate_this_response() -> None:
    """Called from a fault hook: relay only half of this request's response body."""
    _local.truncate = True


@dataclass
class FaultLog:
    """What a schedule injected, by kind (thread-safe)."""

    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())


class RandomFaults:
    """A seeded fault hook: each matching request is faulted with probability ``rate``.

    ``kinds`` picks what may happen; ``blackout`` = (first, length) makes every matching
    request from the ``first``-th (1-based) on fail for ``length`` requests in a row (500s
    and dropped connections), enough to exhaust botocore's 8 attempts. ``slow`` is the
    range of extra latency in seconds. ``pred`` limits which requests are eligible;
    ``avoid(kind, request)`` turns a fault into a plain ``drop`` (used to keep a known,
    separately tested bug out of a randomized test).
    """

    def __init__(
        self,
        seed: int,
        *,
        rate: float,
        kinds: Sequence[str] = FAULT_KINDS,
        blackout: tuple[int, int] | None = None,
        slow: tuple[float, float] = (0.05, 0.6),
        pred: Callable[[RequestInfo], bool] | None = None,
        avoid: Callable[[str, RequestInfo], bool] | None = None,
    ) -> None:
        self.avoid = avoid
        self.rng = random.Random(seed)
        self.rate = rate
        self.kinds = tuple(kinds)
        self.blackout = blackout
        self.slow = slow
        self.pred = pred
        self.log = FaultLog()
        self.seen = 0
        self._lock = threading.Lock()

    def __call__(self, info: RequestInfo) -> Fault | None:
        _local.truncate = False
        if self.pred is not None and not self.pred(info):
            return None
        with self._lock:
            self.seen += 1
            n = self.seen
            roll = self.rng.random()
            kind = self.rng.choice(self.kinds)
            delay = self.rng.uniform(*self.slow)
            dark_kind = self.rng.choice(("internal_error", "drop"))
        if self.blackout is not None:
            first, length = self.blackout
            if first <= n < first + length:
                self.log.add(f"blackout:{dark_kind}")
                return Fault.internal_error() if dark_kind == "internal_error" else Fault.drop()
        if roll >= self.rate:
            return None
        return self._inject(kind, delay, info)

    def _inject(self, kind: str, delay: float, info: RequestInfo) -> Fault | None:
        if kind == "truncate" and info.method != "GET":
            kind = "drop"
        if self.avoid is not None and self.avoid(kind, info):
            kind = "drop"
        self.log.add(kind)
        if kind == "slow":
            time.sleep(delay)
            return None
        if kind == "truncate":
            truncate_this_response()
            return None
        faults: dict[str, Callable[[], Fault]] = {
            "internal_error": Fault.internal_error,
            "slow_down": Fault.slow_down,
            "reset_mid_body": Fault.reset_mid_body,
            "drop": Fault.drop,
            "drop_after_forward": Fault.drop_after_forward,
        }
        return faults[kind]()

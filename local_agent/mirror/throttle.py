"""A bandwidth limit shared by every upload thread (`upload.bandwidth_limit`)."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from typing import BinaryIO


class Throttle:
    """Token bucket in bytes: callers block until their bytes fit under the rate.

    The burst is a quarter second of traffic, enough to keep requests flowing without
    letting a home uplink saturate for long.
    """

    def __init__(
        self,
        bytes_per_second: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`clock` and `sleep` are for tests, which check the rate without waiting."""
        self.rate = float(bytes_per_second)
        self.capacity = max(self.rate / 4, 64 * 1024)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._stamp = clock()
        self._lock = threading.Lock()

    def consume(self, amount: int) -> None:
        while amount > 0:
            take = min(float(amount), self.capacity)
            with self._lock:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= take:
                    self._tokens -= take
                    amount -= int(take)
                    continue
                wait = (take - self._tokens) / self.rate
            self._sleep(wait)


class ThrottledReader(io.RawIOBase):
    """A seekable body for botocore that spends throttle tokens as it is read.

    Only bytes past the furthest point read so far cost tokens: over plain http botocore
    reads the body once to sign it and again to send it, and a retry re-reads it. The
    limit then holds for the file's content, which is what users configure.
    """

    def __init__(self, inner: BinaryIO, throttle: Throttle) -> None:
        super().__init__()
        self._inner = inner
        self._throttle = throttle
        self._high_water = inner.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read(64 * 1024):
                parts.append(chunk)
            return b"".join(parts)
        start = self._inner.tell()
        chunk = self._inner.read(min(size, 64 * 1024))
        end = start + len(chunk)
        if end > self._high_water:
            self._throttle.consume(end - max(start, self._high_water))
            self._high_water = end
        return chunk

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

"""The shared bandwidth limit and the throttled upload body, on a fake clock: the rate is
checked from the waits the throttle asks for, never by sleeping."""

from __future__ import annotations

import io
import os
import threading

from local_agent.mirror.throttle import Throttle, ThrottledReader

RATE = 1024 * 1024  # 1 MiB/s: a quarter-second burst is 256 KiB


class FakeTime:
    """A monotonic clock that moves only when the throttle sleeps; shared by threads."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def clock(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        with self._lock:
            self.slept.append(seconds)
            self.now += seconds

    @property
    def elapsed(self) -> float:
        return self.now - 1000.0


def throttled(rate: int = RATE) -> tuple[Throttle, FakeTime]:
    time = FakeTime()
    return Throttle(rate, clock=time.clock, sleep=time.sleep), time


def min_seconds(throttle: Throttle, total: int) -> float:
    """The least time `total` bytes can take: one burst is free, the rest flows at the rate."""
    return (total - throttle.capacity) / throttle.rate


# -- Throttle ------------------------------------------------------------------------------------


def test_capacity_is_a_quarter_second_with_a_floor() -> None:
    assert Throttle(RATE).capacity == RATE / 4
    assert Throttle(10 * RATE).capacity == 10 * RATE / 4
    assert Throttle(1000).capacity >= 1000 / 4


def test_one_burst_is_immediate() -> None:
    throttle, time = throttled()
    throttle.consume(int(throttle.capacity))
    assert time.slept == []


def test_throttle_enforces_rate() -> None:
    throttle, time = throttled()
    total = int(3 * throttle.capacity)
    sent = 0
    while sent < total:
        chunk = min(64 * 1024, total - sent)
        throttle.consume(chunk)
        sent += chunk
    assert time.elapsed >= min_seconds(throttle, total) * (1 - 1e-9), time.elapsed


def test_throttle_enforces_rate_for_one_large_request() -> None:
    throttle, time = throttled()
    total = int(3 * throttle.capacity)
    throttle.consume(total)
    assert time.elapsed >= min_seconds(throttle, total) * (1 - 1e-9), time.elapsed


def test_throttle_is_shared_between_threads() -> None:
    """However the threads interleave, all of them together never get more than one burst
    plus the rate times the time gone by."""
    throttle, time = throttled()
    per_thread = int(3 * throttle.capacity / 4)
    errors: list[BaseException] = []
    sent = 0
    over: list[float] = []
    lock = threading.Lock()

    def send() -> None:
        nonlocal sent
        try:
            for _ in range(per_thread // 16384):
                throttle.consume(16384)
                with lock:
                    sent += 16384
                    allowed = throttle.capacity + throttle.rate * time.elapsed
                    if sent > allowed * (1 + 1e-9):
                        over.append(sent - allowed)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    assert errors == []
    assert over == []
    total = 4 * (per_thread // 16384) * 16384
    assert sent == total
    assert time.elapsed >= min_seconds(throttle, total) * (1 - 1e-9), time.elapsed


def test_consume_zero_is_free() -> None:
    throttle, time = throttled()
    for _ in range(1000):
        throttle.consume(0)
    assert time.slept == []


# -- ThrottledReader -----------------------------------------------------------------------------


def fast() -> Throttle:
    return Throttle(10 * 1024**3)  # effectively unlimited


def test_reader_returns_the_same_bytes_in_chunks() -> None:
    data = os.urandom(300_000)
    reader = ThrottledReader(io.BytesIO(data), fast())
    assert reader.readable() and reader.seekable()
    out = bytearray()
    while chunk := reader.read(8192):
        assert len(chunk) <= 8192
        out += chunk
    assert bytes(out) == data
    assert reader.read(10) == b""


def test_reader_readall_and_buffered_read() -> None:
    data = os.urandom(200_000)
    reader = ThrottledReader(io.BytesIO(data), fast())
    assert reader.readall() == data
    reader.seek(0)
    assert io.BufferedReader(reader).read() == data


def test_reader_readinto() -> None:
    data = os.urandom(100_000)
    reader = ThrottledReader(io.BytesIO(data), fast())
    buf = bytearray(70_000)
    got = reader.readinto(buf)
    assert 0 < got <= len(buf)
    assert bytes(buf[:got]) == data[:got]


def test_reader_seek_and_tell() -> None:
    data = os.urandom(100_000)
    reader = ThrottledReader(io.BytesIO(data), fast())
    assert reader.tell() == 0
    assert reader.read(1000) == data[:1000]
    assert reader.tell() == 1000
    assert reader.seek(50_000) == 50_000
    assert reader.read(10) == data[50_000:50_010]
    assert reader.seek(-10, io.SEEK_END) == len(data) - 10
    assert reader.read(100) == data[-10:]
    assert reader.seek(0, io.SEEK_END) == len(data)
    assert reader.tell() == len(data)
    # Rewind, as botocore does before a retry: the whole body again.
    reader.seek(0)
    assert reader.readall() == data


def test_reader_spends_throttle_tokens() -> None:
    throttle, time = throttled()
    total = int(3 * throttle.capacity)
    reader = ThrottledReader(io.BytesIO(os.urandom(total)), throttle)
    n = 0
    while chunk := reader.read(64 * 1024):
        n += len(chunk)
    assert n == total
    assert time.elapsed >= min_seconds(throttle, total) * (1 - 1e-9), time.elapsed


def test_reader_read_without_size_returns_everything() -> None:
    data = os.urandom(200_000)
    reader = ThrottledReader(io.BytesIO(data), fast())
    assert reader.read() == data

"""The shared bandwidth limit, the throttled upload body, and secret redaction in output."""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time

from cloud.integrations.redact import MASK, REDACTOR, RedactingFormatter, Redactor
from local_agent.throttle import Throttle, ThrottledReader

RATE = 1024 * 1024  # 1 MiB/s: a quarter-second burst is 256 KiB


def min_seconds(throttle: Throttle, total: int) -> float:
    """The least time `total` bytes can take: one burst is free, the rest flows at the rate."""
    return (total - throttle.capacity) / throttle.rate


# -- Throttle ------------------------------------------------------------------------------------


def test_capacity_is_a_quarter_second_with_a_floor() -> None:
    assert Throttle(RATE).capacity == RATE / 4
    assert Throttle(10 * RATE).capacity == 10 * RATE / 4
    assert Throttle(1000).capacity >= 1000 / 4


def test_one_burst_is_immediate() -> None:
    throttle = Throttle(RATE)
    started = time.monotonic()
    throttle.consume(int(throttle.capacity))
    assert time.monotonic() - started < 0.2


def test_throttle_enforces_rate() -> None:
    throttle = Throttle(RATE)
    total = int(3 * throttle.capacity)
    started = time.monotonic()
    sent = 0
    while sent < total:
        chunk = min(64 * 1024, total - sent)
        throttle.consume(chunk)
        sent += chunk
    elapsed = time.monotonic() - started
    assert elapsed >= min_seconds(throttle, total) * 0.8, elapsed


def test_throttle_enforces_rate_for_one_large_request() -> None:
    throttle = Throttle(RATE)
    total = int(3 * throttle.capacity)
    started = time.monotonic()
    throttle.consume(total)
    elapsed = time.monotonic() - started
    assert elapsed >= min_seconds(throttle, total) * 0.8, elapsed


def test_throttle_is_shared_between_threads() -> None:
    throttle = Throttle(RATE)
    per_thread = int(3 * throttle.capacity / 4)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for _ in range(per_thread // 16384):
                throttle.consume(16384)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(4)]
    started = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    elapsed = time.monotonic() - started
    assert errors == []
    total = 4 * (per_thread // 16384) * 16384
    assert elapsed >= min_seconds(throttle, total) * 0.8, elapsed


def test_consume_zero_is_free() -> None:
    throttle = Throttle(RATE)
    started = time.monotonic()
    for _ in range(1000):
        throttle.consume(0)
    assert time.monotonic() - started < 0.5


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
    throttle = Throttle(RATE)
    total = int(3 * throttle.capacity)
    reader = ThrottledReader(io.BytesIO(os.urandom(total)), throttle)
    started = time.monotonic()
    n = 0
    while chunk := reader.read(64 * 1024):
        n += len(chunk)
    elapsed = time.monotonic() - started
    assert n == total
    assert elapsed >= min_seconds(throttle, total) * 0.8, elapsed


def test_reader_read_without_size_returns_everything() -> None:
    data = os.urandom(200_000)
    reader = ThrottledReader(io.BytesIO(data), fast())
    assert reader.read() == data


# -- Redactor ------------------------------------------------------------------------------------


def test_redactor_masks_registered_secrets() -> None:
    redact = Redactor()
    redact.add("s3cr3t-value-123", "https://hooks.slack.com/services/T0/B0/XYZ")
    text = (
        "auth failed for s3cr3t-value-123 and s3cr3t-value-123; "
        "POST https://hooks.slack.com/services/T0/B0/XYZ?x=1"
    )
    out = redact(text)
    assert "s3cr3t-value-123" not in out
    assert "hooks.slack.com/services" not in out
    assert out.count(MASK) == 3
    assert out.endswith("?x=1")


def test_redactor_ignores_short_and_empty_values() -> None:
    redact = Redactor()
    redact.add("", None, "a", "abcde", "key")
    text = "a key abcde is here"
    assert redact(text) == text


def test_redactor_six_characters_is_enough() -> None:
    redact = Redactor()
    redact.add("abcdef")
    assert redact("xx abcdef yy") == f"xx {MASK} yy"


def test_redactor_masks_longest_first() -> None:
    redact = Redactor()
    redact.add("secret", "secret-extended")
    out = redact("value secret-extended end")
    assert "extended" not in out
    assert "secret" not in out


def test_redactor_without_secrets_is_identity() -> None:
    assert Redactor()("nothing to hide") == "nothing to hide"


def test_redactor_add_is_thread_safe() -> None:
    redact = Redactor()
    secrets = [f"secret-{i:05d}" for i in range(400)]

    def add(part: list[str]) -> None:
        for s in part:
            redact.add(s)
            redact("probe")

    threads = [threading.Thread(target=add, args=(secrets[i::4],)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    out = redact(" ".join(secrets))
    assert "secret-" not in out


# -- RedactingFormatter --------------------------------------------------------------------------


SENTINEL = "SENTINEL-SECRET-7f3a-formatter"


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"endpoint said {SENTINEL}")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord("local_agent.test", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_redacting_formatter_masks_message_args_and_tracebacks() -> None:
    REDACTOR.add(SENTINEL)  # the process-wide redactor the CLI registers secrets with
    formatter = RedactingFormatter("%(levelname)s: %(message)s")
    assert SENTINEL not in formatter.format(_record(f"literal {SENTINEL}"))
    out = formatter.format(_record("arg %s here", SENTINEL))
    assert SENTINEL not in out
    assert out == f"ERROR: arg {MASK} here"
    with_tb = formatter.format(_record("boom", exc=True))
    assert "RuntimeError" in with_tb
    assert SENTINEL not in with_tb


def test_redacting_formatter_through_a_logger() -> None:
    REDACTOR.add(SENTINEL)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    logger = logging.getLogger("local_agent.test_redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("upload to https://x/?token=%s failed", SENTINEL)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert stream.getvalue() == f"upload to https://x/?token={MASK} failed\n"

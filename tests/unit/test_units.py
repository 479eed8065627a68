"""Human units in config values: sizes, rates, Go-style durations, and their formatting."""

from __future__ import annotations

import pytest

from local_agent.units import (
    format_duration,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

KiB = 1024
MiB = 1024**2
GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1024", 1024),
        (" 1024 ", 1024),
        ("16MiB", 16 * MiB),
        ("16mib", 16 * MiB),
        ("16 MiB", 16 * MiB),
        ("5MB", 5_000_000),
        ("5 MB", 5_000_000),
        ("5M", 5_000_000),
        ("500KB", 500_000),
        ("500k", 500_000),
        ("64KiB", 64 * KiB),
        ("1.5GiB", int(1.5 * GiB)),
        ("2GB", 2_000_000_000),
        ("1TiB", 1024**4),
        ("1TB", 1000**4),
        ("7B", 7),
        ("7b", 7),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "MiB", "-1", "-1MiB", "16XB", "16Mi", "sixteen", "16 MiB MiB", "1,5MiB", "0x10"],
)
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20MiB/s", 20 * MiB),
        ("20MiB", 20 * MiB),
        ("500KB/s", 500_000),
        (" 1MB/s ", 1_000_000),
        ("1048576", MiB),
        ("100/s", 100),
    ],
)
def test_parse_rate(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "0", " 0 ", "0/s", "0MiB/s", "0KB"])
def test_parse_rate_empty_or_zero_is_unlimited(text: str) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize("text", ["fast", "20MiB/m", "20MiB/s/s", "-5MB/s", "MiB/s", "/s"])
def test_parse_rate_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6h", 6 * 3600),
        ("45m", 45 * 60),
        ("90s", 90),
        ("1h30m", 5400),
        ("1h30m15s", 5415),
        ("2h0m0s", 7200),
        ("1d", 86400),
        ("1.5h", 5400),
        ("500ms", 0.5),
        ("1m500ms", 60.5),
        ("1H30M", 5400),
        (" 10m ", 600),
        ("90", 90),
        ("2.5", 2.5),
        ("0", 0),
    ],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    ["", "  ", "h", "1x", "1h30", "1h 30m", "-5m", "abc", "1hour", "m30", "1h30mm", "1.h"],
)
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (16 * MiB, "16.0 MiB"),
        (int(1.5 * GiB), "1.5 GiB"),
        (3 * 1024**4, "3.0 TiB"),
        (2048 * 1024**4, "2048.0 TiB"),
    ],
)
def test_format_size(size: int, expected: str) -> None:
    assert format_size(size) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0.0s"),
        (12.34, "12.3s"),
        (60, "1m00s"),
        (185, "3m05s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3720, "1h02m"),
        (26 * 3600 + 5 * 60, "26h05m"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize("text", ["16MiB", "5MB", "1GiB", "123"])
def test_size_round_trips_through_format(text: str) -> None:
    # The formatted size parses back to (about) the same number of bytes.
    size = parse_size(text)
    formatted = format_size(size).replace(" ", "")
    assert parse_size(formatted) == pytest.approx(size, rel=0.05)

"""Human units in config values: sizes (`16MiB`), rates (`20MiB/s`) and durations (`1h30m`)."""

from __future__ import annotations

import re

from cloud.logic.text import format_size, plural

__all__ = [
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "plural",
]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s|d)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """Bytes in `text`: `16MiB`, `5 MB`, `1024`. Raises ValueError with the reason."""
    match = _SIZE_RE.match(text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 16MiB, 5MB, 1048576)")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not value < 2**62:  # also catches inf from 300-digit numbers
        raise ValueError(f"{text!r} is too large")
    return int(value)


def parse_rate(text: str) -> int | None:
    """Bytes per second in `20MiB/s` (the `/s` is optional); empty or `0` means unlimited."""
    stripped = text.strip()
    if not stripped or stripped == "0":
        return None
    if stripped.endswith("/s"):
        stripped = stripped[:-2]
    try:
        rate = parse_size(stripped)
    except ValueError:
        raise ValueError(f"{text!r} is not a rate (examples: 20MiB/s, 500KB/s)") from None
    return rate or None


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration: `6h`, `90s`, `1h30m`. Plain numbers are seconds."""
    stripped = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
        return float(stripped)
    pos = 0
    total = 0.0
    for match in _DURATION_RE.finditer(stripped):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(stripped) or not stripped:
        raise ValueError(f"{text!r} is not a duration (examples: 6h, 45m, 1h30m, 90s)")
    return total


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `12.3s`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"

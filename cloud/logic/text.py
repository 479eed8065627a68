"""Numbers for people, shared by messages, reports and the CLI."""

from __future__ import annotations


def format_size(size: float) -> str:
    """Binary units: `1.5 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 file`, `2 files`: user-facing counts read as English, not as a template."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def truncate_utf8(text: str, limit: int, marker: str = "\n[truncated]") -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    room = limit - len(marker.encode("utf-8"))
    return data[:room].decode("utf-8", "ignore") + marker

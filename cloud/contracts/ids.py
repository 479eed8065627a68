"""Run ids: UUIDv7 — unique, and sortable by time, so "oldest first" is a string sort."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

# What new_run_id makes (lower-case UUID text). Run ids become object keys and file names,
# so anything else given as a run id (`verify --run ../../etc`) is refused, not used.
RUN_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_run_id() -> str:
    """A UUIDv7 (RFC 9562) string; monotonic within this process."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
        else:
            _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
        _last_ms = ms
        counter = _counter & 0xFFF
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand
    return str(uuid.UUID(int=value))


def is_run_id(text: str) -> bool:
    """Whether `text` has the form of a run id (a UUID, as `new_run_id` writes it)."""
    return RUN_ID_RE.fullmatch(text) is not None

"""Splitting one verification into chunks that parallel invocations prove (the fan-out).

Pure: a chunk is a contiguous, half-open range of keys relative to the repository's prefix;
together the chunks cover the whole key space (the first starts at "", the last runs to
the end), so every manifest entry and every listed object belongs to exactly one chunk.
Chunks are balanced by the bytes they are expected to *read* (a new object whole, or the
`VerifyNewBytesBudget`'s share of it when the new bytes exceed the budget; an older one
with the odds of the rotation slice) plus a per-object cost for its request, not by
object count or stored bytes. Design: docs/verification.md ("Fan-out").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PER_OBJECT_BYTES = 64 * 1024
"""What one object costs besides its bytes (a GET's latency, its line of the listing),
expressed in bytes read: at ~50 MB/s per invocation a 64 KiB read is ~1 ms, the order of
a warm GET's overhead with 8 reads in flight."""


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys `key_from <= key < key_to` (`key_to` None: to the end of the key space)."""

    index: int
    key_from: str
    key_to: str | None

    def __contains__(self, key: object) -> bool:
        return (
            isinstance(key, str)
            and key >= self.key_from
            and (self.key_to is None or key < self.key_to)
        )


@dataclass(frozen=True)
class FanoutSettings:
    """When a verification is split, and how finely.

    A verification expected to read at least `min_read_bytes` (or to cover at least
    `min_objects` objects) is split into chunks of about `chunk_bytes` of expected reads
    each, at most `max_chunks` of them (DynamoDB keeps the boundaries in one item).
    """

    min_objects: int = 100_000
    min_read_bytes: int = 16 * 1024**3
    chunk_bytes: int = 8 * 1024**3
    max_chunks: int = 1000
    per_object_bytes: int = PER_OBJECT_BYTES


def new_share(new_bytes: int, budget: int | None) -> float:
    """The fraction of the new bytes a verification is expected to read: all of them, or
    the budget's share when they exceed it (the rest is checked at list level)."""
    if budget is None or new_bytes <= budget:
        return 1.0
    return budget / new_bytes


def read_weight(
    size: int, uploaded: bool, *, rotation_runs: int, per_object: int, new_share: float = 1.0
) -> int:
    """The bytes one object is expected to cost: a new object is read with the odds
    `new_share` (see `new_share`), an older one belongs to the rotation slice read this
    time with odds 1/`rotation_runs`."""
    expected = math.ceil(size * new_share) if uploaded else size // max(rotation_runs, 1)
    return expected + per_object


def should_fan_out(objects: int, read_bytes: int, settings: FanoutSettings) -> bool:
    """Above either threshold: one invocation may not finish in time."""
    return objects >= settings.min_objects or read_bytes >= settings.min_read_bytes


def chunk_count(
    total_weight: int, settings: FanoutSettings, *, budget: int | None = None, largest_new: int = 0
) -> int:
    """How many chunks `total_weight` is split into (at least 1).

    With a new-bytes `budget`, each chunk gets an even share of it, and a chunk reads a
    new object only if it fits what is left of its share: so the count is capped at
    budget ÷ `largest_new`, which keeps every share at least the largest new object
    (unless the budget itself is smaller: then no cap). A capped plan has chunks of more
    than `chunk_bytes` of expected reads.
    """
    wanted = math.ceil(total_weight / max(settings.chunk_bytes, 1))
    count = max(1, min(wanted, settings.max_chunks))
    if budget is not None and 0 < largest_new <= budget:
        count = min(count, budget // largest_new)
    return count


class UnsortedKeysError(ValueError):
    """The manifest's keys are not strictly increasing: contiguous ranges cannot be drawn."""


def boundaries(weighted: Iterable[tuple[str, int]], total_weight: int, count: int) -> list[str]:
    """The first key of every chunk after the first (at most `count - 1` of them).

    `weighted` is (key, weight) in strictly increasing key order; a chunk is closed once
    the running total reaches its share of `total_weight`, so chunks hold roughly equal
    weight (each at most its share plus one object) and none is empty.
    """
    cuts: list[str] = []
    done = 0
    previous: str | None = None
    for key, weight in weighted:
        if previous is not None and key <= previous:
            raise UnsortedKeysError(f"manifest key {key!r} does not follow {previous!r}")
        previous = key
        if len(cuts) < count - 1 and done > 0 and done * count >= total_weight * (len(cuts) + 1):
            cuts.append(key)
        done += weight
    return cuts


def ranges(cuts: Sequence[str]) -> list[KeyRange]:
    """The chunks the boundaries `cuts` (sorted) draw over the whole key space."""
    starts = ["", *cuts]
    ends: list[str | None] = [*cuts, None]
    pairs = zip(starts, ends, strict=True)
    return [KeyRange(i, start, end) for i, (start, end) in enumerate(pairs)]


def plan_chunks(weighted: Sequence[tuple[str, int]], settings: FanoutSettings) -> list[KeyRange]:
    """Chunks for a (sorted) list of weighted keys, in one call (tests, small manifests)."""
    total = sum(weight for _, weight in weighted)
    return ranges(boundaries(weighted, total, chunk_count(total, settings)))

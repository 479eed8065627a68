"""The fan-out's chunk planner: the chunks cover the key space exactly, without overlap,
none is empty, and they are balanced by expected reads."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.logic.chunks import (
    FanoutSettings,
    KeyRange,
    UnsortedKeysError,
    boundaries,
    chunk_count,
    new_share,
    plan_chunks,
    ranges,
    read_weight,
    should_fan_out,
)

keys_and_weights = st.dictionaries(
    st.text(min_size=1, max_size=12), st.integers(min_value=1, max_value=10_000), max_size=300
).map(lambda d: sorted(d.items()))


def owners(chunks: list[KeyRange], key: str) -> list[int]:
    return [c.index for c in chunks if key in c]


@settings(max_examples=300, deadline=None)
@given(
    weighted=keys_and_weights,
    chunk_bytes=st.integers(min_value=1, max_value=50_000),
    max_chunks=st.integers(min_value=1, max_value=64),
    probes=st.lists(st.text(max_size=12), max_size=20),
)
def test_chunks_cover_the_key_space_exactly_once(
    weighted: list[tuple[str, int]], chunk_bytes: int, max_chunks: int, probes: list[str]
) -> None:
    config = FanoutSettings(chunk_bytes=chunk_bytes, max_chunks=max_chunks)
    chunks = plan_chunks(weighted, config)
    total = sum(w for _, w in weighted)
    # Contiguous, from the start of the key space to its end, numbered in order.
    assert chunks[0].key_from == "" and chunks[-1].key_to is None
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for before, after in itertools.pairwise(chunks):
        assert before.key_to == after.key_from and before.key_from < after.key_from
    assert 1 <= len(chunks) <= chunk_count(total, config) <= max_chunks
    # Every manifest key, and any other key (an extra object in the bucket), has one chunk.
    for key in [k for k, _ in weighted] + probes:
        assert len(owners(chunks, key)) == 1, key
    # No chunk is empty, and none holds much more than its share.
    heaviest = max((w for _, w in weighted), default=0)
    if weighted:
        count = chunk_count(total, config)
        for chunk in chunks:
            held = [w for k, w in weighted if k in chunk]
            assert held, chunk
            assert sum(held) < total / count + heaviest + 1


def test_equal_objects_split_into_equal_chunks() -> None:
    weighted = [(f"data/{i:04d}", 100) for i in range(1000)]
    chunks = plan_chunks(weighted, FanoutSettings(chunk_bytes=10_000))
    assert len(chunks) == 10
    sizes = [sum(1 for k, _ in weighted if k in c) for c in chunks]
    assert sizes == [100] * 10


def test_max_chunks_caps_the_split() -> None:
    weighted = [(f"k{i:03d}", 1000) for i in range(100)]
    assert len(plan_chunks(weighted, FanoutSettings(chunk_bytes=1, max_chunks=7))) == 7


def test_an_empty_manifest_is_one_chunk_of_everything() -> None:
    assert plan_chunks([], FanoutSettings()) == [KeyRange(0, "", None)]


def test_unsorted_keys_are_refused() -> None:
    with pytest.raises(UnsortedKeysError, match="'a' does not follow 'b'"):
        boundaries([("b", 1), ("a", 1)], 2, 2)
    with pytest.raises(UnsortedKeysError):
        boundaries([("a", 1), ("a", 1)], 2, 2)


def test_ranges_rebuild_from_stored_boundaries() -> None:
    assert ranges(["m", "t"]) == [
        KeyRange(0, "", "m"),
        KeyRange(1, "m", "t"),
        KeyRange(2, "t", None),
    ]


def test_weight_counts_new_objects_whole_and_older_ones_by_the_rotation_odds() -> None:
    assert read_weight(3000, True, rotation_runs=30, per_object=10) == 3010
    assert read_weight(3000, False, rotation_runs=30, per_object=10) == 110


def test_new_objects_weigh_the_budgets_share_of_them() -> None:
    """With `VerifyNewBytesBudget` below the new bytes, a verification reads the budget's
    share of them: the plan weighs each new object by that share, not whole."""
    assert new_share(1000, 100) == pytest.approx(0.1)
    assert new_share(50, 100) == 1.0 and new_share(1000, None) == 1.0 and new_share(0, 0) == 1.0
    assert read_weight(3000, True, rotation_runs=30, per_object=10, new_share=0.1) == 310
    assert read_weight(3000, False, rotation_runs=30, per_object=10, new_share=0.1) == 110


def test_the_chunk_count_keeps_each_chunks_share_of_the_budget_above_its_largest_object() -> None:
    config = FanoutSettings(chunk_bytes=100, max_chunks=1000)
    assert chunk_count(100_000, config) == 1000
    # An even share of 10,000 over the chunks must hold a 1,000-byte object: 10 chunks.
    assert chunk_count(100_000, config, budget=10_000, largest_new=1000) == 10
    # Where the budget cannot hold the largest object, it does not cap the count.
    assert chunk_count(100_000, config, budget=500, largest_new=1000) == 1000
    assert chunk_count(100_000, config, budget=None, largest_new=1000) == 1000


def test_either_threshold_fans_out() -> None:
    config = FanoutSettings(min_objects=10, min_read_bytes=1000)
    assert not should_fan_out(9, 999, config)
    assert should_fan_out(10, 0, config)
    assert should_fan_out(0, 1000, config)

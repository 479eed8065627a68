"""The verification simulator (`bench/verify_sim.py`) at a tiny size: it drives the real
Lambda shells, so what must hold of a verification holds of its runs — every object of a
first mirror read once, one result published, several invocations when the mirror does
not fit one — and its accounting adds up. Time is simulated: nothing here sleeps."""

from __future__ import annotations

import pytest

from bench.verify_sim import (
    B2Model,
    GiB,
    MiB,
    SimBucket,
    SimResult,
    Timeline,
    build_mirror,
    parse_rows,
    simulate,
    table,
)
from cloud.contracts.events import MirrorVerified
from cloud.logic.chunks import FanoutSettings
from cloud.logic.verify import VerifyOptions

# An invocation of 60 s with a 20 s margin reads ~3.5 GB: a 10 GiB mirror needs several.
TIMEOUT_S, MARGIN_S = 60.0, 20.0
SMALL_CHUNKS = FanoutSettings(min_read_bytes=2 * GiB, chunk_bytes=1 * GiB)


def assert_first_verification_complete(result: SimResult) -> None:
    assert result.killed == 0 and result.dead_letters == 0
    assert len(result.object_reads) == result.objects  # every object of the mirror...
    assert set(result.object_reads.values()) == {1}  # ...read exactly once
    assert len(result.published) == 1
    event = result.published[0].event
    assert isinstance(event, MirrorVerified)
    assert event.stats.deep_checked == result.objects
    assert event.stats.bytes_read == 10 * GiB + 45  # the packs, config (25 bytes), snapshot (20)


def test_a_mirror_larger_than_one_invocation_is_verified_in_legs_each_object_read_once() -> None:
    result = simulate(10 * GiB, fan_out=False, timeout_s=TIMEOUT_S, safety_margin_s=MARGIN_S)

    assert result.invocations > 1
    assert result.chunk_invocations == 0
    assert_first_verification_complete(result)
    # Each leg fetched the manifest once more; every pack counted at its modelled size.
    assert result.gets == result.objects + result.invocations
    assert result.get_bytes > 10 * GiB
    # No leg ran past its (simulated) timeout, and the chain took several timeouts.
    assert result.wall_s > TIMEOUT_S


def test_the_new_bytes_budget_bounds_the_whole_chain_of_legs() -> None:
    """`VerifyNewBytesBudget` is per verification: a first mirror of 10× the budget, too
    big for one leg, reads about the budget across its legs and is verified once."""
    budget = 2 * GiB
    result = simulate(
        20 * GiB,
        fan_out=False,
        timeout_s=40.0,
        safety_margin_s=MARGIN_S,
        options=VerifyOptions(new_bytes_budget=budget, concurrency=8),
    )

    assert result.invocations > 1, "the budget takes more than one leg"
    assert result.killed == 0 and result.dead_letters == 0
    assert set(result.object_reads.values()) == {1}  # nothing read twice
    assert len(result.published) == 1
    event = result.published[0].event
    assert isinstance(event, MirrorVerified)
    # The verdict counts every leg's reads: the budget, less than one pack short of it.
    assert budget - 16 * MiB < event.stats.bytes_read <= budget
    assert event.stats.deep_checked == len(result.object_reads) < result.objects


def test_the_fan_out_proves_a_mirror_in_parallel_chunks_each_object_read_once() -> None:
    legs = simulate(10 * GiB, fan_out=False, settings=SMALL_CHUNKS)
    fanned = simulate(10 * GiB, fan_out=True, settings=SMALL_CHUNKS)

    assert fanned.chunk_invocations >= 8
    assert fanned.invocations == fanned.chunk_invocations + 1  # + the one that planned
    assert_first_verification_complete(fanned)
    assert_first_verification_complete(legs)
    assert legs.invocations == 1  # 10 GiB fits one 900 s invocation
    assert fanned.wall_s < legs.wall_s  # 4 chunks at a time


def test_an_invocation_that_cannot_finish_in_time_is_killed_and_retried_then_dead_lettered() -> (
    None
):
    """The chunk function has no time check: a chunk larger than one invocation's reads
    dies at the timeout like a real Lambda, SQS redelivers it, and after five receives it
    is in the DLQ; nothing is published."""
    big_chunks = FanoutSettings(min_read_bytes=2 * GiB, chunk_bytes=8 * GiB)
    result = simulate(
        20 * GiB, fan_out=True, settings=big_chunks, timeout_s=TIMEOUT_S, safety_margin_s=MARGIN_S
    )

    assert result.killed >= 5
    assert result.dead_letters >= 1
    assert result.published == []


def test_the_timeline_overlaps_reads_on_lanes_and_stops_at_the_deadline() -> None:
    model = B2Model()
    line = Timeline(0.0, lanes=2, timeout_s=10.0, model=model)
    one = model.get_seconds(16 * MiB, 2)
    line.on_lane(16 * MiB)
    line.on_lane(16 * MiB)
    assert line.end == pytest.approx(one)  # two reads at once
    line.on_lane(16 * MiB)
    assert line.end == pytest.approx(2 * one)
    assert line.remaining_s() == pytest.approx(10.0 - one)  # main waited for a free lane


def test_a_pack_is_counted_at_its_modelled_size_and_passes_the_hash_check() -> None:
    bucket = SimBucket(B2Model())
    event = build_mirror(bucket, 3 * 16 * MiB, 16 * MiB)
    key = next(k for k in bucket.bodies if "/data/" in k)
    (chunk,) = bucket.read(key)
    assert len(chunk) == 16 * MiB
    assert len(bytes(chunk)) == 8  # what is actually hashed
    assert event.stats.bytes == 3 * 16 * MiB + 45


def test_the_report_says_what_ran() -> None:
    rows = parse_rows("100GB,10TB:1GiB/legs", "legs,fan-out")
    assert [(r.size, r.pack, r.fan_out) for r in rows] == [
        (100 * 10**9, 16 * MiB, False),
        (100 * 10**9, 16 * MiB, True),
        (10 * 10**12, GiB, False),
    ]
    result = simulate(1 * GiB, fan_out=False)
    assert "| legs |" in table([result]) and "verified" in table([result])


def test_the_in_memory_idempotency_layer_keeps_the_first_record_until_it_expires() -> None:
    """The simulator's stand-in for powertools' DynamoDB layer follows its put rule."""
    import time

    from aws_lambda_powertools.utilities.idempotency.exceptions import (
        IdempotencyItemAlreadyExistsError,
        IdempotencyItemNotFoundError,
    )
    from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import DataRecord

    from testbed.doubles.idempotency import InMemoryPersistenceLayer

    layer = InMemoryPersistenceLayer()
    with pytest.raises(IdempotencyItemNotFoundError):
        layer._get_record("k")
    later = int(time.time()) + 3600
    layer._put_record(DataRecord("k", "COMPLETED", expiry_timestamp=later, response_data="1"))
    with pytest.raises(IdempotencyItemAlreadyExistsError) as refused:
        layer._put_record(DataRecord("k", "INPROGRESS", expiry_timestamp=later))
    assert refused.value.old_data_record is not None
    assert refused.value.old_data_record.response_data == "1"
    # An in-progress record whose invocation ran out of time may be replaced.
    layer._put_record(
        DataRecord("j", "INPROGRESS", expiry_timestamp=later, in_progress_expiry_timestamp=1)
    )
    layer._put_record(DataRecord("j", "COMPLETED", expiry_timestamp=later))
    assert layer._get_record("j").status == "COMPLETED"


def test_a_listing_costs_one_call_per_page_of_a_thousand_keys() -> None:
    bucket = SimBucket(B2Model())
    build_mirror(bucket, 1998 * 16 * MiB, 16 * MiB)  # + config and snapshot: 2,000 keys
    assert sum(1 for _ in bucket.list("restic/sim/")) == 2000
    assert bucket.list_requests == 2

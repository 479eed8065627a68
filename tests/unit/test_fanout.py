"""The fan-out use cases over in-memory ports: planning and queueing the chunks, proving
them in any order, each counted once, the result published once by whoever finishes."""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest

from cloud.app.fanout import FanoutJobMissingError, fan_out, verify_chunk
from cloud.contracts.destination import Destination
from cloud.contracts.events import MirrorCompleted, MirrorVerificationFailed, MirrorVerified
from cloud.contracts.fanout import ChunkWorkItem
from cloud.logic.chunks import FanoutSettings
from cloud.logic.fanout import ChunkResult, FanoutJob, combine
from cloud.logic.ports import ObjectStore, ObjectStoreError, ReportSink
from cloud.logic.verification import VerificationResult
from cloud.logic.verify import VerifyOptions, problems_report_key
from tests.support.doubles.fanout import InMemoryFanoutStore
from tests.support.doubles.object_store import InMemoryObjectStore
from tests.support.doubles.runstore import InMemoryRunStore
from tests.support.lambdas import write_mirror

DEST = Destination(provider="s3", endpoint_url=None, bucket="b", prefix="restic/home")
SMALL = FanoutSettings(min_objects=10, min_read_bytes=1 << 60, chunk_bytes=1, max_chunks=9)
OPTIONS = VerifyOptions(rotation_runs=1, concurrency=2)


class Side:
    """The cloud side in memory: bucket, run store, jobs, chunk queue, published events."""

    def __init__(self, objects: int = 40, seed: int = 7) -> None:
        self.store = InMemoryObjectStore(page_size=5)
        self.runs = InMemoryRunStore()
        self.jobs = InMemoryFanoutStore()
        self.queue: list[ChunkWorkItem] = []
        self.published: list[VerificationResult] = []
        self.event, self.keys = write_mirror(self.store.put, DEST, seed=seed, objects=objects)

    def send(self, items: Sequence[ChunkWorkItem]) -> None:
        self.queue.extend(items)

    def open(self, destination: Destination) -> tuple[ObjectStore, ReportSink | None]:
        assert destination == DEST
        return self.store, self.store

    def fan_out(
        self, settings: FanoutSettings = SMALL, event: MirrorCompleted | None = None
    ) -> Any:
        return fan_out(
            event or self.event,
            store=self.store,
            runs=self.runs,
            jobs=self.jobs,
            send=self.send,
            settings=settings,
            options=OPTIONS,
        )

    def chunk(self, item: ChunkWorkItem) -> Any:
        return verify_chunk(
            item,
            jobs=self.jobs,
            runs=self.runs,
            open_destination=self.open,
            publish=self.published.append,
            options=OPTIONS,
            host="test",
        )

    def object_reads(self) -> list[str]:
        return [k for k in self.store.reads if k.startswith(DEST.prefix + "/")]


def shuffled(items: list[ChunkWorkItem], seed: int = 3) -> Iterator[ChunkWorkItem]:
    order = list(items)
    random.Random(seed).shuffle(order)
    yield from order


def test_a_small_mirror_is_left_to_one_pass_without_a_request() -> None:
    side = Side(objects=5)
    assert side.fan_out(FanoutSettings()) is None
    assert side.store.reads == [] and side.queue == []


def test_a_manifest_that_plans_one_chunk_is_left_to_one_pass() -> None:
    side = Side()
    one = FanoutSettings(min_objects=10, min_read_bytes=1 << 60, chunk_bytes=1 << 40)
    assert side.fan_out(one) is None
    assert side.queue == [] and side.jobs.jobs == {}


def test_once_fanned_out_a_redelivery_stays_fanned_out_whatever_the_settings() -> None:
    side = Side()
    plan = side.fan_out()
    side.queue.clear()
    side.jobs.jobs[plan.job_id]["dispatched"] = False  # died before marking it
    again = side.fan_out(FanoutSettings())  # thresholds raised since
    assert again is not None and (again.job_id, again.sent) == (plan.job_id, plan.chunks)
    assert len(side.queue) == plan.chunks


def test_fan_out_queues_each_chunk_once_even_when_the_event_is_redelivered() -> None:
    side = Side()
    plan = side.fan_out()
    assert plan.chunks == 9 and plan.sent == 9
    assert [i.index for i in side.queue] == list(range(9))
    assert {i.chunks for i in side.queue} == {9}
    assert [r.kind for r in side.runs.runs(side.event.repo.key)] == ["mirror"]
    again = side.fan_out()
    assert (again.job_id, again.chunks, again.sent) == (plan.job_id, 9, 0)
    assert len(side.queue) == 9


def test_every_object_is_read_once_and_one_result_is_published() -> None:
    side = Side()
    side.fan_out()
    side.store.reads.clear()
    items = list(side.queue)
    outcomes = [side.chunk(item) for item in shuffled(items)]
    # A redelivered chunk (after it was counted, before and after the job finished).
    assert side.chunk(items[4]).verified is False
    assert [o.published for o in outcomes].count(True) == 1
    assert sorted(side.object_reads()) == sorted(side.keys)
    [result] = side.published
    assert isinstance(result, MirrorVerified)
    assert result.stats.compared == result.manifest.objects == len(side.keys)
    assert result.stats.deep_checked == len(side.keys)
    assert result.mirror_run_id == side.event.run_id
    [verification] = [r for r in side.runs.runs(side.event.repo.key) if r.kind == "verification"]
    assert verification.run_id == result.run_id


def test_a_damaged_object_fails_the_verification_by_name() -> None:
    side = Side()
    victim = side.keys[len(side.keys) // 2]
    data = bytearray(side.store.objects[victim])
    data[-1] ^= 0xFF
    side.store.put(victim, bytes(data), etag=side.store.etags[victim])
    side.fan_out()
    for item in shuffled(list(side.queue)):
        side.chunk(item)
    [result] = side.published
    assert isinstance(result, MirrorVerificationFailed)
    assert [(p.key, p.kind) for p in result.problems] == [(victim[len(DEST.prefix) + 1 :], "hash")]
    assert result.problems_total == 1
    # One chunk found it: its report is the report (no other part to join).
    assert result.report_key is not None
    assert re.search(r"\.report\.part-\d{4}\.jsonl\.gz$", result.report_key)
    [line] = gzip.decompress(side.store.objects[result.report_key]).splitlines()
    assert json.loads(line)["key"] == victim[len(DEST.prefix) + 1 :]


def test_the_chunks_reports_are_joined_into_one_beside_the_manifest() -> None:
    side = Side()
    victims = [side.keys[2], side.keys[-3]]  # far apart: two chunks
    for victim in victims:
        data = bytearray(side.store.objects[victim])
        data[0] ^= 0xFF
        side.store.put(victim, bytes(data), etag=side.store.etags[victim])
    side.fan_out()
    for item in side.queue:
        side.chunk(item)
    [result] = side.published
    assert result.problems_total == 2
    assert result.report_key == problems_report_key(side.event.manifest.key)
    lines = gzip.decompress(side.store.objects[result.report_key]).splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == sorted(
        v[len(DEST.prefix) + 1 :] for v in victims
    )


class FlakyStore(InMemoryObjectStore):
    """Fails reads of one object a number of times (a killed or cut-off chunk)."""

    def __init__(self, source: InMemoryObjectStore, victim: str, failures: int) -> None:
        super().__init__(page_size=source.page_size)
        self.objects, self.etags = source.objects, source.etags
        self.victim, self.failures = victim, failures

    def read(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        if key == self.victim and self.failures > 0:
            self.failures -= 1
            raise ObjectStoreError("connection reset")
        return super().read(key, chunk_size)


def test_a_chunk_that_fails_is_redone_alone_and_counted_once() -> None:
    side = Side()
    side.fan_out()
    victim = side.keys[20]
    side.store = FlakyStore(side.store, victim, failures=3)  # every attempt of one pass
    items = list(side.queue)
    failed: list[ChunkWorkItem] = []
    for item in items:
        try:
            side.chunk(item)
        except ObjectStoreError:
            failed.append(item)
    [redelivered] = failed
    stored = side.jobs.load_job(redelivered.job_id)
    assert stored is not None and len(stored["done"]) == len(items) - 1
    assert side.published == []
    side.store.reads.clear()
    side.chunk(redelivered)  # SQS delivers it again
    chunk = FanoutJob.from_dict(stored).chunks[redelivered.index]
    again = side.object_reads()
    assert victim in again
    assert all(key[len(DEST.prefix) + 1 :] in chunk for key in again)  # that chunk alone
    [result] = side.published
    assert isinstance(result, MirrorVerified)
    assert result.stats.compared == result.stats.deep_checked == len(side.keys)


def test_a_publish_that_fails_is_retried_by_the_redelivery_with_the_same_result() -> None:
    side = Side()
    side.fan_out()
    items = list(side.queue)
    for item in items[:-1]:
        side.chunk(item)
    calls: list[VerificationResult] = []

    def refuse(result: VerificationResult) -> None:
        calls.append(result)
        raise RuntimeError("bus down")

    with pytest.raises(RuntimeError):
        verify_chunk(
            items[-1],
            jobs=side.jobs,
            runs=side.runs,
            open_destination=side.open,
            publish=refuse,
            options=OPTIONS,
        )
    redelivered = side.chunk(items[-1])
    assert redelivered.verified is False and redelivered.published
    [result] = side.published
    assert result.run_id == calls[0].run_id  # the stored result, not a second verdict
    assert side.chunk(items[-1]).published is False


def test_a_work_item_for_an_unknown_job_fails() -> None:
    side = Side()
    with pytest.raises(FanoutJobMissingError):
        side.chunk(ChunkWorkItem(job_id="0" * 32, index=0, chunks=1))


def test_a_manifest_that_cannot_be_planned_from_is_left_to_one_pass() -> None:
    side = Side()
    side.store.put(side.event.manifest.key, gzip.compress(b"not a manifest"))
    assert side.fan_out() is None
    assert side.queue == []


def test_combine_counts_a_problem_every_chunk_saw_once_and_checks_the_count() -> None:
    side = Side(objects=12)
    side.fan_out()
    for item in side.queue:
        side.chunk(item)
    job_id = side.queue[0].job_id
    results = [ChunkResult.from_dict(r) for r in side.jobs.chunk_results(job_id)]
    assert results[0].header is not None
    header = results[0].header.model_copy(update={"objects": 99})
    shared = json.loads(
        '{"key": "m", "kind": "manifest", "detail": "manifest describes x/y, not b/restic/home"}'
    )
    doctored = [
        ChunkResult.from_dict(
            {**r.to_dict(), "problems": [shared], "problems_total": 1, "header": header}
        )
        for r in results
    ]
    combined = combine(doctored, len(results), "m").outcome
    assert [(p.key, p.kind) for p in combined.problems] == [("m", "manifest"), ("m", "manifest")]
    assert combined.problems_total == 2
    assert "promises 99 objects" in combined.problems[1].detail
    with pytest.raises(ValueError, match="are not chunks"):
        combine(results[1:], len(results), "m")


def test_the_job_keeps_the_event_it_verifies() -> None:
    side = Side()
    plan = side.fan_out()
    stored = side.jobs.load_job(plan.job_id)
    assert stored is not None
    assert MirrorCompleted.model_validate(stored["event"]) == side.event


def test_a_fanned_out_verification_binds_the_repository_and_a_forged_event_is_not_fanned_out() -> (
    None
):
    side = Side()
    side.fan_out()
    for item in list(side.queue):
        side.chunk(item)
    [result] = side.published
    assert isinstance(result, MirrorVerified)
    assert side.runs.load_binding(side.event.repo.key) is not None  # bound by the chunks' result

    # The same repository, another bucket: above the threshold, but refused before any
    # chunk is planned (the one pass it is left to refuses it, reading nothing).
    forged = side.event.model_copy(
        update={
            "run_id": "2026-12-07T00-00-00Z-forged0000",
            "destination": DEST.model_copy(update={"bucket": "attacker"}),
        }
    )
    side.queue.clear()
    reads = len(side.store.reads)
    plan = side.fan_out(event=forged)
    assert plan is None and side.queue == [] and len(side.store.reads) == reads


def test_a_budget_below_the_new_bytes_plans_chunks_by_what_will_be_read() -> None:
    """The plan weighs new objects by the budget's share: a mirror of 10× the budget in new
    bytes makes the chunks the budget needs, not the mirror's size; each chunk's even share
    of the budget holds its largest new object, so every chunk reads, and together they
    read no more than the budget."""
    side = Side(objects=60)
    sizes = {k: len(side.store.objects[k]) for k in side.keys}
    total = sum(sizes.values())
    budget = total // 10
    settings = FanoutSettings(
        min_objects=10, min_read_bytes=1 << 60, chunk_bytes=total // 40, max_chunks=1000,
        per_object_bytes=0,
    )  # fmt: skip
    options = replace(OPTIONS, new_bytes_budget=budget)
    plan = fan_out(
        side.event, store=side.store, runs=side.runs, jobs=side.jobs, send=side.send,
        settings=settings, options=options,
    )  # fmt: skip
    assert plan is not None
    # By the mirror's size: 40 chunks; by the budget's share: about 4 (at most 5).
    assert 2 <= plan.chunks <= 5, plan.chunks
    job = FanoutJob.from_dict(side.jobs.load_job(plan.job_id) or {})
    assert job.new_bytes_budget is not None and job.new_bytes_budget >= max(sizes.values())
    for item in side.queue:
        side.chunk(item)
    read = side.object_reads()
    assert len(read) == len(set(read))
    assert sum(sizes[k] for k in read) <= budget
    for chunk in job.chunks:  # every chunk read something
        assert any(k.removeprefix(DEST.prefix + "/") in chunk for k in read), chunk
    assert len(side.published) == 1 and isinstance(side.published[0], MirrorVerified)


def test_the_verify_command_never_takes_a_chunk_report_for_the_newest_manifest() -> None:
    """A fanned-out verification's chunk reports lie beside the manifest and end with
    `.jsonl.gz` too (`<run>.report.part-0000.jsonl.gz`, sorting after `<run>.jsonl.gz`):
    `verify` on another machine must still find the manifest, not read a report as one."""
    from cloud.app.fanout import chunk_report_key
    from local_agent.verification import find_manifest

    store = InMemoryObjectStore()
    older = "restic/home.relay/manifests/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.jsonl.gz"
    newest = "restic/home.relay/manifests/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c.jsonl.gz"
    for key in (older, newest, problems_report_key(newest), chunk_report_key(newest, 0)):
        store.put(key, b"x")
    assert find_manifest(store, "restic/home.relay/manifests", None) == newest

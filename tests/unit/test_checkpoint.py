"""Checkpointed verification (`cloud.logic.checkpoint` + `verify_checkpointed`) against an
in-memory bucket and run store: every new object is read exactly once across passes cut
short by a deadline, even when a newer manifest arrives before the older one is proven,
and a run with nothing new reads nothing."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from cloud.app.verify import (
    CheckpointedVerification,
    LegOutcome,
    ManifestVerification,
    verify_checkpointed,
    verify_leg,
    verify_manifest_resumable,
)
from cloud.contracts.destination import Destination
from cloud.contracts.events import ManifestRef, MirrorCompleted, RepoRef
from cloud.contracts.manifest import ManifestHeader
from cloud.logic.checkpoint import VerifyCheckpoint, checkpoint_name
from cloud.logic.verify import VerifyOptions, slice_of
from tests.support import events
from tests.support.doubles.continuations import RecordingContinuations
from tests.support.doubles.object_store import InMemoryObjectStore
from tests.support.doubles.runstore import InMemoryRunStore

DEST = Destination(provider="s3", endpoint_url=None, bucket="b", prefix="restic/home")
REPO = RepoRef(id="home", guid="g" * 8)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Mirror:
    def __init__(self) -> None:
        self.store = InMemoryObjectStore(page_size=5)
        self.rng = random.Random(3)
        self.sizes: dict[str, int] = {}
        self.runs = InMemoryRunStore()
        self.manifests = 0

    def add(self, n: int) -> list[str]:
        keys = []
        for _ in range(n):
            data = self.rng.randbytes(self.rng.randint(100, 2000))
            h = hashlib.sha256(data).hexdigest()
            key = f"data/{h[:2]}/{h}"
            self.store.put(f"{DEST.prefix}/{key}", data)
            self.sizes[key] = len(data)
            keys.append(key)
        return keys

    def manifest(self, new: set[str]) -> MirrorCompleted:
        self.manifests += 1
        run = f"run-{self.manifests}"
        key = f".backrest-relay/g/manifests/{run}.jsonl.gz"
        entries = [
            json.dumps({"key": k, "size": s, "sha256": k.rsplit("/", 1)[-1], "uploaded": k in new})
            for k, s in sorted(self.sizes.items())
        ]
        header = ManifestHeader(
            run_id=run,
            repo_guid=REPO.guid,
            repo_id=REPO.id,
            bucket=DEST.bucket,
            prefix=DEST.prefix,
            created_at=T0,
            objects=len(entries),
        )
        body = gzip.compress("\n".join([header.model_dump_json(), *entries]).encode(), mtime=0)
        self.store.put(key, body)
        return self.event(
            ManifestRef(
                key=key,
                sha256=hashlib.sha256(body).hexdigest(),
                objects=len(entries),
                created_by_run=run,
            )
        )

    def event(self, manifest: ManifestRef) -> MirrorCompleted:
        return events.completed(
            T0,
            repo=REPO,
            host="h",
            trigger="t",
            run_id=f"{manifest.created_by_run}-{self.rng.random()}",
            manifest=manifest,
            destination=DEST,
        )

    def verify(
        self,
        event: MirrorCompleted,
        *,
        reads_allowed: int | None = None,
        now: datetime = T0,
        budget: int = 0,
    ) -> CheckpointedVerification:
        before = len(self.store.reads)

        def stop() -> bool:
            return reads_allowed is not None and len(self.store.reads) - before >= reads_allowed

        return verify_checkpointed(
            event,
            store=self.store,
            runs=self.runs,
            reports=None,
            options=VerifyOptions(concurrency=1, should_stop=stop),
            every_seconds=86400,
            rotation_budget=budget,
            now=now,
        )

    def object_reads(self) -> list[str]:
        return [k.removeprefix(DEST.prefix + "/") for k in self.store.reads if "manifests" not in k]


def test_every_new_object_is_read_once_across_deadlines_and_newer_manifests() -> None:
    mirror = Mirror()
    first_new = set(mirror.add(30))
    a = mirror.manifest(first_new)
    cut = mirror.verify(a, reads_allowed=8)
    assert cut.result is None and cut.unproven_objects > 0
    # A newer manifest arrives before A is proven; it marks only its own objects new.
    second_new = set(mirror.add(10))
    b = mirror.manifest(second_new)
    cut_again = mirror.verify(b, reads_allowed=10)
    assert cut_again.result is None
    done = mirror.verify(b)
    assert done.result is not None and done.result.stats.unproven_objects == 0
    assert type(done.result).__name__ == "MirrorVerified"
    reads = mirror.object_reads()
    assert sorted(reads) == sorted(first_new | second_new), "each new object read exactly once"

    # Nothing new: the same manifest again reads nothing at all, not even the manifest.
    before = len(mirror.store.reads)
    lists = mirror.store.list_requests
    again = mirror.verify(mirror.event(b.manifest), now=T0 + timedelta(hours=1))
    assert again.result is not None and again.result.stats.reused
    assert len(mirror.store.reads) == before and mirror.store.list_requests == lists


def test_rotation_is_budgeted_and_walks_the_whole_mirror() -> None:
    mirror = Mirror()
    keys = mirror.add(40)
    a = mirror.manifest(set(keys))
    assert mirror.verify(a).result is not None
    budget = sum(mirror.sizes.values()) // 4
    seen: list[str] = []
    for day in range(1, 6):
        before = len(mirror.store.reads)
        checked = mirror.verify(
            mirror.event(a.manifest), budget=budget, now=T0 + timedelta(days=day)
        )
        assert checked.result is not None and checked.result.stats.deep_checked_new == 0
        slice_ = [k for k in mirror.store.reads[before:] if "manifests" not in k]
        assert sum(mirror.sizes[k.removeprefix(DEST.prefix + "/")] for k in slice_) <= budget
        seen += slice_
    assert {k.removeprefix(DEST.prefix + "/") for k in seen} == set(keys)
    # Within `every` of the last slice, nothing is read.
    before = len(mirror.store.reads)
    mirror.verify(mirror.event(a.manifest), budget=budget, now=T0 + timedelta(days=5, hours=2))
    assert len(mirror.store.reads) == before
    saved = VerifyCheckpoint.from_dict(mirror.runs.load_checkpoint(REPO.key, checkpoint_name(DEST)))
    assert saved is not None and saved.verified and not saved.pending


def test_a_problem_is_checked_and_announced_again_until_repaired() -> None:
    mirror = Mirror()
    keys = mirror.add(12)
    a = mirror.manifest(set(keys))
    victim = f"{DEST.prefix}/{keys[3]}"
    good = mirror.store.objects[victim]
    mirror.store.put(victim, good[:-1] + bytes([good[-1] ^ 1]), etag="x" * 32 + "-1")
    for hour in (1, 2):
        checked = mirror.verify(mirror.event(a.manifest), now=T0 + timedelta(hours=hour))
        assert checked.result is not None
        assert [p.kind for p in checked.result.problems] == ["hash"]
    mirror.store.put(victim, good)
    repaired = mirror.verify(mirror.event(a.manifest), now=T0 + timedelta(hours=3))
    assert repaired.result is not None and repaired.result.problems_total == 0
    assert not repaired.result.stats.reused and repaired.result.stats.deep_checked == 12


class _Killed(BaseException):
    """The process dies under a read (not an error anything may catch)."""


def test_a_pass_killed_mid_chunk_loses_at_most_that_chunk() -> None:
    mirror = Mirror()
    keys = mirror.add(40)
    a = mirror.manifest(set(keys))
    real_read = mirror.store.read
    budget = [13]

    def dying_read(key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        if "manifests" not in key:
            if budget[0] <= 0:
                raise _Killed(key)
            budget[0] -= 1
        return real_read(key, chunk_size)

    mirror.store.read = dying_read  # type: ignore[method-assign]
    options = VerifyOptions(concurrency=1, progress_every_objects=5)
    with pytest.raises(_Killed):
        verify_checkpointed(
            a, store=mirror.store, runs=mirror.runs, reports=None, options=options,
            every_seconds=86400, rotation_budget=0, now=T0,
        )  # fmt: skip
    saved = VerifyCheckpoint.from_dict(mirror.runs.load_checkpoint(REPO.key, checkpoint_name(DEST)))
    assert saved is not None and saved.pending, "progress saved while the pass ran"
    read_before = mirror.object_reads()
    assert len(read_before) == 13

    mirror.store.read = real_read  # type: ignore[method-assign]
    done = mirror.verify(a)
    assert done.result is not None and type(done.result).__name__ == "MirrorVerified"
    reads = mirror.object_reads()
    assert sorted(set(reads)) == sorted(keys)
    again = len(reads) - len(keys)
    assert 0 < again <= 5 + 2, "at most one chunk (and the reads in flight) read again"


def test_lambda_legs_hand_on_through_the_continuation_port() -> None:
    mirror = Mirror()
    keys = mirror.add(25)
    a = mirror.manifest(set(keys))
    queue = RecordingContinuations()

    def leg(n: int) -> LegOutcome:
        before = len(mirror.store.reads)

        def stop() -> bool:
            return len(mirror.store.reads) - before >= 8

        return verify_leg(
            a, n, store=mirror.store, runs=mirror.runs, reports=None, continuations=queue,
            options=VerifyOptions(concurrency=1, should_stop=stop), every_seconds=86400,
            rotation_budget=0, now=T0,
        )  # fmt: skip

    first = leg(0)
    assert first.result is None and first.continued == 1 and queue.sent == [(a, 1)]
    # A redelivered leg 0 runs nothing: it only queues the claimed leg again.
    reads = len(mirror.store.reads)
    assert leg(0).continued == 1 and len(mirror.store.reads) == reads
    n, outcome = 1, leg(1)
    while outcome.continued is not None:
        n += 1
        outcome = leg(outcome.continued)
    assert outcome.result is not None and type(outcome.result).__name__ == "MirrorVerified"
    assert sorted(mirror.object_reads()) == sorted(keys), "each object read once"
    # A stale leg after the end: the chain is finished, it ends without reading.
    late = leg(1)
    assert (late.result is None and late.continued is not None) or late.ended is not None


def test_the_verify_command_continues_where_its_time_limit_stopped_it() -> None:
    mirror = Mirror()
    old = mirror.add(30)
    mirror.manifest(set(old))
    new = set(mirror.add(20))
    b = mirror.manifest(new)
    runs = InMemoryRunStore()
    # The verify command reads the new objects and one rotation slice of the older ones
    # (the one of its first call: verifications recorded meanwhile do not move it).
    options = VerifyOptions(concurrency=1, rotation_runs=3, rotation_index=1)
    planned = new | {k for k in old if slice_of(k, 3) == 1}
    calls: list[ManifestVerification] = []
    for _ in range(20):
        before = len(mirror.store.reads)

        def stop(before: int = before) -> bool:
            return len(mirror.store.reads) - before >= 6

        checked = verify_manifest_resumable(
            b.manifest.key, expected_sha256=b.manifest.sha256, repo=REPO, destination=DEST,
            store=mirror.store, runs=runs, reports=mirror.store,
            options=replace(options, should_stop=stop, rotation_index=1 + len(calls)), deep="",
            started_at=T0,
        )  # fmt: skip
        calls.append(checked)
        if checked.result is not None:
            break
        assert checked.unread_objects > 0
    assert len(calls) > 3 and all(c.result is None for c in calls[:-1])
    assert calls[0].unread_objects + calls[0].objects_read == len(planned)
    result = calls[-1].result
    assert result is not None and type(result).__name__ == "MirrorVerified"
    reads = mirror.object_reads()
    assert sorted(reads) == sorted(planned), "each planned object read exactly once"
    assert result.stats.deep_checked == len(planned)  # counted over every call
    assert result.stats.deep_checked_new == len(new)  # so are the new objects among them
    # Done: the next verify starts afresh (and reads everything planned again).
    again = verify_manifest_resumable(
        b.manifest.key, expected_sha256=b.manifest.sha256, repo=REPO, destination=DEST,
        store=mirror.store, runs=runs, reports=mirror.store, options=options, deep="",
        started_at=T0,
    )  # fmt: skip
    assert again.result is not None and again.objects_read == len(planned)


def rotation_gaps(rotation_days: float | None, *, days: int = 45) -> tuple[list[float], Mirror]:
    """Daily verifications of an unchanging mirror with a tiny byte budget; returns, for
    every object, the longest time in days between two reads of it (the upload's read
    first) — or since its last read, at the end."""
    mirror = Mirror()
    keys = mirror.add(60)
    a = mirror.manifest(set(keys))
    last_read = {k: 0.0 for k in keys}
    gaps = dict.fromkeys(keys, 0.0)
    first = verify_checkpointed(
        a, store=mirror.store, runs=mirror.runs, reports=None,
        options=VerifyOptions(concurrency=1), every_seconds=86400, rotation_budget=1,
        now=T0, rotation_days=rotation_days,
    )  # fmt: skip
    assert first.result is not None
    for day in range(1, days + 1):
        before = len(mirror.store.reads)
        checked = verify_checkpointed(
            mirror.event(a.manifest), store=mirror.store, runs=mirror.runs, reports=None,
            options=VerifyOptions(concurrency=1), every_seconds=86400, rotation_budget=1,
            now=T0 + timedelta(days=day), rotation_days=rotation_days,
        )  # fmt: skip
        assert checked.result is not None
        for key in mirror.store.reads[before:]:
            if "manifests" not in key:
                k = key.removeprefix(DEST.prefix + "/")
                gaps[k] = max(gaps[k], day - last_read[k])
                last_read[k] = day
    return [max(gaps[k], days - last_read[k]) for k in keys], mirror


def test_rotation_days_re_reads_every_object_within_that_many_days() -> None:
    gaps, mirror = rotation_gaps(10)
    assert max(gaps) <= 10, sorted(gaps)[-5:]
    # It is a guarantee, not a full re-read every day: about 10/(10 - 2) of the mirror
    # per 10 days (plus one object per slice for rounding).
    reads = [k for k in mirror.store.reads if "manifests" not in k]
    assert len(reads) < 60 + 60 * 45 / 8 + 2 * 45
    # Without it the byte budget alone (1 byte: one object a day) takes 60 days.
    gaps_without, _ = rotation_gaps(None)
    assert max(gaps_without) > 10


def test_a_leg_under_way_stops_when_another_chain_takes_the_checkpoint_over() -> None:
    mirror = Mirror()
    keys = mirror.add(40)
    a = mirror.manifest(set(keys))
    name = checkpoint_name(DEST)
    real_read = mirror.store.read
    reads = [0]

    def read(key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        if "manifests" not in key:
            reads[0] += 1
            if reads[0] == 7:  # meanwhile, a newer event's leg 0 claims the checkpoint
                taken = VerifyCheckpoint(manifest_key="newer", chain="run-b", leg=0)
                mirror.runs.save_checkpoint(REPO.key, name, taken.to_dict())
        return real_read(key, chunk_size)

    mirror.store.read = read  # type: ignore[method-assign]
    checked = verify_checkpointed(
        a, store=mirror.store, runs=mirror.runs, reports=None,
        options=VerifyOptions(concurrency=1, progress_every_objects=5), every_seconds=86400,
        rotation_budget=0, now=T0, chain=("run-a", 0),
    )  # fmt: skip
    assert checked.superseded and checked.result is None
    assert reads[0] <= 10 + 2, "stopped at the next progress save"
    saved = VerifyCheckpoint.from_dict(mirror.runs.load_checkpoint(REPO.key, name))
    assert saved is not None and (saved.chain, saved.manifest_key) == ("run-b", "newer")


def test_the_new_bytes_budget_bounds_a_chain_of_legs_not_each_leg() -> None:
    """`VerifyNewBytesBudget` is per verification: a chain of legs over a mirror whose new
    bytes are 10× the budget reads about the budget, completes and publishes once (the
    rest is checked at list level and left to the rotation, docs "Sizing")."""
    mirror = Mirror()
    keys = mirror.add(200)
    a = mirror.manifest(set(keys))
    total = sum(mirror.sizes.values())
    budget = total // 10
    queue = RecordingContinuations()

    def leg(n: int) -> LegOutcome:
        before = len(mirror.store.reads)

        def stop() -> bool:
            return len(mirror.store.reads) - before >= 6

        return verify_leg(
            a, n, store=mirror.store, runs=mirror.runs, reports=None, continuations=queue,
            options=VerifyOptions(concurrency=1, should_stop=stop, new_bytes_budget=budget),
            every_seconds=86400, rotation_budget=0, now=T0,
        )  # fmt: skip

    outcome, legs, published = leg(0), 1, []
    while outcome.continued is not None:
        assert legs < 100, "the chain must end"
        legs += 1
        outcome = leg(outcome.continued)
    published = [outcome.result] if outcome.result is not None else []
    assert len(published) == 1 and type(published[0]).__name__ == "MirrorVerified"
    assert legs >= 2, "the budget took more than one leg"
    read = mirror.object_reads()
    assert len(read) == len(set(read)), "each object read at most once"
    read_bytes = sum(mirror.sizes[k] for k in read)
    assert read_bytes <= budget, (read_bytes, budget, total)
    assert read_bytes >= budget - 2000, "the budget is used (less than one object left)"
    # The verdict counts every leg's reads.
    assert published[0].stats.bytes_read == read_bytes
    checkpoint = VerifyCheckpoint.from_dict(
        mirror.runs.load_checkpoint(REPO.key, checkpoint_name(DEST))
    )
    assert checkpoint is not None and checkpoint.verified


def test_a_list_only_verify_between_time_limited_calls_keeps_their_progress() -> None:
    """`verify --list-only` reads nothing back: it neither continues nor ends the cursor a
    `--time-limit` call saved (else the next `verify` starts from zero, and the list-only
    verdict claims the earlier calls' reads as its own)."""
    mirror = Mirror()
    old = mirror.add(10)
    mirror.manifest(set(old))
    new = set(mirror.add(10))
    b = mirror.manifest(new)
    runs = InMemoryRunStore()
    options = VerifyOptions(concurrency=1, rotation_runs=3, rotation_index=1)

    def call(call_options: VerifyOptions) -> ManifestVerification:
        return verify_manifest_resumable(
            b.manifest.key, expected_sha256=b.manifest.sha256, repo=REPO, destination=DEST,
            store=mirror.store, runs=runs, reports=mirror.store,
            options=call_options, deep="", started_at=T0,
        )  # fmt: skip

    before = len(mirror.store.reads)
    first = call(replace(options, should_stop=lambda: len(mirror.store.reads) - before >= 4))
    assert first.result is None and first.objects_read > 0
    listed = call(replace(options, read_back=False))
    assert listed.result is not None and type(listed.result).__name__ == "MirrorVerified"
    assert listed.result.stats.deep_checked == 0, "a list-only call reads nothing back"
    last = call(options)
    assert last.result is not None and last.calls == 2, "continued from the cursor"
    reads = mirror.object_reads()
    assert len(reads) == len(set(reads)), "no object read twice"


def test_a_list_only_call_stopped_early_saves_no_progress() -> None:
    """`verify --list-only` stopped early (a SIGTERM) read nothing back: it must not leave a
    cursor saying the keys before its stop were read, or the next `verify` would skip them
    and call the mirror verified."""
    mirror = Mirror()
    b = mirror.manifest(set(mirror.add(10)))
    runs = InMemoryRunStore()
    options = VerifyOptions(concurrency=1)

    def call(call_options: VerifyOptions) -> ManifestVerification:
        return verify_manifest_resumable(
            b.manifest.key, expected_sha256=b.manifest.sha256, repo=REPO, destination=DEST,
            store=mirror.store, runs=runs, reports=mirror.store,
            options=call_options, deep="", started_at=T0,
        )  # fmt: skip

    seen: list[int] = []

    def stop_after_some() -> bool:
        seen.append(1)
        return len(seen) > 5

    call(replace(options, read_back=False, should_stop=stop_after_some))
    full = call(options)
    assert full.result is not None and full.calls == 1
    assert sorted(mirror.object_reads()) == sorted(k for k in mirror.sizes), "all read"

"""`VerifyOptions.key_from/key_to`: a chunk of a fanned-out verification lists, compares
and reads only its key range, and the chunks together do exactly what one pass does."""

from __future__ import annotations

from collections.abc import Iterator

from cloud.logic.chunks import FanoutSettings, plan_chunks
from cloud.logic.ports import ListedObject
from cloud.logic.verify import MirrorVerifier, VerificationOutcome, VerifyOptions
from tests.support.doubles.object_store import InMemoryObjectStore
from tests.unit.test_verify_logic import DEST, MANIFEST, build


def run_chunks(
    store: object, sha: str, entries: list[dict[str, object]], chunks: int
) -> list[VerificationOutcome]:
    weighted = [(str(e["key"]), int(str(e["size"])) + 1) for e in entries]
    total = sum(w for _, w in weighted)
    plan = plan_chunks(weighted, FanoutSettings(chunk_bytes=total // chunks + 1))
    assert len(plan) == chunks
    return [
        MirrorVerifier(
            store,  # type: ignore[arg-type]
            DEST,
            VerifyOptions(rotation_runs=1, key_from=c.key_from, key_to=c.key_to),
        ).verify(MANIFEST, sha)
        for c in plan
    ]


def test_chunks_together_read_every_object_once() -> None:
    store, entries, sha = build(n_old=30, n_new=10)
    store.reads.clear()
    outcomes = run_chunks(store, sha, entries, 4)
    reads = [k for k in store.reads if k != MANIFEST]
    assert sorted(reads) == sorted(f"{DEST.prefix}/{e['key']}" for e in entries)
    assert store.reads.count(MANIFEST) == 4  # each chunk reads the manifest itself
    assert sum(o.stats.compared for o in outcomes) == len(entries)
    assert sum(o.stats.deep_checked for o in outcomes) == len(entries)
    assert all(o.verified for o in outcomes)


def test_a_damaged_object_and_an_extra_one_are_reported_by_their_chunk_only() -> None:
    store, entries, sha = build(n_old=30, n_new=10)
    victim = f"{DEST.prefix}/{entries[17]['key']}"
    data = bytearray(store.objects[victim])
    data[0] ^= 1
    store.put(victim, bytes(data), etag=store.etags[victim])  # same ETag: only a read sees it
    store.put(f"{DEST.prefix}/data/zz/stray", b"x")
    outcomes = run_chunks(store, sha, entries, 5)
    problems = [(p.key, p.kind) for o in outcomes for p in o.problems]
    assert problems == [(entries[17]["key"], "hash")]
    warnings = [w for o in outcomes for w in o.warnings]
    assert warnings == ["data/zz/stray: in the bucket but not in the manifest (1 bytes)"]


def test_a_chunk_does_not_check_the_whole_manifest_count() -> None:
    store, entries, sha = build(n_old=8, n_new=2)
    [first, _] = run_chunks(store, sha, entries, 2)
    assert first.stats.compared < len(entries)
    assert first.problems_total == 0


def test_the_listing_stops_at_the_end_of_the_range() -> None:
    store, entries, sha = build(n_old=60, n_new=0)  # 7 objects per page
    before = store.list_requests
    MirrorVerifier(
        store, DEST, VerifyOptions(rotation_runs=1000, key_to=str(entries[5]["key"]))
    ).verify(MANIFEST, sha)
    assert store.list_requests - before == 1


def test_an_unordered_listing_is_not_cut_short() -> None:
    class Reversed(InMemoryObjectStore):
        def list(self, prefix: str) -> Iterator[ListedObject]:
            return iter(reversed(list(super().list(prefix))))

    store, entries, sha = build(n_old=30, n_new=10)
    backwards = Reversed(page_size=1000)
    backwards.objects, backwards.etags = store.objects, store.etags
    outcomes = run_chunks(backwards, sha, entries, 4)
    assert all(o.verified for o in outcomes), [o.problems for o in outcomes]
    assert sum(o.stats.compared for o in outcomes) == len(entries)

"""The verifier's logic against an in-memory bucket: every kind of damage is caught,
nothing good is flagged, and it reads only what it should."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from cloud.contracts.destination import Destination
from cloud.contracts.manifest import ManifestHeader
from cloud.logic.ports import ListedObject, ObjectStoreError
from cloud.logic.verify import MirrorVerifier, VerifyOptions, slice_of
from tests.support.doubles.object_store import InMemoryObjectStore

DEST = Destination(provider="s3", endpoint_url=None, bucket="b", prefix="restic/home")
MANIFEST = ".backrest-relay/g/manifests/run-1.jsonl.gz"


def named(data: bytes, folder: str) -> str:
    h = hashlib.sha256(data).hexdigest()
    return f"data/{h[:2]}/{h}" if folder == "data" else f"{folder}/{h}"


def build(
    n_old: int = 20, n_new: int = 5, seed: int = 1
) -> tuple[InMemoryObjectStore, list[dict[str, object]], str]:
    """A mirror in memory: objects under the prefix and a manifest; returns its sha256."""
    rng = random.Random(seed)
    store = InMemoryObjectStore(page_size=7)
    entries: list[dict[str, object]] = []
    config = rng.randbytes(155)
    files = [("config", config, False)]
    for i in range(n_old + n_new):
        data = rng.randbytes(rng.randint(1, 3000))
        files.append((named(data, "data"), data, i >= n_old))
    files.append((named(b"index", "index"), b"index", True))
    files.append((named(b"snap", "snapshots"), b"snap", True))
    for key, data, uploaded in sorted(files):
        store.put(f"{DEST.prefix}/{key}", data)
        entries.append(
            {
                "key": key,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
                "uploaded": uploaded,
            }
        )
    return store, entries, write_manifest(store, entries)


def write_manifest(store: InMemoryObjectStore, entries: list[dict[str, object]]) -> str:
    header = ManifestHeader(
        run_id="run-1",
        repo_guid="g",
        repo_id="home",
        bucket=DEST.bucket,
        prefix=DEST.prefix,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        objects=len(entries),
    )
    lines = [header.model_dump_json()] + [json.dumps(e) for e in entries]
    body = gzip.compress("\n".join(lines).encode() + b"\n", mtime=0)
    store.put(MANIFEST, body)
    return hashlib.sha256(body).hexdigest()


def verify(store: InMemoryObjectStore, sha: str | None, **options: object):  # type: ignore[no-untyped-def]
    return MirrorVerifier(store, DEST, VerifyOptions(**options)).verify(MANIFEST, sha)  # type: ignore[arg-type]


def test_intact_mirror_is_verified_and_new_objects_are_read_back() -> None:
    store, entries, sha = build()
    outcome = verify(store, sha, rotation_runs=1000, rotation_index=999)
    assert outcome.verified, outcome.problems
    assert outcome.stats.compared == outcome.stats.listed == len(entries)
    new = {f"{DEST.prefix}/{e['key']}" for e in entries if e["uploaded"]}
    read_back = set(store.reads) - {MANIFEST}
    assert new <= read_back
    assert outcome.stats.deep_checked_new == len(new)
    assert outcome.stats.list_requests == math.ceil(len(entries) / 7)
    assert outcome.report is None


@pytest.mark.parametrize("damage", ["missing", "size", "etag", "hash"])
def test_each_kind_of_damage_is_a_named_problem(damage: str) -> None:
    store, entries, sha = build()
    victim = next(e for e in entries if e["uploaded"] and str(e["key"]).startswith("data/"))
    key = f"{DEST.prefix}/{victim['key']}"
    original = store.objects[key]
    if damage == "missing":
        store.delete(key)
    elif damage == "size":
        store.put(key, original + b"x")
    elif damage == "etag":
        store.put(key, original, etag="0" * 32)
    else:  # same size, same recorded ETag, different bytes: only the deep check sees it
        flipped = bytes([original[0] ^ 0xFF]) + original[1:]
        store.put(key, flipped, etag=store.etags[key])
    outcome = verify(store, sha)
    assert not outcome.verified
    assert [(p.key, p.kind) for p in outcome.problems] == [(victim["key"], damage)]
    assert outcome.report is not None
    report = [json.loads(line) for line in gzip.decompress(outcome.report).splitlines()]
    assert report[0]["key"] == victim["key"]


@pytest.mark.parametrize("damage", ["none", "missing", "size", "etag"])
def test_list_only_reads_nothing_back_and_still_sees_list_level_damage(damage: str) -> None:
    """`verify --list-only`: rclone check's level — names, sizes and ETags, no GET but the
    manifest's, even with empty objects and `extra_percent` asking for more."""
    store, entries, sha = build()
    store.put(f"{DEST.prefix}/keys/{hashlib.sha256(b'').hexdigest()}", b"")
    entries.append(
        {
            "key": f"keys/{hashlib.sha256(b'').hexdigest()}",
            "size": 0,
            "sha256": hashlib.sha256(b"").hexdigest(),
            "md5": hashlib.md5(b"", usedforsecurity=False).hexdigest(),
            "uploaded": True,
        }
    )
    entries.sort(key=lambda e: str(e["key"]))
    sha = write_manifest(store, entries)
    victim = next(e for e in entries if e["uploaded"] and str(e["key"]).startswith("data/"))
    key = f"{DEST.prefix}/{victim['key']}"
    if damage == "missing":
        store.delete(key)
    elif damage == "size":
        store.put(key, store.objects[key] + b"x")
    elif damage == "etag":
        store.put(key, store.objects[key], etag="0" * 32)
    outcome = verify(store, sha, read_back=False, extra_percent=100.0)
    assert store.reads == [MANIFEST]
    assert outcome.stats.deep_checked == 0
    assert outcome.stats.compared == len(entries)
    if damage == "none":
        assert outcome.verified, outcome.problems
    else:
        assert [(p.key, p.kind) for p in outcome.problems] == [(victim["key"], damage)]


def test_manifest_hash_mismatch_and_missing_manifest_fail() -> None:
    store, _, sha = build()
    bad = verify(store, "0" * 64)
    assert [p.kind for p in bad.problems] == ["manifest"]
    store.delete(MANIFEST)
    gone = verify(store, sha)
    assert not gone.verified and gone.problems[0].kind == "manifest"


def test_extra_objects_warn_and_locks_are_ignored() -> None:
    store, _, sha = build()
    store.put(f"{DEST.prefix}/data/zz/stray", b"x")
    store.put(f"{DEST.prefix}/locks/{'a' * 64}", b"lock")
    outcome = verify(store, sha)
    assert outcome.verified
    assert outcome.stats.extra_objects == 1
    assert outcome.warnings and "data/zz/stray" in outcome.warnings[0]


def test_rotation_rereads_every_old_object_within_n_runs() -> None:
    store, entries, sha = build(n_old=60, n_new=0)
    old = {f"{DEST.prefix}/{e['key']}" for e in entries if not e["uploaded"]}
    seen: set[str] = set()
    for index in range(5):
        store.reads.clear()
        outcome = verify(store, sha, rotation_runs=5, rotation_index=index)
        assert outcome.verified
        picked = {k for k in store.reads if k in old}
        assert picked == {k for k in old if slice_of(k.removeprefix(DEST.prefix + "/"), 5) == index}
        seen |= picked
    assert seen == old


def test_new_bytes_budget_limits_the_deep_check() -> None:
    store, _, sha = build(n_old=0, n_new=10)
    outcome = verify(store, sha, new_bytes_budget=0, rotation_runs=1000, rotation_index=999)
    assert outcome.verified
    assert outcome.stats.deep_checked == 0


def test_unordered_listing_falls_back_to_a_keyed_comparison() -> None:
    class Shuffled(InMemoryObjectStore):
        def list(self, prefix: str) -> Iterator[ListedObject]:
            items = list(super().list(prefix))
            return iter(reversed(items))

    store, entries, _ = build()
    shuffled = Shuffled(page_size=1000)
    shuffled.objects, shuffled.etags = store.objects, store.etags
    outcome = verify(shuffled, None)
    assert outcome.verified, outcome.problems
    assert outcome.stats.compared == len(entries)


def test_access_denied_while_reading_back_is_not_a_verdict() -> None:
    class Denied(InMemoryObjectStore):
        def read(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
            if key == MANIFEST:
                return super().read(key, chunk_size)
            raise ObjectStoreError("reading: AccessDenied (HTTP 403)")

    store, _, sha = build()
    denied = Denied()
    denied.objects, denied.etags = store.objects, store.etags
    with pytest.raises(ObjectStoreError):
        verify(denied, sha)


def test_memory_stays_flat_with_many_objects() -> None:
    """100,000 manifest entries merge against the listing without holding either."""
    import tracemalloc

    store = InMemoryObjectStore(page_size=1000)
    entries = []
    for i in range(100_000):
        key = f"data/{i:064x}"[:70]
        entries.append({"key": key, "size": 1, "sha256": None, "md5": None, "uploaded": False})
        store.objects[f"{DEST.prefix}/{key}"] = b"x"
        store.etags[f"{DEST.prefix}/{key}"] = "e"
    entries.sort(key=lambda e: str(e["key"]))
    sha = write_manifest(store, entries)
    tracemalloc.start()
    outcome = verify(store, sha, rotation_runs=10**9, rotation_index=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert outcome.verified, outcome.problems[:3]
    # The in-memory store's own sorted key list is ~10 MB; the verifier adds little on top.
    assert peak < 40 * 1024 * 1024, peak

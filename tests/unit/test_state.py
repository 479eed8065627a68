"""The state store: what the agent knows is at the destination, kept in one SQLite file."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.contracts.destination import Destination
from local_agent.config import RelayConfig
from local_agent.errors import ConfigError, ExitCode
from local_agent.mirror.state import (
    SCHEMA_VERSION,
    PendingUpload,
    RemoteObject,
    StateStore,
    state_file_name,
)

SECRET = "SENTINEL-SECRET-7f3a"


def obj(n: int, size: int | None = None) -> RemoteObject:
    h = hashlib.sha256(str(n).encode()).hexdigest()
    return RemoteObject(
        key=f"data/{h[:2]}/{h}",
        size=n if size is None else size,
        sha256=h,
        md5=hashlib.md5(str(n).encode(), usedforsecurity=False).hexdigest(),
        etag=f'"etag-{n}"',
    )


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "bkt-0123.sqlite"


@pytest.fixture
def store(store_path: Path) -> Iterator[StateStore]:
    s = StateStore(store_path)
    yield s
    s.close()


# -- objects -----------------------------------------------------------------------------------


def test_put_get_roundtrip(store: StateStore) -> None:
    o = obj(1)
    assert store.get(o.key) is None
    store.put(o)
    assert store.get(o.key) == o
    assert store.count() == 1


def test_put_replaces_same_key(store: StateStore) -> None:
    o = obj(1)
    store.put(o)
    newer = RemoteObject(o.key, 99, None, None, '"other"')
    store.put(newer)
    assert store.get(o.key) == newer
    assert store.count() == 1


def test_nullable_digests(store: StateStore) -> None:
    # Objects adopted from a listing without reading have no sha256/md5.
    adopted = RemoteObject("index/" + "a" * 64, 10, None, None, None)
    store.put(adopted)
    assert store.get(adopted.key) == adopted


def test_known_sizes(store: StateStore) -> None:
    objs = [obj(n) for n in range(1, 20)]
    for o in objs:
        store.put(o)
    assert store.known_sizes() == {o.key: o.size for o in objs}


def test_forget_and_forget_all(store: StateStore) -> None:
    objs = [obj(n) for n in range(10)]
    store.put_many(objs)
    store.forget(objs[3].key)
    store.forget("no/such/key")  # forgetting the unknown is harmless
    assert store.get(objs[3].key) is None
    assert store.count() == 9
    assert objs[3].key not in store.known_sizes()
    store.forget_all()
    assert store.count() == 0
    assert store.known_sizes() == {}
    assert list(store.iter_objects()) == []


def test_put_many(store: StateStore) -> None:
    objs = [obj(n) for n in range(50)]
    store.put_many(objs)
    assert store.count() == 50
    assert store.get(objs[7].key) == objs[7]
    store.put_many([])
    assert store.count() == 50


def test_iter_objects_in_key_order(store: StateStore) -> None:
    keys = ["snapshots/b", "config", "data/ff/ff1", "data/00/001", "index/a", "keys/k"]
    for i, key in enumerate(keys):
        store.put(RemoteObject(key, i, None, None, None))
    assert [o.key for o in store.iter_objects()] == sorted(keys)


@pytest.mark.parametrize("n", [999, 1000, 1001, 2500])
def test_iter_objects_over_batches(store: StateStore, n: int) -> None:
    objs = [obj(i) for i in range(n)]
    store.put_many(objs)
    seen = list(store.iter_objects())
    assert len(seen) == n
    assert [o.key for o in seen] == sorted(o.key for o in objs)
    assert len({o.key for o in seen}) == n
    by_key = {o.key: o for o in objs}
    assert all(by_key[o.key] == o for o in seen)


def test_iter_objects_is_lazy_and_survives_writes_between_batches(store: StateStore) -> None:
    # Batches are separate queries: the store stays usable while iterating.
    objs = [obj(i) for i in range(2100)]
    store.put_many(objs)
    it = store.iter_objects()
    first = next(it)
    store.forget(first.key)  # a write while the iterator is alive must not deadlock
    rest = list(it)
    assert len(rest) == 2099


# -- meta ----------------------------------------------------------------------------------------


def test_meta_and_reconciled(store_path: Path) -> None:
    store = StateStore(store_path)
    assert store.get_meta("nothing") is None
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    store.set_meta("k", "v1")
    store.set_meta("k", "v2")
    assert store.get_meta("k") == "v2"
    assert store.reconciled is False
    store.mark_reconciled()
    assert store.reconciled is True
    store.close()
    reopened = StateStore(store_path)
    try:
        assert reopened.reconciled is True
        assert reopened.get_meta("k") == "v2"
    finally:
        reopened.close()


# -- multipart bookkeeping ---------------------------------------------------------------------


def pending(key: str = "data/ab/ab" + "0" * 62, upload_id: str = "up-1") -> PendingUpload:
    return PendingUpload(
        key=key, upload_id=upload_id, size=40 << 20, sha256="ab" * 32, part_size=16 << 20
    )


def test_begin_and_record_parts(store: StateStore) -> None:
    p = pending()
    assert store.pending_upload(p.key) is None
    store.begin_upload(p)
    assert store.pending_upload(p.key) == p
    assert store.pending_uploads() == [p]
    store.record_part(p.key, p.upload_id, 1, '"e1"', 16 << 20)
    store.record_part(p.key, p.upload_id, 2, '"e2"', 16 << 20)
    store.record_part(p.key, p.upload_id, 3, '"e3"', 8 << 20)
    assert store.recorded_parts(p.key, p.upload_id) == {
        1: ('"e1"', 16 << 20),
        2: ('"e2"', 16 << 20),
        3: ('"e3"', 8 << 20),
    }
    # Recording a part again (a retried part) replaces it.
    store.record_part(p.key, p.upload_id, 2, '"e2-retry"', 16 << 20)
    assert store.recorded_parts(p.key, p.upload_id)[2] == ('"e2-retry"', 16 << 20)
    # Parts of another upload id are not mixed in.
    assert store.recorded_parts(p.key, "up-other") == {}
    # A multipart upload in flight is not an object at the destination.
    assert store.get(p.key) is None
    assert store.count() == 0


def test_begin_upload_again_drops_old_parts(store: StateStore) -> None:
    first = pending(upload_id="up-1")
    store.begin_upload(first)
    store.record_part(first.key, "up-1", 1, '"e1"', 1)
    second = pending(upload_id="up-2")
    store.begin_upload(second)
    assert store.pending_upload(first.key) == second
    assert store.recorded_parts(first.key, "up-1") == {}
    assert store.recorded_parts(first.key, "up-2") == {}


def test_several_pending_uploads(store: StateStore) -> None:
    a = pending(key="data/aa/aa" + "1" * 62, upload_id="A")
    b = pending(key="data/bb/bb" + "2" * 62, upload_id="B")
    store.begin_upload(a)
    store.begin_upload(b)
    assert sorted(store.pending_uploads(), key=lambda p: p.key) == [a, b]
    store.record_part(a.key, "A", 1, '"a1"', 5)
    store.record_part(b.key, "B", 1, '"b1"', 6)
    store.end_upload(a.key)
    assert store.pending_uploads() == [b]
    assert store.recorded_parts(b.key, "B") == {1: ('"b1"', 6)}


def test_end_upload_without_completed_records_nothing(store: StateStore) -> None:
    p = pending()
    store.begin_upload(p)
    store.record_part(p.key, p.upload_id, 1, '"e1"', 1)
    store.end_upload(p.key)
    assert store.pending_upload(p.key) is None
    assert store.pending_uploads() == []
    assert store.recorded_parts(p.key, p.upload_id) == {}
    assert store.get(p.key) is None


def test_end_upload_with_completed_records_object(store_path: Path) -> None:
    store = StateStore(store_path)
    p = pending()
    store.begin_upload(p)
    store.record_part(p.key, p.upload_id, 1, '"e1"', 1)
    done = RemoteObject(p.key, p.size, p.sha256, None, '"multi-3"')
    store.end_upload(p.key, completed=done)
    assert store.get(p.key) == done
    assert store.pending_upload(p.key) is None
    assert store.recorded_parts(p.key, p.upload_id) == {}
    store.close()
    # And it is durable.
    reopened = StateStore(store_path)
    try:
        assert reopened.get(p.key) == done
        assert reopened.pending_uploads() == []
    finally:
        reopened.close()


def test_end_upload_of_unknown_key_is_harmless(store: StateStore) -> None:
    store.end_upload("data/00/none")
    assert store.count() == 0


def test_pending_upload_survives_reopen(store_path: Path) -> None:
    store = StateStore(store_path)
    p = pending()
    store.begin_upload(p)
    store.record_part(p.key, p.upload_id, 1, '"e1"', 16 << 20)
    store.close()
    reopened = StateStore(store_path)
    try:
        assert reopened.pending_upload(p.key) == p
        assert reopened.recorded_parts(p.key, p.upload_id) == {1: ('"e1"', 16 << 20)}
    finally:
        reopened.close()


def test_failed_batch_write_does_not_poison_later_writes(store_path: Path) -> None:
    store = StateStore(store_path)
    bad = RemoteObject("data/00/bad", None, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.Error):
        store.put_many([obj(1), bad])
    good = obj(2)
    store.put(good)
    store.close()
    reopened = StateStore(store_path)
    try:
        assert reopened.get(good.key) == good
        assert reopened.get(obj(1).key) is None  # the failed batch left nothing behind
    finally:
        reopened.close()


def test_failed_end_upload_leaves_store_usable(store: StateStore) -> None:
    p = pending()
    store.begin_upload(p)
    broken = RemoteObject(p.key, None, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.Error):
        store.end_upload(p.key, completed=broken)
    # Atomic: the pending upload is still recorded, and the store still accepts writes.
    assert store.pending_upload(p.key) == p
    store.put_many([obj(5)])
    assert store.get(obj(5).key) == obj(5)


# -- persistence, WAL, corruption ----------------------------------------------------------------


def test_persists_across_reopen_in_wal_mode(store_path: Path) -> None:
    store = StateStore(store_path)
    objs = [obj(n) for n in range(30)]
    for o in objs[:10]:
        store.put(o)
    store.put_many(objs[10:])
    assert store_path.exists()
    assert Path(f"{store_path}-wal").exists()
    # Every write is committed at once: another connection sees it while the store is open.
    other = sqlite3.connect(store_path)
    try:
        assert other.execute("SELECT COUNT(*) FROM objects").fetchone()[0] == 30
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()
    store.close()
    reopened = StateStore(store_path)
    try:
        assert reopened.count() == 30
        assert reopened.known_sizes() == {o.key: o.size for o in objs}
    finally:
        reopened.close()


def test_creates_missing_state_dir(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "state.sqlite"
    store = StateStore(path)
    store.put(obj(1))
    store.close()
    assert path.is_file()


def test_in_memory_store_writes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = StateStore(None)
    store.put(obj(1))
    store.begin_upload(pending())
    assert store.count() == 1
    assert store.reconciled is False
    store.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"garbage" * 1000,
        b"\x00" * 100 + b"not sqlite" * 500,
        b"SQLite format 3\x00" + b"\xff" * 4000,
    ],
)
def test_corrupt_state_file_is_a_config_error(store_path: Path, garbage: bytes) -> None:
    store_path.parent.mkdir(parents=True)
    store_path.write_bytes(garbage)
    with pytest.raises(ConfigError) as info:
        StateStore(store_path)
    err = info.value
    assert err.exit_code == ExitCode.USAGE
    assert str(store_path) in err.message
    assert "move it away" in err.message


def test_uncreatable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(ConfigError) as info:
        StateStore(blocker / "sub" / "state.sqlite")
    assert str(blocker / "sub") in info.value.message


# -- file names ----------------------------------------------------------------------------------


def dest(**changes: str | None) -> Destination:
    base: dict[str, str | None] = {
        "provider": "s3",
        "endpoint_url": "http://127.0.0.1:9000",
        "bucket": "offsite",
        "prefix": "restic/nas",
    }
    base.update(changes)
    return Destination.model_validate(base)


def test_state_file_name_is_stable() -> None:
    name = state_file_name(dest(), "/srv/restic")
    assert name == state_file_name(dest(), "/srv/restic")
    # Pinned: changing the scheme orphans every user's state (a full re-listing follows).
    assert name == "offsite-7f7dbe86f71795b9.sqlite"
    assert name.startswith("offsite-") and name.endswith(".sqlite")
    assert "/" not in name


@pytest.mark.parametrize(
    "other",
    [
        (dest(endpoint_url="http://127.0.0.1:9001"), "/srv/restic"),
        (dest(endpoint_url=None), "/srv/restic"),
        (dest(bucket="offsite2"), "/srv/restic"),
        (dest(prefix="restic/other"), "/srv/restic"),
        (dest(prefix=""), "/srv/restic"),
        (dest(), "/srv/restic2"),
        (dest(), "4f1f3c0e9a7b2d5c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f9012345678abc"),
    ],
)
def test_state_file_name_differs_per_destination_and_repo(
    other: tuple[Destination, str],
) -> None:
    assert state_file_name(*other) != state_file_name(dest(), "/srv/restic")


def test_state_file_name_contains_no_secret(tmp_path: Path) -> None:
    cfg = RelayConfig.model_validate(
        {
            "destination": {
                "provider": "s3",
                "endpoint_url": "http://127.0.0.1:9",
                "bucket": "bkt",
                "access_key_id": "AKIDEXAMPLE",
                "secret_access_key": SECRET,
            },
            "notify": {"urls": [f"ntfy://{SECRET}@host/topic"]},
        }
    )
    d = cfg.destination_for(repo_id="nas", repo_guid=None)
    name = state_file_name(d, str(tmp_path / "repo"))
    assert SECRET not in name
    assert "AKIDEXAMPLE" not in name


# -- threads -------------------------------------------------------------------------------------


def test_concurrent_puts_lose_nothing(store_path: Path) -> None:
    store = StateStore(store_path)
    per_thread = 150
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                store.put(obj(t * 10_000 + i))
                if i % 25 == 0:
                    store.known_sizes()
                    store.get(obj(t * 10_000).key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert errors == []
    assert store.count() == 8 * per_thread
    store.close()
    reopened = StateStore(store_path)
    try:
        assert reopened.count() == 8 * per_thread
        expected = {obj(t * 10_000 + i).key for t in range(8) for i in range(per_thread)}
        assert set(reopened.known_sizes()) == expected
    finally:
        reopened.close()


# -- deferred deletion marks ------------------------------------------------------------------


def test_gone_marks_keep_the_first_time_and_clear(store: StateStore) -> None:
    store.mark_gone(["snapshots/a", "data/00/b"], 100.0)
    store.mark_gone(["snapshots/a", "index/c"], 200.0)  # an older mark is never moved
    assert store.gone_marks() == {"snapshots/a": 100.0, "data/00/b": 100.0, "index/c": 200.0}
    store.clear_gone(["data/00/b"])
    assert set(store.gone_marks()) == {"snapshots/a", "index/c"}
    assert store.has_gone_marks()
    store.clear_all_gone()
    assert not store.has_gone_marks()


def test_state_file_from_before_deferred_deletion_gains_the_table(store_path: Path) -> None:
    """State files written before `gone` existed open as they are and keep their objects."""
    store_path.parent.mkdir(parents=True)
    db = sqlite3.connect(store_path)
    db.executescript(
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES('schema_version', '1');"
        "CREATE TABLE objects (key TEXT PRIMARY KEY, size INTEGER NOT NULL, sha256 TEXT, "
        "md5 TEXT, etag TEXT, uploaded_at REAL NOT NULL, run_id TEXT);"
        "INSERT INTO objects VALUES('config', 155, NULL, NULL, NULL, 1.0, NULL);"
    )
    db.commit()
    db.close()
    store = StateStore(store_path)
    try:
        assert store.known_sizes() == {"config": 155}
        assert store.gone_marks() == {}
        store.mark_gone(["snapshots/a"], 5.0)
        assert store.gone_marks() == {"snapshots/a": 5.0}
    finally:
        store.close()


# -- objects not yet named by a manifest (schema 2) --------------------------------------------

_SCHEMA_1 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE objects (
    key TEXT PRIMARY KEY, size INTEGER NOT NULL, sha256 TEXT, md5 TEXT, etag TEXT,
    uploaded_at REAL NOT NULL, run_id TEXT
);
CREATE TABLE multipart_uploads (
    key TEXT PRIMARY KEY, upload_id TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, part_size INTEGER NOT NULL, started_at REAL NOT NULL
);
CREATE TABLE multipart_parts (
    key TEXT NOT NULL, upload_id TEXT NOT NULL, part_number INTEGER NOT NULL,
    etag TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (key, upload_id, part_number)
);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def new_keys(store: StateStore) -> set[str]:
    return {o.key for o, new in store.iter_manifest_objects() if new}


def test_uploaded_objects_stay_new_until_a_manifest_is_written(store: StateStore) -> None:
    adopted, first, second = obj(1), obj(2), obj(3)
    store.put(adopted)
    store.put(RemoteObject(**{**_fields(first), "run_id": "run-1"}))  # stopped at deadline
    store.put_many([RemoteObject(**{**_fields(second), "run_id": "run-2"})])
    assert new_keys(store) == {first.key, second.key}
    assert store.has_unmanifested()
    store.forget_all()  # a reconcile rebuilds the store from a listing ...
    store.put_many([adopted, first, second])
    assert new_keys(store) == {first.key, second.key}  # ... and keeps what is unverified
    store.manifest_written()
    assert new_keys(store) == set()
    assert not store.has_unmanifested()
    store.forget(first.key)
    store.put(RemoteObject(**{**_fields(first), "run_id": "run-3"}))
    assert new_keys(store) == {first.key}


def _fields(o: RemoteObject) -> dict[str, object]:
    return {name: getattr(o, name) for name in RemoteObject.__slots__}


@pytest.mark.parametrize("with_manifest", [True, False])
def test_schema_1_store_is_migrated_with_the_uploads_no_manifest_named(
    store_path: Path, with_manifest: bool
) -> None:
    store_path.parent.mkdir(parents=True)
    rows = [
        (obj(1).key, 1, None, None, None, 100.0, None),  # adopted
        (obj(2).key, 2, None, None, None, 200.0, "run-a"),  # named by run-a's manifest
        (obj(3).key, 3, None, None, None, 210.0, "run-a"),
        (obj(4).key, 4, None, None, None, 300.0, "run-b"),  # run-b stopped at its deadline
    ]
    with sqlite3.connect(store_path) as db:
        db.executescript(_SCHEMA_1)
        db.executemany("INSERT INTO objects VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        if with_manifest:
            ref = {"key": "m", "sha256": "0" * 64, "objects": 3, "created_by_run": "run-a"}
            db.execute("INSERT INTO meta VALUES ('last_manifest', ?)", (json.dumps(ref),))
    store = StateStore(store_path)
    try:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
        expected = {obj(4).key} if with_manifest else {obj(2).key, obj(3).key, obj(4).key}
        assert new_keys(store) == expected
    finally:
        store.close()
    again = StateStore(store_path)  # opening again migrates nothing twice
    try:
        assert new_keys(again) == expected
    finally:
        again.close()

"""The run-store contract, held against the fake, SQLite (local mode) and DynamoDB (moto).

One suite for all three is the point: logic is unit-tested against the fake, so the fake must
behave exactly like the stores that run in production.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cloud.contracts.ids import new_run_id
from cloud.integrations.runstore_dynamodb import (
    LATEST_VERIFIED_SK,
    META_SK,
    RUN_TTL,
    DynamoRunStore,
    create_table,
)
from cloud.integrations.runstore_sqlite import SCHEMA_VERSION, RunStoreError, SqliteRunStore
from cloud.logic.ports import RunKind, RunRecord, RunStatus, RunStore
from testbed.agent import run_agent, write_agent_config
from testbed.s3.endpoint import S3Endpoint
from tests.support.doubles.runstore import InMemoryRunStore

REPO = "a" * 64
OTHER = "b" * 64
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
TABLE = "backrest-relay-runs"


@pytest.fixture
def dynamo(dynamo_client: Any) -> Iterator[Any]:
    """The module's moto client with a fresh run table for this test."""
    create_table(dynamo_client, TABLE)
    yield dynamo_client
    dynamo_client.delete_table(TableName=TABLE)


@pytest.fixture(params=["memory", "sqlite", "dynamodb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunStore]:
    if request.param == "memory":
        yield InMemoryRunStore()
    elif request.param == "sqlite":
        with SqliteRunStore(tmp_path / "runs.sqlite") as sqlite_store:
            yield sqlite_store
    else:
        client = request.getfixturevalue("dynamo")
        yield DynamoRunStore(TABLE, client=client)


def make_run(
    kind: RunKind = "verification",
    status: RunStatus = "verified",
    *,
    repo_key: str = REPO,
    run_id: str | None = None,
    at: datetime = T0,
    repo_id: str | None = "nas",
    detail: dict[str, Any] | None = None,
) -> RunRecord:
    return RunRecord(
        repo_key=repo_key,
        run_id=run_id or new_run_id(),
        kind=kind,
        status=status,
        started_at=at,
        finished_at=at + timedelta(minutes=3),
        repo_id=repo_id,
        host="backup-host",
        mirror_run_id=new_run_id() if kind == "verification" else None,
        detail={"verdict": status} if detail is None else detail,
    )


# -- contract ---------------------------------------------------------------------------------


def test_record_then_get(store: RunStore) -> None:
    run = make_run()
    store.record(run)
    assert store.get(REPO, run.run_id) == run
    assert store.get(REPO, new_run_id()) is None
    assert store.get(OTHER, run.run_id) is None


def test_runs_newest_first_with_limit(store: RunStore) -> None:
    ids = [new_run_id() for _ in range(6)]
    for i in (3, 0, 5, 1, 4, 2):  # arrival order differs from creation order
        store.record(make_run("mirror", "completed", run_id=ids[i]))
    store.record(make_run("mirror", "completed", repo_key=OTHER))

    assert [r.run_id for r in store.runs(REPO)] == ids[::-1]
    assert [r.run_id for r in store.runs(REPO, limit=2)] == [ids[5], ids[4]]
    assert store.runs(REPO, limit=0) == []
    assert len(store.runs(OTHER)) == 1
    assert store.runs("unknown") == []


def test_duplicate_record_is_a_noop(store: RunStore) -> None:
    run = make_run()
    store.record(run)
    store.record(run)
    # A redelivered event carrying different content does not rewrite history either.
    store.record(make_run("verification", "verification-failed", run_id=run.run_id))

    assert store.verification_count(REPO) == 1
    assert store.runs(REPO) == [run]
    assert store.latest_verified(REPO) == run


def test_latest_verified_ignores_runs_that_prove_nothing(store: RunStore) -> None:
    assert store.latest_verified(REPO) is None
    verified = make_run()
    store.record(verified)
    for kind, status in [
        ("verification", "verification-failed"),
        ("stale", "stale"),
        ("failure", "failed"),
        ("mirror", "completed"),
        ("mirror", "verified"),  # only a verification run can prove the copy
    ]:
        store.record(make_run(kind, status))  # type: ignore[arg-type]

    assert store.latest_verified(REPO) == verified
    assert store.runs(REPO, limit=1)[0].kind == "mirror"


def test_latest_verified_moves_forward_only(store: RunStore) -> None:
    older, newer, newest = (new_run_id() for _ in range(3))
    store.record(make_run(run_id=newer, at=T0 + timedelta(hours=1)))
    store.record(make_run(run_id=older, at=T0))  # delivered late
    latest = store.latest_verified(REPO)
    assert latest is not None and latest.run_id == newer

    store.record(make_run(run_id=newest, at=T0 + timedelta(hours=2)))
    latest = store.latest_verified(REPO)
    assert latest is not None and latest.run_id == newest
    assert store.verification_count(REPO) == 3


def test_verification_count_counts_verifications_only(store: RunStore) -> None:
    assert store.verification_count(REPO) == 0
    store.record(make_run("verification", "verified"))
    store.record(make_run("verification", "verification-failed"))
    store.record(make_run("mirror", "completed"))
    store.record(make_run("stale", "stale"))
    store.record(make_run("verification", "verified", repo_key=OTHER))

    assert store.verification_count(REPO) == 2
    assert store.verification_count(OTHER) == 1
    assert store.verification_count("unknown") == 0


def test_repos_lists_every_repository(store: RunStore) -> None:
    assert list(store.repos()) == []
    late_id = new_run_id()  # created first, delivered last
    verified = make_run(repo_id="old-name")
    store.record(verified)
    store.record(make_run("mirror", "completed", repo_id="nas"))
    store.record(make_run("verification", "verification-failed", repo_id=None))
    store.record(make_run("failure", "failed", repo_key=OTHER, repo_id=None))
    store.record(make_run("mirror", "completed", repo_id="late", run_id=late_id))

    statuses = list(store.repos())
    assert [s.repo_key for s in statuses] == [REPO, OTHER]
    mine, other = statuses
    latest_run = store.runs(REPO, limit=1)[0]
    assert latest_run.status == "verification-failed"
    assert mine.latest_run == latest_run
    assert mine.latest_verified == verified
    assert mine.verifications == 2
    assert mine.repo_id == "nas"  # the newest run naming it wins; a late, older one does not
    assert mine.stale_alerted_at is None
    assert other.repo_id is None
    assert other.latest_run is not None and other.latest_run.kind == "failure"
    assert other.latest_verified is None
    assert other.verifications == 0


def test_mark_stale_alerted_set_and_clear(store: RunStore) -> None:
    store.record(make_run("mirror", "completed"))
    at = datetime(2025, 3, 2, 9, 30, tzinfo=timezone(timedelta(hours=-5)))
    store.mark_stale_alerted(REPO, at)
    (status,) = store.repos()
    assert status.stale_alerted_at == at
    assert status.stale_alerted_at is not None and status.stale_alerted_at.utcoffset() == (
        timedelta(0)
    )
    assert status.latest_run is not None  # marking does not disturb the runs

    store.mark_stale_alerted(REPO, None)
    (status,) = store.repos()
    assert status.stale_alerted_at is None
    assert status.verifications == 0


def test_mark_stale_alerted_on_a_repository_without_runs(store: RunStore) -> None:
    store.mark_stale_alerted(OTHER, T0)
    (status,) = store.repos()
    assert status.repo_key == OTHER
    assert status.stale_alerted_at == T0
    assert status.latest_run is None and status.latest_verified is None
    assert status.verifications == 0
    store.record(make_run(repo_key=OTHER))
    (status,) = store.repos()
    assert status.stale_alerted_at == T0
    assert status.verifications == 1


def test_detail_round_trips(store: RunStore) -> None:
    detail: dict[str, Any] = {
        "schema_version": 1,
        "repo": {"id": "nas-ö", "guid": REPO, "path": "/srv/restic/日本"},
        "stats": {"objects": 12, "bytes": 2**40, "ratio": 0.25, "ok": True, "none": None},
        "problems": [{"key": "data/ab/ab12", "kind": "missing"}, {"emoji": "🗄️"}],
        "empty": {},
    }
    run = make_run(detail=detail)
    store.record(run)
    detail["stats"]["objects"] = 0  # the store keeps its own copy
    got = store.get(REPO, run.run_id)
    assert got is not None
    assert got.detail["stats"]["objects"] == 12
    assert got.detail["repo"]["path"] == "/srv/restic/日本"
    assert got.detail["problems"][1] == {"emoji": "🗄️"}
    assert got.detail["empty"] == {}
    got.detail["empty"]["x"] = 1  # nor does a caller mutating a result change it
    again = store.latest_verified(REPO)
    assert again is not None and again.detail["empty"] == {}


def test_checkpoint_round_trips_per_repository_and_destination(store: RunStore) -> None:
    assert store.load_checkpoint("repo-a", "bucket/p") is None
    data = {"version": 1, "pending": [{"key": "m/1", "sha256": "0" * 64, "unproven_from": "d"}]}
    store.save_checkpoint("repo-a", "bucket/p", data)
    store.save_checkpoint("repo-a", "other/p", {"version": 1, "verified": True})
    assert store.load_checkpoint("repo-a", "bucket/p") == data
    assert store.load_checkpoint("repo-b", "bucket/p") is None
    store.save_checkpoint("repo-a", "bucket/p", {"version": 1, "verified": True})
    assert store.load_checkpoint("repo-a", "bucket/p") == {"version": 1, "verified": True}
    assert [r.repo_key for r in store.repos()] == []  # checkpoints are not repositories


def test_binding_first_writer_wins_until_unbound(store: RunStore) -> None:
    """`bind` never replaces a binding (two first verifications racing: one binds, the other
    gets the binding in force); only `unbind` (the operator) removes it."""
    first = {"version": 1, "bucket": "b", "prefix": "p", "bound_by": "v1"}
    second = {"version": 1, "bucket": "other", "prefix": "q", "bound_by": "v2"}
    assert store.load_binding("repo-a") is None
    assert store.bind("repo-a", first) == first
    assert store.bind("repo-a", second) == first
    assert store.load_binding("repo-a") == first
    assert store.load_binding("repo-b") is None
    assert [r.repo_key for r in store.repos()] == []  # a binding is not a repository
    assert store.unbind("repo-a") is True
    assert store.unbind("repo-a") is False
    assert store.load_binding("repo-a") is None
    assert store.bind("repo-a", second) == second


def test_unknown_kind_or_status_is_refused(store: RunStore) -> None:
    with pytest.raises(ValueError, match="kind"):
        store.record(make_run("bogus"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status"):
        store.record(make_run("mirror", "bogus"))  # type: ignore[arg-type]
    assert store.runs(REPO) == []


def test_non_json_detail_is_refused(store: RunStore) -> None:
    with pytest.raises((TypeError, ValueError)):
        store.record(make_run(detail={"when": T0}))
    with pytest.raises(ValueError):
        store.record(make_run(detail={"x": float("nan")}))
    assert store.runs(REPO) == []


def test_datetimes_round_trip_timezone_aware(store: RunStore) -> None:
    cest = timezone(timedelta(hours=2))
    started = datetime(2025, 7, 1, 23, 59, 59, 999999, tzinfo=cest)
    run = RunRecord(
        repo_key=REPO,
        run_id=new_run_id(),
        kind="verification",
        status="verified",
        started_at=started,
        finished_at=started + timedelta(seconds=1),
    )
    store.record(run)
    got = store.get(REPO, run.run_id)
    assert got is not None
    assert got.started_at == started and got.finished_at == started + timedelta(seconds=1)
    assert got.started_at.utcoffset() == timedelta(0)
    assert got.started_at.isoformat() == "2025-07-01T21:59:59.999999+00:00"
    assert got.repo_id is None and got.host is None and got.mirror_run_id is None
    assert got.detail == {}


def test_naive_datetimes_are_refused(store: RunStore) -> None:
    naive = datetime(2025, 1, 1, 12, 0)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.record(make_run(at=naive))
    with pytest.raises(ValueError, match="timezone-aware"):
        store.mark_stale_alerted(REPO, naive)
    assert list(store.repos()) == []


# -- concurrency (the stores that promise thread safety in one process) ----------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_concurrent_records_from_eight_threads(kind: str, tmp_path: Path) -> None:
    store: InMemoryRunStore | SqliteRunStore = (
        InMemoryRunStore() if kind == "memory" else SqliteRunStore(tmp_path / "runs.sqlite")
    )
    per_thread = 25
    shared = make_run()  # every thread also delivers the same run: it must count once
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                store.record(make_run() if i % 2 else make_run("mirror", "completed"))
                store.record(shared)
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    runs = store.runs(REPO, limit=1000)
    assert len(runs) == 8 * per_thread + 1
    assert [r.run_id for r in runs] == sorted((r.run_id for r in runs), reverse=True)
    verifications = 8 * (per_thread // 2) + 1
    assert store.verification_count(REPO) == verifications
    latest = store.latest_verified(REPO)
    assert latest is not None
    assert latest.run_id == max(r.run_id for r in runs if r.kind == "verification")
    if isinstance(store, SqliteRunStore):
        store.close()


# -- SQLite -----------------------------------------------------------------------------------


def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "runs.sqlite"  # the directory is created on demand
    verified = make_run()
    with SqliteRunStore(path) as first:
        first.record(verified)
        first.record(make_run("mirror", "completed"))
        first.mark_stale_alerted(REPO, T0)

    with SqliteRunStore(path) as second:
        assert second.latest_verified(REPO) == verified
        assert second.verification_count(REPO) == 1
        assert len(second.runs(REPO)) == 2
        (status,) = second.repos()
        assert status.stale_alerted_at == T0
        second.record(verified)  # still idempotent after a reopen
        assert second.verification_count(REPO) == 1


def test_sqlite_survives_an_unclosed_connection(tmp_path: Path) -> None:
    """Each record is committed before it returns: a killed process loses nothing."""
    path = tmp_path / "runs.sqlite"
    run = make_run()
    SqliteRunStore(path).record(run)  # never closed, as after SIGKILL
    with SqliteRunStore(path) as reopened:
        assert reopened.get(REPO, run.run_id) == run
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = raw.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        assert version == (str(SCHEMA_VERSION),)
        stored = raw.execute("SELECT detail, started_at FROM runs").fetchone()
        assert json.loads(stored[0]) == run.detail
        assert stored[1] == "2025-03-01T12:00:00.123456+00:00"
    finally:
        raw.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    SqliteRunStore(path).close()
    raw = sqlite3.connect(path)
    with raw:
        raw.execute(
            "UPDATE meta SET value = ? WHERE name = 'schema_version'", (SCHEMA_VERSION + 1,)
        )
    raw.close()
    with pytest.raises(RunStoreError, match="newer"):
        SqliteRunStore(path)


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    path.write_bytes(b"not a database, " * 512)
    with pytest.raises(RunStoreError, match="move it away"):
        SqliteRunStore(path)


# -- DynamoDB ---------------------------------------------------------------------------------


def _item(client: Any, sk: str, repo_key: str = REPO) -> dict[str, Any]:
    got = client.get_item(TableName=TABLE, Key={"pk": {"S": f"REPO#{repo_key}"}, "sk": {"S": sk}})
    return dict(got.get("Item", {}))


def test_dynamodb_item_layout(dynamo: Any) -> None:
    """The layout the SAM template and any operator querying the table depend on."""
    store = DynamoRunStore(TABLE, client=dynamo)
    run = make_run()
    store.record(run)
    store.mark_stale_alerted(REPO, T0)

    item = _item(dynamo, f"RUN#{run.run_id}")
    assert item["pk"] == {"S": f"REPO#{REPO}"}
    assert item["kind"] == {"S": "verification"}
    assert item["finished_at"] == {"S": "2025-03-01T12:03:00.123456+00:00"}
    assert json.loads(item["detail"]["S"]) == run.detail
    assert int(item["ttl"]["N"]) == int((run.finished_at + RUN_TTL).timestamp())

    latest = _item(dynamo, LATEST_VERIFIED_SK)
    assert latest["run_id"] == {"S": run.run_id}
    assert "ttl" not in latest  # the watchdog needs it most when it is oldest

    meta = _item(dynamo, META_SK)
    assert meta["verifications"] == {"N": "1"}
    assert meta["latest_run_id"] == {"S": run.run_id}
    assert meta["repo_id"] == {"S": "nas"}
    assert meta["stale_alerted_at"] == {"S": "2025-03-01T12:00:00.123456+00:00"}

    ttl = dynamo.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "ttl"

    store.bind(REPO, {"version": 1, "bucket": "b"})
    binding = _item(dynamo, "BINDING")  # docs/verification.md: the operator deletes this item
    assert json.loads(binding["value"]["S"]) == {"version": 1, "bucket": "b"}
    assert "ttl" not in binding  # a binding that expired would let any event re-bind


def test_dynamodb_redelivery_repairs_pointers_lost_in_a_crash(dynamo: Any) -> None:
    """A crash after the transaction but before the pointer writes heals on redelivery."""
    store = DynamoRunStore(TABLE, client=dynamo)
    run = make_run()
    store.record(run)
    key = {"pk": {"S": f"REPO#{REPO}"}}
    dynamo.delete_item(TableName=TABLE, Key={**key, "sk": {"S": LATEST_VERIFIED_SK}})
    dynamo.update_item(
        TableName=TABLE,
        Key={**key, "sk": {"S": META_SK}},
        UpdateExpression="REMOVE latest_run_id",
    )
    assert store.latest_verified(REPO) is None

    store.record(run)
    assert store.latest_verified(REPO) == run
    assert _item(dynamo, META_SK)["latest_run_id"] == {"S": run.run_id}
    assert store.verification_count(REPO) == 1


def test_dynamodb_runs_paginate_past_one_page(dynamo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DynamoRunStore(TABLE, client=dynamo)
    ids = sorted(new_run_id() for _ in range(7))
    for run_id in ids:
        store.record(make_run("mirror", "completed", run_id=run_id))
    calls: list[int] = []
    query = dynamo.query

    def small_pages(**params: Any) -> Any:
        # DynamoDB stops a page at 1 MB whatever `Limit` says; force that with tiny pages.
        calls.append(params["Limit"])
        return query(**{**params, "Limit": min(params["Limit"], 2)})

    monkeypatch.setattr(dynamo, "query", small_pages)
    assert [r.run_id for r in store.runs(REPO, limit=5)] == ids[::-1][:5]
    assert calls == [5, 3, 1]


def _cancelled(*codes: str) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "TransactionCanceledException", "Message": "cancelled"},
            "CancellationReasons": [{"Code": c} for c in codes],
        },
        "TransactWriteItems",
    )


def test_dynamodb_retries_a_transaction_conflict(
    dynamo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs of one repository recorded at once conflict on META; neither may be lost."""
    store = DynamoRunStore(TABLE, client=dynamo)
    transact = dynamo.transact_write_items
    outcomes: list[ClientError | None] = [_cancelled("None", "TransactionConflict"), None]

    def conflict_once(**params: Any) -> Any:
        error = outcomes.pop(0)
        if error is not None:
            raise error
        return transact(**params)

    monkeypatch.setattr(dynamo, "transact_write_items", conflict_once)
    run = make_run()
    store.record(run)
    assert outcomes == []
    assert store.latest_verified(REPO) == run
    assert store.verification_count(REPO) == 1


def test_dynamodb_other_failures_propagate(dynamo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DynamoRunStore(TABLE, client=dynamo)

    def refuse(**params: Any) -> Any:
        raise _cancelled("None", "ValidationError")

    monkeypatch.setattr(dynamo, "transact_write_items", refuse)
    with pytest.raises(ClientError):
        store.record(make_run())
    assert store.latest_verified(REPO) is None
    with pytest.raises(ClientError):
        DynamoRunStore("no-such-table", client=dynamo).record(make_run())


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (["verify", "--repo-id", "home"], 2),
        (["status", "--check-stale"], 2),
        (["status", "--forget", "home"], 2),
        (["status"], 0),  # only reads: a read-only history can still be shown
    ],
)
def test_a_read_only_run_store_is_refused_by_the_commands_that_write_it(
    tmp_path: Path, command: list[str], code: int
) -> None:
    """runs.sqlite read-only (restored as another user, chmod): SQLite opens it read-only
    without a word, and the first write failed mid-run with exit 1 "unexpected error:
    OperationalError: attempt to write a readonly database", naming no file (a local-mode
    hook run after mirroring, without its verification recorded or announced). A command
    that writes the run store now finds out when it opens it: exit 2 naming the file."""
    state = tmp_path / "state"
    SqliteRunStore(state / "runs.sqlite").close()
    (state / "runs.sqlite").chmod(0o444)
    endpoint = S3Endpoint("http://127.0.0.1:9", "AKIDEXAMPLE", "relay-test-secret-key")
    config = write_agent_config(tmp_path / "relay.toml", endpoint, "bkt", state_dir=state)
    done = run_agent([*command, "--config", str(config)], timeout=60, honour_file_modes=True)
    assert done.returncode == code, done.stderr
    if code:
        said = f"backrest-relay: error: run store {state / 'runs.sqlite'}: unusable (attempt to"
        assert said in done.stderr, done.stderr

"""The verifier's Object Lock check (issue 18.4): objects it reads back must carry a
retention at least the configured minimum away; a missing or short lock is a named problem."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cloud.logic.ports import Retention
from cloud.logic.verify import MirrorVerifier, VerifyOptions
from tests.support.doubles.object_store import InMemoryObjectStore
from tests.unit.test_verify_logic import DEST, MANIFEST, build


class LockedStore(InMemoryObjectStore):
    """The in-memory bucket plus per-object retention (a RetentionSource)."""

    def __init__(self) -> None:
        super().__init__(page_size=7)
        self.locks: dict[str, Retention] = {}
        self.asked: list[str] = []

    def retention(self, key: str) -> Retention | None:
        self.asked.append(key)
        return self.locks.get(key)


def locked_mirror() -> tuple[LockedStore, str, list[str]]:
    plain, entries, sha = build()
    store = LockedStore()
    store.objects, store.etags = plain.objects, plain.etags
    until = datetime.now(UTC) + timedelta(days=30)
    keys = [f"{DEST.prefix}/{e['key']}" for e in entries]
    for key in keys:
        store.locks[key] = Retention("GOVERNANCE", until)
    return store, sha, keys


def run(store: InMemoryObjectStore, sha: str, **options: object):  # type: ignore[no-untyped-def]
    opts = VerifyOptions(extra_percent=100.0, **options)  # type: ignore[arg-type]
    return MirrorVerifier(store, DEST, opts).verify(MANIFEST, sha)


def test_every_object_read_back_is_lock_checked_and_a_good_lock_passes() -> None:
    store, sha, keys = locked_mirror()
    outcome = run(store, sha, lock_days=30)
    assert outcome.verified, outcome.problems
    assert sorted(store.asked) == sorted(keys)


def test_missing_and_short_locks_are_named_problems() -> None:
    store, sha, keys = locked_mirror()
    del store.locks[keys[0]]
    store.locks[keys[1]] = Retention("COMPLIANCE", datetime.now(UTC) + timedelta(hours=12))
    outcome = run(store, sha, lock_days=30, lock_min_days=1)
    assert not outcome.verified
    found = {(p.key, p.kind) for p in outcome.problems}
    relative = [k.removeprefix(DEST.prefix + "/") for k in keys[:2]]
    assert found == {(relative[0], "lock"), (relative[1], "lock")}
    details = {p.key: p.detail for p in outcome.problems}
    assert "no Object Lock retention" in details[relative[0]]
    assert "compliance retention ends" in details[relative[1]]


def test_locks_are_not_checked_unless_configured() -> None:
    store, sha, _ = locked_mirror()
    store.locks.clear()
    assert run(store, sha).verified
    assert store.asked == []


def test_a_store_that_cannot_tell_locks_warns_instead_of_failing() -> None:
    plain, _, sha = build()
    outcome = run(plain, sha, lock_days=30)
    assert outcome.verified
    assert any("locks not checked" in w for w in outcome.warnings)


def test_the_lambda_takes_the_lock_check_from_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloud.handlers.verify import dependencies_from_env

    for name, value in {
        "RUNS_TABLE": "runs",
        "IDEMPOTENCY_TABLE": "idem",
        "EVENT_BUS_NAME": "bus",
        "DESTINATION_SECRET_ARN": "secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OBJECT_LOCK_DAYS", raising=False)
    assert dependencies_from_env().options.lock_days is None
    monkeypatch.setenv("OBJECT_LOCK_DAYS", "30")
    monkeypatch.setenv("OBJECT_LOCK_MIN_DAYS", "3")
    options = dependencies_from_env().options
    assert (options.lock_days, options.lock_min_days) == (30, 3)

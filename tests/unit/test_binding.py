"""A repository is bound to its destination by its first verified run (`cloud.logic.binding`,
`cloud.app.binding`): a forged `Mirror Completed` naming the repository with a destination
and manifest of its own is refused, recorded as a failed verification and alerted — never
verified, nothing read from the foreign bucket, the watchdog's clock untouched.

The rules are pure (hypothesis over locations); the use cases run over the in-memory run
store and over local mode's SQLite store, with in-memory buckets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud.app.verify import verify_checkpointed, verify_mirror
from cloud.contracts.destination import Destination
from cloud.contracts.events import (
    ManifestRef,
    MirrorCompleted,
    MirrorVerificationFailed,
    MirrorVerified,
    RepoRef,
)
from cloud.integrations.runstore_sqlite import SqliteRunStore
from cloud.logic.binding import (
    Binding,
    binding_of,
    canonical,
    decide,
    header_disagreement,
    manifest_folder,
)
from cloud.logic.checkpoint import checkpoint_name
from cloud.logic.notify import decide_delivery, render
from cloud.logic.ports import RunStore
from cloud.logic.verify import VerifyOptions
from cloud.logic.watchdog import plan
from tests.support import events
from tests.support.doubles.object_store import InMemoryObjectStore
from tests.support.doubles.runstore import InMemoryRunStore
from tests.support.lambdas import write_mirror

GUID_A = "a1" * 32
GUID_B = "b2" * 32
HOME = Destination(provider="b2", endpoint_url="https://s3.x", bucket="offsite", prefix="r/home")
FOREIGN = Destination(provider="b2", endpoint_url="https://s3.x", bucket="attacker", prefix="x/y")
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
BOUND = Binding(
    bucket="offsite",
    prefix="r/home",
    manifest_prefix="r/home.relay/manifests",
    bound_at=T0,
    bound_by="v1",
    mirror_run_id="m1",
)


def event_at(
    destination: Destination = HOME,
    manifest_key: str = "r/home.relay/manifests/m2.jsonl.gz",
    guid: str = GUID_A,
) -> MirrorCompleted:
    return events.completed(
        repo=RepoRef(id="home", guid=guid),
        destination=destination,
        manifest=ManifestRef(key=manifest_key, sha256="0" * 64, objects=1, created_by_run="m2"),
    )


# -- the rule (pure) ---------------------------------------------------------------------------


def test_an_unbound_repository_may_be_verified_and_a_matching_event_is_accepted() -> None:
    assert decide(None, event_at()).action == "bind"
    assert decide(BOUND, event_at()).action == "accept"


@pytest.mark.parametrize(
    ("destination", "manifest_key", "named"),
    [
        (FOREIGN, "x/y.relay/manifests/m2.jsonl.gz", "bucket 'attacker' (bound: 'offsite')"),
        (HOME.model_copy(update={"prefix": "r/other"}), "r/other.relay/m.jsonl.gz", "prefix"),
        (HOME, "elsewhere/manifests/m2.jsonl.gz", "manifest folder 'elsewhere/manifests'"),
        (HOME, "r/home.relay/manifests/sub/m2.jsonl.gz", "manifest folder"),
    ],
)
def test_any_disagreement_is_refused_naming_both_sides(
    destination: Destination, manifest_key: str, named: str
) -> None:
    decision = decide(BOUND, event_at(destination, manifest_key))
    assert decision.refused
    assert named in decision.reason
    assert "bound to bucket 'offsite' prefix 'r/home'" in decision.reason
    assert "verification v1" in decision.reason


segment = st.text(alphabet="abcAB0-_.", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)
paths = st.lists(segment, min_size=1, max_size=4).map("/".join)


@given(prefix=paths)
def test_a_canonical_prefix_is_accepted_only_exactly(prefix: str) -> None:
    """`a/b/`, `/a/b`, `a//b`, `a/./b`, `a/x/../b` and a case change name other keys (or, on
    a server mapping keys to files, the same files by another name): all refused."""
    bound = Binding("offsite", prefix, "m", T0, "v1", "m1")
    ok = HOME.model_copy(update={"prefix": prefix})
    assert decide(bound, event_at(ok, "m/run.jsonl.gz")).action == "accept"
    head, _, tail = prefix.rpartition("/")
    variants = {
        prefix + "/",
        "/" + prefix,
        prefix.replace("/", "//", 1) if head else prefix + "//x",
        f"{head}/./{tail}" if head else f"./{tail}",
        f"{head}/zz/../{tail}" if head else f"zz/../{tail}",
        prefix.swapcase(),
    } - {prefix}
    for variant in variants:
        other = HOME.model_copy(update={"prefix": variant})
        assert decide(bound, event_at(other, "m/run.jsonl.gz")).refused, variant
        assert decide(None, event_at(other, "m/run.jsonl.gz")).action in (
            ("refuse",) if not canonical(variant) else ("bind",)
        ), variant


@given(folder=paths, name=segment)
def test_a_manifest_must_lie_directly_in_the_bound_folder(folder: str, name: str) -> None:
    bound = Binding("offsite", "r/home", folder, T0, "v1", "m1")
    assert decide(bound, event_at(manifest_key=f"{folder}/{name}")).action == "accept"
    for key in (f"{folder}/../{name}", f"{folder}//{name}", f"{folder}/x/{name}", name):
        assert decide(bound, event_at(manifest_key=key)).refused, key


@pytest.mark.parametrize(
    ("prefix", "key"),
    [
        ("r/home", "r/home/m.jsonl.gz"),  # inside the repository: restic would see it
        ("r/./home", "r/home.relay/m.jsonl.gz"),
        ("r/home", "r/home.relay/../x/m.jsonl.gz"),
        ("r/home", ""),
    ],
)
def test_even_a_first_event_naming_a_malformed_location_is_refused(prefix: str, key: str) -> None:
    assert decide(None, event_at(HOME.model_copy(update={"prefix": prefix}), key)).refused


def test_the_binding_round_trips_and_an_unknown_version_is_not_unbound() -> None:
    assert Binding.from_dict(BOUND.to_dict()) == BOUND
    assert Binding.from_dict(None) is None
    with pytest.raises(ValueError, match="version"):
        Binding.from_dict({**BOUND.to_dict(), "version": 99})


def test_a_manifest_header_naming_another_repository_disagrees() -> None:
    assert header_disagreement(GUID_B, GUID_A) is not None
    assert header_disagreement(GUID_A, GUID_A) is None
    assert header_disagreement(None, GUID_A) is None  # an older manifest without the guid
    assert manifest_folder("a/b/c.jsonl.gz") == "a/b" and manifest_folder("c") == ""


# -- the use cases: Lambda's one-shot pass and local mode's checkpointed pass ----------------


class World:
    """Two buckets (the repository's and an attacker's) and one run store."""

    def __init__(self, runs: RunStore) -> None:
        self.runs = runs
        self.home = InMemoryObjectStore()
        self.foreign = InMemoryObjectStore()

    def legitimate(self, seed: int = 1) -> MirrorCompleted:
        event, _ = write_mirror(self.home.put, HOME, seed=seed, guid=GUID_A)
        return event

    def forged(self) -> MirrorCompleted:
        """Repository A's guid, an attacker's bucket, a valid mirror and manifest there."""
        event, _ = write_mirror(self.foreign.put, FOREIGN, seed=9, guid=GUID_A)
        return event

    def store_for(self, event: MirrorCompleted) -> InMemoryObjectStore:
        return self.home if event.destination.bucket == HOME.bucket else self.foreign


def one_shot(world: World, event: MirrorCompleted) -> MirrorVerified | MirrorVerificationFailed:
    return verify_mirror(event, store=world.store_for(event), runs=world.runs, reports=None)


def checkpointed(world: World, event: MirrorCompleted) -> MirrorVerified | MirrorVerificationFailed:
    checked = verify_checkpointed(
        event,
        store=world.store_for(event),
        runs=world.runs,
        reports=None,
        options=VerifyOptions(concurrency=1),
        every_seconds=86400,
        rotation_budget=0,
    )
    assert checked.result is not None
    return checked.result


@pytest.fixture(params=["one-shot/memory", "checkpointed/sqlite", "checkpointed/memory"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[World, str]:
    mode, store = str(request.param).split("/")
    runs: RunStore = (
        SqliteRunStore(tmp_path / "runs.sqlite") if store == "sqlite" else (InMemoryRunStore())
    )
    return World(runs), mode


def run(
    world: World, mode: str, event: MirrorCompleted
) -> MirrorVerified | MirrorVerificationFailed:
    return (one_shot if mode == "one-shot" else checkpointed)(world, event)


def test_a_forged_completion_for_another_repository_is_refused_and_alerted(
    case: tuple[World, str],
) -> None:
    world, mode = case
    first = run(world, mode, world.legitimate())
    assert isinstance(first, MirrorVerified)
    assert Binding.from_dict(world.runs.load_binding(GUID_A)) == binding_of(first)

    forged = world.forged()
    world.foreign.reads.clear()
    result = run(world, mode, forged)

    assert isinstance(result, MirrorVerificationFailed)
    [problem] = result.problems
    assert problem.kind == "binding" and problem.key == forged.manifest.key
    assert "bucket 'attacker' (bound: 'offsite')" in problem.detail
    assert world.foreign.reads == [] and world.foreign.list_requests == 0  # nothing read
    # Not verified: the latest verified run is still the legitimate one, the binding stands.
    latest = world.runs.latest_verified(GUID_A)
    assert latest is not None and latest.run_id == first.run_id
    assert Binding.from_dict(world.runs.load_binding(GUID_A)) == binding_of(first)
    # Recorded as a failed verification (status shows it); the forged mirror run is not
    # recorded as the repository's, and no checkpoint was made for the foreign destination.
    kinds = [(r.kind, r.status, r.mirror_run_id) for r in world.runs.runs(GUID_A)]
    assert ("verification", "verification-failed", forged.run_id) in kinds
    assert world.runs.get(GUID_A, forged.run_id) is None
    assert world.runs.load_checkpoint(GUID_A, checkpoint_name(FOREIGN)) is None
    # An alert: the notifier's rule sends it to people and heartbeats, saying "refused".
    decision = decide_delivery(result, "never", previous="good")
    assert decision.severity == "failure" and decision.people and decision.heartbeat
    message = render(result, "failure")
    assert "refused" in message.subject and "attacker" in message.text
    # The watchdog's clock was not reset: a day later the repository is stale.
    later = datetime.now(UTC) + timedelta(hours=27)
    stale = plan(world.runs, now=later, max_age_for=lambda _: timedelta(hours=26))
    assert [a.record.repo_key for a in stale.alerts] == [GUID_A]

    # The legitimate host's next run is verified as before.
    assert isinstance(run(world, mode, world.legitimate(seed=2)), MirrorVerified)


def test_a_manifest_whose_header_names_another_repository_is_not_verified(
    case: tuple[World, str],
) -> None:
    world, mode = case
    event, _ = write_mirror(world.home.put, HOME, seed=3, guid=GUID_B)
    claimed = event.model_copy(update={"repo": RepoRef(id="home", guid=GUID_A)})
    result = run(world, mode, claimed)
    assert isinstance(result, MirrorVerificationFailed)
    assert [p.kind for p in result.problems] == ["binding"]
    assert "names repository " + GUID_B in result.problems[0].detail
    assert world.runs.load_binding(GUID_A) is None  # a failed run binds nothing
    # ... and the checkpoint does not remember that manifest as proven: asked again, the
    # same answer (not "reused").
    again = run(world, mode, claimed.model_copy(update={"run_id": "again"}))
    assert isinstance(again, MirrorVerificationFailed)


def test_a_refused_or_failed_first_event_binds_nothing(case: tuple[World, str]) -> None:
    world, mode = case
    event = world.legitimate()
    world.home.delete(event.manifest.key)  # the manifest is missing: a failed verification
    assert isinstance(run(world, mode, event), MirrorVerificationFailed)
    assert world.runs.load_binding(GUID_A) is None
    # The first verified run binds, wherever it was (here: the foreign bucket, with no
    # earlier verified run to contradict it — trust on first use, docs/verification.md).
    assert isinstance(run(world, mode, world.forged()), MirrorVerified)
    assert Binding.from_dict(world.runs.load_binding(GUID_A)) is not None
    assert isinstance(run(world, mode, world.legitimate(seed=4)), MirrorVerificationFailed)


def test_unbinding_lets_the_next_verified_run_bind_the_new_destination(
    case: tuple[World, str],
) -> None:
    """The operator's re-binding after a legitimate move."""
    world, mode = case
    assert isinstance(run(world, mode, world.legitimate()), MirrorVerified)
    moved = world.forged()  # stands in for the repository's new, legitimate destination
    assert isinstance(run(world, mode, moved), MirrorVerificationFailed)

    assert world.runs.unbind(GUID_A) is True
    assert world.runs.unbind(GUID_A) is False
    moved_again = moved.model_copy(update={"run_id": "after-unbind"})
    assert isinstance(run(world, mode, moved_again), MirrorVerified)
    binding = Binding.from_dict(world.runs.load_binding(GUID_A))
    assert binding is not None and (binding.bucket, binding.prefix) == ("attacker", "x/y")


def test_status_forget_drops_the_binding_with_the_history(tmp_path: Path) -> None:
    runs = SqliteRunStore(tmp_path / "runs.sqlite")
    world = World(runs)
    assert isinstance(checkpointed(world, world.legitimate()), MirrorVerified)
    assert runs.load_binding(GUID_A) is not None
    runs.forget(GUID_A)
    assert runs.load_binding(GUID_A) is None


def test_a_damaged_stored_binding_fails_loudly_instead_of_rebinding(tmp_path: Path) -> None:
    runs = SqliteRunStore(tmp_path / "runs.sqlite")
    runs.bind(GUID_A, {**BOUND.to_dict(), "version": 99})
    world = World(runs)
    with pytest.raises(ValueError, match="version"):
        one_shot(world, world.legitimate())
    assert world.home.reads == []

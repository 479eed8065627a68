"""`backrest-relay recover`: bring back a verified state of the mirror from the object
versions the bucket still holds.

Every state a run left is described by its manifest (key, size, SHA-256, MD5 of every
object). With Object Lock, the versions those manifests name cannot be removed before their
retain-until date, whatever the backup host's key does: a delete or a "hide" only adds a
delete marker, an overwrite only adds a newer version. So a state is rebuilt by finding,
for each manifest entry, a version whose content is the entry's (single-part: the ETag is
the MD5; otherwise read back and hashed) and making it current again — CopyObject with its
VersionId, in place or into another prefix — then proving the result with the same
verifier `verify` runs.

Manifests are read at their *oldest* version: the agent writes each manifest key once, so
a newer version of one is someone else's.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cloud.contracts.destination import Destination
from cloud.contracts.manifest import ManifestEntry, ManifestHeader
from cloud.integrations.redact import REDACTOR
from cloud.logic.ports import ListedObject, ObjectStore, Retention, RetentionSource, RunStore
from cloud.logic.verify import (
    IGNORED_FOLDERS,
    MirrorVerifier,
    VerificationOutcome,
    VerifyOptions,
    expected_sha256,
)
from local_agent.errors import ConfigError, ExitCode, RelayError
from local_agent.mirror.backend import Backend, ObjectVersion
from local_agent.mirror.repository import DELETE_ORDER, UPLOAD_ORDER, Kind, kind_of_key
from local_agent.units import parse_duration

if TYPE_CHECKING:
    from local_agent.config import RelayConfig
    from local_agent.identity import RepoIdentity

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".jsonl.gz"
REPORT_SUFFIX = ".report.jsonl.gz"


class RecoveryError(RelayError, exit_code=ExitCode.LOCAL_INTEGRITY, kind="destination"):
    """The chosen state cannot be rebuilt from what the bucket holds (exit 3; of kind
    "destination": the bucket no longer holds what the state needs)."""


@dataclass
class MirrorState:
    """One state of the mirror: a manifest, as first written, and what verification said."""

    run_id: str
    key: str  # the manifest's object key
    version_id: str
    created_at: datetime
    objects: int
    verified: bool | None  # the latest verdict: True verified, False failed, None: none here
    # When verifications of this state failed: one that failed *after* the chosen time is
    # the attack being noticed, not a reason to distrust the state.
    failed_at: list[datetime] = field(default_factory=list)
    current: bool = True  # its key's current version is still this one
    # The whole manifest and its SHA-256, read only for the state being rebuilt (`load`):
    # listing the states reads just each manifest's first line.
    data: bytes = field(default=b"", repr=False)
    sha256: str = ""

    def load(self, backend: Backend) -> None:
        if not self.sha256:
            self.data = _read_all(backend, self.key, self.version_id)
            self.sha256 = hashlib.sha256(self.data).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "manifest": self.key,
            "created_at": self.created_at.isoformat(),
            "objects": self.objects,
            "verified": self.verified,
            "manifest_intact": self.current,
        }


@dataclass(frozen=True)
class Step:
    relative: str  # repository-relative key
    version: ObjectVersion


@dataclass
class RecoveryPlan:
    state: MirrorState
    target: Destination
    in_place: bool
    restore: list[Step] = field(default_factory=list)  # versions to make current / copy
    unchanged: int = 0  # entries whose current version already is the right one
    hide: list[str] = field(default_factory=list)  # current objects not in the manifest
    missing: list[str] = field(default_factory=list)  # "key: why"
    read_back: int = 0  # versions read and hashed to find the right one


def parse_as_of(text: str, now: float) -> datetime:
    """`2026-12-06T20:00:00Z` (ISO 8601; no zone = UTC), or a duration ago (`3d`, `6h`)."""
    stripped = text.strip()
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        try:
            # A duration so long ago that it is before year 1 is as bad as no duration.
            return datetime.fromtimestamp(now - parse_duration(stripped), UTC)
        except (ValueError, OverflowError, OSError):
            raise ConfigError(
                f"--as-of {text!r}: expected a time like 2026-12-06T20:00:00Z or a "
                "duration ago like 3d"
            ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _read_all(backend: Backend, key: str, version_id: str) -> bytes:
    return b"".join(backend.read_version(key, version_id))


def list_states(
    backend: Backend,
    manifest_prefix: str,
    *,
    runs: RunStore | None,
    repo_key: str | None,
) -> list[MirrorState]:
    """The mirror's states, oldest first, from every manifest version under the prefix."""
    by_key: dict[str, list[ObjectVersion]] = {}
    for version in backend.list_versions(manifest_prefix.rstrip("/") + "/"):
        if version.key.endswith(MANIFEST_SUFFIX) and not version.key.endswith(REPORT_SUFFIX):
            by_key.setdefault(version.key, []).append(version)
    verdicts: dict[str, bool] = {}
    failures: dict[str, list[datetime]] = {}
    if runs is not None and repo_key:
        for record in reversed(runs.runs(repo_key, limit=1000)):  # oldest first
            if record.kind == "verification" and record.mirror_run_id:
                verdicts[record.mirror_run_id] = record.status == "verified"
                if record.status != "verified":
                    failures.setdefault(record.mirror_run_id, []).append(record.finished_at)
    states: list[MirrorState] = []
    for key, versions in sorted(by_key.items()):
        written = [v for v in versions if not v.delete_marker]
        if not written:
            continue
        first = written[-1]  # ListObjectVersions lists a key's versions newest first
        try:
            header = _read_header(backend, key, first.version_id)
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            log.warning("%s (version %s): not a manifest (%s)", key, first.version_id, exc)
            continue
        latest = next((v for v in versions if v.latest), None)
        states.append(
            MirrorState(
                run_id=header.run_id,
                key=key,
                version_id=first.version_id,
                created_at=header.created_at,
                objects=header.objects,
                verified=verdicts.get(header.run_id),
                failed_at=failures.get(header.run_id, []),
                current=latest is not None and latest.version_id == first.version_id,
            )
        )
    states.sort(key=lambda s: s.created_at)
    return states


def choose_state(
    states: list[MirrorState], *, as_of: datetime | None, run_id: str | None
) -> MirrorState:
    """`--manifest RUN_ID`, else the newest state written at or before `--as-of` that no
    verification finished by then found broken (a verification that failed later — the
    attack being noticed — does not disqualify it)."""
    if run_id is not None:
        for state in states:
            if state.run_id == run_id:
                return state
        raise RecoveryError(f"no manifest of run {run_id} in the bucket")
    assert as_of is not None
    candidates = [
        s
        for s in states
        if s.created_at <= as_of and not any(_aware(t) <= as_of for t in s.failed_at)
    ]
    if not candidates:
        raise RecoveryError(
            f"no manifest written at or before {as_of.isoformat()} that verification did "
            f"not find broken ({len(states)} manifest(s) in the bucket; list them with "
            "`backrest-relay recover` without --as-of/--manifest)"
        )
    return candidates[-1]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _read_header(backend: Backend, key: str, version_id: str) -> ManifestHeader:
    """A manifest's header line, reading no further than the chunk that holds it."""
    inflate = zlib.decompressobj(wbits=31)  # gzip
    text = b""
    chunks = backend.read_version(key, version_id)
    try:
        for chunk in chunks:
            text += inflate.decompress(chunk, 1024 * 1024)
            if b"\n" in text or len(text) >= 1024 * 1024:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return ManifestHeader.model_validate_json(text.split(b"\n", 1)[0])


def manifest_entries(state: MirrorState) -> tuple[ManifestHeader, list[ManifestEntry]]:
    if not state.sha256:
        raise AssertionError("manifest_entries needs MirrorState.load first")
    with gzip.GzipFile(fileobj=io.BytesIO(state.data)) as stream:
        header = ManifestHeader.model_validate_json(stream.readline())
        entries = [ManifestEntry.model_validate_json(line) for line in stream if line.strip()]
    return header, entries


def plan_recovery(
    backend: Backend,
    state: MirrorState,
    *,
    into: str | None,
) -> RecoveryPlan:
    """For every manifest entry, the version that holds its content; what is missing."""
    source = backend.destination
    header, entries = manifest_entries(state)
    if header.bucket != source.bucket or header.prefix != source.prefix:
        raise RecoveryError(
            f"manifest {state.key} describes {header.bucket}/{header.prefix}, not "
            f"{source.bucket}/{source.prefix}"
        )
    target = source if into is None else source.model_copy(update={"prefix": into.strip("/")})
    plan = RecoveryPlan(state=state, target=target, in_place=into is None)
    versions: dict[str, list[ObjectVersion]] = {}
    base = source.key("")
    for version in backend.list_versions(base):
        relative = source.relative(version.key)
        if relative and not relative.startswith(IGNORED_FOLDERS):
            versions.setdefault(relative, []).append(version)
    wanted = {entry.key for entry in entries}
    for entry in entries:
        # Newest first, as ListObjectVersions lists them (LastModified has whole seconds).
        candidates = [v for v in versions.get(entry.key, []) if not v.delete_marker]
        chosen = _matching_version(backend, entry, candidates, plan)
        if chosen is None:
            seen = len(candidates)
            plan.missing.append(
                f"{entry.key}: none of its {seen} version(s) holds the manifest's content"
                if seen
                else f"{entry.key}: no version of it is left in the bucket"
            )
            continue
        latest = next((v for v in versions.get(entry.key, []) if v.latest), None)
        if plan.in_place and latest is not None and latest.version_id == chosen.version_id:
            plan.unchanged += 1
        else:
            plan.restore.append(Step(entry.key, chosen))
    if plan.in_place:
        for relative, found in sorted(versions.items()):
            latest = next((v for v in found if v.latest), None)
            if relative not in wanted and latest is not None and not latest.delete_marker:
                plan.hide.append(relative)
    return plan


def _matching_version(
    backend: Backend,
    entry: ManifestEntry,
    candidates: list[ObjectVersion],
    plan: RecoveryPlan,
) -> ObjectVersion | None:
    """The newest version with the entry's content: by ETag (= MD5 for single-part
    objects) when the manifest has the MD5, else read back and hashed."""
    sized = [v for v in candidates if v.size == entry.size]
    if entry.md5:
        for version in sized:
            if not version.multipart and version.etag == entry.md5:
                return version
    expected = expected_sha256(entry)
    if expected is None:
        return None
    for version in sized:
        if entry.md5 and not version.multipart:
            continue  # its ETag already said it is different bytes
        plan.read_back += 1
        digest = hashlib.sha256()
        for chunk in backend.read_version(version.key, version.version_id):
            digest.update(chunk)
        if digest.hexdigest() == expected:
            return version
    return None


def _kind_rank(order: tuple[Kind, ...]) -> Callable[[str], int]:
    def rank(relative: str) -> int:
        kind = kind_of_key(relative)
        return order.index(kind) if kind in order else len(order)

    return rank


def execute_plan(backend: Backend, plan: RecoveryPlan) -> None:
    """Copy the chosen versions (config, keys, data, index, snapshots — a snapshot never
    comes back before what it names), then hide what the state did not hold (snapshots
    first), then restore the manifest itself when someone replaced or hid it."""
    source = backend.destination
    rank = _kind_rank(UPLOAD_ORDER)
    for step in sorted(plan.restore, key=lambda s: (rank(s.relative), s.relative)):
        backend.copy_version(
            step.version.key, step.version.version_id, plan.target.key(step.relative)
        )
    hide_rank = _kind_rank(DELETE_ORDER)
    for relative in sorted(plan.hide, key=lambda r: (hide_rank(r), r)):
        backend.hide(source.key(relative))
    if plan.in_place and not plan.state.current:
        backend.copy_version(plan.state.key, plan.state.version_id, plan.state.key)


class _PinnedManifest:
    """The bucket as the verifier reads it, with the manifest read from the version
    recovery chose (its current version may be an attacker's)."""

    def __init__(self, store: ObjectStore, key: str, data: bytes) -> None:
        self.store = store
        self.key = key
        self.data = data

    def list(self, prefix: str) -> Iterator[ListedObject]:
        return self.store.list(prefix)

    def read(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        if key == self.key:
            yield self.data
            return
        yield from self.store.read(key, chunk_size)

    @property
    def list_requests(self) -> int:
        return self.store.list_requests

    def retention(self, key: str) -> Retention | None:
        if isinstance(self.store, RetentionSource):
            return self.store.retention(key)
        return None


def prove(
    store: ObjectStore, plan: RecoveryPlan, *, concurrency: int, verify: VerifyOptions | None
) -> VerificationOutcome:
    """The rebuilt mirror against the manifest, with the verifier `verify` runs: listing,
    sizes, ETags, and every object read back and hashed."""
    base = verify or VerifyOptions()
    options = VerifyOptions(
        new_bytes_budget=None,
        rotation_runs=base.rotation_runs,
        extra_percent=100.0,
        concurrency=concurrency,
        manifest_prefix=_described_prefix(plan),
        lock_days=base.lock_days,
        lock_min_days=base.lock_min_days,
    )
    pinned = _PinnedManifest(store, plan.state.key, plan.state.data)
    return MirrorVerifier(pinned, plan.target, options).verify(plan.state.key, plan.state.sha256)


def _described_prefix(plan: RecoveryPlan) -> str:
    header, _ = manifest_entries(plan.state)
    return header.prefix


# -- the command ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecoverRequest:
    """What `recover` was asked; the fields are named after its options."""

    as_of: str | None = None
    manifest: str | None = None  # an upload run's id
    into: str | None = None
    dry_run: bool = False
    json: bool = False


def run_recover(
    config: RelayConfig,
    identity: RepoIdentity,
    request: RecoverRequest,
    *,
    clock: Callable[[], float] = time.time,
) -> int:
    """List the mirror's states, or rebuild one and prove it. Exit codes: 0 done (or
    listed) · 2 usage · 3 the state cannot be rebuilt (what is missing is named) or the
    rebuilt mirror does not verify · 4 destination error."""
    from cloud.contracts.ids import is_run_id
    from cloud.integrations.s3 import make_s3_client
    from cloud.integrations.s3_store import S3ObjectStore
    from local_agent.events.pipeline import open_run_store

    as_of, manifest, into = request.as_of, request.manifest, request.into
    dry_run, as_json = request.dry_run, request.json
    repo_id, repo_guid = identity.repo_id, identity.guid
    if not repo_id and not repo_guid:
        raise ConfigError("recover needs --repo-id or --repo-guid")
    if as_of is not None and manifest is not None:
        raise ConfigError("recover: give --as-of or --manifest, not both")
    if manifest is not None and not is_run_id(manifest):
        raise ConfigError(f"--manifest {manifest!r}: not a run id (as `recover` lists them)")
    if into is not None:
        _check_into(config, into, repo_id=repo_id, repo_guid=repo_guid)
    moment = parse_as_of(as_of, clock()) if as_of is not None else None
    destination = config.destination_for(repo_id=repo_id, repo_guid=repo_guid)
    manifest_prefix = config.manifest_prefix_for(repo_id=repo_id, repo_guid=repo_guid)
    backend = Backend(config.destination.access(), destination, direct_put=False)
    lock = config.destination.object_lock
    if lock is not None:
        backend.lock = lock.policy().lock_at(clock())
    # Its history picks the states: read, never set aside.
    runs = open_run_store(config.state.path(), read_only=True)
    try:
        states = list_states(backend, manifest_prefix, runs=runs, repo_key=identity.key)
        if moment is None and manifest is None:
            _print_states(states, as_json=as_json)
            return int(ExitCode.OK)
        state = choose_state(states, as_of=moment, run_id=manifest)
        state.load(backend)
        plan = plan_recovery(backend, state, into=into)
        summary = _summary(plan, dry_run=dry_run)
        if plan.missing:
            _emit(summary, as_json=as_json)
            shown = "; ".join(plan.missing[:20]) + (" …" if len(plan.missing) > 20 else "")
            raise RecoveryError(
                f"cannot rebuild the state of run {state.run_id}: {len(plan.missing)} "
                f"object(s) have no version with the manifest's content: {shown}. Nothing "
                "was changed; an older state may still be whole (`recover --manifest ID`)"
            )
        if dry_run:
            _emit(summary, as_json=as_json)
            return int(ExitCode.OK)
        if plan.hide and not backend.versioning_enabled():
            _emit(summary, as_json=as_json)
            raise RecoveryError(
                f"bucket {destination.bucket} does not keep versions: hiding the "
                f"{len(plan.hide)} object(s) the state did not hold would delete them for "
                "good. Nothing was changed; rebuild it elsewhere with --into PREFIX"
            )
        execute_plan(backend, plan)
        if plan.in_place:
            _forget_reconciled(config, destination, repo_guid)
        store = S3ObjectStore(
            make_s3_client(config.destination.access(), max_pool_connections=16),
            destination.bucket,
        )
        outcome = prove(
            store,
            plan,
            concurrency=config.upload.concurrency,
            verify=lock_verify_options(config),
        )
    finally:
        backend.close()
    summary["verified"] = outcome.verified
    summary["problems"] = [p.model_dump() for p in outcome.problems]
    summary["bytes_read"] = outcome.stats.bytes_read
    _emit(summary, as_json=as_json)
    if not outcome.verified:
        raise RecoveryError(
            f"the rebuilt mirror does not verify against manifest {state.key}: "
            f"{outcome.problems_total} problem(s), first: "
            + ", ".join(f"{p.kind} {p.key}" for p in outcome.problems[:5])
        )
    return int(ExitCode.OK)


def lock_verify_options(config: RelayConfig) -> VerifyOptions:
    """The verifier's lock check as `verify` runs it (copies carry a fresh lock)."""
    from local_agent.config import lock_check

    return VerifyOptions(**lock_check(config))


def _check_into(
    config: RelayConfig, into: str, *, repo_id: str | None, repo_guid: str | None
) -> None:
    cleaned = into.strip("/")
    if not cleaned or ".." in cleaned.split("/"):
        raise ConfigError(f"--into {into!r}: give a key prefix like restic/home-recovered")
    current = config.destination_for(repo_id=repo_id, repo_guid=repo_guid).prefix
    if (cleaned + "/").startswith(current + "/") or (current + "/").startswith(cleaned + "/"):
        raise ConfigError(
            f"--into {into!r} overlaps the mirror's prefix {current!r}; pick a new prefix "
            "(or leave --into out to restore in place)"
        )


def _forget_reconciled(
    config: RelayConfig, destination: Destination, repo_guid: str | None
) -> None:
    """The next upload must re-read the bucket once: what this host's state store
    believes is there no longer holds after an in-place recovery."""
    from local_agent.mirror.state import StateStore, state_file_name

    if repo_guid:
        path = config.state.path() / state_file_name(destination, repo_guid)
        if path.exists():
            state = StateStore(path)
            try:
                state.delete_meta("reconciled_at")
            finally:
                state.close()
            return
    log.warning(
        "run the next upload of this repository with --reconcile: the mirror changed "
        "under this host's state store"
    )


def _summary(plan: RecoveryPlan, *, dry_run: bool) -> dict[str, Any]:
    return {
        "dry_run": dry_run,
        "state": plan.state.describe(),
        "target": plan.target.model_dump(),
        "in_place": plan.in_place,
        "restore": len(plan.restore),
        "unchanged": plan.unchanged,
        "hide": len(plan.hide),
        "read_back": plan.read_back,
        "missing": plan.missing,
        "restore_keys": [s.relative for s in plan.restore[:50]],
        "hide_keys": plan.hide[:50],
    }


def _emit(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(REDACTOR(json.dumps(summary, sort_keys=True)) + "\n")
        return
    state = summary["state"]
    target = summary["target"]
    verb = "would restore" if summary["dry_run"] else "restored"
    lines = [
        f"state of run {state['run_id']} ({state['created_at']}, {state['objects']} objects) "
        f"→ {target['bucket']}/{target['prefix']}"
        + (" in place" if summary["in_place"] else " (new prefix)"),
        f"  {verb} {summary['restore']} object(s) from earlier versions, "
        f"{summary['unchanged']} already current, "
        + ("would hide" if summary["dry_run"] else "hid")
        + f" {summary['hide']} object(s) the state did not hold",
    ]
    lines += [f"  restore {k}" for k in summary["restore_keys"][:20]]
    lines += [f"  hide {k}" for k in summary["hide_keys"][:20]]
    lines += [f"  MISSING {m}" for m in summary["missing"][:20]]
    if "verified" in summary:
        lines.append(
            "  VERIFIED against the manifest (every object read back and hashed)"
            if summary["verified"]
            else "  VERIFICATION FAILED: "
            + ", ".join(f"{p['kind']} {p['key']}" for p in summary["problems"][:5])
        )
    sys.stdout.write(REDACTOR("\n".join(lines)) + "\n")


def _print_states(states: list[MirrorState], *, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps([s.describe() for s in states], sort_keys=True) + "\n")
        return
    if not states:
        sys.stdout.write("no manifests in the bucket: nothing to recover from\n")
        return
    lines = ["states of the mirror (oldest first):"]
    for s in states:
        verdict = {True: "verified", False: "verification FAILED", None: "not verified here"}[
            s.verified
        ]
        note = "" if s.current else "  (manifest object was replaced or hidden)"
        lines.append(
            f"  {s.run_id}  {s.created_at.isoformat()}  {s.objects:>7} objects  {verdict}{note}"
        )
    lines.append("rebuild one with `recover --manifest RUN_ID` or `recover --as-of TIME`")
    sys.stdout.write("\n".join(lines) + "\n")

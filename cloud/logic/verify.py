"""Proving an off-site copy without the repository password (restic names every file by the
SHA-256 of its bytes): one listing merged with the manifest, then a budgeted deep check.
Everything streams, so memory stays flat in the number of objects. Steps:
docs/verification.md ("What is checked").
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import heapq
import io
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Protocol

from cloud.contracts.destination import Destination
from cloud.contracts.events import MAX_LISTED_PROBLEMS, Problem, ProblemKind, VerificationStats
from cloud.contracts.manifest import ManifestEntry, ManifestHeader
from cloud.logic.binding import header_disagreement
from cloud.logic.checkpoint import PROVEN_ALL, PassResult, PendingManifest
from cloud.logic.ports import (
    ListedObject,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    RetentionSource,
)

_HEX64 = re.compile(r"[0-9a-f]{64}")
IGNORED_FOLDERS = ("locks/",)
READ_ATTEMPTS = 3  # restic writes locks while it checks a mirror: not extra

DAY = 86400.0
# A new object's lock is set when the run starts; the manifest is written when it ends.
LOCK_NEW_SLACK = DAY


@dataclass(frozen=True)
class PassProgress:
    """Where a pass stands, for a checkpoint saved while it runs (`VerifyOptions.on_progress`).

    Reads run concurrently, so "proven through" is the lowest key still in flight: every
    new object below `unproven_from` has been read and hashed; the rotation's older objects
    from `rotation_from` up to `rotation_next` likewise. Killing the pass now loses the
    reads after the last report, nothing before it.
    """

    unproven_from: str
    rotation_next: str
    rotated: bool
    problems: int
    deep_checked: int
    bytes_read: int


class VerifyProgress(Protocol):
    """Where a pass reports the reads it plans and finishes (local mode's progress line)."""

    def add_work(self, files: int, size: int) -> None: ...

    def advance(self, files: int = 0, size: int = 0) -> None: ...


@dataclass(frozen=True)
class VerifyOptions:
    """How much to read back.

    `new_bytes_budget` caps the deep check of objects the mirror run uploaded (None: all).
    `rotation_runs` N and `rotation_index` pick the slice of older objects (1/N of them)
    re-read this time; callers pass the repository's verification count as the index.
    `extra_percent` / `extra_bytes` widen the deep check (`verify --deep`).

    Checkpointed passes (`cloud.logic.checkpoint`): new objects below `resume_from` are
    already proven; `carried` older manifests add their unproven new objects; with
    `rotation_bytes` set, the rotation is a cursor instead of a slice: older objects from
    `rotation_from` on, in key order, until that many bytes (the manifest's own new objects
    only with `rotate_uploaded`: otherwise they are being, or were just, proven as new).
    `should_stop` (the deadline)
    ends the pass early: no new read starts, the reads under way finish, and the outcome
    says from which key the new objects are still unproven.
    `on_progress` is called (on the calling thread) every `progress_every_objects` objects
    or `progress_every_bytes` bytes read, so the caller can save a checkpoint mid-pass.
    """

    new_bytes_budget: int | None = None
    rotation_runs: int = 30
    rotation_index: int = 0
    extra_percent: float = 0.0
    extra_bytes: int = 0
    concurrency: int = 8
    resume_from: str = ""
    carried: tuple[PendingManifest, ...] = ()
    rotation_bytes: int | None = None
    rotation_from: str = ""
    rotate_uploaded: bool = False
    should_stop: Callable[[], bool] | None = None
    progress: VerifyProgress | None = None
    on_progress: Callable[[PassProgress], None] | None = None
    # Every read of a key below this was done by an earlier call of the same verification
    # (`verify --time-limit`): nothing below it is read again.
    read_from: str = ""
    progress_every_objects: int = 100
    progress_every_bytes: int = 1 << 30
    # The prefix the manifest describes, when the mirror was rebuilt elsewhere
    # (`recover --into`); None: the destination's own prefix.
    manifest_prefix: str | None = None
    # Object Lock (`[destination] object_lock`): objects read back must be retained at
    # least `lock_min_days` from now, and objects the run uploaded about `lock_days` from
    # the manifest's time. None: locks are not checked.
    lock_days: float | None = None
    lock_min_days: float = 1.0
    # One chunk of a fanned-out verification (`cloud.logic.chunks`): only keys
    # `key_from <= key < key_to` (None: to the end) are listed, compared and read; the
    # header's object count is then checked by whoever adds the chunks up.
    key_from: str = ""
    key_to: str | None = None

    @property
    def ranged(self) -> bool:
        return bool(self.key_from) or self.key_to is not None

    def in_range(self, key: str) -> bool:
        return key >= self.key_from and (self.key_to is None or key < self.key_to)

    # The repository the event names (its guid): a manifest whose header names another is
    # a `binding` problem (`cloud.logic.binding`). None: not compared.
    repo_guid: str | None = None
    # False: the list level only (names, sizes, ETags against the manifest), nothing read
    # back — `verify --list-only`, what `rclone check` does.
    read_back: bool = True


@dataclass
class VerificationOutcome:
    header: ManifestHeader | None
    manifest_sha256: str | None
    stats: VerificationStats
    problems: list[Problem] = field(default_factory=list)
    problems_total: int = 0
    warnings: list[str] = field(default_factory=list)
    report: bytes | None = None  # gzip JSON Lines of every problem, when there are any
    complete: bool = True
    unproven_from: str = PROVEN_ALL
    unproven_objects: int = 0
    unproven_bytes: int = 0
    rotation_next: str = ""
    rotated: bool = False
    # Stopped early: the first key whose read (of any kind) did not happen, and the reads
    # (new objects, the rotation slice, `--deep`) still to do from there.
    read_from: str = PROVEN_ALL
    unread_objects: int = 0
    unread_bytes: int = 0
    mirror_bytes: int = 0  # the sizes of every object the manifest lists
    # Bytes of new objects read (within `bytes_read`): what a Lambda chain's later legs
    # have left of `new_bytes_budget` (docs/verification.md, "Sizing").
    new_bytes_read: int = 0

    @property
    def verified(self) -> bool:
        return self.problems_total == 0 and self.header is not None and self.complete

    def pass_result(self) -> PassResult:
        """What the checkpoint needs to know of this pass."""
        return PassResult(
            complete=self.complete,
            problems=self.problems_total > 0,
            unproven_from=self.unproven_from,
            unproven_objects=self.unproven_objects,
            unproven_bytes=self.unproven_bytes,
            rotation_next=self.rotation_next,
            rotated=self.rotated,
            mirror_bytes=self.mirror_bytes,
        )


class _Problems:
    """Keeps the first few problems for the event and all of them for the report."""

    def __init__(self) -> None:
        self.first: list[Problem] = []
        self.total = 0
        self.warnings: list[str] = []
        self._report = io.BytesIO()
        self._gzip = gzip.GzipFile(fileobj=self._report, mode="wb", mtime=0)
        self._lock = threading.Lock()

    def add(self, key: str, kind: ProblemKind, detail: str) -> None:
        problem = Problem(key=key, kind=kind, detail=detail[:500])
        with self._lock:
            self.total += 1
            if len(self.first) < MAX_LISTED_PROBLEMS:
                self.first.append(problem)
            self._gzip.write(problem.model_dump_json().encode() + b"\n")

    def reset(self) -> None:
        with self._lock:
            self.first.clear()
            self.total = 0
            self.warnings.clear()
            self._report = io.BytesIO()
            self._gzip = gzip.GzipFile(fileobj=self._report, mode="wb", mtime=0)

    def warn(self, text: str) -> None:
        with self._lock:
            if len(self.warnings) < MAX_LISTED_PROBLEMS:
                self.warnings.append(text)

    def report(self) -> bytes | None:
        self._gzip.close()
        return self._report.getvalue() if self.total else None


def slice_of(key: str, runs: int) -> int:
    """Which rotation slice an object belongs to: stable, and spread evenly over keys."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % max(runs, 1)


def _fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) per key, independent of `slice_of`."""
    return int(hashlib.sha256(key.encode()).hexdigest()[8:16], 16) / 0x1_0000_0000


def expected_sha256(entry: ManifestEntry) -> str | None:
    """What an object's bytes must hash to: its name, else what the manifest recorded."""
    name = entry.key.rsplit("/", 1)[-1]
    if _HEX64.fullmatch(name) and entry.key != "config":
        return name
    return entry.sha256


class _Unordered(Exception):
    """A listing or manifest not in key order: fall back to a keyed comparison."""


def _ordered(items: Iterator[ListedObject]) -> Iterator[ListedObject]:
    last = ""
    for item in items:
        if item.key < last:
            raise _Unordered(item.key)
        last = item.key
        yield item


class MirrorVerifier:
    def __init__(
        self, store: ObjectStore, destination: Destination, options: VerifyOptions | None = None
    ) -> None:
        self.store = store
        self.destination = destination
        self.options = options or VerifyOptions()

    # -- entry point ----------------------------------------------------------------------

    def verify(self, manifest_key: str, manifest_sha256: str | None) -> VerificationOutcome:
        """Verify the mirror against the manifest at `manifest_key`.

        `manifest_sha256` is what the completion event promised; None (a manual verify
        that found the manifest by listing) trusts the manifest as found.
        ObjectStoreError propagates: an unreachable destination is not a verdict.
        """
        started = time.monotonic()
        problems = _Problems()
        stats = {
            "listed": 0, "compared": 0, "deep": 0, "deep_new": 0, "bytes": 0, "extra": 0,
            "mirror_bytes": 0, "bytes_new": 0,
        }  # fmt: skip
        requests_before = self.store.list_requests
        header: ManifestHeader | None = None
        actual_sha: str | None = None
        self._pass: _DeepChecker | None = None
        self._complete = True
        with contextlib.ExitStack() as files:
            manifest_file = files.enter_context(tempfile.TemporaryFile())
            try:
                actual_sha = self._download(manifest_key, manifest_file)
            except ObjectNotFoundError:
                problems.add(manifest_key, "manifest", "manifest object is missing")
            if actual_sha is not None and manifest_sha256 and actual_sha != manifest_sha256:
                problems.add(
                    manifest_key,
                    "manifest",
                    f"manifest SHA-256 {actual_sha} differs from the event's {manifest_sha256}",
                )
            elif actual_sha is not None:
                carried = self._carried(files, problems)
                header = self._compare(manifest_file, manifest_key, problems, stats, carried)
        list_requests = self.store.list_requests - requests_before
        deep = self._pass
        # Reads queued when the deadline came are skipped even if the listing got to the
        # end: the pass is then not complete (those objects are still unproven).
        complete = self._complete and (deep is None or deep.unproven_objects == 0)
        rotation_next, rotated = (
            deep.rotation_outcome(complete)
            if deep is not None
            else (self.options.rotation_from, False)
        )
        return VerificationOutcome(
            header=header,
            manifest_sha256=actual_sha,
            stats=VerificationStats(
                listed=stats["listed"],
                compared=stats["compared"],
                deep_checked=stats["deep"],
                deep_checked_new=stats["deep_new"],
                bytes_read=stats["bytes"],
                extra_objects=stats["extra"],
                list_requests=list_requests,
                duration_seconds=round(time.monotonic() - started, 3),
            ),
            problems=problems.first,
            problems_total=problems.total,
            warnings=problems.warnings,
            report=problems.report(),
            complete=complete,
            unproven_from=deep.unproven_from if deep is not None else PROVEN_ALL,
            unproven_objects=deep.unproven_objects if deep is not None else 0,
            unproven_bytes=deep.unproven_bytes if deep is not None else 0,
            rotation_next=rotation_next,
            rotated=rotated,
            mirror_bytes=stats["mirror_bytes"] if header is not None else 0,
            new_bytes_read=stats["bytes_new"],
            read_from=deep.read_from if deep is not None else PROVEN_ALL,
            unread_objects=deep.unread_objects if deep is not None else 0,
            unread_bytes=deep.unread_bytes if deep is not None else 0,
        )

    # -- steps

    def _carried(self, files: contextlib.ExitStack, problems: _Problems) -> _Carried:
        """The unproven new objects of older manifests, as one sorted stream of keys.

        An older manifest that cannot be read any more (deleted, altered) cannot say which
        of its objects were new: everything from its first unproven key is then read.
        """
        streams: list[Iterator[str]] = []
        everything_from = PROVEN_ALL
        for pending in self.options.carried:
            handle = files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (closed by the ExitStack)
            try:
                sha = self._download(pending.key, handle)
                if sha != pending.sha256:
                    raise ValueError(f"SHA-256 {sha} is not the recorded {pending.sha256}")
                _, entries = self._entries(handle)
            except (ObjectNotFoundError, OSError, EOFError, ValueError) as exc:
                problems.warn(
                    f"{pending.key}: earlier manifest unusable ({exc}); re-reading every "
                    "object from its first unproven one"
                )
                everything_from = min(everything_from, pending.unproven_from)
                continue
            streams.append(e.key for e in entries if e.uploaded and e.key >= pending.unproven_from)
        return _Carried(heapq.merge(*streams), everything_from)

    def _download(self, key: str, out: IO[bytes]) -> str:
        sha = hashlib.sha256()
        for chunk in self.store.read(key):
            sha.update(chunk)
            out.write(chunk)
        out.seek(0)
        return sha.hexdigest()

    def _entries(self, manifest_file: IO[bytes]) -> tuple[ManifestHeader, Iterator[ManifestEntry]]:
        stream = gzip.GzipFile(fileobj=manifest_file, mode="rb")
        header = ManifestHeader.model_validate_json(stream.readline())

        def entries() -> Iterator[ManifestEntry]:
            for line in stream:
                if line.strip():
                    entry = ManifestEntry.model_validate_json(line)
                    if self.options.in_range(entry.key):
                        yield entry

        return header, entries()

    def _compare(
        self,
        manifest_file: IO[bytes],
        manifest_key: str,
        problems: _Problems,
        stats: dict[str, int],
        carried: _Carried | None = None,
    ) -> ManifestHeader | None:
        try:
            header, entries = self._entries(manifest_file)
        except (OSError, EOFError, ValueError) as exc:
            problems.add(manifest_key, "manifest", f"manifest unreadable: {exc}")
            return None
        described = self.options.manifest_prefix
        if described is None:
            described = self.destination.prefix
        if header.prefix != described or header.bucket != self.destination.bucket:
            problems.add(
                manifest_key,
                "manifest",
                f"manifest describes {header.bucket}/{header.prefix}, not "
                f"{self.destination.bucket}/{self.destination.prefix}",
            )
            return header
        foreign = header_disagreement(header.repo_guid, self.options.repo_guid)
        if foreign is not None:
            problems.add(manifest_key, "binding", foreign)
            return header
        if self.options.lock_days is not None and not isinstance(self.store, RetentionSource):
            problems.warn("this store cannot report Object Lock retention; locks not checked")
        try:
            deep = self._pass = _DeepChecker(
                self.store, self.destination, self.options, problems, stats, carried, header
            )
            try:
                self._merge(entries, deep)
            except _Unordered:
                # Start again with a keyed listing (memory grows with N, correctness first).
                # Carried keys are asked in key order, so an unordered pass reads them all.
                deep.close()
                problems.reset()
                stats.update(dict.fromkeys(stats, 0))
                manifest_file.seek(0)
                _, entries = self._entries(manifest_file)
                unordered_carry = (
                    _Carried(iter(()), "") if self.options.carried else _Carried(iter(()))
                )
                deep = self._pass = _DeepChecker(
                    self.store,
                    self.destination,
                    self.options,
                    problems,
                    stats,
                    unordered_carry,
                    header,
                )
                self._keyed(entries, deep)
            finally:
                deep.close()
        except (OSError, EOFError, ValueError) as exc:
            problems.add(manifest_key, "manifest", f"manifest unreadable: {exc}")
        written = stats["compared"]
        if not self._complete:
            return header  # stopped early: the rest was counted as unproven, not compared
        if self.options.ranged:
            return header  # one chunk: the chunks' counts are added up and checked together
        if written != header.objects:
            problems.add(
                manifest_key,
                "manifest",
                f"manifest header promises {header.objects} objects, lists {written}",
            )
        return header

    def _listing(self, *, ordered: bool = True) -> Iterator[ListedObject]:
        base = self.destination.key("")
        last: str | None = None  # a chunk stops listing at its end: only in key order
        for item in self.store.list(base):
            relative = item.key[len(base) :]
            if ordered and self.options.ranged:
                if last is not None and relative < last:
                    raise _Unordered(relative)
                end = self.options.key_to
                if end is not None and relative >= end and last is not None:
                    return  # nothing further is in range: no more pages
                last = relative
            if not self.options.in_range(relative):
                continue
            if relative.startswith(IGNORED_FOLDERS) or not relative:
                continue
            yield ListedObject(relative, item.size, item.etag)

    def _merge(self, entries: Iterator[ManifestEntry], deep: _DeepChecker) -> None:
        """Every manifest entry against the listing (`deep` holds the problems and stats)."""
        problems, stats = deep.problems, deep.stats
        listing = _ordered(self._listing())
        current = next(listing, None)
        last_entry = ""
        for entry in entries:
            if entry.key < last_entry:
                raise _Unordered(entry.key)
            last_entry = entry.key
            if deep.should_stop():
                self._stop(entry, entries, deep)
                return
            while current is not None and current.key < entry.key:
                self._extra(current, problems, stats)
                current = next(listing, None)
            found = current if current is not None and current.key == entry.key else None
            self._match(entry, found, problems, stats, deep)
            if found is not None:
                current = next(listing, None)
        while current is not None:
            self._extra(current, problems, stats)
            current = next(listing, None)

    def _keyed(self, entries: Iterator[ManifestEntry], deep: _DeepChecker) -> None:
        """Every manifest entry against the listing (`deep` holds the problems and stats)."""
        problems, stats = deep.problems, deep.stats
        remote = {item.key: item for item in self._listing(ordered=False)}
        for entry in entries:
            if deep.should_stop():
                self._stop(entry, entries, deep)
                return
            self._match(entry, remote.pop(entry.key, None), problems, stats, deep)
        for item in remote.values():
            self._extra(item, problems, stats)

    def _match(
        self,
        entry: ManifestEntry,
        item: ListedObject | None,
        problems: _Problems,
        stats: dict[str, int],
        deep: _DeepChecker,
    ) -> None:
        """One manifest entry against the listed object of the same key (None: missing)."""
        stats["compared"] += 1
        stats["mirror_bytes"] += entry.size
        if item is None:
            problems.add(entry.key, "missing", "in the manifest but not in the bucket")
            return
        stats["listed"] += 1
        self._check(entry, item, problems, deep)

    def _stop(
        self, entry: ManifestEntry, rest: Iterator[ManifestEntry], deep: _DeepChecker
    ) -> None:
        """The deadline came: count what is left to prove, without listing further."""
        self._complete = False
        deep.leave_unproven(entry)
        deep.stats["mirror_bytes"] += entry.size
        for later in rest:
            deep.leave_unproven(later)
            deep.stats["mirror_bytes"] += later.size

    def _extra(self, item: ListedObject, problems: _Problems, stats: dict[str, int]) -> None:
        stats["listed"] += 1
        stats["extra"] += 1
        problems.warn(f"{item.key}: in the bucket but not in the manifest ({item.size} bytes)")

    def _check(
        self, entry: ManifestEntry, item: ListedObject, problems: _Problems, deep: _DeepChecker
    ) -> None:
        if item.size != entry.size:
            problems.add(
                entry.key, "size", f"{item.size} bytes in the bucket, manifest says {entry.size}"
            )
            return
        if not item.multipart and entry.md5 and item.etag and item.etag != entry.md5:
            problems.add(entry.key, "etag", f"ETag {item.etag} is not the uploaded MD5 {entry.md5}")
            return
        deep.consider(entry)


class _Carried:
    """Keys (sorted) of older manifests' new objects still to prove; asked in key order."""

    def __init__(self, keys: Iterator[str], everything_from: str = PROVEN_ALL) -> None:
        self._keys = keys
        self._current = next(keys, None)
        self.everything_from = everything_from

    def __contains__(self, key: object) -> bool:
        assert isinstance(key, str)
        if key >= self.everything_from:
            return True
        while self._current is not None and self._current < key:
            self._current = next(self._keys, None)
        return self._current == key


class _DeepChecker:
    """Picks the objects to read back and hashes them on a bounded thread pool.

    Also keeps the pass's checkpoint bookkeeping: the first new object left unproven (by
    the deadline), how many and how large the unproven ones are, and where the rotation
    goes on next time.
    """

    def __init__(
        self,
        store: ObjectStore,
        destination: Destination,
        options: VerifyOptions,
        problems: _Problems,
        stats: dict[str, int],
        carried: _Carried | None = None,
        header: ManifestHeader | None = None,
    ) -> None:
        self.store = store
        self.header = header
        self.destination = destination
        self.options = options
        self.problems = problems
        self.stats = stats
        self.carried = carried or _Carried(iter(()))
        self.new_bytes = 0
        self.extra_bytes = 0
        self.stopped = False
        self.unproven_from = PROVEN_ALL
        self.unproven_objects = 0
        self.unproven_bytes = 0
        self.read_from = PROVEN_ALL
        self.unread_objects = 0
        self.unread_bytes = 0
        self.rotation_used = 0
        self.rotation_full = False
        self.rotation_next = options.rotation_from
        self.rotation_skipped: str | None = None
        self._lock = threading.Lock()
        # Reads submitted and not finished yet (key → "new" / "rotation" / "other"), and
        # the next key the pass will consider: what `on_progress` reports is below both.
        self._in_flight: dict[str, str] = {}
        self._next_key = ""
        self._reported = (0, 0)
        self._slots = threading.BoundedSemaphore(options.concurrency * 2)
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency)
        self._failure: BaseException | None = None

    def should_stop(self) -> bool:
        """True once the pass's deadline has come (then it stays true)."""
        if not self.stopped and self.options.should_stop is not None:
            self.stopped = self.options.should_stop()
        return self.stopped

    def is_new(self, entry: ManifestEntry) -> bool:
        """Still to prove as a new object (this manifest's, or a carried one's)."""
        if entry.uploaded and entry.key >= self.options.resume_from:
            return True
        return entry.key in self.carried

    def leave_unproven(self, entry: ManifestEntry) -> None:
        """The pass ended before this object: count it only if it still needs proving."""
        with self._lock:
            self.read_from = min(self.read_from, entry.key)
        if self.is_new(entry):
            self._unproven(entry)
            self._unread(entry)
        elif entry.key >= self.options.read_from and self._would_read_older(entry):
            self._unread(entry)

    def _would_read_older(self, entry: ManifestEntry) -> bool:
        """Whether the slice rotation or `--deep N%` picks this older object (no budgets)."""
        options = self.options
        if options.rotation_bytes is not None:
            return False
        return slice_of(entry.key, options.rotation_runs) == (
            options.rotation_index % max(options.rotation_runs, 1)
        ) or (options.extra_percent > 0 and _fraction(entry.key) * 100 < options.extra_percent)

    def _unread(self, entry: ManifestEntry) -> None:
        with self._lock:
            self.unread_objects += 1
            self.unread_bytes += entry.size

    def _unproven(self, entry: ManifestEntry) -> None:
        with self._lock:
            self.unproven_from = min(self.unproven_from, entry.key)
            self.unproven_objects += 1
            self.unproven_bytes += entry.size

    def consider(self, entry: ManifestEntry) -> None:
        if self._failure is not None:
            raise self._failure
        self._pick(entry)
        self._next_key = entry.key + "\x00"
        self._maybe_report()

    def _maybe_report(self) -> None:
        """Call `on_progress` once a chunk of reads (objects or bytes) has finished."""
        options = self.options
        if options.on_progress is None or self._failure is not None:
            return
        with self._lock:
            done = (self.stats["deep"], self.stats["bytes"])
            if done[0] - self._reported[0] < max(options.progress_every_objects, 1) and done[
                1
            ] - self._reported[1] < max(options.progress_every_bytes, 1):
                return
            self._reported = done
            flying = self._in_flight
            new_keys = [k for k, kind in flying.items() if kind == "new"]
            rotation_keys = [k for k, kind in flying.items() if kind == "rotation"]
            unproven_from = min([*new_keys, self._next_key]) if self._next_key else ""
            rotation_next = min([*rotation_keys, self.rotation_next])
            if self.rotation_skipped is not None:
                rotation_next = min(rotation_next, self.rotation_skipped)
            progress = PassProgress(
                unproven_from=min(unproven_from, self.unproven_from),
                rotation_next=rotation_next,
                rotated=self.rotation_full and not rotation_keys and self.rotation_skipped is None,
                problems=self.problems.total,
                deep_checked=done[0],
                bytes_read=done[1],
            )
        options.on_progress(progress)

    def _pick(self, entry: ManifestEntry) -> None:
        options = self.options
        if not options.read_back:
            return
        if entry.key < options.read_from:
            return  # read by an earlier call of this verification
        pick = False
        new = self.is_new(entry)
        rotation = False
        if new:
            if options.new_bytes_budget is None or (
                self.new_bytes + entry.size <= options.new_bytes_budget
            ):
                self.new_bytes += entry.size
                pick = True
        elif options.rotation_bytes is not None:
            if (
                self.rotation_full
                or entry.key < options.rotation_from
                or (entry.uploaded and not options.rotate_uploaded)
            ):
                pass  # outside this slice, or just proven as a new object of this manifest
            elif self.rotation_used + entry.size <= options.rotation_bytes or (
                self.rotation_used == 0 and options.rotation_bytes > 0
            ):
                self.rotation_used += entry.size
                self.rotation_next = entry.key + "\x00"  # the next key after this one
                pick = rotation = True
            else:
                self.rotation_full = True
                self.rotation_next = entry.key
        elif slice_of(entry.key, options.rotation_runs) == (
            options.rotation_index % max(options.rotation_runs, 1)
        ) or (options.extra_percent > 0 and _fraction(entry.key) * 100 < options.extra_percent):
            pick = True
        elif options.extra_bytes and self.extra_bytes + entry.size <= options.extra_bytes:
            self.extra_bytes += entry.size
            pick = True
        if not pick and not new and options.extra_percent > 0:
            pick = _fraction(entry.key) * 100 < options.extra_percent
        if pick:
            if options.progress is not None:
                options.progress.add_work(1, entry.size)
            self._slots.acquire()
            with self._lock:
                self._in_flight[entry.key] = "new" if new else "rotation" if rotation else "other"
            future = self._pool.submit(self._read, entry, new, rotation)
            future.add_done_callback(lambda done: self._done(done, entry.key))

    def _done(self, future: Future[None], key: str) -> None:
        exc = future.exception()
        with self._lock:
            if exc is None:  # a failed read stays "in flight": it proved nothing
                self._in_flight.pop(key, None)
        self._slots.release()
        if exc is not None and self._failure is None:
            self._failure = exc

    def _read(self, entry: ManifestEntry, new: bool, rotation: bool) -> None:
        if self.options.should_stop is not None and self.options.should_stop():
            # Queued when the deadline came: not read, so not proven.
            self._unread(entry)
            with self._lock:
                self.read_from = min(self.read_from, entry.key)
            if new:
                self._unproven(entry)
            elif rotation:
                with self._lock:
                    self.rotation_skipped = min(self.rotation_skipped or entry.key, entry.key)
            return
        # A download cut off half-way says nothing about the object: read it again, and if
        # it still cannot be read, that is "could not look" (ObjectStoreError), not a verdict.
        for attempt in range(READ_ATTEMPTS):
            sha = hashlib.sha256()
            size = 0
            try:
                for chunk in self.store.read(self.destination.key(entry.key)):
                    sha.update(chunk)
                    size += len(chunk)
                break
            except ObjectNotFoundError:
                self.problems.add(entry.key, "missing", "listed, but gone when read back")
                return
            except ObjectStoreError:
                if attempt + 1 == READ_ATTEMPTS:
                    raise
                time.sleep(0.2 * 2**attempt)
        with self._lock:
            self.stats["deep"] += 1
            self.stats["deep_new"] += 1 if new else 0
            self.stats["bytes"] += size
            self.stats["bytes_new"] += size if new else 0
        if self.options.progress is not None:
            self.options.progress.advance(1, size)
        self._check_lock(entry)
        expected = expected_sha256(entry)
        if size != entry.size:
            self.problems.add(entry.key, "size", f"read {size} bytes, expected {entry.size}")
        elif expected and sha.hexdigest() != expected:
            self.problems.add(
                entry.key, "hash", f"content hashes to {sha.hexdigest()}, expected {expected}"
            )

    def rotation_outcome(self, complete: bool) -> tuple[str, bool]:
        """(where the rotation goes on next time, whether this slice is done)."""
        if self.options.rotation_bytes is None or self.options.rotation_bytes <= 0:
            return self.options.rotation_from, False
        if self.rotation_skipped is not None:
            return self.rotation_skipped, False
        if self.rotation_full:
            return self.rotation_next, True
        if complete:
            return "", True  # reached the end of the mirror: start over next time
        return self.rotation_next, False

    def _check_lock(self, entry: ManifestEntry) -> None:
        """An object read back must carry a lock far enough away: `lock_min_days` from
        now, and for one the run uploaded about `lock_days` from the manifest's time."""
        days = self.options.lock_days
        if days is None or not isinstance(self.store, RetentionSource):
            return
        got = self.store.retention(self.destination.key(entry.key))
        if got is None:
            self.problems.add(
                entry.key,
                "lock",
                f"no Object Lock retention (expected {days:g} days): whoever holds a key "
                "that can write can remove it",
            )
            return
        now = datetime.now(UTC)
        minimum = now + timedelta(days=self.options.lock_min_days)
        if entry.uploaded and self.header is not None:
            new_minimum = self.header.created_at + timedelta(days=days, seconds=-LOCK_NEW_SLACK)
            minimum = max(minimum, new_minimum)
        if got.until < minimum:
            self.problems.add(
                entry.key,
                "lock",
                f"{got.mode.lower()} retention ends {got.until.isoformat()}, before "
                f"{minimum.replace(microsecond=0).isoformat()} (object_lock days = {days:g}, "
                f"min_days = {self.options.lock_min_days:g})",
            )

    def close(self) -> None:
        """Wait for every read; re-raise what stopped one (idempotent)."""
        self._pool.shutdown(wait=True)
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure


def problems_report_key(manifest_key: str) -> str:
    """The full report sits beside the manifest: `<run>.jsonl.gz` → `<run>.report.jsonl.gz`."""
    return manifest_key.removesuffix(".jsonl.gz") + ".report.jsonl.gz"

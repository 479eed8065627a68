"""One mirror run: from a local restic repository to the destination, in an order that
keeps the remote copy usable whatever happens half-way.

    scan → plan (state store; one listing on first run) → upload phase by phase
    (config, keys, data, index, snapshots), each file hashed against its name first →
    deletions (only when enabled, only after every upload succeeded, only of objects gone
    locally for upload.delete_after, reverse order, bounded by the per-kind guards).

A run with nothing new reads the directory tree and the state store and sends nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from pydantic import ConfigDict

from cloud.contracts.destination import Destination
from cloud.contracts.events import ErrorKind, MirrorStats
from cloud.logic.ports import ListedObject
from local_agent.config import UploadConfig
from local_agent.errors import (
    DeadlineError,
    DestinationError,
    GuardError,
    RelayError,
    RepositoryError,
)
from local_agent.mirror.backend import Backend
from local_agent.mirror.deadline import StopRequested, StopSignal
from local_agent.mirror.objectlock import ObjectLock, ObjectLockPolicy
from local_agent.mirror.repository import (
    DELETE_ORDER,
    UPLOAD_ORDER,
    Digest,
    Kind,
    RepoFile,
    RepositoryScan,
    hash_file,
    kind_of_key,
    multipart_etags,
    scan_repository,
)
from local_agent.mirror.state import RemoteObject, StateStore
from local_agent.mirror.throttle import Throttle
from local_agent.mirror.uploader import ObjectUploader, part_size_candidates
from local_agent.report.progress import Progress
from local_agent.units import format_duration, format_size

log = logging.getLogger(__name__)

# Files below this go up from the bytes read for hashing (a default 16 MiB pack included),
# as long as `concurrency` of them fit in the budget: Backrest often runs on a small NAS.
KEEP_IN_MEMORY_BELOW = 32 * 1024 * 1024
KEEP_IN_MEMORY_BUDGET = 256 * 1024 * 1024
# restic's `config` is a few hundred bytes; anything far bigger is not one.
CONFIG_READ_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class MirrorOptions:
    repo_path: Path
    destination: Destination
    upload: UploadConfig  # `[upload]`: concurrency, deletion, part sizes, bandwidth
    dry_run: bool = False
    reconcile: bool = False
    run_id: str | None = None
    object_lock: ObjectLockPolicy | None = None  # `[destination] object_lock`


class RunStats(MirrorStats):
    """The event's counters, counted up while the run goes (the contract declares them)."""

    model_config = ConfigDict(frozen=False)


class RunError(TypedDict):
    kind: ErrorKind
    message: str


@dataclass
class MirrorSummary:
    """What a run did; printed as JSON with `--json` and the basis of completion events."""

    status: str = "ok"
    exit_code: int = 0
    repo_path: str = ""
    destination: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    stats: RunStats = field(default_factory=RunStats)
    pending_deletions: int = 0  # gone locally, deleted remotely once upload.delete_after passed
    next_deletion_due: str | None = None  # ISO 8601 UTC
    aborted_uploads: int = 0
    retention_extended: int = 0  # objects whose Object Lock retention this run extended
    listed_objects: int | None = None
    new_snapshots: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    error: RunError | None = None
    run_id: str | None = None
    manifest: dict[str, Any] | None = None
    event: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The `--json` summary: the counters sit at the top level, beside the rest."""
        out = asdict(self)
        out.update(out.pop("stats").model_dump())
        return out


# Deletion guards (docs/mirror.md "Deletions"). `config` and `keys/` are never deleted.
NEVER_DELETED = frozenset({Kind.CONFIG, Kind.KEYS})
# Snapshots the mirror may lose, net, between two accepted runs whatever the share: a small
# repository's `forget --keep-last N` must not need a human.
SNAPSHOT_ALLOWANCE = 2
# Pack bytes that may go in a run that did not also replace index files (a prune that drops
# packs from the index always does), whatever the share: one default pack.
DATA_ALLOWANCE_BYTES = 16 * 1024 * 1024
# Retention extensions per run at most (PutObjectRetention has no batch form); the rest
# follow in the next runs, long before their locks end.
RENEW_LIMIT = 10_000
# Local snapshot count at the last run whose deletions the guard accepted.
SNAPSHOT_BASELINE = "delete_guard_snapshots"


@dataclass
class _Deletions:
    """Remote objects gone from the local repository, as this run sees them."""

    gone: list[RemoteObject]  # every deletable object gone locally
    new: list[RemoteObject]  # gone since the last accepted run (not marked yet)
    marks: dict[str, float]  # key → first seen gone, for those marked before
    local: dict[Kind, int]  # local file count per kind
    remote_data_bytes: int  # pack bytes at the destination
    snapshot_baseline: int  # local snapshots at the last accepted run
    now: float

    def since(self, key: str) -> float:
        return self.marks.get(key, self.now)

    def due(self, delay: float) -> list[RemoteObject]:
        return [o for o in self.gone if self.since(o.key) + delay <= self.now]

    def pending(self, delay: float) -> list[float]:
        """When each not-yet-due deletion falls due."""
        return [
            self.since(o.key) + delay for o in self.gone if self.since(o.key) + delay > self.now
        ]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(slots=True)
class _Work:
    file: RepoFile
    listed: ListedObject | None = None  # the object a listing found under the same key


class MirrorRun:
    def __init__(
        self,
        options: MirrorOptions,
        backend: Backend,
        state: StateStore,
        *,
        stop: StopSignal,
        progress: Progress | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` (epoch seconds) decides when deferred deletions fall due; tests pass
        their own instead of waiting days."""
        self.options = options
        self.summary = MirrorSummary(
            repo_path=str(options.repo_path),
            destination=options.destination.model_dump(),
            dry_run=options.dry_run,
        )
        self.backend = backend
        self.state = state
        self.stop = stop
        self.progress = progress
        self.clock = clock
        self._lock = threading.Lock()
        self._strays_checked = False
        self._strays_lock = threading.Lock()
        self._first_error: RelayError | None = None
        self._unreadable: list[str] = []
        self._remote_only: list[RemoteObject] = []  # from this run's listing, if any

    # -- entry point ----------------------------------------------------------------------

    def execute(self) -> MirrorSummary:
        started = time.monotonic()
        try:
            self._execute()
        except RelayError as exc:
            self._fail(exc)
        finally:
            self.summary.stats.requests = self.backend.requests
            self.summary.stats.duration_seconds = round(time.monotonic() - started, 3)
        return self.summary

    def _fail(self, exc: RelayError) -> None:
        self.summary.status = "failed"
        self.summary.exit_code = int(exc.exit_code)
        self.summary.error = {"kind": exc.kind, "message": exc.message}

    def _execute(self) -> None:
        options = self.options
        reconcile = options.reconcile or not self.state.reconciled
        # When the bucket is about to be listed, nothing the store says is trusted.
        known = None if reconcile else self.state.known_sizes()
        scan = scan_repository(options.repo_path, known_sizes=known)
        self.summary.stats.files = len(scan.files)
        self.summary.stats.bytes = scan.total_bytes
        self.summary.skipped = [{"key": s.key, "reason": s.reason} for s in scan.skipped]
        if scan.skipped:
            log.warning(
                "skipped %d entries that are not restic files (first: %s — %s)",
                len(scan.skipped),
                scan.skipped[0].key,
                scan.skipped[0].reason,
            )

        listing = self._listing() if reconcile else None
        work = self._plan(scan, listing, known)
        deletions = self._deletion_candidates(scan, listing) if options.upload.delete else None
        if not options.upload.delete and not options.dry_run:
            self._forget_deletion_history()
        if options.dry_run:
            self._report_plan(work, deletions)
            return

        if options.object_lock is not None and self.backend.lock is None:
            # One retain-until date for everything this run writes, manifest included.
            self.backend.lock = options.object_lock.lock_at(self.clock())
        self._upload(work)
        self._abort_orphaned_uploads(scan)
        if self._strays_checked:
            # A lost reply to CreateMultipartUpload makes botocore start a second upload;
            # the first would stay unfinished (and billed). Look once more, now that every
            # upload of this run is complete.
            self._abort_stray_uploads()
        self._renew_retention(scan)
        self._delete(deletions)
        if self.stop.reason == "deadline":
            raise DeadlineError(
                "deadline reached while deleting; the mirror is consistent and the next run "
                "finishes the deletions"
            )
        if listing is not None:
            self.state.mark_reconciled()

    # -- planning -------------------------------------------------------------------------

    def _listing(self) -> dict[str, ListedObject]:
        """One paginated listing of the prefix: ⌈N/1000⌉ requests, only on first run,
        after lost state, or with --reconcile."""
        log.info("reading the destination listing once (%s)", self.options.destination.describe())
        listing = {
            item.key: item for item in self.backend.list() if kind_of_key(item.key) is not None
        }
        self.summary.listed_objects = len(listing)
        return listing

    def _plan(
        self,
        scan: RepositoryScan,
        listing: dict[str, ListedObject] | None,
        known: dict[str, int] | None,
    ) -> dict[Kind, list[_Work]]:
        if known is None:
            known = self.state.known_sizes()
        # Identity first: a refused run must change nothing, the state store included.
        self._check_config(scan, listing)
        if listing is not None:
            # The listing is the truth about the bucket; the store is rebuilt from it.
            adopt = [
                RemoteObject(
                    key=item.key,
                    size=item.size,
                    sha256=None,
                    md5=None if item.multipart else item.etag,
                    etag=item.etag,
                )
                for item in listing.values()
                if item.key not in scan.files
            ]
            if not self.options.dry_run:
                self.state.forget_all()
                self.state.put_many(adopt)
            # What the store now holds (a dry run left it as it was): the deletion
            # candidates come from this, so a dry run plans the deletions the run makes.
            self._remote_only = adopt
            known = {o.key: o.size for o in adopt}
        work: dict[Kind, list[_Work]] = {kind: [] for kind in UPLOAD_ORDER}
        present = 0  # counted here, stored once: the counters are a pydantic model
        for key, file in scan.files.items():
            if known.get(key) == file.size:
                present += 1
                continue
            listed = listing.get(key) if listing is not None else None
            work[file.kind].append(
                _Work(file, listed if listed and listed.size == file.size else None)
            )
        self.summary.stats.already_present += present
        for items in work.values():
            # Biggest first: the phase then ends on small files, not on one thread still
            # sending a pack while the others wait at the phase boundary. (Keys break ties,
            # so runs are repeatable whatever order the directory listing came in.)
            items.sort(key=lambda w: (-w.file.size, w.file.key))
        return work

    def _check_config(self, scan: RepositoryScan, listing: dict[str, ListedObject] | None) -> None:
        """Refuse to mix two repositories under one prefix: `config` never changes.

        The bucket is the judge, not the state store: when the store holds no record of
        the remote `config` (lost, rebuilt, written by an older version), a run that would
        upload `config` reads the remote one first (one GET, only in such runs), so a
        different repository mounted at the same path can never replace it or add its keys.
        """
        local = scan.files["config"]
        path = self.options.repo_path / "config"
        digest, data = hash_file(path, keep_below=CONFIG_READ_LIMIT)
        same = True
        if listing is not None:
            item = listing.get("config")
            if item is not None:
                if item.size != local.size:
                    same = False
                elif item.multipart:
                    same = self._remote_config_equals(path, data)
                else:
                    same = item.etag == digest.md5
        else:
            stored = self.state.get("config")
            if stored is not None and stored.md5 is not None:
                same = stored.md5 == digest.md5
            else:
                # No trusted record (in practice no record at all, so this run would upload
                # `config`): the bucket decides.
                same = self._remote_config_equals(path, data)
        if not same:
            raise GuardError(
                f"{self.options.destination.describe()} already holds a different restic "
                "repository (its config differs from the one at "
                f"{self.options.repo_path}); is the right disk mounted? Otherwise use "
                "another prefix — nothing was changed"
            )

    def _remote_config_equals(self, path: Path, data: bytes | None) -> bool:
        """Whether the bucket's `config` is absent or byte-identical to the local one."""
        remote = self.backend.read("config", limit=CONFIG_READ_LIMIT)
        if remote is None:
            return True
        if data is None:
            raise RepositoryError(f"{path}: not a restic config (larger than expected)")
        return remote == data

    def _forget_deletion_history(self) -> None:
        """Deletion turned off: nothing is pending, and when it is turned on again every
        wait and the guard's baseline start afresh."""
        if self.state.has_gone_marks():
            self.state.clear_all_gone()
        if self.state.get_meta(SNAPSHOT_BASELINE) is not None:
            self.state.delete_meta(SNAPSHOT_BASELINE)

    def _deletion_candidates(
        self, scan: RepositoryScan, listing: dict[str, ListedObject] | None
    ) -> _Deletions:
        """Remote objects gone locally, read before this run uploads anything: what is at
        the destination then is the guard's fall-back baseline."""
        local: dict[Kind, int] = dict.fromkeys(Kind, 0)
        for file in scan.files.values():
            local[file.kind] += 1
        marks = self.state.gone_marks()
        gone: list[RemoteObject] = []
        remote_snapshots = 0
        remote_data_bytes = 0
        objects = self.state.iter_objects() if listing is None else iter(self._remote_only)
        for obj in objects:
            kind = kind_of_key(obj.key)
            if listing is None:
                remote_snapshots += kind is Kind.SNAPSHOTS and obj.key not in marks
                remote_data_bytes += obj.size if kind is Kind.DATA else 0
            if obj.key not in scan.files and kind is not None and kind not in NEVER_DELETED:
                gone.append(obj)
        if listing is not None:
            # The store was just rebuilt from the listing and holds only remote-only objects.
            for item in listing.values():
                kind = kind_of_key(item.key)
                remote_snapshots += kind is Kind.SNAPSHOTS and item.key not in marks
                remote_data_bytes += item.size if kind is Kind.DATA else 0
        new = [o for o in gone if o.key not in marks]
        stored = self.state.get_meta(SNAPSHOT_BASELINE)
        gone_keys = {o.key for o in gone}
        return _Deletions(
            gone=gone,
            new=new,
            marks={k: t for k, t in marks.items() if k in gone_keys},
            local=local,
            remote_data_bytes=remote_data_bytes,
            snapshot_baseline=int(stored) if stored is not None else remote_snapshots,
            now=self.clock(),
        )

    def _report_plan(self, work: dict[Kind, list[_Work]], deletions: _Deletions | None) -> None:
        self.summary.status = "dry-run"
        plan: dict[str, Any] = {
            "upload": {
                kind.name.lower(): {
                    "files": len(items),
                    "bytes": sum(w.file.size for w in items),
                    "adopt_if_identical": sum(1 for w in items if w.listed is not None),
                }
                for kind, items in work.items()
            },
            "delete": 0,
        }
        if deletions is not None:
            delay = self.options.upload.delete_after_seconds
            pending = deletions.pending(delay)
            plan["delete"] = len(deletions.due(delay))
            plan["delete_pending"] = len(pending)
            plan["delete_next_due"] = _iso(min(pending)) if pending else None
            self._note_pending(pending)
            if pending:
                log.info(
                    "dry run: %d deletion(s) would be pending; the next falls due %s",
                    len(pending),
                    plan["delete_next_due"],
                )
            if deletions.gone:
                try:
                    self._delete_guard(deletions)
                    plan["delete_guard"] = "ok"
                except GuardError as exc:
                    plan["delete_guard"] = exc.message
        self.summary.plan = plan

    def _note_pending(self, pending: list[float]) -> None:
        self.summary.pending_deletions = len(pending)
        self.summary.next_deletion_due = _iso(min(pending)) if pending else None

    # -- uploading ------------------------------------------------------------------------

    def _abort_stray_uploads_once(self) -> None:
        """Unfinished multipart uploads under the prefix that this store does not own are
        billed by B2 until aborted. Checked once, just before this run's first upload, so
        only runs that upload pay for the listing; every upload waits for it, so none of
        this run's own uploads can be mistaken for a stray."""
        with self._strays_lock:
            if not self._strays_checked:
                self._abort_stray_uploads()
                self._strays_checked = True

    def _abort_stray_uploads(self) -> None:
        owned = {p.upload_id for p in self.state.pending_uploads()}
        try:
            for upload in self.backend.list_multipart_uploads():
                if upload.upload_id not in owned:
                    self.backend.abort_multipart(upload.key, upload.upload_id)
                    self.summary.aborted_uploads += 1
        except DestinationError as exc:
            log.warning("could not clean up unfinished uploads: %s", exc.message)
        if self.summary.aborted_uploads:
            log.info("aborted %d unfinished multipart uploads", self.summary.aborted_uploads)

    def _abort_orphaned_uploads(self, scan: RepositoryScan) -> None:
        """A multipart upload this store owns for a file that is gone locally (a run
        stopped half-way, then prune removed the pack) would never be resumed, and B2 bills
        it until aborted. Costs a request only when there is such an upload."""
        for pending in self.state.pending_uploads():
            if pending.key in scan.files:
                continue
            try:
                self.backend.abort_multipart(
                    self.options.destination.key(pending.key), pending.upload_id
                )
            except DestinationError as exc:  # billing, not consistency: try again next run
                log.warning("could not abort the unfinished upload of %s: %s", pending.key, exc)
                continue
            self.state.end_upload(pending.key)
            self.summary.aborted_uploads += 1
            log.info("aborted the unfinished upload of %s (gone locally)", pending.key)

    def _upload(self, work: dict[Kind, list[_Work]]) -> None:
        settings = self.options.upload
        bandwidth = settings.bandwidth_bytes_per_second
        uploader = ObjectUploader(
            self.backend,
            self.state,
            multipart_threshold=settings.multipart_threshold_bytes,
            part_size=settings.part_size_bytes,
            throttle=Throttle(bandwidth) if bandwidth else None,
            stop=self.stop,
            run_id=self.options.run_id,
            on_bytes=lambda n: self.progress.advance(size=n) if self.progress else None,
        )
        if self.progress:
            self.progress.add_work(
                sum(len(v) for v in work.values()),
                sum(w.file.size for v in work.values() for w in v),
            )
        for kind in UPLOAD_ORDER:
            items = work[kind]
            if not items:
                continue
            if self.progress:
                self.progress.set_phase(kind.folder or "config")
            if self._first_error is None and not (self.summary.corrupt or self._unreadable):
                self._run_parallel(items, lambda item: self._transfer(item, uploader))
            elif self._first_error is None:
                # A file that is corrupt or cannot be read stopped the uploads: a later
                # phase may name it (an index its pack, a snapshot its trees). Still name
                # every bad file.
                self._run_parallel(items, self._verify_only)
        if self.summary.corrupt or self._unreadable:
            names = self.summary.corrupt + self._unreadable
            raise RepositoryError(
                f"{len(names)} local file(s) do not match their content hash or cannot be "
                f"read and were not uploaded: {', '.join(names[:20])}"
                + (" …" if len(names) > 20 else "")
                + " — run `restic check --read-data` on the local repository"
            )
        if self._first_error is not None:
            raise self._first_error
        reason = self.stop.reason
        if reason == "deadline":
            raise DeadlineError(
                "deadline reached; the mirror is consistent and the next run resumes where "
                "this one stopped"
            )

    def _record_error(self, exc: RelayError) -> None:
        with self._lock:
            if self._first_error is None:
                self._first_error = exc
        self.stop.stop(exc.kind)

    def _run_parallel(self, items: Iterable[_Work], task: Callable[[_Work], None]) -> None:
        """Run `task` over `items` on `concurrency` threads, pulling lazily so memory does
        not grow with the number of files."""
        source: Iterator[_Work] = iter(items)
        source_lock = threading.Lock()

        def worker() -> None:
            while self.stop.reason is None:
                with source_lock:
                    item = next(source, None)
                if item is None:
                    return
                try:
                    task(item)
                except StopRequested:
                    return
                except RelayError as exc:
                    self._record_error(exc)
                    return
                except Exception as exc:
                    # A defect, not a verdict on the data: it must still stop the later
                    # phases, and the run must not end as if this file had gone up.
                    log.debug("unexpected error on %s", item.file.key, exc_info=True)
                    self._record_error(
                        RelayError(f"{item.file.key}: unexpected {type(exc).__name__}: {exc}")
                    )
                    return

        threads = [
            threading.Thread(target=worker, name=f"upload-{i}", daemon=True)
            for i in range(self.options.upload.concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _hash(self, item: _Work) -> tuple[Any, bytes | None] | None:
        file = item.file
        path = self.options.repo_path / file.key
        try:
            digest, data = hash_file(
                path,
                keep_below=min(
                    KEEP_IN_MEMORY_BELOW,
                    KEEP_IN_MEMORY_BUDGET // self.options.upload.concurrency,
                    self.options.upload.multipart_threshold_bytes,
                ),
            )
        except RepositoryError as exc:
            log.error("%s", exc.message)
            with self._lock:
                self._unreadable.append(file.key)
            return None
        expected = file.expected_sha256
        if expected is not None and digest.sha256 != expected:
            log.error("%s: content hash %s does not match its name", file.key, digest.sha256)
            with self._lock:
                self.summary.corrupt.append(file.key)
            return None
        return digest, data

    def _verify_only(self, item: _Work) -> None:
        self._hash(item)
        if self.progress:
            self.progress.advance(files=1)

    def _transfer(self, item: _Work, uploader: ObjectUploader) -> None:
        self.stop.check()
        hashed = self._hash(item)
        if hashed is None:
            return
        digest, data = hashed
        file = item.file
        listed = item.listed
        if listed is not None and self._proven(file, digest, listed):
            # Already there from an earlier tool or a lost state: adopt, do not re-send.
            self.state.put(
                RemoteObject(file.key, file.size, digest.sha256, digest.md5, listed.etag)
            )
            with self._lock:
                self.summary.stats.adopted_files += 1
            if self.progress:
                self.progress.advance(files=1, size=file.size)
            return
        self._abort_stray_uploads_once()
        uploader.upload(file, self.options.repo_path / file.key, digest, data)
        if self.backend.lock is not None:
            version = self.backend.take_version(file.key)
            self.state.set_retention([file.key], self.backend.lock.until_epoch, version)
        with self._lock:
            self.summary.stats.uploaded_files += 1
            self.summary.stats.uploaded_bytes += file.size
            if file.kind is Kind.SNAPSHOTS:
                self.summary.new_snapshots.append(file.name)
        if self.progress:
            self.progress.advance(files=1)

    def _proven(self, file: RepoFile, digest: Digest, listed: ListedObject) -> bool:
        """Whether a listed object holds exactly the local bytes, so it can be adopted.

        Single-part: its ETag is the MD5 of its bytes. Multipart (`…-N`): the ETag the local
        file would have in parts of each plausible part size (this agent's, then the usual
        sizes of S3 tools, then the even split) is computed locally; failing a match, the
        object is read back and hashed. Anything else is replaced by an upload.
        """
        if not listed.multipart:
            if listed.etag == digest.md5:
                return True
        else:
            path = self.options.repo_path / file.key
            candidates = part_size_candidates(
                file.size, listed.parts, self.options.upload.part_size_bytes
            )
            if candidates and listed.etag in multipart_etags(path, candidates).values():
                return True
            if self.backend.sha256_of(file.key) == digest.sha256:
                return True
        log.warning(
            "%s: the copy at the destination differs from the local file (ETag %s); replacing it",
            file.key,
            listed.etag,
        )
        return False

    # -- deleting -------------------------------------------------------------------------

    def _delete_guard(self, d: _Deletions) -> None:
        """Refuse (exit 5, nothing deleted) what a mistake or an attack looks like, per
        kind; a normal `forget --prune` passes. The rules are in docs/mirror.md."""
        limit = self.options.upload.max_delete_percent
        hint = (
            "nothing was deleted. If the local repository really lost them, allow it for one "
            "run with BACKREST_RELAY_UPLOAD__MAX_DELETE_PERCENT=100 (deletion still waits "
            "upload.delete_after)"
        )
        for kind, noun in (
            (Kind.SNAPSHOTS, "snapshot"),
            (Kind.INDEX, "index file"),
            (Kind.DATA, "pack"),
        ):
            going = [o for o in d.gone if kind_of_key(o.key) is kind]
            if going and d.local[kind] == 0:
                raise GuardError(
                    f"refusing to delete {kind.folder}/: the local repository has no "
                    f"{noun} left, and the mirror never loses all of its {kind.folder}/ "
                    f"({len(going)} at the destination); nothing was deleted. Check that "
                    "the right disk is mounted and the repository is intact"
                )
        new_snapshots = sum(1 for o in d.new if kind_of_key(o.key) is Kind.SNAPSHOTS)
        if new_snapshots:
            loss = d.snapshot_baseline - d.local[Kind.SNAPSHOTS]
            allowed = max(SNAPSHOT_ALLOWANCE, limit / 100 * d.snapshot_baseline)
            if loss > allowed:
                raise GuardError(
                    f"refusing to mirror the deletion of snapshots/: {new_snapshots} "
                    f"snapshot(s) gone locally since the last run leave "
                    f"{d.local[Kind.SNAPSHOTS]} of {d.snapshot_baseline} (a net loss of "
                    f"{loss} > max({SNAPSHOT_ALLOWANCE}, upload.max_delete_percent = "
                    f"{limit:g}% of {d.snapshot_baseline})); {hint}"
                )
        new_index = any(kind_of_key(o.key) is Kind.INDEX for o in d.new)
        new_data = [o for o in d.new if kind_of_key(o.key) is Kind.DATA]
        if new_data and not new_index:
            # A prune that drops packs also replaces index files; packs vanishing while
            # the index stays the same is a damaged or rolled-back disk, not a prune.
            gone_bytes = sum(o.size for o in new_data)
            allowed = max(DATA_ALLOWANCE_BYTES, limit / 100 * d.remote_data_bytes)
            if gone_bytes > allowed:
                raise GuardError(
                    f"refusing to mirror the deletion of data/: {len(new_data)} pack(s) "
                    f"({format_size(gone_bytes)} of {format_size(d.remote_data_bytes)}) "
                    "gone locally while no index file changed (a prune replaces index "
                    f"files) — more than upload.max_delete_percent = {limit:g}% or "
                    f"{format_size(DATA_ALLOWANCE_BYTES)}; {hint}"
                )

    def _delete(self, d: _Deletions | None) -> None:
        """Mark what newly went, then delete what stayed gone for `delete_after`:
        snapshots, then index, then packs, each kind finished before the next."""
        if d is None:
            return
        if d.gone:
            self._delete_guard(d)  # a refusal changes nothing, marks included
        gone_keys = {o.key for o in d.gone}
        stale = [k for k in self.state.gone_marks() if k not in gone_keys]
        if stale:
            # Back locally, or no longer at the destination: its clock starts afresh.
            self.state.clear_gone(stale)
        if not d.gone:
            self._set_baseline(d)
            return
        if d.new:
            self.state.mark_gone([o.key for o in d.new], d.now)
        self._set_baseline(d)
        delay = self.options.upload.delete_after_seconds
        due = d.due(delay)
        self._note_pending(d.pending(delay))
        if self.summary.pending_deletions:
            log.info(
                "%d deletion(s) pending (upload.delete_after = %s); the next is due %s",
                self.summary.pending_deletions,
                format_duration(delay),
                self.summary.next_deletion_due,
            )
        for kind in DELETE_ORDER:
            keys = [o.key for o in due if kind_of_key(o.key) is kind]
            if not keys:
                continue
            self._run_parallel((_Work(RepoFile(k, kind, 0)) for k in keys), self._delete_one)
            if self._first_error is not None:
                raise self._first_error
            if self.stop.reason is not None:
                return  # the deadline: later kinds wait for the next run
        if self.summary.stats.deleted_files:
            log.info(
                "deleted %d objects gone locally for at least %s",
                self.summary.stats.deleted_files,
                format_duration(delay),
            )

    def _set_baseline(self, d: _Deletions) -> None:
        if self.state.get_meta(SNAPSHOT_BASELINE) != str(d.local[Kind.SNAPSHOTS]):
            self.state.set_meta(SNAPSHOT_BASELINE, str(d.local[Kind.SNAPSHOTS]))

    def _delete_one(self, item: _Work) -> None:
        self.backend.delete(item.file.key)
        self.state.forget(item.file.key)
        self.state.clear_gone([item.file.key])
        with self._lock:
            self.summary.stats.deleted_files += 1

    # -- Object Lock retention ------------------------------------------------------------

    def _renew_retention(self, scan: RepositoryScan) -> None:
        """Extend the retention of objects still in the local repository once they enter
        the renewal window (fewer than `renew_days` left, or unknown). Objects gone
        locally are left to age out. Nothing due — the usual run — sends nothing."""
        policy = self.options.object_lock
        if policy is None:
            return
        now = self.clock()
        due: list[RepoFile] = []
        for key in self.state.retention_due(policy.renew_before(now)):
            file = scan.files.get(key)
            if file is not None:
                due.append(file)
                if len(due) == RENEW_LIMIT:
                    break
        if not due:
            return
        lock = policy.lock_at(now)
        log.info(
            "extending the Object Lock retention of %d object(s) to %s",
            len(due),
            lock.until.isoformat(),
        )
        self._run_parallel((_Work(f) for f in due), lambda item: self._renew_one(item, lock))
        if self._first_error is not None:
            raise self._first_error

    def _renew_one(self, item: _Work, lock: ObjectLock) -> None:
        # The version this agent wrote, when known: an attacker's newer version of the key
        # must not be the one kept alive while the genuine one's lock runs out.
        version = self.state.retention_version(item.file.key)
        self.backend.put_retention(item.file.key, lock, version_id=version)
        self.state.set_retention([item.file.key], lock.until_epoch)
        with self._lock:
            self.summary.retention_extended += 1

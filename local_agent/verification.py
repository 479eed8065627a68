"""`backrest-relay verify`: the verifier, run from any machine with read access.

Finds the newest manifest of the repository in the bucket (or the one of `--run`), runs
the same verification the Lambda runs (`cloud.app.verify`), records it in the local run store,
and prints a readable report. Exit 0 verified · 3 problems found · 4 destination
unreachable · 6 `--time-limit` reached (progress saved: the next `verify` continues).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

from cloud.app.verify import ManifestVerification, verify_manifest_resumable
from cloud.contracts.events import ManifestRef, MirrorVerified, RepoRef
from cloud.contracts.ids import is_run_id
from cloud.contracts.manifest import manifest_key
from cloud.integrations.redact import REDACTOR
from cloud.logic.ports import ObjectStoreError
from cloud.logic.verify import VerifyOptions
from local_agent.config import lock_check, report_lock
from local_agent.errors import ConfigError, DestinationError, ExitCode
from local_agent.units import format_duration, format_size, parse_duration, parse_size

if TYPE_CHECKING:
    from local_agent.config import RelayConfig
    from local_agent.identity import RepoIdentity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeepSpec:
    percent: float = 0.0
    size: int = 0


def parse_deep(text: str | None) -> DeepSpec:
    """`--deep 5%` re-reads a further 5 % of the older objects; `--deep 2GiB` up to 2 GiB."""
    if not text:
        return DeepSpec()
    stripped = text.strip()
    if stripped.endswith("%"):
        try:
            percent = float(stripped[:-1])
        except ValueError:
            raise ConfigError(f"--deep {text!r}: expected a percentage like 5% or a size") from None
        if not 0 <= percent <= 100:
            raise ConfigError(f"--deep {text!r}: a percentage is between 0% and 100%")
        return DeepSpec(percent=percent)
    try:
        return DeepSpec(size=parse_size(stripped))
    except ValueError as exc:
        raise ConfigError(f"--deep: {exc}") from None


def find_manifest(store: Any, prefix: str, run_id: str | None) -> str | None:
    """The key of the run's manifest, else the newest one (run ids sort by time)."""
    if run_id:
        return manifest_key(prefix, run_id)
    newest: str | None = None
    for item in store.list(prefix.rstrip("/") + "/"):
        name = item.key.rpartition("/")[2]
        # Not a report: `<run>.report.jsonl.gz`, nor a fan-out chunk's
        # `<run>.report.part-0000.jsonl.gz` (which sorts after its manifest).
        if name.endswith(".jsonl.gz") and ".report." not in name:
            newest = max(newest or item.key, item.key)
    return newest


def recorded_manifest(
    config: RelayConfig, destination: Any, repo_guid: str | None
) -> ManifestRef | None:
    """The manifest this host's last upload wrote (key and SHA-256), if this host has one.

    Lets a manual verify detect a manifest altered or deleted in the bucket; elsewhere
    (another machine, no guid) the newest manifest in the bucket is taken as found.
    """
    from local_agent.mirror.state import LAST_MANIFEST, StateStore, state_file_name

    if not repo_guid:
        return None
    path = config.state.path() / state_file_name(destination, repo_guid)
    if not path.exists():
        return None
    state = StateStore(path)
    try:
        raw = state.get_meta(LAST_MANIFEST)
    finally:
        state.close()
    return ManifestRef.model_validate_json(raw) if raw else None


@dataclass(frozen=True)
class VerifyRequest:
    """What `verify` was asked; the fields are named after its options."""

    run: str | None = None  # --run: this upload run's manifest (None: the newest)
    deep: str | None = None
    time_limit: str | None = None
    list_only: bool = False
    json: bool = False


def run_verify(config: RelayConfig, identity: RepoIdentity, request: VerifyRequest) -> int:
    run_id, deep, time_limit = request.run, request.deep, request.time_limit
    repo_id, repo_guid = identity.repo_id, identity.guid
    if not repo_id and not repo_guid:
        raise ConfigError("verify needs --repo-id or --repo-guid")
    if run_id is not None and not is_run_id(run_id):
        raise ConfigError(
            f"--run {run_id!r}: not a run id (a UUID like 0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b, "
            "as printed by `upload` and `status`)"
        )
    if request.list_only and deep:
        raise ConfigError("--list-only reads nothing back; it cannot be combined with --deep")
    spec = parse_deep(deep)
    reads = _ReadCounter()
    deadline: float | None = None
    if time_limit is not None:  # `--time-limit "$UNSET"` is an error, not no limit
        try:
            seconds = parse_duration(time_limit)
        except ValueError as exc:
            raise ConfigError(f"--time-limit: {exc}") from None
        if seconds <= 0:
            raise ConfigError(f"--time-limit {time_limit!r}: must be more than 0s")
        deadline = time.monotonic() + seconds
    terminated = threading.Event()

    def should_stop() -> bool:
        # SIGTERM stops the call like its time limit: the progress is saved (exit 6).
        # At least one object per call, so calling again always gets further (a limit
        # shorter than the listing would otherwise never finish).
        if terminated.is_set():
            return True
        return deadline is not None and time.monotonic() >= deadline and reads.done > 0

    with _stop_on_sigterm(terminated):
        return _verify(config, identity, request, spec=spec, should_stop=should_stop, reads=reads)


@contextmanager
def _stop_on_sigterm(terminated: threading.Event) -> Iterator[None]:
    """A service manager stopping `verify` (SIGTERM) sets `terminated`: no new read starts
    and what was read is saved for the next call, instead of being lost with the process.
    A second SIGTERM ends it at once (the handler before is back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # installed outside Python: put the default back
        previous = signal.SIG_DFL

    def handler(signum: int, frame: FrameType | None) -> None:
        terminated.set()
        signal.signal(signal.SIGTERM, previous)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _verify(
    config: RelayConfig,
    identity: RepoIdentity,
    request: VerifyRequest,
    *,
    spec: DeepSpec,
    should_stop: Callable[[], bool],
    reads: _ReadCounter,
) -> int:
    from cloud.integrations.s3 import make_s3_client
    from cloud.integrations.s3_store import S3ObjectStore, S3ReportSink
    from local_agent.events.pipeline import open_run_store

    run_id, as_json = request.run, request.json
    repo_id, repo_guid = identity.repo_id, identity.guid
    destination = config.destination_for(repo_id=repo_id, repo_guid=repo_guid)
    prefix = config.manifest_prefix_for(repo_id=repo_id, repo_guid=repo_guid)
    client = make_s3_client(config.destination.access(), max_pool_connections=16)
    store = S3ObjectStore(client, destination.bucket)
    runs = open_run_store(config.state.path())
    repo = RepoRef(id=repo_id, guid=repo_guid)
    started = datetime.now(UTC)
    try:
        recorded = recorded_manifest(config, destination, repo_guid)
        key = find_manifest(store, prefix, run_id)
        if recorded is not None and run_id is None:
            # This host wrote the newest manifest: verify that one, so a deleted newest
            # manifest is a problem, not a silent fall-back to an older one.
            key = recorded.key
        if key is None:
            raise ConfigError(
                f"no manifest under {destination.bucket}/{prefix}/ — has an upload of this "
                "repository completed yet?"
            )
        options = VerifyOptions(
            rotation_index=runs.verification_count(repo.key),
            extra_percent=spec.percent,
            extra_bytes=spec.size,
            concurrency=config.upload.concurrency,
            should_stop=should_stop,
            progress=reads,
            read_back=not request.list_only,
            **lock_check(config),
        )
        expected = recorded.sha256 if recorded is not None and recorded.key == key else None
        checked = verify_manifest_resumable(
            key,
            expected_sha256=expected,
            repo=repo,
            destination=destination,
            store=store,
            runs=runs,
            reports=S3ReportSink(client, destination.bucket, **report_lock(config)),
            options=options,
            deep=request.deep or "",
            started_at=started,
            run_id=run_id,
        )
    except ObjectStoreError as exc:
        raise DestinationError(f"cannot read the mirror: {exc}") from None
    result = checked.result
    if result is None:
        return _unfinished(checked, as_json)
    verified = isinstance(result, MirrorVerified)
    if as_json:
        sys.stdout.write(REDACTOR(result.model_dump_json()) + "\n")
    else:
        _print_report(result.model_dump(mode="json"), verified)
        if checked.calls > 1:
            sys.stdout.write(f"  (over {checked.calls} verify calls, each object read once)\n")
    return int(ExitCode.OK if verified else ExitCode.LOCAL_INTEGRITY)


class _ReadCounter:
    """Counts finished reads (`VerifyProgress`), for the at-least-one-read rule."""

    def __init__(self) -> None:
        self.done = 0

    def add_work(self, files: int, size: int) -> None:
        pass

    def advance(self, files: int = 0, size: int = 0) -> None:
        self.done += files


def _unfinished(checked: ManifestVerification, as_json: bool) -> int:
    """The time limit came first: say what is saved and that the next call continues."""
    message = (
        f"time limit reached: progress saved: {checked.objects_read} objects "
        f"({format_size(checked.bytes_read)}) read back so far, {checked.unread_objects} "
        f"({format_size(checked.unread_bytes)}) still unproven; run `backrest-relay verify` "
        "again to continue"
    )
    if as_json:
        summary = {
            "unfinished": True,
            "objects_read": checked.objects_read,
            "bytes_read": checked.bytes_read,
            "unproven_objects": checked.unread_objects,
            "unproven_bytes": checked.unread_bytes,
            "calls": checked.calls,
        }
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        sys.stdout.write(message + "\n")
    log.warning("%s", message)
    return int(ExitCode.DEADLINE)


def _print_report(result: dict[str, Any], verified: bool) -> None:
    stats = result["stats"]
    dest = result["destination"]
    lines = [
        f"{'VERIFIED' if verified else 'VERIFICATION FAILED'}: "
        f"{dest['bucket']}/{dest['prefix']} against manifest {result['manifest']['key']}",
        f"  objects in manifest: {result['manifest']['objects']}, listed: {stats['listed']} "
        f"({stats['list_requests']} list requests), compared: {stats['compared']}",
        f"  read back and hashed: {stats['deep_checked']} objects, "
        f"{format_size(stats['bytes_read'])} ({stats['deep_checked_new']} from the last upload)",
        f"  took {format_duration(stats['duration_seconds'])}",
    ]
    if stats["extra_objects"]:
        lines.append(f"  {stats['extra_objects']} object(s) in the bucket not in the manifest")
    for problem in result["problems"]:
        lines.append(f"  PROBLEM {problem['kind']}: {problem['key']}: {problem['detail']}")
    more = result["problems_total"] - len(result["problems"])
    if more > 0:
        lines.append(f"  … and {more} more (full report: {result['report_key']})")
    sys.stdout.write(REDACTOR("\n".join(lines)) + "\n")


def verdict_line(verification: dict[str, Any]) -> str:
    """One line for the upload summary in local mode."""
    stats = verification["stats"]
    unproven = (
        f"{verification.get('unproven_objects', 0)} new object(s) "
        f"({format_size(verification.get('unproven_bytes', 0))}) still unproven"
    )
    if verification.get("pending"):
        return (
            f"verification unfinished at the deadline: {stats['deep_checked']} read back "
            f"({format_size(stats['bytes_read'])}), {unproven}; the next run continues"
        )
    if verification.get("reused"):
        return "verified: nothing new, manifest already proven (nothing read)"
    if verification["verified"]:
        return (
            f"verified: {stats['compared']} objects checked against the listing, "
            f"{stats['deep_checked']} read back ({format_size(stats['bytes_read'])})"
        )
    first = verification["problems"][0] if verification["problems"] else {}
    if first.get("kind") == "unverifiable":
        return f"COULD NOT VERIFY (the next run tries again): {first.get('detail')}"
    if first.get("kind") == "binding" and str(first.get("detail", "")).startswith("refused: "):
        return (
            "VERIFICATION REFUSED: this destination is not the one the repository is bound to "
            f"({first.get('detail')}); after a move: status --forget REPO"
        )
    return f"VERIFICATION FAILED: {verification['problems_total']} problem(s)" + (
        f", first: {first.get('kind')} {first.get('key')}" if first else ""
    )

"""The interfaces `cloud/logic` needs from the outside world.

Logic depends only on these (and the contracts); `cloud/integrations` fills them (boto3,
DynamoDB, SQLite), tests fill them with in-memory doubles. Nothing here imports an SDK.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import ValidationError

from cloud.contracts import events


@dataclass(frozen=True, slots=True)
class ListedObject:
    """One object of a listing: its key (full, or relative to the prefix listed), its size and
    its ETag (quotes stripped)."""

    key: str
    size: int
    etag: str

    @property
    def multipart(self) -> bool:
        return "-" in self.etag

    @property
    def parts(self) -> int:
        """The part count a multipart ETag (`…-N`) states; 0 if it states none."""
        tail = self.etag.rsplit("-", 1)[-1]
        return int(tail) if self.multipart and tail.isdigit() else 0


class ObjectStoreError(Exception):
    """The destination could not be read (unreachable, denied, missing bucket)."""


class ObjectNotFoundError(ObjectStoreError):
    pass


class ObjectStore(Protocol):
    """A read-only view of one bucket."""

    def list(self, prefix: str) -> Iterator[ListedObject]:
        """Every object whose key starts with `prefix`, in S3 key order, paginated."""
        ...

    def read(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        """The object's bytes as a stream of chunks (ObjectNotFoundError if absent)."""
        ...

    @property
    def list_requests(self) -> int:
        """List requests sent so far (B2 bills them as Class C)."""
        ...


@dataclass(frozen=True, slots=True)
class Retention:
    """An object version's Object Lock: mode (GOVERNANCE/COMPLIANCE) and retain-until."""

    mode: str
    until: datetime


@runtime_checkable
class RetentionSource(Protocol):
    """A store that can say how an object is locked (S3: the headers of the GET the deep
    check made anyway, else a HEAD). Optional: stores without it are not lock-checked."""

    def retention(self, key: str) -> Retention | None:
        """The current version's retention; None when it has none."""
        ...


class ReportSink(Protocol):
    """Where full verification reports go (an object beside the manifest, or a file)."""

    def put(self, key: str, data: bytes) -> str | None:
        """Store the report; returns where it went, or None when it could not be stored."""
        ...


RunKind = Literal["mirror", "verification", "stale", "failure"]
RunStatus = Literal["completed", "failed", "verified", "verification-failed", "stale"]


@dataclass(frozen=True)
class RunRecord:
    """One run as the run store keeps it.

    `repo_key` is the repository's guid (else its Backrest id); `run_id` is a UUIDv7, so
    runs of one repository sort by time. `detail` is the event as stored (a JSON object);
    readers use `event`, its contract model.
    """

    repo_key: str
    run_id: str
    kind: RunKind
    status: RunStatus
    started_at: datetime
    finished_at: datetime
    repo_id: str | None = None
    host: str | None = None
    mirror_run_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def event(self) -> events.EventDetail | None:
        """The run's event as its contract model, by the run's status; None when the stored
        detail is not one (written by another schema version, or free-form)."""
        try:
            return _EVENT_OF_STATUS[self.status].model_validate(self.detail)
        except (KeyError, ValidationError):
            return None


_EVENT_OF_STATUS: dict[str, type[events.EventDetail]] = {
    "completed": events.MirrorCompleted,
    "failed": events.MirrorFailed,
    "verified": events.MirrorVerified,
    "verification-failed": events.MirrorVerificationFailed,
    "stale": events.MirrorStale,
}


@dataclass(frozen=True)
class RepoStatus:
    """What the watchdog and `status` need to know about one repository."""

    repo_key: str
    repo_id: str | None
    latest_run: RunRecord | None
    latest_verified: RunRecord | None
    verifications: int
    stale_alerted_at: datetime | None = None


class RunStore(Protocol):
    """Runs by repository and run id, plus each repository's latest verified run."""

    def record(self, run: RunRecord) -> None:
        """Store a run (idempotent on (repo_key, run_id)); keeps latest-verified current."""
        ...

    def get(self, repo_key: str, run_id: str) -> RunRecord | None: ...

    def runs(self, repo_key: str, limit: int = 50) -> list[RunRecord]:
        """The newest `limit` runs of a repository, newest first."""
        ...

    def latest_verified(self, repo_key: str) -> RunRecord | None: ...

    def verification_count(self, repo_key: str) -> int:
        """How many verifications were recorded (drives the rotating deep-check slice)."""
        ...

    def repos(self) -> Iterator[RepoStatus]:
        """Every repository the store knows, for the watchdog and `status`."""
        ...

    def mark_stale_alerted(self, repo_key: str, at: datetime | None) -> None:
        """Remember when the watchdog last alerted (None clears it after a recovery)."""
        ...

    def load_checkpoint(self, repo_key: str, name: str) -> dict[str, Any] | None:
        """The verification checkpoint `name` (one per destination) of a repository, as
        saved (`cloud.logic.checkpoint.VerifyCheckpoint.to_dict`), or None."""
        ...

    def save_checkpoint(self, repo_key: str, name: str, data: dict[str, Any]) -> None:
        """Replace the checkpoint; durable when this returns (the next run builds on it)."""
        ...

    def load_binding(self, repo_key: str) -> dict[str, Any] | None:
        """The repository's binding to its destination, as stored
        (`cloud.logic.binding.Binding.to_dict`), or None while it has none."""
        ...

    def bind(self, repo_key: str, data: dict[str, Any]) -> dict[str, Any]:
        """Store the binding unless the repository has one (the first verified run wins,
        atomically); returns the binding in force, which may be another run's."""
        ...

    def unbind(self, repo_key: str) -> bool:
        """Drop the binding (the operator's re-binding after a move); whether one existed.
        The next verified run binds the repository again."""
        ...


class ContinuationQueue(Protocol):
    """Where the Lambda verifier hands a verification it could not finish in one
    invocation to the next (the verify queue; an in-memory list in tests)."""

    def send(self, event: events.MirrorCompleted, leg: int) -> None:
        """Queue leg `leg` of the verification of `event`; durable when this returns."""
        ...


class FanoutStore(Protocol):
    """The jobs of fanned-out verifications (`cloud.app.fanout`): what a job verifies, its
    chunks' results, and which chunks are done — each write idempotent, because SQS
    delivers a chunk at least once and two chunks may finish at the same moment.

    A job is a JSON-able dict as `create_job` got it, plus its state: `done` (the indexes
    of the chunks done, sorted), `dispatched`, `result` (the stored result event or None)
    and `published`.
    """

    def create_job(self, job_id: str, data: dict[str, Any]) -> dict[str, Any]:
        """Store the job unless one with this id exists; returns the stored job (the first
        one wins, so a redelivered event reuses the chunks first planned)."""
        ...

    def load_job(self, job_id: str) -> dict[str, Any] | None: ...

    def mark_dispatched(self, job_id: str) -> None:
        """Every chunk's work item was sent."""
        ...

    def complete_chunk(self, job_id: str, index: int, result: dict[str, Any]) -> int:
        """Store the chunk's result unless one is stored (the first wins) and count the
        chunk done, once however often this is called; returns how many distinct chunks
        are done."""
        ...

    def chunk_results(self, job_id: str) -> list[dict[str, Any]]:
        """Every stored chunk result, by chunk index."""
        ...

    def save_result(self, job_id: str, result: dict[str, Any]) -> dict[str, Any]:
        """Store the job's result event unless one is stored; returns the stored one."""
        ...

    def claim_publication(self, job_id: str, claimer: str) -> bool:
        """True for the first claimer (and the same claimer again, on a redelivery): only
        it publishes the result."""
        ...

    def mark_published(self, job_id: str) -> None: ...


Severity = Literal["success", "recovery", "failure", "stale"]


@dataclass(frozen=True)
class Notification:
    """One message, rendered for every channel: short `text` for chat, `html` for email.

    `outcome` tells ping-style channels (Healthchecks) whether this is good news.
    """

    subject: str
    text: str
    html: str
    severity: Severity
    repo_key: str
    repo_id: str | None
    run_id: str
    # The run a heartbeat ping belongs to: the mirror run a verification is about, so a
    # Healthchecks `/start` sent when that run began pairs with its success or failure.
    ping_run_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.severity in ("success", "recovery")


class ChannelError(Exception):
    """A channel could not deliver. The message must not contain the channel's secrets."""


class NotificationChannel(Protocol):
    """Somewhere a notification goes (SNS topic, Apprise URL, Healthchecks check).

    A channel with a true `heartbeat` attribute (Healthchecks) is a heartbeat: it hears
    every verified run, whatever the success policy says for people
    (`cloud.logic.notify.decide_delivery`)."""

    @property
    def name(self) -> str:
        """A label safe to log: the kind and a redacted target, never a token."""
        ...

    def send(self, notification: Notification) -> None:
        """Deliver it or raise ChannelError."""
        ...

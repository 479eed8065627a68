"""The events that flow between the agent, the verifier, the notifier and the watchdog.

The single source of truth: the agent builds these models, the Lambda handlers parse
them, and `docs/schemas/` is generated from them. Events stay small (claim check): the
list of objects lives in the manifest, and lists that could grow (snapshot ids,
problems) are capped with a total beside them.

Every model carries `schema_version`; a consumer refuses a version it does not know
rather than misread it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from cloud.contracts.destination import Destination

SCHEMA_VERSION = 1
MAX_LISTED_SNAPSHOTS = 100
MAX_LISTED_PROBLEMS = 50
MAX_MESSAGE_CHARS = 2000


class Source(StrEnum):
    AGENT = "backrest-relay.agent"
    VERIFIER = "backrest-relay.verifier"
    WATCHDOG = "backrest-relay.watchdog"


class DetailType(StrEnum):
    MIRROR_COMPLETED = "Mirror Completed"
    MIRROR_FAILED = "Mirror Failed"
    MIRROR_VERIFIED = "Mirror Verified"
    MIRROR_VERIFICATION_FAILED = "Mirror Verification Failed"
    MIRROR_STALE = "Mirror Stale"


ErrorKind = Literal[
    "config",
    "local-integrity",
    "destination",
    "guard",
    "deadline",
    "check",
    "unexpected",
]
"""Why a mirror run failed: `check` is Backrest's repository check failing before any
mirror started (reported by `report-failure`)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RepoRef(_Model):
    """The repository as Backrest knows it. `guid` is the stable key."""

    id: str | None = None
    guid: str | None = None
    path: str | None = None

    @property
    def key(self) -> str:
        """The identity runs are recorded under: the guid, else the Backrest id."""
        return self.guid or self.id or "unknown"


class MirrorStats(_Model):
    files: int = 0
    bytes: int = 0
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    already_present: int = 0
    adopted_files: int = 0
    deleted_files: int = 0
    requests: int = 0
    duration_seconds: float = 0.0


class ManifestRef(_Model):
    """Where the run's manifest is (bucket of the event's destination) and what it hashes to."""

    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    objects: int = Field(ge=0)
    created_by_run: str


class ErrorInfo(_Model):
    kind: ErrorKind
    message: str = Field(max_length=MAX_MESSAGE_CHARS)


class EventDetail(_Model):
    """Fields every event shares."""

    SOURCE: ClassVar[Source]
    DETAIL_TYPE: ClassVar[DetailType]

    schema_version: Literal[1] = 1
    run_id: str
    repo: RepoRef
    host: str
    trigger: str
    destination: Destination
    started_at: datetime
    finished_at: datetime


class MirrorCompleted(EventDetail):
    SOURCE = Source.AGENT
    DETAIL_TYPE = DetailType.MIRROR_COMPLETED

    stats: MirrorStats
    manifest: ManifestRef
    new_snapshots: list[str] = Field(default_factory=list, max_length=MAX_LISTED_SNAPSHOTS)
    new_snapshots_total: int = 0


class MirrorFailed(EventDetail):
    SOURCE = Source.AGENT
    DETAIL_TYPE = DetailType.MIRROR_FAILED

    stats: MirrorStats | None = None
    error: ErrorInfo
    corrupt_files: list[str] = Field(default_factory=list, max_length=MAX_LISTED_PROBLEMS)


class VerificationStats(_Model):
    listed: int = 0
    compared: int = 0
    deep_checked: int = 0
    deep_checked_new: int = 0
    bytes_read: int = 0
    extra_objects: int = 0
    list_requests: int = 0
    duration_seconds: float = 0.0
    # Checkpointed verification (local mode): new objects not proven yet (the deadline came
    # first; the next run goes on), and whether nothing was read because the same manifest
    # was proven within `verify.every` (a run with nothing new).
    unproven_objects: int = 0
    unproven_bytes: int = 0
    reused: bool = False


ProblemKind = Literal[
    "missing",
    "size",
    "etag",
    "hash",
    "manifest",
    "unreadable",
    "extra",
    "unverifiable",
    "lock",
    "binding",
]
"""What a `Problem` says is wrong: the one list the verifier and the event contract share."""


class Problem(_Model):
    key: str
    kind: ProblemKind
    """`unverifiable`: the verification could not proceed (GetObject denied, download cap
    reached, destination unreachable); the detail says why. Not a verdict on the data.
    `lock`: an object's Object Lock retention is missing or ends too soon.
    `binding`: the event was refused, not verified: its destination or manifest location
    disagrees with the repository's binding, or its manifest names another repository
    (docs/verification.md, "Trust model")."""
    detail: str = Field(max_length=500)


class _VerificationResult(EventDetail):
    SOURCE = Source.VERIFIER

    mirror_run_id: str
    manifest: ManifestRef
    stats: VerificationStats
    problems: list[Problem] = Field(default_factory=list, max_length=MAX_LISTED_PROBLEMS)
    problems_total: int = 0
    warnings: list[str] = Field(default_factory=list, max_length=MAX_LISTED_PROBLEMS)
    report_key: str | None = None
    new_snapshots: list[str] = Field(default_factory=list, max_length=MAX_LISTED_SNAPSHOTS)
    mirror_stats: MirrorStats | None = None


class MirrorVerified(_VerificationResult):
    DETAIL_TYPE = DetailType.MIRROR_VERIFIED


class MirrorVerificationFailed(_VerificationResult):
    DETAIL_TYPE = DetailType.MIRROR_VERIFICATION_FAILED


class MirrorStale(EventDetail):
    SOURCE = Source.WATCHDOG
    DETAIL_TYPE = DetailType.MIRROR_STALE

    last_verified_at: datetime | None
    last_verified_run_id: str | None = None
    age_seconds: float | None
    max_age_seconds: float


EVENT_MODELS: tuple[type[EventDetail], ...] = (
    MirrorCompleted,
    MirrorFailed,
    MirrorVerified,
    MirrorVerificationFailed,
    MirrorStale,
)
MODEL_FOR: dict[tuple[str, str], type[EventDetail]] = {
    (m.SOURCE.value, m.DETAIL_TYPE.value): m for m in EVENT_MODELS
}

AnyEvent = Annotated[
    MirrorCompleted | MirrorFailed | MirrorVerified | MirrorVerificationFailed | MirrorStale,
    "one of the event details",
]


class UnknownEventError(ValueError):
    pass


def parse_detail(source: str, detail_type: str, detail: Any) -> EventDetail:
    """The model for an EventBridge (source, detail-type); ValueError when unknown/invalid."""
    model = MODEL_FOR.get((source, detail_type))
    if model is None:
        raise UnknownEventError(f"unknown event {source!r} / {detail_type!r}")
    if isinstance(detail, str | bytes):
        return model.model_validate_json(detail)
    return model.model_validate(detail)


def put_events_entry(event: EventDetail, event_bus: str) -> dict[str, str]:
    """The PutEvents entry for an event (claim check: the detail stays small)."""
    return {
        "Source": event.SOURCE.value,
        "DetailType": event.DETAIL_TYPE.value,
        "Detail": event.model_dump_json(),
        "EventBusName": event_bus,
    }

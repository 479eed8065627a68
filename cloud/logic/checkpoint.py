"""What has been proven of a mirror, so nothing is proven twice and nothing is restarted.

Pure: the plan and the update are functions of the checkpoint, the event and the clock;
the run store keeps the checkpoint as a JSON-able dict, so the Lambda can share the format.
Fields and rules: docs/verification.md ("each object proven once").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from cloud.contracts.destination import Destination

CHECKPOINT_VERSION = 1
PROVEN_ALL = "\U0010ffff"
"""An `unproven_from` above every key: all new objects of that manifest are proven."""


@dataclass(frozen=True)
class PendingManifest:
    """A manifest whose new objects are proven below (not including) `unproven_from`."""

    key: str
    sha256: str
    unproven_from: str = ""


@dataclass(frozen=True)
class VerifyCheckpoint:
    manifest_key: str = ""
    manifest_sha256: str = ""
    verified: bool = False
    verified_at: datetime | None = None
    pending: tuple[PendingManifest, ...] = ()
    rotation_from: str = ""
    rotation_at: datetime | None = None
    unproven_objects: int = 0
    unproven_bytes: int = 0
    # The Lambda's continuation chain that owns the work under way: the run id of the
    # `Mirror Completed` it verifies and the leg (invocation) that may run next. Empty in
    # local mode. A leg of another chain, or an older leg of this one, must not run.
    chain: str = ""
    leg: int = 0
    # What the chain's earlier legs read (objects, bytes): the verdict counts every leg.
    chain_objects: int = 0
    chain_bytes: int = 0
    # Of `chain_bytes`, the new objects' (not the rotation's): the chain's legs share one
    # `new_bytes_budget`, each gets what the earlier ones left.
    chain_new_bytes: int = 0
    # Of `chain_objects`, the manifest's new objects (the verdict's `deep_checked_new`).
    chain_new_objects: int = 0
    # Bytes the mirror's manifest lists, as of the last pass (sizes the rotation slice
    # when `rotation_days` is set).
    mirror_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "manifest_key": self.manifest_key,
            "manifest_sha256": self.manifest_sha256,
            "verified": self.verified,
            "verified_at": _text(self.verified_at),
            "pending": [
                {"key": p.key, "sha256": p.sha256, "unproven_from": p.unproven_from}
                for p in self.pending
            ],
            "rotation_from": self.rotation_from,
            "rotation_at": _text(self.rotation_at),
            "unproven_objects": self.unproven_objects,
            "unproven_bytes": self.unproven_bytes,
            "chain": self.chain,
            "leg": self.leg,
            "chain_objects": self.chain_objects,
            "chain_bytes": self.chain_bytes,
            "chain_new_bytes": self.chain_new_bytes,
            "chain_new_objects": self.chain_new_objects,
            "mirror_bytes": self.mirror_bytes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> VerifyCheckpoint | None:
        """None for no checkpoint or one of another version (start afresh: safe, not cheap)."""
        if not data or data.get("version") != CHECKPOINT_VERSION:
            return None
        return cls(
            manifest_key=str(data.get("manifest_key", "")),
            manifest_sha256=str(data.get("manifest_sha256", "")),
            verified=bool(data.get("verified", False)),
            verified_at=_time(data.get("verified_at")),
            pending=tuple(
                PendingManifest(str(p["key"]), str(p["sha256"]), str(p["unproven_from"]))
                for p in data.get("pending", [])
            ),
            rotation_from=str(data.get("rotation_from", "")),
            rotation_at=_time(data.get("rotation_at")),
            unproven_objects=int(data.get("unproven_objects", 0)),
            unproven_bytes=int(data.get("unproven_bytes", 0)),
            chain=str(data.get("chain", "")),
            leg=int(data.get("leg", 0)),
            chain_objects=int(data.get("chain_objects", 0)),
            chain_bytes=int(data.get("chain_bytes", 0)),
            chain_new_bytes=int(data.get("chain_new_bytes", 0)),
            chain_new_objects=int(data.get("chain_new_objects", 0)),
            mirror_bytes=int(data.get("mirror_bytes", 0)),
        )


def _text(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(value: Any) -> datetime | None:
    return None if not value else datetime.fromisoformat(str(value))


def checkpoint_name(destination: Destination) -> str:
    """One checkpoint per repository and destination (a repository may have two mirrors)."""
    return f"{destination.bucket}/{destination.prefix}"


@dataclass(frozen=True)
class VerifyPlan:
    """What one pass does.

    `action` "reuse": read nothing, the manifest was proven and `every` has not passed.
    `resume_from`: new objects of this manifest below this key are already proven.
    `carried`: older manifests whose unproven new objects this pass also reads.
    `rotation_bytes`: budget of older objects to re-read (0: no rotation this time).
    """

    action: Literal["reuse", "verify"]
    resume_from: str = ""
    carried: tuple[PendingManifest, ...] = ()
    rotation_bytes: int = 0
    rotation_from: str = ""
    reason: str = ""

    @property
    def rotate_uploaded(self) -> bool:
        """Only a pass over an already proven manifest re-reads its new objects."""
        return self.resume_from == PROVEN_ALL


def plan_verification(
    checkpoint: VerifyCheckpoint | None,
    manifest_key: str,
    *,
    manifest_sha256: str | None = None,
    now: datetime,
    every_seconds: float,
    rotation_budget: int,
    rotation_days: float | None = None,
) -> VerifyPlan:
    """What the next pass does (see `VerifyPlan`).

    With `rotation_days`, a rotation slice is at least the share of the mirror that the
    time since the last slice asks for, so every object is re-read at least once per
    `rotation_days` (docs/verification.md, "Sizing").
    """
    cp = checkpoint or VerifyCheckpoint()
    due = (rotation_budget > 0 or bool(rotation_days)) and (
        cp.rotation_at is None or (now - cp.rotation_at).total_seconds() >= every_seconds
    )
    rotation = max(rotation_budget, rotation_share(cp, now, every_seconds, rotation_days))
    rotation = rotation if due else 0
    others = tuple(p for p in cp.pending if p.key != manifest_key)
    mine = next((p for p in cp.pending if p.key == manifest_key), None)
    same = cp.manifest_key == manifest_key and (
        manifest_sha256 is None or cp.manifest_sha256 == manifest_sha256
    )
    if same:
        if mine is not None:
            return VerifyPlan(
                "verify", mine.unproven_from, others, rotation, cp.rotation_from, "continue"
            )
        if not cp.verified:
            return VerifyPlan("verify", "", others, rotation, cp.rotation_from, "re-verify")
        if due:
            return VerifyPlan("verify", PROVEN_ALL, others, rotation, cp.rotation_from, "rotation")
        return VerifyPlan("reuse", PROVEN_ALL, others, 0, cp.rotation_from, "already proven")
    carried = tuple(p for p in cp.pending if p.key != manifest_key)
    return VerifyPlan("verify", "", carried, rotation, cp.rotation_from, "new manifest")


def rotation_share(
    checkpoint: VerifyCheckpoint, now: datetime, every_seconds: float, days: float | None
) -> int:
    """Bytes of older objects the next slice must re-read so the walk over the mirror never
    takes longer than `days` between two reads of an object.

    The cursor walks the mirror in key order at a rate of at least S / P (S: the mirror's
    bytes, P: the period). An object is re-read at most P + 2 × every after its last read
    (the slice that reaches it may come up to `every` late, in both walks), so P =
    days − 2 × every. A slice reads S × (time since the last slice) / P, rounded up.
    """
    if not days or checkpoint.mirror_bytes <= 0:
        return 0
    period = max(days * 86400.0 - 2 * every_seconds, every_seconds, 1.0)
    elapsed = every_seconds
    if checkpoint.rotation_at is not None:
        elapsed = (now - checkpoint.rotation_at).total_seconds()
    fraction = min(max(elapsed, 0.0) / period, 1.0)
    return math.ceil(checkpoint.mirror_bytes * fraction)


@dataclass(frozen=True)
class PassResult:
    """What a pass reports back to the checkpoint (see `VerificationOutcome`)."""

    complete: bool
    problems: bool
    unproven_from: str
    unproven_objects: int
    unproven_bytes: int
    rotation_next: str
    rotated: bool
    mirror_bytes: int = 0  # the manifest's total size, when the pass saw all of it

    @classmethod
    def so_far(
        cls, unproven_from: str, rotation_next: str, rotated: bool, before: VerifyCheckpoint | None
    ) -> PassResult:
        """A pass still under way and without a problem so far (a checkpoint saved mid-pass).
        How many objects are unproven is not known until it has seen the whole manifest:
        as of the last pass."""
        last = before or VerifyCheckpoint()
        objects, size = last.unproven_objects, last.unproven_bytes
        return cls(False, False, unproven_from, objects, size, rotation_next, rotated)


def advance(
    checkpoint: VerifyCheckpoint | None,
    plan: VerifyPlan,
    result: PassResult,
    *,
    manifest_key: str,
    manifest_sha256: str,
    now: datetime,
) -> VerifyCheckpoint:
    """The checkpoint after a pass that ran to its end or to its deadline.

    A pass that found a problem starts the manifest over next time (a failure is re-checked
    and re-announced, never remembered as proven); older pending manifests keep their place.
    """
    cp = checkpoint or VerifyCheckpoint()
    carried = [
        replace(p, unproven_from=max(p.unproven_from, result.unproven_from))
        for p in plan.carried
        if max(p.unproven_from, result.unproven_from) != PROVEN_ALL
    ]
    if result.problems:
        pending = [*carried, PendingManifest(manifest_key, manifest_sha256, "")]
        verified = False
    elif result.complete:
        pending, verified = carried, not carried
    else:
        through = max(plan.resume_from, result.unproven_from)
        pending = [*carried, PendingManifest(manifest_key, manifest_sha256, through)]
        verified = False
    return VerifyCheckpoint(
        manifest_key=manifest_key,
        manifest_sha256=manifest_sha256,
        verified=verified,
        verified_at=now if verified else cp.verified_at,
        pending=tuple(pending),
        rotation_from=result.rotation_next if plan.rotation_bytes else cp.rotation_from,
        rotation_at=now if plan.rotation_bytes and result.rotated else cp.rotation_at,
        unproven_objects=0 if verified else result.unproven_objects,
        unproven_bytes=0 if verified else result.unproven_bytes,
        mirror_bytes=result.mirror_bytes or cp.mirror_bytes,
    )


@dataclass(frozen=True)
class ManifestCursor:
    """How far `backrest-relay verify` got with one manifest when its time limit came.

    Every planned read of a key below `read_from` was done (by `calls` earlier calls, which
    read `objects_read` objects, `bytes_read` bytes); the next call reads from there with
    the same rotation slice and `--deep` share, and the verdict covers all the calls.
    """

    manifest_key: str
    manifest_sha256: str
    rotation_index: int
    deep: str
    read_from: str
    objects_read: int = 0
    bytes_read: int = 0
    calls: int = 0
    new_read: int = 0  # of `objects_read`, the manifest's new objects

    def to_dict(self) -> dict[str, Any]:
        return {"version": CHECKPOINT_VERSION, "kind": "manifest-cursor", **self.__dict__}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ManifestCursor | None:
        if not data or data.get("version") != CHECKPOINT_VERSION:
            return None
        if data.get("kind") != "manifest-cursor":
            return None
        return cls(
            manifest_key=str(data["manifest_key"]),
            manifest_sha256=str(data["manifest_sha256"]),
            rotation_index=int(data["rotation_index"]),
            deep=str(data["deep"]),
            read_from=str(data["read_from"]),
            objects_read=int(data.get("objects_read", 0)),
            bytes_read=int(data.get("bytes_read", 0)),
            calls=int(data.get("calls", 0)),
            new_read=int(data.get("new_read", 0)),
        )


def cursor_name(destination: Destination) -> str:
    """The `verify` command's cursor, beside (not instead of) local mode's checkpoint."""
    return f"verify-command:{checkpoint_name(destination)}"

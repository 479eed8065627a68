"""Which destination a repository's completion events may name: the binding.

A `Mirror Completed` is a claim by whoever could put it on the bus; the verifier proves the
objects it points at, not who sent it. Without a binding, a principal allowed to PutEvents
could name another repository's guid with a destination and manifest of its own, get it
verified and keep that repository's watchdog quiet. So the first verified run binds the
repository (its guid, else its Backrest id) to the bucket, prefix and manifest folder it
was verified at; later events that name anything else are refused (a `Mirror Verification
Failed` with a `binding` problem: an alert), never verified.

Pure: `decide` is a function of the stored binding and the event. Locations are compared
exactly (S3 keys are case-sensitive, and `a/b/` names other keys than `a/b`), and a
location that is not in canonical form (empty, `.` or `..` segments, a leading or trailing
`/`) is refused outright: some S3 servers map keys to files and would resolve it.
Trust model and the operator's re-binding: docs/verification.md ("Trust model").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from cloud.contracts.events import MirrorCompleted, MirrorVerified

BINDING_VERSION = 1


def canonical(path: str) -> bool:
    """Whether a key prefix (or key) is in the form the agent writes: `/`-separated
    segments, none empty, `.` or `..`. The empty prefix (the bucket's root) is canonical."""
    if path == "":
        return True
    return all(segment not in ("", ".", "..") for segment in path.split("/"))


def manifest_folder(key: str) -> str:
    """The folder a manifest key lies in (`restic/home.relay/manifests`); "" at the root."""
    return key.rpartition("/")[0]


def inside(key: str, prefix: str) -> bool:
    """Whether `key` lies in the repository folder `prefix` (whole path components)."""
    return prefix != "" and key.startswith(prefix + "/")


@dataclass(frozen=True)
class Binding:
    """A repository's destination, fixed by its first verified run."""

    bucket: str
    prefix: str
    manifest_prefix: str
    bound_at: datetime
    bound_by: str  # the verification run that bound it
    mirror_run_id: str  # the mirror run it verified

    def describe(self) -> str:
        return f"bucket {self.bucket!r} prefix {self.prefix!r} manifests {self.manifest_prefix!r}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": BINDING_VERSION,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "manifest_prefix": self.manifest_prefix,
            "bound_at": self.bound_at.isoformat(),
            "bound_by": self.bound_by,
            "mirror_run_id": self.mirror_run_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Binding | None:
        """None for no binding. A stored binding this code cannot read is an error, not
        "unbound": treating it as absent would let the next event re-bind the repository."""
        if data is None:
            return None
        if data.get("version") != BINDING_VERSION:
            raise ValueError(f"binding of version {data.get('version')!r} is not understood")
        return cls(
            bucket=str(data["bucket"]),
            prefix=str(data["prefix"]),
            manifest_prefix=str(data["manifest_prefix"]),
            bound_at=datetime.fromisoformat(str(data["bound_at"])),
            bound_by=str(data["bound_by"]),
            mirror_run_id=str(data["mirror_run_id"]),
        )


def binding_of(result: MirrorVerified) -> Binding:
    """The binding a verified run establishes: where it was verified."""
    return Binding(
        bucket=result.destination.bucket,
        prefix=result.destination.prefix,
        manifest_prefix=manifest_folder(result.manifest.key),
        bound_at=result.finished_at,
        bound_by=result.run_id,
        mirror_run_id=result.mirror_run_id,
    )


@dataclass(frozen=True)
class Decision:
    """`bind`: no binding yet — verify, and a verified result binds. `accept`: the event
    agrees with the binding. `refuse`: it does not (or names a non-canonical location);
    `reason` says how, naming both sides."""

    action: Literal["accept", "bind", "refuse"]
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.action == "refuse"


def _malformed(event: MirrorCompleted) -> str | None:
    prefix = event.destination.prefix
    key = event.manifest.key
    if not canonical(prefix):
        return f"the event's prefix {prefix!r} is not canonical (empty, '.' or '..' segments)"
    if key == "" or not canonical(key):
        return f"the event's manifest key {key!r} is not canonical (empty, '.' or '..' segments)"
    if inside(key, prefix):
        return f"the event's manifest {key!r} lies inside the repository prefix {prefix!r}"
    return None


def decide(binding: Binding | None, event: MirrorCompleted) -> Decision:
    """May this event be verified for its repository?"""
    malformed = _malformed(event)
    if malformed is not None:
        return Decision("refuse", malformed)
    if binding is None:
        return Decision("bind")
    destination = event.destination
    folder = manifest_folder(event.manifest.key)
    differences = [
        f"{what} {theirs!r} (bound: {ours!r})"
        for what, theirs, ours in (
            ("bucket", destination.bucket, binding.bucket),
            ("prefix", destination.prefix, binding.prefix),
            ("manifest folder", folder, binding.manifest_prefix),
        )
        if theirs != ours
    ]
    if not differences:
        return Decision("accept")
    return Decision(
        "refuse",
        f"the event names {', '.join(differences)}; repository {event.repo.key} is bound to "
        f"{binding.describe()} since {binding.bound_at.isoformat(timespec='seconds')} "
        f"(verification {binding.bound_by})",
    )


def header_disagreement(header_guid: str | None, guid: str | None) -> str | None:
    """Why a manifest's header names another repository than the event, or None. Only the
    guid is compared, and only when both sides state it: a Backrest id may be renamed
    between the run that wrote a manifest and a later run that points at it."""
    if header_guid and guid and header_guid != guid:
        return f"manifest header names repository {header_guid}, the event {guid}"
    return None

"""The manifest: what a mirror run left at the destination, object by object.

A gzip JSON Lines object in the bucket, outside the repository's prefix: one header line,
then one line per object. Written and read as a stream, so a repository of a million
objects never needs the whole list in memory on either side.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_SCHEMA_VERSION = 1
#: `destination.manifest_prefix` default: empty = derived from the repository's prefix as
#: `<prefix>` + MANIFEST_SIBLING_SUFFIX (`restic/home` → `restic/home.relay/manifests`): a
#: sibling, never inside the repository's folder, yet under the same *string* prefix, so one
#: B2 application key restricted to `restic/home` covers the repository and its manifests.
DEFAULT_MANIFEST_PREFIX = ""
MANIFEST_SIBLING_SUFFIX = ".relay/manifests"
#: The default before the sibling layout; still the default when the repository is the
#: bucket's root (prefix ""), where there is no prefix to sit beside.
LEGACY_MANIFEST_PREFIX = ".backrest-relay/{repo_guid}/manifests"


class ManifestHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["backrest-relay-manifest"] = "backrest-relay-manifest"
    schema_version: Literal[1] = 1
    run_id: str
    repo_guid: str | None
    repo_id: str | None
    bucket: str
    prefix: str
    created_at: datetime
    objects: int = Field(ge=0)


class ManifestEntry(BaseModel):
    """One object: `key` is relative to the header's prefix (`data/ab/ab12…`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    size: int = Field(ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    md5: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    uploaded: bool


def manifest_key(manifest_prefix: str, run_id: str) -> str:
    """Manifests sort by run id (UUIDv7), so the newest is the last in a listing."""
    return f"{manifest_prefix.strip('/')}/{run_id}.jsonl.gz"

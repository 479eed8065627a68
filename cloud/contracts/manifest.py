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
DEFAULT_MANIFEST_PREFIX = ".backrest-relay/{repo_guid}/manifests"


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

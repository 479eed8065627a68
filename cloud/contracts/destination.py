"""Where a mirror lives: the one description of a destination both sides share.

The agent writes it into events and manifests; the verifier reads it back to find the
objects. Credentials are deliberately not part of it: events and manifests must never
carry a secret, so credentials travel separately (see `cloud.integrations.s3.S3Access`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Provider = Literal["b2", "aws", "s3"]
"""`b2` Backblaze B2 · `aws` Amazon S3 · `s3` any other S3-compatible service."""


class Destination(BaseModel):
    """A bucket and key prefix on one S3-compatible endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Provider
    endpoint_url: str | None
    bucket: str
    prefix: str

    def key(self, relative: str) -> str:
        """Object key of a repository-relative path (`data/ab/ab12...`)."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def relative(self, key: str) -> str | None:
        """Repository-relative path of an object key, or None if it lies outside the prefix."""
        if not self.prefix:
            return key
        head = self.prefix + "/"
        return key[len(head) :] if key.startswith(head) else None

    def describe(self) -> str:
        """Human-readable location, safe for logs (no credentials exist here)."""
        where = self.endpoint_url or "aws"
        return f"{where} bucket {self.bucket!r} prefix {self.prefix + '/' if self.prefix else '/'}"


def b2_endpoint(region: str) -> str:
    """B2's S3 endpoint for a region such as `us-west-004`."""
    return f"https://s3.{region}.backblazeb2.com"

"""Writing a run's manifest into the bucket, as a stream.

The manifest lists every object the state store knows to be at the destination. It is
built from the store in key order, batch by batch, gzip-compressed into a temporary file
while its SHA-256 and MD5 are computed, then uploaded with Content-MD5 — so memory stays
flat however many objects the repository has.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from cloud.contracts.events import ManifestRef
from cloud.contracts.manifest import ManifestHeader, manifest_key
from local_agent.mirror.backend import Backend
from local_agent.mirror.state import RemoteObject, StateStore

_HEX64 = re.compile(r"[0-9a-f]{64}")


class _HashingWriter(io.RawIOBase):
    def __init__(self, inner: BinaryIO) -> None:
        super().__init__()
        self.inner = inner
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = bytes(data)
        self.sha256.update(chunk)
        self.md5.update(chunk)
        self.size += len(chunk)
        self.inner.write(chunk)
        return len(chunk)


def _entry_line(obj: RemoteObject, run_id: str, new: bool = False) -> str:
    """One manifest line (a `ManifestEntry`), formatted directly: a million of these are
    written per run on big repositories, and json.dumps per line dominated the time."""
    name = obj.key.rsplit("/", 1)[-1]
    sha256 = obj.sha256 or (name if _HEX64.fullmatch(name) else None)
    return (
        f'{{"key":{json.dumps(obj.key)},"size":{obj.size},'
        f'"sha256":{_quoted(sha256)},"md5":{_quoted(obj.md5)},'
        f'"uploaded":{"true" if new or obj.run_id == run_id else "false"}}}\n'
    )


def _quoted(value: str | None) -> str:
    # sha256/md5 are hex digests: nothing to escape.
    return "null" if value is None else f'"{value}"'


class ManifestWriter:
    def __init__(self, backend: Backend, state: StateStore, *, tmp_dir: Path | None = None):
        self.backend = backend
        self.state = state
        self.tmp_dir = tmp_dir

    def write(
        self,
        *,
        run_id: str,
        manifest_prefix: str,
        repo_id: str | None,
        repo_guid: str | None,
    ) -> ManifestRef:
        destination = self.backend.destination
        count = self.state.count()
        header = ManifestHeader(
            run_id=run_id,
            repo_guid=repo_guid,
            repo_id=repo_id,
            bucket=destination.bucket,
            prefix=destination.prefix,
            created_at=datetime.now(UTC),
            objects=count,
        )
        key = manifest_key(manifest_prefix, run_id)
        with tempfile.TemporaryFile(dir=self.tmp_dir) as tmp:
            hashing = _HashingWriter(tmp)
            written = 0
            with gzip.GzipFile(fileobj=hashing, mode="wb", mtime=0, compresslevel=6) as gz:
                gz.write(header.model_dump_json().encode() + b"\n")
                lines: list[str] = []
                # "uploaded" marks everything this agent uploaded since the last manifest,
                # not only in this run: a run stopped at its deadline left its objects for
                # this one's verification to read back.
                for obj, new in self.state.iter_manifest_objects():
                    lines.append(_entry_line(obj, run_id, new))
                    if len(lines) == 1000:
                        gz.write("".join(lines).encode())
                        written += len(lines)
                        lines.clear()
                gz.write("".join(lines).encode())
                written += len(lines)
            if written != count:
                raise AssertionError(f"manifest: counted {count} objects but wrote {written}")
            tmp.seek(0)
            self.backend.put_at(
                key,
                tmp,
                hashing.size,
                hashing.md5.hexdigest(),
                hashing.sha256.hexdigest(),
                what=f"manifest {key}",
            )
        self.state.manifest_written()
        return ManifestRef(
            key=key, sha256=hashing.sha256.hexdigest(), objects=count, created_by_run=run_id
        )

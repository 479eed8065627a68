"""Putting one verified file at the destination: a single PUT, or a multipart upload that
survives the process being killed.

Every request carries `Content-MD5`, so the bucket itself rejects bytes that changed on
the way (B2 accepts no other per-request checksum). A multipart upload records its
UploadId before the first part and each part as it lands; a later run asks the bucket
which parts it holds (ListParts) and sends only the rest.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import BinaryIO

from local_agent.errors import DestinationError, RepositoryError
from local_agent.mirror.backend import Backend, error_code
from local_agent.mirror.deadline import StopSignal
from local_agent.mirror.repository import Digest, RepoFile, hash_file
from local_agent.mirror.state import PendingUpload, RemoteObject, StateStore
from local_agent.mirror.throttle import Throttle, ThrottledReader

log = logging.getLogger(__name__)


def part_count(size: int, part_size: int) -> int:
    return max(1, -(-size // part_size))


MiB = 1024 * 1024
# Part sizes S3 tools commonly use: rclone and the agent's minimum (5 MiB), boto3 and the
# AWS CLI (8 MiB), minio-go as restic uses it (16 MiB multiples), s5cmd (50 MiB), B2's
# recommendation (100 MB).
COMMON_PART_SIZES = (
    5 * MiB,
    8 * MiB,
    16 * MiB,
    32 * MiB,
    50 * MiB,
    64 * MiB,
    100 * MiB,
    128 * MiB,
    100_000_000,
)


def part_size_candidates(size: int, parts: int, configured: int) -> list[int]:
    """Part sizes that would split `size` bytes into exactly `parts` parts, most likely
    first: the agent's own, the common ones, then the even split (rounded up to bytes and
    to MiB)."""
    if parts < 1:
        return []
    even = -(-size // parts)
    out: list[int] = []
    for candidate in (configured, *COMMON_PART_SIZES, even, -(-even // MiB) * MiB):
        if candidate > 0 and candidate not in out and part_count(size, candidate) == parts:
            out.append(candidate)
    return out


@dataclass(eq=False)
class ObjectUploader:
    """Puts files at the destination for one mirror run, throttled and stoppable."""

    backend: Backend
    state: StateStore
    _: KW_ONLY
    multipart_threshold: int
    part_size: int
    throttle: Throttle | None
    stop: StopSignal
    run_id: str | None = None
    on_bytes: Callable[[int], None] = lambda _: None

    def upload(
        self, file: RepoFile, path: Path, digest: Digest, data: bytes | None
    ) -> RemoteObject:
        """Upload a file whose digest was already checked against its name."""
        if file.size >= self.multipart_threshold:
            return self._multipart(file, path, digest)
        if data is not None:
            etag = self.backend.put(
                file.key, self._body(data), file.size, digest.md5, digest.sha256
            )
        else:
            with _open(path) as fh:
                try:
                    etag = self.backend.put(
                        file.key, self._body(fh), file.size, digest.md5, digest.sha256
                    )
                except DestinationError:
                    # The bucket refuses bytes that do not match the Content-MD5 and signed
                    # SHA-256 taken when hashing: if the local file changed since, that is a
                    # local problem (exit 3), not the destination's.
                    if _still(path, digest):
                        raise
                    raise RepositoryError(
                        f"{path}: changed while being uploaded (it no longer hashes to its "
                        "name); nothing was kept at the destination — run `restic check "
                        "--read-data` on the local repository"
                    ) from None
        self.on_bytes(file.size)
        obj = RemoteObject(file.key, file.size, digest.sha256, digest.md5, etag, self.run_id)
        self.state.put(obj)
        return obj

    def _body(self, data: bytes | BinaryIO) -> bytes | BinaryIO:
        if self.throttle is None:
            return data
        inner = io.BytesIO(data) if isinstance(data, bytes) else data
        return ThrottledReader(inner, self.throttle)  # type: ignore[return-value]

    def _multipart(self, file: RepoFile, path: Path, digest: Digest) -> RemoteObject:
        count = part_count(file.size, self.part_size)
        if count > 10_000:
            raise RepositoryError(
                f"{path}: {file.size} bytes need {count} parts of {self.part_size}; "
                "S3 allows 10000 — raise upload.part_size"
            )
        done: dict[int, str] = {}
        pending = self.state.pending_upload(file.key)
        if pending is not None and (
            pending.size != file.size
            or pending.sha256 != digest.sha256
            or pending.part_size != self.part_size
        ):
            self.backend.abort_multipart(self.backend.destination.key(file.key), pending.upload_id)
            self.state.end_upload(file.key)
            pending = None
        if pending is not None:
            resumable = self._resumable_parts(file, path, pending)
            if resumable is None:
                self.state.end_upload(file.key)
                pending = None
            else:
                done = resumable
                log.info(
                    "%s: resuming multipart upload, %d of %d parts already there",
                    file.key,
                    len(done),
                    count,
                )
                self.on_bytes(sum(self._part_length(file.size, n) for n in done))
        if pending is None:
            upload_id = self.backend.create_multipart(file.key)
            pending = PendingUpload(file.key, upload_id, file.size, digest.sha256, self.part_size)
            self.state.begin_upload(pending)
        # The bytes sent must be the bytes hashed: every part is hashed as it is read to be
        # sent, parts an earlier run sent are read again and checked against what the
        # bucket holds, and the whole must hash to the name before the upload completes.
        sent = hashlib.sha256()
        with _open(path) as fh:
            for number in range(1, count + 1):
                self.stop.check()
                fh.seek((number - 1) * self.part_size)
                chunk = _read(fh, self.part_size, path)
                if len(chunk) != self._part_length(file.size, number):
                    self._abandon(file, pending)
                    raise RepositoryError(
                        f"{path}: changed size while being uploaded; the upload was aborted — "
                        "is another program writing to the repository?"
                    )
                sent.update(chunk)
                md5 = hashlib.md5(chunk, usedforsecurity=False).hexdigest()
                if done.get(number) == md5:
                    continue
                if number in done:
                    log.info(
                        "%s: part %d differs from the local bytes; sending it again",
                        file.key,
                        number,
                    )
                etag = self.backend.upload_part(
                    file.key, pending.upload_id, number, self._body(chunk), len(chunk), md5
                )
                self.state.record_part(file.key, pending.upload_id, number, etag, len(chunk))
                done[number] = etag
                self.on_bytes(len(chunk))
        if sent.hexdigest() != digest.sha256:
            self._abandon(file, pending)
            raise RepositoryError(
                f"{path}: changed while being uploaded (the bytes read to send hash to "
                f"{sent.hexdigest()}, not to its name); the upload was aborted and nothing of "
                "it kept — run `restic check --read-data` on the local repository"
            )
        try:
            final_etag = self.backend.complete_multipart(file.key, pending.upload_id, done)
        except DestinationError as exc:
            # The reply to a completion that succeeded can be lost; botocore's retry then
            # finds no such upload. The object being there, whole, settles it.
            if error_code(exc.__cause__) != "NoSuchUpload":
                raise
            if self.backend.head_size(file.key) != file.size:
                raise
            log.info("%s: completion reply was lost, but the object is complete", file.key)
            final_etag = ""
        obj = RemoteObject(file.key, file.size, digest.sha256, digest.md5, final_etag, self.run_id)
        self.state.end_upload(file.key, completed=obj)
        return obj

    def _abandon(self, file: RepoFile, pending: PendingUpload) -> None:
        """Abort a multipart upload whose bytes cannot be trusted, and forget it."""
        self.backend.abort_multipart(self.backend.destination.key(file.key), pending.upload_id)
        self.state.end_upload(file.key)

    def _part_length(self, size: int, number: int) -> int:
        return min(self.part_size, size - (number - 1) * self.part_size)

    def _resumable_parts(
        self, file: RepoFile, path: Path, pending: PendingUpload
    ) -> dict[int, str] | None:
        """Parts of an earlier run that the bucket holds intact; None if the upload is gone."""
        listed = self.backend.list_parts(file.key, pending.upload_id)
        if listed is None:
            return None
        recorded = self.state.recorded_parts(file.key, pending.upload_id)
        good: dict[int, str] = {}
        with _open(path) as fh:
            for number, (etag, size) in listed.items():
                if size != self._part_length(file.size, number):
                    continue
                if recorded.get(number) == (etag, size):
                    good[number] = etag
                    continue
                # The bucket took the part but the run died before recording it: compare
                # with the local bytes rather than send them again.
                fh.seek((number - 1) * self.part_size)
                local = hashlib.md5(fh.read(size), usedforsecurity=False).hexdigest()
                if local == etag:
                    self.state.record_part(file.key, pending.upload_id, number, etag, size)
                    good[number] = etag
        return good


def _read(fh: BinaryIO, size: int, path: Path) -> bytes:
    try:
        return fh.read(size)
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _still(path: Path, digest: Digest) -> bool:
    """Whether the file still hashes to `digest` (False when it cannot be read at all)."""
    try:
        now, _ = hash_file(path)
    except RepositoryError:
        return False
    return now.sha256 == digest.sha256


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read: {exc.strerror or exc}") from None

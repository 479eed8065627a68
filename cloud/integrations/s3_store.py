"""The destination bucket as the verifier sees it: list and read, nothing else.

Fills `cloud.logic.ports.ObjectStore` and `ReportSink` with a client from the one S3
factory (`cloud.integrations.s3`), so B2's checksum quirks are handled in one place.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cloud.logic.ports import ListedObject, ObjectNotFoundError, ObjectStoreError, Retention

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

log = logging.getLogger(__name__)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}


def _describe(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code', 'error')} (HTTP {status}) {err.get('Message', '')}".strip()
    return str(exc) or type(exc).__name__


class S3ObjectStore:
    def __init__(self, client: S3Client, bucket: str) -> None:
        self.client = client
        self.bucket = bucket
        self._list_requests = 0
        self._lock = threading.Lock()
        # Object Lock headers of objects read, kept until asked for (`retention`), so the
        # verifier's lock check costs no request for objects it reads anyway.
        self._seen: dict[str, Retention | None] = {}

    def retention(self, key: str) -> Retention | None:
        """The current version's Object Lock, from the last read of `key`, else a HEAD."""
        from botocore.exceptions import BotoCoreError, ClientError

        with self._lock:
            if key in self._seen:
                return self._seen.pop(key)
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise ObjectStoreError(f"checking {self.bucket}/{key}: {_describe(exc)}") from exc
        return _retention(response)

    @property
    def list_requests(self) -> int:
        return self._list_requests

    def list(self, prefix: str) -> Iterator[ListedObject]:
        from botocore.exceptions import BotoCoreError, ClientError

        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                with self._lock:
                    self._list_requests += 1
                page = self.client.list_objects_v2(**kwargs)
            except (BotoCoreError, ClientError) as exc:
                raise ObjectStoreError(f"listing {self.bucket}/{prefix}: {_describe(exc)}") from exc
            for item in page.get("Contents", []):
                yield ListedObject(item["Key"], int(item["Size"]), item.get("ETag", "").strip('"'))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def read(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            with self._lock:
                if len(self._seen) >= 10_000:  # never asked for: keep memory bounded
                    self._seen.pop(next(iter(self._seen)))
                self._seen[key] = _retention(response)
            body = response["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _NOT_FOUND:
                raise ObjectNotFoundError(f"{self.bucket}/{key}: not found") from exc
            raise ObjectStoreError(f"reading {self.bucket}/{key}: {_describe(exc)}") from exc
        except BotoCoreError as exc:
            raise ObjectStoreError(f"reading {self.bucket}/{key}: {_describe(exc)}") from exc


def _retention(response: Any) -> Retention | None:
    mode = response.get("ObjectLockMode")
    until = response.get("ObjectLockRetainUntilDate")
    if not mode or not isinstance(until, datetime):
        return None
    return Retention(str(mode), until)


class S3ReportSink:
    """Writes reports into the bucket beside the manifest — best effort: a read-only key
    (as the verifier should have) cannot, and the verdict must not depend on it."""

    def __init__(
        self, client: S3Client, bucket: str, *, lock_mode: str | None = None, lock_days: int = 0
    ) -> None:
        """`lock_mode` (GOVERNANCE/COMPLIANCE) and `lock_days`: the Object Lock retention
        reports carry, like everything else the agent writes (`[destination] object_lock`)."""
        self.client = client
        self.bucket = bucket
        self.lock_mode = lock_mode
        self.lock_days = lock_days

    def put(self, key: str, data: bytes) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        lock: dict[str, Any] = {}
        if self.lock_mode:
            until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=self.lock_days)
            lock = {"ObjectLockMode": self.lock_mode, "ObjectLockRetainUntilDate": until}
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentMD5=md5,
                ContentType="application/gzip",
                **lock,
            )
        except (BotoCoreError, ClientError) as exc:
            log.warning("could not store the verification report %s: %s", key, _describe(exc))
            return None
        return key

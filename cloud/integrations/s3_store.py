"""The destination bucket as the verifier sees it: list and read, nothing else.

Fills `cloud.logic.ports.ObjectStore` and `ReportSink` with a client from the one S3
factory (`cloud.integrations.s3`), so B2's checksum quirks are handled in one place.
Listings and reads go through the lean signed path (`cloud.integrations.object_reader`,
copying the client's settings) where it can reproduce the client, else through boto3.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from cloud.logic.ports import ListedObject, ObjectNotFoundError, ObjectStoreError, Retention

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

    from cloud.integrations.object_reader import ObjectReader

log = logging.getLogger(__name__)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
SPLIT_WORKERS = 8  # folders listed at the same time
SPLIT_AHEAD = 32  # folders listed ahead of the one being handed out
# One page of a folder's own level: its objects, its sub-folders, the next page's token.
Level = tuple[list[ListedObject], list[str], str | None]


def _describe(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code', 'error')} (HTTP {status}) {err.get('Message', '')}".strip()
    return str(exc) or type(exc).__name__


class S3ObjectStore:
    def __init__(self, client: S3Client, bucket: str, *, direct: bool = True) -> None:
        """`direct`: list and read on the lean signed path where it can match `client`."""
        self.client = client
        self.bucket = bucket
        self._list_requests = 0
        self._lock = threading.Lock()
        # Object Lock headers of objects read, kept until asked for (`retention`), so the
        # verifier's lock check costs no request for objects it reads anyway.
        self._seen: dict[str, Retention | None] = {}
        self._direct = direct
        self._reader: ObjectReader | None = None
        self._reader_made = not direct

    def _lean(self) -> ObjectReader | None:
        """The lean reader, made on first use; None: boto3 does the work."""
        if self._reader_made:
            return self._reader
        with self._lock:
            if not self._reader_made:
                from cloud.integrations.object_reader import ObjectReader
                from cloud.integrations.s3 import USER_AGENT
                from cloud.integrations.s3_direct import direct_settings

                settings, why_not = direct_settings(self.client, self.bucket)
                if settings is None:
                    log.debug("reads of %s go through boto3: %s", self.bucket, why_not)
                else:
                    self._reader = ObjectReader(settings, self.bucket, user_agent=USER_AGENT)
                self._reader_made = True
            return self._reader

    def _fall_back(self, exc: Exception) -> None:
        """The lean path met what only boto3 handles (a region redirect): boto3 from now on."""
        with self._lock:
            reader, self._reader = self._reader, None
        if reader is None:
            return  # another thread switched already
        log.warning(
            "%s — reading %s through boto3 from now on; set destination.region to the "
            "bucket's region",
            exc,
            self.bucket,
        )
        reader.close()

    def close(self) -> None:
        """Close the lean path's connections (boto3's pool closes with its client)."""
        reader = self._reader
        if reader is not None:
            reader.close()

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
        """Every object under `prefix`, in key order.

        On the lean path the listing goes folder by folder (delimiter "/"), as `rclone
        check` does, with up to SPLIT_WORKERS folders listed at once: a flat listing is one
        page after another (each needs the last one's token), and some servers take longer
        per page the larger the bucket (rclone serve s3: ~2 s a page at 100,000 objects,
        ~0.03 s a folder). A folder longer than one page is listed flat, page by page."""
        reader = self._lean()
        if reader is not None:
            from cloud.integrations.object_reader import DirectUnsupportedError

            try:
                first = self._level_page(reader, prefix)
            except DirectUnsupportedError as exc:
                self._fall_back(exc)
            else:
                pool = ThreadPoolExecutor(max_workers=SPLIT_WORKERS, thread_name_prefix="list")
                try:
                    yield from self._folder(reader, pool, prefix, first)
                finally:
                    pool.shutdown(wait=False, cancel_futures=True)
                return
        yield from self._list_boto3(prefix)

    def _count_lists(self) -> None:
        with self._lock:
            self._list_requests += 1

    def _level_page(self, reader: ObjectReader, prefix: str) -> Level:
        self._count_lists()
        return reader.list_level_page(prefix)

    def _flat(self, reader: ObjectReader, prefix: str) -> Iterator[ListedObject]:
        token: str | None = None
        while True:
            self._count_lists()
            items, token = reader.list_page(prefix, token)
            yield from items
            if token is None:
                return

    def _folder(
        self, reader: ObjectReader, pool: ThreadPoolExecutor, prefix: str, level: Level
    ) -> Iterator[ListedObject]:
        """A folder's objects and, in key order among them, each sub-folder's (listed
        ahead on the pool, at most SPLIT_AHEAD at a time)."""
        items, subs, token = level
        if token is not None:  # more than a page: paged delimiter listings vary by server
            yield from self._flat(reader, prefix)
            return
        # A server that ignores the delimiter answers with every key and no sub-folder.
        subs = sorted(sub for sub in subs if sub.startswith(prefix) and sub != prefix)
        ahead: dict[str, Future[Level]] = {}
        upcoming = iter(subs)

        def top_up() -> None:
            while len(ahead) < SPLIT_AHEAD:
                sub = next(upcoming, None)
                if sub is None:
                    return
                ahead[sub] = pool.submit(self._level_page, reader, sub)

        top_up()
        entries: list[tuple[str, ListedObject | None]] = [(i.key, i) for i in items]
        entries += [(sub, None) for sub in subs]
        entries.sort(key=lambda entry: entry[0])
        for key, item in entries:
            if item is not None:
                yield item
                continue
            listed = ahead.pop(key).result()
            top_up()
            yield from self._folder(reader, pool, key, listed)

    def _list_boto3(self, prefix: str) -> Iterator[ListedObject]:
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

    def _remember(self, key: str, retention: Retention | None) -> None:
        with self._lock:
            if len(self._seen) >= 10_000:  # never asked for: keep memory bounded
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] = retention

    def read(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        reader = self._lean()
        if reader is not None:
            from cloud.integrations.object_reader import DirectUnsupportedError

            try:
                download = reader.get(key)
            except DirectUnsupportedError as exc:
                self._fall_back(exc)
            else:
                self._remember(key, _header_retention(download.headers))
                yield from download.chunks(chunk_size)
                return
        yield from self._read_boto3(key, chunk_size)

    def _read_boto3(self, key: str, chunk_size: int) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            self._remember(key, _retention(response))
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


def _header_retention(headers: dict[str, str]) -> Retention | None:
    """Object Lock of a GET answer's headers (lower-case names), as boto3 would parse it."""
    mode = headers.get("x-amz-object-lock-mode")
    until = headers.get("x-amz-object-lock-retain-until-date")
    if not mode or not until:
        return None
    try:
        parsed = datetime.fromisoformat(until)
    except ValueError:
        try:
            parsed = parsedate_to_datetime(until)
        except (TypeError, ValueError):
            return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return Retention(mode, parsed)


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

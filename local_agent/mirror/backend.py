"""The destination bucket as the agent uses it: a handful of S3 calls, each turning
botocore's exceptions into one sentence that names the object and the cause.

botocore (and the agent's own PUTs, `object_writer`, in the same way) already retries 5xx,
throttling and dropped connections (standard mode); what reaches this module is final.
Request counts are kept so summaries and tests can prove that a run with nothing new made
no request at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from cloud.contracts.destination import Destination
from cloud.integrations.sigv4 import md5_header
from cloud.logic.ports import ListedObject
from local_agent import __version__
from local_agent.errors import ConfigError, DestinationError, RelayError

if TYPE_CHECKING:
    from boto3.session import Session
    from types_boto3_s3 import S3Client
    from types_boto3_s3.type_defs import CompletedPartTypeDef

    from cloud.integrations.s3 import S3Access
    from local_agent.mirror.object_writer import ObjectWriter
    from local_agent.mirror.objectlock import ObjectLock

T = TypeVar("T")
log = logging.getLogger(__name__)

# Answers of S3 to a request signed for the wrong region.
WRONG_REGION = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "301"})
# Answers for an object, or an unfinished multipart upload, that is not there.
NO_OBJECT = frozenset({"404", "NoSuchKey", "NotFound"})
NO_UPLOAD = frozenset({"NoSuchUpload", "404", "NotFound"})


@dataclass(frozen=True, slots=True)
class ListedUpload:
    key: str  # full object key
    upload_id: str


@dataclass(frozen=True, slots=True)
class _Listing:
    """A paginated S3 listing: its operation, and for each marker the field of a page that
    says where the next page starts and the request parameter that carries it. The first
    marker says whether there is a next page at all."""

    operation: str
    markers: tuple[tuple[str, str], ...]


OBJECTS = _Listing("list_objects_v2", (("NextContinuationToken", "ContinuationToken"),))
UPLOADS = _Listing(
    "list_multipart_uploads",
    (("NextKeyMarker", "KeyMarker"), ("NextUploadIdMarker", "UploadIdMarker")),
)
VERSIONS = _Listing(
    "list_object_versions",
    (("NextKeyMarker", "KeyMarker"), ("NextVersionIdMarker", "VersionIdMarker")),
)


def _etag(value: str) -> str:
    return value.strip('"')


def _sent(body: bytes | BinaryIO, size: int, md5_hex: str) -> dict[str, Any]:
    """A body as every upload request sends it: with its length and its MD5, which the
    bucket checks (B2 accepts no other per-request checksum)."""
    return {"Body": body, "ContentLength": size, "ContentMD5": md5_header(md5_hex)}


def _written(lock: ObjectLock | None) -> dict[str, Any]:
    """What every object the agent creates carries: its content type and any retention."""
    locked = lock.params() if lock is not None else {}
    return {"ContentType": "application/octet-stream", **locked}


def describe_error(exc: BaseException) -> str:
    """A one-line cause without credentials (botocore never puts the secret in these)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = err.get("Code", "error")
        message = err.get("Message", "")
        return f"{code} (HTTP {status}){': ' + message if message else ''}"
    return str(exc) or type(exc).__name__


def _is_sdk_error(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, BotoCoreError | ClientError)


def error_code(exc: BaseException | None) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code"))
    return None


class Backend:
    """The destination's S3 operations. The client is made on first use, so a run with
    nothing to send neither imports the SDK nor opens a connection.

    Single PUTs go through the agent's own signed requests (`object_writer`) unless
    `direct_put` is off or the writer cannot match the client (then boto3 sends them).
    """

    def __init__(
        self,
        access: S3Access,
        destination: Destination,
        *,
        max_pool_connections: int = 10,
        max_attempts: int = 8,
        direct_put: bool = True,
    ) -> None:
        self._access = access
        self._max_pool_connections = max_pool_connections
        self._max_attempts = max_attempts
        self._direct_put = direct_put
        self._session: Session | None = None
        self._client: S3Client | None = None
        self._writer: ObjectWriter | None = None
        self._writer_made = False
        self.destination = destination
        self.bucket = destination.bucket
        self._requests = 0
        self._lock = threading.Lock()
        self._made_lock = threading.Lock()
        # Object Lock retention every object written through this backend carries
        # (`[destination] object_lock`); None writes plain objects.
        self.lock: ObjectLock | None = None
        # Full key → version id of objects written with a lock, for the caller to record
        # (`take_version`): renewal then extends the version the agent wrote, not whatever
        # is current (an attacker's overwrite).
        self._versions: dict[str, str] = {}

    @property
    def client(self) -> S3Client:
        with self._made_lock:
            return self._make_client()

    def _make_client(self) -> S3Client:
        if self._client is None:
            from cloud.integrations.s3 import make_s3_client, make_s3_session

            self._session = make_s3_session(self._access)
            self._client = make_s3_client(
                self._access,
                max_pool_connections=self._max_pool_connections,
                max_attempts=self._max_attempts,
                session=self._session,
            )
            self._client.meta.events.register("before-send.s3", self._count)
        return self._client

    def _object_writer(self) -> ObjectWriter | None:
        if self._writer_made:  # settled once; no lock on every PUT
            return self._writer
        with self._made_lock:
            if not self._writer_made:
                client = self._make_client()
                if self._direct_put:
                    from cloud.integrations.s3 import USER_AGENT
                    from local_agent.mirror.object_writer import writer_for

                    assert self._session is not None
                    self._writer = writer_for(
                        client,
                        self._session,
                        self.bucket,
                        user_agent=f"{USER_AGENT}/{__version__}",
                        on_request=self._count,
                    )
                self._writer_made = True
            return self._writer

    @property
    def direct_put_active(self) -> bool:
        """Whether single PUTs bypass boto3 (for `doctor` and the benchmark report)."""
        return self._object_writer() is not None

    def close(self) -> None:
        """Close the writer's kept-alive connections (boto3's pool closes with the process)."""
        with self._made_lock:
            if self._writer is not None:
                self._writer.close()

    def _count(self, *_: Any, **__: Any) -> None:
        with self._lock:
            self._requests += 1

    @property
    def requests(self) -> int:
        """HTTP requests sent so far, retries included."""
        return self._requests

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            if _is_sdk_error(exc):
                raise self._translate(what, exc) from exc
            raise

    def _call_unless(self, what: str, fn: Callable[[], T], absent: frozenset[str]) -> T | None:
        """`_call`, but None where S3 answers one of the `absent` codes (no such object)."""
        try:
            return self._call(what, fn)
        except DestinationError as exc:
            if error_code(exc.__cause__) in absent:
                return None
            raise

    def _pages(
        self,
        what: str,
        listing: _Listing,
        params: dict[str, Any],
        *,
        absent: frozenset[str] = frozenset(),
    ) -> Iterator[Any]:
        """Every page of `listing`; none after an `absent` answer. A truncated page that
        names no next page ends the listing too (rather than asking for the first again)."""

        def fetch(after: dict[str, Any]) -> Any:
            return getattr(self.client, listing.operation)(**params, **after)

        after: dict[str, Any] = {}
        while True:
            page = self._call_unless(what, partial(fetch, after), absent)
            if page is None:
                return
            yield page
            if not page.get("IsTruncated"):
                return
            after = {param: page[field] for field, param in listing.markers if page.get(field)}
            if listing.markers[0][1] not in after:
                return

    def _translate(self, what: str, exc: Exception) -> RelayError:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return ConfigError(
                "no credentials for the destination: set destination.access_key_id and "
                "destination.secret_access_key, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "or an AWS profile"
            )
        hint = ""
        code = error_code(exc)
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            hint = " — check the key, its capabilities and its bucket/prefix restriction"
        elif code == "NoSuchBucket":
            hint = f" — bucket {self.bucket!r} does not exist at this endpoint"
        elif code == "RequestTimeTooSkewed":
            hint = " — the system clock is off; fix NTP"
        elif self.lock is not None and code == "InvalidRequest":
            hint = (
                " — destination.object_lock needs a bucket with Object Lock enabled "
                "(`backrest-relay doctor` checks it; docs/security.md)"
            )
        return DestinationError(f"{what}: {describe_error(exc)}{hint}")

    # -- objects --------------------------------------------------------------------------

    def put(
        self,
        key: str,
        body: bytes | BinaryIO,
        size: int,
        md5_hex: str,
        sha256_hex: str,
        *,
        locked: bool = True,
    ) -> str:
        """Upload a repository file (`key` relative to the prefix); returns the ETag."""
        return self.put_at(
            self.destination.key(key), body, size, md5_hex, sha256_hex, what=key, locked=locked
        )

    def put_at(
        self,
        full: str,
        body: bytes | BinaryIO,
        size: int,
        md5_hex: str,
        sha256_hex: str,
        *,
        what: str = "",
        locked: bool = True,
    ) -> str:
        """Upload to an absolute object key (manifests live outside the prefix).

        `md5_hex` and `sha256_hex` are of the body: the bucket checks both. With `locked`
        (the default) the object carries the backend's Object Lock retention, if any."""
        lock = self.lock if locked else None
        writer = self._object_writer()
        if writer is not None:
            from local_agent.mirror.object_writer import Payload

            payload = Payload.of(body, size, md5_hex, sha256_hex)
            extra = lock.headers() if lock is not None else None
            heard = (lambda v: self._note_version(full, v)) if lock is not None else None
            try:
                return self._call(
                    f"upload of {what or full}",
                    lambda: writer.put(full, payload, extra, heard),
                )
            except DestinationError as exc:
                if error_code(exc.__cause__) not in WRONG_REGION:
                    raise
                # The bucket lives in another region than configured: boto3 finds the
                # right one by itself (its region redirector); the writer cannot.
                log.warning(
                    "%s: %s — sending single PUTs through boto3 from now on; "
                    "set destination.region to the bucket's region",
                    self.destination.describe(),
                    exc.message,
                )
                self._writer = None
                payload.rewind()
        resp = self._call(
            f"upload of {what or full}",
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=full, **_sent(body, size, md5_hex), **_written(lock)
            ),
        )
        if lock is not None and resp.get("VersionId"):
            self._note_version(full, resp["VersionId"])
        return _etag(resp["ETag"])

    def delete(self, key: str) -> None:
        # One DeleteObject per key: DeleteObjects needs a body checksum that B2 refuses
        # in its flexible form and botocore no longer sends as Content-MD5.
        full = self.destination.key(key)
        self._call(
            f"delete of {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=full)
        )

    def list(self, prefix: str = "") -> Iterator[ListedObject]:
        """Every object under the destination prefix (+ `prefix`), 1000 per request."""
        base = self.destination.key(prefix) if prefix else self.destination.key("")
        params = {"Bucket": self.bucket, "Prefix": base, "MaxKeys": 1000}
        for page in self._pages(f"listing of {self.destination.describe()}", OBJECTS, params):
            for item in page.get("Contents", []):
                relative = self.destination.relative(item["Key"])
                if relative:
                    yield ListedObject(relative, int(item["Size"]), _etag(item.get("ETag", "")))

    # -- multipart ------------------------------------------------------------------------

    def _upload(self, full: str, upload_id: str) -> dict[str, Any]:
        """How S3 names one unfinished multipart upload (parts, listing, completion, abort)."""
        return {"Bucket": self.bucket, "Key": full, "UploadId": upload_id}

    def create_multipart(self, key: str) -> str:
        full = self.destination.key(key)
        resp = self._call(
            f"start of multipart upload of {key}",
            lambda: self.client.create_multipart_upload(
                Bucket=self.bucket, Key=full, **_written(self.lock)
            ),
        )
        return resp["UploadId"]

    def upload_part(
        self, key: str, upload_id: str, number: int, body: bytes | BinaryIO, size: int, md5: str
    ) -> str:
        full = self.destination.key(key)
        resp = self._call(
            f"upload of part {number} of {key}",
            lambda: self.client.upload_part(
                **self._upload(full, upload_id), PartNumber=number, **_sent(body, size, md5)
            ),
        )
        return _etag(resp["ETag"])

    def list_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]] | None:
        """Part number → (ETag, size) of an unfinished upload; None if it no longer exists."""
        full = self.destination.key(key)
        parts: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            page = self._call_unless(
                f"listing parts of {key}",
                lambda m=marker: self.client.list_parts(  # type: ignore[misc]
                    **self._upload(full, upload_id), PartNumberMarker=m
                ),
                NO_UPLOAD,
            )
            if page is None:
                return None
            for part in page.get("Parts", []):
                parts[int(part["PartNumber"])] = (_etag(part["ETag"]), int(part["Size"]))
            if not page.get("IsTruncated"):
                return parts
            marker = int(page.get("NextPartNumberMarker", 0))
            if not marker:
                return parts

    def head_size(self, key: str) -> int | None:
        """Size of a repository object, None if it does not exist."""
        full = self.destination.key(key)
        resp = self._call_unless(
            f"checking {key}",
            lambda: self.client.head_object(Bucket=self.bucket, Key=full),
            NO_OBJECT,
        )
        return None if resp is None else int(resp["ContentLength"])

    def read(self, key: str, *, limit: int) -> bytes | None:
        """The bytes of a small repository object (at most `limit`); None if it does not
        exist. Bigger objects are cut at `limit`: callers compare, so a cut copy differs."""
        full = self.destination.key(key)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes=0-{limit}")
        except Exception as exc:
            code = error_code(exc)
            if code in NO_OBJECT:
                return None
            if code in ("InvalidRange", "416"):
                return b""  # an empty object has no byte 0
            if _is_sdk_error(exc):
                raise self._translate(f"reading {key}", exc) from exc
            raise
        body = resp["Body"]
        try:
            return body.read()
        except Exception as exc:
            if _is_sdk_error(exc):
                raise self._translate(f"reading {key}", exc) from exc
            raise
        finally:
            body.close()

    def sha256_of(self, key: str) -> str | None:
        """SHA-256 of a repository object's bytes, read back in a stream; None if absent."""
        import hashlib

        full = self.destination.key(key)

        def read_back() -> str:
            digest = hashlib.sha256()
            body = self.client.get_object(Bucket=self.bucket, Key=full)["Body"]
            try:
                for chunk in body.iter_chunks(1024 * 1024):
                    digest.update(chunk)
            finally:
                body.close()
            return digest.hexdigest()

        return self._call_unless(f"reading back {key}", read_back, NO_OBJECT)

    def complete_multipart(self, key: str, upload_id: str, etags: dict[int, str]) -> str:
        full = self.destination.key(key)
        parts: list[CompletedPartTypeDef] = [
            {"PartNumber": n, "ETag": f'"{etags[n]}"'} for n in sorted(etags)
        ]
        resp = self._call(
            f"completion of multipart upload of {key}",
            lambda: self.client.complete_multipart_upload(
                **self._upload(full, upload_id), MultipartUpload={"Parts": parts}
            ),
        )
        if self.lock is not None:
            # CreateMultipartUpload carried the lock; set it on the completed version as
            # well, because some S3-compatible servers (moto among them) drop the lock
            # headers of a multipart upload. One request per object of >= 64 MiB.
            self.put_retention(key, self.lock, version_id=resp.get("VersionId"))
            if resp.get("VersionId"):
                self._note_version(full, resp["VersionId"])
        return _etag(resp.get("ETag", ""))

    def abort_multipart(self, full_key: str, upload_id: str) -> None:
        self._call_unless(
            f"abort of multipart upload of {full_key}",
            lambda: self.client.abort_multipart_upload(**self._upload(full_key, upload_id)),
            NO_UPLOAD,
        )

    def list_multipart_uploads(self) -> Iterator[ListedUpload]:
        pages = self._pages(
            f"listing unfinished uploads in {self.destination.describe()}",
            UPLOADS,
            {"Bucket": self.bucket, "Prefix": self.destination.key("")},
            # rclone's S3 server answers NoSuchUpload when there are none.
            absent=frozenset({"NoSuchUpload"}),
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                yield ListedUpload(upload["Key"], upload["UploadId"])

    # -- Object Lock ----------------------------------------------------------------------

    def _note_version(self, full: str, version_id: str) -> None:
        with self._lock:
            self._versions[full] = version_id

    def take_version(self, key: str) -> str | None:
        """The version id the last locked write of repository object `key` created."""
        with self._lock:
            return self._versions.pop(self.destination.key(key), None)

    def put_retention(self, key: str, lock: ObjectLock, *, version_id: str | None = None) -> None:
        """Set (extend) the retention of a repository object's current version, or of
        `version_id`. Never shortens and never bypasses governance: S3 refuses both."""
        full = self.destination.key(key)
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full,
            "Retention": {"Mode": lock.mode, "RetainUntilDate": lock.until},
        }
        if version_id:
            kwargs["VersionId"] = version_id
        self._call(
            f"extending the retention of {key}",
            lambda: self.client.put_object_retention(**kwargs),
        )

    def object_lock_status(self) -> tuple[bool, str]:
        """Whether the bucket has Object Lock enabled, and what it said (GetObjectLock-
        Configuration; a bucket without it answers ObjectLockConfigurationNotFoundError)."""
        try:
            resp = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except Exception as exc:
            code = error_code(exc)
            if code in ("ObjectLockConfigurationNotFoundError", "InvalidRequest", "404"):
                return False, describe_error(exc)
            if _is_sdk_error(exc):
                what = f"reading the Object Lock setting of {self.bucket}"
                raise self._translate(what, exc) from exc
            raise
        enabled = resp.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        return enabled, "Enabled" if enabled else "not enabled"

    # -- versions (recover) ---------------------------------------------------------------

    def list_versions(self, full_prefix: str) -> Iterator[ObjectVersion]:
        """Every version and delete marker under an absolute key prefix, 1000 per request
        (ListObjectVersions: B2 bills it as a list call; only `recover` uses it)."""
        pages = self._pages(
            f"listing the versions under {self.bucket}/{full_prefix}",
            VERSIONS,
            {"Bucket": self.bucket, "Prefix": full_prefix},
        )
        for page in pages:
            for item in page.get("Versions", []):
                yield ObjectVersion(
                    key=item["Key"],
                    version_id=str(item.get("VersionId") or "null"),
                    size=int(item.get("Size", 0)),
                    etag=_etag(item.get("ETag", "")),
                    modified=item["LastModified"].timestamp(),
                    latest=bool(item.get("IsLatest")),
                    delete_marker=False,
                )
            for marker in page.get("DeleteMarkers", []):
                yield ObjectVersion(
                    key=marker["Key"],
                    version_id=str(marker.get("VersionId") or "null"),
                    size=0,
                    etag="",
                    modified=marker["LastModified"].timestamp(),
                    latest=bool(marker.get("IsLatest")),
                    delete_marker=True,
                )

    def read_version(self, full_key: str, version_id: str) -> Iterator[bytes]:
        """The bytes of one version of an object, streamed."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=full_key, VersionId=version_id)
            body = resp["Body"]
            try:
                yield from body.iter_chunks(1024 * 1024)
            finally:
                body.close()
        except Exception as exc:
            if _is_sdk_error(exc):
                raise self._translate(f"reading {full_key} version {version_id}", exc) from exc
            raise

    def copy_version(self, full_key: str, version_id: str, target_key: str) -> None:
        """Copy one version of an object to `target_key` (the same key: it becomes the
        current version again), carrying the backend's Object Lock. Up to 5 GB (CopyObject);
        restic's packs are at most 128 MiB."""
        self._call(
            f"restoring {full_key} version {version_id}",
            lambda: self.client.copy_object(
                Bucket=self.bucket,
                Key=target_key,
                CopySource={"Bucket": self.bucket, "Key": full_key, "VersionId": version_id},
                MetadataDirective="COPY",
                **(self.lock.params() if self.lock is not None else {}),
            ),
        )

    def versioning_enabled(self) -> bool:
        """Whether the bucket keeps versions (always so with Object Lock)."""
        resp = self._call(
            f"reading the versioning setting of {self.bucket}",
            lambda: self.client.get_bucket_versioning(Bucket=self.bucket),
        )
        return resp.get("Status") == "Enabled"

    def hide(self, full_key: str) -> None:
        """DeleteObject without a version id: a delete marker on versioned buckets (the
        versions stay, and so does their lock)."""
        self._call(
            f"hiding {full_key}",
            lambda: self.client.delete_object(Bucket=self.bucket, Key=full_key),
        )


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    key: str  # full object key
    version_id: str
    size: int
    etag: str
    modified: float  # epoch seconds
    latest: bool
    delete_marker: bool

    @property
    def multipart(self) -> bool:
        return "-" in self.etag

"""What an S3 request is (operation, bucket, key) as a proxy sees it, B2's header
quirks, and the record the proxy keeps of each request."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote
from xml.sax.saxutils import escape


def split_path(path: str) -> tuple[str | None, str | None]:
    """(bucket, key) of a path-style S3 request path; either may be None."""
    raw = path.split("?", 1)[0].lstrip("/")
    if not raw:
        return None, None
    bucket, _, key = raw.partition("/")
    return unquote(bucket), (unquote(key) if key else None)


# Query parameters that only shape a bucket listing (anything else is a sub-resource).
_LIST_PARAMS = frozenset(
    {
        "list-type",
        "prefix",
        "delimiter",
        "marker",
        "max-keys",
        "encoding-type",
        "continuation-token",
        "start-after",
        "fetch-owner",
        "x-id",
        "allow-unordered",
    }
)

_BUCKET_GET_SUBRESOURCES = {
    "uploads": "ListMultipartUploads",
    "versions": "ListObjectVersions",
    "location": "GetBucketLocation",
    "versioning": "GetBucketVersioning",
    "object-lock": "GetObjectLockConfiguration",
    "lifecycle": "GetBucketLifecycleConfiguration",
    "policy": "GetBucketPolicy",
    "acl": "GetBucketAcl",
    "cors": "GetBucketCors",
    "encryption": "GetBucketEncryption",
    "tagging": "GetBucketTagging",
}

_OBJECT_SUBRESOURCES = {
    "GET": {
        "uploadId": "ListParts",
        "tagging": "GetObjectTagging",
        "acl": "GetObjectAcl",
        "retention": "GetObjectRetention",
        "legal-hold": "GetObjectLegalHold",
        "attributes": "GetObjectAttributes",
    },
    "PUT": {
        "tagging": "PutObjectTagging",
        "acl": "PutObjectAcl",
        "retention": "PutObjectRetention",
        "legal-hold": "PutObjectLegalHold",
    },
    "POST": {"uploads": "CreateMultipartUpload", "uploadId": "CompleteMultipartUpload"},
    "DELETE": {"uploadId": "AbortMultipartUpload", "tagging": "DeleteObjectTagging"},
}

#: Operations that Backblaze B2 bills as Class C ("list") transactions; a no-op mirror
#: run must make none of them.
LIST_OPERATIONS = frozenset(
    {
        "ListBuckets",
        "ListObjects",
        "ListObjectsV2",
        "ListObjectVersions",
        "ListMultipartUploads",
        "ListParts",
    }
)


def s3_operation(
    method: str, path: str, query: dict[str, list[str]], header_names: Iterable[str] = ()
) -> str:
    """Name the S3 API operation of a path-style request (``ListObjectsV2``, ``UploadPart``...).

    Unknown shapes come back as ``"<METHOD> bucket"`` or ``"<METHOD> object"``.
    """
    method = method.upper()
    names = {h.lower() for h in header_names}
    bucket, key = split_path(path)
    if bucket is None:
        return "ListBuckets" if method == "GET" else f"{method} service"
    if key is None:
        if method == "GET":
            for sub, op in _BUCKET_GET_SUBRESOURCES.items():
                if sub in query:
                    return op
            if not set(query) - _LIST_PARAMS:
                return "ListObjectsV2" if query.get("list-type") == ["2"] else "ListObjects"
            return "GET bucket"
        if method == "POST" and "delete" in query:
            return "DeleteObjects"
        if not query:
            simple = {"HEAD": "HeadBucket", "PUT": "CreateBucket", "DELETE": "DeleteBucket"}
            if method in simple:
                return simple[method]
        return f"{method} bucket"
    if method == "PUT" and "partNumber" in query and "uploadId" in query:
        return "UploadPartCopy" if "x-amz-copy-source" in names else "UploadPart"
    for sub, op in _OBJECT_SUBRESOURCES.get(method, {}).items():
        if sub in query:
            return op
    if query and not set(query) <= {"versionId", "x-id", "partNumber", "response-content-type"}:
        return f"{method} object"
    if method == "PUT":
        return "CopyObject" if "x-amz-copy-source" in names else "PutObject"
    simple = {"GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}
    return simple.get(method, f"{method} object")


def b2_rejected_header(header_names: Iterable[str]) -> str | None:
    """The header Backblaze B2 would refuse in this request, or None.

    B2's S3 API answers 400 to flexible-checksum headers (``x-amz-checksum-*``,
    ``x-amz-sdk-checksum-algorithm``) and streaming trailers (``x-amz-trailer``), all of
    which boto3 >= 1.36 sends by default.
    """
    names = [h.lower() for h in header_names]
    if "x-amz-sdk-checksum-algorithm" in names:
        return "x-amz-sdk-checksum-algorithm"
    for name in names:
        if name.startswith("x-amz-checksum-") or name == "x-amz-trailer":
            return name
    return None


def s3_error_xml(code: str, message: str) -> bytes:
    """An S3-style XML error document."""
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
    ).encode()


class _PathStyle:
    """Bucket and key of a path-style request path."""

    path: str

    @property
    def bucket(self) -> str | None:
        """Bucket named by the path (path-style addressing), if any."""
        return split_path(self.path)[0]

    @property
    def key(self) -> str | None:
        """Object key named by the path, URL-decoded, if any."""
        return split_path(self.path)[1]


@dataclass(frozen=True, eq=False)
class RequestInfo(_PathStyle):
    """A request as the proxy received it, before forwarding: what fault hooks decide on."""

    seq: int
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    content_length: int | None

    @property
    def header_names(self) -> frozenset[str]:
        """Lower-cased header names."""
        return frozenset(self.headers)

    @property
    def operation(self) -> str:
        """S3 operation name, see ``s3_operation``."""
        return s3_operation(self.method, self.path, self.query, self.headers)


@dataclass(frozen=True, eq=False)
class LoggedRequest(_PathStyle):
    """One entry of the proxy's request log.

    ``status`` is what the client received (None: the connection was dropped or reset);
    ``upstream_status`` is what the upstream answered (None: never forwarded or failed);
    ``fault`` names the injected fault (``"b2_quirk"``, ``"respond"``, ``"drop"``...).
    """

    seq: int
    method: str
    path: str
    query: dict[str, list[str]]
    header_names: frozenset[str]
    status: int | None
    upstream_status: int | None
    fault: str | None
    operation: str

    @property
    def is_list_call(self) -> bool:
        """Whether B2 would bill this as a Class C (list) call."""
        return self.operation in LIST_OPERATIONS

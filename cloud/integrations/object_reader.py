"""The verifier's own signed GETs and listings, streamed on kept-alive connections.

Through boto3 a read-back cost ~4 ms of CPU per object and a listing page ~30 ms of XML
parsing (docs/benchmarks.md, S5), under the GIL: a deep check of 100,000 small objects was
CPU-bound long before the server was. This reader signs a GET itself (the payload of a GET
is empty, its hash a constant), sends it on this thread's connection and hands the body on
in pieces as they arrive, so the caller hashes it without ever holding a whole object.
ListObjectsV2 pages are read with a few regular expressions instead of a full XML parse.

It keeps the client's behaviour: endpoint, addressing style, timeouts, attempts,
credentials (refreshed), CA bundle, botocore's standard retries, and no checksum headers
(B2 refuses them). Where it cannot (a proxy, a bucket in another region), the store falls
back to boto3 (`DirectUnsupportedError`).
"""

from __future__ import annotations

import hashlib
import re
import ssl
import time
from collections.abc import Callable, Iterator
from html import unescape
from urllib.parse import quote, unquote_plus

from cloud.integrations.http1 import Connection, StreamedResponse
from cloud.integrations.s3_direct import (
    WRONG_REGION,
    ConnectionPool,
    Credentials,
    DirectSettings,
    Target,
    backoff,
    parse_error,
    retryable,
)
from cloud.integrations.sigv4 import SigV4Signer, s3_path
from cloud.logic.ports import ListedObject, ObjectNotFoundError, ObjectStoreError

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
PAGE_SIZE = 1000

_CONTENTS = re.compile(rb"<Contents>(.*?)</Contents>", re.S)
_KEY = re.compile(rb"<Key>(.*?)</Key>", re.S)
_SIZE = re.compile(rb"<Size>\s*(\d+)\s*</Size>")
_ETAG = re.compile(rb"<ETag>(.*?)</ETag>", re.S)
_TRUNCATED = re.compile(rb"<IsTruncated>\s*true\s*</IsTruncated>", re.I)
_NEXT_TOKEN = re.compile(rb"<NextContinuationToken>(.*?)</NextContinuationToken>", re.S)
_URL_ENCODED = re.compile(rb"<EncodingType>\s*url\s*</EncodingType>")
_COMMON_PREFIX = re.compile(rb"<CommonPrefixes>\s*<Prefix>(.*?)</Prefix>\s*</CommonPrefixes>", re.S)


class DirectUnsupportedError(ObjectStoreError):
    """The reader cannot do what boto3 would (the bucket answers for another region)."""


def _text(raw: bytes) -> str:
    text = raw.decode("utf-8")
    return unescape(text) if "&" in text else text


def _query(params: dict[str, str]) -> str:
    """The canonical query string SigV4 signs, also sent as is (sorted, RFC 3986)."""
    return "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )


def parse_list_page(body: bytes) -> tuple[list[ListedObject], str | None]:
    """(objects, next continuation token or None) of one ListObjectsV2 answer."""
    items, _prefixes, token = parse_list_page_prefixes(body)
    return items, token


def parse_list_page_prefixes(body: bytes) -> tuple[list[ListedObject], list[str], str | None]:
    """(objects, common prefixes, next continuation token or None) of one ListObjectsV2
    answer (prefixes only with a delimiter)."""
    url_encoded = _URL_ENCODED.search(body) is not None
    prefixes = []
    for match in _COMMON_PREFIX.finditer(body):
        name = _text(match.group(1))
        prefixes.append(unquote_plus(name) if url_encoded else name)
    items: list[ListedObject] = []
    for match in _CONTENTS.finditer(body):
        block = match.group(1)
        key = _KEY.search(block)
        size = _SIZE.search(block)
        if key is None or size is None:
            raise ObjectStoreError(
                f"listing answer has an entry without Key or Size: {block[:200]!r}"
            )
        name = _text(key.group(1))
        if url_encoded:
            name = unquote_plus(name)
        etag = _ETAG.search(block)
        items.append(
            ListedObject(name, int(size.group(1)), _text(etag.group(1)).strip('"') if etag else "")
        )
    token = None
    if _TRUNCATED.search(body):
        found = _NEXT_TOKEN.search(body)
        if found is None:
            raise ObjectStoreError("listing answer is truncated but has no NextContinuationToken")
        token = _text(found.group(1))
    return items, prefixes, token


class ObjectReader:
    """GETs and lists one bucket; safe to share between threads (connections from a pool)."""

    def __init__(
        self,
        settings: DirectSettings,
        bucket: str,
        *,
        user_agent: str = "backrest-relay",
        on_request: Callable[[], None] = lambda: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bucket = bucket
        self.target = Target(settings.endpoint_url, bucket, settings.virtual_host)
        self._pool = ConnectionPool(
            self.target,
            ssl_context=settings.ssl_context,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
        )
        self._signer = SigV4Signer(settings.region, "s3")
        self._credentials = Credentials(settings.credentials)
        self._max_attempts = max(1, settings.max_attempts)
        self._user_agent = user_agent
        self._on_request = on_request
        self._sleep = sleep

    def close(self) -> None:
        self._pool.close()

    def get(self, key: str) -> Download:
        """A 2xx answer to GET `key` (absolute), its body still to read with `chunks`.

        ObjectNotFoundError when there is no such object; ObjectStoreError otherwise."""
        what = f"reading {self.bucket}/{key}"
        conn, response = self._get(f"{self.target.path_prefix}/{s3_path(key)}", "", what)
        return Download(self._pool, conn, response, what)

    def list_page(
        self, prefix: str, token: str | None = None
    ) -> tuple[list[ListedObject], str | None]:
        """One ListObjectsV2 page under `prefix`: (objects, the next page's token or None)."""
        items, _prefixes, token = self.list_level_page(prefix, token, delimiter="")
        return items, token

    def list_level_page(
        self, prefix: str, token: str | None = None, *, delimiter: str = "/"
    ) -> tuple[list[ListedObject], list[str], str | None]:
        """One ListObjectsV2 page of `prefix`'s own level (delimiter "/"): (objects,
        sub-prefixes, the next page's token or None); with `delimiter=""` everything below
        `prefix`."""
        params = {"list-type": "2", "prefix": prefix, "max-keys": str(PAGE_SIZE)}
        params["encoding-type"] = "url"  # keys with characters XML cannot carry
        if delimiter:
            params["delimiter"] = delimiter
        if token:
            params["continuation-token"] = token
        what = f"listing {self.bucket}/{prefix}"
        attempt = 0
        while True:
            attempt += 1
            conn, response = self._get(self.target.path_prefix or "/", _query(params), what)
            try:
                body = response.read()
            except OSError as exc:
                # A page cut mid-body is asked for again, as boto3 does (the body is
                # the answer: nothing of it was handed out).
                conn.close()
                self._pause_or_raise(attempt, exc, what)
                continue
            self._pool.release(conn)
            return parse_list_page_prefixes(body)

    def _get(self, path: str, query: str, what: str) -> tuple[Connection, StreamedResponse]:
        """Send a signed GET, retried as botocore's standard mode would, until a 2xx answer
        (returned on its connection, the body unread) or an answer that is an error."""
        host = self.target.host_header
        line = f"GET {path}?{query} HTTP/1.1\r\n" if query else f"GET {path} HTTP/1.1\r\n"
        attempt = 0
        while True:
            attempt += 1
            signed = self._signer.sign(
                "GET", path, {"host": host}, EMPTY_SHA256, self._credentials.current(), query=query
            )
            head = "".join(
                [
                    line,
                    f"host: {host}\r\n",
                    *(f"{name}: {value}\r\n" for name, value in signed.items()),
                    f"user-agent: {self._user_agent}\r\n\r\n",
                ]
            ).encode("utf-8")
            try:
                conn = self._pool.acquire()
            except OSError as exc:
                self._pause_or_raise(
                    attempt, exc, f"{what}: could not connect to {self.target.url('/')}"
                )
                continue
            self._on_request()
            try:
                response = conn.stream(head)
                if 200 <= response.status < 300:
                    return conn, response
                body = response.read()
                self._pool.release(conn)
            except OSError as exc:
                conn.close()
                self._pause_or_raise(attempt, exc, what)
                continue
            code, message = parse_error(response.status, response.reason, body)
            if code in NOT_FOUND and not query:
                raise ObjectNotFoundError(f"{what.removeprefix('reading ')}: not found")
            if code in WRONG_REGION or response.status in (301, 307):
                raise DirectUnsupportedError(
                    f"{what}: {code} (HTTP {response.status}) {message}".strip()
                )
            if retryable(response.status, code) and attempt < self._max_attempts:
                self._sleep(backoff(attempt))
                continue
            raise ObjectStoreError(f"{what}: {code} (HTTP {response.status}) {message}".strip())

    def _pause_or_raise(self, attempt: int, exc: OSError, what: str) -> None:
        """Wait before the next attempt after a network error botocore would retry; the
        ObjectStoreError naming `what` and the cause when it would not, or attempts are spent."""
        if attempt < self._max_attempts and _retryable_network(exc):
            self._sleep(backoff(attempt))
            return
        raise ObjectStoreError(f"{what}: {_describe_network(exc)}") from exc


def _retryable_network(exc: OSError) -> bool:
    # A certificate that does not verify will not verify on the next try either.
    return not isinstance(exc, ssl.SSLCertVerificationError)


def _describe_network(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    return str(exc) or type(exc).__name__


class Download:
    """A GET's answer whose body is still on its connection: `chunks` hands it on and gives
    the connection back to the pool at the end (a body not read to its end closes it)."""

    def __init__(
        self, pool: ConnectionPool, conn: Connection, response: StreamedResponse, what: str
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._response = response
        self._what = what
        self.headers = response.headers

    def chunks(self, size: int) -> Iterator[bytes]:
        """The body in pieces of at most `size` bytes; a connection lost half-way is an
        ObjectStoreError."""
        try:
            yield from self._response.chunks(size)
        except OSError as exc:
            raise ObjectStoreError(f"{self._what}: {_describe_network(exc)}") from exc
        finally:
            self._pool.release(self._conn)

    def read(self) -> bytes:
        return b"".join(self.chunks(1024 * 1024))

"""The verifier's lean GET and listing path: the same requests botocore sends (path, query,
signature), botocore's retries, S3's error wording, and listing pages parsed as boto3 does."""

from __future__ import annotations

import calendar
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from botocore.credentials import Credentials

from cloud.contracts.destination import Provider
from cloud.integrations.object_reader import (
    EMPTY_SHA256,
    DirectUnsupportedError,
    ObjectReader,
    _query,
    parse_list_page,
)
from cloud.integrations.s3 import S3Access, make_s3_client
from cloud.integrations.s3_direct import DirectSettings, direct_settings
from cloud.integrations.sigv4 import SigningCredentials, SigV4Signer
from cloud.logic.ports import ObjectNotFoundError, ObjectStoreError
from tests.support.canned_http import CannedServer

ACCESS = "AKIDTESTONLY0000"
SECRET = "test-only-secret-not-a-credential"
KEYS = [
    "restic/repo/data/ab/" + "ab" * 32,
    "with space/and+plus=equals&amp;?",
    "unicodé/ключ/鍵~tilde!'()*",
    "%already-percent",
]


def botocore_requests(
    call: str, params: dict[str, Any], endpoint: str = "http://127.0.0.1:9"
) -> dict[str, Any]:
    """The request a real boto3 client (from the project's factory) would send, caught
    before it leaves, with its URL and signed headers."""
    client = make_s3_client(
        S3Access(
            provider="s3",
            endpoint_url=endpoint,
            region="eu-central-1",
            access_key_id=ACCESS,
            secret_access_key=SECRET,
        )
    )
    caught: dict[str, Any] = {}

    def before_send(request: Any, **_: object) -> Any:
        caught["url"] = request.url
        caught["headers"] = {
            k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()
        }
        body = b"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>"
        return _response(request, body)

    client.meta.events.register("before-send.s3", before_send)
    getattr(client, call)(**params)
    return caught


def _response(request: Any, body: bytes) -> Any:
    from botocore.awsrequest import AWSResponse, HTTPHeaders

    class Raw:
        def stream(self, **_: object) -> Iterator[bytes]:
            yield body

    headers = HTTPHeaders()
    headers["content-length"] = str(len(body))
    return AWSResponse(request.url, 200, headers, Raw())


def _check_same_signature(caught: dict[str, Any], query: str) -> None:
    url = urlsplit(caught["url"])
    headers = caught["headers"]
    now = calendar.timegm(time.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ"))
    ours = SigV4Signer("eu-central-1").sign(
        "GET",
        url.path,
        {"host": headers.get("host", url.netloc)},
        headers["x-amz-content-sha256"],
        SigningCredentials(ACCESS, SECRET),
        query=query,
        now=now,
    )
    assert ours["authorization"] == headers["authorization"]


@pytest.mark.parametrize("key", KEYS)
def test_get_path_and_signature_are_botocores(serve: type[CannedServer], key: str) -> None:
    caught = botocore_requests("get_object", {"Bucket": "my-bucket", "Key": key})
    assert caught["headers"]["x-amz-content-sha256"] == EMPTY_SHA256
    _check_same_signature(caught, "")

    server = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    ObjectReader(settings(server.port), "my-bucket").get(key).read()
    line = server.requests[0].split(b"\r\n", 1)[0].decode()
    assert line == f"GET {urlsplit(caught['url']).path} HTTP/1.1"


@pytest.mark.parametrize(
    ("prefix", "token"), [("restic/repo/", None), ("odd prefix+&=/", "token/with+odd=chars==")]
)
def test_list_query_and_signature_are_botocores(
    serve: type[CannedServer], prefix: str, token: str | None
) -> None:
    params: dict[str, Any] = {"Bucket": "my-bucket", "Prefix": prefix, "MaxKeys": 1000}
    if token:
        params["ContinuationToken"] = token
    caught = botocore_requests("list_objects_v2", params)
    url = urlsplit(caught["url"])
    theirs = dict(parse_qsl(url.query, keep_blank_values=True))
    ours = {
        "list-type": "2",
        "prefix": prefix,
        "max-keys": "1000",
        "encoding-type": "url",
        **({"continuation-token": token} if token else {}),
    }
    assert theirs == ours
    _check_same_signature(caught, _query(ours))

    page = b"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>"
    server = serve([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(page) + page])
    ObjectReader(settings(server.port), "my-bucket").list_page(prefix, token)
    line = server.requests[0].split(b"\r\n", 1)[0].decode()
    assert line == f"GET {url.path}?{_query(ours)} HTTP/1.1"


def settings(port: int, attempts: int = 4) -> DirectSettings:
    return DirectSettings(
        endpoint_url=f"http://127.0.0.1:{port}",
        virtual_host=False,
        region="eu-central-1",
        credentials=Credentials(ACCESS, SECRET),  # type: ignore[arg-type]
        ssl_context=None,
        connect_timeout=5,
        read_timeout=5,
        max_attempts=attempts,
    )


def error(status: int, code: str, message: str = "why") -> bytes:
    body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, len(body)) + body


def test_the_body_streams_through_in_pieces(serve: type[CannedServer]) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    server = serve([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data])
    response = ObjectReader(settings(server.port), "b").get("k")
    sha = hashlib.sha256()
    biggest = 0
    for piece in response.chunks(256 * 1024):
        sha.update(piece)
        biggest = max(biggest, len(piece))
    assert sha.hexdigest() == hashlib.sha256(data).hexdigest()
    assert biggest <= 256 * 1024


def test_throttling_and_server_errors_are_retried_like_botocore(
    serve: type[CannedServer],
) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    server = serve([error(503, "SlowDown"), error(500, "InternalError"), ok])
    slept: list[float] = []
    reader = ObjectReader(settings(server.port), "b", sleep=slept.append)
    assert reader.get("k").read() == b"ok"
    assert len(server.requests) == 3
    assert len(slept) == 2

    server = serve([error(503, "SlowDown")] * 4)
    reader = ObjectReader(settings(server.port, attempts=4), "b", sleep=slept.append)
    with pytest.raises(ObjectStoreError, match=r"b/k: SlowDown \(HTTP 503\) why"):
        reader.get("k")
    assert len(server.requests) == 4


def test_an_unreachable_endpoint_is_retried_then_named() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again: connections are refused
    slept: list[float] = []
    reader = ObjectReader(settings(port, attempts=3), "b", sleep=slept.append)
    with pytest.raises(
        ObjectStoreError, match=f"b/k: could not connect to http://127.0.0.1:{port}/"
    ):
        reader.get("k")
    assert len(slept) == 2


@pytest.mark.parametrize(
    ("reply", "raised", "text"),
    [
        (error(404, "NoSuchKey"), ObjectNotFoundError, "b/k: not found"),
        (error(403, "AccessDenied", "no"), ObjectStoreError, r"AccessDenied \(HTTP 403\) no"),
        (error(301, "PermanentRedirect"), DirectUnsupportedError, "PermanentRedirect"),
        (error(400, "AuthorizationHeaderMalformed"), DirectUnsupportedError, "Authorization"),
    ],
)
def test_refusals_are_not_retried_and_say_why(
    serve: type[CannedServer], reply: bytes, raised: type[Exception], text: str
) -> None:
    server = serve([reply])
    with pytest.raises(raised, match=text):
        ObjectReader(settings(server.port), "b", sleep=lambda _: None).get("k")
    assert len(server.requests) == 1


def test_a_listing_page_is_parsed_as_boto3_parses_it() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="x">'
        b"<Name>b</Name><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>"
        b"<Contents><Key>p/with+space%2Band%26amp</Key><LastModified>2026-01-01T00:00:00Z"
        b"</LastModified><ETag>&#34;abc&#34;</ETag><Size>12</Size></Contents>"
        b"<Contents><Size>3</Size><Key>p/%E9%8D%B5</Key><ETag>&quot;d-2&quot;</ETag>"
        b"</Contents><NextContinuationToken>t/+=&amp;</NextContinuationToken>"
        b"</ListBucketResult>"
    )
    items, token = parse_list_page(body)
    assert [(i.key, i.size, i.etag) for i in items] == [
        ("p/with space+and&amp", 12, "abc"),
        ("p/鍵", 3, "d-2"),
    ]
    assert token == "t/+=&"
    last, none = parse_list_page(b"<ListBucketResult><IsTruncated>false</IsTruncated>")
    assert (last, none) == ([], None)


def test_the_direct_path_copies_the_clients_settings() -> None:
    access = S3Access(
        provider="b2",
        endpoint_url="https://s3.eu-central-003.example.test",
        region="eu-central-003",
        access_key_id=ACCESS,
        secret_access_key=SECRET,
    )
    client = make_s3_client(access, max_attempts=5, read_timeout=30)
    got, why_not = direct_settings(client, "bucket")
    assert why_not == ""
    assert got is not None
    assert (got.endpoint_url, got.virtual_host, got.region) == (
        "https://s3.eu-central-003.example.test",
        False,
        "eu-central-003",
    )
    assert (got.max_attempts, got.read_timeout, got.ssl_context is not None) == (5, 30.0, True)
    assert got.credentials.get_frozen_credentials().access_key == ACCESS


def test_connections_are_kept_alive_across_reads_and_threads(serve: type[CannedServer]) -> None:
    """The canned server accepts one connection: every read must come through it, also
    from another thread (a warm Lambda's next verification runs on new threads)."""
    import threading

    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    server = serve([ok, ok, ok])
    reader = ObjectReader(settings(server.port), "b")
    assert reader.get("a").read() == b"ok"
    got: list[bytes] = []
    worker = threading.Thread(target=lambda: got.append(reader.get("b").read()))
    worker.start()
    worker.join()
    assert got == [b"ok"]
    reader.get("c").read()  # the answer leaves the connection in the pool for the next read
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "case", ["proxy", "no-tls-verify", "dotted-virtual-bucket", "botocore-stubbed"]
)
def test_where_the_direct_path_cannot_match_the_client_boto3_reads(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider: Provider = "aws" if case == "dotted-virtual-bucket" else "b2"
    access = S3Access(
        provider=provider,
        endpoint_url=None if provider == "aws" else "https://s3.eu-central-003.example.test",
        region="eu-central-003",
        access_key_id=ACCESS,
        secret_access_key=SECRET,
    )
    if case == "proxy":
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.test:3128")
    if case == "botocore-stubbed":  # moto's in-process mock answers inside botocore
        from moto import mock_aws

        with mock_aws():
            client = make_s3_client(access)
            assert direct_settings(client, "bucket")[0] is None
        return
    client = make_s3_client(access)
    if case == "no-tls-verify":
        client._endpoint.http_session._verify = False  # type: ignore[attr-defined]
    bucket = "dotted.bucket" if case == "dotted-virtual-bucket" else "bucket"
    got, why_not = direct_settings(client, bucket)
    assert got is None
    assert why_not


def test_a_listing_page_cut_mid_body_is_asked_for_again() -> None:
    """A listing answer whose body the server cuts (a dropped connection) is a network
    error like any other: sent again, as boto3 does (the flaky-endpoint soak found the
    lean listing giving up with exit 4 instead)."""
    page = (
        b"<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>p/a</Key>"
        b"<Size>1</Size><ETag>&quot;e&quot;</ETag></Contents></ListBucketResult>"
    )
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(page) + page
    cut = whole[: len(whole) - 40]
    replies = [cut, whole]
    listener = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []

    def answer() -> None:
        for reply in replies:
            conn, _ = listener.accept()
            with conn:
                requests.append(conn.recv(65536))
                conn.sendall(reply)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    slept: list[float] = []
    try:
        reader = ObjectReader(settings(listener.getsockname()[1]), "b", sleep=slept.append)
        items, token = reader.list_page("p/")
    finally:
        thread.join(5)
        listener.close()
    assert [(i.key, i.size) for i in items] == [("p/a", 1)] and token is None
    assert len(requests) == 2 and len(slept) == 1

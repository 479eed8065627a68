"""Tests of the shared test-support layer (tests/support): servers, proxy, repositories.

The rclone tests also pin down what ``rclone serve s3`` really does (multipart, ListParts,
ETags, Content-MD5), because the upload engine's integration tests rely on it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import http.server
import json
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from testbed import repos
from testbed.repos import (
    add_packs,
    corrupt,
    make_fake_restic_repo,
    make_restic_repo,
    restic_backup,
    restic_check,
    restic_restore,
    restic_snapshots,
    s3_repo_url,
    sha256_file,
    write_random_tree,
)
from testbed.s3.endpoint import S3Endpoint, free_port, unique_bucket_name
from testbed.s3.faults import Fault, FaultSchedule
from testbed.s3.operations import RequestInfo, b2_rejected_header, s3_operation
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from tests.support.tools import REQUIRE_TOOLS_ENV, require_tool, restic_env

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

MiB = 1024 * 1024
HEX64 = set("0123456789abcdef")


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


# ---------------------------------------------------------------------------------------------
# tools


def test_require_tool_returns_the_path() -> None:
    assert Path(require_tool("sh")).exists()


def test_require_tool_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_TOOLS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool"):
        require_tool("no-such-tool-backrest-relay")
    monkeypatch.setenv(REQUIRE_TOOLS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="mandatory"):
        require_tool("no-such-tool-backrest-relay")


def test_restic_env_isolates_from_the_developer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESTIC_REPOSITORY", "/home/me/real-repo")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "real-secret")
    env = restic_env("pw", AWS_ACCESS_KEY_ID="test-key")
    assert env["RESTIC_PASSWORD"] == "pw"
    assert "RESTIC_REPOSITORY" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["AWS_ACCESS_KEY_ID"] == "test-key"
    assert Path(env["RESTIC_CACHE_DIR"]).is_dir()
    assert ".cache" not in Path(env["RESTIC_CACHE_DIR"]).parts


# ---------------------------------------------------------------------------------------------
# naming and classification


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_unique_bucket_names_are_valid_and_distinct() -> None:
    names = {unique_bucket_name("test_Foo[param-1/x] " * 5) for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert 3 <= len(name) <= 63
        assert name[0].isalnum() and name[-1].isalnum()
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


@pytest.mark.parametrize(
    ("method", "target", "headers", "expected"),
    [
        ("GET", "/", (), "ListBuckets"),
        ("GET", "/b?list-type=2&prefix=data%2F", (), "ListObjectsV2"),
        ("GET", "/b", (), "ListObjects"),
        ("GET", "/b?prefix=x&marker=y", (), "ListObjects"),
        ("GET", "/b?uploads", (), "ListMultipartUploads"),
        ("GET", "/b?location", (), "GetBucketLocation"),
        ("GET", "/b/data/ab/k?uploadId=u", (), "ListParts"),
        ("GET", "/b/k", (), "GetObject"),
        ("HEAD", "/b/k", (), "HeadObject"),
        ("HEAD", "/b", (), "HeadBucket"),
        ("PUT", "/b", (), "CreateBucket"),
        ("PUT", "/b/k", (), "PutObject"),
        ("PUT", "/b/k", ("x-amz-copy-source",), "CopyObject"),
        ("PUT", "/b/k?partNumber=1&uploadId=u", (), "UploadPart"),
        ("POST", "/b/k?uploads", (), "CreateMultipartUpload"),
        ("POST", "/b/k?uploadId=u", (), "CompleteMultipartUpload"),
        ("DELETE", "/b/k?uploadId=u", (), "AbortMultipartUpload"),
        ("DELETE", "/b/k", (), "DeleteObject"),
        ("POST", "/b?delete", (), "DeleteObjects"),
    ],
)
def test_s3_operation_names(
    method: str, target: str, headers: tuple[str, ...], expected: str
) -> None:
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    assert s3_operation(method, parts.path, query, headers) == expected


def test_b2_rejected_header() -> None:
    assert b2_rejected_header(["Content-MD5", "Host"]) is None
    assert b2_rejected_header(["X-Amz-Checksum-Crc32"]) == "x-amz-checksum-crc32"
    assert b2_rejected_header(["x-amz-trailer"]) == "x-amz-trailer"
    both = ["x-amz-checksum-crc32", "x-amz-sdk-checksum-algorithm"]
    assert b2_rejected_header(both) == "x-amz-sdk-checksum-algorithm"


def test_fault_schedule_counts_and_stops() -> None:
    def info(method: str) -> RequestInfo:
        return RequestInfo(1, method, "/b/k", {}, {}, None)

    schedule = FaultSchedule(Fault.slow_down(), times=2, skip=1, method="PUT")
    decisions = [schedule(info(m)) for m in ("GET", "PUT", "PUT", "PUT", "PUT")]
    assert [d is not None for d in decisions] == [False, False, True, True, False]
    assert (schedule.matched, schedule.injected) == (4, 2)


# ---------------------------------------------------------------------------------------------
# rclone serve s3: what it supports (the upload engine depends on these facts)


@pytest.mark.real_tools
def test_rclone_round_trip_and_files_on_disk(
    rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    s3 = rclone_server.endpoint.client()
    data = b"restic pack bytes" * 1000
    put = s3.put_object(Bucket=rclone_bucket, Key="repo/data/ab/k1", Body=data)
    assert put["ETag"].strip('"') == md5_hex(data)  # single part: ETag is the MD5
    assert s3.get_object(Bucket=rclone_bucket, Key="repo/data/ab/k1")["Body"].read() == data
    listed = s3.list_objects_v2(Bucket=rclone_bucket, Prefix="repo/")
    assert [o["Key"] for o in listed.get("Contents", [])] == ["repo/data/ab/k1"]
    on_disk = rclone_server.bucket_path(rclone_bucket) / "repo/data/ab/k1"
    assert on_disk.read_bytes() == data
    s3.delete_object(Bucket=rclone_bucket, Key="repo/data/ab/k1")
    assert not on_disk.exists()


@pytest.mark.real_tools
def test_rclone_checks_content_md5(rclone_server: RcloneS3Server, rclone_bucket: str) -> None:
    s3 = rclone_server.endpoint.client(attempts=1)
    data = b"x" * 4096
    s3.put_object(Bucket=rclone_bucket, Key="good", Body=data, ContentMD5=md5_b64(data))
    with pytest.raises(ClientError) as bad:
        s3.put_object(Bucket=rclone_bucket, Key="bad", Body=data, ContentMD5=md5_b64(b"other"))
    assert error_code(bad.value) == "BadDigest"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=rclone_bucket, Key="bad")  # nothing stored


@pytest.mark.real_tools
def test_rclone_multipart_upload_list_parts_and_complete(
    rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    s3 = rclone_server.endpoint.client(attempts=1)
    part1, part2 = b"\x01" * (5 * MiB), b"\x02" * (5 * MiB)
    key = "repo/data/cd/big"
    upload_id = s3.create_multipart_upload(Bucket=rclone_bucket, Key=key)["UploadId"]
    etags = []
    for number, part in ((1, part1), (2, part2)):
        resp = s3.upload_part(
            Bucket=rclone_bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=part,
            ContentMD5=md5_b64(part),
        )
        assert resp["ETag"].strip('"') == md5_hex(part)
        etags.append(resp["ETag"])
    # A wrong Content-MD5 on a part is refused too (and the upload survives it).
    with pytest.raises(ClientError) as bad:
        s3.upload_part(
            Bucket=rclone_bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=3,
            Body=b"tail",
            ContentMD5=md5_b64(b"liat"),
        )
    assert error_code(bad.value) == "BadDigest"

    parts = s3.list_parts(Bucket=rclone_bucket, Key=key, UploadId=upload_id)["Parts"]
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in parts] == [
        (1, 5 * MiB, etags[0]),
        (2, 5 * MiB, etags[1]),
    ]
    # rclone's markers are off by one from AWS (inclusive), but the paginator copes.
    paginated = [
        p["PartNumber"]
        for page in s3.get_paginator("list_parts").paginate(
            Bucket=rclone_bucket, Key=key, UploadId=upload_id, PaginationConfig={"PageSize": 1}
        )
        for p in page.get("Parts", [])
    ]
    assert paginated == [1, 2]
    uploads = s3.list_multipart_uploads(Bucket=rclone_bucket)["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [(key, upload_id)]
    # An unfinished upload is invisible to listings and HEAD.
    assert "Contents" not in s3.list_objects_v2(Bucket=rclone_bucket)

    done = s3.complete_multipart_upload(
        Bucket=rclone_bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={
            "Parts": [{"PartNumber": n, "ETag": e} for n, e in zip((1, 2), etags, strict=True)]
        },
    )
    composite = md5_hex(bytes.fromhex(md5_hex(part1)) + bytes.fromhex(md5_hex(part2)))
    assert done["ETag"].strip('"') == f"{composite}-2"
    body = s3.get_object(Bucket=rclone_bucket, Key=key)["Body"].read()
    assert body == part1 + part2
    # Unlike AWS, rclone reports the plain MD5 of the whole object once it is stored.
    assert s3.head_object(Bucket=rclone_bucket, Key=key)["ETag"].strip('"') == md5_hex(body)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=rclone_bucket)


@pytest.mark.real_tools
def test_rclone_list_multipart_uploads_quirk_on_fresh_bucket(
    rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    """rclone 1.75 answers 404 NoSuchUpload (not an empty list) until the bucket has seen a
    multipart upload; clients must read that as "no uploads"."""
    s3 = rclone_server.endpoint.client(attempts=1)
    with pytest.raises(ClientError) as quirk:
        s3.list_multipart_uploads(Bucket=rclone_bucket)
    assert (http_status(quirk.value), error_code(quirk.value)) == (404, "NoSuchUpload")
    upload_id = s3.create_multipart_upload(Bucket=rclone_bucket, Key="k")["UploadId"]
    s3.abort_multipart_upload(Bucket=rclone_bucket, Key="k", UploadId=upload_id)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=rclone_bucket)


@pytest.mark.real_tools
def test_rclone_multipart_abort(rclone_server: RcloneS3Server, rclone_bucket: str) -> None:
    s3 = rclone_server.endpoint.client(attempts=1)
    key = "repo/data/ef/aborted"
    upload_id = s3.create_multipart_upload(Bucket=rclone_bucket, Key=key)["UploadId"]
    part = b"\x03" * (5 * MiB)
    s3.upload_part(
        Bucket=rclone_bucket,
        Key=key,
        UploadId=upload_id,
        PartNumber=1,
        Body=part,
        ContentMD5=md5_b64(part),
    )
    listed = s3.list_multipart_uploads(Bucket=rclone_bucket, Prefix="repo/")["Uploads"]
    assert [u["UploadId"] for u in listed] == [upload_id]
    s3.abort_multipart_upload(Bucket=rclone_bucket, Key=key, UploadId=upload_id)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=rclone_bucket)
    with pytest.raises(ClientError) as gone:
        s3.list_parts(Bucket=rclone_bucket, Key=key, UploadId=upload_id)
    assert error_code(gone.value) == "NoSuchUpload"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=rclone_bucket, Key=key)
    leftovers = [p for p in rclone_server.bucket_path(rclone_bucket).rglob("*") if p.is_file()]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# moto


def test_moto_round_trip(moto_endpoint: S3Endpoint, unique_bucket: Callable[..., str]) -> None:
    bucket = unique_bucket(moto_endpoint)
    s3 = moto_endpoint.client()
    data = b"moto" * 1000
    put = s3.put_object(Bucket=bucket, Key="a/b", Body=data, ContentMD5=md5_b64(data))
    assert put["ETag"].strip('"') == md5_hex(data)
    assert s3.get_object(Bucket=bucket, Key="a/b")["Body"].read() == data
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["a/b"]


def test_moto_endpoint_is_reset_between_tests(moto_endpoint: S3Endpoint) -> None:
    assert moto_endpoint.client().list_buckets().get("Buckets", []) == []


# ---------------------------------------------------------------------------------------------
# The proxy: B2 quirks, counting, faults


def _put(s3: S3Client, bucket: str, key: str, data: bytes) -> str:
    """PutObject the B2 way (Content-MD5, no flexible checksums); returns the ETag."""
    return s3.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=md5_b64(data))["ETag"]


@pytest.mark.real_tools
def test_b2_proxy_rejects_default_boto3_checksums(
    b2_proxy: S3Proxy, rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    default = b2_proxy.endpoint.client(flexible_checksums=True, attempts=1)
    with pytest.raises(ClientError) as rejected:
        default.put_object(Bucket=rclone_bucket, Key="k", Body=b"data")
    assert http_status(rejected.value) == 400
    assert error_code(rejected.value) == "InvalidArgument"
    assert "Unsupported header 'x-amz-" in str(rejected.value)
    [entry] = b2_proxy.requests
    assert (entry.operation, entry.status, entry.fault) == ("PutObject", 400, "b2_quirk")
    assert entry.upstream_status is None  # never forwarded
    assert {"x-amz-sdk-checksum-algorithm", "x-amz-checksum-crc32"} <= entry.header_names
    assert not (rclone_server.bucket_path(rclone_bucket) / "k").exists()

    b2_safe = b2_proxy.endpoint.client()  # when_required + Content-MD5
    data = b"data" * 100
    assert _put(b2_safe, rclone_bucket, "k", data).strip('"') == md5_hex(data)
    assert b2_safe.get_object(Bucket=rclone_bucket, Key="k")["Body"].read() == data
    assert (rclone_server.bucket_path(rclone_bucket) / "k").read_bytes() == data
    assert all(not (r.header_names & {"x-amz-checksum-mode"}) for r in b2_proxy.requests[1:])


@pytest.mark.real_tools
def test_proxy_counts_requests_and_list_calls(counting_proxy: S3Proxy, rclone_bucket: str) -> None:
    s3 = counting_proxy.endpoint.client()
    for i in range(3):
        _put(s3, rclone_bucket, f"p/{i}", b"%d" % i)
    s3.head_object(Bucket=rclone_bucket, Key="p/0")
    s3.list_objects_v2(Bucket=rclone_bucket, Prefix="p/")
    upload_id = s3.create_multipart_upload(Bucket=rclone_bucket, Key="p/m")["UploadId"]
    s3.list_parts(Bucket=rclone_bucket, Key="p/m", UploadId=upload_id)
    s3.list_multipart_uploads(Bucket=rclone_bucket)
    s3.abort_multipart_upload(Bucket=rclone_bucket, Key="p/m", UploadId=upload_id)
    assert counting_proxy.count("PUT") == 3
    assert counting_proxy.count(operation="HeadObject") == 1
    assert counting_proxy.count(pred=lambda r: r.key == "p/1") == 1
    assert [r.operation for r in counting_proxy.list_calls()] == [
        "ListObjectsV2",
        "ListParts",
        "ListMultipartUploads",
    ]
    listing = counting_proxy.list_calls()[0]
    assert listing.query["list-type"] == ["2"] and listing.query["prefix"] == ["p/"]
    assert listing.bucket == rclone_bucket and listing.key is None
    counting_proxy.reset()
    assert counting_proxy.requests == [] and counting_proxy.count() == 0


@pytest.mark.real_tools
def test_proxy_fault_503_then_recovery(counting_proxy: S3Proxy, rclone_bucket: str) -> None:
    counting_proxy.fault = lambda info: Fault.slow_down() if info.method == "PUT" else None
    s3 = counting_proxy.endpoint.client(attempts=1)
    with pytest.raises(ClientError) as throttled:
        _put(s3, rclone_bucket, "k", b"abc")
    assert (http_status(throttled.value), error_code(throttled.value)) == (503, "SlowDown")

    schedule = FaultSchedule(Fault.internal_error(), times=1, operation="PutObject")
    counting_proxy.fault = schedule
    counting_proxy.reset()
    retrying = counting_proxy.endpoint.client(attempts=2)
    _put(retrying, rclone_bucket, "k", b"abc")
    assert [(r.status, r.fault) for r in counting_proxy.requests] == [(500, "respond"), (200, None)]
    assert schedule.injected == 1


@pytest.mark.real_tools
def test_proxy_connection_faults(
    counting_proxy: S3Proxy, rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    s3 = counting_proxy.endpoint.client(attempts=1)
    data = bytes(range(256)) * 8192  # 2 MiB, so "half the body" is a real cut
    stored = rclone_server.bucket_path(rclone_bucket)
    errors = (ConnectionClosedError, EndpointConnectionError)

    counting_proxy.fault = FaultSchedule(Fault.drop(), operation="PutObject")
    with pytest.raises(errors):
        _put(s3, rclone_bucket, "dropped", data)
    assert not (stored / "dropped").exists()

    counting_proxy.fault = FaultSchedule(Fault.reset_mid_body(), operation="PutObject")
    with pytest.raises(errors):
        _put(s3, rclone_bucket, "reset", data)
    # rclone writes a PUT body in place and deletes it when the body is cut short; the proxy
    # resets the client only once rclone is done with the cut request, so nothing is left.
    assert not (stored / "reset").exists()

    counting_proxy.fault = FaultSchedule(Fault.drop_after_forward(), operation="PutObject")
    with pytest.raises(errors):
        _put(s3, rclone_bucket, "applied", data)
    assert (stored / "applied").read_bytes() == data  # it happened; the client can't know

    assert [(r.status, r.upstream_status, r.fault) for r in counting_proxy.requests] == [
        (None, None, "drop"),
        (None, None, "reset_mid_body"),
        (None, 200, "drop_after_forward"),
    ]
    counting_proxy.fault = None
    assert _put(s3, rclone_bucket, "after", data).strip('"') == md5_hex(data)


@pytest.mark.real_tools
def test_proxy_reset_mid_body_keeps_a_retried_object_on_a_starved_rclone(tmp_path: Path) -> None:
    """The soak's lost pack, on the real server. Under load rclone can get to a cut PUT late
    (here it is stopped), after the client heard of the reset and its retry of the same key
    was stored: the cut PUT then removes the key. The client must hear of the reset only once
    rclone is done with the cut request, so that the retry comes after its cleanup.
    (Before the fix this lost the object in most rounds; three rounds make a miss unlikely.)"""
    errors = (ConnectionClosedError, EndpointConnectionError)
    data = bytes(range(256)) * 200  # 50 KiB: fits in the socket buffers of a stopped server
    with (
        RcloneS3Server(tmp_path / "root", rclone=require_tool("rclone")) as server,
        S3Proxy(server.endpoint) as proxy,
    ):
        server.endpoint.client().create_bucket(Bucket="cut-put")
        s3 = proxy.endpoint.client(attempts=1)

        def cut_then_retry(key: str) -> dict[str, object]:
            outcome: dict[str, object] = {}

            def send(what: str) -> None:
                try:
                    outcome[what] = _put(s3, "cut-put", key, data).strip('"')
                except errors as exc:
                    outcome[what] = exc

            proxy.fault = FaultSchedule(Fault.reset_mid_body(), times=1, operation="PutObject")
            cut = threading.Thread(target=send, args=("cut",), daemon=True)
            retry = threading.Thread(target=send, args=("retry",), daemon=True)
            os.kill(server.pid, signal.SIGSTOP)
            try:
                cut.start()
                cut.join(1.0)  # the old proxy reset the client at once; now it waits for rclone
                if not cut.is_alive():
                    retry.start()  # what the agent does on hearing of the reset...
                    time.sleep(0.3)  # ...reaching the stopped server before it runs the cut PUT
            finally:
                os.kill(server.pid, signal.SIGCONT)
            cut.join(30)
            if "retry" not in outcome and not retry.is_alive():
                retry.start()
            retry.join(30)
            return outcome

        outcomes = {key: cut_then_retry(key) for key in ("data/k0", "data/k1", "data/k2")}
        time.sleep(0.3)  # a late cleanup would have run by now
        root = server.bucket_path("cut-put")
        kept = {
            key: (root / key).is_file() and (root / key).read_bytes() == data for key in outcomes
        }
    for key, outcome in outcomes.items():
        assert isinstance(outcome["cut"], errors), (key, outcome)  # the client saw its PUT cut
        assert outcome["retry"] == md5_hex(data), (key, outcome)  # the retry was answered 200
    assert kept == dict.fromkeys(outcomes, True), "retried PUTs answered 200, objects gone"


def test_proxy_in_front_of_moto_signs_through(
    moto_endpoint: S3Endpoint, unique_bucket: Callable[..., str]
) -> None:
    bucket = unique_bucket(moto_endpoint)
    with S3Proxy(moto_endpoint, b2_quirks=True) as proxy:
        s3 = proxy.endpoint.client()
        data = b"m" * (6 * MiB)
        assert _put(s3, bucket, "big", data).strip('"') == md5_hex(data)
        assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == data
        head = s3.head_object(Bucket=bucket, Key="big")
        assert head["ContentLength"] == len(data)
        assert proxy.count() == 3 and proxy.list_calls() == []


@pytest.mark.real_tools
def test_proxy_signed_requests_reach_rclone_unchanged(
    counting_proxy: S3Proxy, rclone_bucket: str
) -> None:
    # rclone checks SigV4 (moto does not): a bad secret must still be refused via the proxy.
    good = counting_proxy.endpoint.client(attempts=1)
    assert _put(good, rclone_bucket, "signed", b"ok")
    wrong = S3Endpoint(counting_proxy.url, counting_proxy.upstream.access_key, "wrong-secret")
    with pytest.raises(ClientError) as denied:
        wrong.client(attempts=1).head_object(Bucket=rclone_bucket, Key="signed")
    assert http_status(denied.value) == 403


# ---------------------------------------------------------------------------------------------
# The proxy against an echo server: byte-for-byte forwarding, keep-alive, HEAD, chunked


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers with a JSON description of the request it received (and its body's MD5)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_GET(self) -> None:
        body = self._body()
        doc = {
            "method": self.command,
            "path": self.path,
            "headers": list(self.headers.items()),
            "md5": md5_hex(body),
            "length": len(body),
        }
        payload = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.path.endswith("chunked-response"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(payload), 7):
                piece = payload[i : i + 7]
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Echo", "1")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET  # noqa: N815


@pytest.fixture
def echo_proxy() -> Iterator[S3Proxy]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    upstream = S3Endpoint(f"http://127.0.0.1:{server.server_address[1]}", "ak", "sk")
    try:
        with S3Proxy(upstream) as proxy:
            yield proxy
    finally:
        server.shutdown()
        server.server_close()


def _conn(proxy: S3Proxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]), timeout=10)


def test_proxy_forwards_byte_for_byte_with_keep_alive(echo_proxy: S3Proxy) -> None:
    conn = _conn(echo_proxy)
    body = bytes(range(256)) * 12_000  # ~3 MB, streamed in several chunks
    headers = {"Host": "bucket-host.example:1234", "X-Amz-Date": "20240101T000000Z", "A": "1"}
    conn.request("PUT", "/b/data/ab/k%20x?partNumber=1&uploadId=u", body=body, headers=headers)
    resp = conn.getresponse()
    seen = json.loads(resp.read())
    assert resp.status == 200 and resp.getheader("X-Echo") == "1"
    assert seen["method"] == "PUT"
    assert seen["path"] == "/b/data/ab/k%20x?partNumber=1&uploadId=u"
    assert (seen["length"], seen["md5"]) == (len(body), md5_hex(body))
    # Every header, in order, values untouched (Host too: SigV4 signs it).
    assert seen["headers"] == [
        ["Accept-Encoding", "identity"],
        ["Content-Length", str(len(body))],
        ["Host", "bucket-host.example:1234"],
        ["X-Amz-Date", "20240101T000000Z"],
        ["A", "1"],
    ]

    # Same client connection: HEAD (no body), then a chunked request and response.
    first_sock = conn.sock
    conn.request("HEAD", "/b/k")
    head = conn.getresponse()
    assert head.status == 200 and head.read() == b""
    assert int(head.getheader("Content-Length", "0")) > 0
    chunks = (b"abc" * n for n in (1, 1000, 50_000))
    conn.request("POST", "/b/chunked-response", body=chunks, encode_chunked=True)
    echoed = json.loads(conn.getresponse().read())
    assert echoed["length"] == 3 * 51_001
    assert ["Transfer-Encoding", "chunked"] in echoed["headers"]
    assert conn.sock is first_sock  # keep-alive held throughout
    conn.close()
    ops = [(r.method, r.status) for r in echo_proxy.requests]
    assert ops == [("PUT", 200), ("HEAD", 200), ("POST", 200)]


def test_proxy_answers_before_body_when_refusing(echo_proxy: S3Proxy) -> None:
    """An injected error with ``Expect: 100-continue`` is answered before the body is sent."""
    echo_proxy.fault = lambda info: Fault.s3_error(403, "AccessDenied", "no")
    conn = _conn(echo_proxy)
    conn.putrequest("PUT", "/b/k", skip_accept_encoding=True)
    conn.putheader("Content-Length", "1000000")
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    resp = conn.getresponse()  # no body sent: a 100 Continue would hang here, not a 403
    assert resp.status == 403 and b"<Code>AccessDenied</Code>" in resp.read()
    assert resp.getheader("Connection") == "close"
    conn.close()
    [entry] = echo_proxy.requests
    assert (entry.status, entry.upstream_status) == (403, None)


def test_proxy_bad_gateway_when_upstream_is_down() -> None:
    dead = S3Endpoint(f"http://127.0.0.1:{free_port()}", "ak", "sk")
    with S3Proxy(dead) as proxy:
        conn = _conn(proxy)
        conn.request("GET", "/b/k")
        resp = conn.getresponse()
        assert resp.status == 502 and b"BadGateway" in resp.read()
        conn.close()


# ---------------------------------------------------------------------------------------------
# A reset mid-body must not let the cut PUT's server-side cleanup outlive the client's retry


class _CutCleanupStore:
    """The part of ``rclone serve s3`` behind a soak failure, with its race made certain.

    rclone's PutObject writes the key in place and removes it when copying the body fails
    (cmd/serve/s3/backend.go). That cleanup runs whenever rclone notices the cut; if the
    client hears of the cut first, its retry of the same key can be stored and *then*
    removed — a 200 followed by a missing object, which no S3 does. Here the cleanup of a cut
    PUT holds (bounded) until the key has been written again, so any harness that lets the
    client retry before the server is done with the cut request loses the retry every time.
    """

    HOLD = 2.0  # seconds a cut PUT's cleanup waits for a newer write of its key

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.cut_puts = 0
        self._writes: dict[str, int] = {}
        self._busy = 0
        self._cond = threading.Condition()

    def begin(self, key: str) -> int:
        with self._cond:
            self._busy += 1
            self.objects[key] = b""  # written in place: truncated at once
            return self._writes.get(key, 0)

    def cut(self, key: str, generation: int) -> None:
        with self._cond:
            self.cut_puts += 1
            self._cond.wait_for(lambda: self._writes.get(key, 0) > generation, self.HOLD)
            self.objects.pop(key, None)

    def store(self, key: str, body: bytes) -> None:
        with self._cond:
            self.objects[key] = body
            self._writes[key] = self._writes.get(key, 0) + 1
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def settle(self) -> bool:
        """Wait until no PUT is being handled (so every cleanup has run)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, 3 * self.HOLD)


class _CutCleanupHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: _CutCleanupStore  # set on a subclass per test

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        generation = self.store.begin(self.path)
        try:
            try:
                body = self.rfile.read(length)
            except OSError:
                body = b""
            if len(body) < length:
                self.store.cut(self.path, generation)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self._answer(400, b"IncompleteBody")
                return
            self.store.store(self.path, body)
            self._answer(200)
        finally:
            self.store.end()


def test_proxy_reset_mid_body_lets_the_server_finish_the_cut_put_before_the_client_retries() -> (
    None
):
    """Cut PUT of K, retry of K answered 200: K must then exist (it does on S3 and B2)."""
    store = _CutCleanupStore()
    handler = type("Handler", (_CutCleanupHandler,), {"store": store})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    upstream = S3Endpoint(f"http://127.0.0.1:{server.server_address[1]}", "ak", "sk")
    body = bytes(range(256)) * 4096  # 1 MiB: the proxy forwards half of it, then cuts
    try:
        with S3Proxy(upstream) as proxy:
            proxy.fault = FaultSchedule(Fault.reset_mid_body(), times=1, method="PUT")
            cut = _conn(proxy)
            with pytest.raises((OSError, http.client.HTTPException)):  # the client sees a reset
                cut.request("PUT", "/b/data/k", body=body)
                cut.getresponse().read()
            cut.close()
            retry = _conn(proxy)  # at once, as a client with a zero backoff would
            retry.request("PUT", "/b/data/k", body=body)
            answer = retry.getresponse()
            answer.read()
            retry.close()
            faults = [(r.method, r.fault) for r in proxy.requests]
        assert answer.status == 200
        assert store.settle()
        assert store.cut_puts == 1  # the server did see the cut request
        assert faults == [("PUT", "reset_mid_body"), ("PUT", None)]
        assert store.objects.get("/b/data/k") == body, "the retry's 200 was undone by the cut PUT"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------
# Source trees and fake repositories


def test_write_random_tree_is_deterministic_and_incompressible(tmp_path: Path) -> None:
    total = write_random_tree(tmp_path / "a", files=12, size=(1000, 5000), seed=7)
    again = write_random_tree(tmp_path / "b", files=12, size=(1000, 5000), seed=7)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.bin"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.bin"))
    assert total == again == sum((tmp_path / "a" / p).stat().st_size for p in files_a)
    assert files_a == files_b and len(files_a) == 12
    assert all(
        (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in files_a
    )
    blob = b"".join((tmp_path / "a" / p).read_bytes() for p in files_a)
    assert len(zlib.compress(blob)) > 0.99 * len(blob)
    write_random_tree(tmp_path / "c", files=12, size=(1000, 5000), seed=8)
    first = files_a[0]
    assert (tmp_path / "c" / first).read_bytes() != (tmp_path / "a" / first).read_bytes()


def test_fake_repo_layout_and_content_addresses(tmp_path: Path) -> None:
    repo = make_fake_restic_repo(
        tmp_path / "repo", packs=20, pack_size=(1000, 4000), index_files=3, snapshots=2, keys=2
    )
    root = repo.root
    assert sorted(p.name for p in root.iterdir()) == [
        "config",
        "data",
        "index",
        "keys",
        "locks",
        "snapshots",
    ]
    assert sorted(p.name for p in (root / "data").iterdir()) == [f"{i:02x}" for i in range(256)]
    assert (len(repo.keys), len(repo.data), len(repo.index), len(repo.snapshots)) == (2, 20, 3, 2)
    assert len(repo.locks) == 1
    for path in [*repo.keys, *repo.data, *repo.index, *repo.snapshots, *repo.locks]:
        assert set(path.name) <= HEX64 and len(path.name) == 64
        assert sha256_file(path) == path.name
    for pack in repo.data:
        assert pack.parent.name == pack.name[:2] and pack.parent.parent == root / "data"
    assert json.loads(repo.keys[0].read_bytes())["kdf"] == "scrypt"
    on_disk = {p for p in root.rglob("*") if p.is_file()}
    assert on_disk == set(repo.all_files())
    assert repo.locks[0] not in repo.mirrored_files()
    assert repo.relpaths()[0] == "config"
    assert repo.total_bytes == sum(p.stat().st_size for p in repo.mirrored_files())
    assert (repo.data[0].stat().st_mode & 0o777) == 0o400  # read-only, as restic writes


def test_fake_repo_is_deterministic(tmp_path: Path) -> None:
    one = make_fake_restic_repo(tmp_path / "one", packs=5, pack_size=2000, seed=3)
    two = make_fake_restic_repo(tmp_path / "two", packs=5, pack_size=2000, seed=3)
    assert one.relpaths() == two.relpaths()
    three = make_fake_restic_repo(tmp_path / "three", packs=5, pack_size=2000, seed=4)
    assert set(one.relpaths()).isdisjoint(set(three.relpaths()) - {"config"})


def test_add_packs_and_corrupt(tmp_path: Path) -> None:
    repo = make_fake_restic_repo(tmp_path / "repo", packs=4, pack_size=1500)
    before = set(repo.mirrored_files())
    added = add_packs(repo, 3, (500, 800), seed=99)
    assert len(added) == 5  # 3 packs, then 1 index, then 1 snapshot (upload order)
    assert [p.parent.parent.name for p in added[:3]] == ["data"] * 3
    assert (added[3].parent.name, added[4].parent.name) == ("index", "snapshots")
    assert set(repo.mirrored_files()) == before | set(added)
    assert all(sha256_file(p) == p.name for p in added)

    victim = repo.data[0]
    size, mode = victim.stat().st_size, victim.stat().st_mode
    offset = corrupt(victim)
    assert offset == size // 2
    assert sha256_file(victim) != victim.name
    assert (victim.stat().st_size, victim.stat().st_mode) == (size, mode)
    corrupt(victim, offset)  # flipping back restores it
    assert sha256_file(victim) == victim.name


# ---------------------------------------------------------------------------------------------
# restic end to end: a real repository, mirrored by hand through the B2 proxy, proven by restic


@pytest.mark.real_tools
def test_restic_repo_mirrored_to_s3_passes_restic_check(
    restic_bin: str,
    restic_password: str,
    b2_proxy: S3Proxy,
    rclone_bucket: str,
    tmp_path: Path,
) -> None:
    repo, source = tmp_path / "repo", tmp_path / "src"
    make_restic_repo(repo, restic_password)
    write_random_tree(source, files=6, size=(10_000, 200_000), seed=1)
    snap = restic_backup(repo, restic_password, source, tags=["t1"])
    assert len(snap) == 64 and set(snap) <= HEX64
    assert (repo / "snapshots" / snap).is_file()

    s3 = b2_proxy.endpoint.client()
    for path in sorted(p for p in repo.rglob("*") if p.is_file() and "locks" not in p.parts):
        key = f"mirror/{path.relative_to(repo).as_posix()}"
        _put(s3, rclone_bucket, key, path.read_bytes())
    url = s3_repo_url(b2_proxy.endpoint, rclone_bucket, "mirror")
    env = b2_proxy.endpoint.env()
    restic_check(url, restic_password, env=env)  # --read-data
    [listed] = restic_snapshots(url, restic_password, env=env)
    assert (listed["id"], listed["tags"]) == (snap, ["t1"])
    restic_restore(url, restic_password, snap, tmp_path / "restored", env=env)
    restored = tmp_path / "restored" / source.relative_to("/")
    for original in source.rglob("*.bin"):
        assert (restored / original.relative_to(source)).read_bytes() == original.read_bytes()

    # A corrupted pack in the mirror is caught by restic_check, with restic's output.
    pack = next(p for p in (repo / "data").rglob("*") if p.is_file())
    remote = b2_proxy.endpoint.local_root
    assert remote is not None
    mirrored_pack = remote / rclone_bucket / "mirror" / pack.relative_to(repo)
    corrupt(mirrored_pack)
    with pytest.raises(repos.ResticError, match="restic failed"):
        restic_check(url, restic_password, env=env)

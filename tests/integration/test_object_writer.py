"""The agent's own single PUTs, against a real S3 server (rclone serve s3, which checks
signatures) and a fault-injecting proxy: same bytes, same names, same retries and the same
error wording as boto3's put_object."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloud.contracts.destination import Destination
from cloud.integrations.s3 import S3Access
from local_agent.errors import DestinationError
from local_agent.mirror.backend import Backend
from local_agent.mirror.throttle import Throttle, ThrottledReader
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.faults import Fault, FaultSchedule
from testbed.s3.operations import RequestInfo
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from testbed.tls import self_signed_cert
from tests.support.tools import require_tool


def access_for(endpoint: S3Endpoint, *, secret: str | None = None) -> S3Access:
    return S3Access(
        provider="s3",
        endpoint_url=endpoint.endpoint_url,
        region=endpoint.region,
        access_key_id=endpoint.access_key,
        secret_access_key=secret or endpoint.secret_key,
    )


def digests(body: bytes) -> tuple[str, str]:
    return hashlib.md5(body, usedforsecurity=False).hexdigest(), hashlib.sha256(body).hexdigest()


@pytest.fixture
def backend_for(rclone_bucket: str) -> Iterator[Callable[..., Backend]]:
    made: list[Backend] = []

    def make(endpoint: S3Endpoint, **kwargs: object) -> Backend:
        secret = kwargs.pop("secret", None)
        backend = Backend(
            access_for(endpoint, secret=secret),  # type: ignore[arg-type]
            Destination(
                provider="s3",
                endpoint_url=endpoint.endpoint_url,
                bucket=rclone_bucket,
                prefix="restic/writer",
            ),
            max_attempts=int(kwargs.pop("max_attempts", 4)),  # type: ignore[call-overload]
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


ODD_KEYS = [
    "data/ab/" + "ab" * 32,
    "keys/with space and+plus=equals&amp",
    "snapshots/unicodé-ключ-鍵~tilde!'()*",
    "index/percent%41literal",
]


@pytest.mark.parametrize("key", ODD_KEYS)
def test_put_stores_the_bytes_under_the_exact_key(
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    backend_for: Callable[..., Backend],
    key: str,
) -> None:
    endpoint = rclone_server.endpoint
    backend = backend_for(endpoint)
    assert backend.direct_put_active
    body = os.urandom(3000)
    md5, sha = digests(body)

    etag = backend.put(key, body, len(body), md5, sha)

    got = endpoint.client().get_object(Bucket=rclone_bucket, Key=f"restic/writer/{key}")
    assert got["Body"].read() == body
    assert etag == md5 == got["ETag"].strip('"')
    assert backend.requests == 1


def test_file_and_throttled_bodies_are_rewound_for_a_retry(
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    backend_for: Callable[..., Backend],
    tmp_path: Path,
) -> None:
    body = os.urandom(700_000)  # several send blocks
    md5, sha = digests(body)
    source = tmp_path / "pack"
    source.write_bytes(body)
    faults = FaultSchedule(Fault.reset_mid_body(), times=2, method="PUT")
    with S3Proxy(rclone_server.endpoint, fault=faults) as proxy:
        backend = backend_for(proxy.endpoint)
        with source.open("rb") as fh:
            fh.seek(0)
            backend.put("data/00/file", fh, len(body), md5, sha)
        reader = ThrottledReader(io.BytesIO(body), Throttle(50 * 1024 * 1024))
        backend.put("data/00/throttled", reader, len(body), md5, sha)  # type: ignore[arg-type]
        statuses = [r.status for r in proxy.requests]
    client = rclone_server.endpoint.client()
    for name in ("file", "throttled"):
        got = client.get_object(Bucket=rclone_bucket, Key=f"restic/writer/data/00/{name}")
        assert got["Body"].read() == body
    assert faults.injected == 2
    assert statuses == [None, None, 200, 200]
    assert backend.requests == 4  # retries are requests too


def test_throttling_and_server_errors_are_retried_then_reported(
    rclone_server: RcloneS3Server, backend_for: Callable[..., Backend]
) -> None:
    body = b"x" * 100
    md5, sha = digests(body)
    slow = FaultSchedule(Fault.slow_down(), times=2, method="PUT")
    with S3Proxy(rclone_server.endpoint, fault=slow) as proxy:
        backend = backend_for(proxy.endpoint)
        assert backend.put("config", body, len(body), md5, sha) == md5
        assert [r.status for r in proxy.requests] == [503, 503, 200]

        proxy.fault = FaultSchedule(Fault.internal_error(), times=None, method="PUT")
        with pytest.raises(DestinationError) as failed:
            backend.put("keys/k", body, len(body), md5, sha)
    assert failed.value.message == (
        "upload of keys/k: InternalError (HTTP 500): We encountered an internal error."
    )
    assert backend.requests == 3 + 4  # max_attempts counts the first try


def test_refusals_are_not_retried_and_name_the_cause(
    rclone_server: RcloneS3Server, rclone_bucket: str, backend_for: Callable[..., Backend]
) -> None:
    body = b"restic bytes"
    md5, sha = digests(body)
    wrong_secret = "not-the-secret-" + os.urandom(4).hex()
    backend = backend_for(rclone_server.endpoint, secret=wrong_secret)
    with pytest.raises(DestinationError) as denied:
        backend.put("config", body, len(body), md5, sha)
    assert "check the key" in denied.value.message
    assert wrong_secret not in denied.value.message
    assert backend.requests == 1

    backend = backend_for(rclone_server.endpoint)
    other_md5, _ = digests(b"other bytes")
    with pytest.raises(DestinationError) as bad:
        backend.put("config", body, len(body), other_md5, sha)
    assert "BadDigest" in bad.value.message or "InvalidDigest" in bad.value.message
    listed = rclone_server.endpoint.client().list_objects_v2(Bucket=rclone_bucket)
    assert listed.get("KeyCount", 0) == 0  # nothing stored on a refused PUT


def test_unreachable_endpoint_is_a_destination_error(
    backend_for: Callable[..., Backend],
) -> None:
    dead = S3Endpoint("http://127.0.0.1:9", "AKIDTESTONLY0000", "test-only-secret")
    backend = backend_for(dead, max_attempts=2)
    body = b"x"
    with pytest.raises(DestinationError) as failed:
        backend.put("config", body, 1, *digests(body))
    assert "Could not connect to the endpoint URL" in failed.value.message
    assert backend.requests == 0  # nothing was sent


def test_no_checksum_headers_and_content_md5_on_every_put(
    rclone_server: RcloneS3Server, backend_for: Callable[..., Backend]
) -> None:
    """What B2 needs: every PUT carries Content-MD5 and none of the x-amz-checksum-*."""
    seen: list[dict[str, str]] = []

    def watch(info: RequestInfo) -> None:
        seen.append(info.headers)

    with S3Proxy(rclone_server.endpoint, b2_quirks=True, fault=watch) as proxy:
        backend = backend_for(proxy.endpoint)
        body = b"y" * 10
        backend.put("config", body, len(body), *digests(body))
    (headers,) = seen
    assert "content-md5" in headers
    assert headers["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()
    assert headers["user-agent"].startswith("backrest-relay/")


def test_proxy_or_switch_off_sends_through_boto3(
    rclone_server: RcloneS3Server,
    backend_for: Callable[..., Backend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agents: list[str] = []

    def watch(info: RequestInfo) -> None:
        agents.append(info.headers.get("user-agent", ""))

    body = b"z" * 10
    with S3Proxy(rclone_server.endpoint, fault=watch) as proxy:
        backend_for(proxy.endpoint, direct_put=False).put("a", body, 10, *digests(body))
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "")
        proxied = backend_for(proxy.endpoint)
        assert not proxied.direct_put_active
    assert len(agents) == 1
    assert agents[0].startswith("Boto3/")


def test_connections_closed_by_the_server_while_idle_cost_no_retry(
    rclone_server: RcloneS3Server, backend_for: Callable[..., Backend]
) -> None:
    body = b"k" * 10
    with S3Proxy(rclone_server.endpoint) as proxy:
        backend = backend_for(proxy.endpoint)
        backend.put("keys/a", body, 10, *digests(body))
        proxy.close_connections()  # as a server's keep-alive timeout would
        backend.put("keys/b", body, 10, *digests(body))
        statuses = [r.status for r in proxy.requests]
    assert statuses == [200, 200]
    assert backend.requests == 2


def test_a_bucket_in_another_region_falls_back_to_boto3(
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    backend_for: Callable[..., Backend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """boto3 follows S3's region redirect by itself; the writer hands over to it."""
    moved = FaultSchedule(
        Fault.s3_error(301, "PermanentRedirect", "The bucket is in this region: eu-west-1."),
        times=None,
        pred=lambda info: info.headers.get("user-agent", "").startswith("backrest-relay/"),
    )
    body = b"r" * 10
    with S3Proxy(rclone_server.endpoint, fault=moved) as proxy:
        backend = backend_for(proxy.endpoint)
        # A file body is rewound for boto3 after the writer's try.
        backend.put("keys/a", io.BytesIO(body), 10, *digests(body))  # type: ignore[arg-type]
        backend.put("keys/b", body, 10, *digests(body))
        agents = [r.status for r in proxy.requests]
    assert moved.injected == 1  # the writer tried once, boto3 sent both
    assert agents == [301, 200, 200]
    assert "set destination.region" in caplog.text
    client = rclone_server.endpoint.client()
    for key in ("keys/a", "keys/b"):
        got = client.get_object(Bucket=rclone_bucket, Key=f"restic/writer/{key}")
        assert got["Body"].read() == body


# -- over https -----------------------------------------------------------------------------
# B2 and every cloud endpoint are https, where the writer measured 0.79-0.91x rclone's time
# (boto3's put_object: 1.7-4x). A second rclone serves the session server's directory over
# TLS with a throw-away CA, so a bucket made on one is the same bucket on the other.


@pytest.fixture
def https_server(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> Iterator[tuple[RcloneS3Server, Path]]:
    """Started after the bucket is made: rclone caches the directory listing it starts with."""
    cert, key = self_signed_cert(tmp_path)
    with RcloneS3Server(rclone_server.root, rclone=require_tool("rclone"), tls=(cert, key)) as s:
        yield s, cert


@pytest.mark.parametrize("key", ODD_KEYS[:2])
def test_put_over_https_trusts_the_ca_bundle_the_agent_is_given(
    rclone_bucket: str,
    https_server: tuple[RcloneS3Server, Path],
    backend_for: Callable[..., Backend],
    monkeypatch: pytest.MonkeyPatch,
    key: str,
) -> None:
    server, cert = https_server
    monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
    assert server.endpoint.endpoint_url.startswith("https://")
    backend = backend_for(server.endpoint)
    assert backend.direct_put_active
    body = os.urandom(300_000)
    md5, sha = digests(body)

    etag = backend.put(key, body, len(body), md5, sha)

    got = server.endpoint.client().get_object(Bucket=rclone_bucket, Key=f"restic/writer/{key}")
    assert got["Body"].read() == body
    assert etag == md5 == got["ETag"].strip('"')
    assert backend.requests == 1


def test_put_over_https_refuses_a_certificate_it_cannot_verify(
    rclone_bucket: str,
    https_server: tuple[RcloneS3Server, Path],
    backend_for: Callable[..., Backend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, cert = https_server
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    backend = backend_for(server.endpoint)
    assert backend.direct_put_active
    body = b"z" * 100
    with pytest.raises(DestinationError) as refused:
        backend.put("config", body, len(body), *digests(body))
    assert "SSL validation failed" in refused.value.message
    assert "certificate verify failed" in refused.value.message
    monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))  # for the check below
    listed = server.endpoint.client().list_objects_v2(Bucket=rclone_bucket)
    assert listed.get("KeyCount", 0) == 0

"""The verifier's store on its lean signed path against real servers (moto, rclone serve s3
which checks signatures, a B2 look-alike that refuses checksum headers) and a
fault-injecting proxy: the same listings, bytes, Object Lock and errors as through boto3."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from cloud.integrations import object_reader
from cloud.integrations.s3 import S3Access, make_s3_client
from cloud.integrations.s3_store import S3ObjectStore
from cloud.logic.ports import ObjectNotFoundError, ObjectStoreError
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.faults import Fault, FaultSchedule
from testbed.s3.operations import RequestInfo
from testbed.s3.proxy import S3Proxy

KEYS = [
    "restic/data/ab/" + "ab" * 32,
    "restic/keys/with space and+plus=equals&amp",
    "restic/snapshots/unicodé-ключ-鍵~tilde!'()*",
    "restic/index/percent%41literal",
    "restic/config",
]


def store_for(endpoint: S3Endpoint, bucket: str, *, direct: bool = True) -> S3ObjectStore:
    access = S3Access(
        provider="s3",
        endpoint_url=endpoint.endpoint_url,
        region=endpoint.region,
        access_key_id=endpoint.access_key,
        secret_access_key=endpoint.secret_key,
    )
    return S3ObjectStore(make_s3_client(access, max_attempts=4), bucket, direct=direct)


def fill(endpoint: S3Endpoint, bucket: str) -> dict[str, bytes]:
    client = endpoint.client()
    bodies = {
        key: hashlib.sha256(key.encode()).digest() * (1 + i * 5000) for i, key in enumerate(KEYS)
    }
    for key, body in bodies.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    return bodies


def read_all(store: S3ObjectStore, key: str) -> bytes:
    return b"".join(store.read(key, chunk_size=64 * 1024))


@pytest.fixture(params=["moto", "rclone"])
def server(request: pytest.FixtureRequest) -> S3Endpoint:
    """Each S3 server the tests use (rclone only after the quiet window: it is a process)."""
    fixture = "moto_endpoint" if request.param == "moto" else "rclone_server"
    got = request.getfixturevalue(fixture)
    return got if isinstance(got, S3Endpoint) else got.endpoint


def by_agent(info: RequestInfo) -> bool:
    """Requests the lean path sends (boto3's user agent starts with Boto3/)."""
    return info.headers.get("user-agent", "").startswith("backrest-relay")


def test_lean_listing_and_reads_equal_boto3s(
    server: S3Endpoint,
    unique_bucket: Callable[[S3Endpoint], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = unique_bucket(server)
    bodies = fill(server, bucket)
    monkeypatch.setattr(object_reader, "PAGE_SIZE", 2)  # several pages
    agents: list[str] = []

    def note(info: RequestInfo) -> None:
        agents.append(info.headers.get("user-agent", ""))

    with S3Proxy(server, fault=note) as proxy:
        lean = store_for(proxy.endpoint, bucket)
        listed = list(lean.list("restic/"))
        assert listed == list(store_for(server, bucket, direct=False).list("restic/"))
        for key, body in bodies.items():
            assert read_all(lean, key) == body
        lists = lean.list_requests
    assert sorted(item.key for item in listed) == sorted(bodies)
    assert len(agents) == lists + len(bodies)
    assert all(agent.startswith("backrest-relay") for agent in agents)  # none through boto3


# Keys that sort around a level's prefix ("a-b" < "a/…" < "a0"); no key is also a folder,
# which a file-backed server (rclone) cannot store.
SPLIT_KEYS = [
    "r/a-b",
    "r/a/b",
    "r/a/c/d",
    "r/a0",
    "r/b/" + "0" * 3,
    "r/b/1",
    "r/é/z",
    "r/z",
]


@pytest.mark.parametrize("page_size", [1000, 2])
def test_a_listing_folder_by_folder_keeps_boto3s_order(
    server: S3Endpoint,
    unique_bucket: Callable[[S3Endpoint], str],
    monkeypatch: pytest.MonkeyPatch,
    page_size: int,
) -> None:
    """Listed folder by folder in parallel, handed out in key order; with folders longer
    than a page (page size 2), page by page."""
    bucket = unique_bucket(server)
    client = server.client()
    for key in SPLIT_KEYS:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    monkeypatch.setattr(object_reader, "PAGE_SIZE", page_size)
    lean = store_for(server, bucket)
    listed = [(i.key, i.size, i.etag) for i in lean.list("r/")]
    flat = [(i.key, i.size, i.etag) for i in store_for(server, bucket, direct=False).list("r/")]
    assert listed == flat
    assert [key for key, _, _ in listed] == sorted(SPLIT_KEYS)
    if page_size == 1000:  # r/, r/a/, r/a/c/, r/b/, r/é/: one call each
        assert lean.list_requests == 5


# Folder names an operator's prefix or a meddler's key may hold: each is a common prefix
# the folder-by-folder listing must decode exactly as the keys (`+`, `%`, space, `&`, `~`,
# unicode), plus a folder of more than a page and keys sorting right around it.
ODD_FOLDER_KEYS = [
    "r/a b/x",
    "r/a+b/x",
    "r/a%41b/x",
    "r/a&b/x",
    "r/a~b/x",
    "r/ключ 鍵/x",
    "r/big-",
    "r/big.x",
    *(f"r/big/{i:04d}" for i in range(1005)),
    "r/big0",
]


def test_a_listing_folder_by_folder_decodes_odd_folder_names(
    server: S3Endpoint, unique_bucket: Callable[[S3Endpoint], str]
) -> None:
    bucket = unique_bucket(server)
    client = server.client()
    for key in ODD_FOLDER_KEYS:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    listed = [i.key for i in store_for(server, bucket).list("r/")]
    assert listed == [i.key for i in store_for(server, bucket, direct=False).list("r/")]
    assert listed == sorted(ODD_FOLDER_KEYS)


def test_folder_markers_keys_ending_in_a_slash_are_listed_like_boto3(
    moto_endpoint: S3Endpoint, unique_bucket: Callable[[S3Endpoint], str]
) -> None:
    """Keys ending in `/` (a web console's "folder", a double slash): each is its own
    folder's first key on the delimiter listing, and must come out once, in place."""
    bucket = unique_bucket(moto_endpoint)
    client = moto_endpoint.client()
    keys = ["r/", "r/a/", "r/a/b", "r/a//", "r/a//c", "r/a0", "r/b/"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"")
    listed = [i.key for i in store_for(moto_endpoint, bucket).list("r/")]
    assert listed == [i.key for i in store_for(moto_endpoint, bucket, direct=False).list("r/")]
    assert listed == sorted(keys)


def test_a_missing_object_is_not_found_and_a_missing_bucket_an_error(
    moto_endpoint: S3Endpoint, unique_bucket: Callable[[S3Endpoint], str]
) -> None:
    bucket = unique_bucket(moto_endpoint)
    with pytest.raises(ObjectNotFoundError, match=f"{bucket}/restic/nope: not found"):
        read_all(store_for(moto_endpoint, bucket), "restic/nope")
    with pytest.raises(
        ObjectStoreError, match=r"listing no-such-bucket-x/p: NoSuchBucket \(HTTP 404\)"
    ):
        list(store_for(moto_endpoint, "no-such-bucket-x").list("p"))


def test_object_lock_is_read_from_the_get_as_boto3_reads_it(
    moto_endpoint: S3Endpoint, unique_bucket: Callable[[S3Endpoint], str]
) -> None:
    client = moto_endpoint.client()
    bucket = f"{unique_bucket(moto_endpoint)}-lock"
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    client.put_object(
        Bucket=bucket,
        Key="restic/config",
        Body=b"c",
        ObjectLockMode="GOVERNANCE",
        ObjectLockRetainUntilDate=until,
        ContentMD5="TCpdUt8ehzb5A5OYoXENnA==",
    )
    client.put_object(Bucket=bucket, Key="restic/plain", Body=b"p")
    lean, boto = store_for(moto_endpoint, bucket), store_for(moto_endpoint, bucket, direct=False)
    for store in (lean, boto):
        read_all(store, "restic/config")
        read_all(store, "restic/plain")
    got = lean.retention("restic/config")
    assert got is not None
    assert got == boto.retention("restic/config")
    assert (got.mode, got.until) == ("GOVERNANCE", until)
    assert lean.retention("restic/plain") is None


def test_throttling_and_dropped_connections_are_retried(
    moto_endpoint: S3Endpoint, unique_bucket: Callable[[S3Endpoint], str]
) -> None:
    bucket = unique_bucket(moto_endpoint)
    bodies = fill(moto_endpoint, bucket)
    key = KEYS[1]
    faults = FaultSchedule(Fault.slow_down(), times=2, method="GET")
    with S3Proxy(moto_endpoint, fault=faults) as proxy:
        store = store_for(proxy.endpoint, bucket)
        assert read_all(store, key) == bodies[key]
        proxy.fault = FaultSchedule(Fault.drop(), times=1, method="GET")
        assert read_all(store, key) == bodies[key]
        statuses = [r.status for r in proxy.requests]
    assert statuses == [503, 503, 200, None, 200]

    with S3Proxy(moto_endpoint) as proxy:
        proxy.fault = FaultSchedule(Fault.internal_error(), times=None, method="GET")
        with pytest.raises(ObjectStoreError, match=r"InternalError \(HTTP 500\)"):
            read_all(store_for(proxy.endpoint, bucket), key)
        assert len(proxy.requests) == 4  # the client's attempts


def test_a_bucket_in_another_region_falls_back_to_boto3(
    moto_endpoint: S3Endpoint,
    unique_bucket: Callable[[S3Endpoint], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bucket = unique_bucket(moto_endpoint)
    bodies = fill(moto_endpoint, bucket)
    moved = FaultSchedule(
        Fault.s3_error(301, "PermanentRedirect", "The bucket is in this region: eu-west-1."),
        times=None,
        pred=by_agent,
    )
    with caplog.at_level(logging.WARNING), S3Proxy(moto_endpoint, fault=moved) as proxy:
        store = store_for(proxy.endpoint, bucket)
        assert read_all(store, KEYS[0]) == bodies[KEYS[0]]
        assert len(list(store.list("restic/"))) == len(KEYS)
    assert moved.injected == 1  # the lean path tried once, boto3 did the rest
    assert "set destination.region" in caplog.text


def test_b2_look_alike_serves_the_lean_path(b2_proxy: S3Proxy, rclone_bucket: str) -> None:
    """B2 refuses every x-amz-checksum-* header; the lean path sends none."""
    bodies = fill(b2_proxy.endpoint, rclone_bucket)
    store = store_for(b2_proxy.endpoint, rclone_bucket)
    assert {item.key for item in store.list("restic/")} == set(bodies)
    for key, body in bodies.items():
        assert read_all(store, key) == body
    mine = [r for r in b2_proxy.requests if r.method == "GET"]
    assert mine
    assert all(r.status == 200 for r in mine)
    assert not any(name.startswith("x-amz-checksum") for r in mine for name in r.header_names)

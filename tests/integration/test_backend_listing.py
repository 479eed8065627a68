"""The backend's paginated listings against moto behind a proxy that can rewrite a page."""

from __future__ import annotations

from itertools import islice

from cloud.contracts.destination import Destination
from local_agent.mirror.backend import Backend
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.faults import Fault, FaultSchedule
from testbed.s3.proxy import S3Proxy
from tests.integration.test_object_writer import access_for

# A truncated ListObjectsV2 page that does not say where the next page starts.
TRUNCATED_WITHOUT_TOKEN = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<Name>listing</Name><Prefix>restic/r1/</Prefix><KeyCount>1</KeyCount>"
    b"<MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>"
    b"<Contents><Key>restic/r1/keys/k</Key><Size>3</Size><ETag>&quot;abc&quot;</ETag>"
    b"<LastModified>2026-01-01T00:00:00.000Z</LastModified></Contents>"
    b"</ListBucketResult>"
)


def backend_at(endpoint: S3Endpoint, bucket: str) -> Backend:
    destination = Destination(
        provider="s3", endpoint_url=endpoint.endpoint_url, bucket=bucket, prefix="restic/r1"
    )
    return Backend(access_for(endpoint), destination, max_attempts=1)


def test_a_truncated_page_without_a_next_token_ends_the_listing(
    moto_endpoint: S3Endpoint,
) -> None:
    moto_endpoint.make_bucket("listing")
    fault = FaultSchedule(
        Fault.respond(200, TRUNCATED_WITHOUT_TOKEN), times=None, operation="ListObjectsV2"
    )
    with S3Proxy(moto_endpoint, fault=fault) as proxy:
        backend = backend_at(proxy.endpoint, "listing")
        # Asking for the first page again would list the same objects forever.
        listed = list(islice(backend.list(), 3))
    assert [o.key for o in listed] == ["keys/k"]
    assert fault.injected == 1


def test_listings_follow_their_markers_to_the_last_page(moto_endpoint: S3Endpoint) -> None:
    moto_endpoint.make_bucket("listing")
    client = moto_endpoint.client()
    client.put_bucket_versioning(Bucket="listing", VersioningConfiguration={"Status": "Enabled"})
    keys = [f"restic/r1/data/{i:04d}" for i in range(1005)]
    for key in keys:
        client.put_object(Bucket="listing", Key=key, Body=b"")
    for key in keys[:3]:
        client.put_object(Bucket="listing", Key=key, Body=b"again")
    backend = backend_at(moto_endpoint, "listing")
    assert [o.key for o in backend.list()] == [k.removeprefix("restic/r1/") for k in keys]
    assert backend.requests == 2  # 1000 per page
    versions = list(backend.list_versions("restic/r1/"))
    assert len(versions) == len(keys) + 3
    assert sorted(v.key for v in versions if v.latest) == keys
    assert backend.requests == 4
    assert list(backend.list_multipart_uploads()) == []

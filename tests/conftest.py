"""Shared fixtures: local S3 servers, proxies in front of them, restic.

Servers are session-scoped (rclone takes ~100 ms to start, moto longer); everything a test
can dirty (buckets, proxies and their request logs, moto's state) is per test.
Tests that use rclone or restic fixtures are marked ``real_tools`` automatically: they skip
when the tool is missing, and fail instead when ``BACKREST_RELAY_REQUIRE_TOOLS=1`` (CI).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest

from testbed.s3.endpoint import S3Endpoint, unique_bucket_name
from testbed.s3.moto_server import MotoS3Server
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from tests.support.tools import require_tool

# Fixtures that need restic or rclone; tests using them (even indirectly) get `real_tools`.
REAL_TOOL_FIXTURES = frozenset(
    {"rclone_server", "rclone_bucket", "b2_proxy", "counting_proxy", "restic_bin"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that depends on a real-tool fixture, so `-m real_tools` selects it."""
    for item in items:
        if REAL_TOOL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_tools)


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    """One ``rclone serve s3`` for the session; buckets are directories under ``.root``."""
    rclone = require_tool("rclone")
    root = tmp_path_factory.mktemp("rclone-s3-root")
    with RcloneS3Server(root, rclone=rclone) as server:
        yield server


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3Server]:
    """One moto server for the session. Prefer ``moto_endpoint``, which resets it first."""
    with MotoS3Server() as server:
        yield server


@pytest.fixture
def moto_endpoint(moto_server: MotoS3Server) -> S3Endpoint:
    """The session's moto server, emptied for this test."""
    moto_server.reset()
    return moto_server.endpoint


@pytest.fixture
def unique_bucket(request: pytest.FixtureRequest) -> Iterator[Callable[[S3Endpoint], str]]:
    """``unique_bucket(endpoint) -> name``: create a fresh bucket named after the test.

    Buckets on directory-backed servers (rclone) are deleted from disk afterwards.
    """
    created: list[tuple[S3Endpoint, str]] = []

    def make(endpoint: S3Endpoint) -> str:
        name = unique_bucket_name(request.node.name)
        endpoint.make_bucket(name)
        created.append((endpoint, name))
        return name

    yield make
    for endpoint, name in created:
        if endpoint.local_root is not None:
            shutil.rmtree(endpoint.local_root / name, ignore_errors=True)


@pytest.fixture
def rclone_bucket(rclone_server: RcloneS3Server, unique_bucket: Callable[[S3Endpoint], str]) -> str:
    """A fresh, empty bucket on the session's rclone server."""
    return unique_bucket(rclone_server.endpoint)


@pytest.fixture
def b2_proxy(rclone_server: RcloneS3Server) -> Iterator[S3Proxy]:
    """A B2 look-alike: the rclone server behind a proxy that refuses checksum headers."""
    with S3Proxy(rclone_server.endpoint, b2_quirks=True) as proxy:
        yield proxy


@pytest.fixture
def counting_proxy(rclone_server: RcloneS3Server) -> Iterator[S3Proxy]:
    """The rclone server behind a plain proxy, for counting requests and injecting faults."""
    with S3Proxy(rclone_server.endpoint) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def restic_bin() -> str:
    """Path of the restic executable (skip, or fail in CI, without it)."""
    return require_tool("restic")


@pytest.fixture(scope="session")
def restic_password() -> str:
    """Password for repositories the tests create (never a real one)."""
    return "relay-test-password"

"""Manifest and completion events end to end in moto: EventBridge rule → SQS.

The agent runs as a separate process, exactly as the hook runs it; EventBridge and SQS are
moto's, reached over HTTP; the bucket is moto's S3 on the same server.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from testbed.agent import agent_config_in, run_agent, upload_args
from testbed.repos import add_packs, corrupt, make_fake_restic_repo
from testbed.s3.endpoint import S3Endpoint, free_port

BUS = "backrest-relay"
PREFIX = "restic/home"


def aws_env(endpoint: S3Endpoint) -> dict[str, str]:
    """The AWS chain the agent's EventBridge client uses (never the bucket's keys)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


class Wiring:
    """EventBridge bus + rule → SQS queue in moto."""

    def __init__(self, endpoint: S3Endpoint) -> None:
        kwargs: dict[str, Any] = {
            "endpoint_url": endpoint.endpoint_url,
            "region_name": "us-east-1",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
        self.events = boto3.client("events", **kwargs)
        self.sqs = boto3.client("sqs", **kwargs)
        self.events.create_event_bus(Name=BUS)
        self.queue_url = self.sqs.create_queue(QueueName="verify")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        self.events.put_rule(
            Name="agent-events",
            EventBusName=BUS,
            EventPattern=json.dumps({"source": ["backrest-relay.agent"]}),
        )
        self.events.put_targets(
            Rule="agent-events", EventBusName=BUS, Targets=[{"Id": "q", "Arn": arn}]
        )

    def received(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            resp = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
            )
            messages = resp.get("Messages", [])
            if not messages:
                return out
            for message in messages:
                out.append(json.loads(message["Body"]))
                self.sqs.delete_message(
                    QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"]
                )


@pytest.fixture
def wiring(moto_endpoint: S3Endpoint) -> Wiring:
    return Wiring(moto_endpoint)


def make_config(
    tmp_path: Path, endpoint: S3Endpoint, bucket: str, events_url: str, *, event_bus: str = BUS
) -> Path:
    return agent_config_in(
        tmp_path,
        endpoint,
        bucket,
        events={
            "publisher": "eventbridge",
            "event_bus": event_bus,
            "region": "us-east-1",
            "endpoint_url": events_url,
        },
    )


@dataclass(frozen=True)
class Scene:
    """A bucket on moto, the agent configured to publish to the test bus through moto's
    EventBridge, and the queue the bus's rule feeds."""

    endpoint: S3Endpoint
    bucket: str
    config: Path
    wiring: Wiring


@pytest.fixture
def scene(
    tmp_path: Path,
    moto_endpoint: S3Endpoint,
    unique_bucket: Callable[[S3Endpoint], str],
    wiring: Wiring,
) -> Scene:
    bucket = unique_bucket(moto_endpoint)
    config = make_config(tmp_path, moto_endpoint, bucket, moto_endpoint.endpoint_url)
    return Scene(moto_endpoint, bucket, config, wiring)


def upload(config: Path, repo: Path, endpoint: S3Endpoint):  # type: ignore[no-untyped-def]
    return run_agent(
        upload_args(config, repo, repo_guid="ab" * 32, trigger="CONDITION_CHECK_SUCCESS"),
        env=aws_env(endpoint),
    )


def read_manifest(
    endpoint: S3Endpoint, bucket: str, key: str
) -> tuple[bytes, list[dict[str, Any]]]:
    body = endpoint.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    lines = [json.loads(line) for line in gzip.decompress(body).splitlines()]
    return body, lines


def test_mirror_delivers_completed_event_pointing_at_a_true_manifest(
    tmp_path: Path, scene: Scene
) -> None:
    repo = make_fake_restic_repo(tmp_path / "repo", packs=30, pack_size=(1000, 50_000), seed=1)
    result = upload(scene.config, repo.root, scene.endpoint)
    assert result.returncode == 0, result.stderr

    [event] = scene.wiring.received()
    assert event["source"] == "backrest-relay.agent"
    assert event["detail-type"] == "Mirror Completed"
    detail = event["detail"]
    assert detail["schema_version"] == 1
    assert detail["run_id"] == result.summary["run_id"]
    assert detail["repo"] == {"id": "home", "guid": "ab" * 32, "path": str(repo.root)}
    assert detail["trigger"] == "CONDITION_CHECK_SUCCESS"
    assert detail["destination"]["bucket"] == scene.bucket
    assert detail["destination"]["prefix"] == PREFIX
    assert detail["stats"]["uploaded_files"] == len(repo.mirrored_files())
    assert sorted(detail["new_snapshots"]) == sorted(p.name for p in repo.snapshots)

    manifest = detail["manifest"]
    assert manifest["key"].startswith(f"{PREFIX}.relay/manifests/")  # beside the repository
    body, lines = read_manifest(scene.endpoint, scene.bucket, manifest["key"])
    assert hashlib.sha256(body).hexdigest() == manifest["sha256"]
    header, entries = lines[0], lines[1:]
    assert header["run_id"] == detail["run_id"]
    assert header["prefix"] == PREFIX
    assert header["objects"] == manifest["objects"] == len(entries)
    expected = {p.relative_to(repo.root).as_posix(): p for p in repo.mirrored_files()}
    assert {e["key"] for e in entries} == set(expected)
    for entry in entries:
        data = expected[entry["key"]].read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["md5"] == hashlib.md5(data, usedforsecurity=False).hexdigest()
        assert entry["uploaded"] is True


def test_noop_run_points_at_the_unchanged_manifest(tmp_path: Path, scene: Scene) -> None:
    repo = make_fake_restic_repo(tmp_path / "repo", packs=5, pack_size=2000, seed=2)
    first = upload(scene.config, repo.root, scene.endpoint)
    second = upload(scene.config, repo.root, scene.endpoint)
    assert first.returncode == second.returncode == 0, second.stderr
    events = scene.wiring.received()
    assert [e["detail-type"] for e in events] == ["Mirror Completed"] * 2
    assert events[1]["detail"]["manifest"] == events[0]["detail"]["manifest"]
    assert events[1]["detail"]["stats"]["requests"] == 0
    manifests = scene.endpoint.client().list_objects_v2(
        Bucket=scene.bucket, Prefix=f"{PREFIX}.relay/"
    )
    assert manifests["KeyCount"] == 1

    new = add_packs(repo, 2, 3000, seed=3)
    third = upload(scene.config, repo.root, scene.endpoint)
    assert third.returncode == 0, third.stderr
    [event] = scene.wiring.received()
    assert event["detail"]["manifest"]["key"] != events[0]["detail"]["manifest"]["key"]
    _, lines = read_manifest(scene.endpoint, scene.bucket, event["detail"]["manifest"]["key"])
    uploaded = {e["key"] for e in lines[1:] if e["uploaded"]}
    assert uploaded == {p.relative_to(repo.root).as_posix() for p in new}


def test_corrupt_pack_delivers_mirror_failed(tmp_path: Path, scene: Scene) -> None:
    repo = make_fake_restic_repo(tmp_path / "repo", packs=6, pack_size=4000, seed=4)
    corrupt(repo.data[2])
    result = upload(scene.config, repo.root, scene.endpoint)
    assert result.returncode == 3
    [event] = scene.wiring.received()
    assert event["detail-type"] == "Mirror Failed"
    detail = event["detail"]
    assert detail["error"]["kind"] == "local-integrity"
    bad = repo.data[2].relative_to(repo.root).as_posix()
    assert bad in detail["error"]["message"]
    assert detail["corrupt_files"] == [bad]
    assert "manifest" not in detail


def test_unreachable_eventbridge_keeps_events_and_next_run_sends_both_in_order(
    tmp_path: Path, scene: Scene
) -> None:
    repo = make_fake_restic_repo(tmp_path / "repo", packs=4, pack_size=2000, seed=5)
    dead = make_config(tmp_path, scene.endpoint, scene.bucket, f"http://127.0.0.1:{free_port()}")
    first = upload(dead, repo.root, scene.endpoint)
    assert first.returncode == 0, first.stderr
    assert "could not publish" in first.stderr
    assert first.summary["event"]["pending"] == 1
    assert scene.wiring.received() == []

    add_packs(repo, 1, 2000, seed=6)
    live = make_config(tmp_path, scene.endpoint, scene.bucket, scene.endpoint.endpoint_url)
    second = upload(live, repo.root, scene.endpoint)
    assert second.returncode == 0, second.stderr
    assert second.summary["event"]["pending"] == 0
    events = scene.wiring.received()
    assert [e["detail"]["run_id"] for e in events] == [
        first.summary["run_id"],
        second.summary["run_id"],
    ]
    third = upload(live, repo.root, scene.endpoint)
    assert third.returncode == 0
    assert [e["detail"]["run_id"] for e in scene.wiring.received()] == [third.summary["run_id"]]


def test_report_failure_publishes_mirror_failed_for_a_failed_check(
    tmp_path: Path, scene: Scene
) -> None:
    result = run_agent(
        [
            "report-failure",
            "--repo-id",
            "home",
            "--repo-guid",
            "ab" * 32,
            "--trigger",
            "CONDITION_CHECK_ERROR",
            "--error",
            "pack 1234abcd: ciphertext verification failed",
            "--config",
            str(scene.config),
            "--json",
        ],
        env=aws_env(scene.endpoint),
    )
    assert result.returncode == 0, result.stderr
    [event] = scene.wiring.received()
    assert event["detail-type"] == "Mirror Failed"
    assert event["detail"]["error"] == {
        "kind": "check",
        "message": "pack 1234abcd: ciphertext verification failed",
    }
    assert event["detail"]["trigger"] == "CONDITION_CHECK_ERROR"
    assert event["detail"]["destination"]["prefix"] == PREFIX


def test_failed_entry_count_is_not_success(tmp_path: Path, scene: Scene) -> None:
    """A bus that does not exist: PutEvents answers with a failed entry (or an error); the
    event stays in the outbox."""
    repo = make_fake_restic_repo(tmp_path / "repo", packs=2, pack_size=2000, seed=7)
    config = make_config(
        tmp_path, scene.endpoint, scene.bucket, scene.endpoint.endpoint_url, event_bus="no-such-bus"
    )
    result = upload(config, repo.root, scene.endpoint)
    assert result.returncode == 0, result.stderr
    assert result.summary["event"]["pending"] == 1
    assert "could not publish" in result.stderr

"""The verifier Lambda end to end on moto's server (ThreadedMotoServer, reached over HTTP).

The agent uploads a mirror and publishes `Mirror Completed` to EventBridge; a rule sends it
to the verify queue (redrive to a DLQ after 2 receives); the handler is fed the real SQS
messages the way Lambda's event source mapping does (successes deleted, reported failures
left on the queue); a second rule sends the verifier's results to a results queue.
"""

from __future__ import annotations

import os

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities import parameters

from cloud.contracts.destination import Destination
from cloud.contracts.events import put_events_entry
from cloud.handlers import verify as verify_handler
from cloud.integrations.runstore_dynamodb import DynamoRunStore, create_table
from cloud.logic.watchdog import plan
from testbed.repos import make_fake_restic_repo
from testbed.s3.endpoint import S3Endpoint
from tests.support.lambdas import (
    BUS,
    RUNS_TABLE,
    FakeLambdaContext,
    MotoAws,
    Queues,
    agent_config_on_bus,
    agent_upload,
    create_idempotency_table,
    logs_to_current_stdout,
    moto_clients,
    moto_function_env,
    route,
    s3_destination_secret,
    write_mirror,
)

GUID = "cd" * 32
PREFIX = "restic/home"
SECRET_KEY = "moto-accepts-any-key-but-this-one-is-secret"


@pytest.fixture(autouse=True, scope="module")
def logs_on_pytest_stdout() -> Iterator[None]:
    with logs_to_current_stdout(verify_handler.logger):
        yield


@dataclass
class Cloud:
    """The deployed cloud side, in moto."""

    endpoint: S3Endpoint
    sqs: Any
    dynamodb: Any
    verify_queue: str
    verify_arn: str
    dlq: str
    results_queue: str

    def deliver(self, *, max_messages: int = 10) -> dict[str, Any] | None:
        """One poll of Lambda's event source mapping: receive, invoke, delete successes."""
        context = FakeLambdaContext("backrest-relay-verify", 1024, remaining_ms=600_000)
        return Queues(self.sqs).deliver(
            verify_handler.handler,
            self.verify_queue,
            self.verify_arn,
            context,
            max_messages=max_messages,
        )

    def drain(self, queue: str) -> list[dict[str, Any]]:
        return Queues(self.sqs).drain(queue)

    def peek_bodies(self, queue: str) -> list[str]:
        return Queues(self.sqs).peek_bodies(queue)

    def runs(self) -> DynamoRunStore:
        return DynamoRunStore(RUNS_TABLE, client=self.dynamodb)


@pytest.fixture
def cloud(moto_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cloud]:
    aws = MotoAws.at(moto_endpoint.endpoint_url)
    queues = Queues(aws.sqs)
    (verify_queue, verify_arn), (dlq, _) = queues.with_dlq(
        "verify",
        max_receive=2,
        VisibilityTimeout="0",  # a failed record is visible again at once (test speed)
    )
    results_queue, results_arn = queues.create("results")
    aws.events.create_event_bus(Name=BUS)
    route(
        aws.events,
        [
            (
                "mirror-completed",
                {"source": ["backrest-relay.agent"], "detail-type": ["Mirror Completed"]},
                verify_arn,
            ),
            ("verifier-results", {"source": ["backrest-relay.verifier"]}, results_arn),
        ],
    )
    create_table(aws.dynamodb, RUNS_TABLE)
    create_idempotency_table(aws.dynamodb)
    secret = s3_destination_secret(aws.secrets, moto_endpoint, SECRET_KEY)
    # The function's own AWS access (DynamoDB, EventBridge, Secrets Manager) → moto.
    moto_function_env(
        monkeypatch,
        aws.url,
        AWS_LAMBDA_FUNCTION_NAME="backrest-relay-verify",
        DESTINATION_SECRET_ARN=secret["ARN"],
    )
    parameters.clear_caches()  # type: ignore[no-untyped-call]
    verify_handler.set_dependencies(None)
    yield Cloud(moto_endpoint, aws.sqs, aws.dynamodb, verify_queue, verify_arn, dlq, results_queue)
    verify_handler.set_dependencies(None)
    verify_handler.metrics.clear_metrics()
    parameters.clear_caches()  # type: ignore[no-untyped-call]


def upload(tmp_path: Path, cloud: Cloud, bucket: str, *, seed: int = 1) -> dict[str, Any]:
    """Mirror a restic-format repository with the real agent (a separate process)."""
    repo = make_fake_restic_repo(tmp_path / "repo", packs=12, pack_size=(500, 40_000), seed=seed)
    return agent_upload(repo.root, agent_config_on_bus(tmp_path, cloud.endpoint, bucket), GUID)


def test_mirror_completed_is_verified_once_despite_duplicates(
    tmp_path: Path,
    cloud: Cloud,
    unique_bucket: Callable[[S3Endpoint], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket = unique_bucket(cloud.endpoint)
    summary = upload(tmp_path, cloud, bucket)

    [body] = cloud.peek_bodies(cloud.verify_queue)
    # EventBridge (and SQS) deliver at least once: the same event arrives twice.
    cloud.sqs.send_message(QueueUrl=cloud.verify_queue, MessageBody=body)

    first = cloud.deliver(max_messages=1)
    second = cloud.deliver(max_messages=1)
    assert first is not None and first["batchItemFailures"] == []
    assert second is not None and second["batchItemFailures"] == []
    assert cloud.deliver() is None  # both deleted

    [result] = cloud.drain(cloud.results_queue)
    assert result["source"] == "backrest-relay.verifier"
    assert result["detail-type"] == "Mirror Verified"
    detail = result["detail"]
    assert detail["mirror_run_id"] == summary["run_id"]
    assert detail["destination"]["bucket"] == bucket
    assert detail["problems_total"] == 0
    assert detail["stats"]["compared"] == detail["manifest"]["objects"] > 10
    assert detail["stats"]["deep_checked_new"] == detail["manifest"]["objects"]
    assert detail["host"] == "lambda:backrest-relay-verify"

    runs = cloud.runs().runs(GUID)
    assert sorted((r.kind, r.status) for r in runs) == [
        ("mirror", "completed"),
        ("verification", "verified"),
    ]
    latest = cloud.runs().latest_verified(GUID)
    assert latest is not None and latest.run_id == detail["run_id"]
    assert SECRET_KEY not in capsys.readouterr().out


def test_damaged_object_is_reported_by_name(
    tmp_path: Path, cloud: Cloud, unique_bucket: Callable[[S3Endpoint], str]
) -> None:
    bucket = unique_bucket(cloud.endpoint)
    upload(tmp_path, cloud, bucket, seed=2)
    s3 = cloud.endpoint.client()
    keys = [
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/data/")["Contents"]
    ]
    victim = keys[len(keys) // 2]
    data = bytearray(s3.get_object(Bucket=bucket, Key=victim)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=victim, Body=bytes(data))  # same size, new ETag

    response = cloud.deliver()
    assert response is not None and response["batchItemFailures"] == []
    [result] = cloud.drain(cloud.results_queue)
    assert result["detail-type"] == "Mirror Verification Failed"
    problems = result["detail"]["problems"]
    assert [(p["key"], p["kind"]) for p in problems] == [(victim[len(PREFIX) + 1 :], "etag")]
    assert cloud.runs().latest_verified(GUID) is None


def test_malformed_message_fails_alone_and_reaches_the_dlq(
    tmp_path: Path, cloud: Cloud, unique_bucket: Callable[[S3Endpoint], str]
) -> None:
    bucket = unique_bucket(cloud.endpoint)
    upload(tmp_path, cloud, bucket, seed=3)
    cloud.sqs.send_message(QueueUrl=cloud.verify_queue, MessageBody="{not json")

    first = cloud.deliver()
    assert first is not None and len(first["delivered"]) == 2
    [failed] = first["batchItemFailures"]
    [result] = cloud.drain(cloud.results_queue)
    assert result["detail-type"] == "Mirror Verified"  # the good record was not held back

    retry = cloud.deliver()  # second receive: fails again
    assert retry is not None and retry["delivered"] == [failed["itemIdentifier"]]
    assert retry["batchItemFailures"] == [failed]
    assert cloud.deliver() is None  # maxReceiveCount reached: moved, not delivered
    assert cloud.peek_bodies(cloud.dlq) == ["{not json"]
    assert cloud.drain(cloud.results_queue) == []


def test_forged_completion_for_another_repository_is_refused_and_alerted(
    tmp_path: Path, cloud: Cloud, unique_bucket: Callable[[S3Endpoint], str]
) -> None:
    """The identity-binding test (issue 17): the real agent's first verified run binds
    repository GUID to its bucket and prefix; a `Mirror Completed` put on the bus by another
    principal, naming GUID with a valid mirror and manifest in a bucket of its own, is
    refused — a `Mirror Verification Failed` (kind `binding`) reaches the notifier's rule —
    and the repository stays as verified as it was: the watchdog still sees it go stale."""
    bucket = unique_bucket(cloud.endpoint)
    summary = upload(tmp_path, cloud, bucket, seed=4)
    assert cloud.deliver() is not None
    [verified] = cloud.drain(cloud.results_queue)
    assert verified["detail-type"] == "Mirror Verified"
    runs = cloud.runs()
    binding = runs.load_binding(GUID)
    assert binding is not None and (binding["bucket"], binding["prefix"]) == (bucket, PREFIX)

    # Another principal: its own bucket, a complete mirror and manifest there, GUID's name.
    attacker = unique_bucket(cloud.endpoint)
    s3 = cloud.endpoint.client()
    foreign = Destination(
        provider="s3", endpoint_url=cloud.endpoint.endpoint_url, bucket=attacker, prefix="x/y"
    )
    forged, _ = write_mirror(
        lambda key, body: s3.put_object(Bucket=attacker, Key=key, Body=body),
        foreign,
        seed=9,
        guid=GUID,
    )
    events: Any = boto3.client("events", **moto_clients(cloud.endpoint.endpoint_url))
    put = events.put_events(Entries=[put_events_entry(forged, BUS)])
    assert put["FailedEntryCount"] == 0

    response = cloud.deliver()
    assert response is not None and response["batchItemFailures"] == []  # a verdict
    [alert] = cloud.drain(cloud.results_queue)  # what the notifier's rule receives
    assert alert["detail-type"] == "Mirror Verification Failed"
    assert alert["detail"]["repo"]["guid"] == GUID
    assert alert["detail"]["mirror_run_id"] == forged.run_id
    [problem] = alert["detail"]["problems"]
    assert problem["kind"] == "binding"
    assert f"bucket {attacker!r} (bound: {bucket!r})" in problem["detail"]
    assert alert["detail"]["stats"]["listed"] == 0  # nothing of the foreign bucket was read

    latest = runs.latest_verified(GUID)
    assert latest is not None and latest.run_id == verified["detail"]["run_id"]
    assert latest.mirror_run_id == summary["run_id"]
    assert runs.get(GUID, forged.run_id) is None  # not recorded as the repository's run
    assert runs.load_binding(GUID) == binding
    # The forged event did not feed the watchdog: a day on, the repository is stale.
    later = datetime.now(UTC) + timedelta(hours=27)
    watch = plan(runs, now=later, max_age_for=lambda _: timedelta(hours=26))
    assert [a.record.repo_key for a in watch.alerts] == [GUID]

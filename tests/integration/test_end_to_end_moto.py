"""The whole chain end to end on moto's server (ThreadedMotoServer, reached over HTTP).

The real agent (a separate process) mirrors a restic-format repository to moto's S3 and
publishes `Mirror Completed` to EventBridge; the template's rule sends it to the verify
queue; the verify handler is fed those SQS messages the way Lambda's event source mapping
does and publishes its result to the bus; the template's notify rule sends the result to the
notify queue; the notify handler is fed those messages and sends to the SNS topic (an SQS
queue subscribed to it stands in for the email subscribers), the Apprise URL and the
Healthchecks URL of the notify secret (local HTTP sinks).

Both handlers run with their production wiring (`dependencies_from_env`) against moto: the
run store and the shared idempotency table in DynamoDB, the secrets in Secrets Manager. The
rules' event patterns are read from `infra/template.yaml`. The per-handler edge cases
(duplicates, malformed records, broken channels, DLQ) are in `test_lambda_verify_moto.py`
and `test_lambda_notify_moto.py`, whose fixtures' `Cloud` helpers this module reuses.
"""

from __future__ import annotations

import os

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.utilities import parameters

from cloud.handlers import notify as notify_handler
from cloud.handlers import verify as verify_handler
from cloud.integrations.runstore_dynamodb import create_table
from testbed.repos import add_packs, make_fake_restic_repo
from testbed.s3.endpoint import S3Endpoint
from tests.infra.conftest import load_sam_template
from tests.integration.test_lambda_notify_moto import HC_UUID
from tests.integration.test_lambda_notify_moto import Cloud as NotifySide
from tests.integration.test_lambda_notify_moto import deploy as deploy_notify
from tests.integration.test_lambda_verify_moto import Cloud as VerifySide
from tests.support.lambdas import (
    BUS,
    RUNS_TABLE,
    MotoAws,
    Queues,
    agent_config_on_bus,
    agent_upload,
    create_idempotency_table,
    moto_function_env,
    route,
    s3_destination_secret,
)
from tests.support.sinks import HttpSink

GUID = "e2" * 32
PREFIX = "restic/home"


@dataclass
class Deployment:
    """The cloud side as the template deploys it, in moto, seen from each function."""

    endpoint: S3Endpoint
    verify: VerifySide
    notify: NotifySide
    verify_dlq: str
    notify_dlq: str


def rule_patterns() -> dict[str, Any]:
    """The event patterns of the template's two rules, as written there."""
    resources = load_sam_template()["Resources"]
    return {
        name: resources[name]["Properties"]["EventPattern"]
        for name in ("MirrorCompletedRule", "NotifyRule")
    }


@pytest.fixture
def deployment(moto_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    aws = MotoAws.at(moto_endpoint.endpoint_url)
    queues = Queues(aws.sqs)
    (verify_queue, verify_arn), (verify_dlq, _) = queues.with_dlq("verify", max_receive=5)
    notify_queue, (notify_dlq, _) = queues.with_dlq("notify", max_receive=5)

    aws.events.create_event_bus(Name=BUS)
    patterns = rule_patterns()
    route(
        aws.events,
        [(rule, patterns[rule], arn) for rule, arn in
         (("MirrorCompletedRule", verify_arn), ("NotifyRule", notify_queue[1]))],
    )  # fmt: skip

    create_table(aws.dynamodb, RUNS_TABLE)
    create_idempotency_table(aws.dynamodb)  # shared by both functions (key prefixes differ)
    destination_secret = s3_destination_secret(aws.secrets, moto_endpoint, "verifier-read-only-key")
    with HttpSink() as chat, HttpSink() as pings:
        notify, notify_settings = deploy_notify(aws, notify_queue, notify_dlq, chat, pings)
        # Both functions' own AWS access → moto; then each one's configuration.
        moto_function_env(
            monkeypatch,
            aws.url,
            AWS_LAMBDA_FUNCTION_NAME="backrest-relay-verify",  # only the verifier reads it
            DESTINATION_SECRET_ARN=destination_secret["ARN"],
            **notify_settings,
            SUCCESS_POLICY="always",
        )
        parameters.clear_caches()  # type: ignore[no-untyped-call]
        verify_handler.set_dependencies(None)
        notify_handler.set_dependencies(None)
        verify = VerifySide(
            endpoint=moto_endpoint,
            sqs=aws.sqs,
            dynamodb=aws.dynamodb,
            verify_queue=verify_queue,
            verify_arn=verify_arn,
            dlq=verify_dlq,
            results_queue=notify_queue[0],  # where the notify rule delivers the results
        )
        yield Deployment(moto_endpoint, verify, notify, verify_dlq, notify_dlq)
    verify_handler.set_dependencies(None)
    notify_handler.set_dependencies(None)
    verify_handler.metrics.clear_metrics()
    notify_handler.metrics.clear_metrics()
    parameters.clear_caches()  # type: ignore[no-untyped-call]


def events_on(sqs: Any, queue: str) -> list[dict[str, Any]]:
    """The EventBridge events waiting on a queue, left there (visibility 0)."""
    messages = sqs.receive_message(
        QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=0
    ).get("Messages", [])
    return [json.loads(m["Body"]) for m in messages]


def test_agent_upload_is_verified_then_damage_is_reported_by_email(
    tmp_path: Path, deployment: Deployment, unique_bucket: Callable[[S3Endpoint], str]
) -> None:
    verify, notify = deployment.verify, deployment.notify
    bucket = unique_bucket(deployment.endpoint)
    repo = make_fake_restic_repo(tmp_path / "repo", packs=12, pack_size=(500, 40_000), seed=7)
    config = agent_config_on_bus(tmp_path, deployment.endpoint, bucket)

    # 1. A good mirror: agent → bus → verify queue → verifier → bus → notify queue → SNS.
    first = agent_upload(repo.root, config, GUID)
    [completed] = events_on(verify.sqs, verify.verify_queue)
    assert (completed["source"], completed["detail-type"]) == (
        "backrest-relay.agent",
        "Mirror Completed",
    )
    assert completed["detail"]["run_id"] == first["run_id"]
    assert notify.deliver() is None  # the notify rule does not take the agent's success

    response = verify.deliver()
    assert response is not None and response["batchItemFailures"] == []
    assert verify.deliver() is None  # deleted, as the event source mapping does
    [result] = events_on(notify.sqs, notify.notify_queue)
    assert (result["source"], result["detail-type"]) == (
        "backrest-relay.verifier",
        "Mirror Verified",
    )
    assert result["detail"]["mirror_run_id"] == first["run_id"]
    assert result["detail"]["stats"]["compared"] == result["detail"]["manifest"]["objects"] > 10

    response = notify.deliver()
    assert response is not None and response["batchItemFailures"] == []
    assert notify.deliver() is None
    [email] = notify.emails()
    assert email["Subject"] == "[backrest-relay] home: off-site copy verified"  # SNS: ASCII
    assert email["MessageAttributes"]["severity"]["Value"] == "success"
    assert email["MessageAttributes"]["run_id"]["Value"] == result["detail"]["run_id"]
    assert f"Verified: {result['detail']['stats']['compared']} objects" in email["Message"]
    [chat] = notify.chat.wait_for(1)
    assert chat.json()["type"] == "success"
    [ping] = notify.pings.wait_for(1)
    assert ping.path == f"/{HC_UUID}"

    # 2. One object damaged in the bucket (same size, new ETag); the next backup adds packs.
    s3 = deployment.endpoint.client()
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/data/")["Contents"]
    victim = sorted(o["Key"] for o in listing)[len(listing) // 2]
    data = bytearray(s3.get_object(Bucket=bucket, Key=victim)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=victim, Body=bytes(data))
    add_packs(repo, 3, (500, 40_000), seed=8)

    second = agent_upload(repo.root, config, GUID)
    assert second["run_id"] != first["run_id"]
    response = verify.deliver()
    assert response is not None and response["batchItemFailures"] == []
    assert len(response["delivered"]) == 1  # the second run's `Mirror Completed`
    assert verify.deliver() is None
    [result] = events_on(notify.sqs, notify.notify_queue)
    assert result["detail-type"] == "Mirror Verification Failed"
    assert result["detail"]["mirror_run_id"] == second["run_id"]
    relative = victim[len(PREFIX) + 1 :]
    problems = result["detail"]["problems"]
    assert [(p["key"], p["kind"]) for p in problems] == [(relative, "etag")]

    response = notify.deliver()
    assert response is not None and response["batchItemFailures"] == []
    assert notify.deliver() is None
    [email] = notify.emails()
    assert (
        email["Subject"] == "[backrest-relay] home: off-site copy verification FAILED (1 problem)"
    )
    assert email["MessageAttributes"]["severity"]["Value"] == "failure"
    assert f"etag: {relative}" in email["Message"]
    chat = notify.chat.wait_for(2)[1]
    assert chat.json()["type"] == "failure" and relative in chat.json()["message"]
    ping = notify.pings.wait_for(2)[1]
    assert ping.path == f"/{HC_UUID}/fail"

    # What the run store says, and nothing left behind.
    assert sorted((r.kind, r.status) for r in notify.runs.runs(GUID)) == [
        ("mirror", "completed"),
        ("mirror", "completed"),
        ("verification", "verification-failed"),
        ("verification", "verified"),
    ]
    latest = notify.runs.latest_verified(GUID)
    assert latest is not None and latest.mirror_run_id == first["run_id"]
    for queue in (deployment.verify_dlq, deployment.notify_dlq, notify.inbox):
        assert events_on(verify.sqs, queue) == []

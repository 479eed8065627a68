"""The transformed stack, created in moto's CloudFormation.

moto creates what it models and skips the rest with a `UserWarning` ("Tried to parse
<type> but it's not supported by moto's CloudFormation implementation") plus a log
record on the `moto` logger ("No Moto CloudFormation support for <type>"). Either one for
a type outside `ALLOWED_UNSUPPORTED` fails the test, so a resource silently not created
cannot pass for a working stack.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pytest
from moto import mock_aws

from tests.infra.conftest import ARTIFACT_BUCKET, ARTIFACT_KEY, REGION, Template

# moto has no CloudFormation model for these; what they say is asserted on the transformed
# template instead (tests/infra/test_template.py).
ALLOWED_UNSUPPORTED = {
    "AWS::SQS::QueuePolicy": "EventBridge's permission to send to the queues",
    "AWS::SecretsManager::Secret": "created empty; values are put by hand",
    "AWS::SNS::Subscription": "the optional email subscription",
    "AWS::CloudWatch::Alarm": "DLQ depth and function error alarms",
}
WARNING_RE = re.compile(r"Tried to parse (\S+) but it's not supported")
LOG_RE = re.compile(r"No Moto CloudFormation support for (\S+)")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Unsupported:
    """Collects moto's unsupported-resource reports (warnings and log records)."""

    def __init__(self) -> None:
        self.types: set[str] = set()
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        match = WARNING_RE.search(message) or LOG_RE.search(message)
        if match:
            self.types.add(match.group(1))
            self.messages.append(message)

    def unexpected(self) -> set[str]:
        return self.types - set(ALLOWED_UNSUPPORTED)


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("cloud/__init__.py", "")
    return buffer.getvalue()


def _parameters(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"ParameterKey": k, "ParameterValue": v} for k, v in values.items()]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield


@contextmanager
def watch_unsupported() -> Iterator[Unsupported]:
    """Collect moto's unsupported-resource reports while the block runs, then fail on any
    type outside the allow-list. moto re-parses the template on describe calls (outputs),
    so every CloudFormation call goes through here."""
    unsupported = Unsupported()
    records = _Records()
    moto_logger = logging.getLogger("moto")
    moto_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield unsupported
    finally:
        moto_logger.removeHandler(records)
    for warning in caught:
        if not WARNING_RE.search(str(warning.message)):  # not ours to judge: re-emit
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
        unsupported.add(str(warning.message))
    for message in records.messages:
        unsupported.add(message)
    assert unsupported.unexpected() == set(), unsupported.messages


def create_stack(
    template: Template, parameters: dict[str, str]
) -> tuple[dict[str, str], Unsupported]:
    """Create the stack; returns logical id -> physical id, and what moto skipped."""
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=ARTIFACT_BUCKET)
    s3.put_object(Bucket=ARTIFACT_BUCKET, Key=ARTIFACT_KEY, Body=_zip())
    cfn = boto3.client("cloudformation", region_name=REGION)
    with watch_unsupported() as unsupported:
        cfn.create_stack(
            StackName="backrest-relay",
            TemplateBody=json.dumps(template),
            Parameters=_parameters(parameters),
            Capabilities=["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"],
        )
        stack = cfn.describe_stacks(StackName="backrest-relay")["Stacks"][0]
        summaries = cfn.list_stack_resources(StackName="backrest-relay")["StackResourceSummaries"]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    physical = {s["LogicalResourceId"]: s.get("PhysicalResourceId", "") for s in summaries}
    return physical, unsupported


def outputs() -> dict[str, str]:
    cfn = boto3.client("cloudformation", region_name=REGION)
    with watch_unsupported():
        stack = cfn.describe_stacks(StackName="backrest-relay")["Stacks"][0]
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def test_allow_list_names_only_types_the_template_uses(transformed: Template) -> None:
    types = {r["Type"] for r in transformed["Resources"].values()}
    assert set(ALLOWED_UNSUPPORTED) <= types, "stale entry in ALLOWED_UNSUPPORTED"


@pytest.mark.usefixtures("aws")
def test_guard_fails_on_a_resource_moto_would_skip(transformed: Template) -> None:
    template = copy.deepcopy(transformed)
    template["Resources"]["Hourly"] = {
        "Type": "AWS::Scheduler::Schedule",  # not modelled by moto's CloudFormation
        "Properties": {
            "ScheduleExpression": "rate(1 hour)",
            "FlexibleTimeWindow": {"Mode": "OFF"},
            "Target": {"Arn": "arn:aws:lambda:us-east-1:123456789012:function:x", "RoleArn": "r"},
        },
    }
    with pytest.raises(AssertionError, match=r"AWS::Scheduler::Schedule"):
        create_stack(template, {"DestinationBucket": "offsite"})


@pytest.mark.usefixtures("aws")
def test_stack_creates_with_only_allow_listed_gaps(transformed: Template) -> None:
    physical, unsupported = create_stack(
        transformed, {"DestinationBucket": "offsite", "AlertEmail": "ops@example.com"}
    )
    # The guard must see moto's reports at all (its message text is what we match).
    assert unsupported.types >= {"AWS::CloudWatch::Alarm", "AWS::SNS::Subscription"}

    lam = boto3.client("lambda", region_name=REGION)
    functions = {f["FunctionName"]: f for f in lam.list_functions()["Functions"]}
    names = ("VerifyFunction", "VerifyChunkFunction", "NotifyFunction", "WatchdogFunction")
    assert {physical[n] for n in names} <= set(functions)
    verify = functions[physical["VerifyFunction"]]
    assert verify["Runtime"] == "python3.12"  # (moto drops Architectures: checked on the template)
    assert (verify["MemorySize"], verify["Timeout"]) == (1024, 900)
    env = verify["Environment"]["Variables"]
    assert env["EVENT_BUS_NAME"] == "backrest-relay"
    assert env["RUNS_TABLE"] == physical["RunsTable"]
    assert env["IDEMPOTENCY_TABLE"] == physical["IdempotencyTable"]

    mappings = lam.list_event_source_mappings()["EventSourceMappings"]
    assert len(mappings) == 3
    for mapping in mappings:
        assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    chunk = functions[physical["VerifyChunkFunction"]]
    assert (chunk["MemorySize"], chunk["Timeout"]) == (1024, 900)
    assert env["CHUNK_QUEUE_URL"] == physical["ChunkQueue"]
    assert chunk["Environment"]["Variables"]["RUNS_TABLE"] == physical["RunsTable"]

    sqs = boto3.client("sqs", region_name=REGION)
    for queue, dlq in (
        ("VerifyQueue", "VerifyDeadLetterQueue"),
        ("NotifyQueue", "NotifyDeadLetterQueue"),
        ("ChunkQueue", "ChunkDeadLetterQueue"),
    ):
        attributes = sqs.get_queue_attributes(QueueUrl=physical[queue], AttributeNames=["All"])[
            "Attributes"
        ]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=physical[dlq], AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        assert json.loads(attributes["RedrivePolicy"]) == {
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": 5,
        }

    ddb = boto3.client("dynamodb", region_name=REGION)
    keys = ddb.describe_table(TableName=physical["RunsTable"])["Table"]["KeySchema"]
    assert [(k["AttributeName"], k["KeyType"]) for k in keys] == [("pk", "HASH"), ("sk", "RANGE")]

    iam = boto3.client("iam", region_name=REGION)
    arn = outputs()["AgentPolicyArn"]
    version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
    document: Any = iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"][
        "Document"
    ]
    if isinstance(document, str):
        document = json.loads(document)
    (statement,) = document["Statement"]
    assert statement["Action"] == "events:PutEvents"
    assert statement["Resource"] == outputs()["EventBusArn"]


@pytest.mark.usefixtures("aws")
def test_aws_s3_destination_adds_the_read_policy(transformed: Template) -> None:
    physical, _ = create_stack(
        transformed,
        {
            "DestinationBucket": "offsite",
            "DestinationEndpoint": "",
            "DestinationPrefix": "backups/",
        },
    )
    iam = boto3.client("iam", region_name=REGION)
    role = physical["VerifyRole"]
    names = iam.list_role_policies(RoleName=role)["PolicyNames"]
    assert "read-destination-bucket" in names
    document: Any = iam.get_role_policy(RoleName=role, PolicyName="read-destination-bucket")[
        "PolicyDocument"
    ]
    if isinstance(document, str):
        document = json.loads(document)
    resources = {s["Action"]: s["Resource"] for s in document["Statement"]}
    assert resources == {
        "s3:ListBucket": "arn:aws:s3:::offsite",
        "s3:GetObject": "arn:aws:s3:::offsite/backups/*",
    }


@pytest.mark.usefixtures("aws")
def test_rules_route_each_event_to_its_queue(transformed: Template) -> None:
    physical, _ = create_stack(transformed, {"DestinationBucket": "offsite"})
    lam = boto3.client("lambda", region_name=REGION)
    # moto would invoke the functions (in Docker) on every message: keep them in the queue.
    for mapping in lam.list_event_source_mappings()["EventSourceMappings"]:
        lam.update_event_source_mapping(UUID=mapping["UUID"], Enabled=False)

    events = boto3.client("events", region_name=REGION)
    sent = [
        ("backrest-relay.agent", "Mirror Completed", "completed"),
        ("backrest-relay.agent", "Mirror Failed", "failed"),
        ("backrest-relay.verifier", "Mirror Verified", "verified"),
        ("backrest-relay.verifier", "Mirror Verification Failed", "damaged"),
        ("backrest-relay.watchdog", "Mirror Stale", "stale"),
        # Right detail-type, wrong source: routed nowhere.
        ("backrest-relay.agent", "Mirror Verified", "forged"),
        ("backrest-relay.agent", "Mirror Stale", "forged-stale"),
    ]
    response = events.put_events(
        Entries=[
            {
                "Source": source,
                "DetailType": detail_type,
                "Detail": json.dumps({"run_id": run_id}),
                "EventBusName": outputs()["EventBusName"],
            }
            for source, detail_type, run_id in sent
        ]
    )
    assert response["FailedEntryCount"] == 0

    sqs = boto3.client("sqs", region_name=REGION)

    def drain(queue: str) -> list[str]:
        messages = sqs.receive_message(QueueUrl=physical[queue], MaxNumberOfMessages=10)
        return sorted(
            json.loads(m["Body"])["detail"]["run_id"] for m in messages.get("Messages", [])
        )

    assert drain("VerifyQueue") == ["completed"]
    assert drain("NotifyQueue") == ["damaged", "failed", "stale", "verified"]
    assert drain("VerifyDeadLetterQueue") == drain("NotifyDeadLetterQueue") == []
    assert drain("ChunkQueue") == []  # only the verify function sends there

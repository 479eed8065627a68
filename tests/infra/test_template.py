"""infra/template.yaml: lint-clean, transforms offline into plain CloudFormation, and says
what the design needs (DLQs, partial batch failures, TTL, least privilege)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.infra.conftest import (
    ROOT,
    TEMPLATE,
    NoManagedPolicies,
    Template,
    load_sam_template,
)

# -- helpers --------------------------------------------------------------------------------


def of_type(template: Template, type_: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == type_}


def props(template: Template, logical_id: str) -> dict[str, Any]:
    properties: dict[str, Any] = template["Resources"][logical_id].get("Properties", {})
    return properties


def getatt(value: Any, attribute: str = "Arn") -> str:
    """The logical id in `{"Fn::GetAtt": [id, attribute]}` (fails on anything else)."""
    assert isinstance(value, dict) and "Fn::GetAtt" in value, value
    target, attr = value["Fn::GetAtt"]
    assert attr == attribute, value
    return str(target)


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def policy_documents(template: Template) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every IAM policy document in the stack, with where it is."""
    for logical_id, resource in template["Resources"].items():
        p = resource.get("Properties", {})
        if resource["Type"] == "AWS::IAM::Role":
            for policy in p.get("Policies", []):
                yield f"{logical_id}/{policy['PolicyName']}", policy["PolicyDocument"]
        elif resource["Type"] in {
            "AWS::IAM::ManagedPolicy",
            "AWS::IAM::Policy",
            "AWS::SQS::QueuePolicy",
        }:
            yield logical_id, p["PolicyDocument"]


def statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    return as_list(document["Statement"])


def role_statements(template: Template, role: str) -> list[dict[str, Any]]:
    found = [
        s
        for where, doc in policy_documents(template)
        for s in statements(doc)
        if where.startswith(f"{role}/")
    ]
    # Policies attached to the role from outside (AWS::IAM::Policy with Roles: [role]).
    for policy in of_type(template, "AWS::IAM::Policy").values():
        if {"Ref": role} in policy["Properties"]["Roles"]:
            found += statements(policy["Properties"]["PolicyDocument"])
    return found


def actions_of(statements_: list[dict[str, Any]]) -> set[str]:
    return {a for s in statements_ for a in as_list(s["Action"])}


def resources_for(statements_: list[dict[str, Any]], action: str) -> list[Any]:
    return [
        r for s in statements_ if action in as_list(s["Action"]) for r in as_list(s["Resource"])
    ]


FUNCTIONS = {
    "VerifyFunction": "cloud.handlers.verify.handler",
    "VerifyChunkFunction": "cloud.handlers.verify_chunk.handler",
    "NotifyFunction": "cloud.handlers.notify.handler",
    "WatchdogFunction": "cloud.handlers.watchdog.handler",
}
# The handler contract: environment each function gets (nothing else).
ENVIRONMENT = {
    "VerifyFunction": {
        "RUNS_TABLE", "IDEMPOTENCY_TABLE", "EVENT_BUS_NAME", "DESTINATION_SECRET_ARN",
        "VERIFY_NEW_BYTES_BUDGET", "VERIFY_ROTATION_DAYS", "OBJECT_LOCK_DAYS",
        "VERIFY_QUEUE_URL", "VERIFY_SAFETY_MARGIN_SECONDS",
        "CHUNK_QUEUE_URL", "FANOUT_MIN_OBJECTS", "FANOUT_MIN_READ_BYTES", "FANOUT_CHUNK_BYTES",
        "POWERTOOLS_SERVICE_NAME", "POWERTOOLS_METRICS_NAMESPACE",
    },
    "VerifyChunkFunction": {
        "RUNS_TABLE", "EVENT_BUS_NAME", "DESTINATION_SECRET_ARN", "OBJECT_LOCK_DAYS",
        "POWERTOOLS_SERVICE_NAME", "POWERTOOLS_METRICS_NAMESPACE",
    },
    "NotifyFunction": {
        "RUNS_TABLE", "IDEMPOTENCY_TABLE", "TOPIC_ARN", "NOTIFY_SECRET_ARN", "SUCCESS_POLICY",
        "POWERTOOLS_SERVICE_NAME", "POWERTOOLS_METRICS_NAMESPACE",
    },
    "WatchdogFunction": {
        "RUNS_TABLE", "EVENT_BUS_NAME", "MAX_AGE_HOURS",
        "POWERTOOLS_SERVICE_NAME", "POWERTOOLS_METRICS_NAMESPACE",
    },
}  # fmt: skip
ROLES = {
    "VerifyFunction": "VerifyRole",
    "VerifyChunkFunction": "VerifyChunkRole",
    "NotifyFunction": "NotifyRole",
    "WatchdogFunction": "WatchdogRole",
}
# AWS offers no resource-level permission for these: Resource "*" is the only form.
STAR_RESOURCE_ACTIONS = frozenset({"xray:PutTraceSegments", "xray:PutTelemetryRecords"})


def packaging_python_version() -> str:
    spec = importlib.util.spec_from_file_location(
        "lambda_package", ROOT / "scripts" / "lambda_package.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.PYTHON_VERSION)


# -- lint and transform ---------------------------------------------------------------------


def test_cfn_lint_is_clean_including_informational_checks() -> None:
    from cfnlint.api import ManualArgs, lint_file  # ~10 s to import: only here

    matches = lint_file(TEMPLATE, ManualArgs(include_checks=["I"], regions=["us-east-1"]))
    assert [str(m) for m in matches] == []


def test_sam_transform_gives_plain_cloudformation(
    transformed_with_loader: tuple[Template, NoManagedPolicies],
) -> None:
    transformed, loader = transformed_with_loader
    assert "Transform" not in transformed and "Globals" not in transformed
    types = {r["Type"] for r in transformed["Resources"].values()}
    assert not {t for t in types if t.startswith("AWS::Serverless::")}
    assert set(of_type(transformed, "AWS::Lambda::Function")) == set(FUNCTIONS)
    # Every role is written out: no AWS managed policy (with its Resource "*") sneaks in.
    assert loader.loaded == 0
    for role in of_type(transformed, "AWS::IAM::Role").values():
        assert "ManagedPolicyArns" not in role["Properties"]


# -- queues and event sources ---------------------------------------------------------------


def test_every_work_queue_redrives_to_its_own_dead_letter_queue(transformed: Template) -> None:
    queues = of_type(transformed, "AWS::SQS::Queue")
    dlqs = {k for k in queues if k.endswith("DeadLetterQueue")}
    work = set(queues) - dlqs
    assert work == {"VerifyQueue", "NotifyQueue", "ChunkQueue"}
    targets = []
    for name in sorted(work):
        redrive = props(transformed, name)["RedrivePolicy"]
        target = getatt(redrive["deadLetterTargetArn"])
        assert target == name.replace("Queue", "DeadLetterQueue")
        assert redrive["maxReceiveCount"] == 5
        targets.append(target)
        # A moved message keeps its age: the DLQ must keep it at least as long.
        retention = props(transformed, target)["MessageRetentionPeriod"]
        assert retention >= props(transformed, name)["MessageRetentionPeriod"]
    assert sorted(targets) == sorted(dlqs)
    for dlq in dlqs:
        assert "RedrivePolicy" not in props(transformed, dlq)


def test_sqs_event_sources_report_batch_item_failures(transformed: Template) -> None:
    mappings = of_type(transformed, "AWS::Lambda::EventSourceMapping")
    sources = {}
    for mapping in mappings.values():
        p = mapping["Properties"]
        queue = getatt(p["EventSourceArn"])
        assert transformed["Resources"][queue]["Type"] == "AWS::SQS::Queue"
        assert p["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        sources[queue] = p["FunctionName"]["Ref"]
    assert sources == {
        "VerifyQueue": "VerifyFunction",
        "NotifyQueue": "NotifyFunction",
        "ChunkQueue": "VerifyChunkFunction",
    }


def test_visibility_timeouts_cover_six_function_timeouts(transformed: Template) -> None:
    for mapping in of_type(transformed, "AWS::Lambda::EventSourceMapping").values():
        p = mapping["Properties"]
        queue = props(transformed, getatt(p["EventSourceArn"]))
        function = props(transformed, p["FunctionName"]["Ref"])
        batching_window = p.get("MaximumBatchingWindowInSeconds", 0)
        assert queue["VisibilityTimeout"] >= 6 * function["Timeout"] + batching_window


def test_verify_function_is_sized_for_a_full_verification(transformed: Template) -> None:
    verify = props(transformed, "VerifyFunction")
    assert (verify["MemorySize"], verify["Timeout"]) == (1024, 900)
    mapping = next(
        m["Properties"]
        for m in of_type(transformed, "AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["FunctionName"] == {"Ref": "VerifyFunction"}
    )
    assert mapping["BatchSize"] == 1  # one verification per 900 s invocation


# -- functions ------------------------------------------------------------------------------


def test_functions_runtime_architecture_tracing_and_logs(transformed: Template) -> None:
    runtime = "python" + packaging_python_version()  # the package is built for this runtime
    for name, handler in FUNCTIONS.items():
        p = props(transformed, name)
        assert p["Handler"] == handler
        assert p["Runtime"] == runtime
        assert p["Architectures"] == ["arm64"]
        assert p["TracingConfig"] == {"Mode": "Active"}
        assert getatt(p["Role"]) == ROLES[name]
        log_group = p["LoggingConfig"]["LogGroup"]["Ref"]
        assert "RetentionInDays" in props(transformed, log_group)
        assert p["Code"] == {"S3Bucket": "backrest-relay-artifacts", "S3Key": "lambda.zip"}


def test_function_environment_is_the_handler_contract(transformed: Template) -> None:
    for name, expected in ENVIRONMENT.items():
        variables = props(transformed, name)["Environment"]["Variables"]
        assert set(variables) == expected, name
        assert variables["POWERTOOLS_METRICS_NAMESPACE"] == "BackrestRelay"
        assert variables["RUNS_TABLE"] == {"Ref": "RunsTable"}
    verify = props(transformed, "VerifyFunction")["Environment"]["Variables"]
    assert verify["DESTINATION_SECRET_ARN"] == {"Ref": "DestinationSecret"}
    assert verify["VERIFY_ROTATION_DAYS"] == "30"
    assert verify["VERIFY_NEW_BYTES_BUDGET"] == {"Ref": "VerifyNewBytesBudget"}
    assert verify["VERIFY_QUEUE_URL"] == {"Ref": "VerifyQueue"}
    notify = props(transformed, "NotifyFunction")["Environment"]["Variables"]
    assert notify["NOTIFY_SECRET_ARN"] == {"Ref": "NotifySecret"}
    assert notify["TOPIC_ARN"] == {"Ref": "AlertTopic"}
    watchdog = props(transformed, "WatchdogFunction")["Environment"]["Variables"]
    assert watchdog["MAX_AGE_HOURS"] == {"Ref": "MaxAgeHours"}


def test_events_are_routed_by_source_and_detail_type(transformed: Template) -> None:
    completed = props(transformed, "MirrorCompletedRule")
    assert completed["EventPattern"] == {
        "source": ["backrest-relay.agent"],
        "detail-type": ["Mirror Completed"],
    }
    assert [getatt(t["Arn"]) for t in completed["Targets"]] == ["VerifyQueue"]
    notify = props(transformed, "NotifyRule")
    routed = {
        (source, detail_type)
        for branch in notify["EventPattern"]["$or"]
        for source in branch["source"]
        for detail_type in branch["detail-type"]
    }
    assert routed == {
        ("backrest-relay.verifier", "Mirror Verified"),
        ("backrest-relay.verifier", "Mirror Verification Failed"),
        ("backrest-relay.agent", "Mirror Failed"),
        ("backrest-relay.watchdog", "Mirror Stale"),
    }
    assert [getatt(t["Arn"]) for t in notify["Targets"]] == ["NotifyQueue"]
    for rule in (completed, notify):
        assert rule["EventBusName"] == {"Fn::GetAtt": ["EventBus", "Name"]}
    schedule = props(transformed, "WatchdogFunctionHourly")
    assert schedule["ScheduleExpression"] == "rate(1 hour)"
    assert getatt(schedule["Targets"][0]["Arn"]) == "WatchdogFunction"


def test_queue_policies_let_only_their_rule_send(transformed: Template) -> None:
    expected = {"VerifyQueuesPolicy": "MirrorCompletedRule", "NotifyQueuesPolicy": "NotifyRule"}
    for name, rule in expected.items():
        (statement,) = statements(props(transformed, name)["PolicyDocument"])
        assert statement["Principal"] == {"Service": "events.amazonaws.com"}
        assert statement["Action"] == "sqs:SendMessage"
        assert getatt(statement["Condition"]["ArnEquals"]["aws:SourceArn"]) == rule


def test_only_the_verify_function_sends_to_the_chunk_queue(transformed: Template) -> None:
    senders = {
        where.split("/")[0]
        for where, document in policy_documents(transformed)
        for statement in statements(document)
        if {"sqs:SendMessage", "sqs:SendMessageBatch"} & set(as_list(statement["Action"]))
        and "Principal" not in statement
    }
    assert senders == {"VerifyRole"}
    found = role_statements(transformed, "VerifyRole")
    sent_to = resources_for(found, "sqs:SendMessage")
    assert {"Fn::GetAtt": ["ChunkQueue", "Arn"]} in sent_to
    # and its own queue, for the continuation of a verification (nothing else)
    assert all(
        r in ({"Fn::GetAtt": ["ChunkQueue", "Arn"]}, {"Fn::GetAtt": ["VerifyQueue", "Arn"]})
        for r in sent_to
    )


def test_fan_out_is_bounded_by_template_parameters(
    transformed: Template, sam_template: Template
) -> None:
    mapping = next(
        m["Properties"]
        for m in of_type(transformed, "AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["FunctionName"] == {"Ref": "VerifyChunkFunction"}
    )
    assert mapping["BatchSize"] == 1  # one chunk per 900 s invocation
    assert mapping["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "FanoutConcurrency"}}
    parameters = sam_template["Parameters"]
    # Lambda's SQS MaximumConcurrency accepts 2..1000.
    concurrency = parameters["FanoutConcurrency"]
    assert (concurrency["Default"], concurrency["MinValue"], concurrency["MaxValue"]) == (
        4,
        2,
        1000,
    )
    chunk = props(transformed, "VerifyChunkFunction")
    assert (chunk["MemorySize"], chunk["Timeout"]) == (1024, 900)
    verify = props(transformed, "VerifyFunction")["Environment"]["Variables"]
    assert verify["CHUNK_QUEUE_URL"] == {"Ref": "ChunkQueue"}
    for variable, parameter in (
        ("FANOUT_MIN_OBJECTS", "FanoutMinObjects"),
        ("FANOUT_MIN_READ_BYTES", "FanoutMinReadBytes"),
        ("FANOUT_CHUNK_BYTES", "FanoutChunkBytes"),
    ):
        assert verify[variable] == {"Ref": parameter}
    # The defaults are the code's own (one source of truth for the numbers in the docs).
    from cloud.logic.chunks import FanoutSettings

    defaults = FanoutSettings()
    assert parameters["FanoutMinObjects"]["Default"] == defaults.min_objects
    assert parameters["FanoutMinReadBytes"]["Default"] == defaults.min_read_bytes
    assert parameters["FanoutChunkBytes"]["Default"] == defaults.chunk_bytes


# -- tables ---------------------------------------------------------------------------------


def test_tables_are_on_demand_with_ttl(transformed: Template) -> None:
    runs = props(transformed, "RunsTable")
    assert runs["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert runs["TimeToLiveSpecification"] == {"AttributeName": "ttl", "Enabled": True}
    idem = props(transformed, "IdempotencyTable")
    assert idem["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert idem["TimeToLiveSpecification"] == {"AttributeName": "expiration", "Enabled": True}
    for table in (runs, idem):
        assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert transformed["Resources"]["RunsTable"]["DeletionPolicy"] == "Retain"


# -- IAM ------------------------------------------------------------------------------------


def test_no_statement_allows_every_action_or_every_resource(transformed: Template) -> None:
    documents = list(policy_documents(transformed))
    assert len(documents) >= 7
    for where, document in documents:
        for statement in statements(document):
            assert statement["Effect"] == "Allow", where
            assert "NotAction" not in statement and "NotResource" not in statement, where
            for action in as_list(statement["Action"]):
                assert action != "*" and not action.endswith(":*"), (where, action)
                assert "*" not in action, (where, action)
            if "*" in as_list(statement.get("Resource")):
                assert set(as_list(statement["Action"])) <= STAR_RESOURCE_ACTIONS, where


def test_agent_policy_allows_exactly_put_events_on_the_bus(transformed: Template) -> None:
    (policy,) = of_type(transformed, "AWS::IAM::ManagedPolicy").values()
    (statement,) = statements(policy["Properties"]["PolicyDocument"])
    assert statement["Effect"] == "Allow"
    assert as_list(statement["Action"]) == ["events:PutEvents"]
    assert as_list(statement["Resource"]) == [{"Fn::GetAtt": ["EventBus", "Arn"]}]
    # ... and only as the agent: it cannot forge a verification result or a stale alert.
    assert statement["Condition"] == {
        "StringEquals": {
            "events:source": "backrest-relay.agent",
            "events:detail-type": ["Mirror Completed", "Mirror Failed"],
        }
    }
    assert transformed["Outputs"]["AgentPolicyArn"]["Value"] == {"Ref": "AgentPublishPolicy"}


# Properties that give a resource a physical name, unique per account and region.
PHYSICAL_NAMES = frozenset(
    {"Name", "LogGroupName", "TableName", "QueueName", "TopicName", "RoleName", "AlarmName",
     "ManagedPolicyName", "BucketName", "StateMachineName", "ScheduleName"}
)  # fmt: skip


def test_two_stacks_coexist_in_one_account(transformed: Template) -> None:
    """One stack per backup host is how hosts get separate identities (docs/verification.md,
    "Giving each backup host its own identity"): every physical name must come from the
    stack's name or its EventBusName, never be a literal two stacks would both claim."""
    named = 0
    for logical_id, resource in transformed["Resources"].items():
        properties = resource.get("Properties", {})
        keys = PHYSICAL_NAMES | (
            {"FunctionName"} if resource["Type"] == "AWS::Lambda::Function" else set()
        )
        for key in keys & set(properties):
            value = properties[key]
            text = json.dumps(value)
            assert not isinstance(value, str), (logical_id, key, value)
            assert "AWS::StackName" in text or text == '{"Ref": "EventBusName"}', (
                logical_id,
                key,
                value,
            )
            named += 1
    assert named >= 6  # the bus, two secrets, three log groups


def test_each_function_role_holds_only_what_its_function_uses(transformed: Template) -> None:
    common = {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "xray:PutTraceSegments",
        "xray:PutTelemetryRecords",
    }
    consume = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"}
    idempotency = {
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
    }
    runs = {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Query"}
    s3_read = {"s3:ListBucket", "s3:GetObject"}  # only with an AWS S3 destination
    continue_ = {"sqs:SendMessage"}  # the verifier's continuation messages
    verify = {"events:PutEvents", "secretsmanager:GetSecretValue", *s3_read, *continue_}
    notify = {"sns:Publish", "secretsmanager:GetSecretValue"}
    expected = {
        "VerifyRole": common | consume | idempotency | runs | verify,
        "VerifyChunkRole": common | consume | runs | (verify - continue_),
        "NotifyRole": common | consume | idempotency | runs | notify,
        "WatchdogRole": common | runs | {"dynamodb:Scan", "events:PutEvents"},
    }
    sources = {
        "VerifyRole": "backrest-relay.verifier",
        "VerifyChunkRole": "backrest-relay.verifier",
        "WatchdogRole": "backrest-relay.watchdog",
    }
    secrets = {
        "VerifyRole": "DestinationSecret",
        "VerifyChunkRole": "DestinationSecret",
        "NotifyRole": "NotifySecret",
    }
    log_groups = {
        "VerifyRole": "VerifyLogGroup",
        "VerifyChunkRole": "VerifyChunkLogGroup",
        "NotifyRole": "NotifyLogGroup",
        "WatchdogRole": "WatchdogLogGroup",
    }
    for role, actions in expected.items():
        found = role_statements(transformed, role)
        assert actions_of(found) == actions, role
        for statement in found:
            if "events:PutEvents" in as_list(statement["Action"]):
                assert statement["Resource"] == {"Fn::GetAtt": ["EventBus", "Arn"]}
                assert statement["Condition"] == {"StringEquals": {"events:source": sources[role]}}
        if role in secrets:
            assert resources_for(found, "secretsmanager:GetSecretValue") == [{"Ref": secrets[role]}]
        (log_arn,) = resources_for(found, "logs:PutLogEvents")
        assert "${" + log_groups[role] + "}:*" in log_arn["Fn::Sub"]
        for action in ("dynamodb:Query", "dynamodb:Scan"):
            for resource in resources_for(found, action):
                assert resource == {"Fn::GetAtt": ["RunsTable", "Arn"]}
        for resource in resources_for(found, "dynamodb:DeleteItem"):
            assert resource == {"Fn::GetAtt": ["IdempotencyTable", "Arn"]}
        for resource in resources_for(found, "sqs:SendMessage"):
            assert resource in (
                {"Fn::GetAtt": ["VerifyQueue", "Arn"]},
                {"Fn::GetAtt": ["ChunkQueue", "Arn"]},
            )
    s3_policy = transformed["Resources"]["VerifyAwsS3ReadPolicy"]
    assert s3_policy["Condition"] == "DestinationIsAwsS3"
    assert s3_policy["Properties"]["Roles"] == [{"Ref": "VerifyRole"}, {"Ref": "VerifyChunkRole"}]


def test_secrets_never_hold_a_value_from_the_template(sam_template: Template) -> None:
    resources = sam_template["Resources"]
    destination = resources["DestinationSecret"]["Properties"]
    assert "SecretString" not in destination and "GenerateSecretString" not in destination
    # "{}" = SNS email only; must never change (it would overwrite the URLs put since).
    assert resources["NotifySecret"]["Properties"]["SecretString"] == "{}"
    for name, parameter in sam_template["Parameters"].items():
        assert not any(word in name.lower() for word in ("key", "secret", "password", "url"))
        assert "NoEcho" not in parameter, name


# -- alerts ---------------------------------------------------------------------------------


def test_alarms_watch_every_dlq_and_function_and_page_the_topic(transformed: Template) -> None:
    alarms = of_type(transformed, "AWS::CloudWatch::Alarm").values()
    watched = set()
    for alarm in alarms:
        p = alarm["Properties"]
        assert p["AlarmActions"] == [{"Ref": "AlertTopic"}]
        assert (p["ComparisonOperator"], p["Threshold"]) == ("GreaterThanThreshold", 0)
        assert p["TreatMissingData"] == "notBreaching"
        (dimension,) = p["Dimensions"]
        if p["Namespace"] == "AWS/SQS":
            assert p["MetricName"] == "ApproximateNumberOfMessagesVisible"
            watched.add(getatt(dimension["Value"], "QueueName"))
        else:
            assert (p["Namespace"], p["MetricName"]) == ("AWS/Lambda", "Errors")
            watched.add(dimension["Value"]["Ref"])
    assert watched == {
        "VerifyDeadLetterQueue",
        "NotifyDeadLetterQueue",
        "ChunkDeadLetterQueue",
        *FUNCTIONS,
    }


def test_email_subscription_only_with_an_address(transformed: Template) -> None:
    subscription = transformed["Resources"]["AlertEmailSubscription"]
    assert subscription["Condition"] == "HasAlertEmail"
    assert subscription["Properties"]["Protocol"] == "email"
    assert transformed["Conditions"]["HasAlertEmail"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "AlertEmail"}, ""]}]
    }


def test_parameters_the_issue_asks_for(sam_template: Template) -> None:
    parameters = sam_template["Parameters"]
    for name in (
        "DestinationEndpoint",
        "DestinationBucket",
        "DestinationPrefix",
        "AlertEmail",
        "MaxAgeHours",
    ):
        assert name in parameters
    assert parameters["MaxAgeHours"]["Default"] == 26
    assert parameters["AlertEmail"]["Default"] == ""


# -- handlers -------------------------------------------------------------------------------


def _handler_params() -> list[Any]:
    sam = load_sam_template()
    return [
        pytest.param(resource["Properties"]["Handler"], id=name)
        for name, resource in sorted(sam["Resources"].items())
        if resource["Type"] == "AWS::Serverless::Function"
    ]


@pytest.mark.parametrize("handler", _handler_params())
def test_every_handler_path_imports(handler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Import only: no AWS call may happen at import time (cold-start configuration errors
    # must surface per invocation, and the tests have no AWS).
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    module_name, _, attribute = handler.rpartition(".")
    module = importlib.import_module(module_name)
    # Lambda calls handler(event, context): the signature must take exactly that.
    inspect.signature(getattr(module, attribute)).bind({}, object())

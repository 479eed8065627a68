"""Shared fixtures of the infrastructure tests: the SAM template as written and as the
SAM transform turns it into plain CloudFormation (offline, with aws-sam-translator)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from samtranslator.translator.managed_policy_translator import ManagedPolicyLoader
from samtranslator.translator.transform import transform

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "template.yaml"
REGION = "us-east-1"
ARTIFACT_BUCKET = "backrest-relay-artifacts"
ARTIFACT_KEY = "lambda.zip"

Template = dict[str, Any]


class NoManagedPolicies(ManagedPolicyLoader):
    """The translator asks IAM for AWS managed policy names only when a function lists
    one by name in `Policies`; the template lists none (every role is written out), so
    this stub needs no AWS account and records whether it was asked."""

    def __init__(self) -> None:
        self.loaded = 0

    def load(self) -> dict[str, str]:
        self.loaded += 1
        return {}


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form intrinsics (`!Ref x` -> {"Ref": "x"}).

    Own loader instead of cfn-lint's decoder: importing cfn-lint costs ~10 s (sympy), which
    only the lint test should pay.
    """


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = suffix if suffix == "Ref" else f"Fn::{suffix}"
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def load_sam_template() -> Template:
    """The template as plain JSON-able data (YAML short-form intrinsics expanded)."""
    data: Template = yaml.load(TEMPLATE.read_text(encoding="utf-8"), Loader=_CfnLoader)  # noqa: S506
    return data


def packaged(sam: Template) -> Template:
    """What `sam package`/`sam deploy` hands CloudFormation: local CodeUri -> S3."""
    sam = copy.deepcopy(sam)
    sam["Globals"]["Function"]["CodeUri"] = f"s3://{ARTIFACT_BUCKET}/{ARTIFACT_KEY}"
    return sam


def sam_transform(sam: Template) -> tuple[Template, NoManagedPolicies]:
    loader = NoManagedPolicies()
    with pytest.MonkeyPatch.context() as mp:
        # The translator resolves AWS::Region/AWS::Partition from a boto3 session.
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.delenv("AWS_REGION", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        result = transform(packaged(sam), {}, loader)
    return json.loads(json.dumps(result)), loader


@pytest.fixture(scope="session")
def sam_template() -> Template:
    return load_sam_template()


@pytest.fixture(scope="session")
def transformed_with_loader(sam_template: Template) -> tuple[Template, NoManagedPolicies]:
    return sam_transform(sam_template)


@pytest.fixture(scope="session")
def transformed(transformed_with_loader: tuple[Template, NoManagedPolicies]) -> Template:
    return transformed_with_loader[0]

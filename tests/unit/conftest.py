"""Fixtures the unit tests share: a moto account, the idempotency table, a module's moto
DynamoDB, a canned HTTP server."""

from tests.support.canned_http import serve
from tests.support.lambdas import aws, dynamo_client, idempotency_client

__all__ = ["aws", "dynamo_client", "idempotency_client", "serve"]

"""Fixtures the handler tests share (a moto account, the idempotency table)."""

from tests.support.lambdas import aws, idempotency_client

__all__ = ["aws", "idempotency_client"]

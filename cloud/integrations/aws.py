"""botocore settings shared by the AWS service clients (SNS, EventBridge); S3 has its own
factory (`cloud.integrations.s3`) because of the providers' quirks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from botocore.config import Config


def service_config(*, max_attempts: int, read_timeout: float) -> Config:
    """Standard retries, short connect timeout, our user agent."""
    from botocore.config import Config  # imported late: a function that never sends pays nothing

    return Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=5,
        read_timeout=read_timeout,
        user_agent_extra="backrest-relay",
    )

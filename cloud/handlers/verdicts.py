"""What the two verifier functions (`verify`, `verify_chunk`) share: the verification
settings they read from the environment, and how a verdict is logged and counted, so a
fanned-out verification reports like a whole one."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

from cloud.contracts.events import MirrorVerified
from cloud.handlers.common import env_int
from cloud.logic.verification import VerificationResult
from cloud.logic.verify import VerifyOptions


def verify_options_from_env(**settings: Any) -> VerifyOptions:
    """Concurrency and the Object Lock check from the environment, plus `settings`."""
    return VerifyOptions(
        concurrency=env_int("VERIFY_CONCURRENCY", 8, minimum=1) or 8,
        lock_days=env_int("OBJECT_LOCK_DAYS", None, minimum=1),
        lock_min_days=env_int("OBJECT_LOCK_MIN_DAYS", 1, minimum=0) or 0,
        **settings,
    )


def log_verdict(logger: Logger, result: VerificationResult, **extra: Any) -> None:
    """One line per verdict, a warning when the mirror failed (the first ten problems)."""
    log = logger.info if isinstance(result, MirrorVerified) else logger.warning
    log(
        result.DETAIL_TYPE.value,
        verification_run_id=result.run_id,
        stats=result.stats.model_dump(mode="json"),
        problems_total=result.problems_total,
        problems=[p.model_dump(mode="json") for p in result.problems[:10]],
        report_key=result.report_key,
        **extra,
    )


def count_verdict(metrics: Metrics, result: VerificationResult) -> None:
    """`VerificationFailures`: 0 for a verified mirror, 1 for a failed one (alarms sum it)."""
    metrics.add_metric(
        name="VerificationFailures",
        unit=MetricUnit.Count,
        value=0 if isinstance(result, MirrorVerified) else 1,
    )

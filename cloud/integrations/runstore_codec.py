"""Rules every run store shares, so the fake, SQLite and DynamoDB cannot drift apart.

The contract tests run one suite against all three stores; keeping validation, the text form
of datetimes and of `detail`, and the meaning of "verified" here is what makes a record that
passes through one store compare equal to the same record passed through another.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast, get_args

from cloud.logic.ports import RunKind, RunRecord, RunStatus

RUN_KINDS: frozenset[str] = frozenset(get_args(RunKind))
RUN_STATUSES: frozenset[str] = frozenset(get_args(RunStatus))


def is_verification(run: RunRecord) -> bool:
    """Only verification runs advance the counter behind the rotating deep-check slice."""
    return run.kind == "verification"


def is_verified(run: RunRecord) -> bool:
    """Only a passed verification proves the off-site copy; the watchdog keys on these."""
    return run.kind == "verification" and run.status == "verified"


def as_utc(value: datetime, what: str = "datetime") -> datetime:
    """Naive datetimes are refused: a guessed zone would shift the watchdog's clock by hours."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def dt_to_text(value: datetime, what: str = "datetime") -> str:
    """Fixed-width UTC ISO-8601, so the text sorts like the instant it names."""
    return as_utc(value, what).isoformat(timespec="microseconds")


def dt_from_text(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:  # written by hand or by an older tool: the store means UTC
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def detail_to_json(detail: dict[str, Any]) -> str:
    """Strict JSON (no NaN) because Lambda, EventBridge and other parsers read it back."""
    return json.dumps(detail, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def detail_from_json(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("stored run detail is not a JSON object")
    return cast(dict[str, Any], value)


def parse_kind(value: str) -> RunKind:
    if value not in RUN_KINDS:
        raise ValueError(f"unknown run kind {value!r}")
    return cast(RunKind, value)


def parse_status(value: str) -> RunStatus:
    if value not in RUN_STATUSES:
        raise ValueError(f"unknown run status {value!r}")
    return cast(RunStatus, value)


def normalize(run: RunRecord) -> RunRecord:
    """The run as every store hands it back: validated, UTC datetimes, detail a JSON copy.

    Validating on the way in keeps a bad record from being stored by one backend and
    rejected by another; the JSON copy detaches the stored detail from the caller's dict.
    """
    if not run.repo_key:
        raise ValueError("run has no repo_key")
    if not run.run_id:
        raise ValueError("run has no run_id")
    parse_kind(run.kind)
    parse_status(run.status)
    return replace(
        run,
        started_at=as_utc(run.started_at, "started_at"),
        finished_at=as_utc(run.finished_at, "finished_at"),
        detail=detail_from_json(detail_to_json(run.detail)),
    )

"""Object Lock as the agent applies it: the mode and retain-until date every object it
writes carries, and when a kept object's retention is extended.

The lock is what makes the off-site copy survive the backup host: a key that can write
can also hide or overwrite objects, but it cannot remove a locked *version* before its
retain-until date, so `recover` can always bring the last verified state back
(docs/security.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

DAY = 86400.0
LockMode = Literal["governance", "compliance"]


def iso_z(moment: datetime) -> str:
    """`2026-12-06T20:00:00Z`: whole seconds, the form S3 (and moto) parse for lock dates."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ObjectLockPolicy:
    """`[destination] object_lock`: written objects are retained `days`; kept objects are
    extended once less than `renew_days` remain; the verifier wants `min_days` left."""

    mode: LockMode
    days: int
    renew_days: int
    min_days: int

    @property
    def s3_mode(self) -> str:
        return self.mode.upper()

    def lock_at(self, now: float) -> ObjectLock:
        """The lock for objects written by a run that started at `now` (epoch seconds)."""
        until = datetime.fromtimestamp(now, UTC).replace(microsecond=0) + timedelta(days=self.days)
        return ObjectLock(self.s3_mode, until)

    def renew_before(self, now: float) -> float:
        """Objects retained until before this moment (epoch) are due for extension."""
        return now + self.renew_days * DAY


@dataclass(frozen=True)
class ObjectLock:
    """One retention: `mode` as S3 spells it (GOVERNANCE/COMPLIANCE) and until when."""

    mode: str
    until: datetime

    @property
    def until_epoch(self) -> float:
        return self.until.timestamp()

    def headers(self) -> dict[str, str]:
        """For the agent's own signed PUT (and anything else sending raw headers)."""
        return {
            "x-amz-object-lock-mode": self.mode,
            "x-amz-object-lock-retain-until-date": iso_z(self.until),
        }

    def params(self) -> dict[str, Any]:
        """For boto3's PutObject, CreateMultipartUpload and CopyObject."""
        return {"ObjectLockMode": self.mode, "ObjectLockRetainUntilDate": self.until}

"""The one delivery engine, for the notifier Lambda and local mode alike: send one
notification to every channel; one failing channel never stops the others, and the report
says which failed and why (in words safe to log)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from cloud.logic.ports import ChannelError, Notification, NotificationChannel

# One logger for every channel (operators filter on it).
log = logging.getLogger("cloud.integrations.channels")


def target_key(kind: str, target: str) -> str:
    """A stable id for (kind, target) that reveals nothing about the target (for idempotency
    records and de-duplication): 16 hex digits of SHA-256."""
    return hashlib.sha256(f"{kind}\0{target}".encode()).hexdigest()[:16]


def channel_key(channel: NotificationChannel) -> str:
    """A stable, secret-free id of a channel (for per-(run, channel) idempotency)."""
    key = getattr(channel, "key", None)
    return key if isinstance(key, str) and key else target_key("name", channel.name)


def safe_name(channel: NotificationChannel) -> str:
    try:
        return str(channel.name)
    except Exception:
        return type(channel).__name__


class DeliveryLog(Protocol):
    """What `deliver` needs of a logger (stdlib `logging.Logger` and powertools `Logger`)."""

    def info(self, msg: str, *args: object) -> None: ...

    def warning(self, msg: str, *args: object) -> None: ...


@dataclass(frozen=True)
class ChannelOutcome:
    """How one channel fared. `error` (without the name) is safe to log and store."""

    name: str
    ok: bool
    error: str | None = None
    key: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class DeliveryReport:
    outcomes: tuple[ChannelOutcome, ...]

    @property
    def sent(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if not o.ok)

    @property
    def ok(self) -> bool:
        """Every channel delivered (vacuously true with no channels)."""
        return self.failed == 0

    @property
    def failures(self) -> tuple[ChannelOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "channels": [
                {"name": o.name, "ok": o.ok, "error": o.error, "seconds": round(o.seconds, 3)}
                for o in self.outcomes
            ],
        }


def deliver(
    notification: Notification,
    channels: Iterable[NotificationChannel],
    logger: DeliveryLog | None = None,
) -> DeliveryReport:
    """Send `notification` to every channel, in order; a failure (a `ChannelError`, or any
    other exception from a buggy channel) is logged with the channel's safe name and
    recorded, and the next channel is still tried."""
    logger = logger or log
    outcomes: list[ChannelOutcome] = []
    for channel in channels:
        started = time.monotonic()
        name = safe_name(channel)
        error: str | None
        try:
            channel.send(notification)
            error = None
        except ChannelError as exc:
            error = str(exc).removeprefix(f"{name}: ") or type(exc).__name__
        except Exception as exc:  # a channel's bug must not silence the others
            # Its message may quote a URL: only the class is reported.
            error = f"unexpected {type(exc).__name__}"
        seconds = time.monotonic() - started
        if error is None:
            logger.info(
                "%s notification for %s delivered via %s",
                notification.severity,
                notification.repo_id or notification.repo_key,
                name,
            )
        else:
            logger.warning(
                "%s notification for %s not delivered via %s: %s",
                notification.severity,
                notification.repo_id or notification.repo_key,
                name,
                error,
            )
        outcomes.append(ChannelOutcome(name, error is None, error, channel_key(channel), seconds))
    return DeliveryReport(tuple(outcomes))

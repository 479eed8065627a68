"""Publishing result events to EventBridge from the cloud functions.

PutEvents is not all-or-nothing: the call can succeed while some entries are refused
(`FailedEntryCount` > 0, an `ErrorCode` on each refused entry). Those entries are sent
again a few times with backoff; whatever is still refused raises `EventPublishError`, so
the caller's SQS record fails and is retried rather than the result being silently lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from cloud.contracts.events import EventDetail, put_events_entry
from cloud.integrations.aws import service_config

if TYPE_CHECKING:
    from types_boto3_events import EventBridgeClient
    from types_boto3_events.type_defs import PutEventsRequestEntryTypeDef

MAX_ENTRIES_PER_CALL = 10  # the PutEvents limit


class EventPublishError(Exception):
    """The events could not all be delivered to the bus."""


class EventBus(Protocol):
    def publish(self, *events: EventDetail) -> None:
        """Deliver every event, or raise EventPublishError."""
        ...


class EventBridgeBus:
    """PutEvents on one bus; the client follows the standard AWS configuration."""

    def __init__(
        self,
        bus_name: str,
        client: EventBridgeClient | None = None,
        *,
        attempts: int = 4,
        backoff: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
        region: str | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.bus_name = bus_name
        self.region = region or None
        self.endpoint_url = endpoint_url or None
        self.attempts = max(attempts, 1)
        self.backoff = backoff
        self._sleep = sleep
        self._client = client
        self._lock = threading.Lock()

    def client(self) -> EventBridgeClient:
        with self._lock:
            if self._client is None:
                import boto3

                session = boto3.session.Session(region_name=self.region)
                self._client = session.client(
                    "events",
                    endpoint_url=self.endpoint_url,
                    config=service_config(max_attempts=5, read_timeout=15),
                )
            return self._client

    def publish(self, *events: EventDetail) -> None:
        entries = [self._entry(event) for event in events]
        for start in range(0, len(entries), MAX_ENTRIES_PER_CALL):
            self._put(entries[start : start + MAX_ENTRIES_PER_CALL])

    def _entry(self, event: EventDetail) -> PutEventsRequestEntryTypeDef:
        entry: Any = put_events_entry(event, self.bus_name)
        return entry  # type: ignore[no-any-return]

    def _put(self, entries: list[PutEventsRequestEntryTypeDef]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        pending = entries
        errors: list[str] = []
        for attempt in range(self.attempts):
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.client().put_events(Entries=pending)
            except ClientError as exc:
                err = exc.response.get("Error", {})
                raise EventPublishError(
                    f"EventBridge PutEvents on {self.bus_name!r} failed: "
                    f"{err.get('Code')}: {err.get('Message', '')}"
                ) from exc
            except BotoCoreError as exc:
                from botocore.exceptions import NoRegionError

                if isinstance(exc, NoRegionError):
                    raise EventPublishError(
                        "EventBridge: no AWS region; set events.region or AWS_REGION"
                    ) from exc
                raise EventPublishError(f"EventBridge unreachable: {exc}") from exc
            if not response.get("FailedEntryCount", 0):
                return
            # Results are positional: entry i of the response answers entry i of the request.
            results = response.get("Entries", [])
            refused = [
                (entry, result)
                for entry, result in zip(pending, results, strict=False)
                if result.get("ErrorCode")
            ]
            if len(results) != len(pending):  # cannot tell which: send them all again
                refused = [(entry, {}) for entry in pending]
            pending = [entry for entry, _ in refused]
            errors = sorted(
                {f"{r.get('ErrorCode', '?')}: {r.get('ErrorMessage', '')}" for _, r in refused}
            )
            if not pending:
                return
        raise EventPublishError(
            f"EventBridge refused {len(pending)} event(s) on {self.bus_name!r} after "
            f"{self.attempts} attempts: {'; '.join(errors)}"
        )

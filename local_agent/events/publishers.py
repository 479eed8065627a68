"""Where completion and failure events go (`events.publisher`).

- `eventbridge`: PutEvents on `events.event_bus`, with the standard AWS configuration
  (credential chain, region, `AWS_ENDPOINT_URL_EVENTBRIDGE`) unless `events.region` /
  `events.endpoint_url` say otherwise. These are AWS credentials, never the bucket's.
- `local`: hands the event to the in-process pipeline on this host (verification and
  the run store; `local_agent.events.pipeline`, which also picks the publisher).
- `none`: drops it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cloud.contracts.events import EventDetail

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class PublishError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Publisher(Protocol):
    name: str

    def publish(self, event: EventDetail) -> None:
        """Deliver the event or raise PublishError (the outbox keeps it)."""


class NullPublisher:
    name = "none"

    def publish(self, event: EventDetail) -> None:
        return None


class EventBridgePublisher:
    """The cloud side's EventBridge bus (`cloud.integrations.eventbus`), as a publisher."""

    name = "eventbridge"

    def __init__(self, event_bus: str, *, region: str = "", endpoint_url: str = "") -> None:
        from cloud.integrations.eventbus import EventBridgeBus

        self.bus = EventBridgeBus(event_bus, region=region, endpoint_url=endpoint_url)

    def publish(self, event: EventDetail) -> None:
        from cloud.integrations.eventbus import EventPublishError

        try:
            self.bus.publish(event)
        except EventPublishError as exc:
            raise PublishError(str(exc)) from None


class LocalPublisher:
    """Runs the in-process pipeline (local mode) on each event."""

    name = "local"

    def __init__(self, pipeline: Callable[[EventDetail], None]) -> None:
        self.pipeline = pipeline

    def publish(self, event: EventDetail) -> None:
        self.pipeline(event)


class EventLog:
    """The local pipeline until verification runs in-process: an append-only JSON Lines
    record of every event under the state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, event: EventDetail) -> None:
        line = {
            "source": event.SOURCE.value,
            "detail_type": event.DETAIL_TYPE.value,
            "detail": json.loads(event.model_dump_json()),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(line, sort_keys=True) + "\n")
        except OSError as exc:
            raise PublishError(f"local event log {self.path}: {exc.strerror}") from None

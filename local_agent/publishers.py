"""Where completion and failure events go (`events.publisher`).

- `eventbridge`: PutEvents on `events.event_bus`, with the standard AWS configuration
  (credential chain, region, `AWS_ENDPOINT_URL_EVENTBRIDGE`) unless `events.region` /
  `events.endpoint_url` say otherwise. These are AWS credentials, never the bucket's.
- `local`: hands the event to the in-process pipeline on this host (verification and
  the run store; see `local_agent.pipeline`).
- `none`: drops it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cloud.contracts.events import EventDetail, put_events_entry

if TYPE_CHECKING:
    from types_boto3_events import EventBridgeClient

    from local_agent.config import RelayConfig

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
    name = "eventbridge"

    def __init__(self, event_bus: str, *, region: str = "", endpoint_url: str = "") -> None:
        self.event_bus = event_bus
        self.region = region
        self.endpoint_url = endpoint_url
        self._client: EventBridgeClient | None = None
        self._lock = threading.Lock()

    def _events(self) -> EventBridgeClient:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                session = boto3.session.Session(region_name=self.region or None)
                self._client = session.client(
                    "events",
                    endpoint_url=self.endpoint_url or None,
                    config=Config(
                        retries={"mode": "standard", "total_max_attempts": 3},
                        connect_timeout=5,
                        read_timeout=15,
                        user_agent_extra="backrest-relay",
                    ),
                )
            return self._client

    def publish(self, event: EventDetail) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoRegionError

        try:
            response = self._events().put_events(
                Entries=[put_events_entry(event, self.event_bus)]  # type: ignore[list-item]
            )
        except NoRegionError:
            raise PublishError(
                "EventBridge: no AWS region; set events.region or AWS_REGION"
            ) from None
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise PublishError(
                f"EventBridge PutEvents failed: {err.get('Code')}: {err.get('Message', '')}"
            ) from None
        except BotoCoreError as exc:
            raise PublishError(f"EventBridge unreachable: {exc}") from None
        if response.get("FailedEntryCount", 0):
            entry: dict[str, Any] = dict(response["Entries"][0])
            raise PublishError(
                f"EventBridge refused the event: {entry.get('ErrorCode')}: "
                f"{entry.get('ErrorMessage', '')}"
            )


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


def make_publisher(config: RelayConfig, state_dir: Path) -> Publisher:
    events = config.events
    if events.publisher == "eventbridge":
        return EventBridgePublisher(
            events.event_bus, region=events.region, endpoint_url=events.endpoint_url
        )
    if events.publisher == "local":
        from local_agent.pipeline import LocalPipeline

        return LocalPublisher(LocalPipeline(config, state_dir))
    return NullPublisher()

"""An in-memory event bus: keeps what was published, in order; can fail on demand."""

from __future__ import annotations

from cloud.contracts.events import EventDetail
from cloud.integrations.eventbus import EventPublishError


class RecordingEventBus:
    """An in-memory bus for unit tests: keeps what was published, in order."""

    def __init__(self) -> None:
        self.events: list[EventDetail] = []
        self.fail_next: int = 0

    def publish(self, *events: EventDetail) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise EventPublishError("injected failure")
        self.events.extend(events)

    def detail_types(self) -> list[str]:
        return [event.DETAIL_TYPE.value for event in self.events]

"""An in-memory continuation queue: keeps the legs the verifier handed on, in order."""

from __future__ import annotations

from cloud.contracts.events import MirrorCompleted


class RecordingContinuations:
    def __init__(self) -> None:
        self.sent: list[tuple[MirrorCompleted, int]] = []
        self.fail_next = 0

    def send(self, event: MirrorCompleted, leg: int) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise RuntimeError("injected send failure")
        self.sent.append((event, leg))

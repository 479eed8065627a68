"""When a run must stop: its deadline, or a failure that makes going on pointless.

Backrest runs one task at a time and gives hooks no timeout, so a hung upload would block
every backup. Work checks the signal between files and between parts; a watchdog ends
the process outright if a single request hangs past the grace period.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from local_agent.errors import ExitCode

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """Raised inside workers when the run must stop; carries why."""


class StopSignal:
    def __init__(self, deadline_seconds: float | None) -> None:
        self._deadline = None if deadline_seconds is None else time.monotonic() + deadline_seconds
        self._reason: str | None = None
        self._lock = threading.Lock()

    @property
    def reason(self) -> str | None:
        if self._reason is None and self.deadline_passed():
            self.stop("deadline")
        return self._reason

    def deadline_passed(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def expire_now(self) -> None:
        """Act as if the deadline had come (SIGTERM): work stops and saves its progress."""
        self._deadline = time.monotonic()

    def stop(self, reason: str) -> None:
        with self._lock:
            if self._reason is None:
                self._reason = reason

    def check(self) -> None:
        reason = self.reason
        if reason is not None:
            raise StopRequested(reason)


def start_hard_stop(seconds: float, grace: float = 120.0) -> threading.Timer:
    """End the process with exit 6 if it outlives its deadline by `grace` seconds.

    The state store commits every step, so dying here loses nothing but the request in
    flight; the next run resumes.
    """

    def _kill() -> None:
        log.error("deadline passed %.0fs ago and a request is still hanging: exiting", grace)
        os._exit(int(ExitCode.DEADLINE))

    timer = threading.Timer(seconds + grace, _kill)
    timer.daemon = True
    timer.start()
    return timer

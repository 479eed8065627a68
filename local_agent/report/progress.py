"""Progress of a long run, for a person at a terminal or for Backrest's hook log.

On a TTY one line is redrawn a few times a second (files, bytes, rate, ETA). Elsewhere a
concise line is printed every few seconds, because Backrest keeps the hook's output as a
log and a carriage-return animation would be unreadable there.

The rate is measured over a sliding window that starts when work is first added, not when
the progress display starts: scanning and hashing the repository come first, and a rate
averaged over them (or over the first second of the first file) gave "606 B/s · ETA 5h17m"
for an upload that took 11 s. Until the window has `WARMUP` seconds of data the line shows
no rate and no ETA rather than a wrong one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

from local_agent.units import format_duration, format_size

#: Seconds of transfer before a rate (and an ETA) is shown.
WARMUP = 3.0
#: The rate is the bytes sent over (at most) the last WINDOW seconds.
WINDOW = 20.0


class Progress:
    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self._clock = clock
        self.tty = tty
        self.interval = interval if interval is not None else (0.25 if tty else 5.0)
        self.phase = ""
        self.files_total = 0
        self.files_done = 0
        self.bytes_total = 0
        self.bytes_done = 0
        self._work_started: float | None = None  # when the first work was added
        self._samples: deque[tuple[float, int]] = deque()  # (time, bytes_done)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase

    def add_work(self, files: int, size: int) -> None:
        with self._lock:
            if self._work_started is None and (files or size):
                self._work_started = self._clock()
                self._samples.append((self._work_started, self.bytes_done))
            self.files_total += files
            self.bytes_total += size

    def advance(self, files: int = 0, size: int = 0) -> None:
        with self._lock:
            self.files_done += files
            self.bytes_done += size

    def rate(self) -> float | None:
        """Bytes per second over the sliding window; None while still warming up."""
        with self._lock:
            return self._rate_locked(self._clock())

    def _rate_locked(self, now: float) -> float | None:
        if self._work_started is None or now - self._work_started < WARMUP:
            return None
        self._samples.append((now, self.bytes_done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW:
            self._samples.popleft()
        then, done_then = self._samples[0]
        if now - then <= 0:
            return None
        return (self.bytes_done - done_then) / (now - then)

    def line(self) -> str:
        with self._lock:
            rate = self._rate_locked(self._clock())
            remaining = self.bytes_total - self.bytes_done
            if rate is None:
                speed, eta = "—", "—"
            else:
                speed = f"{format_size(rate)}/s"
                eta = format_duration(remaining / rate) if rate > 0 and remaining > 0 else "—"
            files = "file" if self.files_total == 1 else "files"
            return (
                f"{self.phase or 'upload'}: {self.files_done}/{self.files_total} {files} · "
                f"{format_size(self.bytes_done)}/{format_size(self.bytes_total)} · "
                f"{speed} · ETA {eta}"
            )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.files_total == 0:
                continue
            text = self.line()
            if self.tty:
                self.stream.write("\r\x1b[2K" + text)
                self._drawn = True
            else:
                self.stream.write("backrest-relay: " + text + "\n")
            self.stream.flush()

"""Progress of a long run, for a person at a terminal or for Backrest's hook log.

On a TTY one line is redrawn a few times a second (files, bytes, rate, ETA). Elsewhere a
concise line is printed every few seconds, because Backrest keeps the hook's output as a
log and a carriage-return animation would be unreadable there.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

from local_agent.units import format_duration, format_size


class Progress:
    def __init__(self, stream: TextIO, *, tty: bool, interval: float | None = None) -> None:
        self.stream = stream
        self.tty = tty
        self.interval = interval if interval is not None else (0.25 if tty else 5.0)
        self.phase = ""
        self.files_total = 0
        self.files_done = 0
        self.bytes_total = 0
        self.bytes_done = 0
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False

    def start(self) -> None:
        self._started = time.monotonic()
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
            self.files_total += files
            self.bytes_total += size

    def advance(self, files: int = 0, size: int = 0) -> None:
        with self._lock:
            self.files_done += files
            self.bytes_done += size

    def line(self) -> str:
        with self._lock:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            rate = self.bytes_done / elapsed
            remaining = self.bytes_total - self.bytes_done
            eta = format_duration(remaining / rate) if rate > 0 and remaining > 0 else "—"
            return (
                f"{self.phase or 'upload'}: {self.files_done}/{self.files_total} files · "
                f"{format_size(self.bytes_done)}/{format_size(self.bytes_total)} · "
                f"{format_size(rate)}/s · ETA {eta}"
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

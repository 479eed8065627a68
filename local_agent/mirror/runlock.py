"""One upload per repository and destination at a time.

Two runs interleaving could each believe the other's half-finished multipart upload is a
stray and abort it, or delete what the other just uploaded. The lock is an flock on a file
beside the state store, released by the kernel even when the holder is SIGKILLed.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from local_agent.errors import GuardError


class RunLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, wait_seconds: float) -> None:
        """Take the lock, waiting at most `wait_seconds`; GuardError names the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise GuardError(
                        "another backrest-relay upload of this repository to this destination "
                        f"is running ({holder or 'holder unknown'}); waited {wait_seconds:.0f}s, "
                        "not starting a second one"
                    ) from None
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.01)))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

"""One upload per repository and destination: the flock is held across processes and
released by the kernel when the holder dies, even by SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from local_agent.errors import ExitCode, GuardError
from local_agent.mirror.runlock import RunLock

ROOT = Path(__file__).resolve().parents[2]
Spawn = Callable[..., "subprocess.Popen[str]"]

HOLDER = """
import sys, time
from pathlib import Path
from local_agent.mirror.runlock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire(5)
print("locked", flush=True)
hold = float(sys.argv[2])
time.sleep(hold)
lock.release()
print("released", flush=True)
time.sleep(60)
"""


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "bkt-0123.lock"


@pytest.fixture
def spawn(lock_path: Path) -> Iterator[Spawn]:
    procs: list[subprocess.Popen[str]] = []

    def start(hold: float = 60) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(lock_path), str(hold)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "locked", f"holder did not start: {line!r}"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_second_process_waits_then_gets_guard_error_naming_holder(
    lock_path: Path, spawn: Spawn
) -> None:
    holder = spawn()
    lock = RunLock(lock_path)
    started = time.monotonic()
    with pytest.raises(GuardError) as info:
        lock.acquire(0.6)
    waited = time.monotonic() - started
    err = info.value
    assert err.exit_code == ExitCode.GUARD == 5
    assert f"pid {holder.pid}" in err.message
    assert "another backrest-relay upload" in err.message
    assert waited >= 0.5, f"gave up after {waited:.2f}s instead of waiting"
    assert waited < 5


def test_waiting_lock_is_granted_when_holder_releases(lock_path: Path, spawn: Spawn) -> None:
    spawn(0.5)
    lock = RunLock(lock_path)
    started = time.monotonic()
    lock.acquire(10)
    try:
        assert time.monotonic() - started >= 0.2  # it had to wait for the holder
        assert f"pid {os.getpid()}" in lock_path.read_text()
    finally:
        lock.release()


def test_lock_is_released_when_holder_is_sigkilled(lock_path: Path, spawn: Spawn) -> None:
    holder = spawn()
    with pytest.raises(GuardError):
        RunLock(lock_path).acquire(0.1)
    holder.kill()  # SIGKILL: no cleanup code runs in the holder
    holder.wait(timeout=10)
    lock = RunLock(lock_path)
    started = time.monotonic()
    lock.acquire(5)
    try:
        assert time.monotonic() - started < 2
        assert f"pid {os.getpid()}" in lock_path.read_text()
    finally:
        lock.release()


def test_zero_wait_fails_at_once(lock_path: Path, spawn: Spawn) -> None:
    spawn()
    started = time.monotonic()
    with pytest.raises(GuardError):
        RunLock(lock_path).acquire(0)
    assert time.monotonic() - started < 1


def test_acquire_release_and_reacquire_in_process(lock_path: Path) -> None:
    with RunLock(lock_path) as lock:
        lock.acquire(1)
        assert lock_path.exists()
        assert f"pid {os.getpid()}" in lock_path.read_text()
        # A second lock on the same file conflicts even in the same process (flock is per
        # open file description).
        with pytest.raises(GuardError):
            RunLock(lock_path).acquire(0.05)
    # The context manager released it.
    again = RunLock(lock_path)
    again.acquire(0.5)
    again.release()
    again.release()  # releasing twice is harmless


def test_lock_file_is_private(lock_path: Path) -> None:
    lock = RunLock(lock_path)
    lock.acquire(1)
    try:
        assert lock_path.stat().st_mode & 0o077 == 0
    finally:
        lock.release()


def test_stale_holder_text_is_overwritten(lock_path: Path) -> None:
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text("pid 999999999 since long ago, plus a much longer stale tail")
    lock = RunLock(lock_path)
    lock.acquire(1)
    try:
        text = lock_path.read_text()
        assert text.startswith(f"pid {os.getpid()} since ")
        assert "999999999" not in text
        assert "stale" not in text
    finally:
        lock.release()

"""Running one child process and measuring it: wall time and peak RSS (from `wait4`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class BenchError(RuntimeError):
    """A benchmark step failed (a tool exited non-zero, a mirror is incomplete...)."""


@dataclass(frozen=True)
class Measured:
    """One finished child process."""

    seconds: float
    returncode: int
    max_rss: int  # bytes, the command's own peak (see bench/_launch.py)
    stdout: str
    stderr: str
    timed_out: bool = False
    rss_floor: int = 0  # bytes: a peak at or below this is the launcher's, not the command's
    cpu_seconds: float = 0.0  # user + system time of the command

    def tail(self, lines: int = 15) -> str:
        """The end of stderr (and stdout if stderr is empty), for error messages."""
        text = self.stderr.strip() or self.stdout.strip()
        return "\n".join(text.splitlines()[-lines:])


_LAUNCHER = Path(__file__).with_name("_launch.py")


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    timeout: float = 3600.0,
) -> Measured:
    """Run `cmd` to completion: wall time from spawn to exit and peak RSS.

    The command is spawned by a small launcher process (bench/_launch.py) that times it
    and reads its rusage, so neither the benchmark's own memory nor the launcher's
    start-up leaks into the numbers. Output goes to temporary files, not pipes.
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(suffix=".json") as res,
    ):
        timed_out = threading.Event()
        proc = subprocess.Popen(
            [sys.executable, "-S", "-I", str(_LAUNCHER), res.name, *cmd],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # a timeout ends the launcher and the command together
        )

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            returncode = proc.wait()
        finally:
            timer.cancel()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        try:
            data = json.loads(Path(res.name).read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            data = {}
        return Measured(
            seconds=float(data.get("seconds", float("nan"))),
            returncode=int(data.get("returncode", returncode)),
            max_rss=int(data.get("maxrss_kib", 0)) * 1024,  # Linux reports KiB
            stdout=stdout,
            stderr=stderr,
            timed_out=timed_out.is_set(),
            rss_floor=int(data.get("launcher_maxrss_kib", 0)) * 1024,
            cpu_seconds=float(data.get("cpu_seconds", 0.0)),
        )


@dataclass(frozen=True)
class Spread:
    """Median, min and max of a few samples."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread | None:
        if not samples:
            return None
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

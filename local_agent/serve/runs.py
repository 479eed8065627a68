"""Runs the service holds: at most one per destination at a time, one per repository.

A trigger for a repository that already has a run *queued* joins that run; a trigger for
one whose run is in progress joins (or queues) the next run, never the one going: that run
listed the repository before the trigger, and a Backrest that restarted or whose curl gave
up may have backed up and checked since, so only a later run is sure to mirror the new
data. The run going and the next one share a destination, so they never overlap. Runs wait in
a bounded queue, each in its own child process that the service stops at the deadline. A
run belongs to the service, not to a caller: a caller that disconnects leaves it running,
and any caller can follow it by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.integrations.redact import REDACTOR
from local_agent.errors import ExitCode
from local_agent.serve.security import Target, Trigger

log = logging.getLogger(__name__)

#: Lines of a run's output kept for callers who follow it (older ones are dropped), while
#: it runs and once it is done (a thousand finished runs must not hold a million lines).
MAX_LINES = 2000
KEPT_AFTER = 200
#: Longest line passed on; longer output is cut into pieces of this size.
MAX_LINE_BYTES = 8192
#: What ends every streamed run; the hook checks for `FINAL_PREFIX + "0"`.
FINAL_PREFIX = "backrest-relay: exit "
#: How long past the upload deadline a child may live before it is killed.
KILL_GRACE_SECONDS = 180.0
#: How long a run may take to stop when the service stops (within docker stop's 10 s).
STOP_GRACE_SECONDS = 6.0

Launcher = Callable[["Run"], Awaitable[int]]


class QueueFull(Exception):
    """More runs waiting than `[serve] max_queue` allows (HTTP 429)."""


def _new_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


@dataclass
class Run:
    target: Target
    trigger: Trigger
    id: str = field(default_factory=_new_id)
    state: str = "queued"  # queued | running | done
    exit_code: int | None = None
    summary: dict[str, Any] | None = None
    callers: int = 1
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_LINES))
    dropped: int = 0  # lines no longer kept
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def kind(self) -> str:
        return self.trigger.kind

    def emit(self, line: str) -> None:
        line = REDACTOR(line.rstrip("\r\n"))
        if line.startswith(FINAL_PREFIX):  # only the service writes the final line
            line = "  " + line
        if len(self.lines) == self.lines.maxlen:
            self.dropped += 1
        self.lines.append(line)
        self._wake()

    def finish(self, exit_code: int) -> None:
        self.exit_code = exit_code
        self.state = "done"
        self.finished_at = time.time()
        while len(self.lines) > KEPT_AFTER:
            self.lines.popleft()
            self.dropped += 1
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[str]:
        """Every kept line (then new ones as they come), ending with the final line."""
        seen = self.dropped
        if seen:
            yield f"backrest-relay: ({seen} earlier lines not kept)\n"
        while True:
            waiter = self.changed
            start = seen - self.dropped
            if start < 0:
                yield f"backrest-relay: ({-start} lines skipped)\n"
                start = 0
            fresh = list(self.lines)[start:]
            seen += len(fresh)
            for line in fresh:
                yield line + "\n"
            if self.state == "done":
                yield f"{FINAL_PREFIX}{self.exit_code}\n"
                return
            await waiter.wait()

    def public(self) -> dict[str, Any]:
        """What /v1/runs/{id} shows: no path outside the repository, no secret."""
        summary = self.summary or {}
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "exit_code": self.exit_code,
            "repo": {"id": self.target.repo_id, "guid": self.target.guid},
            "trigger": self.trigger.event,
            "callers": self.callers,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "mirror_run_id": summary.get("run_id"),
            "status": summary.get("status"),
            "uploaded_files": summary.get("uploaded_files"),
            "uploaded_bytes": summary.get("uploaded_bytes"),
            "error": summary.get("error"),
        }


class RunQueue:
    """The scheduler: FIFO per destination, `max_parallel` destinations at once."""

    def __init__(
        self,
        launcher: Launcher,
        *,
        max_queue: int,
        max_parallel: int,
        keep: int = 1000,
        on_finish: Callable[[Run], None] | None = None,
    ) -> None:
        self._launch = launcher
        self.max_queue = max_queue
        self.max_parallel = max_parallel
        self.keep = keep
        self._on_finish = on_finish
        self.runs: OrderedDict[str, Run] = OrderedDict()
        self._waiting: OrderedDict[str, deque[Run]] = OrderedDict()  # destination → runs
        self._running: dict[str, Run] = {}  # destination → run
        self._active: dict[tuple[str, str], Run] = {}  # (kind, repo key) → queued run
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    @property
    def queue_depth(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def in_progress(self) -> int:
        return len(self._running)

    def submit(self, target: Target, trigger: Trigger) -> tuple[Run, bool]:
        """The run this trigger belongs to, and whether it joined an existing one."""
        active = self._active.get((trigger.kind, target.key))
        if active is not None:
            active.callers += 1
            return active, True
        if self.closed:
            raise QueueFull("the service is stopping")
        if self.queue_depth >= self.max_queue:
            raise QueueFull(f"{self.queue_depth} runs are waiting (serve.max_queue)")
        run = Run(target=target, trigger=trigger)
        self.runs[run.id] = run
        self._active[(run.kind, target.key)] = run
        self._waiting.setdefault(self._lane(run), deque()).append(run)
        self._forget_old()
        self._start_ready()
        return run, False

    def get(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    def position(self, run: Run) -> int:
        """Runs ahead of `run` on its destination (0: running or next)."""
        lane = self._waiting.get(self._lane(run), deque())
        ahead = list(lane).index(run) if run in lane else 0
        return ahead + (1 if self._lane(run) in self._running else 0)

    @staticmethod
    def _lane(run: Run) -> str:
        # Failure reports touch no bucket: they only wait for each other.
        return ("report:" if run.kind == "failure" else "") + run.target.destination

    def _start_ready(self) -> None:
        for lane in list(self._waiting):
            if len(self._running) >= self.max_parallel:
                return
            queue = self._waiting[lane]
            if lane in self._running or not queue:
                continue
            run = queue.popleft()
            if not queue:
                del self._waiting[lane]
            # From now on it has listed the repository: later triggers join the next run.
            if self._active.get((run.kind, run.target.key)) is run:
                del self._active[(run.kind, run.target.key)]
            self._running[lane] = run
            run.state = "running"
            run.started_at = time.time()
            task = asyncio.get_running_loop().create_task(self._execute(lane, run))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, lane: str, run: Run) -> None:
        run._wake()
        log.info("run %s started: %s %s (%s)", run.id, run.kind, run.target.repo_id, lane)
        try:
            code = await self._launch(run)
        except Exception as exc:  # the service must outlive any one run
            log.error("run %s could not run: %s: %s", run.id, type(exc).__name__, exc)
            run.emit(f"backrest-relay: error: the service could not run this: {exc}")
            code = int(ExitCode.UNEXPECTED)
        run.finish(code)
        log.info("run %s finished: exit %d", run.id, code)
        del self._running[lane]
        if self._on_finish is not None:
            self._on_finish(run)
        self._start_ready()

    def _forget_old(self) -> None:
        while len(self.runs) > self.keep:
            oldest = next(iter(self.runs.values()))
            if oldest.state != "done":
                return
            self.runs.popitem(last=False)

    async def close(self) -> None:
        """Stop every run (children get SIGTERM and a moment to save progress) and end
        every caller's stream with a final line, so the service stops without waiting for
        streams that would never end."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for run in self.runs.values():
            if run.state != "done":
                run.emit(
                    "backrest-relay: error: the service is stopping: run interrupted "
                    "(progress saved; the next trigger resumes it)"
                )
                run.finish(int(ExitCode.UNEXPECTED))


class ChildLauncher:
    """Runs `backrest-relay upload` (or `report-failure`) for a run in a child process.

    The child is the CLI itself, so the hook log shows exactly the lines a host install
    prints; the JSON summary it writes to stdout feeds the metrics.
    """

    def __init__(
        self,
        *,
        config_path: Path | None,
        deadline_seconds: float,
        env: dict[str, str] | None = None,
        grace: float = KILL_GRACE_SECONDS,
    ) -> None:
        self.config_path = config_path
        self.limit = deadline_seconds + grace
        base = dict(os.environ if env is None else env)
        for name in ("BACKREST_RELAY_TOKEN", "BACKREST_RELAY_SERVE__TOKEN"):
            base.pop(name, None)
        base["BACKREST_RELAY_SERVE_PID"] = str(os.getpid())
        self.env = base

    def argv(self, run: Run) -> list[str]:
        target, trigger = run.target, run.trigger
        args = [sys.executable, "-m", "local_agent.serve.child"]
        if trigger.kind == "failure":
            args += ["report-failure", f"--error={trigger.error}"]
        else:
            args += ["upload"]
        args += [
            f"--repo={target.path}",
            f"--repo-id={target.repo_id}",
            f"--trigger={trigger.event}",
            "--json",
        ]
        if target.guid:
            args.append(f"--repo-guid={target.guid}")
        if self.config_path is not None:
            args.append(f"--config={self.config_path}")
        return args

    async def __call__(self, run: Run) -> int:
        proc = await asyncio.create_subprocess_exec(
            *self.argv(run),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        stdout: list[bytes] = []

        async def pump_err(stream: asyncio.StreamReader) -> None:
            async for line in _lines(stream):
                run.emit(line.decode("utf-8", errors="replace"))

        async def pump_out(stream: asyncio.StreamReader) -> None:
            async for line in _lines(stream):
                if len(stdout) < 100:
                    stdout.append(line)

        pumps = asyncio.gather(pump_err(proc.stderr), pump_out(proc.stdout))
        try:
            await asyncio.wait_for(asyncio.shield(pumps), timeout=self.limit)
            code = await proc.wait()
        except TimeoutError:
            run.emit(
                f"backrest-relay: error: run still going {self.limit:.0f}s after it started "
                "(the upload deadline plus a grace period): stopped; the next run resumes"
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            pumps.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumps
            return int(ExitCode.DEADLINE)
        except asyncio.CancelledError:  # service shutting down
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:  # the CLI saves its progress on SIGTERM: give it a moment (docker stop: 10 s)
                await asyncio.wait_for(proc.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            raise
        run.summary = _last_json(stdout)
        return code if code >= 0 else int(ExitCode.UNEXPECTED)


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Lines of a child's output, however long: a line past MAX_LINE_BYTES comes in pieces
    (readline would raise on it and lose track of the child)."""
    pending = b""
    while chunk := await stream.read(65536):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            for start in range(0, max(len(line), 1), MAX_LINE_BYTES):
                yield line[start : start + MAX_LINE_BYTES]
        while len(pending) >= MAX_LINE_BYTES:
            yield pending[:MAX_LINE_BYTES]
            pending = pending[MAX_LINE_BYTES:]
    if pending:
        yield pending


def _last_json(lines: list[bytes]) -> dict[str, Any] | None:
    for raw in reversed(lines):
        text = raw.decode("utf-8", errors="replace").strip()
        if text.startswith("{"):
            with contextlib.suppress(ValueError):
                parsed = json.loads(text)
                if isinstance(parsed, dict):
                    return parsed
    return None

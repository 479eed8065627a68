"""The scenarios of issue 8, each producing a `ScenarioResult` for the report.

Timed runs alternate the order of the tools (run i starts with tool i mod 3), each tool
mirrors into its own fresh bucket (full mirrors) or its own long-lived one (S3-S5).
Requests are counted in one extra run per tool through `S3Proxy`, never in a timed run:
the proxy is Python and would slow every tool down.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.data import RepoCache, add_new_files
from bench.measure import BenchError, Spread
from bench.sizes import Sizes
from bench.tools import (
    PREFIX,
    Dest,
    Ours,
    OursVerify,
    RcloneCheck,
    RequestCount,
    RunResult,
    Tool,
    verify_flags,
)
from testbed.repos import FakeRepo
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server

Log = Callable[[str], None]
T = TypeVar("T")


@dataclass
class ToolStats:
    """Everything measured for one tool in one scenario."""

    tool: str
    label: str
    command: str
    seconds: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    self_requests: list[int] = field(default_factory=list)  # what the agent reported
    uploaded: list[int] = field(default_factory=list)
    proxy: RequestCount | None = None  # the counting run
    proxy_self_requests: int | None = None  # what the agent reported in the counting run
    errors: list[str] = field(default_factory=list)

    def add(self, run: RunResult) -> None:
        self.seconds.append(run.seconds)
        self.rss.append(run.max_rss)
        self.cpu.append(run.cpu)
        if run.requests is not None:
            self.self_requests.append(run.requests)
        if run.uploaded is not None:
            self.uploaded.append(run.uploaded)

    @property
    def time(self) -> Spread | None:
        return Spread.of(self.seconds)

    @property
    def peak_rss(self) -> int | None:
        return max(self.rss) if self.rss else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToolStats:
        proxy = d.get("proxy_requests")
        return cls(
            tool=d["tool"],
            label=d["label"],
            command=d["command"],
            seconds=list(d["seconds"]),
            rss=list(d["rss"]),
            cpu=list(d.get("cpu", [])),
            self_requests=list(d["self_requests"]),
            uploaded=list(d["uploaded"]),
            proxy=RequestCount.from_dict(proxy) if proxy is not None else None,
            proxy_self_requests=d.get("proxy_self_requests"),
            errors=list(d["errors"]),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "label": self.label,
            "command": self.command,
            "seconds": self.seconds,
            "rss": self.rss,
            "cpu": self.cpu,
            "self_requests": self.self_requests,
            "uploaded": self.uploaded,
            "proxy_requests": self.proxy.as_dict() if self.proxy else None,
            "proxy_self_requests": self.proxy_self_requests,
            "errors": self.errors,
        }


@dataclass
class RssRow:
    """S6: one repository size."""

    files: int
    upload_rss: int | None = None
    upload_seconds: float | None = None
    noop_rss: int | None = None
    verify_rss: int | None = None


@dataclass
class ScenarioResult:
    sid: str
    title: str
    size: str
    tools: dict[str, ToolStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    rss_rows: list[RssRow] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole scenario

    def stats(self, tool: Tool, label: str | None = None) -> ToolStats:
        if tool.name not in self.tools:
            self.tools[tool.name] = ToolStats(
                tool.name, label or tool.label, tool.display_command(tool.concurrency)
            )
        return self.tools[tool.name]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScenarioResult:
        return cls(
            sid=d["sid"],
            title=d["title"],
            size=d["size"],
            tools={k: ToolStats.from_dict(v) for k, v in d["tools"].items()},
            notes=list(d["notes"]),
            skipped=d.get("skipped"),
            rss_rows=[RssRow(**r) for r in d.get("rss_rows", [])],
            seconds=float(d.get("seconds", 0.0)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "sid": self.sid,
            "title": self.title,
            "size": self.size,
            "tools": {k: v.as_dict() for k, v in self.tools.items()},
            "notes": self.notes,
            "skipped": self.skipped,
            "rss_rows": [vars(r) for r in self.rss_rows],
            "seconds": self.seconds,
        }


@dataclass
class Context:
    sizes: Sizes
    runs: int
    concurrency: int
    tools: list[Tool]
    work: Path  # on tmpfs where available
    repos: RepoCache
    log: Log
    _slots: int = 0
    # server name -> ERROR lines rclone serve s3 logged (timestamps cut) -> count
    server_errors: dict[str, Counter[str]] = field(default_factory=dict)

    def slot(self, hint: str) -> Path:
        self._slots += 1
        path = self.work / "slots" / f"{self._slots:04d}-{hint}"
        path.mkdir(parents=True)
        return path

    @contextmanager
    def server(
        self, name: str, prepare: Callable[[Path], None] | None = None
    ) -> Iterator[RcloneS3Server]:
        """`rclone serve s3` over a fresh directory; `prepare` may fill it before start
        (rclone caches directory listings, so files must be in place before it looks)."""
        root = self.work / f"s3-{name}"
        root.mkdir(parents=True)
        if prepare is not None:
            prepare(root)
        server = RcloneS3Server(root)
        server.start()
        try:
            yield server
        finally:
            errors = Counter(
                line.split(" ERROR : ", 1)[1].strip()
                for line in server.log_text().splitlines()
                if " ERROR : " in line
            )
            if errors:
                self.server_errors[name] = errors
            server.stop()
            shutil.rmtree(root, ignore_errors=True)


def rotate(tools: Sequence[T], i: int) -> list[T]:
    """Run i starts with tool i mod n: every tool goes first, middle and last in turn."""
    k = i % len(tools)
    return [*tools[k:], *tools[:k]]


def _bucket_name(sid: str, tool: Tool, i: int | str) -> str:
    return f"{sid.lower()}-{tool.name}-{i}-{uuid.uuid4().hex[:6]}"


def check_mirror(root: Path, dest: Dest, repo: FakeRepo) -> str | None:
    """Compare the served directory with the repository: None if the mirror is exact."""
    base = root / dest.bucket / dest.prefix
    want = {
        rel: path.stat().st_size
        for rel, path in zip(repo.relpaths(), repo.mirrored_files(), strict=True)
    }
    have = {
        p.relative_to(base).as_posix(): p.stat().st_size for p in base.rglob("*") if p.is_file()
    }
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    wrong = [k for k in want if k in have and have[k] != want[k]]
    if not (missing or extra or wrong):
        return None
    parts = []
    for what, keys in (("missing", missing), ("unexpected", extra), ("wrong size", wrong)):
        if keys:
            parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
    return f"mirror in {dest.bucket} is not exact: " + "; ".join(parts)


def _timed_run(
    ctx: Context,
    result: ScenarioResult,
    tool: Tool,
    repo: FakeRepo,
    dest: Dest,
    slot: Path,
    server_root: Path,
    *,
    check: bool = True,
) -> RunResult | None:
    stats = result.stats(tool)
    try:
        run = tool.run(repo.root, dest, slot)
    except BenchError as exc:
        stats.errors.append(str(exc))
        ctx.log(f"  {tool.label}: FAILED: {exc}")
        return None
    stats.add(run)
    extra = f", {run.requests} requests" if run.requests is not None else ""
    ctx.log(
        f"  {tool.label}: {run.seconds:.2f}s (CPU {run.cpu:.2f}s), peak RSS "
        f"{run.max_rss / 2**20:.0f} MiB{extra}"
    )
    if check:
        problem = check_mirror(server_root, dest, repo)
        if problem:
            stats.errors.append(problem)
            ctx.log(f"  {tool.label}: {problem}")
    return run


def _counting_run(
    ctx: Context,
    result: ScenarioResult,
    tool: Tool,
    repo: FakeRepo,
    upstream: S3Endpoint,
    bucket: str,
    slot: Path,
) -> RunResult | None:
    """One untimed run through a counting proxy."""
    stats = result.stats(tool)
    with S3Proxy(upstream) as proxy:
        try:
            run = tool.run(repo.root, Dest(proxy.endpoint, bucket), slot)
        except BenchError as exc:
            stats.errors.append(f"counting run: {exc}")
            ctx.log(f"  {tool.label} (counting): FAILED: {exc}")
            return None
        stats.proxy = RequestCount.of(proxy.requests)
    stats.proxy_self_requests = run.requests
    ctx.log(f"  {tool.label} (counting): {stats.proxy.total:,} requests: {stats.proxy.breakdown()}")
    return run


# -- before everything: the agent's bytecode cache --------------------------------------


def warm_up(ctx: Context, pycache: Path) -> list[str]:
    """Fill the agent's bytecode cache as its first runs on a user's machine would, and
    measure what a start without any cache costs (this checkout's venv ships no .pyc and
    the environment may forbid writing them)."""
    notes: list[str] = []
    with ctx.server("warm-up") as server:
        repo = ctx.repos.small("warm-up", 20, ctx.sizes.small_size, seed=9)
        bucket = "warm-up"
        server.endpoint.make_bucket(bucket)
        slot = ctx.slot(bucket)
        dest = Dest(server.endpoint, bucket)
        ours = Ours(ctx.concurrency)
        Ours.pycache = pycache
        ours.run(repo.root, dest, slot)  # compiles what upload imports
        flags = verify_flags()
        if flags is not None:
            OursVerify(ctx.concurrency, flags).run(repo.root, dest, slot)
        warm = [ours.run(repo.root, dest, slot).seconds for _ in range(3)]
        Ours.pycache = None
        try:
            cold = [ours.run(repo.root, dest, slot).seconds for _ in range(3)]
        finally:
            Ours.pycache = pycache
        ctx.repos.drop("warm-up")
    w, c = Spread.of(warm), Spread.of(cold)
    assert w is not None and c is not None
    ctx.log(f"agent start, nothing new, 20 files: {w.median:.2f}s warm, {c.median:.2f}s cold")
    notes.append(
        f"backrest-relay runs with a warm bytecode cache (`PYTHONPYCACHEPREFIX` in the "
        f"benchmark's temporary directory), as an installed agent has after its first run. "
        f"A run with nothing new over 20 files takes {w.median:.2f} s that way and "
        f"{c.median:.2f} s without any cache (+{c.median - w.median:.2f} s: every start "
        "compiles the agent and pydantic from source, and boto3/botocore too when it talks "
        "to the bucket) — which is what this checkout's venv (installed without .pyc files) "
        "does when PYTHONDONTWRITEBYTECODE is set, as it was here."
        if os.environ.get("PYTHONDONTWRITEBYTECODE")
        else f"backrest-relay runs with a warm bytecode cache (`PYTHONPYCACHEPREFIX`); a run "
        f"with nothing new over 20 files takes {w.median:.2f} s that way and "
        f"{c.median:.2f} s when it may not use or write any bytecode cache."
    )
    return notes


# -- S1, S2: full mirrors -----------------------------------------------------------------


def full_mirror(ctx: Context, sid: str, title: str, repo: FakeRepo) -> ScenarioResult:
    result = ScenarioResult(sid, title, ctx.sizes.describe(sid))
    with ctx.server(sid) as server:
        for i in range(ctx.runs):
            ctx.log(f"{sid} run {i + 1}/{ctx.runs}")
            for tool in rotate(ctx.tools, i):
                bucket = _bucket_name(sid, tool, i)
                server.endpoint.make_bucket(bucket)
                slot = ctx.slot(bucket)
                _timed_run(
                    ctx, result, tool, repo, Dest(server.endpoint, bucket), slot, server.root
                )
                shutil.rmtree(server.root / bucket, ignore_errors=True)
                shutil.rmtree(slot, ignore_errors=True)
        ctx.log(f"{sid} counting requests")
        for tool in ctx.tools:
            bucket = _bucket_name(sid, tool, "count")
            server.endpoint.make_bucket(bucket)
            slot = ctx.slot(bucket)
            _counting_run(ctx, result, tool, repo, server.endpoint, bucket, slot)
            shutil.rmtree(server.root / bucket, ignore_errors=True)
            shutil.rmtree(slot, ignore_errors=True)
    files = len(repo.mirrored_files())
    result.notes.append(
        f"{files:,} files, {repo.total_bytes / 2**20:,.1f} MiB; each run into a fresh bucket "
        "(and, for backrest-relay, a fresh state store)."
    )
    return result


# -- S3, S4, S5: the big repository, mirrored once per tool ------------------------------


class BigMirror:
    """The ~100k-file repository and one mirror of it per tool, kept across S3-S5.

    Seeding 100k objects through each tool would take most of the time budget, so each
    tool's bucket starts as a copy of the repository made on the server's disk (times kept),
    exactly the objects a finished `rclone sync` leaves. backrest-relay then builds its state
    store the way it does on a first run: one listing, every object adopted after checking
    its MD5 against the listed ETag (no upload). A warm-up run per tool follows.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.repo = ctx.repos.small("big", ctx.sizes.big_files, ctx.sizes.small_size, seed=3)
        self.buckets = {tool.name: f"big-{tool.name}" for tool in ctx.tools}
        self.slots = {tool.name: ctx.slot(f"big-{tool.name}") for tool in ctx.tools}
        self.notes: list[str] = []
        self._server_cm = ctx.server("big", self._seed)
        self.server = self._server_cm.__enter__()
        try:
            self._adopt_and_warm_up()
        except BaseException:
            self.close()
            raise

    def _seed(self, root: Path) -> None:
        started = time.perf_counter()
        ignore = shutil.ignore_patterns("locks")
        for bucket in self.buckets.values():
            shutil.copytree(self.repo.root, root / bucket / PREFIX, ignore=ignore)
        self.ctx.log(
            f"seeded {len(self.buckets)} buckets with {len(self.repo.mirrored_files()):,} "
            f"objects each in {time.perf_counter() - started:.1f}s"
        )

    def _adopt_and_warm_up(self) -> None:
        ctx = self.ctx
        for tool in ctx.tools:
            run = tool.run(self.repo.root, self.dest(tool), self.slots[tool.name])
            if isinstance(tool, Ours):
                self.notes.append(
                    f"backrest-relay's first run over the seeded bucket listed "
                    f"{run.listed or 0:,} objects and adopted them without uploading "
                    f"({run.seconds:.1f}s, {run.requests} requests, "
                    f"{run.uploaded or 0} uploads)."
                )
                if run.uploaded:
                    raise BenchError(f"adoption uploaded {run.uploaded} files; seeding is off")
                run = tool.run(self.repo.root, self.dest(tool), self.slots[tool.name])
            ctx.log(f"  warm-up {tool.label}: {run.seconds:.2f}s")

    def dest(self, tool: Tool, endpoint: S3Endpoint | None = None) -> Dest:
        return Dest(endpoint or self.server.endpoint, self.buckets[tool.name])

    def close(self) -> None:
        self._server_cm.__exit__(None, None, None)


def nothing_new(ctx: Context, big: BigMirror) -> ScenarioResult:
    sid = "S3"
    result = ScenarioResult(sid, "Nothing new", ctx.sizes.describe(sid))
    result.notes += big.notes
    for i in range(ctx.runs):
        ctx.log(f"{sid} run {i + 1}/{ctx.runs}")
        for tool in rotate(ctx.tools, i):
            run = _timed_run(
                ctx,
                result,
                tool,
                big.repo,
                big.dest(tool),
                big.slots[tool.name],
                big.server.root,
                check=False,
            )
            if run is not None and run.uploaded:
                result.stats(tool).errors.append(f"uploaded {run.uploaded} files with nothing new")
    ctx.log(f"{sid} counting requests")
    for tool in ctx.tools:
        _counting_run(
            ctx,
            result,
            tool,
            big.repo,
            big.server.endpoint,
            big.buckets[tool.name],
            big.slots[tool.name],
        )
        counted = result.stats(tool).proxy
        if counted is not None and counted.writes:
            result.notes.append(
                f"{tool.label} wrote {counted.writes} objects in a run with nothing new."
            )
    return result


def incremental(ctx: Context, big: BigMirror) -> ScenarioResult:
    sid = "S4"
    sizes = ctx.sizes
    result = ScenarioResult(sid, "Incremental +1 %", sizes.describe(sid))
    for i in range(ctx.runs):
        ctx.log(f"{sid} run {i + 1}/{ctx.runs}")
        new = add_new_files(big.repo, sizes.s4_new_files, sizes.small_size, seed=400 + i)
        for tool in rotate(ctx.tools, i):
            run = _timed_run(
                ctx,
                result,
                tool,
                big.repo,
                big.dest(tool),
                big.slots[tool.name],
                big.server.root,
            )
            if run is not None and run.uploaded is not None and run.uploaded != len(new):
                result.stats(tool).errors.append(
                    f"uploaded {run.uploaded} files, {len(new)} were new"
                )
    ctx.log(f"{sid} counting requests")
    add_new_files(big.repo, sizes.s4_new_files, sizes.small_size, seed=499)
    for tool in ctx.tools:
        _counting_run(
            ctx,
            result,
            tool,
            big.repo,
            big.server.endpoint,
            big.buckets[tool.name],
            big.slots[tool.name],
        )
    result.notes.append(
        f"Each run adds {sizes.s4_new_files:,} files (new packs, one index, one snapshot) "
        f"and every tool mirrors them into its own copy of the {sizes.big_files:,}-file "
        f"mirror; the repository grows by one batch per run (and one for the counting runs), "
        f"ending at {len(big.repo.mirrored_files()):,} files."
    )
    return result


def verification_pairs(concurrency: int, flags: frozenset[str]) -> list[tuple[Tool, Tool]]:
    """S5's two comparisons, each (ours, peer) over the same objects: the list level
    (`verify --list-only` vs `rclone check`) and every object read back (`verify --deep
    100%` vs `rclone check --download`)."""
    return [
        (OursVerify(concurrency, flags, "list"), RcloneCheck(concurrency)),
        (OursVerify(concurrency, flags, "deep"), RcloneCheck(concurrency, download=True)),
    ]


def verification(ctx: Context, big: BigMirror | None) -> ScenarioResult:
    sid = "S5"
    result = ScenarioResult(sid, "Verification", ctx.sizes.describe(sid))
    flags = verify_flags()
    if flags is None:
        result.skipped = (
            "`backrest-relay verify` does not exist yet (`python -m local_agent verify "
            "--help` fails); S5 runs once it does."
        )
        return result
    assert big is not None
    ours_owner = next(t for t in ctx.tools if isinstance(t, Ours))
    rclone_owner = next(t for t in ctx.tools if t.name == "rclone")
    # Each tool checks the mirror its own sync made (same objects, same server).
    owned = [
        ((ours, ours_owner), (peer, rclone_owner))
        for ours, peer in verification_pairs(ctx.concurrency, flags)
    ]
    for i in range(ctx.runs):
        ctx.log(f"{sid} run {i + 1}/{ctx.runs}")
        for pair in owned:
            for tool, owner in rotate(pair, i):
                _timed_run(
                    ctx,
                    result,
                    tool,
                    big.repo,
                    big.dest(owner),
                    big.slots[owner.name],
                    big.server.root,
                    check=False,
                )
    ctx.log(f"{sid} counting requests")
    for pair in owned:
        for tool, owner in pair:
            _counting_run(
                ctx,
                result,
                tool,
                big.repo,
                big.server.endpoint,
                big.buckets[owner.name],
                big.slots[owner.name],
            )
    files = len(big.repo.mirrored_files())
    result.notes.append(
        f"Two comparisons over the same {files:,}-object mirrors: the list level — "
        "backrest-relay compares the bucket listing with its manifest (names, sizes, "
        "MD5 ETags), rclone check hashes every local file and compares it with the listing — "
        "and every object read back — backrest-relay hashes each object's bytes against its "
        "name (SHA-256), rclone check --download compares them with the local file. s5cmd "
        "has no verification."
    )
    return result


# -- S6: memory as the repository grows ---------------------------------------------------


def memory(ctx: Context) -> ScenarioResult:
    sid = "S6"
    sizes = ctx.sizes
    result = ScenarioResult(sid, "Peak RSS", sizes.describe(sid))
    ours = next((t for t in ctx.tools if isinstance(t, Ours)), Ours(ctx.concurrency))
    flags = verify_flags()
    verifier = OursVerify(ctx.concurrency, flags) if flags is not None else None
    with ctx.server(sid) as server:
        for n in sizes.s6_files:
            ctx.log(f"{sid} {n:,} files")
            name = f"s6-{n}"
            repo = ctx.repos.small(name, n, sizes.small_size, seed=600 + len(result.rss_rows))
            row = RssRow(files=len(repo.mirrored_files()))
            bucket = _bucket_name(sid, ours, n)
            server.endpoint.make_bucket(bucket)
            slot = ctx.slot(bucket)
            dest = Dest(server.endpoint, bucket)
            run = _timed_run(ctx, result, ours, repo, dest, slot, server.root)
            if run is not None:
                row.upload_rss, row.upload_seconds = run.max_rss, run.seconds
                noop = _timed_run(ctx, result, ours, repo, dest, slot, server.root, check=False)
                row.noop_rss = noop.max_rss if noop else None
                if verifier is not None:
                    checked = _timed_run(
                        ctx, result, verifier, repo, dest, slot, server.root, check=False
                    )
                    row.verify_rss = checked.max_rss if checked else None
            result.rss_rows.append(row)
            shutil.rmtree(server.root / bucket, ignore_errors=True)
            shutil.rmtree(slot, ignore_errors=True)
            ctx.repos.drop(name)
    if verifier is None:
        result.notes.append("`backrest-relay verify` does not exist yet: no verify column.")
    result.notes.append(
        "Peak RSS is ru_maxrss of the agent process (wait4), one run per size: the full "
        "mirror into a fresh bucket, then a run with nothing new"
        + (", then verify." if verifier else ".")
    )
    return result

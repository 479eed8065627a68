"""`python -m bench [--quick] [--scenarios S1,S3] [--runs N] [--out docs/benchmarks.md]`."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench.data import RepoCache
from bench.machine import describe
from bench.measure import BenchError
from bench.put_cost import measure as measure_put_cost
from bench.report import Report, RunInfo, render, summary_table
from bench.scenarios import (
    BigMirror,
    Context,
    ScenarioResult,
    full_mirror,
    incremental,
    memory,
    nothing_new,
    verification,
    verification_pairs,
    warm_up,
)
from bench.sizes import QUICK_SCALE, SCENARIOS, Sizes
from bench.tools import ROOT, Ours, Rclone, RcloneCheck, S5cmd, Tool, verify_flags

TMPFS = Path("/dev/shm")


def parse_scale(values: Sequence[str], quick: bool) -> dict[str, float]:
    """`--scale 0.5` (every scenario) and/or `--scale S6=0.1` (one), applied in order."""
    factors = dict.fromkeys(SCENARIOS, QUICK_SCALE if quick else 1.0)
    for value in values:
        for item in value.split(","):
            sid, sep, num = item.partition("=")
            if not sep:
                factors = dict.fromkeys(SCENARIOS, float(sid))
                continue
            sid = sid.strip().upper()
            if sid not in SCENARIOS:
                raise SystemExit(f"bench: unknown scenario {sid!r} in --scale")
            factors[sid] = float(num)
    if any(not 0 < f <= 1 for f in factors.values()):
        raise SystemExit("bench: --scale factors must be in (0, 1]")
    return factors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="backrest-relay vs rclone sync and s5cmd sync on a local rclone serve s3.",
    )
    p.add_argument("--quick", action="store_true", help=f"every size ×{QUICK_SCALE:g}")
    p.add_argument(
        "--scale",
        action="append",
        default=[],
        metavar="[S=]F",
        help="size factor in (0, 1], for all scenarios or one (S6=0.1); repeatable",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated subset of " + ",".join(SCENARIOS),
    )
    p.add_argument(
        "--tools",
        default="ours,rclone,s5cmd",
        help="comma-separated tools to run (ours and rclone always; for re-measuring one "
        "scenario into an earlier report with `python -m bench.merge`)",
    )
    p.add_argument("--runs", type=int, default=3, help="timed runs per tool (default 3)")
    p.add_argument("--concurrency", type=int, default=8, help="for every tool (default 8)")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="report to write (default docs/benchmarks.md; '-' for stdout only)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: write the report again from a run's raw results "
        "(bench/results/*.json)",
    )
    p.add_argument(
        "--reason",
        default="",
        help="why the sizes were reduced, written into the report next to the sizes",
    )
    return p


def _workdir() -> tuple[Path, str]:
    if TMPFS.is_dir() and os.access(TMPFS, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="backrest-relay-bench-", dir=TMPFS)), (
            f"tmpfs ({TMPFS})"
        )
    return Path(tempfile.mkdtemp(prefix="backrest-relay-bench-")), "disk (no tmpfs available)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render is not None:
        report = Report.from_dict(json.loads(args.render.read_text()))
        write_report(report, args.out)
        return 0
    selected = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in selected if s not in SCENARIOS]
    if unknown or not selected:
        raise SystemExit(f"bench: unknown scenarios {unknown}; choose from {SCENARIOS}")
    if args.runs < 1 or args.concurrency < 1:
        raise SystemExit("bench: --runs and --concurrency must be at least 1")
    for tool in ("rclone", "s5cmd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found on PATH (run `make tools`)")
    sizes = Sizes().scaled(parse_scale(args.scale, args.quick))
    work, storage = _workdir()
    started_at = datetime.now(UTC)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    machine = describe(storage)
    wanted = {t.strip() for t in args.tools.split(",") if t.strip()} | {"ours", "rclone"}
    tools: list[Tool] = [
        tool
        for tool in (Ours(args.concurrency), Rclone(args.concurrency), S5cmd(args.concurrency))
        if tool.name in wanted
    ]
    ctx = Context(
        sizes=sizes,
        runs=args.runs,
        concurrency=args.concurrency,
        tools=tools,
        work=work,
        repos=RepoCache(work / "repos"),
        log=log,
    )
    results: dict[str, ScenarioResult] = {}
    method_notes: list[str] = []
    put_cost: dict[str, float] = {}
    log(f"work dir {work} ({storage}); scenarios {','.join(selected)}")
    for sid in selected:
        log(f"  {sid}: {sizes.describe(sid)}")
    try:
        method_notes = warm_up(ctx, work / "pycache")
        log("CPU per single PUT (python -m bench.put_cost)")
        put_cost = measure_put_cost(work / "put-cost")
        for label, ms in put_cost.items():
            log(f"  {label}: {ms:.3f} ms")
        results = run_scenarios(ctx, selected)
    except KeyboardInterrupt:
        log("interrupted; writing what was measured")
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    results_file = results_dir / f"{started_at:%Y%m%dT%H%M%SZ}.json"
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--reason" in shown[:-1]:
        shown[shown.index("--reason") + 1] = "…"  # the text is printed next to the sizes
    info = RunInfo(
        command="python -m bench " + shlex.join(shown),
        started=started_at,
        seconds=elapsed,
        runs=args.runs,
        concurrency=args.concurrency,
        sizes=sizes,
        storage=storage,
        load_after=" / ".join(f"{x:.2f}" for x in os.getloadavg()),
        results_file=str(results_file.relative_to(ROOT)),
        reason=args.reason,
    )
    commands = {t.label: t.display_command(args.concurrency) for t in tools}
    flags = verify_flags() if "S5" in selected else None
    if flags is not None and "--list-only" in flags:
        for pair in verification_pairs(args.concurrency, flags):
            for checker in pair:
                commands[checker.label] = checker.display_command(args.concurrency)
    else:
        commands[RcloneCheck.label] = RcloneCheck(args.concurrency).display_command(
            args.concurrency
        )
    report = Report(
        machine=machine,
        info=info,
        results=results,
        commands=commands,
        method_notes=method_notes,
        server_errors={k: dict(v) for k, v in ctx.server_errors.items()},
        put_cost=put_cost,
    )
    results_file.write_text(json.dumps(report.as_dict(), indent=1))
    log(f"raw results in {results_file}")
    write_report(report, args.out)
    log(f"done in {elapsed / 60:.1f} min")
    return 0


def write_report(report: Report, out: Path) -> None:
    """Render the report to `out` ('-': stdout) and print the target lines."""
    text = render(report)
    if str(out) == "-":
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    for line in summary_table(report.results):
        print(line)


def run_scenarios(ctx: Context, selected: list[str]) -> dict[str, ScenarioResult]:
    results: dict[str, ScenarioResult] = {}

    def timed(sid: str, fn: object) -> None:
        assert callable(fn)
        t0 = time.perf_counter()
        res: ScenarioResult = fn()
        res.seconds = time.perf_counter() - t0
        results[sid] = res
        ctx.log(f"{sid} done in {res.seconds:.0f}s")

    sizes = ctx.sizes
    if "S1" in selected:
        repo = ctx.repos.s1(sizes)
        timed("S1", lambda: full_mirror(ctx, "S1", "Full mirror, packs + small files", repo))
        ctx.repos.drop("s1")
    if "S2" in selected:
        repo = ctx.repos.small("s2", sizes.s2_files, sizes.small_size, seed=2)
        timed("S2", lambda: full_mirror(ctx, "S2", "Full mirror, small files", repo))
        ctx.repos.drop("s2")
    big_needed = [s for s in ("S3", "S4", "S5") if s in selected]
    if big_needed:
        needs_big = "S3" in selected or "S4" in selected or verify_flags() is not None
        big = BigMirror(ctx) if needs_big else None
        try:
            if "S3" in selected and big is not None:
                timed("S3", lambda: nothing_new(ctx, big))
            if "S4" in selected and big is not None:
                timed("S4", lambda: incremental(ctx, big))
            if "S5" in selected:
                timed("S5", lambda: verification(ctx, big))
        finally:
            if big is not None:
                big.close()
            ctx.repos.drop("big")
    if "S6" in selected:
        timed("S6", lambda: memory(ctx))
    return results

"""`python -m bench.profile SCENARIO`: where the agent spends its time in one scenario.

    python -m bench.profile S2              # full mirror of 2,000 files of 4 KiB
    python -m bench.profile S3 --files 20000  # run with nothing new over 20,000 files
    python -m bench.profile S5 --files 100000 --level list|deep  # verify --list-only | --deep 100%
    python -m bench.profile S1|S4 ...

Sets the scenario up as `python -m bench` does (local `rclone serve s3` on tmpfs, a
restic-format repository, a mirror already in place for S3-S5), then runs the agent once
under a profiler. With pyinstrument installed in the venv it is used for S3 (the agent
runs on the main thread there) — pyinstrument samples only the main thread, so the upload
scenarios use cProfile in every thread (bench/_profiled.py) and print the top entries by
cumulative time for the main thread and for the upload workers, each with its share of
that group's time. `--profiler cprofile` forces cProfile everywhere. S3 also gets
`-X importtime`'s heaviest imports, since a no-op run is mostly start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import pstats
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.cli import TMPFS
from bench.data import add_new_files, small_file_repo
from bench.sizes import KiB, Sizes
from bench.tools import PREFIX, ROOT, Dest, Ours, OursVerify, verify_flags
from testbed.repos import FakeRepo
from testbed.s3.rclone import RcloneS3Server

DEFAULT_FILES = {"S1": 0, "S2": 2_000, "S3": 20_000, "S4": 20_000, "S5": 20_000}


def _has_pyinstrument() -> bool:
    return importlib.util.find_spec("pyinstrument") is not None


def _short(func: tuple[str, int, str]) -> str:
    path, line, name = func
    if path == "~":
        return name
    for marker in ("site-packages/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("lib/"):
                path = path.split("/", 1)[-1]
            break
    else:
        with contextlib.suppress(ValueError):
            path = str(Path(path).relative_to(ROOT))
    return f"{path}:{line}({name})"


def _table(stats_file: Path, title: str, top: int, unit: str) -> list[str]:
    """Top entries by cumulative time, then by self time, as % of the group's total."""
    stats = pstats.Stats(str(stats_file))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    group_total = sum(v[2] for v in raw.values()) or 1e-9  # every self time, summed
    rows = sorted(raw.items(), key=lambda kv: kv[1][3], reverse=True)
    lines = [
        f"{title}: {group_total:.2f} s of {unit} (= 100 %)",
        f"{'cum %':>6} {'cum s':>8} {'self s':>8} {'calls':>9}  function",
    ]
    for func, (_cc, nc, tt, ct, _callers) in rows[:top]:
        lines.append(f"{ct / group_total * 100:6.1f} {ct:8.2f} {tt:8.2f} {nc:9d}  {_short(func)}")
    by_self = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    lines.append(f"  top self time ({title}):")
    for func, (_cc, nc, tt, _ct, _callers) in by_self:
        lines.append(f"{tt / group_total * 100:6.1f} {tt:8.2f} {nc:9d}  {_short(func)}")
    return lines


def _import_times(args: Sequence[str], env: dict[str, str], min_ms: float = 10) -> list[str]:
    """Imports of one agent run that take >= `min_ms`, three levels deep, as
    `-X importtime` prints them (each module after the modules it imported)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "local_agent", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    total = 0
    lines: list[str] = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2  # two spaces per nesting level
        if not cumulative.strip().isdigit():
            continue
        micros = int(cumulative)
        total += micros if depth == 0 else 0
        if depth <= 2 and micros >= min_ms * 1000:
            lines.append(f"{micros / 1e6:7.3f} s  {'  ' * depth}{name.strip()}")
    head = f"imports >= {min_ms:g} ms, 3 levels deep (-X importtime; total {total / 1e6:.2f} s):"
    return [head, *lines]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=sorted(DEFAULT_FILES), type=str.upper)
    p.add_argument("--files", type=int, help="repository size in files (default per scenario)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--profiler", choices=("auto", "cprofile", "pyinstrument"), default="auto")
    p.add_argument(
        "--timer",
        choices=("cpu", "wall"),
        default="cpu",
        help="cProfile clock: each thread's CPU time (default; no GIL/network waits) or wall",
    )
    p.add_argument("--out", type=Path, help="keep the pstats files under this path prefix")
    p.add_argument(
        "--level",
        choices=("list", "deep", "sample"),
        default="list",
        help="S5: verify --list-only, --deep 100%% or the default reads with a 1%% sample",
    )
    args = p.parse_args(argv)
    sid: str = args.scenario
    files: int = args.files or DEFAULT_FILES[sid]
    profiler = args.profiler
    if profiler == "auto":
        profiler = "pyinstrument" if sid == "S3" and _has_pyinstrument() else "cprofile"
    if profiler == "pyinstrument" and not _has_pyinstrument():
        raise SystemExit("bench.profile: pyinstrument is not installed in this Python")
    base = Path(tempfile.mkdtemp(prefix="bench-profile-", dir=TMPFS if TMPFS.is_dir() else None))
    try:
        return _profile(sid, files, profiler, args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _make_repo(sid: str, files: int, base: Path) -> FakeRepo:
    from bench.data import s1_repo

    if sid == "S1":
        sizes = Sizes()
        if files:
            sizes = Sizes(s1_bytes=max(1, files // 2) * sizes.s1_pack_size, s1_small_files=files)
        else:
            sizes = Sizes().scaled(dict.fromkeys(("S1",), 0.25))
        return s1_repo(base / "repo", sizes)
    return small_file_repo(base / "repo", files, 4 * KiB, seed=7)


def _profile(sid: str, files: int, profiler: str, args: argparse.Namespace, base: Path) -> int:
    repo = _make_repo(sid, files, base)
    print(f"{sid}: {len(repo.mirrored_files()):,} files, {repo.total_bytes / 2**20:.1f} MiB")
    bucket = "profile"
    root = base / "s3"
    seeded = sid in ("S3", "S4", "S5")
    if seeded:  # a finished mirror, made on the server's disk (see BigMirror)
        shutil.copytree(repo.root, root / bucket / PREFIX, ignore=shutil.ignore_patterns("locks"))
    else:
        root.mkdir(parents=True)
    ours = Ours(args.concurrency)
    Ours.pycache = base / "pycache"  # warm bytecode, as an installed agent has it
    slot = base / "slot"
    with RcloneS3Server(root) as server:
        if not seeded:
            server.endpoint.make_bucket(bucket)
        dest = Dest(server.endpoint, bucket)
        warm_repo = small_file_repo(base / "warm-repo", 10, 4 * KiB, seed=11)
        server.endpoint.make_bucket("warm")
        ours.run(warm_repo.root, Dest(server.endpoint, "warm"), base / "warm-slot")
        if seeded:
            ours.run(repo.root, dest, slot)  # adopt the seeded objects
        if sid == "S4":
            add_new_files(repo, max(3, len(repo.mirrored_files()) // 100), 4 * KiB, seed=8)
        tool = ours
        if sid == "S5":
            flags = verify_flags()
            if flags is None:
                raise SystemExit("bench.profile: `backrest-relay verify` does not exist yet")
            tool = OursVerify(args.concurrency, flags, args.level)
        cmd, env = tool.command(repo.root, dest, slot)
        agent_args = cmd[cmd.index("local_agent") + 1 :]
        out = args.out or base / "profile"
        if profiler == "pyinstrument":
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pyinstrument",
                    "-r",
                    "text",
                    "-m",
                    "local_agent",
                    *agent_args,
                ],
                env=env,
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
                check=False,
            )
            code = proc.returncode
        else:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench._profiled",
                    str(out),
                    args.timer,
                    "--",
                    *agent_args,
                ],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            code = proc.returncode
            if not Path(str(out) + ".json").exists():
                raise SystemExit(f"bench.profile: the profiled agent failed:\n{proc.stderr}")
            meta = json.loads(Path(str(out) + ".json").read_text())
            unit = "CPU time" if args.timer == "cpu" else "wall time"
            print(
                f"wall {meta['wall']:.2f} s, process CPU {meta['cpu']:.2f} s under cProfile "
                f"(timer: {unit}), exit {meta['exit_code']}, threads: "
                + ", ".join(f"{n}× {g}" for g, n in meta["groups"].items())
            )
            print("\n".join(_table(Path(f"{out}.main"), "main thread", args.top, unit)))
            for group in sorted(meta["groups"], key=lambda g: g != "upload"):
                stats = pstats.Stats(f"{out}.{group}")
                if sum(v[2] for v in stats.stats.values()) < 0.01:  # type: ignore[attr-defined]
                    continue  # idle helpers (deadline timer, progress)
                print()
                print("\n".join(_table(Path(f"{out}.{group}"), f"{group} threads", args.top, unit)))
            if args.out:
                print(f"\npstats files: {out}.main, {out}.workers (snakeviz/pstats)")
        if sid == "S3":
            print()
            print("\n".join(_import_times(agent_args, env)))
        if code != 0:
            print(f"agent exited {code}:\n{proc.stderr[-2000:] if proc.stderr else ''}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Run the agent's CLI under cProfile in every thread: `-m bench._profiled OUT TIMER -- ARGS`.

cProfile on its own sees only the thread that enabled it; the agent uploads on worker
threads. `threading.setprofile` gives each new thread its own profiler. Threads are
grouped by name without a trailing `-N` (`upload-3` → `upload`); each group's merged
statistics go to `OUT.<group>` (pstats files), the main thread's to `OUT.main`, and
`OUT.json` holds the wall time, exit code and groups.

TIMER `cpu` measures each thread's own CPU time (`time.thread_time`): where the work is,
without the time threads spend waiting for the GIL, the network or a lock. `wall`
measures elapsed time, waits included.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

_profiles: list[tuple[str, cProfile.Profile]] = []
_lock = threading.Lock()
_timer: Callable[[], float] = time.perf_counter


def _start_thread_profile(frame: FrameType, event: str, arg: Any) -> None:
    profile = cProfile.Profile(_timer)
    with _lock:
        _profiles.append((threading.current_thread().name, profile))
    profile.enable()  # replaces this hook for the calling thread


def main() -> int:
    global _timer
    out = Path(sys.argv[1])
    _timer = time.thread_time if sys.argv[2] == "cpu" else time.perf_counter
    argv = sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:]
    threading.setprofile(_start_thread_profile)
    main_profile = cProfile.Profile(_timer)
    started = time.perf_counter()
    cpu_started = time.process_time()
    main_profile.enable()
    code = 1
    try:
        from local_agent.cli.main import main as cli_main  # its imports are part of the cost

        code = cli_main(argv)
    finally:
        main_profile.disable()
        threading.setprofile(None)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        pstats.Stats(main_profile).dump_stats(f"{out}.main")
        groups: dict[str, list[cProfile.Profile]] = {}
        with _lock:
            for name, profile in _profiles:
                groups.setdefault(re.sub(r"[-_ ]?\d+$", "", name) or "thread", []).append(profile)
        for group, profiles in groups.items():
            merged = pstats.Stats(profiles[0])
            for profile in profiles[1:]:
                merged.add(profile)
            merged.dump_stats(f"{out}.{group}")
        Path(f"{out}.json").write_text(
            json.dumps(
                {
                    "wall": wall,
                    "cpu": cpu,
                    "exit_code": code,
                    "groups": {g: len(p) for g, p in groups.items()},
                }
            )
        )
    return code


if __name__ == "__main__":
    sys.exit(main())

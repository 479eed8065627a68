"""Spawn one command, time it and report its own peak RSS: `_launch.py RESULT CMD...`.

Run as `python -S -I bench/_launch.py`. Linux carries a process's peak RSS across
`exec`: a child forked straight from the (large) benchmark process would report at least
the benchmark's own peak. Spawned from this small launcher instead, the command's peak is
its own (the floor is this launcher's few MiB, recorded as `launcher_maxrss_kib`).
Timing happens here too, so the launcher's own start-up is not part of it.
"""

import json
import os
import sys
import time


def _own_peak_kib() -> int:
    """This process's own high-water RSS (VmHWM; ru_maxrss would include the parent's)."""
    try:
        with open("/proc/self/status") as fh:  # noqa: PTH123
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def main() -> int:
    result_path, cmd = sys.argv[1], sys.argv[2:]
    floor = _own_peak_kib()
    started = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    with open(result_path, "w") as fh:  # noqa: PTH123 - no pathlib import in the launcher
        json.dump(
            {
                "seconds": elapsed,
                "returncode": code,
                "maxrss_kib": usage.ru_maxrss,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "launcher_maxrss_kib": floor,
            },
            fh,
        )
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())

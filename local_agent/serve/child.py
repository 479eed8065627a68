"""The process one run lives in: `python -m local_agent.serve.child <cli args>`.

A run is a child process, not a thread, so the service can end one that hangs past its
deadline, and the service's memory stays flat however many runs it serves. The child asks
the kernel to end it when the service dies (a SIGKILLed service must not leave an upload
running unseen: the next trigger resumes it instead, from the state store).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the service's shutdown still ends runs
        return
    if os.getppid() != parent:  # the service died before prctl took effect
        sys.exit(1)


def main() -> int:
    parent = os.environ.get("BACKREST_RELAY_SERVE_PID", "")
    if parent.isdigit():
        _die_with_parent(int(parent))
    from local_agent.cli.main import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

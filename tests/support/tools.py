"""Locating external tools (restic, rclone, s5cmd) and building their environments.

Real-tool tests skip on a developer machine without the tool, but CI sets
``BACKREST_RELAY_REQUIRE_TOOLS=1`` so a missing tool fails loudly instead of
silently skipping the tests that prove the mirror works.
"""

from __future__ import annotations

import os
import shutil

import pytest

from testbed.repos import restic_env

__all__ = ["REQUIRE_TOOLS_ENV", "require_tool", "restic_env", "tools_required"]

REQUIRE_TOOLS_ENV = "BACKREST_RELAY_REQUIRE_TOOLS"


def tools_required() -> bool:
    """Whether a missing tool must fail the test (CI) rather than skip it."""
    return os.environ.get(REQUIRE_TOOLS_ENV, "").strip().lower() in {"1", "true", "yes"}


def require_tool(name: str) -> str:
    """Return the path of executable ``name``; skip the test, or fail it in CI, if missing."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"required tool {name!r} not found on PATH (run `make tools` / `make system-tools`)"
    if tools_required():
        pytest.fail(f"{message}; {REQUIRE_TOOLS_ENV}=1 makes real-tool tests mandatory")
    pytest.skip(message)

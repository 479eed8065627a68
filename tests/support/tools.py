"""Locating external tools (restic, rclone, s5cmd) and building their environments.

Real-tool tests skip on a developer machine without the tool, but CI sets
``BACKREST_RELAY_REQUIRE_TOOLS=1`` so a missing tool fails loudly instead of
silently skipping the tests that prove the mirror works.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REQUIRE_TOOLS_ENV = "BACKREST_RELAY_REQUIRE_TOOLS"

# Variables that would make restic (or the AWS SDK inside it) read the developer's own
# repository, password or credentials instead of the ones a test passes explicitly.
_LEAKY_PREFIXES = ("RESTIC_", "AWS_", "B2_", "RCLONE_")

_cache_dir: Path | None = None


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


def _shared_cache_dir() -> Path:
    """One throw-away restic cache per process, so nothing ever lands in ~/.cache/restic."""
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = Path(tempfile.mkdtemp(prefix="backrest-relay-restic-cache-"))
        atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    return _cache_dir


def restic_env(password: str, **extra: str) -> dict[str, str]:
    """Environment for running restic: the caller's password and nothing from the developer.

    Inherited ``RESTIC_*``/``AWS_*``/``B2_*``/``RCLONE_*`` variables are dropped so a test
    can never touch a real repository or account; ``extra`` adds variables back (for
    example ``AWS_ACCESS_KEY_ID`` for an ``s3:`` repository) and override defaults.
    ``RESTIC_CACHE_DIR`` points at a per-process temporary directory; the helpers in
    ``repos`` also pass ``--no-cache``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES)}
    env["RESTIC_PASSWORD"] = password
    env["RESTIC_CACHE_DIR"] = str(_shared_cache_dir())
    env.update(extra)
    return env

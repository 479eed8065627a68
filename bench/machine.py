"""What the benchmark ran on: CPU, memory, kernel, Python, tool versions, load."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.tools import ROOT, tool_version


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    memory: str
    kernel: str
    python: str
    rclone: str
    s5cmd: str
    agent: str
    boto3: str
    storage: str
    load_before: str

    def as_dict(self) -> dict[str, str | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Machine:
        return cls(**d)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def _agent_version() -> str:
    from local_agent import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "local_agent", "cloud"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__} (git {commit}{' + uncommitted changes' if dirty else ''})"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def describe(storage: str) -> Machine:
    load = os.getloadavg()
    return Machine(
        cpu=_cpu_model(),
        cores=os.cpu_count() or 0,
        memory=_memory(),
        kernel=f"{platform.system()} {platform.release()}",
        python=f"{platform.python_implementation()} {platform.python_version()}",
        rclone=tool_version("rclone"),
        s5cmd=tool_version("s5cmd"),
        agent=_agent_version(),
        boto3=f"boto3 {_version('boto3')}, botocore {_version('botocore')}",
        storage=storage,
        load_before=" / ".join(f"{x:.2f}" for x in load),
    )

"""The three mirror tools, as a Backrest hook would run them, over the same data.

- **backrest-relay**: `python -m local_agent upload --repo PATH --repo-id ID --config FILE
  --json`, with its state store kept per destination (a "slot" directory).
- **rclone**: a plain `rclone sync SRC remote:bucket/prefix` like the hook scripts users
  paste (no `--checksum`, no `--fast-list`), remote configured by `RCLONE_CONFIG_*`
  variables, `--transfers` = our concurrency, multipart cut-off and chunk size = ours.
- **s5cmd**: `s5cmd --numworkers N sync SRC/ s3://bucket/prefix/`, part size = our
  multipart threshold so the same files go up in one PUT.

Each tool excludes restic's transient `locks/`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from bench.measure import BenchError, Measured, run_measured
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.operations import LIST_OPERATIONS, LoggedRequest

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "bench"
PREFIX = "repo"
MULTIPART_THRESHOLD_MIB = 64  # the agent's default upload.multipart_threshold
PART_SIZE_MIB = 16  # the agent's default upload.part_size
DEEP_SAMPLE = "1%"  # S6 and warm-up: list-based verification plus a 1 % deep sample

_LEAKY = ("AWS_", "RCLONE_", "BACKREST_RELAY_", "BACKREST_CONFIG", "RESTIC_")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any cloud, rclone or agent settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY)}
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Dest:
    """Where one tool mirrors to."""

    endpoint: S3Endpoint
    bucket: str
    prefix: str = PREFIX


@dataclass
class RunResult:
    """One measured run of a tool."""

    tool: str
    seconds: float
    max_rss: int
    cpu: float = 0.0  # user + system seconds
    requests: int | None = None  # as the tool reports it (ours only)
    uploaded: int | None = None  # files the tool says it sent (ours only)
    listed: int | None = None  # objects the agent listed (ours only; None = no listing)
    summary: dict[str, Any] | None = None


@dataclass
class RequestCount:
    """S3 requests of one run, as a counting proxy saw them."""

    by_operation: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)  # "PutObject 500" -> n

    @classmethod
    def of(cls, requests: list[LoggedRequest]) -> RequestCount:
        """Count every request; server errors (5xx, no answer) are also tallied apart."""
        failed = Counter(
            f"{r.operation} {r.status or 'no answer'}"
            for r in requests
            if r.status is None or r.status >= 500
        )
        return cls(Counter(r.operation for r in requests), failed)

    @property
    def total(self) -> int:
        return sum(self.by_operation.values())

    @property
    def lists(self) -> int:
        """Class C calls on B2 (ListObjects*, ListParts, ListMultipartUploads...)."""
        return sum(n for op, n in self.by_operation.items() if op in LIST_OPERATIONS)

    @property
    def heads(self) -> int:
        return sum(n for op, n in self.by_operation.items() if op.startswith("Head"))

    @property
    def writes(self) -> int:
        """Requests that create or change objects."""
        writes = (
            "PutObject",
            "UploadPart",
            "CreateMultipartUpload",
            "CompleteMultipartUpload",
            "CopyObject",
            "UploadPartCopy",
            "DeleteObject",
            "DeleteObjects",
        )
        return sum(n for op, n in self.by_operation.items() if op in writes)

    @property
    def gets(self) -> int:
        return self.by_operation.get("GetObject", 0)

    def breakdown(self) -> str:
        return ", ".join(f"{op} {n:,}" for op, n in self.by_operation.most_common())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"by_operation": dict(self.by_operation), "failed": dict(self.failed)}

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, int]]) -> RequestCount:
        return cls(Counter(d.get("by_operation", {})), Counter(d.get("failed", {})))


class Tool(ABC):
    """A mirror tool: how to run it against a destination, and what it reports."""

    name: ClassVar[str]
    label: ClassVar[str]

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency

    @abstractmethod
    def command(self, repo: Path, dest: Dest, slot: Path) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that mirror `repo` to `dest`.

        `slot` is a directory private to this tool and destination that lives as long as
        the destination does (the agent keeps its state there).
        """

    def display_command(self, concurrency: int) -> str:
        """The command as the report shows it."""
        return ""

    def run(self, repo: Path, dest: Dest, slot: Path, *, timeout: float = 7200) -> RunResult:
        slot.mkdir(parents=True, exist_ok=True)
        cmd, env = self.command(repo, dest, slot)
        measured = run_measured(cmd, env=env, cwd=ROOT, timeout=timeout)
        if measured.returncode != 0:
            why = "timed out" if measured.timed_out else f"exit {measured.returncode}"
            raise BenchError(f"{self.label} failed ({why}):\n{measured.tail()}")
        return self.result(measured)

    def result(self, measured: Measured) -> RunResult:
        return RunResult(self.name, measured.seconds, measured.max_rss, measured.cpu_seconds)


class Ours(Tool):
    name = "ours"
    label = "backrest-relay"
    # Where the agent's Python bytecode is cached (PYTHONPYCACHEPREFIX), as an installed
    # agent has it after its first run; None: no cache at all (every start compiles).
    pycache: ClassVar[Path | None] = None

    def display_command(self, concurrency: int) -> str:
        return (
            "python -m local_agent upload --repo REPO --repo-id bench --config FILE --json "
            f"(provider s3, concurrency {concurrency}, defaults otherwise: multipart from "
            f"{MULTIPART_THRESHOLD_MIB} MiB in {PART_SIZE_MIB} MiB parts, events off)"
        )

    def write_config(self, dest: Dest, slot: Path) -> Path:
        slot.mkdir(parents=True, exist_ok=True)
        config = slot / "config.toml"
        lines = [
            "[destination]",
            'provider = "s3"',
            f'endpoint_url = "{dest.endpoint.endpoint_url}"',
            f'region = "{dest.endpoint.region}"',
            f'bucket = "{dest.bucket}"',
            f'prefix = "{dest.prefix}"',
            f'access_key_id = "{dest.endpoint.access_key}"',
            f'secret_access_key = "{dest.endpoint.secret_key}"',
            "[upload]",
            f"concurrency = {self.concurrency}",
            "[events]",
            'publisher = "none"',
            "[state]",
            f'dir = "{slot / "state"}"',
        ]
        config.write_text("\n".join(lines) + "\n")
        return config

    def command(self, repo: Path, dest: Dest, slot: Path) -> tuple[list[str], dict[str, str]]:
        config = self.write_config(dest, slot)
        self._carry_state(config, repo, slot)
        cmd = [
            sys.executable,
            "-m",
            "local_agent",
            "upload",
            "--repo",
            str(repo),
            "--repo-id",
            REPO_ID,
            "--config",
            str(config),
            "--json",
        ]
        return cmd, self.env(slot)

    def env(self, slot: Path) -> dict[str, str]:
        env = clean_env(
            {
                "PYTHONPATH": str(ROOT),
                "XDG_STATE_HOME": str(slot / "xdg-state"),
                "XDG_CONFIG_HOME": str(slot / "xdg-config"),
            }
        )
        env.pop("PYTHONPYCACHEPREFIX", None)
        if self.pycache is None:
            env["PYTHONDONTWRITEBYTECODE"] = "1"  # never write into the venv or the checkout
        else:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(self.pycache)
        return env

    def _carry_state(self, config: Path, repo: Path, slot: Path) -> None:
        """Keep the state store when the same bucket is reached at another URL.

        The agent names its state file after the endpoint URL too; a counting run goes
        through a proxy on another port and would otherwise look like a first run (a full
        listing). The file is renamed to the name the agent will look for.
        """
        state_dir = slot / "state"
        stores = [p for p in state_dir.glob("*.sqlite") if p.name != "outbox.sqlite"]
        if not stores:
            return
        from local_agent.config import load_config
        from local_agent.mirror.state import state_file_name

        loaded = load_config(str(config), env={})
        destination = loaded.config.destination_for(repo_id=REPO_ID, repo_guid=None)
        wanted = state_dir / state_file_name(destination, str(repo.resolve()))
        for store in stores:
            if store != wanted:
                for suffix in ("", "-wal", "-shm"):
                    src = store.with_name(store.name + suffix)
                    if src.exists():
                        src.rename(wanted.with_name(wanted.name + suffix))

    def result(self, measured: Measured) -> RunResult:
        summary = _last_json(measured.stdout)
        if summary is None:
            raise BenchError(f"backrest-relay printed no JSON summary:\n{measured.tail()}")
        if summary.get("exit_code", 0) != 0 or summary.get("status") not in ("ok", None):
            raise BenchError(f"backrest-relay reported failure: {summary.get('error')}")
        return RunResult(
            self.name,
            measured.seconds,
            measured.max_rss,
            measured.cpu_seconds,
            requests=summary.get("requests"),
            uploaded=summary.get("uploaded_files"),
            listed=summary.get("listed_objects"),
            summary=summary,
        )


class Rclone(Tool):
    name = "rclone"
    label = "rclone sync"
    remote = "bench"

    def display_command(self, concurrency: int) -> str:
        return (
            f"rclone sync REPO {self.remote}:BUCKET/repo --transfers {concurrency} "
            f'--exclude "locks/**" --s3-upload-cutoff {MULTIPART_THRESHOLD_MIB}Mi '
            f"--s3-chunk-size {PART_SIZE_MIB}Mi (remote: type s3, provider Other, path style)"
        )

    def remote_env(self, endpoint: S3Endpoint, slot: Path) -> dict[str, str]:
        prefix = f"RCLONE_CONFIG_{self.remote.upper()}_"
        return clean_env(
            {
                prefix + "TYPE": "s3",
                prefix + "PROVIDER": "Other",
                prefix + "ENDPOINT": endpoint.endpoint_url,
                prefix + "ACCESS_KEY_ID": endpoint.access_key,
                prefix + "SECRET_ACCESS_KEY": endpoint.secret_key,
                prefix + "REGION": endpoint.region,
                prefix + "FORCE_PATH_STYLE": "true",
                "RCLONE_CACHE_DIR": str(slot / "rclone-cache"),
            }
        )

    def command(self, repo: Path, dest: Dest, slot: Path) -> tuple[list[str], dict[str, str]]:
        cmd = [
            _which("rclone"),
            "--config",
            "",
            "sync",
            str(repo),
            f"{self.remote}:{dest.bucket}/{dest.prefix}",
            "--transfers",
            str(self.concurrency),
            "--exclude",
            "locks/**",
            "--s3-upload-cutoff",
            f"{MULTIPART_THRESHOLD_MIB}Mi",
            "--s3-chunk-size",
            f"{PART_SIZE_MIB}Mi",
        ]
        return cmd, self.remote_env(dest.endpoint, slot)


class S5cmd(Tool):
    name = "s5cmd"
    label = "s5cmd sync"

    def display_command(self, concurrency: int) -> str:
        return (
            f"s5cmd --endpoint-url URL --numworkers {concurrency} sync "
            f'--exclude "*locks/*" --part-size {MULTIPART_THRESHOLD_MIB} REPO/ s3://BUCKET/repo/'
        )

    def command(self, repo: Path, dest: Dest, slot: Path) -> tuple[list[str], dict[str, str]]:
        endpoint = dest.endpoint
        cmd = [
            _which("s5cmd"),
            "--endpoint-url",
            endpoint.endpoint_url,
            "--numworkers",
            str(self.concurrency),
            "sync",
            "--exclude",
            "*locks/*",
            "--part-size",
            str(MULTIPART_THRESHOLD_MIB),
            f"{repo}/",
            f"s3://{dest.bucket}/{dest.prefix}/",
        ]
        env = clean_env(
            {
                **endpoint.env(),
                "AWS_CONFIG_FILE": str(slot / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(slot / "no-aws-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
        return cmd, env


# -- verification (S5) --------------------------------------------------------------------


VerifyLevel = Literal["sample", "list", "deep"]


class OursVerify(Ours):
    """`backrest-relay verify` with the flags its `--help` offers, at one of three levels:
    `sample` (the default reads plus a 1 % deep sample: S6, warm-up), `list` (`--list-only`,
    rclone check's level) or `deep` (`--deep 100%`: every object read back)."""

    name = "ours"
    label = "backrest-relay verify"

    def __init__(
        self, concurrency: int, flags: frozenset[str], level: VerifyLevel = "sample"
    ) -> None:
        super().__init__(concurrency)
        self.flags = flags
        self.level: VerifyLevel = level
        if level == "list" and "--list-only" not in flags:
            raise BenchError("`backrest-relay verify` has no --list-only")
        if level == "deep":
            self.name = "ours-deep"  # type: ignore[misc]
        self.label = {  # type: ignore[misc]
            "sample": "backrest-relay verify",
            "list": "backrest-relay verify --list-only",
            "deep": "backrest-relay verify --deep 100%",
        }[level]

    def _level_flags(self) -> list[str]:
        if self.level == "list":
            return ["--list-only"]
        if "--deep" not in self.flags:
            return []
        return ["--deep", DEEP_SAMPLE if self.level == "sample" else "100%"]

    def display_command(self, concurrency: int) -> str:
        shown = [
            f
            for f in ("--repo REPO", "--repo-id bench", "--config FILE")
            if f.split()[0] in self.flags
        ]
        shown += self._level_flags()
        if "--json" in self.flags:
            shown.append("--json")
        return (
            "python -m local_agent verify "
            + " ".join(shown)
            + f" (concurrency {concurrency} from the config's upload.concurrency)"
        )

    def command(self, repo: Path, dest: Dest, slot: Path) -> tuple[list[str], dict[str, str]]:
        config = self.write_config(dest, slot)
        self._carry_state(config, repo, slot)
        cmd = [sys.executable, "-m", "local_agent", "verify"]
        if "--repo" in self.flags:
            cmd += ["--repo", str(repo)]
        if "--repo-id" in self.flags:
            cmd += ["--repo-id", REPO_ID]
        if "--config" in self.flags:
            cmd += ["--config", str(config)]
        cmd += self._level_flags()
        if "--json" in self.flags:
            cmd.append("--json")
        return cmd, self.env(slot)

    def result(self, measured: Measured) -> RunResult:
        summary = _last_json(measured.stdout)
        requests = summary.get("requests") if summary else None
        return RunResult(
            self.name,
            measured.seconds,
            measured.max_rss,
            measured.cpu_seconds,
            requests=requests if isinstance(requests, int) else None,
            summary=summary,
        )


class RcloneCheck(Rclone):
    """`rclone check`: sizes and MD5s of every file against the bucket listing's ETags;
    with `download`, every object downloaded and compared with the local file."""

    name = "rclone"
    label = "rclone check"

    def __init__(self, concurrency: int, *, download: bool = False) -> None:
        super().__init__(concurrency)
        self.download = download
        if download:
            self.name = "rclone-deep"  # type: ignore[misc]
            self.label = "rclone check --download"  # type: ignore[misc]

    def display_command(self, concurrency: int) -> str:
        if self.download:
            return (
                f"rclone check REPO {self.remote}:BUCKET/repo --download --checkers "
                f'{concurrency} --exclude "locks/**" (every object downloaded and compared '
                "byte for byte with the local file)"
            )
        return (
            f"rclone check REPO {self.remote}:BUCKET/repo --checkers {concurrency} "
            '--exclude "locks/**" (size + MD5 of every file against the listing)'
        )

    def command(self, repo: Path, dest: Dest, slot: Path) -> tuple[list[str], dict[str, str]]:
        cmd = [
            _which("rclone"),
            "--config",
            "",
            "check",
            str(repo),
            f"{self.remote}:{dest.bucket}/{dest.prefix}",
            "--checkers",
            str(self.concurrency),
            "--exclude",
            "locks/**",
        ]
        if self.download:
            cmd.append("--download")
        return cmd, self.remote_env(dest.endpoint, slot)


def verify_flags() -> frozenset[str] | None:
    """The flags of `backrest-relay verify`, or None if the subcommand does not exist."""
    proc = subprocess.run(
        [sys.executable, "-m", "local_agent", "verify", "--help"],
        env=clean_env({"PYTHONPATH": str(ROOT)}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        return None
    return frozenset(w.rstrip(",") for w in proc.stdout.split() if w.startswith("--"))


# -- helpers ------------------------------------------------------------------------------


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                return parsed
    return None


def _which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} not found on PATH (run `make tools`)")
    return path


def tool_version(name: str) -> str:
    """First line of `NAME version`, or 'missing'."""
    path = shutil.which(name)
    if path is None:
        return "missing"
    proc = subprocess.run(
        [path, "version"], capture_output=True, text=True, timeout=30, check=False
    )
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"

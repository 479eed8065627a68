"""Running the real agent in tests: config files and the CLI as a subprocess or in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.s3.endpoint import S3Endpoint

ROOT = Path(__file__).resolve().parents[1]


def write_agent_config(
    path: Path,
    endpoint: S3Endpoint,
    bucket: str,
    *,
    state_dir: Path,
    prefix: str = "restic/{repo_id}",
    provider: str = "s3",
    upload: Mapping[str, Any] | None = None,
    events: Mapping[str, Any] | None = None,
) -> Path:
    """A config.toml pointing the agent at a test endpoint."""
    upload_section = {"concurrency": 4, **(upload or {})}
    lines = [
        "[destination]",
        f'provider = "{provider}"',
        f'endpoint_url = "{endpoint.endpoint_url}"',
        f'region = "{endpoint.region}"',
        f'bucket = "{bucket}"',
        f'prefix = "{prefix}"',
        f'access_key_id = "{endpoint.access_key}"',
        f'secret_access_key = "{endpoint.secret_key}"',
        "[upload]",
        *(f"{k} = {json.dumps(v)}" for k, v in upload_section.items()),
        "[events]",
        *(f"{k} = {json.dumps(v)}" for k, v in {"publisher": "none", **(events or {})}.items()),
        "[state]",
        f'dir = "{state_dir}"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_config_in(directory: Path, endpoint: S3Endpoint, bucket: str, **settings: Any) -> Path:
    """`write_agent_config` for a test's own directory: `relay.toml` in it, state in
    `state/` under it."""
    return write_agent_config(
        directory / "relay.toml", endpoint, bucket, state_dir=directory / "state", **settings
    )


def upload_args(
    config: Path | str,
    repo: Path | str,
    *extra: str,
    repo_id: str | None = "home",
    repo_guid: str | None = None,
    trigger: str | None = None,
    json_summary: bool = True,
) -> list[str]:
    """`backrest-relay upload ...` as a Backrest hook runs it; `extra` goes last."""
    args = ["upload", "--repo", str(repo)]
    if repo_id is not None:
        args += ["--repo-id", repo_id]
    if repo_guid is not None:
        args += ["--repo-guid", repo_guid]
    if trigger is not None:
        args += ["--trigger", trigger]
    args += ["--config", str(config)]
    if json_summary:
        args.append("--json")
    return [*args, *extra]


@dataclass
class AgentResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict[str, Any]:
        """The `--json` summary (the last JSON line on stdout)."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                parsed: dict[str, Any] = json.loads(line)
                return parsed
        raise AssertionError(f"no JSON summary on stdout:\n{self.stdout}\n{self.stderr}")


def agent_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the agent: no AWS settings of the host leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "BACKREST_RELAY_", "BACKREST_CONFIG"))
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


# Root reads every file whatever its mode, so "a pack the agent cannot read" needs root
# without the two capabilities that bypass file permissions (tests run as root in CI).
# Files restic writes (owner root, mode 0400, folders 0700) stay readable by their owner.
_DROP_FILE_OVERRIDE = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
    "--",
)


def slow_directory_reads(microseconds: int) -> list[str]:
    """A command prefix that delays every directory read (``getdents64``) of the command by
    ``microseconds``, as a slow NAS or NFS mount does: it widens the time a scan of a
    repository takes, so another restic client can finish a backup in the middle of it."""
    strace = shutil.which("strace")
    if strace is None:
        raise RuntimeError("strace not found on PATH (needed to slow directory reads)")
    inject = f"getdents64:delay_exit={microseconds}"
    return [
        strace,
        "-f",
        "-qq",
        "-o",
        os.devnull,
        "-e",
        "trace=getdents64",
        "-e",
        f"inject={inject}",
    ]


def agent_command(
    args: Sequence[str], *, honour_file_modes: bool = False, wrapper: Sequence[str] = ()
) -> list[str]:
    """The agent's command line; ``honour_file_modes`` makes a root agent subject to file
    permissions (``chmod 000`` then really makes a file unreadable to it); ``wrapper`` is a
    command prefix such as ``slow_directory_reads(...)``."""
    prefix = list(_DROP_FILE_OVERRIDE) if honour_file_modes and os.geteuid() == 0 else []
    return [*wrapper, *prefix, sys.executable, "-m", "local_agent", *args]


def run_agent(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    cwd: Path | None = None,
    honour_file_modes: bool = False,
) -> AgentResult:
    """Run `backrest-relay ARGS` as a separate process, as Backrest would
    (`honour_file_modes`: see `agent_command`)."""
    proc = subprocess.run(
        agent_command(args, honour_file_modes=honour_file_modes),
        env=agent_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )
    return AgentResult(proc.returncode, proc.stdout, proc.stderr)


def start_agent(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    honour_file_modes: bool = False,
    wrapper: Sequence[str] = (),
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        agent_command(args, honour_file_modes=honour_file_modes, wrapper=wrapper),
        env=agent_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def remote_keys(endpoint: S3Endpoint, bucket: str, prefix: str = "") -> dict[str, int]:
    """Key → size of every object under `prefix` (a test's independent view of the bucket)."""
    client = endpoint.client()
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = item["Size"]
    return out


def unfinished_uploads(endpoint: S3Endpoint, bucket: str) -> list[str]:
    return [key for key, _ in unfinished_upload_ids(endpoint, bucket)]


def unfinished_upload_ids(endpoint: S3Endpoint, bucket: str) -> list[tuple[str, str]]:
    """(key, upload id) of every multipart upload started and neither completed nor aborted."""
    client = endpoint.client()
    try:
        resp = client.list_multipart_uploads(Bucket=bucket)
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
            return []
        raise
    return [(u["Key"], u["UploadId"]) for u in resp.get("Uploads", [])]


def remote_etags(endpoint: S3Endpoint, bucket: str, prefix: str = "") -> dict[str, tuple[int, str]]:
    """Key → (size, ETag) of every object under ``prefix``: enough to tell whether a run
    added, replaced or removed anything (an ETag ending in ``-N`` marks a multipart object)."""
    client = endpoint.client()
    out: dict[str, tuple[int, str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = (item["Size"], item["ETag"].strip('"'))
    return out

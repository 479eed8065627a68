"""Local mode from the command line, as a new user meets it (issue 14, points 5–9).

Real restic repositories, `rclone serve s3`, the agent as a subprocess, and local HTTP
receivers standing in for Apprise and Healthchecks.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from local_agent.report import progress as progress_module
from testbed.agent import agent_config_in, agent_env, run_agent, upload_args, write_agent_config
from testbed.repos import (
    make_restic_repo,
    restic_backup,
    restic_check_mirror,
)
from testbed.s3.faults import Fault
from testbed.s3.operations import RequestInfo
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from tests.support.sinks import HttpSink

REPO_ID = "home"


def small_restic_repo(base: Path, password: str, *, seed: int = 1) -> Path:
    """A real restic repository with one small snapshot (a few hundred KiB)."""
    repo = base / "repo"
    source = base / "src"
    source.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(4):
        (source / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(20_000, 120_000)))
    make_restic_repo(repo, password)
    restic_backup(repo, password, source)
    return repo


def restic_repo_id(repo: Path, password: str) -> str:
    """restic's own repository id (what Backrest stores as the repository's guid)."""
    out = subprocess.run(
        ["restic", "-r", str(repo), "cat", "config"],
        env={**agent_env(), "RESTIC_PASSWORD": password},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    repo_id: str = json.loads(out)["id"]
    return repo_id


def local_config(
    tmp_path: Path,
    server: RcloneS3Server,
    bucket: str,
    *,
    notify: Mapping[str, Any] | None = None,
    upload: Mapping[str, Any] | None = None,
    extra: str = "",
) -> Path:
    config = agent_config_in(
        tmp_path,
        server.endpoint,
        bucket,
        events={"publisher": "local"},
        upload=upload,
    )
    if notify:
        with config.open("a") as fh:
            fh.write("[notify]\n")
            for key, value in notify.items():
                if isinstance(value, dict):
                    inner = ", ".join(f'"{k}" = {json.dumps(v)}' for k, v in value.items())
                    fh.write(f"{key} = {{ {inner} }}\n")
                else:
                    fh.write(f"{key} = {json.dumps(value)}\n")
    if extra:
        with config.open("a") as fh:
            fh.write(textwrap.dedent(extra))
    return config


# -- 9. rough edges ------------------------------------------------------------------------------


def test_status_is_a_table_when_piped_and_json_only_with_json(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    repo = small_restic_repo(tmp_path, restic_password)
    config = local_config(tmp_path, rclone_server, rclone_bucket)
    up = run_agent(["upload", "--repo", str(repo), "--repo-id", REPO_ID, "--config", str(config)])
    assert up.returncode == 0, up.stderr

    piped = run_agent(["status", "--config", str(config)])  # stdout is a pipe, as under cron
    assert piped.returncode == 0, piped.stderr
    assert not piped.stdout.lstrip().startswith("{"), piped.stdout
    assert "REPOSITORY" in piped.stdout and REPO_ID in piped.stdout

    as_json = run_agent(["status", "--json", "--config", str(config)])
    [row] = json.loads(as_json.stdout)["repositories"]
    assert row["repo_id"] == REPO_ID and row["last_verified_at"]

    report = tmp_path / "status.html"
    html = run_agent(["status", "--html", str(report), "--config", str(config)])
    assert html.returncode == 0, html.stderr
    assert report.read_text().lstrip().lower().startswith("<!doctype html")
    assert not html.stdout.lstrip().startswith("{")
    to_stdout = run_agent(["status", "--html", "-", "--config", str(config)])
    assert to_stdout.stdout.lstrip().lower().startswith("<!doctype html"), to_stdout.stdout[:200]

    nowhere = tmp_path / "no-such-dir" / "status.html"
    refused = run_agent(["status", "--html", str(nowhere), "--config", str(config)])
    assert refused.returncode == 2, refused.stderr
    assert str(nowhere) in refused.stderr and "unexpected" not in refused.stderr, refused.stderr


def test_global_flags_are_accepted_before_or_after_the_subcommand(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    config = str(local_config(tmp_path, rclone_server, rclone_bucket))
    for args in (
        ["-v", "--config", config, "status"],
        ["status", "-v", "--config", config],
        ["--config", config, "status", "--verbose"],
        ["-v", "status", "--config", config],
    ):
        result = run_agent(args)
        assert result.returncode == 0, (args, result.stderr)
        assert "no runs recorded" in result.stdout, (args, result.stdout)


def test_hook_snippet_prints_both_hooks(tmp_path: Path) -> None:
    env = {"BACKREST_CONFIG": str(tmp_path / "absent.json")}
    text = run_agent(["hook-snippet", "--repo-id", REPO_ID], env=env)
    assert text.returncode == 0, text.stderr
    commands = [line for line in text.stdout.splitlines() if not line.startswith("#") and line]
    assert len(commands) == 2, text.stdout
    assert " upload " in commands[0] and " report-failure " in commands[1]
    assert "CONDITION_CHECK_SUCCESS" in text.stdout and "CONDITION_CHECK_ERROR" in text.stdout

    as_json = run_agent(["hook-snippet", "--repo-id", REPO_ID, "--format", "json"], env=env)
    hooks = json.loads(as_json.stdout)
    assert [h["conditions"] for h in hooks] == [
        ["CONDITION_CHECK_SUCCESS"],
        ["CONDITION_CHECK_ERROR"],
    ]
    one = run_agent(
        ["hook-snippet", "--repo-id", REPO_ID, "--format", "json", "--hook", "failure"], env=env
    )
    assert json.loads(one.stdout)["conditions"] == ["CONDITION_CHECK_ERROR"]


_NO_MOTO = """
import importlib.abc, sys
class NoMoto(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "moto" or name.startswith("moto."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoMoto())
from local_agent.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_demo_without_the_demo_extra_says_how_to_install_it_before_building(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _NO_MOTO, "demo"],
        env={**agent_env(), "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "pipx install 'backrest-relay[demo]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "[1]" not in proc.stdout  # no repository was built first
    assert not list(tmp_path.glob("backrest-relay-demo-*"))


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_rate_comes_from_a_warm_up_window_not_the_scan() -> None:
    class Sink:
        def write(self, _: str) -> int:
            return 0

        def flush(self) -> None:
            pass

    clock = _Clock()
    progress = progress_module.Progress(Sink(), tty=False, clock=clock)  # type: ignore[arg-type]
    progress.start()
    progress.close()
    clock.now += 30  # scanning and hashing the repository: no transfer yet
    progress.add_work(files=10, size=200_000_000)
    clock.now += 1
    progress.advance(size=1_000)  # the first second of the first file
    early = progress.line()
    assert "ETA —" in early and "B/s" not in early, early
    for _ in range(10):  # then 10 MB/s for 10 s
        clock.now += 1
        progress.advance(size=10_000_000)
    line = progress.line()
    rate = progress.rate()
    assert rate is not None and 9_000_000 < rate < 11_000_000, line
    assert clock.now - 1000.0 > progress_module.WARMUP
    assert "ETA" in line and "ETA —" not in line


def test_counts_are_pluralised(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    repo = small_restic_repo(tmp_path, restic_password)
    config = local_config(tmp_path, rclone_server, rclone_bucket)
    dry = run_agent(
        ["upload", "--repo", str(repo), "--repo-id", REPO_ID, "--config", str(config), "--dry-run"]
    )
    assert dry.returncode == 0, dry.stderr
    assert "1 file " in dry.stdout or dry.stdout.rstrip().endswith("1 file"), dry.stdout
    assert "1 files" not in dry.stdout + dry.stderr


# -- 7. one identity per repository --------------------------------------------------------------


def write_backrest_config(path: Path, repos: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"modno": 1, "instance": "test", "repos": repos}))
    return path


def backrest_knows(tmp_path: Path, repo: Path, password: str) -> tuple[str, dict[str, str]]:
    """Backrest's config naming `repo` as `home` under its guid: that guid, and the
    environment that points the agent at the config."""
    guid = restic_repo_id(repo, password)
    backrest = write_backrest_config(
        tmp_path / "backrest.json", [{"id": REPO_ID, "uri": f"local:{repo}", "guid": guid}]
    )
    return guid, {"BACKREST_CONFIG": str(backrest)}


def hook_args(repo: str, guid: str) -> list[str]:
    """What Backrest's success hook passes."""
    return ["upload", "--repo", repo, "--repo-id", REPO_ID, "--repo-guid", guid]


def status_rows(config: Path, env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    result = run_agent(["status", "--json", "--config", str(config)], env=env)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)["repositories"]
    return rows


def mirror_check(server: RcloneS3Server, bucket: str, password: str) -> None:
    restic_check_mirror(server.endpoint, bucket, f"restic/{REPO_ID}", password, read_data=False)


def test_every_command_records_under_backrests_guid(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    repo = small_restic_repo(tmp_path, restic_password)
    guid, env = backrest_knows(tmp_path, repo, restic_password)
    config = str(local_config(tmp_path, rclone_server, rclone_bucket))

    hook = run_agent(
        upload_args(
            config,
            f"local:{repo}",
            repo_id=REPO_ID,
            repo_guid=guid,
            trigger="CONDITION_CHECK_SUCCESS",
            json_summary=False,
        ),
        env=env,
    )
    assert hook.returncode == 0, hook.stderr
    failed = run_agent(
        ["report-failure", "--repo-id", REPO_ID, "--error", "check failed", "--config", config],
        env=env,
    )
    assert failed.returncode == 0, failed.stderr
    manual = run_agent(
        ["upload", "--repo", str(repo), "--repo-id", REPO_ID, "--config", config], env=env
    )
    assert manual.returncode == 0, manual.stderr
    by_id = run_agent(["upload", "--repo-id", REPO_ID, "--config", config], env=env)
    assert by_id.returncode == 0, by_id.stderr

    rows = status_rows(Path(config), env)
    assert [(r["repo_key"], r["repo_id"]) for r in rows] == [(guid, REPO_ID)], rows

    verify = run_agent(["verify", "--repo-id", REPO_ID, "--config", config], env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert [r["repo_key"] for r in status_rows(Path(config), env)] == [guid]
    mirror_check(rclone_server, rclone_bucket, restic_password)


def hook_ran_without_backrest_config(
    tmp_path: Path, server: RcloneS3Server, bucket: str, password: str
) -> tuple[Path, str, dict[str, str], str]:
    """A repository the hook mirrored once, on a host where Backrest's config.json is not
    readable: (repository, its guid, the environment, the config file)."""
    repo = small_restic_repo(tmp_path, password)
    guid = restic_repo_id(repo, password)
    env = {"BACKREST_CONFIG": str(tmp_path / "not-here.json")}
    config = str(local_config(tmp_path, server, bucket))
    hook = run_agent(
        upload_args(config, repo, repo_id=REPO_ID, repo_guid=guid, json_summary=False), env=env
    )
    assert hook.returncode == 0, hook.stderr
    return repo, guid, env, config


def test_a_path_that_is_not_backrests_repository_is_not_recorded_under_its_guid(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    """`upload --repo OTHER --repo-id home` where Backrest's `home` is another repository:
    the other one was mirrored into home's (empty) prefix, recorded and verified under
    home's guid, and identities.json learned that OTHER's config is home's."""
    repo = small_restic_repo(tmp_path / "a", restic_password)
    other = small_restic_repo(tmp_path / "b", restic_password, seed=2)
    guid, env = backrest_knows(tmp_path, repo, restic_password)
    config = str(local_config(tmp_path, rclone_server, rclone_bucket))
    wrong = run_agent(
        ["upload", "--repo", str(other), "--repo-id", REPO_ID, "--config", config], env=env
    )
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert str(other) in wrong.stderr and str(repo) in wrong.stderr, wrong.stderr
    assert not list(rclone_server.bucket_path(rclone_bucket).rglob("config")), "it mirrored"
    identities = tmp_path / "state" / "identities.json"
    assert not identities.exists() or guid not in identities.read_text()

    right = run_agent(
        ["upload", "--repo", str(repo), "--repo-id", REPO_ID, "--config", config], env=env
    )
    assert right.returncode == 0, right.stderr
    assert [r["repo_key"] for r in status_rows(Path(config), env)] == [guid]


def test_without_backrests_config_the_guid_learned_from_the_hook_is_used(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    """Backrest in Docker: its config.json is not readable on this host."""
    repo, guid, env, config = hook_ran_without_backrest_config(
        tmp_path, rclone_server, rclone_bucket, restic_password
    )
    for args in (
        ["report-failure", "--repo-id", REPO_ID, "--error", "boom"],
        ["report-failure", "--repo", str(repo), "--error", "boom"],
        ["upload", "--repo", str(repo), "--repo-id", REPO_ID],
    ):
        result = run_agent([*args, "--config", config], env=env)
        assert result.returncode == 0, (args, result.stderr)
    rows = status_rows(Path(config), env)
    assert [(r["repo_key"], r["repo_id"]) for r in rows] == [(guid, REPO_ID)], rows
    verify = run_agent(["verify", "--repo-id", REPO_ID, "--config", config], env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    mirror_check(rclone_server, rclone_bucket, restic_password)


def test_status_forget_drops_a_repository(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    _repo, guid, env, config = hook_ran_without_backrest_config(
        tmp_path, rclone_server, rclone_bucket, restic_password
    )
    gone = run_agent(["report-failure", "--repo-id", "old-nas", "--config", config], env=env)
    assert gone.returncode == 0, gone.stderr
    assert {r["repo_id"] for r in status_rows(Path(config), env)} == {REPO_ID, "old-nas"}

    forgot = run_agent(["status", "--forget", "old-nas", "--config", config], env=env)
    assert forgot.returncode == 0, forgot.stderr
    assert "forgot repository old-nas: 1 run removed" in forgot.stdout
    assert [r["repo_key"] for r in status_rows(Path(config), env)] == [guid]
    unknown = run_agent(["status", "--forget", "nope", "--config", config], env=env)
    assert unknown.returncode == 2 and "not in the run store" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    by_guid = run_agent(["status", "--forget", guid[:12], "--config", config], env=env)
    assert by_guid.returncode == 0, by_guid.stderr
    assert status_rows(Path(config), env) == []


# -- 8. one B2 key, one prefix -------------------------------------------------------------------


def prefix_restricted(allowed: str) -> Any:
    """A fault hook that answers like a B2 key whose namePrefix is `allowed` (a plain string
    prefix): objects and listings outside it are AccessDenied."""

    def hook(info: RequestInfo) -> Fault | None:
        key = info.key
        if key is None:
            listed = info.query.get("prefix", [""])[0]
            if info.bucket and info.method == "GET" and not listed.startswith(allowed):
                return Fault.s3_error(403, "AccessDenied", "not entitled")
            return None
        if not key.startswith(allowed):
            return Fault.s3_error(403, "AccessDenied", "not entitled")
        return None

    return hook


def doctor_args(repo: Path, config: Path) -> list[str]:
    return ["doctor", "--repo", str(repo), "--repo-id", REPO_ID, "--config", str(config)]


def deny(inner: Any, refused: Callable[[RequestInfo], bool], capability: str) -> Any:
    """A B2 key without one capability: what `refused` picks is AccessDenied, the rest goes
    on to `inner`."""

    def hook(info: RequestInfo) -> Fault | None:
        if refused(info):
            return Fault.s3_error(403, "AccessDenied", f"no {capability}")
        result: Fault | None = inner(info)
        return result

    return hook


def deny_deletes(inner: Any) -> Any:
    return deny(inner, lambda info: info.method == "DELETE", "deleteFiles")


def test_one_key_limited_to_the_repository_prefix_covers_everything_the_agent_writes(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    repo = small_restic_repo(tmp_path, restic_password)
    guid = restic_repo_id(repo, restic_password)
    env = {"BACKREST_CONFIG": str(tmp_path / "not-here.json")}
    with S3Proxy(rclone_server.endpoint, fault=prefix_restricted(f"restic/{REPO_ID}")) as proxy:
        config = agent_config_in(
            tmp_path,
            proxy.endpoint,
            rclone_bucket,
            events={"publisher": "local"},
        )
        doctor = run_agent(
            ["doctor", "--repo", str(repo), "--repo-id", REPO_ID, "--config", str(config)], env=env
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert f"under restic/{REPO_ID}.relay/manifests/" in doctor.stdout, doctor.stdout

        up = run_agent([*hook_args(str(repo), guid), "--json", "--config", str(config)], env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        manifest_key = up.summary["manifest"]["key"]
        assert manifest_key.startswith(f"restic/{REPO_ID}.relay/manifests/"), manifest_key
        assert up.summary["verification"]["verified"] is True, up.summary
        assert not any(r.fault for r in proxy.requests), "the agent left its prefix"

        # The old default (or any manifest prefix outside the key's prefix): doctor must say so
        # instead of "everything looks right" and a failing upload.
        legacy = tmp_path / "legacy.toml"
        legacy.write_text(
            config.read_text().replace(
                "[upload]", 'manifest_prefix = ".backrest-relay/{repo_guid}/manifests"\n[upload]'
            )
        )
        refused = run_agent(
            ["doctor", "--repo-id", REPO_ID, "--repo", str(repo), "--config", str(legacy)], env=env
        )
        assert refused.returncode == 4, refused.stdout + refused.stderr
        assert "[FAIL] write permission (manifest prefix)" in refused.stdout
        assert "everything looks right" not in refused.stdout

        # With upload.delete the probe's DELETE must succeed too.
        proxy.fault = deny_deletes(prefix_restricted(f"restic/{REPO_ID}"))
        deleting = tmp_path / "delete.toml"
        deleting.write_text(config.read_text().replace("[upload]", "[upload]\ndelete = true"))
        no_delete = run_agent(
            ["doctor", "--repo-id", REPO_ID, "--repo", str(repo), "--config", str(deleting)],
            env=env,
        )
        assert no_delete.returncode == 4, no_delete.stdout
        assert "[FAIL] delete permission (repository prefix)" in no_delete.stdout
        assert "[FAIL] delete permission (manifest prefix)" in no_delete.stdout
    mirror_check(rclone_server, rclone_bucket, restic_password)


def deny_reads(inner: Any) -> Any:
    """A B2 key without `readFiles`: listing and writing work, GetObject is AccessDenied."""
    return deny(inner, lambda info: info.method == "GET" and info.key is not None, "readFiles")


def test_doctor_fails_a_key_that_cannot_read_back_in_local_mode(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    """Local mode reads every new object back: a key without `readFiles` makes every run
    "could not verify", so doctor must not call it "everything looks right"."""
    repo = small_restic_repo(tmp_path, restic_password)
    env = {"BACKREST_CONFIG": str(tmp_path / "not-here.json")}
    fault = deny_reads(prefix_restricted(f"restic/{REPO_ID}"))
    with S3Proxy(rclone_server.endpoint, fault=fault) as proxy:
        config = write_agent_config(
            tmp_path / "relay.toml",
            proxy.endpoint,
            rclone_bucket,
            state_dir=tmp_path / "state",
            events={"publisher": "local"},
        )
        doctor = run_agent(doctor_args(repo, config), env=env)
        assert doctor.returncode == 4, doctor.stdout + doctor.stderr
        assert "[FAIL] read permission (repository prefix)" in doctor.stdout, doctor.stdout
        assert "[FAIL] read permission (manifest prefix)" in doctor.stdout, doctor.stdout
        assert "everything looks right" not in doctor.stdout

        proxy.fault = prefix_restricted(f"restic/{REPO_ID}")
        fine = run_agent(doctor_args(repo, config), env=env)
        assert fine.returncode == 0, fine.stdout + fine.stderr
        assert "[ok  ] read permission (manifest prefix)" in fine.stdout, fine.stdout
    remote = rclone_server.bucket_path(rclone_bucket)
    assert not [p for p in remote.rglob("*") if "doctor" in p.name], "probe objects left behind"


# -- 5. the local silence alarm ------------------------------------------------------------------

HC_UUID = "7b1c2d3e-4f50-4a6b-9c8d-0e1f2a3b4c5d"


def venv_env(extra: Mapping[str, str]) -> dict[str, str]:
    """PATH with the venv's `backrest-relay` first, as after `pipx install`."""
    bin_dir = Path(sys.executable).parent
    return {"PATH": f"{bin_dir}:{agent_env()['PATH']}", **extra}


def cron_command(line: str) -> str:
    """The command part of a crontab line (after the five time fields)."""
    return line.split(None, 5)[5].replace("\\%", "%")


def run_shell(command: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", command],
        env=agent_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def systemd_exec(units: str) -> tuple[list[str], dict[str, str]]:
    """ExecStart= and Environment= of the printed service, as systemd would split them."""
    import shlex

    env: dict[str, str] = {}
    command: list[str] = []
    for line in units.splitlines():
        if line.startswith("Environment="):
            key, _, value = shlex.split(line.removeprefix("Environment="))[0].partition("=")
            env[key] = value.replace("%%", "%")
        elif line.startswith("ExecStart="):
            command = [w.replace("%%", "%") for w in shlex.split(line.removeprefix("ExecStart="))]
    return command, env


def messages(sink: HttpSink) -> list[str]:
    return [json.loads(r.body)["title"] for r in sink.requests]


def test_check_stale_alerts_through_the_channels_once_then_recovers(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    repo = small_restic_repo(tmp_path, restic_password)
    guid = restic_repo_id(repo, restic_password)
    relay_hook = "backrest-relay upload --repo {{ .ShellEscape .Repo.Uri }} </dev/null"
    hooks = [{"conditions": ["CONDITION_CHECK_SUCCESS"], "actionCommand": {"command": relay_hook}}]
    backrest = write_backrest_config(
        tmp_path / "backrest.json",
        [
            {"id": REPO_ID, "uri": str(repo), "guid": guid, "hooks": hooks},
            {"id": "nas2", "uri": "/srv/nas2", "guid": "cd" * 32, "hooks": hooks},
            {"id": "scratch", "uri": "/srv/scratch", "guid": "ef" * 32},  # not mirrored
        ],
    )
    with HttpSink() as chat, HttpSink() as healthchecks:
        config = local_config(
            tmp_path,
            rclone_server,
            rclone_bucket,
            notify={
                "urls": [f"json://127.0.0.1:{chat.port}/hook"],
                "healthchecks": {REPO_ID: f"{healthchecks.url}/{HC_UUID}"},
            },
        )
        hour = venv_env({"BACKREST_CONFIG": str(backrest), "BACKREST_RELAY_NOTIFY__MAX_AGE": "1h"})
        up = run_agent([*hook_args(str(repo), guid), "--config", str(config)], env=hour)
        assert up.returncode == 0, up.stderr
        chat.clear()
        healthchecks.clear()

        cron = run_agent(["schedule", "--print", "cron", "--config", str(config)], env=hour)
        assert cron.returncode == 0, cron.stderr
        [line] = [ln for ln in cron.stdout.splitlines() if ln and not ln.startswith("#")]
        assert str(tmp_path / "state") in line and "status --check-stale" in line

        # A mirrored repository this host never saw a run of: exit 3 and an alert.
        first = run_shell(cron_command(line), hour)
        assert first.returncode == 3, first.stderr
        assert "no run recorded for nas2" in first.stderr and "scratch" not in first.stderr
        [alert] = messages(chat)
        assert "⏰ nas2" in alert, alert

        # The systemd unit runs the same check: still stale, but no second alert.
        units = run_agent(["schedule", "--print", "systemd", "--config", str(config)], env=hour)
        command, unit_env = systemd_exec(units.stdout)
        assert "OnCalendar=hourly" in units.stdout
        again = subprocess.run(
            command,
            env=agent_env({**hour, **unit_env}),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert again.returncode == 3, again.stderr
        assert len(chat.requests) == 1, messages(chat)

        # home's window passes: one ⏰ to chat and /fail to its Healthchecks check.
        second = {**hour, "BACKREST_RELAY_NOTIFY__MAX_AGE": "1s"}
        time.sleep(1.5)
        stale = run_shell(cron_command(line), second)
        assert stale.returncode == 3, stale.stderr
        assert f"stale: {REPO_ID}" in stale.stderr
        titles = messages(chat)
        assert len(titles) == 2 and f"⏰ {REPO_ID}: no verified off-site copy" in titles[1]
        assert [r.path for r in healthchecks.requests] == [f"/{HC_UUID}/fail"]
        quiet = run_shell(cron_command(line), second)
        assert quiet.returncode == 3 and len(chat.requests) == 2  # once per stale period

        # The next verified run sends the recovery message.
        recovered = run_agent([*hook_args(str(repo), guid), "--config", str(config)], env=hour)
        assert recovered.returncode == 0, recovered.stderr
        assert "recovered" in messages(chat)[-1] and REPO_ID in messages(chat)[-1]
        count = len(chat.requests)

        # nas2 removed from Backrest and forgotten: all quiet, exit 0.
        write_backrest_config(
            backrest, [{"id": REPO_ID, "uri": str(repo), "guid": guid, "hooks": hooks}]
        )
        assert (
            run_agent(["status", "--forget", "nas2", "--config", str(config)], env=hour).returncode
            == 0
        )
        ok = run_shell(cron_command(line), hour)
        assert ok.returncode == 0, ok.stderr
        assert len(chat.requests) == count
        for text in (first.stderr, stale.stderr, cron.stdout, units.stdout):
            assert HC_UUID not in text
    mirror_check(rclone_server, rclone_bucket, restic_password)


def test_check_stale_with_an_empty_run_store_is_not_silent(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    """cron as another user / a wrong state dir: no runs at all must not mean exit 0."""
    config = local_config(
        tmp_path,
        rclone_server,
        rclone_bucket,
        notify={"healthchecks": {REPO_ID: "http://127.0.0.1:9/x"}},
    )
    result = run_agent(
        ["status", "--check-stale", "--config", str(config)],
        env={"BACKREST_CONFIG": str(tmp_path / "absent.json")},
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"no run recorded for {REPO_ID}" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_stale_says_when_backrests_config_cannot_be_used(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    """A Backrest config that exists but cannot be read (half-written, bad JSON) silently
    turned a monthly window into 26 h (a daily false alarm) and dropped Backrest's
    repositories from the check: cron mail must say why."""
    config = local_config(tmp_path, rclone_server, rclone_bucket)
    broken = tmp_path / "backrest.json"
    broken.write_text('{"repos": [')
    result = run_agent(
        ["status", "--check-stale", "--config", str(config)],
        env={"BACKREST_CONFIG": str(broken)},
    )
    assert str(broken) in result.stderr and "not valid JSON" in result.stderr, result.stderr
    assert "max_age" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

    absent = run_agent(
        ["status", "--check-stale", "--config", str(config)],
        env={"BACKREST_CONFIG": str(tmp_path / "absent.json")},
    )
    assert absent.returncode == 0, absent.stderr
    assert "absent.json" not in absent.stderr, "no Backrest on this host is not an error"


# -- 6. the staleness window follows Backrest's check schedule -----------------------------------


@pytest.mark.parametrize(
    ("expression", "interval"),
    [
        ("0 0 1 * *", timedelta(days=31)),  # Backrest's default: monthly
        ("0 3 * * *", timedelta(days=1)),
        ("@daily", timedelta(days=1)),
        ("*/15 * * * *", timedelta(minutes=15)),
        ("0 4 * * 0", timedelta(days=7)),
        ("30 2 * * 7", timedelta(days=7)),  # 7 is Sunday too
        ("0 0 * * mon", timedelta(days=7)),
        ("0 12 * * 1-5", timedelta(days=3)),  # Friday to Monday
        ("0 0 1 * 1", timedelta(days=7)),  # day of month OR Monday, as cron does
        ("0 0 1 1,7 *", timedelta(days=184)),
        ("0 0 1 */3 *", timedelta(days=92)),
        ("0 0 29 2 *", timedelta(days=4 * 365 + 1)),
        ("0 6,18 * * *", timedelta(hours=12)),
    ],
)
def test_cron_interval_is_the_longest_gap_between_runs(
    expression: str, interval: timedelta
) -> None:
    from local_agent.checkpolicy import cron_interval

    assert cron_interval(expression) == interval


@pytest.mark.parametrize("expression", ["0 0 L * *", "0 0 * * 1#2", "61 * * * *", "0 0 * *", "x"])
def test_cron_the_parser_does_not_understand_is_an_error(expression: str) -> None:
    from local_agent.checkpolicy import CronError, cron_interval

    with pytest.raises(CronError):
        cron_interval(expression)


def test_cadence_of_backrests_schedule_forms() -> None:
    from local_agent.checkpolicy import cadence_of

    assert cadence_of(None).interval == timedelta(days=31)  # Backrest's default
    assert cadence_of({"cron": "0 3 * * *", "clock": "CLOCK_LOCAL"}).interval == timedelta(days=1)
    assert cadence_of({"maxFrequencyDays": 7}).interval == timedelta(days=7)
    assert cadence_of({"maxFrequencyHours": "6"}).interval == timedelta(hours=6)
    assert cadence_of({"disabled": True}).interval is None
    daily = cadence_of({"maxFrequencyDays": 1})
    assert daily.window == timedelta(hours=26, minutes=24) and not daily.less_than_daily
    monthly = cadence_of({"cron": "0 0 1 * *"})
    assert monthly.window == timedelta(days=31) * 1.1 and monthly.less_than_daily


def test_staleness_window_follows_the_check_schedule_unless_max_age_is_set(
    tmp_path: Path,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from local_agent.config import load_config
    from local_agent.report.status import run_status

    repo = small_restic_repo(tmp_path, restic_password)
    guid = restic_repo_id(repo, restic_password)
    relay_hook = "backrest-relay upload </dev/null"
    hooks = [{"conditions": ["CONDITION_CHECK_SUCCESS"], "actionCommand": {"command": relay_hook}}]
    backrest = tmp_path / "backrest.json"

    def backrest_with(check_policy: dict[str, Any] | None) -> None:
        entry: dict[str, Any] = {"id": REPO_ID, "uri": str(repo), "guid": guid, "hooks": hooks}
        if check_policy is not None:
            entry["checkPolicy"] = check_policy
        write_backrest_config(backrest, [entry])

    backrest_with({"schedule": {"cron": "0 0 1 * *", "clock": "CLOCK_LAST_RUN_TIME"}})
    config_path = local_config(tmp_path, rclone_server, rclone_bucket)
    env = {"BACKREST_CONFIG": str(backrest)}
    up = run_agent([*hook_args(str(repo), guid), "--config", str(config_path)], env=env)
    assert up.returncode == 0, up.stderr
    verified = datetime.now(UTC)
    monkeypatch.setenv("BACKREST_CONFIG", str(backrest))
    config = load_config(str(config_path), env={}).config

    def check(after: timedelta) -> int:
        return run_status(config, as_json=True, check_stale=True, now=verified + after)

    # Monthly checks (Backrest's default): two days old is fine, 40 days is stale.
    assert check(timedelta(days=2)) == 0
    assert check(timedelta(days=40)) == 3
    backrest_with(None)  # no checkPolicy: Backrest's default, monthly
    assert check(timedelta(days=20)) == 0
    backrest_with({"schedule": {"maxFrequencyDays": 7}})
    assert check(timedelta(days=5)) == 0
    assert check(timedelta(days=9)) == 3
    # An explicit max_age wins over the schedule.
    explicit = load_config(str(config_path), env={"BACKREST_RELAY_NOTIFY__MAX_AGE": "26h"}).config
    assert (
        run_status(explicit, as_json=True, check_stale=True, now=verified + timedelta(days=2)) == 3
    )
    mirror_check(rclone_server, rclone_bucket, restic_password)


def test_doctor_and_hook_snippet_say_when_checks_run_less_than_daily(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    repo = small_restic_repo(tmp_path, restic_password)
    config = str(local_config(tmp_path, rclone_server, rclone_bucket))
    backrest = tmp_path / "backrest.json"
    env = {"BACKREST_CONFIG": str(backrest)}
    entry = {"id": REPO_ID, "uri": str(repo), "checkPolicy": {"schedule": {"cron": "0 0 1 * *"}}}
    write_backrest_config(backrest, [entry])

    doctor = run_agent(["doctor", "--repo-id", REPO_ID, "--config", config], env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    [line] = [ln for ln in doctor.stdout.splitlines() if "check schedule" in ln]
    assert line.startswith("[warn]") and "every 31 days" in line
    assert "Check Policy" in line and "structure only" in line and "daily" in line
    snippet = run_agent(["hook-snippet", "--repo-id", REPO_ID, "--config", config], env=env)
    assert snippet.returncode == 0, snippet.stderr
    assert "every 31 days" in snippet.stderr and "structure only" in snippet.stderr
    assert "every 31 days" not in snippet.stdout  # the paste-able text stays clean

    entry["checkPolicy"] = {"schedule": {"cron": "0 3 * * *"}, "structureOnly": True}
    write_backrest_config(backrest, [entry])
    daily = run_agent(["doctor", "--repo-id", REPO_ID, "--config", config], env=env)
    assert "[ok  ] check schedule: Backrest checks home every 24 h" in daily.stdout, daily.stdout
    quiet = run_agent(["hook-snippet", "--repo-id", REPO_ID, "--config", config], env=env)
    assert "structure only" not in quiet.stderr

"""The container without a container engine: the Dockerfile's steps run in a virtualenv,
hadolint lints it, and docs/docker.md's compose file and hook are checked against the Compose
specification schema and against `hook-snippet`'s output."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.support.agent import run_agent
from tests.support.s3servers import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCS = ROOT / "docs" / "docker.md"
# The Compose specification's JSON schema, vendored from compose-spec/compose-spec,
# schema/compose-spec.json at commit a08f8d51631b7127ddac3d2c65537db429d0f1d0 (2025-10-28).
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
UV = ROOT / ".cache" / "uv" / "bin" / "uv"


def instructions(stage: int = -1) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of one build stage, comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    for line in DOCKERFILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "FROM":
            stages.append([])
        stages[-1].append((word, rest.strip()))
    return stages[stage]


def one(stage: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in stage if w == word]
    assert len(found) == 1, (word, found)
    return found[0]


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(), re.S)


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    final = instructions()
    base = one(final, "FROM")
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base  # official, pinned
    assert all(one(s, "FROM").split()[0] == base for s in (instructions(0), final))
    user = one(final, "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user)  # numeric, not root
    assert json.loads(one(final, "ENTRYPOINT")) == ["backrest-relay", "serve"]
    assert "/healthz" in one(final, "HEALTHCHECK")
    assert install_step().startswith("sh scripts/docker-install.sh ")
    uv_version = re.search(r"^UV_VERSION := (\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert uv_version and f"uv=={uv_version.group(1)}" in all_of(instructions(0), "RUN")[0]


def all_of(stage: list[tuple[str, str]], word: str) -> list[str]:
    return [rest for w, rest in stage if w == word]


def install_step() -> str:
    return all_of(instructions(0), "RUN")[-1]


def test_install_step_and_entrypoint_run_in_a_virtualenv(tmp_path: Path) -> None:
    """The build stage's RUN (uv sync from uv.lock) and the final stage's ENV, ENTRYPOINT and
    HEALTHCHECK, executed here as they would be in the image."""
    if not UV.exists():
        pytest.skip("uv is installed by `make install`")
    venv = tmp_path / "opt-backrest-relay"
    run = install_step()
    command = shlex.split(run.replace("/opt/backrest-relay", str(venv)))
    env = {**os.environ, "PATH": f"{UV.parent}:{os.environ['PATH']}", "UV_OFFLINE": "1"}
    env.pop("VIRTUAL_ENV", None)
    installed = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert installed.returncode == 0, installed.stderr
    assert (venv / "bin" / "backrest-relay").exists()

    image_env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for word, rest in instructions():
        if word == "ENV":
            for assignment in shlex.split(rest):
                name, _, value = assignment.partition("=")
                image_env[name] = value.replace("$PATH", image_env["PATH"])
    image_env["PATH"] = image_env["PATH"].replace("/opt/backrest-relay", str(venv))
    image_env["XDG_STATE_HOME"] = str(tmp_path / "state")
    port = free_port()
    listen = image_env["BACKREST_RELAY_SERVE__LISTEN"]
    assert listen == "0.0.0.0:8787"
    image_env["BACKREST_RELAY_SERVE__LISTEN"] = f"0.0.0.0:{port}"
    image_env.update(
        BACKREST_RELAY_DESTINATION__BUCKET="offsite",
        BACKREST_RELAY_DESTINATION__REGION="us-west-004",
        BACKREST_RELAY_SERVE__ROOTS=json.dumps([str(tmp_path)]),
    )
    entrypoint = json.loads(one(instructions(), "ENTRYPOINT"))
    refused = subprocess.run(
        entrypoint, env=image_env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert refused.returncode == 2 and "without a token" in refused.stderr
    image_env["BACKREST_RELAY_TOKEN"] = "t" * 32
    proc = subprocess.Popen(
        entrypoint, env=image_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        healthcheck = json.loads(one(instructions(), "HEALTHCHECK").partition("CMD ")[2])
        healthcheck = [part.replace(":8787/", f":{port}/") for part in healthcheck]
        deadline = time.monotonic() + 30
        while True:
            probe = subprocess.run(
                healthcheck, env=image_env, capture_output=True, timeout=30, check=False
            )
            if probe.returncode == 0:
                break
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, probe.stderr
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert json.load(resp)["ok"] is True
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_compose_file_in_the_docs_is_valid_and_complete() -> None:
    (block,) = code_blocks("yaml")
    compose = yaml.safe_load(block)
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    backrest = compose["services"]["backrest"]
    relay = compose["services"]["backrest-relay"]
    assert backrest["image"].startswith("garethgeorge/backrest:")
    assert relay["build"]
    token = "BACKREST_RELAY_TOKEN"
    assert backrest["environment"][token] == relay["environment"][token]
    assert token in backrest["environment"][token]  # from .env, never written in the file

    def mounts(service: dict[str, object]) -> dict[str, tuple[str, str]]:
        out = {}
        for volume in service["volumes"]:  # type: ignore[attr-defined]
            source, target, *mode = str(volume).split(":")
            out[target] = (source, mode[0] if mode else "rw")
        return out

    repos_backrest, repos_relay = mounts(backrest)["/repos"], mounts(relay)["/repos"]
    assert repos_backrest[0] == repos_relay[0] and repos_relay[1] == "ro"  # same path, ro
    backrest_config = mounts(backrest)["/config"][0]
    assert mounts(relay)["/backrest-config"] == (backrest_config, "ro")
    assert relay["environment"]["BACKREST_CONFIG"] == "/backrest-config/config.json"
    assert json.loads(relay["environment"]["BACKREST_RELAY_SERVE__ROOTS"]) == ["/repos"]
    assert mounts(relay)["/state"][0] in compose["volumes"]
    assert "ports" not in relay


def test_hook_in_the_docs_is_what_hook_snippet_prints() -> None:
    result = run_agent(
        [
            "hook-snippet",
            "--repo-id",
            "my-repo",
            "--via",
            "http",
            "--url",
            "http://backrest-relay:8787",
            "--hook",
            "success",
        ],
        env={"BACKREST_RELAY_CONFIG": "", "XDG_CONFIG_HOME": "/nonexistent"},
    )
    assert result.returncode == 0, result.stderr
    script = "".join(line + "\n" for line in result.stdout.splitlines() if not line.startswith("#"))
    assert script in code_blocks("sh")


def test_the_state_volume_is_writable_by_the_user_the_docs_let_you_pick() -> None:
    """A new named volume takes the owner of the image's directory (uid 1000): with another
    PUID the relay could not write its state, so the docs must say how to hand it over."""
    final = instructions()
    owner = one(final, "USER").split(":")[0]
    assert f"--uid {owner} " in " ".join(all_of(final, "RUN")) and "chown relay:relay /state" in (
        " ".join(all_of(final, "RUN"))
    )
    (block,) = code_blocks("yaml")
    relay = yaml.safe_load(block)["services"]["backrest-relay"]
    assert relay["user"] == "${PUID:-" + owner + "}:${PGID:-" + owner + "}"
    text = " ".join(DOCS.read_text().split())
    assert (
        "docker compose run --rm --user 0 --entrypoint chown backrest-relay <PUID>:<PGID> /state"
        in text
    )

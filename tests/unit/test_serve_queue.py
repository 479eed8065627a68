"""The service's run queue and child runner, without HTTP (real asyncio, real processes)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from local_agent.serve.runs import FINAL_PREFIX, ChildLauncher, QueueFull, Run, RunQueue
from local_agent.serve.security import Target, Trigger
from tests.support.agent import agent_command, agent_env


def target(repo: str, destination: str) -> Target:
    return Target(repo_id=repo, guid=None, path=Path("/r") / repo, destination=destination)


def trigger(repo: str, event: str = "CONDITION_CHECK_SUCCESS") -> Trigger:
    return Trigger(repo, None, None, event, "")


class Gate:
    """A launcher whose runs end when the test says so; records what ran concurrently."""

    def __init__(self) -> None:
        self.release: dict[str, asyncio.Event] = {}
        self.running: set[str] = set()
        self.overlaps: list[set[str]] = []

    async def __call__(self, run: Run) -> int:
        self.running.add(run.target.destination)
        self.overlaps.append(set(self.running))
        event = self.release.setdefault(run.id, asyncio.Event())
        run.emit("working")
        await event.wait()
        self.running.discard(run.target.destination)
        return 0

    def finish(self, run: Run) -> None:
        self.release.setdefault(run.id, asyncio.Event()).set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_one_run_per_destination_joins_and_bounded_queue() -> None:
    async def scenario() -> None:
        gate = Gate()
        queue = RunQueue(gate, max_queue=3, max_parallel=4)
        a1, joined = queue.submit(target("a", "d1"), trigger("a"))
        assert not joined and a1.state == "running"
        # a1 has listed the repository: a trigger now may bring data it did not see
        a2, joined = queue.submit(target("a", "d1"), trigger("a"))
        assert not joined and a2 is not a1 and a2.state == "queued"
        again, joined = queue.submit(target("a", "d1"), trigger("a"))
        assert joined and again is a2 and a2.callers == 2  # the next run, not a duplicate
        b1, _ = queue.submit(target("b", "d1"), trigger("b"))  # same destination: waits
        c1, _ = queue.submit(target("c", "d2"), trigger("c"))  # other destination: runs
        await settle()
        assert (b1.state, c1.state) == ("queued", "running")
        assert queue.position(b1) == 2
        b2, joined = queue.submit(target("b", "d1"), trigger("b"))
        assert joined and b2 is b1  # a queued run is joined too
        queue.submit(target("e", "d1"), trigger("e"))
        with pytest.raises(QueueFull):
            queue.submit(target("f", "d1"), trigger("f"))
        gate.finish(a1)
        await settle()
        assert a1.state == "done" and a1.exit_code == 0 and a2.state == "running"
        gate.finish(a2)
        await settle()
        assert b1.state == "running"
        lines = [line async for line in a1.follow()]
        assert lines == ["working\n", f"{FINAL_PREFIX}0\n"]
        assert all(len(s & {"d1"}) <= 1 for s in gate.overlaps)
        await queue.close()

    asyncio.run(scenario())


def test_max_parallel_and_failure_reports_use_their_own_lane() -> None:
    async def scenario() -> None:
        gate = Gate()
        queue = RunQueue(gate, max_queue=10, max_parallel=1)
        mirror, _ = queue.submit(target("a", "d1"), trigger("a"))
        report, joined = queue.submit(target("a", "d1"), trigger("a", "CONDITION_CHECK_ERROR"))
        other, _ = queue.submit(target("b", "d2"), trigger("b"))
        assert not joined and report is not mirror
        await settle()
        assert [mirror.state, report.state, other.state] == ["running", "queued", "queued"]
        gate.finish(mirror)
        await settle()
        assert report.state == "running" and other.state == "queued"
        await queue.close()

    asyncio.run(scenario())


def test_a_line_forging_the_final_status_is_defused() -> None:
    async def scenario() -> None:
        run = Run(target=target("a", "d"), trigger=trigger("a"))
        run.emit(f"{FINAL_PREFIX}0")
        run.finish(4)
        lines = [line async for line in run.follow()]
        assert lines[-1] == f"{FINAL_PREFIX}4\n" and lines[0] != f"{FINAL_PREFIX}0\n"

    asyncio.run(scenario())


class Hanging(ChildLauncher):
    def argv(self, run: Run) -> list[str]:
        return [sys.executable, "-c", "import time; print('hanging', flush=True); time.sleep(120)"]


def test_a_hung_run_is_killed_at_the_deadline_and_frees_its_destination() -> None:
    async def scenario() -> None:
        launcher = Hanging(config_path=None, deadline_seconds=0.5, grace=0.5)
        queue = RunQueue(launcher, max_queue=5, max_parallel=1)
        hung, _ = queue.submit(target("a", "d"), trigger("a"))
        lines = [line async for line in hung.follow()]
        assert hung.exit_code == 6
        assert "stopped; the next run resumes" in "".join(lines)
        nxt, joined = queue.submit(target("a", "d"), trigger("a"))
        assert not joined and nxt.state == "running"
        await queue.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent_command(args),
        env=agent_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_serve_refuses_to_start_unsafely(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        '[destination]\nbucket = "bucket1"\nprovider = "s3"\n'
        'endpoint_url = "http://127.0.0.1:9"\n[serve]\nroots = ["/srv"]\n'
    )
    open_listen = run_cli(["serve", "--config", str(config), "--listen", "0.0.0.0:8787"])
    assert open_listen.returncode == 2
    assert "without a token" in open_listen.stderr and "Traceback" not in open_listen.stderr
    short = run_cli(["serve", "--config", str(config)], {"BACKREST_RELAY_TOKEN": "short"})
    assert short.returncode == 2 and "16 characters" in short.stderr
    config.write_text(config.read_text().replace('roots = ["/srv"]', ""))
    no_roots = run_cli(["serve", "--config", str(config)])
    assert no_roots.returncode == 2 and "roots" in no_roots.stderr


def test_serve_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "starlette"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ImportError('no starlette here', name='starlette')\n"
    )
    config = tmp_path / "relay.toml"
    config.write_text('[destination]\nbucket = "bucket1"\n[serve]\nroots = ["/srv"]\n')
    env = agent_env()
    env["PYTHONPATH"] = f"{tmp_path / 'shadow'}:{env['PYTHONPATH']}"
    result = subprocess.run(
        agent_command(["serve", "--config", str(config)]),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "pipx install 'backrest-relay[serve]'" in result.stderr


class Chatty(ChildLauncher):
    def argv(self, run: Run) -> list[str]:
        script = (
            "import sys; sys.stderr.write('x' * 200000); sys.stderr.write('\\nend\\n'); "
            "print('{\"uploaded_files\": 3}')"
        )
        return [sys.executable, "-c", script]


def test_endless_line_is_passed_on_in_pieces_and_the_run_completes() -> None:
    async def scenario() -> None:
        queue = RunQueue(Chatty(config_path=None, deadline_seconds=60), max_queue=5, max_parallel=1)
        run, _ = queue.submit(target("a", "d"), trigger("a"))
        lines = [line async for line in run.follow()]
        assert run.exit_code == 0 and run.summary == {"uploaded_files": 3}
        assert lines[-2:] == ["end\n", f"{FINAL_PREFIX}0\n"]
        assert sum(len(line) - 1 for line in lines[:-2]) == 200000
        await queue.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


def test_a_finished_run_keeps_only_its_tail() -> None:
    async def scenario() -> None:
        run = Run(target=target("a", "d"), trigger=trigger("a"))
        for i in range(5000):
            run.emit(f"line {i}")
        run.finish(0)
        lines = [line async for line in run.follow()]
        assert lines[0].startswith("backrest-relay: (4800 earlier lines not kept)")
        assert lines[1] == "line 4800\n" and len(lines) == 202

    asyncio.run(scenario())


def test_listen_must_be_host_and_port(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[destination]\nbucket = "bucket1"\nregion = "us-west-004"\n')
    result = run_cli(["serve", "--config", str(config), "--listen", "nonsense"])
    assert result.returncode == 2 and "--listen" in result.stderr


def test_http_hook_snippet_json_form_holds_the_text_form_scripts(tmp_path: Path) -> None:
    base = ["hook-snippet", "--repo-id", "my-repo", "--via", "http"]
    url = ["--url", "http://backrest-relay:8787"]
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    as_json = json.loads(run_cli([*base, *url, "--format", "json"], env).stdout)
    texts = [
        "\n".join(
            line
            for line in run_cli([*base, *url, "--hook", hook], env).stdout.splitlines()
            if not line.startswith("#")
        )
        for hook in ("success", "failure")
    ]
    assert [h["conditions"] for h in as_json] == [
        ["CONDITION_CHECK_SUCCESS"],
        ["CONDITION_CHECK_ERROR"],
    ]
    assert all(h["onError"] == "ON_ERROR_IGNORE" for h in as_json)
    assert [h["actionCommand"]["command"] for h in as_json] == texts
    assert "</dev/null" in texts[0] and "--max-time 21840" in texts[0]
    assert "error={{ .ShellEscape .Error }}" in texts[1]
    no_url = run_cli(base, env)
    assert no_url.returncode == 2 and "--url" in no_url.stderr
    stray = run_cli(["hook-snippet", "--repo-id", "my-repo", *url], env)
    assert stray.returncode == 2 and "--via http" in stray.stderr


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_http_hook_parses_and_runs_its_later_lines_in_every_shell_of_backrests_image(
    shell: str, tmp_path: Path
) -> None:
    """Backrest's image has sh and bash, and a `#!/bin/bash` first line picks bash: the
    script must parse there too (bash reads a `'` inside "${VAR:?...}" as a quote)."""
    from local_agent.serve.hook import http_hook_command
    from tests.support.backrest import render_backrest_template

    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} is not installed")
    for failure in (False, True):
        script = render_backrest_template(
            http_hook_command("http://127.0.0.1:9", max_time=5, failure=failure),
            repo_id="home",
            repo_uri="/repos/home",
            repo_guid="a" * 64,
            event="CONDITION_CHECK_ERROR" if failure else "CONDITION_CHECK_SUCCESS",
            error='it\'s "$(false)"',
        )
        done = subprocess.run(
            [path],
            input=script + '\necho "hook status $?"\necho later-line-ran\n',
            env={"PATH": "/usr/bin:/bin"},  # no token: the hook says so and fails
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "later-line-ran" in done.stdout, (shell, done.stdout, done.stderr)
        assert "hook status 0" not in done.stdout
        assert "BACKREST_RELAY_TOKEN" in done.stderr

"""`backrest-relay serve` as a real process on loopback, and a plain HTTP client for it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.agent import agent_command, agent_env
from tests.support.s3servers import free_port

TOKEN = "sentinel-relay-token-5b9e2c71d0"


def write_backrest_config(path: Path, repos: Sequence[Mapping[str, str]]) -> Path:
    """A minimal Backrest config.json (protojson) with these `repos` entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 4, "instance": "test", "repos": list(repos)}))
    return path


def add_serve_section(config: Path, **serve: Any) -> Path:
    """Append a [serve] section (values as TOML via JSON, which TOML accepts for these)."""
    lines = ["[serve]"]
    for key, value in serve.items():
        if isinstance(value, dict):
            lines.append(f"[serve.{key}]")
            lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()]
        else:
            lines.insert(1, f"{key} = {json.dumps(value)}")
    with config.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    return config


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RelayService:
    """One `serve` process; `log` is everything it wrote to stderr (read after stop)."""

    config: Path
    token: str | None = TOKEN
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> RelayService:
        extra = dict(self.env)
        if self.token:
            extra["BACKREST_RELAY_TOKEN"] = self.token
        self.log_path = self.config.parent / f"serve-{self.port}-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                agent_command(
                    ["serve", "--config", str(self.config), "--listen", f"127.0.0.1:{self.port}"]
                ),
                env=agent_env(extra),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/healthz").status == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not answer within {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> RelayService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def headers(self, auth: str | None = "default") -> dict[str, str]:
        use = self.token if auth == "default" else auth
        return {"Authorization": f"Bearer {use}"} if use else {}

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 600,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", errors="replace")
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, text)
        finally:
            conn.close()

    def trigger(
        self, fields: Mapping[str, str], *, wait: bool = True, auth: str | None = "default"
    ) -> Response:
        return self.request(
            "POST",
            "/v1/runs" + ("" if wait else "?wait=false"),
            json.dumps(dict(fields)).encode(),
            {**self.headers(auth), "Content-Type": "application/json"},
        )

    def run_info(self, run_id: str) -> dict[str, Any]:
        resp = self.request("GET", f"/v1/runs/{run_id}", headers=self.headers())
        assert resp.status == 200, resp.body
        info: dict[str, Any] = resp.json()
        return info

    def wait_done(self, run_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.run_info(run_id)
            if info["state"] == "done":
                return info
            assert time.monotonic() < deadline, f"run {run_id} not done: {info}"
            time.sleep(0.2)

    def metrics(self) -> str:
        resp = self.request("GET", "/metrics", headers=self.headers())
        assert resp.status == 200, resp.body
        return resp.body


def curl_only_path(base: Path) -> Path:
    """A PATH directory holding curl and nothing else (Backrest's image has no Python)."""
    from tests.support.tools import require_tool

    directory = base / "hook-bin"
    directory.mkdir(exist_ok=True)
    curl = require_tool("curl")
    link = directory / "curl"
    if not link.exists():
        link.symlink_to(curl)
    return directory


def run_hook_script(script: str, *, path_dir: Path, token: str | None, timeout: float = 600):  # type: ignore[no-untyped-def]
    """Feed a rendered hook to `sh` on stdin, as Backrest's command hook does."""
    env = {"PATH": str(path_dir), "HOME": str(path_dir)}
    if token is not None:
        env["BACKREST_RELAY_TOKEN"] = token
    return subprocess.run(
        ["/bin/sh"],
        input=script,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )

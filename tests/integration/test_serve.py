"""`backrest-relay serve` and the `--via http` hook, end to end on real components.

The service runs as a real process on loopback; repositories are real restic repositories;
the bucket is `rclone serve s3`. Hooks are rendered as Backrest renders them and fed to
`sh` on stdin with only curl on PATH (Backrest's image has no Python).
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import BuiltRepo
from tests.support.agent import remote_keys, run_agent, unfinished_uploads, write_agent_config
from tests.support.backrest import render_backrest_template
from tests.support.relay_service import (
    TOKEN,
    RelayService,
    add_serve_section,
    curl_only_path,
    run_hook_script,
    write_backrest_config,
)
from tests.support.repos import make_restic_repo, restic_backup, restic_check, s3_repo_url
from tests.support.s3servers import RcloneS3Server, S3Endpoint, S3Proxy

pytestmark = pytest.mark.real_tools
GUID = "a" * 64


def service_config(
    tmp_path: Path,
    endpoint: S3Endpoint,
    bucket: str,
    repos: dict[str, Path],
    *,
    upload: dict[str, object] | None = None,
    events: dict[str, object] | None = None,
    **serve: object,
) -> Path:
    """Relay config + Backrest config.json naming `repos` (id → path), roots = tmp_path."""
    backrest = write_backrest_config(
        tmp_path / "backrest" / "config.json",
        [{"id": rid, "uri": str(path), "guid": _guid(rid)} for rid, path in repos.items()],
    )
    config = write_agent_config(
        tmp_path / "relay.toml",
        endpoint,
        bucket,
        state_dir=tmp_path / "state",
        upload={"multipart_threshold": "8MiB", "part_size": "5MiB", **(upload or {})},
        events=events,
    )
    return add_serve_section(config, roots=[str(tmp_path)], backrest_config=str(backrest), **serve)


def _guid(repo_id: str) -> str:
    return (repo_id.encode().hex() * 64)[:64]


def render_hook(
    service: RelayService,
    config: Path,
    repo_id: str,
    repo: Path,
    *,
    failure: bool = False,
    error: str = "",
) -> str:
    result = run_agent(
        [
            "hook-snippet",
            "--repo-id",
            repo_id,
            "--via",
            "http",
            "--url",
            service.url,
            "--hook",
            "failure" if failure else "success",
            "--config",
            str(config),
        ]
    )
    assert result.returncode == 0, result.stderr
    return render_backrest_template(
        result.stdout,
        repo_id=repo_id,
        repo_uri=str(repo),
        repo_guid=_guid(repo_id),
        event="CONDITION_CHECK_ERROR" if failure else "CONDITION_CHECK_SUCCESS",
        error=error,
    )


def mirror_url(endpoint: S3Endpoint, bucket: str, repo_id: str) -> str:
    return s3_repo_url(endpoint, bucket, f"restic/{repo_id}")


def test_http_hook_in_backrest_like_shell_mirrors_and_streams_progress(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    config = service_config(
        tmp_path,
        rclone_server.endpoint,
        rclone_bucket,
        {"home": restic_repo.path},
        upload={"bandwidth_limit": "8MiB/s"},  # long enough for progress lines
    )
    with RelayService(config) as service:
        script = render_hook(service, config, "home", restic_repo.path)
        assert TOKEN not in script and "BACKREST_RELAY_TOKEN" in script
        path_dir = curl_only_path(tmp_path)
        assert shutil.which("python3", path=str(path_dir)) is None
        assert shutil.which("python", path=str(path_dir)) is None
        done = run_hook_script(
            script + '\necho "hook status $?"\necho later-line-ran\n',
            path_dir=path_dir,
            token=TOKEN,
        )
    out = done.stdout
    assert "hook status 0" in out, (out, done.stderr, service.log())
    assert "later-line-ran" in out
    assert re.search(r"^backrest-relay: \w+: \d+/\d+ files · ", out, re.M), out  # progress
    assert out.startswith("backrest-relay: run ") and " started\n" in out.splitlines()[0] + "\n"
    assert "mirrored " in out
    assert out.splitlines()[-3] == "backrest-relay: exit 0"
    restic_check(
        mirror_url(rclone_server.endpoint, rclone_bucket, "home"),
        restic_password,
        env=rclone_server.endpoint.env(),
    )


def test_http_hook_fails_when_the_run_fails_and_later_lines_still_run(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    missing = tmp_path / "not-a-repo"
    missing.mkdir()
    (missing / "notes.txt").write_text("not a restic repository\n")  # exit 3, not empty (5)
    config = service_config(tmp_path, rclone_server.endpoint, rclone_bucket, {"home": missing})
    path_dir = curl_only_path(tmp_path)
    with RelayService(config) as service:
        script = render_hook(service, config, "home", missing)
        done = run_hook_script(
            script + '\necho "hook status $?"\necho later\n', path_dir=path_dir, token=TOKEN
        )
        assert "hook status 1" in done.stdout, done.stdout
        assert "backrest-relay: exit 3" in done.stdout
        assert done.stdout.rstrip().endswith("later")
        # no token in Backrest's environment: the hook fails, says why, runs on
        done = run_hook_script(script + '\necho "hook status $?"\n', path_dir=path_dir, token=None)
        assert "hook status 1" in done.stdout
        assert "BACKREST_RELAY_TOKEN" in done.stderr
        # the relay is down: curl fails, the hook says so and fails
    done = run_hook_script(script + '\necho "hook status $?"\n', path_dir=path_dir, token=TOKEN)
    assert "curl failed" in done.stdout and "hook status 1" in done.stdout


def test_failure_hook_reports_the_error_text_verbatim_and_runs_nothing_from_it(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    config = service_config(
        tmp_path,
        rclone_server.endpoint,
        rclone_bucket,
        {"home": repo},
        events={"publisher": "local"},
    )
    pwned = tmp_path / "pwned"
    error = f"check failed: pack 'x' \"y\" $(touch {pwned}) `touch {pwned}`\nline two; exit 0"
    with RelayService(config) as service:
        script = render_hook(service, config, "home", repo, failure=True, error=error)
        done = run_hook_script(
            script + '\necho "hook status $?"\n', path_dir=curl_only_path(tmp_path), token=TOKEN
        )
    assert "hook status 0" in done.stdout, (done.stdout, done.stderr, service.log())
    assert not pwned.exists()
    events = [
        json.loads(line)
        for line in (tmp_path / "state" / "events.jsonl").read_text().splitlines()
        if line.strip()
    ]
    assert [e["detail"]["error"]["message"] for e in events] == [error], events
    assert remote_keys(rclone_server.endpoint, rclone_bucket) == {}


def _small_repo(path: Path, password: str, seed: int) -> Path:
    from tests.support.repos import write_random_tree

    make_restic_repo(path, password)
    source = path.parent / f"{path.name}-src"
    write_random_tree(source, files=6, size=(20_000, 400_000), seed=seed)
    restic_backup(path, password, source)
    return path


def test_two_triggers_for_one_repository_make_one_run(
    restic_repo: BuiltRepo, rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    config = service_config(
        tmp_path,
        rclone_server.endpoint,
        rclone_bucket,
        {"home": restic_repo.path},
        upload={"bandwidth_limit": "16MiB/s"},  # the runs below wait behind this one
    )
    with RelayService(config) as service:
        going = service.trigger({"repo_id": "home"}, wait=False)
        first = service.trigger({"repo_id": "home"}, wait=False)
        second = service.trigger(
            {"repo_id": "home", "repo_guid": _guid("home"), "event": "CONDITION_CHECK_SUCCESS"},
            wait=False,
        )
        assert first.status == second.status == 202, (first.body, second.body)
        assert first.json()["id"] != going.json()["id"]  # the run going listed before them
        assert second.json()["id"] == first.json()["id"]
        assert second.json()["joined"] is True
        info = service.wait_done(first.json()["id"])
        assert info["exit_code"] == 0 and info["callers"] == 2
        families = _metrics(service)
        assert _sample(families, "backrest_relay_runs_total", outcome="ok") == 2
        assert _sample(families, "backrest_relay_triggers_joined_total") == 1


def test_trigger_during_a_run_gets_a_later_run_that_mirrors_the_new_data(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    """Backrest restarted mid-run (or curl gave up), backed up, checked, triggered again:
    that trigger must not join the run that listed the repository before the backup, or
    the new snapshot stays off-site only at the next check (monthly by default)."""
    from tests.support.repos import restic_snapshots, write_random_tree

    config = service_config(
        tmp_path,
        rclone_server.endpoint,
        rclone_bucket,
        {"home": restic_repo.path},
        upload={"bandwidth_limit": "8MiB/s"},
    )
    with RelayService(config) as service:
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)
        conn.request(
            "POST",
            "/v1/runs",
            json.dumps({"repo_id": "home"}).encode(),
            {**service.headers(), "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        first = resp.getheader("X-Run-Id")
        assert resp.status == 200 and first
        while not re.match(rb"backrest-relay: \w+: \d+/\d+ files", line := resp.readline()):
            assert line, service.log()  # the run has listed the repository: it is uploading
        conn.close()  # Backrest restarted
        write_random_tree(tmp_path / "new-src", files=3, size=(10_000, 50_000), seed=77)
        restic_backup(restic_repo.path, restic_password, tmp_path / "new-src")
        assert service.run_info(first)["state"] == "running"
        again = service.trigger({"repo_id": "home"}, wait=False)
        assert again.status == 202, again.body
        later = again.json()["id"]
        third = service.trigger({"repo_id": "home"}, wait=False).json()
        service.wait_done(first)
        assert service.wait_done(later)["exit_code"] == 0, service.log()
    mirror = mirror_url(rclone_server.endpoint, rclone_bucket, "home")
    env = rclone_server.endpoint.env()
    local_ids = {s["id"] for s in restic_snapshots(restic_repo.path, restic_password)}
    assert {s["id"] for s in restic_snapshots(mirror, restic_password, env=env)} == local_ids
    restic_check(mirror, restic_password, env=env)
    assert later != first and again.json()["joined"] is False
    assert third["id"] == later and third["joined"] is True  # joins the next run: no duplicate


def test_two_repositories_both_mirrored_one_run_at_a_time(
    rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str, tmp_path: Path
) -> None:
    repos = {
        "alpha": _small_repo(tmp_path / "alpha", restic_password, 1),
        "beta": _small_repo(tmp_path / "beta", restic_password, 2),
    }
    config = service_config(tmp_path, rclone_server.endpoint, rclone_bucket, repos, max_parallel=1)
    with RelayService(config) as service:
        ids = [service.trigger({"repo_id": rid}, wait=False).json()["id"] for rid in repos]
        infos = [service.wait_done(run_id) for run_id in ids]
    assert [i["exit_code"] for i in infos] == [0, 0]
    first, second = sorted(infos, key=lambda i: i["started_at"])
    assert second["started_at"] >= first["finished_at"]  # never two at once (max_parallel 1)
    for rid in repos:
        restic_check(
            mirror_url(rclone_server.endpoint, rclone_bucket, rid),
            restic_password,
            env=rclone_server.endpoint.env(),
        )


def test_caller_disconnecting_leaves_the_run_going_and_followable(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    config = service_config(
        tmp_path,
        rclone_server.endpoint,
        rclone_bucket,
        {"home": restic_repo.path},
        upload={"bandwidth_limit": "16MiB/s"},
    )
    with RelayService(config) as service:
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
        conn.request(
            "POST",
            "/v1/runs",
            json.dumps({"repo_id": "home"}).encode(),
            {**service.headers(), "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        run_id = resp.getheader("X-Run-Id")
        assert resp.status == 200 and run_id
        assert resp.readline().startswith(b"backrest-relay: run ")
        conn.sock.close() if conn.sock else None  # Backrest restarted mid-run
        conn.close()
        assert service.run_info(run_id)["state"] == "running"
        info = service.wait_done(run_id)
        assert info["exit_code"] == 0, service.log()
        followed = service.request(
            "GET", f"/v1/runs/{run_id}?follow=true", headers=service.headers()
        )
        assert followed.body.rstrip().endswith("backrest-relay: exit 0")
        assert "mirrored " in followed.body
    restic_check(
        mirror_url(rclone_server.endpoint, rclone_bucket, "home"),
        restic_password,
        env=rclone_server.endpoint.env(),
    )


def test_sigterm_ends_every_stream_with_a_final_line_and_stops_the_run(
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    """`docker stop` while a hook follows a run: the hook's log says why it ended (and the
    hook fails), the child stops, nothing logs a traceback, and the next run completes."""
    import signal
    import subprocess

    config = service_config(
        tmp_path,
        rclone_server.endpoint,
        rclone_bucket,
        {"home": restic_repo.path},
        upload={"bandwidth_limit": "4MiB/s"},
    )
    service = RelayService(config).start()
    try:
        assert service.proc is not None
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
        conn.request(
            "POST",
            "/v1/runs",
            json.dumps({"repo_id": "home"}).encode(),
            {**service.headers(), "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        while not re.match(rb"backrest-relay: \w+: \d+/\d+ files", line := resp.readline()):
            assert line, service.log()
        children = subprocess.run(
            ["pgrep", "-P", str(service.proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        assert children
        service.proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode().splitlines()  # ends when the service ends the stream
        conn.close()
        service.proc.wait(timeout=30)
    finally:
        service.stop()
    log = service.log()
    assert (
        rest
        and rest[-1].startswith("backrest-relay: exit ")
        and rest[-1] != ("backrest-relay: exit 0")
    ), (rest, log)
    assert any("service is stopping" in line for line in rest), rest
    assert "Traceback" not in log, log
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    with RelayService(config) as again:
        done = again.trigger({"repo_id": "home"})
    assert done.body.rstrip().endswith("backrest-relay: exit 0"), done.body
    restic_check(
        mirror_url(rclone_server.endpoint, rclone_bucket, "home"),
        restic_password,
        env=rclone_server.endpoint.env(),
    )


def test_service_sigkilled_mid_multipart_resumes_with_only_missing_parts(
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
    restic_password: str,
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    source = tmp_path / "src"
    source.mkdir()
    (source / "big.bin").write_bytes(os.urandom(40_000_000))
    make_restic_repo(repo, restic_password)
    restic_backup(repo, restic_password, source, pack_size_mib=64)
    big = max(
        (p for p in (repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    big_key = f"restic/home/{big.relative_to(repo).as_posix()}"
    total_parts = math.ceil(big.stat().st_size / (5 * 1024 * 1024))

    slow = service_config(
        tmp_path,
        counting_proxy.endpoint,
        rclone_bucket,
        {"home": repo},
        upload={"bandwidth_limit": "8MiB/s"},
    )
    service = RelayService(slow).start()
    try:
        assert service.trigger({"repo_id": "home"}, wait=False).status == 202
        deadline = time.monotonic() + 60
        while counting_proxy.count(operation="UploadPart", pred=lambda r: r.status == 200) < 3:
            assert time.monotonic() < deadline, service.log()
            time.sleep(0.05)
        service.kill()
    finally:
        service.stop()
    time.sleep(1)  # the child gets SIGTERM from the kernel when the service dies
    client = rclone_server.endpoint.client()
    uploads = client.list_multipart_uploads(Bucket=rclone_bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [big_key]
    parts = client.list_parts(Bucket=rclone_bucket, Key=big_key, UploadId=uploads[0]["UploadId"])
    present = len(parts["Parts"])
    assert 3 <= present < total_parts
    time.sleep(1)
    again = client.list_parts(Bucket=rclone_bucket, Key=big_key, UploadId=uploads[0]["UploadId"])
    assert len(again["Parts"]) == present  # the run died with the service

    counting_proxy.reset()
    fast = tmp_path / "fast.toml"
    fast.write_text(slow.read_text().replace('bandwidth_limit = "8MiB/s"\n', ""))
    with RelayService(fast) as service:
        streamed = service.trigger({"repo_id": "home"})
    assert streamed.body.rstrip().endswith("backrest-relay: exit 0"), streamed.body
    assert counting_proxy.count(operation="UploadPart") == total_parts - present
    assert counting_proxy.count(operation="CreateMultipartUpload") == 0
    assert unfinished_uploads(rclone_server.endpoint, rclone_bucket) == []
    restic_check(
        mirror_url(rclone_server.endpoint, rclone_bucket, "home"),
        restic_password,
        env=rclone_server.endpoint.env(),
    )


def test_refused_requests_get_4xx_and_nothing_is_read_or_uploaded(
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
    restic_password: str,
    tmp_path: Path,
) -> None:
    inside = _small_repo(tmp_path / "inside", restic_password, 3)
    outside_base = tmp_path.parent / f"{tmp_path.name}-outside"
    outside = _small_repo(outside_base / "repo", restic_password, 4)
    (tmp_path / "escape").symlink_to(outside)
    foreign = tmp_path / "foreign"
    shutil.copytree(inside, foreign)
    os.chown(foreign, 65534, 65534)
    repos = {
        "home": inside,
        "outside": outside,
        "linked": tmp_path / "escape",
        "dotdot": Path(f"{tmp_path}/inside/../../{outside_base.name}/repo"),
        "foreign": foreign,
    }
    config = service_config(
        tmp_path, counting_proxy.endpoint, rclone_bucket, repos, max_body="1KiB"
    )
    json_type = {"Content-Type": "application/json"}
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    basic = base64.b64encode(f"me:{TOKEN}".encode()).decode()
    with RelayService(config) as service:
        auth = {**service.headers(), **json_type}
        body = json.dumps({"repo_id": "home"}).encode()
        cases = {
            "no token": service.request("POST", "/v1/runs", body, json_type),
            "wrong token": service.request(
                "POST", "/v1/runs", body, {"Authorization": "Bearer " + "x" * 30, **json_type}
            ),
            "malformed": service.request("POST", "/v1/runs", b"{not json", auth),
            "not an object": service.request("POST", "/v1/runs", b"[1]", auth),
            "unknown field": service.request(
                "POST", "/v1/runs", json.dumps({"repo_id": "home", "path": "/"}).encode(), auth
            ),
            "bad id": service.request(
                "POST", "/v1/runs", json.dumps({"repo_id": "../etc"}).encode(), auth
            ),
            "unknown repo": service.trigger({"repo_id": "nobody"}),
            "uri mismatch": service.trigger({"repo_id": "home", "repo_uri": str(outside)}),
            "outside roots": service.trigger({"repo_id": "outside"}),
            "symlink out": service.trigger({"repo_id": "linked"}),
            "dot-dot": service.trigger({"repo_id": "dotdot"}),
            "other user": service.trigger({"repo_id": "foreign"}),
            "oversized": service.request(
                "POST",
                "/v1/runs",
                json.dumps({"repo_id": "home", "error": "x" * 5000}).encode(),
                auth,
            ),
            "metrics without token": service.request("GET", "/metrics"),
            "page without token": service.request("GET", "/"),
            # what a page in a browser holding the status page's Basic login can send
            # cross-site without a preflight: a form POST; Basic is for `GET /` only
            "basic auth on the API": service.request(
                "POST",
                "/v1/runs",
                b"repo_id=home&event=CONDITION_CHECK_ERROR&error=phish",
                {"Authorization": "Basic " + basic, **form_type},
            ),
            "basic auth on metrics": service.request(
                "GET", "/metrics", headers={"Authorization": "Basic " + basic}
            ),
        }
        statuses = {name: resp.status for name, resp in cases.items()}
        assert statuses == {
            "no token": 401,
            "wrong token": 401,
            "malformed": 400,
            "not an object": 400,
            "unknown field": 400,
            "bad id": 400,
            "unknown repo": 404,
            "uri mismatch": 409,
            "outside roots": 403,
            "symlink out": 403,
            "dot-dot": 403,
            "other user": 403,
            "oversized": 413,
            "metrics without token": 401,
            "page without token": 401,
            "basic auth on the API": 401,
            "basic auth on metrics": 401,
        }, {n: (r.status, r.body) for n, r in cases.items()}
        families = _metrics(service)
        assert _sample(families, "backrest_relay_runs_total") == 0
        assert "backrest_relay_queue_depth" in {f.name for f in families}  # type: ignore[attr-defined]
        log = service.log()
    assert counting_proxy.requests == []
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").glob("*.sqlite"))
    for resp in cases.values():
        assert TOKEN not in resp.body
    assert TOKEN not in log and counting_proxy.endpoint.secret_key not in log


def test_without_a_token_on_loopback_a_browser_page_cannot_post_runs(
    rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str, tmp_path: Path
) -> None:
    """No token is allowed on loopback, but a browser on the same host is on loopback too:
    any site it visits can send a form POST there (no preflight), or rebind a name to
    127.0.0.1 and read the answers. Browsers send `Origin` with every POST (curl and the hook
    never do), and a rebound name arrives in `Host`."""
    repo = _small_repo(tmp_path / "repo", restic_password, 6)
    config = service_config(tmp_path, rclone_server.endpoint, rclone_bucket, {"home": repo})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = b"repo_id=home&event=CONDITION_CHECK_ERROR&error=your+backups+are+gone"
    with RelayService(config, token=None) as service:
        cross = service.request("POST", "/v1/runs", body, {**form, "Origin": "http://evil.test"})
        opaque = service.request("POST", "/v1/runs", body, {**form, "Origin": "null"})
        # a name the page's site rebound to 127.0.0.1: its script reads what it fetches
        rebound = {"Host": f"evil.test:{service.port}"}
        reads = [service.request("GET", path, headers=rebound) for path in ("/", "/metrics")]
        assert [r.status for r in reads] == [403, 403], [r.body for r in reads]
        ours = [f"localhost:{service.port}", f"127.0.0.1:{service.port}", "[::1]", "LOCALHOST"]
        assert all(
            service.request("GET", "/metrics", headers={"Host": h}).status == 200 for h in ours
        )
        families = _metrics(service)
        plain = service.request("POST", "/v1/runs?wait=false", b"repo_id=home", form)
        assert plain.status == 202, plain.body  # curl's way still works
        service.wait_done(plain.json()["id"])
    assert (cross.status, opaque.status) == (403, 403), (cross.body, opaque.body)
    assert _sample(families, "backrest_relay_runs_total") == 0
    assert _sample(families, "backrest_relay_runs_in_progress") == 0


def test_caller_hanging_up_mid_body_logs_no_traceback(
    rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str, tmp_path: Path
) -> None:
    """A hook killed while sending (Backrest stopped) is routine: one line, no traceback."""
    import socket

    repo = _small_repo(tmp_path / "repo", restic_password, 7)
    config = service_config(tmp_path, rclone_server.endpoint, rclone_bucket, {"home": repo})
    with RelayService(config) as service:
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/runs HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 18\r\n\r\n"
                b'{"repo_'
            )
        info = service.trigger({"repo_id": "home"})  # the service carries on
        assert info.body.rstrip().endswith("backrest-relay: exit 0"), info.body
        health = service.request("GET", "/healthz").json()
        log = service.log()
    assert health["in_progress"] == 0
    assert "Traceback" not in log, log


def test_metrics_parse_and_move_and_no_secret_anywhere(
    rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str, tmp_path: Path
) -> None:
    repo = _small_repo(tmp_path / "repo", restic_password, 5)
    config = service_config(
        tmp_path,
        rclone_server.endpoint,
        rclone_bucket,
        {"home": repo},
        events={"publisher": "local"},
    )
    secret = rclone_server.endpoint.secret_key
    with RelayService(config) as service:
        before = _metrics(service)
        assert _sample(before, "backrest_relay_uploaded_bytes_total") == 0
        streamed = service.trigger({"repo_id": "home"})
        run_id = streamed.headers["x-run-id"]
        texts = [streamed.body, json.dumps(service.run_info(run_id)), service.metrics()]
        texts.append(service.request("GET", "/", headers=service.headers()).body)
        basic = base64.b64encode(f"me:{TOKEN}".encode()).decode()
        page = service.request("GET", "/", headers={"Authorization": "Basic " + basic})
        assert page.status == 200 and page.body == texts[-1]  # a browser's login, page only
        texts.append(service.request("GET", "/healthz").body)
        after = _metrics(service)
        log = service.log()
    assert streamed.body.rstrip().endswith("backrest-relay: exit 0"), streamed.body
    assert _sample(after, "backrest_relay_runs_total", outcome="ok") == 1
    assert _sample(after, "backrest_relay_uploaded_bytes_total") > 0
    assert _sample(after, "backrest_relay_uploaded_objects_total") > 0
    assert _sample(after, "backrest_relay_last_verified_timestamp_seconds", repo_id="home") > 0
    assert "<html" in texts[3].lower() and 'http-equiv="refresh"' in texts[3]
    for text in [*texts, log]:
        assert TOKEN not in text and secret not in text
        assert rclone_server.endpoint.access_key not in text


def _metrics(service: RelayService) -> list[object]:
    return list(text_string_to_metric_families(service.metrics()))


def _sample(families: list[object], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    total = 0.0
    for family in families:
        for sample in family.samples:  # type: ignore[attr-defined]
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_full_queue_answers_429_and_the_queued_runs_still_complete(
    rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str, tmp_path: Path
) -> None:
    from local_agent.config import load_config
    from local_agent.mirror.runlock import RunLock
    from local_agent.mirror.state import state_file_name

    repos = {rid: _small_repo(tmp_path / rid, restic_password, n) for n, rid in enumerate("abc")}
    config = service_config(
        tmp_path, rclone_server.endpoint, rclone_bucket, repos, max_parallel=1, max_queue=1
    )
    relay = load_config(str(config)).config
    destination = relay.destination_for(repo_id="a", repo_guid=_guid("a"))
    held = RunLock(
        relay.state.path() / state_file_name(destination, "").replace(".sqlite", ".lock")
    )
    held.acquire(0)  # run "a" waits for this lock (as for another upload of its destination)
    try:
        with RelayService(config) as service:
            first = service.trigger({"repo_id": "a"}, wait=False)
            queued = service.trigger({"repo_id": "b"}, wait=False)
            refused = service.trigger({"repo_id": "c"}, wait=False)
            assert (first.status, queued.status, refused.status) == (202, 202, 429)
            assert refused.headers.get("retry-after") == "60"
            assert service.run_info(queued.json()["id"])["state"] == "queued"
            held.release()
            infos = [service.wait_done(r.json()["id"]) for r in (first, queued)]
    finally:
        held.release()
    assert [i["exit_code"] for i in infos] == [0, 0]
    assert remote_keys(rclone_server.endpoint, rclone_bucket, "restic/c/") == {}


def test_a_damaged_run_store_spoils_neither_the_metrics_nor_the_log(tmp_path: Path) -> None:
    """runs.sqlite damaged: /metrics answered 500 (the scrape lost every metric, the queue's
    too), the status page 500, and the log held a traceback per request. The page now says
    what is wrong with which file (503); the metrics leave out only the verified times."""
    endpoint = S3Endpoint("http://127.0.0.1:9", "relay-test-access", "relay-test-secret-key")
    config = service_config(tmp_path, endpoint, "bkt", {"home": tmp_path / "repo"})
    runs = tmp_path / "state" / "runs.sqlite"
    runs.parent.mkdir(parents=True, exist_ok=True)
    runs.write_bytes(b"not a database\n" * 100)
    with RelayService(config) as service:
        page = service.request("GET", "/", headers=service.headers())
        families = _metrics(service)
        log = service.log()
    assert page.status == 503, page.body
    assert f"run store {runs}: unusable (file is not a database)" in page.body
    assert "backrest_relay_queue_depth" in {f.name for f in families}  # type: ignore[attr-defined]
    assert f"run store {runs}: unusable" in log
    assert "Traceback" not in log, log
    assert runs.read_bytes() == b"not a database\n" * 100  # a reader never sets it aside

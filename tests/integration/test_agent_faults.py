"""The agent against a misbehaving world: flaky and dead endpoints, wrong credentials, slow
links and repositories holding things restic never wrote.

Fake restic-format repositories (``make_fake_restic_repo``) keep these fast: what matters
here is the agent's handling of the network and the file tree, not restic's format. Every
test runs the real command as a separate process, as Backrest's hook does, against
``rclone serve s3`` (behind the fault-injecting proxy where faults are needed).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.support.agent import (
    AgentResult,
    remote_keys,
    run_agent,
    unfinished_uploads,
    write_agent_config,
)
from tests.support.repos import FakeRepo, add_packs, make_fake_restic_repo
from tests.support.s3servers import (
    Fault,
    FaultHook,
    FaultSchedule,
    LoggedRequest,
    RcloneS3Server,
    RequestInfo,
    S3Endpoint,
    S3Proxy,
    free_port,
)

REPO_ID = "faults"
PREFIX = f"restic/{REPO_ID}"
MiB = 1024 * 1024
MULTIPART = {"multipart_threshold": "5MiB", "part_size": "5MiB"}

SENTINEL_KEY_ID = "AKIASENTINELKEY0001"
SENTINEL_SECRET = "sentinel-secret-4f9d2c"


# -- helpers ------------------------------------------------------------------------------


def config_for(
    tmp_path: Path,
    endpoint: S3Endpoint,
    bucket: str,
    *,
    name: str = "relay.toml",
    **upload: object,
) -> Path:
    return write_agent_config(
        tmp_path / name, endpoint, bucket, state_dir=tmp_path / "state", upload=upload
    )


def upload(config: Path, repo: Path, *extra: str, env: dict[str, str] | None = None) -> AgentResult:
    return run_agent(
        ["upload", "--repo", str(repo), "--repo-id", REPO_ID, "--config", str(config), *extra],
        env=env,
        timeout=180,
    )


def fake_repo(path: Path, *, packs: int, size: int | tuple[int, int], seed: int = 0) -> FakeRepo:
    return make_fake_restic_repo(path, packs=packs, pack_size=size, seed=seed)


def expected_keys(repo: FakeRepo) -> set[str]:
    return {f"{PREFIX}/{k}" for k in repo.relpaths()}


def assert_mirror_bytes(endpoint: S3Endpoint, bucket: str, repo: FakeRepo) -> None:
    """Every mirrored object exists with exactly the local bytes: content-named files hash
    to their name, `config` equals the local one; and nothing else is there."""
    client = endpoint.client()
    assert set(remote_keys(endpoint, bucket, PREFIX)) == expected_keys(repo)
    for rel in repo.relpaths():
        body = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{rel}")["Body"].read()
        if rel == "config":
            assert body == repo.config.read_bytes()
        else:
            assert hashlib.sha256(body).hexdigest() == rel.rsplit("/", 1)[-1], rel


def first_fault(*hooks: FaultHook) -> FaultHook:
    """A hook that asks each schedule in turn; the first fault wins."""

    def hook(info: RequestInfo) -> Fault | None:
        for h in hooks:
            fault = h(info)
            if fault is not None:
                return fault
        return None

    return hook


def under(kind: str) -> Callable[[RequestInfo], bool]:
    return lambda info: (info.key or "").startswith(f"{PREFIX}/{kind}/")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("backrest-relay: error:")]


def assert_retried(requests: list[LoggedRequest], faulted: LoggedRequest) -> None:
    """A later attempt of the same request (same operation, key and part) succeeded."""

    def same(r: LoggedRequest) -> bool:
        return (
            r.operation == faulted.operation
            and r.key == faulted.key
            and r.query.get("partNumber") == faulted.query.get("partNumber")
            and r.query.get("uploadId") == faulted.query.get("uploadId")
        )

    later = [r for r in requests if r.seq > faulted.seq and same(r)]
    assert any(r.status == 200 and r.fault is None for r in later), (faulted, later)


# -- 1. transient faults are retried ------------------------------------------------------


def test_throttling_resets_and_drops_are_retried_and_every_object_is_intact(
    rclone_server: RcloneS3Server, rclone_bucket: str, counting_proxy: S3Proxy, tmp_path: Path
) -> None:
    repo = fake_repo(tmp_path / "repo", packs=12, size=(50_000, 900_000))
    add_packs(repo, 2, 11 * MiB, seed=1)  # three 5 MiB parts each
    slow_down = FaultSchedule(Fault.slow_down(), times=3, operation="PutObject")
    resets = FaultSchedule(Fault.reset_mid_body(), times=2, operation="UploadPart")
    drop_create = FaultSchedule(Fault.drop(), times=1, operation="CreateMultipartUpload")
    drop_complete = FaultSchedule(Fault.drop(), times=1, operation="CompleteMultipartUpload")
    counting_proxy.fault = first_fault(slow_down, resets, drop_create, drop_complete)
    config = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket, **MULTIPART)

    result = upload(config, repo.root, "--json")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = result.summary
    assert summary["status"] == "ok"
    assert summary["uploaded_files"] == len(repo.mirrored_files())
    assert_mirror_bytes(rclone_server.endpoint, rclone_bucket, repo)
    assert unfinished_uploads(rclone_server.endpoint, rclone_bucket) == []

    log = counting_proxy.requests
    assert (slow_down.injected, resets.injected) == (3, 2)
    assert (drop_create.injected, drop_complete.injected) == (1, 1)
    throttled = [r for r in log if r.status == 503]
    assert len(throttled) == 3 and {r.operation for r in throttled} == {"PutObject"}
    reset = [r for r in log if r.fault == "reset_mid_body"]
    assert len(reset) == 2 and {r.operation for r in reset} == {"UploadPart"}
    dropped = [r for r in log if r.fault == "drop"]
    assert sorted(r.operation for r in dropped) == [
        "CompleteMultipartUpload",
        "CreateMultipartUpload",
    ]
    for faulted in [*throttled, *reset, *dropped]:
        assert_retried(log, faulted)
    # Retries are counted as requests (the summary's number is what a bill would show).
    assert summary["requests"] >= len(log)


# -- 2. a persistently failing endpoint --------------------------------------------------


def test_persistent_500s_exit_4_with_one_clear_line_a_consistent_mirror_and_a_clean_rerun(
    rclone_server: RcloneS3Server, rclone_bucket: str, counting_proxy: S3Proxy, tmp_path: Path
) -> None:
    repo = fake_repo(tmp_path / "repo", packs=16, size=(20_000, 300_000))
    failing = FaultSchedule(
        Fault.internal_error(), times=None, skip=3, method="PUT", pred=under("data")
    )
    counting_proxy.fault = failing
    config = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket)

    started = time.monotonic()
    failed = upload(config, repo.root, "--json")
    took = time.monotonic() - started

    assert failed.returncode == 4, failed.stderr
    assert "Traceback" not in failed.stderr
    lines = error_lines(failed.stderr)
    assert len(lines) == 1, failed.stderr
    match = re.search(r"data/[0-9a-f]{2}/([0-9a-f]{64})", lines[0])
    assert match, lines[0]
    assert "InternalError" in lines[0] and "500" in lines[0], lines[0]
    summary = failed.summary
    assert summary["status"] == "failed"
    assert summary["exit_code"] == 4
    assert summary["error"]["kind"] == "destination"
    # botocore retried the named object (docs/mirror.md: 8 attempts) before giving up.
    named = f"{PREFIX}/{match.group(0)}"
    attempts = [r for r in counting_proxy.requests if r.key == named and r.method == "PUT"]
    assert len(attempts) >= 8 and all(r.status == 500 for r in attempts)
    print(failed.stderr, f"took {took:.1f}s", len(attempts))
    assert took < 60

    present = set(remote_keys(rclone_server.endpoint, rclone_bucket, PREFIX))
    assert not any(k.startswith((f"{PREFIX}/snapshots/", f"{PREFIX}/index/")) for k in present)
    assert f"{PREFIX}/config" in present
    assert present < expected_keys(repo)

    counting_proxy.fault = None
    counting_proxy.reset()
    rerun = upload(config, repo.root, "--json")
    assert rerun.returncode == 0, rerun.stderr
    sent = {
        r.key
        for r in counting_proxy.requests
        if r.operation in ("PutObject", "CompleteMultipartUpload")
        and (r.key or "").startswith(f"{PREFIX}/")
    }
    assert sent == expected_keys(repo) - present
    assert rerun.summary["uploaded_files"] == len(expected_keys(repo) - present)
    assert_mirror_bytes(rclone_server.endpoint, rclone_bucket, repo)


# -- 3. an unreachable endpoint ------------------------------------------------------------


def test_unreachable_endpoint_exits_4_with_a_message_in_reasonable_time(
    tmp_path: Path, rclone_server: RcloneS3Server
) -> None:
    repo = fake_repo(tmp_path / "repo", packs=3, size=10_000)
    closed = S3Endpoint(
        f"http://127.0.0.1:{free_port()}",
        rclone_server.endpoint.access_key,
        rclone_server.endpoint.secret_key,
    )
    config = config_for(tmp_path, closed, "offsite")

    started = time.monotonic()
    result = upload(config, repo.root, "--json")
    took = time.monotonic() - started

    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert closed.endpoint_url in lines[0] or "connect" in lines[0].lower(), lines[0]
    assert result.summary["error"]["kind"] == "destination"
    assert took < 120, f"took {took:.1f}s"
    print(f"unreachable endpoint: exit 4 after {took:.1f}s")


# -- 4. secrets never leak -----------------------------------------------------------------


def _state_bytes(state_dir: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(state_dir.rglob("*")) if p.is_file()]


def assert_no_leak(what: str, texts: Iterable[tuple[str, str | bytes]], *secrets: str) -> None:
    for where, text in texts:
        data = text.encode() if isinstance(text, str) else text
        for secret in secrets:
            assert secret.encode() not in data, f"{what}: {secret!r} leaked into {where}"


def test_credentials_never_reach_output_summary_or_state(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    real = rclone_server.endpoint
    wrong_secret = S3Endpoint(real.endpoint_url, real.access_key, SENTINEL_SECRET)
    unknown_key = S3Endpoint(real.endpoint_url, SENTINEL_KEY_ID, SENTINEL_SECRET)
    repo = fake_repo(tmp_path / "repo", packs=6, size=(10_000, 200_000))
    state = tmp_path / "state"
    good = config_for(tmp_path, real, rclone_bucket, name="good.toml")
    bad_secret = config_for(tmp_path, wrong_secret, rclone_bucket, name="bad-secret.toml")
    bad_key = config_for(tmp_path, unknown_key, rclone_bucket, name="bad-key.toml")
    no_keys = tmp_path / "env-creds.toml"
    no_keys.write_text(
        "\n".join(
            line
            for line in good.read_text().splitlines()
            if not line.startswith(("access_key_id", "secret_access_key"))
        )
        + "\n"
    )
    env_creds = {"AWS_ACCESS_KEY_ID": SENTINEL_KEY_ID, "AWS_SECRET_ACCESS_KEY": SENTINEL_SECRET}
    hook_env = {"BACKREST_CONFIG": str(tmp_path / "no-backrest.json")}

    outputs: list[tuple[str, str | bytes]] = []

    def run(label: str, args: list[str], code: int, env: dict[str, str] | None = None) -> None:
        t0 = time.monotonic()
        result = run_agent(args, env=env, timeout=120)
        print(label, round(time.monotonic() - t0, 2), result.stderr[-300:])
        assert result.returncode == code, (label, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, (label, result.stderr)
        outputs.extend([(f"{label} stdout", result.stdout), (f"{label} stderr", result.stderr)])

    def up(cfg: Path) -> list[str]:
        return ["upload", "--repo", str(repo.root), "--repo-id", REPO_ID, "--config", str(cfg)]

    run("dry run", [*up(good), "--dry-run", "--json"], 0)
    run("upload", [*up(good), "--json"], 0)
    run("upload -v", ["-v", *up(good)], 0)
    add_packs(repo, 2, 50_000, seed=7)  # something new, so the failing runs must send
    run("wrong secret", [*up(bad_secret), "--json"], 4)
    run("wrong secret -v", ["-v", *up(bad_secret)], 4)
    run("unknown key", [*up(bad_key), "--json"], 4)
    run("env credentials", [*up(no_keys), "--json"], 4, env=env_creds)
    run("dry run, wrong secret", [*up(bad_secret), "--dry-run", "--json"], 0)
    run("doctor", ["doctor", "--repo", str(repo.root), "--config", str(good)], 0)
    run("doctor, wrong secret", ["doctor", "--config", str(bad_secret)], 4)
    run("doctor, unknown key", ["-v", "doctor", "--config", str(bad_key)], 4)
    for cfg in (good, bad_key):
        for fmt in ("text", "json"):
            args = ["hook-snippet", "--repo-id", REPO_ID, "--format", fmt, "--config", str(cfg)]
            run(f"hook-snippet {fmt} {cfg.name}", args, 0, env=hook_env)

    files = [(str(p), data) for p, data in _state_bytes(state)]
    assert any(p.endswith(".sqlite") for p, _ in files), files
    assert_no_leak("real credentials", [*outputs, *files], real.secret_key, real.access_key)
    assert_no_leak("sentinel credentials", [*outputs, *files], SENTINEL_SECRET, SENTINEL_KEY_ID)

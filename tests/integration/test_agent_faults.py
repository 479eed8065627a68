"""The agent against a misbehaving world: flaky and dead endpoints, wrong credentials, slow
links, and repositories holding things restic never wrote.

Fake restic-format repositories (``make_fake_restic_repo``) keep these fast: what matters
here is how the agent handles the network and the file tree, not restic's format. Every
test runs the real command as a separate process, as Backrest's hook does, against
``rclone serve s3`` (behind the fault-injecting proxy where faults are needed).

botocore's backoff cannot be shortened from the config, so the tests that exhaust the
retries (persistent 500s, a closed port) take a few seconds each: non-throttling errors
back off ``rand() * 0.05 s * 2**i``, which adds up to at most ~13 s over all the retries.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from testbed.agent import (
    AgentResult,
    agent_env,
    remote_keys,
    run_agent,
    unfinished_uploads,
    write_agent_config,
)
from testbed.repos import FakeRepo, add_packs, make_fake_restic_repo
from testbed.s3.endpoint import S3Endpoint, free_port
from testbed.s3.faults import Fault, FaultHook, FaultSchedule
from testbed.s3.operations import LoggedRequest, RequestInfo
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server

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


def upload_args(config: Path, repo: Path, *extra: str) -> list[str]:
    return ["upload", "--repo", str(repo), "--repo-id", REPO_ID, "--config", str(config), *extra]


def upload(config: Path, repo: Path, *extra: str, env: dict[str, str] | None = None) -> AgentResult:
    return run_agent(upload_args(config, repo, *extra), env=env, timeout=180)


def fake_repo(path: Path, *, packs: int, size: int | tuple[int, int], seed: int = 0) -> FakeRepo:
    return make_fake_restic_repo(path, packs=packs, pack_size=size, seed=seed)


def expected_keys(repo: FakeRepo) -> set[str]:
    return {f"{PREFIX}/{k}" for k in repo.relpaths()}


def assert_mirror_bytes(
    endpoint: S3Endpoint, bucket: str, repo: FakeRepo, extra: Iterable[str] = ()
) -> None:
    """The prefix holds exactly the repository's mirrored files (plus ``extra``, more
    repository-relative keys) with the local bytes: every content-named object hashes to
    its name (sha256 of a GET), ``config`` equals the local one."""
    client = endpoint.client()
    relpaths = [*repo.relpaths(), *extra]
    assert set(remote_keys(endpoint, bucket, f"{PREFIX}/")) == {f"{PREFIX}/{k}" for k in relpaths}
    for rel in relpaths:
        body = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{rel}")["Body"].read()
        if rel == "config":
            assert body == repo.config.read_bytes()
        else:
            assert hashlib.sha256(body).hexdigest() == rel.rsplit("/", 1)[-1], rel


def first_fault(*hooks: FaultHook) -> FaultHook:
    """One proxy hook from several schedules: asked in turn, the first fault wins."""

    def hook(info: RequestInfo) -> Fault | None:
        for schedule in hooks:
            fault = schedule(info)
            if fault is not None:
                return fault
        return None

    return hook


def under(folder: str) -> Callable[[RequestInfo], bool]:
    return lambda info: (info.key or "").startswith(f"{PREFIX}/{folder}/")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("backrest-relay: error:")]


def assert_retried(requests: list[LoggedRequest], faulted: LoggedRequest) -> None:
    """A later attempt of the same request (operation, key, upload and part) succeeded."""

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
    add_packs(repo, 1, 11 * MiB, seed=1)  # three parts of 5 MiB
    slow_down = FaultSchedule(Fault.slow_down(), times=3, operation="PutObject")
    lost_reply = FaultSchedule(Fault.drop_after_forward(), times=1, operation="PutObject")
    resets = FaultSchedule(Fault.reset_mid_body(), times=2, operation="UploadPart")
    drop_create = FaultSchedule(Fault.drop(), times=1, operation="CreateMultipartUpload")
    drop_complete = FaultSchedule(Fault.drop(), times=1, operation="CompleteMultipartUpload")
    schedules = (slow_down, lost_reply, resets, drop_create, drop_complete)
    counting_proxy.fault = first_fault(*schedules)
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
    assert [s.injected for s in schedules] == [3, 1, 2, 1, 1]
    faulted = [r for r in log if r.fault is not None]
    assert sorted((r.operation, r.fault, r.status) for r in faulted) == sorted(
        [
            *[("PutObject", "respond", 503)] * 3,
            ("PutObject", "drop_after_forward", None),
            *[("UploadPart", "reset_mid_body", None)] * 2,
            ("CreateMultipartUpload", "drop", None),
            ("CompleteMultipartUpload", "drop", None),
        ]
    )
    for entry in faulted:
        assert_retried(log, entry)
    # Retries count as requests (the number a bill would show).
    assert summary["requests"] >= len(log)


# -- 2. a persistently failing endpoint --------------------------------------------------


def test_persistent_500s_exit_4_with_one_clear_line_a_consistent_mirror_and_a_clean_rerun(
    rclone_server: RcloneS3Server, rclone_bucket: str, counting_proxy: S3Proxy, tmp_path: Path
) -> None:
    repo = fake_repo(tmp_path / "repo", packs=16, size=(20_000, 300_000))
    counting_proxy.fault = FaultSchedule(
        Fault.internal_error(), times=None, skip=3, method="PUT", pred=under("data")
    )
    config = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket)

    failed = upload(config, repo.root, "--json")

    assert failed.returncode == 4, failed.stderr
    assert "Traceback" not in failed.stderr
    lines = error_lines(failed.stderr)
    assert len(lines) == 1, failed.stderr
    named = re.search(r"data/[0-9a-f]{2}/[0-9a-f]{64}", lines[0])
    assert named, lines[0]
    assert "InternalError" in lines[0] and "500" in lines[0], lines[0]
    summary = failed.summary
    assert (summary["status"], summary["exit_code"]) == ("failed", 4)
    assert summary["error"]["kind"] == "destination"
    assert named.group(0) in summary["error"]["message"]
    # The named object was retried (docs/mirror.md: 8 attempts) before the run gave up.
    attempts = [
        r
        for r in counting_proxy.requests
        if r.key == f"{PREFIX}/{named.group(0)}" and r.method == "PUT"
    ]
    assert len(attempts) >= 8 and all(r.status == 500 for r in attempts), attempts

    present = set(remote_keys(rclone_server.endpoint, rclone_bucket, f"{PREFIX}/"))
    assert not any(k.startswith((f"{PREFIX}/snapshots/", f"{PREFIX}/index/")) for k in present)
    assert f"{PREFIX}/config" in present
    missing = expected_keys(repo) - present
    assert missing and present < expected_keys(repo)

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
    assert sent == missing
    assert rerun.summary["uploaded_files"] == len(missing)
    assert_mirror_bytes(rclone_server.endpoint, rclone_bucket, repo)


# -- 3. an unreachable endpoint ------------------------------------------------------------


def test_unreachable_endpoint_exits_4_with_a_message_in_reasonable_time(
    rclone_server: RcloneS3Server, tmp_path: Path
) -> None:
    repo = fake_repo(tmp_path / "repo", packs=3, size=10_000)
    real = rclone_server.endpoint
    closed = S3Endpoint(f"http://127.0.0.1:{free_port()}", real.access_key, real.secret_key)
    config = config_for(tmp_path, closed, "offsite")

    started = time.monotonic()
    result = upload(config, repo.root, "--json")
    took = time.monotonic() - started

    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert closed.endpoint_url in lines[0] and "connect" in lines[0].lower(), lines[0]
    assert result.summary["error"]["kind"] == "destination"
    assert result.summary["uploaded_files"] == 0
    assert took < 120, f"took {took:.1f}s"


# -- 4. secrets never leak -----------------------------------------------------------------


def state_files(state_dir: Path) -> list[tuple[str, bytes]]:
    """Every file of the state directory as bytes (SQLite file, its WAL, the lock...)."""
    return [(str(p), p.read_bytes()) for p in sorted(state_dir.rglob("*")) if p.is_file()]


def assert_no_leak(texts: Iterable[tuple[str, str | bytes]], *secrets: str) -> None:
    for where, text in texts:
        data = text.encode() if isinstance(text, str) else text
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} leaked into {where}"


def without_keys(config: Path, name: str) -> Path:
    """The same config without credentials (the AWS chain supplies them)."""
    lines = config.read_text().splitlines()
    kept = [ln for ln in lines if not ln.startswith(("access_key_id", "secret_access_key"))]
    out = config.with_name(name)
    out.write_text("\n".join(kept) + "\n")
    return out


def test_credentials_never_reach_output_summary_or_state(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    """upload (ok, refused, dry runs, -v) and hook-snippet; doctor's output is checked the
    same way in the doctor test below."""
    real = rclone_server.endpoint
    repo = fake_repo(tmp_path / "repo", packs=6, size=(10_000, 200_000))
    good = config_for(tmp_path, real, rclone_bucket, name="good.toml")
    wrong = S3Endpoint(real.endpoint_url, real.access_key, SENTINEL_SECRET)
    bad_secret = config_for(tmp_path, wrong, rclone_bucket, name="bad-secret.toml")
    from_env = without_keys(good, "env-creds.toml")
    env_creds = {"AWS_ACCESS_KEY_ID": SENTINEL_KEY_ID, "AWS_SECRET_ACCESS_KEY": SENTINEL_SECRET}
    no_backrest = {"BACKREST_CONFIG": str(tmp_path / "no-backrest.json")}
    outputs: list[tuple[str, str | bytes]] = []

    def run(label: str, args: list[str], code: int, env: dict[str, str] | None = None) -> str:
        result = run_agent(args, env=env, timeout=120)
        assert result.returncode == code, (label, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, (label, result.stderr)
        if "--json" in args:
            assert result.summary["exit_code"] == code, label
        outputs.extend([(f"{label}: stdout", result.stdout), (f"{label}: stderr", result.stderr)])
        return result.stdout + result.stderr

    run("dry run", [*upload_args(good, repo.root), "--dry-run", "--json"], 0)
    run("upload", [*upload_args(good, repo.root), "--json"], 0)
    add_packs(repo, 2, 50_000, seed=7)  # something new, so the failing runs must send
    run("dry run, wrong secret", [*upload_args(bad_secret, repo.root), "--dry-run", "--json"], 0)
    refused = run("wrong secret", ["-v", *upload_args(bad_secret, repo.root), "--json"], 4)
    assert "SignatureDoesNotMatch" in refused  # the sentinel secret did sign the requests
    unknown = run("AWS chain", [*upload_args(from_env, repo.root), "--json"], 4, env=env_creds)
    assert "InvalidAccessKeyId" in unknown
    hook = ["hook-snippet", "--repo-id", REPO_ID, "--config", str(bad_secret)]
    run("hook-snippet", hook, 0, env=no_backrest)
    run("hook-snippet json", [*hook, "--format", "json"], 0, env=no_backrest)

    files = state_files(tmp_path / "state")
    assert any(name.endswith(".sqlite") for name, _ in files), files
    assert_no_leak([*outputs, *files], real.secret_key, real.access_key)
    assert_no_leak([*outputs, *files], SENTINEL_SECRET, SENTINEL_KEY_ID)


# -- 5. doctor -------------------------------------------------------------------------------


def doctor(config: Path, *extra: str) -> AgentResult:
    return run_agent(["doctor", "--config", str(config), *extra], timeout=120)


def check_line(output: str, name: str, *, ok: bool) -> str:
    mark = r"ok\s*" if ok else "FAIL"
    match = re.search(rf"^\[{mark}\] {name}: .+$", output, re.MULTILINE)
    assert match, f"no {'passing' if ok else 'failing'} {name!r} check in:\n{output}"
    return match.group(0)


def test_doctor_passes_against_a_good_bucket_and_names_each_problem(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    real = rclone_server.endpoint
    repo = fake_repo(tmp_path / "repo", packs=2, size=10_000)
    good = config_for(tmp_path, real, rclone_bucket, name="good.toml")

    fine = doctor(good, "--repo", str(repo.root), "--repo-id", REPO_ID)
    assert fine.returncode == 0, fine.stdout + fine.stderr
    for name in (
        "config",
        "repository",
        "credentials",
        "bucket access",
        re.escape("write permission (repository prefix)"),
        re.escape("delete permission (repository prefix)"),
        re.escape("write permission (manifest prefix)"),
        re.escape("delete permission (manifest prefix)"),
        "clock",
    ):
        check_line(fine.stdout, name, ok=True)
    assert remote_keys(real, rclone_bucket) == {}, "the write probe was left behind"

    wrong = S3Endpoint(real.endpoint_url, real.access_key, SENTINEL_SECRET)
    denied = doctor(config_for(tmp_path, wrong, rclone_bucket, name="wrong.toml"))
    assert denied.returncode == 4, denied.stdout + denied.stderr
    check_line(denied.stdout, "config", ok=True)
    check_line(denied.stdout, "credentials", ok=True)  # present; the server refuses them
    assert "SignatureDoesNotMatch" in check_line(denied.stdout, "bucket access", ok=False)

    missing = doctor(config_for(tmp_path, real, "no-such-bucket-here", name="missing.toml"))
    assert missing.returncode == 4, missing.stdout + missing.stderr
    assert "no-such-bucket-here" in check_line(missing.stdout, "bucket access", ok=False)

    broken = tmp_path / "broken.toml"
    broken.write_text(good.read_text().replace("[upload]", "[upload\n"))
    bad_toml = doctor(broken)
    assert bad_toml.returncode == 2, bad_toml.stdout + bad_toml.stderr
    assert "TOML" in check_line(bad_toml.stdout, "config", ok=False)

    misspelt = tmp_path / "misspelt.toml"
    misspelt.write_text(good.read_text().replace("concurrency", "concurency"))
    unknown = doctor(misspelt)
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert "upload.concurency" in check_line(unknown.stdout, "config", ok=False)

    results = {"ok": fine, "wrong": denied, "missing": missing, "toml": bad_toml, "key": unknown}
    outputs = [(f"doctor {k}", r.stdout + r.stderr) for k, r in results.items()]
    assert not any("Traceback" in text for _, text in outputs)
    assert_no_leak(outputs, real.secret_key, real.access_key, SENTINEL_SECRET)


# -- 6. progress in a hook log ----------------------------------------------------------------

PROGRESS_RE = re.compile(
    # The rate and ETA read "—" until a few seconds of sending give a rate worth showing.
    r"^backrest-relay: data: (\d+)/(\d+) files · \S+ \S+/\S+ \S+ · (?:\S+ \S+/s|—) · ETA \S+$"
)


def test_long_run_off_a_tty_prints_progress_lines_then_the_summary(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    repo = fake_repo(tmp_path / "repo", packs=7, size=2_000_000)
    config = config_for(tmp_path, rclone_server.endpoint, rclone_bucket, bandwidth_limit="2MiB/s")

    result = upload(config, repo.root)  # as the hook runs it: no --json, not a TTY

    assert result.returncode == 0, result.stderr
    progress = [m for m in map(PROGRESS_RE.match, result.stderr.splitlines()) if m]
    assert progress, result.stderr
    assert all(int(m.group(2)) == len(repo.mirrored_files()) for m in progress)
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert re.match(
        rf"^mirrored {re.escape(str(repo.root))} → {rclone_bucket}/{PREFIX}: "
        rf"{len(repo.mirrored_files())} uploaded \(.+\), 0 already there, .*\d+ requests, \S+$",
        last,
    ), result.stdout


# -- 7. bandwidth limit ----------------------------------------------------------------------


def test_bandwidth_limit_holds_the_rate_down(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    repo = fake_repo(tmp_path / "repo", packs=6, size=MiB)
    add_packs(repo, 1, 6 * MiB, seed=2)  # in two parts: the limit covers parts too
    config = config_for(
        tmp_path, rclone_server.endpoint, rclone_bucket, bandwidth_limit="4MiB/s", **MULTIPART
    )

    result = upload(config, repo.root, "--json")

    assert result.returncode == 0, result.stderr
    summary = result.summary
    assert summary["uploaded_bytes"] >= 12 * MiB
    # 12 MiB at 4 MiB/s is 3 s, less a quarter second of burst: a generous lower bound.
    assert summary["duration_seconds"] >= 2.0, summary
    assert_mirror_bytes(rclone_server.endpoint, rclone_bucket, repo)


# Run the agent with Throttle.consume counting the bytes it lets through.
_COUNT_THROTTLED = """
import atexit, os, sys
from local_agent.mirror import throttle

total = [0]
consume = throttle.Throttle.consume


def counting(self, amount):
    total[0] += amount
    consume(self, amount)


throttle.Throttle.consume = counting
atexit.register(lambda: open(os.environ["THROTTLED_BYTES_FILE"], "w").write(str(total[0])))
from local_agent.cli.main import main

sys.exit(main())
"""


def test_bandwidth_limit_counts_each_byte_once(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    repo = fake_repo(tmp_path / "repo", packs=4, size=MiB)
    add_packs(repo, 1, 6 * MiB, seed=3)
    config = config_for(
        tmp_path, rclone_server.endpoint, rclone_bucket, bandwidth_limit="1GiB/s", **MULTIPART
    )
    counter = tmp_path / "throttled-bytes"
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT_THROTTLED, *upload_args(config, repo.root, "--json")],
        env=agent_env({"THROTTLED_BYTES_FILE": str(counter)}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert repo.total_bytes <= int(counter.read_text()) <= repo.total_bytes * 1.05


# -- 8. odd repository contents ----------------------------------------------------------------


def test_odd_entries_are_skipped_with_reasons_and_never_uploaded(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    repo = fake_repo(tmp_path / "repo", packs=4, size=(1_000, 50_000))
    root = repo.root
    empty = root / "data" / "e3" / hashlib.sha256(b"").hexdigest()  # e3b0c442...
    empty.write_bytes(b"")
    (root / "index" / "index.json").write_bytes(b"{}")
    pack = repo.data[0]
    tmp_pack = pack.parent / f"{pack.name}-tmp-4242"  # restic's local backend, mid-write
    tmp_pack.write_bytes(pack.read_bytes())
    (root / "data" / "xx").mkdir()
    (root / "data" / "xx" / pack.name).write_bytes(pack.read_bytes())
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(b"meow")
    content = b"a snapshot that lives outside the repository"
    target = tmp_path / "elsewhere" / hashlib.sha256(content).hexdigest()
    target.parent.mkdir()
    target.write_bytes(content)  # named by its hash: only the symlink rule keeps it out
    link = root / "snapshots" / target.name
    link.symlink_to(target)
    stray_content = next(
        c for i in range(99) if not hashlib.sha256(c := b"pack %d" % i).hexdigest().startswith("00")
    )
    misplaced = root / "data" / "00" / hashlib.sha256(stray_content).hexdigest()
    misplaced.write_bytes(stray_content)

    result = upload(config_for(tmp_path, rclone_server.endpoint, rclone_bucket), root, "--json")

    assert result.returncode == 0, result.stderr
    summary = result.summary
    reasons = {s["key"]: s["reason"] for s in summary["skipped"]}
    rel = {p: p.relative_to(root).as_posix() for p in (tmp_pack, link, misplaced)}
    for key, reason in {
        "index/index.json": "not a restic file name",
        rel[tmp_pack]: "temporary",
        "data/xx": "not a data subfolder",
        "photos": "not part of a restic repository",
        rel[link]: "symbolic link",
        rel[misplaced]: "not a restic file name",
    }.items():
        assert key in reasons, (key, reasons)
        assert reason in reasons[key], (key, reasons[key])

    empty_rel = empty.relative_to(root).as_posix()
    assert_mirror_bytes(rclone_server.endpoint, rclone_bucket, repo, extra=[empty_rel])
    assert summary["uploaded_files"] == len(repo.mirrored_files()) + 1
    head = rclone_server.endpoint.client().head_object(
        Bucket=rclone_bucket, Key=f"{PREFIX}/{empty_rel}"
    )
    assert head["ContentLength"] == 0


# -- lost responses ------------------------------------------------------------------------


def test_lost_reply_to_complete_multipart_upload_is_not_a_failure(
    rclone_server: RcloneS3Server, rclone_bucket: str, counting_proxy: S3Proxy, tmp_path: Path
) -> None:
    repo = fake_repo(tmp_path / "repo", packs=2, size=10_000)
    add_packs(repo, 1, 6 * MiB, seed=5)
    counting_proxy.fault = FaultSchedule(
        Fault.drop_after_forward(), times=1, operation="CompleteMultipartUpload"
    )
    config = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket, **MULTIPART)

    result = upload(config, repo.root, "--json")

    assert result.returncode == 0, result.stderr
    assert_mirror_bytes(rclone_server.endpoint, rclone_bucket, repo)


def test_upload_client_makes_the_documented_8_attempts() -> None:
    from cloud.integrations.s3 import S3Access, make_s3_client

    access = S3Access(
        provider="s3",
        endpoint_url="http://127.0.0.1:9",
        region="us-east-1",
        access_key_id="relay-test-access",
        secret_access_key="relay-test-secret-key",
    )
    assert make_s3_client(access).meta.config.retries["total_max_attempts"] == 8

"""Local mode's verification: cheap when nothing changed, inside the deadline, never silent.

Real restic repositories, `rclone serve s3` behind the counting proxy, and local HTTP
receivers standing in for Apprise (`json://`) and Healthchecks.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

from testbed.agent import (
    AgentResult,
    agent_config_in,
    run_agent,
    start_agent,
    upload_args,
)
from testbed.repos import (
    corrupt,
    make_restic_repo,
    restic_backup,
    restic_check_mirror,
    write_random_tree,
)
from testbed.s3.faults import Fault
from testbed.s3.operations import RequestInfo
from testbed.s3.proxy import S3Proxy
from tests.support.sinks import HttpSink

PREFIX = "restic/home"
GUID = "ab" * 32
HC_UUID = "0b1e9f3c-7d1b-4a5e-9f00-123456789abc"


def small_repo(tmp_path: Path, password: str, backups: int = 3) -> tuple[Path, Path]:
    """A real restic repository with a few small snapshots (a handful of packs each)."""
    repo, source = tmp_path / "repo", tmp_path / "src"
    make_restic_repo(repo, password)
    for round_ in range(backups):
        backup_round(repo, source, password, round_)
    return repo, source


def backup_round(
    repo: Path, source: Path, password: str, round_: int, *, only_new: bool = False
) -> None:
    new = source / f"r{round_}"
    write_random_tree(new, files=4, size=(20_000, 200_000), seed=round_)
    (new / "big.bin").write_bytes(random.Random(round_).randbytes(600_000))
    restic_backup(repo, password, new if only_new else source)


def config(
    tmp_path: Path,
    proxy: S3Proxy,
    bucket: str,
    *,
    notify: str = "",
    verify: str = "",
    **upload: object,
) -> Path:
    path = agent_config_in(
        tmp_path,
        proxy.endpoint,
        bucket,
        upload=upload,
        events={"publisher": "local"},
    )
    with path.open("a") as fh:
        if notify:
            fh.write("[notify]\n" + notify)
        if verify:
            fh.write("[verify]\n" + verify)
    return path


def upload(cfg: Path, repo: Path, env: dict[str, str] | None = None) -> AgentResult:
    return run_agent(upload_args(cfg, repo, repo_guid=GUID), env=env)


def gets(proxy: S3Proxy) -> list[str]:
    return [r.key or "" for r in proxy.requests if r.operation == "GetObject"]


def test_noop_runs_send_nothing_and_rotation_is_budgeted(
    tmp_path: Path, counting_proxy: S3Proxy, rclone_bucket: str, restic_password: str
) -> None:
    repo, _ = small_repo(tmp_path, restic_password)
    cfg = config(tmp_path, counting_proxy, rclone_bucket)
    first = upload(cfg, repo)
    assert first.returncode == 0, first.stderr
    assert first.summary["verification"]["verified"] is True

    for _ in range(3):
        counting_proxy.reset()
        again = upload(cfg, repo)
        assert again.returncode == 0, again.stderr
        assert again.summary["uploaded_files"] == 0
        assert again.summary["verification"]["verified"] is True
        assert counting_proxy.count("GET") == 0, counting_proxy.operations()
        assert counting_proxy.count("PUT") == 0, counting_proxy.operations()
        assert counting_proxy.list_calls() == []
        assert counting_proxy.requests == []
        assert again.summary["verification"]["unproven_objects"] == 0

    # Once `verify.every` has passed, the run re-reads a rotation slice of older objects
    # within the byte budget (plus one listing and the manifest), then moves the cursor on.
    budget = 300_000
    env = {"BACKREST_RELAY_VERIFY__EVERY": "1s", "BACKREST_RELAY_VERIFY__BUDGET": str(budget)}
    seen: list[str] = []
    time.sleep(1.1)
    for _ in range(2):
        counting_proxy.reset()
        rotated = upload(cfg, repo, env=env)
        assert rotated.returncode == 0, rotated.stderr
        stats = rotated.summary["verification"]["stats"]
        assert rotated.summary["verification"]["verified"] is True
        assert stats["deep_checked"] > 0
        assert stats["deep_checked_new"] == 0
        assert counting_proxy.count("PUT") == 0
        objects = [k for k in gets(counting_proxy) if k.startswith(f"{PREFIX}/")]
        assert len(objects) == stats["deep_checked"]
        # The budget may be exceeded only by a single object larger than the budget.
        assert stats["bytes_read"] <= budget or stats["deep_checked"] == 1
        assert not set(objects) & set(seen), "the rotation re-read what it read last time"
        seen += objects
        time.sleep(1.1)
    restic_check_mirror(
        counting_proxy.endpoint, rclone_bucket, PREFIX, restic_password, read_data=False
    )


def test_verification_respects_the_deadline_and_resumes_where_it_stopped(
    tmp_path: Path, counting_proxy: S3Proxy, rclone_bucket: str, restic_password: str
) -> None:
    repo, _ = small_repo(tmp_path, restic_password, backups=5)

    def slow_reads(info: RequestInfo) -> Fault | None:
        if info.operation == "GetObject" and (info.key or "").startswith(f"{PREFIX}/"):
            time.sleep(1.5)
        return None

    counting_proxy.fault = slow_reads
    cfg = config(tmp_path, counting_proxy, rclone_bucket, concurrency=2, deadline="6s")
    first = upload(cfg, repo)
    assert first.returncode == 6, first.stderr
    verification = first.summary["verification"]
    assert verification["complete"] is False
    assert verification["unproven_objects"] > 0
    assert verification["unproven_bytes"] > 0
    assert "verify: " in first.stderr and " files · " in first.stderr  # the progress line
    assert "still unproven" in first.stderr
    read_first = {k for k in gets(counting_proxy) if k.startswith(f"{PREFIX}/")}
    assert read_first

    counting_proxy.fault = None
    counting_proxy.reset()
    cfg = config(tmp_path, counting_proxy, rclone_bucket, concurrency=2, deadline="5m")
    second = upload(cfg, repo)
    assert second.returncode == 0, second.stderr
    assert second.summary["uploaded_files"] == 0
    assert second.summary["verification"]["verified"] is True
    assert second.summary["verification"]["complete"] is True
    assert second.summary["verification"]["unproven_objects"] == 0
    read_second = {k for k in gets(counting_proxy) if k.startswith(f"{PREFIX}/")}
    assert read_second, "the rest was not proven"
    assert not read_first & read_second, "the second run re-read what the first had proven"
    assert len(read_first) + len(read_second) == (
        second.summary["verification"]["stats"]["deep_checked"]
        + first.summary["verification"]["stats"]["deep_checked"]
    )


def test_a_terminated_verification_keeps_what_it_proved(
    tmp_path: Path, counting_proxy: S3Proxy, rclone_bucket: str, restic_password: str
) -> None:
    """SIGTERM (Backrest or its container stopping, the sidecar shutting down) mid-way
    through the read-back: the run stops like at its deadline (exit 6), and the next run
    does not read again what this one had already proven."""
    repo, _ = small_repo(tmp_path, restic_password, backups=5)

    def slow_reads(info: RequestInfo) -> Fault | None:
        if info.operation == "GetObject" and (info.key or "").startswith(f"{PREFIX}/"):
            time.sleep(1.0)
        return None

    counting_proxy.fault = slow_reads
    cfg = config(tmp_path, counting_proxy, rclone_bucket, concurrency=1, deadline="5m")
    args = ["upload", "--repo", str(repo), "--repo-id", "home", "--repo-guid", GUID]
    proc = start_agent([*args, "--config", str(cfg), "--json"])
    try:
        deadline = time.monotonic() + 120
        while len([k for k in gets(counting_proxy) if k.startswith(f"{PREFIX}/")]) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the verification never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 6, err
    summary = json.loads(out)
    assert summary["verification"]["unproven_objects"] > 0, summary
    read_first = {k for k in gets(counting_proxy) if k.startswith(f"{PREFIX}/")}

    counting_proxy.fault = None
    counting_proxy.reset()
    second = upload(cfg, repo)
    assert second.returncode == 0, second.stderr
    assert second.summary["verification"]["complete"] is True
    read_second = {k for k in gets(counting_proxy) if k.startswith(f"{PREFIX}/")}
    assert read_second, "the rest was not proven"
    assert len(read_first & read_second) <= 1, "the second run re-read what the first proved"
    restic_check_mirror(
        counting_proxy.endpoint, rclone_bucket, PREFIX, restic_password, read_data=False
    )


def test_an_event_that_cannot_be_verified_does_not_silence_later_failures(
    tmp_path: Path, counting_proxy: S3Proxy, rclone_bucket: str, restic_password: str
) -> None:
    repo, source = small_repo(tmp_path, restic_password, backups=2)

    def deny_reads(info: RequestInfo) -> Fault | None:
        if info.operation == "GetObject":
            return Fault.s3_error(403, "AccessDenied", "not entitled: key lacks readFiles")
        return None

    counting_proxy.fault = deny_reads
    with HttpSink() as chat:
        cfg = config(
            tmp_path,
            counting_proxy,
            rclone_bucket,
            notify=f'urls = ["json://127.0.0.1:{chat.port}/hook"]\n',
        )
        first = upload(cfg, repo)
        assert first.returncode != 0 or first.summary["verification"]["verified"] is False
        [could_not] = chat.wait_for(1)
        body = json.loads(could_not.body)
        assert "could not verify" in body["title"].lower(), body
        assert "AccessDenied" in body["message"] or "denied" in body["message"].lower()

        for round_ in (10, 11):
            chat.clear()
            # Only the new directory: restic must not read the parent snapshot's trees,
            # one of which may sit in the pack corrupted in the previous round.
            backup_round(repo, source, restic_password, round_, only_new=True)
            new_packs = sorted(
                (p for p in (repo / "data").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_mtime,
            )
            corrupt(new_packs[-1])
            bad = upload(cfg, repo)
            assert bad.returncode == 3, bad.stderr
            [alert] = chat.wait_for(1)
            alert_body = json.loads(alert.body)
            assert "failed" in alert_body["title"].lower(), alert_body
            assert new_packs[-1].name in alert_body["message"]
            assert bad.summary["event"]["pending"] == 0
    counting_proxy.fault = None
    restic_check_mirror(
        counting_proxy.endpoint, rclone_bucket, PREFIX, restic_password, read_data=False
    )


def test_healthchecks_hears_every_verified_run_whatever_the_chat_policy(
    tmp_path: Path, counting_proxy: S3Proxy, rclone_bucket: str, restic_password: str
) -> None:
    repo, _ = small_repo(tmp_path, restic_password, backups=1)
    with HttpSink() as chat, HttpSink() as hc:
        cfg = config(
            tmp_path,
            counting_proxy,
            rclone_bucket,
            notify=(
                f'urls = ["json://127.0.0.1:{chat.port}/hook"]\n'
                'success = "on_recovery"\n'
                f'healthchecks = {{ home = "{hc.url}/{HC_UUID}" }}\n'
            ),
        )
        for _ in range(2):
            hc.clear()
            result = upload(cfg, repo)
            assert result.returncode == 0, result.stderr
            start, done = hc.wait_for(2)
            assert start.path == f"/{HC_UUID}/start"
            assert done.path == f"/{HC_UUID}"
            assert start.query["rid"] == [result.summary["run_id"]]
            assert done.query["rid"] == [result.summary["run_id"]]
        assert chat.requests == [], "on_recovery: a normal success stays quiet in chat"


def test_a_corrupt_run_store_is_set_aside_and_the_run_still_reports(
    tmp_path: Path, counting_proxy: S3Proxy, rclone_bucket: str, restic_password: str
) -> None:
    """runs.sqlite damaged (disk full, a bad copy): the hook run used to die with exit 1 and
    send nothing but Healthchecks' /start — every later run too. The history is only
    history: it is set aside, a fresh one started, and the run mirrors, verifies and
    notifies as usual."""
    repo, _ = small_repo(tmp_path, restic_password, backups=1)
    with HttpSink() as chat, HttpSink() as hc:
        cfg = config(
            tmp_path,
            counting_proxy,
            rclone_bucket,
            notify=(
                f'urls = ["json://127.0.0.1:{chat.port}/hook"]\n'
                'success = "always"\n'
                f'healthchecks = {{ home = "{hc.url}/{HC_UUID}" }}\n'
            ),
        )
        runs = tmp_path / "state" / "runs.sqlite"
        runs.parent.mkdir(parents=True, exist_ok=True)
        runs.write_bytes(b"not a database\n" * 100)
        result = upload(cfg, repo)
        assert result.returncode == 0, result.stderr
        assert result.summary["verification"]["verified"] is True
        assert "runs.sqlite" in result.stderr and "set aside" in result.stderr, result.stderr
        [message] = chat.wait_for(1)
        assert "verified" in message.json()["title"]
        assert [r.path for r in hc.wait_for(2)] == [f"/{HC_UUID}/start", f"/{HC_UUID}"]
    kept = [p for p in runs.parent.iterdir() if p.name.startswith("runs.sqlite.unusable")]
    assert [p.read_bytes() for p in kept] == [b"not a database\n" * 100]
    status = run_agent(["status", "--json", "--config", str(cfg)])
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["repositories"][0]["last_verified_at"]


def test_a_corrupt_outbox_is_set_aside_and_the_run_still_reports(
    tmp_path: Path, counting_proxy: S3Proxy, rclone_bucket: str, restic_password: str
) -> None:
    """outbox.sqlite damaged: every hook run refused (exit 2) before mirroring and sent
    nothing but Healthchecks' /start. Set aside, a fresh outbox, and the run goes on."""
    repo, _ = small_repo(tmp_path, restic_password, backups=1)
    with HttpSink() as hc:
        cfg = config(
            tmp_path,
            counting_proxy,
            rclone_bucket,
            notify=f'healthchecks = {{ home = "{hc.url}/{HC_UUID}" }}\n',
        )
        outbox = tmp_path / "state" / "outbox.sqlite"
        outbox.parent.mkdir(parents=True, exist_ok=True)
        outbox.write_bytes(b"not a database\n" * 100)
        result = upload(cfg, repo)
        assert result.returncode == 0, result.stderr
        assert result.summary["verification"]["verified"] is True
        assert "outbox.sqlite" in result.stderr and "set aside" in result.stderr, result.stderr
        assert [r.path for r in hc.wait_for(2)] == [f"/{HC_UUID}/start", f"/{HC_UUID}"]
    kept = [p for p in outbox.parent.iterdir() if p.name.startswith("outbox.sqlite.unusable")]
    assert [p.read_bytes() for p in kept] == [b"not a database\n" * 100]
    restic_check_mirror(
        counting_proxy.endpoint, rclone_bucket, PREFIX, restic_password, read_data=False
    )

"""`backrest-relay verify --time-limit` interrupted and tampered with, as a careless operator
or an attacker would: a SIGTERM (a service manager stopping it) saves the progress like the
time limit, a SIGKILL loses at most that call's reads (never an earlier call's), and an
object damaged or deleted between two calls of one verification always surfaces — never
a false "verified". A real restic repository mirrored to `rclone serve s3`; the verify
calls go through a proxy that slows each object GET down (no timing is asserted).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from testbed.agent import agent_config_in, run_agent, start_agent
from testbed.repos import restic_check_mirror
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from tests.integration.conftest import BuiltRepo
from tests.support.tamper import tamper_object
from tests.support.verify_calls import (
    PREFIX,
    ids,
    mirrored,
    object_gets,
    slow_object_reads,
    verify_config,
)


def interrupt_after_reads(args: list[str], proxy: S3Proxy, reads: int, sig: int) -> int:
    """Start `verify ARGS`, send `sig` once `reads` object GETs went through; its exit code."""
    seen = sum(object_gets(proxy).values())
    proc = start_agent(args)
    try:
        for _ in range(1200):
            if sum(object_gets(proxy).values()) - seen >= reads or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def test_sigterm_saves_the_progress_and_sigkill_never_loses_an_earlier_calls(
    tmp_path: Path,
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
) -> None:
    objects = mirrored(tmp_path, restic_repo, rclone_server, rclone_bucket)
    cfg = verify_config(tmp_path, counting_proxy, rclone_bucket)
    args = ["verify", *ids(), "--config", str(cfg), "--time-limit", "10m"]
    counting_proxy.fault = slow_object_reads

    # A service manager stops it: like the time limit, exit 6 and the progress saved.
    assert interrupt_after_reads(args, counting_proxy, 2, signal.SIGTERM) == 6
    after_term = object_gets(counting_proxy)
    assert after_term, "the SIGTERM'd call read objects back"
    # Killed outright: its own reads are lost, the first call's are not.
    assert interrupt_after_reads(args, counting_proxy, 2, signal.SIGKILL) == -signal.SIGKILL
    counting_proxy.fault = None
    last = run_agent(["verify", *ids(), "--config", str(cfg)], timeout=300)
    assert last.returncode == 0, last.stdout + last.stderr
    assert "VERIFIED" in last.stdout

    gets = object_gets(counting_proxy)
    assert sorted(gets) == objects, "every object read back"
    for key in after_term:
        assert gets[key] == 1, f"{key}: read by the SIGTERM'd call, read again after it"
    restic_check_mirror(rclone_server.endpoint, rclone_bucket, PREFIX, restic_repo.password)


def test_an_object_damaged_or_deleted_between_two_calls_is_never_verified(
    tmp_path: Path,
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
) -> None:
    objects = mirrored(tmp_path, restic_repo, rclone_server, rclone_bucket)
    cfg = verify_config(tmp_path, counting_proxy, rclone_bucket)
    counting_proxy.fault = slow_object_reads
    first = run_agent(["verify", *ids(), "--config", str(cfg), "--time-limit", "2s"], timeout=120)
    counting_proxy.fault = None
    assert first.returncode == 6, first.stdout + first.stderr
    proven = sorted(object_gets(counting_proxy))
    unread = [k for k in objects if k not in proven and k.startswith("data/")]
    assert proven and unread
    # Behind the verification's back: one object it already proved is corrupted (same
    # size), one it has not read yet is deleted.
    tamper_object(rclone_server.endpoint, rclone_bucket, f"{PREFIX}/{proven[0]}", "corrupt")
    tamper_object(rclone_server.endpoint, rclone_bucket, f"{PREFIX}/{unread[-1]}", "delete")

    last = run_agent(["verify", *ids(), "--config", str(cfg)], timeout=300)
    assert last.returncode == 3, last.stdout + last.stderr
    assert "VERIFICATION FAILED" in last.stdout
    assert proven[0] in last.stdout and unread[-1] in last.stdout
    # And the next verify (the cursor ended with the verdict) says so again.
    again = run_agent(["verify", *ids(), "--config", str(cfg)], timeout=300)
    assert again.returncode == 3, again.stdout + again.stderr


def test_a_prefix_with_odd_characters_is_mirrored_verified_and_listed_alike(
    tmp_path: Path,
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
) -> None:
    """A careless operator's prefix — a space, `+`, `%41`, `&`, unicode — names the same
    keys on the upload, the folder-by-folder listing and the signed GETs: the verify
    command proves every object and `restic check` on the mirror agrees."""
    prefix = "off site+/ä%41&b/{repo_id}"
    expanded = "off site+/ä%41&b/home"
    cfg = agent_config_in(tmp_path, rclone_server.endpoint, rclone_bucket, prefix=prefix)
    uploaded = run_agent(["upload", "--repo", str(restic_repo.path), *ids(), "--config", str(cfg)])
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    verified = run_agent(["verify", *ids(), "--config", str(cfg)], timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "VERIFIED" in verified.stdout and "extra" not in verified.stdout
    # restic reads its s3: location as a URL path: a literal `%` is `%25` there.
    at = expanded.replace("%", "%25")
    restic_check_mirror(rclone_server.endpoint, rclone_bucket, at, restic_repo.password)


def test_a_wrong_secret_is_exit_4_and_never_echoed(
    tmp_path: Path,
    restic_repo: BuiltRepo,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
) -> None:
    """A careless operator's wrong secret key: `verify -v` (the lean signed path's listing
    and GETs, the server's SignatureDoesNotMatch) fails with exit 4 naming the cause, and no
    form of the secret appears in anything it prints."""
    mirrored(tmp_path, restic_repo, rclone_server, rclone_bucket)
    secret = "Wr0ngSecretKeyWr0ngSecretKeyWr0ngSecret1"
    cfg = agent_config_in(tmp_path, rclone_server.endpoint, rclone_bucket)
    text = cfg.read_text().replace(rclone_server.endpoint.secret_key, secret)
    cfg.write_text(text)
    result = run_agent(["-v", "verify", *ids(), "--config", str(cfg), "--time-limit", "1m"])
    assert result.returncode == 4, result.stdout + result.stderr
    assert "cannot read the mirror" in result.stderr and "SignatureDoesNotMatch" in result.stderr
    for shown in (result.stdout, result.stderr):
        assert secret not in shown and secret[:12] not in shown

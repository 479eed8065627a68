"""Local mode and the binding (docs/verification.md, "Trust model"): a repository whose
mirror moves to another prefix is refused — said on the console, recorded, not verified —
until the operator's `status --forget`, after which the next run binds the new prefix.

Real restic repository, `rclone serve s3`, the agent as a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

from testbed.agent import run_agent, upload_args
from testbed.repos import restic_check_mirror
from testbed.s3.rclone import RcloneS3Server
from tests.integration.test_local_mode_cli import REPO_ID, local_config, small_restic_repo

GUID = "5e" * 32


def test_a_moved_mirror_is_refused_until_the_binding_is_forgotten(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str, restic_password: str
) -> None:
    repo = small_restic_repo(tmp_path, restic_password)
    config = local_config(tmp_path, rclone_server, rclone_bucket)

    first = run_agent(upload_args(config, repo, repo_id=REPO_ID, repo_guid=GUID))
    assert first.returncode == 0, first.stderr
    assert first.summary["verification"]["verified"] is True

    # The operator moves the mirror: same repository, another prefix.
    text = config.read_text().replace('prefix = "restic/{repo_id}"', 'prefix = "moved/{repo_id}"')
    config.write_text(text)
    moved = run_agent(upload_args(config, repo, repo_id=REPO_ID, repo_guid=GUID))
    assert moved.returncode == 0, moved.stderr  # the mirror itself succeeded
    verification = moved.summary["verification"]
    assert verification["verified"] is False
    [problem] = verification["problems"]
    assert problem["kind"] == "binding"
    assert "prefix 'moved/home' (bound: 'restic/home')" in problem["detail"]
    restic_check_mirror(
        rclone_server.endpoint, rclone_bucket, "moved/home", restic_password, read_data=False
    )

    console = run_agent(
        upload_args(config, repo, repo_id=REPO_ID, repo_guid=GUID, json_summary=False)
    )
    assert console.returncode == 0, console.stderr
    assert "VERIFICATION REFUSED" in console.stdout + console.stderr
    assert "status --forget" in console.stdout + console.stderr
    status = run_agent(["status", "--json", "--config", str(config)])
    [row] = json.loads(status.stdout)["repositories"]
    assert row["last_verified_run_id"] is not None  # still the first run's verification
    assert row["last_problems"][0]["kind"] == "binding"

    forgot = run_agent(["status", "--forget", GUID, "--config", str(config)])
    assert forgot.returncode == 0, forgot.stderr
    rebound = run_agent(upload_args(config, repo, repo_id=REPO_ID, repo_guid=GUID))
    assert rebound.returncode == 0, rebound.stderr
    assert rebound.summary["verification"]["verified"] is True

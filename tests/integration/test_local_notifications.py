"""Local mode end to end: upload → in-process verification → notification.

With `success = "always"` a verified mirror sends a success message naming the
repository; a remote object damaged afterwards is named in the failure alert of the next
run that re-reads it (the rotation, once `verify.every` has passed).
Apprise delivers to a local HTTP server (`json://`), Healthchecks pings to another.
"""

from __future__ import annotations

import json
from pathlib import Path

from testbed.agent import agent_config_in, run_agent, upload_args
from testbed.repos import make_fake_restic_repo
from testbed.s3.rclone import RcloneS3Server
from tests.support.sinks import HttpSink

GUID = "ef" * 32
HC_UUID = "5e1f0c2a-7d1b-4a5e-9f00-123456789abc"


def test_success_then_damage_is_named_in_the_next_alert(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    repo = make_fake_restic_repo(tmp_path / "repo", packs=12, pack_size=(500, 20_000), seed=21)
    with HttpSink() as chat, HttpSink() as healthchecks:
        config = agent_config_in(
            tmp_path,
            rclone_server.endpoint,
            rclone_bucket,
            events={"publisher": "local"},
        )
        apprise_url = f"json://127.0.0.1:{chat.port}/hook"
        with config.open("a") as fh:
            fh.write(
                "[notify]\n"
                f'urls = ["{apprise_url}"]\n'
                'success = "always"\n'
                f'healthchecks = {{ home = "{healthchecks.url}/{HC_UUID}" }}\n'
            )
        args = upload_args(config, repo.root, repo_guid=GUID)
        first = run_agent(args)
        assert first.returncode == 0, first.stderr
        [message] = chat.wait_for(1)
        body = json.loads(message.body)
        assert "home" in body["title"] and "verified" in body["title"]
        start, ping = healthchecks.wait_for(2)
        assert start.path == f"/{HC_UUID}/start"
        assert ping.path == f"/{HC_UUID}"

        victim = repo.data[4].relative_to(repo.root).as_posix()
        remote = rclone_server.bucket_path(rclone_bucket) / "restic/home" / victim
        data = remote.read_bytes()
        remote.write_bytes(data[:-1] + bytes([data[-1] ^ 0x55]))

        chat.clear()
        healthchecks.clear()
        # verify.every = 0s and a budget larger than the mirror: this run's rotation
        # re-reads every older object.
        second = run_agent(
            args,
            env={"BACKREST_RELAY_VERIFY__EVERY": "0s", "BACKREST_RELAY_VERIFY__BUDGET": "1GiB"},
        )
        assert second.returncode == 0, second.stderr
        assert second.summary["uploaded_files"] == 0
        assert second.summary["verification"]["verified"] is False
        [alert] = chat.wait_for(1)
        alert_body = json.loads(alert.body)
        assert "FAILED" in alert_body["title"]
        assert victim in alert_body["message"]
        start, fail_ping = healthchecks.wait_for(2)
        assert start.path == f"/{HC_UUID}/start"
        assert fail_ping.path == f"/{HC_UUID}/fail"
        for text in (first.stdout, first.stderr, second.stdout, second.stderr):
            assert HC_UUID not in text

"""Publishers and the outbox: nothing lost, nothing sent twice, order kept."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from botocore.stub import Stubber

from cloud.contracts.destination import Destination
from cloud.contracts.events import EventDetail, MirrorFailed, RepoRef
from local_agent.events.completion import RunContext, failed_event
from local_agent.events.outbox import Outbox
from local_agent.events.publishers import EventBridgePublisher, EventLog, PublishError
from testbed.agent import run_agent, write_agent_config
from testbed.s3.endpoint import S3Endpoint


def event(n: int) -> MirrorFailed:
    ctx = RunContext(
        repo=RepoRef(id="home"),
        trigger="t",
        destination=Destination(provider="s3", endpoint_url=None, bucket="b", prefix="p"),
        run_id=f"run-{n:03d}",
        host="h",
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return failed_event(ctx, kind="check", message=f"failure {n}")


class FlakyPublisher:
    name = "flaky"

    def __init__(self, fail_on: set[str]) -> None:
        self.fail_on = fail_on
        self.sent: list[str] = []

    def publish(self, e: EventDetail) -> None:
        if e.run_id in self.fail_on:
            raise PublishError(f"cannot send {e.run_id}")
        self.sent.append(e.run_id)


def test_outbox_sends_oldest_first_and_stops_at_first_failure(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    for n in range(4):
        outbox.add(event(n))
    publisher = FlakyPublisher({"run-002"})
    result = outbox.flush(publisher)
    assert publisher.sent == ["run-000", "run-001"]
    assert result.sent == 2 and result.pending == 2
    assert result.error == "cannot send run-002"
    publisher.fail_on.clear()
    result = outbox.flush(publisher)
    assert publisher.sent == ["run-000", "run-001", "run-002", "run-003"]
    assert result.pending == 0
    assert outbox.flush(publisher).sent == 0  # nothing is sent twice


def test_outbox_survives_reopen(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    original = event(1)
    outbox.add(original)
    outbox.close()
    again = Outbox(tmp_path / "outbox.sqlite")
    [item] = again.pending()
    assert item.event() == original


def test_eventbridge_failed_entry_count_raises() -> None:
    publisher = EventBridgePublisher("bus", region="us-east-1")
    client = publisher.bus.client()
    with Stubber(client) as stub:
        stub.add_response(
            "put_events",
            {
                "FailedEntryCount": 1,
                "Entries": [{"ErrorCode": "InternalFailure", "ErrorMessage": "try later"}],
            },
        )
        publisher.bus.attempts = 1
        with pytest.raises(PublishError, match="InternalFailure"):
            publisher.publish(event(1))


def test_eventbridge_entry_shape() -> None:
    publisher = EventBridgePublisher("my-bus", region="us-east-1")
    client = publisher.bus.client()
    e = event(7)
    with Stubber(client) as stub:
        stub.add_response(
            "put_events",
            {"FailedEntryCount": 0, "Entries": [{"EventId": "1"}]},  # one entry, as sent
            {
                "Entries": [
                    {
                        "Source": "backrest-relay.agent",
                        "DetailType": "Mirror Failed",
                        "Detail": e.model_dump_json(),
                        "EventBusName": "my-bus",
                    }
                ]
            },
        )
        publisher.publish(e)
        stub.assert_no_pending_responses()


def test_event_log_appends_json_lines(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log(event(1))
    log(event(2))
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"run-002"' in lines[1]


@pytest.mark.parametrize("command", ["report-failure", "upload"])
def test_a_read_only_outbox_is_refused_up_front_naming_it(tmp_path: Path, command: str) -> None:
    """outbox.sqlite read-only (restored as another user, chmod): the event could not be
    kept, and the run ended with exit 1 "unexpected error: OperationalError: attempt to
    write a readonly database", naming no file — an upload only after mirroring. Now the
    outbox is found unwritable when opened: exit 2 naming it, before anything else."""
    state = tmp_path / "state"
    Outbox(state / "outbox.sqlite").close()
    (state / "outbox.sqlite").chmod(0o444)
    endpoint = S3Endpoint("http://127.0.0.1:9", "AKIDEXAMPLE", "relay-test-secret-key")
    config = write_agent_config(tmp_path / "relay.toml", endpoint, "bkt", state_dir=state)
    args = [command, "--repo-id", "home", "--config", str(config)]
    args += ["--error", "check failed"] if command == "report-failure" else ["--repo", "/nope"]
    done = run_agent(args, timeout=60, honour_file_modes=True)
    assert done.returncode == 2, done.stderr
    said = f"backrest-relay: error: outbox {state / 'outbox.sqlite'}: unusable (attempt to write"
    assert said in done.stderr, done.stderr

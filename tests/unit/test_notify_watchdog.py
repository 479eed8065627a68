"""Who hears what, and when: the notification policy, the messages, and the watchdog
with a controlled clock."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from cloud.app import watchdog
from cloud.app.notify import notify
from cloud.contracts.events import (
    ErrorInfo,
    EventDetail,
    MirrorFailed,
    MirrorStale,
    MirrorVerificationFailed,
    MirrorVerified,
    RepoRef,
)
from cloud.logic.notify import decide, render
from cloud.logic.ports import ChannelError, Notification
from cloud.logic.verification import mirror_run_record, record_verification
from tests.support import events
from tests.support.doubles.runstore import InMemoryRunStore
from tests.support.events import T0

REPO = RepoRef(id="home", guid="ab" * 32, path="/srv/restic")


def verified(at: datetime, ok: bool = True) -> MirrorVerified | MirrorVerificationFailed:
    return events.verification(
        at,
        ok,
        repo=REPO,
        host="nas",
        trigger="Mirror Completed x",
        new_snapshots=["1234567890abcdef" * 4],
    )


def failed(at: datetime) -> MirrorFailed:
    return events.mirror_failed(at, repo=REPO)


def run_watchdog(runs: InMemoryRunStore, *, now: datetime) -> list[MirrorStale]:
    """A watchdog pass whose every alert is published: plan, record, commit."""
    watch = watchdog.plan(runs, now=now)
    watchdog.record(runs, watch)
    for alert in watch.alerts:
        watchdog.commit(runs, alert)
    return watch.events


class Recorder:
    def __init__(self, name: str = "recorder", fail: bool = False) -> None:
        self._name = name
        self.fail = fail
        self.sent: list[Notification] = []

    @property
    def name(self) -> str:
        return self._name

    def send(self, notification: Notification) -> None:
        if self.fail:
            raise ChannelError("closed port")
        self.sent.append(notification)


@pytest.mark.parametrize(
    ("policy", "previous", "expected"),
    [
        ("always", None, "success"),
        ("always", "bad", "recovery"),
        ("on_recovery", "ok", None),
        ("on_recovery", None, None),
        ("on_recovery", "bad", "recovery"),
        ("never", "bad", None),
    ],
)
def test_success_policy(policy: str, previous: str | None, expected: str | None) -> None:
    assert decide(verified(T0), policy, previous) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["always", "on_recovery", "never"])
def test_failures_always_notify(policy: str) -> None:
    assert decide(failed(T0), policy, "ok") == "failure"  # type: ignore[arg-type]
    assert decide(verified(T0, ok=False), policy, None) == "failure"  # type: ignore[arg-type]


def test_failure_message_names_repository_and_object() -> None:
    note = render(verified(T0, ok=False), "failure")
    assert "home" in note.subject and "FAILED" in note.subject
    assert "data/ab/abcd" in note.text and "data/ab/abcd" in note.html
    assert "nas" in note.text
    assert (
        "<script"
        not in render(
            failed(T0).model_copy(
                update={"error": ErrorInfo(kind="destination", message="<script>x</script>")}
            ),
            "failure",
        ).html
    )


def test_one_failing_channel_does_not_stop_the_others() -> None:
    runs = InMemoryRunStore()
    good, bad = Recorder("good"), Recorder("bad", fail=True)
    event = failed(T0)
    runs.record(mirror_run_record(event))
    outcome = notify(event, runs=runs, channels=[bad, good])
    assert len(good.sent) == 1
    assert [(r.name, r.ok) for r in outcome.results] == [("bad", False), ("good", True)]


def record_and_notify(
    runs: InMemoryRunStore, event: EventDetail, channel: Recorder, policy: str = "on_recovery"
) -> None:
    if isinstance(event, MirrorVerified | MirrorVerificationFailed):
        record_verification(runs, event)
    notify(event, runs=runs, channels=[channel], policy=policy)  # type: ignore[arg-type]


def test_watchdog_alerts_once_per_day_and_the_next_verified_run_recovers() -> None:
    runs = InMemoryRunStore()
    channel = Recorder()
    record_and_notify(runs, verified(T0), channel)
    assert channel.sent == []  # on_recovery: a first success is quiet

    later = T0 + timedelta(hours=27)
    [stale] = run_watchdog(runs, now=later)
    assert isinstance(stale, MirrorStale)
    assert stale.age_seconds == pytest.approx(27 * 3600)
    notify(stale, runs=runs, channels=[channel])
    assert [n.severity for n in channel.sent] == ["stale"]
    assert "27.0 h" in channel.sent[0].subject

    assert run_watchdog(runs, now=later + timedelta(hours=23)) == []
    [again] = run_watchdog(runs, now=later + timedelta(hours=24, minutes=1))
    assert again.age_seconds == pytest.approx(51 * 3600 + 60)

    record_and_notify(runs, verified(later + timedelta(hours=25)), channel)
    assert [n.severity for n in channel.sent] == ["stale", "recovery"]
    assert run_watchdog(runs, now=later + timedelta(hours=26)) == []
    record_and_notify(runs, verified(later + timedelta(hours=30)), channel)
    assert len(channel.sent) == 2  # quiet again


def test_watchdog_ignores_fresh_repositories_and_counts_never_verified_from_first_run() -> None:
    runs = InMemoryRunStore()
    runs.record(mirror_run_record(failed(T0)))
    assert run_watchdog(runs, now=T0 + timedelta(hours=2)) == []
    [stale] = run_watchdog(runs, now=T0 + timedelta(hours=30))
    assert stale.last_verified_at is None and stale.age_seconds is None
    subject = render(stale, "stale").subject
    assert "never verified" in subject
    assert "copy for never" not in subject, subject  # not "no verified copy for never verified"

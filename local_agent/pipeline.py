"""Local mode: the cloud side's work, done on the backup host after each upload.

With `events.publisher = "local"` every event the agent emits is recorded, a completed
mirror is verified in-process with the same `cloud.logic` code the Lambda runs, and the
runs land in a SQLite run store under the state directory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.contracts.events import EventDetail, MirrorCompleted, MirrorFailed
from cloud.logic.notify import NotifyOutcome, notify_event
from cloud.logic.ports import NotificationChannel, ObjectStoreError
from cloud.logic.verification import mirror_run_record, verify_completed_mirror
from cloud.logic.verify import VerifyOptions
from local_agent.publishers import EventLog, PublishError

if TYPE_CHECKING:
    from cloud.integrations.runstore_sqlite import SqliteRunStore
    from local_agent.config import RelayConfig

log = logging.getLogger(__name__)


def run_store_path(state_dir: Path) -> Path:
    return state_dir / "runs.sqlite"


class LocalPipeline:
    def __init__(
        self,
        config: RelayConfig,
        state_dir: Path,
        *,
        extra_channels: Sequence[NotificationChannel] = (),
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.event_log = EventLog(state_dir / "events.jsonl")
        self.results: list[EventDetail] = []
        self.notifications: list[NotifyOutcome] = []
        self.extra_channels = list(extra_channels)
        self._runs: SqliteRunStore | None = None
        self._lock = threading.Lock()

    def runs(self) -> SqliteRunStore:
        from cloud.integrations.runstore_sqlite import SqliteRunStore

        with self._lock:
            if self._runs is None:
                self._runs = SqliteRunStore(run_store_path(self.state_dir))
            return self._runs

    def __call__(self, event: EventDetail) -> None:
        if isinstance(event, MirrorCompleted):
            result = self._verify(event)
            self.event_log(event)
            self.event_log(result)
            self.results.append(result)
            self._notify(result)
        elif isinstance(event, MirrorFailed):
            self.runs().record(mirror_run_record(event))
            self.event_log(event)
            self.results.append(event)
            self._notify(event)
        else:
            self.event_log(event)

    def channels(self, repo_id: str | None, repo_guid: str | None) -> list[NotificationChannel]:
        """`notify.urls` (Apprise), the repository's Healthchecks URL, and any extras."""
        from cloud.integrations.channels import AppriseChannel, HealthchecksChannel

        notify = self.config.notify
        channels: list[NotificationChannel] = [
            AppriseChannel(url.get_secret_value()) for url in notify.urls
        ]
        ping = notify.healthchecks_url(repo_id, repo_guid)
        if ping:
            channels.append(HealthchecksChannel(ping))
        return channels + self.extra_channels

    def _notify(self, event: EventDetail) -> None:
        channels = self.channels(event.repo.id, event.repo.guid)
        if not channels:
            return
        outcome = notify_event(
            event, runs=self.runs(), channels=channels, policy=self.config.notify.success
        )
        self.notifications.append(outcome)
        if outcome.failed:
            log.warning(
                "%d of %d notification channel(s) failed", outcome.failed, len(outcome.results)
            )

    def _verify(self, event: MirrorCompleted) -> EventDetail:
        from cloud.integrations.s3 import make_s3_client
        from cloud.integrations.s3_store import S3ObjectStore, S3ReportSink
        from local_agent.verification import lock_check, report_lock

        client = make_s3_client(self.config.destination.access())
        bucket = event.destination.bucket
        try:
            return verify_completed_mirror(
                event,
                store=S3ObjectStore(client, bucket),
                runs=self.runs(),
                reports=S3ReportSink(client, bucket, **report_lock(self.config)),
                options=VerifyOptions(
                    concurrency=self.config.upload.concurrency, **lock_check(self.config)
                ),
            )
        except ObjectStoreError as exc:
            # Not a verdict: keep the event in the outbox and verify on the next run.
            raise PublishError(f"local verification could not read the bucket: {exc}") from None

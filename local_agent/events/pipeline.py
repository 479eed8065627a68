"""Local mode's wiring: the cloud side's use cases (`cloud.app`), run on the backup host.

With `events.publisher = "local"` every event the agent emits is recorded, a completed
mirror is verified in-process with the same code the Lambda runs, and the runs land in a
SQLite run store under the state directory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.app.notify import NotifyOutcome, notify
from cloud.app.verify import CheckpointedVerification, verify_checkpointed
from cloud.contracts.events import EventDetail, MirrorCompleted, MirrorFailed
from cloud.logic.ports import ChannelError, NotificationChannel
from cloud.logic.verification import mirror_run_record
from cloud.logic.verify import VerifyOptions
from local_agent.errors import ConfigError
from local_agent.events.publishers import (
    EventBridgePublisher,
    EventLog,
    LocalPublisher,
    NullPublisher,
    Publisher,
)
from local_agent.report.progress import Progress
from local_agent.units import format_size

if TYPE_CHECKING:
    from cloud.integrations.runstore_sqlite import SqliteRunStore
    from local_agent.config import RelayConfig

log = logging.getLogger(__name__)


def run_store_path(state_dir: Path) -> Path:
    return state_dir / "runs.sqlite"


def open_run_store(
    state_dir: Path, *, set_aside_damaged: bool = False, read_only: bool = False
) -> SqliteRunStore:
    """The local run store (`status`, `verify` and the pipeline share it).

    `set_aside_damaged` (the hook's pipeline): a damaged file is moved aside and a fresh one
    started, because a hook run that dies on its own history would never alert again.
    Otherwise an unusable file, or one a caller that writes (not `read_only`) may not
    write, is a ConfigError naming it (exit 2, like the state file)."""
    from cloud.integrations.runstore_sqlite import RunStoreCorrupt, RunStoreError, SqliteRunStore
    from cloud.integrations.sqlite_file import set_aside

    path = run_store_path(state_dir)
    try:
        try:
            store = SqliteRunStore(path)
        except RunStoreCorrupt as exc:
            if not set_aside_damaged:
                raise
            aside = set_aside(path)
            log.warning(
                "%s; set aside as %s, starting a fresh history (checkpoints and alert state "
                "are lost: the next pass may read new objects again)",
                exc,
                aside.name,
            )
            store = SqliteRunStore(path)
        if not read_only:
            try:
                store.check_writable()
            except RunStoreError:
                store.close()
                raise
        return store
    except RunStoreError as exc:
        raise ConfigError(str(exc)) from None


def event_log(state_dir: Path) -> EventLog:
    """The append-only record of every event local mode handled."""
    return EventLog(state_dir / "events.jsonl")


def channels_for_repo(
    config: RelayConfig, repo_id: str | None, repo_guid: str | None
) -> list[NotificationChannel]:
    """`notify.urls` (Apprise) and the repository's Healthchecks URL."""
    from cloud.integrations.channels import build_channels

    notify = config.notify
    return build_channels(
        apprise_urls=[url.get_secret_value() for url in notify.urls],
        healthchecks_url=notify.healthchecks_url(repo_id, repo_guid),
    )


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
        self.event_log = event_log(state_dir)
        self.results: list[EventDetail] = []
        self.notifications: list[NotifyOutcome] = []
        self.extra_channels = list(extra_channels)
        self._runs: SqliteRunStore | None = None
        self._lock = threading.Lock()
        # Set by the upload that drives this pipeline: its deadline and its progress line.
        self.should_stop: Callable[[], bool] | None = None
        self.make_progress: Callable[[], Progress | None] = lambda: None
        self.passes: dict[str, CheckpointedVerification] = {}

    def runs(self) -> SqliteRunStore:
        with self._lock:
            if self._runs is None:
                self._runs = open_run_store(self.state_dir, set_aside_damaged=True)
            return self._runs

    def __call__(self, event: EventDetail) -> None:
        if isinstance(event, MirrorCompleted):
            checked = self._verify(event)
            self.passes[event.run_id] = checked
            self.event_log(event)
            result = checked.result
            if result is None:
                return  # unfinished, nothing wrong so far: the next run goes on
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
        return channels_for_repo(self.config, repo_id, repo_guid) + self.extra_channels

    def run_started(self, run_id: str, repo_id: str | None, repo_guid: str | None) -> None:
        """Healthchecks `/start` for the run (best effort: a failed ping is only logged)."""
        for channel in self.channels(repo_id, repo_guid):
            start = getattr(channel, "start", None)
            if start is None:
                continue
            try:
                start(run_id)
            except Exception as exc:  # a ping must never stop the upload
                # Only a ChannelError's text is known to be free of the (secret) URL.
                why = str(exc) if isinstance(exc, ChannelError) else type(exc).__name__
                log.warning("start ping via %s failed: %s", channel.name, why)

    def _notify(self, event: EventDetail) -> None:
        channels = self.channels(event.repo.id, event.repo.guid)
        if not channels:
            return
        outcome = notify(
            event, runs=self.runs(), channels=channels, policy=self.config.notify.success
        )
        self.notifications.append(outcome)
        if outcome.failed:
            log.warning(
                "%d of %d notification channel(s) failed", outcome.failed, len(outcome.results)
            )

    def _verify(self, event: MirrorCompleted) -> CheckpointedVerification:
        """One checkpointed pass (`cloud.app.verify.verify_checkpointed`).

        Never raises for the bucket: a destination that cannot be read yields a "could not
        verify" result, so this event leaves the outbox and later ones are announced.
        """
        from cloud.integrations.s3 import make_s3_client
        from cloud.integrations.s3_store import S3ObjectStore, S3ReportSink
        from local_agent.config import lock_check, report_lock

        client = make_s3_client(self.config.destination.access())
        bucket = event.destination.bucket
        progress = self.make_progress()
        if progress is not None:
            progress.set_phase("verify")
            progress.start()
        try:
            checked = verify_checkpointed(
                event,
                store=S3ObjectStore(client, bucket),
                runs=self.runs(),
                reports=S3ReportSink(client, bucket, **report_lock(self.config)),
                options=VerifyOptions(
                    concurrency=self.config.upload.concurrency,
                    should_stop=self.should_stop,
                    progress=progress,
                    **lock_check(self.config),
                ),
                every_seconds=self.config.verify.every_seconds,
                rotation_budget=self.config.verify.budget_bytes,
            )
        finally:
            if progress is not None:
                progress.close()
                if progress.files_total:
                    log.info("%s", progress.line())
        plan = checked.plan
        if plan.action == "reuse":
            log.info(
                "verify: manifest already proven; nothing read (next rotation within %s)",
                self.config.verify.every,
            )
        elif checked.result is None:
            log.warning(
                "verify: the deadline came first: %d object(s) (%s) still unproven; the "
                "next run continues from there",
                checked.unproven_objects,
                format_size(checked.unproven_bytes),
            )
        else:
            log.info("verify: %s pass done", plan.reason)
        return checked


def make_publisher(config: RelayConfig, state_dir: Path) -> Publisher:
    """The publisher `events.publisher` names; `local` runs this pipeline in-process."""
    events = config.events
    if events.publisher == "eventbridge":
        return EventBridgePublisher(
            events.event_bus, region=events.region, endpoint_url=events.endpoint_url
        )
    if events.publisher == "local":
        return LocalPublisher(LocalPipeline(config, state_dir))
    return NullPublisher()

"""Local mode's alarm for silence (`status --check-stale`, hourly from a timer): the cloud
watchdog's use case (`cloud.app.watchdog`) with the local channels. A repository Backrest
lists but this run store never saw is an alarm too: its hook never ran, or the timer runs
with another state directory.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from cloud.app import watchdog
from cloud.app.notify import notify
from cloud.contracts.events import MirrorStale, RepoRef
from cloud.integrations.redact import REDACTOR
from cloud.logic.watchdog import DEFAULT_REPEAT
from local_agent.errors import ConfigError, RelayError
from local_agent.events.pipeline import channels_for_repo, event_log
from local_agent.units import format_duration, plural

if TYPE_CHECKING:
    from cloud.contracts.destination import Destination
    from cloud.integrations.runstore_sqlite import SqliteRunStore
    from cloud.logic.ports import RepoStatus
    from local_agent.config import RelayConfig

log = logging.getLogger(__name__)


@dataclass
class SilenceReport:
    alerts: list[MirrorStale] = field(default_factory=list)
    never_seen: list[RepoRef] = field(default_factory=list)

    @property
    def alarm(self) -> bool:
        return bool(self.alerts or self.never_seen)


def expected_repos(config: RelayConfig) -> list[RepoRef]:
    """Repositories that should have runs here: Backrest's mirrored ones, and those
    `notify.healthchecks` names (an id or a guid), each with its guid when known."""
    from local_agent.backrest import backrest_config_path, load_backrest_repos
    from local_agent.identity import resolve_identity

    path = backrest_config_path()
    try:
        listed = [r for r in load_backrest_repos(path) if r.mirrored]
    except ConfigError as exc:
        listed = []
        if path.exists():  # no Backrest on this host is fine; a broken config is not
            sys.stderr.write(
                f"backrest-relay: warning: {exc}; its repositories are not checked and "
                "their staleness window falls back to notify.max_age\n"
            )
    refs = [RepoRef(id=r.id, guid=r.guid) for r in listed]
    for name in config.notify.healthchecks:
        if any(name in (ref.id, ref.guid) for ref in refs):
            continue
        try:
            identity = resolve_identity(
                config.state.path(), repo_id=name, repo_guid=None, learn=False
            )
        except RelayError:
            identity = None
        if identity is not None and identity.guid and identity.guid != name:
            refs.append(RepoRef(id=name, guid=identity.guid))
        else:
            refs.append(RepoRef(id=name))
    return refs


def _unknown(refs: list[RepoRef], statuses: list[RepoStatus]) -> list[RepoRef]:
    """The expected repositories no row of the run store stands for (by guid or by id)."""
    keys = {s.repo_key for s in statuses}
    ids = {s.repo_id for s in statuses if s.repo_id}
    return [ref for ref in refs if ref.key not in keys and not (ref.guid is None and ref.id in ids)]


def check_silence(
    config: RelayConfig,
    runs: SqliteRunStore,
    *,
    now: datetime,
    max_age_for: Callable[[RepoStatus], timedelta],
    repeat_every: timedelta = DEFAULT_REPEAT,
) -> SilenceReport:
    """One watchdog pass over the local run store; alerts sent, never-seen repositories named."""
    statuses = list(runs.repos())
    never_seen = _unknown(expected_repos(config), statuses)

    def destination_for(status: RepoStatus) -> Destination | None:
        guid = status.repo_key if status.repo_key != status.repo_id else None
        try:
            return config.destination_for(repo_id=status.repo_id, repo_guid=guid)
        except RelayError:
            return None

    watch = watchdog.plan(
        runs,
        now=now,
        max_age_for=max_age_for,
        repeat_every=repeat_every,
        expected=never_seen,
        destination_for=destination_for,
    )
    watchdog.record(runs, watch)
    log_event = event_log(config.state.path())
    for alert in watch.alerts:
        event = alert.event
        log_event(event)
        channels = channels_for_repo(config, event.repo.id, event.repo.guid)
        outcome = notify(event, runs=runs, channels=channels, policy=config.notify.success)
        sent = len(outcome.results) - outcome.failed
        if not channels or sent:
            # Heard (or nobody to tell): remembered; unheard, the next pass tries again.
            watchdog.commit(runs, alert)
        label = event.repo.id or event.repo.key[:16]
        age = (
            f"no verified off-site copy for {format_duration(event.age_seconds)}"
            if event.age_seconds is not None
            else "never verified"
        )
        where = (
            f"alert sent via {plural(sent, 'channel')}"
            if channels
            else "no channel configured ([notify] urls / healthchecks)"
        )
        if channels and outcome.failed:
            where += f", {outcome.failed} failed"
        sys.stderr.write(
            REDACTOR(
                f"backrest-relay: stale: {label} — {age} "
                f"(allowed {format_duration(event.max_age_seconds)}); {where}\n"
            )
        )
    for ref in never_seen:
        sys.stderr.write(
            f"backrest-relay: no run recorded for {ref.id or ref.key} in "
            f"{runs.path}: has its hook run yet, and do the hook and this check "
            "run as the same user with the same --config (state directory)?\n"
        )
    return SilenceReport(alerts=watch.events, never_seen=never_seen)

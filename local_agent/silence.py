"""Local mode's alarm for silence: `status --check-stale`, run hourly by a timer or cron.

The same rule as the cloud watchdog (`cloud.logic.watchdog.run_watchdog`, not a second
copy): a repository whose newest verified copy is older than its allowed age gets one ⏰
`Mirror Stale`, repeated every 24 h while it stays stale, sent through the configured
channels (`notify.urls`, the repository's Healthchecks URL → `/fail`). The next verified
run sends the recovery message through the normal notification policy.

"Knows no run" is an alarm too: a repository that Backrest's config lists with a
backrest-relay hook, or that `notify.healthchecks` names, but that this run store has never
seen — its hook never ran, or the timer runs as another user or with another state
directory. Before this, an empty run store meant exit 0: the alarm was silent exactly when
it was most needed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from cloud.contracts.events import MirrorStale, RepoRef
from cloud.logic.notify import notify_event
from cloud.logic.watchdog import DEFAULT_REPEAT, run_watchdog
from local_agent.errors import ConfigError, RelayError
from local_agent.redact import REDACTOR
from local_agent.units import format_duration, plural

if TYPE_CHECKING:
    from cloud.contracts.destination import Destination
    from cloud.logic.ports import RepoStatus
    from local_agent.config import RelayConfig
    from local_agent.pipeline import LocalPipeline

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
    pipeline: LocalPipeline,
    *,
    now: datetime,
    max_age_for: Callable[[RepoStatus], timedelta],
    repeat_every: timedelta = DEFAULT_REPEAT,
) -> SilenceReport:
    """One watchdog pass over the local run store; alerts sent, never-seen repositories named."""
    runs = pipeline.runs()
    statuses = list(runs.repos())
    never_seen = _unknown(expected_repos(config), statuses)

    def destination_for(status: RepoStatus) -> Destination | None:
        guid = status.repo_key if status.repo_key != status.repo_id else None
        try:
            return config.destination_for(repo_id=status.repo_id, repo_guid=guid)
        except RelayError:
            return None

    alerts = run_watchdog(
        runs,
        now=now,
        max_age_for=max_age_for,
        repeat_every=repeat_every,
        expected=never_seen,
        destination_for=destination_for,
    )
    for event in alerts:
        pipeline.event_log(event)
        channels = pipeline.channels(event.repo.id, event.repo.guid)
        outcome = notify_event(event, runs=runs, channels=channels, policy=config.notify.success)
        sent = len(outcome.results) - outcome.failed
        if channels and sent == 0:
            # Nobody heard it: forget that it was sent, so the next pass tries again.
            runs.mark_stale_alerted(event.repo.key, None)
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
            f"{pipeline.runs().path}: has its hook run yet, and do the hook and this check "
            "run as the same user with the same --config (state directory)?\n"
        )
    return SilenceReport(alerts=alerts, never_seen=never_seen)

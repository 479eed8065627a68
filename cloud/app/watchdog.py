"""Watch for staleness: `plan` the alerts (read-only), `record` them, publish each through
the shell's own channel, then `commit` the alert that went out.

Publish first, then remember: an alert that was not published is not marked, so the next
pass sends it again instead of staying quiet for a day.
"""

from __future__ import annotations

from datetime import datetime

from cloud.logic.ports import RunStore
from cloud.logic.watchdog import StaleAlert, WatchPlan, plan

__all__ = ["StaleAlert", "WatchPlan", "commit", "plan", "record"]


def record(runs: RunStore, watch: WatchPlan) -> None:
    """Before publishing: clear the marks of repositories that are fresh again, and record
    every stale run (so the notifier's policy sees it, and a recovery follows). A store
    that fails here fails the pass before anything is published or marked."""
    for repo_key in watch.recovered:
        runs.mark_stale_alerted(repo_key, None)
    for alert in watch.alerts:
        runs.record(alert.record)


def commit(runs: RunStore, alert: StaleAlert, at: datetime | None = None) -> None:
    """After the alert was published (or heard): mark its repository alerted, so it is
    repeated only after the repeat interval."""
    runs.mark_stale_alerted(alert.record.repo_key, at or alert.record.started_at)

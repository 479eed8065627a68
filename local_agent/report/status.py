"""`backrest-relay status`: each repository's latest verified off-site copy, on this host.

Reads the local run store (local mode, and every `verify` run here). A table, or JSON
with `--json` only: cron mails stdout to a person, so a pipe is no reason to switch to
JSON. `--check-stale` is local mode's silence alarm (local_agent/silence.py): it alerts
through the configured channels and exits 3 when a repository is stale or was never seen.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cloud.contracts.events import MirrorFailed, MirrorVerificationFailed
from cloud.integrations.redact import REDACTOR
from cloud.logic.ports import RepoStatus
from cloud.logic.watchdog import assess
from local_agent.errors import ConfigError, ExitCode
from local_agent.units import plural

if TYPE_CHECKING:
    from cloud.integrations.runstore_sqlite import SqliteRunStore
    from local_agent.config import RelayConfig


log = logging.getLogger(__name__)


def _age(delta: timedelta | None) -> str:
    if delta is None:
        return "never"
    seconds = delta.total_seconds()
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def repo_summary(status: RepoStatus, now: datetime, max_age: timedelta) -> dict[str, Any]:
    check = assess(status, now, max_age)
    last = status.latest_verified
    latest = status.latest_run
    problems: list[dict[str, Any]] = []
    event = latest.event if latest is not None else None
    if isinstance(event, MirrorFailed):
        problems = [{"kind": event.error.kind, "detail": event.error.message}]
    elif isinstance(event, MirrorVerificationFailed):
        problems = [p.model_dump(mode="json") for p in event.problems[:5]]
    return {
        "repo_key": status.repo_key,
        "repo_id": status.repo_id,
        "stale": check.stale,
        "max_age_seconds": max_age.total_seconds(),
        "last_verified_at": last.finished_at.isoformat() if last else None,
        "last_verified_run_id": last.run_id if last else None,
        "age_seconds": check.age.total_seconds() if check.age is not None else None,
        "latest_run": (
            {
                "run_id": latest.run_id,
                "kind": latest.kind,
                "status": latest.status,
                "finished_at": latest.finished_at.isoformat(),
            }
            if latest
            else None
        ),
        "last_problems": problems,
        "verifications": status.verifications,
    }


def _label(row: dict[str, Any]) -> str:
    """The repository's id, with the start of its guid when the row is keyed by one (so the
    guid to pass to `--forget` is visible)."""
    key, repo_id = row["repo_key"], row["repo_id"]
    if repo_id and key != repo_id:
        return f"{repo_id} ({key[:8]})"
    return str(repo_id or key[:16])


def forget_repo(runs: SqliteRunStore, name: str) -> tuple[str, int]:
    """Drop one repository's history: by guid (or its first 8+ characters), else by id."""
    statuses = list(runs.repos())
    matches = [s for s in statuses if s.repo_key == name]
    if not matches:
        matches = [s for s in statuses if s.repo_id == name]
    if not matches and len(name) >= 8:
        matches = [s for s in statuses if s.repo_key.startswith(name)]
    if len(matches) != 1:
        known = ", ".join(
            f"{s.repo_id} ({s.repo_key})" if s.repo_id and s.repo_id != s.repo_key else s.repo_key
            for s in statuses
        )
        why = "matches more than one repository" if matches else "is not in the run store"
        raise ConfigError(
            f"status --forget {name!r} {why} (known: {known or 'none'}); pass the guid"
        )
    key = matches[0].repo_key
    return key, runs.forget(key)


def run_forget(config: RelayConfig, name: str) -> int:
    """`status --forget NAME`: drop a repository's history, say how much went."""
    from local_agent.events.pipeline import open_run_store

    key, removed = forget_repo(open_run_store(config.state.path()), name)
    sys.stdout.write(f"forgot repository {key}: {plural(removed, 'run')} removed\n")
    return 0


def run_status(
    config: RelayConfig,
    *,
    as_json: bool,
    check_stale: bool,
    html: str | None = None,
    now: datetime | None = None,
) -> int:
    from local_agent.events.pipeline import open_run_store

    now = now or datetime.now(UTC)
    runs = open_run_store(config.state.path(), read_only=not check_stale)
    max_age_for = staleness_window(config)
    silence = None
    if check_stale:
        from local_agent.silence import check_silence

        silence = check_silence(config, runs, now=now, max_age_for=max_age_for)
    rows = [repo_summary(s, now, max_age_for(s)) for s in runs.repos()]
    if html:
        from pathlib import Path

        from local_agent.report.html_report import render_report, write_report

        if html == "-":
            sys.stdout.write(render_report(runs))  # the page is the output: no table
        else:
            try:
                written = write_report(runs, Path(html))
            except OSError as exc:
                raise ConfigError(f"--html {html}: cannot write it ({exc.strerror})") from None
            sys.stderr.write(f"wrote {written}\n")
    if html == "-":
        pass
    elif as_json:
        sys.stdout.write(REDACTOR(json.dumps({"repositories": rows}, sort_keys=True)) + "\n")
    else:
        sys.stdout.write(_table(rows) + "\n")
    if check_stale and (any(r["stale"] for r in rows) or (silence and silence.never_seen)):
        stale = ", ".join(_label(r) for r in rows if r["stale"])
        sys.stderr.write(f"backrest-relay: stale (no verified off-site copy): {stale}\n")
        return int(ExitCode.LOCAL_INTEGRITY)
    return 0


def staleness_window(config: RelayConfig) -> Callable[[RepoStatus], timedelta]:
    """Each repository's allowed age without a verified copy.

    `notify.max_age` when it is set (file or environment). Otherwise the repository's check
    schedule in Backrest's config (local_agent/checkpolicy.py: the longest gap between two
    checks plus slack), found by guid or id; `notify.max_age`'s default (26 h) only for a
    repository Backrest's config does not list (or when it is not readable here).
    """
    max_age = timedelta(seconds=config.notify.max_age_seconds)
    if "max_age" in config.notify.model_fields_set:
        return lambda _status: max_age
    from local_agent.backrest import backrest_config_path, load_backrest_repos
    from local_agent.checkpolicy import CronError, cadence_of

    try:
        repos = load_backrest_repos(backrest_config_path())
    except ConfigError:
        return lambda _status: max_age
    windows: dict[str, timedelta] = {}
    for repo in repos:
        try:
            window = cadence_of(repo.check_schedule).window
        except CronError as exc:
            log.warning("Backrest repository %s: %s; using notify.max_age", repo.id, exc)
            window = None
        for name in (repo.guid, repo.id):
            if name and window is not None:
                windows.setdefault(name, window)

    def window_for(status: RepoStatus) -> timedelta:
        return windows.get(status.repo_key) or windows.get(status.repo_id or "") or max_age

    return window_for


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs recorded on this host yet (local mode records every upload)"
    header = ("REPOSITORY", "LAST VERIFIED", "AGE", "LATEST RUN", "STATE")
    lines = [header]
    for row in rows:
        age = row["age_seconds"]
        latest = row["latest_run"] or {}
        state = "STALE" if row["stale"] else "ok"
        if latest.get("status") in ("failed", "verification-failed"):
            state = "FAILING" + (" + STALE" if row["stale"] else "")
        lines.append(
            (
                _label(row),
                (row["last_verified_at"] or "never")[:16].replace("T", " "),
                _age(timedelta(seconds=age) if age is not None else None),
                f"{latest.get('kind', '-')} {latest.get('status', '')}".strip(),
                state,
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines]
    for row in rows:
        for problem in row["last_problems"]:
            where = problem.get("key", "")
            out.append(
                f"  {_label(row)}: {problem.get('kind')} "
                f"{where} {problem.get('detail', '')}".rstrip()
            )
    return REDACTOR("\n".join(out))

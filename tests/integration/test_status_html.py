"""`status --html` renders a self-contained page that a real browser shows without errors."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloud.contracts.events import (
    ManifestRef,
    MirrorStats,
    RepoRef,
    VerificationStats,
)
from cloud.integrations.runstore_sqlite import SqliteRunStore
from cloud.logic.verification import mirror_run_record, record_verification
from local_agent.report.html_report import render_report
from testbed.agent import run_agent, write_agent_config
from testbed.s3.endpoint import S3Endpoint
from tests.support import events
from tests.support.tools import require_tool

REPO = RepoRef(id="home", guid="ab" * 32, path="/srv/restic")


def fill(store: SqliteRunStore, days: int = 5) -> None:
    start = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)
    size = 10_000_000_000
    for day in range(days):
        at = start + timedelta(days=day)
        uploaded = 50_000_000 * (day + 1)
        size += uploaded
        mirror = events.completed(
            at,
            repo=REPO,
            stats=MirrorStats(files=1000 + day, bytes=size, uploaded_bytes=uploaded),
            manifest=ManifestRef(
                key=f"m/{day}.jsonl.gz", sha256="0" * 64, objects=1000, created_by_run="x"
            ),
        )
        store.record(mirror_run_record(mirror))
        record_verification(
            store,
            events.verification(
                at,
                repo=REPO,
                host="nas",
                trigger="t",
                mirror_run_id=mirror.run_id,
                manifest=mirror.manifest,
                stats=VerificationStats(
                    listed=1000, compared=1000, deep_checked=40, bytes_read=5000
                ),
            ),
        )


def test_report_is_self_contained_and_has_the_chart(tmp_path: Path) -> None:
    store = SqliteRunStore(tmp_path / "runs.sqlite")
    fill(store)
    page = render_report(store, now=datetime(2026, 11, 6, tzinfo=UTC))
    assert "<svg id='chart-0'" in page
    assert page.count("class='upload'") == 5
    assert not re.search(r"(src|href)=['\"]?https?:", page), "external asset"
    assert "m/4.jsonl.gz" in page  # the latest verification's evidence


def test_status_html_renders_in_headless_chromium_without_console_errors(
    tmp_path: Path, moto_endpoint: S3Endpoint
) -> None:
    chromium = require_tool("chromium")
    state = tmp_path / "state"
    store = SqliteRunStore(state / "runs.sqlite")
    fill(store)
    store.close()
    config = write_agent_config(tmp_path / "relay.toml", moto_endpoint, "unused", state_dir=state)
    out = tmp_path / "status.html"
    result = run_agent(["status", "--config", str(config), "--json", "--html", str(out)])
    assert result.returncode == 0, result.stderr
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=2000",
            "--dump-dom",
            out.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'data-ready="yes"' in dom, "the page's script did not run"
    assert 'id="chart-0"' in dom and "<polyline" in dom
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    pytest.importorskip("json")

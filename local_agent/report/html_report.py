"""`backrest-relay status --html FILE`: one self-contained page of evidence.

Per repository: the latest verification (what was listed, read back, any problems) and a
chart of mirror size and upload volume over time. No external assets — the chart is an
inline SVG drawn here — so the file can be mailed, archived or opened offline.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path

from cloud.contracts.events import (
    MirrorCompleted,
    MirrorFailed,
    MirrorVerificationFailed,
    MirrorVerified,
    VerificationStats,
)
from cloud.logic.ports import RepoStatus, RunRecord, RunStore
from cloud.logic.text import format_size

WIDTH, HEIGHT, PAD = 760, 240, 70


def _points(runs: list[RunRecord]) -> list[tuple[datetime, int, int]]:
    """(finished_at, mirror bytes, uploaded bytes) of every completed mirror run, oldest first."""
    out = []
    for run in sorted(runs, key=lambda r: r.run_id):
        event = run.event if run.kind == "mirror" else None
        if isinstance(event, MirrorCompleted):
            out.append((run.finished_at, event.stats.bytes, event.stats.uploaded_bytes))
    return out


def chart_svg(points: list[tuple[datetime, int, int]], chart_id: str) -> str:
    """Mirror size as a line, upload volume as bars, on one time axis."""
    if not points:
        return f"<p id='{chart_id}' class='empty'>No completed mirror runs recorded yet.</p>"
    t0 = points[0][0].timestamp()
    t1 = max(points[-1][0].timestamp(), t0 + 1)
    # Two scales: the mirror's size (left) dwarfs what one run uploads (right).
    top = max(max(p[1] for p in points), 1)
    top_up = max(max(p[2] for p in points), 1)
    plot_w, plot_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def x(t: datetime) -> float:
        return (
            PAD + (t.timestamp() - t0) / (t1 - t0) * plot_w if len(points) > 1 else PAD + plot_w / 2
        )

    def y(v: int) -> float:
        return PAD + plot_h - v / top * plot_h

    def y_up(v: int) -> float:
        return PAD + plot_h - v / top_up * plot_h * 0.9

    bar_w = max(3.0, min(24.0, plot_w / max(len(points), 1) * 0.5))
    bars = "".join(
        f"<rect class='upload' x='{x(t) - bar_w / 2:.1f}' y='{y_up(up):.1f}' width='{bar_w:.1f}' "
        f"height='{PAD + plot_h - y_up(up):.1f}'><title>{html.escape(t.strftime('%Y-%m-%d %H:%M'))}"
        f": uploaded {format_size(up)}</title></rect>"
        for t, _, up in points
    )
    line = " ".join(f"{x(t):.1f},{y(size):.1f}" for t, size, _ in points)
    dots = "".join(
        f"<circle class='size' cx='{x(t):.1f}' cy='{y(size):.1f}' r='3'><title>"
        f"{html.escape(t.strftime('%Y-%m-%d %H:%M'))}: mirror {format_size(size)}</title></circle>"
        for t, size, _ in points
    )
    labels = (
        f"<text x='{PAD}' y='{HEIGHT - 12}'>{points[0][0]:%Y-%m-%d}</text>"
        f"<text x='{WIDTH - PAD}' y='{HEIGHT - 12}' text-anchor='end'>{points[-1][0]:%Y-%m-%d}</text>"
        f"<text x='{PAD - 6}' y='{PAD + 4}' text-anchor='end'>{format_size(top)}</text>"
        f"<text x='{PAD - 6}' y='{PAD + plot_h}' text-anchor='end'>0</text>"
        f"<text x='{WIDTH - PAD + 6}' y='{y_up(top_up) + 4:.1f}' class='upload-key'>{format_size(top_up)}</text>"
    )
    axes = (
        f"<line x1='{PAD}' y1='{PAD + plot_h}' x2='{WIDTH - PAD}' y2='{PAD + plot_h}' class='axis'/>"
        f"<line x1='{PAD}' y1='{PAD}' x2='{PAD}' y2='{PAD + plot_h}' class='axis'/>"
    )
    legend = (
        f"<text x='{WIDTH - PAD}' y='20' text-anchor='end'><tspan class='size-key'>● mirror size"
        "</tspan>  <tspan class='upload-key'>■ uploaded per run</tspan></text>"
    )
    return (
        f"<svg id='{chart_id}' class='chart' role='img' viewBox='0 0 {WIDTH} {HEIGHT}' "
        f"width='{WIDTH}' height='{HEIGHT}' xmlns='http://www.w3.org/2000/svg'>"
        f"<title>Mirror size and upload volume over time</title>{axes}{bars}"
        f"<polyline class='size' points='{line}'/>{dots}{labels}{legend}</svg>"
    )


def _evidence(status: RepoStatus, now: datetime) -> str:
    last = status.latest_verified
    if last is None:
        return "<p class='bad'>No verified off-site copy yet.</p>"
    event = last.event
    result = event if isinstance(event, MirrorVerified | MirrorVerificationFailed) else None
    stats = result.stats if result is not None else VerificationStats()
    age = now - last.finished_at
    rows = [
        (
            "Verified at",
            f"{last.finished_at:%Y-%m-%d %H:%M UTC} ({age.total_seconds() / 3600:.1f} h ago)",
        ),
        ("Manifest", result.manifest.key if result is not None else "?"),
        ("Objects in manifest", str(result.manifest.objects) if result is not None else "?"),
        ("Listed and compared", f"{stats.listed} / {stats.compared}"),
        ("Read back and hashed", f"{stats.deep_checked} objects, {format_size(stats.bytes_read)}"),
        ("Verification run", last.run_id),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='evidence'>{body}</table>"


def _problems(status: RepoStatus) -> str:
    latest = status.latest_run
    if latest is None or latest.status not in ("failed", "verification-failed", "stale"):
        return ""
    event = latest.event
    items: list[str] = []
    if isinstance(event, MirrorFailed):
        items.append(f"{event.error.kind}: {event.error.message}")
    if isinstance(event, MirrorVerificationFailed):
        items.extend(f"{p.kind}: {p.key} — {p.detail}" for p in event.problems[:20])
    if latest.status == "stale":
        items.append("no verified copy within the allowed age")
    lis = "".join(f"<li><code>{html.escape(i)}</code></li>" for i in items)
    return f"<div class='bad'><h3>Latest run: {html.escape(latest.status)}</h3><ul>{lis}</ul></div>"


def render_report(runs: RunStore, *, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    sections = []
    for index, status in enumerate(runs.repos()):
        label = status.repo_id or status.repo_key[:16]
        history = runs.runs(status.repo_key, limit=500)
        sections.append(
            f"<section class='repo'><h2>{html.escape(label)}</h2>"
            f"<p class='key'>{html.escape(status.repo_key)} · {status.verifications} verifications</p>"
            f"{_problems(status)}{_evidence(status, now)}"
            f"<h3>Mirror size and upload volume</h3>{chart_svg(_points(history), f'chart-{index}')}"
            "</section>"
        )
    if not sections:
        sections.append("<p>No runs recorded on this host yet.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>backrest-relay status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table.evidence th {{ text-align: left; padding-right: 1em; font-weight: 600; }}
.bad {{ color: #a40000; }}
.key {{ color: #777; font-size: 12px; }}
svg.chart {{ background: #fafafa; border: 1px solid #ddd; }}
svg .axis {{ stroke: #999; }}
svg rect.upload {{ fill: #8fb3de; }}
svg polyline.size {{ fill: none; stroke: #2a6a2a; stroke-width: 2; }}
svg circle.size {{ fill: #2a6a2a; }}
svg text {{ font-size: 11px; fill: #555; }}
svg .size-key {{ fill: #2a6a2a; }} svg .upload-key {{ fill: #4a7bbd; }}
</style></head>
<body>
<h1>backrest-relay — off-site copies</h1>
<p>Generated {now:%Y-%m-%d %H:%M UTC}.</p>
{"".join(sections)}
<script>document.body.dataset.ready = "yes";</script>
</body></html>
"""


def write_report(runs: RunStore, path: Path) -> Path:
    path.write_text(render_report(runs), encoding="utf-8")
    return path

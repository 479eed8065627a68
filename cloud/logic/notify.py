"""Which results people hear about, and what the message says.

Failures and stale copies always notify. Success follows the repository's policy for
people: `always`, `on_recovery` (the default: only the first success after a failure or a
stale alert, so a working setup stays quiet) or `never`; heartbeat channels (Healthchecks)
hear every verified run whatever the policy (`decide_delivery`). The message is short
enough for chat and complete enough for email: repository and host, trigger, verdict, what
was uploaded and verified, new snapshots, and the first problems by object name.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from typing import Literal

from cloud.contracts.events import (
    EventDetail,
    MirrorCompleted,
    MirrorFailed,
    MirrorStale,
    MirrorVerificationFailed,
    MirrorVerified,
)
from cloud.logic.ports import (
    Notification,
    RunStore,
    Severity,
)
from cloud.logic.text import format_size, plural

log = logging.getLogger(__name__)

SuccessPolicy = Literal["always", "on_recovery", "never"]
MAX_PROBLEMS_IN_MESSAGE = 10
_BAD = {"failed", "verification-failed", "stale"}


# -- policy -----------------------------------------------------------------------------------


def previous_outcome(runs: RunStore, repo_key: str, exclude_run_id: str) -> str | None:
    """ "ok" or "bad": how the repository's last verdict before this one went.

    Only runs older than the event count (run ids sort by time), so an event processed
    late is judged against what came before it, not after.
    """
    for run in runs.runs(repo_key, limit=50):
        if run.run_id >= exclude_run_id:
            continue
        if run.status == "verified":
            return "ok"
        if run.status in _BAD:
            return "bad"
    return None


@dataclass(frozen=True)
class Decision:
    """Who hears about an event: `severity` is what the message says (None: nobody hears
    anything); people (chat, email) hear it when `people`; heartbeat channels
    (Healthchecks) when `heartbeat`."""

    severity: Severity | None
    people: bool = False
    heartbeat: bool = False

    def wants(self, channel: object) -> bool:
        """Whether `channel` gets this notification."""
        return self.heartbeat if is_heartbeat(channel) else self.people


def is_heartbeat(channel: object) -> bool:
    return bool(getattr(channel, "heartbeat", False))


def decide_delivery(event: EventDetail, policy: SuccessPolicy, previous: str | None) -> Decision:
    """The one rule, used by local mode and the notifier Lambda alike.

    Failures and stale copies go to everyone. A verified run goes to heartbeat channels
    always — a heartbeat that hears only recoveries stays "new" forever, or goes down for
    good after one — and to people as the success policy says.
    """
    if isinstance(event, MirrorStale):
        return Decision("stale", people=True, heartbeat=True)
    if isinstance(event, MirrorFailed | MirrorVerificationFailed):
        return Decision("failure", people=True, heartbeat=True)
    if isinstance(event, MirrorVerified):
        recovered = previous == "bad"
        severity: Severity = "recovery" if recovered else "success"
        people = policy == "always" or (policy == "on_recovery" and recovered)
        return Decision(severity, people=people, heartbeat=True)
    return Decision(None)  # Mirror Completed: the verification result is what counts


def decide(event: EventDetail, policy: SuccessPolicy, previous: str | None) -> Severity | None:
    """The severity people are notified with, or None when they are not."""
    decision = decide_delivery(event, policy, previous)
    return decision.severity if decision.people else None


# -- rendering --------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _count(n: int) -> str:
    return f"{n} problem" if n == 1 else f"{n} problems"


def _repo_label(event: EventDetail) -> str:
    return event.repo.id or (event.repo.guid or "unknown")[:12]


@dataclass
class _Message:
    subject: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0
    footer: str = ""


def _compose(event: EventDetail, severity: Severity) -> _Message:
    repo = _repo_label(event)
    where = f"{event.destination.bucket}/{event.destination.prefix}"
    unverifiable = [p for p in getattr(event, "problems", []) if p.kind == "unverifiable"]
    refused = [
        p
        for p in getattr(event, "problems", [])
        if p.kind == "binding" and p.detail.startswith("refused: ")
    ]
    if isinstance(event, MirrorVerificationFailed) and refused:
        msg = _Message(subject=f"❌ {repo}: completion event refused (destination mismatch)")
        msg.rows.append(("Verdict", "refused, not verified"))
        msg.rows.append(("Event names", f"{where} (mirror run {event.mirror_run_id})"))
        msg.rows.append(("Reason", refused[0].detail.removeprefix("refused: ")))
        msg.footer = (
            "A Mirror Completed named this repository with a destination it is not bound to: "
            "a misconfigured or forged event. Nothing was verified; if the mirror really "
            "moved, remove the binding (docs/verification.md, Trust model)."
        )
    elif isinstance(event, MirrorVerificationFailed) and unverifiable:
        msg = _Message(subject=f"❌ {repo}: could not verify the off-site copy")
        msg.rows.append(("Verdict", "could not verify"))
        msg.rows.append(("Reason", unverifiable[0].detail.removeprefix("could not verify: ")))
        if event.mirror_stats is not None:
            ms = event.mirror_stats
            msg.rows.append(
                ("Uploaded", f"{ms.uploaded_files} objects, {format_size(ms.uploaded_bytes)}")
            )
        msg.footer = (
            "The verifier could not read the bucket (a key without read access, a download "
            "cap, an unreachable endpoint). The copy is unproven, not known bad; the next "
            "run tries again."
        )
    elif isinstance(event, MirrorVerified | MirrorVerificationFailed):
        stats = event.stats
        ok = isinstance(event, MirrorVerified)
        verdict = "verified" if ok else f"FAILED — {_count(event.problems_total)}"
        prefix = {"recovery": "✅ recovered", "success": "✅"}.get(severity, "❌")
        msg = _Message(
            subject=f"{prefix} {repo}: off-site copy "
            + ("verified" if ok else f"verification FAILED ({_count(event.problems_total)})")
        )
        msg.rows.append(("Verdict", verdict))
        if event.mirror_stats is not None:
            ms = event.mirror_stats
            msg.rows.append(
                (
                    "Uploaded",
                    f"{plural(ms.uploaded_files, 'object')}, {format_size(ms.uploaded_bytes)}",
                )
            )
        msg.rows.append(
            (
                "Verified",
                f"{plural(stats.compared, 'object')} against the listing, "
                f"{stats.deep_checked} read "
                f"back ({format_size(stats.bytes_read)})",
            )
        )
        msg.rows.append(("Duration", _duration(stats.duration_seconds)))
        if event.new_snapshots:
            shown = ", ".join(s[:8] for s in event.new_snapshots[:5])
            extra = len(event.new_snapshots) - 5
            msg.rows.append(("New snapshots", shown + (f" (+{extra})" if extra > 0 else "")))
        msg.problems = [
            f"{p.kind}: {p.key} — {p.detail}" for p in event.problems[:MAX_PROBLEMS_IN_MESSAGE]
        ]
        msg.more_problems = event.problems_total - len(msg.problems)
        if event.report_key:
            msg.footer = f"Full report: {event.destination.bucket}/{event.report_key}"
        if event.warnings:
            msg.rows.append(("Warnings", f"{len(event.warnings)} (e.g. {event.warnings[0]})"))
    elif isinstance(event, MirrorFailed):
        msg = _Message(subject=f"❌ {repo}: off-site mirror failed ({event.error.kind})")
        msg.rows.append(("Verdict", f"failed: {event.error.kind}"))
        msg.rows.append(("Error", event.error.message))
        if event.stats is not None:
            msg.rows.append(
                (
                    "Uploaded before failing",
                    f"{plural(event.stats.uploaded_files, 'object')}, "
                    f"{format_size(event.stats.uploaded_bytes)}",
                )
            )
        msg.problems = [f"corrupt local file: {k}" for k in event.corrupt_files[:10]]
        msg.footer = (
            "The remote copy was left consistent; the next run resumes."
            if event.error.kind != "check"
            else "Backrest's repository check failed; nothing was mirrored."
        )
    elif isinstance(event, MirrorStale):
        age = (
            f"for {_duration(event.age_seconds)}"
            if event.age_seconds is not None
            else "yet (never verified)"
        )
        msg = _Message(subject=f"⏰ {repo}: no verified off-site copy {age}")
        last = (
            event.last_verified_at.strftime("%Y-%m-%d %H:%M UTC")
            if event.last_verified_at
            else "never"
        )
        msg.rows.append(("Verdict", "stale"))
        msg.rows.append(
            ("Last verified copy", f"{last} ({age} ago)" if event.age_seconds else last)
        )
        msg.rows.append(("Allowed age", _duration(event.max_age_seconds)))
        msg.footer = (
            "No upload or verification arrived in time: is the backup host up, is Backrest "
            "running its checks, does the hook still run?"
        )
    elif isinstance(event, MirrorCompleted):
        msg = _Message(subject=f"{repo}: mirror completed")
    else:
        msg = _Message(subject=f"{repo}: {event.DETAIL_TYPE.value}")
    msg.rows[0:0] = [
        ("Repository", f"{repo} on {event.host}"),
        ("Destination", where),
        ("Trigger", event.trigger),
    ]
    msg.rows.append(("Run", event.run_id))
    return msg


def render(event: EventDetail, severity: Severity) -> Notification:
    msg = _compose(event, severity)
    subject = f"[backrest-relay] {msg.subject}"
    text_lines = [msg.subject, ""] + [f"{k}: {v}" for k, v in msg.rows]
    if msg.problems:
        text_lines += ["", "Problems:"] + [f"- {p}" for p in msg.problems]
        if msg.more_problems > 0:
            text_lines.append(f"- … and {msg.more_problems} more")
    if msg.footer:
        text_lines += ["", msg.footer]
    rows = "".join(
        f"<tr><th align='left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in msg.rows
    )
    problems = ""
    if msg.problems:
        items = "".join(f"<li><code>{html.escape(p)}</code></li>" for p in msg.problems)
        if msg.more_problems > 0:
            items += f"<li>… and {msg.more_problems} more</li>"
        problems = f"<h3>Problems</h3><ul>{items}</ul>"
    footer = f"<p>{html.escape(msg.footer)}</p>" if msg.footer else ""
    body = (
        f"<html><body><h2>{html.escape(msg.subject)}</h2><table>{rows}</table>"
        f"{problems}{footer}</body></html>"
    )
    return Notification(
        subject=subject,
        text="\n".join(text_lines),
        html=body,
        severity=severity,
        repo_key=event.repo.key,
        repo_id=event.repo.id,
        run_id=event.run_id,
        ping_run_id=getattr(event, "mirror_run_id", None) or event.run_id,
    )

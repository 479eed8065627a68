"""docs/benchmarks.md from the results: tables, targets with PASS/MISS, and what the
numbers say, written out in sentences so nobody has to fill anything in by hand."""

from __future__ import annotations

import itertools
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bench.machine import Machine
from bench.scenarios import ScenarioResult, ToolStats
from bench.sizes import QUICK_SCALE, SCENARIOS, Sizes

MiB = 2**20
TARGETS = {"S1": 1.0, "S2": 1.0, "S3": 0.05, "S4": 0.5, "S5": 1.0}
# Scenarios that make more than one comparison: (our tool, its peer, what is compared).
PAIRS: dict[str, list[tuple[str, str, str]]] = {
    "S5": [("ours", "rclone", "list level"), ("ours-deep", "rclone-deep", "deep read-back")],
}


def pairs_of(res: ScenarioResult) -> list[tuple[str, str, str]]:
    """(ours, peer, what) for each comparison of a scenario: its PAIRS, else ours against
    every other tool."""
    if res.sid in PAIRS:
        return PAIRS[res.sid]
    return [("ours", name, "") for name in res.tools if name != "ours"]


RSS_TARGET = 1024  # bytes per file


@dataclass(frozen=True)
class Verdict:
    sid: str
    target: str
    measured: str
    ok: bool | None  # None: not measured
    shortfall: str = ""

    @property
    def mark(self) -> str:
        return {True: "**PASS**", False: "**MISS**", None: "n/a"}[self.ok]


@dataclass(frozen=True)
class RunInfo:
    command: str
    started: datetime
    seconds: float
    runs: int
    concurrency: int
    sizes: Sizes
    storage: str
    load_after: str
    results_file: str
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "started": self.started.isoformat(),
            "seconds": self.seconds,
            "runs": self.runs,
            "concurrency": self.concurrency,
            "sizes": self.sizes.as_dict(),
            "storage": self.storage,
            "load_after": self.load_after,
            "results_file": self.results_file,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunInfo:
        return cls(
            **{
                **d,
                "started": datetime.fromisoformat(d["started"]),
                "sizes": Sizes.from_dict(d["sizes"]),
            }
        )


@dataclass
class Report:
    """Everything a report is made of; saved as JSON so it can be rendered again."""

    machine: Machine
    info: RunInfo
    results: dict[str, ScenarioResult]
    commands: dict[str, str]
    method_notes: list[str] = field(default_factory=list)
    server_errors: dict[str, dict[str, int]] = field(default_factory=dict)
    put_cost: dict[str, float] = field(default_factory=dict)  # variant -> ms CPU per PUT

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "machine": self.machine.as_dict(),
            "info": self.info.as_dict(),
            "results": {k: v.as_dict() for k, v in self.results.items()},
            "commands": self.commands,
            "method_notes": self.method_notes,
            "server_errors": self.server_errors,
            "put_cost": self.put_cost,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        return cls(
            machine=Machine.from_dict(d["machine"]),
            info=RunInfo.from_dict(d["info"]),
            results={k: ScenarioResult.from_dict(v) for k, v in d["results"].items()},
            commands=dict(d["commands"]),
            method_notes=list(d.get("method_notes", [])),
            server_errors={k: dict(v) for k, v in d.get("server_errors", {}).items()},
            put_cost={k: float(v) for k, v in d.get("put_cost", {}).items()},
        )


def _fmt_s(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _ratio(ours: ToolStats | None, peer: ToolStats | None) -> float | None:
    if ours is None or peer is None or ours.time is None or peer.time is None:
        return None
    if peer.time.median <= 0:
        return None
    return ours.time.median / peer.time.median


# -- targets --------------------------------------------------------------------------------


def verdicts(results: dict[str, ScenarioResult]) -> list[Verdict]:
    out: list[Verdict] = []
    for sid, limit in TARGETS.items():
        res = results.get(sid)
        compared = PAIRS.get(sid, [("ours", "rclone", "")])
        for ours_name, peer_name, what in compared:
            out.append(_verdict(sid, limit, res, ours_name, peer_name, what))
    s6 = results.get("S6")
    if s6 is None or s6.skipped or len(s6.rss_rows) < 2:
        out.append(Verdict("S6", "RSS growth < 1 KiB/file", "not run", None))
    else:
        for what, attr in (("upload", "upload_rss"), ("verify", "verify_rss")):
            growth = rss_growth(s6, attr)
            if growth is None:
                if what == "upload":
                    out.append(Verdict("S6", "upload RSS growth < 1 KiB/file", "no data", False))
                continue
            ok = growth < RSS_TARGET
            out.append(
                Verdict(
                    "S6",
                    f"{what} RSS growth < 1 KiB/file",
                    f"{growth:,.0f} B/file",
                    ok,
                    ""
                    if ok
                    else f"{growth - RSS_TARGET:,.0f} B/file over ({growth / RSS_TARGET:.1f}× "
                    "the limit)",
                )
            )
    return out


def _verdict(
    sid: str,
    limit: float,
    res: ScenarioResult | None,
    ours_name: str,
    peer_name: str,
    what: str,
) -> Verdict:
    """Whether our tool met the time target against its peer in one comparison."""
    label = f"{sid} {what}" if what else sid
    target = f"ours/rclone ≤ {limit:g}" + (" and 0 requests" if sid == "S3" else "")
    if what:
        target = f"ours/{_PEER_NAMES.get(peer_name, peer_name)} ≤ {limit:g}"
    if res is None or res.skipped:
        return Verdict(label, target, "not run", None)
    ours, peer = res.tools.get(ours_name), res.tools.get(peer_name)
    ratio = _ratio(ours, peer)
    if ratio is None or ours is None or peer is None:
        return Verdict(label, target, "no timing (a tool failed)", False)
    assert ours.time is not None and peer.time is not None
    measured = f"{ratio:.3f} ({_fmt_s(ours.time.median)} s vs {_fmt_s(peer.time.median)} s)"
    if what:  # requests and CPU belong to the verdict (issue 17)
        measured += (
            f"; requests {_count(ours)} vs {_count(peer)}; CPU {_cpu(ours)} s vs {_cpu(peer)} s"
        )
    ok = ratio <= limit
    misses: list[str] = []
    if not ok:
        needed = peer.time.median * limit
        misses.append(
            f"ratio {ratio:.3f} is {ratio / limit:.1f}× the limit: {ours.label} needs "
            f"≤ {_fmt_s(needed)} s, i.e. {(1 - needed / ours.time.median) * 100:.0f} % "
            "less time"
        )
        level = {"list level": " --level list", "deep read-back": " --level deep"}
        why = _why_slow(sid, ours, peer, level.get(what, ""))
        if why:
            misses.append(why)
    if sid == "S3":
        counted = ours.proxy.total if ours.proxy else None
        own = max(ours.self_requests) if ours.self_requests else None
        measured += f"; requests: {counted if counted is not None else '?'}"
        if counted is None or counted != 0 or (own or 0) != 0:
            ok = False
            misses.append(f"made {counted} requests (agent's own count {own}), target 0")
    if ours.errors:
        ok = False
        misses.append(f"{len(ours.errors)} error(s), see {sid}")
    return Verdict(label, target, measured, ok, "; ".join(misses))


_PEER_NAMES = {"rclone": "rclone check", "rclone-deep": "rclone check --download"}


def _count(stats: ToolStats) -> str:
    return f"{stats.proxy.total:,}" if stats.proxy is not None else "?"


def _cpu(stats: ToolStats) -> str:
    return f"{statistics.median(stats.cpu):.2f}" if stats.cpu else "?"


def _why_slow(sid: str, ours: ToolStats, peer: ToolStats, profile_args: str = "") -> str:
    """The measured reason a time target was missed, as far as the numbers tell it."""
    if not ours.cpu or ours.time is None or ours.time.median <= 0:
        return ""
    cpu = statistics.median(ours.cpu)
    busy = cpu / ours.time.median
    peer_cpu = statistics.median(peer.cpu) if peer.cpu else 0.0
    versus = f", {cpu / peer_cpu:.1f}× {peer.label}'s {peer_cpu:.2f} s" if peer_cpu else ""
    if sid == "S3":
        sent = ours.proxy.total if ours.proxy is not None else None
        return (
            f"why: with nothing new the agent sent {sent if sent is not None else '?'} "
            f"requests, so its {_fmt_s(ours.time.median)} s are process start-up, imports and "
            f"the local scan ({cpu:.2f} CPU-s{versus}); `python -m bench.profile S3` splits them"
        )
    profile = f"`python -m bench.profile {sid}{profile_args}` shows where the CPU goes"
    if peer.time is not None and cpu >= peer.time.median:
        return (
            f"why: backrest-relay's CPU time alone ({cpu:.2f} s{versus}) is longer than "
            f"{peer.label}'s whole run ({_fmt_s(peer.time.median)} s), and one Python "
            "process runs its threads' Python code on one core at a time (GIL): the CPU "
            f"cost per request must fall before concurrency can help; {profile}"
        )
    if busy >= 0.7:
        return (
            f"why: backrest-relay is CPU-bound — {cpu:.2f} CPU-s in {_fmt_s(ours.time.median)} s "
            f"({busy:.1f} cores busy; one Python process holds the GIL){versus}; {profile}"
        )
    return (
        f"why: backrest-relay used {cpu:.2f} CPU-s{versus} in {_fmt_s(ours.time.median)} s; "
        "the rest it waited for the server, for the GIL between its threads or for a core "
        f"on this shared machine; {profile}"
    )


def rss_growth(s6: ScenarioResult, attr: str) -> float | None:
    """Bytes of peak RSS per extra file, from the smallest to the largest repository."""
    rows = [r for r in s6.rss_rows if getattr(r, attr) is not None]
    if len(rows) < 2 or rows[-1].files == rows[0].files:
        return None
    first, last = rows[0], rows[-1]
    return float(getattr(last, attr) - getattr(first, attr)) / (last.files - first.files)


# -- findings in words ------------------------------------------------------------------


def findings(res: ScenarioResult) -> list[str]:
    """What the numbers of one scenario show, as sentences (most important first)."""
    if res.skipped:
        return []
    lines: list[str] = []
    ours = res.tools.get("ours")
    timed = sorted(
        ((s.time.median, s.label) for s in res.tools.values() if s.time is not None),
    )
    if len(timed) > 1:
        (best, label), rest = timed[0], timed[1:]
        lines.append(
            f"Fastest: {label} ({_fmt_s(best)} s); then "
            + ", ".join(f"{other} {_fmt_s(t)} s" for t, other in rest)
            + "."
        )
    by_ours: dict[str, list[str]] = {}
    for ours_name, peer_name, _what in pairs_of(res):
        mine, peer = res.tools.get(ours_name), res.tools.get(peer_name)
        ratio = _ratio(mine, peer)
        if ratio is None or mine is None or peer is None:
            continue
        if ratio >= 1:
            part = f"{ratio:.2f}× the time of {peer.label} (slower)"
        else:
            faster = 1 / ratio
            part = (
                f"{ratio:.2f}× the time of {peer.label} ({faster:.2f}× faster)"
                if faster < 2
                else f"{ratio:.2f}× the time of {peer.label} ({faster:.1f}× faster)"
            )
        by_ours.setdefault(mine.label, []).append(part)
    for label, parts in by_ours.items():
        lines.append(f"{label} needs " + "; ".join(parts) + ".")
    counted = {k: v.proxy for k, v in res.tools.items() if v.proxy is not None}
    if counted:
        desc = [
            f"{res.tools[name].label} {c.total:,} ({c.lists:,} list, {c.heads:,} HEAD, "
            f"{c.writes:,} write, {c.gets:,} GET)"
            for name, c in counted.items()
            if c is not None
        ]
        lines.append("Requests per run: " + "; ".join(desc) + ".")
        for ours_name, peer_name, _what in pairs_of(res):
            ours_c, c = counted.get(ours_name), counted.get(peer_name)
            if ours_c is not None and c is not None and c.total:
                lines.append(
                    f"{res.tools[ours_name].label} sends {ours_c.total / c.total:.0%} of "
                    f"{res.tools[peer_name].label}'s requests and {ours_c.lists:,} list calls "
                    f"to its {c.lists:,}."
                )
    if ours is not None and ours.cpu and ours.time is not None and ours.time.median > 0:
        cpu = statistics.median(ours.cpu)
        peers_cpu = [
            f"{s.label} {statistics.median(s.cpu):.2f} s"
            for n, s in res.tools.items()
            if n != "ours" and s.cpu
        ]
        lines.append(
            f"CPU time (user+system, median): backrest-relay {cpu:.2f} s"
            + (", " + ", ".join(peers_cpu) if peers_cpu else "")
            + f"; backrest-relay kept {cpu / ours.time.median:.1f} of the "
            f"{os.cpu_count() or 1} cores busy."
        )
    if ours is not None and ours.time is not None:
        spread = ours.time
        width = (spread.high - spread.low) / spread.median if spread.median > 0 else 0.0
        if spread.n > 1 and width > 0.2:
            lines.append(
                f"backrest-relay's slowest and fastest runs differ by {width:.0%} of the "
                "median: the machine was busy; compare medians only."
            )
    if (
        ours is not None
        and ours.proxy is not None
        and ours.proxy_self_requests is not None
        and ours.proxy_self_requests != ours.proxy.total
    ):
        lines.append(
            f"backrest-relay reported {ours.proxy_self_requests:,} requests in its summary, "
            f"the proxy saw {ours.proxy.total:,}: its own count is off."
        )
    for name, c in counted.items():
        if c is not None and c.failed:
            failed = ", ".join(f"{n}× {what}" for what, n in c.failed.items())
            lines.append(
                f"The server failed {sum(c.failed.values())} of {res.tools[name].label}'s "
                f"requests in the counting run ({failed}); the client retried, the total "
                "includes them."
            )
    for stats in res.tools.values():
        for err in stats.errors[:3]:
            lines.append(f"**Error** ({stats.label}): {err}")
    return lines


# -- rendering --------------------------------------------------------------------------


def _tool_table(res: ScenarioResult, per_file: int | None) -> list[str]:
    ours_of = {peer: mine for mine, peer, _what in pairs_of(res)}
    header = (
        "| Tool | median s | min s | max s | ours ÷ tool | CPU s | requests | list | HEAD "
        "| GET | write | peak RSS MiB |"
    )
    if per_file:
        header += " ms/file |"
    rows = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for stats in res.tools.values():
        t = stats.time
        mine = ours_of.get(stats.tool)
        ratio = _ratio(res.tools.get(mine), stats) if mine is not None else None
        is_ours = stats.tool == "ours" or stats.tool in ours_of.values()
        c = stats.proxy
        cells = [
            stats.label,
            _fmt_s(t.median) if t else "—",
            _fmt_s(t.low) if t else "—",
            _fmt_s(t.high) if t else "—",
            f"{ratio:.3f}" if ratio is not None else ("1" if is_ours and t else "—"),
            f"{statistics.median(stats.cpu):.2f}" if stats.cpu else "—",
            f"{c.total:,}" if c else "—",
            f"{c.lists:,}" if c else "—",
            f"{c.heads:,}" if c else "—",
            f"{c.gets:,}" if c else "—",
            f"{c.writes:,}" if c else "—",
            f"{stats.peak_rss / MiB:.0f}" if stats.peak_rss else "—",
        ]
        if per_file:
            cells.append(f"{t.median / per_file * 1000:.2f}" if t else "—")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _s6_table(res: ScenarioResult) -> list[str]:
    rows = [
        "| files | upload peak RSS MiB | upload s | nothing-new run peak RSS MiB | verify peak "
        "RSS MiB |",
        "|---|---|---|---|---|",
    ]

    def mib(x: int | None) -> str:
        return f"{x / MiB:.1f}" if x is not None else "—"

    for r in res.rss_rows:
        rows.append(
            f"| {r.files:,} | {mib(r.upload_rss)} | "
            f"{_fmt_s(r.upload_seconds) if r.upload_seconds is not None else '—'} | "
            f"{mib(r.noop_rss)} | {mib(r.verify_rss)} |"
        )
    return rows


def _s6_findings(res: ScenarioResult) -> list[str]:
    lines = []
    for what, attr in (
        ("upload (full mirror)", "upload_rss"),
        ("a run with nothing new", "noop_rss"),
        ("verify", "verify_rss"),
    ):
        growth = rss_growth(res, attr)
        if growth is None:
            continue
        verdict = "within" if growth < RSS_TARGET else "over"
        lines.append(
            f"Peak RSS of {what} grows by {growth:,.0f} bytes per file ({verdict} the 1 KiB/file "
            "target)."
        )
    rows = [r for r in res.rss_rows if r.upload_rss]
    for a, b in itertools.pairwise(rows):
        assert a.upload_rss is not None and b.upload_rss is not None
        lines.append(
            f"Upload, {a.files:,} → {b.files:,} files: +{(b.upload_rss - a.upload_rss) / MiB:.1f}"
            f" MiB = {(b.upload_rss - a.upload_rss) / (b.files - a.files):,.0f} B/file."
        )
    timed = [r for r in res.rss_rows if r.upload_seconds]
    if timed:
        rates = ", ".join(
            f"{r.files / r.upload_seconds:,.0f} files/s at {r.files:,}"
            for r in timed
            if r.upload_seconds
        )
        lines.append(f"Full-mirror upload speed of backrest-relay: {rates}.")
    for stats in res.tools.values():
        for err in stats.errors[:3]:
            lines.append(f"**Error** ({stats.label}): {err}")
    return lines


def _per_file(res: ScenarioResult, sizes: Sizes) -> int | None:
    return sizes.s2_files if res.sid == "S2" else None


def _where_the_time_goes(put_cost: dict[str, float]) -> list[str]:
    """Issue 8's profile and its cure, with this run's per-request numbers."""
    out = [
        "## Where the time went, and what was done",
        "",
        "Profiles (`python -m bench.profile S1|S2|S3`: cProfile in every upload thread) of "
        "the first version, which sent every file with boto3's `put_object`, put 93 % of the "
        "upload threads' CPU inside botocore: parameter validation, event hooks, the endpoint "
        "ruleset, SigV4 with a second SHA-256 of the body over http, and http.client's "
        "header parsing through the `email` package — about 3 ms of CPU per request, spent "
        "under the GIL, so eight threads did not help (S2 was 2.1× rclone sync, S1 1.7×).",
        "",
        "The cure (local_agent/mirror/object_writer.py on cloud/integrations' sigv4.py, http1.py): "
        "the agent signs single "
        "PUTs itself — the payload hash SigV4 wants is the SHA-256 the file is already named "
        "and checked by — and sends them on one kept-alive HTTP/1.1 connection per thread, "
        "reading S3's short answer without http.client. Everything else (listing, multipart, "
        "deletes) stays with boto3; signatures are tested equal to botocore's, B2's rules "
        "(Content-MD5, no `x-amz-checksum-*`) and botocore's retry policy are kept. Smaller "
        "changes: files under 32 MiB (a default pack) are read once for hashing and sent from "
        "those bytes; each phase sends its biggest files first so it does not end on one "
        "thread still sending a pack. A run with nothing new (S3) spent its time in the scan: "
        "it no longer stat()s packs the state store knows (their recorded size stands in; "
        "restic never rewrites a file) nor sorts directory listings — 2.34 s → 1.40 s over "
        "100,000 files.",
        "",
        "Verification (S5) had the same cost in its read-back: ~4 ms of CPU per object through "
        "boto3's get_object. The verifier now reads the same way the agent writes "
        "(cloud/integrations/object_reader.py): it signs each GET itself, streams the body "
        "into SHA-256 on kept-alive connections from a pool, and parses ListObjectsV2 pages "
        "with a few regular expressions instead of botocore's XML parser; boto3 remains the "
        "fallback (a proxy, a bucket in another region). S5 now compares both levels side by "
        "side: `verify --list-only` with `rclone check`, `verify --deep 100%` with "
        "`rclone check --download`.",
        "",
    ]
    if put_cost:
        out += [
            "CPU per 4 KiB PUT, one thread, same server, this run (`python -m bench.put_cost`):",
            "",
            "| client | ms CPU per request |",
            "|---|---|",
            *(f"| {label} | {ms:.3f} |" for label, ms in put_cost.items()),
            "",
        ]
    return out


def render(report: Report) -> str:
    machine, info, results = report.machine, report.info, report.results
    sizes = info.sizes
    out: list[str] = []
    add = out.append
    add("# Benchmarks: backrest-relay vs `rclone sync` and `s5cmd sync`")
    add("")
    add(
        "_Generated by `make bench` — do not edit by hand, rerun it. This run: "
        f"`{info.command}`, started {info.started:%Y-%m-%d %H:%M} UTC, took "
        f"{info.seconds / 60:.1f} min._"
    )
    add("")
    if sizes.is_full():
        add("Sizes: **as issue 8 specifies** (scale 1).")
    else:
        scaled = ", ".join(f"{s} ×{sizes.factor(s):g}" for s in SCENARIOS if sizes.factor(s) != 1.0)
        quick = all(abs(sizes.factor(s) - QUICK_SCALE) < 1e-9 for s in SCENARIOS)
        add(
            f"**Sizes reduced** ({'`--quick`, ' if quick else ''}{scaled}); the sizes actually "
            "used are given per scenario. Ratios at reduced size are indicative: fixed costs "
            "(process start-up) weigh more on small runs."
            + (f" Why: {info.reason}" if info.reason else "")
        )
    add("")
    add("## Machine")
    add("")
    add("| | |")
    add("|---|---|")
    for key, value in [
        ("CPU", f"{machine.cpu} — {machine.cores} cores"),
        ("Memory", machine.memory),
        ("Kernel", machine.kernel),
        ("Python", machine.python),
        ("backrest-relay", machine.agent),
        ("SDK", machine.boto3),
        ("rclone", machine.rclone),
        ("s5cmd", machine.s5cmd),
        ("Server storage", machine.storage),
        ("Load average before / after", f"{machine.load_before} → {info.load_after}"),
    ]:
        add(f"| {key} | {value} |")
    add("")
    add("## Targets (issues 8 and 17)")
    add("")
    add("| Scenario | Target | Measured | Result | Missed by |")
    add("|---|---|---|---|---|")
    for v in verdicts(results):
        add(f"| {v.sid} | {v.target} | {v.measured} | {v.mark} | {v.shortfall or ''} |")
    add("")
    add("## What the numbers show")
    add("")
    for sid in SCENARIOS:
        res = results.get(sid)
        if res is None:
            continue
        if res.skipped:
            add(f"- **{sid}** skipped: {res.skipped}")
            continue
        lines = _s6_findings(res) if sid == "S6" else findings(res)
        if lines:
            add(f"- **{sid}** ({res.title}): " + " ".join(lines[:4]))
    add("")
    out.extend(_where_the_time_goes(report.put_cost))
    for sid in SCENARIOS:
        res = results.get(sid)
        if res is None:
            continue
        add(f"## {sid} — {res.title}")
        add("")
        if res.seconds:
            add(f"_Scenario wall time: {res.seconds:.0f} s._")
            add("")
        add(
            f"{res.size[0].upper()}{res.size[1:]}"
            + (f" (scale ×{sizes.factor(sid):g})." if sizes.factor(sid) != 1 else ".")
        )
        add("")
        if res.skipped:
            add(f"**Skipped:** {res.skipped}")
            add("")
            continue
        if sid == "S6":
            out.extend(_s6_table(res))
            add("")
            lines = _s6_findings(res)
        else:
            out.extend(_tool_table(res, _per_file(res, sizes)))
            add("")
            lines = findings(res)
        for line in lines:
            add(f"- {line}")
        for note in res.notes:
            add(f"- {note}")
        add("")
    add("## Method")
    add("")
    add(
        f"- Server: `rclone serve s3` on 127.0.0.1 over a directory on {info.storage}; one "
        "server per scenario (S3–S5 share one). Client and server share the machine's cores."
    )
    add(
        f"- Every timed run is a separate process timed from spawn to exit (start-up "
        f"included, as Backrest's hook runs it); {info.runs} timed run"
        f"{'s' if info.runs != 1 else ''} per tool and scenario, the order of the tools "
        "rotating from run to run (each tool goes first, middle and last in turn); tables "
        "give median, min and max, ratios are of medians."
    )
    add(
        "- Requests are counted in one extra, untimed run per tool through `S3Proxy` "
        "(testbed/s3/operations.py), which names each S3 operation; `list` counts what "
        "B2 bills as Class C (ListObjects*, ListParts, ListMultipartUploads). For "
        "backrest-relay the counting run keeps its state store (renamed for the proxy's URL)."
    )
    add(
        "- Peak RSS is `ru_maxrss` of the tool's process from `wait4`, taken by a small "
        "launcher (bench/_launch.py) that spawns the tool: Linux carries a process's peak "
        "RSS across `exec`, so a tool forked straight from the benchmark would report the "
        "benchmark's own memory. The same launcher times the run and reads its CPU time."
    )
    for note in report.method_notes:
        add(f"- {note}")
    if report.server_errors:
        logged: dict[str, list[str]] = {}
        for server, errors in report.server_errors.items():
            for line, n in errors.items():
                logged.setdefault(line, []).append(f"{n}× in {server}")
        add(
            "- rclone serve s3 logged errors: "
            + "; ".join(f"`{line}` ({', '.join(where)})" for line, where in logged.items())
            + ". Clients retry them (5xx in the counting runs). `serve s3: file does not "
            "exist` is rclone serve s3 failing a PUT now and then under concurrent uploads "
            "into new directories; a plain boto3 script triggers it as well, so it is the "
            "server's doing, not a client's."
        )
    add(
        "- After every full-mirror and incremental run the bucket's directory is compared "
        "with the repository (names and sizes, `locks/` excluded); a difference is reported "
        "as an error of that tool."
    )
    add(
        "- Repositories: restic layout, random content, every file named by its SHA-256 "
        "(testbed/repos.py), all with one whole-second modification time."
    )
    add(
        "- S3–S5: each tool's bucket starts as a copy of the repository made in the server's "
        "directory (modification times kept), i.e. the objects a finished sync leaves — "
        "seeding it through each tool would take most of the time budget. backrest-relay "
        "builds its state store from that bucket as its first run does (one listing, every "
        "object adopted after comparing its MD5 with the listed ETag, nothing uploaded); "
        "then every tool gets one untimed warm-up run. The repository then grows by S4's "
        "batches, and S5 verifies the resulting mirrors."
    )
    add(
        "- rclone serve s3 computes an object's ETag (MD5) by reading the file the first time "
        "the object is listed or HEADed, then keeps it in memory. S3–S5 start with one "
        "untimed warm-up run per tool, so their timed runs see stored ETags, as on a real "
        "service."
    )
    add(
        "- The endpoint is plain http://127.0.0.1. backrest-relay's single PUTs sign the "
        "SHA-256 it computes anyway to check each file's name, so plain http costs it no "
        "extra pass over the data (boto3's multipart parts would be hashed again; no file "
        "here reaches the 64 MiB multipart threshold)."
    )
    add(f"- Concurrency {info.concurrency} for every tool. Commands:")
    for name, command in report.commands.items():
        add(f"  - {name}: `{command}`")
    add(f"- Raw results: `{info.results_file}` (not committed).")
    add("")
    return "\n".join(out)


def summary_table(results: dict[str, ScenarioResult]) -> Sequence[str]:
    """The target table as plain text lines, for the terminal."""
    return [
        f"{v.sid}  {v.mark.strip('*'):4}  {v.target:34} {v.measured}"
        + (f"  — missed by: {v.shortfall}" if v.shortfall else "")
        for v in verdicts(results)
    ]

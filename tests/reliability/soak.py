"""``python -m tests.reliability.soak`` (``make soak``): the reliability suite with its heavy,
seeded counts, and docs/reliability.md written from what it measured.

    python -m tests.reliability.soak                 # a fresh random seed
    python -m tests.reliability.soak --seed 1234     # repeat a run
    python -m tests.reliability.soak --bounded       # make test's counts (a quick look)

The seed also comes from ``BACKREST_RELAY_SEED``. Extra arguments go to pytest (after
``--``). Exit status is pytest's; the document is written either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.reliability.common import COUNTS, LEDGER_ENV, MODEL

ROOT = Path(__file__).resolve().parents[2]

# category → (what it is, what "faults" counts, what "detected" counts, what "lost" counts)
CATEGORIES: dict[str, tuple[str, str, str, str]] = {
    "crash": (
        "SIGKILL at seeded points of an upload of a real ~30 MB restic repository (before or "
        "after a request reached the server, or at a random time), resumed runs killed again",
        "kills that fired",
        "kills fully recovered (mirror byte-identical, state store true and intact, no "
        "unfinished upload, outbox empty)",
        "local files not in the final mirror intact",
    ),
    "flaky endpoint": (
        "seeded random 500s, 503 SlowDown, resets mid-body, dropped connections (before and "
        "after the server acted), slow responses, cut-off response bodies and retry-exhausting "
        "blackouts, between agent/verifier and the S3 server. A reset mid-body reaches the "
        "client only after `rclone serve s3` has finished with the cut request: rclone deletes "
        "the key of a cut PUT whenever it notices the cut, and doing so after the client's "
        "successful retry (which no S3 or B2 does) is the likely cause of the one pack an "
        "earlier soak found missing (tests/unit/test_support_servers.py)",
        "faults injected",
        "runs that ended correctly (exit 0, or exit 4 with a consistent mirror; verify 0, or "
        "4 when unreadable)",
        "local files missing after the clean rerun (corrupt objects are listed in the notes)",
    ),
    "remote tampering": (
        "random damage to a mirror (delete, truncate, flip a byte, append, replace with "
        "another object's bytes — by S3 API or on disk — and manifest damage), then "
        "`verify --deep 100%`",
        "damaging faults",
        "damaging faults found and named",
        "damaging faults missed",
    ),
    "bad events (verify handler)": (
        "hypothesis: SQS batches of malformed, oversized, wrong-version and valid events",
        "bodies that must be rejected (garbage, contract-breaking)",
        "rejected as required (record failed → DLQ)",
        "handler exceptions outside the batch protocol",
    ),
    "bad events (notify handler, watchdog)": (
        "hypothesis: the same for the notifier; the watchdog over the fuzzed run store",
        "bodies that must be rejected",
        "rejected as required",
        "handler exceptions outside the batch protocol",
    ),
    "bad config": (
        "hypothesis: TOML-ish text, random key/value structures, random environment "
        "overrides; a sample through the CLI",
        "configs refused",
        "refused with ConfigError / exit 2 and a message",
        "other exceptions or tracebacks",
    ),
    "odd repository contents": (
        "symlinks, zero-byte files, unknown files and folders, non-hex and non-UTF-8 names, "
        "FIFOs, temporary files, misplaced packs, junk in locks/",
        "oddities planted",
        "skipped with the documented reason, or refused with exit 3 and named",
        "oddities uploaded or unexplained",
    ),
    "secrets": (
        "sentinel credentials and notification URLs through every command and the handlers",
        "sentinel secrets",
        "sentinels never found",
        "leaks found",
    ),
    MODEL: (
        "hypothesis `RuleBasedStateMachine` (tests/reliability/test_mirror_model.py) over real "
        "restic, `rclone serve s3` and moto (multipart ETags) and the agent process: backups, "
        "forget + prune, a racing restic backup, SIGKILL, an unreadable new pack, a foreign "
        "repository at the path, S3-API damage to single-part and multipart objects, "
        "`--reconcile`, deadline expiry and delete runs in random order; invariants checked "
        "after every step",
        "fault steps (racing backup, kill, unreadable pack, deadline, foreign repository, "
        "tampering)",
        "invariant checks that held",
        "cases that broke an invariant",
    ),
    "concurrency": (
        "two uploads of one repository at once (the second by the same path, a local: URI, "
        "a trailing slash, a symlink, or without --repo-guid; short and long lock_wait)",
        "concurrent pairs",
        "pairs that did not interleave",
        "local files missing afterwards",
    ),
    "serve sidecar": (
        "`backrest-relay serve` as a real process: triggers for ten repositories from eight "
        "callers at once, each following its run, hanging up at a random point, hanging up "
        "before the answer, or asking wait=false (tests/reliability/test_serve_soak.py)",
        "callers that hung up",
        "triggers whose run finished with exit 0 (and, when followed, streamed `exit 0`)",
        "runs lost or failed + runs duplicated (two alive for one repository) + files "
        "missing from the mirrors",
    ),
}


# Bugs this suite found; each has a regression test (they were fixed in commit 80cbfda).
FOUND: list[tuple[str, str]] = [
    (
        "test_flaky_endpoint::test_truncated_download_during_verify_is_not_a_verdict",
        "a download cut off half-way during the deep check was reported as an 'unreadable' "
        "problem — VERIFICATION FAILED, exit 3, a false alarm — instead of being read again",
    ),
    (
        "test_flaky_endpoint::test_lost_reply_to_create_multipart_upload_leaves_no_unfinished_upload",
        "a lost reply to CreateMultipartUpload made botocore start a second upload; the first "
        "stayed unfinished (billed by B2) after the run, and after every run that uploaded "
        "nothing",
    ),
    (
        "test_concurrency::test_runs_with_and_without_guid_do_not_interleave",
        "the run lock was keyed by --repo-guid (else the path): Backrest's hook and a run by "
        "hand without --repo-guid uploaded into one prefix at once, and the second aborted the "
        "first's multipart upload as a stray (the first failed with exit 4)",
    ),
    (
        "test_tampering::test_deleted_newest_manifest_is_detected",
        "with the newest manifest deleted from the bucket, verify fell back to an older one and "
        "said VERIFIED (exit 0) although this host had recorded the newest",
    ),
    (
        "test_bad_config::test_huge_size_is_a_config_error",
        "a size of 300+ digits raised OverflowError out of load_config: 'unexpected error', "
        "exit 1 instead of 2",
    ),
    (
        "test_bad_config::test_huge_deadline_prints_no_traceback",
        "a deadline past ~292 years loaded, then the hard-stop timer thread died with "
        "OverflowError and printed a traceback (durations are now capped at 30 days)",
    ),
]


@dataclass
class Case:
    name: str
    seconds: float
    outcome: str  # passed | failed | error | skipped | xfailed
    message: str


def read_junit(path: Path) -> list[Case]:
    if not path.exists():
        return []
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):  # noqa: S314 - pytest's own file
        name = f"{tc.get('classname', '').rsplit('.', 1)[-1]}::{tc.get('name')}"
        outcome, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome, message = (
                    ("failed" if child.tag == "failure" else "error"),
                    (child.get("message") or ""),
                )
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                outcome = "xfailed" if xfail else "skipped"
                message = child.get("message") or ""
        cases.append(Case(name, float(tc.get("time") or 0), outcome, message))
    return cases


def _first_line(cmd: Sequence[str]) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not installed"
    try:
        out = subprocess.run(
            [exe, *cmd[1:]], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    memory = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {
        "CPU": f"{cpu} × {os.cpu_count()}",
        "Memory": memory,
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "restic": _first_line(["restic", "version"]),
        "rclone": _first_line(["rclone", "version"]),
        "Load average at start": load,
    }


def model_tables(fig: dict[str, Any]) -> list[str]:
    """Steps, rules and invariants of the model-based test, per server and in total.

    The test records kinds as ``rule SERVER: NAME`` and ``invariant SERVER: NAME``."""
    table: dict[str, dict[str, dict[str, int]]] = {"rule": {}, "invariant": {}}
    servers: list[str] = []
    for kind, n in fig.get("kinds", {}).items():
        what, _, rest = kind.partition(" ")
        server, _, name = rest.partition(": ")
        if what not in table or not name:
            continue
        if server not in servers:
            servers.append(server)
        table[what].setdefault(name, {})[server] = n
    servers.sort()
    lines = [f"Steps run: **{fig['trials']}** (every rule application is a step)."]
    for what, title in (("rule", "Rules exercised"), ("invariant", "Invariants checked")):
        lines += [
            "",
            f"| {title.lower()} | {' | '.join(servers)} | total |",
            "| --- |" + " ---: |" * (len(servers) + 1),
        ]
        for name, per in sorted(table[what].items()):
            cells = " | ".join(str(per.get(srv, 0)) for srv in servers)
            lines.append(f"| {name} | {cells} | {sum(per.values())} |")
    return lines


def render(
    *,
    seed: int,
    soak: bool,
    started: datetime,
    seconds: float,
    returncode: int,
    host: dict[str, str],
    ledger: dict[str, Any],
    cases: list[Case],
    note: str,
) -> str:
    outcomes: dict[str, int] = {}
    for case in cases:
        outcomes[case.outcome] = outcomes.get(case.outcome, 0) + 1
    categories: dict[str, Any] = ledger.get("categories", {})
    lost = sum(c["lost"] for c in categories.values())
    verdict = "PASSED" if returncode == 0 else f"FAILED (pytest exit {returncode})"
    lines = [
        "# Reliability: faults, abuse, and what survived them",
        "",
        "Written by `make soak` (`python -m tests.reliability.soak`) — do not edit by hand;",
        "run it again to refresh the figures. The same tests run with small counts in",
        "`make test`. Sources: `tests/reliability/`.",
        "",
        f"- **Result: {verdict}** — "
        + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
        + (" (xfailed = open bugs, listed below)" if outcomes.get("xfailed") else ""),
        f"- **Data lost: {lost}** (must be 0)",
        f"- Seed: `{seed}` (repeat with `BACKREST_RELAY_SEED={seed} make soak`)",
        f"- Counts: {'soak' if soak else 'bounded (make test)'}",
        f"- Started {started:%Y-%m-%d %H:%M} UTC, took {seconds / 60:.1f} min",
        *(f"- {k}: {v}" for k, v in host.items()),
    ]
    if note:
        lines += ["", note]
    lines += [
        "",
        "## Figures",
        "",
        "| fault class | trials | faults injected | detected / handled | data lost |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, fig in categories.items():
        lines.append(
            f"| {name} | {fig['trials']} | {fig['faults']} | {fig['detected']} | {fig['lost']} |"
        )
    lines += ["", "What each column counts, and what was injected:", ""]
    for name, fig in categories.items():
        what, faults, detected, lost_what = CATEGORIES.get(name, (name, "", "", ""))
        lines += [f"### {name}", "", what + ".", ""]
        lines.append(
            f"- faults injected: {faults}; detected / handled: {detected}; data lost: {lost_what}."
        )
        if name == MODEL:
            lines += ["", *model_tables(fig), ""]
        elif fig.get("kinds"):
            kinds = ", ".join(f"{k} × {v}" for k, v in sorted(fig["kinds"].items()))
            lines.append(f"- by kind: {kinds}")
        for text in fig.get("notes", []):
            lines.append(f"- {text}")
        lines.append("")
    by_name = {c.name: c for c in cases}
    lines += [
        "## Bugs this suite found",
        "",
        "Each became a regression test; all were fixed in commit `80cbfda` while the suite was",
        "being written. Outcome in this run:",
        "",
    ]
    for name, what in FOUND:
        outcome = by_name[name].outcome if name in by_name else "not run"
        lines.append(f"- `{name}` ({outcome}) — {what}")
    bugs = [c for c in cases if c.outcome == "xfailed"]
    lines += ["", "## Open bugs (strict xfail tests: they fail until the bug is fixed)", ""]
    if bugs:
        for case in bugs:
            reason = case.message.removeprefix("reason: ")
            lines.append(f"- `{case.name}` — {reason}")
    else:
        lines.append("None.")
    failed = [c for c in cases if c.outcome in ("failed", "error")]
    if failed:
        lines += ["", "## Failures in this run", ""]
        lines += [f"- `{c.name}` — {c.message[:300]}" for c in failed]
    lines += [
        "",
        "## Counts: `make test` and `make soak`",
        "",
        "| what | make test | make soak |",
        "| --- | ---: | ---: |",
        *(f"| {what} | {d} | {s} |" for what, (d, s) in COUNTS.items()),
        "",
        "## Tests and timings (this run)",
        "",
        "| test | outcome | seconds |",
        "| --- | --- | ---: |",
        *(f"| `{c.name}` | {c.outcome} | {c.seconds:.1f} |" for c in cases),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.soak")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--output", default=str(ROOT / "docs" / "reliability.md"))
    parser.add_argument("--bounded", action="store_true", help="make test's counts")
    parser.add_argument("--note", default="", help="a paragraph for the document")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    seed = args.seed
    if seed is None:
        env_seed = os.environ.get("BACKREST_RELAY_SEED", "").strip()
        seed = int(env_seed) if env_seed else random.SystemRandom().randrange(1, 2**31)
    host = machine()
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="backrest-relay-soak-") as tmp:
        ledger_path = Path(tmp) / "ledger.json"
        junit = Path(tmp) / "junit.xml"
        env = {
            **os.environ,
            "BACKREST_RELAY_SOAK": "0" if args.bounded else "1",
            "BACKREST_RELAY_SEED": str(seed),
            LEDGER_ENV: str(ledger_path),
            "BACKREST_RELAY_REQUIRE_TOOLS": os.environ.get("BACKREST_RELAY_REQUIRE_TOOLS", "1"),
        }
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            str(ROOT / "tests" / "reliability"),
            "-p",
            "no:cacheprovider",
            "-q",
            "-rxXfE",
            f"--junitxml={junit}",
            *args.pytest_args,
        ]
        print(f"soak: seed {seed}: {' '.join(cmd)}", flush=True)
        clock = time.monotonic()
        returncode = subprocess.call(cmd, env=env, cwd=ROOT)
        seconds = time.monotonic() - clock
        ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
        cases = read_junit(junit)
    text = render(
        seed=seed,
        soak=not args.bounded,
        started=started,
        seconds=seconds,
        returncode=returncode,
        host=host,
        ledger=ledger,
        cases=cases,
        note=args.note,
    )
    Path(args.output).write_text(text)
    print(f"soak: wrote {args.output} ({seconds / 60:.1f} min, pytest exit {returncode})")
    return returncode


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.merge BASE.json RERUN.json --scenarios S3`: one report from two runs.

A full run takes more than an hour here. When a change affects one scenario, that
scenario can be measured again (`python -m bench --scenarios S3 [--tools ours,rclone]`)
and put into the full run's report instead of repeating everything. The merged report
says so next to the scenario: which run it comes from, with which agent version, what the
full run had measured, and which peer rows (tools the re-run left out) are the full run's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bench.cli import write_report
from bench.report import Report
from bench.tools import ROOT


def merge(
    base: Report,
    rerun: Report,
    scenarios: Sequence[str],
    extra_notes: Sequence[tuple[str, str]] = (),
) -> Report:
    """`base` with `scenarios` taken from `rerun`; notes say where each number is from.

    `extra_notes` are (scenario, text) pairs added to any scenario of the merged report, for
    what the raw results cannot say (a run stopped on purpose, say)."""
    results = dict(base.results)
    for sid in scenarios:
        new = rerun.results.get(sid)
        if new is None or new.skipped:
            raise SystemExit(f"bench.merge: {rerun.info.results_file} has no result for {sid}")
        old = base.results.get(sid)
        tools = dict(new.tools)
        notes = [
            f"Re-measured by `{rerun.info.command}` (started "
            f"{rerun.info.started:%Y-%m-%d %H:%M} UTC, backrest-relay {rerun.machine.agent}, "
            "load before "
            f"{rerun.machine.load_before}); the rest of this report is from the run at the "
            f"top (backrest-relay {base.machine.agent})."
        ]
        if old is not None:
            before = old.tools.get("ours")
            if before is not None and before.time is not None:
                notes.append(
                    f"That run measured backrest-relay at {before.time.median:.2f} s "
                    f"(median) for this scenario."
                )
            for name, stats in old.tools.items():
                if name not in tools:
                    tools[name] = stats
                    notes.append(f"{stats.label}: not re-run; its row is from the run at the top.")
        results[sid] = replace(new, tools=tools, notes=[*notes, *new.notes])
    for sid, text in extra_notes:
        if sid not in results:
            raise SystemExit(f"bench.merge: no scenario {sid} for the note {text!r}")
        results[sid] = replace(results[sid], notes=[*results[sid].notes, text])
    for key, value in rerun.put_cost.items():
        base.put_cost.setdefault(key, value)
    merged_from = f"{base.info.results_file} + {rerun.info.results_file} ({', '.join(scenarios)})"
    return replace(
        base,
        results=results,
        method_notes=[*base.method_notes, f"Merged report: {merged_from}."],
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.merge", description=__doc__)
    p.add_argument("base", type=Path, help="the full run's bench/results/*.json")
    p.add_argument("rerun", type=Path, help="the re-run's bench/results/*.json")
    p.add_argument("--scenarios", required=True, help="comma-separated, e.g. S3")
    p.add_argument(
        "--note",
        action="append",
        default=[],
        metavar="S=TEXT",
        help="add a note to a scenario of the merged report (repeatable)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    base = Report.from_dict(json.loads(args.base.read_text()))
    rerun = Report.from_dict(json.loads(args.rerun.read_text()))
    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    notes = [tuple(n.split("=", 1)) for n in args.note]
    if any(len(n) != 2 for n in notes):
        raise SystemExit("bench.merge: --note takes SCENARIO=TEXT")
    merged = merge(base, rerun, scenarios, [(sid.upper(), text) for sid, text in notes])
    target = args.base.with_name(args.base.stem + "-merged.json")
    target.write_text(json.dumps(merged.as_dict(), indent=1))
    print(f"merged results in {target}", file=sys.stderr)
    write_report(merged, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

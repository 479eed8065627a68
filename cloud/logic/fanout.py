"""A fanned-out verification's job and the adding-up of its chunks' results.

Pure: the job and each chunk's result are JSON-able dicts the `FanoutStore` port keeps;
`combine` turns the chunks' outcomes into the one outcome a single pass would have
given (the manifest's object count is checked here, over all chunks). Design:
docs/verification.md ("Fan-out").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from cloud.contracts.events import MAX_LISTED_PROBLEMS, Problem, VerificationStats
from cloud.contracts.manifest import ManifestHeader
from cloud.logic.chunks import KeyRange, ranges
from cloud.logic.verify import VerificationOutcome

JOB_VERSION = 1
_SUMMED = (
    "listed",
    "compared",
    "deep_checked",
    "deep_checked_new",
    "bytes_read",
    "extra_objects",
    "list_requests",
)


def job_id(mirror_run_id: str, manifest_key: str, manifest_sha256: str) -> str:
    """One job per announced mirror run and manifest: a redelivered event finds its job;
    a later run pointing at the same manifest gets its own (with its own rotation slice
    and result, as the one-shot path gives it)."""
    text = f"{mirror_run_id}\n{manifest_key}\n{manifest_sha256}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class FanoutJob:
    """What every chunk of one verification shares, as the run store keeps it."""

    job_id: str
    repo_key: str
    event: dict[str, Any]  # the `Mirror Completed` detail
    cuts: tuple[str, ...]  # the chunk boundaries (`cloud.logic.chunks.ranges`)
    rotation_index: int
    rotation_runs: int  # every chunk draws the same rotation slice
    new_bytes_budget: int | None  # per chunk
    created_at: str
    # State, kept by the store.
    done: tuple[int, ...] = ()
    dispatched: bool = False
    result: dict[str, Any] | None = None
    published: bool = False

    @property
    def chunks(self) -> list[KeyRange]:
        return ranges(self.cuts)

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.cuts) + 1

    def to_dict(self) -> dict[str, Any]:
        """What `FanoutStore.create_job` stores (the state is the store's own)."""
        return {
            "version": JOB_VERSION,
            "job_id": self.job_id,
            "repo_key": self.repo_key,
            "event": self.event,
            "cuts": list(self.cuts),
            "rotation_index": self.rotation_index,
            "rotation_runs": self.rotation_runs,
            "new_bytes_budget": self.new_bytes_budget,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FanoutJob:
        if data.get("version") != JOB_VERSION:
            raise ValueError(f"fan-out job version {data.get('version')!r} is not {JOB_VERSION}")
        budget = data.get("new_bytes_budget")
        return cls(
            job_id=str(data["job_id"]),
            repo_key=str(data["repo_key"]),
            event=dict(data["event"]),
            cuts=tuple(str(c) for c in data["cuts"]),
            rotation_index=int(data["rotation_index"]),
            rotation_runs=int(data["rotation_runs"]),
            new_bytes_budget=None if budget is None else int(budget),
            created_at=str(data["created_at"]),
            done=tuple(sorted(int(i) for i in data.get("done", ()))),
            dispatched=bool(data.get("dispatched", False)),
            result=data.get("result"),
            published=bool(data.get("published", False)),
        )


@dataclass(frozen=True)
class ChunkResult:
    """One chunk's outcome, small enough for one DynamoDB item (50 problems and warnings
    at most; the full list is in the chunk's report object)."""

    index: int
    stats: VerificationStats
    problems: tuple[Problem, ...] = ()
    problems_total: int = 0
    warnings: tuple[str, ...] = ()
    report_key: str | None = None
    header: ManifestHeader | None = None
    manifest_sha256: str | None = None
    complete: bool = True

    @classmethod
    def of(cls, index: int, outcome: VerificationOutcome, report_key: str | None) -> ChunkResult:
        return cls(
            index=index,
            stats=outcome.stats,
            problems=tuple(outcome.problems[:MAX_LISTED_PROBLEMS]),
            problems_total=outcome.problems_total,
            warnings=tuple(outcome.warnings[:MAX_LISTED_PROBLEMS]),
            report_key=report_key,
            header=outcome.header,
            manifest_sha256=outcome.manifest_sha256,
            complete=outcome.complete,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "stats": self.stats.model_dump(mode="json"),
            "problems": [p.model_dump(mode="json") for p in self.problems],
            "problems_total": self.problems_total,
            "warnings": list(self.warnings),
            "report_key": self.report_key,
            "header": None if self.header is None else self.header.model_dump(mode="json"),
            "manifest_sha256": self.manifest_sha256,
            "complete": self.complete,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkResult:
        header = data.get("header")
        return cls(
            index=int(data["index"]),
            stats=VerificationStats.model_validate(data["stats"]),
            problems=tuple(Problem.model_validate(p) for p in data.get("problems", ())),
            problems_total=int(data.get("problems_total", 0)),
            warnings=tuple(str(w) for w in data.get("warnings", ())),
            report_key=data.get("report_key"),
            header=None if header is None else ManifestHeader.model_validate(header),
            manifest_sha256=data.get("manifest_sha256"),
            complete=bool(data.get("complete", True)),
        )


@dataclass
class Combined:
    """The chunks added up: the outcome, and the chunk reports to join into one."""

    outcome: VerificationOutcome
    report_keys: list[str] = field(default_factory=list)


def combine(results: list[ChunkResult], chunks: int, manifest_key: str) -> Combined:
    """One outcome from every chunk's (`chunks` of them, each once).

    A problem every chunk saw (the manifest's own, e.g. its header naming another
    bucket) is counted once; the manifest's object count is checked against the sum of
    the chunks' comparisons, which a chunk alone cannot do.
    """
    indexes = sorted(r.index for r in results)
    if indexes != list(range(chunks)):
        raise ValueError(f"chunk results {indexes} are not chunks 0..{chunks - 1}")
    ordered = sorted(results, key=lambda r: r.index)
    totals = {name: sum(getattr(r.stats, name) for r in ordered) for name in _SUMMED}
    stats = VerificationStats(
        **totals,
        duration_seconds=round(sum(r.stats.duration_seconds for r in ordered), 3),
    )
    seen: set[tuple[str, str, str]] = set()
    problems: list[Problem] = []
    total = 0
    for result in ordered:
        total += result.problems_total
        for problem in result.problems:
            fingerprint = (problem.key, problem.kind, problem.detail)
            if fingerprint in seen:
                total -= 1  # the same finding from another chunk
                continue
            seen.add(fingerprint)
            problems.append(problem)
    warnings = list(dict.fromkeys(w for r in ordered for w in r.warnings))
    header = next((r.header for r in ordered if r.header is not None), None)
    complete = all(r.complete for r in ordered)
    if header is not None and complete and stats.compared != header.objects:
        problems.append(
            Problem(
                key=manifest_key,
                kind="manifest",
                detail=f"manifest header promises {header.objects} objects, lists {stats.compared}",
            )
        )
        total += 1
    problems.sort(key=lambda p: (p.key, p.kind))
    outcome = VerificationOutcome(
        header=header,
        manifest_sha256=next((r.manifest_sha256 for r in ordered if r.manifest_sha256), None),
        stats=stats,
        problems=problems[:MAX_LISTED_PROBLEMS],
        problems_total=total,
        warnings=warnings[:MAX_LISTED_PROBLEMS],
        complete=complete,
    )
    return Combined(outcome, [r.report_key for r in ordered if r.report_key])

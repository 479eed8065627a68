"""An in-memory `FanoutStore` for tests, with the DynamoDB store's rules (first write
wins, a chunk counts once); `tests/unit/test_fanout.py` holds both to them."""

from __future__ import annotations

import copy
import threading
from typing import Any


class InMemoryFanoutStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.chunks: dict[str, dict[int, dict[str, Any]]] = {}
        self.claims: dict[str, str] = {}

    def create_job(self, job_id: str, data: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if job_id not in self.jobs:
                self.jobs[job_id] = {
                    **copy.deepcopy(data),
                    "done": [],
                    "dispatched": False,
                    "result": None,
                    "published": False,
                }
            return copy.deepcopy(self.jobs[job_id])

    def load_job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self.jobs.get(job_id)
            return None if job is None else copy.deepcopy(job)

    def mark_dispatched(self, job_id: str) -> None:
        with self._lock:
            self.jobs[job_id]["dispatched"] = True

    def complete_chunk(self, job_id: str, index: int, result: dict[str, Any]) -> int:
        with self._lock:
            self.chunks.setdefault(job_id, {}).setdefault(index, copy.deepcopy(result))
            done = self.jobs[job_id]["done"]
            if index not in done:
                done.append(index)
                done.sort()
            return len(done)

    def chunk_results(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            stored = self.chunks.get(job_id, {})
            return [copy.deepcopy(stored[i]) for i in sorted(stored)]

    def save_result(self, job_id: str, result: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            job = self.jobs[job_id]
            if job["result"] is None:
                job["result"] = copy.deepcopy(result)
            return copy.deepcopy(job["result"])

    def claim_publication(self, job_id: str, claimer: str) -> bool:
        with self._lock:
            return self.claims.setdefault(job_id, claimer) == claimer

    def mark_published(self, job_id: str) -> None:
        with self._lock:
            self.jobs[job_id]["published"] = True

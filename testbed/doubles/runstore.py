"""An in-memory `RunStore` for tests and the verification simulator (kept out of the
installed wheel).

It applies the same validation and the same rules (idempotent record, verified-only and
never-regressing latest pointer, first-record-only counter) as the SQLite and DynamoDB
stores, and the shared contract suite holds it to that, so logic tested against the fake
behaves the same against the real thing.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cloud.integrations.runstore_codec import as_utc, is_verification, is_verified, normalize
from cloud.logic.ports import RepoStatus, RunRecord


@dataclass
class _Repo:
    repo_id: str | None = None
    latest_run_id: str | None = None
    verifications: int = 0
    stale_alerted_at: datetime | None = None
    runs: dict[str, RunRecord] = field(default_factory=dict)


def _copy(run: RunRecord) -> RunRecord:
    """Callers get their own detail dict, so mutating a result cannot change the store."""
    return replace(run, detail=copy.deepcopy(run.detail))


class InMemoryRunStore:
    """Thread-safe, because the verifier and uploader logic under test use threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._checkpoints: dict[tuple[str, str], dict[str, Any]] = {}
        self._bindings: dict[str, dict[str, Any]] = {}

    def load_binding(self, repo_key: str) -> dict[str, Any] | None:
        with self._lock:
            data = self._bindings.get(repo_key)
            return None if data is None else copy.deepcopy(data)

    def bind(self, repo_key: str, data: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._bindings.setdefault(repo_key, copy.deepcopy(data)))

    def unbind(self, repo_key: str) -> bool:
        with self._lock:
            return self._bindings.pop(repo_key, None) is not None

    def load_checkpoint(self, repo_key: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            data = self._checkpoints.get((repo_key, name))
            return None if data is None else copy.deepcopy(data)

    def save_checkpoint(self, repo_key: str, name: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._checkpoints[(repo_key, name)] = copy.deepcopy(data)

    def record(self, run: RunRecord) -> None:
        run = normalize(run)
        with self._lock:
            repo = self._repos.setdefault(run.repo_key, _Repo())
            if run.run_id in repo.runs:
                return  # duplicate delivery: the first record wins
            repo.runs[run.run_id] = run
            if is_verification(run):
                repo.verifications += 1
            newest = repo.latest_run_id is None or repo.latest_run_id < run.run_id
            if newest:
                repo.latest_run_id = run.run_id
            if run.repo_id is not None and (newest or repo.repo_id is None):
                repo.repo_id = run.repo_id

    def get(self, repo_key: str, run_id: str) -> RunRecord | None:
        with self._lock:
            repo = self._repos.get(repo_key)
            run = None if repo is None else repo.runs.get(run_id)
            return None if run is None else _copy(run)

    def runs(self, repo_key: str, limit: int = 50) -> list[RunRecord]:
        if limit <= 0:
            return []
        with self._lock:
            repo = self._repos.get(repo_key)
            if repo is None:
                return []
            ids = sorted(repo.runs, reverse=True)[:limit]
            return [_copy(repo.runs[i]) for i in ids]

    def latest_verified(self, repo_key: str) -> RunRecord | None:
        with self._lock:
            repo = self._repos.get(repo_key)
            return None if repo is None else self._latest_verified(repo)

    def verification_count(self, repo_key: str) -> int:
        with self._lock:
            repo = self._repos.get(repo_key)
            return 0 if repo is None else repo.verifications

    def repos(self) -> Iterator[RepoStatus]:
        """A snapshot taken under the lock, so iterating never races a concurrent record."""
        with self._lock:
            statuses = [
                RepoStatus(
                    repo_key=key,
                    repo_id=repo.repo_id,
                    latest_run=(
                        _copy(repo.runs[repo.latest_run_id])
                        if repo.latest_run_id is not None
                        else None
                    ),
                    latest_verified=self._latest_verified(repo),
                    verifications=repo.verifications,
                    stale_alerted_at=repo.stale_alerted_at,
                )
                for key, repo in sorted(self._repos.items())
            ]
        return iter(statuses)

    def mark_stale_alerted(self, repo_key: str, at: datetime | None) -> None:
        """Creates the repository entry if needed, like the SQLite and DynamoDB stores."""
        value = None if at is None else as_utc(at, "stale_alerted_at")
        with self._lock:
            self._repos.setdefault(repo_key, _Repo()).stale_alerted_at = value

    @staticmethod
    def _latest_verified(repo: _Repo) -> RunRecord | None:
        verified = [r for r in repo.runs.values() if is_verified(r)]
        if not verified:
            return None
        return _copy(max(verified, key=lambda r: r.run_id))

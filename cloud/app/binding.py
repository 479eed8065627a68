"""The first step of verifying any `Mirror Completed`: is its repository bound elsewhere?

One call before anything is read: a refused event is recorded as a failed verification
(`binding` problem) and returned for the shell to publish — the notifier alerts — and
nothing is read from the destination it names, no checkpoint is touched, and the
repository's latest verified run (the watchdog's clock) stays what it was. The binding
itself is written by `record_verification` on a verified run. Rules: `cloud.logic.binding`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cloud.contracts.events import MirrorCompleted, MirrorVerificationFailed
from cloud.logic.binding import Binding, decide
from cloud.logic.ports import RunStore
from cloud.logic.verification import record_verification, refused_event


def check_binding(
    event: MirrorCompleted,
    runs: RunStore,
    *,
    host: str | None = None,
    now: datetime | None = None,
) -> MirrorVerificationFailed | None:
    """None: verify the event. Otherwise the recorded refusal, to publish instead."""
    decision = decide(Binding.from_dict(runs.load_binding(event.repo.key)), event)
    if not decision.refused:
        return None
    result = refused_event(event, decision.reason, started_at=now or datetime.now(UTC), host=host)
    record_verification(runs, result)
    return result

"""The verify function's fan-out step: a `Mirror Completed` above the threshold is split
into chunks queued for the chunk function (`cloud.handlers.verify_chunk`) instead of
being verified in one invocation. Kept apart from `verify.py`: the verifier calls it,
and it is off unless `CHUNK_QUEUE_URL` is set. Design: docs/verification.md ("Fan-out").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cloud.app.fanout import FanoutPlan, fan_out
from cloud.contracts.events import MirrorCompleted
from cloud.contracts.fanout import ChunkWorkItem
from cloud.handlers.common import env_int, require_env
from cloud.integrations.chunk_queue import SqsChunkQueue
from cloud.integrations.fanout_dynamodb import DynamoFanoutStore
from cloud.logic.chunks import FanoutSettings
from cloud.logic.ports import FanoutStore, ObjectStore, RunStore
from cloud.logic.verify import VerifyOptions

if TYPE_CHECKING:
    from types_boto3_dynamodb import DynamoDBClient


class ChunkQueue(Protocol):
    def send(self, items: Sequence[ChunkWorkItem]) -> None: ...


@dataclass
class FanoutDispatch:
    """Plans and queues the chunks of one large verification (`cloud.app.fanout`)."""

    jobs: FanoutStore
    queue: ChunkQueue
    settings: FanoutSettings

    def __call__(
        self, event: MirrorCompleted, *, store: ObjectStore, runs: RunStore, options: VerifyOptions
    ) -> FanoutPlan | None:
        """The plan when the verification was fanned out; None: verify in one pass."""
        return fan_out(
            event,
            store=store,
            runs=runs,
            jobs=self.jobs,
            send=self.queue.send,
            settings=self.settings,
            options=options,
        )


def settings_from_env() -> FanoutSettings:
    default = FanoutSettings()
    return FanoutSettings(
        min_objects=env_int("FANOUT_MIN_OBJECTS", default.min_objects, minimum=1)
        or default.min_objects,
        min_read_bytes=env_int("FANOUT_MIN_READ_BYTES", default.min_read_bytes, minimum=1)
        or default.min_read_bytes,
        chunk_bytes=env_int("FANOUT_CHUNK_BYTES", default.chunk_bytes, minimum=1)
        or default.chunk_bytes,
    )


def fanout_from_env(dynamodb: DynamoDBClient) -> FanoutDispatch | None:
    """The production wiring; None (never fan out) without `CHUNK_QUEUE_URL`."""
    queue_url = os.environ.get("CHUNK_QUEUE_URL", "").strip()
    if not queue_url:
        return None
    return FanoutDispatch(
        jobs=DynamoFanoutStore(require_env("RUNS_TABLE"), client=dynamodb),
        queue=SqsChunkQueue(queue_url),
        settings=settings_from_env(),
    )

"""The fan-out's work item: one message on the chunk queue per chunk of a verification.

Internal to the cloud side (the verify function sends it, the chunk function consumes
it), but it crosses a process boundary, so it is a versioned model like the events. It
names the job and the chunk only: what to verify (the event, the chunk's key range) is in
the job, which the run store keeps (docs/verification.md, "Fan-out").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ChunkWorkItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["backrest-relay-chunk"] = "backrest-relay-chunk"
    schema_version: Literal[1] = 1
    job_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    index: int = Field(ge=0)
    chunks: int = Field(ge=1)

"""Feeding the Lambda handlers the way AWS does: a context, EventBridge envelopes inside SQS
records, and a mirror (objects plus manifest) for the verifier to prove."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cloud.contracts.destination import Destination
from cloud.contracts.events import EventDetail, ManifestRef, MirrorCompleted, MirrorStats, RepoRef
from cloud.contracts.manifest import ManifestHeader, manifest_key

REGION = "us-east-1"


@dataclass
class Context:
    """What Lambda passes as `context` (the parts powertools reads)."""

    function_name: str = "reliability"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:reliability"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/aws/lambda/reliability"
    log_stream_name: str = "2026/11/26/[$LATEST]abc"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


def envelope(source: str, detail_type: str, detail: Any) -> dict[str, Any]:
    """An EventBridge event as a rule delivers it to an SQS target."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": source,
        "account": "123456789012",
        "time": "2026-11-26T12:00:00Z",
        "region": REGION,
        "resources": [],
        "detail": detail,
    }


def event_body(event: EventDetail) -> str:
    """The SQS body carrying `event`."""
    detail = json.loads(event.model_dump_json())
    return json.dumps(envelope(event.SOURCE.value, event.DETAIL_TYPE.value, detail))


def sqs_record(body: str, message_id: str) -> dict[str, Any]:
    return {
        "messageId": message_id,
        "receiptHandle": "AQEB" + uuid.uuid4().hex,
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": "1767268800000",
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": "1767268800001",
        },
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(body.encode(errors="replace"), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{REGION}:123456789012:reliability",
        "awsRegion": REGION,
    }


def sqs_event(bodies: list[str], prefix: str = "m") -> dict[str, Any]:
    """A batch with message ids `m-0`, `m-1`..."""
    return {"Records": [sqs_record(body, f"{prefix}-{i}") for i, body in enumerate(bodies)]}


def write_mirror(
    put: Callable[[str, bytes], object], destination: Destination, *, seed: int, objects: int = 6
) -> tuple[MirrorCompleted, list[str]]:
    """A restic-like mirror and its manifest, written through `put(key, bytes)`; returns
    the `Mirror Completed` event announcing it and the objects' full keys."""
    rng = random.Random(seed)
    run_id = str(uuid.uuid4())
    files: list[tuple[str, bytes]] = [("config", rng.randbytes(155))]
    for _ in range(objects):
        data = rng.randbytes(rng.randint(10, 4000))
        sha = hashlib.sha256(data).hexdigest()
        files.append((f"data/{sha[:2]}/{sha}", data))
    snapshot = rng.randbytes(200)
    files.append((f"snapshots/{hashlib.sha256(snapshot).hexdigest()}", snapshot))
    files.sort()
    keys, lines = [], []
    for key, data in files:
        put(destination.key(key), data)
        keys.append(destination.key(key))
        entry = {
            "key": key,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
            "uploaded": True,
        }
        lines.append(json.dumps(entry))
    now = datetime.now(UTC)
    header = ManifestHeader(
        run_id=run_id,
        repo_guid=None,
        repo_id="home",
        bucket=destination.bucket,
        prefix=destination.prefix,
        created_at=now,
        objects=len(files),
    )
    body = gzip.compress(("\n".join([header.model_dump_json(), *lines]) + "\n").encode(), mtime=0)
    mkey = manifest_key(".backrest-relay/home/manifests", run_id)
    put(mkey, body)
    event = MirrorCompleted(
        run_id=run_id,
        repo=RepoRef(id="home", path="/srv/restic/home"),
        host="nas",
        trigger="CONDITION_CHECK_SUCCESS",
        destination=destination,
        started_at=now - timedelta(minutes=2),
        finished_at=now - timedelta(minutes=1),
        stats=MirrorStats(files=len(files), uploaded_files=len(files)),
        manifest=ManifestRef(
            key=mkey,
            sha256=hashlib.sha256(body).hexdigest(),
            objects=len(files),
            created_by_run=run_id,
        ),
    )
    return event, keys

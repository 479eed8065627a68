"""`python -m bench.verify_sim`: the Lambda verifier's own code on a simulated B2, at scale.

What runs is the real thing: the verify function's SQS batch shell
(`cloud.handlers.verify.batch`: parse, idempotency, fan-out decision, `verify_leg`,
continuation, publish) and the chunk function's (`cloud.handlers.verify_chunk.batch`),
with the production defaults (`VerifyNewBytesBudget` 100 GiB, 8 reads in flight, 120 s
safety margin, fan-out thresholds, `FanoutConcurrency` 4). What is simulated is the world
around them:

* **the bucket** (`SimBucket`, an `ObjectStore`): a restic-like mirror of N packs of
  `--pack-size` (restic's default 16 MiB) plus its real gzip manifest. The packs' bodies
  are *not* materialised: each is 8 real bytes whose SHA-256 is its name, handed to the
  verifier as one chunk whose `len()` reports the modelled size. The verifier's read path
  is unchanged — the stream loop, `sha256.update`, the size check and the name check all
  run — but the hash covers 8 bytes, not 16 MiB (hashing 10 TB would take hours here).
  Sizes in the listing, the manifest and the event are the modelled ones, so every
  decision the code takes by bytes (budget, fan-out thresholds, chunk planning, progress
  saves) is the one it would take on the real mirror;
* **time** (`Timeline`, one per invocation): a GET costs first-byte latency plus its
  size over the per-stream rate (the invocation's network cap shared by its reads in
  flight), plus a per-GET CPU cost; reads run on as many lanes as the verifier has reads
  in flight; a list page costs its latency on the verifier's main thread, which also
  waits for a free lane before the next read. The Lambda context's remaining time follows
  this clock (900 s budget), so the legs stop where they would; an invocation that would
  go past its timeout is killed (its record fails, SQS redelivers it after the visibility
  timeout, five receives then the DLQ), as Lambda would;
* **the queues** (an in-process loop): the agent's event, the continuation messages and
  the chunk work items are delivered as SQS records, each function at most its
  `MaximumConcurrency` invocations at once (verify 2, chunks `FanoutConcurrency` 4);
* **the stores**: the in-memory run store, fan-out store and idempotency layer
  (`testbed/doubles`), which follow the DynamoDB stores' rules; they cost no time.

The B2 figures are assumptions, stated in the output (`B2Model`, `Prices`); the prices
are those of docs/verification.md ("Sizing"). The CPU of the verifier's own work (the
manifest parsed per leg and per chunk, the listing) is not on the simulated clock beyond
the per-GET figure; the real CPU time the simulation took is reported beside it.
"""

from __future__ import annotations

import os

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")
os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "backrest-relay-sim")

import argparse
import bisect
import gzip
import hashlib
import heapq
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cloud.contracts.destination import Destination
from cloud.contracts.events import (
    EventDetail,
    ManifestRef,
    MirrorCompleted,
    MirrorStats,
    MirrorVerified,
    RepoRef,
)
from cloud.contracts.fanout import ChunkWorkItem
from cloud.contracts.ids import new_run_id
from cloud.contracts.manifest import ManifestHeader, manifest_key
from cloud.handlers import verify as verify_handler
from cloud.handlers import verify_chunk as chunk_handler
from cloud.handlers.fanout import FanoutDispatch
from cloud.integrations.continuations import LEG_ATTRIBUTE
from cloud.logic.chunks import FanoutSettings
from cloud.logic.ports import ListedObject, ObjectNotFoundError
from cloud.logic.verify import VerifyOptions
from testbed.doubles.fanout import InMemoryFanoutStore
from testbed.doubles.idempotency import InMemoryPersistenceLayer
from testbed.doubles.runstore import InMemoryRunStore
from testbed.lambda_events import FakeLambdaContext, event_body, sqs_record

MiB = 1024**2
GiB = 1024**3
GB = 10**9
TB = 10**12

VERIFY = "verify"
CHUNK = "chunk"


@dataclass(frozen=True)
class B2Model:
    """How long B2 takes, as seen from a Lambda function (assumptions, stated in the output).

    Backblaze quotes 25–50 MiB/s for one download stream (kothar.net, "Backblaze B2
    Performance Part 2", reporting Backblaze's own figure) and says throughput scales with
    threads; the Lambda side (1 GB memory) is taken to take in ~100 MB/s in all, the
    figure docs/verification.md sizes with. First-byte latency 150 ms (B2 ~100–200 ms);
    a list page of 1,000 keys 300 ms. 4 ms of CPU per GET (issue 17: a read-back through
    boto3 costs ~4 ms CPU per object).
    """

    first_byte_s: float = 0.150
    stream_bytes_s: float = 25 * MiB
    invocation_bytes_s: float = 100e6
    list_page_s: float = 0.300
    list_page_keys: int = 1000
    cpu_per_get_s: float = 0.004
    start_s: float = 0.5  # an invocation's start (warm) and the event source's poll

    def get_seconds(self, size: int, in_flight: int) -> float:
        rate = min(self.stream_bytes_s, self.invocation_bytes_s / max(in_flight, 1))
        return self.first_byte_s + size / rate + self.cpu_per_get_s


@dataclass(frozen=True)
class Prices:
    """docs/verification.md ("Sizing"): B2 class B $0.004 per 10,000 beyond 2,500 a day,
    class C $0.004 per 1,000 beyond 2,500 a day, download $0.01/GB beyond the allowance
    (free up to 3x the stored data a month — then $0 — or, as the stored Backblaze pages
    say, 1 GB a day: both shown), Lambda $0.0000166667 per GB-s and $0.20 per million
    requests (assumed x86 on-demand prices)."""

    class_b_per_call: float = 0.004 / 10_000
    class_c_per_call: float = 0.004 / 1_000
    free_calls_per_day: int = 2_500
    download_per_gb: float = 0.01
    free_download_gb_per_day: float = 1.0
    lambda_gb_s: float = 0.0000166667
    lambda_request: float = 0.20 / 1_000_000
    memory_gb: float = 1.0


# -- time --------------------------------------------------------------------------------


class LambdaTimeoutError(Exception):
    """The simulated invocation ran past its timeout: Lambda would have killed it here."""


class Timeline:
    """One invocation's simulated clock: the main thread's time and one lane per read in
    flight (thread-safe: the verifier reads on a thread pool)."""

    def __init__(self, start: float, lanes: int, timeout_s: float, model: B2Model) -> None:
        self.start = start
        self.deadline = start + timeout_s
        self.model = model
        self.main = start
        self.lanes = [start] * max(lanes, 1)
        self.killed = False
        self._lock = threading.Lock()

    def remaining_s(self) -> float:
        with self._lock:
            return self.deadline - self.main

    def on_main(self, seconds: float) -> None:
        """A request the main thread waits for (the manifest, a list page)."""
        with self._lock:
            self._check(self.main)
            self.main += seconds

    def on_lane(self, size: int) -> None:
        """A GET on a worker: it starts when a lane is free, and the main thread cannot
        start another read before some lane is free again."""
        with self._lock:
            i = min(range(len(self.lanes)), key=self.lanes.__getitem__)
            begin = max(self.lanes[i], self.main)
            self._check(begin)
            self.lanes[i] = begin + self.model.get_seconds(size, len(self.lanes))
            self.main = max(self.main, min(self.lanes))

    def _check(self, at: float) -> None:
        if at >= self.deadline:
            self.killed = True
            raise LambdaTimeoutError(f"simulated invocation passed its timeout at {at:.0f} s")

    @property
    def end(self) -> float:
        with self._lock:
            if self.killed:
                return self.deadline
            return max(self.main, *self.lanes)


# -- the bucket ----------------------------------------------------------------------------


class _Sized(bytes):
    """A pack's stand-in bytes that count as the pack's modelled size (see the module's
    docstring): `sha256.update` hashes the real bytes, `len()` gives the model's."""

    size: int

    def __new__(cls, data: bytes, size: int) -> _Sized:
        made = super().__new__(cls, data)
        made.size = size
        return made

    def __len__(self) -> int:
        return self.size


@dataclass
class Traffic:
    gets: int = 0
    get_bytes: int = 0
    object_reads: Counter[str] = field(default_factory=Counter)
    list_calls: int = 0


class SimBucket:
    """An in-memory bucket (fills `ObjectStore` and `ReportSink`) whose requests cost
    simulated time on the current invocation's `Timeline`."""

    def __init__(self, model: B2Model) -> None:
        self.model = model
        self.bodies: dict[str, bytes] = {}
        self.sizes: dict[str, int] = {}
        self.etags: dict[str, str] = {}
        self._keys: list[str] | None = None
        self.traffic = Traffic()
        self.timeline: Timeline | None = None
        self.repo_prefix = ""
        self._lock = threading.Lock()

    def put_object(self, key: str, body: bytes, size: int | None = None) -> None:
        self.bodies[key] = body
        self.sizes[key] = len(body) if size is None else size
        self.etags[key] = hashlib.md5(body, usedforsecurity=False).hexdigest()
        self._keys = None

    def put(self, key: str, data: bytes) -> str | None:
        """`ReportSink`: problem reports land in the bucket (costs nothing here)."""
        self.put_object(key, data)
        return key

    @property
    def list_requests(self) -> int:
        return self.traffic.list_calls

    def _sorted(self) -> list[str]:
        if self._keys is None:
            self._keys = sorted(self.bodies)
        return self._keys

    def list(self, prefix: str) -> Iterator[ListedObject]:
        keys = self._sorted()
        at = bisect.bisect_left(keys, prefix)
        page = self.model.list_page_keys
        while True:
            batch = keys[at : at + page]
            batch = [k for k in batch if k.startswith(prefix)]
            with self._lock:
                self.traffic.list_calls += 1
            if self.timeline is not None:
                self.timeline.on_main(self.model.list_page_s)
            for key in batch:
                yield ListedObject(key, self.sizes[key], self.etags[key])
            at += page
            if len(batch) < page or at >= len(keys) or not keys[at].startswith(prefix):
                return  # S3 says so on the last page (IsTruncated false)

    def read(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        body = self.bodies.get(key)
        if body is None:
            raise ObjectNotFoundError(key)
        size = self.sizes[key]
        timeline = self.timeline
        if timeline is not None:
            if threading.current_thread() is threading.main_thread():
                timeline.on_main(self.model.get_seconds(size, 1))
            else:
                timeline.on_lane(size)
        with self._lock:
            self.traffic.gets += 1
            self.traffic.get_bytes += size
            if key.startswith(self.repo_prefix):
                self.traffic.object_reads[key] += 1
        yield body if size == len(body) else _Sized(body, size)


# -- the mirror ----------------------------------------------------------------------------

DESTINATION = Destination(provider="b2", endpoint_url=None, bucket="offsite", prefix="restic/sim")
GUID = "5e" * 32


def build_mirror(bucket: SimBucket, total_bytes: int, pack_bytes: int) -> MirrorCompleted:
    """A first mirror of `total_bytes` in packs of `pack_bytes` (all uploaded by the run)
    plus `config` and a snapshot, its real manifest, and the event announcing it."""
    packs = max(1, math.ceil(total_bytes / pack_bytes))
    bucket.repo_prefix = DESTINATION.key("")
    files: list[tuple[str, bytes, int]] = [("config", b"restic config (simulated)", 0)]
    for i in range(packs):
        body = i.to_bytes(8, "big")
        sha = hashlib.sha256(body).hexdigest()
        files.append((f"data/{sha[:2]}/{sha}", body, pack_bytes))
    snapshot = b"snapshot (simulated)"
    files.append((f"snapshots/{hashlib.sha256(snapshot).hexdigest()}", snapshot, 0))
    files.sort()
    run_id = new_run_id()
    now = datetime.now(UTC)
    header = ManifestHeader(
        run_id=run_id,
        repo_guid=GUID,
        repo_id="sim",
        bucket=DESTINATION.bucket,
        prefix=DESTINATION.prefix,
        created_at=now,
        objects=len(files),
    )
    lines = [header.model_dump_json()]
    total = 0
    for key, body, size in files:
        size = size or len(body)
        total += size
        bucket.put_object(DESTINATION.key(key), body, size)
        lines.append(
            json.dumps(
                {
                    "key": key,
                    "size": size,
                    "sha256": hashlib.sha256(body).hexdigest(),
                    "md5": hashlib.md5(body, usedforsecurity=False).hexdigest(),
                    "uploaded": True,
                }
            )
        )
    manifest = gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=6, mtime=0)
    mkey = manifest_key(f".backrest-relay/{GUID}/manifests", run_id)
    bucket.put_object(mkey, manifest)
    return MirrorCompleted(
        run_id=run_id,
        repo=RepoRef(id="sim", guid=GUID, path="/srv/restic/sim"),
        host="nas",
        trigger="CONDITION_CHECK_SUCCESS",
        destination=DESTINATION,
        started_at=now - timedelta(hours=1),
        finished_at=now - timedelta(minutes=1),
        stats=MirrorStats(
            files=len(files), bytes=total, uploaded_files=len(files), uploaded_bytes=total
        ),
        manifest=ManifestRef(
            key=mkey,
            sha256=hashlib.sha256(manifest).hexdigest(),
            objects=len(files),
            created_by_run=run_id,
        ),
    )


# -- SQS and Lambda ------------------------------------------------------------------------


@dataclass(order=True)
class Message:
    available: float
    seq: int
    queue: str = field(compare=False)
    body: str = field(compare=False)
    attributes: dict[str, str] = field(compare=False, default_factory=dict)
    receives: int = field(compare=False, default=0)

    def record(self) -> dict[str, Any]:
        return sqs_record(
            self.body, f"m-{self.seq}", self.receives, queue=self.queue, attributes=self.attributes
        )


@dataclass
class Invocation:
    function: str
    start: float
    end: float
    failed: bool
    killed: bool


@dataclass
class Published:
    at: float
    event: EventDetail


class SimCloud:
    """The queues, the functions' concurrency and the stores around the two shells."""

    VISIBILITY_TIMEOUT_S = 5400.0  # both queues (infra/template.yaml)
    MAX_RECEIVES = 5
    TIMEOUT_S = 900.0

    def __init__(
        self,
        bucket: SimBucket,
        *,
        fan_out: bool,
        fanout_concurrency: int = 4,
        verify_concurrency: int = 2,
        timeout_s: float = TIMEOUT_S,
        safety_margin_s: float = 120.0,
        options: VerifyOptions | None = None,
        settings: FanoutSettings | None = None,
    ) -> None:
        self.bucket = bucket
        self.timeout_s = timeout_s
        self.runs = InMemoryRunStore()
        self.jobs = InMemoryFanoutStore()
        self.published: list[Published] = []
        self.invocations: list[Invocation] = []
        self.dead_letters: list[Message] = []
        self._queue: list[Message] = []
        self._seq = 0
        self._timeline: Timeline | None = None
        self.slots = {VERIFY: [0.0] * verify_concurrency, CHUNK: [0.0] * fanout_concurrency}
        verify_options = options or VerifyOptions(
            new_bytes_budget=verify_handler.DEFAULT_NEW_BYTES_BUDGET, concurrency=8
        )
        self.concurrency = verify_options.concurrency
        verify_handler.set_dependencies(
            verify_handler.Dependencies(
                runs=self.runs,
                destinations=lambda destination: (bucket, bucket),
                events=self,
                persistence=InMemoryPersistenceLayer,
                continuations=_Continuations(self),
                options=verify_options,
                host="lambda:sim-verify",
                safety_margin_ms=int(safety_margin_s * 1000),
                fanout=(
                    FanoutDispatch(self.jobs, _ChunkQueue(self), settings or FanoutSettings())
                    if fan_out
                    else None
                ),
            )
        )
        chunk_handler.set_dependencies(
            chunk_handler.Dependencies(
                runs=self.runs,
                jobs=self.jobs,
                destinations=lambda destination: (bucket, bucket),
                events=self,
                options=VerifyOptions(concurrency=verify_options.concurrency),
                host="lambda:sim-chunk",
            )
        )

    # What the shells send to: the event bus (here), the continuation and chunk queues.

    def _now(self) -> float:
        return 0.0 if self._timeline is None else self._timeline.end

    def publish(self, *events: EventDetail) -> None:
        self.published.extend(Published(self._now(), e) for e in events)

    def send_leg(self, event: MirrorCompleted, leg: int) -> None:
        self.enqueue(VERIFY, event_body(event), {LEG_ATTRIBUTE: str(leg)})

    def send_chunks(self, items: Sequence[ChunkWorkItem]) -> None:
        for item in items:
            self.enqueue(CHUNK, item.model_dump_json())

    def enqueue(self, queue: str, body: str, attributes: dict[str, str] | None = None) -> None:
        self._seq += 1
        heapq.heappush(self._queue, Message(self._now(), self._seq, queue, body, attributes or {}))

    # The loop.

    def run(self, event: MirrorCompleted, limit: int = 100_000) -> None:
        """Deliver the agent's event, then every message the functions send, until the
        queues are empty."""
        self.enqueue(VERIFY, event_body(event))
        for _ in range(limit):
            if not self._queue:
                return
            self._invoke(heapq.heappop(self._queue))
        raise RuntimeError("the simulation did not settle")

    def _invoke(self, message: Message) -> None:
        slots = self.slots[message.queue]
        slot = min(range(len(slots)), key=slots.__getitem__)
        start = max(message.available, slots[slot]) + self.bucket.model.start_s
        timeline = Timeline(start, self.concurrency, self.timeout_s, self.bucket.model)
        self._timeline = self.bucket.timeline = timeline
        message.receives += 1
        shell: Callable[[dict[str, Any], Any], Any] = (
            verify_handler.batch if message.queue == VERIFY else chunk_handler.batch
        )
        name = "verify" if message.queue == VERIFY else "verify-chunk"
        try:
            response = shell(
                {"Records": [message.record()]},
                FakeLambdaContext(name, 1024, remaining=lambda: int(timeline.remaining_s() * 1000)),
            )
        finally:
            verify_handler.metrics.clear_metrics()
            chunk_handler.metrics.clear_metrics()
        failed = bool(response.get("batchItemFailures"))
        end = timeline.end
        slots[slot] = end
        self.invocations.append(Invocation(name, start, end, failed, timeline.killed))
        self._timeline = self.bucket.timeline = None
        if failed:
            if message.receives >= self.MAX_RECEIVES:
                self.dead_letters.append(message)
            else:
                message.available = end + self.VISIBILITY_TIMEOUT_S
                heapq.heappush(self._queue, message)


class _Continuations:
    """The verify queue, as the `ContinuationQueue` port."""

    def __init__(self, cloud: SimCloud) -> None:
        self.cloud = cloud

    def send(self, event: MirrorCompleted, leg: int) -> None:
        self.cloud.send_leg(event, leg)


class _ChunkQueue:
    """The chunk queue, as `cloud.handlers.fanout.ChunkQueue`."""

    def __init__(self, cloud: SimCloud) -> None:
        self.cloud = cloud

    def send(self, items: Sequence[ChunkWorkItem]) -> None:
        self.cloud.send_chunks(items)


def _quiet_shells() -> list[tuple[Any, Any]]:
    """Silence the shells' loggers; returns their levels, which `simulate` puts back (the
    loggers are the modules', shared with whatever runs next in the process: tests)."""
    levels = []
    for logger in (verify_handler.logger, chunk_handler.logger):
        levels.append((logger, logger.log_level))
        logger.setLevel(logging.CRITICAL)
    return levels


# -- one simulated verification, and its report ------------------------------------------


@dataclass
class SimResult:
    mode: str
    mirror_bytes: int
    pack_bytes: int
    objects: int
    wall_s: float
    invocations: int
    chunk_invocations: int
    killed: int
    dead_letters: int
    gets: int
    get_bytes: int
    object_reads: Counter[str]
    list_calls: int
    lambda_gb_s: float
    published: list[Published]
    real_s: float
    cpu_s: float
    prices: Prices

    @property
    def days(self) -> int:
        return max(1, math.ceil(self.wall_s / 86400))

    @property
    def class_b_cost(self) -> float:
        free = self.prices.free_calls_per_day * self.days
        return max(0, self.gets - free) * self.prices.class_b_per_call

    @property
    def class_c_cost(self) -> float:
        free = self.prices.free_calls_per_day * self.days
        return max(0, self.list_calls - free) * self.prices.class_c_per_call

    @property
    def download_cost(self) -> float:
        """Beyond 1 GB a day free (the conservative reading; under the 3x allowance: $0)."""
        free = self.prices.free_download_gb_per_day * self.days
        return max(0.0, self.get_bytes / GB - free) * self.prices.download_per_gb

    @property
    def lambda_cost(self) -> float:
        return (
            self.lambda_gb_s * self.prices.lambda_gb_s
            + self.invocations * self.prices.lambda_request
        )

    @property
    def cost(self) -> float:
        return self.class_b_cost + self.class_c_cost + self.download_cost + self.lambda_cost

    @property
    def verdict(self) -> str:
        if len(self.published) != 1:
            return f"{len(self.published)} results"
        event = self.published[0].event
        return "verified" if isinstance(event, MirrorVerified) else event.DETAIL_TYPE.value


def simulate(
    mirror_bytes: int,
    *,
    fan_out: bool,
    pack_bytes: int = 16 * MiB,
    model: B2Model | None = None,
    prices: Prices | None = None,
    timeout_s: float = SimCloud.TIMEOUT_S,
    safety_margin_s: float = 120.0,
    options: VerifyOptions | None = None,
    settings: FanoutSettings | None = None,
    fanout_concurrency: int = 4,
) -> SimResult:
    """Verify a first mirror of `mirror_bytes` through the Lambda shells on a simulated B2."""
    levels = _quiet_shells()
    real0, cpu0 = time.perf_counter(), time.process_time()
    bucket = SimBucket(model or B2Model())
    event = build_mirror(bucket, mirror_bytes, pack_bytes)
    cloud = SimCloud(
        bucket,
        fan_out=fan_out,
        timeout_s=timeout_s,
        safety_margin_s=safety_margin_s,
        options=options,
        settings=settings,
        fanout_concurrency=fanout_concurrency,
    )
    try:
        cloud.run(event)
    finally:
        verify_handler.set_dependencies(None)
        chunk_handler.set_dependencies(None)
        for logger, level in reversed(levels):  # the shells may share one logger
            logger.setLevel(level)
    runs = cloud.invocations
    return SimResult(
        mode="fan-out" if fan_out else "legs",
        mirror_bytes=mirror_bytes,
        pack_bytes=pack_bytes,
        objects=event.manifest.objects,
        wall_s=max((i.end for i in runs), default=0.0),
        invocations=len(runs),
        chunk_invocations=sum(1 for i in runs if i.function == "verify-chunk"),
        killed=sum(1 for i in runs if i.killed),
        dead_letters=len(cloud.dead_letters),
        gets=bucket.traffic.gets,
        get_bytes=bucket.traffic.get_bytes,
        object_reads=bucket.traffic.object_reads,
        list_calls=bucket.traffic.list_calls,
        lambda_gb_s=sum(i.end - i.start for i in runs) * (prices or Prices()).memory_gb,
        published=cloud.published,
        real_s=time.perf_counter() - real0,
        cpu_s=time.process_time() - cpu0,
        prices=prices or Prices(),
    )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _size(n: int) -> str:
    return f"{n / TB:g} TB" if n >= TB else f"{n / GB:g} GB"


def _pack(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def table(results: Sequence[SimResult]) -> str:
    """The Markdown table docs/verification.md shows."""
    rows = [
        "| mirror (objects × pack) | mode | simulated wall | invocations (chunks) | GB read "
        "| GETs | list calls | Lambda GB-s | cost: class B + C + download + Lambda "
        "| result | simulation real / CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        extra = []
        if r.killed:
            extra.append(f"{r.killed} killed at the timeout")
        if r.dead_letters:
            extra.append(f"{r.dead_letters} in the DLQ")
        invocations = f"{r.invocations} ({r.chunk_invocations})" + (
            f", {'; '.join(extra)}" if extra else ""
        )
        rows.append(
            f"| {_size(r.mirror_bytes)} ({r.objects:,} × {_pack(r.pack_bytes)}) | {r.mode} "
            f"| {_duration(r.wall_s)} "
            f"| {invocations} | {r.get_bytes / GB:,.1f} | {r.gets:,} | {r.list_calls:,} "
            f"| {r.lambda_gb_s:,.0f} | ${r.cost:.2f} = {r.class_b_cost:.2f} + "
            f"{r.class_c_cost:.2f} + {r.download_cost:.2f} + {r.lambda_cost:.2f} "
            f"| {r.verdict} | {r.real_s:.1f} s / {r.cpu_s:.1f} s |"
        )
    return "\n".join(rows)


def assumptions(model: B2Model, prices: Prices) -> str:
    return "\n".join(
        [
            "Assumptions (B2 seen from Lambda, 1 GB memory):",
            f"- GET: {model.first_byte_s * 1000:.0f} ms to first byte, then "
            f"min({model.stream_bytes_s / MiB:g} MiB/s per stream, "
            f"{model.invocation_bytes_s / 1e6:g} MB/s per invocation / reads in flight); "
            f"+{model.cpu_per_get_s * 1000:g} ms CPU per GET",
            f"- list page ({model.list_page_keys} keys): {model.list_page_s * 1000:.0f} ms; "
            f"invocation start {model.start_s:g} s",
            f"- prices: class B ${prices.class_b_per_call * 10_000:g}/10,000 and class C "
            f"${prices.class_c_per_call * 1000:g}/1,000 beyond {prices.free_calls_per_day:,} "
            f"a day; download ${prices.download_per_gb:g}/GB beyond "
            f"{prices.free_download_gb_per_day:g} GB a day ($0 under the 3x-stored "
            f"allowance); Lambda ${prices.lambda_gb_s:g}/GB-s + "
            f"${prices.lambda_request * 1e6:g}/million requests",
            "- packs are 8 real bytes each, read and hashed by the verifier, counted at the "
            "modelled pack size (bench/verify_sim.py explains why)",
        ]
    )


UNITS = {"GB": GB, "TB": TB, "MiB": MiB, "GiB": GiB}


def parse_bytes(text: str) -> int:
    """`100GB`, `10TB`, `16MiB`, `1GiB` or a plain number of bytes."""
    text = text.strip()
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text.removesuffix(unit)) * factor)
    return int(text)


@dataclass(frozen=True)
class Row:
    """One simulated verification: a mirror size, its pack size, a mode."""

    size: int
    pack: int
    fan_out: bool


def parse_rows(sizes: str, modes: str) -> list[Row]:
    """`SIZE[:PACK][/MODE]` items, comma-separated (`10TB:1GiB/legs`); a size without a
    mode runs in every mode of `modes`."""
    rows = []
    for item in sizes.split(","):
        spec, _, only = item.strip().partition("/")
        size, _, pack = spec.partition(":")
        for mode in [only] if only else modes.split(","):
            if mode.strip() not in ("legs", "fan-out"):
                raise SystemExit(f"unknown mode {mode!r}: legs or fan-out")
            rows.append(Row(parse_bytes(size), parse_bytes(pack or "16MiB"), mode == "fan-out"))
    return rows


# What docs/verification.md shows ("Simulated at scale"). Restic's 16 MiB packs up to
# 1 TB. 10 TB in 1 GiB packs (9,300 objects): without the budget its fan-out's 1,000
# chunks each parse the whole manifest, which at 16 MiB (600,000 lines) would take the
# simulation hours; the budgeted rows use the same mirror, to compare.
DEFAULT_ROWS = "100GB,1TB,10TB:1GiB"
FULL_ROWS = "10TB:1GiB/fan-out"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.verify_sim",
        description="The Lambda verifier's code on a simulated B2 (see the module docstring).",
    )
    parser.add_argument(
        "--scenario",
        choices=("default", "full", "both"),
        default="both",
        help="default: VerifyNewBytesBudget 100 GiB (the Lambda's default); full: no "
        "budget, every object read back; both (default)",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="SIZE[:PACK][/MODE],... e.g. 100GB,1TB:128MiB,10TB:1GiB/legs (pack 16MiB)",
    )
    parser.add_argument("--modes", default="legs,fan-out", help="legs, fan-out or both")
    args = parser.parse_args(argv)
    model, prices = B2Model(), Prices()
    scenarios = ("default", "full") if args.scenario == "both" else (args.scenario,)
    for scenario in scenarios:
        full = scenario == "full"
        options = VerifyOptions(
            new_bytes_budget=None if full else verify_handler.DEFAULT_NEW_BYTES_BUDGET,
            concurrency=8,
        )
        rows = parse_rows(args.sizes or (FULL_ROWS if full else DEFAULT_ROWS), args.modes)
        title = (
            "no budget: every object of a first mirror read back"
            if full
            else "the Lambda's defaults: VerifyNewBytesBudget 100 GiB"
        )
        print(f"## {title}", flush=True)
        results = []
        for row in rows:
            result = simulate(
                row.size,
                fan_out=row.fan_out,
                pack_bytes=row.pack,
                model=model,
                prices=prices,
                options=options,
            )
            print(table([result]).splitlines()[-1], flush=True)
            results.append(result)
        print()
        print(table(results))
        print()
    print(assumptions(model, prices))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

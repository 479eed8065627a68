"""6. Concurrency: two uploads of one repository to one destination at once never
interleave.

Each seeded trial starts a slow upload (bandwidth-limited, multipart packs) and, after a
random delay, a second upload of the same repository — by the same path, as ``local:``
URI, with a trailing slash, through a symbolic link, or without ``--repo-guid`` (a run by
hand beside Backrest's hook) — with a short ``lock_wait`` (the
second must give up with exit 5 and name the holder) or a long one (it waits, then finds
nothing to do). Whichever process takes the lock first uploads. The proxy's log,
attributed to each process by its User-Agent (``AWS_SDK_UA_APP_ID``), must show the two
processes' requests one after the other, never interleaved — and no request at all from
the waiting run when it shares the first one's state store (a run without
``--repo-guid`` has its own, so after waiting it reads the listing once and adopts what
the first uploaded). The mirror must end complete with no multipart upload left.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from testbed.agent import (
    AgentResult,
    agent_config_in,
    start_agent,
    unfinished_uploads,
    write_agent_config,
)
from testbed.repos import add_packs, make_fake_restic_repo
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.operations import RequestInfo
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server
from tests.reliability.common import (
    MULTIPART,
    Ledger,
    MiB,
    check_mirror,
    count,
    sub_seed,
)

REPO_ID = "twice"
GUID = "2a" * 32
PREFIX = f"restic/{REPO_ID}"
PAIRS = count("concurrency: pairs of uploads")


@dataclass
class Traffic:
    """Who sent what and when, from the proxy's point of view."""

    proxy: S3Proxy
    started: dict[int, tuple[str, str, float]] = field(default_factory=dict)  # seq → who, op, t
    ended: dict[int, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.proxy.fault = self.hook
        log = self.proxy._log

        def timed(entry: object) -> None:
            with self.lock:
                self.ended[entry.seq] = time.monotonic()  # type: ignore[attr-defined]
            log(entry)  # type: ignore[arg-type]

        self.proxy._log = timed  # type: ignore[method-assign]

    def reset(self) -> None:
        with self.lock:
            self.started.clear()
            self.ended.clear()

    def hook(self, info: RequestInfo) -> None:
        agent = info.headers.get("user-agent", "")
        who = next((w for w in ("run-a", "run-b") if f"app/{w}" in agent), "other")
        with self.lock:
            self.started[info.seq] = (who, info.operation, time.monotonic())

    def by_process(self) -> Counter[str]:
        with self.lock:
            return Counter(who for who, _, _ in self.started.values())

    def overlaps(self, *, writes_only: bool = True) -> list[str]:
        """Whether the two processes' activity (first to last request — only mutating ones
        with `writes_only` — each request from its arrival to its answer) overlaps in time."""
        with self.lock:
            windows: dict[str, tuple[float, float]] = {}
            for seq, (who, op, t) in self.started.items():
                if who == "other" or (writes_only and op.startswith(("Get", "Head", "List"))):
                    continue
                end = self.ended.get(seq, t)
                low, high = windows.get(who, (t, end))
                windows[who] = (min(low, t), max(high, end))
        if len(windows) < 2:
            return []
        (a_low, a_high), (b_low, b_high) = windows["run-a"], windows["run-b"]
        if a_low <= b_high and b_low <= a_high:
            return [f"run-a {a_low:.2f}-{a_high:.2f}s, run-b {b_low:.2f}-{b_high:.2f}s"]
        return []


def slow_repo(path: Path, seed: int) -> Path:
    repo = make_fake_restic_repo(path, packs=8, pack_size=(1000, 60_000), seed=seed)
    add_packs(repo, 2, 11 * MiB, seed=seed + 1)  # three parts each
    return repo.root


def communicate(proc: object) -> AgentResult:
    out, err = proc.communicate(timeout=300)  # type: ignore[attr-defined]
    return AgentResult(proc.returncode, out, err)  # type: ignore[attr-defined]


def upload(config: Path, repo: str, app: str, *, guid: bool = True) -> object:
    args = ["upload", "--repo", repo, "--repo-id", REPO_ID, "--config", str(config), "--json"]
    return start_agent(
        [*args, *(["--repo-guid", GUID] if guid else [])], env={"AWS_SDK_UA_APP_ID": app}
    )


def test_two_uploads_of_one_repository_never_interleave(
    rclone_server: RcloneS3Server,
    counting_proxy: S3Proxy,
    unique_bucket: Callable[[S3Endpoint], str],
    ledger: Ledger,
    tmp_path: Path,
) -> None:
    repo = slow_repo(tmp_path / "repo", seed=50)
    link = tmp_path / "link-to-repo"
    link.symlink_to(repo, target_is_directory=True)
    forms = {  # how the second run names the repository
        "same path": (str(repo), True),
        "local: URI": (f"local:{repo}", True),
        "trailing slash": (f"{repo}/", True),
        "symlinked path": (str(link), True),
        "no --repo-guid": (str(repo), False),  # a run by hand next to Backrest's hook
    }
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    traffic = Traffic(counting_proxy)
    for pair in range(PAIRS):
        rng = random.Random(sub_seed("concurrency", pair))
        wait = rng.choice(["1s", "60s"])
        form = rng.choice(sorted(forms))
        delay = round(rng.uniform(0.2, 2.5), 2)
        counting_proxy.reset()
        traffic.reset()
        bucket = unique_bucket(rclone_server.endpoint)
        config = write_agent_config(
            tmp_path / f"pair{pair}.toml",
            counting_proxy.endpoint,
            bucket,
            state_dir=tmp_path / f"pair{pair}" / "state",
            upload={**MULTIPART, "bandwidth_limit": "10MiB/s", "lock_wait": wait},
        )
        first = upload(config, str(repo), "run-a")
        time.sleep(delay)
        second = upload(config, forms[form][0], "run-b", guid=forms[form][1])
        a, b = communicate(first), communicate(second)
        exits = f"{a.returncode}/{b.returncode}"
        label = f"pair {pair} ({form}, lock_wait {wait}, +{delay}s): exits {exits}"
        outcomes[f"exits {exits}"] += 1
        outcomes[f"{form}, lock_wait {wait}"] += 1
        senders = {who for who, n in traffic.by_process().items() if n and who != "other"}
        problems = []
        if "Traceback" in a.stderr + b.stderr:
            problems.append("traceback")
        if sorted([a.returncode, b.returncode]) not in ([0, 5], [0, 0]):
            problems.append(f"{a.stderr[-600:]} {b.stderr[-600:]}")
        for result in (a, b):
            if result.returncode == 5 and "another backrest-relay upload" not in result.stderr:
                problems.append(f"exit 5 without naming the holder: {result.stderr}")
        # One run holds the lock while it talks to the bucket; the other sends nothing
        # until it has ended (a run without --repo-guid has its own state store, so after
        # waiting it reads the listing once and adopts what the first uploaded).
        if not senders or traffic.overlaps(writes_only=False):
            problems.append(f"requests from {sorted(senders)}: {traffic.overlaps()}")
        if len(senders) > 1 and forms[form][1]:
            problems.append("the waiting run, same state store, sent requests")
        if a.returncode == b.returncode == 0:
            idle = min(a.summary["uploaded_files"], b.summary["uploaded_files"])
            if idle != 0:
                problems.append("both runs uploaded files")
        mirror = check_mirror(repo, rclone_server.bucket_path(bucket), PREFIX)
        if mirror.lost or mirror.corrupt:
            problems.append(f"mirror incomplete: {mirror}")
        if unfinished_uploads(rclone_server.endpoint, bucket):
            problems.append("unfinished multipart uploads")
        if problems:
            failures.append(f"{label}: {problems}")
    counting_proxy.fault = None
    ledger.add(
        "concurrency",
        trials=PAIRS,
        faults=PAIRS,
        detected=PAIRS - len(failures),
        kinds=outcomes,
        note="by kind: the two runs' exit codes (first/second), and how the second named "
        f"the repository; interleavings: {len(failures)}",
    )
    assert not failures, "\n".join(failures)


def test_runs_with_and_without_guid_do_not_interleave(
    rclone_server: RcloneS3Server,
    counting_proxy: S3Proxy,
    rclone_bucket: str,
    tmp_path: Path,
) -> None:
    repo = slow_repo(tmp_path / "repo", seed=60)
    traffic = Traffic(counting_proxy)
    config = agent_config_in(
        tmp_path,
        counting_proxy.endpoint,
        rclone_bucket,
        upload={**MULTIPART, "bandwidth_limit": "10MiB/s", "lock_wait": "1s", "concurrency": 1},
    )
    hook = upload(config, str(repo), "run-a")  # as Backrest's hook runs it
    time.sleep(1.5)
    by_hand = upload(config, str(repo), "run-b", guid=False)  # `upload --repo PATH`
    a, b = communicate(hook), communicate(by_hand)
    counting_proxy.fault = None
    # The lock was keyed by --repo-guid (else the path): the second run aborted the first's
    # multipart upload as a stray (found by this suite, fixed in 80cbfda).
    assert traffic.overlaps() == []
    assert sorted([a.returncode, b.returncode]) in ([0, 5], [0, 0]), a.stderr + b.stderr

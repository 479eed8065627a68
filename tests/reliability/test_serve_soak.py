"""The `serve` sidecar under a storm of triggers: many repositories, callers that hang up.

Triggers go to ten repositories from eight threads at once; each caller either follows its
run to the end, hangs up at a random point (Backrest restarted, curl's time limit), or
asks for `wait=false`. Afterwards every run must have finished with exit 0 (no run lost),
no two runs of one repository may have waited at once (none duplicated: a trigger joins
the queued run; during a run it queues the next one, which mirrors what the run going did
not list), no two runs of one destination may have
overlapped, every mirror must equal its repository byte for byte, and the service's
memory must not grow with the number of triggers.
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.reliability.common import Ledger, check_mirror, count, sub_seed
from tests.support.agent import write_agent_config
from tests.support.relay_service import RelayService, add_serve_section, write_backrest_config
from tests.support.repos import make_fake_restic_repo
from tests.support.s3servers import RcloneS3Server

REPOSITORIES = 10
MiB = 1024 * 1024


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _overlaps(spans: list[tuple[float, float]]) -> int:
    spans = sorted(spans)
    return sum(1 for (_, end), (start, _) in itertools.pairwise(spans) if start < end)


def test_serve_storm_of_triggers_loses_and_duplicates_nothing(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path, ledger: Ledger
) -> None:
    triggers = count("serve: triggers over 10 repositories, random disconnects")
    rng = random.Random(sub_seed("serve-soak"))
    repos = {
        f"repo{i}": make_fake_restic_repo(
            tmp_path / "repos" / f"repo{i}", packs=3, pack_size=(20_000, 300_000), seed=i
        ).root
        for i in range(REPOSITORIES)
    }
    backrest = write_backrest_config(
        tmp_path / "backrest" / "config.json",
        [{"id": rid, "uri": str(path)} for rid, path in repos.items()],
    )
    config = write_agent_config(
        tmp_path / "relay.toml", rclone_server.endpoint, rclone_bucket, state_dir=tmp_path / "st"
    )
    add_serve_section(
        config,
        roots=[str(tmp_path / "repos")],
        backrest_config=str(backrest),
        max_parallel=4,
        max_queue=1000,
        keep_runs=10_000,
    )
    plan = [
        (
            rng.choice(sorted(repos)),
            rng.choice(["follow", "hang-up", "hang-up-at-once", "202"]),
            rng.random(),
        )
        for _ in range(triggers)
    ]
    with RelayService(config) as service:
        assert service.proc is not None
        pid = service.proc.pid

        def fire(step: tuple[str, str, float]) -> dict[str, Any]:
            repo_id, mode, fraction = step
            body = json.dumps({"repo_id": repo_id, "event": "CONDITION_CHECK_SUCCESS"}).encode()
            headers = {**service.headers(), "Content-Type": "application/json"}
            if mode == "202":
                resp = service.request("POST", "/v1/runs?wait=false", body, headers)
                assert resp.status == 202, resp.body
                return {"id": resp.json()["id"], "mode": mode, "exit": None}
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=600)
            conn.request("POST", "/v1/runs", body, headers)
            if mode == "hang-up-at-once":
                # the request is sent; hang up before reading anything
                assert conn.sock is not None
                conn.sock.shutdown(socket.SHUT_RDWR)
                conn.close()
                return {"id": None, "mode": mode, "exit": None}
            resp = conn.getresponse()
            run_id = resp.getheader("X-Run-Id")
            assert resp.status == 200 and run_id
            if mode == "hang-up":
                resp.read(int(fraction * 120))
                conn.close()
                return {"id": run_id, "mode": mode, "exit": None}
            lines = resp.read().decode().splitlines()
            conn.close()
            return {"id": run_id, "mode": mode, "exit": lines[-1]}

        rss: list[float] = []
        results: list[dict[str, Any]] = []
        chunk = max(triggers // 10, 1)
        with ThreadPoolExecutor(max_workers=8) as pool:
            for start in range(0, triggers, chunk):
                results += pool.map(fire, plan[start : start + chunk])
                rss.append(_rss_mib(pid))
        run_ids = {r["id"] for r in results if r["id"]}
        infos = {run_id: service.wait_done(run_id, timeout=900) for run_id in run_ids}
        # a caller that hung up before the answer never learned its run's id: wait for idle
        deadline = time.monotonic() + 900
        while (health := service.request("GET", "/healthz").json())["in_progress"] or health[
            "queue_depth"
        ]:
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        metrics = service.metrics()
        rss.append(_rss_mib(pid))

    lost = [i for i, info in infos.items() if info["exit_code"] != 0]
    followed_bad = [
        r for r in results if r["mode"] == "follow" and r["exit"] != "backrest-relay: exit 0"
    ]
    by_repo: dict[str, list[tuple[float, float]]] = {}  # how long each run waited
    for info in infos.values():
        by_repo.setdefault(info["repo"]["id"], []).append((info["created_at"], info["started_at"]))
    duplicated = sum(_overlaps(spans) for spans in by_repo.values())
    started = {
        rid: [(i["started_at"], i["finished_at"]) for i in infos.values() if i["repo"]["id"] == rid]
        for rid in by_repo
    }
    same_destination = sum(_overlaps(spans) for spans in started.values())
    mirrors = {
        rid: check_mirror(path, rclone_server.bucket_path(rclone_bucket), f"restic/{rid}")
        for rid, path in repos.items()
    }
    files_lost = sum(m.lost for m in mirrors.values())
    outcomes = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("backrest_relay_runs_total{")
    }
    runs_total = sum(outcomes.values())
    joined = sum(1 for r in results if r["id"]) - len(run_ids)
    modes = Counter(r["mode"] for r in results)
    warm = rss[min(2, len(rss) - 1)]
    ledger.add(
        "serve sidecar",
        trials=triggers,
        faults=modes["hang-up"] + modes["hang-up-at-once"],
        detected=triggers - len(lost) - len(followed_bad),
        lost=len(lost) + duplicated + files_lost,
        kinds=modes,
        note=(
            f"{triggers} triggers over {REPOSITORIES} repositories made {int(runs_total)} runs "
            f"({joined}+ triggers joined a queued run); runs lost "
            f"{len(lost)}, duplicated {duplicated}, destination overlaps {same_destination}, "
            f"files missing from mirrors {files_lost}; service RSS "
            + " → ".join(f"{v:.0f}" for v in rss)
            + " MiB (after each tenth of the triggers)"
        ),
    )
    assert not lost, lost
    assert not followed_bad, followed_bad[:3]
    assert duplicated == 0 and same_destination == 0
    assert files_lost == 0, {k: v for k, v in mirrors.items() if v.lost}
    assert runs_total >= len(run_ids)  # hang-ups at once may have made runs we never saw
    assert outcomes.get("ok") == runs_total, outcomes  # unseen runs were not lost either
    assert rss[-1] - warm < 40, rss  # memory flat: runs live in child processes

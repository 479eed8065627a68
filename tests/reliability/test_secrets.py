"""5. Secrets: every command and the Lambda handlers run with sentinel credentials and
notification URLs that hold secrets; none of them may appear anywhere the relay writes.

The sentinels: the bucket's access key id and secret (an rclone server that accepts
exactly those), a wrong secret (for a failing run), an Apprise ``json://`` URL with a
password and a token in its path, a second Apprise URL (unreachable, so its failure gets
logged) and a Healthchecks ping URL with its UUID — from the config file and from
environment variables. Commands: ``upload`` (dry run, success, failure, credentials from
the AWS chain), ``verify``, ``status`` (text, JSON, HTML, ``--check-stale``), ``doctor``,
``hook-snippet``, ``report-failure``, each also with ``-v``.

Searched: stdout and stderr of every command; every file of the state directory (state
store, its WAL, run store, outbox, event log, locks); the HTML report; every object in the
bucket, manifests and reports decompressed; the bodies of the notifications themselves.
The handlers' part runs the verifier and the notifier with their production wiring on moto
and searches their logs (DEBUG), responses, DynamoDB tables, S3 objects and published
events.
"""

from __future__ import annotations

import os
import secrets

os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")

import gzip
import io
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest

from testbed.agent import AgentResult, run_agent, write_agent_config
from testbed.repos import add_packs, make_fake_restic_repo
from testbed.s3.endpoint import S3Endpoint, unique_bucket_name
from testbed.s3.rclone import RcloneS3Server
from tests.reliability.common import Ledger, leaks
from tests.support.lambdas import aws  # noqa: F401 (the moto account fixture)
from tests.support.sinks import HttpSink, closed_port

ACCESS_KEY = "AKIARELAYSENTINEL7Q"
SECRET_KEY = "sentinel-secret-k3y-8d2f41"
WRONG_SECRET = "sentinel-wrong-secret-0c77"
APPRISE_PASSWORD = "sentinel-apprise-pw-66a1"
APPRISE_TOKEN = "sentinelTokenPath" + secrets.token_hex(4)  # made per run, never a literal
FAILING_PASSWORD = "sentinel-failing-pw-1d3e"
HC_UUID = "0f6e1a52-5e47-4e11-b0c3-9d2b7c1e5a40"
SECRETS = (
    ACCESS_KEY,
    SECRET_KEY,
    WRONG_SECRET,
    APPRISE_PASSWORD,
    APPRISE_TOKEN,
    FAILING_PASSWORD,
    HC_UUID,
)
REPO_ID = "secrets"
GUID = "5e" * 32


@pytest.fixture(scope="module")
def sentinel_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    from tests.support.tools import require_tool

    root = tmp_path_factory.mktemp("rclone-sentinel")
    with RcloneS3Server(
        root, access_key=ACCESS_KEY, secret_key=SECRET_KEY, rclone=require_tool("rclone")
    ) as server:
        yield server


def scan_tree(root: Path, label: str) -> list[tuple[str, bytes]]:
    """Every file under `root`, gzip members also decompressed."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        out.append((f"{label}: {path.relative_to(root)}", data))
        if data[:2] == b"\x1f\x8b":
            out.append((f"{label}: {path.relative_to(root)} (gunzipped)", gzip.decompress(data)))
    return out


def find_leaks(places: Iterable[tuple[str, str | bytes]]) -> list[str]:
    found: list[str] = []
    for where, data in places:
        found += leaks(where, data, SECRETS)
    return found


def test_no_command_leaks_a_secret(
    sentinel_server: RcloneS3Server, tmp_path: Path, ledger: Ledger
) -> None:
    endpoint = sentinel_server.endpoint
    bucket = unique_bucket_name("secrets")
    endpoint.make_bucket(bucket)
    repo = make_fake_restic_repo(tmp_path / "repo", packs=6, pack_size=(1000, 40_000), seed=5)
    state = tmp_path / "state"
    outputs: list[tuple[str, str | bytes]] = []
    commands = 0

    with HttpSink() as chat, HttpSink() as healthchecks:
        failing = f"json://relay:{FAILING_PASSWORD}@127.0.0.1:{closed_port()}/{APPRISE_TOKEN}x"
        notify = (
            "[notify]\n"
            f'urls = ["json://relay:{APPRISE_PASSWORD}@127.0.0.1:{chat.port}/{APPRISE_TOKEN}", '
            f'"{failing}"]\n'
            'success = "always"\n'
            f'healthchecks = {{ {REPO_ID} = "{healthchecks.url}/{HC_UUID}" }}\n'
        )

        def config(name: str, ep: S3Endpoint, *, keys: bool = True, extra: str = notify) -> Path:
            path = write_agent_config(
                tmp_path / name, ep, bucket, state_dir=state, events={"publisher": "local"}
            )
            text = path.read_text()
            if not keys:
                text = "\n".join(
                    ln
                    for ln in text.splitlines()
                    if not ln.startswith(("access_key_id", "secret_access_key"))
                )
            path.write_text(text + "\n" + extra)
            return path

        good = config("good.toml", endpoint)
        wrong = config("wrong.toml", S3Endpoint(endpoint.endpoint_url, ACCESS_KEY, WRONG_SECRET))
        chain = config("chain.toml", endpoint, keys=False, extra="")
        ids = ["--repo-id", REPO_ID, "--repo-guid", GUID]
        up = ["upload", "--repo", str(repo.root), *ids]
        env_notify = {
            "BACKREST_RELAY_NOTIFY__URLS": (
                f"json://relay:{APPRISE_PASSWORD}@127.0.0.1:{chat.port}/{APPRISE_TOKEN} {failing}"
            ),
            "BACKREST_RELAY_NOTIFY__HEALTHCHECKS": json.dumps(
                {REPO_ID: f"{healthchecks.url}/{HC_UUID}"}
            ),
            "BACKREST_RELAY_NOTIFY__SUCCESS": "always",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }
        no_backrest = {"BACKREST_CONFIG": str(tmp_path / "no-backrest.json")}

        def run(label: str, args: list[str], codes: Iterable[int], **env: str) -> AgentResult:
            nonlocal commands
            result = run_agent(args, env={**no_backrest, **env}, timeout=180)
            commands += 1  # (two threads at most: a lost increment only skews a figure)
            assert result.returncode in set(codes), (label, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr, (label, result.stderr)
            outputs.extend([(f"{label} stdout", result.stdout), (f"{label} stderr", result.stderr)])
            return result

        html = tmp_path / "status.html"
        run("dry run", [*up, "--config", str(good), "--dry-run", "--json"], [0])
        first = run("upload", ["-v", *up, "--config", str(good), "--json"], [0])
        assert first.summary["verification"]["verified"] is True
        add_packs(repo, 2, 20_000, seed=6)  # something new, so the failing run must send
        failed = run("wrong secret", ["-v", *up, "--config", str(wrong), "--json"], [4])
        assert "SignatureDoesNotMatch" in failed.stdout + failed.stderr
        run("AWS chain", [*up, "--config", str(chain)], [0], **env_notify)  # text summary
        # The rest, two at a time (as a cron verify may run beside a hook).
        hook = ["hook-snippet", "--repo-id", REPO_ID, "--config", str(good)]
        doctor = ["doctor", "--repo", str(repo.root), *ids]
        report = ["-v", "report-failure", *ids, "--config", str(good), "--json"]
        tail: list[tuple[str, list[str], list[int]]] = [
            ("verify", ["-v", "verify", *ids, "--config", str(good), "--deep", "100%"], [0]),
            ("report-failure", [*report, "--error", "check failed"], [0]),
            ("status", ["status", "--config", str(good)], [0]),
            (
                "status json",
                ["-v", "status", "--config", str(good), "--json", "--check-stale"],
                [0, 3],
            ),
            ("status html", ["status", "--config", str(good), "--html", str(html)], [0]),
            ("doctor", ["-v", *doctor, "--config", str(good)], [0]),
            ("doctor wrong", [*doctor, "--config", str(wrong)], [4]),
            ("hook-snippet text", [*hook], [0]),
            ("hook-snippet json failure", [*hook, "--format", "json", "--hook", "failure"], [0]),
        ]
        with ThreadPoolExecutor(max_workers=2) as pool:
            verify_json = ["verify", *ids, "--config", str(chain), "--json"]
            jobs = [pool.submit(run, "verify json", verify_json, [0], **env_notify)]
            jobs += [pool.submit(run, *job) for job in tail]
            for job in jobs:
                job.result()
        sent = chat.wait_for(3)
        pings = healthchecks.wait_for(2)

    places: list[tuple[str, str | bytes]] = [*outputs]
    places += scan_tree(state, "state dir")
    places += [("status --html", html.read_bytes())]
    places += scan_tree(sentinel_server.bucket_path(bucket), "bucket")
    places += [(f"notification body {i}", r.body) for i, r in enumerate(sent)]
    places += [(f"healthchecks body {i}", r.body) for i, r in enumerate(pings)]
    assert any(name.endswith(".sqlite") for name, _ in places if name.startswith("state dir"))
    assert any("manifests" in name for name, _ in places if name.startswith("bucket"))
    found = find_leaks(places)
    ledger.add(
        "secrets",
        trials=commands,
        faults=len(SECRETS),
        detected=len(SECRETS) if not found else 0,
        lost=len(found),
        note=f"{len(places)} outputs, files, objects and notification bodies searched "
        f"({commands} commands)",
    )
    assert not found, "\n".join(found)


# -- the Lambda handlers -------------------------------------------------------------------------


@pytest.mark.usefixtures("aws")
def test_handlers_leak_no_secret(monkeypatch: pytest.MonkeyPatch, ledger: Ledger) -> None:
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "DEBUG")
    from cloud.contracts.destination import Destination
    from cloud.handlers import notify as notify_handler
    from cloud.handlers import verify as verify_handler
    from cloud.integrations.runstore_dynamodb import create_table
    from tests.support.lambdas import (
        FakeLambdaContext,
        aws_destination_secret,
        bus_to_queue,
        create_idempotency_table,
        event_body,
        sqs_batch,
        write_mirror,
    )

    region = "us-east-1"
    dynamodb = boto3.client("dynamodb", region_name=region)
    create_table(dynamodb, "runs")
    create_idempotency_table(dynamodb, "idempotency")
    sqs, queue = bus_to_queue(
        region, "results", {"source": [{"prefix": "backrest-relay"}]}, bus="relay", rule="all"
    )
    s3 = boto3.client("s3", region_name=region)
    s3.create_bucket(Bucket="offsite")
    secrets = boto3.client("secretsmanager", region_name=region)
    destination_secret = aws_destination_secret(
        secrets, "relay/destination", region, ACCESS_KEY, SECRET_KEY
    )
    logs = io.StringIO()
    handlers = [verify_handler.logger.registered_handler, notify_handler.logger.registered_handler]
    originals = []
    for handler in handlers:
        assert isinstance(handler, logging.StreamHandler)
        originals.append(handler.setStream(logs))
    verify_handler.logger.setLevel("DEBUG")
    notify_handler.logger.setLevel("DEBUG")
    places: list[tuple[str, str | bytes]] = []
    with HttpSink() as chat, HttpSink() as healthchecks:
        notify_secret = secrets.create_secret(
            Name="relay/notify",
            SecretString=json.dumps(
                {
                    "apprise_urls": [
                        f"json://relay:{APPRISE_PASSWORD}@127.0.0.1:{chat.port}/{APPRISE_TOKEN}",
                        f"json://relay:{FAILING_PASSWORD}@127.0.0.1:{closed_port()}/t",
                    ],
                    "healthchecks": {"home": f"{healthchecks.url}/{HC_UUID}"},
                }
            ),
        )
        for name, value in {
            "RUNS_TABLE": "runs",
            "IDEMPOTENCY_TABLE": "idempotency",
            "EVENT_BUS_NAME": "relay",
            "DESTINATION_SECRET_ARN": destination_secret["ARN"],
            "NOTIFY_SECRET_ARN": notify_secret["ARN"],
            "SUCCESS_POLICY": "always",
        }.items():
            monkeypatch.setenv(name, value)
        verify_handler.set_dependencies(None)
        notify_handler.set_dependencies(None)
        try:
            destination = Destination(
                provider="aws", endpoint_url=None, bucket="offsite", prefix="r"
            )
            good, _ = write_mirror(
                lambda k, b: s3.put_object(Bucket="offsite", Key=k, Body=b), destination, seed=1
            )
            damaged, keys2 = write_mirror(
                lambda k, b: s3.put_object(Bucket="offsite", Key=k, Body=b), destination, seed=2
            )
            s3.put_object(Bucket="offsite", Key=next(k for k in keys2 if "/data/" in k), Body=b"x")
            gone = damaged.model_copy(
                update={
                    "run_id": str(uuid.uuid4()),
                    "destination": destination.model_copy(update={"bucket": "no-such-bucket"}),
                }
            )
            bodies = [event_body(e) for e in (good, damaged, gone)]
            response = verify_handler.handler(
                sqs_batch([*bodies, "{not json"]), FakeLambdaContext(remaining_ms=300_000)
            )
            places.append(("verify response", json.dumps(response)))
            assert [f["itemIdentifier"] for f in response["batchItemFailures"]] == ["m-2", "m-3"]
            results = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
            published = [m["Body"] for m in results]
            assert len(published) == 2
            places += [(f"published event {i}", body) for i, body in enumerate(published)]
            response = notify_handler.handler(
                sqs_batch(published), FakeLambdaContext(remaining_ms=300_000)
            )
            places.append(("notify response", json.dumps(response)))
            assert len(chat.wait_for(2)) == 2 and len(healthchecks.wait_for(2)) == 2
            places += [(f"notification {i}", r.body) for i, r in enumerate(chat.requests)]
        finally:
            verify_handler.set_dependencies(None)
            notify_handler.set_dependencies(None)
            for module in (verify_handler, notify_handler):
                module.metrics.clear_metrics()
                module.logger.setLevel("INFO")
            for handler, original in zip(handlers, originals, strict=True):
                handler.setStream(original)
    places.append(("handler logs", logs.getvalue()))
    assert "notification not delivered" in logs.getvalue()  # the failing URL was logged
    for table in ("runs", "idempotency"):
        items = dynamodb.scan(TableName=table)["Items"]
        places.append((f"DynamoDB {table}", json.dumps(items)))
    for obj in s3.list_objects_v2(Bucket="offsite").get("Contents", []):
        data = s3.get_object(Bucket="offsite", Key=obj["Key"])["Body"].read()
        places.append((f"s3 {obj['Key']}", data))
        if data[:2] == b"\x1f\x8b":
            places.append((f"s3 {obj['Key']} (gunzipped)", gzip.decompress(data)))
    found = find_leaks(places)
    ledger.add(
        "secrets",
        trials=2,
        note=f"handlers: {len(places)} logs, responses, tables, objects and events searched",
        lost=len(found),
    )
    assert not found, "\n".join(found)

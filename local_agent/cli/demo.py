"""`backrest-relay demo`: the whole pipeline on this machine, no cloud account needed.

A real restic repository when restic is installed (else a generated restic-format one),
an embedded S3-compatible endpoint on loopback (moto's server), the real agent, the real
verifier, notifications printed to the terminal (and sent to any `--notify` URL), then
one remote object damaged on purpose and the alert that names it.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloud.logic.ports import Notification
from local_agent.errors import ConfigError

PASSWORD = "backrest-relay-demo"  # noqa: S105 — a throwaway demo repository's password
BUCKET = "offsite-demo"
REPO_ID = "demo"
KEYS = ("demo-access-key", "demo-secret-key")


class TerminalChannel:
    """Prints notifications the way a chat message or email would show them."""

    name = "terminal"

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.sent: list[Notification] = []

    def send(self, notification: Notification) -> None:
        self.sent.append(notification)
        width = 78
        bar = "─" * width
        lines = [f"┌{bar}┐", f"│ {notification.subject[: width - 2]:<{width - 2}} │", f"├{bar}┤"]
        for raw in notification.text.splitlines()[2:]:
            for part in textwrap.wrap(raw, width - 2) or [""]:
                lines.append(f"│ {part:<{width - 2}} │")
        lines.append(f"└{bar}┘")
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def step(n: int, text: str) -> None:
    say(f"\n\033[1m[{n}] {text}\033[0m" if sys.stdout.isatty() else f"\n[{n}] {text}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_sources(root: Path, rng: random.Random, files: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"photo-{i:03d}.jpg").write_bytes(rng.randbytes(rng.randint(20_000, 600_000)))


def build_restic_repo(base: Path, restic: str) -> tuple[Path, str]:
    repo = base / "repo"
    src = base / "documents"
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(base / "cache")}
    run = [restic, "-r", str(repo), "--no-cache", "-q"]
    subprocess.run([*run, "init"], env=env, check=True, stdin=subprocess.DEVNULL)
    rng = random.Random(7)
    for day in range(2):
        _write_sources(src / f"day{day}", rng, 15)
        subprocess.run([*run, "backup", str(src)], env=env, check=True, stdin=subprocess.DEVNULL)
    return repo, "a real restic repository (2 snapshots)"


def build_generated_repo(base: Path) -> tuple[Path, str]:
    """restic's layout with files named by their SHA-256 (restic itself is not installed)."""
    repo = base / "repo"
    rng = random.Random(7)
    for folder in ("keys", "snapshots", "index", "locks"):
        (repo / folder).mkdir(parents=True)
    for i in range(256):
        (repo / "data" / f"{i:02x}").mkdir(parents=True)
    (repo / "config").write_bytes(rng.randbytes(155))

    def put(folder: str, data: bytes) -> None:
        name = hashlib.sha256(data).hexdigest()
        target = repo / folder / (f"{name[:2]}/{name}" if folder == "data" else name)
        target.write_bytes(data)

    put("keys", rng.randbytes(400))
    for _ in range(24):
        put("data", rng.randbytes(rng.randint(100_000, 900_000)))
    for _ in range(2):
        put("index", rng.randbytes(3000))
        put("snapshots", rng.randbytes(300))
    return repo, "a generated restic-format repository (restic is not installed)"


DEMO_EXTRA_HINT = (
    "the demo's embedded S3 endpoint needs the demo extra (moto), which a plain install does "
    "not have: pipx install 'backrest-relay[demo]' (or, in a virtualenv, "
    "pip install 'backrest-relay[demo]')"
)


def require_demo_extra() -> None:
    """Fail before building anything when moto (the `demo` extra) is not installed."""
    import importlib.util

    try:
        found = importlib.util.find_spec("moto.server") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(DEMO_EXTRA_HINT)


class EmbeddedEndpoint:
    """moto's S3 server on loopback: S3-compatible, in-process, gone when the demo ends."""

    def __init__(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise ConfigError(DEMO_EXTRA_HINT) from None
        self.port = _free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> EmbeddedEndpoint:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request lines
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def client(self) -> Any:
        from cloud.integrations.s3 import S3Access, make_s3_client

        return make_s3_client(
            S3Access(
                provider="s3",
                endpoint_url=self.url,
                region="us-east-1",
                access_key_id=KEYS[0],
                secret_access_key=KEYS[1],
            ),
            max_attempts=2,
        )


def run_demo(*, keep: bool = False, notify: Sequence[str] = ()) -> int:
    from local_agent.config import RelayConfig
    from local_agent.events.pipeline import LocalPipeline
    from local_agent.events.publishers import LocalPublisher
    from local_agent.identity import ResolvedRepo
    from local_agent.units import format_duration, format_size, plural
    from local_agent.upload import run_upload

    require_demo_extra()
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="backrest-relay-demo-"))
    terminal = TerminalChannel()
    try:
        say("backrest-relay demo — the whole pipeline on this machine, no cloud account.")
        step(1, "A restic repository to protect")
        restic = shutil.which("restic")
        repo, what = build_restic_repo(base, restic) if restic else build_generated_repo(base)
        files = [p for p in repo.rglob("*") if p.is_file()]
        say(
            f"    {what} at {repo}: {plural(len(files), 'file')}, "
            f"{format_size(sum(p.stat().st_size for p in files))}"
        )
        with EmbeddedEndpoint() as endpoint:
            step(2, "An S3-compatible endpoint standing in for Backblaze B2")
            endpoint.client().create_bucket(Bucket=BUCKET)
            say(f"    {endpoint.url}  bucket '{BUCKET}'  (moto's S3 server, loopback only)")
            config = RelayConfig.model_validate(
                {
                    "destination": {
                        "provider": "s3",
                        "endpoint_url": endpoint.url,
                        "region": "us-east-1",
                        "bucket": BUCKET,
                        "prefix": "restic/{repo_id}",
                        "access_key_id": KEYS[0],
                        "secret_access_key": KEYS[1],
                    },
                    "upload": {"concurrency": 4},
                    "events": {"publisher": "local"},
                    "notify": {"urls": list(notify), "success": "always"},
                    "state": {"dir": str(base / "state")},
                }
            )
            guid = hashlib.sha256(b"demo").hexdigest()

            def upload(label: str, config: RelayConfig = config) -> Any:
                pipeline = LocalPipeline(config, base / "state", extra_channels=[terminal])
                summary = run_upload(
                    config,
                    ResolvedRepo(repo, REPO_ID, guid),
                    trigger=label,
                    interactive=sys.stderr.isatty(),
                    publisher=LocalPublisher(pipeline),
                )
                stats = summary.stats
                say(
                    f"    {plural(stats.uploaded_files, 'file')} uploaded "
                    f"({format_size(stats.uploaded_bytes)}), {stats.already_present} "
                    f"already there, {stats.requests} S3 requests, "
                    f"{format_duration(stats.duration_seconds)}"
                )
                return summary

            step(3, "Mirror: every file hashed against its name, then uploaded in safe order")
            first = upload("demo: first mirror")
            if first.exit_code != 0:
                say(f"    the mirror failed: {first.error}")
                return int(first.exit_code)
            say("    then verified: manifest hash, one listing, every new object read back")
            step(4, "Nothing new: zero requests — the copy is already proven, nothing is read")
            upload("demo: nothing new")

            step(5, "Damage one object in the bucket (bit rot, a bad provider, tampering)")
            victim = sorted(
                p.relative_to(repo).as_posix() for p in (repo / "data").rglob("*") if p.is_file()
            )[0]
            key = f"restic/{REPO_ID}/{victim}"
            client = endpoint.client()
            body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            body[len(body) // 2] ^= 0xFF
            client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
            say(f"    flipped one byte of {key}")

            step(6, "The rotation (once per verify.every, here now) re-reads it and names it")
            rotation_now = config.model_copy(
                update={"verify": config.verify.model_copy(update={"every": "0s"})}
            )
            upload("demo: after damage", rotation_now)
        failures = [n for n in terminal.sent if not n.ok]
        caught = any(victim in n.text for n in failures)
        say("")
        say("What just happened:")
        say("  • the agent mirrored the repository, proving each file's SHA-256 before upload;")
        say("  • the verifier proved the copy against the manifest and read new objects back;")
        say(
            "  • a damaged remote object was "
            + ("named in the failure alert above." if caught else "NOT caught (a bug!)")
        )
        say("")
        say("Next steps with your own repository (docs/configuration.md, README.md):")
        say("  1. write ~/.config/backrest-relay/config.toml with your B2 bucket and key")
        say("  2. backrest-relay doctor --repo-id YOUR-REPO")
        say("  3. backrest-relay hook-snippet --repo-id YOUR-REPO   (paste into Backrest)")
        say(f"\ndemo finished in {format_duration(time.monotonic() - started)}")
        return 0 if caught else 1
    finally:
        if keep:
            say(f"(kept {base})")
        else:
            shutil.rmtree(base, ignore_errors=True)

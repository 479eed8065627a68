"""`backrest-relay doctor`: says in words what stands between this host and a good mirror.

Each check is independent and runs even when an earlier one failed, so one run shows
everything that needs fixing: config, credentials, bucket access, write and delete
permission under the prefix, clock skew, the state directory and the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from cloud.integrations.redact import REDACTOR
from local_agent.errors import ExitCode, RelayError

_T = TypeVar("_T")

CLOCK_WARN_SECONDS = 60
CLOCK_FAIL_SECONDS = 15 * 60  # S3 refuses signatures more than 15 minutes off


@dataclass
class Check:
    name: str
    ok: bool | None  # None: a warning, or skipped because an earlier check failed
    detail: str


class Doctor:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def record(self, name: str, ok: bool | None, detail: str) -> None:
        self.checks.append(Check(name, ok, REDACTOR(detail)))
        mark = {True: "ok  ", False: "FAIL", None: "warn"}[ok]
        sys.stdout.write(f"[{mark}] {name}: {REDACTOR(detail)}\n")
        sys.stdout.flush()

    def attempt(self, name: str, fn: Callable[[], str]) -> bool:
        try:
            self.record(name, True, fn())
            return True
        except RelayError as exc:
            self.record(name, False, exc.message)
        except Exception as exc:
            self.record(name, False, f"{type(exc).__name__}: {exc}")
        return False

    def expand(
        self,
        name: str,
        template: Callable[..., _T],
        *,
        repo_id: str | None,
        repo_guid: str | None,
    ) -> _T | None:
        """A config template expanded for this repository, or placeholder ids when none was
        named (doctor runs without one); None after recording why it failed."""
        try:
            return template(repo_id=repo_id or "doctor", repo_guid=repo_guid or "0" * 64)
        except RelayError as exc:
            self.record(name, False, exc.message)
            return None


def run_doctor(args: argparse.Namespace) -> int:
    from local_agent.cli.common import register_secrets, resolve_repo
    from local_agent.config import load_config
    from local_agent.mirror.backend import Backend, describe_error
    from local_agent.mirror.repository import scan_repository
    from local_agent.units import plural

    doctor = Doctor()
    try:
        loaded = load_config(args.config)
    except RelayError as exc:
        doctor.record("config", False, exc.message)
        return int(ExitCode.USAGE)
    config = loaded.config
    register_secrets(config)
    doctor.record("config", True, f"{loaded.path or 'environment only'} is valid")

    repo_id = args.repo_id
    repo_guid = args.repo_guid
    if args.repo or args.repo_id:
        try:
            repo = resolve_repo(args, config.state.path(), learn=False)
            repo_id, repo_guid = repo.repo_id, repo.guid
            scan = scan_repository(repo.path)
            doctor.record(
                "repository",
                True,
                f"{repo.path}: restic repository with {plural(len(scan.files), 'file')}"
                + (
                    f", {plural(len(scan.skipped), 'entry', 'entries')} that will be skipped"
                    if scan.skipped
                    else ""
                ),
            )
        except RelayError as exc:
            doctor.record("repository", False, exc.message)
    if repo_id:
        from local_agent.checkpolicy import schedule_note

        note = schedule_note(repo_id)
        if note is not None:
            doctor.record("check schedule", note[0], note[1])
    destination = doctor.expand(
        "destination", config.destination_for, repo_id=repo_id, repo_guid=repo_guid
    )
    if destination is None:
        return _exit(doctor)

    state_dir = config.state.path()

    def state_check() -> str:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / f".doctor-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        return f"{state_dir} is writable"

    doctor.attempt("state directory", state_check)

    access = config.destination.access()
    import boto3

    session = boto3.session.Session(
        aws_access_key_id=access.access_key_id, aws_secret_access_key=access.secret_access_key
    )
    credentials = session.get_credentials()
    if credentials is None:
        doctor.record(
            "credentials",
            False,
            "none found: set destination.access_key_id/secret_access_key, "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an AWS profile",
        )
        return _exit(doctor)
    doctor.record("credentials", True, f"found ({credentials.method})")

    backend = Backend(access, destination, max_attempts=2, direct_put=config.upload.direct_put)
    headers: dict[str, Any] = {}

    def list_check() -> str:
        page = backend.client.list_objects_v2(
            Bucket=destination.bucket, Prefix=destination.key(""), MaxKeys=1
        )
        headers.update(page["ResponseMetadata"].get("HTTPHeaders", {}))
        return f"can list {destination.describe()}"

    try:
        doctor.record("bucket access", True, list_check())
    except Exception as exc:
        doctor.record("bucket access", False, f"{describe_error(exc)} — {destination.describe()}")
        return _exit(doctor)

    _object_lock_check(doctor, config, backend)

    # Every prefix the agent writes under, each proven with a real PUT (and DELETE) of a
    # probe object: a B2 key has one name prefix, and a key that covers the repository but
    # not the manifests lets `upload` mirror everything and then fail on the manifest.
    manifest_prefix = doctor.expand(
        "manifest prefix", config.manifest_prefix_for, repo_id=repo_id, repo_guid=repo_guid
    )
    if manifest_prefix is None:
        return _exit(doctor)
    targets = [("repository prefix", backend, destination.prefix)]
    manifest_backend = Backend(
        access,
        destination.model_copy(update={"prefix": manifest_prefix}),
        max_attempts=2,
        direct_put=config.upload.direct_put,
    )
    targets.append(("manifest prefix", manifest_backend, manifest_prefix))
    body = b"backrest-relay doctor probe\n"
    # Local mode reads every new object back; elsewhere only `verify` needs to read.
    read_required = config.events.publisher == "local"
    try:
        for label, target, prefix in targets:
            _probe(doctor, config.upload.delete, label, target, prefix, body, read_required)
    finally:
        manifest_backend.close()

    date = headers.get("date")
    if date:
        skew = abs(time.time() - parsedate_to_datetime(date).timestamp())
        if skew > CLOCK_FAIL_SECONDS:
            doctor.record("clock", False, f"off by {skew:.0f}s: requests will be refused; fix NTP")
        elif skew > CLOCK_WARN_SECONDS:
            doctor.record("clock", None, f"off by {skew:.0f}s; check NTP")
        else:
            doctor.record("clock", True, f"within {max(skew, 1):.0f}s of the server")
    else:
        doctor.record("clock", None, "server sent no Date header; cannot compare")
    return _exit(doctor)


def _probe(
    doctor: Doctor,
    delete_enabled: bool,
    label: str,
    backend: Any,
    prefix: str,
    body: bytes,
    read_required: bool = True,
) -> None:
    """PUT, GET back, then DELETE a probe object under `prefix`; each outcome is recorded."""
    probe_key = f".backrest-relay-doctor-{secrets.token_hex(6)}"
    where = f"{prefix}/" if prefix else "the bucket root"

    def write_check() -> str:
        backend.put(
            probe_key,
            body,
            len(body),
            hashlib.md5(body, usedforsecurity=False).hexdigest(),
            hashlib.sha256(body).hexdigest(),
            locked=False,  # a locked probe could not be removed for `days`
        )
        via = "the agent's signed PUT" if backend.direct_put_active else "boto3 put_object"
        return f"can upload under {where} (single PUT with Content-MD5, via {via})"

    if not doctor.attempt(f"write permission ({label})", write_check):
        return
    _read_probe(doctor, read_required, label, backend, probe_key, where, body)
    try:
        backend.delete(probe_key)
        doctor.record(
            f"delete permission ({label})",
            True,
            f"can delete under {where} (needed only with upload.delete = true)",
        )
    except RelayError as exc:
        level = False if delete_enabled else None
        doctor.record(f"delete permission ({label})", level, exc.message)


ENABLE_OBJECT_LOCK = (
    "Object Lock can only protect versions in a bucket that has it enabled. On Backblaze "
    "B2: bucket settings → Object Lock → Enable (this also keeps every version of each "
    "file), or create a new bucket with Object Lock enabled. On AWS S3: create the bucket "
    "with Object Lock enabled (`aws s3api create-bucket --object-lock-enabled-for-bucket`), "
    "or on an existing versioned bucket run `aws s3api put-object-lock-configuration "
    "--object-lock-configuration ObjectLockEnabled=Enabled`. See docs/security.md"
)


def _object_lock_check(doctor: Doctor, config: Any, backend: Any) -> None:
    """GetObjectLockConfiguration: with `object_lock` configured the bucket must have
    Object Lock enabled (else every upload would be refused, exit 4); without it, say
    what the copy is exposed to (and send nothing)."""
    wanted = config.destination.object_lock
    if wanted is None:
        # No request: GetObjectLockConfiguration is a bucket-level call that a key
        # restricted to one prefix may not be allowed, and nothing here depends on it.
        doctor.record(
            "object lock",
            None,
            "destination.object_lock is not set: whoever holds this key can hide or "
            "overwrite the off-site copy (docs/security.md). " + ENABLE_OBJECT_LOCK,
        )
        return
    try:
        enabled, said = backend.object_lock_status()
    except RelayError as exc:
        doctor.record(
            "object lock",
            False,
            f"cannot read the bucket's Object Lock setting: {exc.message} (a B2 key needs "
            "the readBucketRetentions capability)",
        )
        return
    if enabled:
        doctor.record(
            "object lock",
            True,
            f"bucket {backend.bucket} has Object Lock enabled; every object is written "
            f"with {wanted.mode} retention for {wanted.days} days",
        )
    else:
        doctor.record(
            "object lock",
            False,
            f"destination.object_lock is set but bucket {backend.bucket} does not have "
            f"Object Lock enabled ({said}): uploads would be refused. {ENABLE_OBJECT_LOCK}",
        )


def _read_probe(
    doctor: Doctor, required: bool, label: str, backend: Any, key: str, where: str, body: bytes
) -> None:
    """GET the probe back: a key without `readFiles` can upload but never verify."""
    from local_agent.mirror.backend import describe_error

    name = f"read permission ({label})"
    try:
        got = backend.client.get_object(
            Bucket=backend.destination.bucket, Key=backend.destination.key(key)
        )
        data = got["Body"].read()
    except Exception as exc:
        why = "local verification reads every new object back" if required else "needed by verify"
        doctor.record(name, False if required else None, f"{describe_error(exc)} ({why})")
        return
    if data != body:
        doctor.record(name, False, f"the probe read back under {where} differs from what was sent")
        return
    doctor.record(name, True, f"can read back under {where}")


def _exit(doctor: Doctor) -> int:
    failed = [c for c in doctor.checks if c.ok is False]
    if not failed:
        sys.stdout.write("everything looks right.\n")
        return 0
    sys.stdout.write(f"{len(failed)} problem(s) found.\n")
    names = {c.name for c in failed}
    if names & {"config", "destination", "credentials", "state directory"}:
        return int(ExitCode.USAGE)
    if "repository" in names:
        return int(ExitCode.LOCAL_INTEGRITY)
    return int(ExitCode.DESTINATION)

"""The mirror stays restorable whatever the disk, the user or a second restic client does
(issue 13): a foreign repository swapped in at the path, an unreadable new pack, a backup
finishing during the scan, a corrupted multipart object, a file that changes while it is
sent, and a run stopped at its deadline.

Every scenario runs real restic and the real agent as a separate process against
`rclone serve s3` (moto where an AWS-shaped multipart ETag matters); the oracle is restic
itself: after every run, refused or not, `restic check` on the mirror passes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from local_agent.mirror.repository import multipart_etags
from local_agent.mirror.uploader import part_size_candidates
from testbed.agent import (
    AgentResult,
    agent_command,
    agent_config_in,
    agent_env,
    remote_keys,
    run_agent,
    start_agent,
    unfinished_uploads,
    upload_args,
)
from testbed.repos import (
    make_restic_repo,
    restic_backup,
    restic_check,
    restic_forget,
    restic_snapshots,
    s3_repo_url,
    write_random_tree,
)
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.proxy import S3Proxy
from testbed.s3.rclone import RcloneS3Server

REPO_ID = "safety"
PREFIX = f"restic/{REPO_ID}"
NOBODY = 65534


# -- helpers ------------------------------------------------------------------------------


def small_repo(
    path: Path, source: Path, password: str, *, seed: int, big: int = 0, pack_mib: int | None = None
) -> str:
    """A real restic repository with one snapshot (plus one `big`-byte file if asked)."""
    make_restic_repo(path, password)
    write_random_tree(source / f"s{seed}", files=6, size=(50_000, 400_000), seed=seed)
    if big:
        (source / f"s{seed}" / "big.bin").write_bytes(os.urandom(big))
    return restic_backup(path, password, source, pack_size_mib=pack_mib)


def config_for(tmp_path: Path, endpoint: S3Endpoint, bucket: str, **upload: object) -> Path:
    return agent_config_in(
        tmp_path,
        endpoint,
        bucket,
        prefix=PREFIX,
        upload={"multipart_threshold": "5MiB", "part_size": "5MiB", **upload},
    )


def safety_args(config: Path, repo: Path, *extra: str) -> list[str]:
    return upload_args(config, repo, *extra, repo_id=REPO_ID)


def upload(config: Path, repo: Path, *extra: str, env: dict[str, str] | None = None) -> AgentResult:
    return run_agent(safety_args(config, repo, *extra), env=env, timeout=240)


def hooked_upload(
    hook: str, config: Path, repo: Path, *extra: str, env: dict[str, str] | None = None
) -> AgentResult:
    """The real agent in its own process, with `hook` (Python source) run first: it patches
    one function of the agent so the test can act at an exact point of the run."""
    script = "\n".join(
        [
            "import sys",
            textwrap.dedent(hook),
            "from local_agent.cli.main import main",
            "sys.exit(main(sys.argv[1:]))",
        ]
    )
    proc = subprocess.run(
        [agent_command([])[0], "-c", script, *safety_args(config, repo, *extra)],
        env=agent_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return AgentResult(proc.returncode, proc.stdout, proc.stderr)


def mirror_url(endpoint: S3Endpoint, bucket: str) -> str:
    return s3_repo_url(endpoint, bucket, PREFIX)


def remote_bytes(endpoint: S3Endpoint, bucket: str, keys: Sequence[str]) -> dict[str, bytes]:
    client = endpoint.client()
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def identity_objects(endpoint: S3Endpoint, bucket: str) -> dict[str, bytes]:
    """`config` and `keys/` of the mirror, with their bytes."""
    keys = [
        k
        for k in remote_keys(endpoint, bucket, PREFIX)
        if k == f"{PREFIX}/config" or k.startswith(f"{PREFIX}/keys/")
    ]
    return remote_bytes(endpoint, bucket, keys)


def state_rows(state_dir: Path) -> list[tuple[object, ...]]:
    """Everything the state stores say about the destination (objects and meta)."""
    rows: list[tuple[object, ...]] = []
    for path in sorted(state_dir.glob("*.sqlite")):
        if path.name == "outbox.sqlite":
            continue
        with sqlite3.connect(path) as db:
            rows += db.execute(
                "SELECT key, size, sha256, md5, etag, run_id FROM objects ORDER BY key"
            ).fetchall()
            rows += db.execute("SELECT name, value FROM meta ORDER BY name").fetchall()
    return rows


def repo_keys(repo: Path) -> set[str]:
    return {
        p.relative_to(repo).as_posix()
        for p in repo.rglob("*")
        if p.is_file() and not p.relative_to(repo).as_posix().startswith("locks/")
    }


def biggest_pack(repo: Path, exclude: set[str] = frozenset()) -> Path:  # type: ignore[assignment]
    packs = [
        p
        for p in (repo / "data").rglob("*")
        if p.is_file() and p.relative_to(repo).as_posix() not in exclude
    ]
    return max(packs, key=lambda p: p.stat().st_size)


def test_symlinked_data_subfolder_is_followed_as_restic_follows_it(
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    """A `data/XX` folder moved to another disk and linked back: restic reads through the
    link (`restic check --read-data` passes, so the hook fires), so the mirror must hold its
    packs too — not skip them and report a mirror restic rejects as done."""
    endpoint = rclone_server.endpoint
    repo = tmp_path / "repo"
    small_repo(repo, tmp_path / "src", restic_password, seed=7)
    sub = next(p for p in sorted((repo / "data").iterdir()) if any(p.iterdir()))
    moved = tmp_path / "other-disk" / sub.name
    moved.parent.mkdir()
    shutil.move(sub, moved)
    sub.symlink_to(moved, target_is_directory=True)
    restic_check(str(repo), restic_password, read_data=True)

    result = upload(config_for(tmp_path, endpoint, rclone_bucket), repo)
    assert result.returncode == 0, result.stderr
    assert result.summary["skipped"] == []
    local = {
        (Path(d) / f).relative_to(repo).as_posix()
        for d, _, files in os.walk(repo, followlinks=True)
        for f in files
    }
    assert {f"{PREFIX}/{k}" for k in local} == set(
        remote_keys(endpoint, rclone_bucket, PREFIX + "/")
    )
    restic_check(
        mirror_url(endpoint, rclone_bucket), restic_password, env=endpoint.env(), read_data=True
    )


# -- 1. identity is checked against the bucket, always -------------------------------------


def test_foreign_repository_at_the_path_is_refused_with_reconcile_and_after_and_changes_nothing(
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    endpoint = rclone_server.endpoint
    repo = tmp_path / "repo"
    a_snapshot = small_repo(repo, tmp_path / "src-a", restic_password, seed=1)
    config = config_for(tmp_path, endpoint, rclone_bucket)
    assert upload(config, repo).returncode == 0
    identity = identity_objects(endpoint, rclone_bucket)
    everything = remote_keys(endpoint, rclone_bucket, PREFIX)
    state = state_rows(tmp_path / "state")

    # A wrong mount / re-initialised disk: another repository at the same path.
    repo.rename(tmp_path / "repo-a")
    small_repo(repo, tmp_path / "src-b", restic_password, seed=2)

    refused = upload(config, repo, "--reconcile")
    assert refused.returncode == 5, refused.stderr
    assert "different restic repository" in refused.stderr
    assert state_rows(tmp_path / "state") == state, "a refused run changed the state store"

    again = upload(config, repo)
    assert again.returncode == 5, again.stderr
    assert "different restic repository" in again.stderr

    assert identity_objects(endpoint, rclone_bucket) == identity
    assert remote_keys(endpoint, rclone_bucket, PREFIX) == everything
    url = mirror_url(endpoint, rclone_bucket)
    assert [s["id"] for s in restic_snapshots(url, restic_password, env=endpoint.env())] == [
        a_snapshot
    ]
    restic_check(url, restic_password, env=endpoint.env(), read_data=False)


def test_state_without_a_record_of_the_remote_config_still_refuses_a_foreign_repository(
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    """A store that lost its `config` row (written by an older version, edited, or rebuilt
    by a refused run of one) must not let another repository's `config` go up: the run
    that would write it asks the bucket first."""
    endpoint = rclone_server.endpoint
    repo = tmp_path / "repo"
    small_repo(repo, tmp_path / "src-a", restic_password, seed=3)
    config = config_for(tmp_path, endpoint, rclone_bucket)
    assert upload(config, repo).returncode == 0
    identity = identity_objects(endpoint, rclone_bucket)
    (store,) = [p for p in (tmp_path / "state").glob("*.sqlite") if p.name != "outbox.sqlite"]
    with sqlite3.connect(store) as db:
        db.execute("DELETE FROM objects WHERE key = 'config'")

    shutil.rmtree(repo)
    small_repo(repo, tmp_path / "src-b", restic_password, seed=4)
    refused = upload(config, repo)
    assert refused.returncode == 5, refused.stderr
    assert "different restic repository" in refused.stderr
    assert identity_objects(endpoint, rclone_bucket) == identity
    restic_check(
        mirror_url(endpoint, rclone_bucket), restic_password, env=endpoint.env(), read_data=False
    )


# -- 2. an unreadable new pack stops every later phase -------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="relay-unreadable-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(args: list[str], home: Path) -> AgentResult:
    """The agent as an unprivileged user: root reads any file whatever its mode."""
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    proc = subprocess.run(
        [*(drop if os.geteuid() == 0 else []), *args],
        env=agent_env({"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return AgentResult(proc.returncode, proc.stdout, proc.stderr)


def test_unreadable_new_pack_stops_index_and_snapshot_phases(
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    shared_dir: Path,
) -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("as root, needs setpriv to run the agent as another user")
    endpoint = rclone_server.endpoint
    repo = shared_dir / "repo"
    source = shared_dir / "src"
    small_repo(repo, source, restic_password, seed=5)
    config = config_for(shared_dir, endpoint, rclone_bucket)
    before = repo_keys(repo)
    write_random_tree(source / "more", files=4, size=(200_000, 600_000), seed=6)
    new_snapshot = restic_backup(repo, restic_password, source)
    new = repo_keys(repo) - before
    unreadable = biggest_pack(repo, exclude=before)
    bad_key = unreadable.relative_to(repo).as_posix()
    assert bad_key in new
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(shared_dir)], check=True)
    unreadable.chmod(0)

    result = as_nobody(agent_command(safety_args(config, repo)), shared_dir)
    assert result.returncode == 3, result.stderr
    assert bad_key in result.stderr
    assert "cannot read" in result.stderr
    remote = set(remote_keys(endpoint, rclone_bucket, PREFIX))
    assert f"{PREFIX}/{bad_key}" not in remote
    assert not any(k.startswith((f"{PREFIX}/index/", f"{PREFIX}/snapshots/")) for k in remote)
    url = mirror_url(endpoint, rclone_bucket)
    restic_check(url, restic_password, env=endpoint.env(), read_data=False)

    # Readable again: the next run mirrors everything, the new snapshot included.
    unreadable.chmod(0o400)
    done = as_nobody(agent_command(safety_args(config, repo)), shared_dir)
    assert done.returncode == 0, done.stderr
    assert new_snapshot in {
        s["id"] for s in restic_snapshots(url, restic_password, env=endpoint.env())
    }
    restic_check(url, restic_password, env=endpoint.env(), read_data=True)


# -- 3. a backup finishing during the scan is mirrored whole or not at all ------------------

RACING_BACKUP_HOOK = """
import os
from pathlib import Path
from local_agent.mirror import repository
from testbed.repos import restic_backup, write_random_tree

_repo = Path(os.environ["RACE_REPO"])
_source = Path(os.environ["RACE_SOURCE"])
_password = os.environ["RACE_PASSWORD"]
_round = [0]


def _race():
    # A second restic client finishing a backup right after one folder was read.
    _round[0] += 1
    write_random_tree(_source / f"race{_round[0]}", files=3, size=(100_000, 300_000),
                      seed=100 + _round[0])
    restic_backup(_repo, _password, _source)


def _after(fn):
    def wrapped(self, *args, **kwargs):
        result = fn(self, *args, **kwargs)
        _race()
        return result
    return wrapped


repository._Scanner.folder = _after(repository._Scanner.folder)
repository._Scanner.data = _after(repository._Scanner.data)
"""


def test_backup_finishing_between_folder_scans_is_mirrored_whole_or_not_at_all(
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    endpoint = rclone_server.endpoint
    repo = tmp_path / "repo"
    source = tmp_path / "src"
    first = small_repo(repo, source, restic_password, seed=7)
    config = config_for(tmp_path, endpoint, rclone_bucket)
    env = {
        "RACE_REPO": str(repo),
        "RACE_SOURCE": str(source),
        "RACE_PASSWORD": restic_password,
    }
    result = hooked_upload(RACING_BACKUP_HOOK, config, repo, env=env)
    assert result.returncode == 0, result.stderr
    url = mirror_url(endpoint, rclone_bucket)
    restic_check(url, restic_password, env=endpoint.env(), read_data=True)
    remote = {s["id"] for s in restic_snapshots(url, restic_password, env=endpoint.env())}
    assert first in remote
    local = {s["id"] for s in restic_snapshots(repo, restic_password)}
    assert len(local) >= 4, "the racing backups did not run"

    # The next run, with no race, catches up with everything.
    assert upload(config, repo).returncode == 0
    assert {s["id"] for s in restic_snapshots(url, restic_password, env=endpoint.env())} == local
    restic_check(url, restic_password, env=endpoint.env(), read_data=False)


# -- 5. --reconcile proves every object it adopts -------------------------------------------


def test_reconcile_replaces_a_corrupted_multipart_object_and_adopts_good_ones(
    restic_bin: str,
    moto_endpoint: S3Endpoint,
    unique_bucket: Callable[[S3Endpoint], str],
    restic_password: str,
    tmp_path: Path,
) -> None:
    """moto answers multipart ETags (`…-N`) in listings as S3 and B2 do (`rclone serve s3`
    lists the MD5 of the whole object, which the single-part check already covers)."""
    bucket = unique_bucket(moto_endpoint)
    repo = tmp_path / "repo"
    source = tmp_path / "src"
    small_repo(repo, source, restic_password, seed=8, big=12_000_000)
    write_random_tree(source / "second", files=2, size=100_000, seed=9)
    (source / "second" / "big2.bin").write_bytes(os.urandom(11_000_000))
    restic_backup(repo, restic_password, source)
    config = config_for(tmp_path, moto_endpoint, bucket)
    assert upload(config, repo).returncode == 0

    client = moto_endpoint.client()
    listed = {
        item["Key"]: item
        for item in client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/data/")["Contents"]
    }
    multipart = sorted(k for k, item in listed.items() if "-" in item["ETag"])
    assert len(multipart) >= 2, listed
    for key in multipart:
        # The agent finds the ETag of every good one locally, whatever part size it now uses.
        local = repo / key.removeprefix(f"{PREFIX}/")
        etag = listed[key]["ETag"].strip('"')
        candidates = part_size_candidates(local.stat().st_size, int(etag.split("-")[1]), 8 << 20)
        assert etag in multipart_etags(local, candidates).values(), key
    victim = multipart[0]
    size = listed[victim]["Size"]
    # Same size, wrong bytes, uploaded in parts of another size than the agent's.
    wrong = os.urandom(size)
    part = 6 * 1024 * 1024
    up = client.create_multipart_upload(Bucket=bucket, Key=victim)
    parts = []
    for number, start in enumerate(range(0, size, part), 1):
        etag = client.upload_part(
            Bucket=bucket,
            Key=victim,
            UploadId=up["UploadId"],
            PartNumber=number,
            Body=wrong[start : start + part],
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(
        Bucket=bucket, Key=victim, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert "-" in client.head_object(Bucket=bucket, Key=victim)["ETag"]

    # The reconciling run uses another part size than the one the mirror was made with.
    config = config_for(tmp_path, moto_endpoint, bucket, part_size="8MiB")
    result = upload(config, repo, "--reconcile")
    assert result.returncode == 0, result.stderr
    assert result.summary["uploaded_files"] == 1, result.summary
    assert result.summary["adopted_files"] == len(repo_keys(repo)) - 1
    body = client.get_object(Bucket=bucket, Key=victim)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == victim.rsplit("/", 1)[-1]
    again = upload(config, repo, "--reconcile")
    assert again.returncode == 0, again.stderr
    assert again.summary["uploaded_files"] == 0, again.summary
    restic_check(
        mirror_url(moto_endpoint, bucket), restic_password, env=moto_endpoint.env(), read_data=True
    )


# -- 6. the bytes sent are the bytes hashed --------------------------------------------------

CHANGING_FILE_HOOK = """
import os
from local_agent.mirror import uploader

_target = os.environ["CHANGE_KEY"]
_upload = uploader.ObjectUploader.upload


def _changed_then_upload(self, file, path, digest, data):
    # The file on disk changes after it was hashed, before its bytes are read to send.
    if file.key == _target:
        path.chmod(0o600)
        with path.open("r+b") as fh:
            fh.seek(file.size - 1000)
            byte = fh.read(1)
            fh.seek(file.size - 1000)
            fh.write(bytes([byte[0] ^ 0xFF]))
    return _upload(self, file, path, digest, data)


uploader.ObjectUploader.upload = _changed_then_upload
"""


@pytest.mark.parametrize(
    "how",
    [
        pytest.param({"multipart_threshold": "5MiB"}, id="multipart"),
        # 256 MiB / 32 threads: files above 8 MiB are read again to be sent.
        pytest.param({"multipart_threshold": "64MiB", "concurrency": 32}, id="single-put"),
    ],
)
def test_file_changing_between_hash_and_send_exits_3_naming_it_and_sends_nothing_wrong(
    how: dict[str, object],
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    endpoint = rclone_server.endpoint
    repo = tmp_path / "repo"
    small_repo(repo, tmp_path / "src", restic_password, seed=12, big=12_000_000)
    target = biggest_pack(repo)
    assert target.stat().st_size > 10 * 1024 * 1024
    key = target.relative_to(repo).as_posix()
    config = config_for(tmp_path, endpoint, rclone_bucket, **how)
    result = hooked_upload(CHANGING_FILE_HOOK, config, repo, env={"CHANGE_KEY": key})
    assert result.returncode == 3, result.stderr
    assert key in result.stderr
    assert "changed" in result.stderr
    remote = remote_keys(endpoint, rclone_bucket, PREFIX)
    assert f"{PREFIX}/{key}" not in remote
    assert not any(k.startswith((f"{PREFIX}/index/", f"{PREFIX}/snapshots/")) for k in remote)
    assert unfinished_uploads(endpoint, rclone_bucket) == []
    restic_check(
        mirror_url(endpoint, rclone_bucket), restic_password, env=endpoint.env(), read_data=True
    )


def test_resumed_multipart_upload_of_a_file_changed_after_hashing_is_not_completed(
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
    restic_password: str,
    tmp_path: Path,
) -> None:
    """A resumed multipart upload: the whole that would be completed must hash to the
    name, whichever run sent which part."""
    endpoint = rclone_server.endpoint
    repo = tmp_path / "repo"
    small_repo(repo, tmp_path / "src", restic_password, seed=14, big=40_000_000, pack_mib=64)
    target = biggest_pack(repo)
    assert target.stat().st_size > 30_000_000
    key = target.relative_to(repo).as_posix()
    slow = config_for(tmp_path, counting_proxy.endpoint, rclone_bucket, bandwidth_limit="8MiB/s")
    proc = start_agent(safety_args(slow, repo))
    try:
        while counting_proxy.count(operation="UploadPart", pred=lambda r: r.status == 200) < 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert unfinished_uploads(endpoint, rclone_bucket) == [f"{PREFIX}/{key}"]
    # The resumed run re-reads the parts the killed run sent, sends the rest, and the file
    # changes after it was hashed (in its last part, which no run sent yet).
    counting_proxy.reset()
    result = hooked_upload(
        CHANGING_FILE_HOOK,
        config_for(tmp_path, counting_proxy.endpoint, rclone_bucket),
        repo,
        env={"CHANGE_KEY": key},
    )
    assert counting_proxy.count(operation="CreateMultipartUpload") == 0  # it resumed
    assert result.returncode == 3, result.stderr
    assert key in result.stderr
    assert "changed" in result.stderr
    assert f"{PREFIX}/{key}" not in remote_keys(endpoint, rclone_bucket, PREFIX)
    assert unfinished_uploads(endpoint, rclone_bucket) == []
    restic_check(
        mirror_url(endpoint, rclone_bucket), restic_password, env=endpoint.env(), read_data=True
    )


# -- 7. everything the agent uploaded is new for the verification that follows --------------


def test_objects_of_a_deadline_stopped_run_are_marked_uploaded_in_the_next_manifest(
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    endpoint = rclone_server.endpoint
    repo = tmp_path / "repo"
    source = tmp_path / "src"
    small_repo(repo, source, restic_password, seed=13, big=30_000_000)
    # 30 MB at 4 MiB/s needs ~7 s: a 4 s deadline stops it half-way even on a loaded machine.
    slow = config_for(tmp_path, endpoint, rclone_bucket, bandwidth_limit="4MiB/s", deadline="4s")
    stopped = upload(slow, repo)
    assert stopped.returncode == 6, stopped.stderr
    first = set(remote_keys(endpoint, rclone_bucket, PREFIX))
    assert first, "the stopped run uploaded nothing"

    fast = config_for(tmp_path, endpoint, rclone_bucket)
    done = upload(fast, repo)
    assert done.returncode == 0, done.stderr
    manifest_key = done.summary["manifest"]["key"]
    body = endpoint.client().get_object(Bucket=rclone_bucket, Key=manifest_key)["Body"].read()
    _header, *lines = gzip.decompress(body).decode().splitlines()
    entries = {e["key"]: e for e in map(json.loads, lines)}
    assert set(entries) == repo_keys(repo)
    from_first = {k.removeprefix(f"{PREFIX}/") for k in first}
    not_new = sorted(k for k, e in entries.items() if not e["uploaded"])
    assert not_new == [], f"uploaded by the stopped run, not marked: {not_new}"
    assert from_first <= set(entries)

    # Once a manifest named them, they are no longer new.
    (source / "later.bin").write_bytes(os.urandom(1000))
    restic_backup(repo, restic_password, source)
    later = upload(fast, repo)
    assert later.returncode == 0, later.stderr
    body = (
        endpoint.client()
        .get_object(Bucket=rclone_bucket, Key=later.summary["manifest"]["key"])["Body"]
        .read()
    )
    entries = {
        e["key"]: e for e in map(json.loads, gzip.decompress(body).decode().splitlines()[1:])
    }
    assert not any(entries[k]["uploaded"] for k in from_first)


def test_multipart_upload_of_a_pack_pruned_before_it_finished_is_aborted(
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    counting_proxy: S3Proxy,
    restic_password: str,
    tmp_path: Path,
) -> None:
    """Found by the model: a run stopped half-way leaves a multipart upload the state store
    owns; if prune removes that pack before the next run, nothing resumed or aborted it, and
    B2 bills an unfinished upload until someone aborts it."""
    endpoint = rclone_server.endpoint
    repo, source = tmp_path / "repo", tmp_path / "src"
    small_repo(repo, source, restic_password, seed=31)
    # Every run through the proxy: the state store is per endpoint.
    proxied = counting_proxy.endpoint
    first = upload(config_for(tmp_path, proxied, rclone_bucket), repo)
    assert first.returncode == 0, first.stderr
    (source / "s31" / "big.bin").write_bytes(os.urandom(30_000_000))
    restic_backup(repo, restic_password, source)
    slow = config_for(tmp_path, proxied, rclone_bucket, bandwidth_limit="4MiB/s")
    proc = start_agent(upload_args(slow, repo))
    try:
        while counting_proxy.count(operation="UploadPart", pred=lambda r: r.status == 200) < 1:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    pending = unfinished_uploads(endpoint, rclone_bucket)
    assert pending, "the killed run left no multipart upload to test with"

    (source / "s31" / "big.bin").unlink()
    restic_backup(repo, restic_password, source)
    restic_forget(repo, restic_password, keep_last=1, max_unused="0")
    assert not {k.removeprefix(f"{PREFIX}/") for k in pending} & repo_keys(repo), "not pruned"

    done = upload(config_for(tmp_path, proxied, rclone_bucket), repo)
    assert done.returncode == 0, done.stderr
    assert done.summary["aborted_uploads"] == len(pending)
    assert unfinished_uploads(endpoint, rclone_bucket) == []
    restic_check(mirror_url(endpoint, rclone_bucket), restic_password, env=endpoint.env())


BUGGY_UPLOAD_HOOK = """
from local_agent.mirror import uploader

_upload = uploader.ObjectUploader.upload


def _buggy_upload(self, file, path, digest, data):
    # A programming error (not a RelayError) in one upload thread, on one pack.
    if file.key.startswith("data/"):
        raise AttributeError("'NoneType' object has no attribute 'etag'")
    return _upload(self, file, path, digest, data)


uploader.ObjectUploader.upload = _buggy_upload
"""


def test_unexpected_error_in_an_upload_thread_fails_the_run_and_stops_later_phases(
    restic_bin: str,
    rclone_server: RcloneS3Server,
    rclone_bucket: str,
    restic_password: str,
    tmp_path: Path,
) -> None:
    """Any exception in a worker thread, not only the agent's own errors, must stop the run
    with exit 1 and keep index/ and snapshots/ from going up without their packs."""
    endpoint = rclone_server.endpoint
    repo, source = tmp_path / "repo", tmp_path / "src"
    small_repo(repo, source, restic_password, seed=41)
    result = hooked_upload(BUGGY_UPLOAD_HOOK, config_for(tmp_path, endpoint, rclone_bucket), repo)
    assert result.returncode == 1, result.stderr
    assert "AttributeError" in result.stderr or "unexpected" in result.stderr
    uploaded = {k.removeprefix(f"{PREFIX}/") for k in remote_keys(endpoint, rclone_bucket, PREFIX)}
    assert not any(k.startswith(("index/", "snapshots/")) for k in uploaded), uploaded
    assert "Traceback" not in result.stderr

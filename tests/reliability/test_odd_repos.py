"""4c. Bad input: repositories holding things restic never wrote.

Each seeded trial drops a random handful of oddities into a restic-format repository —
symbolic links (to files, dangling, a data subfolder — followed), zero-byte files, unknown files and
folders, names that are not 64 hex characters (upper case, too short, too long, a newline
in them, bytes that are not UTF-8), temporary and dot files, a FIFO, a folder where a file
belongs, a pack in the wrong data subfolder, junk under ``locks/``, a top-level folder that
is a symbolic link (followed, as restic follows it), a zero-byte file named like a pack —
and runs a real upload.

What docs/mirror.md promises holds: each oddity is skipped with its documented reason
(``skipped`` in the JSON summary) and never uploaded; a zero-byte file whose name is the
SHA-256 of nothing is a valid restic file and is mirrored; a zero-byte file named like any
other pack is corrupt — exit 3, named, not uploaded, and nothing after the data phase goes
up; the bucket holds exactly the mirrorable files. Never a traceback.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.agent import run_agent, write_agent_config
from testbed.repos import FakeRepo, make_fake_restic_repo
from testbed.s3.endpoint import S3Endpoint
from testbed.s3.rclone import RcloneS3Server
from tests.reliability.common import Ledger, count, remote_files, sub_seed

REPO_ID = "odd"
PREFIX = f"restic/{REPO_ID}"
TRIALS = count("odd repositories: trials")
EMPTY_SHA = hashlib.sha256(b"").hexdigest()


@dataclass
class Expect:
    skipped: dict[str, str] = field(default_factory=dict)  # key → reason substring
    extra: set[str] = field(default_factory=set)  # mirrorable keys beyond the fake repo's
    corrupt: set[str] = field(default_factory=set)
    ignored: set[str] = field(default_factory=set)  # neither mirrored nor reported
    hidden: set[str] = field(default_factory=set)  # repo files the oddities replaced


Oddity = Callable[[FakeRepo, random.Random, Path, Expect], str]


def _hex(rng: random.Random, start: str = "") -> str:
    return start + "".join(rng.choice("0123456789abcdef") for _ in range(64 - len(start)))


def _folder(rng: random.Random) -> str:
    return rng.choice(["keys", "index", "snapshots"])


def symlink_to_file(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    data = rng.randbytes(100)
    target = outside / hashlib.sha256(data).hexdigest()
    target.write_bytes(data)
    key = f"{_folder(rng)}/{target.name}"
    (repo.root / key).symlink_to(target)
    exp.skipped[key] = "symbolic link"
    return "symlink to a file"


def dangling_symlink(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    name = _hex(rng)
    key = f"data/{name[:2]}/{name}"
    (repo.root / key).symlink_to(outside / "does-not-exist")
    exp.skipped[key] = "symbolic link"
    return "dangling symlink"


def symlinked_data_subfolder(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    sub = outside / f"sub{rng.randrange(10**6)}"
    sub.mkdir()
    data = repo.root / "data"
    empty = sorted(p.name for p in data.iterdir() if p.is_dir() and not any(p.iterdir()))
    name = rng.choice(empty)
    shutil.rmtree(repo.root / "data" / name)
    (repo.root / "data" / name).symlink_to(sub, target_is_directory=True)
    # Followed, as restic follows it (its target is empty: nothing to mirror).
    return "symlinked data subfolder"


def empty_restic_file(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    key = rng.choice([f"data/e3/{EMPTY_SHA}", f"keys/{EMPTY_SHA}", f"snapshots/{EMPTY_SHA}"])
    if (repo.root / key).exists():
        return "zero-byte file (already there)"
    (repo.root / key).write_bytes(b"")
    exp.extra.add(key)
    return "zero-byte file named by its hash"


def empty_pack(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    name = _hex(rng)
    key = f"data/{name[:2]}/{name}"
    (repo.root / key).write_bytes(b"")
    exp.corrupt.add(key)
    return "zero-byte pack (corrupt)"


def unknown_top_level(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    name = rng.choice(["photos", "README", "lost+found", ".DS_Store", "config.bak", "Data"])
    path = repo.root / name
    if path.exists():
        return "unknown entry (already there)"
    if rng.random() < 0.5:
        path.mkdir()
        (path / "file").write_bytes(b"x")
    else:
        path.write_bytes(b"x")
    exp.skipped[name] = "not part of a restic repository"
    return "unknown top-level entry"


def bad_name(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    folder = _folder(rng)
    hexname = _hex(rng)
    name = rng.choice(
        [hexname.upper(), hexname[:63], hexname + "0", "index.json", "bad\nname", "x" * 64]
    )
    (repo.root / folder / name).write_bytes(b"junk")
    exp.skipped[f"{folder}/{name}"] = "not a restic file name"
    return "non-hex name"


def non_utf8_name(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    folder = _folder(rng)
    raw = os.fsencode(repo.root / folder) + b"/\xff\xfe" + rng.randbytes(2).hex().encode()
    with open(raw, "wb") as fh:
        fh.write(b"junk")
    exp.skipped[f"{folder}/{os.fsdecode(os.path.basename(raw))}"] = "not a restic file name"
    return "non-UTF-8 name"


def temporary(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    pack = rng.choice(repo.data)
    name = rng.choice([f"{pack.name}-tmp-{rng.randrange(10**6)}", ".hidden", f"{pack.name}.part"])
    key = f"data/{pack.parent.name}/{name}"
    (repo.root / key).write_bytes(b"partial")
    exp.skipped[key] = "temporary file"
    return "temporary file"


def fifo(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    name = _hex(rng)
    key = f"data/{name[:2]}/{name}"
    os.mkfifo(repo.root / key)
    exp.skipped[key] = "not a regular file"
    return "FIFO"


def folder_for_file(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    key = f"{_folder(rng)}/{_hex(rng)}"
    (repo.root / key).mkdir()
    exp.skipped[key] = "not a regular file"
    return "folder named like a file"


def misplaced_pack(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    data = rng.randbytes(300)
    name = hashlib.sha256(data).hexdigest()
    wrong = "00" if not name.startswith("00") else "ff"
    key = f"data/{wrong}/{name}"
    (repo.root / key).write_bytes(data)
    exp.skipped[key] = "not a restic file name"
    return "pack in the wrong subfolder"


def file_in_data_root(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    key = f"data/{_hex(rng)}"
    (repo.root / key).write_bytes(b"junk")
    exp.skipped[key] = "not a data subfolder"
    return "file directly in data/"


def lock_junk(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    key = f"locks/{rng.choice([_hex(rng), 'stale.lock'])}"
    (repo.root / key).write_bytes(b"lock")
    exp.ignored.add(key)
    return "junk under locks/"


def symlinked_top_folder(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    folder = rng.choice(["index", "snapshots"])
    moved = outside / f"{folder}-elsewhere-{rng.randrange(10**6)}"
    shutil.move(str(repo.root / folder), moved)
    (repo.root / folder).symlink_to(moved, target_is_directory=True)
    return "top-level folder is a symlink (followed)"


def unreadable(repo: FakeRepo, rng: random.Random, outside: Path, exp: Expect) -> str:
    pack = rng.choice(repo.data)
    pack.chmod(0)
    exp.corrupt.add(pack.relative_to(repo.root).as_posix())  # cannot be read: exit 3
    return "unreadable pack"


ODDITIES: list[Oddity] = [
    symlink_to_file,
    dangling_symlink,
    symlinked_data_subfolder,
    empty_restic_file,
    empty_pack,
    unknown_top_level,
    bad_name,
    non_utf8_name,
    temporary,
    fifo,
    folder_for_file,
    misplaced_pack,
    file_in_data_root,
    lock_junk,
    symlinked_top_folder,
]
if os.geteuid() != 0:  # root reads anything: the case cannot be made as root
    ODDITIES.append(unreadable)


def test_odd_repository_contents_are_skipped_or_refused_clearly(
    rclone_server: RcloneS3Server,
    unique_bucket: Callable[[S3Endpoint], str],
    ledger: Ledger,
    tmp_path: Path,
) -> None:
    kinds: Counter[str] = Counter()
    failures: list[str] = []
    handled = 0
    planted = 0
    for trial in range(TRIALS):
        rng = random.Random(sub_seed("odd", trial))
        base = tmp_path / f"trial{trial}"
        outside = base / "outside"
        outside.mkdir(parents=True)
        repo = make_fake_restic_repo(
            base / "repo", packs=rng.randint(3, 8), pack_size=(100, 5000), seed=trial
        )
        for path in [repo.root, *repo.root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o700)  # the fakes are read-only like restic's; the test plants
        expect = Expect()
        chosen = rng.sample(ODDITIES, rng.randint(3, 7))
        # The symlinked top folder moves files: plant it first so others land through it.
        # The symlinked data subfolder hides what is in it: plant it last, in an empty one.
        chosen.sort(key=lambda f: (f is not symlinked_top_folder, f is symlinked_data_subfolder))
        names = [odd(repo, rng, outside, expect) for odd in chosen]
        kinds.update(names)
        planted += len(names)
        bucket = unique_bucket(rclone_server.endpoint)
        config = write_agent_config(
            base / "relay.toml", rclone_server.endpoint, bucket, state_dir=base / "state"
        )
        args = ["upload", "--repo", str(repo.root), "--repo-id", REPO_ID, "--config", str(config)]
        result = run_agent([*args, "--json"])
        label = f"trial {trial} ({names})"
        output = result.stdout + result.stderr
        if "Traceback" in output or result.returncode not in (0, 3):
            failures.append(f"{label}: exit {result.returncode}\n{output[-2000:]}")
            continue
        summary = result.summary
        reasons = {s["key"]: s["reason"] for s in summary["skipped"]}
        problems = []
        for key, reason in expect.skipped.items():
            if reason not in reasons.get(key, ""):
                problems.append(f"{key!r} not skipped as {reason!r}: {reasons.get(key)!r}")
        remote = set(remote_files(rclone_server.bucket_path(bucket), PREFIX))
        mirrorable = set(repo.relpaths()) | expect.extra
        if expect.corrupt:
            if result.returncode != 3 or set(summary["corrupt"]) != expect.corrupt:
                problems.append(f"expected exit 3 naming {expect.corrupt}: {summary['error']}")
            if remote & (expect.corrupt | {k for k in mirrorable if k.startswith("index/")}):
                problems.append("a corrupt file or a later phase was uploaded")
            if not remote <= mirrorable:
                problems.append(f"uploaded what is not mirrorable: {remote - mirrorable}")
        elif result.returncode != 0 or remote != mirrorable:
            problems.append(
                f"exit {result.returncode}; missing {mirrorable - remote}, "
                f"extra {remote - mirrorable}"
            )
        if remote & (set(expect.skipped) | expect.ignored):
            problems.append(f"skipped entries uploaded: {remote & set(expect.skipped)}")
        if problems:
            failures.append(f"{label}: {problems}")
        else:
            handled += len(names)
    ledger.add(
        "odd repository contents",
        trials=TRIALS,
        faults=planted,
        detected=handled,
        kinds=kinds,
        note="each skipped with its documented reason, or refused with exit 3 and named",
    )
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file whatever its mode")
def test_unreadable_pack_is_named_with_exit_3(
    rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    repo = make_fake_restic_repo(tmp_path / "repo", packs=3, pack_size=1000)
    victim = repo.data[1]
    victim.chmod(0)
    config = write_agent_config(
        tmp_path / "relay.toml", rclone_server.endpoint, rclone_bucket, state_dir=tmp_path / "s"
    )
    args = ["upload", "--repo", str(repo.root), "--repo-id", REPO_ID, "--config", str(config)]
    result = run_agent([*args, "--json"])
    assert result.returncode == 3, result.stderr
    assert victim.relative_to(repo.root).as_posix() in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_config_that_is_not_a_file_is_refused_without_hanging(
    kind: str, rclone_server: RcloneS3Server, rclone_bucket: str, tmp_path: Path
) -> None:
    """A FIFO (or a link to an endless device) where `config` belongs: opening it blocks
    or never ends, and Backrest gives a hook no timeout — so nothing may read it before the
    repository check refuses it (exit 3) and nothing was sent."""
    repo = make_fake_restic_repo(tmp_path / "repo", packs=2, pack_size=1000)
    config_file = repo.root / "config"
    config_file.unlink()
    if kind == "fifo":
        os.mkfifo(config_file)
    else:
        config_file.symlink_to("/dev/zero")
    config = write_agent_config(
        tmp_path / "relay.toml", rclone_server.endpoint, rclone_bucket, state_dir=tmp_path / "s"
    )
    args = ["upload", "--repo", str(repo.root), "--repo-id", REPO_ID, "--config", str(config)]
    result = run_agent([*args, "--json"], timeout=60)
    assert result.returncode == 3, result.stderr
    assert "config" in result.stderr
    assert "Traceback" not in result.stderr
    assert remote_files(rclone_server.bucket_path(rclone_bucket), PREFIX) == {}

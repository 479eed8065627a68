"""Scanning a restic repository built by hand in the restic on-disk format.

Every file except `config` is named by the SHA-256 of its bytes, packs live in
`data/<first two hex digits>/`, and `locks/` is transient.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from local_agent.errors import ExitCode, GuardError, RepositoryError
from local_agent.mirror.repository import (
    DELETE_ORDER,
    UPLOAD_ORDER,
    Kind,
    RepoFile,
    hash_file,
    kind_of_key,
    scan_repository,
)

HEX = "0123456789abcdef"


@dataclass
class Repo:
    root: Path
    files: dict[str, tuple[Kind, bytes]] = field(default_factory=dict)

    def add(self, kind: Kind, content: bytes | None = None) -> str:
        data = content if content is not None else os.urandom(64 + len(self.files))
        digest = hashlib.sha256(data).hexdigest()
        if kind is Kind.CONFIG:
            key = "config"
        elif kind is Kind.DATA:
            key = f"data/{digest[:2]}/{digest}"
        else:
            key = f"{kind.folder}/{digest}"
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files[key] = (kind, data)
        return key

    def write(self, rel: str, data: bytes = b"x") -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def make_repo(root: Path, *, packs: int = 5, all_data_dirs: bool = False) -> Repo:
    repo = Repo(root)
    root.mkdir(parents=True, exist_ok=True)
    repo.add(Kind.CONFIG, b"restic repository config (encrypted) " + os.urandom(32))
    repo.add(Kind.KEYS)
    (root / "data").mkdir(exist_ok=True)
    if all_data_dirs:  # `restic init` creates data/00 .. data/ff
        for a in HEX:
            for b in HEX:
                (root / "data" / f"{a}{b}").mkdir(exist_ok=True)
    for _ in range(packs):
        repo.add(Kind.DATA, os.urandom(1000 + len(repo.files)))
    repo.add(Kind.INDEX)
    repo.add(Kind.INDEX)
    repo.add(Kind.SNAPSHOTS)
    (root / "locks").mkdir(exist_ok=True)
    return repo


def skipped_reasons(root: Path) -> dict[str, str]:
    return {s.key: s.reason for s in scan_repository(root).skipped}


# -- what a scan finds -----------------------------------------------------------------------


def test_scan_finds_every_file_with_kind_and_size(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", packs=7, all_data_dirs=True)
    scan = scan_repository(repo.root)
    assert scan.root == repo.root
    assert set(scan.files) == set(repo.files)
    for key, (kind, data) in repo.files.items():
        found = scan.files[key]
        assert found == RepoFile(key=key, kind=kind, size=len(data))
    assert scan.skipped == []
    assert scan.total_bytes == sum(len(d) for _, d in repo.files.values())
    assert len(scan.by_kind(Kind.DATA)) == 7
    assert len(scan.by_kind(Kind.INDEX)) == 2
    assert len(scan.by_kind(Kind.SNAPSHOTS)) == 1
    assert len(scan.by_kind(Kind.KEYS)) == 1
    assert [f.key for f in scan.by_kind(Kind.CONFIG)] == ["config"]


def test_scanned_names_promise_their_hash(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    scan = scan_repository(repo.root)
    for key, found in scan.files.items():
        data = repo.files[key][1]
        if found.kind is Kind.CONFIG:
            assert found.expected_sha256 is None
        else:
            assert found.expected_sha256 == hashlib.sha256(data).hexdigest()
            assert found.name == found.expected_sha256


def test_scan_without_index_or_snapshots_folders(tmp_path: Path) -> None:
    # A freshly initialised repository has no index/ or snapshots/ content yet.
    root = tmp_path / "repo"
    repo = Repo(root)
    root.mkdir()
    repo.add(Kind.CONFIG, b"cfg")
    repo.add(Kind.KEYS)
    (root / "data").mkdir()
    scan = scan_repository(root)
    assert set(scan.files) == {"config", *(k for k in repo.files if k.startswith("keys/"))}


def test_upload_order_puts_snapshots_last_and_delete_order_reverses_it() -> None:
    assert UPLOAD_ORDER == (Kind.CONFIG, Kind.KEYS, Kind.DATA, Kind.INDEX, Kind.SNAPSHOTS)
    assert tuple(reversed(DELETE_ORDER)) == UPLOAD_ORDER
    assert Kind.DATA < Kind.INDEX < Kind.SNAPSHOTS


# -- what a scan passes over -------------------------------------------------------------------


def test_locks_are_neither_files_nor_skipped(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    lock = hashlib.sha256(b"lock").hexdigest()
    repo.write(f"locks/{lock}", b"lock")
    scan = scan_repository(repo.root)
    assert not any(k.startswith("locks") for k in scan.files)
    assert not any(s.key.startswith("locks") for s in scan.skipped)


@pytest.mark.parametrize(
    ("rel", "reason_word"),
    [
        ("keys/{h}-tmp-123", "temporary"),
        ("index/{h}-tmp-4567", "temporary"),
        ("data/{p}/{h}-tmp-99", "temporary"),
        ("snapshots/.{h}", "temporary"),
        ("snapshots/.DS_Store", "temporary"),
        ("index/{h}.tmp", "temporary"),
        ("index/{h}.part", "temporary"),
        ("index/not-a-hash", "restic file name"),
        ("keys/{H}", "restic file name"),  # upper case hex: restic writes lower case
        ("keys/{short}", "restic file name"),
        ("snapshots/{h}0", "restic file name"),
        ("data/{p}/zz{h62}", "restic file name"),
    ],
)
def test_scan_skips_non_restic_names(tmp_path: Path, rel: str, reason_word: str) -> None:
    repo = make_repo(tmp_path / "repo")
    h = hashlib.sha256(b"odd").hexdigest()
    rel = rel.format(h=h, H=h.upper(), short=h[:63], p=h[:2], h62=h[:62])
    repo.write(rel)
    scan = scan_repository(repo.root)
    assert rel not in scan.files
    assert set(scan.files) == set(repo.files)
    reasons = {s.key: s.reason for s in scan.skipped}
    assert rel in reasons
    assert reason_word in reasons[rel]


def test_scan_skips_pack_in_wrong_data_folder(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    data = os.urandom(100)
    h = hashlib.sha256(data).hexdigest()
    wrong = "00" if not h.startswith("00") else "01"
    rel = f"data/{wrong}/{h}"
    repo.write(rel, data)
    scan = scan_repository(repo.root)
    assert rel not in scan.files
    assert rel in {s.key for s in scan.skipped}


def test_scan_skips_pack_directly_under_data(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    data = os.urandom(100)
    h = hashlib.sha256(data).hexdigest()
    repo.write(f"data/{h}", data)
    reasons = skipped_reasons(repo.root)
    assert f"data/{h}" in reasons


@pytest.mark.parametrize("name", ["data/xyz", "data/AB", "data/0", "data/abc"])
def test_scan_skips_bad_data_subfolders(tmp_path: Path, name: str) -> None:
    repo = make_repo(tmp_path / "repo")
    h = hashlib.sha256(b"x").hexdigest()
    (repo.root / name).mkdir()
    repo.write(f"{name}/{h}")
    scan = scan_repository(repo.root)
    assert name in {s.key for s in scan.skipped}
    assert not any(k.startswith(name + "/") for k in scan.files)


@pytest.mark.parametrize("name", ["README.md", ".DS_Store", "@eaDir", "config.bak", "lost+found"])
def test_scan_skips_unknown_top_level_entries(tmp_path: Path, name: str) -> None:
    repo = make_repo(tmp_path / "repo")
    if name.startswith("@") or name == "lost+found":
        (repo.root / name).mkdir()
    else:
        repo.write(name)
    scan = scan_repository(repo.root)
    assert set(scan.files) == set(repo.files)
    assert name in {s.key for s in scan.skipped}


def test_scan_skips_directory_inside_a_kind_folder(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    h = hashlib.sha256(b"dir").hexdigest()
    (repo.root / "index" / h).mkdir()
    reasons = skipped_reasons(repo.root)
    assert f"index/{h}" in reasons
    assert "regular file" in reasons[f"index/{h}"]


def test_scan_skips_symlinks_with_a_reason(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    target = tmp_path / "outside"
    target.write_bytes(b"outside the repository")
    h = hashlib.sha256(b"outside the repository").hexdigest()
    (repo.root / "snapshots" / h).symlink_to(target)
    (repo.root / "data" / h[:2]).mkdir(exist_ok=True)
    (repo.root / "data" / h[:2] / h).symlink_to(target)
    scan = scan_repository(repo.root)
    reasons = {s.key: s.reason for s in scan.skipped}
    for key in (f"snapshots/{h}", f"data/{h[:2]}/{h}"):
        assert key not in scan.files
        assert "symbolic link" in reasons[key]


@pytest.mark.parametrize("entry", ["data", "config"])
def test_top_level_symlink_is_refused_or_followed(tmp_path: Path, entry: str) -> None:
    repo = make_repo(tmp_path / "repo")
    real = tmp_path / f"real-{entry}"
    (repo.root / entry).rename(real)
    (repo.root / entry).symlink_to(real)
    try:
        scan = scan_repository(repo.root)
    except RepositoryError:
        return  # refusing is acceptable
    kind = Kind.DATA if entry == "data" else Kind.CONFIG
    assert scan.by_kind(kind), f"{entry} symlink silently dropped: {scan.skipped}"


def test_name_with_trailing_newline_is_not_a_restic_file(tmp_path: Path) -> None:
    h = hashlib.sha256(b"nl").hexdigest()
    assert kind_of_key(f"keys/{h}\n") is None
    repo = make_repo(tmp_path / "repo")
    repo.write(f"index/{h}\n")
    assert f"index/{h}\n" not in scan_repository(repo.root).files


# -- refusing what is not a repository ---------------------------------------------------------


def _refused(root: Path) -> RepositoryError:
    with pytest.raises(RepositoryError) as info:
        scan_repository(root)
    assert info.value.exit_code == ExitCode.LOCAL_INTEGRITY == 3
    assert str(root) in info.value.message
    return info.value


def test_refuses_missing_directory(tmp_path: Path) -> None:
    err = _refused(tmp_path / "nowhere")
    assert "does not exist" in err.message
    assert "mounted" in err.message


def test_refuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x")
    assert "not a directory" in _refused(path).message


def test_refuses_empty_directory_like_an_unmounted_nas(tmp_path: Path) -> None:
    """The contract's "empty/unmounted source": a guard's refusal (exit 5), not damage."""
    root = tmp_path / "mnt"
    root.mkdir()
    with pytest.raises(GuardError) as info:
        scan_repository(root)
    assert info.value.exit_code == ExitCode.GUARD == 5
    assert str(root) in info.value.message
    assert "mounted" in info.value.message


@pytest.mark.parametrize("missing", ["config", "keys", "data"])
def test_refuses_repo_missing_an_essential_part(tmp_path: Path, missing: str) -> None:
    repo = make_repo(tmp_path / "repo")
    target = repo.root / missing
    if target.is_dir():
        for path in sorted(target.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        target.rmdir()
    else:
        target.unlink()
    err = _refused(repo.root)
    assert missing in err.message


def test_refuses_config_that_is_a_directory(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    (repo.root / "config").unlink()
    (repo.root / "config").mkdir()
    assert "config" in _refused(repo.root).message


@pytest.mark.parametrize("content", [None, "tmp", "dotfile"])
def test_refuses_repo_without_a_key(tmp_path: Path, content: str | None) -> None:
    repo = make_repo(tmp_path / "repo")
    for path in (repo.root / "keys").iterdir():
        path.unlink()
    h = hashlib.sha256(b"k").hexdigest()
    if content == "tmp":
        repo.write(f"keys/{h}-tmp-1")
    elif content == "dotfile":
        repo.write(f"keys/.{h}")
    err = _refused(repo.root)
    assert "keys/" in err.message


# -- kind_of_key -------------------------------------------------------------------------------


H = hashlib.sha256(b"kind").hexdigest()


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("config", Kind.CONFIG),
        (f"keys/{H}", Kind.KEYS),
        (f"index/{H}", Kind.INDEX),
        (f"snapshots/{H}", Kind.SNAPSHOTS),
        (f"data/{H[:2]}/{H}", Kind.DATA),
    ],
)
def test_kind_of_key_accepts_restic_names(key: str, kind: Kind) -> None:
    assert kind_of_key(key) is kind


@pytest.mark.parametrize(
    "key",
    [
        "",
        "config/x",
        "/config",
        "Config",
        f"locks/{H}",
        f"data/{H}",
        f"data/{'00' if not H.startswith('00') else '01'}/{H}",
        f"data/{H[:2]}/{H}/x",
        f"keys/{H[:63]}",
        f"keys/{H}0",
        f"keys/{H.upper()}",
        f"keys/{H}-tmp-1",
        f"keys/.{H}",
        f"index/{H}/",
        f"other/{H}",
        f"restic/keys/{H}",
        "manifest.jsonl.gz",
    ],
)
def test_kind_of_key_rejects_everything_else(key: str) -> None:
    assert kind_of_key(key) is None


@pytest.mark.parametrize(
    "folder", [H[:3], H[:1], "", H[:64]], ids=["three", "one", "empty", "whole-hash"]
)
def test_kind_of_key_requires_two_hex_data_folder(folder: str) -> None:
    assert kind_of_key(f"data/{folder}/{H}") is None


# -- hash_file -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 1024 * 1024, 1024 * 1024 + 17, 3 * 1024 * 1024])
def test_hash_file_digests(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    digest, kept = hash_file(path)
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.md5 == hashlib.md5(data, usedforsecurity=False).hexdigest()
    assert kept is None  # keep_below defaults to 0: nothing is kept


@pytest.mark.parametrize(
    ("size", "keep_below", "kept"),
    [
        (0, 10, True),
        (9, 10, True),
        (10, 10, False),
        (11, 10, False),
        (1000, 4096, True),
        (2 * 1024 * 1024, 3 * 1024 * 1024, True),
        (2 * 1024 * 1024, 1024 * 1024, False),
        (2 * 1024 * 1024, 2 * 1024 * 1024, False),
    ],
)
def test_hash_file_keeps_bytes_only_below_threshold(
    tmp_path: Path, size: int, keep_below: int, kept: bool
) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    digest, body = hash_file(path, keep_below=keep_below)
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    if kept:
        assert body == data
    else:
        assert body is None


def test_hash_file_missing_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    with pytest.raises(RepositoryError) as info:
        hash_file(path)
    assert str(path) in info.value.message
    assert info.value.exit_code == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file regardless of mode")
def test_hash_file_unreadable_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "secret-pack"
    path.write_bytes(b"data")
    path.chmod(0)
    try:
        with pytest.raises(RepositoryError) as info:
            hash_file(path)
        assert str(path) in info.value.message
        assert "cannot read" in info.value.message
    finally:
        path.chmod(0o600)


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists every directory regardless of mode")
def test_unlistable_folder_is_a_repository_error(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    index = repo.root / "index"
    index.chmod(0)
    try:
        with pytest.raises(RepositoryError) as info:
            scan_repository(repo.root)
        assert str(index) in info.value.message
    finally:
        index.chmod(0o700)


def test_hash_file_on_a_directory_names_the_path(tmp_path: Path) -> None:
    # The same OSError path as an unreadable file, but testable as root.
    path = tmp_path / "a-dir"
    path.mkdir()
    with pytest.raises(RepositoryError) as info:
        hash_file(path)
    assert str(path) in info.value.message
    assert "cannot read" in info.value.message


def test_known_packs_take_their_size_from_the_record_not_a_stat(tmp_path: Path) -> None:
    """A run with nothing new reads directories only: the state store's sizes stand in
    for a stat of every pack (restic never rewrites one). Unknown packs are still
    stat'ed, and a known name that is no longer a regular file is still skipped."""
    repo = make_repo(tmp_path / "repo", packs=3)
    packs = [k for k, (kind, _) in repo.files.items() if kind is Kind.DATA]
    recorded, unknown, replaced = packs
    (repo.root / replaced).unlink()
    (repo.root / replaced).symlink_to(repo.root / unknown)

    scan = scan_repository(repo.root, known_sizes={recorded: 999_999, replaced: 1})

    assert scan.files[recorded].size == 999_999  # the record, not the file
    assert scan.files[unknown].size == len(repo.files[unknown][1])
    assert replaced not in scan.files
    assert [s.key for s in scan.skipped] == [replaced]

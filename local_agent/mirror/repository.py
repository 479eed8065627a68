"""The local restic repository: what is in it, in which order it goes up, and whether each
file is what its name says.

restic names every file except `config` by the SHA-256 of its bytes and never changes a
file once written, so a file can be checked without the password and, once mirrored,
never needs reading again.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from local_agent.errors import GuardError, RepositoryError

HASH_CHUNK = 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX2 = re.compile(r"[0-9a-f]{2}")


class Kind(IntEnum):
    """Kinds of repository file, valued in upload order.

    A mirror interrupted at any point must never hold an index or snapshot that names a
    pack it lacks: packs before indexes, indexes before snapshots. Deletion runs in reverse.
    """

    CONFIG = 0
    KEYS = 1
    DATA = 2
    INDEX = 3
    SNAPSHOTS = 4

    @property
    def folder(self) -> str:
        return {
            Kind.CONFIG: "",
            Kind.KEYS: "keys",
            Kind.DATA: "data",
            Kind.INDEX: "index",
            Kind.SNAPSHOTS: "snapshots",
        }[self]


UPLOAD_ORDER = tuple(Kind)
# The order folders are read in: each folder before the ones its files reference, so the
# set of files found is closed under restic's references (see scan_repository).
SCAN_ORDER = ("config", "keys", "snapshots", "index", "data")
DELETE_ORDER = tuple(reversed(UPLOAD_ORDER))


@dataclass(frozen=True, slots=True)
class RepoFile:
    """One repository file by its repository-relative key (`data/ab/ab12…`)."""

    key: str
    kind: Kind
    size: int

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def expected_sha256(self) -> str | None:
        """The hash the name promises; `config` promises none."""
        return None if self.kind is Kind.CONFIG else self.name


@dataclass(frozen=True, slots=True)
class Digest:
    sha256: str
    md5: str


@dataclass
class Skipped:
    key: str
    reason: str


@dataclass
class RepositoryScan:
    """The files of one repository, plus what was passed over and why."""

    root: Path
    files: dict[str, RepoFile] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    def by_kind(self, kind: Kind) -> list[RepoFile]:
        return [f for f in self.files.values() if f.kind is kind]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def kind_of_key(key: str) -> Kind | None:
    """The kind of a repository-relative key if it is a well-formed restic file name."""
    if key == "config":
        return Kind.CONFIG
    parts = key.split("/")
    if len(parts) == 2 and _HEX64.fullmatch(parts[1]):
        for kind in (Kind.KEYS, Kind.INDEX, Kind.SNAPSHOTS):
            if parts[0] == kind.folder:
                return kind
    if (
        len(parts) == 3
        and parts[0] == "data"
        and _HEX2.fullmatch(parts[1])
        and _HEX64.fullmatch(parts[2])
        and parts[2].startswith(parts[1])
    ):
        return Kind.DATA
    return None


def _is_temporary(name: str) -> bool:
    # restic's local backend writes `<name>-tmp-<random>` then renames; editors and
    # sync tools leave dot-files.
    return "-tmp-" in name or name.startswith(".") or name.endswith((".tmp", ".part"))


class _Scanner:
    def __init__(self, root: Path, known_sizes: Mapping[str, int] | None = None) -> None:
        self.scan = RepositoryScan(root=root)
        self.known_sizes: Mapping[str, int] = known_sizes or {}

    def add(
        self, key: str, entry: os.DirEntry[str], kind: Kind | None, *, follow: bool = False
    ) -> None:
        try:
            st = entry.stat(follow_symlinks=follow)
        except OSError as exc:
            raise RepositoryError(f"{self.scan.root / key}: cannot stat: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            self.scan.skipped.append(Skipped(key, "symbolic link (restic never writes one)"))
        elif not stat.S_ISREG(st.st_mode):
            self.scan.skipped.append(Skipped(key, "not a regular file"))
        elif kind is None:
            reason = "temporary file" if _is_temporary(entry.name) else "not a restic file name"
            self.scan.skipped.append(Skipped(key, reason))
        else:
            self.scan.files[key] = RepoFile(key=key, kind=kind, size=st.st_size)

    def folder(self, folder: str, kind: Kind) -> None:
        for entry in _entries(self.scan.root / folder):
            key = f"{folder}/{entry.name}"
            self.add(key, entry, kind if _HEX64.fullmatch(entry.name) else None)

    def data(self) -> None:
        files = self.scan.files
        known = self.known_sizes
        data = Kind.DATA
        for sub in _entries(self.scan.root / "data"):
            # A data/XX folder linked to another disk is followed, as restic follows it:
            # skipping it would leave the mirror without packs the index names.
            if not (_HEX2.fullmatch(sub.name) and sub.is_dir()):
                self.scan.skipped.append(Skipped(f"data/{sub.name}", "not a data subfolder"))
                continue
            folder = f"data/{sub.name}/"
            # The loop a run with nothing new spends its time in (one entry per pack): the
            # common case, a regular file named like a pack of this folder, is handled
            # inline; everything else goes through `add`, which explains what it skips.
            for entry in _entries(Path(sub.path), ordered=False):
                name = entry.name
                key = folder + name
                size = known.get(key)
                if size is not None and entry.is_file(follow_symlinks=False):
                    files[key] = RepoFile(key, data, size)  # no stat: see scan_repository
                    continue
                if name.startswith(sub.name) and _HEX64.fullmatch(name):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        self.add(key, entry, data)  # names the file and the cause
                        continue
                    if stat.S_ISREG(st.st_mode):
                        files[key] = RepoFile(key, data, st.st_size)
                        continue
                    self.add(key, entry, data)
                else:
                    self.add(key, entry, None)


def _entries(path: Path, *, ordered: bool = True) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=_name) if ordered else list(it)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot list: {exc.strerror}") from None


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


def ensure_repository(root: Path) -> None:
    """Refuse anything that is not recognisably a restic repository (exit 3; an empty
    directory, the mount point of an unmounted disk, exit 5).

    Cheap enough to run before anything else is touched, so a missing or unmounted
    repository leaves no state behind.
    """
    if not root.exists():
        raise RepositoryError(f"repository {root} does not exist (is the disk or NAS mounted?)")
    if not root.is_dir():
        raise RepositoryError(f"repository {root} is not a directory")
    if not any(root.iterdir()):
        # The contract's "empty/unmounted source": a guard's refusal (exit 5), not damage.
        raise GuardError(
            f"repository {root} is an empty directory — is the disk or NAS mounted? "
            "Nothing was changed"
        )
    missing = [
        name
        for name, ok in (
            ("config", (root / "config").is_file()),
            ("keys/", (root / "keys").is_dir()),
            ("data/", (root / "data").is_dir()),
        )
        if not ok
    ]
    if missing:
        raise RepositoryError(
            f"{root} is not a restic repository (missing {', '.join(missing)}); "
            "if it lives on a NAS or external disk, is it mounted?"
        )


def scan_repository(root: Path, *, known_sizes: Mapping[str, int] | None = None) -> RepositoryScan:
    """Every mirrorable file of the repository at `root`.

    Refuses anything that is not recognisably a restic repository: an unmounted NAS
    mount point is an empty directory, and mirroring it must never look like "the
    repository is now empty".

    `known_sizes` are packs the destination already holds (the state store's record).
    restic never rewrites a file, so their size is taken from there instead of a stat of
    each: a run with nothing new then only reads the directories. (Whether the local
    bytes are still intact is `restic check`'s question, which runs before the hook; the
    remote copy of such a pack is not touched either way.)
    """
    ensure_repository(root)
    scanner = _Scanner(root, known_sizes)
    top: dict[str, os.DirEntry[str]] = {}
    for entry in _entries(root):
        # The repository's own top-level entries may be symlinks (a data/ folder moved to
        # another disk); they are followed, as restic follows them.
        if entry.name == "config" or (entry.name in SCAN_ORDER and entry.is_dir()):
            top[entry.name] = entry
        elif entry.name != "locks":  # transient; a mirrored lock would block a restore
            scanner.scan.skipped.append(Skipped(entry.name, "not part of a restic repository"))
    # Referencing folders before the folders they reference: restic writes packs, then
    # the index naming them, then the snapshot. A backup that finishes during the scan is
    # then either seen whole or its snapshot is not seen (and waits for the next run).
    for name in SCAN_ORDER:
        entry_or_none = top.get(name)
        if entry_or_none is None:
            continue
        if name == "config":
            scanner.add("config", entry_or_none, Kind.CONFIG, follow=True)
        elif name == "data":
            scanner.data()
        else:
            scanner.folder(name, Kind[name.upper()])
    scan = scanner.scan
    if not scan.by_kind(Kind.KEYS):
        raise RepositoryError(f"{root} is not a usable restic repository: keys/ holds no key")
    return scan


def hash_file(path: Path, *, keep_below: int = 0) -> tuple[Digest, bytes | None]:
    """SHA-256 and MD5 of a file in one read; files under `keep_below` bytes also come back
    as bytes, read in one piece, which saves reading them again (and copying) to upload."""
    sha = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False)
    try:
        with path.open("rb", buffering=0) as fh:
            if keep_below and os.fstat(fh.fileno()).st_size < keep_below:
                data = fh.readall()
                if len(data) < keep_below:
                    sha.update(data)
                    md5.update(data)
                    return Digest(sha256=sha.hexdigest(), md5=md5.hexdigest()), data
                sha.update(data)  # it grew after the stat: hash the rest as it streams
                md5.update(data)
            while chunk := fh.read(HASH_CHUNK):
                sha.update(chunk)
                md5.update(chunk)
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return Digest(sha256=sha.hexdigest(), md5=md5.hexdigest()), None


def multipart_etags(path: Path, part_sizes: Iterable[int]) -> dict[int, str]:
    """The S3 multipart ETag (MD5 of the parts' MD5s, `-N`) the file would have if uploaded
    in parts of each of `part_sizes`, from one read of the file."""
    states = {size: _PartHasher(size) for size in set(part_sizes) if size > 0}
    try:
        with path.open("rb", buffering=0) as fh:
            while chunk := fh.read(HASH_CHUNK):
                view = memoryview(chunk)
                for state in states.values():
                    state.update(view)
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return {size: state.etag() for size, state in states.items()}


class _PartHasher:
    __slots__ = ("digests", "filled", "md5", "part_size")

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.filled = 0
        self.digests: list[bytes] = []

    def update(self, view: memoryview) -> None:
        offset = 0
        while offset < len(view):
            take = min(self.part_size - self.filled, len(view) - offset)
            self.md5.update(view[offset : offset + take])
            self.filled += take
            offset += take
            if self.filled == self.part_size:
                self._close_part()

    def _close_part(self) -> None:
        self.digests.append(self.md5.digest())
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.filled = 0

    def etag(self) -> str:
        if self.filled or not self.digests:
            self._close_part()
        combined = hashlib.md5(b"".join(self.digests), usedforsecurity=False).hexdigest()
        return f"{combined}-{len(self.digests)}"

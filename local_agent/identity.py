"""One identity per repository (its guid), whichever command names it and however.

Without it a run lacking `--repo-guid` was recorded under the Backrest id, and `status` kept
a phantom second row the silence alarm reported forever. Where the guid comes from, and why
not from the repository itself: docs/backrest.md, "One identity per repository".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from local_agent.errors import ConfigError

log = logging.getLogger(__name__)

IDENTITIES_FILE = "identities.json"
# restic's `config` is a few hundred bytes.
CONFIG_DIGEST_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class ResolvedRepo:
    """A repository on this host: where it is, and its (id, guid)."""

    path: Path
    repo_id: str | None
    guid: str | None


@dataclass(frozen=True)
class RepoIdentity:
    repo_id: str | None
    guid: str | None

    @property
    def key(self) -> str | None:
        """What runs are recorded under (RepoRef.key): the guid, else the id."""
        return self.guid or self.repo_id


def config_digest(repo_path: Path | None) -> str | None:
    """SHA-256 of the repository's `config` file (readable without the password)."""
    if repo_path is None:
        return None
    path = repo_path / "config"
    try:
        # Only a regular file of a config's size is read: opening a FIFO blocks, a link to
        # /dev/zero never ends, and this runs before the run's deadline is armed. Anything
        # else is refused by the repository check that follows (exit 3).
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > CONFIG_DIGEST_LIMIT:
            return None
        with path.open("rb") as fh:
            return hashlib.sha256(fh.read(CONFIG_DIGEST_LIMIT)).hexdigest()
    except OSError:
        return None


class IdentityBook:
    """`identities.json`: `id:<repo id>`, `config:<digest>` → guid; `guid:<guid>` → id.

    Small and rewritten whole (temp file + rename), merged with what is on disk just before
    the write, so two commands finishing together lose nothing but a duplicate.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / IDENTITIES_FILE

    def load(self) -> dict[str, str]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s (%s); it is rebuilt by the next hook run", self.path, exc)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {str(k): str(v) for k, v in raw.items() if isinstance(v, str)}

    def remember(self, entries: Mapping[str, str]) -> None:
        current = self.load()
        if all(current.get(k) == v for k, v in entries.items()):
            return
        current.update(entries)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(current, sort_keys=True, indent=1), encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:  # identity is a convenience; never fail a run for it
            log.warning("could not remember the repository's identity in %s: %s", self.path, exc)
            tmp.unlink(missing_ok=True)


def _backrest_entries() -> list[tuple[str, str | None, str]]:
    """(id, guid, uri) of every repository in Backrest's config, or [] when not readable."""
    from local_agent.backrest import backrest_config_path, load_backrest_repos

    try:
        return [(r.id, r.guid, r.uri) for r in load_backrest_repos(backrest_config_path())]
    except ConfigError:
        return []


def _check_same_repository(repo_path: Path | None, repo_id: str, uri: str, digest: str) -> None:
    """Refuse `--repo PATH --repo-id ID` when Backrest's ID is another repository on this
    machine: its guid would be recorded (and its prefix filled) for the wrong one."""
    from local_agent.backrest import repo_path_from_uri

    try:
        theirs = config_digest(repo_path_from_uri(uri))
    except ConfigError:
        return  # a remote or unexpandable URI: nothing here to compare with
    if theirs is not None and theirs != digest:
        raise ConfigError(
            f"--repo {repo_path} is not the repository Backrest calls {repo_id!r} "
            f"({uri}): their config files differ; pass Backrest's path, or another --repo-id"
        )


def _valid_id(value: str | None) -> str | None:
    from local_agent.config import validate_repo_id

    if not value:
        return None
    try:
        return validate_repo_id(value)
    except ConfigError:
        return None


def resolve_identity(
    state_dir: Path,
    *,
    repo_id: str | None,
    repo_guid: str | None,
    repo_path: Path | None = None,
    learn: bool = True,
) -> RepoIdentity:
    """The repository's (id, guid), filled in from Backrest and from what this host learned.

    An explicit guid always wins. When both are known at the end, they are remembered
    (unless `learn` is false, e.g. for a dry run that must not write state).
    """
    from local_agent.config import validate_repo_guid

    book = IdentityBook(state_dir)
    known = book.load()
    digest = config_digest(repo_path)
    guid = repo_guid
    if guid is None and repo_id:
        for entry_id, entry_guid, entry_uri in _backrest_entries():
            if entry_id == repo_id and entry_guid:
                if digest:
                    _check_same_repository(repo_path, repo_id, entry_uri, digest)
                guid = entry_guid
                break
    if guid is None and repo_id:
        guid = known.get(f"id:{repo_id}")
    if guid is None and digest:
        guid = known.get(f"config:{digest}")
    if guid is not None:
        guid = validate_repo_guid(guid)
    if repo_id is None and guid is not None:
        found = next((i for i, g, _ in _backrest_entries() if g == guid), None)
        repo_id = _valid_id(found or known.get(f"guid:{guid}"))
    if learn and guid:
        entries = {f"guid:{guid}": repo_id} if repo_id else {}
        if repo_id:
            entries[f"id:{repo_id}"] = guid
        if digest:
            entries[f"config:{digest}"] = guid
        if entries:
            book.remember(entries)
    return RepoIdentity(repo_id=repo_id, guid=guid)

"""One identity per repository, whichever command names it and however.

The run store, `status`, the watchdog and notifications key a repository by its **guid**:
Backrest's ``repos[].guid``, which Backrest sets to restic's repository id. Commands name
repositories in different ways — the hook passes ``--repo-id``, ``--repo-guid`` and
``--repo``; a person types ``--repo-id home`` or ``--repo /srv/restic`` — and before this
module a run without ``--repo-guid`` was recorded under the id, so ``status`` showed a
phantom second row that ``--check-stale`` reported forever.

Where the guid can come from, in order:

1. ``--repo-guid`` (the hook passes ``{{ .Repo.Guid }}``).
2. Backrest's ``config.json`` (``repos[].guid`` of ``--repo-id``), when readable here.
3. What this host learned earlier: each time a command knows both the id and the guid
   (normally every hook run), it remembers ``id → guid`` and ``digest of the repository's
   `config` file → guid`` in ``identities.json`` in the state directory.

Not from the repository itself: restic keeps its repository id *inside* ``config``, which is
encrypted with the repository's master key, so reading it (``restic cat config``) needs the
password — which the hook does not receive and the agent must never ask for. The file's
SHA-256 is readable without the password and never changes (restic writes ``config`` once),
so it ties a path to the guid a hook run reported for it.

When no source knows a guid, the Backrest id is the identity (as before).
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


def _backrest_entries() -> list[tuple[str, str | None]]:
    """(id, guid) of every repository in Backrest's config, or [] when it is not readable."""
    from local_agent.backrest import backrest_config_path, load_backrest_repos

    try:
        return [(r.id, r.guid) for r in load_backrest_repos(backrest_config_path())]
    except ConfigError:
        return []


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
        for entry_id, entry_guid in _backrest_entries():
            if entry_id == repo_id and entry_guid:
                guid = entry_guid
                break
    if guid is None and repo_id:
        guid = known.get(f"id:{repo_id}")
    if guid is None and digest:
        guid = known.get(f"config:{digest}")
    if guid is not None:
        guid = validate_repo_guid(guid)
    if repo_id is None and guid is not None:
        found = next((i for i, g in _backrest_entries() if g == guid), None)
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

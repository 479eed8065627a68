"""What every command shares: which repository it is about, and which secrets to redact.

Its own module so command modules (main, doctor, ...) import it without importing each other.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cloud.integrations.redact import REDACTOR
from local_agent.errors import ConfigError
from local_agent.identity import ResolvedRepo, resolve_identity

__all__ = ["ResolvedRepo", "register_secrets", "resolve_repo"]


def resolve_repo(
    args: argparse.Namespace, state_dir: Path | None = None, *, learn: bool = True
) -> ResolvedRepo:
    """The repository from --repo, else from Backrest's config.json by --repo-id; its guid
    from --repo-guid, Backrest's config or what this host learned (local_agent.identity),
    so every command records a repository under the same key."""
    from local_agent.backrest import find_backrest_repo, repo_path_from_uri
    from local_agent.config import validate_repo_guid, validate_repo_id

    repo_id = validate_repo_id(args.repo_id) if args.repo_id else None
    guid = validate_repo_guid(args.repo_guid) if args.repo_guid else None
    if args.repo:
        path = repo_path_from_uri(args.repo)
    else:
        if not repo_id:
            raise ConfigError("pass --repo PATH, or --repo-id ID to read it from Backrest's config")
        found = find_backrest_repo(repo_id)
        if guid is None and found.guid:
            guid = validate_repo_guid(found.guid)
        path = repo_path_from_uri(found.uri)
    if state_dir is not None:
        identity = resolve_identity(
            state_dir, repo_id=repo_id, repo_guid=guid, repo_path=path, learn=learn
        )
        repo_id, guid = identity.repo_id, identity.guid
    return ResolvedRepo(path, repo_id, guid)


def register_secrets(config: Any) -> None:
    dest = config.destination
    REDACTOR.add(dest.secret_access_key.get_secret_value(), dest.access_key_id)
    REDACTOR.add(*(u.get_secret_value() for u in config.notify.urls))
    REDACTOR.add(*(u.get_secret_value() for u in config.notify.healthchecks.values()))
    REDACTOR.add(
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_SESSION_TOKEN"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
    )

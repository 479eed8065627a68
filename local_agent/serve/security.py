"""Who may trigger a run, and which repository a trigger may name.

The request only *names* a repository (Backrest's id, plus the guid and URI Backrest
rendered); the path mirrored always comes from configuration the caller cannot write: the
relay's `[serve] repos` or Backrest's config.json, mounted read-only. That path must then
really lie under `[serve] roots` (symlinks resolved) and belong to the service's user, so a
stolen token cannot point the relay at another directory of the host.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from local_agent.backrest import CHECK_ERROR, find_backrest_repo, repo_path_from_uri
from local_agent.config import RelayConfig, ServeConfig, validate_repo_guid, validate_repo_id
from local_agent.errors import ConfigError

log = logging.getLogger(__name__)

#: Fields a trigger may carry (what Backrest's template can fill in).
FIELDS = ("repo_id", "repo_guid", "repo_uri", "event", "error")
MAX_ERROR_TEXT = 8000
_EVENT_RE = re.compile(r"CONDITION_[A-Z_]{1,60}|manual")


class Refused(Exception):
    """A request the service answers with a 4xx and without running anything."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Trigger:
    repo_id: str
    repo_guid: str | None
    repo_uri: str | None
    event: str
    error: str

    @property
    def kind(self) -> str:
        """`mirror`, or `failure` for Backrest's failed-check hook (nothing is mirrored)."""
        return "failure" if self.event == CHECK_ERROR else "mirror"


@dataclass(frozen=True)
class Target:
    """A repository the service may run for, resolved from trusted configuration."""

    repo_id: str
    guid: str | None
    path: Path
    destination: str  # endpoint/bucket/prefix: one run at a time per destination

    @property
    def key(self) -> str:
        return self.guid or self.repo_id


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(value: str) -> bool:
    """Whether a Host header names this host by a loopback name or address (with or
    without a port): without a token, anything else is a name a web page rebound here."""
    value = value.strip().lower()
    name = value[1 : value.find("]")] if value.startswith("[") else value.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token(expected: str, authorization: str | None, *, basic: bool = False) -> bool:
    """Bearer token (or, where `basic`, HTTP Basic with the token as password: the status
    page, for browsers), compared in constant time. Only there: a browser resends a Basic
    login to any site's form POST, so the API would be open to cross-site requests. An
    empty `expected` means no token is configured (loopback only)."""
    if not expected:
        return True
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    offered = ""
    if scheme.lower() == "bearer":
        offered = value.strip()
    elif scheme.lower() == "basic" and basic:
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        offered = decoded.partition(":")[2]
    return hmac.compare_digest(offered.encode(), expected.encode())


def parse_trigger(body: bytes, content_type: str) -> Trigger:
    """A trigger from JSON or form data (the hook sends form data: curl encodes it)."""
    media = content_type.split(";")[0].strip().lower()
    raw: dict[str, object]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "request body is not UTF-8") from None
    if media == "application/json":
        try:
            parsed = json.loads(text, object_pairs_hook=_unique_keys)
        except ValueError as exc:
            raise Refused(400, str(exc) if isinstance(exc, _Duplicate) else _NOT_JSON) from None
        except RecursionError:
            raise Refused(400, _NOT_JSON) from None
        if not isinstance(parsed, dict):
            raise Refused(400, "request body must be a JSON object")
        raw = parsed
    elif media == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
        except ValueError:  # a field without '=' (strict parsing): malformed, not a 500
            raise Refused(400, "request body is not valid form data") from None
        raw = {}
        for name, value in pairs:
            if name in raw:
                raise Refused(400, f"field {name!r} given twice")
            raw[name] = value
    else:
        raise Refused(415, "send application/json or application/x-www-form-urlencoded")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:  # quoted and few: the refusal is logged, and names are the caller's text
        names = ", ".join(repr(name[:40]) for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise Refused(400, f"unknown field(s): {names}{more} (known: {', '.join(FIELDS)})")
    values: dict[str, str] = {}
    for name, item in raw.items():
        if not isinstance(item, str):
            raise Refused(400, f"field {name!r} must be a string")
        if "\x00" in item:
            raise Refused(400, f"field {name!r} contains a NUL character")
        values[name] = item
    try:
        repo_id = validate_repo_id(values.get("repo_id", ""))
        guid_text = values.get("repo_guid", "")
        guid = validate_repo_guid(guid_text) if guid_text else None
    except ConfigError as exc:
        raise Refused(400, exc.message) from None
    event = values.get("event") or "manual"
    if not _EVENT_RE.fullmatch(event):
        raise Refused(400, "field 'event' must be a Backrest hook condition (CONDITION_...)")
    error = values.get("error", "")[:MAX_ERROR_TEXT]
    return Trigger(repo_id, guid, values.get("repo_uri") or None, event, error)


_NOT_JSON = "request body is not valid JSON"


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are unique: a field given twice is refused, as in forms
    (json.loads would keep the last silently, so two readers could see two repositories)."""
    seen: dict[str, object] = {}
    for name, value in pairs:
        if name in seen:
            raise _Duplicate(f"field {name!r} given twice")
        seen[name] = value
    return seen


class _Duplicate(ValueError):
    pass


def resolve_target(
    trigger: Trigger, config: RelayConfig, env: Mapping[str, str] = os.environ
) -> Target:
    """The repository a trigger names, from trusted configuration, or Refused (4xx)."""
    serve = config.serve
    configured_uri, configured_guid = _configured(trigger.repo_id, serve, env)
    if trigger.repo_uri is not None and trigger.repo_uri != configured_uri:
        raise Refused(
            409, f"repository {trigger.repo_id!r}: the URI sent does not match the configured one"
        )
    if trigger.repo_guid and configured_guid and trigger.repo_guid != configured_guid:
        raise Refused(
            409, f"repository {trigger.repo_id!r}: the guid sent does not match the configured one"
        )
    guid = configured_guid or trigger.repo_guid
    try:
        path = repo_path_from_uri(configured_uri, env)
    except ConfigError as exc:
        raise Refused(400, exc.message) from None
    real = check_path(path, serve.roots)
    try:
        dest = config.destination_for(repo_id=trigger.repo_id, repo_guid=guid)
    except ConfigError as exc:
        raise Refused(400, exc.message) from None
    return Target(
        repo_id=trigger.repo_id,
        guid=guid,
        path=real,
        destination=f"{dest.endpoint_url}/{dest.bucket}/{dest.prefix}",
    )


def _configured(repo_id: str, serve: ServeConfig, env: Mapping[str, str]) -> tuple[str, str | None]:
    """(uri, guid) of `repo_id` from `[serve] repos`, else Backrest's config.json."""
    if repo_id in serve.repos:
        return serve.repos[repo_id], None
    config = Path(serve.backrest_config) if serve.backrest_config else None
    try:
        found = find_backrest_repo(repo_id, config, env)
    except ConfigError as exc:
        log.warning("repository %r: %s", repo_id, exc.message)  # the cause, for the operator
        raise Refused(
            404,
            f"unknown repository {repo_id!r}: not in [serve] repos nor in Backrest's config",
        ) from None
    return found.uri, found.guid


def check_path(path: Path, roots: list[str]) -> Path:
    """`path` resolved, if it is a directory under a root owned by this process's user."""
    if not path.is_absolute():
        raise Refused(400, f"repository path {str(path)!r} is not absolute")
    if ".." in path.parts:
        raise Refused(403, f"repository path {str(path)!r} contains '..'")
    if not roots:
        raise Refused(403, "no [serve] roots configured: the service mirrors nothing")
    real = Path(os.path.realpath(path))
    inside = any(real.is_relative_to(os.path.realpath(root)) for root in roots)
    if not inside:
        raise Refused(
            403, f"repository path {str(path)!r} lies outside the configured roots (after links)"
        )
    try:
        info = real.stat()
    except OSError:
        raise Refused(404, f"repository path {str(path)!r} does not exist here") from None
    if not real.is_dir():
        raise Refused(400, f"repository path {str(path)!r} is not a directory")
    if info.st_uid != os.geteuid():
        raise Refused(
            403,
            f"repository path {str(path)!r} belongs to uid {info.st_uid}, not to the "
            f"service's user (uid {os.geteuid()})",
        )
    return real

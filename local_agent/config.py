"""The agent's configuration: one TOML file, overridable key by key from the environment.

Validation happens before anything touches the repository or the bucket, and every
message names the key (and the file or environment variable it came from), because the
only place a Backrest user sees it is a hook log.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from cloud.contracts.destination import Destination, Provider
from cloud.contracts.manifest import (
    DEFAULT_MANIFEST_PREFIX,
    LEGACY_MANIFEST_PREFIX,
    MANIFEST_SIBLING_SUFFIX,
)
from cloud.integrations.s3 import S3Access
from local_agent.errors import ConfigError
from local_agent.mirror.objectlock import ObjectLockPolicy
from local_agent.units import parse_duration, parse_rate, parse_size

ENV_PREFIX = "BACKREST_RELAY_"
MAX_DURATION_SECONDS = 30 * 86400
MAX_DELETE_AFTER_SECONDS = 366 * 86400
CONFIG_ENV = "BACKREST_RELAY_CONFIG"
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# restic's repository id is 64 hex characters, but Backrest's guid migration gave older
# repositories other values (sha256 of the id, random hex, "migration-<hex>").
_GUID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_B2_HOST_RE = re.compile(r"^https?://s3\.([a-z0-9-]+)\.backblazeb2\.com/?$")


class _Section(BaseModel):
    # strict: `delete = "yes"` or `concurrency = true` is a mistake to report, not a value
    # to guess at (pydantic's lax mode would turn "yes" into True and true into 1).
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)


def _check_endpoint_url(value: str) -> str:
    """An endpoint is scheme://host[:port][/path]; credentials in it would end up in logs,
    events and manifests, so they are refused — and the value is never echoed."""
    if not value:
        return value
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError("must start with https:// or http:// followed by a host name")
    if "@" in urlsplit(value).netloc:
        raise ValueError(
            "must not contain a user name or password (user:password@host); set "
            "access_key_id and secret_access_key, or use the AWS credential chain"
        )
    return value.rstrip("/")


def _inside(inner: str, outer: str) -> bool:
    """Whether key prefix `inner` is `outer` or lies below it (whole path components)."""
    return bool(outer) and (inner + "/").startswith(outer + "/")


class ObjectLockConfig(_Section):
    """`[destination] object_lock = { mode = "governance", days = 30 }` (docs/security.md)."""

    mode: Literal["governance", "compliance"]
    days: int = Field(ge=1, le=36500)
    # Extend a kept object's retention once fewer days than this remain (default: a third
    # of `days`, at least 1): renewal costs one request per object per renewal.
    renew_days: int | None = Field(default=None, ge=1)
    # The verifier calls a lock ending sooner than this a problem (older objects).
    min_days: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _renew_inside(self) -> ObjectLockConfig:
        if self.renew_days is not None and self.renew_days >= self.days:
            raise ValueError("renew_days must be smaller than days")
        if self.min_days >= self.days:
            raise ValueError("min_days must be smaller than days")
        return self

    def policy(self) -> ObjectLockPolicy:
        return ObjectLockPolicy(
            mode=self.mode,
            days=self.days,
            renew_days=self.renew_days or max(1, self.days // 3),
            min_days=self.min_days,
        )


class DestinationConfig(_Section):
    provider: Provider = "b2"
    endpoint_url: str = ""
    region: str = ""
    bucket: str = Field(min_length=1)
    prefix: str = "restic/{repo_id}"
    manifest_prefix: str = DEFAULT_MANIFEST_PREFIX
    access_key_id: str = ""
    secret_access_key: SecretStr = SecretStr("")
    object_lock: ObjectLockConfig | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        # B2 also allows upper case letters in legacy names; S3 does not. Be lenient.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]", value):
            raise ValueError(f"{value!r} is not a valid bucket name")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return _check_endpoint_url(value)

    @field_validator("prefix", "manifest_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        for name in _PLACEHOLDER_RE.findall(value):
            if name not in ("repo_id", "repo_guid"):
                raise ValueError(
                    f"unknown placeholder {{{name}}} (use {{repo_id}} or {{repo_guid}})"
                )
        if ".." in value.split("/"):
            raise ValueError("must not contain '..'")
        stripped = value.strip("/")
        # The verifier refuses such a location (`cloud.logic.binding.canonical`): every
        # verification of it would be refused.
        if stripped and any(segment in ("", ".") for segment in stripped.split("/")):
            raise ValueError("must not contain an empty ('//') or '.' segment")
        return stripped

    @model_validator(mode="after")
    def _consistent(self) -> DestinationConfig:
        if bool(self.access_key_id) != bool(self.secret_access_key.get_secret_value()):
            raise ValueError(
                "set both access_key_id and secret_access_key, or neither "
                "(then the standard AWS credential chain is used)"
            )
        if self.provider == "s3" and not self.endpoint_url:
            raise ValueError("provider 's3' needs endpoint_url")
        if self.provider == "b2" and not self.endpoint_url and not self.region:
            raise ValueError("provider 'b2' needs endpoint_url or region")
        if self.provider == "b2" and not self.region:
            match = _B2_HOST_RE.match(self.endpoint_url)
            if match:
                self.region = match.group(1)
        if _inside(self.manifest_prefix, self.prefix):
            # Checked on the templates here (before anything runs); RelayConfig.
            # manifest_prefix_for checks the expanded values before the first request.
            raise ValueError(
                f"destination.manifest_prefix {self.manifest_prefix!r} lies inside the "
                f"repository prefix {self.prefix!r} (a restic repository must hold only "
                "restic's files); put manifests outside it"
            )
        return self

    def access(self) -> S3Access:
        return S3Access(
            provider=self.provider,
            endpoint_url=self.endpoint_url or None,
            region=self.region or None,
            access_key_id=self.access_key_id or None,
            secret_access_key=self.secret_access_key.get_secret_value() or None,
        )


class UploadConfig(_Section):
    concurrency: int = Field(default=8, ge=1, le=64)
    delete: bool = False
    max_delete_percent: float = Field(default=10, ge=0, le=100)
    # An object gone locally is deleted remotely only after staying gone this long: a
    # mistake or an attack on the backup host leaves the off-site copy whole meanwhile.
    delete_after: str = "7d"
    bandwidth_limit: str = ""
    deadline: str = "6h"
    multipart_threshold: str = "64MiB"
    part_size: str = "16MiB"
    lock_wait: str = "2m"
    direct_put: bool = True

    @field_validator("bandwidth_limit")
    @classmethod
    def _rate(cls, value: str) -> str:
        parse_rate(value)
        return value

    @field_validator("deadline", "lock_wait")
    @classmethod
    def _duration(cls, value: str) -> str:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError("must be longer than zero")
        if seconds > MAX_DURATION_SECONDS:
            raise ValueError("must be at most 30d (a hook that runs longer blocks Backrest)")
        return value

    @field_validator("delete_after")
    @classmethod
    def _delete_after(cls, value: str) -> str:
        seconds = parse_duration(value)
        if seconds and re.fullmatch(r"\s*[\d.]+\s*", value):
            # Elsewhere a plain number is seconds; here "7" almost surely means a week,
            # and read as seconds it would silently remove the safety window.
            raise ValueError(
                f'{value.strip()!r} has no unit: write e.g. 7d, 36h or 90m ("0" deletes at once)'
            )
        if seconds > MAX_DELETE_AFTER_SECONDS:
            raise ValueError("must be at most 366d")
        return value

    @field_validator("multipart_threshold", "part_size")
    @classmethod
    def _size(cls, value: str) -> str:
        size = parse_size(value)
        if size < 5 * 1024**2 or size > 5 * 1024**3:
            raise ValueError("must be between 5MiB and 5GiB (S3 part size limits)")
        return value

    @property
    def deadline_seconds(self) -> float:
        return parse_duration(self.deadline)

    @property
    def delete_after_seconds(self) -> float:
        return parse_duration(self.delete_after)

    @property
    def lock_wait_seconds(self) -> float:
        return parse_duration(self.lock_wait)

    @property
    def bandwidth_bytes_per_second(self) -> int | None:
        return parse_rate(self.bandwidth_limit)

    @property
    def multipart_threshold_bytes(self) -> int:
        return parse_size(self.multipart_threshold)

    @property
    def part_size_bytes(self) -> int:
        return parse_size(self.part_size)


class EventsConfig(_Section):
    publisher: Literal["local", "eventbridge", "none"] = "local"
    event_bus: str = "backrest-relay"
    region: str = ""
    endpoint_url: str = ""

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return _check_endpoint_url(value)


class NotifyConfig(_Section):
    urls: list[SecretStr] = Field(default_factory=list)
    success: Literal["always", "on_recovery", "never"] = "on_recovery"
    # Healthchecks ping URL per repository (Backrest id or guid → URL); the URL is a secret.
    healthchecks: dict[str, SecretStr] = Field(default_factory=dict)
    max_age: str = "26h"  # `status --check-stale`: older than this without a verified copy

    @field_validator("max_age")
    @classmethod
    def _max_age(cls, value: str) -> str:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError("must be longer than zero")
        if seconds > 366 * 86400:
            raise ValueError("must be at most 366d")
        return value

    @property
    def max_age_seconds(self) -> float:
        return parse_duration(self.max_age)

    def healthchecks_url(self, repo_id: str | None, repo_guid: str | None) -> str | None:
        for key in (repo_guid, repo_id):
            if key and key in self.healthchecks:
                return self.healthchecks[key].get_secret_value()
        return None


class VerifyConfig(_Section):
    """Local mode's verification of the bucket after each run (docs/verification.md).

    New objects are read back once; a run with nothing new reads nothing until `every`
    has passed since the last rotation, then lists the mirror once and re-reads older
    objects in key order, `budget` bytes at a time, continuing where the last slice ended.
    """

    every: str = "24h"
    budget: str = "1GiB"  # older objects re-read per rotation; "0" turns the rotation off

    @field_validator("every")
    @classmethod
    def _every(cls, value: str) -> str:
        seconds = parse_duration(value)
        if seconds < 0 or seconds > 366 * 86400:
            raise ValueError("must be between 0s and 366d")
        return value

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: str) -> str:
        parse_size(value)
        return value

    @property
    def every_seconds(self) -> float:
        return parse_duration(self.every)

    @property
    def budget_bytes(self) -> int:
        return parse_size(self.budget)


class StateConfig(_Section):
    dir: str = ""

    def path(self, env: Mapping[str, str] = os.environ) -> Path:
        if self.dir:
            return Path(os.path.expandvars(self.dir)).expanduser()
        base = env.get("XDG_STATE_HOME") or str(_home(env) / ".local" / "state")
        return Path(base) / "backrest-relay"


class ServeConfig(_Section):
    """`backrest-relay serve`: the HTTP sidecar (docs/docker.md)."""

    listen: str = "127.0.0.1:8787"
    # Bearer token callers must send; `BACKREST_RELAY_TOKEN` also sets it. Required unless
    # `listen` is a loopback address.
    token: SecretStr = SecretStr("")
    # Repositories are mirrored only when their real path lies under one of these.
    roots: list[str] = Field(default_factory=list)
    # Repositories the service may mirror besides those in Backrest's config.json (id → path).
    repos: dict[str, str] = Field(default_factory=dict)
    # Backrest's config.json (read-only); default: Backrest's own lookup ($BACKREST_CONFIG ...).
    backrest_config: str = ""
    max_queue: int = Field(default=100, ge=1, le=10_000)
    max_parallel: int = Field(default=2, ge=1, le=64)
    max_body: str = "16KiB"
    # How long a finished run stays visible at /v1/runs/{id} (by count).
    keep_runs: int = Field(default=1000, ge=10, le=100_000)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, colon, port = value.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:8787")
        return value

    @field_validator("max_body")
    @classmethod
    def _max_body(cls, value: str) -> str:
        size = parse_size(value)
        if not 256 <= size <= 1024 * 1024:
            raise ValueError("must be between 256B and 1MiB")
        return value

    @property
    def max_body_bytes(self) -> int:
        return parse_size(self.max_body)


class RelayConfig(_Section):
    destination: DestinationConfig
    upload: UploadConfig = Field(default_factory=UploadConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    def manifest_prefix_for(self, *, repo_id: str | None, repo_guid: str | None) -> str:
        """Where manifests (and verification reports) go. `{repo_guid}` falls back to the
        repository id when Backrest passed no guid, so a manual run still has a stable place.

        Unset, it is the repository prefix's sibling `<prefix>.relay/manifests`: outside the
        repository's folder but under the same string prefix, so one B2 key limited to the
        repository prefix covers everything the agent writes for that repository."""
        values = {"repo_id": repo_id or repo_guid, "repo_guid": repo_guid or repo_id}
        template = self.destination.manifest_prefix
        if not template:
            repo_prefix = self.destination_for(repo_id=repo_id, repo_guid=repo_guid).prefix
            if repo_prefix:
                return repo_prefix + MANIFEST_SIBLING_SUFFIX
            template = LEGACY_MANIFEST_PREFIX
        for name in _PLACEHOLDER_RE.findall(template):
            if not values[name]:
                raise ConfigError(
                    f"config: destination.manifest_prefix {template!r} needs --repo-id or "
                    "--repo-guid"
                )
        prefix = _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)] or "", template).strip("/")
        repo_prefix = self.destination_for(repo_id=repo_id, repo_guid=repo_guid).prefix
        if _inside(prefix, repo_prefix):
            raise ConfigError(
                f"config: destination.manifest_prefix {prefix!r} lies inside the repository "
                f"prefix {repo_prefix!r}; put manifests outside it"
            )
        return prefix

    def destination_for(self, *, repo_id: str | None, repo_guid: str | None) -> Destination:
        """The destination with `{repo_id}`/`{repo_guid}` expanded in its prefix."""
        template = self.destination.prefix
        values = {"repo_id": repo_id, "repo_guid": repo_guid}
        for name in _PLACEHOLDER_RE.findall(template):
            if not values[name]:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    f"config: destination.prefix {template!r} uses {{{name}}}: pass {flag}"
                )
        prefix = _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)] or "", template).strip("/")
        return Destination(
            provider=self.destination.provider,
            endpoint_url=self.destination.access().resolved_endpoint(),
            bucket=self.destination.bucket,
            prefix=prefix,
        )


@dataclass(frozen=True)
class LoadedConfig:
    config: RelayConfig
    path: Path | None


def validate_repo_id(repo_id: str) -> str:
    """Repository ids become part of object keys and file names: keep them tame."""
    if not _REPO_ID_RE.fullmatch(repo_id):
        raise ConfigError(
            f"--repo-id {repo_id!r}: use letters, digits, '.', '-' and '_' (at most 128)"
        )
    return repo_id


def validate_repo_guid(guid: str) -> str:
    if not _GUID_RE.fullmatch(guid):
        raise ConfigError(
            f"--repo-guid {guid!r}: expected Backrest's repository guid "
            "(letters, digits, '.', '-', '_')"
        )
    return guid


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(_home(env) / ".config")
    return Path(base) / "backrest-relay" / "config.toml"


def find_config_path(explicit: str | None, env: Mapping[str, str] = os.environ) -> Path | None:
    """`--config`, else `$BACKREST_RELAY_CONFIG`, else the XDG default if it exists."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} (from --config) does not exist")
        return path
    if env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV]).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} (from ${CONFIG_ENV}) does not exist")
        return path
    path = default_config_path(env)
    return path if path.is_file() else None


def load_config(explicit: str | None = None, env: Mapping[str, str] = os.environ) -> LoadedConfig:
    """Read, override from the environment and validate; ConfigError names what is wrong."""
    path = find_config_path(explicit, env)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: cannot read: {exc}") from None
    sources = {key: f"{path}" for key in _flat_keys(raw)} if path else {}
    _apply_env_overrides(raw, sources, env)
    if "destination" not in raw:
        where = (
            f"config file {path}"
            if path
            else (
                f"no config file (looked for --config, ${CONFIG_ENV}, {default_config_path(env)})"
            )
        )
        raise ConfigError(
            f"{where}: missing [destination] section with at least `bucket` "
            f"(or set {ENV_PREFIX}DESTINATION__BUCKET)"
        )
    try:
        config = RelayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, sources, path)) from None
    return LoadedConfig(config=config, path=path)


def _flat_keys(raw: Mapping[str, Any]) -> list[str]:
    keys: list[str] = []
    for section, body in raw.items():
        if isinstance(body, dict):
            keys.extend(f"{section}.{key}" for key in body)
        else:
            keys.append(section)
    return keys


def _section_fields() -> dict[str, dict[str, Any]]:
    """Section → setting → its declared type."""
    fields = {}
    for name, info in RelayConfig.model_fields.items():
        annotation = info.annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        fields[name] = {key: f.annotation for key, f in annotation.model_fields.items()}
    return fields


_ENV_INT_RE = re.compile(r"[+-]?\d+")
_ENV_FLOAT_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _typed_env_value(var: str, setting: str, annotation: Any, text: str) -> Any:
    """An environment value typed by its setting, as strictly as the TOML file: a boolean
    is `true` or `false` (any case), an integer is digits, a number is a decimal; strings
    are taken as they are. `yes`, `1` or `"8"` are refused, never guessed at."""
    stripped = text.strip()
    if annotation is bool:
        if stripped.lower() in ("true", "false"):
            return stripped.lower() == "true"
        expected = "true or false"
    elif annotation is int:
        if _ENV_INT_RE.fullmatch(stripped):
            return int(stripped)
        expected = "an integer"
    elif annotation is float:
        if _ENV_FLOAT_RE.fullmatch(stripped):
            return float(stripped)
        expected = "a number"
    else:
        return text
    # The value is not echoed: a misplaced secret must not reach a hook log.
    raise ConfigError(f"config: {setting}: expected {expected} (${var})")


def _apply_env_overrides(
    raw: dict[str, Any], sources: dict[str, str], env: Mapping[str, str]
) -> None:
    known = _section_fields()
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("__")
        if section not in known or key not in known[section]:
            raise ConfigError(
                f"environment variable {var}: no such setting {section}.{key} "
                f"(settings: {', '.join(f'{s}.{k}' for s in known for k in sorted(known[s]))})"
            )
        body = raw.setdefault(section, {})
        if not isinstance(body, dict):
            raise ConfigError(f"config: {section} must be a table, like [{section}]")
        value: Any = _typed_env_value(var, f"{section}.{key}", known[section][key], env[var])
        if (section, key) in (("notify", "urls"), ("serve", "roots")):
            value = _parse_list(var, value)
        elif (section, key) == ("destination", "object_lock"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(
                    f"environment variable {var}: expected a JSON object "
                    '{"mode": "governance", "days": 30}'
                ) from None
        elif (section, key) in (("notify", "healthchecks"), ("serve", "repos")):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(
                    f'environment variable {var}: expected a JSON object {{"repo-id": "url"}}'
                ) from None
        body[key] = value
        sources[f"{section}.{key}"] = f"${var}"


def _parse_list(var: str, value: str) -> list[str]:
    if value.strip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"environment variable {var}: not a JSON list") from None
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise ConfigError(f"environment variable {var}: must be a list of strings")
        return parsed
    # Apprise URLs may contain commas (mailto:...?to=a,b) but never white space.
    return value.split()


def _describe_validation_error(
    exc: ValidationError, sources: Mapping[str, str], path: Path | None
) -> str:
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        key = ".".join(str(part) for part in error["loc"][:2])
        origin = sources.get(key)
        if origin is None:
            # A rule spanning a section: name every place its keys came from.
            section = str(error["loc"][0]) + "." if error["loc"] else ""
            places = sorted({v for k, v in sources.items() if k.startswith(section)})
            origin = ", ".join(places) or (str(path) if path else "environment")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling; see docs/configuration.md)"
        elif error["type"] == "missing":
            message = "required setting is missing"
        # Never echo the offending value: it may be a secret.
        lines.append(f"{loc}: {message} ({origin})")
    return "config: " + "; ".join(lines)


def lock_check(config: RelayConfig) -> dict[str, Any]:
    """VerifyOptions for the lock check: what `[destination] object_lock` promises."""
    lock = config.destination.object_lock
    return {} if lock is None else {"lock_days": lock.days, "lock_min_days": lock.min_days}


def report_lock(config: RelayConfig) -> dict[str, Any]:
    """The Object Lock a verification report carries: the destination's, if configured."""
    lock = config.destination.object_lock
    return {} if lock is None else {"lock_mode": lock.mode.upper(), "lock_days": lock.days}

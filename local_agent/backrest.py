"""Backrest integration: find Backrest's config, read its repositories, build the hook snippet.

Backrest pipes the rendered hook to `sh` on stdin with its own environment, shows the script
in its log and leaves `${VAR}` in `.Repo.Uri` unexpanded: so the snippet templates only
non-secret, `.ShellEscape`d values and ends in `</dev/null`, and URIs are expanded and parsed
here as Backrest and restic do (docs/backrest.md). The rules followed are Backrest's own
(`internal/config/environment.go`, `proto/v1/config.proto`, `ExpandEnv` in
`internal/orchestrator/repo/env.go`; `.ShellEscape` quotes as `shlex.quote` does).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from local_agent.errors import ConfigError

__all__ = [
    "CHECK_SUCCESS",
    "ON_ERROR_IGNORE",
    "REMOTE_SCHEMES",
    "BackrestRepo",
    "backrest_config_path",
    "find_backrest_repo",
    "hook_command",
    "hook_object",
    "load_backrest_repos",
    "lookup_backrest_repo",
    "render_hook_snippet",
    "repo_path_from_uri",
]

#: The hook condition the mirror runs on: after ``restic check`` has passed, so that only a
#: repository restic itself just verified is copied off-site.
CHECK_SUCCESS = "CONDITION_CHECK_SUCCESS"
CHECK_ERROR = "CONDITION_CHECK_ERROR"

#: ``Hook.OnError`` for the snippet. Backrest's retry policies would re-run the whole check and
#: FATAL/CANCEL would mark a good check as failed; the agent reports its own failures instead.
ON_ERROR_IGNORE = "ON_ERROR_IGNORE"

#: restic backends other than ``local`` (restic's ``collectBackends``). A repository behind one
#: of these has no files on this machine to mirror.
REMOTE_SCHEMES = frozenset({"azure", "b2", "gs", "rclone", "rest", "s3", "sftp", "swift"})

# Backrest's ExpandEnv pattern, verbatim: `\${[^}]*}`. `$VAR` without braces is NOT expanded.
_ENV_REF = re.compile(r"\$\{([^}]*)\}")

# Hook condition enum names as protojson writes them (Hook.Condition in config.proto).
_CONDITION_NAME = re.compile(r"CONDITION_[A-Z_]+")

# The command text is itself a Go template: a literal "{{" would start an action.
_TEMPLATE_DELIM = "{{"

# Backrest template values the snippet passes. `.ShellEscape` takes a Go `string`: `.Repo.Id`,
# `.Repo.Uri` and `.Repo.Guid` are strings, but `.Event` is the enum type `v1.Hook_Condition`,
# and `{{ .ShellEscape .Event }}` fails at render time ("wrong type for value; expected string").
# `{{ .Event }}` prints the enum's name (CONDITION_...), which needs no quoting for sh.
_TEMPLATE_ARGS = (
    ("--repo", "{{ .ShellEscape .Repo.Uri }}"),
    ("--repo-id", "{{ .ShellEscape .Repo.Id }}"),
    ("--repo-guid", "{{ .ShellEscape .Repo.Guid }}"),
    ("--trigger", "{{ .Event }}"),
)
#: The failure hook: the check failed, so nothing is mirrored; the agent only reports it.
#: `.Error` is the check's error text (no secret: restic never prints the password).
_FAILURE_TEMPLATE_ARGS = (
    ("--repo", "{{ .ShellEscape .Repo.Uri }}"),
    ("--repo-id", "{{ .ShellEscape .Repo.Id }}"),
    ("--repo-guid", "{{ .ShellEscape .Repo.Guid }}"),
    ("--trigger", "{{ .Event }}"),
    ("--error", "{{ .ShellEscape .Error }}"),
)


@dataclass(frozen=True)
class BackrestRepo:
    """One entry of Backrest's ``repos`` list, reduced to the non-secret fields the agent uses.

    ``guid`` is ``None`` when the config has none (configs written before Backrest had the
    field). When present it is normally restic's repository id (``restic cat config``), but a
    repository migrated from an old config may carry a generated value instead.
    """

    id: str
    uri: str
    guid: str | None
    #: The commands of the repository's command hooks (to tell mirrored repositories apart).
    hook_commands: tuple[str, ...] = field(default=(), compare=False)
    #: ``checkPolicy.schedule`` as protojson wrote it (None: no checkPolicy at all).
    check_schedule: Mapping[str, object] | None = field(default=None, compare=False)

    @property
    def mirrored(self) -> bool:
        """Whether a hook of this repository runs backrest-relay (CLI or sidecar URL)."""
        return any("backrest-relay" in command for command in self.hook_commands)


def backrest_config_path(env: Mapping[str, str] = os.environ) -> Path:
    """Where Backrest reads its config, by Backrest's own rules (POSIX).

    ``$BACKREST_CONFIG``, else ``$XDG_CONFIG_HOME/backrest/config.json``, else
    ``~/.config/backrest/config.json``. Empty variables count as unset, as in Backrest.
    The hook inherits Backrest's environment, so inside a hook this finds the live config.
    """
    if explicit := env.get("BACKREST_CONFIG"):
        return Path(explicit)
    if xdg := env.get("XDG_CONFIG_HOME"):
        return Path(xdg) / "backrest" / "config.json"
    home = env.get("HOME")
    base = Path(home) if home else Path.home()
    return base / ".config" / "backrest" / "config.json"


def load_backrest_repos(path: Path) -> list[BackrestRepo]:
    """Read the repositories from Backrest's protojson config at ``path``.

    Only ``repos[].id`` (required), ``uri`` and ``guid`` are read; every other field, known or
    not, is ignored so that newer Backrest versions keep working. Missing optional fields take
    protojson's defaults. A missing, unreadable or malformed file is a :class:`ConfigError`
    that names the path and the cause, because the user has to fix or point at the file.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"Backrest config {path} does not exist; set BACKREST_CONFIG to Backrest's config.json"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read Backrest config {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Backrest config {path} is not UTF-8 text: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"Backrest config {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}"
        ) from None
    if not isinstance(document, dict):
        raise ConfigError(f"Backrest config {path} is not a JSON object")
    entries = document.get("repos")
    if entries is None:  # protojson omits (or nulls) an empty repeated field
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"Backrest config {path}: 'repos' is not a list")
    return [_parse_repo(path, index, entry) for index, entry in enumerate(entries)]


def _parse_repo(path: Path, index: int, entry: object) -> BackrestRepo:
    where = f"Backrest config {path}: repos[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} is not a JSON object")
    repo_id = entry.get("id")
    if not isinstance(repo_id, str) or not repo_id:
        raise ConfigError(f"{where} has no 'id'")
    uri = _optional_string(entry, "uri", where)
    guid = _optional_string(entry, "guid", where)
    return BackrestRepo(
        id=repo_id,
        uri=uri,
        guid=guid or None,
        hook_commands=_hook_commands(entry),
        check_schedule=_check_schedule(entry),
    )


def _hook_commands(entry: Mapping[str, object]) -> tuple[str, ...]:
    """``hooks[].actionCommand.command``; anything malformed is skipped, not an error (only
    used to recognise repositories that are mirrored)."""
    hooks = entry.get("hooks")
    commands: list[str] = []
    for hook in hooks if isinstance(hooks, list) else []:
        action = hook.get("actionCommand") if isinstance(hook, dict) else None
        command = action.get("command") if isinstance(action, dict) else None
        if isinstance(command, str):
            commands.append(command)
    return tuple(commands)


def _check_schedule(entry: Mapping[str, object]) -> Mapping[str, object] | None:
    policy = entry.get("checkPolicy")
    if not isinstance(policy, dict):
        return None
    schedule = policy.get("schedule")
    return schedule if isinstance(schedule, dict) else {}


def _optional_string(entry: Mapping[str, object], key: str, where: str) -> str:
    value = entry.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' is not a string")
    return value


def find_backrest_repo(
    repo_id: str, path: Path | None = None, env: Mapping[str, str] = os.environ
) -> BackrestRepo:
    """The repository ``repo_id`` from Backrest's config (``path``, else the default location).

    Not finding it is a :class:`ConfigError` that lists the ids the config does have, since a
    typo or a renamed repository is the usual cause.
    """
    config = path if path is not None else backrest_config_path(env)
    repos = load_backrest_repos(config)
    for repo in repos:
        if repo.id == repo_id:
            return repo
    known = ", ".join(repo.id for repo in repos) if repos else "none"
    raise ConfigError(
        f"repository {repo_id!r} is not in Backrest config {config} (known ids: {known})"
    )


def lookup_backrest_repo(
    repo_id: str, path: Path | None = None, env: Mapping[str, str] = os.environ
) -> BackrestRepo | None:
    """Like :func:`find_backrest_repo`, but ``None`` when this machine has no readable config.

    Backrest often runs elsewhere (a container, another host) than where the snippet is
    generated, so a config that does not exist or that this user may not read is "cannot
    verify", not an error. A config that *is* readable must be valid and must contain
    ``repo_id``: a snippet for a repository Backrest does not know would never run.
    """
    config = path if path is not None else backrest_config_path(env)
    try:
        with config.open("rb"):
            pass
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    except OSError:
        pass  # anything stranger: let find_backrest_repo report it with the path
    return find_backrest_repo(repo_id, config, env)


def repo_path_from_uri(uri: str, env: Mapping[str, str] = os.environ) -> Path:
    """The local directory of a Backrest repository URI (``.Repo.Uri`` or config ``uri``).

    First ``${VAR}`` references are expanded from ``env`` exactly where Backrest expands them
    (Backrest does this before calling restic, and the hook inherits Backrest's environment);
    ``$VAR`` without braces is left alone because Backrest leaves it alone. Unlike Backrest, an
    unset variable is an error rather than an empty string: mirroring ``/restic`` because
    ``${NAS}`` was unset would copy the wrong tree.

    Then the location is parsed as restic does: ``local:PATH`` (absolute or relative),
    a path (``/...``, ``../...``, or anything without a colon), or ``scheme:...`` for a backend.
    A remote backend is refused: only a repository on this machine's filesystem can be mirrored.
    A relative path is returned relative, as restic resolves it against Backrest's working
    directory, which the hook shares. ``~`` is not expanded (no shell sits in between).
    """
    location = _expand_env(uri, env)
    if not location:
        raise ConfigError(f"repository URI {uri!r} is empty")
    scheme, colon, rest = location.partition(":")
    if colon and scheme == "local":
        if not rest:
            raise ConfigError(f"repository URI {uri!r} has no path after 'local:'")
        return Path(rest)
    if colon and scheme in REMOTE_SCHEMES:
        raise ConfigError(
            f"repository URI {uri!r} uses restic's {scheme!r} backend; only local repositories "
            "(a path or local:/path) can be mirrored"
        )
    if colon and not _restic_is_path(location):
        raise ConfigError(
            f"repository URI {uri!r} names no known restic backend and is not a path; "
            "if the repository is in a local directory, write it as local:PATH"
        )
    return Path(location)


def _expand_env(uri: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if not name:
            raise ConfigError(f"repository URI {uri!r} contains an empty '${{}}' reference")
        try:
            return env[name]
        except KeyError:
            raise ConfigError(
                f"repository URI {uri!r} refers to environment variable {name!r}, which is "
                "not set (the hook inherits Backrest's environment: set it where Backrest runs)"
            ) from None

    return _ENV_REF.sub(substitute, uri)


def _restic_is_path(location: str) -> bool:
    """restic's ``isPath``: locations that are a path even though they contain a colon."""
    if location.startswith(("/", "\\", "../", "..\\")):
        return True
    return (
        len(location) >= 3
        and location[0].isascii()
        and location[0].isalpha()
        and location[1] == ":"
        and location[2] in "/\\"
    )


def hook_command(
    *, executable: str, config_path: Path | None, extra_args: Sequence[str] = ()
) -> str:
    """The shell command for Backrest's hook "Script" box (a Go template, one line).

    It passes only non-secret template values (never ``.Repo.Password`` or ``.Repo.Env``, which
    Backrest would print into its log), quotes the literal parts with :func:`shlex.quote` and
    the templated ones with ``.ShellEscape``, and ends in ``</dev/null``: Backrest feeds the
    script to ``sh`` on stdin, and a shell that reads its script lazily (bash does) would let the
    agent swallow whatever follows it. A relative ``config_path`` (or an executable given as a
    relative path) is made absolute because the hook runs in Backrest's working directory; a
    bare command name is left to Backrest's ``PATH``.
    """
    return _command(executable, "upload", _TEMPLATE_ARGS, config_path, extra_args)


def failure_hook_command(*, executable: str, config_path: Path | None) -> str:
    """The command for the CONDITION_CHECK_ERROR hook: `report-failure`, same quoting rules."""
    return _command(executable, "report-failure", _FAILURE_TEMPLATE_ARGS, config_path, ())


def _command(
    executable: str,
    subcommand: str,
    template_args: Sequence[tuple[str, str]],
    config_path: Path | None,
    extra_args: Sequence[str],
) -> str:
    words = [_literal(_absolute_command(executable), "executable"), subcommand]
    for flag, value in template_args:
        words += [flag, value]
    if config_path is not None:
        words += ["--config", _literal(str(_absolute(config_path)), "config path")]
    words += [_literal(arg, "extra argument") for arg in extra_args]
    words.append("</dev/null")
    return " ".join(words)


def _literal(value: str, what: str) -> str:
    quoted = shlex.quote(value)
    if _TEMPLATE_DELIM in quoted:
        raise ConfigError(
            f"{what} {value!r} contains '{{{{', which Backrest would read as a template action"
        )
    return quoted


def _absolute(path: Path) -> Path:
    return path.expanduser().absolute()


def _absolute_command(executable: str) -> str:
    if not executable:
        raise ConfigError("the agent's executable path is empty")
    if os.sep in executable or executable.startswith("~"):
        return str(_absolute(Path(executable)))
    return executable


def hook_object(command: str, *, conditions: Sequence[str] = (CHECK_SUCCESS,)) -> dict[str, object]:
    """One entry for ``repos[].hooks[]`` in Backrest's config.json, in protojson spelling.

    Field names and enum spellings are those of ``Hook`` in Backrest's ``config.proto``:
    ``conditions`` (enum names), ``onError`` and ``actionCommand.command``.
    """
    if not conditions:
        raise ValueError("a hook needs at least one condition")
    for condition in conditions:
        if not _CONDITION_NAME.fullmatch(condition):
            raise ValueError(f"{condition!r} is not a Backrest hook condition (CONDITION_...)")
    return {
        "conditions": list(conditions),
        "onError": ON_ERROR_IGNORE,
        "actionCommand": {"command": command},
    }


def render_hook_snippet(
    repo_id: str,
    *,
    executable: str,
    config_path: Path | None,
    fmt: Literal["json", "text"],
    backrest_config: Path | None = None,
    env: Mapping[str, str] = os.environ,
    hook: Literal["success", "failure", "both"] = "success",
) -> str:
    """What ``backrest-relay hook-snippet`` prints: the hook as JSON or as paste-able text.

    ``json`` is the hook object for ``repos[].hooks[]`` (pretty-printed; with ``hook="both"``
    a JSON array of the success and the failure hook). ``text`` is a short instruction written
    as ``#`` comment lines, followed by the command, so pasting all of it into Backrest's
    Script box is still a valid script; ``both`` prints the two blocks one after the other.

    When Backrest's config (``backrest_config``, else the default location) is readable here,
    ``repo_id`` must be in it, else :class:`ConfigError`. When there is no readable config on
    this machine (Backrest in Docker or on another host) the snippet is rendered anyway; the
    caller learns that it was not verified by calling :func:`lookup_backrest_repo` itself (it
    returns ``None``) and should say so on stderr. The command itself does not depend on
    ``repo_id``: Backrest fills in the repository when it runs the hook.
    """
    lookup_backrest_repo(repo_id, backrest_config, env)
    command = hook_command(executable=executable, config_path=config_path)
    failure = failure_hook_command(executable=executable, config_path=config_path)
    success_obj = hook_object(command)
    failure_obj = hook_object(failure, conditions=(CHECK_ERROR,))
    if fmt == "json":
        obj: object = {"success": success_obj, "failure": failure_obj}.get(
            hook, [success_obj, failure_obj]
        )
        return json.dumps(obj, indent=2, ensure_ascii=False)
    if fmt == "text":
        if hook == "failure":
            return _failure_instructions(repo_id) + failure
        if hook == "success":
            return _instructions(repo_id) + command
        return (
            "# --- Hook 1 of 2: mirror after every successful check ---\n"
            + _instructions(repo_id, both=True)
            + command
            + "\n\n# --- Hook 2 of 2: alert when a check fails ---\n"
            + _failure_instructions(repo_id)
            + failure
        )
    raise ValueError(f"unknown snippet format {fmt!r} (json or text)")


def _failure_instructions(repo_id: str) -> str:
    lines = (
        f"Second hook for Repositories > {repo_id}, so a failed check alerts too:",
        f'"Runs when..." {CHECK_ERROR}, "Error Behavior" {ON_ERROR_IGNORE}; paste the',
        "command below. It mirrors nothing; it only reports the failed check.",
    )
    return "".join(f"# {line}\n" for line in lines)


def _instructions(repo_id: str, *, both: bool = False) -> str:
    lines = (
        f"In Backrest open Repositories > {repo_id} > Edit > Hooks > Add Hook > Command.",
        f'Set "Runs when..." to {CHECK_SUCCESS} and "Error Behavior" to {ON_ERROR_IGNORE},',
        "and paste the command below into the Script box. Add it to the repository, not to",
        "a plan: check conditions fire only on repository hooks. The command passes no secret;",
        "it ends in </dev/null so the agent cannot read the rest of the script.",
    ) + (() if both else ("For the second hook that reports failed checks: --hook failure.",))
    return "".join(f"# {line}\n" for line in lines)

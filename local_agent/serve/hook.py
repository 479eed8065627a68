"""`hook-snippet --via http`: the command hook for Backrest's Docker image (curl, no Python).

The template values reach curl as shell words quoted by Backrest's `.ShellEscape`, and curl
form-encodes them (`--data-urlencode`), so no value can break out of the request whatever it
contains. The token is read from `$BACKREST_RELAY_TOKEN` when the hook runs: Backrest's log
shows the rendered script, never the token. The service streams the run and ends with
`backrest-relay: exit N`; the hook echoes every line and succeeds only if that last line is
`exit 0`, without `exit`ing, so lines after the snippet still run.
"""

from __future__ import annotations

import json
import shlex
from typing import Literal
from urllib.parse import urlsplit

from local_agent.backrest import CHECK_ERROR, CHECK_SUCCESS, hook_object
from local_agent.errors import ConfigError
from local_agent.serve.runs import FINAL_PREFIX, KILL_GRACE_SECONDS

TOKEN_ENV = "BACKREST_RELAY_TOKEN"  # noqa: S105 (a variable name)

_FIELDS = (
    ("repo_id", "{{ .ShellEscape .Repo.Id }}"),
    ("repo_guid", "{{ .ShellEscape .Repo.Guid }}"),
    ("repo_uri", "{{ .ShellEscape .Repo.Uri }}"),
    ("event", "{{ .Event }}"),
)
_FAILURE_FIELDS = (*_FIELDS, ("error", "{{ .ShellEscape .Error }}"))


def http_hook_command(url: str, *, max_time: int, failure: bool = False) -> str:
    """The script for Backrest's Script box (a Go template), several lines of plain sh."""
    endpoint = _endpoint(url) + "/v1/runs"
    fields = _FAILURE_FIELDS if failure else _FIELDS
    lines = [
        "{ curl --silent --show-error --no-buffer --max-time " + str(max_time) + " \\",
        f'    --header "Authorization: Bearer ${{{TOKEN_ENV}:?is not set in the environment '
        'of Backrest}" \\',
        *(f"    --data-urlencode {name}={value} \\" for name, value in fields),
        f"    {shlex.quote(endpoint)} </dev/null 2>&1 ||",
        '  echo "backrest-relay: curl failed (exit $?)"; } |',
        '{ last=; while IFS= read -r line || [ -n "$line" ]; do',
        "    printf '%s\\n' \"$line\"; last=$line",
        f"  done; [ \"$last\" = '{FINAL_PREFIX}0' ]; }}",
    ]
    return "\n".join(lines)


def _endpoint(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url {url!r}: expected http://HOST:PORT (the relay service)")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("--url: no credentials, query or fragment (the token comes from env)")
    if "{{" in url or "'" in url:
        raise ConfigError("--url must not contain '{{' or quotes")
    return url.rstrip("/")


def render_http_snippet(
    repo_id: str,
    *,
    url: str,
    deadline_seconds: float,
    fmt: Literal["json", "text"],
    hook: Literal["success", "failure", "both"] = "both",
) -> str:
    """What `hook-snippet --via http` prints (text for the Script box, or config.json JSON)."""
    max_time = int(deadline_seconds + KILL_GRACE_SECONDS + 60)
    success = http_hook_command(url, max_time=max_time)
    failure = http_hook_command(url, max_time=120, failure=True)
    if fmt == "json":
        objects = {
            "success": hook_object(success),
            "failure": hook_object(failure, conditions=(CHECK_ERROR,)),
        }
        chosen: object = objects.get(hook, list(objects.values()))
        return json.dumps(chosen, indent=2, ensure_ascii=False)
    intro = (
        f"In Backrest open Repositories > {repo_id} > Edit > Hooks > Add Hook > Command.",
        f'"Runs when..." {CHECK_SUCCESS}, "Error Behavior" ON_ERROR_IGNORE; paste the script.',
        f"Backrest's container needs {TOKEN_ENV} in its environment (docs/docker.md); the",
        "script never contains the token. It prints the relay's progress and fails unless the",
        "mirror succeeded.",
    )
    fail_intro = (
        f'Second hook on the same repository: "Runs when..." {CHECK_ERROR},',
        '"Error Behavior" ON_ERROR_IGNORE. It mirrors nothing; it reports the failed check.',
    )
    blocks = {
        "success": "".join(f"# {line}\n" for line in intro) + success,
        "failure": "".join(f"# {line}\n" for line in fail_intro) + failure,
    }
    if hook != "both":
        return blocks[hook]
    return blocks["success"] + "\n\n" + blocks["failure"]

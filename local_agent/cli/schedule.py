"""`backrest-relay schedule --print systemd|cron`: what runs the local silence alarm.

No hook can report that hooks stopped running, so local mode needs a scheduler of its own
to run `status --check-stale` (local_agent/silence.py) every hour. This prints ready-to-use
units for systemd (a oneshot service and its timer) or one crontab line.

What they pin, because the classic failure is a check that looks at the wrong place: the
absolute path of this executable, the config file (`--config`), the resolved state
directory (`BACKREST_RELAY_STATE__DIR`, so a timer running as another user or without
`XDG_STATE_HOME` still reads the run store the hook writes) and `BACKREST_CONFIG` when set
(so the check knows Backrest's mirrored repositories). They must run as a user that may read
that state directory.
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Literal

SERVICE = "backrest-relay-stale"


def _executable() -> str:
    found = shutil.which("backrest-relay") or sys.argv[0]
    return str(Path(found).resolve())


def check_command(executable: str, config_path: Path | None) -> list[str]:
    words = [executable, "status", "--check-stale"]
    if config_path is not None:
        words += ["--config", str(config_path.resolve())]
    return words


def pinned_env(state_dir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ) if env is None else env
    pinned = {"BACKREST_RELAY_STATE__DIR": str(state_dir.expanduser().resolve())}
    if env.get("BACKREST_CONFIG"):
        pinned["BACKREST_CONFIG"] = str(Path(env["BACKREST_CONFIG"]).expanduser().resolve())
    return pinned


def _systemd_quote(word: str) -> str:
    """A word for ExecStart=/Environment=: double-quoted when needed, `%` doubled."""
    word = word.replace("%", "%%")
    if word and all(c.isalnum() or c in "/._-=:+,@" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_systemd(command: list[str], env: dict[str, str], user: str) -> str:
    environment = "\n".join(
        f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in sorted(env.items())
    )
    exec_start = " ".join(_systemd_quote(w) for w in command)
    return f"""\
# /etc/systemd/system/{SERVICE}.service
# backrest-relay's silence alarm: alerts (notify.urls, Healthchecks /fail) when a repository
# has no verified off-site copy within its staleness window, once per day while it lasts.
# Exit 3 (stale, or no run known) marks the run failed, so `systemctl --failed` shows it too.
[Unit]
Description=backrest-relay: alert when an off-site copy is stale
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
User={user}
{environment}
ExecStart={exec_start}

# /etc/systemd/system/{SERVICE}.timer
[Unit]
Description=Run backrest-relay's silence alarm every hour

[Timer]
OnCalendar=hourly
RandomizedDelaySec=5m
Persistent=true

[Install]
WantedBy=timers.target

# Install: save the two units above under those names, then
#   sudo systemctl daemon-reload && sudo systemctl enable --now {SERVICE}.timer
# (As user units: ~/.config/systemd/user/, drop User=, use systemctl --user; the user
# must stay logged in or have `loginctl enable-linger`.)
"""


def render_cron(command: list[str], env: dict[str, str], user: str) -> str:
    words = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    words += [shlex.quote(w) for w in command]
    line = " ".join(words).replace("%", "\\%")  # cron turns a bare % into a newline
    return f"""\
# backrest-relay's silence alarm, hourly. Add with `crontab -e` as {user} (the user whose
# state directory is pinned below). The table goes to /dev/null; cron mails only what the
# check writes to stderr: the stale repositories and any error.
17 * * * * {line} >/dev/null
"""


def render_schedule(
    kind: Literal["systemd", "cron"],
    *,
    config_path: Path | None,
    state_dir: Path,
    executable: str | None = None,
    env: dict[str, str] | None = None,
    user: str | None = None,
) -> str:
    command = check_command(executable or _executable(), config_path)
    pinned = pinned_env(state_dir, env)
    who = user or getpass.getuser()
    if kind == "systemd":
        return render_systemd(command, pinned, who)
    return render_cron(command, pinned, who)

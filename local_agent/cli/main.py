"""`backrest-relay`: the command Backrest's hook runs, and the tools around it.

Exit codes are a contract (docs/cli.md): 0 ok · 1 unexpected · 2 usage/config · 3 local
repository integrity · 4 destination · 5 safety guard · 6 deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cloud.integrations.redact import REDACTOR, RedactingFormatter
from local_agent import __version__
from local_agent.cli.common import register_secrets, resolve_repo
from local_agent.errors import ConfigError, ExitCode, RelayError
from local_agent.identity import RepoIdentity, resolve_identity

if TYPE_CHECKING:
    from collections.abc import Callable

    from _typeshed import DataclassInstance

    from local_agent.config import RelayConfig

log = logging.getLogger("backrest_relay")
_Request = TypeVar("_Request", bound="DataclassInstance")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # exit 2 with our prefix, never a traceback
        self.print_usage(sys.stderr)
        sys.stderr.write(f"backrest-relay: error: {message}\n")
        raise SystemExit(int(ExitCode.USAGE))


def _repo_args(p: argparse.ArgumentParser, *, required_id: bool = False) -> None:
    p.add_argument("--repo", help="repository path (also local:/path); else from Backrest")
    p.add_argument("--repo-id", required=required_id, help="Backrest repository id")
    p.add_argument("--repo-guid", help="restic repository id (Backrest's {{ .Repo.Guid }})")


def _global_args(p: argparse.ArgumentParser) -> None:
    """`-v` and `--config`, accepted before or after the subcommand.

    Both the main parser and every subparser know them; SUPPRESS as default keeps a value
    given before the subcommand from being reset by the subparser's own default.
    """
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more detail"
    )
    p.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="config file (default: $BACKREST_RELAY_CONFIG or XDG)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="backrest-relay",
        description="Verified off-site copies of Backrest/restic repositories.",
    )
    parser.add_argument("--version", action="version", version=f"backrest-relay {__version__}")
    _global_args(parser)
    common = _Parser(add_help=False)
    _global_args(common)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parsed: argparse.ArgumentParser = sub.add_parser(name, parents=[common], **kwargs)
        return parsed

    up = add("upload", help="mirror a restic repository to the destination")
    _repo_args(up)
    up.add_argument("--trigger", default="manual", help="what started the run ({{ .Event }})")
    up.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    up.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    up.add_argument(
        "--reconcile",
        action="store_true",
        help="re-read the destination listing once instead of trusting the state store",
    )

    ver = add("verify", help="prove the off-site copy against its manifest")
    ver.add_argument("--repo-id", help="Backrest repository id")
    ver.add_argument("--repo-guid", help="restic repository id (Backrest's guid)")
    ver.add_argument("--run", help="verify the manifest of this upload run (default: newest)")
    ver.add_argument(
        "--deep",
        help="also read back older objects: a share (5%%) or a size (2GiB)",
    )
    ver.add_argument(
        "--time-limit",
        metavar="DURATION",
        help="stop reading after this long (e.g. 30m, 2h): progress is saved, exit 6, and "
        "the next verify continues from there",
    )
    ver.add_argument(
        "--list-only",
        action="store_true",
        help="compare the listing with the manifest only; read nothing back",
    )
    ver.add_argument("--json", action="store_true", help="print the result event as JSON")

    st = add("status", help="each repository's latest verified off-site copy")
    st.add_argument("--json", action="store_true", help="print JSON instead of the table")
    st.add_argument(
        "--check-stale",
        action="store_true",
        help="exit 3 when a repository has no verified copy within notify.max_age (cron)",
    )
    st.add_argument(
        "--forget",
        metavar="REPO",
        help="drop a repository's history from the run store (its guid, or its id)",
    )
    st.add_argument(
        "--html", metavar="FILE", help="also write a self-contained HTML report ('-': stdout)"
    )

    fail = add(
        "report-failure", help="publish Mirror Failed (Backrest's CONDITION_CHECK_ERROR hook)"
    )
    _repo_args(fail)
    fail.add_argument("--trigger", default="CONDITION_CHECK_ERROR", help="{{ .Event }}")
    fail.add_argument("--error", default="", help="what failed ({{ .Error }})")
    fail.add_argument("--json", action="store_true", help="print one JSON result on stdout")

    hook = add("hook-snippet", help="print the Backrest hooks: mirror on success, alert on failure")
    hook.add_argument("--repo-id", required=True, help="Backrest repository id")
    hook.add_argument("--format", choices=("json", "text"), default="text")
    hook.add_argument(
        "--hook",
        choices=("success", "failure"),
        default=None,
        help="only this hook (default: both). success: mirror on CONDITION_CHECK_SUCCESS; "
        "failure: report CONDITION_CHECK_ERROR",
    )
    hook.add_argument(
        "--via",
        choices=("cli", "http"),
        default="cli",
        help="cli: run backrest-relay in Backrest's hook (same host); http: call the "
        "`serve` sidecar with curl (Backrest in Docker, docs/docker.md)",
    )
    hook.add_argument(
        "--url", help="with --via http: the relay's URL, e.g. http://backrest-relay:8787"
    )

    serve = add("serve", help="HTTP sidecar that Backrest's Docker image triggers with curl")
    serve.add_argument("--listen", help="HOST:PORT (default: [serve] listen, 127.0.0.1:8787)")

    rec = add(
        "recover",
        help="list the mirror's states, or rebuild one from the bucket's object versions",
    )
    rec.add_argument("--repo-id", help="Backrest repository id")
    rec.add_argument("--repo-guid", help="restic repository id (Backrest's guid)")
    which = rec.add_mutually_exclusive_group()
    which.add_argument(
        "--as-of", help="the newest state at or before TIME (ISO 8601, or a duration ago: 3d)"
    )
    which.add_argument("--manifest", metavar="RUN_ID", help="the state of this upload run")
    rec.add_argument("--into", metavar="PREFIX", help="rebuild under a new prefix, not in place")
    rec.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    rec.add_argument("--json", action="store_true", help="print JSON")

    doctor = add("doctor", help="check config, credentials, bucket, clock")
    _repo_args(doctor)

    schedule = add(
        "schedule", help="print the systemd timer or cron line that runs status --check-stale"
    )
    schedule.add_argument(
        "--print",
        dest="print_kind",
        choices=("systemd", "cron"),
        required=True,
        help="systemd: a service + timer; cron: one crontab line",
    )

    demo = add("demo", help="run the whole pipeline against an embedded endpoint")
    demo.add_argument("--keep", action="store_true", help="keep the demo's temporary files")
    demo.add_argument(
        "--notify",
        action="append",
        default=[],
        metavar="URL",
        help="also send the demo's notifications to this Apprise URL (repeatable)",
    )
    return parser


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("backrest-relay: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    level = logging.DEBUG if verbose else logging.INFO
    for name in ("backrest_relay", "local_agent", "cloud"):
        logging.getLogger(name).setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    args.config = getattr(args, "config", None)
    _setup_logging(args.verbose)
    try:
        return int(_dispatch(args))
    except RelayError as exc:
        sys.stderr.write(REDACTOR(f"backrest-relay: error: {exc.message}") + "\n")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("backrest-relay: interrupted\n")
        return 130
    except Exception as exc:  # last resort: one line, no traceback unless -v
        if args.verbose:
            log.exception("unexpected error")
        sys.stderr.write(
            REDACTOR(f"backrest-relay: unexpected error: {type(exc).__name__}: {exc}") + "\n"
        )
        return int(ExitCode.UNEXPECTED)


def _dispatch(args: argparse.Namespace) -> int:
    command = COMMANDS.get(args.command)
    if command is None:
        raise ConfigError(f"unknown command {args.command}")
    return command(args)


def _load(args: argparse.Namespace) -> RelayConfig:
    """The config named by --config, its secrets known to the redactor before anything
    can print them."""
    from local_agent.config import load_config

    config = load_config(args.config).config
    register_secrets(config)
    return config


def _identity(
    args: argparse.Namespace, config: RelayConfig, *, repo_path: Path | None = None
) -> RepoIdentity:
    """The (id, guid) named by --repo-id/--repo-guid, completed from what this host learned:
    the commands that take them check them the same way, in the same order."""
    from local_agent.config import validate_repo_guid, validate_repo_id

    return resolve_identity(
        config.state.path(),
        repo_id=validate_repo_id(args.repo_id) if args.repo_id else None,
        repo_guid=validate_repo_guid(args.repo_guid) if args.repo_guid else None,
        repo_path=repo_path,
    )


# -- upload -------------------------------------------------------------------------------


def cmd_upload(args: argparse.Namespace) -> int:
    from local_agent.upload import run_upload

    config = _load(args)
    try:
        repo = resolve_repo(args, config.state.path(), learn=not args.dry_run)
    except ConfigError as exc:
        if not args.dry_run:
            from local_agent.identity import resolve_identity
            from local_agent.upload import report_failure

            guid = args.repo_guid
            if guid is None and args.repo_id:
                # Recorded under the guid like every other run of this id: a row keyed by the
                # bare id would be a phantom repository for `status --check-stale`.
                with contextlib.suppress(RelayError):
                    guid = resolve_identity(
                        config.state.path(),
                        repo_id=args.repo_id,
                        repo_guid=None,
                        learn=False,
                    ).guid
            report_failure(
                config,
                repo_id=args.repo_id,
                repo_guid=guid,
                repo_path=args.repo,
                trigger=args.trigger,
                kind=exc.kind,
                message=exc.message,
            )
        raise
    summary = run_upload(
        config,
        repo,
        trigger=args.trigger,
        dry_run=args.dry_run,
        reconcile=args.reconcile,
        interactive=sys.stderr.isatty() and not args.json,
    )
    print_summary(summary.as_dict(), as_json=args.json)
    return summary.exit_code


def print_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    from local_agent.units import format_duration, format_size, plural

    if as_json:
        sys.stdout.write(REDACTOR(json.dumps(summary, sort_keys=True)) + "\n")
    dest = summary["destination"]
    where = f"{dest['bucket']}/{dest['prefix']}"
    err = summary.get("error")
    if summary["status"] == "dry-run":
        plan = summary["plan"] or {}
        lines = [f"dry run — nothing changed. Plan for {summary['repo_path']} → {where}:"]
        for kind, item in plan.get("upload", {}).items():
            if item["files"]:
                count = plural(item["files"], "file")
                lines.append(
                    f"  upload {kind:<9} {count:>13}  {format_size(item['bytes'])}"
                    + (
                        f"  ({item['adopt_if_identical']} already there if identical)"
                        if item["adopt_if_identical"]
                        else ""
                    )
                )
        lines.append(f"  delete {plural(plan.get('delete', 0), 'object')}")
        if plan.get("delete_guard") not in (None, "ok"):
            lines.append(f"  the delete guard would refuse: {plan['delete_guard']}")
        lines.append(f"  already at the destination: {plural(summary['already_present'], 'file')}")
        text = "\n".join(lines)
    else:
        text = (
            f"{'mirrored' if not err else 'mirror FAILED'} {summary['repo_path']} → {where}: "
            f"{summary['uploaded_files']} uploaded ({format_size(summary['uploaded_bytes'])}), "
            f"{summary['already_present']} already there"
            + (f", {summary['adopted_files']} adopted" if summary["adopted_files"] else "")
            + (f", {summary['deleted_files']} deleted" if summary["deleted_files"] else "")
            + f", {plural(summary['requests'], 'request')}, "
            + format_duration(summary["duration_seconds"])
        )
    if summary.get("verification"):
        from local_agent.verification import verdict_line

        text += "\n" + verdict_line(summary["verification"])
    stream = sys.stderr if as_json else sys.stdout
    stream.write(REDACTOR(text) + "\n")
    if err:
        sys.stderr.write(REDACTOR(f"backrest-relay: error: {err['message']}") + "\n")


# -- verify --------------------------------------------------------------------------------


def _load_with_identity(args: argparse.Namespace) -> tuple[RelayConfig, RepoIdentity]:
    """Config plus the (id, guid) named by --repo-id/--repo-guid (verify, recover)."""
    config = _load(args)
    return config, _identity(args, config)


def _request(kind: type[_Request], args: argparse.Namespace) -> _Request:
    """A command's request from its parsed options (the request's fields are their names)."""
    return kind(**{f.name: getattr(args, f.name) for f in dataclasses.fields(kind)})


def cmd_verify(args: argparse.Namespace) -> int:
    from local_agent.verification import VerifyRequest, run_verify

    config, identity = _load_with_identity(args)
    return run_verify(config, identity, _request(VerifyRequest, args))


# -- status --------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from local_agent.report.status import run_forget, run_status

    config = _load(args)
    if args.forget is not None:
        return run_forget(config, args.forget)
    return run_status(config, as_json=args.json, check_stale=args.check_stale, html=args.html)


# -- recover -------------------------------------------------------------------------------


def cmd_recover(args: argparse.Namespace) -> int:
    from local_agent.recovery import RecoverRequest, run_recover

    config, identity = _load_with_identity(args)
    return run_recover(config, identity, _request(RecoverRequest, args))


# -- report-failure ------------------------------------------------------------------------


def cmd_report_failure(args: argparse.Namespace) -> int:
    from local_agent.upload import report_failure

    config = _load(args)
    path: Path | None = None
    if args.repo:
        from local_agent.backrest import repo_path_from_uri

        try:
            path = repo_path_from_uri(args.repo)
        except ConfigError:
            path = None  # still report the failed check; the path only helps find the guid
    identity = _identity(args, config, repo_path=path)
    repo_id, guid = identity.repo_id, identity.guid
    if not repo_id and not guid:
        raise ConfigError("report-failure needs --repo-id or --repo-guid")
    message = args.error.strip() or f"Backrest reported {args.trigger} without an error text"
    result = report_failure(
        config,
        repo_id=repo_id,
        repo_guid=guid,
        repo_path=args.repo,
        trigger=args.trigger,
        kind="check",
        message=message,
    )
    if args.json:
        sys.stdout.write(REDACTOR(json.dumps(result, sort_keys=True)) + "\n")
    else:
        state = "sent" if not result["pending"] else "kept in the outbox (sent on the next run)"
        sys.stdout.write(f"Mirror Failed for {repo_id or guid}: {state}\n")
    return 0


# -- hook-snippet --------------------------------------------------------------------------


def cmd_hook_snippet(args: argparse.Namespace) -> int:
    from local_agent.backrest import backrest_config_path, lookup_backrest_repo, render_hook_snippet
    from local_agent.config import find_config_path, validate_repo_id

    repo_id = validate_repo_id(args.repo_id)
    if args.via == "http":
        return _http_hook_snippet(args, repo_id)
    if args.url:
        raise ConfigError("--url goes with --via http")
    config_path = find_config_path(args.config)
    if lookup_backrest_repo(repo_id) is None:
        sys.stderr.write(
            f"note: no readable Backrest config at {backrest_config_path()}; repository id "
            f"{repo_id!r} was not checked (fine if Backrest runs elsewhere, e.g. in Docker)\n"
        )
    executable = shutil.which("backrest-relay") or sys.argv[0]
    text = render_hook_snippet(
        repo_id,
        executable=str(Path(executable).resolve()),
        config_path=config_path.resolve() if config_path else None,
        fmt=args.format,
        hook=args.hook or "both",
    )
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    from local_agent.checkpolicy import schedule_note

    note = schedule_note(repo_id)
    if note is not None and note[0] is None:
        sys.stderr.write(f"note: {note[1]}\n")
    return 0


def _http_hook_snippet(args: argparse.Namespace, repo_id: str) -> int:
    """The curl hook for Backrest in Docker; the deadline comes from this config if any."""
    from local_agent.config import UploadConfig, find_config_path, load_config
    from local_agent.serve.hook import render_http_snippet

    if not args.url:
        raise ConfigError("--via http needs --url, e.g. --url http://backrest-relay:8787")
    deadline = (
        load_config(args.config).config.upload.deadline_seconds
        if find_config_path(args.config)
        else UploadConfig().deadline_seconds
    )
    text = render_http_snippet(
        repo_id, url=args.url, deadline_seconds=deadline, fmt=args.format, hook=args.hook or "both"
    )
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


# -- serve ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Parse, check, and hand over to local_agent.serve.app (needs the serve extra)."""
    from local_agent.config import find_config_path

    try:
        from local_agent.serve.app import serve
    except ImportError as exc:
        from local_agent.serve import SERVE_EXTRA_HINT

        raise ConfigError(f"{SERVE_EXTRA_HINT} ({exc.name or exc} is missing)") from None
    config = _load(args)
    if args.listen:
        from pydantic import ValidationError

        from local_agent.config import ServeConfig

        try:
            ServeConfig(listen=args.listen)
        except ValidationError:
            raise ConfigError(f"--listen {args.listen!r}: expected HOST:PORT") from None
    token = os.environ.get("BACKREST_RELAY_TOKEN") or config.serve.token.get_secret_value()
    if token and len(token) < 16:
        raise ConfigError("serve: the token is shorter than 16 characters; use a long random one")
    REDACTOR.add(token)
    config_path = find_config_path(args.config)
    return serve(
        config,
        config_path=config_path.resolve() if config_path else None,
        listen=args.listen or config.serve.listen,
        token=token,
    )


# -- schedule ------------------------------------------------------------------------------


def cmd_schedule(args: argparse.Namespace) -> int:
    """Print units that run the silence alarm with this config and this state directory."""
    from local_agent.cli.schedule import render_schedule
    from local_agent.config import find_config_path, load_config

    loaded = load_config(args.config)
    config_path = find_config_path(args.config)
    text = render_schedule(
        args.print_kind, config_path=config_path, state_dir=loaded.config.state.path()
    )
    sys.stdout.write(text)
    return 0


# -- doctor, demo --------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from local_agent.cli.doctor import run_doctor

    return run_doctor(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from local_agent.cli.demo import run_demo

    return run_demo(keep=args.keep, notify=args.notify)


# Each subcommand of `build_parser`, by name.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "upload": cmd_upload,
    "hook-snippet": cmd_hook_snippet,
    "report-failure": cmd_report_failure,
    "verify": cmd_verify,
    "status": cmd_status,
    "recover": cmd_recover,
    "doctor": cmd_doctor,
    "schedule": cmd_schedule,
    "serve": cmd_serve,
    "demo": cmd_demo,
}

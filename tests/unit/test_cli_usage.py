"""`backrest-relay` usage errors and refusals that happen before any request is made.

The destination is http://127.0.0.1:9 (nothing listens there): every case here must end
before the first request.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_agent import __version__
from local_agent.cli.main import COMMANDS, build_parser, main

SECRET = "SENTINEL-SECRET-7f3a"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No real config, state or Backrest install; logging restored after `main`."""
    for name in list(os.environ):
        if name.startswith(("BACKREST_RELAY_", "BACKREST_", "AWS_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {
        n: logging.getLogger(n).level for n in ("backrest_relay", "local_agent", "cloud")
    }
    yield
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def write_config(tmp_path: Path, extra: str = "", prefix: str = "restic/{repo_id}") -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        "[destination]\n"
        'provider = "s3"\n'
        'endpoint_url = "http://127.0.0.1:9"\n'
        'bucket = "bkt"\n'
        f'prefix = "{prefix}"\n'
        'access_key_id = "AKIDEXAMPLE"\n'
        f'secret_access_key = "{SECRET}"\n'
        "[state]\n"
        f'dir = "{tmp_path / "state"}"\n' + extra,
        encoding="utf-8",
    )
    return path


def test_no_subcommand_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "backrest-relay: error:" in err


def test_unknown_subcommand_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "frobnicate" in capsys.readouterr().err


def test_unknown_option_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["upload", "--no-such-flag"])
    assert info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == f"backrest-relay {__version__}"


def test_every_subcommand_has_a_handler_and_every_handler_a_subcommand() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subcommands.choices) == set(COMMANDS)


def test_status_forget_drops_the_named_repository_and_refuses_an_unknown_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # report-failure records a run locally; no channel is set, no request is made.
    config = str(write_config(tmp_path))
    guid = "0123456789abcdef" * 4
    failure = ["report-failure", "--repo-id", "r1", "--repo-guid", guid, "--error", "boom"]
    assert main([*failure, "--config", config]) == 0
    capsys.readouterr()

    assert main(["status", "--forget", "nope", "--config", config]) == 2
    err = capsys.readouterr().err
    assert f"status --forget 'nope' is not in the run store (known: r1 ({guid}))" in err

    assert main(["status", "--forget", "r1", "--config", config]) == 0
    assert capsys.readouterr().out == f"forgot repository {guid}: 1 run removed\n"

    assert main(["status", "--json", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out) == {"repositories": []}


def test_upload_without_any_config_names_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["upload", "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "backrest-relay: error:" in err
    assert "[destination]" in err
    assert "bucket" in err
    assert "BACKREST_RELAY_CONFIG" in err
    assert str(tmp_path / "xdg-config" / "backrest-relay" / "config.toml") in err
    assert "Traceback" not in err


def test_upload_with_missing_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.toml"
    assert main(["upload", "--config", str(missing), "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "does not exist" in err


def test_upload_with_bad_config_names_key_and_never_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, extra='[upload]\nconcurrency = "lots"\n')
    assert main(["upload", "--config", str(config), "--repo", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "upload.concurrency" in captured.err
    assert str(config) in captured.err
    assert SECRET not in captured.err + captured.out


def test_upload_with_unknown_env_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKREST_RELAY_UPLOAD__CONCURENCY", "4")
    config = write_config(tmp_path)
    assert main(["upload", "--config", str(config), "--repo", str(tmp_path)]) == 2
    assert "BACKREST_RELAY_UPLOAD__CONCURENCY" in capsys.readouterr().err


def test_upload_without_repo_or_repo_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert main(["upload", "--config", str(config)]) == 2
    assert "--repo" in capsys.readouterr().err


def test_upload_with_unsafe_repo_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    code = main(["upload", "--config", str(config), "--repo", str(tmp_path), "--repo-id", "../x"])
    assert code == 2
    assert "--repo-id" in capsys.readouterr().err


def test_upload_prefix_placeholder_needs_repo_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    assert main(["upload", "--config", str(config), "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "{repo_id}" in err
    assert "--repo-id" in err


@pytest.mark.parametrize("form", ["{path}", "local:{path}"])
def test_upload_missing_repository_is_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    config = write_config(tmp_path)
    repo = tmp_path / "nonexistent"
    code = main(
        ["upload", "--config", str(config), "--repo", form.format(path=repo), "--repo-id", "r1"]
    )
    assert code == 3
    captured = capsys.readouterr()
    assert "does not exist" in captured.err
    assert str(repo) in captured.err
    assert SECRET not in captured.err + captured.out


def test_upload_nonexistent_root_path_is_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, prefix="fixed")
    assert main(["upload", "--config", str(config), "--repo", "/nonexistent"]) == 3
    assert "does not exist" in capsys.readouterr().err


def upload_empty_mount(tmp_path: Path, *extra: str) -> tuple[Path, int]:
    """`upload` of an empty directory, as an unmounted NAS share looks: (the dir, exit code)."""
    config = write_config(tmp_path)
    mount = tmp_path / "nas"
    mount.mkdir()
    args = ["upload", "--config", str(config), "--repo", str(mount), "--repo-id", "r1", *extra]
    return mount, main(args)


def test_upload_empty_directory_is_refused_as_unmounted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mount, code = upload_empty_mount(tmp_path)
    assert code == 5  # the contract: an empty/unmounted source is refused by a guard
    err = capsys.readouterr().err
    assert "mounted" in err
    assert str(mount) in err
    assert list(mount.iterdir()) == []  # nothing was written into the source


def test_upload_empty_directory_json_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _mount, code = upload_empty_mount(tmp_path, "--json")
    assert code == 5
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1, captured.out  # exactly one JSON document on stdout
    summary = json.loads(lines[0])
    assert summary["status"] == "failed"
    assert summary["exit_code"] == 5
    assert summary["error"]["kind"] == "guard"
    assert "mounted" in summary["error"]["message"]
    assert summary["requests"] == 0
    assert summary["uploaded_files"] == 0
    assert summary["destination"]["bucket"] == "bkt"
    assert summary["destination"]["prefix"] == "restic/r1"
    assert SECRET not in captured.out + captured.err
    assert "mounted" in captured.err


def test_upload_dry_run_on_empty_directory_is_also_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _mount, code = upload_empty_mount(tmp_path, "--dry-run")
    assert code == 5
    assert "mounted" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()  # a dry run writes no state and takes no lock


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        *(
            ("--run", run, ("--run", "run id"))
            for run in ["../../etc", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b/../x", "x", ""]
        ),
        *(
            ("--time-limit", limit, ("--time-limit",))
            for limit in ["soon", "0s", "5 parsecs", "nan", "", "  "]
        ),
    ],
)
def test_verify_refuses_a_bad_run_id_or_time_limit(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
    said: tuple[str, ...],
) -> None:
    """--run must be a run id, --time-limit a positive duration: usage error, exit 2."""
    config = write_config(tmp_path)
    code = main(["verify", "--config", str(config), "--repo-id", "r1", option, value])
    assert code == 2
    err = capsys.readouterr().err
    for text in said:
        assert text in err


def test_verify_list_only_excludes_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    args = ["verify", "--config", str(config), "--repo-id", "r1", "--list-only", "--deep", "5%"]
    assert main(args) == 2
    assert "--list-only" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage", "a folder"])
@pytest.mark.parametrize(
    "command",
    [
        ["verify", "--repo-id", "r1"],
        ["status"],
        ["status", "--check-stale"],
        ["recover", "--repo-id", "r1"],
        ["recover", "--repo-id", "r1", "--as-of", "1d", "--dry-run"],
    ],
)
def test_an_unusable_run_store_is_a_named_error_not_an_unexpected_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], damage: str
) -> None:
    """runs.sqlite damaged or unopenable: exit 2 naming the file, like an unusable state
    file or outbox (it was exit 1, "unexpected error: RunStoreError", which asks for a bug
    report); the file is left where it is (only the hook's run sets a damaged one aside).
    `recover` set a damaged one aside and went on without the history that tells it which
    states verification found broken."""
    config = write_config(tmp_path)
    runs = tmp_path / "state" / "runs.sqlite"
    runs.parent.mkdir()
    if damage == "garbage":
        runs.write_bytes(b"not a database, " * 512)
    else:
        runs.mkdir()
    assert main([*command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"backrest-relay: error: run store {runs}: unusable (" in err
    assert "unexpected" not in err
    assert runs.exists()


@pytest.mark.parametrize("as_of", ["yesterday", "10000000d", "1000000000000000000d"])
def test_recover_refuses_a_time_it_cannot_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], as_of: str
) -> None:
    """--as-of a duration so long ago it is before year 1 was exit 1, "unexpected error:
    ValueError: year -25353 is out of range" (OverflowError further out): a bad time is a
    usage error, exit 2, before any request."""
    config = write_config(tmp_path)
    code = main(["recover", "--config", str(config), "--repo-id", "r1", "--as-of", as_of])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--as-of {as_of!r}: expected a time like" in err
    assert "unexpected" not in err


def test_manifest_prefix_inside_repository_prefix_is_refused_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The templates differ but expand to nested prefixes for this repository id: refused
    with exit 2 before the bucket is contacted (127.0.0.1:9 would fail with exit 4)."""
    from testbed.repos import make_fake_restic_repo

    repo = tmp_path / "repo"
    make_fake_restic_repo(repo, packs=2, pack_size=1024)
    config = write_config(tmp_path)
    config.write_text(
        config.read_text().replace("[state]", 'manifest_prefix = "restic/r1/m"\n[state]'),
    )
    code = main(["upload", "--config", str(config), "--repo", str(repo), "--repo-id", "r1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "manifest_prefix" in err
    assert "inside" in err

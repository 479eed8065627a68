"""Backrest integration: config discovery, repository URIs, and the hook snippet.

The shell-level tests run the rendered snippet the way Backrest does (the script on ``sh``'s
stdin) against a stub executable, so quoting and the ``</dev/null`` guard are proven, not assumed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from local_agent.backrest import (
    CHECK_SUCCESS,
    ON_ERROR_IGNORE,
    REMOTE_SCHEMES,
    BackrestRepo,
    backrest_config_path,
    find_backrest_repo,
    hook_command,
    hook_object,
    load_backrest_repos,
    lookup_backrest_repo,
    render_hook_snippet,
    repo_path_from_uri,
)
from local_agent.errors import ConfigError, ExitCode
from tests.support.backrest import (
    TemplateError,
    backrest_shell,
    render_backrest_template,
    shell_escape,
)

GUID = "4f1f3c0e9a7b2d5c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f9012345678abc"
ALLOWED_ACTIONS = {
    "{{ .ShellEscape .Repo.Uri }}",
    "{{ .ShellEscape .Repo.Id }}",
    "{{ .ShellEscape .Repo.Guid }}",
    "{{ .Event }}",
}

# A config.json as Backrest writes it: protojson with EmitUnpopulated (empty lists, zero values
# and default enum names present), camelCase json_names from proto/v1/config.proto, int64 as
# strings, plus a repo from an old config without "guid" and fields this agent never reads.
BACKREST_CONFIG = {
    "modno": 12,
    "version": 4,
    "instance": "nas",
    "repos": [
        {
            "id": "nas-local",
            "uri": "/srv/restic/nas",
            "guid": GUID,
            "password": "correct horse battery staple",
            "env": ["RESTIC_CACHE_DIR=/var/cache/restic"],
            "flags": ["--limit-upload=10000"],
            "prunePolicy": {
                "schedule": {"cron": "0 3 1 * *", "clock": "CLOCK_LAST_RUN_TIME"},
                "maxUnusedBytes": "0",
                "maxUnusedPercent": 10,
            },
            "checkPolicy": {
                "schedule": {"cron": "0 4 * * 0", "clock": "CLOCK_LAST_RUN_TIME"},
                "readDataSubsetPercent": 5,
            },
            "hooks": [
                {
                    "conditions": ["CONDITION_CHECK_SUCCESS"],
                    "onError": "ON_ERROR_IGNORE",
                    "actionCommand": {"command": "rclone sync /srv/restic/nas b2:offsite/nas"},
                },
                {
                    "conditions": ["CONDITION_ANY_ERROR"],
                    "onError": "ON_ERROR_IGNORE",
                    "actionShoutrrr": {
                        "shoutrrrUrl": "ntfy://ntfy.sh/backups",
                        "template": "{{ .Summary }}",
                    },
                },
            ],
            "autoUnlock": False,
            "autoInitialize": False,
            "commandPrefix": {"ioNice": "IO_BEST_EFFORT_LOW", "cpuNice": "CPU_LOW"},
        },
        {
            "id": "usb",
            "uri": "local:${USB_ROOT}/restic",
            "password": "hunter2",
            "env": [],
            "flags": [],
            "hooks": [],
            "autoUnlock": True,
        },
        {
            "id": "b2-direct",
            "uri": "s3:https://s3.us-west-004.backblazeb2.com/offsite/direct",
            "guid": "0" * 64,
            "password": "p",
            "env": ["AWS_ACCESS_KEY_ID=004abc", "AWS_SECRET_ACCESS_KEY=K004secret"],
            "flags": [],
            "hooks": [],
        },
    ],
    "plans": [
        {
            "id": "home",
            "repo": "nas-local",
            "paths": ["/home"],
            "excludes": ["*.tmp"],
            "iexcludes": [],
            "schedule": {"cron": "0 * * * *", "clock": "CLOCK_LOCAL"},
            "retention": {"policyTimeBucketed": {"hourly": 24, "daily": 7, "keepLastN": 3}},
            "hooks": [
                {
                    "conditions": ["CONDITION_SNAPSHOT_ERROR"],
                    "onError": "ON_ERROR_IGNORE",
                    "actionCommand": {"command": "echo {{ .ShellEscape .Summary }}"},
                }
            ],
            "backup_flags": ["--one-file-system"],
            "skipIfUnchanged": False,
        }
    ],
    "auth": {"disabled": False, "users": [{"name": "admin", "passwordBcrypt": "JDJhJDEwJA=="}]},
    "sync": {"knownHosts": [], "authorizedClients": []},
    "someFutureField": {"anything": [1, 2, 3]},
}


def write_config(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path


# --- config path -------------------------------------------------------------------------


def test_config_path_prefers_backrest_config() -> None:
    env = {"BACKREST_CONFIG": "/etc/backrest.json", "XDG_CONFIG_HOME": "/x", "HOME": "/h"}
    assert backrest_config_path(env) == Path("/etc/backrest.json")


def test_config_path_uses_xdg_config_home_next() -> None:
    env = {"BACKREST_CONFIG": "", "XDG_CONFIG_HOME": "/x", "HOME": "/h"}
    assert backrest_config_path(env) == Path("/x/backrest/config.json")


def test_config_path_falls_back_to_home() -> None:
    env = {"XDG_CONFIG_HOME": "", "HOME": "/home/backup"}
    assert backrest_config_path(env) == Path("/home/backup/.config/backrest/config.json")


def test_config_path_without_home_uses_the_user_home() -> None:
    assert backrest_config_path({}) == Path.home() / ".config" / "backrest" / "config.json"


# --- loading and finding -----------------------------------------------------------------


def test_loads_repos_from_a_real_shaped_config(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", BACKREST_CONFIG)
    assert load_backrest_repos(path) == [
        BackrestRepo(id="nas-local", uri="/srv/restic/nas", guid=GUID),
        BackrestRepo(id="usb", uri="local:${USB_ROOT}/restic", guid=None),
        BackrestRepo(
            id="b2-direct",
            uri="s3:https://s3.us-west-004.backblazeb2.com/offsite/direct",
            guid="0" * 64,
        ),
    ]


@pytest.mark.parametrize(
    "document",
    [{}, {"repos": None}, {"repos": []}, {"modno": 1, "instance": "x", "plans": []}],
)
def test_config_without_repos_has_none(tmp_path: Path, document: object) -> None:
    assert load_backrest_repos(write_config(tmp_path / "config.json", document)) == []


def test_missing_optional_fields_take_protojson_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.json", {"repos": [{"id": "a"}, {"id": "b", "guid": ""}]})
    assert load_backrest_repos(path) == [
        BackrestRepo(id="a", uri="", guid=None),
        BackrestRepo(id="b", uri="", guid=None),
    ]


def test_missing_config_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "config.json"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_backrest_repos(path)
    assert str(path) in info.value.message
    assert info.value.exit_code == ExitCode.USAGE


def test_invalid_json_names_the_path_and_position(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"repos": [\n  {"id": "a",}\n]}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"not valid JSON: .* line 2") as info:
        load_backrest_repos(path)
    assert str(path) in info.value.message


def test_non_utf8_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"repos": [{"id": "\xff"}]}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_backrest_repos(path)


def test_directory_instead_of_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read Backrest config") as info:
        load_backrest_repos(tmp_path)
    assert str(tmp_path) in info.value.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config_names_the_cause(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", BACKREST_CONFIG)
    path.chmod(0)
    try:
        with pytest.raises(ConfigError, match="Permission denied") as info:
            load_backrest_repos(path)
        assert str(path) in info.value.message
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "not a JSON object"),
        ({"repos": {"id": "a"}}, "'repos' is not a list"),
        ({"repos": ["a"]}, r"repos\[0\] is not a JSON object"),
        ({"repos": [{"id": "a"}, {"uri": "/x"}]}, r"repos\[1\] has no 'id'"),
        ({"repos": [{"id": "a", "uri": 5}]}, "'uri' is not a string"),
        ({"repos": [{"id": "a", "guid": ["x"]}]}, "'guid' is not a string"),
    ],
)
def test_malformed_config_is_a_config_error(tmp_path: Path, document: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_backrest_repos(write_config(tmp_path / "config.json", document))


def test_find_repo_by_id(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", BACKREST_CONFIG)
    assert find_backrest_repo("usb", path).uri == "local:${USB_ROOT}/restic"


def test_find_repo_uses_the_default_config_location(tmp_path: Path) -> None:
    write_config(tmp_path / "backrest" / "config.json", BACKREST_CONFIG)
    repo = find_backrest_repo("nas-local", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert repo.guid == GUID


def test_unknown_repo_lists_known_ids_and_the_path(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", BACKREST_CONFIG)
    with pytest.raises(ConfigError) as info:
        find_backrest_repo("nas", path)
    assert str(path) in info.value.message
    assert "'nas'" in info.value.message
    assert "known ids: nas-local, usb, b2-direct" in info.value.message


def test_unknown_repo_in_empty_config(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", {"repos": []})
    with pytest.raises(ConfigError, match=r"known ids: none"):
        find_backrest_repo("nas", path)


def test_lookup_without_a_config_is_unverified_not_an_error(tmp_path: Path) -> None:
    assert lookup_backrest_repo("anything", tmp_path / "config.json") is None
    assert lookup_backrest_repo("anything", env={"BACKREST_CONFIG": str(tmp_path / "x")}) is None


def test_lookup_of_a_config_this_user_may_not_read_is_unverified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "config.json", BACKREST_CONFIG)

    def denied(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    assert lookup_backrest_repo("nas-local", path) is None


def test_lookup_with_a_config_verifies(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.json", BACKREST_CONFIG)
    assert lookup_backrest_repo("usb", path) == BackrestRepo(
        "usb", "local:${USB_ROOT}/restic", None
    )
    with pytest.raises(ConfigError, match="known ids"):
        lookup_backrest_repo("typo", path)


# --- repository URIs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/srv/restic/nas", "/srv/restic/nas"),
        ("local:/srv/restic/nas", "/srv/restic/nas"),
        ("local:relative/repo", "relative/repo"),  # restic: local:dir1/dir2 is relative
        ("relative/repo", "relative/repo"),
        ("/mnt/backup:2024/repo", "/mnt/backup:2024/repo"),  # a colon later is still a path
        ("../repos/a:b", "../repos/a:b"),
        ("local:/mnt/s3:not-a-scheme", "/mnt/s3:not-a-scheme"),
        ("/srv/it's a repo", "/srv/it's a repo"),
        ("~/repo", "~/repo"),  # restic runs without a shell: no tilde expansion
        ("$HOME/repo", "$HOME/repo"),  # Backrest expands only ${VAR}
    ],
)
def test_local_uris(uri: str, expected: str) -> None:
    assert repo_path_from_uri(uri, env={"HOME": "/root"}) == Path(expected)


def test_braced_variables_expand_from_the_environment() -> None:
    env = {"NAS": "/mnt/nas", "REPO": "photos"}
    assert repo_path_from_uri("${NAS}/restic/${REPO}", env) == Path("/mnt/nas/restic/photos")
    assert repo_path_from_uri("local:${NAS}/r", env) == Path("/mnt/nas/r")


def test_variable_expanding_to_a_scheme_is_parsed_after_expansion() -> None:
    assert repo_path_from_uri("${R}", {"R": "local:/srv/r"}) == Path("/srv/r")
    with pytest.raises(ConfigError, match="only local repositories"):
        repo_path_from_uri("${R}", {"R": "s3:https://example.com/bucket"})


def test_unset_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="'USB_ROOT'") as info:
        repo_path_from_uri("local:${USB_ROOT}/restic", env={})
    assert "not set" in info.value.message


def test_empty_variable_reference_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty"):
        repo_path_from_uri("/srv/${}/repo", env={})


@pytest.mark.parametrize("scheme", sorted(REMOTE_SCHEMES))
def test_remote_backends_are_refused(scheme: str) -> None:
    with pytest.raises(ConfigError, match="only local repositories") as info:
        repo_path_from_uri(f"{scheme}:somewhere/repo", env={})
    assert info.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize("uri", ["", "local:", "foobar:/dir", "S3:bucket/x"])
def test_unusable_uris_are_config_errors(uri: str) -> None:
    with pytest.raises(ConfigError):
        repo_path_from_uri(uri, env={})


def test_unknown_scheme_suggests_the_local_prefix() -> None:
    with pytest.raises(ConfigError, match="local:PATH"):
        repo_path_from_uri("backups:2024", env={})


# --- hook command and object -------------------------------------------------------------


def test_hook_command_shape(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    command = hook_command(executable="/usr/local/bin/backrest-relay", config_path=config)
    assert command == (
        "/usr/local/bin/backrest-relay upload"
        " --repo {{ .ShellEscape .Repo.Uri }}"
        " --repo-id {{ .ShellEscape .Repo.Id }}"
        " --repo-guid {{ .ShellEscape .Repo.Guid }}"
        " --trigger {{ .Event }}"
        f" --config {shlex.quote(str(config))}"
        " </dev/null"
    )


def test_hook_command_quotes_literals_and_makes_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    command = hook_command(
        executable="/opt/relay dir/backrest-relay",
        config_path=Path("conf/it's.toml"),
        extra_args=["--dry-run", "a b"],
    )
    assert command.startswith("'/opt/relay dir/backrest-relay' upload ")
    expected_config = shlex.quote(str(tmp_path / "conf" / "it's.toml"))
    assert f"--config {expected_config} " in command
    assert command.endswith(" --dry-run 'a b' </dev/null")


def test_hook_command_without_config_and_with_a_bare_name() -> None:
    command = hook_command(executable="backrest-relay", config_path=None)
    assert command.startswith("backrest-relay upload ")
    assert "--config" not in command
    assert command.endswith("</dev/null")


def test_literal_template_delimiters_are_refused() -> None:
    with pytest.raises(ConfigError, match="template action"):
        hook_command(executable="/opt/{{x}}/backrest-relay", config_path=None)
    with pytest.raises(ConfigError, match="template action"):
        hook_command(executable="/bin/relay", config_path=Path("/etc/{{ .Repo.Password }}"))


def test_hook_object_uses_backrest_protojson_names() -> None:
    assert hook_object("cmd") == {
        "conditions": ["CONDITION_CHECK_SUCCESS"],
        "onError": "ON_ERROR_IGNORE",
        "actionCommand": {"command": "cmd"},
    }
    both = hook_object("cmd", conditions=["CONDITION_CHECK_SUCCESS", "CONDITION_PRUNE_SUCCESS"])
    assert both["conditions"] == ["CONDITION_CHECK_SUCCESS", "CONDITION_PRUNE_SUCCESS"]


@pytest.mark.parametrize("conditions", [(), ("check_success",), ("CHECK_SUCCESS",)])
def test_hook_object_rejects_bad_conditions(conditions: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="condition"):
        hook_object("cmd", conditions=conditions)


# --- the snippet -------------------------------------------------------------------------


def snippet(tmp_path: Path, fmt: str, repo_id: str = "nas-local") -> str:
    path = write_config(tmp_path / "backrest" / "config.json", BACKREST_CONFIG)
    return render_hook_snippet(
        repo_id,
        executable="/usr/local/bin/backrest-relay",
        config_path=Path("/etc/backrest-relay/config.toml"),
        fmt="json" if fmt == "json" else "text",
        backrest_config=path,
    )


def test_json_snippet_is_the_hook_object(tmp_path: Path) -> None:
    hook = json.loads(snippet(tmp_path, "json"))
    assert set(hook) == {"conditions", "onError", "actionCommand"}
    assert hook["conditions"] == [CHECK_SUCCESS]
    assert hook["onError"] == ON_ERROR_IGNORE
    assert set(hook["actionCommand"]) == {"command"}
    command = hook["actionCommand"]["command"]
    assert command.endswith("</dev/null")
    assert command == hook_command(
        executable="/usr/local/bin/backrest-relay",
        config_path=Path("/etc/backrest-relay/config.toml"),
    )


def test_text_snippet_is_instructions_then_the_command(tmp_path: Path) -> None:
    text = snippet(tmp_path, "text")
    *comments, command = text.splitlines()
    assert text.endswith("</dev/null")
    assert command.startswith("/usr/local/bin/backrest-relay upload ")
    assert comments and all(line.startswith("# ") for line in comments)
    assert not text.startswith("#!")  # Backrest would take a #! line as the interpreter
    prose = " ".join(comments)
    for needle in ("nas-local", "Hooks", "Command", CHECK_SUCCESS, ON_ERROR_IGNORE, "Script"):
        assert needle in prose


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_snippet_templates_nothing_secret(tmp_path: Path, fmt: str) -> None:
    text = snippet(tmp_path, fmt)
    assert ".Repo.Password" not in text
    assert ".Repo.Env" not in text
    actions = set(re.findall(r"\{\{.*?\}\}", text))
    assert actions == ALLOWED_ACTIONS


def test_snippet_refuses_a_repo_backrest_does_not_know(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known ids: nas-local, usb, b2-direct"):
        snippet(tmp_path, "text", repo_id="nas-locl")


def test_snippet_without_backrest_config_still_renders(tmp_path: Path) -> None:
    missing = tmp_path / "no-backrest" / "config.json"
    text = render_hook_snippet(
        "in-docker", executable="/bin/relay", config_path=None, fmt="text", backrest_config=missing
    )
    assert text.endswith("</dev/null")
    assert lookup_backrest_repo("in-docker", missing) is None  # the caller's "unverified" note


# --- the test renderer itself ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "quoted"),
    [  # alessio/shellescape's own test vectors
        ("", "''"),
        ('"double quoted"', "'\"double quoted\"'"),
        ("'single quoted'", "''\"'\"'single quoted'\"'\"''"),
        ("no quotes", "'no quotes'"),
        (";", "';'"),
        (";${}", "';${}'"),
        ("foo.example.com", "foo.example.com"),
        ("CONDITION_CHECK_SUCCESS", "CONDITION_CHECK_SUCCESS"),
        ("naïve", "'naïve'"),  # Go's \w is ASCII-only
    ],
)
def test_shell_escape_matches_shellescape(value: str, quoted: str) -> None:
    assert shell_escape(value) == quoted


@given(st.text())
def test_shell_escape_is_shlex_quote(value: str) -> None:
    assert shell_escape(value) == shlex.quote(value)


def render(template: str, **overrides: str) -> str:
    values = {
        "repo_id": "nas-local",
        "repo_uri": "/srv/it's here",
        "repo_guid": GUID,
        "event": CHECK_SUCCESS,
    } | overrides
    return render_backrest_template(template, **values)


def test_renderer_supported_subset() -> None:
    assert render("id={{ .Repo.Id }} ev={{.Event}}") == "id=nas-local ev=CONDITION_CHECK_SUCCESS"
    assert render("{{ .ShellEscape .Repo.Uri }}") == "'/srv/it'\"'\"'s here'"
    assert render('{{ .ShellEscape "a b" }}|{{ `raw` }}') == "'a b'|raw"
    assert render("a  {{- .Repo.Id -}}  \n b") == "anas-localb"
    assert render("{{ .Error }}", error="boom") == "boom"
    assert render("{{ .ShellEscape .Repo.Guid }}", repo_guid="") == "''"


@pytest.mark.parametrize(
    "template",
    [
        "{{ .Repo.Password }}",
        "{{ .Repo.Env }}",
        "{{ .Repo }}",
        "{{ .Summary }}",
        "{{ .FormatTime .CurTime }}",
        "{{ .ShellEscape .Event }}",  # Event is v1.Hook_Condition, not string: fails in Go
        "{{ .ShellEscape }}",
        "{{ .ShellEscape .Repo.Id .Repo.Uri }}",
        "{{ .Repo.Id | printf }}",
        "{{ if .Error }}x{{ end }}",
        "{{/* comment */}}",
        "{{ $x := 1 }}",
        "{{ .Repo.Id }",
        "{{}}",
        "{{ .repo.id }}",
        "{{ .Repo.Id-}}",
    ],
)
def test_renderer_refuses_what_it_does_not_model(template: str) -> None:
    with pytest.raises(TemplateError):
        render(template)


def test_backrest_shell_handles_shebang() -> None:
    assert backrest_shell("echo hi\n") == (["sh"], "echo hi\n")
    assert backrest_shell("#!/bin/bash -e\necho hi\n") == (["/bin/bash", "-e"], "echo hi\n")


# --- the snippet under a real shell ------------------------------------------------------

SHELLS = [shell for shell in ("sh", "bash") if shutil.which(shell)]


def write_stub(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A stand-in agent that records its argv (NUL-separated) and whatever is on its stdin."""
    bin_dir = tmp_path / "bin dir"
    bin_dir.mkdir()
    argv_file, stdin_file = tmp_path / "argv", tmp_path / "stdin"
    stub = bin_dir / "backrest-relay"
    stub.write_text(
        "#!/bin/sh\n"
        f'for arg in "$@"; do printf \'%s\\000\' "$arg"; done > {shlex.quote(str(argv_file))}\n'
        f"cat > {shlex.quote(str(stdin_file))}\n",
        encoding="utf-8",
    )
    stub.chmod(0o755)
    return stub, argv_file, stdin_file


def run_like_backrest(script: str, shell: str, cwd: Path) -> None:
    """Backrest's command hook: the script goes to the interpreter's stdin."""
    argv, stdin = backrest_shell(script)
    assert argv == ["sh"]
    subprocess.run([shell], input=stdin, text=True, cwd=cwd, check=True, timeout=60)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "uri",
    [
        "/srv/backups/it's a repo",
        "local:${NAS_ROOT}/restic repo/it's",
        '/srv/$(touch pwned); `touch pwned` | * ? "q" \\ x\ny',
    ],
)
def test_rendered_snippet_passes_exact_argv_and_keeps_the_script(
    tmp_path: Path, shell: str, uri: str
) -> None:
    stub, argv_file, stdin_file = write_stub(tmp_path)
    config = tmp_path / "conf dir" / "relay's.toml"
    marker = tmp_path / "marker"
    command = hook_command(executable=str(stub), config_path=config)
    rendered = render_backrest_template(
        command, repo_id="nas-local", repo_uri=uri, repo_guid=GUID, event=CHECK_SUCCESS
    )
    script = rendered + f"\necho after > {shlex.quote(str(marker))}\n"

    run_like_backrest(script, shell, tmp_path)

    argv = argv_file.read_bytes().decode().split("\0")[:-1]
    assert argv == [
        "upload",
        "--repo",
        uri,
        "--repo-id",
        "nas-local",
        "--repo-guid",
        GUID,
        "--trigger",
        CHECK_SUCCESS,
        "--config",
        str(config),
    ]
    assert stdin_file.read_bytes() == b""
    assert marker.read_text() == "after\n"
    assert not (tmp_path / "pwned").exists()
    if "${NAS_ROOT}" in uri:  # passed through unexpanded; the agent expands it like Backrest
        resolved = repo_path_from_uri(argv[2], env={"NAS_ROOT": "/mnt/nas"})
        assert resolved == Path("/mnt/nas/restic repo/it's")


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_without_dev_null_bash_lets_the_agent_eat_the_script(tmp_path: Path) -> None:
    """Control for the test above: bash reads its script lazily, so the guard is needed.

    (dash reads the whole piped script at once and would hide the problem; Backrest runs
    whatever ``sh`` is on the host, which is bash on several distributions.)
    """
    stub, _argv_file, stdin_file = write_stub(tmp_path)
    marker = tmp_path / "marker"
    command = hook_command(executable=str(stub), config_path=None)
    unguarded = command.removesuffix(" </dev/null")
    rendered = render_backrest_template(
        unguarded, repo_id="r", repo_uri="/srv/r", repo_guid=GUID, event=CHECK_SUCCESS
    )
    script = rendered + f"\necho after > {shlex.quote(str(marker))}\n"

    run_like_backrest(script, "bash", tmp_path)

    assert not marker.exists()
    assert b"echo after" in stdin_file.read_bytes()


@pytest.mark.parametrize("shell", SHELLS)
def test_whole_text_snippet_pasted_as_script_runs(tmp_path: Path, shell: str) -> None:
    stub, argv_file, stdin_file = write_stub(tmp_path)
    missing = tmp_path / "no-backrest.json"
    text = render_hook_snippet(
        "r", executable=str(stub), config_path=None, fmt="text", backrest_config=missing
    )
    rendered = render_backrest_template(
        text, repo_id="r", repo_uri="local:/srv/r", repo_guid="", event=CHECK_SUCCESS
    )

    run_like_backrest(rendered + "\n", shell, tmp_path)

    argv = argv_file.read_bytes().decode().split("\0")[:-1]
    assert argv == [
        "upload",
        "--repo",
        "local:/srv/r",
        "--repo-id",
        "r",
        "--repo-guid",
        "",  # an empty guid stays one (empty) argument thanks to .ShellEscape
        "--trigger",
        CHECK_SUCCESS,
    ]
    assert stdin_file.read_bytes() == b""

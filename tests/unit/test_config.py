"""The agent's configuration: file discovery, env overrides, validation and secret hygiene.

Every test passes `env=` explicitly (HOME and XDG pointing into tmp_path) so the real
environment of the machine running the tests never leaks in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from local_agent.config import (
    CONFIG_ENV,
    LoadedConfig,
    RelayConfig,
    default_config_path,
    find_config_path,
    load_config,
    validate_repo_guid,
    validate_repo_id,
)
from local_agent.errors import ConfigError, ExitCode

SECRET = "SENTINEL-SECRET-7f3a"
URL_SECRET = "SENTINEL-SECRET-7f3a-url-token"
GUID = "4f1f3c0e9a7b2d5c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f9012345678abc"

FULL_TOML = f"""
[destination]
provider = "b2"
endpoint_url = "https://s3.us-west-004.backblazeb2.com"
region = "us-west-004"
bucket = "offsite"
prefix = "restic/{{repo_id}}"
access_key_id = "0041234567890000000000001"
secret_access_key = "{SECRET}"

[upload]
concurrency = 4
delete = true
max_delete_percent = 25
bandwidth_limit = "20MiB/s"
deadline = "1h30m"

[events]
publisher = "eventbridge"
event_bus = "my-bus"
region = "eu-west-1"
endpoint_url = "http://127.0.0.1:4566"

[notify]
urls = ["slack://{URL_SECRET}/B0000/XXXX", "ntfy://ntfy.sh/topic"]
success = "always"

[state]
dir = "/var/lib/backrest-relay"
"""

MINIMAL_S3 = """
[destination]
provider = "s3"
endpoint_url = "http://127.0.0.1:9"
bucket = "bkt"
"""


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
        "PATH": "/usr/bin:/bin",
    }
    env.update(extra)
    return env


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, **env: str) -> LoadedConfig:
    path = write(tmp_path / "config.toml", text)
    return load_config(str(path), env=base_env(tmp_path, **env))


def config_error(tmp_path: Path, text: str, **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, **env)
    assert info.value.exit_code == ExitCode.USAGE
    return info.value


def assert_no_secret(text: str) -> None:
    assert SECRET not in text
    assert URL_SECRET not in text


# -- loading a full file and the defaults -----------------------------------------------------


def test_full_config_from_brief_loads(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, FULL_TOML)
    assert loaded.path == tmp_path / "config.toml"
    cfg = loaded.config
    dest = cfg.destination
    assert dest.provider == "b2"
    assert dest.endpoint_url == "https://s3.us-west-004.backblazeb2.com"
    assert dest.region == "us-west-004"
    assert dest.bucket == "offsite"
    assert dest.prefix == "restic/{repo_id}"
    assert dest.access_key_id == "0041234567890000000000001"
    assert dest.secret_access_key.get_secret_value() == SECRET
    assert cfg.upload.concurrency == 4
    assert cfg.upload.delete is True
    assert cfg.upload.max_delete_percent == 25
    assert cfg.upload.bandwidth_bytes_per_second == 20 * 1024**2
    assert cfg.upload.deadline_seconds == 5400
    assert cfg.events.publisher == "eventbridge"
    assert cfg.events.event_bus == "my-bus"
    assert cfg.events.region == "eu-west-1"
    assert cfg.events.endpoint_url == "http://127.0.0.1:4566"
    assert [u.get_secret_value() for u in cfg.notify.urls] == [
        f"slack://{URL_SECRET}/B0000/XXXX",
        "ntfy://ntfy.sh/topic",
    ]
    assert cfg.notify.success == "always"
    assert cfg.state.path() == Path("/var/lib/backrest-relay")

    access = dest.access()
    assert access.secret_access_key == SECRET
    assert access.resolved_endpoint() == "https://s3.us-west-004.backblazeb2.com"


def test_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[destination]\nbucket = "offsite"\nregion = "us-west-004"\n').config
    dest = cfg.destination
    assert dest.provider == "b2"
    assert dest.prefix == "restic/{repo_id}"
    assert dest.access_key_id == ""
    assert dest.secret_access_key.get_secret_value() == ""
    access = dest.access()
    assert access.access_key_id is None and access.secret_access_key is None
    # B2 with only a region: the endpoint is derived.
    assert access.resolved_endpoint() == "https://s3.us-west-004.backblazeb2.com"
    up = cfg.upload
    assert up.concurrency == 8
    assert up.delete is False
    assert up.max_delete_percent == 10
    assert up.bandwidth_limit == ""
    assert up.bandwidth_bytes_per_second is None
    assert up.deadline_seconds == 6 * 3600
    assert up.multipart_threshold_bytes >= 5 * 1024**2
    assert up.part_size_bytes >= 5 * 1024**2
    assert up.lock_wait_seconds > 0
    assert cfg.events.publisher == "local"
    assert cfg.events.event_bus == "backrest-relay"
    assert cfg.notify.urls == []
    assert cfg.notify.success == "on_recovery"
    assert cfg.state.dir == ""


def test_default_state_dir_follows_xdg_state_home(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL_S3).config
    env = base_env(tmp_path)
    assert cfg.state.path(env) == tmp_path / "xdg-state" / "backrest-relay"


def test_state_dir_expands_user_and_vars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_STATE", str(tmp_path / "s"))
    cfg = load_text(tmp_path, MINIMAL_S3 + '[state]\ndir = "$RELAY_TEST_STATE/x"\n').config
    assert cfg.state.path() == tmp_path / "s" / "x"


def test_endpoint_trailing_slash_and_prefix_slashes_are_normalised(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[destination]\nprovider = "s3"\nendpoint_url = "http://127.0.0.1:9/"\n'
        'bucket = "bkt"\nprefix = "/restic/{repo_id}/"\n',
    ).config
    assert cfg.destination.endpoint_url == "http://127.0.0.1:9"
    assert cfg.destination.prefix == "restic/{repo_id}"


# -- where the file comes from ----------------------------------------------------------------


def test_explicit_config_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing), env=base_env(tmp_path))
    assert str(missing) in info.value.message
    assert "--config" in info.value.message
    assert "does not exist" in info.value.message


def test_explicit_config_wins_over_env_and_xdg(tmp_path: Path) -> None:
    explicit = write(tmp_path / "explicit.toml", MINIMAL_S3.replace("bkt", "from-explicit"))
    via_env = write(tmp_path / "env.toml", MINIMAL_S3.replace("bkt", "from-env"))
    write(
        tmp_path / "xdg-config" / "backrest-relay" / "config.toml",
        MINIMAL_S3.replace("bkt", "from-xdg"),
    )
    env = base_env(tmp_path, **{CONFIG_ENV: str(via_env)})
    loaded = load_config(str(explicit), env=env)
    assert loaded.path == explicit
    assert loaded.config.destination.bucket == "from-explicit"


def test_env_config_path_wins_over_xdg(tmp_path: Path) -> None:
    via_env = write(tmp_path / "env.toml", MINIMAL_S3.replace("bkt", "from-env"))
    write(
        tmp_path / "xdg-config" / "backrest-relay" / "config.toml",
        MINIMAL_S3.replace("bkt", "from-xdg"),
    )
    loaded = load_config(None, env=base_env(tmp_path, **{CONFIG_ENV: str(via_env)}))
    assert loaded.path == via_env
    assert loaded.config.destination.bucket == "from-env"


def test_env_config_path_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "gone.toml"
    with pytest.raises(ConfigError) as info:
        load_config(None, env=base_env(tmp_path, **{CONFIG_ENV: str(missing)}))
    assert str(missing) in info.value.message
    assert CONFIG_ENV in info.value.message


def test_xdg_config_home_default(tmp_path: Path) -> None:
    xdg = write(
        tmp_path / "xdg-config" / "backrest-relay" / "config.toml",
        MINIMAL_S3.replace("bkt", "from-xdg"),
    )
    env = base_env(tmp_path)
    assert default_config_path(env) == xdg
    assert find_config_path(None, env) == xdg
    loaded = load_config(None, env=env)
    assert loaded.path == xdg
    assert loaded.config.destination.bucket == "from-xdg"


def test_no_file_at_all_is_fine_when_env_supplies_everything(tmp_path: Path) -> None:
    env = base_env(
        tmp_path,
        BACKREST_RELAY_DESTINATION__PROVIDER="s3",
        BACKREST_RELAY_DESTINATION__ENDPOINT_URL="http://127.0.0.1:9",
        BACKREST_RELAY_DESTINATION__BUCKET="env-only",
    )
    assert find_config_path(None, env) is None
    loaded = load_config(None, env=env)
    assert loaded.path is None
    assert loaded.config.destination.bucket == "env-only"


def test_no_file_and_no_env_names_what_is_missing(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None, env=env)
    msg = info.value.message
    assert "[destination]" in msg
    assert "bucket" in msg
    assert CONFIG_ENV in msg
    assert str(default_config_path(env)) in msg
    assert "BACKREST_RELAY_DESTINATION__BUCKET" in msg


def test_missing_destination_section_in_file_names_file(tmp_path: Path) -> None:
    err = config_error(tmp_path, "[upload]\nconcurrency = 2\n")
    assert "[destination]" in err.message
    assert str(tmp_path / "config.toml") in err.message


def test_home_from_env_mapping_is_used_when_xdg_is_unset(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = write(home / ".config" / "backrest-relay" / "config.toml", MINIMAL_S3)
    env = {"HOME": str(home)}
    assert default_config_path(env) == path


# -- environment overrides --------------------------------------------------------------------


def test_env_overrides_typed_values(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        FULL_TOML,
        BACKREST_RELAY_UPLOAD__CONCURRENCY="16",
        BACKREST_RELAY_UPLOAD__DELETE="false",
        BACKREST_RELAY_UPLOAD__MAX_DELETE_PERCENT="2.5",
        BACKREST_RELAY_UPLOAD__DEADLINE="90s",
        BACKREST_RELAY_DESTINATION__BUCKET="other-bucket",
        BACKREST_RELAY_EVENTS__PUBLISHER="none",
        BACKREST_RELAY_NOTIFY__SUCCESS="never",
    ).config
    assert cfg.upload.concurrency == 16
    assert cfg.upload.delete is False
    assert cfg.upload.max_delete_percent == 2.5
    assert cfg.upload.deadline_seconds == 90
    assert cfg.destination.bucket == "other-bucket"
    assert cfg.events.publisher == "none"
    assert cfg.notify.success == "never"
    # Untouched keys keep the file's values.
    assert cfg.destination.region == "us-west-004"
    assert cfg.upload.bandwidth_limit == "20MiB/s"


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False)])
def test_env_override_bool(tmp_path: Path, text: str, expected: bool) -> None:
    cfg = load_text(tmp_path, MINIMAL_S3, BACKREST_RELAY_UPLOAD__DELETE=text).config
    assert cfg.upload.delete is expected


def test_env_override_creates_missing_section(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL_S3, BACKREST_RELAY_STATE__DIR=str(tmp_path / "st")).config
    assert cfg.state.path() == tmp_path / "st"


def test_env_notify_urls_json_list(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        FULL_TOML,
        BACKREST_RELAY_NOTIFY__URLS='["mailto://a@example.com?to=b@x.org,c@y.org", "json://h/p"]',
    ).config
    assert [u.get_secret_value() for u in cfg.notify.urls] == [
        "mailto://a@example.com?to=b@x.org,c@y.org",
        "json://h/p",
    ]


def test_env_notify_urls_whitespace_list_keeps_commas_inside_urls(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        MINIMAL_S3,
        BACKREST_RELAY_NOTIFY__URLS=" ntfy://a/t  mailto://u:p@h?to=a@x,b@x\n gotify://b/tok ",
    ).config
    assert [u.get_secret_value() for u in cfg.notify.urls] == [
        "ntfy://a/t",
        "mailto://u:p@h?to=a@x,b@x",
        "gotify://b/tok",
    ]


def test_env_notify_urls_empty_json_list_clears_file_value(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL_TOML, BACKREST_RELAY_NOTIFY__URLS="[]").config
    assert cfg.notify.urls == []


@pytest.mark.parametrize(
    "value", ['["unterminated', "[1, 2]", '["ok", 3]', '["ok", null]', f'["{SECRET}", {{"x": 1}}]']
)
def test_env_notify_urls_bad_json(tmp_path: Path, value: str) -> None:
    err = config_error(tmp_path, MINIMAL_S3, BACKREST_RELAY_NOTIFY__URLS=value)
    assert "BACKREST_RELAY_NOTIFY__URLS" in err.message
    assert_no_secret(err.message)


@pytest.mark.parametrize(
    ("var", "setting"),
    [
        ("BACKREST_RELAY_UPLOAD__DELET", "upload.delet"),
        ("BACKREST_RELAY_NOSUCH__THING", "nosuch.thing"),
        ("BACKREST_RELAY_DESTINATION__", "destination."),
    ],
)
def test_unknown_env_override_is_an_error_naming_it(tmp_path: Path, var: str, setting: str) -> None:
    err = config_error(tmp_path, MINIMAL_S3, **{var: SECRET})
    assert var in err.message
    assert setting in err.message
    assert_no_secret(err.message)


def test_env_vars_without_double_underscore_are_not_overrides(tmp_path: Path) -> None:
    # BACKREST_RELAY_CONFIG is the file location, other single-underscore names are ignored.
    cfg = load_text(tmp_path, MINIMAL_S3, BACKREST_RELAY_VERBOSE="1").config
    assert cfg.destination.bucket == "bkt"


def test_env_override_of_wrong_type_names_the_variable(tmp_path: Path) -> None:
    err = config_error(tmp_path, MINIMAL_S3, BACKREST_RELAY_UPLOAD__CONCURRENCY="many")
    assert "upload.concurrency" in err.message
    assert "$BACKREST_RELAY_UPLOAD__CONCURRENCY" in err.message


def test_env_override_into_non_table_section(tmp_path: Path) -> None:
    err = config_error(tmp_path, 'state = "fast"\n' + MINIMAL_S3, BACKREST_RELAY_STATE__DIR="/x")
    assert "[state]" in err.message


# -- validation: names the key and the source ------------------------------------------------


def test_missing_bucket(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[destination]\nprovider = "s3"\nendpoint_url = "http://h:9"\n')
    assert "destination.bucket" in err.message
    assert "missing" in err.message
    assert str(tmp_path / "config.toml") in err.message


def test_unknown_key_in_file(tmp_path: Path) -> None:
    err = config_error(tmp_path, MINIMAL_S3 + "bukcet = 'x'\n")
    assert "destination.bukcet" in err.message
    assert "unknown setting" in err.message
    assert str(tmp_path / "config.toml") in err.message


def test_unknown_section_in_file(tmp_path: Path) -> None:
    err = config_error(tmp_path, MINIMAL_S3 + "[uplaod]\nconcurrency = 2\n")
    assert "uplaod" in err.message


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ('[upload]\nconcurrency = "many"\n', "upload.concurrency"),
        ("[upload]\nconcurrency = 0\n", "upload.concurrency"),
        ("[upload]\nconcurrency = 1000\n", "upload.concurrency"),
        ('[upload]\ndelete = "maybe"\n', "upload.delete"),
        ("[upload]\nmax_delete_percent = 150\n", "upload.max_delete_percent"),
        ('[upload]\nbandwidth_limit = "fast"\n', "upload.bandwidth_limit"),
        ('[upload]\ndeadline = "soon"\n', "upload.deadline"),
        ('[upload]\ndeadline = "0s"\n', "upload.deadline"),
        ('[upload]\npart_size = "1MiB"\n', "upload.part_size"),
        ('[upload]\nmultipart_threshold = "6GiB"\n', "upload.multipart_threshold"),
        ('[events]\npublisher = "kafka"\n', "events.publisher"),
        ('[notify]\nsuccess = "sometimes"\n', "notify.success"),
        ('[notify]\nurls = "ntfy://x"\n', "notify.urls"),
        ("[state]\ndir = 3\n", "state.dir"),
    ],
)
def test_wrong_values_name_the_key_and_file(tmp_path: Path, snippet: str, key: str) -> None:
    err = config_error(tmp_path, MINIMAL_S3 + snippet)
    assert key in err.message
    assert str(tmp_path / "config.toml") in err.message


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ('provider = "gcs"\nbucket = "bkt"\n', "destination.provider"),
        ('provider = "aws"\nbucket = "x"\n', "destination.bucket"),
        ('provider = "aws"\nbucket = "-bad-"\n', "destination.bucket"),
        ('provider = "aws"\nbucket = "has space"\n', "destination.bucket"),
        (
            'provider = "aws"\nbucket = "bkt"\nendpoint_url = "ftp://h"\n',
            "destination.endpoint_url",
        ),
        ('provider = "aws"\nbucket = "bkt"\nprefix = "{host}/x"\n', "destination.prefix"),
        ('provider = "aws"\nbucket = "bkt"\nprefix = "a/../b"\n', "destination.prefix"),
        # Empty or "." segments: the verifier's binding refuses such a location (some S3
        # servers map keys to files), so every verification would be refused.
        ('provider = "aws"\nbucket = "bkt"\nprefix = "restic//{repo_id}"\n', "destination.prefix"),
        ('provider = "aws"\nbucket = "bkt"\nprefix = "a/./b"\n', "destination.prefix"),
        ('provider = "aws"\nbucket = "bkt"\nprefix = "./a"\n', "destination.prefix"),
        (
            'provider = "aws"\nbucket = "bkt"\nmanifest_prefix = "m//{repo_id}"\n',
            "destination.manifest_prefix",
        ),
    ],
)
def test_destination_values_name_the_key(tmp_path: Path, snippet: str, key: str) -> None:
    err = config_error(tmp_path, "[destination]\n" + snippet)
    assert key in err.message


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    err = config_error(
        tmp_path, MINIMAL_S3 + '[upload]\nconcurrency = "x"\ndeadline = "soon"\nnope = 1\n'
    )
    for key in ("upload.concurrency", "upload.deadline", "upload.nope"):
        assert key in err.message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[destination]\nbucket = "unterminated\n')
    assert str(tmp_path / "config.toml") in err.message
    assert "TOML" in err.message


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[destination]\nbucket = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env=base_env(tmp_path))
    assert str(path) in info.value.message


# -- provider rules ---------------------------------------------------------------------------


def test_s3_provider_needs_endpoint(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[destination]\nprovider = "s3"\nbucket = "bkt"\n')
    assert "endpoint_url" in err.message
    assert "destination" in err.message


def test_b2_needs_endpoint_or_region(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[destination]\nprovider = "b2"\nbucket = "bkt"\n')
    assert "endpoint_url" in err.message and "region" in err.message


def test_b2_region_is_derived_from_endpoint(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[destination]\nprovider = "b2"\nbucket = "bkt"\n'
        'endpoint_url = "https://s3.eu-central-003.backblazeb2.com"\n',
    ).config
    assert cfg.destination.region == "eu-central-003"
    assert cfg.destination.access().region == "eu-central-003"


def test_b2_explicit_region_is_kept(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[destination]\nprovider = "b2"\nbucket = "bkt"\nregion = "us-east-005"\n'
        'endpoint_url = "https://s3.eu-central-003.backblazeb2.com"\n',
    ).config
    assert cfg.destination.region == "us-east-005"


def test_b2_region_not_derived_from_foreign_endpoint(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        '[destination]\nprovider = "b2"\nbucket = "bkt"\nendpoint_url = "http://127.0.0.1:9000"\n',
    ).config
    assert cfg.destination.region == ""


def test_aws_needs_neither_endpoint_nor_region(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[destination]\nprovider = "aws"\nbucket = "bkt"\n').config
    assert cfg.destination.access().resolved_endpoint() is None


@pytest.mark.parametrize(
    "creds",
    [f'secret_access_key = "{SECRET}"\n', 'access_key_id = "AKIAEXAMPLE"\n'],
)
def test_half_a_credential_pair_is_an_error(tmp_path: Path, creds: str) -> None:
    err = config_error(tmp_path, MINIMAL_S3 + creds)
    assert "access_key_id" in err.message and "secret_access_key" in err.message
    assert_no_secret(err.message)


def test_half_credential_from_env_names_the_variable(tmp_path: Path) -> None:
    err = config_error(tmp_path, MINIMAL_S3, BACKREST_RELAY_DESTINATION__SECRET_ACCESS_KEY=SECRET)
    assert "BACKREST_RELAY_DESTINATION__SECRET_ACCESS_KEY" in err.message


# -- destination_for and repository ids --------------------------------------------------------


def _cfg(tmp_path: Path, prefix: str) -> RelayConfig:
    return load_text(tmp_path, MINIMAL_S3 + f'prefix = "{prefix}"\nregion = "r"\n').config


def test_destination_for_expands_placeholders(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "restic/{repo_id}/{repo_guid}")
    dest = cfg.destination_for(repo_id="nas", repo_guid=GUID)
    assert dest.prefix == f"restic/nas/{GUID}"
    assert dest.bucket == "bkt"
    assert dest.provider == "s3"
    assert dest.endpoint_url == "http://127.0.0.1:9"


def test_destination_for_without_placeholders_ignores_ids(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "fixed/path")
    assert cfg.destination_for(repo_id=None, repo_guid=None).prefix == "fixed/path"
    assert cfg.destination_for(repo_id="a", repo_guid=GUID).prefix == "fixed/path"


def test_destination_for_empty_prefix(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "")
    dest = cfg.destination_for(repo_id="a", repo_guid=None)
    assert dest.prefix == ""
    assert dest.key("config") == "config"


def test_destination_for_guid_placeholder_without_guid(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "by-guid/{repo_guid}")
    with pytest.raises(ConfigError) as info:
        cfg.destination_for(repo_id="nas", repo_guid=None)
    assert "{repo_guid}" in info.value.message
    assert "--repo-guid" in info.value.message
    assert "destination.prefix" in info.value.message


def test_destination_for_id_placeholder_without_id(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "restic/{repo_id}")
    with pytest.raises(ConfigError) as info:
        cfg.destination_for(repo_id=None, repo_guid=GUID)
    assert "--repo-id" in info.value.message


def test_destination_carries_no_secret(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL_TOML).config
    dest = cfg.destination_for(repo_id="nas", repo_guid=GUID)
    assert_no_secret(dest.model_dump_json())
    assert_no_secret(repr(dest))
    assert_no_secret(dest.describe())


@pytest.mark.parametrize("repo_id", ["nas", "NAS-01", "my_repo.v2", "a", "1" * 128])
def test_validate_repo_id_accepts(repo_id: str) -> None:
    assert validate_repo_id(repo_id) == repo_id


@pytest.mark.parametrize(
    "repo_id",
    ["", "../x", "..", ".hidden", "a/b", "a\\b", "-flag", "a b", "x" * 129, "ä", "a:b", "$HOME"],
)
def test_validate_repo_id_rejects(repo_id: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_repo_id(repo_id)
    assert "--repo-id" in info.value.message


@pytest.mark.parametrize("validate", [validate_repo_id, validate_repo_guid])
def test_validate_ids_reject_trailing_newline(validate: object) -> None:
    with pytest.raises(ConfigError):
        validate("abc\n")  # type: ignore[operator]


def test_validate_repo_guid() -> None:
    assert validate_repo_guid(GUID) == GUID
    assert validate_repo_guid("migration-abc123") == "migration-abc123"
    for bad in ("", "../x", "a/b", "g u i d"):
        with pytest.raises(ConfigError, match="--repo-guid"):
            validate_repo_guid(bad)


# -- secrets never leak -----------------------------------------------------------------------


def test_repr_of_config_hides_secrets(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, FULL_TOML)
    for text in (
        repr(loaded),
        str(loaded),
        repr(loaded.config),
        str(loaded.config),
        repr(loaded.config.destination),
        repr(loaded.config.notify),
        repr(loaded.config.destination.access()),
        loaded.config.model_dump_json(),
    ):
        assert_no_secret(text)


@pytest.mark.parametrize(
    "text",
    [
        # Secrets given as the wrong type: validation must not echo them.
        MINIMAL_S3 + f'access_key_id = "AK"\nsecret_access_key = ["{SECRET}"]\n',
        MINIMAL_S3 + f'access_key_id = "AK"\nsecret_access_key = {{ v = "{SECRET}" }}\n',
        MINIMAL_S3 + f'[notify]\nurls = "{URL_SECRET}"\n',
        MINIMAL_S3 + f'[notify]\nurls = [["{URL_SECRET}"]]\n',
        MINIMAL_S3 + f'[notify]\nurls = [{{ u = "{URL_SECRET}" }}]\n',
        MINIMAL_S3 + f'[notify]\nurls = ["{URL_SECRET}"]\nsucess = "always"\n',
        # A secret without its access key id.
        MINIMAL_S3 + f'secret_access_key = "{SECRET}"\n',
        # A valid secret next to another error.
        MINIMAL_S3
        + f'access_key_id = "AK"\nsecret_access_key = "{SECRET}"\n[upload]\nconcurrency = "x"\n',
        # The whole section replaced by a secret-looking string.
        f'notify = "{URL_SECRET}"\n' + MINIMAL_S3,
        # Broken TOML on the line holding the secret.
        MINIMAL_S3 + f'secret_access_key = "{SECRET}\n',
        MINIMAL_S3 + f"secret_access_key = {SECRET}\n",
        MINIMAL_S3 + f'secret_access_key = """{SECRET}\n',
    ],
)
def test_config_errors_never_echo_secrets(tmp_path: Path, text: str) -> None:
    err = config_error(tmp_path, text)
    assert_no_secret(err.message)
    assert_no_secret(str(err))
    assert_no_secret(repr(err))


@pytest.mark.parametrize(
    "env",
    [
        {"BACKREST_RELAY_DESTINATION__SECRET_ACCESS_KEY": SECRET},
        {"BACKREST_RELAY_NOTIFY__URLS": f'["{URL_SECRET}", 1]'},
        {"BACKREST_RELAY_NOTIFY__URLS": f'["{URL_SECRET}"'},
        {"BACKREST_RELAY_NOTIFY__URL": URL_SECRET},
        {
            "BACKREST_RELAY_NOTIFY__URLS": URL_SECRET,
            "BACKREST_RELAY_UPLOAD__CONCURRENCY": "many",
        },
    ],
)
def test_env_errors_never_echo_secrets(tmp_path: Path, env: dict[str, str]) -> None:
    err = config_error(tmp_path, MINIMAL_S3, **env)
    assert_no_secret(err.message)


# -- strict types (issue 13, point 8) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ('[upload]\ndelete = "yes"\n', "upload.delete"),
        ("[upload]\ndelete = 1\n", "upload.delete"),
        ('[upload]\nconcurrency = "8"\n', "upload.concurrency"),
        ("[upload]\nconcurrency = true\n", "upload.concurrency"),
        ("[upload]\nconcurrency = 8.0\n", "upload.concurrency"),
        ('[upload]\nmax_delete_percent = "10"\n', "upload.max_delete_percent"),
        ("[upload]\nmax_delete_percent = true\n", "upload.max_delete_percent"),
        ('[upload]\ndirect_put = "false"\n', "upload.direct_put"),
        ("[upload]\ndeadline = 3600\n", "upload.deadline"),
        ('[destination]\nprovider = "s3"\nendpoint_url = "http://h"\nbucket = 123\n', ""),
    ],
)
def test_wrong_types_are_refused_not_coerced(tmp_path: Path, snippet: str, key: str) -> None:
    text = snippet if snippet.startswith("[destination]") else MINIMAL_S3 + snippet
    key = key or "destination.bucket"
    err = config_error(tmp_path, text)
    assert key in err.message
    assert str(tmp_path / "config.toml") in err.message


@pytest.mark.parametrize(
    ("var", "text"),
    [
        ("BACKREST_RELAY_UPLOAD__DELETE", "yes"),
        ("BACKREST_RELAY_UPLOAD__DELETE", "1"),
        ("BACKREST_RELAY_UPLOAD__DELETE", '"true"'),
        ("BACKREST_RELAY_UPLOAD__CONCURRENCY", "true"),
        ("BACKREST_RELAY_UPLOAD__CONCURRENCY", '"8"'),
        ("BACKREST_RELAY_UPLOAD__CONCURRENCY", "8.0"),
        ("BACKREST_RELAY_UPLOAD__MAX_DELETE_PERCENT", "ten"),
        ("BACKREST_RELAY_UPLOAD__DIRECT_PUT", "on"),
    ],
)
def test_env_overrides_are_typed_strictly(tmp_path: Path, var: str, text: str) -> None:
    err = config_error(tmp_path, MINIMAL_S3, **{var: text})
    section, _, key = var.removeprefix("BACKREST_RELAY_").lower().partition("__")
    assert f"{section}.{key}" in err.message
    assert f"${var}" in err.message


def test_env_override_literals(tmp_path: Path) -> None:
    """Env values are typed by the setting: booleans `true`/`false`, integers and numbers as
    written, strings as they are (quotes not needed)."""
    cfg = load_text(
        tmp_path,
        MINIMAL_S3,
        BACKREST_RELAY_UPLOAD__DELETE="TRUE",
        BACKREST_RELAY_UPLOAD__CONCURRENCY=" 12 ",
        BACKREST_RELAY_UPLOAD__MAX_DELETE_PERCENT="7",
        BACKREST_RELAY_UPLOAD__DIRECT_PUT="false",
        BACKREST_RELAY_DESTINATION__PREFIX="true",
    ).config
    assert cfg.upload.delete is True
    assert cfg.upload.concurrency == 12
    assert cfg.upload.max_delete_percent == 7
    assert cfg.upload.direct_put is False
    assert cfg.destination.prefix == "true"


@pytest.mark.parametrize(
    "url",
    [
        "https://keyid:{secret}@s3.example.com",
        "https://{secret}@s3.example.com",
        "http://user:{secret}@127.0.0.1:9000/",
    ],
)
@pytest.mark.parametrize("section", ["destination", "events"])
def test_endpoint_url_with_credentials_is_refused_without_echo(
    tmp_path: Path, url: str, section: str
) -> None:
    value = url.format(secret=SECRET)
    if section == "destination":
        text = f'[destination]\nprovider = "s3"\nendpoint_url = "{value}"\nbucket = "bkt"\n'
    else:
        text = MINIMAL_S3 + f'[events]\nendpoint_url = "{value}"\n'
    err = config_error(tmp_path, text)
    assert f"{section}.endpoint_url" in err.message
    assert "user name or password" in err.message
    assert SECRET not in err.message
    assert "keyid" not in err.message


def test_endpoint_url_with_credentials_from_env_is_refused(tmp_path: Path) -> None:
    err = config_error(
        tmp_path,
        MINIMAL_S3,
        BACKREST_RELAY_DESTINATION__ENDPOINT_URL=f"https://k:{SECRET}@h.example.com",
    )
    assert "destination.endpoint_url" in err.message
    assert SECRET not in err.message


def test_bad_endpoint_url_is_not_echoed(tmp_path: Path) -> None:
    err = config_error(
        tmp_path,
        f'[destination]\nprovider = "s3"\nendpoint_url = "ftp://k:{SECRET}@h"\nbucket = "bkt"\n',
    )
    assert "destination.endpoint_url" in err.message
    assert SECRET not in err.message


@pytest.mark.parametrize(
    ("prefix", "manifest_prefix"),
    [
        ("restic/{repo_id}", "restic/{repo_id}/manifests"),
        ("restic", "restic/manifests/{repo_id}"),
        ("restic/{repo_id}", "restic/{repo_id}"),
    ],
)
def test_manifest_prefix_inside_repository_prefix_is_refused_at_load(
    tmp_path: Path, prefix: str, manifest_prefix: str
) -> None:
    text = MINIMAL_S3 + f'prefix = "{prefix}"\nmanifest_prefix = "{manifest_prefix}"\n'
    err = config_error(tmp_path, text)
    assert "destination.manifest_prefix" in err.message
    assert "inside" in err.message


@pytest.mark.parametrize(
    ("prefix", "manifest_prefix"),
    [
        ("restic/{repo_id}", "backrest-relay/manifests/{repo_id}"),
        ("restic/{repo_id}", "restic/manifests/{repo_id}"),
        ("restic/{repo_id}", "restic-manifests"),
    ],
)
def test_manifest_prefix_outside_repository_prefix_loads(
    tmp_path: Path, prefix: str, manifest_prefix: str
) -> None:
    text = MINIMAL_S3 + f'prefix = "{prefix}"\nmanifest_prefix = "{manifest_prefix}"\n'
    cfg = load_text(tmp_path, text).config
    assert cfg.destination.manifest_prefix == manifest_prefix


# -- deferred deletion (issue 13, point 4) ----------------------------------------------------


def test_delete_after_defaults_to_seven_days(tmp_path: Path) -> None:
    assert load_text(tmp_path, MINIMAL_S3).config.upload.delete_after_seconds == 7 * 86400


@pytest.mark.parametrize(
    ("text", "seconds"), [("0", 0), ("0s", 0), ("36h", 129600), ("30d", 2592000)]
)
def test_delete_after_values(tmp_path: Path, text: str, seconds: float) -> None:
    cfg = load_text(tmp_path, MINIMAL_S3 + f'[upload]\ndelete_after = "{text}"\n').config
    assert cfg.upload.delete_after_seconds == seconds


@pytest.mark.parametrize(
    "snippet", ['delete_after = "soon"', 'delete_after = "400d"', "delete_after = 7"]
)
def test_bad_delete_after_names_the_key(tmp_path: Path, snippet: str) -> None:
    err = config_error(tmp_path, MINIMAL_S3 + f"[upload]\n{snippet}\n")
    assert "upload.delete_after" in err.message


# -- [destination] object_lock (issue 18) -------------------------------------------------


def test_object_lock_loads_with_its_derived_renewal_window(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, MINIMAL_S3 + 'object_lock = { mode = "governance", days = 30 }\n')
    lock = loaded.config.destination.object_lock
    assert lock is not None
    policy = lock.policy()
    assert (policy.s3_mode, policy.days, policy.renew_days, policy.min_days) == (
        "GOVERNANCE",
        30,
        10,
        1,
    )


def test_object_lock_is_off_by_default(tmp_path: Path) -> None:
    assert load_text(tmp_path, MINIMAL_S3).config.destination.object_lock is None


@pytest.mark.parametrize(
    "value",
    [
        '{ mode = "GOVERNANCE", days = 30 }',
        '{ mode = "legal-hold", days = 30 }',
        '{ mode = "compliance", days = "30" }',
        '{ mode = "compliance", days = true }',
        '{ mode = "compliance", days = 0 }',
        '{ mode = "compliance" }',
        '{ mode = "compliance", days = 30, renew_days = 30 }',
        '{ mode = "compliance", days = 30, extend = true }',
        '"governance"',
    ],
)
def test_object_lock_is_validated_strictly_naming_the_key(tmp_path: Path, value: str) -> None:
    err = config_error(tmp_path, MINIMAL_S3 + f"object_lock = {value}\n")
    assert "destination.object_lock" in err.message
    assert str(tmp_path / "config.toml") in err.message


def test_object_lock_from_the_environment_is_json(tmp_path: Path) -> None:
    var = "BACKREST_RELAY_DESTINATION__OBJECT_LOCK"
    loaded = load_text(tmp_path, MINIMAL_S3, **{var: '{"mode": "compliance", "days": 14}'})
    lock = loaded.config.destination.object_lock
    assert lock is not None and (lock.mode, lock.days) == ("compliance", 14)
    err = config_error(tmp_path, MINIMAL_S3, **{var: "compliance"})
    assert var in err.message
    err = config_error(tmp_path, MINIMAL_S3, **{var: '{"mode": "compliance", "days": "14"}'})
    assert "destination.object_lock.days" in err.message


@pytest.mark.parametrize("value", ["7", "30", "1.5", " 7 "])
def test_delete_after_without_a_unit_is_refused(tmp_path: Path, value: str) -> None:
    """A plain number is seconds elsewhere, but `delete_after = "7"` almost surely means a
    week: read as 7 seconds it would silently shrink the safety window to nothing."""
    err = config_error(tmp_path, MINIMAL_S3 + f'[upload]\ndelete_after = "{value}"\n')
    assert "upload.delete_after" in err.message
    assert "unit" in err.message

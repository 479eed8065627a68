"""4b. Bad input: fuzzed configuration.

hypothesis writes config files three ways — random TOML-ish text (section headers, key =
value lines, junk), random key/value structures written as valid TOML (known and unknown
sections and keys, values of every TOML type), and a good file overridden by random
``BACKREST_RELAY_<SECTION>__<KEY>`` variables — and ``load_config`` must either load it
or raise ``ConfigError`` with a message; any other exception is a bug. Secrets placed in
the secret settings (``secret_access_key``, ``notify.urls``, ``notify.healthchecks``) must
never appear in that message. A sample of the files also goes through the real command
(``status --config``): exit 0 or exit 2 with one ``backrest-relay: error:`` line, never a
traceback.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from local_agent.config import LoadedConfig, RelayConfig, load_config
from local_agent.errors import ConfigError
from testbed.agent import agent_config_in, run_agent
from testbed.repos import make_fake_restic_repo
from testbed.s3.rclone import RcloneS3Server
from tests.reliability.common import SEED, SOAK, Ledger, count

EXAMPLES = count("bad config: hypothesis examples (files, env overrides)")
CLI_EXAMPLES = count("bad config: configs through the CLI")
SECRET = "sentinel-config-secret-93c1a7"
URL_SECRET = "sentinel-url-password-51e0"
HC_SECRET = "5e1f0c2a-0000-4a5e-9f00-sentinel0001"
SECRETS = (SECRET, URL_SECRET, HC_SECRET)


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=not SOAK,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


KNOWN = {
    section: sorted(model.model_fields)
    for section, model in (
        (name, field.annotation) for name, field in RelayConfig.model_fields.items()
    )
    if isinstance(model, type)
}
SECTIONS = sorted(KNOWN)

# -- values ------------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
DIGITS = st.text("0123456789", min_size=1, max_size=400)  # 300+ digits overflow a float
UNITS = st.sampled_from(["", "b", "k", "KB", "MiB", "GiB", "tib", "x", "/s", "MiB/s", "h", "m"])
DURATIONS = st.lists(
    st.tuples(DIGITS, st.sampled_from(["ms", "s", "m", "h", "d", "", "y"])), max_size=3
).map(lambda parts: "".join(a + b for a, b in parts))
SIZE_LIKE = st.tuples(DIGITS, st.sampled_from(["", ".5", ".0"]), UNITS).map("".join)
LIKELY = {
    "provider": st.sampled_from(["b2", "aws", "s3", "B2", "gcs", ""]),
    "endpoint_url": st.sampled_from(
        ["http://127.0.0.1:9", "https://s3.us-west-004.backblazeb2.com", "ftp://x", "", "http://"]
    )
    | TEXT,
    "bucket": st.sampled_from(["offsite", "ab", "a" * 64, "Bad_Bucket", "-x-", "bucket.name"])
    | TEXT,
    "prefix": st.sampled_from(["restic/{repo_id}", "{repo_guid}", "{nope}", "../x", "", "/a/"]),
    "publisher": st.sampled_from(["local", "eventbridge", "none", "sns"]),
    "success": st.sampled_from(["always", "on_recovery", "never", "sometimes"]),
    "bandwidth_limit": SIZE_LIKE,
    "multipart_threshold": SIZE_LIKE,
    "part_size": SIZE_LIKE,
    "deadline": DURATIONS,
    "lock_wait": DURATIONS,
    "max_age": DURATIONS,
}
SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | TEXT
    | st.datetimes(timezones=st.just(UTC) | st.none())
    | st.dates()
    | st.times()
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), inner, max_size=3)
    ),
    max_leaves=8,
)


def toml_value(value: Any) -> str:
    """A TOML literal (strings as JSON strings, which TOML basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, body in sections.items():
        lines.append(f"[{json.dumps(section)}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


@st.composite
def section_bodies(draw: st.DrawFn, section: str) -> dict[str, Any]:
    keys = draw(
        st.lists(
            st.sampled_from(KNOWN.get(section, ["x"]))
            | st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
            max_size=6,
            unique=True,
        )
    )
    body: dict[str, Any] = {}
    for key in keys:
        if key == "secret_access_key":
            body[key] = draw(st.just(SECRET) | VALUES)
        elif key == "urls":
            body[key] = draw(st.just([f"json://u:{URL_SECRET}@127.0.0.1:1/t"]) | VALUES)
        elif key == "healthchecks":
            body[key] = draw(st.just({"home": f"https://hc-ping.com/{HC_SECRET}"}) | VALUES)
        elif key in LIKELY:
            body[key] = draw(LIKELY[key] | VALUES)
        else:
            body[key] = draw(VALUES)
    return body


@st.composite
def structured_configs(draw: st.DrawFn) -> str:
    names = draw(
        st.lists(
            st.sampled_from(SECTIONS) | st.from_regex(r"[a-z]{1,8}", fullmatch=True),
            max_size=5,
            unique=True,
        )
    )
    sections = {name: draw(section_bodies(name)) for name in names}
    if draw(st.booleans()):
        sections.setdefault("destination", {}).update(
            {"provider": "s3", "endpoint_url": "http://127.0.0.1:9", "bucket": "offsite"}
        )
    return toml_document(sections)


VALID: dict[str, dict[str, Any]] = {
    "destination": {
        "provider": "s3",
        "endpoint_url": "http://127.0.0.1:9",
        "region": "us-east-1",
        "bucket": "offsite",
        "prefix": "restic/{repo_id}",
        "access_key_id": "AKIAEXAMPLE",
        "secret_access_key": SECRET,
    },
    "upload": {"concurrency": 4, "deadline": "1h", "bandwidth_limit": "20MiB/s"},
    "events": {"publisher": "none"},
    "notify": {
        "urls": [f"json://u:{URL_SECRET}@127.0.0.1:1/t"],
        "healthchecks": {"home": f"https://hc-ping.com/{HC_SECRET}"},
        "success": "always",
    },
}


@st.composite
def mutated_valid_configs(draw: st.DrawFn) -> str:
    """A good config with zero to three random edits: most load, some must not."""
    sections = {name: dict(body) for name, body in VALID.items()}
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from(SECTIONS))
        body = sections.setdefault(section, {})
        key = draw(st.sampled_from(KNOWN[section]))
        edit = draw(st.sampled_from(["likely", "likely", "any", "drop", "unknown"]))
        if edit == "drop":
            body.pop(key, None)
        elif edit == "unknown":
            body[key + "_typo"] = draw(VALUES)
        elif edit == "likely" and key in LIKELY:
            body[key] = draw(LIKELY[key])
        else:
            body[key] = draw(VALUES)
    return toml_document(sections)


LINE = st.one_of(
    st.sampled_from(SECTIONS).map(lambda s: f"[{s}]"),
    st.sampled_from(["[upload", "[[destination]]", "[destination.sub]", "[]", "[ a b ]"]),
    st.tuples(
        st.sampled_from([k for ks in KNOWN.values() for k in ks]) | TEXT,
        st.sampled_from(["=", " = ", "==", ":", ""]),
        st.one_of(
            VALUES.map(toml_value),
            TEXT.map(json.dumps),
            TEXT,
            SIZE_LIKE.map(json.dumps),
            st.sampled_from(['"unterminated', "'''", "[1, 2", "{a = }", "0x", "1_000", "-"]),
        ),
    ).map(lambda t: f"{t[0]}{t[1]}{t[2]}"),
    TEXT,
)
tomlish_texts = st.lists(LINE, max_size=12).map("\n".join)
config_texts = st.one_of(tomlish_texts, structured_configs(), mutated_valid_configs())

ENV_KEYS = st.one_of(
    st.sampled_from([(s, k) for s, ks in KNOWN.items() for k in ks]),
    st.tuples(
        st.sampled_from(SECTIONS) | st.from_regex(r"[a-z]{1,6}", fullmatch=True),
        st.from_regex(r"[a-z_]{1,10}", fullmatch=True),
    ),
)
ENV_VALUES = st.one_of(
    TEXT.filter(lambda t: "\x00" not in t),
    SIZE_LIKE,
    DURATIONS,
    st.sampled_from(["[]", "[1]", '["a b"]', '{"home": 1}', "{", "null", "true", "-1", "1e999"]),
)
SECRET_ENV_VALUES = {
    ("destination", "secret_access_key"): st.just(SECRET),
    ("notify", "healthchecks"): st.just(f'{{"home": "https://hc-ping.com/{HC_SECRET}"}}'),
    ("notify", "urls"): st.sampled_from(
        [f"json://u:{URL_SECRET}@127.0.0.1:1/t", f'["json://u:{URL_SECRET}@127.0.0.1:1/t"]']
    ),
}


@st.composite
def env_overrides(draw: st.DrawFn) -> dict[str, str]:
    """Variables over the good file; secrets only ever go into the secret settings."""
    env = {}
    for section, key in draw(st.lists(ENV_KEYS, max_size=4, unique=True)):
        values = ENV_VALUES | SECRET_ENV_VALUES.get((section, key), ENV_VALUES)
        env[f"BACKREST_RELAY_{section.upper()}__{key.upper()}"] = draw(values)
    return env


GOOD = toml_document(
    {
        "destination": {
            "provider": "s3",
            "endpoint_url": "http://127.0.0.1:9",
            "bucket": "offsite",
            "access_key_id": "AKIAEXAMPLE",
            "secret_access_key": SECRET,
        },
        "notify": {"urls": [f"json://u:{URL_SECRET}@127.0.0.1:1/t"]},
    }
)


# -- the property --------------------------------------------------------------------------------


class Outcomes:
    def __init__(self) -> None:
        self.loaded = 0
        self.refused = 0

    def check(self, path: Path, text: str, env: dict[str, str]) -> None:
        path.write_text(text, encoding="utf-8")
        try:
            loaded = load_config(str(path), env=env)
        except ConfigError as exc:
            assert exc.message.strip(), "ConfigError without a message"
            for secret in SECRETS:
                assert secret not in exc.message, f"{secret!r} echoed in: {exc.message}"
            self.refused += 1
            return
        assert isinstance(loaded, LoadedConfig)
        self.loaded += 1


def test_fuzzed_config_files_load_or_raise_config_error(tmp_path: Path, ledger: Ledger) -> None:
    outcomes = Outcomes()
    path = tmp_path / "relay.toml"

    @fuzz_settings(EXAMPLES)
    @seed(SEED)
    @given(config_texts)
    def files(text: str) -> None:
        outcomes.check(path, text, {})

    @fuzz_settings(EXAMPLES)
    @seed(SEED + 1)
    @given(env_overrides())
    def overrides(env: dict[str, str]) -> None:
        outcomes.check(path, GOOD, env)

    files()
    overrides()
    ledger.add(
        "bad config",
        trials=outcomes.loaded + outcomes.refused,
        faults=outcomes.refused,
        detected=outcomes.refused,
        note=f"{outcomes.loaded} fuzzed configs loaded, {outcomes.refused} refused with "
        "ConfigError (exit 2); no other exception",
    )


def test_fuzzed_config_through_the_cli_exits_0_or_2_without_a_traceback(
    tmp_path: Path, ledger: Ledger
) -> None:
    runs = {0: 0, 2: 0}

    @fuzz_settings(CLI_EXAMPLES)
    @seed(SEED + 2)
    @given(st.one_of(mutated_valid_configs(), config_texts))
    def cli(text: str) -> None:
        path = tmp_path / "cli.toml"
        path.write_text(text, encoding="utf-8")
        env = {"BACKREST_RELAY_STATE__DIR": str(tmp_path / "state")}
        result = run_agent(["status", "--config", str(path), "--json"], env=env, timeout=60)
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output
        assert result.returncode in (0, 2), (result.returncode, output)
        if result.returncode == 2:
            errors = [
                ln for ln in result.stderr.splitlines() if ln.startswith("backrest-relay: error:")
            ]
            assert len(errors) == 1, result.stderr
        for secret in SECRETS:
            assert secret not in output
        runs[result.returncode] += 1

    cli()
    ledger.add(
        "bad config",
        trials=sum(runs.values()),
        faults=runs[2],
        detected=runs[2],
        note=f"CLI: {runs[0]} loaded, {runs[2]} exit 2, no traceback",
    )


# -- regressions: bugs this suite found (fixed in 80cbfda) -----------------------------------------

HUGE = "1" + "0" * 400


def test_huge_size_is_a_config_error(tmp_path: Path) -> None:
    """It raised OverflowError (exit 1, "unexpected error")."""
    for key in ("multipart_threshold", "part_size", "bandwidth_limit"):
        path = tmp_path / f"{key}.toml"
        path.write_text(GOOD + f'[upload]\n{key} = "{HUGE}MiB"\n')
        with pytest.raises(ConfigError, match=f"upload.{key}"):
            load_config(str(path), env={})


def test_huge_deadline_prints_no_traceback(
    tmp_path: Path, rclone_server: RcloneS3Server, rclone_bucket: str
) -> None:
    repo = make_fake_restic_repo(tmp_path / "repo", packs=2, pack_size=1000)
    config = agent_config_in(
        tmp_path,
        rclone_server.endpoint,
        rclone_bucket,
        upload={"deadline": "200000d"},
    )
    args = ["upload", "--repo", str(repo.root), "--repo-id", "x", "--config", str(config)]
    result = run_agent([*args, "--dry-run"])
    # The hard-stop timer thread died with OverflowError and printed a traceback.
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2 and "upload.deadline" in result.stderr, result.stderr

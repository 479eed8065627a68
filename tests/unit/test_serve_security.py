"""What a request may ask of the service: token, body, and the repository it names."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from local_agent.config import load_config
from local_agent.serve.security import (
    Refused,
    Trigger,
    check_token,
    is_loopback,
    parse_trigger,
    resolve_target,
)

TOKEN = "a-long-sentinel-token-0123456789"


def test_token_bearer_or_basic_password_and_nothing_else() -> None:
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    assert check_token(TOKEN, f"Bearer {TOKEN}")
    assert check_token(TOKEN, f"Basic {basic}", basic=True)  # the status page only
    assert not check_token(TOKEN, f"Basic {basic}")
    assert not check_token(TOKEN, None)
    assert not check_token(TOKEN, f"Bearer {TOKEN[:-1]}")
    assert not check_token(TOKEN, f"Token {TOKEN}")
    assert not check_token(TOKEN, "Basic !!!", basic=True)
    assert check_token("", None)  # no token configured (loopback only)


def test_loopback() -> None:
    assert is_loopback("127.0.0.1:8787") and is_loopback("[::1]:8787")
    assert is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:8787") and not is_loopback("backrest-relay:8787")


def test_trigger_from_form_or_json() -> None:
    form = b"repo_id=home&repo_guid=abc&repo_uri=%2Frepos%2Fhome&event=CONDITION_CHECK_SUCCESS"
    parsed = parse_trigger(form, "application/x-www-form-urlencoded")
    assert parsed == Trigger("home", "abc", "/repos/home", "CONDITION_CHECK_SUCCESS", "")
    as_json = parse_trigger(json.dumps({"repo_id": "home"}).encode(), "application/json")
    assert as_json.event == "manual" and as_json.kind == "mirror"
    failed = parse_trigger(
        b"repo_id=home&event=CONDITION_CHECK_ERROR&error=a%27b%0Ac",
        "application/x-www-form-urlencoded",
    )
    assert failed.kind == "failure" and failed.error == "a'b\nc"


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"repo_id=home&repo_id=other", "application/x-www-form-urlencoded", 400),
        (b"repo_id=home&path=/etc", "application/x-www-form-urlencoded", 400),
        (b'{"repo_id": 5}', "application/json", 400),
        (b'{"repo_id": "home", "event": "rm -rf"}', "application/json", 400),
        (b'{"repo_id": "a/../b"}', "application/json", 400),
        (b"{}", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b"repo_id=home", "text/plain", 415),
        (b"repo_id=home&error=a%00b", "application/x-www-form-urlencoded", 400),
        (b"repo_id", "application/x-www-form-urlencoded", 400),  # no '=': not a 500
        (b"repo_id=home&&", "application/x-www-form-urlencoded", 400),
        (b'{"repo_id": "other", "repo_id": "home"}', "application/json", 400),  # as forms
        (b"[" * 3000 + b"]" * 3000, "application/json", 400),  # under max_body: RecursionError
    ],
)
def test_bad_triggers_are_refused(body: bytes, content_type: str, status: int) -> None:
    with pytest.raises(Refused) as exc:
        parse_trigger(body, content_type)
    assert exc.value.status == status


def test_repository_from_serve_repos_set_by_environment(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    (root / "home").mkdir(parents=True)
    config = load_config(
        None,
        {
            "HOME": str(tmp_path),
            "BACKREST_RELAY_DESTINATION__BUCKET": "offsite",
            "BACKREST_RELAY_DESTINATION__PROVIDER": "s3",
            "BACKREST_RELAY_DESTINATION__ENDPOINT_URL": "http://127.0.0.1:9",
            "BACKREST_RELAY_SERVE__ROOTS": json.dumps([str(root)]),
            "BACKREST_RELAY_SERVE__REPOS": json.dumps({"home": str(root / "home")}),
        },
    ).config
    env = {"BACKREST_CONFIG": str(tmp_path / "missing.json")}
    target = resolve_target(Trigger("home", None, None, "manual", ""), config, env)
    assert target.path == (root / "home").resolve() and target.key == "home"
    assert target.destination.endswith("/offsite/restic/home")
    with pytest.raises(Refused) as exc:
        resolve_target(Trigger("other", None, None, "manual", ""), config, env)
    assert exc.value.status == 404


def test_guid_or_uri_differing_from_backrest_config_is_a_conflict(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    (root / "home").mkdir(parents=True)
    backrest = tmp_path / "config.json"
    backrest.write_text(
        json.dumps(
            {
                "repos": [
                    {"id": "home", "uri": str(root / "home"), "guid": "g" * 64},
                    {"id": "remote", "uri": "s3:s3.example.com/bucket/restic"},
                ]
            }
        )
    )
    config = load_config(
        None,
        {
            "HOME": str(tmp_path),
            "BACKREST_RELAY_DESTINATION__BUCKET": "offsite",
            "BACKREST_RELAY_DESTINATION__REGION": "us-west-004",
            "BACKREST_RELAY_SERVE__ROOTS": json.dumps([str(root)]),
            "BACKREST_RELAY_SERVE__BACKREST_CONFIG": str(backrest),
        },
    ).config
    ok = resolve_target(Trigger("home", "g" * 64, str(root / "home"), "manual", ""), config, {})
    assert ok.guid == "g" * 64 and ok.key == "g" * 64
    for trig, status in [
        (Trigger("home", "h" * 64, None, "manual", ""), 409),
        (Trigger("home", None, str(root / "home") + "/", "manual", ""), 409),
        (Trigger("remote", None, None, "manual", ""), 400),
    ]:
        with pytest.raises(Refused) as exc:
            resolve_target(trig, config, {})
        assert exc.value.status == status, trig


def test_unknown_field_names_cannot_forge_or_flood_log_lines() -> None:
    """The refusal is logged: a field name with a new line must not start a fake line, and
    a body of 2,000 made-up fields must not make a 13 kB one."""
    forged = b"repo_id=home&x%0Abackrest-relay: INFO: run 1 finished: exit 0=1"
    flood = b"&".join(b"f%d=1" % i for i in range(2000))
    for body in (forged, flood):
        with pytest.raises(Refused) as exc:
            parse_trigger(body, "application/x-www-form-urlencoded")
        assert exc.value.status == 400
        assert "\n" not in exc.value.message and len(exc.value.message) < 400

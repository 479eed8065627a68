"""The agent's SigV4 signatures are byte-for-byte botocore's, for the requests it signs."""

from __future__ import annotations

import calendar
import hashlib
import time

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from cloud.integrations.sigv4 import SigningCredentials, SigV4Signer, s3_path

ACCESS = "AKIDTESTONLY0000"
SECRET = "test-only-secret-not-a-credential"
TOKEN = "test-only-session-token/with+odd=chars"


def botocore_signature(
    url: str, headers: dict[str, str], body: bytes, token: str | None
) -> tuple[str, dict[str, str]]:
    request = AWSRequest(method="PUT", url=url, headers=headers, data=body)
    S3SigV4Auth(Credentials(ACCESS, SECRET, token), "s3", "eu-central-1").add_auth(request)
    return request.url, {k.lower(): v for k, v in request.headers.items()}


@pytest.mark.parametrize(
    ("host", "key", "token"),
    [
        ("127.0.0.1:9000", "restic/repo/data/ab/ab12cd", None),
        ("s3.example.test", "with space/and+plus=equals&amp;?", None),
        ("s3.example.test", "unicodé/ключ/鍵~tilde!'()*", TOKEN),
        ("[::1]:8443", "double//slash/./dot/../up", TOKEN),
        ("bucket.s3.example.test", "%already-percent", None),
    ],
)
def test_signature_matches_botocore(host: str, key: str, token: str | None) -> None:
    body = b"restic pack bytes"
    sha = hashlib.sha256(body).hexdigest()
    path = f"/my-bucket/{s3_path(key)}"
    headers = {
        "host": host,
        "content-length": str(len(body)),
        "content-md5": "1B2M2Y8AsgTpgAmY7PhCfg==",
        "content-type": "application/octet-stream",
    }
    url, theirs = botocore_signature(f"http://{host}{path}", dict(headers), body, token)
    assert url.endswith(path)  # botocore sends the path exactly as we do
    now = calendar.timegm(time.strptime(theirs["x-amz-date"], "%Y%m%dT%H%M%SZ"))

    ours = SigV4Signer("eu-central-1").sign(
        "PUT", path, headers, sha, SigningCredentials(ACCESS, SECRET, token), now=now
    )

    assert ours["authorization"] == theirs["authorization"]
    assert ours["x-amz-content-sha256"] == theirs["x-amz-content-sha256"] == sha
    assert ours.get("x-amz-security-token") == theirs.get("x-amz-security-token")


def test_signing_key_is_recomputed_when_the_day_or_secret_changes() -> None:
    signer = SigV4Signer("us-east-1")
    creds = SigningCredentials(ACCESS, SECRET)
    args = ("PUT", "/b/k", {"host": "h"}, "0" * 64)
    day1 = signer.sign(*args, creds, now=86400 * 20000)["authorization"]
    day2 = signer.sign(*args, creds, now=86400 * 20001)["authorization"]
    rotated = signer.sign(*args, SigningCredentials(ACCESS, SECRET + "2"), now=86400 * 20001)
    again = signer.sign(*args, creds, now=86400 * 20000)["authorization"]
    assert len({day1, day2, rotated["authorization"]}) == 3
    assert again == day1


def test_credentials_repr_hides_secrets() -> None:
    shown = repr(SigningCredentials(ACCESS, SECRET, TOKEN))
    assert ACCESS in shown
    assert SECRET not in shown
    assert TOKEN not in shown

"""The one redaction module (`cloud.integrations.redact`): known secrets masked in what the
agent prints and logs. URL redaction and the library-log scrubber: test_channels.py."""

from __future__ import annotations

import io
import logging
import sys
import threading

from cloud.integrations.redact import MASK, REDACTOR, RedactingFormatter, Redactor

# -- Redactor ------------------------------------------------------------------------------------


def test_redactor_masks_registered_secrets() -> None:
    redact = Redactor()
    redact.add("s3cr3t-value-123", "https://hooks.slack.com/services/T0/B0/XYZ")
    text = (
        "auth failed for s3cr3t-value-123 and s3cr3t-value-123; "
        "POST https://hooks.slack.com/services/T0/B0/XYZ?x=1"
    )
    out = redact(text)
    assert "s3cr3t-value-123" not in out
    assert "hooks.slack.com/services" not in out
    assert out.count(MASK) == 3
    assert out.endswith("?x=1")


def test_redactor_ignores_short_and_empty_values() -> None:
    redact = Redactor()
    redact.add("", None, "a", "abcde", "key")
    text = "a key abcde is here"
    assert redact(text) == text


def test_redactor_six_characters_is_enough() -> None:
    redact = Redactor()
    redact.add("abcdef")
    assert redact("xx abcdef yy") == f"xx {MASK} yy"


def test_redactor_masks_longest_first() -> None:
    redact = Redactor()
    redact.add("secret", "secret-extended")
    out = redact("value secret-extended end")
    assert "extended" not in out
    assert "secret" not in out


def test_redactor_without_secrets_is_identity() -> None:
    assert Redactor()("nothing to hide") == "nothing to hide"


def test_redactor_add_is_thread_safe() -> None:
    redact = Redactor()
    secrets = [f"secret-{i:05d}" for i in range(400)]

    def add(part: list[str]) -> None:
        for s in part:
            redact.add(s)
            redact("probe")

    threads = [threading.Thread(target=add, args=(secrets[i::4],)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    out = redact(" ".join(secrets))
    assert "secret-" not in out


# -- RedactingFormatter --------------------------------------------------------------------------


SENTINEL = "SENTINEL-SECRET-7f3a-formatter"


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"endpoint said {SENTINEL}")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord("local_agent.test", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_redacting_formatter_masks_message_args_and_tracebacks() -> None:
    REDACTOR.add(SENTINEL)  # the process-wide redactor the CLI registers secrets with
    formatter = RedactingFormatter("%(levelname)s: %(message)s")
    assert SENTINEL not in formatter.format(_record(f"literal {SENTINEL}"))
    out = formatter.format(_record("arg %s here", SENTINEL))
    assert SENTINEL not in out
    assert out == f"ERROR: arg {MASK} here"
    with_tb = formatter.format(_record("boom", exc=True))
    assert "RuntimeError" in with_tb
    assert SENTINEL not in with_tb


def test_redacting_formatter_through_a_logger() -> None:
    REDACTOR.add(SENTINEL)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    logger = logging.getLogger("local_agent.test_redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("upload to https://x/?token=%s failed", SENTINEL)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert stream.getvalue() == f"upload to https://x/?token={MASK} failed\n"

"""One redaction module for the whole project: what may be logged of a URL, and the
second wall that masks known secrets in text from libraries.

Messages are built not to contain secrets in the first place; the scrubbers here catch what
a library echoes (an exception quoting a URL, urllib3 logging a request line).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from urllib.parse import parse_qsl, quote, unquote, urlsplit

MASK = "***"
ELLIPSIS = "…"

# A path segment is shown only when it reads like a fixed route word ("api", "ping",
# "webhooks", "backup-nas"): lowercase letters and - _ . only, at most 24 long. Anything
# with a digit, an uppercase letter or other characters, or longer, may be a token.
_PUBLIC_SEGMENT = re.compile(r"[a-z][a-z._-]{0,23}")


def public_segment(segment: str) -> bool:
    return bool(_PUBLIC_SEGMENT.fullmatch(unquote(segment)))


def _mask_path(path: str) -> str:
    """Hide every token-looking segment of a path; runs of hidden segments become one ``…``."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "" or public_segment(segment):
            out.append(segment)
        elif not out or out[-1] != ELLIPSIS:
            out.append(ELLIPSIS)
    return "/".join(out)


def redact_url(url: str) -> str:
    """A form of `url` that is safe to log: scheme and host (and port) stay, the rest hides.

    Userinfo becomes ``***@``, token-looking path segments become ``…``, query values become
    ``***`` (names stay, so ``?create=***`` still says what was set), a fragment becomes
    ``#…``. Anything that does not parse as ``scheme://host/...`` becomes ``…`` or
    ``scheme://…``. The host is assumed not secret: true for http(s) URLs, not for some
    Apprise schemas (``tgram://BOTTOKEN``), which is why Apprise channels use Apprise's own
    privacy form instead.

    >>> redact_url("https://user:pw@hc-ping.com/5f2d0b9e-8c61-4c43-a2a5-0f8f3cbd3c2a?create=1")
    'https://***@hc-ping.com/…?create=***'
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return ELLIPSIS
    scheme = parts.scheme.lower()
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        return ELLIPSIS
    if not parts.netloc:
        return f"{scheme}://{ELLIPSIS}"
    _userinfo, at, hostport = parts.netloc.rpartition("@")
    if not re.fullmatch(r"[A-Za-z0-9._\-\[\]:]+", hostport):
        return f"{scheme}://{ELLIPSIS}"
    text = f"{scheme}://{MASK + '@' if at else ''}{hostport}{_mask_path(parts.path)}"
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        shown = [f"{quote(k, safe='')}={MASK if v else ''}" for k, v in pairs]
        text += "?" + "&".join(shown) if shown else ""
    if parts.fragment:
        text += "#" + ELLIPSIS
    return text


_SPLIT = re.compile(r"[/:@?&=#,;+\s]+")


def secret_fragments(url: str, shown: str) -> frozenset[str]:
    """The pieces of `url` that `shown` (its redacted form) does not reveal.

    Query *names* are never secret; everything else (userinfo, host, path segments, query
    values, fragment) is split on URL delimiters, and every piece of 4+ characters that
    does not appear in `shown` is secret, in raw, percent-decoded and percent-encoded form.
    The password is secret from 3 characters on.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        parts = None
    candidates: list[str] = []
    always: list[str] = []
    if parts is None or not parts.scheme:
        candidates.extend(_SPLIT.split(url))
    else:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user, colon, password = userinfo.partition(":")
        if colon and password:
            always.append(password)
        candidates.extend([user, *_SPLIT.split(hostport), *_SPLIT.split(parts.path)])
        for _name, value in parse_qsl(parts.query, keep_blank_values=True):
            candidates.append(value)
            candidates.extend(_SPLIT.split(value))
        candidates.extend(_SPLIT.split(parts.fragment))
    shown_plain = unquote(shown)
    fragments: set[str] = set()
    for piece in candidates:
        for form in {piece, unquote(piece)}:
            if len(form) >= 4 and form not in shown and form not in shown_plain:
                fragments.update({form, quote(form, safe=""), quote(form, safe="/:@")})
    for secret in always:
        if len(secret) >= 3:
            for form in {secret, unquote(secret)}:
                fragments.update({form, quote(form, safe=""), quote(form, safe="/:@")})
    return frozenset(f for f in fragments if f)


def scrub(text: str, fragments: Iterable[str]) -> str:
    for fragment in sorted(fragments, key=len, reverse=True):
        if fragment in text:
            text = text.replace(fragment, MASK)
    return text


class LogScrubber(logging.Filter):
    """Replaces known secret fragments in records of the loggers it is attached to.

    Attached (once per process) to the loggers of Apprise and of urllib3, which log request
    URLs; a logger's filters run before any handler, caplog's and powertools' included.
    Fragments are registered per channel key, so rebuilding the same channels on every
    Lambda invocation does not grow the set.
    """

    LOGGERS = (
        "apprise",
        "urllib3.connectionpool",
        "urllib3.connection",
        "urllib3.util.retry",
    )

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._by_owner: dict[str, frozenset[str]] = {}
        self._ordered: tuple[str, ...] = ()
        self._installed = False

    def install(self) -> None:
        with self._lock:
            if self._installed:
                return
            for name in self.LOGGERS:
                logging.getLogger(name).addFilter(self)
            self._installed = True

    def register(self, owner: str, fragments: frozenset[str]) -> None:
        self.install()
        with self._lock:
            if fragments:
                self._by_owner[owner] = fragments
            else:
                self._by_owner.pop(owner, None)
            self._reorder()

    def unregister(self, owner: str) -> None:
        with self._lock:
            if self._by_owner.pop(owner, None) is not None:
                self._reorder()

    @contextlib.contextmanager
    def guarding(self, owner: str, fragments: frozenset[str]) -> Iterator[None]:
        self.register(owner, fragments)
        try:
            yield
        finally:
            self.unregister(owner)

    def _reorder(self) -> None:
        everything = set().union(*self._by_owner.values()) if self._by_owner else set()
        self._ordered = tuple(sorted(everything, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        return scrub(text, self._ordered)

    def filter(self, record: logging.LogRecord) -> bool:
        fragments = self._ordered
        if not fragments:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's problem, not ours
            return True
        clean = scrub(message, fragments)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info), fragments)
        return True


SCRUBBER = LogScrubber()


class Redactor:
    """Known secrets (credentials from the configuration), masked in whatever the agent
    prints or logs."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, *secrets: str | None) -> None:
        with self._lock:
            # Short values would mask ordinary words; credentials are long.
            self._secrets.update(s for s in secrets if s and len(s) >= 6)

    def __call__(self, text: str) -> str:
        with self._lock:
            secrets = tuple(self._secrets)
        return scrub(text, secrets)


REDACTOR = Redactor()


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return REDACTOR(super().format(record))

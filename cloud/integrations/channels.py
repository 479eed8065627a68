"""Notification channels: an SNS topic, Apprise URLs and Healthchecks pings, and delivery to all.

Each channel implements `cloud.logic.ports.NotificationChannel`: a `name` that is safe to
log and a `send()` that delivers or raises `ChannelError`. `deliver()` sends one
notification to every channel; one failing channel never stops the others, and the
`DeliveryReport` says which failed and why.

Secrets. A channel's target is a credential: a Slack/Discord webhook path, a Telegram bot
token, an SMTP password, a Healthchecks check UUID. None of it may reach a log line, an
exception message, a repr or a name:

* `name` is built from a redacted form: Apprise's own privacy form (``url(privacy=True)``)
  for Apprise URLs, `redact_url()` for Healthchecks, the topic ARN for SNS (an ARN is an
  identifier, not a credential).
* Error messages are composed from that name plus status codes and error classes, never
  from a library's exception text without scrubbing it first.
* Apprise (and urllib3 underneath it) log request URLs at DEBUG and some failures at
  WARNING. A filter on those loggers replaces every secret fragment of every Apprise URL
  loaded in this process with ``***`` before any handler sees the record.

Constructors never raise for a bad target (a typo in one URL must not take the other
channels down with it); the channel reports the problem on `send()` and in `problem`.

Heavy SDKs (apprise, boto3) are imported on first use, so a function that needs only one
kind of channel does not pay for the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import re
import threading
import time
import unicodedata
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from cloud.logic.ports import ChannelError, Notification, NotificationChannel, Severity

if TYPE_CHECKING:
    from apprise import Apprise
    from types_boto3_sns import SNSClient
    from types_boto3_sns.type_defs import MessageAttributeValueTypeDef

log = logging.getLogger(__name__)

MASK = "***"
ELLIPSIS = "…"

__all__ = [
    "AppriseChannel",
    "ChannelOutcome",
    "DeliveryReport",
    "HealthchecksChannel",
    "SnsChannel",
    "build_channels",
    "deliver",
    "parse_apprise_urls",
    "redact_url",
    "sns_subject",
]


# -- redaction ------------------------------------------------------------------------------------

# A path segment is shown only when it reads like a fixed route word ("api", "ping",
# "webhooks", "backup-nas"): lowercase letters and - _ . only, at most 24 long. Anything
# with a digit, an uppercase letter or other characters, or longer, may be a token.
_PUBLIC_SEGMENT = re.compile(r"[a-z][a-z._-]{0,23}")


def _public_segment(segment: str) -> bool:
    return bool(_PUBLIC_SEGMENT.fullmatch(unquote(segment)))


def _mask_path(path: str) -> str:
    """Hide every token-looking segment of a path; runs of hidden segments become one ``…``."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "" or _public_segment(segment):
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


def _channel_key(kind: str, target: str) -> str:
    """A stable id for (kind, target) that reveals nothing about the target (for idempotency
    records and de-duplication): 16 hex digits of SHA-256."""
    return hashlib.sha256(f"{kind}\0{target}".encode()).hexdigest()[:16]


_SPLIT = re.compile(r"[/:@?&=#,;+\s]+")


def _secret_fragments(url: str, shown: str) -> frozenset[str]:
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


def _scrub(text: str, fragments: Iterable[str]) -> str:
    for fragment in sorted(fragments, key=len, reverse=True):
        if fragment in text:
            text = text.replace(fragment, MASK)
    return text


class _LogScrubber(logging.Filter):
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
        return _scrub(text, self._ordered)

    def filter(self, record: logging.LogRecord) -> bool:
        fragments = self._ordered
        if not fragments:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's problem, not ours
            return True
        clean = _scrub(message, fragments)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _scrub(
                logging.Formatter().formatException(record.exc_info), fragments
            )
        return True


_SCRUBBER = _LogScrubber()


# -- SNS ------------------------------------------------------------------------------------------

SNS_SUBJECT_MAX = 99  # "less than 100 characters"
SNS_MESSAGE_MAX_BYTES = 250_000  # the limit is 256 KiB including attributes
_SNS_ARN = re.compile(r"arn:aws[a-z-]*:sns:([a-z0-9-]+):(\d{12}):([A-Za-z0-9_-]{1,256}(?:\.fifo)?)")
_ASCII_PUNCTUATION = str.maketrans(
    {
        "—": "-",
        "–": "-",
        "‐": "-",
        "−": "-",
        "‘": "'",
        "’": "'",
        "“": '"',
        "”": '"',
        "…": "...",
        "·": "-",
        "×": "x",
        "→": "->",
    }
)


def sns_subject(subject: str) -> str:
    """`subject` made acceptable to SNS Publish: ASCII, one line, no control characters,
    starting with a letter, digit or punctuation, under 100 characters."""
    text = unicodedata.normalize("NFKD", subject.translate(_ASCII_PUNCTUATION))
    text = text.encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[\x00-\x1f\x7f\s]+", " ", text).strip()
    if len(text) > SNS_SUBJECT_MAX:
        text = text[: SNS_SUBJECT_MAX - 3].rstrip() + "..."
    return text or "backrest-relay notification"


def _truncate_utf8(text: str, limit: int, marker: str = "\n[truncated]") -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    room = limit - len(marker.encode("utf-8"))
    return data[:room].decode("utf-8", "ignore") + marker


def _attribute(value: str) -> MessageAttributeValueTypeDef:
    return {"DataType": "String", "StringValue": value}


class SnsChannel:
    """Publishes to an SNS topic: `Subject` (sanitized), `Message` = the plain text, and
    message attributes `severity`, `repo`, `repo_key`, `run_id` for subscription filter
    policies (e.g. an on-call address subscribed to ``{"severity": ["failure", "stale"]}``).

    Email subscribers receive `Message` as the mail body, so it is the plain text (SNS email
    does not render HTML). FIFO topics (``.fifo``) get the repository as message group and
    (run, severity) as deduplication id, so a redelivered event does not mail twice.
    The client is built on first use in the topic's region, from the standard AWS chain
    (``AWS_ENDPOINT_URL_SNS`` works for local endpoints).
    """

    kind = "sns"

    def __init__(self, topic_arn: str, client: SNSClient | None = None) -> None:
        self.topic_arn = topic_arn.strip()
        self._client = client
        self._lock = threading.Lock()
        match = _SNS_ARN.fullmatch(self.topic_arn)
        self._region = match.group(1) if match else None
        self.problem: str | None = None if match else "not an SNS topic ARN"
        self.key = _channel_key(self.kind, self.topic_arn)

    @property
    def name(self) -> str:
        return f"sns:{self.topic_arn}" if self.problem is None else "sns:(invalid topic ARN)"

    def __repr__(self) -> str:
        return f"SnsChannel({self.name!r})"

    def client(self) -> SNSClient:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.client(
                    "sns",
                    region_name=self._region,
                    config=Config(
                        retries={"mode": "standard", "max_attempts": 3},
                        connect_timeout=5,
                        read_timeout=10,
                        user_agent_extra="backrest-relay",
                    ),
                )
            return self._client

    def send(self, notification: Notification) -> None:
        if self.problem is not None:
            raise ChannelError(f"{self.name}: {self.problem}")
        from botocore.exceptions import BotoCoreError, ClientError

        attributes = {
            "severity": _attribute(notification.severity),
            "repo": _attribute(notification.repo_id or notification.repo_key),
            "repo_key": _attribute(notification.repo_key),
        }
        if notification.run_id:
            attributes["run_id"] = _attribute(notification.run_id)
        extra: dict[str, str] = {}
        if self.topic_arn.endswith(".fifo"):
            extra["MessageGroupId"] = notification.repo_key[:128]
            extra["MessageDeduplicationId"] = hashlib.sha256(
                f"{notification.run_id}\0{notification.severity}".encode()
            ).hexdigest()
        try:
            self.client().publish(
                TopicArn=self.topic_arn,
                Subject=sns_subject(notification.subject),
                Message=_truncate_utf8(
                    notification.text or notification.subject, SNS_MESSAGE_MAX_BYTES
                ),
                MessageAttributes=attributes,
                **extra,
            )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "Unknown")
            detail = " ".join((error.get("Message") or "").split())[:200]
            suffix = f" ({detail})" if detail else ""
            raise ChannelError(f"{self.name}: Publish refused: {code}{suffix}") from None
        except BotoCoreError as exc:
            # botocore's messages name the endpoint or the missing piece, never key material.
            raise ChannelError(f"{self.name}: {type(exc).__name__}: {str(exc)[:200]}") from None


# -- Apprise --------------------------------------------------------------------------------------

# Schemas whose preferred format is HTML but which accept only a narrow HTML subset (chat):
# they get the plain text, which Apprise escapes for them.
_HTML_NOT_FOR = frozenset({"tgram", "pushplus"})
_APPRISE_TYPES: dict[Severity, str] = {
    "success": "success",
    "recovery": "success",
    "failure": "failure",
    "stale": "warning",
}
_DEFAULT_APPRISE_TIMEOUT = 30.0


def _strip_query(url: str) -> str:
    """Apprise's privacy URL without its query (defaults noise, and from=/to= addresses)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ELLIPSIS
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _apprise_target(privacy_url: str) -> str:
    """Apprise's privacy form, query dropped, and path segments Apprise left in the clear
    masked (``a...z``) when they look like tokens (e.g. a webhook token in a json:// path).
    Segments Apprise already masked (``a...z``), ``#channel``s and e-mail addresses stay."""
    parts = urlsplit(_strip_query(privacy_url))
    segments = []
    for segment in parts.path.split("/"):
        plain = unquote(segment)
        if (
            segment == ""
            or "..." in plain
            or plain.startswith(("#", "@"))
            or "@" in plain
            or _public_segment(segment)
        ):
            segments.append(segment)
        elif len(plain) <= 2:
            segments.append(ELLIPSIS)
        else:
            segments.append(f"{plain[0]}...{plain[-1]}")
    return urlunsplit((parts.scheme, parts.netloc, "/".join(segments).rstrip("/"), "", ""))


def _scheme_only(url: str) -> str:
    match = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return f"{match.group(1).lower()}://{ELLIPSIS}" if match else "(not a URL)"


class AppriseChannel:
    """One Apprise URL (Slack, Discord, Teams workflows, Telegram, ntfy, Gotify, Matrix,
    mailto, json, ...). E-mail schemas get the HTML body, every other schema the plain text.

    `name` is ``apprise:`` + Apprise's privacy form of the URL (tokens shown as ``a...z``,
    passwords as ``****``) without the query. The URL is parsed when the channel is built
    (Apprise loads its plugins then, about a second the first time); an invalid URL does not
    raise there but on `send()`, and is described by `problem`.
    """

    kind = "apprise"

    def __init__(self, url: str, *, timeout: float = _DEFAULT_APPRISE_TIMEOUT) -> None:
        self._url = url.strip()
        self._timeout = timeout
        self.key = _channel_key(self.kind, self._url)
        self._apprise: Apprise | None = None
        self._html = False
        self.problem: str | None = None
        # Until Apprise has parsed the URL we do not know what its privacy form shows, so
        # everything but the scheme is treated as secret while it logs about the parsing.
        provisional = _scheme_only(self._url)
        with _SCRUBBER.guarding(f"{self.key}:loading", _secret_fragments(self._url, provisional)):
            target = self._load()
        self._name = f"{self.kind}:{target or provisional}"
        self._fragments = _secret_fragments(self._url, self._name)
        _SCRUBBER.register(self.key, self._fragments)

    def _load(self) -> str | None:
        try:
            from apprise import Apprise, AppriseAsset, NotifyFormat, PersistentStoreMode
        except ImportError:  # a packaging mistake must not take SNS and pings down too
            self.problem = "the apprise package is not installed"
            return None

        try:
            asset = AppriseAsset(
                app_id="backrest-relay",
                app_desc="backrest-relay",
                storage_mode=PersistentStoreMode.MEMORY,  # Lambda's file system is read-only
                service_timeout=self._timeout,  # apprise >= 2.2
            )
        except Exception:
            self.problem = "apprise could not be set up (apprise >= 2.2 is required)"
            return None
        apobj = Apprise(asset=asset)
        try:
            added = apobj.add(self._url)
        except Exception:  # apprise validates most things itself; be safe with the rest
            added = False
        if not added or len(apobj) != 1:
            self.problem = (
                "not a valid Apprise URL (unknown schema, missing or malformed token)"
                if len(apobj) <= 1
                else "one Apprise URL per channel expected, found several"
            )
            return None
        plugin = apobj[0]
        declared = plugin.notify_format
        formats = declared if isinstance(declared, tuple) else (declared,)
        protocols = {
            p
            for attr in ("protocol", "secure_protocol")
            for p in _as_tuple(getattr(plugin, attr, None))
        }
        self._html = (
            bool(formats) and formats[0] == NotifyFormat.HTML and not (protocols & _HTML_NOT_FOR)
        )
        self._apprise = apobj
        return _apprise_target(str(plugin.url(privacy=True)))  # type: ignore[no-untyped-call]

    @property
    def name(self) -> str:
        return self._name

    @property
    def sends_html(self) -> bool:
        return self._html

    def __repr__(self) -> str:
        return f"AppriseChannel({self._name!r})"

    def _safe(self, text: str) -> str:
        return _scrub(_SCRUBBER.scrub(text), self._fragments)

    def send(self, notification: Notification) -> None:
        if self._apprise is None:
            raise ChannelError(f"{self.name}: {self.problem}")
        from apprise import NotifyFormat, NotifyType

        if self._html and notification.html:
            body, body_format = notification.html, NotifyFormat.HTML
        else:
            body, body_format = notification.text, NotifyFormat.TEXT
        try:
            result = self._apprise.notify(
                body=body or notification.subject,
                title=notification.subject,
                notify_type=NotifyType(_APPRISE_TYPES[notification.severity]),
                body_format=body_format,
                timeout=self._timeout,
            )
        except Exception as exc:
            raise ChannelError(
                f"{self.name}: {type(exc).__name__}: {self._safe(str(exc))[:300]}"
            ) from None
        if result:
            return
        raise ChannelError(f"{self.name}: {self._describe(result)}")

    def _describe(self, result: Any) -> str:
        """Apprise's verdict and its last warning, scrubbed (it may name a host, a status)."""
        status = getattr(getattr(result, "status", None), "name", None) or "FAILURE"
        reason = ""
        try:
            entries = [e for e in result.logs() if str(e.level).upper() in {"WARNING", "ERROR"}]
        except Exception:
            entries = []
        if entries:
            reason = self._safe(str(entries[-1].message)).strip()
        what = {"TIMEOUT": f"timed out after {self._timeout:g}s"}.get(status, "delivery failed")
        return f"{what}" + (f": {reason[:300]}" if reason else "")


def _as_tuple(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(str(v) for v in value)
    return ()


# -- Healthchecks ---------------------------------------------------------------------------------

HEALTHCHECKS_BODY_MAX = 10_000  # bytes of the message sent as the ping body


class HealthchecksChannel:
    """Pings a Healthchecks check: success/recovery → ``<ping_url>``, failure/stale →
    ``<ping_url>/fail``, both POSTed with the plain text as body (≤ 10 KB, shown in the
    check's log) and ``rid=<run id>`` (Healthchecks' run id, which must be a UUID; our
    UUIDv7 run ids are). Works with ``https://hc-ping.com/<uuid>``, slug URLs
    (``/<ping-key>/<slug>``, keeping ``?create=1``) and self-hosted ``/ping/<uuid>``.

    One retry after a connection error or a 5xx; a 4xx (unknown check, bad request) is
    final. The check's UUID (or ping key) is the secret: `name` is ``healthchecks:`` plus
    `redact_url()`, e.g. ``healthchecks:https://hc-ping.com/…``.
    """

    kind = "healthchecks"
    heartbeat = True  # hears every verified run, whatever the success policy says

    def __init__(
        self,
        ping_url: str,
        *,
        timeout: float = 10.0,
        retries: int = 1,
        retry_delay: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._ping_url = ping_url.strip()
        self._timeout = timeout
        self._retries = max(retries, 0)
        self._retry_delay = retry_delay
        self._sleep = sleep
        self.key = _channel_key(self.kind, self._ping_url)
        self._name = f"{self.kind}:{redact_url(self._ping_url)}"
        self.problem: str | None = None
        try:
            parts = urlsplit(self._ping_url)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem = "not an http(s) ping URL"

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"HealthchecksChannel({self._name!r})"

    def signal_url(self, notification: Notification) -> str:
        """The URL to ping for `notification` (secret: do not log it)."""
        return self._url(
            "" if notification.ok else "/fail", notification.ping_run_id or notification.run_id
        )

    def _url(self, suffix: str, run_id: str) -> str:
        parts = urlsplit(self._ping_url)
        path = parts.path.rstrip("/") + suffix
        query = parse_qsl(parts.query, keep_blank_values=True)
        query = [(k, v) for k, v in query if k != "rid"]
        # Healthchecks refuses a rid that is not a UUID: better no rid than no ping.
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            query.append(("rid", str(uuid.UUID(run_id))))
        return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), ""))

    def start(self, run_id: str) -> None:
        """`/start` when a run begins, so Healthchecks shows how long the run took (its
        success or failure ping carries the same `rid`). Raises ChannelError."""
        self._post(self._url("/start", run_id), "", "start")

    def send(self, notification: Notification) -> None:
        self._post(
            self.signal_url(notification),
            notification.text,
            "fail" if not notification.ok else "success",
        )

    def _post(self, url: str, text: str, what: str) -> None:
        if self.problem is not None:
            raise ChannelError(f"{self.name}: {self.problem}")
        request = urllib.request.Request(  # noqa: S310 (scheme checked in __init__)
            url,
            data=_truncate_utf8(text, HEALTHCHECKS_BODY_MAX).encode("utf-8"),
            method="POST",
            headers={
                "User-Agent": "backrest-relay",
                "Content-Type": "text/plain; charset=utf-8",
            },
        )
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                    response.read(1024)
                return
            except urllib.error.HTTPError as exc:
                status = exc.code
                exc.close()
                if status < 500 or last:
                    raise ChannelError(
                        f"{self.name}: {what} ping refused: HTTP {status} {_reason(status)}"
                    ) from None
            except (OSError, http.client.HTTPException) as exc:
                if last:
                    raise ChannelError(
                        f"{self.name}: {what} ping failed after {attempt + 1} attempt(s): "
                        f"{_oserror(exc)}"
                    ) from None
            self._sleep(self._retry_delay)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _oserror(exc: BaseException) -> str:
    """Class and errno text of a connection error, without the URL urllib may carry."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, OSError) and reason.strerror:
        return f"{type(reason).__name__}: {reason.strerror}"
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return "TimeoutError: timed out"
    return type(reason).__name__ if isinstance(reason, BaseException) else "connection error"


# -- delivery -------------------------------------------------------------------------------------


class _Log(Protocol):
    """What `deliver` needs of a logger (stdlib `logging.Logger` and powertools `Logger`)."""

    def info(self, msg: str, *args: object) -> None: ...

    def warning(self, msg: str, *args: object) -> None: ...


@dataclass(frozen=True)
class ChannelOutcome:
    """How one channel fared. `error` (without the name) is safe to log and store."""

    name: str
    ok: bool
    error: str | None = None
    key: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class DeliveryReport:
    outcomes: tuple[ChannelOutcome, ...]

    @property
    def sent(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if not o.ok)

    @property
    def ok(self) -> bool:
        """Every channel delivered (vacuously true with no channels)."""
        return self.failed == 0

    @property
    def failures(self) -> tuple[ChannelOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "channels": [
                {"name": o.name, "ok": o.ok, "error": o.error, "seconds": round(o.seconds, 3)}
                for o in self.outcomes
            ],
        }


def channel_key(channel: NotificationChannel) -> str:
    """A stable, secret-free id of a channel (for per-(run, channel) idempotency)."""
    key = getattr(channel, "key", None)
    return key if isinstance(key, str) and key else _channel_key("name", channel.name)


def deliver(
    notification: Notification,
    channels: Iterable[NotificationChannel],
    logger: _Log | None = None,
) -> DeliveryReport:
    """Send `notification` to every channel, in order; a failure (a `ChannelError`, or any
    other exception from a buggy channel) is logged with the channel's safe name and
    recorded, and the next channel is still tried."""
    logger = logger or log
    outcomes: list[ChannelOutcome] = []
    for channel in channels:
        started = time.monotonic()
        name = _safe_name(channel)
        error: str | None
        try:
            channel.send(notification)
            error = None
        except ChannelError as exc:
            error = str(exc).removeprefix(f"{name}: ") or type(exc).__name__
        except Exception as exc:  # a channel's bug must not silence the others
            # Its message may quote a URL: only the class is reported.
            error = f"unexpected {type(exc).__name__}"
        seconds = time.monotonic() - started
        if error is None:
            logger.info(
                "%s notification for %s delivered via %s",
                notification.severity,
                notification.repo_id or notification.repo_key,
                name,
            )
        else:
            logger.warning(
                "%s notification for %s not delivered via %s: %s",
                notification.severity,
                notification.repo_id or notification.repo_key,
                name,
                error,
            )
        outcomes.append(ChannelOutcome(name, error is None, error, channel_key(channel), seconds))
    return DeliveryReport(tuple(outcomes))


def _safe_name(channel: NotificationChannel) -> str:
    try:
        return str(channel.name)
    except Exception:
        return type(channel).__name__


# -- building channels from settings --------------------------------------------------------------


def parse_apprise_urls(value: Any) -> list[str]:
    """Apprise URLs from a setting or a secret: a JSON array of strings, an object with a
    ``urls`` array, or text with one URL per line (blank lines and ``#`` comments skipped;
    a JSON string is decoded first). Raises ValueError naming the shape, never a value."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith(("[", "{")):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError:
                raise ValueError("Apprise URL list is not valid JSON") from None
        else:
            return [
                line.strip()
                for line in stripped.splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
    if isinstance(value, dict):
        if "urls" not in value:
            raise ValueError("Apprise URL object needs a 'urls' array")
        value = value["urls"]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError(f"Apprise URLs must be a list of strings, not {type(value).__name__}")


def build_channels(
    *,
    apprise_urls: Iterable[str] = (),
    sns_topic_arn: str | None = None,
    healthchecks_url: str | None = None,
    sns_client: SNSClient | None = None,
    apprise_timeout: float = _DEFAULT_APPRISE_TIMEOUT,
) -> list[NotificationChannel]:
    """The channels for one repository's notification, from settings: the SNS topic (cloud
    mode), each Apprise URL (`notify.urls` locally, the Secrets Manager list in the cloud),
    and the repository's Healthchecks ping URL. Blank and duplicate entries are skipped;
    invalid ones become channels that fail on send, so the others still deliver."""
    channels: list[NotificationChannel] = []
    if sns_topic_arn and sns_topic_arn.strip():
        channels.append(SnsChannel(sns_topic_arn, client=sns_client))
    seen: set[str] = set()
    for url in apprise_urls:
        url = url.strip()
        if url and url not in seen:
            seen.add(url)
            channels.append(AppriseChannel(url, timeout=apprise_timeout))
    if healthchecks_url and healthchecks_url.strip():
        channels.append(HealthchecksChannel(healthchecks_url))
    return channels


def describe_channels(channels: Sequence[NotificationChannel]) -> list[str]:
    """The safe names, e.g. for `doctor` or a startup log line."""
    return [_safe_name(c) for c in channels]

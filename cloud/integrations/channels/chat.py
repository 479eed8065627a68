"""Chat and mail through one Apprise URL (Slack, Discord, Teams, Telegram, ntfy, ...).

The URL is a credential: the channel's name is Apprise's privacy form, and every secret
fragment of the URL is registered with the process-wide log scrubber.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from cloud.integrations.redact import (
    ELLIPSIS,
    SCRUBBER,
    public_segment,
    scrub,
    secret_fragments,
)
from cloud.logic.delivery import target_key
from cloud.logic.ports import ChannelError, Notification, Severity

if TYPE_CHECKING:
    from apprise import Apprise

# Schemas whose preferred format is HTML but which accept only a narrow HTML subset (chat):
# they get the plain text, which Apprise escapes for them.
_HTML_NOT_FOR = frozenset({"tgram", "pushplus"})
_APPRISE_TYPES: dict[Severity, str] = {
    "success": "success",
    "recovery": "success",
    "failure": "failure",
    "stale": "warning",
}
DEFAULT_APPRISE_TIMEOUT = 30.0


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
            or public_segment(segment)
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

    def __init__(self, url: str, *, timeout: float = DEFAULT_APPRISE_TIMEOUT) -> None:
        self._url = url.strip()
        self._timeout = timeout
        self.key = target_key(self.kind, self._url)
        self._apprise: Apprise | None = None
        self._html = False
        self.problem: str | None = None
        # Until Apprise has parsed the URL we do not know what its privacy form shows, so
        # everything but the scheme is treated as secret while it logs about the parsing.
        provisional = _scheme_only(self._url)
        with SCRUBBER.guarding(f"{self.key}:loading", secret_fragments(self._url, provisional)):
            target = self._load()
        self._name = f"{self.kind}:{target or provisional}"
        self._fragments = secret_fragments(self._url, self._name)
        SCRUBBER.register(self.key, self._fragments)

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
        return scrub(SCRUBBER.scrub(text), self._fragments)

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

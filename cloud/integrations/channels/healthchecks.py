"""Healthchecks pings: a heartbeat channel that hears every verified run, with its own
retry (one retry after a connection error or a 5xx)."""

from __future__ import annotations

import contextlib
import http.client
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cloud.integrations.redact import redact_url
from cloud.logic.delivery import target_key
from cloud.logic.ports import ChannelError, Notification
from cloud.logic.text import truncate_utf8

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
        self.key = target_key(self.kind, self._ping_url)
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
            data=truncate_utf8(text, HEALTHCHECKS_BODY_MAX).encode("utf-8"),
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

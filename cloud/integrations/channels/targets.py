"""The notifier Lambda's channels for one repository: the SNS topic, the Apprise URLs of
the notify secret, and the repository's Healthchecks ping URL. Channels are kept per
container while their URL stays in the secret (Apprise parses a URL once)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from cloud.contracts.events import RepoRef
from cloud.integrations.channels.chat import AppriseChannel
from cloud.integrations.channels.healthchecks import HealthchecksChannel
from cloud.integrations.channels.sns import SnsChannel
from cloud.integrations.secrets import (
    DEFAULT_MAX_AGE,
    NotifySecretError,
    NotifyTargets,
    load_notify_targets,
)
from cloud.logic.ports import ChannelError, Notification, NotificationChannel

APPRISE_TIMEOUT_SECONDS = 15.0
"""Per Apprise URL; the function has 120 s for a batch of up to 10 records."""


class UnavailableTargets:
    """Stands in for the channels of an unreadable or invalid notify secret: always fails,
    so the record is retried (and ends in the DLQ if the secret stays broken) while the SNS
    topic still delivers. Its name and error carry the secret's id, never its content."""

    kind = "notify-secret"

    def __init__(self, secret_id: str, problem: str) -> None:
        self._name = f"{self.kind}:{secret_id}"
        self.problem = problem

    @property
    def name(self) -> str:
        return self._name

    def send(self, notification: Notification) -> None:
        raise ChannelError(f"{self.name}: {self.problem}")


class NotifyChannels:
    """The channels for one repository's notification: the SNS topic, every Apprise URL of
    the notify secret, and the repository's Healthchecks ping URL (looked up by guid, then
    by Backrest id).

    Channels are kept per container while their URL stays in the secret (Apprise parses a
    URL once; the SNS client keeps its connections); the secret itself is cached by
    powertools Parameters for `max_age` seconds, so an edited secret is picked up within
    minutes without a cold start.
    """

    def __init__(
        self,
        *,
        topic_arn: str | None,
        secret_id: str | None,
        max_age: int = DEFAULT_MAX_AGE,
        load: Callable[[str], NotifyTargets] | None = None,
        sns: NotificationChannel | None = None,
        apprise: Callable[[str], NotificationChannel] | None = None,
        healthchecks: Callable[[str], NotificationChannel] | None = None,
    ) -> None:
        self.topic_arn = topic_arn or None
        self.secret_id = secret_id or None
        self.max_age = max_age
        self._load = load or (lambda sid: load_notify_targets(sid, max_age=self.max_age))
        self._sns = sns if sns is not None else (SnsChannel(topic_arn) if topic_arn else None)
        self._make_apprise = apprise or (
            lambda url: AppriseChannel(url, timeout=APPRISE_TIMEOUT_SECONDS)
        )
        self._make_healthchecks = healthchecks or HealthchecksChannel
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], NotificationChannel] = {}
        self._targets: NotifyTargets | None = None

    def targets(self) -> NotifyTargets | None:
        """The secret's targets (None without a secret); raises `NotifySecretError`."""
        return None if self.secret_id is None else self._load(self.secret_id)

    def _channel(self, kind: str, url: str) -> NotificationChannel:
        channel = self._cache.get((kind, url))
        if channel is None:
            make = self._make_apprise if kind == "apprise" else self._make_healthchecks
            channel = self._cache[(kind, url)] = make(url)
        return channel

    def _forget_removed(self, targets: NotifyTargets) -> None:
        if targets == self._targets:
            return
        keep = {("apprise", url) for url in targets.apprise_urls}
        keep |= {("healthchecks", url) for url in targets.healthchecks.values()}
        self._cache = {k: v for k, v in self._cache.items() if k in keep}
        self._targets = targets

    def __call__(self, repo: RepoRef) -> list[NotificationChannel]:
        channels: list[NotificationChannel] = [] if self._sns is None else [self._sns]
        try:
            targets = self.targets()
        except NotifySecretError as exc:
            assert self.secret_id is not None
            channels.append(UnavailableTargets(self.secret_id, str(exc)))
            return channels
        if targets is None:
            return channels
        with self._lock:
            self._forget_removed(targets)
            channels.extend(self._channel("apprise", url) for url in targets.apprise_urls)
            ping = targets.healthchecks_url(repo.guid, repo.id)
            if ping:
                channels.append(self._channel("healthchecks", ping))
        return channels

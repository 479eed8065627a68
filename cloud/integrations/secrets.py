"""The cloud functions' secrets (AWS Secrets Manager through powertools Parameters, cached
per container so a rotated key is picked up within minutes): the verifier's destination
read credentials and the notifier's targets. Errors name the secret id and the offending
field, never a value. Shapes: docs/lambda.md and infra/README.md."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from cloud.contracts.destination import Provider
from cloud.integrations.s3 import S3Access

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.parameters import SecretsProvider

DEFAULT_MAX_AGE = 300


class DestinationSecretError(Exception):
    """The secret is missing, unreadable or not in the expected shape (message is safe to log)."""


class DestinationCredentials(BaseModel):
    """The secret's JSON. Unknown keys are refused so a misspelt key is loud, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    provider: Provider
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None

    def access(self) -> S3Access:
        return S3Access(
            provider=self.provider,
            endpoint_url=self.endpoint_url or None,
            region=self.region or None,
            access_key_id=_reveal(self.access_key_id),
            secret_access_key=_reveal(self.secret_access_key),
        )


def _reveal(value: SecretStr | None) -> str | None:
    if value is None:
        return None
    return value.get_secret_value() or None


def _describe(exc: ValidationError) -> str:
    """Which fields are wrong and why, without the values (pydantic's str() shows inputs)."""
    parts = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        where = ".".join(str(p) for p in error.get("loc", ())) or "(top level)"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def parse_destination_secret(secret_id: str, value: Any) -> S3Access:
    """Validate the secret's decoded JSON into an `S3Access`."""
    if not isinstance(value, dict):
        raise DestinationSecretError(
            f"destination secret {secret_id!r} must be a JSON object, not {type(value).__name__}"
        )
    try:
        credentials = DestinationCredentials.model_validate(value)
    except ValidationError as exc:
        raise DestinationSecretError(
            f"destination secret {secret_id!r} is not valid: {_describe(exc)}"
        ) from None
    if (credentials.access_key_id is None) != (credentials.secret_access_key is None):
        raise DestinationSecretError(
            f"destination secret {secret_id!r}: access_key_id and secret_access_key "
            "must be given together"
        )
    return credentials.access()


def _read_json_secret(
    secret_id: str,
    *,
    what: str,
    error: type[Exception],
    provider: SecretsProvider | None,
    max_age: int,
    force_fetch: bool,
) -> Any:
    """The secret's decoded JSON, through powertools Parameters (`provider` defaults to its
    shared Secrets Manager provider) and its per-container cache; errors name the secret,
    never its value."""
    from aws_lambda_powertools.utilities import parameters
    from aws_lambda_powertools.utilities.parameters.exceptions import (
        GetParameterError,
        TransformParameterError,
    )

    try:
        if provider is None:
            return parameters.get_secret(
                secret_id, transform="json", max_age=max_age, force_fetch=force_fetch
            )
        return provider.get(secret_id, transform="json", max_age=max_age, force_fetch=force_fetch)
    except TransformParameterError:
        raise error(f"{what} secret {secret_id!r} is not valid JSON") from None
    except GetParameterError as exc:
        # The SDK's message (e.g. ResourceNotFoundException, AccessDenied) carries no value.
        raise error(f"{what} secret {secret_id!r} could not be read: {exc}") from None


def load_destination_access(
    secret_id: str,
    *,
    provider: SecretsProvider | None = None,
    max_age: int = DEFAULT_MAX_AGE,
    force_fetch: bool = False,
) -> S3Access:
    """Fetch (or take from the per-container cache) and validate the destination secret."""
    value = _read_json_secret(
        secret_id,
        what="destination",
        error=DestinationSecretError,
        provider=provider,
        max_age=max_age,
        force_fetch=force_fetch,
    )
    return parse_destination_secret(secret_id, value)


# -- notification targets --------------------------------------------------------------------


class NotifySecretError(Exception):
    """The notify secret is missing, unreadable or not in the expected shape (message is safe
    to log: it names the secret id and the offending field, never a value)."""


class _NotifySecret(BaseModel):
    """The notify secret's JSON. Unknown keys are refused so a misspelt key is loud."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    apprise_urls: list[SecretStr] = Field(default_factory=list)
    healthchecks: dict[str, SecretStr] = Field(default_factory=dict)


@dataclass(frozen=True)
class NotifyTargets:
    """Where the notifier sends besides the SNS topic: Apprise URLs (every repository) and
    one Healthchecks ping URL per repository, keyed by the repository's Backrest id or guid.

    Every URL is a credential: the repr shows only counts and the repository keys.
    """

    apprise_urls: tuple[str, ...] = field(default=(), repr=False)
    healthchecks: Mapping[str, str] = field(default_factory=dict, repr=False)

    def healthchecks_url(self, *keys: str | None) -> str | None:
        """The ping URL of the first key that has one (pass the guid, then the id)."""
        for key in keys:
            if key and key in self.healthchecks:
                return self.healthchecks[key]
        return None

    def __repr__(self) -> str:
        return (
            f"NotifyTargets({len(self.apprise_urls)} Apprise URL(s), "
            f"Healthchecks for {sorted(self.healthchecks)})"
        )


def parse_notify_secret(secret_id: str, value: Any) -> NotifyTargets:
    """Validate the notify secret's decoded JSON::

        {"apprise_urls": ["slack://...", "ntfy://..."],
         "healthchecks": {"<repo id or guid>": "https://hc-ping.com/<uuid>"}}

    Both keys are optional (``{}`` means: the SNS topic only). Blank URLs are skipped.
    """
    if not isinstance(value, dict):
        raise NotifySecretError(
            f"notify secret {secret_id!r} must be a JSON object, not {type(value).__name__}"
        )
    try:
        parsed = _NotifySecret.model_validate(value)
    except ValidationError as exc:
        raise NotifySecretError(
            f"notify secret {secret_id!r} is not valid: {_describe(exc)}"
        ) from None
    urls = tuple(url for url in (u.get_secret_value().strip() for u in parsed.apprise_urls) if url)
    pings = {
        key.strip(): url
        for key, url in ((k, v.get_secret_value().strip()) for k, v in parsed.healthchecks.items())
        if key.strip() and url
    }
    return NotifyTargets(apprise_urls=tuple(dict.fromkeys(urls)), healthchecks=pings)


def load_notify_targets(
    secret_id: str,
    *,
    provider: SecretsProvider | None = None,
    max_age: int = DEFAULT_MAX_AGE,
    force_fetch: bool = False,
) -> NotifyTargets:
    """Fetch (or take from the per-container cache) and validate the notify secret."""
    value = _read_json_secret(
        secret_id,
        what="notify",
        error=NotifySecretError,
        provider=provider,
        max_age=max_age,
        force_fetch=force_fetch,
    )
    return parse_notify_secret(secret_id, value)

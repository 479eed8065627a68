"""Errors the agent reports, each bound to the exit code of the command contract.

Backrest only sees the exit code and the hook log, so every error carries a sentence that
names the file, key or setting at fault and what to do; none may carry a credential.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloud.contracts.events import ErrorKind


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    LOCAL_INTEGRITY = 3
    DESTINATION = 4
    GUARD = 5
    DEADLINE = 6


class RelayError(Exception):
    """Base of every error the CLI turns into a message and an exit code.

    A subclass names its exit code and event kind in its class line, the one place that
    binds an error to the command contract (docs/cli.md)."""

    exit_code: ExitCode = ExitCode.UNEXPECTED
    kind: ErrorKind = "unexpected"

    def __init_subclass__(cls, *, exit_code: ExitCode, kind: ErrorKind) -> None:
        super().__init_subclass__()
        cls.exit_code = exit_code
        cls.kind = kind

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(RelayError, exit_code=ExitCode.USAGE, kind="config"):
    """Bad command line, config file, environment override or Backrest config."""


class RepositoryError(RelayError, exit_code=ExitCode.LOCAL_INTEGRITY, kind="local-integrity"):
    """The local repository is missing, not a restic repository, or corrupt."""


class DestinationError(RelayError, exit_code=ExitCode.DESTINATION, kind="destination"):
    """The bucket could not be reached or refused a request after retries."""


class GuardError(RelayError, exit_code=ExitCode.GUARD, kind="guard"):
    """A safety guard refused the run: nothing was deleted or overwritten."""


class DeadlineError(RelayError, exit_code=ExitCode.DEADLINE, kind="deadline"):
    """The run's deadline passed; the mirror is consistent and the next run resumes."""

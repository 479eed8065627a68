"""Keeps known secrets out of everything the agent prints or logs.

Messages are built not to contain secrets in the first place; this is the second wall,
for text that comes from libraries (an exception string echoing a URL, say).
"""

from __future__ import annotations

import logging
import threading

MASK = "***"


class Redactor:
    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, *secrets: str | None) -> None:
        with self._lock:
            # Short values would mask ordinary words; credentials are long.
            self._secrets.update(s for s in secrets if s and len(s) >= 6)

    def __call__(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            text = text.replace(secret, MASK)
        return text


REDACTOR = Redactor()


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return REDACTOR(super().format(record))

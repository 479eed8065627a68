"""An in-memory bucket for unit tests of `cloud.logic` (fills ObjectStore and ReportSink)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

from cloud.logic.ports import ListedObject, ObjectNotFoundError


class InMemoryObjectStore:
    def __init__(self, page_size: int = 1000) -> None:
        self.objects: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.page_size = page_size
        self.reads: list[str] = []
        self._list_requests = 0
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes, etag: str | None = None) -> str | None:
        with self._lock:
            self.objects[key] = data
            self.etags[key] = etag or hashlib.md5(data, usedforsecurity=False).hexdigest()
        return key

    def delete(self, key: str) -> None:
        with self._lock:
            self.objects.pop(key, None)
            self.etags.pop(key, None)

    @property
    def list_requests(self) -> int:
        return self._list_requests

    def list(self, prefix: str) -> Iterator[ListedObject]:
        keys = sorted(k for k in self.objects if k.startswith(prefix))
        for start in range(0, max(len(keys), 1), self.page_size):
            with self._lock:
                self._list_requests += 1
            for key in keys[start : start + self.page_size]:
                yield ListedObject(key, len(self.objects[key]), self.etags[key])

    def read(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        with self._lock:
            self.reads.append(key)
            data = self.objects.get(key)
        if data is None:
            raise ObjectNotFoundError(key)
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]
        if not data:
            yield b""

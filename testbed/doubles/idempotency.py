"""An in-memory powertools idempotency layer, with the DynamoDB layer's rule: a record is
put only if none exists, or the one there has expired (or is an in-progress record whose
invocation's time ran out). Lets the Lambda shells run in-process without moto (the
verification simulator); tests of the idempotency itself use the real layer on moto."""

from __future__ import annotations

import copy
import threading
import time

from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
)
from aws_lambda_powertools.utilities.idempotency.persistence.base import BasePersistenceLayer
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import (
    STATUS_CONSTANTS,
    DataRecord,
)


class InMemoryPersistenceLayer(BasePersistenceLayer):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self.records: dict[str, DataRecord] = {}

    def _get_record(self, idempotency_key: str) -> DataRecord:
        with self._lock:
            record = self.records.get(idempotency_key)
        if record is None:
            raise IdempotencyItemNotFoundError
        return copy.copy(record)

    def _put_record(self, data_record: DataRecord) -> None:
        now = time.time()
        with self._lock:
            old = self.records.get(data_record.idempotency_key)
            if old is not None and not _replaceable(old, now):
                raise IdempotencyItemAlreadyExistsError(old_data_record=copy.copy(old))
            self.records[data_record.idempotency_key] = copy.copy(data_record)

    def _update_record(self, data_record: DataRecord) -> None:
        with self._lock:
            self.records[data_record.idempotency_key] = copy.copy(data_record)

    def _delete_record(self, data_record: DataRecord) -> None:
        with self._lock:
            self.records.pop(data_record.idempotency_key, None)


def _replaceable(record: DataRecord, now: float) -> bool:
    if record.expiry_timestamp is not None and record.expiry_timestamp < now:
        return True
    return (
        record.status == STATUS_CONSTANTS["INPROGRESS"]
        and record.in_progress_expiry_timestamp is not None
        and record.in_progress_expiry_timestamp < now * 1000
    )

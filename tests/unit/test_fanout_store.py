"""The `FanoutStore` contract, held by the DynamoDB store (moto) and the in-memory double
alike: the first job, chunk result and result event win; a chunk counts once; one claimer
publishes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cloud.integrations.fanout_dynamodb import DynamoFanoutStore
from cloud.integrations.runstore_dynamodb import create_table
from cloud.logic.ports import FanoutStore
from tests.support.doubles.fanout import InMemoryFanoutStore

TABLE = "backrest-relay-runs"
JOB = "ab" * 16


@pytest.fixture(params=["memory", "dynamodb"])
def jobs(request: pytest.FixtureRequest) -> Iterator[FanoutStore]:
    if request.param == "memory":
        yield InMemoryFanoutStore()
        return
    client = request.getfixturevalue("dynamo_client")
    create_table(client, TABLE)
    yield DynamoFanoutStore(TABLE, client=client)
    client.delete_table(TableName=TABLE)


def test_the_first_job_wins_and_comes_back_with_its_state(jobs: FanoutStore) -> None:
    assert jobs.load_job(JOB) is None
    first = jobs.create_job(JOB, {"cuts": ["m"], "n": 1})
    second = jobs.create_job(JOB, {"cuts": ["x", "y"], "n": 2})
    assert first == second
    assert first == {
        "cuts": ["m"],
        "n": 1,
        "done": [],
        "dispatched": False,
        "result": None,
        "published": False,
    }
    jobs.mark_dispatched(JOB)
    loaded = jobs.load_job(JOB)
    assert loaded is not None and loaded["dispatched"] is True


def test_a_chunk_counts_once_and_its_first_result_stays(jobs: FanoutStore) -> None:
    jobs.create_job(JOB, {"n": 3})
    assert jobs.complete_chunk(JOB, 2, {"index": 2, "v": "first"}) == 1
    assert jobs.complete_chunk(JOB, 2, {"index": 2, "v": "redelivered"}) == 1
    assert jobs.complete_chunk(JOB, 0, {"index": 0, "v": "a"}) == 2
    assert jobs.complete_chunk(JOB, 1, {"index": 1, "v": "b"}) == 3
    assert jobs.chunk_results(JOB) == [
        {"index": 0, "v": "a"},
        {"index": 1, "v": "b"},
        {"index": 2, "v": "first"},
    ]
    loaded = jobs.load_job(JOB)
    assert loaded is not None and loaded["done"] == [0, 1, 2]


def test_one_result_and_one_publisher(jobs: FanoutStore) -> None:
    jobs.create_job(JOB, {"n": 1})
    assert jobs.save_result(JOB, {"run_id": "r1"}) == {"run_id": "r1"}
    assert jobs.save_result(JOB, {"run_id": "r2"}) == {"run_id": "r1"}
    assert jobs.claim_publication(JOB, "chunk-3")
    assert not jobs.claim_publication(JOB, "chunk-5")
    assert jobs.claim_publication(JOB, "chunk-3")  # its own redelivery
    jobs.mark_published(JOB)
    loaded = jobs.load_job(JOB)
    assert loaded is not None and loaded["published"] and loaded["result"] == {"run_id": "r1"}

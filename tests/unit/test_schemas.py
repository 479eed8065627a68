"""docs/schemas/ is generated from the contract models and must not drift from them."""

from __future__ import annotations

from cloud.contracts.schemas import SCHEMA_DIR, schema_documents


def test_schema_files_match_the_models() -> None:
    expected = schema_documents()
    on_disk = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.schema.json")}
    assert set(on_disk) == set(expected), "run `make schemas`"
    stale = sorted(name for name, text in expected.items() if on_disk[name] != text)
    assert not stale, f"stale schema files (run `make schemas`): {stale}"


def test_every_event_schema_requires_the_shared_fields() -> None:
    import json

    for name, text in schema_documents().items():
        if not name.startswith("event-"):
            continue
        required = set(json.loads(text)["required"])
        assert {"run_id", "repo", "host", "trigger", "destination", "started_at"} <= required, name

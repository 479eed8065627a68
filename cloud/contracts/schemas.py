"""Export the contracts as JSON Schema files (`make schemas` writes docs/schemas/).

The files are generated, never edited: a test fails when they differ from the models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from cloud.contracts.events import EVENT_MODELS
from cloud.contracts.manifest import ManifestEntry, ManifestHeader

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def schema_documents() -> dict[str, str]:
    """File name → JSON text of every exported schema."""
    docs: dict[str, str] = {}
    for model in EVENT_MODELS:
        schema = model.model_json_schema(mode="serialization")
        schema["$id"] = f"backrest-relay/events/{_slug(model.DETAIL_TYPE.value)}.schema.json"
        schema["description"] = (
            f"EventBridge detail of source {model.SOURCE.value!r}, "
            f"detail-type {model.DETAIL_TYPE.value!r}."
        )
        docs[f"event-{_slug(model.DETAIL_TYPE.value)}.schema.json"] = _dump(schema)
    manifest_models: tuple[tuple[str, type[BaseModel]], ...] = (
        ("manifest-header", ManifestHeader),
        ("manifest-entry", ManifestEntry),
    )
    for name, manifest_model in manifest_models:
        schema = manifest_model.model_json_schema(mode="serialization")
        schema["$id"] = f"backrest-relay/{name}.schema.json"
        docs[f"{name}.schema.json"] = _dump(schema)
    return docs


def _dump(schema: dict[str, object]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    docs = schema_documents()
    for stale in directory.glob("*.schema.json"):
        if stale.name not in docs:
            stale.unlink()
    for name, text in docs.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR
    for path in write(target):
        print(path)

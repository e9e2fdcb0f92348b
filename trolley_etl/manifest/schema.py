"""The manifest's JSON Schema, generated from the models (committed in schemas/)."""

from __future__ import annotations

import json
from typing import Any

from trolley_etl.manifest.models import Manifest


def manifest_json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "trolley-etl manifest, version 1",
    }


def manifest_json_schema_text() -> str:
    """The schema as committed: stable key order, two-space indent, final newline."""
    return json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n"

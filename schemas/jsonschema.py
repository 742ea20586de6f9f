"""Generate the committed JSON Schema files from the record classes."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from adloop.schemas.records import RECORD_TYPES, SCHEMA_VERSION

SCHEMA_DIR = Path(__file__).resolve().parent / "json"


def render_all() -> dict[str, str]:
    """File name -> JSON text, one self-contained schema per record type."""
    files: dict[str, str] = {}
    for name, record_type in RECORD_TYPES.items():
        schema = msgspec.json.schema(record_type)
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://adloop.dev/schemas/v{SCHEMA_VERSION}/{name}.json",
            **schema,
        }
        text = json.dumps(schema, indent=2, sort_keys=True) + "\n"
        files[f"{name}.v{SCHEMA_VERSION}.json"] = text
    return files


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in render_all().items():
        path = directory / file_name
        path.write_text(text)
        written.append(path)
    return written


def stale_files(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of committed schema files that differ from what the code generates."""
    stale = []
    for file_name, text in render_all().items():
        path = directory / file_name
        if not path.exists() or path.read_text() != text:
            stale.append(file_name)
    return stale

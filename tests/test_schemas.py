"""Schemas: committed JSON Schema files match the code; bad input maps to reason codes."""

from __future__ import annotations

import json

import msgspec
import pytest

from adloop.schemas import Click, Creative, Impression, InvalidRecord, RecordDecoder
from adloop.schemas.jsonschema import SCHEMA_DIR, render_all, stale_files

VALID = {
    "schema_version": 1,
    "impression_id": "imp-1",
    "timestamp": 1_700_000_000.5,
    "campaign": "spring",
    "audience": "students",
    "placement": "feed",
    "creative_id": "c1",
    "propensity": 0.25,
    "policy": "thompson",
    "context": {"device": "mobile", "hour": 13},
}


def test_committed_json_schemas_match_the_code() -> None:
    assert stale_files() == [], "run `adloop schemas --write` and commit schemas/json/"
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(render_all())


def test_json_schema_requires_schema_version_bound_and_fields() -> None:
    schema = json.loads((SCHEMA_DIR / "impression.v1.json").read_text())
    body = schema["$defs"]["Impression"]
    assert {"impression_id", "campaign", "creative_id", "propensity"} <= set(body["required"])
    assert body["properties"]["schema_version"]["maximum"] == 1


def test_valid_impression_round_trips() -> None:
    decoder = RecordDecoder(Impression, 16_384)
    imp = decoder.decode(json.dumps(VALID).encode())
    assert imp.context == {"device": "mobile", "hour": 13}
    assert msgspec.json.decode(msgspec.json.encode(imp)) == VALID


def _bad(**changes: object) -> bytes:
    record = {**VALID, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", "malformed_json"),
        (b"", "malformed_json"),
        (b"[1, 2]", "wrong_type"),
        (_bad(timestamp="yesterday"), "wrong_type"),
        (_bad(impression_id=12), "wrong_type"),
        (_bad(creative_id=...), "missing_field"),
        (_bad(schema_version=2), "unsupported_schema_version"),
        (_bad(schema_version=0), "unsupported_schema_version"),
        (_bad(propensity=-0.1), "invalid_value"),
        (_bad(propensity=0), "invalid_value"),
        (_bad(propensity=1.5), "invalid_value"),
        (_bad(timestamp=-5), "invalid_value"),
        (json.dumps(VALID).replace("0.25", "NaN").encode(), "malformed_json"),
        (json.dumps(VALID).replace("0.25", "Infinity").encode(), "malformed_json"),
        (json.dumps(VALID).replace("1700000000.5", "1e999").encode(), "invalid_value"),
        (_bad(campaign=""), "invalid_value"),
        (_bad(impression_id="x" * 129), "invalid_value"),
    ],
)
def test_bad_impressions_get_a_reason_code(payload: bytes, code: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        RecordDecoder(Impression, 16_384).decode(payload)
    assert info.value.code == code
    assert info.value.reason


def test_oversized_and_empty_payloads() -> None:
    decoder = RecordDecoder(Click, 64)
    with pytest.raises(InvalidRecord, match="oversized_payload"):
        decoder.decode(b'{"impression_id": "' + b"a" * 100 + b'", "timestamp": 1}')
    with pytest.raises(InvalidRecord, match="empty_payload"):
        decoder.decode(None)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    imp = RecordDecoder(Impression, 16_384).decode(_bad(new_field={"x": 1}))
    assert imp.impression_id == "imp-1"


def test_creative_ids_use_the_strict_alphabet() -> None:
    decoder = RecordDecoder(Creative, 16_384)
    for bad in ({"campaign": "a|b"}, {"creative_id": "has space"}, {"creative_id": "-x"}):
        body = {"creative_id": "c1", "campaign": "k", "headline": "Hi", **bad}
        with pytest.raises(InvalidRecord, match="invalid_value"):
            decoder.decode(json.dumps(body).encode())


def test_creative_targets_audiences() -> None:
    everyone = Creative(creative_id="c1", campaign="k", headline="Hi")
    some = Creative(creative_id="c2", campaign="k", headline="Hi", audiences=["students"])
    assert everyone.targets("anyone")
    assert some.targets("students") and not some.targets("parents")

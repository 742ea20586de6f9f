"""Personal data handling (schemas/privacy.py): allow-list, keyed hashes, redaction."""

from __future__ import annotations

import json

import pytest

from adloop.schemas.privacy import PrivacyPolicy, is_safe_token, parse_keys

KEYS = parse_keys('{"1": "first-secret-0123456789", "2": "second-secret-0123456789"}')
POLICY = PrivacyPolicy(personal_fields=frozenset({"user_id", "email"}), keys=KEYS)
USER = "u-8f3a-alice@example.com"


def test_context_keys_outside_the_allow_list_are_dropped() -> None:
    context = {"device": "mobile", "hour": 9, "user_feature_0": "a", "gps": "52.5,13.4"}
    assert POLICY.clean_context(context) == {"device": "mobile", "hour": 9, "user_feature_0": "a"}


def test_personal_fields_are_replaced_by_a_keyed_hash_of_the_newest_key() -> None:
    event = {"impression_id": "i1", "user_id": USER, "context": {"email": USER, "device": "tv"}}
    cleaned = POLICY.clean_object(event)
    assert USER not in json.dumps(cleaned)
    assert cleaned["user_id"].startswith("h2:") and len(cleaned["user_id"]) == 3 + 32
    # Stable under one key (joins work), different under another (rotation).
    assert cleaned["user_id"] == POLICY.pseudonym(USER) == cleaned["context"]["email"]
    old = PrivacyPolicy(personal_fields=frozenset({"user_id"}), keys={"1": KEYS["1"]})
    assert old.pseudonym(USER) != POLICY.pseudonym(USER)


def test_dead_letter_payloads_keep_the_shape_without_the_personal_values() -> None:
    payload = json.dumps({"impression_id": "i1", "timestamp": "late", "user_id": USER}).encode()
    redacted = POLICY.redact_payload(payload)
    assert USER.encode() not in redacted
    assert json.loads(redacted)["timestamp"] == "late"  # what made it invalid is still there
    # Not JSON: nothing of it can be told apart from personal data.
    garbage = f"user={USER}".encode()
    assert USER.encode() not in POLICY.redact_payload(garbage)
    # Without personal fields configured, the payload is kept (truncated).
    assert PrivacyPolicy().redact_payload(b"x" * 10_000) == b"x" * 4096


def test_personal_fields_need_a_key() -> None:
    with pytest.raises(ValueError, match="ADLOOP_PRIVACY_KEYS"):
        PrivacyPolicy(personal_fields=frozenset({"user_id"}))
    with pytest.raises(ValueError, match="16"):
        parse_keys('{"1": "short"}')


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("students", True),
        ("age-18:24", True),
        ("with space", False),
        ("new\nline", False),
        ("rtl\u200fmark", False),
        ("x" * 129, False),
        ("", False),
    ],
)
def test_safe_tokens(value: str, safe: bool) -> None:
    assert is_safe_token(value) is safe

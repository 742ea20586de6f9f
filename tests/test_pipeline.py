"""The spine end to end on the embedded broker: real ingest, worker and serving processes.

A kafka-python producer publishes a scripted stream with every kind of bad
input; the test asserts exact counts, dead-letter contents and reasons, and the
HTTP answers.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from adloop.schemas import Creative
from adloop.streams.config import Settings

from stack import T0, Stack, click, imp

pytestmark = pytest.mark.integration

WINDOW = 600.0


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    # A parked click waits click_wait_s of wall time once its impressions partition is
    # caught up: long enough that the test's own steps never outlast it (i7 below),
    # short enough that the ghost click's dead letter comes within the test's waits.
    s = Stack(settings.with_overrides(attribution_window_s=WINDOW, click_wait_s=30.0)).start()
    s.register(
        Creative(creative_id="c1", campaign="spring", headline="Spring sale: 30% off"),
        Creative(creative_id="c2", campaign="spring", headline="Free shipping today"),
        Creative(
            creative_id="c3", campaign="spring", headline="Students only", audiences=["students"]
        ),
    )
    try:
        yield s
    finally:
        s.stop()


def test_scripted_stream_counts_exactly_and_dead_letters_every_bad_event(stack: Stack) -> None:
    expected_dead: Counter[str] = Counter()

    def bad(role: str, key: str, value: bytes | dict, code: str) -> None:
        stack.publish(role, key, value)
        expected_dead[code] += 1

    # A click that overtakes its impression: parked, then joined when it arrives. A
    # bad click behind it in the same partition (same key): once its dead letter is
    # out, the ingest has read (and parked) the click.
    stack.publish("clicks", "i7", click("i7"))
    bad("clicks", "i7", b"[]", "wrong_type")
    stack.flush()
    parked = stack.dead_letters(until=lambda read: any(x["original"] == b"[]" for x in read))
    assert [x["reason_code"] for x in parked] == ["wrong_type"]
    # Valid traffic.
    for i, (creative, audience) in enumerate(
        [
            ("c1", "students"),
            ("c1", "students"),
            ("c2", "students"),
            ("c3", "students"),
            ("c1", "parents"),
            ("c2", "parents"),
        ],
        start=1,
    ):
        stack.publish("impressions", f"i{i}", imp(f"i{i}", creative, audience))
    stack.publish("clicks", "i1", click("i1"))
    stack.publish("clicks", "i3", click("i3"))
    stack.publish("clicks", "i6", click("i6"))
    stack.publish(
        "conversions",
        "i6",
        {"schema_version": 1, "impression_id": "i6", "timestamp": T0 + 30, "value": 12.5},
    )
    stack.publish("impressions", "i7", imp("i7", "c2", "parents"))

    # A creative registered a moment ago is known by the time its impression counts.
    stack.register(Creative(creative_id="c4", campaign="spring", headline="Brand new"))
    stack.publish("impressions", "i8", imp("i8", "c4", "parents"))

    # Every kind of bad input.
    good = json.dumps(imp("b1", "c1")).encode()
    bad("impressions", "b1", b'{"impression_id": "b1", ', "malformed_json")
    bad("impressions", "b2", imp("b2", "c1", timestamp="soon"), "wrong_type")
    bad(
        "impressions",
        "b3",
        {k: v for k, v in imp("b3", "c1").items() if k != "creative_id"},
        "missing_field",
    )
    bad("impressions", "b4", imp("b4", "c1", schema_version=9), "unsupported_schema_version")
    bad(
        "impressions",
        "b5",
        good.replace(b'"propensity": 0.5', b'"propensity": NaN'),
        "malformed_json",
    )
    bad("impressions", "b6", imp("b6", "c1", propensity=-0.5), "invalid_value")
    bad("impressions", "b7", imp("b7", "c1", context={"pad": "x" * 20_000}), "oversized_payload")
    bad("impressions", "b8", imp("b8", "c-nope"), "unknown_creative")
    bad("impressions", "b9", imp("b9", "c1", campaign="autumn"), "unknown_campaign")
    bad("impressions", "b11", imp("b11", "c1", audience="a|b"), "invalid_value")
    bad("impressions", "i1", imp("i1", "c2", ts=T0 + 1), "duplicate_impression_id")
    bad("clicks", "i1", click("i1", T0 + 9), "duplicate_click")
    bad("clicks", "ghost", click("ghost"), "unknown_impression")
    bad("clicks", "i2", click("i2", T0 + WINDOW + 1), "late_click")
    bad("clicks", "b10", b"null", "wrong_type")
    # Event-time hygiene and the key contract.
    bad("impressions", "f1", imp("f1", "c1", ts=time.time() + 3600), "timestamp_out_of_range")
    bad("impressions", "f2", imp("f2", "c1", ts=T0 - 8 * 86400), "timestamp_out_of_range")
    bad("clicks", "i4", click("i4", T0 - 301), "click_before_impression")
    bad("clicks", "not-i3", click("i3", T0 + 7), "key_mismatch")
    bad(
        "conversions",
        "i6",
        {"schema_version": 1, "impression_id": "i6", "timestamp": T0 + 40},
        "duplicate_conversion",
    )
    bad(
        "conversions",
        "i5",
        {"schema_version": 1, "impression_id": "i5", "timestamp": T0 + WINDOW + 5},
        "late_conversion",
    )
    stack.flush()

    # c4 targets every audience: listed for students too, without traffic yet.
    expected_students = {"c1": (2, 1), "c2": (1, 1), "c3": (1, 0), "c4": (0, 0)}
    expected_parents = {"c1": (1, 0), "c2": (2, 2), "c4": (1, 0)}
    stack.wait_for(
        lambda: (
            stack.counts("spring", "students") == expected_students
            and stack.counts("spring", "parents") == expected_parents
        ),
        what="exact counts",
        state=lambda: (stack.counts("spring", "students"), stack.counts("spring", "parents")),
    )
    # The ghost click's letter comes once its wait is over; then no other is to come.
    stack.dead_letters(expected=sum(expected_dead.values()))
    letters = stack.settled_dead_letters()
    assert Counter(letter["reason_code"] for letter in letters) == expected_dead
    for letter in letters:
        assert letter["reason"], letter
        assert letter["topic"].endswith(("impressions", "clicks", "conversions"))
    by_key = {(letter["key_b64"], letter["reason_code"]): letter for letter in letters}
    dup = by_key[("aTE=", "duplicate_impression_id")]  # base64("i1")
    assert json.loads(dup["original"])["creative_id"] == "c2"
    mismatch = by_key[("bm90LWkz", "key_mismatch")]  # base64("not-i3")
    assert "'not-i3' is not the impression_id 'i3'" in mismatch["reason"]

    parents = stack.decision("spring", "parents")
    assert parents is not None
    c2 = next(r for r in parents["creatives"] if r["creative_id"] == "c2")
    assert c2["conversions"] == 1

    # Serving answers.
    status, best = stack.get("/v1/campaigns/spring/audiences/parents/best")
    assert status == 200
    assert best["creative"]["creative_id"] == "c2"
    assert (best["impressions"], best["clicks"]) == (2, 2)
    assert best["ci_low"] < best["mean"] < best["ci_high"]

    status, body = stack.get("/v1/campaigns/autumn/audiences/students/best")
    assert (status, body["error"]) == (404, "unknown_campaign")
    status, body = stack.get("/v1/campaigns/spring/audiences/retirees/best")
    assert (status, body["error"]) == (404, "unknown_audience")
    assert "students" in body["message"]

    # Nothing changed after the dead letters: once sentinels published after every
    # event are counted, the counts are still exact.
    stack.settle("spring", ["students", "parents"])
    assert stack.without_sentinel("spring", "students") == expected_students
    assert stack.without_sentinel("spring", "parents") == expected_parents


def test_select_serves_registered_creatives_with_propensities(stack: Stack) -> None:
    assert stack.api is not None
    seen = Counter()
    for _ in range(300):
        choice = stack.api("spring", "parents", "feed")
        assert 0 < choice["propensity"] <= 1
        assert len(choice["impression_id"]) >= 16
        seen[choice["creative_id"]] += 1
    # c3 targets students only, so parents never see it; the others are explored.
    assert set(seen) == {"c1", "c2"}
    with pytest.raises(RuntimeError, match="unknown_campaign"):
        stack.api("autumn", "parents", "feed")
    stack.api.conn.request("POST", "/v1/select", b"{oops", {"Content-Type": "application/json"})
    response = stack.api.conn.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["error"] == "invalid_request"


def test_a_click_after_its_impression_reaches_the_decision(stack: Stack) -> None:
    # How fast is measured by `adloop bench spine` (click -> decision over HTTP).
    stack.publish("impressions", "f1", imp("f1", "c1", "parents"))
    stack.flush()
    stack.wait_for(lambda: stack.counts("spring", "parents").get("c1") == (1, 0))
    stack.publish("clicks", "f1", click("f1"))
    stack.flush()
    stack.wait_for(lambda: stack.counts("spring", "parents").get("c1") == (1, 1))

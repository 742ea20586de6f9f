"""Hostile input on the real stack: each case gets its dead-letter reason or a 4xx,
nothing is counted twice, the stack keeps running (a canary is still counted after),
and a planted personal value is found in no topic, state directory or log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from adloop.schemas import Creative
from adloop.streams.config import Settings
from adloop.streams.kafka_io import kafka_python_kwargs
from adloop.streams.topology import TOPIC_ROLES

from stack import T0, Stack, click, imp

pytestmark = pytest.mark.integration

USER = "user-7f3e91-alice@example.org"
LIMITS = {"max_placements_per_audience": 5, "max_audiences_per_campaign": 4}


def ids_on_one_partition(prefix: str, n: int, partitions: int = 4) -> list[str]:
    """Impression ids the producer's partitioner puts on partition 0: the limits hold
    per input partition, so the test's counts are predictable."""
    found: list[str] = []
    i = 0
    while len(found) < n:
        key = f"{prefix}{i}"
        if (murmur2(key.encode()) & 0x7FFFFFFF) % partitions == 0:
            found.append(key)
        i += 1
    return found


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(
        settings.with_overrides(
            click_wait_s=2.0,
            personal_fields="user_id,email",
            privacy_keys='{"1": "test-privacy-key-0123456789"}',
            **LIMITS,
        )
    ).start()
    s.register(
        Creative(creative_id="c1", campaign="spring", headline="Spring sale"),
        Creative(creative_id="c2", campaign="spring", headline="Free shipping"),
    )
    try:
        yield s
    finally:
        s.stop()


def counted(stack: Stack, audience: str, creative: str = "c1") -> tuple[int, int]:
    return stack.counts("spring", audience).get(creative, (0, 0))


def canary(stack: Stack, name: str, before: tuple[int, int], audience: str = "a0") -> None:
    """A valid impression and click after the hostile ones: still counted (``before``:
    what the audience's counts are without it)."""
    stack.publish("impressions", name, imp(name, "c1", audience, ts=T0 + 100))
    stack.publish("clicks", name, click(name, T0 + 101))
    stack.flush()
    want = (before[0] + 1, before[1] + 1)
    stack.wait_for(lambda: counted(stack, audience) == want, 120, f"canary {name}")


def reasons(letters: list[dict]) -> list[str]:
    return [letter["reason_code"] for letter in letters]


def test_an_outlier_timestamp_moves_nothing(stack: Stack) -> None:
    stack.publish("impressions", "x1", imp("x1", "c1", "a0", ts=T0))
    stack.publish("impressions", "x2100", imp("x2100", "c1", "a0", ts=4_102_000_000.0))
    # The id counted before the outlier is still remembered: a re-send is a duplicate.
    stack.publish("impressions", "x1", imp("x1", "c1", "a0", ts=T0 + 1))
    # A click waiting for its impression is not expired by the outlier.
    stack.publish("clicks", "late-imp", click("late-imp", T0 + 2))
    stack.publish("impressions", "late-imp", imp("late-imp", "c1", "a0", ts=T0 + 1))
    stack.flush()
    letters = stack.dead_letters(2, timeout=120)
    assert sorted(reasons(letters)) == ["duplicate_impression_id", "timestamp_out_of_range"]
    stack.wait_for(lambda: counted(stack, "a0") == (2, 1), 120, "x1 and late-imp with its click")
    canary(stack, "k1", before=(2, 1))
    assert len(stack.dead_letters(3, timeout=5)) == 2  # the canary added none


def test_cardinality_limits_dead_letter_and_the_stack_keeps_running(stack: Stack) -> None:
    url = "https://news.example.org/2026/12/02/a-long-article-path-about-shoes-" + "x" * 40
    for i, iid in enumerate(ids_on_one_partition("pl", 12)):
        stack.publish("impressions", iid, {**imp(iid, "c1", "a0"), "placement": f"{url}{i}"})
    for i, iid in enumerate(ids_on_one_partition("au", 6)):
        stack.publish("impressions", iid, imp(iid, "c1", f"aud{i}"))
    stack.publish("impressions", "nl", imp("nl", "c1", "new\\nline"))
    stack.publish("impressions", "rtl", imp("rtl", "c1", "rtl\u202emark"))
    stack.flush()
    # a0 exists (placement 1 of 5, then 4 more), aud0..aud2 fill the 4 audiences.
    expected = {"too_many_placements": 7, "too_many_audiences": 3, "invalid_value": 2}
    letters = stack.dead_letters(sum(expected.values()), timeout=120)
    found: dict[str, int] = {}
    for code in reasons(letters):
        found[code] = found.get(code, 0) + 1
    assert found == expected
    assert all("ADLOOP_MAX_" in x["reason"] for x in letters if x["reason_code"].startswith("too"))
    # a0 has its 5 placements ("feed" would be a 6th): the canary goes to aud0, partition 0.
    canary(stack, ids_on_one_partition("k2-", 1)[0], before=(1, 0), audience="aud0")


def test_a_huge_select_context_is_a_400(stack: Stack) -> None:
    body = {"campaign": "spring", "audience": "a0", "context": {f"k{i}": i for i in range(40_000)}}
    status, answer = stack.api.call("POST", "/v1/select", body)  # type: ignore[union-attr]
    assert status == 400 and answer["error"] == "invalid_request"


def _adloops_records(stack: Stack) -> bytes:
    """Every record of the topics adloop writes (the event topics are the exchange's)."""
    consumer = KafkaConsumer(
        **kafka_python_kwargs(
            KafkaConsumer, stack.settings, auto_offset_reset="earliest", consumer_timeout_ms=2000
        )
    )
    exchange_topics = {"impressions", "clicks", "conversions"}
    tps = [
        TopicPartition(stack.settings.topic(role), p)
        for role in TOPIC_ROLES
        if role not in exchange_topics
        for p in range(stack.settings.partitions)
    ]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    chunks = [(r.key or b"") + b"\0" + (r.value or b"") for r in consumer]
    consumer.close()
    return b"\n".join(chunks)


def _files(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


def test_a_planted_user_id_is_stored_nowhere(stack: Stack) -> None:
    planted = {
        **imp("pii1", "c1", "a0", context={"device": "mobile", "user_id": USER, "gps": USER}),
        "user_id": USER,
        "email": USER,
    }
    stack.publish("impressions", "pii1", planted)
    # Refused ones keep a redacted payload in their dead letter.
    stack.publish("impressions", "pii2", {**planted, "impression_id": "pii2", "timestamp": "x"})
    stack.publish(
        "impressions", "pii3", {**planted, "impression_id": "pii3", "creative_id": "nope"}
    )
    # A click that waits for its impression is parked (in RocksDB) with the same value.
    stack.publish("clicks", "pii4", {**click("pii4"), "user_id": USER})
    stack.flush()
    letters = stack.dead_letters(2, timeout=120)
    assert sorted(reasons(letters)) == ["unknown_creative", "wrong_type"]
    for letter in letters:
        original = json.loads(letter["original"])
        assert original["user_id"].startswith("h1:") and "gps" not in original["context"]
    stack.wait_for(lambda: counted(stack, "a0") == (1, 0), 120, "the planted impression")
    # Parked clicks are checkpointed with the next flush; the canary comes after it.
    canary(stack, "k3", before=(1, 0))
    stack.sup.stop()  # flushes logs and state
    time.sleep(0.1)
    haystacks = {
        "topics": _adloops_records(stack),
        "state": _files(stack.settings.data_dir / "ingest"),
        "logs": _files(stack.settings.data_dir / "logs"),
    }
    for where, data in haystacks.items():
        assert USER.encode() not in data, f"{USER} found in {where}"
    assert b"pii2" in haystacks["topics"]  # the search itself works (a dead letter)

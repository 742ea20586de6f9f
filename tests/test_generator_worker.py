"""`adloop generator` as a real process on the embedded broker, with the real small models.

One request in: scored candidate creatives (with lineage and prior) and one result out;
the same request again: nothing new; a malformed request: dead-lettered with a reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import msgspec
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from msgspec import structs

from adloop.schemas import Brief, ExampleCreative, GenerationRequest
from adloop.streams.config import Settings
from adloop.streams.kafka_io import kafka_python_kwargs
from adloop.streams.supervisor import Supervisor
from adloop.streams.topics import ensure_topics_sync

pytestmark = pytest.mark.integration


def read_all(settings: Settings, role: str) -> list[tuple[bytes | None, dict]]:
    consumer = KafkaConsumer(
        **kafka_python_kwargs(
            KafkaConsumer, settings, auto_offset_reset="earliest", consumer_timeout_ms=700
        )
    )
    topic = settings.topic(role)  # type: ignore[arg-type]
    tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out = [(r.key, json.loads(r.value)) for r in consumer]
    consumer.close()
    return out


@pytest.fixture
def generator(settings: Settings) -> Iterator[tuple[Settings, KafkaProducer, Supervisor]]:
    s = settings.with_overrides(generator_seed=1, generator_time_limit_s=240)
    ensure_topics_sync(s)
    sup = Supervisor(s, roles=("generator",))
    sup.start()
    producer = KafkaProducer(**kafka_python_kwargs(KafkaProducer, s, acks="all"))
    try:
        yield s, producer, sup
    finally:
        producer.close()
        sup.stop()


def wait(predicate, sup: Supervisor, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sup.check()
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{sup.tail('generator')}")


@pytest.mark.timeout(1200)
def test_request_in_scored_candidates_out_idempotent_and_dead_letters(generator) -> None:
    settings, producer, sup = generator
    request = GenerationRequest(
        request_id="req-1",
        campaign="spring",
        audience="students",
        audience_description="university students on a budget",
        brief=Brief(product="running shoes", key_message="light, fast and cheap"),
        winners=[ExampleCreative(creative_id="c1", headline="Run light this spring")],
        underperformer=ExampleCreative(creative_id="c2", headline="Shoes for sale"),
        n_variants=3,
        auto_approve=True,  # but the campaign has no settings saying so: stays in review
        trigger="creative c2 low: P(within 10% of best) = 0.1% after 5,000 impressions",
        requested_at=time.time(),
    )
    topic = settings.topic("generation_requests")
    producer.send(topic, key=b"req-1", value=msgspec.json.encode(request))
    producer.send(topic, key=b"bad", value=b'{"request_id": "bad", "brief": 3}')
    producer.flush()
    results = wait(lambda: read_all(settings, "generation_results"), sup, 480, "a result")
    assert len(results) == 1
    result = results[0][1]
    assert result["request_id"] == "req-1" and result["status"] == "ok", result
    assert result["passed_filters"] == len(result["creative_ids"]) >= 1
    creatives = {v["creative_id"]: v for _, v in read_all(settings, "creatives")}
    assert set(creatives) == set(result["creative_ids"])
    for c in creatives.values():
        assert c["status"] == "pending_review" and c["origin"] == "generated"
        assert c["parent_id"] == "c2" and c["audiences"] == ["students"]
        assert 0 < c["predicted_ctr"] < 1 and c["prior_strength"] > 0
        lineage = c["lineage"]
        assert lineage["request_id"] == "req-1" and lineage["trigger"].startswith("creative c2")
        assert lineage["prompt_version"] and lineage["llm_model"] and lineage["ctr_model_version"]
        assert len(c["headline"]) <= 30
    letters = wait(lambda: read_all(settings, "dead_letter"), sup, 120, "a dead letter")
    assert letters[0][1]["reason_code"] == "invalid_request"
    # Redelivered: answered already, so no new creatives and no second result. A
    # sentinel request behind it in its partition is answered after it is handled.
    sent = producer.send(topic, key=b"req-1", value=msgspec.json.encode(request)).get(120)
    sentinel = structs.replace(request, request_id="req-sentinel", n_variants=1)
    producer.send(
        topic, key=b"req-sentinel", value=msgspec.json.encode(sentinel), partition=sent.partition
    )
    producer.flush()

    def answered() -> list[dict]:
        return [v for _, v in read_all(settings, "generation_results")]

    wait(
        lambda: any(r["request_id"] == "req-sentinel" for r in answered()),
        sup,
        480,
        "the sentinel request answered",
    )
    assert sorted(r["request_id"] for r in answered()) == ["req-1", "req-sentinel"]
    again = [v for _, v in read_all(settings, "creatives")]
    assert sorted(c["creative_id"] for c in again if c["lineage"]["request_id"] == "req-1") == (
        sorted(creatives)
    )


def test_a_model_that_cannot_load_fails_requests_clearly(settings: Settings) -> None:
    s = settings.with_overrides(llm_model="/nonexistent/model")
    ensure_topics_sync(s)
    producer = KafkaProducer(**kafka_python_kwargs(KafkaProducer, s, acks="all"))
    request = GenerationRequest(
        request_id="req-2",
        campaign="spring",
        audience="students",
        brief=Brief(product="running shoes"),
        n_variants=2,
    )
    with Supervisor(s, roles=("generator",)) as sup:
        producer.send(
            s.topic("generation_requests"), key=b"req-2", value=msgspec.json.encode(request)
        )
        producer.flush()
        results = wait(lambda: read_all(s, "generation_results"), sup, 120, "a failed result")
        letters = wait(lambda: read_all(s, "dead_letter"), sup, 120, "a dead letter")
    producer.close()
    result = results[0][1]
    assert result["status"] == "failed" and "nonexistent" in result["error"]
    assert letters[0][1]["reason_code"] == "model_unavailable"
    assert "nonexistent" in letters[0][1]["reason"]

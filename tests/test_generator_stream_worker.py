"""The generator worker's streaming, refusal and crash-resume rules, in process.

A scripted generator (no model) streams variants one batch at a time; the worker runs
on the session broker. Sentinels, not sleeps: the test waits for what the worker says
it did (results, creatives on the topic) and asserts on those records.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from adloop.generator.filters import FilterConfig
from adloop.generator.llm import GenerationOutcome, UnsupportedLanguageError, VariantBatch
from adloop.generator.parsing import Variant
from adloop.schemas import Brief, GenerationRequest
from adloop.schemas.records import Rejection
from adloop.streams.config import Settings
from adloop.streams.generator_worker import GeneratorWorker, candidate_creatives
from adloop.streams.kafka_io import kafka_python_kwargs
from adloop.streams.topics import ensure_topics_sync

pytestmark = pytest.mark.integration


@dataclass
class Score:
    mean: float = 0.02
    std: float = 0.005


@dataclass
class ScriptedGenerator:
    """Streams its script's variants one per event; waits at ``gate`` after the first
    event, so a test can see the first creative published before the request ends."""

    script: list[Variant]
    gate: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    filter_config: FilterConfig = field(default_factory=FilterConfig)
    model_version: str = "scripted"
    prompt_version: str = "p1"
    calls: list[list[int]] = field(default_factory=list)

    def refusal(self, request: GenerationRequest) -> UnsupportedLanguageError | None:
        if request.brief.language == "en":
            return None
        return UnsupportedLanguageError([request.request_id], request.brief.language, "tiny")

    def _relevance_rule(self, request: GenerationRequest) -> None:
        return None

    def stream(self, requests: list[GenerationRequest], **_: Any) -> Iterator[VariantBatch]:
        self.calls.append([r.n_variants for r in requests])
        for index, request in enumerate(requests):
            n = request.n_variants
            for i, variant in enumerate(self.script[:n]):
                yield VariantBatch(request.request_id, index, [variant], [Score()], i, 0.0)
                if i == 0:
                    assert self.gate.wait(120), "the test never opened the gate"
            outcome = GenerationOutcome(
                request.request_id,
                list(self.script[:n]),
                [Rejection(headline="Cool Idea", rule="relevance", reason="off-topic")],
                parsed=n + 1,
            )
            yield VariantBatch(request.request_id, index, [], [], n, 0.0, True, outcome)


class ReloadingScorer:
    version = "ctr-test"

    def maybe_reload(self) -> None:
        pass


def read_all(settings: Settings, role: str) -> list[dict]:
    consumer = KafkaConsumer(
        **kafka_python_kwargs(
            KafkaConsumer, settings, auto_offset_reset="earliest", consumer_timeout_ms=700
        )
    )
    topic = settings.topic(role)  # type: ignore[arg-type]
    tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out = [json.loads(r.value) for r in consumer]
    consumer.close()
    return out


def wait_for(predicate, what: str, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def request(rid: str, language: str = "en", n: int = 3) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        campaign="shoes",
        audience="students",
        brief=Brief(product="running shoes", key_message="light and fast", language=language),
        n_variants=n,
    )


SCRIPT = [
    Variant("Light running shoes", "Run fast."),
    Variant("Fast shoes for you", "Light on every run."),
    Variant("Run light, run fast", "Shoes that keep up."),
]


def run_worker(settings: Settings, generator: ScriptedGenerator, stop: threading.Event) -> None:
    async def main() -> None:
        worker = GeneratorWorker(settings, generator=generator, scorer=ReloadingScorer())
        task = asyncio.create_task(worker.run())
        while not stop.is_set() and not task.done():
            await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


@pytest.fixture
def producer(settings: Settings) -> Iterator[KafkaProducer]:
    ensure_topics_sync(settings)
    p = KafkaProducer(**kafka_python_kwargs(KafkaProducer, settings, acks="all"))
    yield p
    p.close()


def send(producer: KafkaProducer, settings: Settings, req: GenerationRequest) -> None:
    producer.send(
        settings.topic("generation_requests"),
        key=req.request_id.encode(),
        value=msgspec.json.encode(req),
    )
    producer.flush()


@pytest.mark.timeout(600)
def test_first_variant_published_before_the_request_ends_and_zh_is_refused(
    settings: Settings, producer: KafkaProducer
) -> None:
    generator = ScriptedGenerator(SCRIPT)
    stop = threading.Event()
    thread = threading.Thread(target=run_worker, args=(settings, generator, stop))
    thread.start()
    try:
        send(producer, settings, request("zh-1", language="zh"))
        refused = wait_for(lambda: read_all(settings, "generation_results"), "zh result")
        assert refused[0]["status"] == "failed"
        assert refused[0]["error"].startswith("unsupported_language:")
        assert refused[0]["retryable"] is False  # the loop holds instead of retrying
        assert "ADLOOP_LLM_MODEL" in refused[0]["error"] and refused[0]["creative_ids"] == []
        letters = wait_for(lambda: read_all(settings, "dead_letter"), "zh dead letter")
        assert letters[0]["reason_code"] == "unsupported_language"

        send(producer, settings, request("req-1"))
        # The generator holds the request after its first variant: that one is live.
        first = wait_for(lambda: read_all(settings, "creatives"), "the first creative")
        assert [c["creative_id"] for c in first] == ["req-1-v1"]
        assert first[0]["headline"] == "Light running shoes"
        assert [r["request_id"] for r in read_all(settings, "generation_results")] == ["zh-1"]
        generator.gate.set()
        results = wait_for(
            lambda: [
                r for r in read_all(settings, "generation_results") if r["request_id"] == "req-1"
            ],
            "req-1 answered",
        )
        assert len(results) == 1 and results[0]["status"] == "ok"
        assert results[0]["creative_ids"] == ["req-1-v1", "req-1-v2", "req-1-v3"]
        assert results[0]["rejections"][0]["rule"] == "relevance"
        assert results[0]["generated"] == 4
    finally:
        stop.set()
        thread.join(120)
    assert not thread.is_alive()
    # Nothing at all was written for the zh brief.
    creatives = read_all(settings, "creatives")
    assert all(c["lineage"]["request_id"] == "req-1" for c in creatives)


@pytest.mark.timeout(600)
def test_a_rerun_after_a_crash_continues_after_the_published_variants(
    settings: Settings, producer: KafkaProducer
) -> None:
    # What a run that crashed after its first variant left: one creative, since
    # approved by a person and given a history, and no result.
    req = request("req-9")
    [earlier] = candidate_creatives(
        req,
        [SCRIPT[0]],
        [Score()],
        ["format"],
        "scripted",
        "p1",
        None,
        False,
        time.time(),
    )
    earlier = msgspec.structs.replace(earlier, status="active", version=2)
    producer.send(
        settings.topic("creatives"),
        key=earlier.creative_id.encode(),
        value=msgspec.json.encode(earlier),
    )
    send(producer, settings, req)
    generator = ScriptedGenerator(SCRIPT)
    generator.gate.set()
    stop = threading.Event()
    thread = threading.Thread(target=run_worker, args=(settings, generator, stop))
    thread.start()
    try:
        results = wait_for(lambda: read_all(settings, "generation_results"), "req-9 answered")
    finally:
        stop.set()
        thread.join(120)
    assert generator.calls == [[2]], "only the two missing variants were asked for"
    [result] = results
    creatives = read_all(settings, "creatives")
    ids = [c["creative_id"] for c in creatives]
    # v1 was written once only (the earlier run's record), never re-published.
    assert ids.count("req-9-v1") == 1
    assert result["creative_ids"][0] == "req-9-v1" and len(result["creative_ids"]) == len(set(ids))
    # The script's first variant repeats v1: not published again under a new id.
    headlines = [c["headline"] for c in creatives]
    assert headlines.count("Light running shoes") == 1
    assert any(r["rule"] == "duplicate" for r in result["rejections"])

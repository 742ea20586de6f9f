"""Crash test: SIGKILL the ingest and worker processes mid-stream, more than once.

Kafka redelivers after a crash (at-least-once). The counts must still equal
exactly what was published, and redelivery must not produce spurious dead
letters (e.g. 'duplicate_impression_id' for an impression seen before the crash).
"""

from __future__ import annotations

import threading
import time

import pytest

from adloop.schemas import Creative
from adloop.streams.config import Settings

from stack import Stack, click, imp

pytestmark = pytest.mark.integration

CREATIVES = ["c1", "c2", "c3"]
AUDIENCES = ["a1", "a2", "a3", "a4"]
EVENTS = 20_000


def test_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice(settings: Settings) -> None:
    stack = Stack(settings).start()
    try:
        stack.register(
            *(Creative(creative_id=c, campaign="k", headline=f"Ad {c}") for c in CREATIVES)
        )
        expected: dict[str, dict[str, list[int]]] = {
            a: {c: [0, 0] for c in CREATIVES} for a in AUDIENCES
        }
        published = threading.Event()

        def produce() -> None:
            started = time.monotonic()
            for i in range(EVENTS):
                creative, audience = CREATIVES[i % 3], AUDIENCES[(i // 3) % 4]
                impression_id = f"e{i}"
                stack.publish(
                    "impressions",
                    impression_id,
                    imp(impression_id, creative, audience, campaign="k"),
                )
                expected[audience][creative][0] += 1
                if i % 7 == 0:
                    stack.publish("clicks", impression_id, click(impression_id))
                    expected[audience][creative][1] += 1
                # ~4,000 impressions/s, so the kills below land mid-stream.
                ahead = i / 4000 - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            stack.flush()
            published.set()

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        kills = [
            (1.0, ("ingest",)),
            (2.0, ("worker",)),
            (3.0, ("ingest",)),
            (4.0, ("ingest", "worker")),
        ]
        started = time.monotonic()
        for at, roles in kills:
            time.sleep(max(0.0, started + at - time.monotonic()))
            for role in roles:
                stack.sup.kill(role)
            time.sleep(0.2)
            for role in roles:
                stack.sup.start(role)
        producer.join(timeout=60)
        assert published.is_set()

        want = {a: {c: tuple(v) for c, v in by_c.items()} for a, by_c in expected.items()}

        def counts() -> dict[str, dict[str, tuple[int, int]]]:
            return {a: stack.counts("k", a) for a in AUDIENCES}

        stack.wait_for(
            lambda: counts() == want, timeout=120, what="exact counts after crashes", state=counts
        )
        # Still exact a moment later (no late duplicates), and no dead letters at all.
        time.sleep(2.0)
        assert counts() == want
        assert stack.dead_letters(expected=0, timeout=1.0) == []
    finally:
        stack.stop()

"""Crash test: SIGKILL the ingest and worker processes mid-stream, more than once.

Kafka redelivers after a crash (at-least-once). The counts must still equal
exactly what was published, and redelivery must not produce spurious dead
letters (e.g. 'duplicate_impression_id' for an impression seen before the crash).
"""

from __future__ import annotations

import shutil
import threading

import msgspec
import pytest
from kafka import KafkaConsumer, TopicPartition

from adloop.schemas import Creative, OutcomeSnapshot
from adloop.streams.config import Settings
from adloop.streams.kafka_io import kafka_python_kwargs

from stack import WAIT_S, Stack, click, imp

pytestmark = pytest.mark.integration

CREATIVES = ["c1", "c2", "c3"]
AUDIENCES = ["a1", "a2", "a3", "a4"]
EVENTS = 20_000


#: Kill points, by progress of the stream, not by the clock: the producer publishes
#: up to ``published`` events, and once the decisions count ``counted`` impressions
#: (some of the published ones still in flight) the roles are killed and restarted;
#: then the stream goes on. Every kill lands mid-stream, on any machine.
KILLS = [
    (4_000, 3_000, ("ingest",)),
    (8_000, 7_000, ("worker",)),
    (12_000, 11_000, ("ingest",)),
    (16_000, 15_000, ("ingest", "worker")),
]


def test_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice(settings: Settings) -> None:
    stack = Stack(settings).start()
    try:
        stack.register(
            *(Creative(creative_id=c, campaign="k", headline=f"Ad {c}") for c in CREATIVES)
        )
        expected: dict[str, dict[str, list[int]]] = {
            a: {c: [0, 0] for c in CREATIVES} for a in AUDIENCES
        }
        for i in range(EVENTS):
            creative, audience = CREATIVES[i % 3], AUDIENCES[(i // 3) % 4]
            expected[audience][creative][0] += 1
            if i % 7 == 0:
                expected[audience][creative][1] += 1
        go = [threading.Event() for _ in KILLS]
        published = threading.Event()

        def produce() -> None:
            phase = 0
            for i in range(EVENTS):
                if phase < len(KILLS) and i == KILLS[phase][0]:
                    stack.flush()
                    go[phase].wait()
                    phase += 1
                creative, audience = CREATIVES[i % 3], AUDIENCES[(i // 3) % 4]
                impression_id = f"e{i}"
                stack.publish(
                    "impressions",
                    impression_id,
                    imp(impression_id, creative, audience, campaign="k"),
                )
                if i % 7 == 0:
                    stack.publish("clicks", impression_id, click(impression_id))
            stack.flush()
            published.set()

        def counts() -> dict[str, dict[str, tuple[int, int]]]:
            return {a: stack.without_sentinel("k", a) for a in AUDIENCES}

        def counted() -> int:
            return sum(n for by_c in counts().values() for n, _ in by_c.values())

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        try:
            for phase, (_, at, roles) in enumerate(KILLS):
                stack.wait_for(
                    lambda at=at: counted() >= at, what=f"{at:,} impressions counted", state=counted
                )
                for role in roles:
                    stack.sup.kill(role)  # returns once the process is gone
                for role in roles:
                    stack.sup.start(role)
                go[phase].set()
        finally:
            for event in go:
                event.set()
        producer.join(timeout=WAIT_S)
        assert published.is_set()

        want = {a: {c: tuple(v) for c, v in by_c.items()} for a, by_c in expected.items()}
        stack.wait_for(lambda: counts() == want, what="exact counts after crashes", state=counts)
        # Still exact once sentinels published after every event are counted (no late
        # duplicates), and no dead letter at all.
        stack.settle("k", AUDIENCES)
        assert counts() == want
        assert stack.settled_dead_letters() == []
    finally:
        stack.stop()


def _outcome_ends(stack: Stack) -> tuple[dict[int, int], dict[tuple[str, int], int]]:
    """Per outcomes partition, the offset after its last record (read, not listed: Tansu
    lists a wrong end), and per decision key and source partition the impressions of the
    latest snapshot there (snapshots are cumulative)."""
    s = stack.settings
    consumer = KafkaConsumer(
        **kafka_python_kwargs(
            KafkaConsumer, s, auto_offset_reset="earliest", consumer_timeout_ms=1000
        )
    )
    tps = [TopicPartition(s.topic("outcomes"), p) for p in range(s.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ends: dict[int, int] = {}
    latest: dict[tuple[str, int], int] = {}
    for record in consumer:
        ends[record.partition] = record.offset + 1
        snapshot = msgspec.json.decode(record.value, type=OutcomeSnapshot)
        for source, by_creative in snapshot.sources.items():
            latest[(record.key.decode(), source)] = sum(
                cell.impressions
                for by_placement in by_creative.values()
                for cell in by_placement.values()
            )
    consumer.close()
    return ends, latest


def _committed(stack: Stack, group: str, partitions: list[int]) -> dict[int, int | None]:
    consumer = KafkaConsumer(**kafka_python_kwargs(KafkaConsumer, stack.settings, group_id=group))
    topic = stack.settings.topic("outcomes")
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        consumer.close()


def test_a_worker_killed_after_the_last_event_comes_back_with_every_count(
    settings: Settings,
) -> None:
    """The predecessor applied every snapshot and committed the outcome offsets, but
    was killed before it published the decisions (here: a decision interval longer than
    the test, which widens the window between a commit and the next decision tick to the
    whole run). No snapshot will come again for these keys: the restarted worker, its
    state directory lost, must publish what its recovered table holds."""
    stack = Stack(settings.with_overrides(decision_interval_ms=3_600_000)).start()
    try:
        stack.register(
            *(Creative(creative_id=c, campaign="k", headline=f"Ad {c}") for c in CREATIVES)
        )
        want: dict[str, dict[str, list[int]]] = {a: {} for a in AUDIENCES}
        for i in range(2_000):
            creative, audience = CREATIVES[i % 3], AUDIENCES[(i // 3) % 4]
            impression_id = f"e{i}"
            stack.publish(
                "impressions", impression_id, imp(impression_id, creative, audience, campaign="k")
            )
            cell = want[audience].setdefault(creative, [0, 0])
            cell[0] += 1
            if i % 7 == 0:
                stack.publish("clicks", impression_id, click(impression_id))
                cell[1] += 1
        stack.flush()

        def emitted() -> int:
            return sum(_outcome_ends(stack)[1].values())

        stack.wait_for(
            lambda: emitted() == 2_000, what="every impression in the outcomes", state=emitted
        )
        ends, _ = _outcome_ends(stack)
        group = stack.settings.group_id("worker")

        def committed() -> dict[int, int | None]:
            return _committed(stack, group, sorted(ends))

        stack.wait_for(
            lambda: committed() == ends,
            what="the worker's commit of every outcome",
            state=committed,
        )
        stack.sup.kill("worker")
        shutil.rmtree(stack.settings.state_dir("worker"))
        stack.sup.settings = stack.sup.settings.with_overrides(decision_interval_ms=25)
        stack.sup.start("worker")
        expected = {a: {c: tuple(v) for c, v in by_c.items()} for a, by_c in want.items()}

        def counts() -> dict[str, dict[str, tuple[int, int]]]:
            return {a: stack.without_sentinel("k", a) for a in AUDIENCES}

        stack.wait_for(
            lambda: counts() == expected, what="every count, with no new traffic", state=counts
        )
    finally:
        stack.stop()

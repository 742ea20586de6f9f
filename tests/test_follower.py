"""The generic topic follower: hostile records are skipped and counted, never fatal; it
starts from the earliest retained record and catches up to the end that exists."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from adloop.schemas import AuditEntry, Decision
from adloop.streams.config import Settings
from adloop.streams.follower import Follower, catch_up_targets, still_behind
from adloop.streams.kafka_io import producer_kwargs
from adloop.streams.topics import ensure_topics


def decision(campaign: str, audience: str, impressions: int = 0) -> bytes:
    return msgspec.json.encode(
        Decision(
            campaign=campaign,
            audience=audience,
            best_creative_id=None,
            creatives=[],
            impressions=impressions,
            clicks=0,
            updated_at=1.0,
        )
    )


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for a record under test to be applied (a sentinel, not a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "the follower did not apply the sentinel"
        await asyncio.sleep(0.01)


@pytest.mark.integration
def test_hostile_records_are_skipped_counted_and_logged(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topic = settings.topic("decisions")
    caplog.set_level(logging.WARNING, logger="adloop.follower")

    async def scenario() -> tuple[dict[str, Decision], Any, dict[str, Decision]]:
        await ensure_topics(settings)
        producer = AIOKafkaProducer(**producer_kwargs(settings, acks="all"))
        await producer.start()

        async def send(key: bytes | None, value: bytes) -> None:
            # One partition: the order of the records under test is the order sent.
            await producer.send_and_wait(topic, value, key=key, partition=0)

        decisions: dict[str, Decision] = {}
        follower = Follower.latest(settings, "decisions", decisions)
        try:
            # On the topic before the follower starts: it must still catch up.
            await send(b"\xff\xfec|a", decision("c", "a", 99))  # valid value, key not UTF-8
            await send(b"c|a", b'{"campaign": "c", "audience": ')  # not JSON
            await send(b"c|a", b'{"campaign": "c", "audience": "a"}')  # not a Decision
            await send(b"c|b", decision("c", "a", 98))  # key of another decision
            await send(None, decision("c", "a", 97))  # no key
            await send(b"c|a", decision("c", "a", 1))  # the sentinel
            await follower.start()
            await follower.wait_caught_up()
            caught_up = dict(decisions)
            # And while following: a hostile record, then a valid one.
            await send(b"\x80", decision("c", "b", 96))
            await send(b"c|b", decision("c", "b", 2))
            await until(lambda: "c|b" in decisions)
            return caught_up, follower.status(), decisions
        finally:
            await follower.stop()
            await producer.stop()

    caught_up, status, decisions = asyncio.run(scenario())
    assert {k: d.impressions for k, d in caught_up.items()} == {"c|a": 1}
    assert {k: d.impressions for k, d in decisions.items()} == {"c|a": 1, "c|b": 2}
    assert status.running and status.caught_up and status.applied == 2
    assert status.errors == {
        "undecodable_key": 2,
        "malformed_json": 1,
        "missing_field": 1,
        "key_mismatch": 1,
        "missing_key": 1,
    }
    last = status.last_error
    assert last is not None
    assert (last.reason, last.topic, last.partition, last.offset) == (
        "undecodable_key",
        topic,
        0,
        6,
    )
    logged = [r for r in caplog.records if getattr(r, "reason", None) == "undecodable_key"]
    assert [(r.topic, r.partition, r.offset) for r in logged] == [  # type: ignore[attr-defined]
        (topic, 0, 0),
        (topic, 0, 6),
    ]


# --- retention: a fake consumer (Tansu has no DeleteRecords to truncate a real head) ----


class FakeConsumer:
    """One topic's partitions as an aiokafka consumer sees them after retention deleted
    their heads: records from ``beginnings[p]`` on, an end that ListOffsets understates
    (as Tansu's does), and out-of-range positions reset by ``auto_offset_reset``."""

    def __init__(
        self,
        topic: str,
        records: dict[int, list[bytes]],
        beginnings: dict[int, int],
        listed_ends: dict[int, int],
        auto_offset_reset: str,
    ) -> None:
        self.topic = topic
        self.logs = {
            p: [
                SimpleNamespace(topic=topic, partition=p, offset=beginnings[p] + i, key=k, value=v)
                for i, (k, v) in enumerate(values)
            ]
            for p, values in records.items()
        }
        self.beginnings = beginnings
        self.listed_ends = listed_ends
        self.reset = auto_offset_reset
        self.positions: dict[TopicPartition, int] = {}
        self._subscription = SimpleNamespace(subscription=None)  # for FetchWaitGovernor

    def true_ends(self) -> dict[TopicPartition, int]:
        return {
            TopicPartition(self.topic, p): self.beginnings[p] + len(log)
            for p, log in self.logs.items()
        }

    def truncate(self, partition: int, before: int) -> None:
        """Retention deletes a partition's records before ``before``."""
        self.logs[partition] = [r for r in self.logs[partition] if r.offset >= before]
        self.beginnings[partition] = before

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self.logs)

    def assign(self, tps: list[TopicPartition]) -> None:
        self.positions = dict.fromkeys(tps, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.beginnings[tp.partition] for tp in tps}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.listed_ends[tp.partition] for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        out = {}
        for tp, position in self.positions.items():
            begin, end = self.beginnings[tp.partition], self.true_ends()[tp]
            if position < begin:  # out of range
                position = begin if self.reset == "earliest" else end
            # One record per fetch, so catching up stops where the follower thinks the
            # end is, not wherever a large fetch happened to end.
            records = [r for r in self.logs[tp.partition] if r.offset >= position][:1]
            if records:
                out[tp] = records
                position = records[-1].offset + 1
            self.positions[tp] = position
        if not out:
            await asyncio.sleep(0.005)  # an empty fetch takes its wait
        return out


def fake_follower(
    settings: Settings, fake: Callable[[str], FakeConsumer], on_record: Callable[[Any], None]
) -> tuple[Follower[Any], list[FakeConsumer]]:
    made: list[FakeConsumer] = []

    class Faked(Follower[Any]):
        def _new_consumer(self) -> Any:
            made.append(fake(self.consumer_kwargs()["auto_offset_reset"]))
            return made[-1]

        async def _end_offsets(
            self, listed: dict[TopicPartition, int]
        ) -> dict[TopicPartition, int]:
            return {tp: made[-1].true_ends()[tp] for tp in listed}  # as fetched_end_offsets

    return Faked(settings, "audit", on_record), made


def entry(n: int) -> tuple[bytes, bytes]:
    value = AuditEntry(at=float(n), actor="a", campaign="c", action=f"a{n}")
    return b"c", msgspec.json.encode(value)


def test_catches_up_on_a_topic_whose_head_retention_deleted() -> None:
    settings = Settings(broker="kafka://127.0.0.1:1", partitions=3)
    seen: list[str] = []

    def fake(reset: str) -> FakeConsumer:
        return FakeConsumer(
            settings.topic("audit"),
            # p0: offsets 5..9 retained, ListOffsets says 8 (Tansu); p1: everything
            # deleted at offset 7; p2: never written.
            {0: [entry(n) for n in range(5, 10)], 1: [], 2: []},
            beginnings={0: 5, 1: 7, 2: 0},
            listed_ends={0: 8, 1: 7, 2: 0},
            auto_offset_reset=reset,
        )

    def on_record(a: AuditEntry) -> None:
        if a.action == "a6":
            raise RuntimeError("a bug in the callback")
        seen.append(f"{a.action} {'after' if follower.caught_up.is_set() else 'before'}")

    follower, made = fake_follower(settings, fake, on_record)

    async def scenario() -> None:
        await follower.start()
        assert made[0].positions[TopicPartition(settings.topic("audit"), 0)] == 5  # not 0
        await follower.wait_caught_up(timeout=10)
        await follower.stop()

    asyncio.run(scenario())
    # Offsets 8 and 9 before catching up: the end that exists, not the one listed.
    assert seen == ["a5 before", "a7 before", "a8 before", "a9 before"]
    status = follower.status()
    assert status.caught_up and status.applied == 4
    assert status.errors == {"apply_failed": 1}
    assert status.last_error is not None and status.last_error.offset == 6


def test_a_head_deleted_while_starting_resumes_at_the_earliest_retained_record() -> None:
    settings = Settings(broker="kafka://127.0.0.1:1", partitions=1)
    seen: list[str] = []
    follower, made = fake_follower(
        settings,
        lambda reset: FakeConsumer(
            settings.topic("audit"),
            {0: [entry(n) for n in range(10)]},
            beginnings={0: 0},
            listed_ends={0: 10},
            auto_offset_reset=reset,
        ),
        lambda a: seen.append(a.action),
    )

    async def scenario() -> None:
        await follower.start()
        made[0].truncate(0, before=4)  # after the follower sought to offset 0
        await follower.wait_caught_up(timeout=10)
        await follower.stop()

    asyncio.run(scenario())
    assert seen == [f"a{n}" for n in range(4, 10)]


def test_followers_reset_to_earliest_whatever_the_options_say() -> None:
    settings = Settings(
        broker="kafka://127.0.0.1:1",
        kafka_options={"auto_offset_reset": "latest", "group_id": "theirs"},
    )
    kwargs = Follower(settings, "decisions", print).consumer_kwargs()
    assert kwargs["auto_offset_reset"] == "earliest" and kwargs["group_id"] is None


def test_catch_up_targets_and_what_is_behind() -> None:
    a, b, c = (TopicPartition("t", p) for p in range(3))
    targets = catch_up_targets({a: 5, b: 7, c: 0}, {a: 10, b: 7, c: 0})
    assert targets == {a: 10}
    assert still_behind(targets, {a: 9}) == {a: 10}
    assert still_behind(targets, {a: 10}) == {}

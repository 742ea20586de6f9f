"""Follow every partition of a (compacted) topic from the beginning, in the background.

Used by every process that needs a whole topic in memory (creatives, decisions):
no consumer group, because each reader needs all partitions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from adloop.streams.config import Settings, TopicRole
from adloop.streams.kafka_io import FetchWaitGovernor, consumer_kwargs

log = logging.getLogger("adloop.follower")


class TopicFollower:
    """Subclasses implement ``apply(record)``; ``caught_up`` is set once the records
    present at start have been applied, ``sync()`` waits for everything published
    so far."""

    def __init__(self, settings: Settings, role: TopicRole, fetch_max_wait_ms: int) -> None:
        self.settings = settings
        self.topic = settings.topic(role)
        self.caught_up = asyncio.Event()
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._tps: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}

    def apply(self, record: Any) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **consumer_kwargs(
                self.settings, group_id=None, fetch_max_wait_ms=self._fetch_max_wait_ms
            )
        )
        await self._consumer.start()
        self._fetch_wait = FetchWaitGovernor(self._consumer, self._fetch_max_wait_ms)
        partitions = self._consumer.partitions_for_topic(self.topic) or range(
            self.settings.partitions
        )
        self._tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._tps)
        for tp in self._tps:
            self._consumer.seek(tp, 0)
        end = await self._consumer.end_offsets(self._tps)
        self._task = asyncio.create_task(
            self._run({tp: o for tp, o in end.items() if o > 0}), name=f"follow-{self.topic}"
        )

    async def _run(self, remaining: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        if not remaining:
            self.caught_up.set()
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            self._fetch_wait.observe(batches)
            for tp, records in batches.items():
                for record in records:
                    self.apply(record)
                if records:
                    self._positions[tp] = records[-1].offset + 1
                    if self._positions[tp] >= remaining.get(tp, 0):
                        remaining.pop(tp, None)
            if not remaining:
                self.caught_up.set()

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self.caught_up.wait(), timeout)

    async def sync(self, timeout: float = 2.0) -> bool:
        """Wait until every record published so far is applied (False on timeout)."""
        assert self._consumer is not None
        end = await self._consumer.end_offsets(self._tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(self._positions.get(tp, 0) < offset for tp, offset in end.items()):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

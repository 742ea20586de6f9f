"""The creative registry: every process's view of the compacted creatives topic.

``CreativeRegistry`` is plain in-memory state (testable without Kafka);
``RegistryFollower`` keeps one up to date by reading every partition of the
creatives topic from the beginning (no consumer group: each process needs all).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import Creative
from streams.config import Settings
from streams.kafka import consumer_kwargs

log = logging.getLogger("adloop.registry")


@dataclass
class CreativeRegistry:
    creatives: dict[str, Creative] = field(default_factory=dict)
    by_campaign: dict[str, dict[str, Creative]] = field(default_factory=dict)
    version: int = 0  # bumped on every change, so caches know when to refresh

    def put(self, creative: Creative) -> None:
        old = self.creatives.get(creative.creative_id)
        if old is not None and old.campaign != creative.campaign:
            self.by_campaign.get(old.campaign, {}).pop(creative.creative_id, None)
        self.creatives[creative.creative_id] = creative
        self.by_campaign.setdefault(creative.campaign, {})[creative.creative_id] = creative
        self.version += 1

    def get(self, creative_id: str) -> Creative | None:
        return self.creatives.get(creative_id)

    def has_campaign(self, campaign: str) -> bool:
        return bool(self.by_campaign.get(campaign))

    def campaign_creatives(self, campaign: str) -> list[Creative]:
        return list(self.by_campaign.get(campaign, {}).values())

    def servable(self, campaign: str, audience: str) -> list[Creative]:
        """Active creatives of a campaign that target the audience, in a stable order."""
        return sorted(
            (
                c
                for c in self.by_campaign.get(campaign, {}).values()
                if c.status == "active" and c.targets(audience)
            ),
            key=lambda c: c.creative_id,
        )


class RegistryFollower:
    """Background task: applies every creatives-topic record to a registry."""

    def __init__(
        self,
        settings: Settings,
        registry: CreativeRegistry,
        on_change: Callable[[Creative], None] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.on_change = on_change
        self.caught_up = asyncio.Event()
        self._decoder = msgspec.json.Decoder(Creative)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._tps: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        topic = self.settings.topic("creatives")
        self._consumer = AIOKafkaConsumer(
            **consumer_kwargs(
                # Creatives change rarely: poll gently; sync() catches up on demand.
                self.settings,
                group_id=None,
                fetch_max_wait_ms=max(self.settings.fetch_wait_ms, 100),
            )
        )
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(topic) or set()
        if not partitions:
            partitions = set(range(self.settings.partitions))
        self._tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._tps)
        for tp in self._tps:
            self._consumer.seek(tp, 0)
        end = await self._consumer.end_offsets(self._tps)
        self._task = asyncio.create_task(self._run(dict(end)), name="registry-follower")

    async def _run(self, end: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        remaining = {tp: off for tp, off in end.items() if off > 0}
        if not remaining:
            self.caught_up.set()
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    self._apply(record.value)
                    if tp in remaining and record.offset + 1 >= remaining[tp]:
                        del remaining[tp]
                if records:
                    self._positions[tp] = records[-1].offset + 1
            if not self.caught_up.is_set() and not remaining:
                self.caught_up.set()

    async def sync(self, timeout: float = 2.0) -> bool:
        """Wait until every creative published so far is applied (False on timeout).

        For a reader that meets an id it does not know: the creative may have been
        registered a moment ago.
        """
        assert self._consumer is not None
        end = await self._consumer.end_offsets(self._tps)
        deadline = asyncio.get_running_loop().time() + timeout
        while any(self._positions.get(tp, 0) < offset for tp, offset in end.items()):
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _apply(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            creative = self._decoder.decode(value)
        except msgspec.MsgspecError as exc:
            # Creatives are written by adloop itself (validated at the API), so a bad
            # record here is a bug or a foreign writer; skip it loudly.
            log.warning("skipping invalid creative record: %s", exc)
            return
        self.registry.put(creative)
        if self.on_change is not None:
            self.on_change(creative)

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self.caught_up.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

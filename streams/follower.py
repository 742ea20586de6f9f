"""Follow every partition of a topic from its earliest retained record, in the background.

Every process that needs a whole topic in memory (creatives, decisions, campaign
settings, generation requests and results, the audit trail) uses :class:`Follower`:
no consumer group, because each reader needs all partitions. It decodes each value
as the record type the topology declares for the topic and hands it to a callback.

A follower must not stop following. A record it cannot apply (a key that is missing,
not UTF-8 or not the one its value calls for; a value that is not JSON or not the
declared record; a callback that raises) is logged with its coordinates and the
reason, counted, and skipped. A failed fetch is logged, counted and retried. Before
this, a decision published under a non-UTF-8 key ended serving's decision follower
for good while ``/healthz`` said ok.

It starts from the earliest *retained* offset and measures "caught up" against the end
that exists: the followers used to seek to offset 0 with ``auto_offset_reset=latest``,
so once retention deleted the head of a non-compacted topic they jumped to the end,
never caught up, and serve, loop and generator failed to start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from adloop.schemas.validation import classify
from adloop.schemas.versioning import accept
from adloop.streams import metrics
from adloop.streams.config import Settings
from adloop.streams.kafka_io import FetchWaitGovernor, consumer_kwargs, fetched_end_offsets
from adloop.streams.topology import TOPOLOGY, TopicRole

log = logging.getLogger("adloop.follower")

R = TypeVar("R", bound=msgspec.Struct)

#: Followed topics change rarely and nobody waits on them within milliseconds, so they
#: are polled gently by default: the embedded broker answers a fetch only when its wait
#: expires, so short waits cost CPU on both sides. Serving's decisions ask for less.
GENTLE_FETCH_WAIT_MS = 250


class FollowerError(msgspec.Struct, kw_only=True, frozen=True):
    """Why a record was skipped (or a fetch failed: no partition and offset then)."""

    reason: str
    topic: str
    partition: int | None
    offset: int | None
    detail: str
    at: float


class FollowerStatus(msgspec.Struct, kw_only=True):
    """What a follower can say about itself (for health pages and logs)."""

    topic: str
    running: bool
    caught_up: bool
    applied: int
    errors: dict[str, int]
    last_error: FollowerError | None


def catch_up_targets(
    beginnings: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """The end offset to reach in each partition that holds records at the start.

    A partition whose retained records all went (end == earliest retained offset)
    holds nothing to catch up on, whatever offset its history reached.
    """
    return {tp: end for tp, end in ends.items() if end > beginnings.get(tp, 0)}


def still_behind(
    targets: Mapping[TopicPartition, int], positions: Mapping[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """``targets`` the positions have not reached yet."""
    return {tp: end for tp, end in targets.items() if positions.get(tp, 0) < end}


class Follower(Generic[R]):
    """Applies every record of a topic role, in offset order per partition.

    ``on_record`` receives each value decoded as the topology's record type for the
    role, once its key was checked against the value. ``caught_up`` is set once the
    records present at start have been applied; ``sync()`` waits for everything
    published so far; ``status()`` says how it is going.
    """

    def __init__(
        self,
        settings: Settings,
        role: TopicRole,
        on_record: Callable[[R], None],
        *,
        fetch_max_wait_ms: int | None = None,
    ) -> None:
        decl = TOPOLOGY[role]
        self.settings = settings
        self.role = role
        self.topic = settings.topic(role)
        self.caught_up = asyncio.Event()
        self.applied = 0
        self.errors: Counter[str] = Counter()
        self.last_error: FollowerError | None = None
        self._on_record = on_record
        self._key_of = decl.key_of
        self._record_name = decl.record.__name__
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(decl.record)
        self._partitions = decl.partitions_for(settings)
        self._fetch_max_wait_ms = (
            max(settings.fetch_wait_ms, GENTLE_FETCH_WAIT_MS)
            if fetch_max_wait_ms is None
            else fetch_max_wait_ms
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._fetch_wait: FetchWaitGovernor | None = None
        self._task: asyncio.Task[None] | None = None
        self._tps: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._targets: dict[TopicPartition, int] = {}

    @classmethod
    def latest(
        cls,
        settings: Settings,
        role: TopicRole,
        table: dict[str, R],
        *,
        fetch_max_wait_ms: int | None = None,
    ) -> Follower[R]:
        """A follower that keeps the latest value per key in ``table``."""
        key_of = TOPOLOGY[role].key_of
        if key_of is None:
            raise ValueError(f"topic role {role} has no key derived from its values")

        versioned = "version" in getattr(TOPOLOGY[role].record, "__struct_fields__", ())

        def put(value: R) -> None:
            key = key_of(value)
            # Versioned records (campaign settings): only a newer write replaces the
            # current one, the same decision on every reader (schemas/versioning.py).
            if versioned and accept(table.get(key), value) is not None:
                return
            table[key] = value

        return cls(settings, role, put, fetch_max_wait_ms=fetch_max_wait_ms)

    def consumer_kwargs(self) -> dict[str, Any]:
        kwargs = consumer_kwargs(
            self.settings, group_id=None, fetch_max_wait_ms=self._fetch_max_wait_ms
        )
        # Not negotiable, whatever ADLOOP_KAFKA_OPTIONS says: a position that fell out of
        # range (retention deleted it) resumes at the earliest retained record, never at
        # the end, and a follower has no group, so nothing to commit.
        kwargs.update(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
        return kwargs

    # -- hooks (tests replace them with fakes) -------------------------------------------
    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(**self.consumer_kwargs())

    async def _end_offsets(self, listed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The ends that exist: Tansu's ListOffsets understates them (DEVELOPERS.md)."""
        kwargs = consumer_kwargs(self.settings, fetch_max_wait_ms=self._fetch_max_wait_ms)
        return await fetched_end_offsets(kwargs, listed)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        consumer = self._new_consumer()
        await consumer.start()
        self._consumer = consumer
        self._fetch_wait = FetchWaitGovernor(consumer, self._fetch_max_wait_ms)
        partitions = consumer.partitions_for_topic(self.topic) or range(self._partitions)
        self._tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(self._tps)
        beginnings = await consumer.beginning_offsets(self._tps)
        for tp in self._tps:
            consumer.seek(tp, beginnings[tp])
        listed = await consumer.end_offsets(self._tps)
        ends = await self._end_offsets(
            {tp: end for tp, end in listed.items() if end > beginnings[tp]}
        )
        self._positions = dict(beginnings)
        self._targets = catch_up_targets(beginnings, ends)
        self._task = asyncio.create_task(self._run(), name=f"follow-{self.topic}")

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self.caught_up.wait(), timeout)

    async def sync(self, timeout: float = 2.0) -> bool:
        """Wait until every record published so far is applied (False on timeout).

        The listed end may be understated (Tansu: the last batch's base offset + 1), but
        a fetch delivers whole batches and the positions compared here move only after
        all of a fetch is applied, so reaching it means the last batch was applied too.
        """
        assert self._consumer is not None
        end = await self._consumer.end_offsets(self._tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while still_behind(end, self._positions):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def status(self) -> FollowerStatus:
        return FollowerStatus(
            topic=self.topic,
            running=self._task is not None and not self._task.done(),
            caught_up=self.caught_up.is_set(),
            applied=self.applied,
            errors=dict(self.errors),
            last_error=self.last_error,
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    # -- following -------------------------------------------------------------------------
    async def _run(self) -> None:
        consumer, fetch_wait = self._consumer, self._fetch_wait
        assert consumer is not None and fetch_wait is not None
        backoff = 0.5
        while True:
            if not self._targets:
                self.caught_up.set()
            try:
                batches = await consumer.getmany(timeout_ms=200)
                fetch_wait.observe(batches)
                for records in batches.values():
                    for record in records:
                        self._apply(record)
                # The consumer's position, not the last record's offset + 1: it also
                # moves past compacted-away offsets, control records, and a reset to
                # the earliest retained offset after retention deleted ours.
                for tp in self._tps:
                    self._positions[tp] = await consumer.position(tp)
                self._targets = still_behind(self._targets, self._positions)
                backoff = 0.5
            except Exception as exc:  # a follower that stops is worse than one that waits
                self._failed("fetch_failed", None, f"{type(exc).__name__}: {exc}", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _apply(self, record: Any) -> None:
        if record.value is None:
            # A tombstone: adloop deletes nothing by key; compaction will drop the record.
            return
        key: str | None = None
        if self._key_of is not None:
            if record.key is None:
                self._failed("missing_key", record, f"{self.role} records are keyed")
                return
            try:
                key = record.key.decode()
            except UnicodeDecodeError:
                self._failed("undecodable_key", record, f"key is not UTF-8: {record.key[:64]!r}")
                return
        try:
            value = self._decoder.decode(record.value)
        except msgspec.MsgspecError as exc:
            self._failed(classify(exc), record, f"{self._record_name}: {exc}")
            return
        if key is not None and self._key_of is not None and key != (want := self._key_of(value)):
            self._failed("key_mismatch", record, f"key {key!r}, the value's key is {want!r}")
            return
        try:
            self._on_record(value)
        except Exception as exc:  # a bug in one callback must not end the follower
            self._failed("apply_failed", record, f"{type(exc).__name__}: {exc}", exc)
            return
        self.applied += 1

    def _failed(
        self, reason: str, record: Any, detail: str, exc: BaseException | None = None
    ) -> None:
        error = FollowerError(
            reason=reason,
            topic=self.topic,
            partition=record.partition if record is not None else None,
            offset=record.offset if record is not None else None,
            detail=detail[:500],
            at=time.time(),
        )
        self.errors[reason] += 1
        self.last_error = error
        metrics.FOLLOWER_ERRORS.labels(self.role, reason).inc()
        log.error(
            "follower skipped a record" if record is not None else "follower fetch failed",
            extra={
                "topic": error.topic,
                "partition": error.partition,
                "offset": error.offset,
                "reason": reason,
                "detail": error.detail,
                "count": self.errors[reason],
            },
            exc_info=exc if reason in ("apply_failed", "fetch_failed") else None,
        )

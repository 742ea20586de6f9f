"""The ingest's state store, movable between instances: a changelog topic for its RocksDB.

In the manner of a Kafka Streams state store. The ingest keeps the join state of input
partition p (retained impressions, parked clicks, cumulative counts, the expiry index)
and the input offsets it reflects in a local RocksDB store. Every key of that store is
``tag (1 byte) + input partition (4 bytes, big-endian) + rest`` (``ingest._pkey``); the
key ``o`` + p is the partition's *checkpoint*: its input offsets and the join's
bookkeeping, rewritten by every flush. Partition p of the ``ingest_changelog`` topic
(compacted) holds the store's keys of input partition p, keyed exactly as in RocksDB,
with the stored bytes as values and a tombstone for a deleted key. A store instance that
is given partition p restores it from there before it processes anything of p.

**A flush, without transactions** (Kafka has no multi-record atomicity without them, and
Tansu, the embedded broker, has no transactions). The ingest flushes partition p as:

1. its outputs (outcome snapshots, dead letters) and the state changes of p are produced
   to the broker, and all of them are awaited (``acks=all``);
2. only then the checkpoint record of p is produced to the changelog, and awaited;
3. only then the local RocksDB gets the changes, the checkpoint and the changelog offset
   of that checkpoint, in one atomic ``WriteBatch``.

Since one producer writes a partition in order (aiokafka keeps one request in flight
per broker, retries included), a checkpoint in changelog partition p comes after every
state change of its flush: **it covers every record before it**. The restore rule is
therefore: *a changelog record is part of the state if and only if a checkpoint record
follows it in its partition*. Records after the last checkpoint belong to a flush that
did not finish (the writer died between steps 1 and 2): they are ignored, and the last
checkpoint's input offsets point before the events they came from, so those events are
applied again, once, to the restored state. The checkpoint and the state it covers
therefore change together on replay, which is the atomicity the local ``WriteBatch``
gives on one machine.

**Repair.** An unfinished flush's records stay in the log, and a later checkpoint (by the
next owner) would cover them. So whoever restores a partition whose changelog ends with
ignored records first *repairs* it: for each key those records touched it writes the
key's restored value (or a tombstone), then a checkpoint. Every ignored record is thus
followed, before any later checkpoint, by its key's committed value, and replaying
everything before a later checkpoint in order yields the committed state.

**Compaction** keeps the latest record per key (and tombstones for
``delete.retention.ms``); replaying the survivors in order gives the same final state as
replaying everything, also for the checkpoint key, of which only the latest survives
(that is why the rule is "before the last checkpoint", not "each checkpoint's own
records"). The one hazard is an ignored record that is the newest of its key when the
cleaner runs: the committed value before it could be removed before the repair rewrites
it. ``min.compaction.lag.ms`` (one hour) keeps records that young out of compaction; the
repair happens at the partition's next assignment, seconds after a crash (the group's
session timeout), so it comes first unless no ingest instance runs for an hour.

**The local store** keeps the changelog offset of its last checkpoint under ``!`` + p
(local only, never in the changelog). On assignment the changelog is read from that
offset + 1: if it ends there the store is current (the common restart, no records read);
otherwise the records after it are applied by the rule above (another instance's flushes
since, a tail to repair). A store without that key (its directory was deleted, or it is
new) deletes its keys of p and reads the partition from the start. A store that has state
but finds the changelog empty (the first run with a changelog) writes its state there.

**Not covered: zombies.** Without transactions nothing fences an instance that was
expelled from the group (a pause longer than the session timeout) but still writes; it
could append to a changelog partition another instance owns. A SIGKILL or an orderly
rebalance (the revoked instance flushes before it lets go) cannot produce one; the
outputs have the same limit (README, "Exactness across crashes").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rocksdict import Rdict, WriteBatch

from adloop.streams.config import Settings
from adloop.streams.kafka_io import FetchWaitGovernor, consumer_kwargs, fetched_end_offsets

log = logging.getLogger("adloop.changelog")

#: The ingest store's checkpoint tag (``ingest._pkey(b"o", p)``).
CHECKPOINT_TAG = b"o"
#: Local only: the changelog offset of the store's last checkpoint of a partition.
LOCAL_TAG = b"!"
_BATCH_WRITE_RECORDS = 20_000  # restored records per local WriteBatch


def partition_key(tag: bytes, partition: int) -> bytes:
    return tag + partition.to_bytes(4, "big")


class ChangeBatch:
    """A RocksDB ``WriteBatch`` that also keeps its changes for the changelog.

    ``PartitionState.write_batch`` fills it like a ``WriteBatch`` (rocksdict's cannot be
    subclassed); the checkpoint put is kept apart, since it is produced last.
    """

    __slots__ = ("batch", "changes", "checkpoint", "checkpoint_key", "partition")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.batch = WriteBatch(raw_mode=True)
        self.changes: list[tuple[bytes, bytes | None]] = []
        self.checkpoint_key = partition_key(CHECKPOINT_TAG, partition)
        self.checkpoint: bytes | None = None

    def put(self, key: bytes, value: bytes) -> None:
        self.batch.put(key, value)
        if key == self.checkpoint_key:
            self.checkpoint = value
        else:
            self.changes.append((key, value))

    def delete(self, key: bytes) -> None:
        self.batch.delete(key)
        self.changes.append((key, None))


def _offset_bytes(offset: int) -> bytes:
    return offset.to_bytes(8, "big", signed=True)


def local_checkpoint_offset(db: Rdict, partition: int) -> int | None:
    """The changelog offset of the local store's last checkpoint of ``partition``."""
    raw = db.get(partition_key(LOCAL_TAG, partition))
    return int.from_bytes(raw, "big", signed=True) if raw is not None else None


def _prefixes(db: Rdict, partition: int) -> Iterator[tuple[bytes, bytes]]:
    """(start, stop) of each tag's key range of ``partition``: seeks from tag to tag, so
    it costs one seek per tag in use, not a scan of the other partitions."""
    it = db.iter()
    it.seek_to_first()
    while it.valid():
        tag = it.key()[0]
        start = bytes([tag]) + partition.to_bytes(4, "big")
        stop = bytes([tag]) + (partition + 1).to_bytes(4, "big")
        yield start, stop
        if tag == 0xFF:
            break
        it.seek(bytes([tag + 1]))


def partition_items(db: Rdict, partition: int) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of ``partition`` in the store."""
    for start, stop in list(_prefixes(db, partition)):
        for key, value in db.items(from_key=start):
            if key >= stop:
                break
            yield key, value


def wipe_partition(db: Rdict, partition: int) -> None:
    """Delete every key of ``partition`` (its local offset key included) atomically."""
    batch = WriteBatch(raw_mode=True)
    for start, stop in list(_prefixes(db, partition)):
        batch.delete_range(start, stop)
    if len(batch):
        db.write(batch)


@dataclass
class RestoreResult:
    """What the restore of one partition did (logged; the tests read it)."""

    partition: int
    mode: str  # current | incremental | full | seed | empty
    records: int = 0  # changelog records read
    applied: int = 0  # of them applied (before the last checkpoint)
    repaired: int = 0  # keys rewritten after an unfinished flush
    seconds: float = 0.0
    checkpoint_offset: int | None = None


@dataclass
class _Replay:
    """The read of one changelog partition: committed records go to the store in
    batches, those after the last checkpoint wait (and are dropped at the end)."""

    db: Rdict
    partition: int
    checkpoint_key: bytes
    result: RestoreResult
    batch: WriteBatch = field(default_factory=lambda: WriteBatch(raw_mode=True))
    tail: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    last_checkpoint: int | None = None

    def feed(self, records: Iterable[Any]) -> None:
        for record in records:
            self.result.records += 1
            if record.key == self.checkpoint_key:
                batch = self.batch
                for key, value in self.tail:
                    if value is None:
                        batch.delete(key)
                    else:
                        batch.put(key, value)
                self.result.applied += len(self.tail) + 1
                batch.put(record.key, record.value)
                self.tail.clear()
                self.last_checkpoint = record.offset
                if len(batch) >= _BATCH_WRITE_RECORDS:
                    self.write()
            else:
                self.tail.append((record.key, record.value))

    def write(self) -> None:
        """Committed records to RocksDB. A crash in between leaves the local offset
        where it was, so the next restore applies them again: replaying a prefix of a
        sequence of puts and deletes and then all of it gives the same state."""
        if len(self.batch):
            self.db.write(self.batch)
            self.batch = WriteBatch(raw_mode=True)


class IngestChangelog:
    """Writes the ingest store's flushes to the changelog and restores partitions."""

    def __init__(self, settings: Settings, db: Rdict, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.db = db
        self.producer = producer
        self.topic = settings.topic("ingest_changelog")

    # -- writing ------------------------------------------------------------------------
    async def _send_changes(
        self, partition: int, changes: Sequence[tuple[bytes, bytes | None]]
    ) -> list[asyncio.Future[Any]]:
        """Produce ``changes`` to changelog partition ``partition`` in record batches
        built here (the producer's per-message path costs ~10x more per record)."""
        futures: list[asyncio.Future[Any]] = []
        producer = self.producer
        builder = producer.create_batch()
        for key, value in changes:
            if builder.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(builder, self.topic, partition=partition))
                builder = producer.create_batch()
                if builder.append(key=key, value=value, timestamp=None) is None:
                    size = len(value or b"")
                    raise ValueError(f"a store record of {size} bytes is over the batch size")
        if builder.record_count():
            futures.append(await producer.send_batch(builder, self.topic, partition=partition))
        return futures

    async def commit(
        self, outputs: Sequence[asyncio.Future[Any]], batches: Mapping[int, ChangeBatch]
    ) -> None:
        """A flush: ``outputs`` (already sent) and the batches' state changes acknowledged,
        then their checkpoints, then the local store (see the module's docstring)."""
        futures = list(outputs)
        for partition, batch in batches.items():
            futures.extend(await self._send_changes(partition, batch.changes))
        if futures:
            await asyncio.gather(*futures)
        checkpoints = {
            partition: await self.producer.send(
                self.topic, batch.checkpoint, key=batch.checkpoint_key, partition=partition
            )
            for partition, batch in batches.items()
            if batch.checkpoint is not None
        }
        for partition, future in checkpoints.items():
            metadata = await future
            batch = batches[partition]
            batch.batch.put(partition_key(LOCAL_TAG, partition), _offset_bytes(metadata.offset))
        for batch in batches.values():
            self.db.write(batch.batch)

    async def _rewrite(self, partition: int, changes: list[tuple[bytes, bytes | None]]) -> int:
        """Produce ``changes`` and the store's current checkpoint of ``partition`` as one
        flush (a repair or a seed); returns the checkpoint's changelog offset."""
        batch = ChangeBatch(partition)
        batch.changes = changes
        batch.checkpoint = self.db.get(batch.checkpoint_key)
        await self.commit([], {partition: batch})
        offset = local_checkpoint_offset(self.db, partition)
        assert offset is not None
        return offset

    # -- restoring ----------------------------------------------------------------------
    def _client_kwargs(self) -> dict[str, Any]:
        return consumer_kwargs(
            self.settings,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.fetch_wait_ms,
            max_partition_fetch_bytes=16 * 1024 * 1024,
        )

    async def end_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        """The changelog's end per partition: from a fetch's high watermark, since
        Tansu's ListOffsets understates it (DEVELOPERS.md)."""
        kwargs = self._client_kwargs()
        tps = [TopicPartition(self.topic, p) for p in partitions]
        consumer = AIOKafkaConsumer(**kwargs)
        await consumer.start()
        try:
            listed = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
        ends = await fetched_end_offsets(kwargs, listed)
        return {tp.partition: end for tp, end in ends.items()}

    async def restore(self, partitions: Iterable[int]) -> list[RestoreResult]:
        """Bring the local store's ``partitions`` up to their changelog; call before
        processing them. Returns what was done per partition."""
        started = time.perf_counter()
        wanted = sorted(set(partitions))
        if not wanted:
            return []
        ends = await self.end_offsets(wanted)
        results: dict[int, RestoreResult] = {}
        reads: dict[int, int] = {}  # partition -> first changelog offset to read
        seeds: list[int] = []
        for p in wanted:
            end = ends[p]
            local = local_checkpoint_offset(self.db, p)
            has_state = self.db.get(partition_key(CHECKPOINT_TAG, p)) is not None
            if local is not None and end == local + 1:
                results[p] = RestoreResult(p, "current", checkpoint_offset=local)
            elif local is not None and end > local + 1:
                results[p] = RestoreResult(p, "incremental")
                reads[p] = local + 1
            elif end == 0:
                results[p] = RestoreResult(p, "seed" if has_state else "empty")
                if has_state:
                    seeds.append(p)
            elif local is None:
                wipe_partition(self.db, p)
                results[p] = RestoreResult(p, "full")
                reads[p] = 0
            else:
                raise RuntimeError(
                    f"{self.topic} partition {p} ends at offset {end}, but the local ingest "
                    f"store has a checkpoint at offset {local}: the changelog was recreated "
                    f"or truncated. Delete the store ({self.settings.data_dir}) to restore "
                    "from the changelog, or the changelog topic to seed it from the store."
                )
        if reads:
            await self._read(reads, ends, results)
        for p in seeds:
            skip = {partition_key(LOCAL_TAG, p), partition_key(CHECKPOINT_TAG, p)}
            state = [(k, v) for k, v in partition_items(self.db, p) if k not in skip]
            results[p].checkpoint_offset = await self._rewrite(p, list(state))
        elapsed = time.perf_counter() - started
        for result in results.values():
            result.seconds = elapsed
        return [results[p] for p in wanted]

    async def _read(
        self, reads: dict[int, int], ends: dict[int, int], results: dict[int, RestoreResult]
    ) -> None:
        replays = {
            p: _Replay(self.db, p, partition_key(CHECKPOINT_TAG, p), results[p]) for p in reads
        }
        tps = {TopicPartition(self.topic, p): p for p in reads}
        consumer = AIOKafkaConsumer(**self._client_kwargs())
        await consumer.start()
        try:
            consumer.assign(list(tps))
            for tp, p in tps.items():
                consumer.seek(tp, reads[p])
            governor = FetchWaitGovernor(consumer, self.settings.fetch_wait_ms)
            pending = set(tps)
            while pending:
                fetched = await consumer.getmany(*pending, timeout_ms=200)
                governor.observe(fetched)
                for tp, records in fetched.items():
                    replays[tps[tp]].feed(r for r in records if r.offset < ends[tps[tp]])
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tps[tp]]:
                        pending.discard(tp)
        finally:
            await consumer.stop()
        for p, replay in replays.items():
            replay.write()
            result = results[p]
            if replay.last_checkpoint is not None:
                self.db.put(partition_key(LOCAL_TAG, p), _offset_bytes(replay.last_checkpoint))
                result.checkpoint_offset = replay.last_checkpoint
            if replay.tail and self.db.get(replay.checkpoint_key) is not None:
                # An unfinished flush: rewrite the restored values of the keys it touched.
                keys = list(dict.fromkeys(key for key, _ in replay.tail))
                result.repaired = len(keys)
                result.checkpoint_offset = await self._rewrite(
                    p, [(key, self.db.get(key)) for key in keys]
                )

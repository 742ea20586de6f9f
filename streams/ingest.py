"""The ingest stage: validate, join and pre-aggregate exchange events.

Why a stage in front of Faust: Faust spends ~200 µs of CPU per message it
iterates, so feeding it every impression caps the loop at ~5k events/s. This
stage reads impressions, clicks and conversions with plain aiokafka batches
(a few µs per event), joins clicks to impressions, dead-letters bad input, and
hands Faust one *cumulative snapshot* per campaign x audience x source partition
per flush (see ``OutcomeSnapshot``) — orders of magnitude fewer messages.

Exactness across crashes (at-least-once delivery, SIGKILL at any point):

* State for input partition ``p`` (impressions awaiting clicks, parked clicks,
  cumulative counts) lives in a local RocksDB store and is written in one
  atomic ``WriteBatch`` together with the input offsets it reflects. On
  (re)assignment the consumer seeks to those offsets, never to Kafka's
  committed offsets, so every event is applied to the state exactly once.
  The store is replicated to a compacted changelog topic with the same
  all-or-nothing rule on replay, so a partition can move to another instance
  (``streams/changelog.py``).
* Outputs are flushed (acknowledged by the broker) *before* the checkpoint. A
  crash in between re-emits them after restart; because snapshots are
  cumulative and the posterior agent keeps the latest per source partition,
  repeats are harmless and the final counts are exact.

The counting rules (documented in the README) are ``streams/join.py``'s, pure and
clock-free: ``PartitionState`` is the RocksDB-backed store they work on, and the
adapter passes the wall time (``time.time()``, once per fetched batch) in. The adapter
checks the key contract (a record's key is its impression_id) with the join's rule,
since only it sees the keys.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from rocksdict import BlockBasedIndexType, BlockBasedOptions, Cache, Options, Rdict

from adloop.schemas import (
    Click,
    Conversion,
    Creative,
    CreativeCounts,
    DeadLetter,
    Impression,
    InvalidRecord,
    OutcomeSnapshot,
    RecordDecoder,
    decision_key,
)
from adloop.schemas.privacy import is_safe_token
from adloop.streams import metrics
from adloop.streams.broker import install_shutdown_signals
from adloop.streams.changelog import ChangeBatch, IngestChangelog
from adloop.streams.config import Settings
from adloop.streams.context import partition_contexts
from adloop.streams.follower import Follower
from adloop.streams.heap import HeapTrimmer, trim_heap
from adloop.streams.join import (
    KEY_MISMATCH,
    PARKED,
    UNKNOWN_IMPRESSION,
    ImpressionRecord,
    Join,
    JoinRules,
    ParkedEvent,
    count_attributed,
    key_matches,
    rules_from_settings,
)
from adloop.streams.kafka_io import FetchWaitGovernor, consumer_kwargs, producer_kwargs
from adloop.streams.registry import CreativeRegistry, registry_follower

log = logging.getLogger("adloop.ingest")


class Checkpoint(msgspec.Struct, array_like=True):
    offsets: dict[str, int]  # role -> next offset to read
    watermark: float = 0.0  # max impression event time seen
    expired_through: int = -1  # last expiry bucket swept
    flushes: int = 0  # checkpoints written, names expiry-index entries


_counts_type = dict[str, dict[str, CreativeCounts]]
_enc = msgspec.msgpack.Encoder()
_dec_imp = msgspec.msgpack.Decoder(ImpressionRecord)
_dec_parked = msgspec.msgpack.Decoder(list[ParkedEvent])
_dec_ckpt = msgspec.msgpack.Decoder(Checkpoint)
_dec_counts = msgspec.msgpack.Decoder(_counts_type)
_dec_ids = msgspec.msgpack.Decoder(list[bytes])
_json = msgspec.json.Encoder()


def _pkey(tag: bytes, partition: int, rest: bytes = b"") -> bytes:
    return tag + partition.to_bytes(4, "big") + rest


TOO_MANY_AUDIENCES = "too_many_audiences"
TOO_MANY_PLACEMENTS = "too_many_placements"
SNAPSHOT_TOO_LARGE = "snapshot_too_large"


def cell_bytes(creative_id: str, placement: str) -> int:
    """An upper bound of one counts cell in a snapshot's JSON: both names (at most 128
    characters of at most 4 UTF-8 bytes... but JSON-escaped) and the four counters."""
    return len(creative_id.encode()) + len(placement.encode()) + 2 * 8 + 120


@dataclass(frozen=True)
class CardinalityLimits:
    """What one campaign may create in one input partition. Bounded state and
    snapshots below the broker's message size whatever an exchange sends (page URLs as
    placements, one audience per user...)."""

    max_audiences_per_campaign: int
    max_placements_per_audience: int
    max_snapshot_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> CardinalityLimits:
        return cls(
            settings.max_audiences_per_campaign,
            settings.max_placements_per_audience,
            settings.max_snapshot_bytes,
        )


@dataclass
class IngestMetrics:
    events: Counter[str] = field(default_factory=Counter)  # impressions/clicks/... accepted
    dead_letters: Counter[str] = field(default_factory=Counter)  # by reason code
    snapshots: int = 0
    flushes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": dict(self.events),
            "dead_letters": dict(self.dead_letters),
            "snapshots": self.snapshots,
            "flushes": self.flushes,
        }


class PartitionState:
    """Join and counting state of one input partition, with a write-back buffer.

    It is the ``JoinStore`` of its ``Join`` (``streams/join.py``, the rules) and keeps
    the cumulative counts. Reads go to the buffer first, then RocksDB; ``write_batch``
    returns every change since the last checkpoint as one atomic batch, offsets
    included. Keys, by partition p: ``i``+p+id an impression record, ``x``+p+bucket+flush
    the ids of one flush's impressions in an expiry bucket, ``w``+p+id the events
    parked for an id, ``c``+p+decision key the counts, ``o``+p the checkpoint.
    """

    def __init__(
        self, db: Rdict, partition: int, settings: Settings, rules: JoinRules | None = None
    ) -> None:
        self.db = db
        self.partition = partition
        self.rules = rules if rules is not None else rules_from_settings(settings)
        self._imp_prefix = _pkey(b"i", partition)
        self._last_id: str | None = None
        self._last_raw_id = self._last_key = b""
        raw = db.get(_pkey(b"o", partition))
        self.checkpoint = _dec_ckpt.decode(raw) if raw is not None else Checkpoint(offsets={})
        # JoinStore fields; written into the checkpoint by write_batch.
        self.watermark = self.checkpoint.watermark
        self.expired_through = self.checkpoint.expired_through
        self._sweep_through: int | None = None  # forget_through, done by the next batch
        # Write-back buffer: changed impression records by RocksDB key.
        self._impressions: dict[bytes, ImpressionRecord] = {}
        self._counts: dict[str, _counts_type] = {}
        # (campaign, audience, creative, placement) -> (decision key, its counts cell)
        self._cells: dict[tuple[str, str, str, str], tuple[str, CreativeCounts]] = {}
        self._dirty_counts: set[str] = set()
        self._last_event_at: dict[str, float] = {}
        # Expiry index, one RocksDB entry per (time bucket, flush) rather than per event.
        self._expiry_index: dict[int, list[bytes]] = {}
        self._parked: dict[str, list[ParkedEvent]] = {}
        self._parked_dirty: set[str] = set()
        prefix = _pkey(b"w", partition)
        for key, value in db.items(from_key=prefix):
            if not key.startswith(prefix):
                break
            self._parked[key[len(prefix) :].decode()] = _dec_parked.decode(value)
        self.join = Join(self.rules, self)
        self._join_impression = self.join.add_impression
        self._join_attribute = self.join.attribute
        # Bounded cardinality (README: Failure modes): per campaign the audiences, per
        # campaign|audience the placements and the snapshot's size, in this partition.
        self.limits = CardinalityLimits.from_settings(settings)
        self.privacy = settings.privacy_policy()
        self._audiences: dict[str, set[str]] = {}
        self._placements: dict[str, set[str]] = {}
        self._key_bytes: dict[str, int] = {}
        prefix = _pkey(b"c", partition)
        for key in db.keys(from_key=prefix):
            if not key.startswith(prefix):
                break
            campaign, _, audience = key[len(prefix) :].decode().partition("|")
            self._audiences.setdefault(campaign, set()).add(audience)
        # ADLOOP_POLICY=contextual: counts per context cell too (streams/context.py),
        # stored under ``k``+p+decision key, written with the same batch.
        self.contexts = partition_contexts(
            settings,
            lambda key: db.get(_pkey(b"k", partition, key.encode())),
            lambda key: _pkey(b"k", partition, key.encode()),
        )

    # -- JoinStore -------------------------------------------------------------------
    def get(self, impression_id: str) -> ImpressionRecord | None:
        raw_id = impression_id.encode()
        key = self._imp_prefix + raw_id
        # The join looks an id up, then adds or updates it: encode its key once.
        self._last_id = impression_id
        self._last_raw_id = raw_id
        self._last_key = key
        found = self._impressions.get(key)
        if found is not None:
            return found
        raw = self.db.get(key)
        # Not buffered on read: only changed records go into the next write batch.
        return _dec_imp.decode(raw) if raw is not None else None

    def _key(self, impression_id: str) -> bytes:
        if impression_id is self._last_id:
            return self._last_key
        return self._imp_prefix + impression_id.encode()

    def add(self, impression_id: str, record: ImpressionRecord, bucket: int) -> None:
        if impression_id is self._last_id:
            raw_id, key = self._last_raw_id, self._last_key
        else:
            raw_id = impression_id.encode()
            key = self._imp_prefix + raw_id
        self._impressions[key] = record
        ids = self._expiry_index.get(bucket)
        if ids is None:
            ids = self._expiry_index[bucket] = []
        ids.append(raw_id)

    def update(self, impression_id: str, record: ImpressionRecord) -> None:
        self._impressions[self._key(impression_id)] = record

    def forget_through(self, bucket: int) -> None:
        self._sweep_through = bucket

    def parked(self, impression_id: str) -> list[ParkedEvent] | None:
        return self._parked.get(impression_id)

    def set_parked(self, impression_id: str, events: list[ParkedEvent]) -> None:
        if events:
            self._parked[impression_id] = events
        else:
            self._parked.pop(impression_id, None)
        self._parked_dirty.add(impression_id)

    def all_parked(self) -> Iterator[ParkedEvent]:
        for events in self._parked.values():
            yield from events

    # -- counts ------------------------------------------------------------------------
    def counts(self, key: str) -> _counts_type:
        counts = self._counts.get(key)
        if counts is None:
            raw = self.db.get(_pkey(b"c", self.partition, key.encode()))
            counts = _dec_counts.decode(raw) if raw is not None else {}
            self._counts[key] = counts
        return counts

    def _bump(self, rec: ImpressionRecord | Impression, event_time: float) -> CreativeCounts:
        ident = (rec.campaign, rec.audience, rec.creative_id, rec.placement)
        found = self._cells.get(ident)
        if found is None:
            key = decision_key(rec.campaign, rec.audience)
            by_placement = self.counts(key).setdefault(rec.creative_id, {})
            cell = by_placement.get(rec.placement)
            if cell is None:
                cell = by_placement[rec.placement] = CreativeCounts()
                self._audiences.setdefault(rec.campaign, set()).add(rec.audience)
                if key in self._placements:
                    self._placements[key].add(rec.placement)
                    self._key_bytes[key] += cell_bytes(rec.creative_id, rec.placement)
            found = self._cells[ident] = (key, cell)
        key, cell = found
        self._dirty_counts.add(key)
        if event_time > self._last_event_at.get(key, 0.0):
            self._last_event_at[key] = event_time
        return cell

    def admit(self, imp: Impression) -> str | None:
        """None when the impression's cell may be counted; else the dead-letter code
        that keeps this campaign's state (and its snapshot) inside the limits."""
        if (imp.campaign, imp.audience, imp.creative_id, imp.placement) in self._cells:
            return None
        key = decision_key(imp.campaign, imp.audience)
        audiences = self._audiences.setdefault(imp.campaign, set())
        if (
            imp.audience not in audiences
            and len(audiences) >= self.limits.max_audiences_per_campaign
        ):
            return TOO_MANY_AUDIENCES
        counts = self.counts(key)
        placements = self._placements.get(key)
        if placements is None:
            placements = self._placements[key] = {p for cells in counts.values() for p in cells}
            self._key_bytes[key] = sum(
                cell_bytes(c, pl) for c, cells in counts.items() for pl in cells
            )
        if (
            imp.placement not in placements
            and len(placements) >= self.limits.max_placements_per_audience
        ):
            return TOO_MANY_PLACEMENTS
        if imp.placement not in counts.get(imp.creative_id, {}):
            size = self._key_bytes[key] + cell_bytes(imp.creative_id, imp.placement)
            if size > self.limits.max_snapshot_bytes:
                return SNAPSHOT_TOO_LARGE
        # Nothing recorded here: _bump records the cell once the impression is counted,
        # so a refused impression leaves no trace (the same decisions after a restart).
        return None

    # -- event application: the join's outcome, counted ------------------------------------
    def add_impression(
        self,
        imp: Impression,
        offset: int,
        now_wall: float | None,
        arrival_watermark: float | None = None,
    ) -> str | None:
        """Apply an impression; returns a dead-letter reason code or None (counted)."""
        contexts = self.contexts
        cell = contexts.cell(imp) if contexts is not None else ""
        code = self._join_impression(imp, now_wall, offset, cell, arrival_watermark)
        if code is None:
            self._bump(imp, imp.timestamp).impressions += 1
            if contexts is not None:
                contexts.count_impression(imp, cell)
        return code

    def attribute(
        self,
        event: Click | Conversion,
        now_wall: float | None,
        offset: int = 0,
        original: bytes = b"",
        key: bytes | None = None,
    ) -> str | None:
        """Join a click or conversion to its impression: None when counted, else
        ``PARKED`` or a dead-letter reason code."""
        outcome = self._join_attribute(event, now_wall, offset, original, key)
        if type(outcome) is str:
            return outcome
        count_attributed(self._bump(outcome, event.timestamp), event)  # type: ignore[arg-type]
        if outcome.cell and self.contexts is not None and type(event) is Click:  # type: ignore[union-attr]
            self.contexts.count_click(outcome)
        return None

    # -- checkpointing --------------------------------------------------------------------
    def dirty(self) -> list[tuple[str, _counts_type, float]]:
        """(decision key, cumulative counts, newest event time) of keys changed since
        the last checkpoint."""
        return [
            (key, self._counts[key], self._last_event_at.get(key, 0.0))
            for key in self._dirty_counts
        ]

    def _sweep(self, batch: ChangeBatch, through: int) -> None:
        """Delete the impressions of expiry buckets <= ``through``, and their index."""
        start = _pkey(b"x", self.partition)
        stop = _pkey(b"x", self.partition, (through + 1).to_bytes(8, "big"))
        for key, value in self.db.items(from_key=start):
            if key >= stop or not key.startswith(start):
                break
            for raw_id in _dec_ids.decode(value):
                batch.delete(self._imp_prefix + raw_id)
            batch.delete(key)

    def write_batch(self, offsets: dict[str, int]) -> ChangeBatch:
        # A WriteBatch that also keeps its changes for the changelog (streams/changelog.py).
        batch = ChangeBatch(self.partition)
        self.join.sweep()
        through = self._sweep_through
        if through is None:
            through = self.expired_through
        else:
            # Deletes first: a record of an id counted again since (in a newer bucket)
            # is put below, after the delete of its forgotten predecessor.
            self._sweep(batch, through)
            self._sweep_through = None
        bucket_s = self.rules.bucket_s
        for key, rec in self._impressions.items():
            # A buffered record already behind the horizon would never be swept again.
            if int(rec.timestamp // bucket_s) > through:
                batch.put(key, _enc.encode(rec))
        self.checkpoint.flushes += 1
        for bucket, ids in self._expiry_index.items():
            if bucket <= through:
                continue
            suffix = bucket.to_bytes(8, "big") + self.checkpoint.flushes.to_bytes(8, "big")
            batch.put(_pkey(b"x", self.partition, suffix), _enc.encode(ids))
        for key in self._dirty_counts:
            batch.put(_pkey(b"c", self.partition, key.encode()), _enc.encode(self._counts[key]))
        if self.contexts is not None:
            for ckey, rows in self.contexts.changes():
                batch.put(ckey, rows)
        for impression_id in self._parked_dirty:
            wkey = _pkey(b"w", self.partition, impression_id.encode())
            events = self._parked.get(impression_id)
            if events:
                # Stored redacted (schemas/privacy.py): decoded again when the impression
                # comes, it needs the event's fields, never a personal one.
                redact = self.privacy.redact_payload
                stored = [msgspec.structs.replace(e, original=redact(e.original)) for e in events]
                batch.put(wkey, _enc.encode(stored))
            else:
                batch.delete(wkey)
        self.checkpoint.offsets.update(offsets)
        self.checkpoint.watermark = self.watermark
        self.checkpoint.expired_through = self.expired_through
        batch.put(_pkey(b"o", self.partition), _enc.encode(self.checkpoint))
        return batch

    def committed(self) -> None:
        """Forget the write-back buffer once its batch is durable."""
        self._impressions.clear()
        self._expiry_index.clear()
        self._dirty_counts.clear()
        self._parked_dirty.clear()
        self._last_event_at.clear()
        if self.contexts is not None:
            self.contexts.committed()
        # Counts stay cached: they are small and touched again soon.


#: RocksDB's memory, bounded and stated (README: Failure modes): memtables of 4 MiB, at
#: most two, and a 4 MiB block cache. Each of them fills for minutes at 2,000 events/s,
#: so the ingest's RSS climbs until they are full. Measured with the ingest's own
#: PartitionState driven in-process at the soak's mix (2,000 events/s of event time, a
#: flush per 40 events, Python objects constant): 16 + 16 MiB grew RSS 111 → 131 MiB
#: between minutes 5 and 18 (+18 %); 4 + 4 MiB held 101 → 104 MiB (96-110) at the
#: same speed. The join state itself is on disk, looked up through bloom filters.
WRITE_BUFFER_BYTES = 4 << 20
MAX_WRITE_BUFFERS = 2
BLOCK_CACHE_BYTES = 4 << 20


def open_store(path: Path) -> Rdict:
    path.mkdir(parents=True, exist_ok=True)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(MAX_WRITE_BUFFERS)
    table = BlockBasedOptions()
    table.set_block_cache(Cache(BLOCK_CACHE_BYTES))
    # Index and filter blocks inside that cache, not beside it: by default RocksDB keeps
    # them in memory per SST file, so RSS grows with the join state on disk (one hour
    # of impressions). L0's stay pinned: they are read by every lookup.
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    # Most lookups are of new ids (is this impression a duplicate?): a bloom filter
    # answers "absent" without reading a data block.
    table.set_bloom_filter(10, False)
    # ... in 4 KiB partitions under a pinned top-level index. One whole filter per SST
    # file outgrows a shard of the 4 MiB cache once a file holds ~1 M ids (2.5 MB of
    # filter at 2 M): it is then read and checked again on every lookup. Measured at
    # 2 M ids in one file, a new id's lookup took 279 µs (1.5 µs at 500 k); partitioned,
    # 1.5 µs at 2 M and 1.6 µs at 7.2 M (an hour at 2,000 events/s). In the soak the
    # ingest's CPU had climbed from 9 % to 79 % at a constant event rate.
    table.set_partition_filters(True)
    table.set_index_type(BlockBasedIndexType.two_level_index_search())
    table.set_metadata_block_size(4096)
    table.set_pin_top_level_index_and_filter(True)
    options.set_block_based_table_factory(table)
    return Rdict(str(path), options)


def ingest_consumer_kwargs(s: Settings) -> dict[str, Any]:
    """The ingest's event consumer, as configured (one place: tested)."""
    extra: dict[str, Any] = {}
    if s.session_timeout_s:
        extra["session_timeout_ms"] = int(s.session_timeout_s * 1000)
        extra["heartbeat_interval_ms"] = int((s.heartbeat_interval_s or 0.5) * 1000)
        extra["rebalance_timeout_ms"] = max(extra["session_timeout_ms"], 5000)
    return consumer_kwargs(
        s,
        group_id=s.group_id("ingest"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # Range assignment keeps partition p of every event topic on one
        # consumer: the join needs impressions and clicks co-located.
        partition_assignment_strategy=(RangePartitionAssignor,),
        fetch_max_wait_ms=s.fetch_wait_ms,
        # What one fetch may bring per partition bounds the records held in memory
        # beside the batch being counted (aiokafka keeps one answer per partition).
        # At 4 MiB the ingest's RSS followed the broker's backlog (+19-31 % over the
        # 30-minute soak); at 1 MiB +14 %.
        max_partition_fetch_bytes=s.ingest_fetch_partition_bytes,
        **extra,
    )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # The coordinator calls this while the main loop may be awaiting inside a
        # flush; the lock makes the two flushes run one after the other.
        async with self.ingest.flush_lock:
            await self.ingest.flush_now()
            gone = {tp.partition for tp in revoked}
            for p in gone:
                self.ingest.states.pop(p, None)
                self.ingest._held.discard(p)
                self.ingest._hold_from.pop(p, None)
            # Records waiting for the registry go with their partition: its next owner
            # reads them again from the checkpoint.
            self.ingest._unresolved = [
                u for u in self.ingest._unresolved if u[1].partition not in gone
            ]

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.ingest.on_assigned(assigned)


class Ingest:
    """Consumes exchange events, maintains join state, emits outcome snapshots."""

    def __init__(self, settings: Settings, registry: CreativeRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CreativeRegistry()
        self.roles = {
            settings.topic("impressions"): "impressions",
            settings.topic("clicks"): "clicks",
            settings.topic("conversions"): "conversions",
        }
        limit = settings.max_payload_bytes
        self.decoders: dict[str, RecordDecoder[Any]] = {
            "impressions": RecordDecoder(Impression, limit),
            "clicks": RecordDecoder(Click, limit),
            "conversions": RecordDecoder(Conversion, limit),
        }
        self.privacy = settings.privacy_policy()
        self.db = open_store(settings.state_dir("ingest"))
        # Replicates the store, so another instance can take its partitions over.
        self.changelog: IngestChangelog | None = None
        self.states: dict[int, PartitionState] = {}
        self.metrics = IngestMetrics()
        self._pending_offsets: dict[int, dict[str, int]] = {}
        self._dead: list[tuple[bytes | None, bytes]] = []
        self._last_flush = time.monotonic()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._follower: Follower[Creative] | None = None
        self._stopping = asyncio.Event()
        self.flush_lock = asyncio.Lock()
        self._commit_failed = False
        # Impressions naming a creative this process has not seen yet: it may have
        # been registered a moment ago, so they wait for a registry sync.
        # (state, source, record, event, wall time and partition watermark when read),
        # in the order read; _held: partitions whose records wait behind one of them.
        self._unresolved: list[tuple[PartitionState, TopicPartition, Any, Any, float, float]] = []
        self._held: set[int] = set()
        # Per held partition and role, the offset of its first waiting record: a flush
        # forced meanwhile (a rebalance) checkpoints no further.
        self._hold_from: dict[int, dict[str, int]] = {}
        self._exported: dict[tuple[str, str], int] = {}
        self._next_gauges = 0.0
        # RocksDB's threads and the fetched batches leave freed pages in the C heap
        # (streams/heap.py): handed back every 30 s, so RSS follows what is in use.
        self._trimmer = HeapTrimmer(30.0, next_at=time.monotonic() + 30.0)

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self._follower = registry_follower(s, self.registry)
        await self._follower.start()
        await self._follower.wait_caught_up()
        self._producer = AIOKafkaProducer(
            **producer_kwargs(s, acks="all", linger_ms=2, max_batch_size=262_144)
        )
        await self._producer.start()
        self.changelog = IngestChangelog(s, self.db, self._producer)
        self._consumer = AIOKafkaConsumer(**ingest_consumer_kwargs(s))
        await self._consumer.start()
        self._fetch_wait = FetchWaitGovernor(self._consumer, s.fetch_wait_ms)
        self._consumer.subscribe(list(self.roles), listener=_Rebalance(self))

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self._consumer is not None and self.changelog is not None
        # A partition's state may have been written by another instance since this
        # store last held it (or the store is new): bring it up to its changelog first.
        moved = {tp.partition for tp in assigned} - set(self.states)
        async with self.flush_lock:
            for result in await self.changelog.restore(moved):
                log.info("changelog restored", extra=dataclasses.asdict(result))
        for tp in assigned:
            state = self.states.get(tp.partition)
            if state is None:
                state = self.states[tp.partition] = PartitionState(
                    self.db, tp.partition, self.settings
                )
            role = self.roles[tp.topic]
            # A synchronous seek: seek_to_beginning() resets lazily, after the fetcher
            # may already have returned records, which then came again. Offset 0 on a
            # truncated log is out of range and resets to the earliest retained one.
            self._consumer.seek(tp, state.checkpoint.offsets.get(role, 0))
        log.info(
            "partitions assigned",
            extra={"partitions": sorted({tp.partition for tp in assigned})},
        )

    async def run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        max_records = self.settings.ingest_batch_max_events
        next_report = time.monotonic() + 30.0
        while not self._stopping.is_set():
            if time.monotonic() >= next_report:
                # Counters as a structured log line: events by kind, dead letters by reason.
                log.info("ingest counters", extra={"metrics": self.metrics.as_dict()})
                next_report = time.monotonic() + 30.0
            batches = await consumer.getmany(timeout_ms=20, max_records=max_records)
            self._fetch_wait.observe(batches)
            if batches:
                self.process(batches)
            if self._unresolved and not await self._resolve_unknown_creatives():
                # No checkpoint may pass records not yet applied: flush once they are.
                continue
            await self.flush(force=False, idle=not batches)
            self._export_metrics()
            if self._trimmer.due(time.monotonic()):
                trim_heap(collect=False)

    def _export_metrics(self) -> None:
        """Counters to Prometheus, by difference (a labelled inc() per event would cost
        more than the event's join)."""
        for kind, n in self.metrics.events.items():
            delta = n - self._exported.get(("e", kind), 0)
            if delta:
                metrics.EVENTS.labels(kind).inc(delta)
                self._exported[("e", kind)] = n
        for reason, n in self.metrics.dead_letters.items():
            delta = n - self._exported.get(("d", reason), 0)
            if delta:
                metrics.DEAD_LETTERS.labels(reason).inc(delta)
                self._exported[("d", reason)] = n
        now = time.monotonic()
        if now < self._next_gauges:
            return
        self._next_gauges = now + 1.0
        assert self._consumer is not None
        lag: Counter[str] = Counter()
        for tp in self._consumer.assignment():
            try:
                highwater = self._consumer.highwater(tp)
                position = self._pending_offsets.get(tp.partition, {}).get(self.roles[tp.topic])
                if position is None:
                    state = self.states.get(tp.partition)
                    position = state.checkpoint.offsets.get(self.roles[tp.topic], 0) if state else 0
            except (AssertionError, KeyError):
                continue
            if highwater is not None:
                lag[self.roles[tp.topic]] += max(0, highwater - position)
        for role in self.decoders:
            metrics.INGEST_LAG.labels(role).set(lag.get(role, 0))
        metrics.STATE_ENTRIES.labels("ingest", "parked").set(
            sum(s.join.parked_count for s in self.states.values())
        )
        metrics.STATE_ENTRIES.labels("ingest", "cells").set(
            sum(len(s._cells) for s in self.states.values())
        )

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        self._stopping.set()
        try:
            clients = self._producer is not None and self._consumer is not None
            if clients and not self._commit_failed:
                await self.flush(force=True)
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            if self._producer is not None:
                await self._producer.stop()
            if self._follower is not None:
                await self._follower.stop()
            self.db.close()

    # -- processing ----------------------------------------------------------------
    def process(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Apply a fetched batch. Impressions first, so in-batch clicks find them."""
        # The wall time the batch arrived at: the join's parking and, for the whole
        # batch, what "now" means (one clock read per fetch, not per event).
        now_wall = time.time()
        order = {"impressions": 0, "clicks": 1, "conversions": 2}
        for tp in sorted(batches, key=lambda tp: order[self.roles[tp.topic]]):
            records = batches[tp]
            if not records:
                continue
            role = self.roles[tp.topic]
            state = self.states.get(tp.partition)
            if state is None:  # revoked between fetch and processing
                continue
            handler = getattr(self, f"_on_{role}")
            decoder = self.decoders[role]
            pending = self._pending_offsets.setdefault(tp.partition, {})
            # Never apply a record twice, whatever the client redelivers.
            applied_until = pending.get(role, state.checkpoint.offsets.get(role, 0))
            if records[0].offset < applied_until:
                records = [r for r in records if r.offset >= applied_until]
                if not records:
                    continue
            for record in records:
                try:
                    event = decoder.decode(record.value)
                except InvalidRecord as exc:
                    self.dead_letter(tp, record, exc.code, exc.reason)
                    continue
                if not key_matches(record.key, event.impression_id):
                    reason = state.join.reason(KEY_MISMATCH, event.impression_id, key=record.key)
                    self.dead_letter(tp, record, KEY_MISMATCH, reason)
                    continue
                if tp.partition in self._held:
                    # Behind an impression that waits for the registry: everything of
                    # its partition waits too, and is applied in the order it was read.
                    self._unresolved.append((state, tp, record, event, now_wall, state.watermark))
                    self._hold_from.setdefault(tp.partition, {}).setdefault(role, record.offset)
                    continue
                handler(state, tp, record, event, now_wall)
            pending[role] = records[-1].offset + 1

    async def _resolve_unknown_creatives(self) -> bool:
        """Apply the impressions that waited for the registry; False while the registry
        cannot be read up to its end (they wait: a creative registered a moment ago
        must not be dead-lettered because a sync timed out)."""
        assert self._follower is not None
        # Under the flush lock, so a rebalance cannot checkpoint past these records
        # before they are applied.
        async with self.flush_lock:
            if not await self._follower.sync():
                log.warning(
                    "registry not in sync; impressions of unknown creatives wait",
                    extra={"waiting": len(self._unresolved)},
                )
                return False
            pending, self._unresolved = self._unresolved, []
            self._held.clear()
            self._hold_from.clear()
            for state, tp, record, event, now_wall, watermark in pending:
                if type(event) is Impression:
                    self._on_impressions(
                        state, tp, record, event, now_wall, final=True, arrival_watermark=watermark
                    )
                else:
                    self._on_attribution(state, tp, record, event, now_wall)

    def _on_impressions(
        self,
        state: PartitionState,
        tp: TopicPartition,
        record: Any,
        imp: Impression,
        now_wall: float,
        final: bool = False,
        arrival_watermark: float | None = None,
    ) -> None:
        if not is_safe_token(imp.audience):
            self.dead_letter(
                tp,
                record,
                "invalid_value",
                f"audience {imp.audience[:80]!r}: 1-128 letters, digits and _ . : @ - "
                "(no spaces, control characters or '|', the key separator)",
            )
            return
        creative = self.registry.get(imp.creative_id)
        if creative is None or creative.campaign != imp.campaign:
            if not final:
                self._unresolved.append((state, tp, record, imp, now_wall, state.watermark))
                self._held.add(tp.partition)
                self._hold_from.setdefault(tp.partition, {}).setdefault(
                    "impressions", record.offset
                )
                return
            if not self.registry.has_campaign(imp.campaign):
                self.dead_letter(
                    tp,
                    record,
                    "unknown_campaign",
                    f"campaign {imp.campaign!r} has no registered creatives",
                )
            else:
                self.dead_letter(
                    tp,
                    record,
                    "unknown_creative",
                    f"creative {imp.creative_id!r} is not registered for campaign {imp.campaign!r}",
                )
            return
        code = state.admit(imp)
        if code is not None:
            self.dead_letter(tp, record, code, self._limit_reason(code, imp))
            return
        code = state.add_impression(imp, record.offset, now_wall, arrival_watermark)
        if code is not None:
            reason = state.join.reason(
                code,
                imp.impression_id,
                kind="impression",
                timestamp=imp.timestamp,
                now_wall=now_wall,
            )
            self.dead_letter(tp, record, code, reason)
            return
        self.metrics.events["impressions"] += 1
        join = state.join
        if join.parked_count and join.has_parked(imp.impression_id):
            self._release_parked(state, tp.partition, imp.impression_id)

    def _limit_reason(self, code: str, imp: Impression) -> str:
        s = self.settings
        return {
            TOO_MANY_AUDIENCES: f"campaign {imp.campaign!r} already has "
            f"{s.max_audiences_per_campaign} audiences in this partition "
            "(ADLOOP_MAX_AUDIENCES_PER_CAMPAIGN); register or merge audiences",
            TOO_MANY_PLACEMENTS: f"{imp.campaign}|{imp.audience} already has "
            f"{s.max_placements_per_audience} placements in this partition "
            "(ADLOOP_MAX_PLACEMENTS_PER_AUDIENCE); send placement types, not page URLs",
            SNAPSHOT_TOO_LARGE: f"{imp.campaign}|{imp.audience}'s counts would exceed "
            f"{s.max_snapshot_bytes} bytes (ADLOOP_MAX_SNAPSHOT_BYTES, below the broker's "
            "message size); fewer creatives x placements per audience",
        }.get(code, code)

    def _release_parked(self, state: PartitionState, partition: int, impression_id: str) -> None:
        """The clicks/conversions that waited for an impression just counted."""
        ready, expired = state.join.take_released(impression_id)
        for parked in expired:
            self._dead_letter_parked(state, partition, parked)
        for parked in ready:
            source = TopicPartition(self.settings.topic(parked.role), partition)  # type: ignore[arg-type]
            event = self.decoders[parked.role].decode(parked.original)
            # Its event time was checked when it arrived.
            self._count_or_dead_letter(
                state,
                state.attribute(event, None),
                parked.role,
                source,
                parked.offset,
                parked.key,
                parked.original,
                event,
                None,
            )

    def _on_attribution(
        self,
        state: PartitionState,
        tp: TopicPartition,
        record: Any,
        event: Click | Conversion,
        now_wall: float,
    ) -> None:
        code = state.attribute(event, now_wall, record.offset, record.value, record.key)
        if code == PARKED:
            return
        self._count_or_dead_letter(
            state,
            code,
            self.roles[tp.topic],
            tp,
            record.offset,
            record.key,
            record.value,
            event,
            now_wall,
        )

    _on_clicks = _on_attribution
    _on_conversions = _on_attribution

    def _count_or_dead_letter(
        self,
        state: PartitionState,
        code: str | None,
        role: str,
        tp: TopicPartition,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        event: Click | Conversion,
        now_wall: float | None,
    ) -> None:
        if code is None:
            self.metrics.events[role] += 1
        else:
            reason = state.join.reason(
                code,
                event.impression_id,
                kind="click" if role == "clicks" else "conversion",
                timestamp=event.timestamp,
                now_wall=now_wall,
            )
            self._dead_letter_raw(tp, offset, key, value, code, reason)

    def _dead_letter_parked(self, state: PartitionState, partition: int, ev: ParkedEvent) -> None:
        topic = self.settings.topic(ev.role)  # type: ignore[arg-type]
        reason = state.join.reason(UNKNOWN_IMPRESSION, ev.impression_id)
        self._dead_letter_raw(
            TopicPartition(topic, partition),
            ev.offset,
            ev.key,
            ev.original,
            UNKNOWN_IMPRESSION,
            reason,
        )

    # -- dead letters -----------------------------------------------------------------
    def dead_letter(self, tp: TopicPartition, record: Any, code: str, reason: str) -> None:
        self._dead_letter_raw(tp, record.offset, record.key, record.value, code, reason)

    def _dead_letter_raw(
        self,
        tp: TopicPartition,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        code: str,
        reason: str,
    ) -> None:
        letter = DeadLetter(
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            key_b64=base64.b64encode(key).decode() if key is not None else None,
            # What is needed to diagnose, personal fields hashed (schemas/privacy.py).
            original_b64=base64.b64encode(self.privacy.redact_payload(value)).decode(),
            reason_code=code,
            reason=reason,
            failed_at=time.time(),
        )
        self.metrics.dead_letters[code] += 1
        self._dead.append((key, _json.encode(letter)))

    # -- flushing -----------------------------------------------------------------------
    async def flush(self, force: bool, idle: bool = False) -> None:
        """Flush when forced, idle, or ``ingest_batch_max_ms`` has passed since the last."""
        elapsed_ms = (time.monotonic() - self._last_flush) * 1000
        if not force and not (idle or elapsed_ms >= self.settings.ingest_batch_max_ms):
            return
        async with self.flush_lock:
            await self.flush_now()

    async def flush_now(self) -> None:
        """Publish snapshots and dead letters, then checkpoint state + offsets atomically.

        Callers hold ``flush_lock``.
        """
        assert self._producer is not None and self._consumer is not None
        now = time.monotonic()
        wall = time.time()
        for p, state in self.states.items():
            tp = TopicPartition(self.settings.topic("impressions"), p)
            for ev in state.join.expire_parked(wall, self._caught_up(tp)):
                self._dead_letter_parked(state, p, ev)
                # A checkpoint for p even without new input: the parked set changed.
                self._pending_offsets.setdefault(p, {})
        if not self._pending_offsets and not self._dead:
            self._last_flush = now
            return
        futures = []
        outcomes = self.settings.topic("outcomes")
        for key, snapshot in self._snapshots(wall).items():
            for value in split_snapshot(snapshot, self.settings.max_snapshot_bytes):
                futures.append(await self._producer.send(outcomes, value, key=key.encode()))
                self.metrics.snapshots += 1
        dlq = self.settings.topic("dead_letter")
        for key, value in self._dead:
            futures.append(await self._producer.send(dlq, value, key=key))
        for p, first_waiting in self._hold_from.items():
            offsets = self._pending_offsets.get(p)
            if offsets is not None:
                for role, offset in first_waiting.items():
                    offsets[role] = min(offsets.get(role, offset), offset)
        batches = {
            p: state.write_batch(offsets)
            for p, offsets in self._pending_offsets.items()
            if (state := self.states.get(p)) is not None
        }
        # Outputs and state changes acknowledged, then the checkpoints, then the local
        # store: see streams/changelog.py for why that order is atomic on replay.
        assert self.changelog is not None
        # A commit that fails half-way leaves the state objects past what was committed
        # (their batches were built): no second flush from them, the process restarts.
        self._commit_failed = True
        await self.changelog.commit(futures, batches)
        self._commit_failed = False
        for p in batches:
            self.states[p].committed()
        self._pending_offsets.clear()
        self._dead.clear()
        self._last_flush = time.monotonic()
        self.metrics.flushes += 1

    def _snapshots(self, now: float) -> dict[str, OutcomeSnapshot]:
        """One snapshot per changed key, with every changed source partition in it."""
        snapshots: dict[str, OutcomeSnapshot] = {}
        for p in self._pending_offsets:
            state = self.states.get(p)
            if state is None:
                continue
            for key, counts, last_event_at in state.dirty():
                snapshot = snapshots.get(key)
                if snapshot is None:
                    campaign, _, audience = key.partition("|")
                    snapshot = snapshots[key] = OutcomeSnapshot(
                        campaign=campaign, audience=audience, sources={}, emitted_at=now
                    )
                snapshot.sources[p] = counts
                snapshot.last_event_at = max(snapshot.last_event_at, last_event_at)
                if state.contexts is not None:
                    snapshot.contexts[p] = state.contexts.snapshot_rows(key, now)
        return snapshots

    def _caught_up(self, tp: TopicPartition) -> bool:
        assert self._consumer is not None
        try:
            highwater = self._consumer.highwater(tp)
        except (AssertionError, KeyError):
            return False
        position = self._pending_offsets.get(tp.partition, {}).get("impressions")
        if position is None:
            state = self.states.get(tp.partition)
            position = state.checkpoint.offsets.get("impressions", 0) if state else 0
        return highwater is not None and position >= highwater


def split_snapshot(snapshot: OutcomeSnapshot, max_bytes: int) -> list[bytes]:
    """The snapshot as one message, or one per source partition when together they
    would exceed ``max_bytes`` (the worker keeps the latest snapshot per source
    partition, so the parts mean the same as the whole). One partition's counts stay
    under the limit by the cardinality limits (``PartitionState.admit``)."""
    whole = _json.encode(snapshot)
    if len(whole) <= max_bytes or len(snapshot.sources) == 1:
        return [whole]
    return [
        _json.encode(msgspec.structs.replace(snapshot, sources={p: counts}))
        for p, counts in snapshot.sources.items()
    ]


async def run_ingest(settings: Settings) -> None:
    metrics.serve_metrics(settings.metrics_host, settings.metrics_port, "ingest")
    ingest = Ingest(settings)
    install_shutdown_signals(ingest.request_stop, loop=asyncio.get_running_loop())
    await ingest.start()
    # The hot loop allocates a few objects per event, none in cycles: move start-up
    # objects out of the collector's way and collect young objects less often
    # (measured: +15-20 % events/s over the default threshold of 700).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    log.info("ingest running", extra={"group": settings.group_id("ingest")})
    try:
        await ingest.run()
    finally:
        await ingest.stop()
        log.info("ingest stopped", extra={"metrics": ingest.metrics.as_dict()})

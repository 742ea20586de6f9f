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
from rocksdict import Options, Rdict, WriteBatch

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
from adloop.streams.broker import install_shutdown_signals
from adloop.streams.config import Settings
from adloop.streams.context import partition_contexts
from adloop.streams.follower import Follower
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
            found = self._cells[ident] = (key, cell)
        key, cell = found
        self._dirty_counts.add(key)
        if event_time > self._last_event_at.get(key, 0.0):
            self._last_event_at[key] = event_time
        return cell

    # -- event application: the join's outcome, counted ------------------------------------
    def add_impression(self, imp: Impression, offset: int, now_wall: float | None) -> str | None:
        """Apply an impression; returns a dead-letter reason code or None (counted)."""
        contexts = self.contexts
        cell = contexts.cell(imp) if contexts is not None else ""
        code = self._join_impression(imp, now_wall, offset, cell)
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

    def _sweep(self, batch: WriteBatch, through: int) -> None:
        """Delete the impressions of expiry buckets <= ``through``, and their index."""
        start = _pkey(b"x", self.partition)
        stop = _pkey(b"x", self.partition, (through + 1).to_bytes(8, "big"))
        for key, value in self.db.items(from_key=start):
            if key >= stop or not key.startswith(start):
                break
            for raw_id in _dec_ids.decode(value):
                batch.delete(self._imp_prefix + raw_id)
            batch.delete(key)

    def write_batch(self, offsets: dict[str, int]) -> WriteBatch:
        batch = WriteBatch(raw_mode=True)
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
                batch.put(wkey, _enc.encode(events))
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


def open_store(path: Path) -> Rdict:
    path.mkdir(parents=True, exist_ok=True)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    return Rdict(str(path), options)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # The coordinator calls this while the main loop may be awaiting inside a
        # flush; the lock makes the two flushes run one after the other.
        async with self.ingest.flush_lock:
            await self.ingest.flush_now()
            for p in {tp.partition for tp in revoked}:
                self.ingest.states.pop(p, None)

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
        self.db = open_store(settings.data_dir / "ingest")
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
        # Impressions naming a creative this process has not seen yet: it may have
        # been registered a moment ago, so they wait for a registry sync.
        self._unresolved: list[tuple[PartitionState, TopicPartition, Any, Impression, float]] = []

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
        extra: dict[str, Any] = {}
        if s.session_timeout_s:
            extra["session_timeout_ms"] = int(s.session_timeout_s * 1000)
            extra["heartbeat_interval_ms"] = int((s.heartbeat_interval_s or 0.5) * 1000)
            extra["rebalance_timeout_ms"] = max(extra["session_timeout_ms"], 5000)
        self._consumer = AIOKafkaConsumer(
            **consumer_kwargs(
                s,
                group_id=s.group_id("ingest"),
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                # Range assignment keeps partition p of every event topic on one
                # consumer: the join needs impressions and clicks co-located.
                partition_assignment_strategy=(RangePartitionAssignor,),
                fetch_max_wait_ms=s.fetch_wait_ms,
                max_partition_fetch_bytes=4 * 1024 * 1024,
                **extra,
            )
        )
        await self._consumer.start()
        self._fetch_wait = FetchWaitGovernor(self._consumer, s.fetch_wait_ms)
        self._consumer.subscribe(list(self.roles), listener=_Rebalance(self))

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self._consumer is not None
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
            if self._unresolved:
                await self._resolve_unknown_creatives()
            await self.flush(force=False, idle=not batches)

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        self._stopping.set()
        try:
            if self._producer is not None and self._consumer is not None:
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
                handler(state, tp, record, event, now_wall)
            pending[role] = records[-1].offset + 1

    async def _resolve_unknown_creatives(self) -> None:
        assert self._follower is not None
        # Under the flush lock, so a rebalance cannot checkpoint past these records
        # before they are applied.
        async with self.flush_lock:
            await self._follower.sync()
            pending, self._unresolved = self._unresolved, []
            for state, tp, record, imp, now_wall in pending:
                self._on_impressions(state, tp, record, imp, now_wall, final=True)

    def _on_impressions(
        self,
        state: PartitionState,
        tp: TopicPartition,
        record: Any,
        imp: Impression,
        now_wall: float,
        final: bool = False,
    ) -> None:
        if "|" in imp.audience:
            self.dead_letter(
                tp,
                record,
                "invalid_value",
                f"audience {imp.audience!r} contains '|', the key separator",
            )
            return
        creative = self.registry.get(imp.creative_id)
        if creative is None or creative.campaign != imp.campaign:
            if not final:
                self._unresolved.append((state, tp, record, imp, now_wall))
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
        code = state.add_impression(imp, record.offset, now_wall)
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
            original_b64=base64.b64encode(value or b"").decode(),
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
            futures.append(
                await self._producer.send(outcomes, _json.encode(snapshot), key=key.encode())
            )
            self.metrics.snapshots += 1
        dlq = self.settings.topic("dead_letter")
        for key, value in self._dead:
            futures.append(await self._producer.send(dlq, value, key=key))
        if futures:
            await asyncio.gather(*futures)
        for p, offsets in self._pending_offsets.items():
            state = self.states.get(p)
            if state is None:
                continue
            self.db.write(state.write_batch(offsets))
            state.committed()
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


async def run_ingest(settings: Settings) -> None:
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

"""CTR training data from the Kafka topics, labelled by adloop's counting rules.

``read_kafka_log`` reads the impressions, clicks and creatives topics of a running
deployment and builds ``generator.train_ctr``'s ``ImpressionLog``: one row per impression
the ingest would count, clicked when the ingest would count a click on it
(``streams/join.py``: the key contract, first impression per id, one click within the
attribution window and not before its impression beyond the clock skew, the
retention), with the text of the latest creative record per creative_id.

The events are joined per partition, as the ingest joins them, in event-time order
(impressions before clicks at equal times): the order the ingest sees them in, near
enough, since each partition is read as it was written. A reader of history does not
know the wall time the events arrived at, so the wall-clock rules (event times within
the skew/age bounds of the clock, a parked click's wait ending in wall time) are not
applied: where the ingest dead-lettered an event by them, this reader may count it.

``train_ctr`` is the ``adloop train-ctr`` command, assembled here: the generator's
command with the deployment's settings and this reader (``generator`` never imports
``adloop.streams``). torch loads only when the command runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adloop.generator.ctr_cli import TrainCtrSetup, train_ctr_command
from adloop.schemas import Click, Creative, Impression, InvalidRecord, RecordDecoder
from adloop.streams.join import (
    CLICKED,
    KEY_MISMATCH,
    ImpressionRecord,
    Join,
    JoinRules,
    MemoryStore,
    key_matches,
    reason,
    rules_from_settings,
)

if TYPE_CHECKING:
    from adloop.generator.train_ctr import ImpressionLog
    from adloop.streams.config import Settings

log = logging.getLogger("adloop.ctr")

# Parked clicks whose impression never came are dropped this often (in events): a
# bounded read (--recent) meets many clicks on impressions it did not read.
_EXPIRE_EVERY = 10_000


def _true_end_offsets(settings: Settings, listed: dict[Any, int]) -> dict[Any, int]:
    """End offsets as a fetch reports them (the embedded broker lists less, see
    ``streams.kafka_io.fetched_end_offsets``)."""
    from aiokafka.structs import TopicPartition as AioTopicPartition

    from adloop.streams.kafka_io import consumer_kwargs, fetched_end_offsets

    by_aio = {AioTopicPartition(tp.topic, tp.partition): tp for tp in listed}
    fetched = asyncio.run(
        fetched_end_offsets(
            consumer_kwargs(settings), {aio: listed[tp] for aio, tp in by_aio.items()}
        )
    )
    return {tp: fetched[aio] for aio, tp in by_aio.items()}


def _read_topic(
    settings: Settings, topic: str, deadline: float, recent: int | None = None
) -> Iterator[Any]:
    """Every record of ``topic`` from the beginning (or the latest ``recent`` records,
    spread over its partitions) to the end offsets as a fetch reports them when the
    read starts (the embedded broker's ListOffsets understates them, see
    DEVELOPERS.md)."""
    from kafka import KafkaConsumer, TopicPartition

    from adloop.streams.kafka_io import kafka_python_kwargs

    consumer = KafkaConsumer(
        **kafka_python_kwargs(
            KafkaConsumer, settings, enable_auto_commit=False, group_id=None, max_poll_records=5000
        )
    )
    try:
        consumer.topics()  # fetch metadata
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        if not partitions:
            log.warning("topic has no partitions", extra={"topic": topic})
            return
        parts = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = _true_end_offsets(settings, consumer.end_offsets(parts))
        if recent is not None:
            starts = consumer.beginning_offsets(parts)
            per_partition = math.ceil(recent / len(parts))
            for tp in parts:
                consumer.seek(tp, max(starts[tp], ends[tp] - per_partition))
        # Up to the ends taken now: a live topic keeps growing, so "read until it goes
        # quiet" never ended while the exchange was sending (a scheduled retraining
        # read the clicks topic for 10 minutes).
        while time.monotonic() < deadline:
            if all(consumer.position(tp) >= ends[tp] for tp in parts):
                return
            for records in consumer.poll(timeout_ms=200).values():
                yield from records
        raise TimeoutError(f"reading {topic} did not reach its end in time")
    finally:
        consumer.close()


def read_kafka_log(
    settings: Settings,
    *,
    timeout_s: float = 1800.0,
    records: Callable[[str], Iterable[Any]] | None = None,
    recent: int | None = None,
) -> ImpressionLog:
    """Impressions from the impressions topic that the ingest would count, clicked when
    it would count a click on them, with the text of the latest creative record per
    creative_id.

    ``recent``: only the latest N impressions (all clicks and creatives are read; they
    are few). Reading a whole topic grows with its history; a scheduled retraining
    needs a bounded read, and recent traffic is what the next variants will meet.

    ``records(topic)`` may replace the Kafka reader (tests)."""
    from adloop.generator.train_ctr import ExportError, LogBuilder, RowKey

    deadline = time.monotonic() + timeout_s

    def read(role: str) -> Iterable[Any]:
        topic = settings.topic(role)  # type: ignore[arg-type]
        if records is not None:
            return records(topic)
        window = recent if role == "impressions" else None
        return _read_topic(settings, topic, deadline, window)

    rules = rules_from_settings(settings)
    limit = settings.max_payload_bytes
    builder = LogBuilder(source=f"kafka:{settings.topic('impressions')}")
    # Impressions first, then clicks and creatives: clicks on the latest impressions
    # arrive after them, and a clicks read that ended before the impressions read
    # left the newest impressions (the validation split) without their clicks.
    impression_decoder = RecordDecoder(Impression, limit)
    impressions: list[tuple[str, int, Impression]] = []
    for record in read("impressions"):
        where = f"{record.topic}/{record.partition}@{record.offset}"
        builder.rows_read += 1
        try:
            imp = impression_decoder.decode(record.value)
        except InvalidRecord as exc:
            builder.bad(where, f"{exc.code}: {exc.reason}")
            continue
        if not key_matches(record.key, imp.impression_id):
            text = reason(KEY_MISMATCH, rules, imp.impression_id, key=record.key)
            builder.bad(where, f"{KEY_MISMATCH}: {text}")
            continue
        impressions.append((where, record.partition, imp))
    creatives: dict[str, Creative] = {}
    decoder = RecordDecoder(Creative, limit)
    for record in read("creatives"):
        if record.value is None:  # tombstone: creative deleted
            creatives.pop(record.key.decode() if record.key else "", None)
            continue
        try:
            creative = decoder.decode(record.value)
        except InvalidRecord:
            continue  # the registry dead-letters these; nothing to learn from them
        creatives[creative.creative_id] = creative
    read_ids = {imp.impression_id for _, _, imp in impressions}
    clicks: list[tuple[int, Click]] = []
    click_decoder = RecordDecoder(Click, limit)
    for record in read("clicks"):
        try:
            click = click_decoder.decode(record.value)
        except InvalidRecord:
            continue
        # A click on an impression this read does not hold can label nothing.
        if click.impression_id in read_ids and key_matches(record.key, click.impression_id):
            clicks.append((record.partition, click))

    labelled = _join(rules, impressions, clicks, creatives, builder)
    for where, imp, counted, creative in labelled:
        key = RowKey(
            imp.campaign,
            imp.creative_id,
            imp.audience,
            imp.placement,
            creative.headline,
            creative.description,
        )
        clicked = bool(counted.flags & CLICKED)
        builder.add(imp.impression_id, key, imp.timestamp, clicked, where=where)
    result = builder.build()
    if result.bad_rows:
        reasons: dict[str, int] = {}
        for bad in result.bad_rows:
            code = bad.reason.split(" ", 1)[0].rstrip(":")
            reasons[code] = reasons.get(code, 0) + 1
        log.warning(
            "skipped impressions",
            extra={"reasons": reasons, "first": [str(b) for b in result.bad_rows[:5]]},
        )
    log.info(
        "read impressions from kafka",
        extra={
            "impressions": len(result),
            "clicks": int(result.clicked.sum()),
            "creatives": len(creatives),
            "skipped": len(result.bad_rows),
        },
    )
    if not len(result):
        raise ExportError(f"{builder.source}: no usable impressions")
    return result


def _join(
    rules: JoinRules,
    impressions: list[tuple[str, int, Impression]],
    clicks: list[tuple[int, Click]],
    creatives: dict[str, Creative],
    builder: Any,
) -> list[tuple[str, Impression, ImpressionRecord, Creative]]:
    """The impressions the ingest would count, each with its join record (whose flags
    say whether a click counted), in event-time order; the others go to ``builder.bad``.
    One join per partition (ids are partitioned by their key, the impression_id)."""
    joins: dict[int, Join] = {}
    # (event time, impressions before clicks, read order) -> index into its list.
    order = sorted(
        [(imp.timestamp, 0, i) for i, (_, _, imp) in enumerate(impressions)]
        + [(click.timestamp, 1, i) for i, (_, click) in enumerate(clicks)]
    )
    labelled: list[tuple[str, Impression, ImpressionRecord, Creative]] = []
    for n, (_, is_click, i) in enumerate(order, start=1):
        partition = clicks[i][0] if is_click else impressions[i][1]
        join = joins.get(partition)
        if join is None:
            join = joins[partition] = Join(rules, MemoryStore())
        if is_click:
            # Parked with its index as offset, so a release finds the click again.
            join.attribute(clicks[i][1], None, offset=i)
        else:
            where, _, imp = impressions[i]
            creative = creatives.get(imp.creative_id)
            if creative is None or creative.campaign != imp.campaign:
                builder.bad(where, f"unknown_creative {imp.creative_id!r}: no text to learn from")
                continue
            code = join.add_impression(imp, None)
            if code is not None:
                builder.bad(where, f"{code}: {join.reason(code, imp.impression_id)}")
                continue
            counted = join.store.get(imp.impression_id)
            assert counted is not None
            labelled.append((where, imp, counted, creative))
            if join.has_parked(imp.impression_id):
                ready, _expired = join.take_released(imp.impression_id)
                for parked in ready:
                    join.attribute(clicks[parked.offset][1], None)
        if n % _EXPIRE_EVERY == 0:
            for each in joins.values():
                each.expire_parked(None, caught_up=False)
    return labelled


# --- the train-ctr command, assembled --------------------------------------------------------


def train_ctr_setup(
    *,
    from_kafka: bool,
    broker: str | None,
    topic_prefix: str | None,
    models_dir: Path | None,
    data_dir: Path | None,
    log_level: str | None,
) -> TrainCtrSetup:
    """What ``adloop train-ctr`` needs from the deployment: its settings (flags over
    ``ADLOOP_*``), where model versions go, and this module's Kafka reader."""
    import click
    from pydantic import ValidationError

    from adloop.log_setup import configure_logging
    from adloop.streams.config import load_settings

    configure_logging(log_level)
    try:
        settings = load_settings(
            broker=broker, topic_prefix=topic_prefix, models_dir=models_dir, data_dir=data_dir
        )
    except ValidationError as exc:
        raise click.UsageError(f"invalid configuration:\n{exc}") from None
    if from_kafka and not settings.broker:
        raise click.UsageError(
            "adloop train-ctr --from-kafka reads a running deployment's topics: set "
            "--broker/ADLOOP_BROKER (an embedded broker would start empty)"
        )

    def read_kafka(recent: int | None) -> ImpressionLog:
        return read_kafka_log(settings, recent=recent)

    return TrainCtrSetup(
        models_dir=settings.models_dir or settings.data_dir / "models",
        backbone=settings.ctr_backbone,
        read_kafka=read_kafka,
    )


train_ctr = train_ctr_command(train_ctr_setup)

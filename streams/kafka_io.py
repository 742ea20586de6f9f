"""Thin constructors for Kafka clients, so every setting in Settings reaches them.

Pass-through options (ADLOOP_KAFKA_OPTIONS) are offered to every client; each
client takes the ones its constructor accepts, so a producer-only option such
as ``linger_ms`` does not break a consumer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Collection, Mapping
from functools import cache
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from adloop.streams.config import Settings

log = logging.getLogger("adloop.kafka")


@cache
def _accepted(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


def _filtered(cls: type, settings: Settings, overrides: dict[str, Any]) -> dict[str, Any]:
    accepted = _accepted(cls)
    kwargs = {k: v for k, v in settings.kafka_client_kwargs().items() if k in accepted}
    # Explicit call-site values are defaults; user pass-through options win.
    merged = {**overrides, **kwargs}
    merged.update({k: v for k, v in settings.kafka_options.items() if k in accepted})
    return merged


def consumer_kwargs(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return _filtered(AIOKafkaConsumer, settings, overrides)


def producer_kwargs(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return _filtered(AIOKafkaProducer, settings, overrides)


def kafka_python_kwargs(cls: type, settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Same, for kafka-python clients (KafkaProducer, KafkaConsumer, KafkaAdminClient).

    kafka-python takes its configuration as ``**configs``, so filter on its
    ``DEFAULT_CONFIG`` table instead of the signature.
    """
    accepted = frozenset(getattr(cls, "DEFAULT_CONFIG", {}))
    base = {k: v for k, v in settings.kafka_client_kwargs().items() if k in accepted}
    return {**overrides, **base}


async def fetched_end_offsets(
    client_kwargs: dict[str, Any],
    listed: Mapping[TopicPartition, int],
    timeout_s: float = 30.0,
) -> dict[TopicPartition, int]:
    """``listed`` end offsets, raised to the high watermark a fetch reports.

    Tansu 0.6 (the embedded broker) answers ListOffsets(latest) with the base
    offset of a partition's last record batch + 1, not the offset after its last
    record, while its fetch responses carry the right high watermark. Anything that
    compares a position with an end offset (Faust's changelog recovery) needs the
    right one, so fetch from the last listed offset and read the high watermark.
    On Kafka the two agree and this changes nothing. A partition whose fetch did not
    answer within ``timeout_s`` keeps its listed end (logged as a warning).
    """
    result = dict(listed)
    # Faust passes its own TP tuples; aiokafka wants its TopicPartition.
    pending = {TopicPartition(tp.topic, tp.partition): tp for tp, end in listed.items() if end > 0}
    if not pending:
        return result
    consumer = AIOKafkaConsumer(**{**client_kwargs, "group_id": None, "enable_auto_commit": False})
    await consumer.start()
    try:
        consumer.assign(list(pending))
        for tp, key in pending.items():
            consumer.seek(tp, listed[key] - 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while pending and loop.time() < deadline:
            await consumer.getmany(*pending, timeout_ms=200)
            for tp in list(pending):
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    key = pending.pop(tp)
                    result[key] = max(result[key], highwater)
    finally:
        await consumer.stop()
    if pending:
        log.warning(
            "no fetch answered in time: listed end offsets kept",
            extra={"partitions": sorted(str(tp) for tp in pending), "timeout_s": timeout_s},
        )
    return result


def partition_lags(consumer: Any) -> dict[TopicPartition, int]:
    """Records behind the high watermark, per assigned partition with a known position.

    aiokafka keeps positions and high watermarks in its subscription state; reading
    them there is synchronous (``consumer.position()`` may block)."""
    subscription = consumer._subscription.subscription
    assignment = subscription.assignment if subscription is not None else None
    if assignment is None:
        return {}
    lags = {}
    for tp in assignment.tps:
        state = assignment.state_value(tp)
        if state.has_valid_position and state.highwater is not None:
            lags[tp] = state.highwater - state.position
    return lags


class FetchWaitGovernor:
    """Lengthens a consumer's fetch wait while fetches come back empty behind the end.

    Tansu's memory engine (the embedded broker) answers a fetch with the batches it
    could read before ``max_wait_ms`` ran out, and finding a batch costs time that
    grows with the number of batches in the partition (measured: ~2 ms at 1,000
    batches, ~50 ms at 30,000). With a short wait, a partition that grew past that
    point was answered empty forever while records waited behind it: the ingest
    stalled. This doubles the wait whenever a partition with a lag delivered nothing
    for ``patience`` polls in a row (up to ``ceiling_ms``), and eases it back towards
    ``floor_ms`` (by 10 % a poll) when no partition lags. On Kafka, which answers as
    soon as data is there, a lagging partition delivers on its next fetch and the
    wait never moves.

    ``lags`` returns the lag per partition after a poll (default: read from the
    aiokafka consumer's subscription state, :func:`partition_lags`).
    """

    def __init__(
        self,
        consumer: Any,
        floor_ms: int,
        ceiling_ms: int = 2000,
        patience: int = 3,
        lags: Callable[[], Mapping[Any, int]] | None = None,
    ) -> None:
        self.consumer = consumer
        self.floor_ms = floor_ms
        self.ceiling_ms = max(ceiling_ms, floor_ms)
        self.patience = patience
        self.wait_ms = floor_ms
        self._lags = lags if lags is not None else (lambda: partition_lags(consumer))
        self._starved: dict[Any, int] = {}

    def observe(self, records: Mapping[Any, Any], among: Collection[Any] | None = None) -> None:
        """Call after each poll with what it returned.

        ``among``: the partitions that poll asked for, when it asked for fewer than are
        assigned. Faust keeps its tables' changelog partitions assigned but returns
        their records only while recovering; their lag grows with every table write,
        and counting them as starved drove the worker's wait to the ceiling (click ->
        decision ~1 s on the embedded broker).
        """
        lags = self._lags()
        lagging = {tp for tp, lag in lags.items() if lag > 0 and (among is None or tp in among)}
        for tp in list(self._starved):
            if tp not in lagging or records.get(tp):
                del self._starved[tp]
        for tp in lagging:
            if not records.get(tp):
                self._starved[tp] = self._starved.get(tp, 0) + 1
        if self._starved and max(self._starved.values()) >= self.patience:
            # max(.., 1): a floor of 0 ms must still be able to grow.
            self._set(min(max(self.wait_ms * 2, 1), self.ceiling_ms))
            self._starved.clear()
        elif not lagging and self.wait_ms > self.floor_ms:
            self._set(max(self.floor_ms, int(self.wait_ms * 0.9)))

    def _set(self, wait_ms: int) -> None:
        self.wait_ms = wait_ms
        fetcher = getattr(self.consumer, "_fetcher", None)
        if fetcher is not None:  # read when the next fetch request is built
            fetcher._fetch_max_wait_ms = wait_ms


def librdkafka_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Settings as a librdkafka (confluent-kafka) configuration: the same broker,
    security protocol, SASL login and TLS files as every adloop client. The bench's
    exchange uses it: a foreign client, as an exchange's would be. ``kafka_options``
    are aiokafka keyword arguments and are not translated; ``overrides`` take
    librdkafka's names (``linger.ms``) and lose to nothing."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "security.protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism:
        config["sasl.mechanism"] = settings.sasl_mechanism
        config["sasl.username"] = settings.sasl_username
        config["sasl.password"] = settings.sasl_password
    tls_files = {
        "ssl.ca.location": settings.ssl_cafile,
        "ssl.certificate.location": settings.ssl_certfile,
        "ssl.key.location": settings.ssl_keyfile,
    }
    config.update({k: v for k, v in tls_files.items() if v})
    config.update(overrides)
    return config

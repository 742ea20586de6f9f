"""A Faust transport for the embedded broker: fetch wait and end offsets fixed.

The fetch wait also adapts (``FetchWaitGovernor``) when the broker answers empty
fetches behind the end, as Tansu does once a partition holds many batches.

Faust's aiokafka driver hard-codes ``fetch_max_wait_ms=1500``. Kafka answers a
fetch as soon as data arrives, so that is harmless there; the embedded Tansu
broker answers only when the wait expires, which added ~750 ms on average to
every outcome reaching the posterior table. This driver is the stock one with
that single value replaced; it is registered under the ``adloop-kafka`` URL
scheme and used only when the setting is given.

It also corrects the end offsets Faust's changelog recovery compares with the
offset persisted in RocksDB: Tansu 0.6 lists the base offset of a partition's last
record batch + 1 as its end, so after a crash whose last changelog batch held
several records, Faust stopped with ``ConsistencyError`` ("persisted offset ...
is higher than the last offset in that topic"), or recovered too little.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer, Transport
from faust.types import TP

from adloop.streams.kafka_io import FetchWaitGovernor, fetched_end_offsets

SCHEME = "adloop-kafka"


class _FetchWaitConsumerThread(AIOKafkaConsumerThread):
    fetch_max_wait_ms: ClassVar[int] = 1500
    client_kwargs: ClassVar[dict[str, Any]] = {}

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when start() builds its Fetcher.
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        self._fetch_wait = FetchWaitGovernor(consumer, self.fetch_max_wait_ms)
        return consumer

    async def _fetch_records(
        self, consumer: Any, active_partitions: set[TP], *args: Any, **kwargs: Any
    ) -> Any:
        records = await super()._fetch_records(consumer, active_partitions, *args, **kwargs)
        # Only the partitions Faust asked for: its tables' changelogs stay assigned
        # (and lag behind the table's own writes) but are read only while recovering.
        self._fetch_wait.observe(records, among=active_partitions)
        return records

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        listed = await super()._highwaters(partitions)
        if self.consumer.in_transaction or not self.client_kwargs:
            return listed
        return await fetched_end_offsets(self.client_kwargs, listed)  # type: ignore[arg-type]


class _FetchWaitConsumer(Consumer):
    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return _FetchWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)


class FetchWaitTransport(Transport):
    Consumer = _FetchWaitConsumer


def register(fetch_max_wait_ms: int, client_kwargs: dict[str, Any]) -> str:
    """Register the transport; returns the URL scheme to use in ``broker=``.

    ``client_kwargs`` connect a short-lived consumer that checks end offsets.
    """
    _FetchWaitConsumerThread.fetch_max_wait_ms = fetch_max_wait_ms
    _FetchWaitConsumerThread.client_kwargs = client_kwargs
    TRANSPORTS.aliases[SCHEME] = f"{__name__}:FetchWaitTransport"
    return SCHEME

"""A Faust transport whose consumer honours ``Settings.fetch_max_wait_ms``.

Faust's aiokafka driver hard-codes ``fetch_max_wait_ms=1500``. Kafka answers a
fetch as soon as data arrives, so that is harmless there; the embedded Tansu
broker answers only when the wait expires, which added ~750 ms on average to
every outcome reaching the posterior table. This driver is the stock one with
that single value replaced; it is registered under the ``adloop-kafka`` URL
scheme and used only when the setting is given.
"""

from __future__ import annotations

from typing import Any, ClassVar

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer, Transport

SCHEME = "adloop-kafka"


class _FetchWaitConsumerThread(AIOKafkaConsumerThread):
    fetch_max_wait_ms: ClassVar[int] = 1500

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when start() builds its Fetcher.
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer


class _FetchWaitConsumer(Consumer):
    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return _FetchWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)


class FetchWaitTransport(Transport):
    Consumer = _FetchWaitConsumer


def register(fetch_max_wait_ms: int) -> str:
    """Register the transport; returns the URL scheme to use in ``broker=``."""
    _FetchWaitConsumerThread.fetch_max_wait_ms = fetch_max_wait_ms
    TRANSPORTS.aliases[SCHEME] = f"{__name__}:FetchWaitTransport"
    return SCHEME

"""Thin constructors for Kafka clients, so every setting in Settings reaches them.

Pass-through options (ADLOOP_KAFKA_OPTIONS) are offered to every client; each
client takes the ones its constructor accepts, so a producer-only option such
as ``linger_ms`` does not break a consumer.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams.config import Settings


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

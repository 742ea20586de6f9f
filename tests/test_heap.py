"""Memory bounds of the roles: streams/heap.py (the C heap's arena cap and trim, and the
trim's timing) and what the ingest may fetch ahead."""

from __future__ import annotations

import pytest

from adloop.streams import heap


def test_trimmer_is_due_once_per_interval() -> None:
    trimmer = heap.HeapTrimmer(30.0, next_at=100.0)
    assert not trimmer.due(99.9)
    assert trimmer.due(100.0)
    assert not trimmer.due(129.9)
    assert trimmer.due(130.0)
    # A late turn does not make the next one due at once.
    assert trimmer.due(500.0)
    assert not trimmer.due(529.0)


def test_an_operator_malloc_arena_max_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert heap.limit_arenas(2) is False


@pytest.mark.skipif(heap._glibc() is None, reason="glibc only")
def test_arena_cap_and_trim_apply_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert heap.limit_arenas(heap.DEFAULT_ARENAS) is True
    blocks = [bytearray(1 << 16) for _ in range(256)]
    del blocks
    heap.trim_heap(collect=True)
    heap.trim_heap(collect=False)


def test_the_ingest_fetches_at_most_the_configured_bytes_per_partition() -> None:
    """What aiokafka holds besides the batch being counted is one fetch answer per
    partition: the setting bounds it, and the default is 1 MiB."""
    import asyncio

    from aiokafka import AIOKafkaConsumer

    from adloop.streams.config import Settings
    from adloop.streams.ingest import ingest_consumer_kwargs

    assert Settings(broker="kafka://k:9092").ingest_fetch_partition_bytes == 1 << 20
    settings = Settings(broker="kafka://k:9092", ingest_fetch_partition_bytes=256 << 10)
    kwargs = ingest_consumer_kwargs(settings)
    assert kwargs["max_partition_fetch_bytes"] == 256 << 10

    async def build() -> AIOKafkaConsumer:  # aiokafka takes every keyword (no connection)
        return AIOKafkaConsumer(**kwargs)

    asyncio.run(build())

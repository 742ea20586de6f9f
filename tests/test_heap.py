"""streams/heap.py: the C heap's arena cap and trim (glibc), and the trim's timing."""

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

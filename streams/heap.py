"""The C heap of a role process: glibc's malloc, with its arenas bounded and its free
pages handed back.

glibc keeps what a process frees: a thread's arena stays at its high-water mark, and
with the dynamic mmap threshold large buffers (fetch responses, RocksDB blocks) come
from the heap and leave holes. Measured on the ingest at the soak's traffic (2,000
events/s, 16 minutes, ``malloc_stats``): a RocksDB background thread's arena held
20 MiB with nothing in use, the main arena 44 MiB for 25 MiB in use, and the malloc
heap grew 26 → 61 MiB while what was in use stayed at 19-28 MiB. With two arenas and
a trim every 30 s it grew 24 → 49 MiB (``README.md``: Failure modes, memory bounds).

Every function is a no-op off glibc (musl, macOS): the heap is then the platform's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from dataclasses import dataclass
from typing import Any

#: mallopt(3) parameter: the most malloc arenas a process creates.
M_ARENA_MAX = -8
#: Arenas for a role with few threads: the event loop's and one for the rest.
DEFAULT_ARENAS = 2


@functools.cache
def _glibc() -> Any | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only: AttributeError elsewhere
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap the malloc arenas, before the process starts its threads.

    glibc's default is 8 per core, and each thread arena keeps its own high-water
    mark. ``MALLOC_ARENA_MAX`` in the environment, when set, wins (glibc reads it
    itself). Returns whether the cap was applied."""
    libc = _glibc()
    if libc is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def trim_heap(collect: bool = True) -> None:
    """Hand the heap's free pages back to the system (``malloc_trim(0)``: every
    arena, whole free pages inside it too, not only the top). ``collect`` runs the
    cycle collector first, so what only it frees is handed back too."""
    if collect:
        gc.collect()
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


@dataclass
class HeapTrimmer:
    """Trims the heap at most every ``interval_s`` of the caller's clock: a role's
    loop asks ``due(now)`` each turn (pure: the clock is the caller's)."""

    interval_s: float = 30.0
    next_at: float = 0.0

    def due(self, now: float) -> bool:
        if now < self.next_at:
            return False
        self.next_at = now + self.interval_s
        return True

"""Versioned records on compacted topics (pure): which write wins.

Creatives and campaign settings are written by several processes (every serving
replica, the loop, the generator). Each write carries ``version`` = the version it
read + 1. Every reader applies a record only when ``accept`` says so; records of one
key sit on one partition in one order, so every reader takes the same decision:

* a newer version replaces the current one;
* an older one is stale (a write that read old state, or a replay after a crash);
* the same version with other content lost a race: the first one in the log wins;
* a creative id already owned by another campaign is never taken over.

A writer learns that it lost by reading the topic back up to its own record; it then
answers 409 and re-publishes the winner, so that compaction (which keeps the last
record of a key) keeps the winner too.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import msgspec


class Versioned(Protocol):
    version: int


V = TypeVar("V", bound=msgspec.Struct)


def accept(current: Any | None, new: Any) -> str | None:
    """None when ``new`` should replace ``current``; else why it is ignored."""
    if current is None:
        return None
    if getattr(current, "campaign", None) != getattr(new, "campaign", None):
        return "owned_by_another_campaign"
    if new.version < current.version:
        return "stale_version"
    if new.version == current.version:
        return None if new == current else "lost_race"
    return None


def bump(record: V, **changes: Any) -> V:
    """The record with ``changes`` applied and its version raised by one."""
    return msgspec.structs.replace(record, version=record.version + 1, **changes)  # type: ignore[attr-defined]

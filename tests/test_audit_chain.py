"""The audit trail's hash chains (schemas/audit.py)."""

from __future__ import annotations

import msgspec
import pytest

from adloop.schemas.audit import AuditChain, verify
from adloop.schemas.records import AuditEntry

KEY = b"audit-key-for-tests-0123456789"


def entry(i: int, campaign: str = "spring") -> AuditEntry:
    return AuditEntry(at=1000.0 + i, actor="human:alice", campaign=campaign, action=f"a{i}")


def trail(key: bytes | None = KEY) -> list[AuditEntry]:
    serve, loop = AuditChain("serve-1", key), AuditChain("loop-1", key)
    return [
        serve.seal(entry(1)),
        loop.seal(entry(2)),
        serve.seal(entry(3)),
        serve.seal(entry(4, "fall")),
        serve.seal(entry(5)),
    ]


@pytest.mark.parametrize("key", [KEY, None])
def test_an_untouched_trail_verifies(key: bytes | None) -> None:
    result = verify(trail(key), key)
    assert result.ok and result.entries == 5
    assert result.chains[("spring", "serve-1")][0] == 3


def test_an_edited_entry_is_detected() -> None:
    entries = trail()
    entries[2] = msgspec.structs.replace(entries[2], actor="human:mallory")
    problems = [str(p) for p in verify(entries, KEY).problems]
    assert problems == ["spring / serve-1 #2: hash does not match: edited or forged"]


def test_a_removed_entry_is_detected() -> None:
    entries = trail()
    del entries[2]  # serve-1's second entry for spring
    problems = [str(p) for p in verify(entries, KEY).problems]
    assert problems == ["spring / serve-1 #3: entries 2..2 are missing"]


def test_a_forged_entry_without_the_key_is_detected() -> None:
    forger = AuditChain("serve-1", b"not-the-key-0123456789")
    forged = forger.seal(
        AuditEntry(at=1.0, actor="human:ceo", campaign="summer", action="settings_changed")
    )
    problems = [str(p) for p in verify([*trail(), forged], KEY).problems]
    assert problems == ["summer / serve-1 #1: hash does not match: edited or forged"]


def test_an_unsealed_entry_is_reported() -> None:
    problems = [str(p) for p in verify([*trail(), entry(9)], KEY).problems]
    assert problems == ["spring / ? #0: entry is not sealed"]

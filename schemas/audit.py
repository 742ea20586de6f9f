"""A tamper-evident audit trail (pure): hash chains per campaign and writer.

Several processes write audit entries (every serving replica, the loop). Each keeps
its own chain per campaign: ``seq`` counts 1, 2, 3, ... and ``prev_hash`` is the hash
of its previous entry (the first links to a genesis hash of writer and campaign).
An entry's ``hash`` is HMAC-SHA256 over its canonical JSON (every field but ``hash``)
with the audit key (``ADLOOP_AUDIT_KEY``), or plain SHA-256 without one. Then:

* an edited entry no longer matches its hash;
* a removed entry leaves a gap in its writer's ``seq`` and breaks the next link;
* with a key, an entry forged by someone without it (e.g. produced straight to
  Kafka) fails verification whatever chain it claims.

What a chain cannot show by itself: the removal of a writer's *last* entries. The
``adloop audit verify`` report lists each chain's head (writer, seq, hash) so it can
be compared with a copy taken earlier.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from adloop.schemas.records import AuditEntry

_canonical = msgspec.json.Encoder(order="sorted")


def entry_hash(entry: AuditEntry, key: bytes | None) -> str:
    body = _canonical.encode(msgspec.structs.replace(entry, hash=""))
    if key:
        return hmac.new(key, body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


def genesis(writer: str, campaign: str) -> str:
    return hashlib.sha256(f"adloop-audit|{writer}|{campaign}".encode()).hexdigest()


@dataclass
class AuditChain:
    """One writer's chains (one per campaign): seals entries before they are published."""

    writer: str
    key: bytes | None = None
    _heads: dict[str, tuple[int, str]] = field(default_factory=dict)

    def seal(self, entry: AuditEntry) -> AuditEntry:
        seq, prev = self._heads.get(entry.campaign, (0, genesis(self.writer, entry.campaign)))
        sealed = msgspec.structs.replace(
            entry, writer=self.writer, seq=seq + 1, prev_hash=prev, hash=""
        )
        sealed = msgspec.structs.replace(sealed, hash=entry_hash(sealed, self.key))
        self._heads[entry.campaign] = (sealed.seq, sealed.hash)
        return sealed


@dataclass(frozen=True)
class Problem:
    campaign: str
    writer: str
    seq: int
    what: str

    def __str__(self) -> str:
        return f"{self.campaign} / {self.writer} #{self.seq}: {self.what}"


@dataclass
class Verification:
    entries: int = 0
    chains: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(entries: Iterable[AuditEntry], key: bytes | None) -> Verification:
    """Check every chain: hashes, links, and gaps in each writer's sequence."""
    result = Verification()
    chains: dict[tuple[str, str], list[AuditEntry]] = defaultdict(list)
    for entry in entries:
        result.entries += 1
        if not entry.writer or entry.seq < 1:
            result.problems.append(
                Problem(entry.campaign, entry.writer or "?", entry.seq, "entry is not sealed")
            )
            continue
        chains[(entry.campaign, entry.writer)].append(entry)
    for (campaign, writer), chain in chains.items():
        chain.sort(key=lambda e: e.seq)
        expected_seq, prev = 1, genesis(writer, campaign)
        for entry in chain:
            if entry_hash(entry, key) != entry.hash:
                result.problems.append(
                    Problem(campaign, writer, entry.seq, "hash does not match: edited or forged")
                )
            if entry.seq != expected_seq:
                what = (
                    f"entries {expected_seq}..{entry.seq - 1} are missing"
                    if entry.seq > expected_seq
                    else "sequence number repeated"
                )
                result.problems.append(Problem(campaign, writer, entry.seq, what))
            elif entry.prev_hash != prev:
                result.problems.append(
                    Problem(campaign, writer, entry.seq, "does not link to the previous entry")
                )
            expected_seq, prev = entry.seq + 1, entry.hash
        result.chains[(campaign, writer)] = (chain[-1].seq, chain[-1].hash)
    return result

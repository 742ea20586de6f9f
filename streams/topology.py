"""adloop's topics, declared once (in the spirit of a Kafka Streams topology).

For every topic role: what its key is, the msgspec record its values decode to,
whether it is compacted, how many partitions it has, which processes write it and
which read it, and what it is for. Topic creation (:mod:`streams.topics`), the
topic followers (:mod:`streams.follower`) and the README's topic table are derived
from :data:`TOPOLOGY`, so they cannot drift apart.

:mod:`streams.config` imports this module (it re-exports ``TopicRole`` and
``TOPIC_ROLES``), so this one imports ``Settings`` for type checking only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, get_args

import msgspec

from adloop.schemas import (
    AuditEntry,
    CampaignSettings,
    Click,
    Conversion,
    Creative,
    DeadLetter,
    Decision,
    GenerationRequest,
    GenerationResult,
    Impression,
    OutcomeSnapshot,
    decision_key,
)

if TYPE_CHECKING:
    from adloop.streams.config import Settings

TopicRole = Literal[
    "impressions",
    "clicks",
    "conversions",
    "creatives",
    "decisions",
    "dead_letter",
    "outcomes",
    "generation_requests",
    "generation_results",
    "campaigns",
    "audit",
    "ingest_changelog",
]
TOPIC_ROLES: tuple[TopicRole, ...] = get_args(TopicRole)

#: Who touches the topics: adloop's roles (``adloop <role>``), ``train-ctr --from-kafka``,
#: the ad exchange that publishes events, and people reading the dead letters.
Process = Literal[
    "exchange", "ingest", "worker", "serve", "loop", "generator", "train-ctr", "operators"
]


class StoreValue(msgspec.Struct):
    """A state store changelog's value: the bytes its store keeps (msgpack), a tombstone
    when the key was deleted. Only the store's own role reads it."""


def _campaign_audience(record: Any) -> str:
    return decision_key(record.campaign, record.audience)


@dataclass(frozen=True)
class TopicDecl:
    """One topic role of the topology."""

    role: TopicRole
    #: What the key is, in words (rendered in the README).
    key: str
    #: The key a value must be published under, computed from the value; ``None`` where
    #: it cannot be (a dead letter keeps the refused record's own key). Followers skip
    #: a record whose key disagrees: on a compacted topic it would survive compaction
    #: next to, or instead of, the record it was meant to replace.
    key_of: Callable[[Any], str] | None
    record: type[msgspec.Struct]
    compacted: bool
    writers: tuple[Process, ...]
    readers: tuple[Process, ...]
    purpose: str
    #: ``None``: the configured count (``ADLOOP_PARTITIONS``). Every role uses it today:
    #: the event topics must share one count (the ingest joins partition p of each),
    #: outcomes and decisions share one with the worker's table, and existing
    #: deployments were created with it (a different count is a startup error).
    partitions: int | None = None
    #: Why the partition count matters for this role, if it does.
    partitioning: str = ""
    #: Topic configs besides ``cleanup.policy`` (which ``compacted`` sets).
    configs: Mapping[str, str] = field(default_factory=dict)

    def partitions_for(self, settings: Settings) -> int:
        return self.partitions or settings.partitions


_EVENTS = "co-partitioned: the ingest joins partition p of each event topic"

_DECLS: tuple[TopicDecl, ...] = (
    TopicDecl(
        role="impressions",
        key="impression_id",
        key_of=attrgetter("impression_id"),
        record=Impression,
        compacted=False,
        writers=("exchange",),
        readers=("ingest", "train-ctr"),
        purpose="every ad shown, with the propensity it was chosen with",
        partitioning=_EVENTS,
    ),
    TopicDecl(
        role="clicks",
        key="impression_id",
        key_of=attrgetter("impression_id"),
        record=Click,
        compacted=False,
        writers=("exchange",),
        readers=("ingest", "train-ctr"),
        purpose="clicks on impressions",
        partitioning=_EVENTS,
    ),
    TopicDecl(
        role="conversions",
        key="impression_id",
        key_of=attrgetter("impression_id"),
        record=Conversion,
        compacted=False,
        writers=("exchange",),
        readers=("ingest",),
        purpose="conversions attributed to impressions",
        partitioning=_EVENTS,
    ),
    TopicDecl(
        role="creatives",
        key="creative_id",
        key_of=attrgetter("creative_id"),
        record=Creative,
        compacted=True,
        writers=("serve", "loop", "generator"),
        readers=("ingest", "worker", "serve", "loop", "train-ctr"),
        purpose="the creative registry: latest version of each creative, with its story",
    ),
    TopicDecl(
        role="decisions",
        key="campaign|audience",
        key_of=_campaign_audience,
        record=Decision,
        compacted=True,
        writers=("worker",),
        readers=("serve", "loop"),
        purpose="latest ranking and serving probabilities per campaign × audience",
        partitioning="co-partitioned with outcomes, for the worker's table",
    ),
    TopicDecl(
        role="dead_letter",
        key="the refused record's key (generator: topic:partition:offset)",
        key_of=None,
        record=DeadLetter,
        compacted=False,
        writers=("ingest", "generator"),
        readers=("operators",),
        purpose="every refused record, with its source coordinates and reason code",
    ),
    TopicDecl(
        role="outcomes",
        key="campaign|audience",
        key_of=_campaign_audience,
        record=OutcomeSnapshot,
        compacted=False,
        writers=("ingest",),
        readers=("worker",),
        purpose="cumulative counts per campaign × audience × source partition (internal)",
        partitioning="co-partitioned with the worker's posterior table",
    ),
    TopicDecl(
        role="generation_requests",
        key="request_id",
        key_of=attrgetter("request_id"),
        record=GenerationRequest,
        compacted=False,
        writers=("loop",),
        readers=("generator", "loop"),
        purpose="asks for fresh variants of an underperforming creative",
    ),
    TopicDecl(
        role="generation_results",
        key="request_id",
        key_of=attrgetter("request_id"),
        record=GenerationResult,
        compacted=False,
        writers=("generator",),
        readers=("loop", "generator"),
        purpose="what became of each generation request",
    ),
    TopicDecl(
        role="campaigns",
        key="campaign",
        key_of=attrgetter("campaign"),
        record=CampaignSettings,
        compacted=True,
        writers=("serve",),
        readers=("serve", "loop", "generator"),
        purpose="what people steer per campaign: brief, auto-approve, pause, pins, budget",
    ),
    TopicDecl(
        role="audit",
        key="campaign",
        key_of=attrgetter("campaign"),
        record=AuditEntry,
        compacted=False,
        writers=("serve", "loop"),
        readers=("serve", "loop"),
        purpose="who or what changed what, when and why",
    ),
    TopicDecl(
        role="ingest_changelog",
        key="the ingest store's RocksDB key (bytes: tag, input partition, rest)",
        key_of=None,
        record=StoreValue,
        compacted=True,
        writers=("ingest",),
        readers=("ingest",),
        purpose=(
            "the ingest's join state and input offsets, restored by the instance that is "
            "given a partition (internal; streams/changelog.py)"
        ),
        partitioning="partition p holds the state of input partition p",
        # A crashed flush's records stay out of compaction until the partition's next
        # owner has rewritten their keys (streams/changelog.py, "Compaction").
        configs={"min.compaction.lag.ms": "3600000"},
    ),
)

#: The topology: every topic role's declaration, in :data:`TOPIC_ROLES` order.
TOPOLOGY: Mapping[TopicRole, TopicDecl] = MappingProxyType({d.role: d for d in _DECLS})

#: Keyed by an id whose latest value is all that matters.
COMPACTED_ROLES: frozenset[TopicRole] = frozenset(r for r, d in TOPOLOGY.items() if d.compacted)


def record_type(role: TopicRole) -> type[msgspec.Struct]:
    return TOPOLOGY[role].record


# --- the README's topic table ---------------------------------------------------------

README_BEGIN = "<!-- topology:begin -->"
README_END = "<!-- topology:end -->"


def _cell(text: str) -> str:
    # A '|' inside a cell would end it (also inside backticks, in GitHub's tables).
    return text.replace("|", "\\|")


#: ``Settings.topic_prefix``'s default (tests check that the two agree).
DEFAULT_PREFIX = "adloop."


def topic_name(role: TopicRole, prefix: str = DEFAULT_PREFIX) -> str:
    """The topic's name: what ``Settings.topic`` answers (tests check that they agree;
    this module cannot ask it, config imports this module)."""
    return f"{prefix}{role.replace('_', '-')}"


def markdown_table() -> str:
    """The topic table for the README (topic names with the default prefix)."""
    lines = [
        "| topic | key | value | compacted | partitions | written by | read by | purpose |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for role in TOPIC_ROLES:
        d = TOPOLOGY[role]
        partitions = str(d.partitions) if d.partitions else "`ADLOOP_PARTITIONS`"
        if d.partitioning:
            partitions += f" ({d.partitioning})"
        cells = [
            f"`{topic_name(role)}`",
            f"`{d.key}`" if d.key_of is not None else d.key,
            f"`{d.record.__name__}`",
            "yes" if d.compacted else "no",
            partitions,
            ", ".join(d.writers),
            ", ".join(d.readers),
            d.purpose,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def with_table(readme: str) -> str:
    """``readme`` with the text between the topology markers replaced by the table."""
    head, begin, rest = readme.partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not begin or not end:
        raise ValueError(f"README lacks the {README_BEGIN} ... {README_END} markers")
    return f"{head}{README_BEGIN}\n{markdown_table()}{README_END}{tail}"


def main(argv: list[str]) -> int:
    """``python -m adloop.streams.topology [--write README.md]``: print or rewrite."""
    if len(argv) == 2 and argv[0] == "--write":
        path = Path(argv[1])
        path.write_text(with_table(path.read_text()))
        return 0
    if argv:
        print("usage: python -m adloop.streams.topology [--write README.md]", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

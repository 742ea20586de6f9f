"""The declared topology: complete, the source of topic creation, and of the README table."""

from __future__ import annotations

from pathlib import Path

import msgspec

from adloop.schemas import Creative, Decision, Impression
from adloop.streams import config
from adloop.streams.config import Settings
from adloop.streams.topics import COMPACTED_ROLES, topic_specs
from adloop.streams.topology import (
    README_BEGIN,
    README_END,
    TOPIC_ROLES,
    TOPOLOGY,
    TopicRole,
    markdown_table,
    topic_name,
    with_table,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_topic_table_is_the_topology() -> None:
    text = README.read_text()
    assert text.count(README_BEGIN) == 1 and text.count(README_END) == 1
    between = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert between == "\n" + markdown_table(), (
        "README's topic table is stale: python -m adloop.streams.topology --write README.md"
    )
    assert with_table(text) == text


def test_every_role_is_declared_once_in_order() -> None:
    assert tuple(TOPOLOGY) == TOPIC_ROLES
    assert all(decl.role == role for role, decl in TOPOLOGY.items())
    assert config.TOPIC_ROLES is TOPIC_ROLES and config.TopicRole is TopicRole
    for decl in TOPOLOGY.values():
        assert issubclass(decl.record, msgspec.Struct)
        assert decl.writers and decl.readers and decl.purpose and decl.key


def test_topic_names_agree_with_settings() -> None:
    """topology cannot ask Settings (config imports it), so it repeats the naming rule."""
    defaults = Settings.model_construct()
    custom = Settings.model_construct(topic_prefix="x.")
    for role in TOPIC_ROLES:
        assert topic_name(role) == defaults.topic(role)
        assert topic_name(role, "x.") == custom.topic(role)


def test_topic_specs_come_from_the_topology() -> None:
    settings = Settings.model_construct(partitions=3, replication_factor=2)
    specs = topic_specs(settings)
    assert list(specs) == [settings.topic(role) for role in TOPIC_ROLES]
    for role in TOPIC_ROLES:
        spec = specs[settings.topic(role)]
        assert spec.partitions == TOPOLOGY[role].partitions_for(settings) == 3
        assert spec.replication_factor == 2
        compacted = TOPOLOGY[role].compacted
        assert (spec.configs.get("cleanup.policy") == "compact") == compacted
        assert (role in COMPACTED_ROLES) == compacted
    assert {"creatives", "decisions", "campaigns", "ingest_changelog"} == COMPACTED_ROLES
    assert specs[settings.topic("ingest_changelog")].configs["min.compaction.lag.ms"]


def test_keys_are_derived_from_the_values() -> None:
    imp = Impression(
        impression_id="i1",
        timestamp=1.0,
        campaign="c",
        audience="a",
        placement="p",
        creative_id="cr",
        propensity=0.5,
        policy="thompson",
    )
    decision = Decision(
        campaign="c",
        audience="a",
        best_creative_id=None,
        creatives=[],
        impressions=0,
        clicks=0,
        updated_at=0.0,
    )
    creative = Creative(creative_id="cr", campaign="c", headline="h")
    key_of = {role: decl.key_of for role, decl in TOPOLOGY.items()}
    assert key_of["impressions"] is not None and key_of["impressions"](imp) == "i1"
    assert key_of["decisions"] is not None and key_of["decisions"](decision) == "c|a"
    assert key_of["creatives"] is not None and key_of["creatives"](creative) == "cr"
    assert key_of["dead_letter"] is None  # a dead letter keeps the refused record's key

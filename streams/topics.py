"""Create adloop's topics, with the configured partition counts, before any client runs.

Run :func:`ensure_topics` before the first producer or consumer: brokers with
automatic topic creation (Tansu always, Kafka with ``auto.create.topics.enable``)
would otherwise create a topic on first use with *their* default partition count.
For the same reason existing topics are read from an all-topics metadata request:
asking for one unknown topic by name may create it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidConfigurationError,
    InvalidReplicationFactorError,
    KafkaError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)

from adloop.streams.config import Settings
from adloop.streams.topology import COMPACTED_ROLES, TOPIC_ROLES, TOPOLOGY

log = logging.getLogger("adloop.topics")

__all__ = [
    "COMPACTED_ROLES",
    "TopicMismatchError",
    "TopicSpec",
    "broker_with_topics",
    "ensure_topics",
    "ensure_topics_sync",
    "topic_specs",
]


@dataclass(frozen=True)
class TopicSpec:
    partitions: int
    replication_factor: int = 1
    configs: Mapping[str, str] = field(default_factory=dict)


class TopicMismatchError(RuntimeError):
    """An existing topic does not have the layout adloop is configured for."""


def topic_specs(settings: Settings) -> dict[str, TopicSpec]:
    """Every adloop topic by name, as the topology declares it."""
    return {
        settings.topic(role): TopicSpec(
            partitions=TOPOLOGY[role].partitions_for(settings),
            replication_factor=settings.replication_factor,
            # Only compaction and declared configs are set: "delete" is every broker's
            # default, and a topic created without a config keeps following the broker's.
            configs={
                **({"cleanup.policy": "compact"} if TOPOLOGY[role].compacted else {}),
                **TOPOLOGY[role].configs,
            },
        )
        for role in TOPIC_ROLES
    }


def _admin_kwargs(settings: Settings) -> dict[str, Any]:
    accepted = set(inspect.signature(AIOKafkaAdminClient.__init__).parameters) - {"self", "loop"}
    kwargs = settings.kafka_client_kwargs()
    dropped = sorted(set(kwargs) - accepted)
    if dropped:
        log.debug("admin client ignores kafka options=%s", ",".join(dropped))
    admin_kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    admin_kwargs.setdefault("client_id", f"{settings.app_id}-admin")
    return admin_kwargs


async def _partition_counts(admin: AIOKafkaAdminClient) -> dict[str, int]:
    """Partition count of every existing topic (all-topics metadata: creates nothing)."""
    counts: dict[str, int] = {}
    for topic in await admin.describe_topics():
        if topic["error_code"] == UnknownTopicOrPartitionError.errno:
            continue
        counts[topic["topic"]] = len(topic["partitions"])
    return counts


def _check_partitions(existing: Mapping[str, int], specs: Mapping[str, TopicSpec]) -> None:
    problems = [
        f"topic {name} has {existing[name]} partitions, adloop is configured for "
        f"{spec.partitions}: set ADLOOP_PARTITIONS={existing[name]} or recreate the topic"
        for name, spec in specs.items()
        if name in existing and existing[name] != spec.partitions
    ]
    if problems:
        raise TopicMismatchError("; ".join(problems))


async def _create(
    admin: AIOKafkaAdminClient, specs: Mapping[str, TopicSpec], *, with_configs: bool = True
) -> tuple[list[str], list[str]]:
    """Create ``specs``; returns (created, already existed). Raises on other errors."""
    if not specs:
        return [], []
    response = await admin.create_topics(
        [
            NewTopic(
                name,
                spec.partitions,
                spec.replication_factor,
                topic_configs=dict(spec.configs) if with_configs else None,
            )
            for name, spec in specs.items()
        ]
    )
    created: list[str] = []
    raced: list[str] = []
    rejected_configs: dict[str, TopicSpec] = {}
    for entry in response.topic_errors:  # (topic, error_code[, error_message])
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        if code == 0:
            created.append(name)
        elif code == TopicAlreadyExistsError.errno:
            raced.append(name)
        elif code == InvalidConfigurationError.errno and with_configs and specs[name].configs:
            log.warning(
                "topic=%s broker rejected configs=%s (%s); creating it without them",
                name,
                dict(specs[name].configs),
                message,
            )
            rejected_configs[name] = specs[name]
        else:
            error = for_code(code)
            hint = ""
            if code == InvalidReplicationFactorError.errno:
                hint = " (set ADLOOP_REPLICATION_FACTOR to at most the number of brokers)"
            raise error(f"cannot create topic {name}: {message or error.__name__}{hint}")
    if rejected_configs:
        more_created, more_raced = await _create(admin, rejected_configs, with_configs=False)
        created += more_created
        raced += more_raced
    return created, raced


async def _warn_on_config_drift(admin: AIOKafkaAdminClient, specs: Mapping[str, TopicSpec]) -> None:
    """Existing topics keep their configs; say so when they differ from ours."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    wanted = {name: spec.configs for name, spec in specs.items() if spec.configs}
    if not wanted:
        return
    try:
        responses = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, name, dict.fromkeys(cfg))
                for name, cfg in wanted.items()
            ]
        )
        for response in responses:
            # resources: (error_code, error_message, resource_type, resource_name, entries)
            for error_code, _msg, _type, name, entries in response.resources:
                if error_code or name not in wanted:
                    continue
                actual = {entry[0]: entry[1] for entry in entries}
                for key, value in wanted[name].items():
                    if actual.get(key) != value:
                        log.warning(
                            "topic=%s config %s=%s, adloop expects %s=%s: alter the topic",
                            name,
                            key,
                            actual.get(key, "<broker default>"),
                            key,
                            value,
                        )
    except (KafkaError, ValueError, TypeError) as exc:  # informational only
        log.debug("cannot describe topic configs: %r", exc)


async def ensure_topics(settings: Settings, specs: dict[str, TopicSpec] | None = None) -> list[str]:
    """Create missing adloop topics; fail clearly on a partition-count mismatch.

    Returns the names created by this call. Idempotent, and safe when several
    processes race to create the same topics.
    """
    specs = topic_specs(settings) if specs is None else specs
    admin = AIOKafkaAdminClient(**_admin_kwargs(settings))
    await admin.start()
    try:
        existing = await _partition_counts(admin)
        _check_partitions(existing, specs)
        created, raced = await _create(
            admin, {name: spec for name, spec in specs.items() if name not in existing}
        )
        if raced:  # someone else created them meanwhile: theirs must match too
            _check_partitions(await _partition_counts(admin), {n: specs[n] for n in raced})
        await _warn_on_config_drift(
            admin, {name: spec for name, spec in specs.items() if name in existing}
        )
    finally:
        await admin.close()
    for name in created:
        spec = specs[name]
        log.info(
            "topic created name=%s partitions=%d replication=%d configs=%s",
            name,
            spec.partitions,
            spec.replication_factor,
            ",".join(f"{k}={v}" for k, v in spec.configs.items()) or "-",
        )
    return created


def ensure_topics_sync(settings: Settings, specs: dict[str, TopicSpec] | None = None) -> list[str]:
    """:func:`ensure_topics` for synchronous callers (not from inside an event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(ensure_topics(settings, specs))
    raise RuntimeError("ensure_topics_sync called from a running event loop: await ensure_topics")


@contextlib.contextmanager
def broker_with_topics(settings: Settings) -> Iterator[Settings]:
    """``settings`` with a reachable broker (embedded unless configured, stopped on
    exit) and adloop's topics created."""
    from adloop.streams.broker import ensure_broker

    settings, embedded = ensure_broker(settings)
    if embedded is not None:
        _forget_local_state(settings)
    try:
        ensure_topics_sync(settings)
        yield settings
    finally:
        if embedded is not None:
            embedded.stop()


def _forget_local_state(settings: Settings) -> None:
    """A fresh embedded broker starts with empty topics: local state derived from an
    earlier run's topics (ingest checkpoints, the worker's table offsets) would skip
    or contradict the new data, so it goes."""
    if not settings.data_dir.is_dir():
        return
    for path in sorted(settings.data_dir.iterdir()):
        # Every instance's state: ingest, ingest-2, worker-1, ...
        role = path.name.split("-", 1)[0]
        if role in ("ingest", "worker") and path.is_dir():
            shutil.rmtree(path)
            log.info("cleared state of an earlier embedded run", extra={"path": str(path)})

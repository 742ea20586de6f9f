from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from adloop.streams.broker import BrokerStartError, EmbeddedBroker, ensure_broker
from adloop.streams.config import TOPIC_ROLES, Settings
from adloop.streams.topics import (
    COMPACTED_ROLES,
    TopicMismatchError,
    TopicSpec,
    _create,
    ensure_topics,
    ensure_topics_sync,
    topic_specs,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def kafka_admin(settings: Settings) -> Iterator[KafkaAdminClient]:
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        yield admin
    finally:
        admin.close()


def partition_counts(settings: Settings) -> dict[str, int]:
    with kafka_admin(settings) as admin:
        topics = admin.describe_topics()  # all topics: asking by name may auto-create
    # kafka-python 3 says "name", 2.x "topic"
    return {t.get("name") or t["topic"]: len(t["partitions"]) for t in topics}


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for init to reap it counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.02)
    return gone(pid)


@contextmanager
def child_with_broker(
    log_dir: Path, extra: str = ""
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A Python child that starts an EmbeddedBroker and prints the broker pid."""
    script = textwrap.dedent(
        """
        import sys, time
        from adloop.streams.broker import EmbeddedBroker, install_shutdown_signals
        broker = EmbeddedBroker(log_dir={log_dir!r}).start()
        {extra}
        print(broker.pid, flush=True)
        time.sleep(60)
        """
    ).format(log_dir=str(log_dir), extra=extra)
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    broker_pid = None
    try:
        assert child.stdout is not None
        broker_pid = int(child.stdout.readline())
        yield child, broker_pid
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if broker_pid is not None and not gone(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)


# --- the broker -----------------------------------------------------------------


def test_broker_answers_metadata(broker: EmbeddedBroker, settings: Settings) -> None:
    assert broker.running
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert broker.url == f"kafka://127.0.0.1:{broker.port}"
    with kafka_admin(settings) as admin:
        cluster = admin.describe_cluster()
    assert [(b["host"], b["port"]) for b in cluster["brokers"]] == [("127.0.0.1", broker.port)]


def test_stop_leaves_no_broker_process(tmp_path: Path) -> None:
    embedded = EmbeddedBroker(log_dir=tmp_path).start()
    pid = embedded.pid
    assert pid is not None and psutil.Process(pid).is_running()
    assert embedded.log_path is not None and "listening on" in embedded.log_path.read_text()
    embedded.stop()
    assert not psutil.pid_exists(pid)  # stop() waited for (reaped) it
    assert not embedded.running
    embedded.stop()  # idempotent


def test_busy_port_is_a_clear_error(broker: EmbeddedBroker) -> None:
    with pytest.raises(RuntimeError, match=f"port {broker.port} .* in use"):
        EmbeddedBroker(port=broker.port).start()


def test_broker_started_from_a_thread_outlives_the_thread() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits.
    box: list[EmbeddedBroker] = []
    thread = threading.Thread(target=lambda: box.append(EmbeddedBroker().start()))
    thread.start()
    thread.join()
    # join() returns before the kernel thread is gone; the death signal, if any, is
    # sent when it is. Wait for that, then ask the broker something: a broker with a
    # pending SIGKILL never answers.
    assert thread.native_id is not None
    task = Path(f"/proc/self/task/{thread.native_id}")
    deadline = time.monotonic() + 120
    while task.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not task.exists()
    with box[0] as embedded:
        admin = KafkaAdminClient(bootstrap_servers=embedded.bootstrap)
        try:
            assert admin.describe_cluster()["brokers"]
        finally:
            admin.close()
        assert embedded.running


def test_parent_killed_leaves_no_orphan_broker(tmp_path: Path) -> None:
    with child_with_broker(tmp_path) as (child, broker_pid):
        assert psutil.Process(broker_pid).ppid() == child.pid
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert wait_gone(broker_pid), f"orphan broker pid {broker_pid} survived its parent"


def test_sigterm_stops_cli_process_and_broker(tmp_path: Path) -> None:
    with child_with_broker(tmp_path, "install_shutdown_signals(lambda: sys.exit(0))") as (
        child,
        broker_pid,
    ):
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=120) == 0
        assert wait_gone(broker_pid)


def test_ensure_broker(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    same, none = ensure_broker(settings)
    assert same is settings and none is None

    caplog.set_level(logging.INFO, logger="adloop.broker")
    bare = settings.model_copy(
        update={"broker": None, "session_timeout_s": None, "heartbeat_interval_s": None}
    )
    updated, embedded = ensure_broker(bare)
    assert embedded is not None
    try:
        assert updated.broker == embedded.url != settings.broker
        assert (updated.session_timeout_s, updated.heartbeat_interval_s) == (2.0, 0.5)
        assert f"port={embedded.port} pid={embedded.pid}" in caplog.text
    finally:
        embedded.stop()


# --- topics ---------------------------------------------------------------------


def test_ensure_topics_creates_every_topic(settings: Settings) -> None:
    names = {settings.topic(role) for role in TOPIC_ROLES}
    assert set(ensure_topics_sync(settings)) == names
    counts = partition_counts(settings)
    assert {name: counts.get(name) for name in names} == dict.fromkeys(names, settings.partitions)

    async def policies() -> dict[str, str | None]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        await admin.start()
        try:
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name) for name in sorted(names)]
            )
        finally:
            await admin.close()
        return {
            res[3]: {e[0]: e[1] for e in res[4]}.get("cleanup.policy") for res in response.resources
        }

    compacted = {settings.topic(role) for role in COMPACTED_ROLES}
    assert {
        settings.topic(r) for r in ("decisions", "creatives", "campaigns", "ingest_changelog")
    } == compacted
    assert asyncio.run(policies()) == {n: "compact" if n in compacted else None for n in names}


def test_ensure_topics_is_idempotent(settings: Settings) -> None:
    settings = settings.with_overrides(partitions=3)
    assert len(ensure_topics_sync(settings)) == len(TOPIC_ROLES)
    assert ensure_topics_sync(settings) == []

    async def concurrently() -> list[list[str]]:
        return await asyncio.gather(ensure_topics(settings), ensure_topics(settings))

    assert asyncio.run(concurrently()) == [[], []]
    counts = partition_counts(settings)
    assert {counts[settings.topic(role)] for role in TOPIC_ROLES} == {3}


def test_concurrent_creation_race(settings: Settings) -> None:
    async def both() -> list[list[str]]:
        return await asyncio.gather(ensure_topics(settings), ensure_topics(settings))

    first, second = asyncio.run(both())
    assert sorted(first + second) == sorted(settings.topic(role) for role in TOPIC_ROLES)


def test_partition_mismatch_is_reported(settings: Settings) -> None:
    clicks = settings.topic("clicks")
    with kafka_admin(settings) as admin:
        admin.create_topics([NewTopic(clicks, num_partitions=8, replication_factor=1)])
    with pytest.raises(TopicMismatchError) as info:
        ensure_topics_sync(settings)
    assert str(info.value) == (
        f"topic {clicks} has 8 partitions, adloop is configured for 4: "
        "set ADLOOP_PARTITIONS=8 or recreate the topic"
    )
    assert set(partition_counts(settings)) & set(topic_specs(settings)) == {clicks}
    assert len(ensure_topics_sync(settings.with_overrides(partitions=8))) == len(TOPIC_ROLES) - 1


def test_rejected_topic_config_falls_back_without_it(caplog: pytest.LogCaptureFixture) -> None:
    class Admin:  # a broker that refuses topic configs (INVALID_CONFIG = 40)
        def __init__(self) -> None:
            self.requests: list[list[object]] = []

        async def create_topics(self, topics: list[object]) -> SimpleNamespace:
            self.requests.append(topics)
            return SimpleNamespace(
                topic_errors=[(t.name, 40 if t.topic_configs else 0, "no") for t in topics]
            )

    admin = Admin()
    specs = {"a": TopicSpec(2, configs={"cleanup.policy": "compact"}), "b": TopicSpec(2)}
    created, raced = asyncio.run(_create(admin, specs))  # type: ignore[arg-type]
    assert (sorted(created), raced) == (["a", "b"], [])
    assert [[t.name for t in r] for r in admin.requests] == [["a", "b"], ["a"]]
    assert "rejected configs" in caplog.text


def test_produce_consume_round_trip(settings: Settings) -> None:
    ensure_topics_sync(settings)
    topic = settings.topic("impressions")
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    try:
        meta = producer.send(topic, key=b"creative-1", value=b'{"n": 1}', partition=2).get(120)
    finally:
        producer.close()
    assert (meta.topic, meta.partition) == (topic, 2)

    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, consumer_timeout_ms=120_000
    )
    try:
        tp = TopicPartition(topic, 2)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        record = next(iter(consumer))
    finally:
        consumer.close()
    assert (record.key, record.value, record.offset) == (b"creative-1", b'{"n": 1}', meta.offset)


@pytest.mark.parametrize(
    ("script", "startup_timeout_s", "expected"),
    [
        # Exits at once: reported as soon as it has, whatever the (generous) timeout.
        ("echo boom >&2; exit 3", 120.0, r"exited with status 3 during startup.*\n.*boom"),
        # Never answers: the timeout is what ends the wait (3 s: long enough for the
        # shell to have written its line on a busy machine; its log is in the error).
        (
            "echo still booting; exec sleep 60",
            3.0,
            r"did not answer Kafka metadata within 3s.*\n.*still booting",
        ),
    ],
)
def test_failed_start_is_a_clear_error(
    tmp_path: Path, script: str, startup_timeout_s: float, expected: str
) -> None:
    fake = tmp_path / "fake-tansu"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    embedded = EmbeddedBroker(
        binary=str(fake), log_dir=tmp_path, startup_timeout_s=startup_timeout_s
    )
    with pytest.raises(BrokerStartError, match=expected):
        embedded.start()
    assert not embedded.running


def test_end_offsets_count_every_record_of_the_last_batch(
    broker: EmbeddedBroker, settings: Settings
) -> None:
    """Tansu lists a partition's end as its last batch's base offset + 1; we correct it."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition as AioTP

    from adloop.streams.kafka_io import consumer_kwargs, fetched_end_offsets, producer_kwargs

    topic = settings.topic("impressions") + ".ends"
    tp, empty = AioTP(topic, 0), AioTP(topic, 1)

    async def scenario() -> tuple[dict[AioTP, int], dict[AioTP, int]]:
        producer = AIOKafkaProducer(**producer_kwargs(settings, linger_ms=50))
        await producer.start()
        try:
            for size in (4, 3):  # two batches of several records each
                sent = [await producer.send(topic, b"x", partition=0) for _ in range(size)]
                await asyncio.gather(*sent)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(**consumer_kwargs(settings, group_id=None))
        await consumer.start()
        try:
            listed = await consumer.end_offsets([tp, empty])
        finally:
            await consumer.stop()
        return listed, await fetched_end_offsets(consumer_kwargs(settings), listed, timeout_s=120)

    listed, fetched = asyncio.run(scenario())
    assert fetched == {tp: 7, empty: 0}
    assert listed[tp] <= 7  # 5 on Tansu 0.6, 7 on Kafka


def test_a_consumer_keeps_reading_a_partition_of_many_batches(
    broker: EmbeddedBroker, settings: Settings
) -> None:
    """Tansu answers empty fetches once finding a batch takes longer than the fetch
    wait (here 1 ms); a governed consumer still reads every record, in order.
    (How the governor adapts the wait is tested without a broker in test_kafka_io.)"""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition as AioTP

    from adloop.streams.kafka_io import (
        FetchWaitGovernor,
        consumer_kwargs,
        partition_lags,
        producer_kwargs,
    )

    topic = settings.topic("impressions") + ".many-batches"
    tp, batches, tail = AioTP(topic, 0), 3000, 100

    async def scenario() -> tuple[list[tuple[int, bytes]], dict[AioTP, int]]:
        producer = AIOKafkaProducer(**producer_kwargs(settings, linger_ms=0))
        await producer.start()
        try:
            for i in range(batches):  # one record per batch
                await producer.send_and_wait(topic, str(i).encode(), partition=0)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(**consumer_kwargs(settings, group_id=None, fetch_max_wait_ms=1))
        await consumer.start()
        try:
            governor = FetchWaitGovernor(consumer, floor_ms=1)
            consumer.assign([tp])
            consumer.seek(tp, batches - tail)
            read: list[tuple[int, bytes]] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120  # a bound on a stall, not a speed target
            while len(read) < tail and loop.time() < deadline:
                records = await consumer.getmany(timeout_ms=100)
                governor.observe(records)
                read += [(r.offset, r.value) for r in records.get(tp, [])]
            return read, partition_lags(consumer)
        finally:
            await consumer.stop()

    read, lags = asyncio.run(scenario())
    expected = [(i, str(i).encode()) for i in range(batches - tail, batches)]
    assert read == expected, f"read {len(read)} of {tail} records"
    assert lags == {tp: 0}


def test_a_python_child_dies_with_its_parent(tmp_path: Path) -> None:
    """A multiprocessing target armed with ``die_with_parent`` (the bench's traffic
    sender) does not outlive a parent killed with SIGKILL."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing as mp, os, time
            from adloop.streams.broker import die_with_parent

            def child(parent_pid):
                die_with_parent(parent_pid)
                time.sleep(600)

            if __name__ == "__main__":
                proc = mp.get_context("spawn").Process(target=child, args=(os.getpid(),))
                proc.start()
                print(proc.pid, flush=True)
                time.sleep(600)
            """
        )
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    # Killed before or after it armed the signal, the child exits (psutil waits on the
    # pid, no sleep): a survivor raises TimeoutExpired.
    child.wait(timeout=120)

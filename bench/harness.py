"""Shared pieces of the benchmarks: a broker, a namespaced deployment, preloading."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.progress import Progress

from adloop.schemas import Click, Creative, Impression
from adloop.streams.config import Settings
from adloop.streams.kafka_io import consumer_kwargs, producer_kwargs
from adloop.streams.supervisor import Supervisor
from adloop.streams.topics import broker_with_topics

log = logging.getLogger("adloop.bench")

CAMPAIGNS = ["bench-a", "bench-b"]
AUDIENCES = ["aud-1", "aud-2", "aud-3", "aud-4", "aud-5"]
CREATIVES_PER_CAMPAIGN = 6


@contextlib.contextmanager
def deployment(broker: str | None = None, **overrides: object) -> Iterator[Settings]:
    """Settings on a broker (embedded unless given), with fresh topics and state.

    The state directory (RocksDB, logs, CTR models trained during the run) is removed
    afterwards; after a failure it is kept, and its path logged, to read the logs.
    """
    data_dir = Path(tempfile.mkdtemp(prefix="adloop-bench-"))
    base = Settings(
        broker=broker,
        topic_prefix=f"bench{uuid.uuid4().hex[:6]}.",
        data_dir=data_dir,
        **overrides,  # type: ignore[arg-type]
    )
    try:
        with broker_with_topics(base) as settings:
            yield settings
    except BaseException:
        log.warning("bench state kept for its logs", extra={"data_dir": str(data_dir)})
        raise
    shutil.rmtree(data_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def creatives() -> list[Creative]:
    return [
        Creative(creative_id=f"{campaign}-c{i}", campaign=campaign, headline=f"Ad {i}")
        for campaign in CAMPAIGNS
        for i in range(CREATIVES_PER_CAMPAIGN)
    ]


def synthetic_events(
    n_impressions: int, click_rate: float, seed: int = 1, context: bool = False
) -> tuple[list[bytes], list[bytes], dict[str, tuple[int, int]]]:
    """Encoded impressions and clicks, and the expected (impressions, clicks) per key.
    ``context``: each impression carries a device, an hour and two more context keys
    (what the contextual policy's cells are made of)."""
    rng = np.random.default_rng(seed)
    cre = creatives()
    by_campaign = {c: [x for x in cre if x.campaign == c] for c in CAMPAIGNS}
    enc = msgspec.json.Encoder()
    impressions, clicks = [], []
    expected: dict[str, list[int]] = {}
    # Event times a millisecond apart, ending a minute ago: within the ingest's bounds
    # on event time (ADLOOP_MAX_CLOCK_SKEW_S ahead of the clock, ADLOOP_MAX_EVENT_AGE_S
    # behind it) for any run shorter than a week.
    t0 = time.time() - n_impressions * 1e-3 - 60.0
    campaign_ix = rng.integers(len(CAMPAIGNS), size=n_impressions)
    audience_ix = rng.integers(len(AUDIENCES), size=n_impressions)
    creative_ix = rng.integers(CREATIVES_PER_CAMPAIGN, size=n_impressions)
    clicked = rng.random(n_impressions) < click_rate
    for i in range(n_impressions):
        campaign = CAMPAIGNS[campaign_ix[i]]
        audience = AUDIENCES[audience_ix[i]]
        creative = by_campaign[campaign][creative_ix[i]]
        impression_id = f"b{i:09d}"
        impressions.append(
            enc.encode(
                Impression(
                    impression_id=impression_id,
                    timestamp=t0 + i * 1e-3,
                    campaign=campaign,
                    audience=audience,
                    placement="feed",
                    creative_id=creative.creative_id,
                    propensity=1 / CREATIVES_PER_CAMPAIGN,
                    policy="uniform",
                    context=(
                        {
                            "device": ("mobile", "desktop", "tablet")[i % 3],
                            "hour": (i // 7) % 24,
                            "os": "android",
                            "language": "en",
                        }
                        if context
                        else {}
                    ),
                )
            )
        )
        cell = expected.setdefault(f"{campaign}|{audience}", [0, 0])
        cell[0] += 1
        if clicked[i]:
            clicks.append(
                enc.encode(Click(impression_id=impression_id, timestamp=t0 + i * 1e-3 + 1))
            )
            cell[1] += 1
    return impressions, clicks, {k: (v[0], v[1]) for k, v in expected.items()}


def _key(value: bytes) -> bytes:
    # impression_id is the first string field after schema_version.
    match = re.search(rb'"impression_id":"([^"]+)"', value)
    assert match is not None
    return match.group(1)


async def preload(
    settings: Settings,
    impressions: list[bytes],
    clicks: list[bytes],
    progress: Progress | None = None,
) -> None:
    """Publish creatives, impressions, then clicks, keyed by impression_id."""
    producer = AIOKafkaProducer(
        **producer_kwargs(settings, linger_ms=20, acks=1, max_batch_size=1 << 20)
    )
    await producer.start()
    try:
        enc = msgspec.json.Encoder()
        for creative in creatives():
            await producer.send(
                settings.topic("creatives"), enc.encode(creative), key=creative.creative_id.encode()
            )
        task = (
            progress.add_task("preloading events", total=len(impressions) + len(clicks))
            if progress
            else None
        )
        for role, values in (("impressions", impressions), ("clicks", clicks)):
            topic = settings.topic(role)
            futures = []
            for i, value in enumerate(values):
                futures.append(await producer.send(topic, value, key=_key(value)))
                if len(futures) >= 20_000:
                    await asyncio.gather(*futures)
                    futures.clear()
                if progress and task is not None and i % 5000 == 0:
                    progress.update(
                        task, completed=i + (len(impressions) if role == "clicks" else 0)
                    )
            await asyncio.gather(*futures)
        if progress and task is not None:
            progress.update(task, completed=len(impressions) + len(clicks))
    finally:
        await producer.stop()


async def raw_consume_rate(settings: Settings, total: int) -> float:
    """The ceiling: aiokafka getmany + JSON decode of the same messages, no processing."""
    consumer = AIOKafkaConsumer(
        **consumer_kwargs(settings, group_id=None, max_partition_fetch_bytes=4 << 20)
    )
    await consumer.start()
    try:
        tps = [
            TopicPartition(settings.topic(role), p)
            for role in ("impressions", "clicks")
            for p in range(settings.partitions)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        decode = msgspec.json.decode
        seen = 0
        started = time.perf_counter()
        while seen < total:
            batches = await consumer.getmany(timeout_ms=1000, max_records=20_000)
            for records in batches.values():
                for record in records:
                    decode(record.value)
                seen += len(records)
        return total / (time.perf_counter() - started)
    finally:
        await consumer.stop()


class DecisionWatcher:
    """Follows the decisions topic; reports when the counts reach the expected totals."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.totals: dict[str, tuple[int, int]] = {}
        self.first_at: float | None = None

    async def wait_for(
        self, expected: dict[str, tuple[int, int]], timeout: float, progress: Progress | None = None
    ) -> float:
        consumer = AIOKafkaConsumer(
            **consumer_kwargs(self.settings, group_id=None, fetch_max_wait_ms=5)
        )
        await consumer.start()
        dec = msgspec.json.Decoder()
        want = sum(i + c for i, c in expected.values())
        task = progress.add_task("adloop processing", total=want) if progress else None
        try:
            topic = self.settings.topic("decisions")
            tps = [TopicPartition(topic, p) for p in range(self.settings.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            deadline = time.monotonic() + timeout
            while self.totals != expected:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"counts not reached: {self.totals} != {expected}")
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        body = dec.decode(record.value)
                        if self.first_at is None:
                            self.first_at = time.time()
                        self.totals[record.key.decode()] = (body["impressions"], body["clicks"])
                if progress and task is not None:
                    progress.update(task, completed=sum(i + c for i, c in self.totals.values()))
            return time.time()
        finally:
            await consumer.stop()


def log_time(path: Path, pattern: str) -> float:
    """Timestamp (epoch s) of the last log line containing ``pattern``."""
    stamp = None
    for line in path.read_text().splitlines():
        if pattern in line:
            stamp = line.split(" ", 1)[0]
    if stamp is None:
        raise ValueError(f"{pattern!r} not in {path}")
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    return parsed.replace(tzinfo=UTC).timestamp()


def process_usage(sup: Supervisor) -> dict[str, dict[str, float]]:
    usage = {}
    for role, child in sup.children.items():
        try:
            proc = psutil.Process(child.pid)
            cpu = proc.cpu_times()
            usage[role] = {"cpu_s": cpu.user + cpu.system, "rss_mb": proc.memory_info().rss / 2**20}
        except psutil.NoSuchProcess:
            pass
    return usage


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory of a live process (Linux ``VmHWM``); None where unknown.

    psutil reports only the current RSS; the kernel keeps the high-water mark.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_peaks(sup: Supervisor) -> dict[str, dict[str, float]]:
    """``process_usage`` plus each process's peak resident memory, where the OS says."""
    usage = process_usage(sup)
    for role, child in sup.children.items():
        peak = peak_rss_mb(child.pid)
        if role in usage and peak is not None:
            usage[role]["peak_rss_mb"] = peak
    return usage

"""What the ingest's changelog costs: flushing with and without it, and restoring.

``adloop bench changelog`` drives the ingest's own ``PartitionState`` (the join over
RocksDB) with unique impressions (5 % clicked) in flushes of ``flush_events`` events,
as the ingest flushes under load (20k events/s x 20 ms ~ 400; at full speed more):

* **local only**: the flush is one local ``WriteBatch`` (the ingest before the changelog);
* **with changelog**: ``IngestChangelog.commit`` (state changes acknowledged, then the
  checkpoint, then the local batch);

both timed in wall and CPU seconds of this process (the broker runs in another). Then a
fresh store restores the partition from the changelog (``mode=full``): the restore time
of a partition holding that many retained impressions, and the time to find the
writer's own store current (the restart without a move).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from adloop.bench.harness import deployment
from adloop.schemas import Click, Impression
from adloop.streams.changelog import IngestChangelog
from adloop.streams.config import Settings
from adloop.streams.ingest import PartitionState, open_store
from adloop.streams.kafka_io import producer_kwargs


def _events(first: int, count: int, now: float) -> list[tuple[Impression, Click | None]]:
    out = []
    for i in range(first, first + count):
        imp = Impression(
            impression_id=f"bench-{i:09d}",
            timestamp=now,
            campaign="bench",
            audience=f"a{i % 6}",
            placement="feed",
            creative_id=f"c{i % 5}",
            propensity=0.2,
            policy="thompson",
        )
        clicked = Click(impression_id=imp.impression_id, timestamp=now + 1) if i % 20 == 0 else None
        out.append((imp, clicked))
    return out


async def _pass(
    settings: Settings,
    db: Any,
    partition: int,
    impressions: int,
    flush_events: int,
    changelog: bool,
) -> dict[str, float]:
    producer = AIOKafkaProducer(
        **producer_kwargs(settings, acks="all", linger_ms=2, max_batch_size=262_144)
    )
    await producer.start()
    writer = IngestChangelog(settings, db, producer)
    state = PartitionState(db, partition, settings)
    now = time.time()
    wall = cpu = 0.0
    try:
        for first in range(0, impressions, flush_events):
            events = _events(first, min(flush_events, impressions - first), now)
            w0, c0 = time.perf_counter(), time.process_time()
            for offset, (imp, clicked) in enumerate(events, start=first):
                state.add_impression(imp, offset, now)
                if clicked is not None:
                    state.attribute(clicked, now, offset, b"{}", imp.impression_id.encode())
            batch = state.write_batch({"impressions": first + len(events)})
            if changelog:
                await writer.commit([], {partition: batch})
            else:
                db.write(batch.batch)
            state.committed()
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
    finally:
        await producer.stop()
    return {
        "events_per_s": impressions / wall,
        "cpu_us_per_event": cpu / impressions * 1e6,
        "wall_s": wall,
    }


async def _restore(settings: Settings, db: Any, partition: int) -> dict[str, Any]:
    producer = AIOKafkaProducer(**producer_kwargs(settings, acks="all"))
    await producer.start()
    try:
        started = time.perf_counter()
        (result,) = await IngestChangelog(settings, db, producer).restore([partition])
        return {
            "mode": result.mode,
            "records": result.records,
            "seconds": time.perf_counter() - started,
        }
    finally:
        await producer.stop()


def run_changelog_bench(
    impressions: int = 200_000, flush_events: int = 2_000, broker: str | None = None
) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="adloop-changelog-"))
    try:
        with deployment(broker) as settings:
            local_db = open_store(scratch / "local")
            logged_db = open_store(scratch / "logged")
            local = asyncio.run(_pass(settings, local_db, 1, impressions, flush_events, False))
            logged = asyncio.run(_pass(settings, logged_db, 0, impressions, flush_events, True))
            fresh = open_store(scratch / "fresh")
            full = asyncio.run(_restore(settings, fresh, 0))
            current = asyncio.run(_restore(settings, logged_db, 0))
            for db in (local_db, logged_db, fresh):
                db.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    full["records_per_s"] = full["records"] / full["seconds"]
    return {
        "impressions": impressions,
        "flush_events": flush_events,
        "local_only": local,
        "with_changelog": logged,
        "restore_full": full,
        "restore_current": current,
    }


def main(impressions: int, flush_events: int, broker: str | None, out: Path) -> dict[str, Any]:
    result = run_changelog_bench(impressions, flush_events, broker)
    out.mkdir(parents=True, exist_ok=True)
    (out / "changelog.json").write_text(json.dumps(result, indent=2))
    return result

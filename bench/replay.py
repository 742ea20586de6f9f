"""Replay logged traffic through adloop, verify its counts, and measure it.

``adloop replay LOG`` (see ``bench/cli.py``) reads a log with ``bench.traffic_logs``, starts a
deployment (embedded broker unless ``--broker``; ingest, worker and serving API as
processes, topics of their own), registers the log's creatives on the creatives topic,
and publishes impressions, then each click ``click_delay_s`` later, keyed by
impression_id, as an exchange would. Then it checks that adloop counted exactly what
the log holds, at two levels:

* per creative × audience × placement, from the ingest's outcome snapshots (the
  ``outcomes`` topic; the decisions carry per-creative totals only), merged with the
  worker's own ``PosteriorState``;
* per creative × audience, from the decisions topic and from the serving API's
  ``GET …/decision``.

Event times are rebased onto the replay's clock: an impression's timestamp is the
moment it is published, and its click keeps the logged delay (``click_timestamp``) or
gets ``click_delay_s``. Replaying days of log in seconds with the original timestamps
would let the attribution window expire impressions before their clicks arrive; with
the rebased clock, ``last_event_at`` in the decisions is a publish time, which is what
the latency figures use. The expected counts apply adloop's counting rules
(``streams/join.py``, the ingest's own) to the log on that clock. A click logged more
than ``ADLOOP_MAX_CLOCK_SKEW_S`` (300 s) after its impression is published long before
its event time: adloop refuses it as ``timestamp_out_of_range``, and the expected
counts say so.

Measured (all in ``ReplayReport``): publish and adloop throughput, and the raw aiokafka
consume rate of the same messages on the same broker (the ceiling), consumer lag over
time, latency percentiles, dead letters, and CPU / peak memory per adloop process.

Modes: ``rate`` (impressions per second, paced), as fast as possible, or ``preload``
(publish everything first, then start adloop and time how fast it drains the topics:
the spine benchmark's method, the fair one for a ratio to the ceiling).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import numpy as np
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.progress import Progress

from adloop.bandit import BetaPrior
from adloop.bench.exchange import HttpSelector
from adloop.bench.harness import deployment, free_port, log_time, process_peaks, raw_consume_rate
from adloop.bench.traffic_logs import LoggedImpression
from adloop.schemas import (
    Click,
    Creative,
    CreativeCounts,
    DeadLetter,
    Decision,
    Impression,
    OutcomeSnapshot,
    decision_key,
    split_decision_key,
)
from adloop.streams.config import Settings
from adloop.streams.join import (
    Join,
    JoinRules,
    MemoryStore,
    Tally,
    count_attributed,
    rules_from_settings,
)
from adloop.streams.kafka_io import FetchWaitGovernor, consumer_kwargs, producer_kwargs
from adloop.streams.posterior import (
    PosteriorState,
    build_arms,
    build_decision,
    learn_increments,
    prior_for,
)
from adloop.streams.supervisor import Supervisor
from adloop.streams.topics import ensure_topics_sync

log = logging.getLogger("adloop.bench.replay")

Cell = tuple[str, str, str, str]  # campaign, audience, creative_id, placement
CreativeCell = tuple[str, str, str]  # campaign, audience, creative_id
Counts = tuple[int, int]  # impressions, clicks
WARMUP_CAMPAIGN = "replay-warmup"


# -- pure parts: what the log says adloop must count ----------------------------------------


def repeated(records: list[LoggedImpression], times: int) -> Iterator[LoggedImpression]:
    """The log ``times`` over; later passes get fresh ids (``<id>.r<k>``) so they count."""
    for k in range(times):
        for record in records:
            if k == 0:
                yield record
            else:
                imp = record.impression
                new_id = f"{imp.impression_id}.r{k}"
                yield LoggedImpression(
                    msgspec.structs.replace(imp, impression_id=new_id),
                    record.clicked,
                    record.click_timestamp,
                    record.line,
                )


def click_delay(record: LoggedImpression, default_s: float) -> float:
    """Event-time delay of a record's click: the logged one, else ``default_s``."""
    if record.click_timestamp is None:
        return default_s
    return record.click_timestamp - record.impression.timestamp


# Event time of every replayed impression in the expected counts. The replay stamps an
# impression with the moment it publishes it: a replay is shorter than the retention,
# so one time for all changes no rule, and each click keeps its delay from it.
_REPLAY_CLOCK = 0.0


def expected_counts(
    records: Iterable[LoggedImpression],
    rules: JoinRules,
    click_delay_s: float = 1.0,
    click_sent_after_s: float | None = None,
) -> dict[Cell, Counts]:
    """Counts per campaign × audience × creative × placement, by adloop's counting rules
    (``streams.join``) on the replay's clock: each impression stamped when published,
    its click ``click_delay`` after it, and sent ``click_sent_after_s`` after it (the
    wall time the ingest meets it at, at the earliest; default ``click_delay_s``, as
    the live modes send; preload sends at once).

    A logged click delay more than the clock skew (``rules.max_clock_skew_s``) beyond
    that is a click from the future when sent: ``timestamp_out_of_range``. Near that
    bound the outcome depends on how late the ingest reads the click."""
    sent_after = click_delay_s if click_sent_after_s is None else click_sent_after_s
    tally = Tally(rules)
    for record in records:
        imp = record.impression
        tally.impression(msgspec.structs.replace(imp, timestamp=_REPLAY_CLOCK), _REPLAY_CLOCK)
        if record.clicked:
            delay = click_delay(record, click_delay_s)
            click = Click(impression_id=imp.impression_id, timestamp=_REPLAY_CLOCK + delay)
            tally.attribute(click, _REPLAY_CLOCK + sent_after)
    return {cell: (c.impressions, c.clicks) for cell, c in tally.cells.items()}


def by_creative(cells: Mapping[Cell, Counts]) -> dict[CreativeCell, Counts]:
    """Sum over placements: what a decision shows per creative."""
    out: dict[CreativeCell, list[int]] = defaultdict(lambda: [0, 0])
    for (campaign, audience, creative, _placement), (n_imp, n_click) in cells.items():
        total = out[(campaign, audience, creative)]
        total[0] += n_imp
        total[1] += n_click
    return {k: (v[0], v[1]) for k, v in out.items()}


@dataclass(frozen=True)
class CountDifference:
    key: tuple[str, ...]
    expected: Counts
    observed: Counts

    def __str__(self) -> str:
        return (
            f"{' × '.join(self.key)}: log {self.expected[0]} impressions / "
            f"{self.expected[1]} clicks, adloop {self.observed[0]} / {self.observed[1]}"
        )


def compare_counts(
    expected: Mapping[Any, Counts], observed: Mapping[Any, Counts]
) -> list[CountDifference]:
    """Every key whose counts differ (a key missing on one side counts as zero)."""
    return [
        CountDifference(tuple(key), expected.get(key, (0, 0)), observed.get(key, (0, 0)))
        for key in sorted(set(expected) | set(observed))
        if tuple(expected.get(key, (0, 0))) != tuple(observed.get(key, (0, 0)))
    ]


def creatives_for(records: Iterable[LoggedImpression]) -> list[Creative]:
    """One registered creative per creative id in the log (ids belong to one campaign)."""
    campaign_of: dict[str, str] = {}
    for record in records:
        imp = record.impression
        known = campaign_of.setdefault(imp.creative_id, imp.campaign)
        if known != imp.campaign:
            raise ValueError(
                f"creative {imp.creative_id!r} appears in campaigns {known!r} and "
                f"{imp.campaign!r} (line {record.line}): adloop registers a creative id "
                "under one campaign; map them to distinct ids"
            )
    return [
        Creative(creative_id=cid, campaign=campaign, headline=f"Logged creative {cid}"[:90])
        for cid, campaign in sorted(campaign_of.items())
    ]


def percentiles(values: Iterable[float]) -> dict[str, float]:
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return {"n": 0.0}
    p50, p90, p95, p99 = np.percentile(arr, [50, 90, 95, 99])
    return {
        "n": float(arr.size),
        "p50": float(p50),
        "p90": float(p90),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(arr.max()),
    }


def per_event_latency_ms(
    published: Mapping[str, list[float]], decisions: Mapping[str, list[tuple[float, int]]]
) -> np.ndarray:
    """Per event: from its publish to the first decision of its campaign × audience that
    counts as many events as had been published by then (exact when a key's events are
    counted in publish order, which holds per partition)."""
    out = []
    for key, times in published.items():
        timeline = decisions.get(key)
        if not timeline or not times:
            continue
        updated = np.array([u for u, _ in timeline])
        counted = np.maximum.accumulate(np.array([c for _, c in timeline]))
        sent = np.sort(np.asarray(times))
        first = np.searchsorted(counted, np.arange(1, sent.size + 1), side="left")
        seen = first < counted.size
        out.append((updated[first[seen]] - sent[seen]) * 1000)
    return np.concatenate(out) if out else np.zeros(0)


# -- the pure engine on the same events: its ceiling without Kafka -------------------------


@dataclass
class EngineReport:
    events: int = 0
    events_per_s: float = 0.0  # decode + join + aggregate + posterior + decisions
    decisions: int = 0
    decision_ms: float = 0.0  # mean cost of one decision (the worker's per-key work)
    batch_events: int = 0
    select_per_s: float = 0.0  # one serving-style choice per call, as POST /v1/select
    thompson_draws_per_s: float = 0.0  # vectorized Thompson decisions (BetaArms)


def engine_ceiling(
    records: list[LoggedImpression],
    settings: Settings,
    batch_events: int = 20_000,
    selections: int = 20_000,
    seed: int = 0,
) -> EngineReport:
    """The same events through adloop's pure logic, in one process, no Kafka: decode,
    join clicks to impressions, aggregate per campaign × audience × creative × placement
    (the ingest), then per batch and changed key what the worker does with a snapshot:
    decode it, ``PosteriorState.apply``, ``learn_increments`` into the bandit engine, and
    ``build_decision`` (``streams.posterior``, configured by ``settings``)."""
    enc = msgspec.json.Encoder()
    events: list[tuple[bool, bytes]] = []
    for record in records:
        events.append((True, enc.encode(record.impression)))
    for record in records:
        if record.clicked:
            imp = record.impression
            click = Click(impression_id=imp.impression_id, timestamp=imp.timestamp + 1)
            events.append((False, enc.encode(click)))
    creatives = creatives_for(records)
    lookup = {c.creative_id: c for c in creatives}
    by_campaign: dict[str, list[Creative]] = defaultdict(list)
    for creative in creatives:
        by_campaign[creative.campaign].append(creative)
    config = settings.engine_config()

    def prior_of(creative_id: str) -> BetaPrior:
        return prior_for(lookup.get(creative_id))

    rng = np.random.default_rng(seed)
    decode_imp = msgspec.json.Decoder(Impression).decode
    decode_click = msgspec.json.Decoder(Click).decode
    decode_snapshot = msgspec.json.Decoder(OutcomeSnapshot).decode
    # The ingest's join and cumulative counts per key, and the worker's state per key.
    # No wall clock: the logged times are history.
    join = Join(rules_from_settings(settings), MemoryStore())
    counts: dict[str, dict[str, dict[str, CreativeCounts]]] = {}
    cells: dict[Cell, tuple[str, CreativeCounts]] = {}
    last_event: dict[str, float] = {}
    states: dict[str, PosteriorState] = {}

    def cell_of(rec: Any) -> tuple[str, CreativeCounts]:
        ident = (rec.campaign, rec.audience, rec.creative_id, rec.placement)
        found = cells.get(ident)
        if found is None:
            key = decision_key(rec.campaign, rec.audience)
            cell = (
                counts.setdefault(key, {})
                .setdefault(rec.creative_id, {})
                .setdefault(rec.placement, CreativeCounts())
            )
            found = cells[ident] = (key, cell)
        return found

    report = EngineReport(events=len(events), batch_events=batch_events)
    decisions: dict[str, Decision] = {}
    decision_s = 0.0
    started = time.perf_counter()
    for start in range(0, len(events), batch_events):
        dirty: set[str] = set()
        for is_impression, raw in events[start : start + batch_events]:
            if is_impression:
                imp = decode_imp(raw)
                if join.add_impression(imp, None) is not None:
                    continue
                key, cell = cell_of(imp)
                cell.impressions += 1
                last_event[key] = max(last_event.get(key, 0.0), imp.timestamp)
            else:
                click = decode_click(raw)
                outcome = join.attribute(click, None)
                if type(outcome) is str:
                    continue
                key, cell = cell_of(outcome)
                count_attributed(cell, click)
            dirty.add(key)
        for key in sorted(dirty):
            campaign, audience = split_decision_key(key)
            decision_started = time.perf_counter()
            snapshot = decode_snapshot(
                enc.encode(
                    OutcomeSnapshot(
                        campaign=campaign,
                        audience=audience,
                        sources={0: counts[key]},
                        emitted_at=time.time(),
                        last_event_at=last_event[key],
                    )
                )
            )
            state = states.setdefault(key, PosteriorState(sources={}))
            increments = state.apply(snapshot)
            learn_increments(state, increments, config, prior_of, snapshot.last_event_at)
            decisions[key] = build_decision(
                campaign,
                audience,
                state,
                by_campaign[campaign],
                lookup,
                rng,
                time.time(),
                engine_config=config,
                prior_of=prior_of,
            )
            report.decisions += 1
            decision_s += time.perf_counter() - decision_started
    elapsed = time.perf_counter() - started
    report.events_per_s = len(events) / elapsed if elapsed > 0 else 0.0
    report.decision_ms = decision_s / max(1, report.decisions) * 1000
    if decisions:
        # Serving: one choice per request from the latest decision's probabilities.
        decision = max(decisions.values(), key=lambda d: d.impressions)
        ids = [c.creative_id for c in decision.creatives]
        probs = np.array([c.serving_probability for c in decision.creatives])
        probs = probs / probs.sum()
        started = time.perf_counter()
        for _ in range(selections):
            ids[int(rng.choice(len(ids), p=probs))]
        report.select_per_s = selections / (time.perf_counter() - started)
        arms = build_arms(
            by_campaign[decision.campaign],
            states[decision_key(decision.campaign, decision.audience)].totals(),
        )
        started = time.perf_counter()
        arms.thompson_select_many(rng, 200_000)
        report.thompson_draws_per_s = 200_000 / (time.perf_counter() - started)
    return report


# -- the live part ----------------------------------------------------------------------


@dataclass
class ReplayOptions:
    rate: float | None = 2000.0  # impressions per second; None: as fast as possible
    preload: bool = False
    click_delay_s: float = 1.0
    repeat: int = 1
    settle_timeout_s: float = 180.0
    stall_timeout_s: float = 30.0
    # How long the serving API may lag behind the decisions topic at the end.
    http_timeout_s: float = 15.0
    sample_interval_s: float = 0.25

    @property
    def mode(self) -> str:
        if self.preload:
            return "preload (publish all, then start adloop)"
        return f"{self.rate:,.0f} impressions/s" if self.rate else "as fast as possible"


@dataclass
class ReplayReport:
    log: str = ""
    mode: str = ""
    repeat: int = 1
    broker: str = "embedded"
    rows_read: int = 0
    malformed_rows: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    impressions_published: int = 0
    clicks_published: int = 0
    expected_impressions: int = 0
    expected_clicks: int = 0
    cells: int = 0
    publish_s: float = 0.0
    publish_events_per_s: float = 0.0  # until the last click was sent
    impressions_per_s: float = 0.0  # the offered impression rate
    adloop_s: float = 0.0
    adloop_events_per_s: float = 0.0
    ingest_peak_events_per_s: float = 0.0
    ceiling_events_per_s: float = 0.0
    ratio: float = 0.0
    counts_verified: bool = False
    differences: list[str] = field(default_factory=list)
    n_differences: int = 0
    decisions_verified: bool = False
    http_verified: bool | None = None
    dead_letters: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    lag_max: dict[str, float] = field(default_factory=dict)
    process_usage: dict[str, dict[str, float]] = field(default_factory=dict)
    timeline: list[dict[str, float]] = field(default_factory=list)
    latency_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    engine: dict[str, float] | None = None
    wall_s: float = 0.0

    @property
    def events_published(self) -> int:
        return self.impressions_published + self.clicks_published

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PublishStats:
    """What the replay has sent and the broker has acknowledged, and when."""

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.failed: list[BaseException] = []
        self.sent_at: dict[str, list[float]] = defaultdict(list)  # decision key -> times

    def on_ack(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self.acked += 1
        else:
            self.failed.append(exc)


class Observer:
    """Follows adloop's outputs (outcome snapshots, decisions, dead letters) from the
    beginning of their topics, and samples lag and process usage over time."""

    def __init__(
        self,
        settings: Settings,
        campaigns: set[str],
        stats: PublishStats,
        processes: Mapping[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.campaigns = campaigns
        self.stats = stats
        self.states: dict[str, PosteriorState] = {}
        self.decisions: dict[str, Decision] = {}
        self.dead_letters: Counter[str] = Counter()
        self.timeline: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.decision_ms: list[float] = []  # newest event published -> decision published
        self.snapshot_ms: list[float] = []  # newest event published -> outcome snapshot
        self.samples: list[dict[str, float]] = []
        self.started = time.time()
        self.processes = {role: psutil.Process(pid) for role, pid in (processes or {}).items()}
        self._consumer: AIOKafkaConsumer | None = None
        self._offsets: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._snapshot = msgspec.json.Decoder(OutcomeSnapshot)
        self._decision = msgspec.json.Decoder(Decision)
        self._dead = msgspec.json.Decoder(DeadLetter)
        s = settings
        self._roles = {s.topic("outcomes"): 0, s.topic("decisions"): 1, s.topic("dead_letter"): 2}
        self._outcome_tps = [TopicPartition(s.topic("outcomes"), p) for p in range(s.partitions)]

    async def start(self) -> None:
        s = self.settings
        self._consumer = AIOKafkaConsumer(
            **consumer_kwargs(s, group_id=None, fetch_max_wait_ms=s.fetch_wait_ms)
        )
        await self._consumer.start()
        self._fetch_wait = FetchWaitGovernor(self._consumer, s.fetch_wait_ms)
        tps = [TopicPartition(t, p) for t in self._roles for p in range(s.partitions)]
        self._consumer.assign(tps)
        for tp in tps:
            self._consumer.seek(tp, 0)
        # The worker's committed offsets, read through a consumer of its group that never
        # subscribes (so it never joins or disturbs the group).
        self._offsets = AIOKafkaConsumer(
            **consumer_kwargs(s, group_id=s.group_id("worker"), enable_auto_commit=False)
        )
        await self._offsets.start()
        for proc in self.processes.values():
            proc.cpu_percent(None)
        self._tasks = [
            asyncio.create_task(self._follow(), name="observe-outputs"),
        ]

    def start_sampling(self, interval_s: float) -> None:
        self._tasks.append(asyncio.create_task(self._sample(interval_s), name="observe-lag"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for consumer in (self._consumer, self._offsets):
            if consumer is not None:
                await consumer.stop()

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
            self._fetch_wait.observe(batches)
            for tp, records in batches.items():
                role = self._roles[tp.topic]
                for record in records:
                    if record.value is None:
                        continue
                    if role == 0:
                        self._on_snapshot(self._snapshot.decode(record.value))
                    elif role == 1:
                        self._on_decision(self._decision.decode(record.value))
                    else:
                        self.dead_letters[self._dead.decode(record.value).reason_code] += 1

    def _on_snapshot(self, snapshot: OutcomeSnapshot) -> None:
        key = decision_key(snapshot.campaign, snapshot.audience)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = PosteriorState(sources={})
        state.apply(snapshot)
        if snapshot.campaign in self.campaigns and snapshot.last_event_at:
            self.snapshot_ms.append((snapshot.emitted_at - snapshot.last_event_at) * 1000)

    def _on_decision(self, decision: Decision) -> None:
        key = decision_key(decision.campaign, decision.audience)
        self.decisions[key] = decision
        if decision.campaign not in self.campaigns:
            return
        self.timeline[key].append((decision.updated_at, decision.impressions + decision.clicks))
        if decision.last_event_at:
            self.decision_ms.append((decision.updated_at - decision.last_event_at) * 1000)

    # -- views ------------------------------------------------------------------------
    def ingest_counted(self) -> int:
        total = 0
        for state in self.states.values():
            for counts in state.totals().values():
                total += counts.impressions + counts.clicks
        return total

    def decisions_counted(self) -> int:
        return sum(d.impressions + d.clicks for d in self.decisions.values())

    def cells(self) -> dict[Cell, Counts]:
        out = {}
        for key, state in self.states.items():
            campaign, audience = split_decision_key(key)
            if campaign not in self.campaigns:
                continue
            for (creative, placement), c in state.by_placement().items():
                out[(campaign, audience, creative, placement)] = (c.impressions, c.clicks)
        return out

    def decision_cells(self) -> dict[CreativeCell, Counts]:
        out = {}
        for decision in self.decisions.values():
            if decision.campaign not in self.campaigns:
                continue
            for row in decision.creatives:
                if row.impressions or row.clicks:
                    key = (decision.campaign, decision.audience, row.creative_id)
                    out[key] = (row.impressions, row.clicks)
        return out

    async def _worker_lag(self) -> float:
        """Outcome messages the worker has not committed yet (fetch high watermark minus
        its group's committed offset; Faust commits every few seconds)."""
        assert self._consumer is not None and self._offsets is not None
        lag = 0.0
        for tp in self._outcome_tps:
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            committed = await self._offsets.committed(tp)
            lag += max(0, high - (committed or 0))
        return lag

    async def _sample(self, interval_s: float) -> None:
        while True:
            row: dict[str, float] = {
                "t": time.time() - self.started,
                "published": float(self.stats.acked),
                "ingested": float(self.ingest_counted() + sum(self.dead_letters.values())),
                "decided": float(self.decisions_counted()),
            }
            try:
                row["worker_lag_msgs"] = await self._worker_lag()
            except Exception as exc:  # lag is informational; never stop the run for it
                log.debug("worker lag unavailable: %r", exc)
            for role, proc in self.processes.items():
                try:
                    row[f"{role}_cpu_pct"] = proc.cpu_percent(None)
                    row[f"{role}_rss_mb"] = proc.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    pass
            row["ingest_lag_events"] = max(0.0, row["published"] - row["ingested"])
            row["decision_lag_events"] = max(0.0, row["ingested"] - row["decided"])
            self.samples.append(row)
            await asyncio.sleep(interval_s)

    def sample_now(self) -> None:
        """A final sample without the (awaited) worker-lag lookup."""
        self.samples.append(
            {
                "t": time.time() - self.started,
                "published": float(self.stats.acked),
                "ingested": float(self.ingest_counted() + sum(self.dead_letters.values())),
                "decided": float(self.decisions_counted()),
                "ingest_lag_events": 0.0,
                "decision_lag_events": 0.0,
            }
        )


async def _send_creatives(producer: AIOKafkaProducer, settings: Settings, items: list[Creative]):
    enc = msgspec.json.Encoder()
    futures = [
        await producer.send(settings.topic("creatives"), enc.encode(c), key=c.creative_id.encode())
        for c in items
    ]
    await asyncio.gather(*futures)


async def publish(
    producer: AIOKafkaProducer,
    settings: Settings,
    records: list[LoggedImpression],
    options: ReplayOptions,
    stats: PublishStats,
    progress: Progress | None = None,
) -> tuple[int, int, float]:
    """Impressions in log order (paced at ``options.rate``), each click
    ``options.click_delay_s`` after its impression; returns (impressions, clicks, seconds
    until the last impression was handed to the producer)."""
    enc = msgspec.json.Encoder()
    imp_topic, click_topic = settings.topic("impressions"), settings.topic("clicks")
    due: deque[tuple[float, str, bytes, bytes]] = deque()  # (monotonic due, key, id, value)
    task = progress.add_task("publishing", total=len(records)) if progress else None
    n_clicks = 0
    delay = 0.0 if options.preload else options.click_delay_s

    async def send(topic: str, key: str, impression_id: bytes, value: bytes) -> None:
        future = await producer.send(topic, value, key=impression_id)
        future.add_done_callback(stats.on_ack)
        stats.sent += 1
        stats.sent_at[key].append(time.time())

    started = time.monotonic()
    for i, record in enumerate(records):
        now = time.time()
        imp = msgspec.structs.replace(record.impression, timestamp=now)
        key = decision_key(imp.campaign, imp.audience)
        impression_id = imp.impression_id.encode()
        await send(imp_topic, key, impression_id, enc.encode(imp))
        if record.clicked:
            event_time = now + click_delay(record, options.click_delay_s)
            click = Click(impression_id=imp.impression_id, timestamp=event_time)
            due.append((time.monotonic() + delay, key, impression_id, enc.encode(click)))
        mono = time.monotonic()
        while due and due[0][0] <= mono:
            _, ckey, cid, value = due.popleft()
            await send(click_topic, ckey, cid, value)
            n_clicks += 1
        ahead = (i + 1) / options.rate - (mono - started) if options.rate else 0.0
        if ahead > 0.002 and not options.preload:
            await asyncio.sleep(ahead)
        elif i % 100 == 0:
            # send() rarely suspends: without this, a publisher that runs behind its rate
            # would starve the observer and the lag sampler in the same event loop.
            await asyncio.sleep(0)
        if progress is not None and task is not None and i % 1000 == 0:
            progress.update(task, completed=i)
    impressions_s = time.monotonic() - started
    while due:
        wait = due[0][0] - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        _, ckey, cid, value = due.popleft()
        await send(click_topic, ckey, cid, value)
        n_clicks += 1
    await producer.flush()
    if progress is not None and task is not None:
        progress.update(task, completed=len(records))
    return len(records), n_clicks, impressions_s


def _producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **producer_kwargs(settings, linger_ms=5, acks=1, max_batch_size=1 << 20)
    )


async def _warm_up(producer: AIOKafkaProducer, settings: Settings, observer: Observer) -> None:
    """One impression on a campaign of its own, until its decision is out: the worker
    has joined its group and read the registry before the measured traffic starts."""
    creative = Creative(creative_id="replay-warmup-c0", campaign=WARMUP_CAMPAIGN, headline="W")
    await _send_creatives(producer, settings, [creative])
    imp = Impression(
        impression_id="replay-warmup-0",
        timestamp=time.time(),
        campaign=WARMUP_CAMPAIGN,
        audience="warmup",
        placement="default",
        creative_id=creative.creative_id,
        propensity=1.0,
        policy="warmup",
    )
    future = await producer.send(
        settings.topic("impressions"), msgspec.json.encode(imp), key=b"replay-warmup-0"
    )
    future.add_done_callback(observer.stats.on_ack)
    deadline = time.monotonic() + 120
    while decision_key(WARMUP_CAMPAIGN, "warmup") not in observer.decisions:
        if time.monotonic() > deadline:
            raise TimeoutError("adloop published no decision for the warm-up impression in 120 s")
        await asyncio.sleep(0.05)


async def _settle(
    observer: Observer,
    expected: dict[Cell, Counts],
    options: ReplayOptions,
    check: Callable[[], None],
    progress: Progress | None,
) -> bool:
    """Wait until adloop's counts equal the log's; False after a stall or the timeout."""
    expected_creatives = by_creative(expected)
    want = sum(i + c for i, c in expected.values())
    task = progress.add_task("counted by adloop", total=want) if progress else None
    deadline = time.monotonic() + options.settle_timeout_s
    last_progress, last_value = time.monotonic(), -1
    try:
        while time.monotonic() < deadline:
            check()
            cells_ok = not compare_counts(expected, observer.cells())
            if cells_ok and not compare_counts(expected_creatives, observer.decision_cells()):
                return True
            value = observer.ingest_counted() + observer.decisions_counted()
            if value != last_value:
                last_progress, last_value = time.monotonic(), value
            elif time.monotonic() - last_progress > options.stall_timeout_s:
                return False
            if progress is not None and task is not None:
                counted = sum(i + c for i, c in observer.decision_cells().values())
                progress.update(task, completed=counted)
            await asyncio.sleep(0.05)
        return False
    finally:
        if progress is not None and task is not None:
            progress.remove_task(task)


def _http_check(
    settings: Settings, expected: dict[CreativeCell, Counts], timeout_s: float = 15.0
) -> list[str]:
    """The serving API's decisions against the log, per creative × audience."""
    api = HttpSelector.local(settings)
    keys = sorted({(c, a) for c, a, _ in expected})
    deadline = time.monotonic() + timeout_s
    while True:
        observed: dict[CreativeCell, Counts] = {}
        for campaign, audience in keys:
            path = (
                f"/v1/campaigns/{urllib.parse.quote(campaign, safe='')}"
                f"/audiences/{urllib.parse.quote(audience, safe='')}/decision"
            )
            status, body = api.get(path)
            if status != 200:
                continue
            for row in body["creatives"]:
                if row["impressions"] or row["clicks"]:
                    observed[(campaign, audience, row["creative_id"])] = (
                        row["impressions"],
                        row["clicks"],
                    )
        differences = compare_counts(expected, observed)
        # The serving process follows the decisions topic: give it a moment to catch up.
        if not differences or time.monotonic() > deadline:
            return [str(d) for d in differences]
        time.sleep(0.2)


def _finish(
    report: ReplayReport, observer: Observer, expected: dict[Cell, Counts], started: float
) -> None:
    differences = compare_counts(expected, observer.cells())
    decision_differences = compare_counts(by_creative(expected), observer.decision_cells())
    report.n_differences = len(differences) + len(decision_differences)
    report.differences = [f"outcomes: {d}" for d in differences[:50]] + [
        f"decisions: {d}" for d in decision_differences[:50]
    ]
    report.counts_verified = not differences
    report.decisions_verified = not decision_differences
    report.dead_letters = dict(observer.dead_letters)
    report.timeline = observer.samples
    for name in ("ingest_lag_events", "decision_lag_events", "worker_lag_msgs"):
        values = [s[name] for s in observer.samples if name in s]
        if values:
            report.lag_max[name] = float(max(values))
    ingested = np.array([(s["t"], s["ingested"]) for s in observer.samples])
    if len(ingested) > 4:
        # Peak ingest rate over ~1 s windows of the samples.
        step = max(1, round(1.0 / max(1e-3, np.median(np.diff(ingested[:, 0])))))
        dt = ingested[step:, 0] - ingested[:-step, 0]
        rates = (ingested[step:, 1] - ingested[:-step, 1]) / np.where(dt > 0, dt, np.inf)
        report.ingest_peak_events_per_s = float(rates.max()) if rates.size else 0.0
    final = [d for d in observer.decisions.values() if d.campaign in observer.campaigns]
    if final and report.counts_verified:
        done_at = max(d.updated_at for d in final)
        report.adloop_s = done_at - started
        if report.adloop_s > 0:
            report.adloop_events_per_s = report.events_published / report.adloop_s


@contextlib.contextmanager
def _deployment(settings: Settings | None, broker: str | None) -> Iterator[Settings]:
    """Given settings as they are (topics created), else a fresh namespaced deployment.
    The worker's web server is off: nothing here reads it, and its fixed port could
    collide with another deployment on the machine."""
    if settings is not None:
        live = settings.with_overrides(api_port=free_port(), worker_web_port=0)
        ensure_topics_sync(live)
        yield live
    else:
        with deployment(broker, api_port=free_port(), worker_web_port=0) as live:
            yield live


def run_replay(
    records: list[LoggedImpression],
    options: ReplayOptions,
    broker: str | None = None,
    console: Console | None = None,
    log_name: str = "",
    settings: Settings | None = None,
) -> ReplayReport:
    """Replay ``records`` (``options.repeat`` times) through a fresh deployment: on
    ``broker`` (embedded when None), or on ``settings``' broker and topics when given."""
    console = console or Console(stderr=True)
    wall_started = time.monotonic()
    report = ReplayReport(
        log=log_name, mode=options.mode, repeat=options.repeat, broker=broker or "embedded"
    )
    records = list(repeated(records, options.repeat))
    creatives = creatives_for(records)
    campaigns = {c.campaign for c in creatives}
    with _deployment(settings, broker) as settings:
        expected = expected_counts(
            records,
            rules_from_settings(settings),
            options.click_delay_s,
            click_sent_after_s=0.0 if options.preload else options.click_delay_s,
        )
        report.cells = len(expected)
        report.expected_impressions = sum(i for i, _ in expected.values())
        report.expected_clicks = sum(c for _, c in expected.values())
        stats = PublishStats()
        if options.preload:
            _preloaded(
                settings, records, creatives, campaigns, expected, options, stats, report, console
            )
        else:
            _live(
                settings, records, creatives, campaigns, expected, options, stats, report, console
            )
        if stats.failed:
            raise RuntimeError(
                f"{len(stats.failed)} events were not acknowledged: {stats.failed[0]!r}"
            )
        # The ceiling: the same messages, same broker, adloop stopped.
        report.ceiling_events_per_s = asyncio.run(raw_consume_rate(settings, stats.acked))
        # Only a drained backlog measures adloop's rate; a paced replay measures the pace.
        if options.preload and report.adloop_events_per_s and report.ceiling_events_per_s:
            report.ratio = report.adloop_events_per_s / report.ceiling_events_per_s
    report.wall_s = time.monotonic() - wall_started
    return report


async def _publish_and_record(
    producer: Any,
    settings: Settings,
    records: list[LoggedImpression],
    options: ReplayOptions,
    stats: PublishStats,
    progress: Progress,
    report: ReplayReport,
) -> float:
    """Publish the log and record the publishing figures; returns when it started."""
    started = time.time()
    n_imp, n_click, impressions_s = await publish(
        producer, settings, records, options, stats, progress
    )
    report.publish_s = time.time() - started
    report.impressions_published, report.clicks_published = n_imp, n_click
    report.publish_events_per_s = (n_imp + n_click) / report.publish_s
    report.impressions_per_s = n_imp / impressions_s
    return started


def _live(
    settings: Settings,
    records: list[LoggedImpression],
    creatives: list[Creative],
    campaigns: set[str],
    expected: dict[Cell, Counts],
    options: ReplayOptions,
    stats: PublishStats,
    report: ReplayReport,
    console: Console,
) -> None:
    with Supervisor(settings) as sup:
        sup.wait_http_ready()
        pids = {role: child.pid for role, child in sup.children.items()}

        async def main() -> None:
            observer = Observer(settings, campaigns, stats, pids)
            producer = _producer(settings)
            await producer.start()
            await observer.start()
            try:
                await _send_creatives(producer, settings, creatives)
                await _warm_up(producer, settings, observer)
                observer.start_sampling(options.sample_interval_s)
                with Progress(console=console, transient=True) as progress:
                    started = await _publish_and_record(
                        producer, settings, records, options, stats, progress, report
                    )
                    await _settle(observer, expected, options, sup.check, progress)
                observer.sample_now()
                _finish(report, observer, expected, started)
                report.latency_samples_ms = {
                    "per event: publish -> decision published": per_event_latency_ms(
                        {
                            k: v
                            for k, v in stats.sent_at.items()
                            if split_decision_key(k)[0] in campaigns
                        },
                        observer.timeline,
                    ).tolist(),
                    "newest event: publish -> outcome snapshot (ingest)": observer.snapshot_ms,
                    "newest event: publish -> decision published (worker)": observer.decision_ms,
                }
            finally:
                await observer.stop()
                await producer.stop()

        asyncio.run(main())
        report.latency_ms = {k: percentiles(v) for k, v in report.latency_samples_ms.items()}
        report.http_verified = not _http_check(
            settings, by_creative(expected), options.http_timeout_s
        )
        report.process_usage = process_peaks(sup)


def _preloaded(
    settings: Settings,
    records: list[LoggedImpression],
    creatives: list[Creative],
    campaigns: set[str],
    expected: dict[Cell, Counts],
    options: ReplayOptions,
    stats: PublishStats,
    report: ReplayReport,
    console: Console,
) -> None:
    async def load() -> None:
        producer = _producer(settings)
        await producer.start()
        try:
            await _send_creatives(producer, settings, creatives)
            with Progress(console=console, transient=True) as progress:
                await _publish_and_record(
                    producer, settings, records, options, stats, progress, report
                )
        finally:
            await producer.stop()

    asyncio.run(load())
    # The worker first (it has nothing to do until ingest emits), then ingest, as the
    # spine benchmark does: the clock starts when ingest is assigned its partitions.
    with Supervisor(settings, roles=("worker", "serve", "ingest")) as sup:
        pids = {role: child.pid for role, child in sup.children.items()}

        async def main() -> None:
            observer = Observer(settings, campaigns, stats, pids)
            await observer.start()
            observer.start_sampling(options.sample_interval_s)
            try:
                with Progress(console=console, transient=True) as progress:
                    await _settle(observer, expected, options, sup.check, progress)
                observer.sample_now()
                started = log_time(sup.log_path("ingest"), "partitions assigned")
                _finish(report, observer, expected, started)
                # Time axis from the moment ingest started reading.
                for sample in observer.samples:
                    sample["t"] -= started - observer.started
            finally:
                await observer.stop()

        asyncio.run(main())
        sup.wait_http_ready()
        report.http_verified = not _http_check(
            settings, by_creative(expected), options.http_timeout_s
        )
        report.process_usage = process_peaks(sup)

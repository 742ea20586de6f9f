"""Chaos run (issue 13): SIGKILL every role, again and again, while a replay runs with
the loop on; then check that nothing was lost and nothing happened twice.

    adloop bench chaos [--events 200000] [--kills-per-role 5] [--seed 1] [--out results/]

The whole stack runs under the supervisor, as ``adloop up`` runs it: ingest, worker,
serve, the loop controller and the generator (the real one: SmolLM2 and the CTR model,
asked for few variants with a short time limit, so that it answers within the run on
two CPU cores). A producer thread replays impressions and clicks at ``--rate``. Kill
points are *event counts* drawn from ``--seed``: once the decisions count that many
events (impressions + clicks), the role named there is SIGKILLed and the supervisor
restarts it (a kill point waits for its role to be running again). Afterwards:

* counts exact: every campaign × audience's impressions and clicks, on the decisions
  topic and as serving answers them, equal what was published;
* every generation request on the requests topic once, with exactly one result;
* no creative id with two different contents on the creatives topic, no two generated
  creatives with the same text;
* dead letters: none (the input holds no bad record), shown by sentinels: one
  malformed record per partition, read back behind everything else.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from adloop.bench.exchange import HttpSelector
from adloop.bench.harness import deployment, free_port
from adloop.schemas import Click, Creative, Impression
from adloop.streams.config import Settings
from adloop.streams.kafka_io import kafka_python_kwargs
from adloop.streams.supervisor import ALL_ROLES, RestartPolicy, Supervisor

CAMPAIGNS = ["chaos-a", "chaos-b"]
AUDIENCES = ["students", "runners", "parents"]
#: Per creative of each campaign: its click-through rate. c0 underperforms clearly, so
#: the loop asks for variants to replace it.
CTRS = [0.01, 0.03, 0.05, 0.05, 0.06]
CLICK_RATE_HINT = float(np.mean(CTRS))
#: A click is published this many impressions after its own (its event time follows).
CLICK_LAG = 200
SENTINEL = b"chaos sentinel"


@dataclass
class Kill:
    role: str
    planned_at: int
    at_events: int
    at_s: float
    pid: int
    wall: float = 0.0


@dataclass
class ChaosReport:
    command: str = ""
    seed: int = 1
    events: int = 0
    impressions: int = 0
    clicks: int = 0
    rate: float = 0.0
    duration_s: float = 0.0
    replay_s: float = 0.0
    settle_s: float = 0.0
    kills: list[Kill] = field(default_factory=list)
    kills_per_role: dict[str, int] = field(default_factory=dict)
    # Generator kills that landed while a request was being generated (published before
    # the kill, its result after it).
    generator_kills_mid_request: int = 0
    restarts_per_role: dict[str, int] = field(default_factory=dict)
    keys: int = 0
    counts_exact: bool = False
    serving_counts_exact: bool = False
    count_mismatches: dict[str, Any] = field(default_factory=dict)
    requests: int = 0
    request_ids_published_twice: list[str] = field(default_factory=list)
    results: int = 0
    requests_without_result: list[str] = field(default_factory=list)
    requests_answered_twice: list[str] = field(default_factory=list)
    results_without_request: list[str] = field(default_factory=list)
    results_ok: int = 0
    # The loop retries a request with no result after generation_timeout_s under a new
    # id (attempt -a2, -a3): retries, and request stems answered "ok" more than once
    # (an attempt answered after its retry was sent: both sets of variants exist).
    retries: int = 0
    stems_answered_ok_more_than_once: list[str] = field(default_factory=list)
    results_failed: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    generated_creatives: int = 0
    creative_records: int = 0
    creative_ids_with_two_contents: list[str] = field(default_factory=list)
    duplicate_variants: list[list[str]] = field(default_factory=list)
    dead_letters: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.counts_exact
            and self.serving_counts_exact
            and not self.request_ids_published_twice
            and not self.requests_without_result
            and not self.requests_answered_twice
            and not self.results_without_request
            and not self.creative_ids_with_two_contents
            and not self.duplicate_variants
            and self.dead_letters == 0
        )


def base_creatives() -> list[Creative]:
    return [
        Creative(
            creative_id=f"{campaign}-c{i}",
            campaign=campaign,
            headline=f"Running shoes, offer {i}",
            description=f"Lightweight running shoes: offer number {i} this week.",
        )
        for campaign in CAMPAIGNS
        for i in range(len(CTRS))
    ]


def chaos_events(
    total_events: int, seed: int
) -> tuple[list[tuple[str, bytes, bytes]], dict[str, tuple[int, int]]]:
    """(topic role, key, value) in publication order, and the expected (impressions,
    clicks) per campaign|audience. Each click follows its impression by ``CLICK_LAG``
    impressions, in publication order and in event time."""
    rng = np.random.default_rng(seed)
    n = round(total_events / (1 + CLICK_RATE_HINT))
    enc = msgspec.json.Encoder()
    t0 = time.time() - n * 1e-3 - 120.0
    campaign_ix = rng.integers(len(CAMPAIGNS), size=n)
    audience_ix = rng.integers(len(AUDIENCES), size=n)
    creative_ix = rng.integers(len(CTRS), size=n)
    clicked = rng.random(n) < np.asarray(CTRS)[creative_ix]
    expected: dict[str, list[int]] = {}
    out: list[tuple[str, bytes, bytes]] = []
    pending: list[tuple[int, bytes]] = []  # (publish after impression #, click)
    for i in range(n):
        campaign, audience = CAMPAIGNS[campaign_ix[i]], AUDIENCES[audience_ix[i]]
        impression_id = f"x{i:09d}"
        key = impression_id.encode()
        ts = t0 + i * 1e-3
        out.append(
            (
                "impressions",
                key,
                enc.encode(
                    Impression(
                        impression_id=impression_id,
                        timestamp=ts,
                        campaign=campaign,
                        audience=audience,
                        placement="feed",
                        creative_id=f"{campaign}-c{creative_ix[i]}",
                        propensity=1 / len(CTRS),
                        policy="uniform",
                    )
                ),
            )
        )
        cell = expected.setdefault(f"{campaign}|{audience}", [0, 0])
        cell[0] += 1
        if clicked[i]:
            cell[1] += 1
            click = enc.encode(Click(impression_id=impression_id, timestamp=ts + CLICK_LAG * 1e-3))
            pending.append((i + CLICK_LAG, click))
        while pending and pending[0][0] <= i:
            _, value = pending.pop(0)
            out.append(("clicks", _key_of(value), value))
    for _, value in pending:
        out.append(("clicks", _key_of(value), value))
    return out, {k: (v[0], v[1]) for k, v in expected.items()}


def _key_of(click: bytes) -> bytes:
    return msgspec.json.decode(click)["impression_id"].encode()


def kill_plan(
    total_events: int, kills_per_role: int, seed: int, roles: tuple[str, ...] = ALL_ROLES
) -> list[tuple[int, str]]:
    """(event count, role), sorted: each role ``kills_per_role`` times, at counts drawn
    uniformly between 3 % and 90 % of the run (from ``seed``)."""
    rng = np.random.default_rng(seed + 1_000)
    order = list(rng.permutation(np.repeat(np.asarray(roles), kills_per_role)))
    points = np.sort(rng.uniform(0.03, 0.90, size=len(order)) * total_events).astype(int)
    return [(int(p), str(r)) for p, r in zip(points, order, strict=True)]


class Producer(threading.Thread):
    """Publishes the events at ``rate`` events/s (another thread: the main one kills)."""

    def __init__(self, settings: Settings, events: list[tuple[str, bytes, bytes]], rate: float):
        super().__init__(daemon=True)
        self.settings, self.events, self.rate = settings, events, rate
        self.sent = 0
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producer = KafkaProducer(
                **kafka_python_kwargs(
                    KafkaProducer, self.settings, linger_ms=20, acks="all", batch_size=256 << 10
                )
            )
            topics = {r: self.settings.topic(r) for r in ("impressions", "clicks")}
            started = time.monotonic()
            for i, (role, key, value) in enumerate(self.events):
                producer.send(topics[role], value=value, key=key)
                self.sent = i + 1
                if i % 200 == 0:
                    ahead = self.sent / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            producer.flush()
            producer.close()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.done.set()


class DecisionCounts:
    """The latest decision per campaign|audience, from the decisions topic."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = KafkaConsumer(
            **kafka_python_kwargs(KafkaConsumer, settings, auto_offset_reset="earliest")
        )
        tps = [TopicPartition(settings.topic("decisions"), p) for p in range(settings.partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.totals: dict[str, tuple[int, int]] = {}

    def poll(self, timeout_ms: int = 200) -> int:
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                body = json.loads(record.value)
                self.totals[record.key.decode()] = (body["impressions"], body["clicks"])
        return sum(i + c for i, c in self.totals.values())

    def close(self) -> None:
        self.consumer.close()


def read_topic(settings: Settings, role: str, quiet_ms: int = 3000) -> list[Any]:
    """Every record of a topic, from the start, until ``quiet_ms`` without one."""
    consumer = KafkaConsumer(
        **kafka_python_kwargs(
            KafkaConsumer, settings, auto_offset_reset="earliest", consumer_timeout_ms=quiet_ms
        )
    )
    tps = [TopicPartition(settings.topic(role), p) for p in range(settings.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records = list(consumer)
    consumer.close()
    return records


def opt_in(api: HttpSelector, campaign: str, budget: int, n_variants: int) -> None:
    from adloop.bench.textsim import BRIEF, DESCRIPTIONS

    body = {
        "reason": "chaos bench: the loop on, variants live without review",
        "brief": msgspec.to_builtins(BRIEF),
        "auto_approve": True,
        "cooldown_s": 5.0,
        "n_variants": n_variants,
        "generation_budget": budget,
        "max_live_per_audience": len(CTRS) + 4,
        "audience_descriptions": DESCRIPTIONS,
    }
    status, payload = api.call("PUT", f"/v1/campaigns/{campaign}/settings", body)
    if status != 200:
        raise RuntimeError(f"campaign settings refused: {payload}")


def _retrying(fn: Any, what: str, timeout: float = 120.0) -> Any:
    """Serving may be down (killed) for a moment: retry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"serving did not answer for {what}") from None
            time.sleep(0.5)


def run(
    events: int,
    kills_per_role: int,
    seed: int,
    out: Path,
    rate: float = 1000.0,
    budget: int = 4,
    n_variants: int = 2,
    generator_time_limit_s: float = 60.0,
    broker: str | None = None,
    command: str = "",
) -> ChaosReport:
    console = Console(stderr=True)
    # Every kill is reported in the progress lines: not also as the supervisor's
    # warning with a log tail, nor as the clients' connection warnings.
    for name in ("adloop.supervisor", "kafka"):
        logging.getLogger(name).setLevel(logging.ERROR)
    report = ChaosReport(command=command, seed=seed, rate=rate)
    stream, expected = chaos_events(events, seed)
    report.events = len(stream)
    report.impressions = sum(i for i, _ in expected.values())
    report.clicks = sum(c for _, c in expected.values())
    report.keys = len(expected)
    plan = kill_plan(report.events, kills_per_role, seed)
    started = time.monotonic()
    with deployment(
        broker,
        api_port=free_port(),
        # Judge creatives on less evidence than a real campaign would, so the loop asks
        # for variants during the run; a short generation limit and few variants, so the
        # generator (the real one) answers on two CPU cores.
        min_evidence=400,
        generator_seed=seed,
        generator_time_limit_s=generator_time_limit_s,
        generation_timeout_s=max(240.0, 3 * generator_time_limit_s),
    ) as settings:
        # The bench kills each role again and again on purpose: restart at once,
        # never hold a role back as a crash loop.
        policy = RestartPolicy(first_delay_s=0.5, max_delay_s=2.0, crash_loop_exits=10_000)
        with Supervisor(settings, roles=ALL_ROLES, policy=policy) as sup:
            sup.wait_http_ready(timeout=120)
            api = HttpSelector.local(settings)
            for creative in base_creatives():
                api.register(creative)
            for campaign in CAMPAIGNS:
                opt_in(api, campaign, budget, n_variants)
            console.print(
                f"[bold]adloop bench chaos[/]: {report.events:,} events at {rate:,.0f}/s, "
                f"{len(plan)} kills ({kills_per_role} per role), seed {seed}; logs in "
                f"{sup.log_dir}"
            )
            replay_started = time.monotonic()
            _replay(settings, sup, stream, expected, plan, rate, report, console)
            report.replay_s = time.monotonic() - replay_started
            settle_started = time.monotonic()
            _settle_loop(settings, sup, report, console)
            report.settle_s = time.monotonic() - settle_started
            _verify(settings, sup, api, expected, report, console)
            status = sup.status()
            report.restarts_per_role = {r: int(s["restarts"]) for r, s in status.items()}  # type: ignore[call-overload]
    report.duration_s = time.monotonic() - started
    report.kills_per_role = dict(Counter(k.role for k in report.kills))
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    _print(console, report)
    console.print(f"written to {out / 'chaos.json'}")
    return report


def _replay(
    settings: Settings,
    sup: Supervisor,
    stream: list[tuple[str, bytes, bytes]],
    expected: dict[str, tuple[int, int]],
    plan: list[tuple[int, str]],
    rate: float,
    report: ChaosReport,
    console: Console,
) -> None:
    producer = Producer(settings, stream, rate)
    counts = DecisionCounts(settings)
    total = len(stream)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TimeElapsedColumn(),
    )
    t0 = time.monotonic()
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            sent_task = progress.add_task("published", total=total)
            counted_task = progress.add_task("counted (decisions)", total=total)
            kill_task = progress.add_task("kills", total=len(plan))
            producer.start()
            pending = list(plan)
            gap = max(1, total // (20 * max(1, len(plan))))
            deadline: float | None = None
            while True:
                sup.supervise()
                counted = counts.poll()
                progress.update(sent_task, completed=producer.sent)
                progress.update(counted_task, completed=counted)
                if producer.error is not None:
                    raise RuntimeError(f"producer failed: {producer.error!r}")
                # A kill point is due once the decisions count its events, the pipeline
                # has counted more since the previous kill (kills land on progress, not
                # in a burst while a restarted role catches up), and its role runs.
                last = report.kills[-1].at_events if report.kills else -gap
                if pending and counted >= max(pending[0][0], last + gap):
                    at, role = pending[0]
                    if sup.status().get(role, {}).get("state") == "running":
                        pending.pop(0)
                        pid = sup.children[role].pid
                        sup.kill(role)  # SIGKILL; returns once the process is gone
                        report.kills.append(
                            Kill(role, at, counted, time.monotonic() - t0, pid, time.time())
                        )
                        progress.update(kill_task, advance=1)
                        console.print(
                            f"  killed {role:<9} (pid {pid}) at {counted:,} events counted "
                            f"(planned {at:,}), {time.monotonic() - t0:.0f} s"
                        )
                        sup.supervise()
                if not pending and producer.done.is_set() and counts.totals == expected:
                    break
                if producer.done.is_set() and not pending and deadline is None:
                    deadline = time.monotonic() + 600
                if deadline is not None and time.monotonic() > deadline:
                    report.notes.append("counts not reached within 600 s after the replay")
                    break
    finally:
        producer.join(timeout=60)
        counts.close()


def _results_and_requests(settings: Settings) -> tuple[list[Any], list[Any]]:
    requests = [msgspec.json.decode(r.value) for r in read_topic(settings, "generation_requests")]
    results = [msgspec.json.decode(r.value) for r in read_topic(settings, "generation_results")]
    return requests, results


def _settle_loop(
    settings: Settings, sup: Supervisor, report: ChaosReport, console: Console
) -> None:
    """Until every generation request has a result and the loop asks for nothing new
    for a while (its budget is small), every role running."""
    console.print("traffic counted; waiting for the loop: every request answered…")
    deadline = time.monotonic() + 900
    last_requests = -1
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        for _ in range(10):
            sup.supervise()
            time.sleep(0.5)
        requests, results = _results_and_requests(settings)
        answered = {r["request_id"] for r in results}
        open_ = {r["request_id"] for r in requests} - answered
        if len(requests) != last_requests:
            last_requests = len(requests)
            quiet_since = time.monotonic()
        running = all(s["state"] == "running" for s in sup.status().values())
        if not open_ and running and time.monotonic() - quiet_since > 30:
            return
    report.notes.append("the loop did not settle within 900 s (requests still open)")


def _verify(
    settings: Settings,
    sup: Supervisor,
    api: HttpSelector,
    expected: dict[str, tuple[int, int]],
    report: ChaosReport,
    console: Console,
) -> None:
    console.print("verifying…")
    # Dead letters first: one malformed record per partition, read back behind
    # everything else (the ingest reads each partition in order).
    producer = KafkaProducer(**kafka_python_kwargs(KafkaProducer, settings, acks="all"))
    sentinels = set()
    for p in range(settings.partitions):
        value = SENTINEL + f" {p}: not JSON".encode()
        sentinels.add(value)
        producer.send(
            settings.topic("impressions"), value=value, key=b"chaos-sentinel", partition=p
        )
    producer.flush()
    producer.close()
    import base64

    letters: list[dict[str, Any]] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        sup.supervise()
        letters = [json.loads(r.value) for r in read_topic(settings, "dead_letter", 2000)]
        seen = {base64.b64decode(x["original_b64"]) for x in letters}
        if sentinels <= seen:
            break
    else:
        report.notes.append("sentinel dead letters not all read back")
    others = [x for x in letters if not base64.b64decode(x["original_b64"]).startswith(SENTINEL)]
    report.dead_letters = len(others)
    report.dead_letter_reasons = dict(Counter(x["reason_code"] for x in others))

    # Counts, on the decisions topic (latest per key) and as serving answers them.
    counts = DecisionCounts(settings)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        counts.poll(500)
    counts.close()
    report.counts_exact = counts.totals == expected
    serving: dict[str, tuple[int, int]] = {}
    for key in expected:
        campaign, audience = key.split("|")
        status, body = _retrying(
            lambda c=campaign, a=audience: api.get(f"/v1/campaigns/{c}/audiences/{a}/decision"),
            "decision",
        )
        if status == 200:
            serving[key] = (body["impressions"], body["clicks"])
    report.serving_counts_exact = serving == expected
    report.count_mismatches = {
        key: {"expected": want, "decisions": counts.totals.get(key), "serving": serving.get(key)}
        for key, want in expected.items()
        if counts.totals.get(key) != want or serving.get(key) != want
    }

    # Generation requests and results.
    requests, results = _results_and_requests(settings)
    request_ids = Counter(r["request_id"] for r in requests)
    result_ids = Counter(r["request_id"] for r in results)
    report.requests = len(request_ids)
    report.request_ids_published_twice = sorted(i for i, n in request_ids.items() if n > 1)
    report.results = len(results)
    report.requests_without_result = sorted(set(request_ids) - set(result_ids))
    report.requests_answered_twice = sorted(i for i, n in result_ids.items() if n > 1)
    report.results_without_request = sorted(set(result_ids) - set(request_ids))
    report.results_ok = sum(1 for r in results if r["status"] == "ok")
    report.retries = sum(1 for i in request_ids if not i.endswith("-a1"))
    ok_stems = Counter(r["request_id"].rpartition("-a")[0] for r in results if r["status"] == "ok")
    report.stems_answered_ok_more_than_once = sorted(s for s, n in ok_stems.items() if n > 1)
    report.results_failed = sum(1 for r in results if r["status"] == "failed")
    finished = {r["request_id"]: r.get("finished_at") or 0.0 for r in results}
    report.generator_kills_mid_request = sum(
        1
        for k in report.kills
        if k.role == "generator"
        and any(
            r["requested_at"] < k.wall < finished.get(r["request_id"], float("inf"))
            for r in requests
        )
    )
    report.failure_reasons = dict(Counter(str(r.get("error")) for r in results if r["error"]))

    # Creatives: one content per id; no two generated ones with the same text.
    contents: dict[str, set[tuple[str, str]]] = defaultdict(set)
    generated: dict[str, tuple[str, str, str]] = {}
    for record in read_topic(settings, "creatives"):
        c = msgspec.json.decode(record.value)
        report.creative_records += 1
        contents[c["creative_id"]].add((c["headline"], c.get("description", "")))
        if c.get("origin") == "generated":
            generated[c["creative_id"]] = (c["campaign"], c["headline"], c.get("description", ""))
    report.generated_creatives = len(generated)
    report.creative_ids_with_two_contents = sorted(i for i, s in contents.items() if len(s) > 1)
    by_text: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for creative_id, text in generated.items():
        by_text[text].append(creative_id)
    report.duplicate_variants = [sorted(ids) for ids in by_text.values() if len(ids) > 1]


def _print(console: Console, r: ChaosReport) -> None:
    def mark(ok: bool) -> str:
        return "[green]yes[/]" if ok else "[red]NO[/]"

    table = Table(title="adloop chaos run", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row(
        "events (impressions + clicks)", f"{r.events:,} ({r.impressions:,} + {r.clicks:,})"
    )
    table.add_row(
        "replay rate / duration (replay, loop settle)",
        f"{r.rate:,.0f}/s / {r.duration_s:.0f} s ({r.replay_s:.0f} s, {r.settle_s:.0f} s)",
    )
    table.add_row(
        "SIGKILLs per role (restarts)",
        ", ".join(
            f"{role} {r.kills_per_role.get(role, 0)} ({r.restarts_per_role.get(role, 0)})"
            for role in ALL_ROLES
        ),
    )
    table.add_row(
        f"counts exact, {r.keys} campaign × audience keys (decisions topic)", mark(r.counts_exact)
    )
    table.add_row("counts exact as serving answers them", mark(r.serving_counts_exact))
    table.add_row(
        "generation requests / results (ok, failed)",
        f"{r.requests} / {r.results} ({r.results_ok}, {r.results_failed})",
    )
    table.add_row("generator kills during a generation", str(r.generator_kills_mid_request))
    table.add_row("requests without a result", str(len(r.requests_without_result)))
    table.add_row("requests answered twice", str(len(r.requests_answered_twice)))
    table.add_row(
        "retried after the timeout (stems answered ok twice)",
        f"{r.retries} ({len(r.stems_answered_ok_more_than_once)})",
    )
    table.add_row("request ids published twice", str(len(r.request_ids_published_twice)))
    table.add_row(
        "generated creatives (creative records on the topic)",
        f"{r.generated_creatives} ({r.creative_records})",
    )
    table.add_row("creative ids with two contents", str(len(r.creative_ids_with_two_contents)))
    table.add_row("duplicate variants (same text, two ids)", str(len(r.duplicate_variants)))
    table.add_row("dead letters (besides the sentinels)", str(r.dead_letters))
    table.add_row("all checks pass", mark(r.ok))
    console.print(table)
    for note in r.notes:
        console.print(f"[yellow]note:[/] {note}")
    if r.count_mismatches:
        console.print(f"[red]count mismatches:[/] {r.count_mismatches}")

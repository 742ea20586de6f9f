"""``adloop demo``: the whole loop on one machine, with a live console view."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from bench.exchange import HttpSelector, Scenario, SimulatedExchange
from streams.config import Settings
from streams.kafka import kafka_python_kwargs
from streams.supervisor import Supervisor

log = logging.getLogger("adloop.demo")


@dataclass
class DemoSummary:
    impressions: int
    clicks: int
    realized_ctr: float
    best_in_hindsight_ctr: float
    uniform_ctr: float
    counted_impressions: int
    counted_clicks: int
    select_p50_ms: float
    select_p99_ms: float
    bad_events_sent: int = 0
    dead_lettered: int = 0

    @property
    def ok(self) -> bool:
        return (self.counted_impressions, self.counted_clicks) == (self.impressions, self.clicks)


def _view(
    api: HttpSelector, scenario: Scenario, exchange: SimulatedExchange, started: float
) -> Group:
    tables = []
    for audience in scenario.audiences:
        status, decision = api.get(
            f"/v1/campaigns/{scenario.campaign}/audiences/{audience}/decision"
        )
        table = Table(title=f"{scenario.campaign} · {audience}", expand=True)
        for column in (
            "creative",
            "imps",
            "clicks",
            "CTR",
            "posterior mean (95% CI)",
            "serving",
            "true CTR",
        ):
            table.add_column(column, justify="right" if column != "creative" else "left")
        if status == 200:
            for row in decision["creatives"]:
                ctr = row["clicks"] / row["impressions"] if row["impressions"] else 0.0
                best = row["creative_id"] == decision["best_creative_id"]
                table.add_row(
                    ("★ " if best else "  ") + row["creative_id"],
                    f"{row['impressions']:,}",
                    f"{row['clicks']:,}",
                    f"{ctr:.2%}",
                    f"{row['mean']:.2%} ({row['ci_low']:.2%}–{row['ci_high']:.2%})",
                    f"{row['serving_probability']:.1%}",
                    f"{scenario.ctr[(row['creative_id'], audience)]:.2%}",
                )
        else:
            table.add_row("(no traffic yet)", "", "", "", "", "", "")
        tables.append(table)
    tally = exchange.tally
    elapsed = max(time.monotonic() - started, 1e-9)
    ctr = tally.clicks / tally.impressions if tally.impressions else 0.0
    header = (
        f"sent {tally.impressions:,} impressions ({tally.impressions / elapsed:,.0f}/s), "
        f"{tally.clicks:,} clicks, realized CTR {ctr:.2%} · best in hindsight "
        f"{tally.expected_best / max(tally.impressions, 1):.2%} · uniform "
        f"{tally.expected_uniform / max(tally.impressions, 1):.2%}"
    )
    return Group(header, *tables)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_demo(
    settings: Settings,
    events: int,
    rate: float,
    seed: int,
    live_view: bool = True,
    bad_event_rate: float = 0.001,
) -> DemoSummary:
    console = Console(stderr=True)
    scenario = Scenario.default(seed)
    with Supervisor(settings) as sup:
        console.print(
            f"[bold]adloop demo[/]: broker {settings.broker}, API "
            f"http://{settings.api_host}:{settings.api_port}, logs in {sup.log_dir}"
        )
        sup.wait_http_ready()
        api = HttpSelector(settings.api_host, settings.api_port)
        for creative in scenario.creatives:
            api.register(creative)
        producer = KafkaProducer(
            **kafka_python_kwargs(KafkaProducer, settings, linger_ms=20, acks="all")
        )
        topics = {role: settings.topic(role) for role in ("impressions", "clicks")}

        def publish(role: str, key: bytes, value: bytes) -> None:
            producer.send(topics[role], value=value, key=key)

        exchange = SimulatedExchange(
            scenario, api, publish, seed=seed, bad_event_rate=bad_event_rate
        )
        started = time.monotonic()
        next_view = 0.0
        live = Live(console=console, refresh_per_second=4, transient=False) if live_view else None
        try:
            if live:
                live.start()
            try:
                for i in range(events):
                    target = started + i / rate
                    now = time.monotonic()
                    if target > now:
                        time.sleep(target - now)
                    exchange.step(time.time())
                    if now >= next_view:
                        sup.check()
                        next_view = now + 0.5
                        if live:
                            live.update(_view(api, scenario, exchange, started))
                        elif i:
                            log.info("progress", extra={"impressions": i, "of": events})
            except KeyboardInterrupt:
                console.print("[yellow]interrupted: finishing with a summary of what was sent[/]")
            # Let the last clicks fall due, then publish them.
            time.sleep(exchange.click_delay_s * 3)
            exchange.flush_clicks(time.time(), force=True)
            producer.flush()
            console.print("waiting for adloop to count every event…")
            summary = _wait_for_counts(api, scenario, exchange, timeout=180.0)
            summary.bad_events_sent = exchange.tally.bad_events
            summary.dead_lettered = _count_dead_letters(settings)
            if live:
                live.update(_view(api, scenario, exchange, started))
        finally:
            if live:
                live.stop()
            producer.close()
    _print_summary(console, summary)
    return summary


def _counted(api: HttpSelector, scenario: Scenario) -> tuple[int, int]:
    impressions = clicks = 0
    for audience in scenario.audiences:
        status, decision = api.get(
            f"/v1/campaigns/{scenario.campaign}/audiences/{audience}/decision"
        )
        if status == 200:
            impressions += decision["impressions"]
            clicks += decision["clicks"]
    return impressions, clicks


def _wait_for_counts(
    api: HttpSelector, scenario: Scenario, exchange: SimulatedExchange, timeout: float
) -> DemoSummary:
    tally = exchange.tally
    deadline = time.monotonic() + timeout
    counted = _counted(api, scenario)
    while counted != (tally.impressions, tally.clicks) and time.monotonic() < deadline:
        time.sleep(0.25)
        counted = _counted(api, scenario)
    n = max(tally.impressions, 1)
    return DemoSummary(
        impressions=tally.impressions,
        clicks=tally.clicks,
        realized_ctr=tally.clicks / n,
        best_in_hindsight_ctr=tally.expected_best / n,
        uniform_ctr=tally.expected_uniform / n,
        counted_impressions=counted[0],
        counted_clicks=counted[1],
        select_p50_ms=_percentile(tally.select_ms, 0.5),
        select_p99_ms=_percentile(tally.select_ms, 0.99),
    )


def _count_dead_letters(settings: Settings) -> int:
    # Counted by reading: the embedded broker's ListOffsets can understate the end.
    consumer = KafkaConsumer(
        **kafka_python_kwargs(
            KafkaConsumer, settings, auto_offset_reset="earliest", consumer_timeout_ms=1000
        )
    )
    topic = settings.topic("dead_letter")
    tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    count = sum(1 for _ in consumer)
    consumer.close()
    return count


def _print_summary(console: Console, s: DemoSummary) -> None:
    table = Table(title="adloop demo summary", show_header=False)
    table.add_row("impressions / clicks sent", f"{s.impressions:,} / {s.clicks:,}")
    table.add_row(
        "counted by adloop",
        f"{s.counted_impressions:,} / {s.counted_clicks:,} "
        + ("[green]exact[/]" if s.ok else "[red]MISMATCH[/]"),
    )
    table.add_row("realized CTR", f"{s.realized_ctr:.3%}")
    table.add_row(
        "best single creative in hindsight",
        f"{s.best_in_hindsight_ctr:.3%} (adloop: "
        f"{s.realized_ctr / max(s.best_in_hindsight_ctr, 1e-12):.1%} of it)",
    )
    table.add_row(
        "uniform random",
        f"{s.uniform_ctr:.3%} (adloop lift: {s.realized_ctr / max(s.uniform_ctr, 1e-12) - 1:+.1%})",
    )
    table.add_row(
        "malformed events sent / dead-lettered",
        f"{s.bad_events_sent:,} / {s.dead_lettered:,}",
    )
    table.add_row(
        "select latency p50 / p99 (client side)",
        f"{s.select_p50_ms:.2f} ms / {s.select_p99_ms:.2f} ms",
    )
    console.print(table)

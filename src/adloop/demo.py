"""``adloop demo``: the whole loop on one machine, with a live console view."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from adloop.bench.exchange import HttpSelector, Scenario, SimulatedExchange
from adloop.streams.config import Settings
from adloop.streams.kafka_io import kafka_python_kwargs
from adloop.streams.supervisor import LOOP_ROLES, ROLES, Supervisor

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
    loop: dict[str, int] | None = None

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
            "label",
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
                    row.get("label", ""),
                    f"{row['impressions']:,}",
                    f"{row['clicks']:,}",
                    f"{ctr:.2%}",
                    f"{row['mean']:.2%} ({row['ci_low']:.2%}–{row['ci_high']:.2%})",
                    f"{row['serving_probability']:.1%}",
                    _true_ctr(scenario, row["creative_id"], audience),
                )
        else:
            table.add_row("(no traffic yet)", "", "", "", "", "", "", "")
        tables.append(table)
    events = loop_events(api, scenario.campaign)
    tally = exchange.tally
    elapsed = max(time.monotonic() - started, 1e-9)
    ctr = tally.clicks / tally.impressions if tally.impressions else 0.0
    header = (
        f"sent {tally.impressions:,} impressions ({tally.impressions / elapsed:,.0f}/s), "
        f"{tally.clicks:,} clicks, realized CTR {ctr:.2%} · best in hindsight "
        f"{tally.expected_best / max(tally.impressions, 1):.2%} · uniform "
        f"{tally.expected_uniform / max(tally.impressions, 1):.2%}"
    )
    return Group(header, *tables, *(["[bold]the loop[/]", *events] if events else []))


def _true_ctr(scenario: Scenario, creative_id: str, audience: str) -> str:
    value = scenario.ctr.get((creative_id, audience))
    return f"{value:.2%}" if value is not None else "?"


def loop_events(api: HttpSelector, campaign: str) -> list[str]:
    """One line per generation request: trigger → asked → passed filters → live → retired."""
    status, trail = api.get(f"/v1/campaigns/{campaign}/audit")
    if status != 200:
        return []
    _, story = api.get(f"/v1/campaigns/{campaign}/story")
    by_request: dict[str, list[dict]] = {}
    for item in story.get("creatives", []):
        lineage = item["creative"].get("lineage")
        if lineage:
            by_request.setdefault(lineage["request_id"], []).append(item)
    retired = {e["creative_id"] for e in trail["entries"] if e["action"] == "retired"}
    answered = {
        e["details"].get("request_id"): e["details"]
        for e in trail["entries"]
        if e["action"] == "generation_answered"
    }
    lines = []
    for e in reversed(trail["entries"]):
        if e["action"] == "generation_requested":
            rid = e["details"].get("request_id", "")
            trigger = e["reason"].split(":")[0]
            line = f"{trigger} ({e['audience']}) → asked {e['details'].get('n_variants')} variants"
            answer = answered.get(rid)
            if answer is None:
                lines.append(line + " → the generator is writing them…")
                continue
            made = by_request.get(rid, [])
            live = [m for m in made if m["creative"]["status"] == "active"]
            served = [m for m in live if sum(a["impressions"] for a in m["audiences"]) > 0]
            line += (
                f" → {answer.get('generated', '?')} written, {len(made)} passed filters"
                f" → {len(live)} live, {len(served)} served"
            )
            if e.get("creative_id") in retired:
                line += f" → {e['creative_id']} retired"
            lines.append(line)
        elif e["action"] == "generation_failed":
            lines.append(f"[red]{e['reason']}[/]")
    return lines[-8:]


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
    loop: bool = True,
) -> DemoSummary:
    console = Console(stderr=True)
    scenario = Scenario.text_aware(seed) if loop else Scenario.default(seed)
    roles = ROLES + LOOP_ROLES if loop else ROLES
    if loop:
        # A short demo: judge creatives on less evidence than a real campaign would,
        # and answer each request with what the LLM wrote in ~100 s (2 busy cores take
        # ~170 s for all rounds, longer than the demo has left after the first verdict).
        settings = settings.with_overrides(
            min_evidence=400, generator_seed=seed, generator_time_limit_s=125.0
        )
    with Supervisor(settings, roles=roles) as sup:
        console.print(
            f"[bold]adloop demo[/]: broker {settings.broker}, API "
            f"http://{settings.api_host}:{settings.api_port}, logs in {sup.log_dir}, "
            f"admin token in {settings.admin_token_path} (mode 0600)"
        )
        sup.wait_http_ready()
        api = HttpSelector.local(settings)
        for creative in scenario.creatives:
            api.register(creative)
        if loop:
            _opt_in(api, scenario.campaign)
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
                # Bulk selects of `batch` impressions keep the exchange's own cost off
                # the two cores the demo shares with adloop (one HTTP call per ~20 ms).
                batch = max(1, min(50, int(rate / 50)))
                for i in range(0, events, batch):
                    target = started + i / rate
                    now = time.monotonic()
                    if target > now:
                        time.sleep(target - now)
                    exchange.step_batch(time.time(), min(batch, events - i), api)
                    if now >= next_view:
                        sup.supervise()
                        next_view = now + (0.5 if live else 5.0)
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
            if loop:
                summary.loop = _loop_counts(api, scenario.campaign)
                for line in loop_events(api, scenario.campaign):
                    console.print(line)
            if live:
                live.update(_view(api, scenario, exchange, started))
        finally:
            if live:
                live.stop()
            producer.close()
    _print_summary(console, summary)
    return summary


def _opt_in(api: HttpSelector, campaign: str) -> None:
    """The demo advertiser's settings: a brief, and auto-approval (it is a demo)."""
    import msgspec

    from adloop.bench.textsim import BRIEF, DESCRIPTIONS

    body = {
        "reason": "demo: generated variants may go live without review",
        "brief": msgspec.to_builtins(BRIEF),
        "auto_approve": True,
        "cooldown_s": 10.0,
        # Few variants per request: on two shared CPU cores each takes ~10-20 s.
        "n_variants": 4,
        "generation_budget": 12,
        "audience_descriptions": DESCRIPTIONS,
    }
    response = api.send("PUT", f"/v1/campaigns/{campaign}/settings", json.dumps(body))
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(f"campaign settings refused: {payload.decode()}")


def _loop_counts(api: HttpSelector, campaign: str) -> dict[str, int]:
    _, trail = api.get(f"/v1/campaigns/{campaign}/audit")
    _, story = api.get(f"/v1/campaigns/{campaign}/story")
    generated = [c for c in story.get("creatives", []) if c["creative"]["origin"] == "generated"]
    entries = trail.get("entries", [])
    actions = [e["action"] for e in entries]
    return {
        "requested": actions.count("generation_requested"),
        "answered": actions.count("generation_answered"),
        "written": sum(
            int(e["details"].get("generated", 0))
            for e in entries
            if e["action"] == "generation_answered"
        ),
        "passed_filters": len(generated),
        "live": sum(c["creative"]["status"] == "active" for c in generated),
        "served": sum(sum(a["impressions"] for a in c["audiences"]) > 0 for c in generated),
        "retired": actions.count("retired"),
        "failed": actions.count("generation_failed"),
    }


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
        "best initial creative in hindsight"
        if s.loop is not None
        else "best single creative in hindsight",
        f"{s.best_in_hindsight_ctr:.3%} (adloop's lift over it: "
        f"{s.realized_ctr / max(s.best_in_hindsight_ctr, 1e-12) - 1:+.1%})",
    )
    if s.loop is not None:
        table.add_row(
            "the loop",
            f"{s.loop['requested']} requests ({s.loop['answered']} answered, "
            f"{s.loop['written']} variants written) → {s.loop['passed_filters']} passed filters"
            f" → {s.loop['live']} live ({s.loop['served']} served) · {s.loop['retired']} "
            f"retired · {s.loop['failed']} failed",
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
        "bulk select latency p50 / p99 (client side, one call per batch)",
        f"{s.select_p50_ms:.2f} ms / {s.select_p99_ms:.2f} ms",
    )
    console.print(table)

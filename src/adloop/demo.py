"""``adloop demo``: the whole loop on one machine, with a live console view."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
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
    cycles: list[LoopCycle] = field(default_factory=list)
    # Generated creatives' traffic over the whole run, and the initial creatives'.
    generated_impressions: int = 0
    generated_clicks: int = 0
    initial_impressions: int = 0
    initial_clicks: int = 0
    extra_events: int = 0  # sent past --events, waiting for a loop cycle to complete

    @property
    def ok(self) -> bool:
        return (self.counted_impressions, self.counted_clicks) == (self.impressions, self.clicks)


def _view(
    api: HttpSelector, scenario: Scenario, exchange: SimulatedExchange, started: float
) -> Group:
    _, story = api.get(f"/v1/campaigns/{scenario.campaign}/story")
    headlines = {
        item["creative"]["creative_id"]: item["creative"]["headline"]
        for item in (story or {}).get("creatives", [])
    }
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
                headline = headlines.get(row["creative_id"], "")
                table.add_row(
                    ("★ " if best else "  ")
                    + row["creative_id"]
                    + (f"\n  [dim]{escape(headline)}[/]" if headline else ""),
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
    events = [format_cycle(c) for c in loop_cycles(api, scenario.campaign)][-6:]
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


@dataclass
class LoopCycle:
    """One generation request and what became of it: verdict → request → variants
    written and passed → live → served → the underperformer retired."""

    request_id: str
    audience: str
    verdict: str  # "creative h3 low"
    underperformer: str | None
    asked: int
    requested_at: float
    answered: bool = False
    failed: str | None = None
    written: int = 0
    seconds: float | None = None  # request → result
    variants: list[dict[str, Any]] = field(default_factory=list)  # creatives, story items
    retired: bool = False

    @property
    def live(self) -> list[dict[str, Any]]:
        return [v for v in self.variants if v["creative"]["status"] == "active"]

    @property
    def served(self) -> list[dict[str, Any]]:
        return [v for v in self.live if sum(a["impressions"] for a in v["audiences"]) > 0]

    @property
    def first_live_s(self) -> float | None:
        """Request → its first variant published live (the generator streams them)."""
        times = [v["creative"]["created_at"] for v in self.live]
        return min(times) - self.requested_at if times else None

    @property
    def last_live_s(self) -> float | None:
        """Request → its last variant published live."""
        times = [v["creative"]["created_at"] for v in self.live]
        return max(times) - self.requested_at if times else None

    @property
    def complete(self) -> bool:
        return bool(self.answered and self.served and self.retired)


def loop_cycles(api: HttpSelector, campaign: str) -> list[LoopCycle]:
    """Every generation request of the campaign, oldest first, from the audit trail and
    the campaign's story (what a user can read from the API)."""
    status, trail = api.get(f"/v1/campaigns/{campaign}/audit")
    if status != 200:
        return []
    _, story = api.get(f"/v1/campaigns/{campaign}/story")
    by_request: dict[str, list[dict[str, Any]]] = {}
    for item in (story or {}).get("creatives", []):
        lineage = item["creative"].get("lineage")
        if lineage:
            by_request.setdefault(lineage["request_id"], []).append(item)
    entries = trail["entries"]
    retired = {(e["creative_id"], e["audience"]) for e in entries if e["action"] == "retired"}
    answered = {
        e["details"].get("request_id"): e["details"]
        for e in entries
        if e["action"] == "generation_answered"
    }
    failed = {
        e["details"].get("request_id"): e["reason"]
        for e in entries
        if e["action"] == "generation_failed"
    }
    cycles = []
    for e in sorted(entries, key=lambda e: e["at"]):
        if e["action"] != "generation_requested":
            continue
        rid = e["details"].get("request_id", "")
        answer = answered.get(rid)
        variants = sorted(
            by_request.get(rid, []),
            key=lambda m: -sum(a["impressions"] for a in m["audiences"]),
        )
        cycles.append(
            LoopCycle(
                request_id=rid,
                audience=e.get("audience") or "",
                verdict=e["reason"].split(":")[0],
                underperformer=e.get("creative_id"),
                asked=int(e["details"].get("n_variants") or 0),
                requested_at=e["at"],
                answered=answer is not None,
                failed=failed.get(rid),
                written=int(answer.get("generated", 0)) if answer else 0,
                seconds=float(answer["seconds"]) if answer and "seconds" in answer else None,
                variants=variants,
                retired=(e.get("creative_id"), e.get("audience")) in retired,
            )
        )
    return cycles


def format_cycle(c: LoopCycle, headlines: int = 3) -> str:
    """One line of the live view and the final report."""
    line = f"{c.verdict} ({c.audience}) → asked {c.asked} variants"
    if c.failed:
        return f"{line} → [red]{escape(c.failed)}[/]"
    if not c.variants and not c.answered:
        return line + " → the generator is writing them…"
    texts = ", ".join(f'"{escape(v["creative"]["headline"])}"' for v in c.variants[:headlines])
    more = f" +{len(c.variants) - headlines}" if len(c.variants) > headlines else ""
    written = f"{c.written} written, " if c.answered else "writing: "
    line += f" → {written}{len(c.variants)} passed ({texts}{more})"
    first = c.first_live_s
    line += f" → {len(c.live)} live" + (f" (first after {first:.1f} s)" if first else "")
    line += f", {len(c.served)} served"
    if c.retired:
        line += f" → {c.underperformer} retired"
    if c.complete:
        line = "[green]✓[/] " + line
    return line


def loop_events(api: HttpSelector, campaign: str) -> list[str]:
    """One line per generation request: trigger → asked → passed filters → live → retired."""
    return [format_cycle(c) for c in loop_cycles(api, campaign)][-8:]


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
    loop_cycles_wanted: int = 1,
    max_events: int | None = None,
) -> DemoSummary:
    """``loop_cycles_wanted``: with the loop on, go on past ``events`` (up to
    ``max_events``, default 3 × ``events``) until that many loop cycles are complete
    (verdict → request → variants live and served → underperformer retired)."""
    console = Console(stderr=True)
    scenario = Scenario.text_aware(seed) if loop else Scenario.default(seed)
    roles = ROLES + LOOP_ROLES if loop else ROLES
    if loop:
        # A short demo: judge creatives on less evidence than a real campaign would.
        # The generator publishes each variant as it passes (the first within ~10-15 s
        # on 2 busy cores); the time limit only bounds a request that finds few.
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
                wanted = loop_cycles_wanted if loop else 0
                limit = max(events, max_events if max_events is not None else 3 * events)
                done_cycles: set[str] = set()
                extending = False
                i = 0
                while i < events or (extending and i < limit):
                    target = started + i / rate
                    now = time.monotonic()
                    if target > now:
                        time.sleep(target - now)
                    n = min(batch, (limit if extending else events) - i)
                    exchange.step_batch(time.time(), n, api)
                    i += n
                    if now >= next_view or (i >= events and not extending and wanted):
                        sup.supervise()
                        next_view = now + (0.5 if live else 5.0)
                        if wanted:
                            _note_cycles(api, scenario.campaign, done_cycles)
                        if i >= events and len(done_cycles) < wanted and not extending:
                            extending = True
                            console.print(
                                f"{events:,} impressions sent; no full loop cycle yet: going "
                                f"on until one completes (at most {limit:,} impressions)"
                            )
                        if extending and len(done_cycles) >= wanted:
                            break
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
            summary.extra_events = max(0, exchange.tally.impressions - events)
            if loop:
                summary.loop = _loop_counts(api, scenario.campaign)
                summary.cycles = loop_cycles(api, scenario.campaign)
                _traffic_by_origin(api, scenario.campaign, summary)
            if live:
                live.update(_view(api, scenario, exchange, started))
        finally:
            if live:
                live.stop()
            producer.close()
    _print_summary(console, summary, live_view)
    return summary


def _note_cycles(api: HttpSelector, campaign: str, done: set[str]) -> None:
    """Log each loop cycle once, when it completes (a sentinel for tests and logs)."""
    for cycle in loop_cycles(api, campaign):
        if cycle.complete and cycle.request_id not in done:
            done.add(cycle.request_id)
            log.info(
                "loop cycle complete",
                extra={
                    "request_id": cycle.request_id,
                    "verdict": cycle.verdict,
                    "audience": cycle.audience,
                    "written": cycle.written,
                    "passed": len(cycle.variants),
                    "live": len(cycle.live),
                    "served": len(cycle.served),
                    "retired": cycle.underperformer,
                    "headlines": [v["creative"]["headline"] for v in cycle.variants],
                    "first_live_s": cycle.first_live_s and round(cycle.first_live_s, 1),
                    "answered_s": cycle.seconds and round(cycle.seconds, 1),
                },
            )


def _traffic_by_origin(api: HttpSelector, campaign: str, summary: DemoSummary) -> None:
    """Impressions and clicks of the generated creatives and of the initial ones."""
    _, story = api.get(f"/v1/campaigns/{campaign}/story")
    for item in (story or {}).get("creatives", []):
        impressions = sum(a["impressions"] for a in item["audiences"])
        clicks = sum(a["clicks"] for a in item["audiences"])
        if item["creative"]["origin"] == "generated":
            summary.generated_impressions += impressions
            summary.generated_clicks += clicks
        else:
            summary.initial_impressions += impressions
            summary.initial_clicks += clicks


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


def _print_summary(console: Console, s: DemoSummary, live_view: bool = False) -> None:
    console.print()
    if s.cycles and not live_view:  # the live view's last frame shows them already
        console.print("[bold]the loop[/] (one line per generation request)")
        for cycle in s.cycles[-8:]:
            console.print(format_cycle(cycle, headlines=8))
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
        complete = [c for c in s.cycles if c.complete]
        last = [c.last_live_s for c in s.cycles if c.last_live_s is not None]
        first = [c.first_live_s for c in s.cycles if c.first_live_s is not None]
        table.add_row(
            "full loop cycles",
            f"{len(complete)} (verdict → request → variants written and passed → live → "
            "served → underperformer retired)"
            + (
                f"; from the request, the first variant live after p50 "
                f"{_percentile(first, 0.5):.1f} s, the last after p50 "
                f"{_percentile(last, 0.5):.1f} s"
                if first and last
                else ""
            )
            + (
                f"; ran {s.extra_events:,} impressions past --events to finish one"
                if s.extra_events
                else ""
            ),
        )
        total = s.generated_impressions + s.initial_impressions
        if total:
            gen_ctr = s.generated_clicks / max(s.generated_impressions, 1)
            init_ctr = s.initial_clicks / max(s.initial_impressions, 1)
            table.add_row(
                "generated variants' traffic",
                f"{s.generated_impressions / total:.1%} of impressions "
                f"({s.generated_impressions:,}), CTR {gen_ctr:.3%} vs {init_ctr:.3%} for "
                "the initial creatives (whole run)",
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

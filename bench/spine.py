"""Benchmarks of the spine (issue 2): throughput vs. the raw-consume ceiling,
click -> decision latency over HTTP held over a run of sustained traffic, and select
latency under load.

    adloop bench spine [--events 200000] [--latency-minutes 10] [--broker kafka://...]
                       [--out results/]

Writes ``spine.json`` (figures; per-minute click -> decision p99), ``spine_series.json``
(per-second throughput and processes, every probe) and three plots: the latency CDF,
events/s over time, latency over time.

Each figure states its method; all run on the same broker in one go.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from adloop.bench.exchange import HttpSelector
from adloop.bench.harness import (
    DecisionWatcher,
    deployment,
    free_port,
    log_time,
    preload,
    process_usage,
    raw_consume_rate,
    synthetic_events,
)
from adloop.bench.sustained import (
    Sustained,
    SustainedConfig,
    SustainedResult,
    latency_trend,
    per_minute,
    percentiles,
    plot_latency_cdf,
    plot_latency_over_time,
    plot_throughput,
)
from adloop.streams.config import Settings
from adloop.streams.supervisor import Supervisor


@dataclass
class SpineReport:
    events: int = 0
    ceiling_events_per_s: float = 0.0
    adloop_events_per_s: float = 0.0
    ratio: float = 0.0
    counts_exact: bool = False
    process_usage: dict[str, dict[str, float]] = field(default_factory=dict)
    click_to_decision_ms: dict[str, float] = field(default_factory=dict)
    background_rate: float = 0.0
    select_ms: dict[str, float] = field(default_factory=dict)
    select_rps: float = 0.0
    process_usage_latency: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_minutes: float = 0.0
    counted_rate: float = 0.0
    background_drained: bool = False
    click_to_decision_per_minute: list[dict[str, float]] = field(default_factory=list)
    click_to_decision_trend: dict[str, float | bool] = field(default_factory=dict)
    stalls: list[dict[str, float | bool]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


def _pct(values: list[float]) -> dict[str, float]:
    return percentiles(values)


def throughput(
    settings: Settings,
    n_impressions: int,
    report: SpineReport,
    console: Console,
    context: bool = False,
) -> None:
    impressions, clicks, expected = synthetic_events(
        n_impressions, click_rate=0.05, context=context
    )
    report.events = len(impressions) + len(clicks)
    with Progress(console=console, transient=True) as progress:
        asyncio.run(preload(settings, impressions, clicks, progress))
    report.ceiling_events_per_s = asyncio.run(raw_consume_rate(settings, report.events))
    console.print(
        f"ceiling (raw aiokafka getmany + JSON decode): {report.ceiling_events_per_s:,.0f} events/s"
    )
    # The worker first (it has nothing to do until ingest emits), then ingest: the
    # clock starts when ingest is assigned its partitions (from its log).
    with (
        Supervisor(settings, roles=("worker", "ingest")) as sup,
        Progress(console=console, transient=True) as progress,
    ):
        watcher = DecisionWatcher(settings)
        done_at = asyncio.run(watcher.wait_for(expected, timeout=600, progress=progress))
        started_at = log_time(sup.log_path("ingest"), "partitions assigned")
        report.adloop_events_per_s = report.events / (done_at - started_at)
        report.counts_exact = watcher.totals == expected
        report.process_usage = process_usage(sup)
    report.ratio = report.adloop_events_per_s / report.ceiling_events_per_s
    console.print(
        f"adloop (ingest + Faust worker, until every count is in the decisions): "
        f"{report.adloop_events_per_s:,.0f} events/s, ratio {report.ratio:.2f}, "
        f"counts exact: {report.counts_exact}"
    )


def _select_load(host: str, port: int, seconds: float, queue: mp.Queue) -> None:
    """Run in another process: sequential keep-alive selects, client-side latency."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    api = HttpSelector(host, port)
    latencies = []
    deadline = time.monotonic() + seconds
    audiences = ["aud-1", "aud-2", "aud-3"]
    i = 0
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        api("lat", audiences[i % 3], "feed")
        latencies.append((time.perf_counter() - t0) * 1000)
        i += 1
    queue.put(latencies)


def latency(
    settings: Settings,
    report: SpineReport,
    console: Console,
    background_rate: float = 2000.0,
    minutes: float = 10.0,
    select_seconds: float = 10.0,
    out: Path | None = None,
) -> SustainedResult:
    """Click -> decision visible over HTTP while ~2,000 events/s flow for ``minutes``
    (``bench.sustained``: a probe every 0.5 s, throughput and processes sampled each
    second); then a select load while the traffic goes on. With ``out``, the plots."""
    ctx = mp.get_context("spawn")
    with Supervisor(settings) as sup:
        sup.wait_http_ready()
        run = Sustained(settings, sup, SustainedConfig(rate=background_rate), console)
        with run.running():
            result = run.measure(minutes * 60, label="click -> decision probes")
            report.click_to_decision_ms = result.latency()
            console.print(
                f"click -> decision over HTTP at ~{background_rate:,.0f} events/s for "
                f"{minutes:g} min: p50 {report.click_to_decision_ms['p50']:.1f} ms, "
                f"p99 {report.click_to_decision_ms['p99']:.1f} ms "
                f"({len(result.lost)} of {len(result.probes) + len(result.lost)} timed out)"
            )
            select_queue: mp.Queue = ctx.Queue()
            loader = ctx.Process(
                target=_select_load,
                args=(settings.api_host, settings.api_port, select_seconds, select_queue),
            )
            loader.start()
            select_latencies = select_queue.get(timeout=select_seconds + 60)
            loader.join()
            report.process_usage_latency = process_usage(sup)
    report.latency_minutes = minutes
    report.background_rate = result.sent_rate
    report.counted_rate = result.counted_rate
    report.click_to_decision_per_minute = per_minute(result.probes)
    trend = latency_trend(result.probes, result.seconds)
    report.click_to_decision_trend = asdict(trend)
    report.stalls = [asdict(s) for s in result.stalls(SustainedConfig().stall_s)]
    report.background_drained = result.drained
    report.select_ms = _pct(select_latencies)
    report.select_rps = len(select_latencies) / select_seconds
    if out is not None:
        title = f"spine: click -> decision at ~{background_rate:,.0f} events/s, {minutes:g} min"
        report.plots = [
            str(plot_latency_cdf(result, out / "spine_latency_cdf.png", title)),
            str(plot_throughput(result, out / "spine_throughput.png", "spine: events/s over time")),
            str(plot_latency_over_time(result, out / "spine_latency_over_time.png", title)),
        ]
        (out / "spine_series.json").write_text(json.dumps(result.to_json()))
    console.print(
        f"select under load (another process, keep-alive, sequential): "
        f"{report.select_rps:,.0f} req/s, p50 {report.select_ms['p50']:.2f} ms, "
        f"p99 {report.select_ms['p99']:.2f} ms; background traffic sent "
        f"{report.background_rate:,.0f} events/s, counted {report.counted_rate:,.0f} events/s, "
        f"all counted after it stopped: {report.background_drained}"
    )
    return result


def run(events: int, broker: str | None, out: Path, latency_minutes: float = 10.0) -> SpineReport:
    console = Console(stderr=True)
    report = SpineReport()
    out.mkdir(parents=True, exist_ok=True)
    with deployment(broker) as settings:
        throughput(settings, events, report, console)
    with deployment(broker, api_port=free_port()) as settings:
        latency(settings, report, console, minutes=latency_minutes, out=out)
    (out / "spine.json").write_text(json.dumps(asdict(report), indent=2))
    table = Table(title="adloop spine benchmark")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("events (impressions + clicks)", f"{report.events:,}")
    table.add_row("ceiling: raw aiokafka consume", f"{report.ceiling_events_per_s:,.0f}/s")
    table.add_row("adloop: ingest + posterior agent", f"{report.adloop_events_per_s:,.0f}/s")
    table.add_row("ratio (goal >= 0.35)", f"{report.ratio:.2f}")
    table.add_row("counts exact", str(report.counts_exact))
    c = report.click_to_decision_ms
    table.add_row(
        f"click -> decision over HTTP p50 / p95 / p99 / max ({c['n']:.0f} probes, "
        f"{report.latency_minutes:g} min)",
        f"{c['p50']:.1f} / {c['p95']:.1f} / {c['p99']:.1f} / {c['max']:.1f} ms",
    )
    table.add_row("probes timed out", f"{c['lost']:.0f}")
    per_min = report.click_to_decision_per_minute
    if per_min:
        table.add_row(
            "click -> decision p99 per minute",
            " ".join(f"{m['p99']:.0f}" for m in per_min) + " ms",
        )
    trend = report.click_to_decision_trend
    table.add_row(
        "p99 first / last third of the run",
        f"{trend['first_third_p99']:.0f} / {trend['last_third_p99']:.0f} ms"
        f"{' (rising)' if trend['rising'] else ''}",
    )
    table.add_row(
        "background sent / counted",
        f"{report.background_rate:,.0f} / {report.counted_rate:,.0f} events/s",
    )
    table.add_row("stalls (no progress >= 10 s)", str(len(report.stalls)))
    table.add_row(
        "select p50 / p99 under load",
        f"{report.select_ms['p50']:.2f} / {report.select_ms['p99']:.2f} ms",
    )
    console.print(table)
    for path in [str(out / "spine.json"), str(out / "spine_series.json"), *report.plots]:
        console.print(f"written to {path}")
    return report

"""Soak: the whole stack with the loop on, under sustained traffic, for a long run.

    adloop bench soak [--minutes 30] [--rate 2000] [--baseline-minute 5] [--out results/]

Broker (embedded unless ``--broker``), ingest, worker, serve, loop controller and
generator run as ``adloop up`` runs them (restarted with backoff when one dies; a
restart is a failure here). The campaign has a brief and auto-approval, and one of its
four creatives a lower click rate, so the loop has an underperformer to replace: the
generator works during the run. ``bench.sustained`` sends the traffic, probes click ->
decision over HTTP every 0.5 s and samples every process each second.

Criteria (each failure is named, and the exit code is 1):

* every adloop role's RSS at the end within +10 % of its RSS at the baseline minute
  (5; a third of the run for runs shorter than three times that). The embedded broker
  keeps every record in memory (Tansu ``memory://``, no retention), so its RSS grows
  with the data by design: it is reported and plotted, not judged;
* click -> decision p99 not rising: last third of the run vs the first
  (``sustained.latency_trend``), with the slope of the per-minute p99 reported;
* no stall (sent events not counted, no progress for ``--stall-s``), no probe lost
  (not visible within 30 s), no role restarted, every sent event counted at the end.

Writes ``soak.json``, ``soak_series.json`` and the plots ``soak_processes.png`` (RSS and
CPU per process), ``soak_latency_over_time.png``, ``soak_throughput.png``,
``soak_latency_cdf.png``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from adloop.bench.exchange import HttpSelector
from adloop.bench.harness import deployment, free_port
from adloop.bench.sustained import (
    AUDIENCES,
    CAMPAIGN,
    Sustained,
    SustainedConfig,
    SustainedResult,
    latency_trend,
    per_minute,
    plot_latency_cdf,
    plot_latency_over_time,
    plot_processes,
    plot_throughput,
    rss_growth,
)
from adloop.streams.supervisor import ALL_ROLES, Supervisor

RSS_LIMIT = 0.10
# One creative clicked less: the loop's underperformer (mean click rate 5 %).
CLICK_RATES = (0.06, 0.06, 0.06, 0.02)


@dataclass
class SoakReport:
    minutes: float = 0.0
    rate: float = 0.0
    started_at: str = ""
    cpus: int = 0
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    baseline_minute: float = 0.0
    rss: dict[str, dict[str, Any]] = field(default_factory=dict)
    click_to_decision_ms: dict[str, float] = field(default_factory=dict)
    click_to_decision_per_minute: list[dict[str, float]] = field(default_factory=list)
    click_to_decision_trend: dict[str, Any] = field(default_factory=dict)
    stall_s: float = 0.0
    stalls: list[dict[str, Any]] = field(default_factory=list)
    lost_probes: list[tuple[float, str]] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    sent_rate: float = 0.0
    counted_rate: float = 0.0
    sent_total: int = 0
    counted_total: int = 0
    drained: bool = False
    loop_audit: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


def effective_baseline_minute(minutes: float, baseline_minute: float) -> float:
    """The RSS reference minute: ``baseline_minute``, or a third of a shorter run."""
    return baseline_minute if minutes >= 3 * baseline_minute else minutes / 3


def judge(
    result: SustainedResult, roles: list[str], baseline_s: float, stall_s: float
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], list[dict[str, Any]], list[str]]:
    """RSS rows, the latency trend, stalls and the failed criteria of a finished run."""
    failures: list[str] = []
    rss: dict[str, dict[str, Any]] = {}
    for name in result.processes():
        growth = rss_growth(result.times, result.rss_series(name), baseline_s, RSS_LIMIT)
        judged = name in roles
        row: dict[str, Any] = {"judged": judged}
        if growth is not None:
            row.update(asdict(growth))
        rss[name] = row
        if judged and growth is None:
            failures.append(f"{name}: no RSS samples at the baseline or the end")
        elif judged and growth is not None and not growth.ok:
            failures.append(
                f"{name} RSS {growth.end_mb:.0f} MiB at the end vs {growth.baseline_mb:.0f} MiB "
                f"at minute {baseline_s / 60:g} (+{growth.ratio - 1:.0%} > +{RSS_LIMIT:.0%})"
            )
    for name in roles:
        if name not in rss:
            failures.append(f"{name}: never sampled")
    trend = latency_trend(result.probes, result.seconds)
    if not result.probes:
        failures.append("no click probe was answered")
    elif trend.rising:
        failures.append(
            f"click -> decision p99 rising: {trend.first_third_p99:.0f} ms in the first third, "
            f"{trend.last_third_p99:.0f} ms in the last ({trend.slope_ms_per_min:+.1f} ms/min)"
        )
    stalls = [asdict(s) for s in result.stalls(stall_s)]
    if stalls:
        failures.append(
            f"{len(stalls)} stall(s): "
            + ", ".join(f"{s['seconds']:.0f} s from {s['start_s']:.0f} s" for s in stalls)
        )
    if result.lost:
        failures.append(f"{len(result.lost)} probe(s) not visible within the probe timeout")
    restarted = {name: n for name, n in result.restarts.items() if n}
    if restarted:
        failures.append(
            "roles restarted: " + ", ".join(f"{n} x{k}" for n, k in sorted(restarted.items()))
        )
    if not result.drained:
        failures.append(
            f"counts: {result.counted_total:,} of {result.sent_total:,} sent events counted "
            "after the traffic stopped"
        )
    return rss, asdict(trend), stalls, failures


def _opt_in(api: HttpSelector) -> None:
    """A brief and auto-approval for the campaign, so the loop generates variants."""
    from adloop.bench.textsim import BRIEF

    body = {
        "reason": "soak: the loop runs as in production, generated variants go live",
        "brief": msgspec.to_builtins(BRIEF),
        "auto_approve": True,
        "cooldown_s": 60.0,
        "n_variants": 4,
        "generation_budget": 1000,
        "audience_descriptions": {a: f"readers of segment {a}" for a in AUDIENCES},
    }
    status, payload = api.call("PUT", f"/v1/campaigns/{CAMPAIGN}/settings", body)
    if status != 200:
        raise RuntimeError(f"campaign settings refused: {payload}")


def _audit_actions(api: HttpSelector) -> dict[str, int]:
    status, trail = api.get(f"/v1/campaigns/{CAMPAIGN}/audit")
    if status != 200:
        return {}
    return dict(Counter(e["action"] for e in trail.get("entries", [])))


def run(
    minutes: float = 30.0,
    rate: float = 2000.0,
    broker: str | None = None,
    out: Path = Path("results"),
    baseline_minute: float = 5.0,
    stall_s: float = 10.0,
) -> SoakReport:
    console = Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    report = SoakReport(
        minutes=minutes,
        rate=rate,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        cpus=os.cpu_count() or 0,
        load_before=list(os.getloadavg()),
        baseline_minute=effective_baseline_minute(minutes, baseline_minute),
        stall_s=stall_s,
    )
    config = SustainedConfig(rate=rate, click_rates=CLICK_RATES, stall_s=stall_s)
    with (
        deployment(broker, api_port=free_port()) as settings,
        Supervisor(settings, roles=ALL_ROLES) as sup,
    ):
        sup.wait_http_ready()
        console.print(
            f"[bold]adloop soak[/]: {minutes:g} min at {rate:,.0f} events/s with the loop "
            f"on; broker {settings.broker}, logs in {sup.log_dir}"
        )
        api = HttpSelector.local(settings)
        run_ = Sustained(settings, sup, config, console, supervise=True)
        run_.start()
        _opt_in(api)
        try:
            result = run_.measure(minutes * 60, label="soak")
        finally:
            run_.stop()
        report.loop_audit = _audit_actions(api)
        roles = list(sup.children)
    report.load_after = list(os.getloadavg())
    rss, trend, stalls, failures = judge(result, roles, report.baseline_minute * 60, stall_s)
    report.rss, report.click_to_decision_trend, report.stalls = rss, trend, stalls
    report.failures = failures
    report.click_to_decision_ms = result.latency()
    report.click_to_decision_per_minute = per_minute(result.probes)
    report.lost_probes = result.lost
    report.restarts = result.restarts
    report.sent_rate, report.counted_rate = result.sent_rate, result.counted_rate
    report.sent_total, report.counted_total = result.sent_total, result.counted_total
    report.drained = result.drained
    title = f"soak: {minutes:g} min at {rate:,.0f} events/s, loop on"
    report.plots = [
        str(plot_processes(result, out / "soak_processes.png", title)),
        str(plot_latency_over_time(result, out / "soak_latency_over_time.png", title)),
        str(plot_throughput(result, out / "soak_throughput.png", title)),
        str(plot_latency_cdf(result, out / "soak_latency_cdf.png", title)),
    ]
    (out / "soak.json").write_text(json.dumps(asdict(report), indent=2))
    (out / "soak_series.json").write_text(json.dumps(result.to_json()))
    _print(console, report, out)
    return report


def _print(console: Console, report: SoakReport, out: Path) -> None:
    table = Table(title=f"adloop soak: {report.minutes:g} min, loop on")
    table.add_column("process")
    table.add_column(f"RSS minute {report.baseline_minute:g}", justify="right")
    table.add_column("RSS end", justify="right")
    table.add_column("growth", justify="right")
    table.add_column(f"within +{RSS_LIMIT:.0%}")
    for name, row in report.rss.items():
        if "baseline_mb" not in row:
            table.add_row(name, "-", "-", "-", "no samples")
            continue
        verdict = ("yes" if row["ok"] else "[red]NO[/]") if row["judged"] else "not judged"
        table.add_row(
            name,
            f"{row['baseline_mb']:,.0f} MiB",
            f"{row['end_mb']:,.0f} MiB",
            f"{row['ratio'] - 1:+.1%}",
            verdict,
        )
    console.print(table)
    c, t = report.click_to_decision_ms, report.click_to_decision_trend
    figures = Table(show_header=False)
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    figures.add_row(
        "click -> decision over HTTP p50 / p95 / p99 / max",
        f"{c['p50']:.0f} / {c['p95']:.0f} / {c['p99']:.0f} / {c['max']:.0f} ms "
        f"({c['n']:.0f} probes, {c['lost']:.0f} lost)",
    )
    figures.add_row(
        "p99 per minute",
        " ".join(f"{m['p99']:.0f}" for m in report.click_to_decision_per_minute) + " ms",
    )
    figures.add_row(
        "p99 first / last third, slope",
        f"{t['first_third_p99']:.0f} / {t['last_third_p99']:.0f} ms, "
        f"{t['slope_ms_per_min']:+.1f} ms/min: {'[red]rising[/]' if t['rising'] else 'not rising'}",
    )
    figures.add_row(
        "events sent / counted",
        f"{report.sent_rate:,.0f} / {report.counted_rate:,.0f} per s; all counted at the end: "
        f"{report.drained}",
    )
    figures.add_row(f"stalls (no progress >= {report.stall_s:g} s)", str(len(report.stalls)))
    figures.add_row("role restarts", str(sum(report.restarts.values())))
    loop = report.loop_audit
    figures.add_row(
        "loop (audit)",
        ", ".join(f"{k} {v}" for k, v in sorted(loop.items())) or "no entries",
    )
    figures.add_row(
        "load average before / after (1 min)",
        f"{report.load_before[0]:.2f} / {report.load_after[0]:.2f} on {report.cpus} CPUs",
    )
    console.print(figures)
    for failure in report.failures:
        console.print(f"[red]FAILED[/]: {failure}")
    if not report.failures:
        console.print("[green]soak passed every criterion[/]")
    for path in [str(out / "soak.json"), str(out / "soak_series.json"), *report.plots]:
        console.print(f"written to {path}")

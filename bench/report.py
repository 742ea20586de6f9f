"""Console tables, PNG plots and ``report.md`` for the replay and the whole suite."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from adloop.bench.replay import ReplayReport

log = logging.getLogger("adloop.bench.report")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _fmt_pct(p: dict[str, float]) -> str:
    if not p.get("n"):
        return "n/a"
    return f"p50 {p['p50']:.0f} ms, p99 {p['p99']:.0f} ms (n={p['n']:,.0f})"


def print_replay(report: ReplayReport, console: Console) -> None:
    table = Table(title=f"adloop replay: {Path(report.log).name or 'log'} ({report.mode})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row(
        "rows read / malformed skipped", f"{report.rows_read:,} / {report.malformed_rows}"
    )
    table.add_row(
        "published: impressions + clicks",
        f"{report.impressions_published:,} + {report.clicks_published:,}",
    )
    table.add_row(
        "expected (adloop's counting rules)",
        f"{report.expected_impressions:,} + {report.expected_clicks:,} in {report.cells:,} cells",
    )
    verdict = "[green]exact" if report.n_differences == 0 else f"[red]{report.n_differences} differ"
    table.add_row("counts per creative × audience × placement", verdict)
    table.add_row(
        "decisions topic / serving API agree",
        f"{report.decisions_verified} / {report.http_verified}",
    )
    table.add_row("dead letters", str(report.dead_letters or 0))
    table.add_row(
        "publish rate: impressions / all events",
        f"{report.impressions_per_s:,.0f}/s / {report.publish_events_per_s:,.0f}/s",
    )
    table.add_row(
        "adloop: publish start -> every count in a decision",
        f"{report.adloop_events_per_s:,.0f} events/s ({report.adloop_s:.1f} s)",
    )
    table.add_row("ingest peak (1 s windows)", f"{report.ingest_peak_events_per_s:,.0f} events/s")
    table.add_row(
        "ceiling: raw aiokafka consume, same messages",
        f"{report.ceiling_events_per_s:,.0f} events/s",
    )
    table.add_row("ratio", f"{report.ratio:.2f}" if report.ratio else "n/a (paced, not drained)")
    for name, pct in report.latency_ms.items():
        table.add_row(name, _fmt_pct(pct))
    for name, value in report.lag_max.items():
        table.add_row(f"max {name}", f"{value:,.0f}")
    for role, usage in report.process_usage.items():
        table.add_row(
            f"{role}: CPU, RSS (peak)",
            f"{usage['cpu_s']:.1f} s, {usage['rss_mb']:.0f} MB "
            f"({usage.get('peak_rss_mb', float('nan')):.0f} MB)",
        )
    if report.engine:
        table.add_row("pure engine (no Kafka)", f"{report.engine['events_per_s']:,.0f} events/s")
        table.add_row(
            "engine: selections",
            f"{report.engine['select_per_s']:,.0f}/s one by one, "
            f"{report.engine['thompson_draws_per_s']:,.0f}/s vectorized",
        )
    console.print(table)
    for line in report.differences[:20]:
        console.print(f"[red]{line}")


def replay_plots(report: ReplayReport, out: Path, prefix: str = "replay") -> list[Path]:
    """Throughput over time, consumer lag over time, latency CDF."""
    plt = _pyplot()
    paths: list[Path] = []
    samples = report.timeline
    if len(samples) > 2:
        t = np.array([s["t"] for s in samples])
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, label in (
            ("published", "published (acked)"),
            ("ingested", "ingested (outcome snapshots)"),
            ("decided", "in decisions"),
        ):
            counts = np.array([s[name] for s in samples])
            dt = np.diff(t)
            rate = np.diff(counts) / np.where(dt > 0, dt, np.inf)
            ax.plot(t[1:], _smooth(rate), label=label)
        ax.set_xlabel("seconds")
        ax.set_ylabel("events/s")
        ax.set_title(f"Throughput over time ({report.mode})")
        ax.legend()
        paths.append(_save(fig, out / f"{prefix}_throughput.png"))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, label in (
            ("ingest_lag_events", "ingest lag (events published, not yet snapshotted)"),
            ("decision_lag_events", "worker lag (events snapshotted, not yet in decisions)"),
            ("worker_lag_msgs", "worker group lag (outcome messages, committed offsets)"),
        ):
            points = [(s["t"], s[name]) for s in samples if name in s]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=label)
        ax.set_xlabel("seconds")
        ax.set_ylabel("lag")
        ax.set_title("Consumer lag over time")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / f"{prefix}_lag.png"))
    curves = {k: v for k, v in report.latency_samples_ms.items() if v}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, values in curves.items():
            xs = np.sort(np.asarray(values))
            ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("milliseconds")
        ax.set_ylabel("fraction")
        ax.set_title(f"End-to-end latency CDF ({report.mode})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / f"{prefix}_latency_cdf.png"))
    return paths


def _smooth(values: np.ndarray, window: int = 4) -> np.ndarray:
    if values.size < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="same")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


# -- the whole suite ----------------------------------------------------------------------


def _load_obd() -> tuple[list[Any], str]:
    from adloop.bench.traffic_logs import LogReader, obd_sample_path

    path = obd_sample_path("random/all")
    return list(LogReader(path, "obd", on_error="fail")), str(path)


def _estimate_row(e: Any, truth: float | None = None, rel: float | None = None) -> str:
    covers = ""
    if truth is not None:
        covers = " | yes" if e.ci_low <= truth <= e.ci_high else " | no"
    rel_text = f" | {rel:.1%}" if rel is not None else ""
    return (
        f"| {e.method} | {e.value:.3%} | {e.ci_low:.3%} – {e.ci_high:.3%} | {e.n:,}"
        f"{rel_text}{covers} |"
    )


def _usage_rows(usage: dict[str, dict[str, float]], seconds: float) -> list[str]:
    rows = ["| process | CPU s | mean cores | RSS MB | peak RSS MB |", "|---|---:|---:|---:|---:|"]
    for role, u in usage.items():
        cores = u["cpu_s"] / seconds if seconds else float("nan")
        rows.append(
            f"| {role} | {u['cpu_s']:.1f} | {cores:.2f} | {u['rss_mb']:.0f} | "
            f"{u.get('peak_rss_mb', float('nan')):.0f} |"
        )
    return rows


def _latency_rows(latency: dict[str, dict[str, float]]) -> list[str]:
    rows = ["| path | n | p50 ms | p90 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|"]
    for name, p in latency.items():
        if p.get("n"):
            rows.append(
                f"| {name} | {p['n']:,.0f} | {p['p50']:.0f} | {p['p90']:.0f} | "
                f"{p['p99']:.0f} | {p['max']:.0f} |"
            )
    return rows


def run_all(out: Path, quick: bool = False, broker: str | None = None) -> bool:
    """Runs the suite, writes ``report.md``, ``results.json`` and PNG plots into ``out``.

    Returns False when a count did not verify or a stage failed (the report says which).
    """
    import json
    import os
    import platform
    import time
    import traceback
    from dataclasses import asdict

    from adloop.bench.harness import deployment, free_port
    from adloop.bench.replay import ReplayOptions, engine_ceiling, repeated, run_replay
    from adloop.bench.spine import SpineReport, latency, throughput
    from adloop.streams.config import Settings

    console = Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_before = os.getloadavg()
    results: dict[str, Any] = {"quick": quick, "broker": broker or "embedded"}
    failures: dict[str, str] = {}
    timings: dict[str, float] = {}

    def stage(name: str, func: Any) -> Any:
        console.rule(f"[bold]{name}")
        t0 = time.monotonic()
        try:
            return func()
        except Exception as exc:  # one failed stage must not hide the others' figures
            failures[name] = f"{type(exc).__name__}: {exc}"
            log.error("stage failed", extra={"stage": name, "trace": traceback.format_exc()})
            console.print(f"[red]{name} failed: {exc}")
            return None
        finally:
            timings[name] = time.monotonic() - t0

    spine = SpineReport()

    def spine_throughput() -> SpineReport:
        with deployment(broker, worker_web_port=0) as settings:
            throughput(settings, 50_000 if quick else 200_000, spine, console)
        return spine

    stage("spine throughput", spine_throughput)

    if not quick:

        def spine_latency() -> SpineReport:
            with deployment(broker, api_port=free_port(), worker_web_port=0) as settings:
                latency(settings, spine, console, minutes=1.0, select_seconds=5.0)
            return spine

        stage("spine latency", spine_latency)
    results["spine"] = asdict(spine)

    live_repeat, preload_repeat = 1, (5 if quick else 20)

    def obd_live() -> Any:
        records, path = _load_obd()
        options = ReplayOptions(rate=2000.0, repeat=live_repeat)
        return run_replay(records, options, broker, console, log_name=path)

    live = stage("OBD replay at 2,000 impressions/s", obd_live)
    if live is not None:
        results["replay_live"] = live.to_dict()
        print_replay(live, console)
        replay_plots(live, out, "replay")

    def obd_preload() -> Any:
        records, path = _load_obd()
        options = ReplayOptions(rate=None, preload=True, repeat=preload_repeat)
        report = run_replay(records, options, broker, console, log_name=path)
        report.engine = vars(engine_ceiling(list(repeated(records, preload_repeat)), Settings()))
        return report

    drained = stage("OBD replay, preloaded (throughput)", obd_preload)
    if drained is not None:
        results["replay_preload"] = drained.to_dict()
        print_replay(drained, console)
        replay_plots(drained, out, "preload")

    def ope() -> Any:
        from adloop.bench.obd_ope import run_obd_ope

        return run_obd_ope(
            "all", n_sim=100_000 if quick else 1_000_000, contextual_refresh=200 if quick else 50
        )

    ope_report = stage("off-policy evaluation (OBD)", ope)
    if ope_report is not None:
        results["ope"] = ope_report.to_dict()

    def bandits() -> Any:
        try:
            from adloop.bench.bandits import run_comparison
        except ImportError:
            return None
        return run_comparison(out, quick)

    comparison = stage("bandit comparison", bandits)
    results["bandits"] = comparison if comparison is not None else "not available"

    def contextual() -> Any:
        from adloop.bench.contextual import margins, run_simulation

        simulation = run_simulation(30_000 if quick else 100_000, seeds=1, progress=log.info)
        return {"simulation": simulation, "margins": margins(simulation)}

    contextual_sim = stage("contextual policy (simulator)", contextual)
    if contextual_sim is not None:
        results["contextual"] = contextual_sim

    total = time.monotonic() - started
    results.update(seconds=total, stage_seconds=timings, failures=failures)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = _markdown(
        results,
        spine,
        live,
        drained,
        ope_report,
        comparison,
        out,
        total,
        quick,
        load_before,
        platform.processor() or platform.machine(),
        os.cpu_count() or 0,
        failures,
        timings,
    )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    console.print(f"report: {out / 'report.md'} ({total / 60:.1f} min)")
    verified = all(
        r is not None and r.n_differences == 0 and r.http_verified is not False
        for r in (live, drained)
    )
    return verified and spine.counts_exact and not failures


def _markdown(
    results: dict[str, Any],
    spine: Any,
    live: ReplayReport | None,
    drained: ReplayReport | None,
    ope: Any,
    comparison: Any,
    out: Path,
    total_s: float,
    quick: bool,
    load_before: tuple[float, float, float],
    processor: str,
    cpus: int,
    failures: dict[str, str],
    timings: dict[str, float],
) -> list[str]:
    import time

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# adloop benchmark report",
        "",
        f"`adloop bench all{' --quick' if quick else ''}` on {when}: {total_s / 60:.1f} min, "
        f"{cpus} cores ({processor}), broker {results['broker']}, load average before the run "
        f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1 / 5 / 15 min). "
        "Everything (broker, adloop's processes, the load generators) shares these cores, so "
        "every figure includes that contention. How to read it: README, section "
        '"Reading the benchmark report".',
        "",
        "## Summary",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    if spine.ceiling_events_per_s:
        lines += [
            f"| ceiling: raw aiokafka consume of {spine.events:,} synthetic events | "
            f"{spine.ceiling_events_per_s:,.0f} events/s |",
            f"| adloop on them (ingest + worker, until every count is in a decision) | "
            f"{spine.adloop_events_per_s:,.0f} events/s, ratio **{spine.ratio:.2f}**, counts "
            f"{'exact' if spine.counts_exact else 'NOT exact'} |",
        ]
    if drained is not None:
        lines.append(
            f"| OBD random/all ×{drained.repeat} preloaded ({drained.events_published:,} "
            "events): adloop vs. ceiling | "
            f"{drained.adloop_events_per_s:,.0f} vs. {drained.ceiling_events_per_s:,.0f} "
            f"events/s, ratio **{drained.ratio:.2f}** |"
        )
    for name, report in (("preloaded", drained), ("at 2,000 impressions/s", live)):
        if report is not None:
            verdict = (
                "**exact**" if report.n_differences == 0 else f"**{report.n_differences} differ**"
            )
            lines.append(
                f"| OBD replay {name}: counts per creative × audience × placement "
                f"({report.cells:,} cells) | {verdict}; decisions topic "
                f"{report.decisions_verified}, serving API {report.http_verified}, dead letters "
                f"{sum(report.dead_letters.values())} |"
            )
    if live is not None:
        per_event = next(iter(live.latency_ms.values()), {})
        if per_event.get("n"):
            lines.append(
                f"| OBD at 2,000/s: event published → decision published (per event) | "
                f"p50 {per_event['p50']:,.0f} ms, p99 {per_event['p99']:,.0f} ms |"
            )
        worker = live.process_usage.get("worker")
        if worker:
            lines.append(
                f"| worker at 2,000/s: CPU, peak memory | {worker['cpu_s']:.1f} s CPU, "
                f"{worker.get('peak_rss_mb', worker['rss_mb']):.0f} MB |"
            )
    if spine.click_to_decision_ms:
        c, s = spine.click_to_decision_ms, spine.select_ms
        lines += [
            f"| click → decision over HTTP at ~2,000 events/s | p50 {c['p50']:.0f} ms, "
            f"p99 {c['p99']:.0f} ms |",
            f"| `POST /v1/select` from another process | p50 {s['p50']:.2f} ms, "
            f"p99 {s['p99']:.2f} ms |",
        ]
    if drained is not None and drained.engine:
        e = drained.engine
        lines.append(
            f"| pure engine, same OBD events, no Kafka | {e['events_per_s']:,.0f} events/s; "
            f"{e['select_per_s']:,.0f} selections/s one by one |"
        )
    if ope is not None and ope.ground_truth is not None:
        gt = ope.ground_truth
        lines.append(
            f"| BTS CTR observed in the bts log (ground truth) | {gt.value:.3%} "
            f"({gt.ci_low:.3%} – {gt.ci_high:.3%}) |"
        )
        for e in ope.bts:
            lines.append(
                f"| BTS CTR estimated from the random log: {e.method} | {e.value:.3%} "
                f"({e.ci_low:.3%} – {e.ci_high:.3%}), error {ope.relative_error[e.method]:.0%} |"
            )
        for e in getattr(ope, "contextual_vs_free", []):
            lines.append(
                f"| adloop contextual − context-free on the random log, {e.method} (paired) | "
                f"{e.value:+.3%} ({e.ci_low:+.3%} – {e.ci_high:+.3%}) |"
            )
    lines.append(f"| total runtime | {total_s / 60:.1f} min |")
    lines.append("")

    lines += ["## 1. Throughput against the ceiling", ""]
    lines += [
        "Both measurements preload the events, then start adloop and time it from the "
        "ingest's partition assignment until every count is visible in the decisions topic; "
        "the ceiling is a raw aiokafka `getmany` + JSON decode of the same messages on the "
        "same broker with adloop stopped.",
        "",
    ]
    if drained is not None:
        lines += [
            f"OBD: {drained.events_published:,} events ({drained.impressions_published:,} "
            f"impressions of 80 creatives × 3 placements × 3 audiences, "
            f"{drained.clicks_published:,} clicks); published at "
            f"{drained.publish_events_per_s:,.0f} events/s; ingest peak "
            f"{drained.ingest_peak_events_per_s:,.0f} events/s over 1 s windows.",
            "",
            "![throughput, preloaded](preload_throughput.png)",
            "![lag, preloaded](preload_lag.png)",
            "",
        ]
        lines += [*_usage_rows(drained.process_usage, drained.adloop_s), ""]
    if live is not None:
        lines += [
            "## 2. OBD replay at 2,000 impressions/s: verification, latency, lag",
            "",
            f"{live.events_published:,} events ({live.impressions_published:,} impressions, "
            f"{live.clicks_published:,} clicks, each 1 s after its impression); impressions "
            f"published at {live.impressions_per_s:,.0f}/s; every count verified at "
            f"{live.adloop_s:.1f} s after the first event.",
            "",
        ]
        lines += [*_latency_rows(live.latency_ms), ""]
        lines += [
            "![latency CDF](replay_latency_cdf.png)",
            "![throughput](replay_throughput.png)",
            "![lag](replay_lag.png)",
            "",
        ]
        lines += [
            "max lag: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in live.lag_max.items())
            + f"; over the {live.adloop_s:.1f} s:",
            "",
        ]
        lines += [*_usage_rows(live.process_usage, live.adloop_s), ""]
        if live.differences:
            lines += ["Differences:", "", *[f"- {d}" for d in live.differences[:30]], ""]
    if drained is not None and drained.engine:
        e = drained.engine
        lines += [
            "## 3. The engine's ceiling (no Kafka)",
            "",
            f"The same {e['events']:,.0f} OBD events through adloop's pure logic in one process: "
            "JSON decode, click join, aggregation per creative × placement, then what the "
            "worker does with a snapshot (apply, feed the bandit engine, build the decision) "
            f"per changed key every "
            f"{e['batch_events']:,.0f} events: **{e['events_per_s']:,.0f} events/s** "
            f"({e['decisions']:,.0f} decisions, {e['decision_ms']:.1f} ms each: the worker "
            "does this per changed campaign × audience on every decision tick). "
            "Serving-style selection (one draw from the "
            f"decision's probabilities per call): {e['select_per_s']:,.0f}/s; vectorized "
            f"Thompson decisions (`thompson_select_many`, 80 arms): "
            f"{e['thompson_draws_per_s']:,.0f}/s.",
            "",
        ]
    if ope is not None:
        lines += _ope_markdown(ope)
    lines += ["## 5. Bandit comparison", ""]
    bandits_md = out / "bandits.md"
    if comparison is None:
        lines += ["not available (`bench.bandits.run_comparison` is not importable)", ""]
    elif bandits_md.exists():
        for line in bandits_md.read_text().splitlines():
            lines.append(f"##{line}" if line.startswith("#") else line)
        lines.append("")
    else:
        lines += ["```", str(comparison)[:4000], "```", ""]
    if "contextual" in results:
        from adloop.bench.contextual import markdown as contextual_markdown

        lines += ["## 6. The contextual policy (simulator)", ""]
        for line in contextual_markdown(results["contextual"]):
            if line.startswith("# "):
                continue
            lines.append(f"##{line}" if line.startswith("#") else line)
        lines += [
            "One seed here; `adloop bench contextual` runs more seeds, the ingest cost, the "
            "spine ratio on impressions with a context and `select` latency with a context.",
            "",
        ]
    lines += ["## Stage timings", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
    lines.append("")
    if failures:
        lines += ["## Failures", "", *[f"- {k}: {v}" for k, v in failures.items()], ""]
    return lines


def _ope_markdown(ope: Any) -> list[str]:
    gt = ope.ground_truth
    lines = [
        "## 4. Off-policy evaluation on the Open Bandit Dataset",
        "",
        f"As in Saito et al. (2020): the CTR of the Bernoulli Thompson sampling (BTS) policy "
        f"estimated from the uniform-random log ({ope.rounds_random:,} rounds) against the CTR "
        f"observed in the BTS log ({ope.rounds_bts:,} rounds, campaign `{ope.campaign}`). "
        f"BTS's action distribution: {ope.n_sim:,} Monte Carlo rankings from its production "
        "prior. Intervals are 95 %: normal over rounds for IPS / SNIPS / DM / DR, exact "
        "(Clopper-Pearson) for replay and the on-policy CTRs. DM's interval ignores the "
        "reward model's own error.",
        "",
        f"Ground truth, BTS on-policy: **{gt.value:.3%}** ({gt.ci_low:.3%} – {gt.ci_high:.3%}); "
        f"the random policy's own CTR: {ope.random_ctr.value:.3%} "
        f"({ope.random_ctr.ci_low:.3%} – {ope.random_ctr.ci_high:.3%}).",
        "",
        "| estimator | estimate | 95 % interval | rounds used | relative error | covers truth |",
        "|---|---:|---|---:|---:|---|",
    ]
    for e in ope.bts + ope.bts_as_logged:
        lines.append(_estimate_row(e, gt.value, ope.relative_error.get(e.method)))
    if ope.diagnostics:
        lines += [
            "",
            "The reconstructed BTS (production prior) against the propensities logged by the "
            f"BTS that actually ran: correlation {ope.diagnostics['bts_log_propensity_corr']:.2f},"
            f" median ratio {ope.diagnostics['bts_log_propensity_median_ratio']:.2f}. The "
            "production policy was updated during the week the log covers, so the prior is "
            "where it started; the rows marked *as logged* use the BTS log's frequency of each "
            "item at each position (its actions, not its rewards) as the target instead.",
        ]
    if ope.note:
        lines += ["", ope.note]
    lines += [
        "",
        "adloop's own policy on the random log: per audience, the bandit engine the worker runs "
        f"(`bandit.CreativeEngine` with the default settings: policy `{ope.policy}`, 1 % "
        "exploration floor) over the 80 items with uniform priors. Replay "
        "lets it learn only from the rounds it matched (unbiased for the adaptive policy, few "
        "rounds); the other estimators let it learn from every earlier logged round.",
        "",
        "| estimator | estimate | 95 % interval | rounds used |",
        "|---|---:|---|---:|",
    ]
    lines += [_estimate_row(e) for e in ope.adloop]
    if getattr(ope, "contextual", None):
        lines += [
            "",
            "adloop's **contextual** policy (`ADLOOP_POLICY=contextual`, logistic Thompson "
            "sampling) on the same log, learning from every earlier round as above: one model "
            "per audience, the position as placement, the cell of `user_feature_1` × "
            "`user_feature_2`, the items' categorical features as creative features; refitted "
            f"every {ope.contextual_refresh} rounds of its audience and after each click; the "
            "1 % floor. Below it, "
            "contextual minus context-free on the same rounds (paired: the interval of the "
            "per-round differences). The BTS rows above are the only policy with an observed "
            "ground truth; no log of these two policies exists.",
            "",
            "| estimator | estimate | 95 % interval | rounds used |",
            "|---|---:|---|---:|",
        ]
        lines += [_estimate_row(e) for e in ope.contextual]
        for e in getattr(ope, "contextual_vs_free", []):
            lines.append(
                f"| {e.method} (contextual − context-free) | {e.value:+.3%} | "
                f"{e.ci_low:+.3%} – {e.ci_high:+.3%} | {e.n:,} |"
            )
        lines.append(f"\n(contextual: {ope.contextual_seconds:.0f} s)")
    lines += ["", f"({ope.seconds:.0f} s)", ""]
    return lines

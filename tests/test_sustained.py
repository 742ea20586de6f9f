"""The sustained-traffic measurement behind ``adloop bench spine`` and ``adloop bench soak``:
its pure parts (percentiles, per-minute p99, trend, RSS growth, stalls, the soak's
verdict) and one short real run on the embedded broker (outcomes only, no timings)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from adloop.bench.soak import effective_baseline_minute, judge
from adloop.bench.sustained import (
    Sample,
    Sustained,
    SustainedConfig,
    SustainedResult,
    find_stalls,
    latency_trend,
    per_minute,
    percentiles,
    plot_latency_cdf,
    plot_latency_over_time,
    plot_processes,
    plot_throughput,
    rss_growth,
)
from adloop.streams.config import Settings
from adloop.streams.supervisor import Supervisor


def test_percentiles() -> None:
    p = percentiles(list(range(1, 101)))
    assert p["n"] == 100 and p["max"] == 100
    assert p["p50"] == pytest.approx(50.5)
    assert p["p99"] == pytest.approx(99.01)
    assert percentiles([]) == {"n": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}


def test_per_minute_groups_probes_by_their_minute() -> None:
    probes = [(5.0, 10.0), (59.9, 30.0), (61.0, 100.0), (185.0, 7.0)]
    rows = per_minute(probes)
    assert [r["minute"] for r in rows] == [0.0, 1.0, 3.0]  # no probe in minute 2
    assert [r["n"] for r in rows] == [2.0, 1.0, 1.0]
    assert rows[0]["max"] == 30.0 and rows[1]["p99"] == 100.0


def _probes(latency_at_minute: list[float], per_min: int = 60) -> list[tuple[float, float]]:
    return [
        (m * 60 + i * 60 / per_min, ms)
        for m, ms in enumerate(latency_at_minute)
        for i in range(per_min)
    ]


def test_a_flat_latency_is_not_rising() -> None:
    trend = latency_trend(_probes([50.0] * 9), duration_s=540)
    assert not trend.rising
    assert trend.slope_ms_per_min == pytest.approx(0.0, abs=1e-9)


def test_a_growing_latency_is_rising() -> None:
    trend = latency_trend(_probes([50, 60, 70, 80, 90, 100, 110, 120, 130]), duration_s=540)
    assert trend.rising
    assert trend.slope_ms_per_min == pytest.approx(10.0)
    assert trend.last_third_p99 > trend.first_third_p99


def test_a_small_absolute_rise_is_not_called_rising() -> None:
    # +50 % but only 5 ms: under the absolute slack.
    trend = latency_trend(_probes([10, 10, 10, 15, 15, 15]), duration_s=360)
    assert not trend.rising


def test_a_falling_latency_is_not_rising() -> None:
    assert not latency_trend(_probes([1000, 900, 50, 50, 50, 50]), duration_s=360).rising


def test_rss_growth_against_the_baseline_minute() -> None:
    times = [float(t) for t in range(0, 601)]
    flat = [100.0 + (t % 3) for t in times]  # noise, no growth
    growth = rss_growth(times, flat, baseline_s=300)
    assert growth is not None and growth.ok
    leaking = [100.0 + t * 0.1 for t in times]  # 130 at minute 5, 160 at the end
    growth = rss_growth(times, leaking, baseline_s=300)
    assert growth is not None and not growth.ok
    assert growth.baseline_mb == pytest.approx(130.0) and growth.end_mb == pytest.approx(158.5)


def test_rss_growth_skips_missing_samples_and_reports_none_without_any() -> None:
    times = [0.0, 1.0, 2.0, 3.0]
    assert rss_growth(times, [None, None, None, None], baseline_s=1) is None
    growth = rss_growth(times, [None, 100.0, None, 105.0], baseline_s=1, window_s=1)
    assert growth is not None and growth.ok and growth.end_mb == 105.0


def test_no_stall_while_counts_move_or_nothing_waits() -> None:
    times = [float(t) for t in range(30)]
    sent = [100 * t for t in range(30)]
    assert find_stalls(times, sent, [max(0, s - 150) for s in sent], stall_s=5) == []
    # Traffic stopped at 10 s and everything counted: no progress, but nothing waits.
    sent_then_idle = [min(s, 1000) for s in sent]
    assert find_stalls(times, sent_then_idle, sent_then_idle, stall_s=5) == []


def test_a_stretch_without_progress_is_a_stall() -> None:
    times = [float(t) for t in range(40)]
    sent = [100 * t for t in range(40)]
    counted = [100 * t if t <= 10 or t >= 25 else 1000 for t in range(40)]
    stalls = find_stalls(times, sent, counted, stall_s=10)
    assert len(stalls) == 1
    assert stalls[0].start_s == 10.0 and stalls[0].seconds == 15.0
    assert stalls[0].backlog == 2400 - 1000 and not stalls[0].ongoing
    # Shorter than the threshold: not reported.
    assert find_stalls(times, sent, counted, stall_s=20) == []


def test_a_stall_at_the_end_is_ongoing() -> None:
    times = [float(t) for t in range(30)]
    sent = [100 * t for t in range(30)]
    counted = [min(100 * t, 500) for t in range(30)]
    (stall,) = find_stalls(times, sent, counted, stall_s=10)
    assert stall.ongoing and stall.start_s == 5.0 and stall.backlog == 2900 - 500


def _result(rss_end: float, latency_end: float, restarts: int = 0) -> SustainedResult:
    samples = [
        Sample(
            t=float(t),
            sent=100 * t,
            counted=100 * t,
            rss_mb={"worker": 200.0 if t < 500 else rss_end, "broker": 50.0 + t},
        )
        for t in range(0, 901, 10)
    ]
    probes = _probes([50.0] * 10 + [latency_end] * 5)
    return SustainedResult(
        seconds=900,
        probes=probes,
        samples=samples,
        restarts={"worker": restarts},
        sent_total=9000,
        counted_total=9000,
        drained=True,
    )


def test_the_soak_verdict_names_each_failed_criterion() -> None:
    rss, trend, stalls, failures = judge(_result(205.0, 50.0), ["worker"], 300, 10)
    assert failures == []
    assert rss["worker"]["ok"] and not rss["broker"]["judged"]  # the broker grows, unjudged
    assert not trend["rising"] and stalls == []
    _, _, _, failures = judge(_result(260.0, 400.0, restarts=2), ["worker", "serve"], 300, 10)
    assert any(f.startswith("worker RSS") for f in failures)
    assert any("p99 rising" in f for f in failures)
    assert "roles restarted: worker x2" in failures
    assert "serve: never sampled" in failures


def test_the_baseline_minute_of_a_short_soak() -> None:
    assert effective_baseline_minute(30, 5) == 5
    assert effective_baseline_minute(3, 5) == 1


def test_plots_are_written(tmp_path: Path) -> None:
    result = _result(205.0, 50.0)
    result.lost = [(30.0, "click")]
    for plot, name in (
        (plot_latency_cdf, "cdf.png"),
        (plot_throughput, "throughput.png"),
        (plot_latency_over_time, "latency.png"),
        (plot_processes, "processes.png"),
    ):
        path = plot(result, tmp_path / name, "title")
        assert path.stat().st_size > 0


def test_a_short_sustained_run_on_the_real_stack(settings: Settings) -> None:
    """Traffic, probes and samples on ingest, worker and serve; afterwards every sent
    event is counted. (How fast is the benchmark's business.)"""
    from adloop.bench.harness import free_port

    settings = settings.with_overrides(api_port=free_port())
    config = SustainedConfig(rate=200.0, probe_interval_s=0.5, probe_timeout_s=120.0)
    with Supervisor(settings) as sup:
        sup.wait_http_ready(timeout=120)
        run = Sustained(settings, sup, config, Console(quiet=True), supervise=True)
        with run.running():
            result = run.measure(20.0)
    assert result.probes, f"no probe answered; lost: {result.lost}"
    assert not result.lost
    assert result.drained and result.sent_total > 0
    assert {"ingest", "worker", "serve", "bench", "bench-traffic"} <= set(result.processes())
    assert result.samples[-1].counted > 0
    assert result.restarts == {"ingest": 0, "worker": 0, "serve": 0}

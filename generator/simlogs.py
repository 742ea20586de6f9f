"""Simulated impression logs whose true click-through rate is known.

For tests and for measuring the CTR model: how close does it get to the best
possible AUC, the AUC of the true CTR itself? Pure and seeded (numpy only).

The world: creatives advertise a product with words from one or two *themes*
(price, tech, luxury, family, safety, speed). Each audience likes some themes
and dislikes others, placements shift the rate, and each creative has a small
hidden quality the text does not reveal. So the true CTR depends on text ×
audience (what a text model can learn), plus a little per-creative noise (what
only per-creative history reveals)::

    logit(ctr) = logit(base_ctr) + placement shift + quality
                 + affinity_scale * sum(audience affinity of each theme in the text)

Creatives launch over time (a few are live from the start), so a time-based
validation split holds creatives that the training split never saw: there,
per-creative history knows nothing and the text is all a model has.

Rows have the fields of the CTR training export (see ``generator.train_ctr``)
plus ``true_ctr``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Theme -> (words used in headlines, phrases used in descriptions).
THEMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "price": (("Sale", "Discount", "Deal", "Save on"), ("half price this week", "lowest price")),
    "tech": (("Smart", "Wireless", "App-ready"), ("syncs with your phone", "smart features")),
    "luxury": (("Premium", "Luxury", "Elegant"), ("handcrafted finish", "exclusive design")),
    "family": (("Family", "Kids'", "Home"), ("loved by kids", "for the whole family")),
    "safety": (("Safe", "Trusted", "Certified"), ("safety certified", "two-year guarantee")),
    "speed": (("Fast", "Instant", "Express"), ("delivered tomorrow", "ready in minutes")),
}
# Audience -> theme -> logit shift. Unlisted themes: 0.
AUDIENCE_AFFINITY: dict[str, dict[str, float]] = {
    "students": {"price": 0.9, "tech": 0.5, "luxury": -0.7},
    "parents": {"family": 0.9, "safety": 0.6, "tech": -0.3},
    "professionals": {"speed": 0.8, "luxury": 0.5, "price": -0.5},
    "retirees": {"safety": 0.8, "luxury": 0.3, "tech": -0.8},
}
AUDIENCE_SHARE = {"students": 0.3, "parents": 0.3, "professionals": 0.25, "retirees": 0.15}
PLACEMENT_LOGIT = {"feed": 0.0, "search": 0.6, "sidebar": -0.8}
PLACEMENT_SHARE = {"feed": 0.5, "search": 0.3, "sidebar": 0.2}
PRODUCTS = ("headphones", "backpack", "coffee maker", "running shoes", "desk lamp", "stroller")


@dataclass(frozen=True)
class SimCreative:
    creative_id: str
    campaign: str
    headline: str
    description: str
    themes: tuple[str, ...]
    quality: float  # hidden logit shift: what the text does not say
    launched_at: float


@dataclass(frozen=True)
class SimConfig:
    impressions: int = 20_000
    creatives: int = 40
    initial_creatives: int = 10  # live from the start; the rest launch in the first 80 %
    start: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    duration_s: float = 14 * 86_400.0
    base_ctr: float = 0.03
    affinity_scale: float = 1.0
    quality_std: float = 0.15
    seed: int = 0


@dataclass(frozen=True)
class SimulatedLog:
    config: SimConfig
    creatives: list[SimCreative]
    rows: list[dict[str, Any]]  # export rows, sorted by timestamp, with "true_ctr"


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def true_ctr(creative: SimCreative, audience: str, placement: str, config: SimConfig) -> float:
    affinity = AUDIENCE_AFFINITY[audience]
    logit = (
        _logit(config.base_ctr)
        + PLACEMENT_LOGIT[placement]
        + creative.quality
        + config.affinity_scale * sum(affinity.get(theme, 0.0) for theme in creative.themes)
    )
    return 1.0 / (1.0 + math.exp(-logit))


def make_creatives(config: SimConfig, rng: np.random.Generator) -> list[SimCreative]:
    """Creatives sorted by launch time, the first ``initial_creatives`` live at the start."""
    theme_names = sorted(THEMES)
    later = config.creatives - config.initial_creatives
    launches = [config.start] * config.initial_creatives + sorted(
        config.start + 0.8 * config.duration_s * float(u) for u in rng.random(max(later, 0))
    )
    creatives = []
    for i, launched_at in enumerate(launches):
        product = PRODUCTS[int(rng.integers(len(PRODUCTS)))]
        count = 1 if rng.random() < 0.3 else 2
        themes = tuple(str(t) for t in rng.choice(theme_names, size=count, replace=False))
        words = [THEMES[t][0][int(rng.integers(len(THEMES[t][0])))] for t in themes]
        phrases = [THEMES[t][1][int(rng.integers(len(THEMES[t][1])))] for t in themes]
        headline = f"{words[0]} {product}" + (f": {words[1].lower()}" if count == 2 else "")
        description = f"Our {product}, " + " and ".join(phrases) + "."
        creatives.append(
            SimCreative(
                creative_id=f"sim-c{i:03d}",
                campaign="sim-campaign",
                headline=headline,
                description=description,
                themes=themes,
                quality=float(rng.normal(0.0, config.quality_std)),
                launched_at=launched_at,
            )
        )
    return creatives


def simulate(config: SimConfig = SimConfig()) -> SimulatedLog:
    """Impressions with Bernoulli clicks drawn from the true CTR; same config, same log."""
    rng = np.random.default_rng(config.seed)
    creatives = make_creatives(config, rng)
    audiences = list(AUDIENCE_SHARE)
    placements = list(PLACEMENT_SHARE)
    # True CTR table [creative, audience, placement], so sampling is vectorised.
    table = np.array(
        [[[true_ctr(c, a, p, config) for p in placements] for a in audiences] for c in creatives]
    )
    n = config.impressions
    timestamps = np.sort(config.start + config.duration_s * rng.random(n))
    launch_times = np.array([c.launched_at for c in creatives])
    live = np.searchsorted(launch_times, timestamps, side="right")  # creatives live at t
    creative_idx = np.minimum((rng.random(n) * live).astype(np.int64), live - 1)
    audience_idx = rng.choice(len(audiences), size=n, p=list(AUDIENCE_SHARE.values()))
    placement_idx = rng.choice(len(placements), size=n, p=list(PLACEMENT_SHARE.values()))
    ctr = table[creative_idx, audience_idx, placement_idx]
    clicked = rng.random(n) < ctr
    rows = []
    for i in range(n):
        creative = creatives[creative_idx[i]]
        rows.append(
            {
                "impression_id": f"sim{config.seed}-{i:07d}",
                "timestamp": float(timestamps[i]),
                "campaign": creative.campaign,
                "audience": audiences[audience_idx[i]],
                "placement": placements[placement_idx[i]],
                "creative_id": creative.creative_id,
                "headline": creative.headline,
                "description": creative.description,
                "clicked": bool(clicked[i]),
                "true_ctr": float(ctr[i]),
            }
        )
    return SimulatedLog(config=config, creatives=creatives, rows=rows)


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    """One JSON object per line: the export format ``adloop train-ctr --from-file`` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    return path

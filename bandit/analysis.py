"""What the posteriors say about each creative: P(best), expected loss, labels, guard.

One Monte Carlo pass over joint posterior draws gives every quantity at once:

* ``p_best[i]``     P(θ_i is the largest CTR);
* ``p_within[i]``   P(θ_i ≥ (1 - δ) · max_j θ_j), "within δ of the best", where the max
  runs over the arms that are no longer learning (a brand-new creative's wide
  posterior would otherwise make every established creative look uncertain);
* ``expected_loss[i]`` E[max_j θ_j - θ_i], the CTR given up per impression by showing i.

Labels follow the responsive-search-ads vocabulary advertisers know (``learning``,
``low``, ``good``, ``best``) but are derived from these posterior quantities, never
from how often a creative was served: a creative that got little traffic but is
confidently near the best is ``best``; one with lots of traffic but a wide interval
is still ``learning``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import betaincinv

__all__ = [
    "Label",
    "LabelRules",
    "PosteriorSummary",
    "guard_exploration",
    "label_arms",
    "summarize",
]

Label = Literal["learning", "low", "good", "best"]
_MAX_BLOCK = 1 << 20


@dataclass(frozen=True)
class PosteriorSummary:
    mean: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_best: np.ndarray
    p_within: np.ndarray
    expected_loss: np.ndarray
    within: float  # the δ of p_within
    learning: np.ndarray  # interval still wider than LabelRules.max_relative_width


def summarize(
    alpha: np.ndarray,
    beta: np.ndarray,
    rng: np.random.Generator,
    draws: int = 2000,
    within: float = 0.10,
    level: float = 0.95,
    max_relative_width: float = 1.0,
) -> PosteriorSummary:
    """Posterior summary of independent Beta(alpha_i, beta_i) arms (Monte Carlo, blocked)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    k = alpha.size
    mean = alpha / (alpha + beta) if k else np.zeros(0)
    q = betaincinv(
        np.concatenate([alpha, alpha]),
        np.concatenate([beta, beta]),
        np.repeat([(1 - level) / 2, (1 + level) / 2], k),
    )
    learning = (q[k:] - q[:k]) > max_relative_width * np.maximum(mean, 1e-12)
    compare = ~learning if (~learning).any() else np.ones(k, dtype=bool)
    wins = np.zeros(k)
    near = np.zeros(k)
    loss = np.zeros(k)
    # Beyond ~50 clicks and non-clicks a Beta is indistinguishable from its normal
    # approximation for these purposes, and normal variates cost a tenth as much: what
    # keeps a decision over 80 creatives in milliseconds.
    big = (alpha > 50) & (beta > 50)
    sd = np.sqrt(alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1))) if k else alpha
    if k:
        block = max(1, _MAX_BLOCK // k)
        remaining = int(draws)
        while remaining:
            m = min(block, remaining)
            theta = np.empty((m, k))
            if big.any():
                theta[:, big] = mean[big] + sd[big] * rng.standard_normal((m, int(big.sum())))
            if (~big).any():
                theta[:, ~big] = rng.beta(alpha[~big], beta[~big], size=(m, int((~big).sum())))
            top = theta.max(axis=1, keepdims=True)
            wins += np.bincount(np.argmax(theta, axis=1), minlength=k)
            near += (theta >= (1 - within) * theta[:, compare].max(axis=1, keepdims=True)).sum(
                axis=0
            )
            loss += (top - theta).sum(axis=0)
            remaining -= m
    n = float(max(draws, 1))
    return PosteriorSummary(
        mean=mean,
        ci_low=q[:k],
        ci_high=q[k:],
        p_best=wins / n,
        p_within=near / n,
        expected_loss=loss / n,
        within=within,
        learning=learning,
    )


@dataclass(frozen=True)
class LabelRules:
    """Thresholds behind the labels; defaults favour not mislabelling over speed."""

    # Still learning while the 95 % interval is wider than this multiple of the mean
    # (1.0 = roughly ±50 %): ~15 clicks' worth of evidence. Passed to summarize().
    max_relative_width: float = 1.0
    # "best": confidently within δ of the best CTR; "low": confidently not.
    best_p_within: float = 0.80
    low_p_within: float = 0.05


def label_arms(summary: PosteriorSummary, rules: LabelRules = LabelRules()) -> list[Label]:
    """One label per arm from its posterior (see the module docstring)."""
    labels: list[Label] = []
    for i in range(summary.mean.size):
        if summary.p_within[i] <= rules.low_p_within:
            # Confidently worse than the best by more than δ: "low" even with little
            # traffic, because the evidence, not the traffic, says so.
            labels.append("low")
        elif summary.learning[i]:
            labels.append("learning")
        elif summary.p_within[i] >= rules.best_p_within:
            labels.append("best")
        else:
            labels.append("good")
    return labels


def guard_exploration(
    probabilities: np.ndarray,
    learning: np.ndarray,
    min_share: float,
    max_total: float = 0.5,
) -> np.ndarray:
    """Give each still-learning arm at least ``min_share`` of traffic.

    Without this, Thompson sampling on 0.1–5 % CTRs hands one creative 70–95 % of the
    traffic within days and the rest never leave ``learning``. The learning arms
    together never take more than ``max_total``; the others are scaled down
    proportionally, so the policy's ranking among them is kept.
    """
    p = np.asarray(probabilities, dtype=np.float64).copy()
    learning = np.asarray(learning, dtype=bool)
    n_learning = int(learning.sum())
    if n_learning == 0 or min_share <= 0 or n_learning == p.size:
        return p
    floor = min(min_share, max_total / n_learning)
    need = np.where(learning, np.maximum(floor - p, 0.0), 0.0)
    extra = float(need.sum())
    if extra <= 0:
        return p
    donors = ~learning
    donor_mass = float(p[donors].sum())
    if donor_mass <= extra:
        # Not enough mass outside: split what exists evenly among learning arms.
        p[learning] = (p[learning].sum() + donor_mass) / n_learning
        p[donors] = 0.0
    else:
        p[donors] *= (donor_mass - extra) / donor_mass
        p += need
    return p / p.sum()

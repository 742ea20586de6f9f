"""Informative priors: where a new arm starts before it has its own evidence.

* A new creative starts from its predicted CTR (the CTR model's output) worth
  ``strength`` pseudo-impressions: :meth:`bandit.BetaPrior.from_mean`.
* A creative in a new (or sparse) audience borrows strength from the campaign level:
  :func:`shrinkage_prior` fits a Beta to that creative's CTRs across the campaign's
  audiences by the method of moments (empirical Bayes, as in beta-binomial
  shrinkage), so the prior is as strong as audiences are alike, and weak when they
  differ.
"""

from __future__ import annotations

import numpy as np

from adloop.bandit.beta import UNIFORM_PRIOR, BetaPrior

__all__ = ["shrinkage_prior"]


def shrinkage_prior(
    impressions: np.ndarray,
    clicks: np.ndarray,
    default_strength: float = 20.0,
    min_strength: float = 2.0,
    max_strength: float = 1000.0,
) -> BetaPrior:
    """Beta prior for a creative in a new audience from its counts in other audiences.

    The mean is the pooled CTR. The strength ``s = m(1-m)/τ² - 1`` comes from the
    between-audience variance ``τ²`` (observed variance of the per-audience CTRs minus
    their binomial noise). With fewer than two audiences there is no variance to
    measure: the strength is ``default_strength``, never more than the evidence.
    """
    n = np.asarray(impressions, dtype=np.float64)
    k = np.asarray(clicks, dtype=np.float64)
    seen = n > 0
    n, k = n[seen], k[seen]
    total_n = float(n.sum())
    if total_n <= 0:
        return UNIFORM_PRIOR
    # Half a click of smoothing keeps the mean inside (0, 1) for all-zero or all-one data.
    mean = (float(k.sum()) + 0.5) / (total_n + 1.0)
    if n.size < 2:
        strength = min(default_strength, total_n)
    else:
        rates = k / n
        weights = n / total_n
        observed = float(np.sum(weights * (rates - mean) ** 2))
        noise = mean * (1 - mean) * float(np.sum(weights / n))
        between = observed - noise
        # between <= 0: audiences differ no more than sampling noise explains, pool hard.
        strength = max_strength if between <= 0 else mean * (1 - mean) / between - 1.0
    strength = float(np.clip(strength, min_strength, max_strength))
    return BetaPrior.from_mean(mean, strength)

"""Off-policy evaluation: how a target policy would have done on a logged bandit feed.

Pure numpy, no I/O. Inputs are arrays over logged rounds ``i``:

* ``rewards[i]``       observed reward (click = 1) of the logged action;
* ``propensities[i]``  probability with which the *logging* policy chose that action;
* ``target_probs[i]``  probability with which the *target* policy would choose it;
* for the doubly robust estimator also ``target_dist[i, a]`` (the target policy's whole
  distribution) and ``reward_model[i, a]`` (a reward model's prediction for every action),
  plus ``actions[i]``.

Confidence intervals are normal approximations on the per-round terms (the estimators
are means of i.i.d. terms), except for self-normalized IPS, which uses the delta method.
This is groundwork for issue 6 (`adloop replay` / `adloop bench`); see its tests for the
hand-computed cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    method: str
    value: float
    ci_low: float
    ci_high: float
    n: int  # rounds that contributed

    def __str__(self) -> str:
        interval = f"{self.ci_low:.4%}–{self.ci_high:.4%}"
        return f"{self.method}: {self.value:.4%} (95% CI {interval}, n={self.n:,})"


def _check(rewards: np.ndarray, propensities: np.ndarray, target_probs: np.ndarray) -> None:
    if not (rewards.shape == propensities.shape == target_probs.shape):
        raise ValueError("rewards, propensities and target_probs must have the same shape")
    if rewards.size == 0:
        raise ValueError("no logged rounds")
    if np.any(propensities <= 0) or np.any(propensities > 1):
        raise ValueError("logged propensities must be in (0, 1]: a 0 makes IPS undefined")
    if np.any(target_probs < 0) or np.any(target_probs > 1):
        raise ValueError("target probabilities must be in [0, 1]")


def _mean_with_ci(method: str, terms: np.ndarray) -> Estimate:
    n = terms.size
    value = float(terms.mean())
    half = Z95 * float(terms.std(ddof=1)) / np.sqrt(n) if n > 1 else float("inf")
    return Estimate(method, value, value - half, value + half, n)


def _exact_binomial(method: str, rewards: np.ndarray) -> Estimate:
    """Mean of 0/1 rewards with the Clopper-Pearson interval, which stays honest where
    the normal one collapses (few rounds, no or few clicks)."""
    from scipy.stats import binomtest

    if not np.isin(rewards, (0.0, 1.0)).all():
        raise ValueError("an exact binomial interval needs 0/1 rewards")
    n, k = rewards.size, int(rewards.sum())
    interval = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return Estimate(method, k / n, float(interval.low), float(interval.high), n)


def replay(
    actions: np.ndarray,
    rewards: np.ndarray,
    target_actions: np.ndarray,
    interval: Literal["normal", "exact"] = "normal",
) -> Estimate:
    """Li et al.'s replay method for logs of a uniform-random policy: the target policy's
    CTR is the mean reward over rounds where it picks the logged action.
    ``interval="exact"``: Clopper-Pearson for 0/1 rewards."""
    actions, rewards, target_actions = map(np.asarray, (actions, rewards, target_actions))
    match = actions == target_actions
    if not match.any():
        raise ValueError("the target policy never agrees with the log: no rounds to replay")
    if interval == "exact":
        return _exact_binomial("replay", rewards[match].astype(float))
    return _mean_with_ci("replay", rewards[match].astype(float))


def ips(rewards: np.ndarray, propensities: np.ndarray, target_probs: np.ndarray) -> Estimate:
    """Inverse propensity scoring: mean of (target / logging probability) * reward."""
    rewards, propensities, target_probs = (
        np.asarray(x, dtype=float) for x in (rewards, propensities, target_probs)
    )
    _check(rewards, propensities, target_probs)
    return _mean_with_ci("IPS", target_probs / propensities * rewards)


def snips(rewards: np.ndarray, propensities: np.ndarray, target_probs: np.ndarray) -> Estimate:
    """Self-normalized IPS: sum(w r) / sum(w); lower variance, slightly biased."""
    rewards, propensities, target_probs = (
        np.asarray(x, dtype=float) for x in (rewards, propensities, target_probs)
    )
    _check(rewards, propensities, target_probs)
    w = target_probs / propensities
    if w.sum() <= 0:
        raise ValueError("the target policy puts no probability on any logged action")
    value = float((w * rewards).sum() / w.sum())
    # Delta method for a ratio of means: terms w (r - value) / mean(w).
    terms = w * (rewards - value) / w.mean()
    n = rewards.size
    half = Z95 * float(terms.std(ddof=1)) / np.sqrt(n) if n > 1 else float("inf")
    return Estimate("SNIPS", value, value - half, value + half, n)


def doubly_robust(
    rewards: np.ndarray,
    propensities: np.ndarray,
    actions: np.ndarray,
    target_dist: np.ndarray,
    reward_model: np.ndarray,
) -> Estimate:
    """Doubly robust: the reward model's value under the target policy, corrected by IPS
    on the model's error for the logged action. Unbiased if either the propensities or
    the reward model are right."""
    rewards, propensities = np.asarray(rewards, float), np.asarray(propensities, float)
    actions = np.asarray(actions)
    target_dist, reward_model = np.asarray(target_dist, float), np.asarray(reward_model, float)
    n = rewards.size
    if target_dist.shape != reward_model.shape or target_dist.shape[0] != n:
        raise ValueError("target_dist and reward_model must be (rounds, actions) arrays")
    rows = np.arange(n)
    target_probs = target_dist[rows, actions]
    _check(rewards, propensities, target_probs)
    direct = (target_dist * reward_model).sum(axis=1)
    correction = target_probs / propensities * (rewards - reward_model[rows, actions])
    return _mean_with_ci("DR", direct + correction)


def on_policy(rewards: np.ndarray, interval: Literal["normal", "exact"] = "normal") -> Estimate:
    """The logging policy's own value: the mean observed reward (the ground truth that
    off-policy estimates of the same policy are compared with)."""
    rewards = np.asarray(rewards, dtype=float)
    if rewards.size == 0:
        raise ValueError("no logged rounds")
    if interval == "exact":
        return _exact_binomial("on-policy", rewards)
    return _mean_with_ci("on-policy", rewards)


def direct_method(target_dist: np.ndarray, reward_model: np.ndarray) -> Estimate:
    """The reward model's value under the target policy, no propensities. The interval
    covers only the spread over rounds, not the model's own error."""
    target_dist, reward_model = np.asarray(target_dist, float), np.asarray(reward_model, float)
    if target_dist.shape != reward_model.shape or target_dist.ndim != 2:
        raise ValueError("target_dist and reward_model must be (rounds, actions) arrays")
    return _mean_with_ci("DM", (target_dist * reward_model).sum(axis=1))

"""Off-policy estimators against hand-computed values on tiny logs."""

from __future__ import annotations

import numpy as np
import pytest

from adloop.bench.ope import Z95, doubly_robust, ips, replay, snips

# Four logged rounds, two actions, logging policy chose with these propensities.
ACTIONS = np.array([0, 1, 0, 1])
REWARDS = np.array([1.0, 0.0, 0.0, 1.0])
PROPENSITIES = np.array([0.5, 0.5, 0.25, 0.75])
# Target policy: always action 0.
TARGET_DIST = np.array([[1.0, 0.0]] * 4)
TARGET_PROBS = TARGET_DIST[np.arange(4), ACTIONS]  # [1, 0, 1, 0]


def test_replay_averages_rounds_where_the_target_agrees() -> None:
    est = replay(ACTIONS, REWARDS, np.zeros(4, dtype=int))
    # Rounds 0 and 2 match: rewards 1 and 0.
    assert est.value == pytest.approx(0.5)
    assert est.n == 2
    half = Z95 * np.std([1.0, 0.0], ddof=1) / np.sqrt(2)
    assert (est.ci_low, est.ci_high) == pytest.approx((0.5 - half, 0.5 + half))
    with pytest.raises(ValueError, match="never agrees"):
        replay(np.array([1, 1]), np.array([1.0, 0.0]), np.array([0, 0]))


def test_ips_by_hand() -> None:
    est = ips(REWARDS, PROPENSITIES, TARGET_PROBS)
    # Terms: 1/0.5*1 = 2, 0, 1/0.25*0 = 0, 0 -> mean 0.5.
    assert est.value == pytest.approx(0.5)
    terms = np.array([2.0, 0.0, 0.0, 0.0])
    half = Z95 * terms.std(ddof=1) / 2
    assert est.ci_high - est.value == pytest.approx(half)


def test_snips_by_hand() -> None:
    est = snips(REWARDS, PROPENSITIES, TARGET_PROBS)
    # Weights: 2, 0, 4, 0 -> sum(w r) = 2, sum(w) = 6 -> 1/3.
    assert est.value == pytest.approx(1 / 3)
    assert est.ci_low < est.value < est.ci_high


def test_doubly_robust_by_hand() -> None:
    model = np.array([[0.4, 0.1]] * 4)  # predicted reward for each action
    est = doubly_robust(REWARDS, PROPENSITIES, ACTIONS, TARGET_DIST, model)
    # Direct part: 0.4 each round. Corrections (rounds with logged action 0):
    # round 0: 1/0.5*(1-0.4) = 1.2, round 2: 1/0.25*(0-0.4) = -1.6.
    expected = np.mean([0.4 + 1.2, 0.4, 0.4 - 1.6, 0.4])
    assert est.value == pytest.approx(expected)


def test_doubly_robust_equals_direct_method_with_a_perfect_model() -> None:
    rng = np.random.default_rng(0)
    n, k = 20_000, 3
    true_ctr = np.array([0.02, 0.05, 0.03])
    actions = rng.integers(k, size=n)
    rewards = (rng.random(n) < true_ctr[actions]).astype(float)
    propensities = np.full(n, 1 / k)
    target = np.tile([0.0, 1.0, 0.0], (n, 1))
    est = doubly_robust(rewards, propensities, actions, target, np.tile(true_ctr, (n, 1)))
    assert est.ci_low < 0.05 < est.ci_high
    # And IPS on the same uniform log covers the truth too.
    ips_est = ips(rewards, propensities, target[np.arange(n), actions])
    assert ips_est.ci_low < 0.05 < ips_est.ci_high


def test_invalid_logs_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ips(np.array([1.0]), np.array([0.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="same shape"):
        ips(np.array([1.0, 0.0]), np.array([0.5]), np.array([1.0]))
    with pytest.raises(ValueError, match="no logged rounds"):
        snips(np.array([]), np.array([]), np.array([]))

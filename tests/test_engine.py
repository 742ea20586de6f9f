"""The bandit engine: policies, discounting, labels, guard, detector, priors, state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import betaln

from adloop.bandit import BetaPrior, CreativeEngine, EngineConfig, make_policy
from adloop.bandit.analysis import LabelRules, guard_exploration, label_arms, summarize
from adloop.bandit.contextual import VowpalContextual
from adloop.bandit.detect import CusumDetector, judge
from adloop.bandit.policies import KLUCB, ArmStats, EpsilonGreedy, ThompsonSampling, Uniform
from adloop.bandit.priors import shrinkage_prior

# -- conjugate updates and discounting -------------------------------------------------


def test_batched_updates_match_conjugate_posterior() -> None:
    policy = ThompsonSampling()
    policy.add_arm("a", BetaPrior(2.0, 8.0))
    policy.add_arm("b")
    # Two batches, repeated positions, clicks landing after their impressions.
    policy.learn_many([0, 0, 1], [60, 40, 10], [3, 0, 1])
    policy.learn_many([0], [0], [4])
    assert policy.stats.alpha.tolist() == [2.0 + 7, 1.0 + 1]
    assert policy.stats.beta.tolist() == [8.0 + 93, 1.0 + 9]
    assert policy.stats.mean()[0] == pytest.approx(9 / 110)


def test_discounting_worked_example() -> None:
    stats = ArmStats(half_life=10.0)
    stats.add_arm("a")
    stats.add_arm("b")
    stats.decay_to(0.0)
    stats.add(np.array([0, 1]), np.array([10.0, 4.0]), np.array([2.0, 1.0]))
    stats.decay_to(10.0)  # one half-life: everything halves
    stats.add(np.array([0]), np.array([10.0]), np.array([1.0]))
    assert stats.impressions.tolist() == [15.0, 2.0]
    assert stats.clicks.tolist() == [2.0, 0.5]
    stats.decay_to(30.0)  # two more half-lives
    assert stats.impressions.tolist() == [3.75, 0.5]
    stats.decay_to(20.0)  # the clock never runs backwards
    assert stats.impressions.tolist() == [3.75, 0.5]


def test_stationary_policy_ignores_the_clock() -> None:
    policy = make_policy("thompson")
    policy.add_arm("a")
    policy.learn_many([0], [10], [1], t=0.0)
    policy.learn_many([0], [10], [1], t=1e9)
    assert policy.stats.impressions.tolist() == [20.0]


def test_kl_ucb_index_solves_the_kl_equation() -> None:
    policy = KLUCB()
    policy.add_arm("a", BetaPrior(1e-9, 1e-9))
    policy.add_arm("b", BetaPrior(1e-9, 1e-9))
    policy.learn_many([0, 1], [100, 300], [10, 45])
    n = np.array([100.0, 300.0])
    p = np.array([0.1, 0.15])
    budget = math.log(400.0)

    def kl(a: float, b: float) -> float:
        return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))

    expected = [
        brentq(lambda q, i=i: n[i] * kl(p[i], q) - budget, p[i] + 1e-9, 1 - 1e-9) for i in range(2)
    ]
    assert policy.indices() == pytest.approx(expected, abs=1e-6)
    assert policy.serving_probabilities(np.random.default_rng(0)).tolist() == [1.0, 0.0]


def test_epsilon_greedy_and_uniform_distributions() -> None:
    eg = EpsilonGreedy(epsilon=0.2)
    for arm in "abcd":
        eg.add_arm(arm)
    eg.learn_many([0, 1, 2, 3], [100] * 4, [1, 5, 2, 5])  # b and d tie
    assert eg.serving_probabilities(np.random.default_rng(0)).tolist() == pytest.approx(
        [0.05, 0.45, 0.05, 0.45]
    )
    un = Uniform()
    for arm in "abc":
        un.add_arm(arm)
    assert un.serving_probabilities(np.random.default_rng(0)).tolist() == pytest.approx([1 / 3] * 3)


def test_thompson_serving_probabilities_match_closed_form_p_best() -> None:
    # P(X > Y) for X ~ Beta(a1, b1), Y ~ Beta(a2, b2), integer a1 (Evan Miller's formula).
    a1, b1, a2, b2 = 12, 188, 8, 192
    exact = sum(
        math.exp(betaln(a2 + i, b1 + b2) - math.log(b1 + i) - betaln(1 + i, b1) - betaln(a2, b2))
        for i in range(a1)
    )
    policy = ThompsonSampling()
    policy.add_arm("x", BetaPrior(a1, b1))
    policy.add_arm("y", BetaPrior(a2, b2))
    draws = 200_000
    p = policy.serving_probabilities(np.random.default_rng(1), draws=draws)
    se = math.sqrt(exact * (1 - exact) / draws)
    assert abs(p[0] - exact) < 4 * se
    s = summarize(
        np.array([a1, a2], float), np.array([b1, b2], float), np.random.default_rng(2), draws=draws
    )
    assert abs(s.p_best[0] - exact) < 4 * se
    # Expected loss of the better arm is smaller, and both are non-negative.
    assert 0 <= s.expected_loss[0] < s.expected_loss[1]


# -- labels, guard, verdicts -----------------------------------------------------------


def _summary(rows: list[tuple[int, int]], seed: int = 0):
    alpha = np.array([1.0 + k for _, k in rows])
    beta = np.array([1.0 + n - k for n, k in rows])
    return summarize(alpha, beta, np.random.default_rng(seed), draws=20_000)


def test_labels_come_from_the_posterior_not_from_traffic() -> None:
    summary = _summary(
        [
            (50_000, 1_500),  # 3.0 %: clearly the best
            (300, 9),  # 3.0 % on little traffic: interval too wide to call
            (20_000, 200),  # 1.0 %: confidently far below the best
            (40_000, 1_090),  # 2.7 %: at the edge of 10 % from the best: not confidently within
        ]
    )
    labels = label_arms(summary, LabelRules())
    assert labels == ["best", "learning", "low", "good"]


def test_guard_gives_learning_arms_their_share_and_keeps_the_ranking() -> None:
    p = np.array([0.90, 0.07, 0.02, 0.01])
    learning = np.array([False, False, True, True])
    out = guard_exploration(p, learning, min_share=0.05)
    assert out.sum() == pytest.approx(1.0)
    assert out[2] == pytest.approx(0.05) and out[3] == pytest.approx(0.05)
    assert out[0] / out[1] == pytest.approx(0.90 / 0.07)
    # Learning arms together never take more than max_total.
    many = guard_exploration(
        np.array([0.97, 0.01, 0.01, 0.01]),
        np.array([False, True, True, True]),
        min_share=0.3,
        max_total=0.5,
    )
    assert many[1:].sum() == pytest.approx(0.5)


def test_verdict_states_its_numbers() -> None:
    summary = _summary([(50_000, 1_500), (4_120, 41)])
    labels = label_arms(summary)
    verdicts = judge(["c1", "c2"], labels, summary.p_within, np.array([50_000, 4_120]), 0.10)
    assert not verdicts[0].underperforming
    v = verdicts[1]
    assert v.underperforming and v.label == "low"
    assert v.reasons[0].startswith("P(within 10% of best) = 0.0% after 4,120 impressions")


def test_no_verdict_without_minimum_evidence() -> None:
    summary = _summary([(50_000, 1_500), (500, 0)])
    verdicts = judge(
        ["c1", "c2"], label_arms(summary), summary.p_within, np.array([50_000, 500]), 0.10
    )
    assert not verdicts[1].underperforming


# -- change detector -------------------------------------------------------------------


def test_detector_false_alarms_on_stationary_traffic_stay_under_bound() -> None:
    rng = np.random.default_rng(3)
    arms, batch, batches = 100, 500, 400  # 100 streams of 200k impressions each
    ctr = rng.uniform(0.005, 0.05, size=arms)
    detector = CusumDetector()
    for _ in range(arms):
        detector.add_arm()
    alarms = 0
    for _ in range(batches):
        clicks = rng.binomial(batch, ctr)
        alarms += len(detector.update(np.arange(arms), np.full(arms, batch), clicks))
    # Bound: at most one false alarm per 10M impressions (20M were simulated).
    assert alarms <= 2


def test_detector_finds_a_planted_drop_within_its_stated_delay() -> None:
    rng = np.random.default_rng(4)
    detector = CusumDetector()
    detector.add_arm()
    drop_at, batch = 20_000, 200
    found = None
    for start in range(0, 60_000, batch):
        p = 0.03 if start < drop_at else 0.015
        alarms = detector.update(
            np.array([0]), np.array([batch]), np.array([rng.binomial(batch, p)])
        )
        if alarms and start >= drop_at:
            found = alarms[0]
            break
        assert not alarms, "alarm before the drop"
    assert found is not None
    # Stated delay for halving a 3 % CTR: within 6,000 impressions (p95 measured: ~3,900).
    assert found.detected_at - drop_at <= 6_000
    assert found.ctr_before == pytest.approx(0.03, rel=0.2)
    assert found.ctr_after < 0.85 * found.ctr_before
    assert "CTR dropped from" in found.reason()


def test_engine_cuts_history_after_a_detected_drop() -> None:
    engine = CreativeEngine(EngineConfig(policy="thompson"))
    engine.add_arm("tired")
    engine.add_arm("steady")
    rng = np.random.default_rng(5)
    alarms = []
    for step in range(200):
        p_tired = 0.04 if step < 100 else 0.01
        clicks = [rng.binomial(500, p_tired), rng.binomial(500, 0.025)]
        alarms += engine.learn_many(
            np.array([0, 1]), np.array([500, 500]), np.array(clicks), t=float(step)
        )
    assert [a.arm for a in alarms] == [0]
    # After the cut, the posterior reflects the new regime, not the 4 % history.
    assert engine.policy.stats.mean()[0] < 0.02
    report = {r.creative_id: r for r in engine.report(rng)}
    assert report["tired"].verdict.underperforming
    assert any("CTR dropped from" in reason for reason in report["tired"].verdict.reasons)
    assert report["steady"].label == "best"


# -- priors ----------------------------------------------------------------------------


def test_shrinkage_prior_hand_computed() -> None:
    # Two audiences at 2 % and 4 %, 10,000 impressions each.
    prior = shrinkage_prior(np.array([10_000, 10_000]), np.array([200, 400]))
    mean = 600.5 / 20_001
    observed = 0.5 * (0.02 - mean) ** 2 + 0.5 * (0.04 - mean) ** 2
    noise = mean * (1 - mean) * (0.5 / 10_000 + 0.5 / 10_000)
    strength = mean * (1 - mean) / (observed - noise) - 1
    assert prior.mean == pytest.approx(mean)
    assert prior.alpha + prior.beta == pytest.approx(strength)
    # Alike audiences: pool hard; one audience: the default strength, capped by evidence.
    alike = shrinkage_prior(np.array([10_000, 10_000]), np.array([300, 300]))
    assert alike.alpha + alike.beta == pytest.approx(1000.0)
    single = shrinkage_prior(np.array([8]), np.array([1]))
    assert single.alpha + single.beta == pytest.approx(8.0)
    assert shrinkage_prior(np.array([0]), np.array([0])) == BetaPrior()


# -- contextual policy -------------------------------------------------------------------


def test_contextual_policy_learns_a_planted_context_rule() -> None:
    policy = VowpalContextual(seed=1)
    for arm in ("sale", "premium", "generic"):
        policy.add_arm(arm, {"theme": arm})
    rng = np.random.default_rng(6)
    rule = {"young": 0, "senior": 1}
    for i in range(3000):
        age = "young" if i % 2 else "senior"
        context = {"age": age, "device": "mobile"}
        arm, prop = policy.predict_one(context, rng)
        clicked = rng.random() < (0.3 if arm == rule[age] else 0.03)
        policy.learn_one(context, arm, clicked, prop)
    for age, arm in rule.items():
        p = policy.serving_probabilities({"age": age, "device": "mobile"})
        assert int(np.argmax(p)) == arm and p[arm] > 0.8
    # The model survives a round trip through bytes with identical predictions.
    clone = VowpalContextual.from_bytes(policy.to_bytes())
    for age in rule:
        ctx = {"age": age, "device": "mobile"}
        assert (
            clone.serving_probabilities(ctx).tolist() == policy.serving_probabilities(ctx).tolist()
        )
    assert clone.arm_ids == policy.arm_ids


@pytest.mark.parametrize("per_increment", [1, 50, 1000])
def test_contextual_counts_learn_the_same_whatever_the_increment_size(per_increment: int) -> None:
    """The stream hands over aggregated increments whose size depends on its speed."""
    policy = VowpalContextual(seed=2)
    policy.add_arm("c1")
    policy.add_arm("c2")
    rates = {"feed": (0.15, 0.02), "story": (0.02, 0.15)}
    rng = np.random.default_rng(0)
    for _ in range(1000 // per_increment):
        for placement, by_arm in rates.items():
            for arm, ctr in enumerate(by_arm):
                clicks = int(rng.binomial(per_increment, ctr))
                policy.learn_counts(
                    {"placement": placement}, arm, clicks, per_increment - clicks, 0.5
                )
    for placement, winner in (("feed", 0), ("story", 1)):
        assert policy.serving_probabilities({"placement": placement})[winner] > 0.9


# -- state -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy", ["thompson", "discounted_thompson", "kl_ucb", "epsilon_greedy", "uniform"]
)
def test_engine_state_round_trips_bit_exactly(policy: str) -> None:
    engine = CreativeEngine(EngineConfig(policy=policy, half_life=3.0))
    rng = np.random.default_rng(7)
    for arm in range(5):
        engine.add_arm(f"c{arm}", BetaPrior.from_mean(0.01 + 0.003 * arm, 20.0))
    for step in range(300):
        ctr = np.array([0.01, 0.02, 0.03, 0.015, 0.04 if step < 150 else 0.005])
        engine.learn_many(np.arange(5), np.full(5, 300), rng.binomial(300, ctr), t=step / 7)
    state = engine.to_dict()
    restored = CreativeEngine.from_dict(json.loads(json.dumps(state)))
    assert restored.to_dict() == state
    a = engine.serving_probabilities(np.random.default_rng(8))
    b = restored.serving_probabilities(np.random.default_rng(8))
    assert a.tobytes() == b.tobytes()


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown policy 'ucb9'; choose one of"):
        make_policy("ucb9")

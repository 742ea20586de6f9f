"""One contract for every bandit policy adloop can run (River's ``check_estimator`` idea).

The policies are enumerated from the registries themselves, never listed here:
``bandit.policies.POLICIES`` (with ``discounted_thompson``, which ``make_policy``
builds) and the names ``ADLOOP_POLICY`` accepts (``Settings.policy``, which adds
``contextual``). A policy added to either is checked by every test below, or fails
``test_every_registered_policy_can_be_built`` until it has an adapter here.

Count-based policies share one interface (``learn_many``/``serving_probabilities``/
``predict_many``/``to_dict``); the contextual policy (Vowpal Wabbit) takes a context
and counts per context, so a thin adapter gives it the same four verbs, in one fixed
context. What may differ between policies is declared, not keyed on names:

* ``learns``: whether outcomes change the serving distribution (``uniform``: no);
* ``exact_increments``: whether learning counts in increments gives the very state of
  learning them at once (the count-based policies add counts) or, as the contextual
  policy's ``learn_counts`` documents, the same preference (online SGD on one weighted
  example per increment);
* ``late_clicks``: whether a batch may carry clicks on impressions learnt earlier (the
  stream's increments), so that only the totals are bounded (clamped); where it may
  not, clicks above impressions raise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, get_args

import numpy as np
import pytest

from adloop.bandit import POLICIES, make_policy
from adloop.bandit.contextual import VowpalContextual
from adloop.bandit.policies import BanditPolicy
from adloop.streams.config import Settings

SEED = 7
T = 1_760_000_000.0  # one event time for every batch: discounting is not under test here


def registered_policy_names() -> list[str]:
    configured = get_args(Settings.model_fields["policy"].annotation)
    return sorted({*configured, *POLICIES, "discounted_thompson"})


class CountPolicy:
    """A ``BanditPolicy`` as it is (the contract's reference interface)."""

    exact_increments = True
    late_clicks = True

    def __init__(self, policy: BanditPolicy) -> None:
        self.policy = policy
        self.learns = type(policy).learns

    @property
    def n_arms(self) -> int:
        return self.policy.n_arms

    def add_arm(self, arm_id: str) -> int:
        return self.policy.add_arm(arm_id)

    def learn(self, arms: list[int], impressions: list[float], clicks: list[float]) -> None:
        self.policy.learn_many(arms, impressions, clicks, t=T)

    def probabilities(self, rng: np.random.Generator) -> np.ndarray:
        return self.policy.serving_probabilities(rng)

    def choices(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.policy.predict_many(rng, n)

    def state(self) -> Any:
        return self.policy.to_dict()

    def restored(self) -> CountPolicy:
        return CountPolicy(BanditPolicy.from_dict(self.state()))


class ContextualPolicy:
    """``VowpalContextual`` in one context, counts as clicks / non-clicks."""

    learns = True
    exact_increments = False
    late_clicks = False
    CONTEXT: ClassVar[dict[str, str]] = {"audience": "students", "placement": "feed"}

    def __init__(self, model: VowpalContextual | None = None) -> None:
        self.model = model if model is not None else VowpalContextual(seed=SEED)

    @property
    def n_arms(self) -> int:
        return self.model.n_arms

    def add_arm(self, arm_id: str) -> int:
        return self.model.add_arm(arm_id)

    def learn(self, arms: list[int], impressions: list[float], clicks: list[float]) -> None:
        for arm, imps, clk in zip(arms, impressions, clicks, strict=True):
            if not 0 <= arm < self.n_arms:
                raise IndexError(f"arm positions must be in [0, {self.n_arms})")
            # As the worker does, the model's own probability stands in for the
            # logging propensity.
            propensity = self.model.serving_probabilities(self.CONTEXT)[arm]
            self.model.learn_counts(self.CONTEXT, arm, clk, imps - clk, propensity)

    def probabilities(self, rng: np.random.Generator) -> np.ndarray:
        return self.model.serving_probabilities(self.CONTEXT)

    def choices(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.array([self.model.predict_one(self.CONTEXT, rng)[0] for _ in range(n)])

    def state(self) -> Any:
        return self.model.to_bytes()

    def restored(self) -> ContextualPolicy:
        return ContextualPolicy(VowpalContextual.from_bytes(self.state()))


#: Policies whose interface differs from ``BanditPolicy``: name -> adapter factory.
ADAPTERS: dict[str, Callable[[], Any]] = {"contextual": ContextualPolicy}


def build(name: str, arms: tuple[str, ...] = ("a", "b")) -> Any:
    adapter = ADAPTERS[name]() if name in ADAPTERS else CountPolicy(make_policy(name))
    for arm_id in arms:
        adapter.add_arm(arm_id)
    return adapter


def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def assert_distribution(p: np.ndarray, n_arms: int) -> None:
    assert p.shape == (n_arms,)
    assert np.all(np.isfinite(p)) and np.all(p >= 0), p
    assert p.sum() == pytest.approx(1.0), p


def share(policy: Any, arm: int, n: int = 1000) -> float:
    return float(np.mean(policy.choices(rng(), n) == arm))


def winner_and_loser(policy: Any) -> tuple[int, int]:
    """The arm the empty policy favours least wins (so a gain is a gain from data)."""
    p = policy.probabilities(rng())
    winner = int(np.argmin(p))
    return winner, 1 - winner


def learn_clear_winner(policy: Any, winner: int, loser: int) -> None:
    policy.learn([winner, loser], [400, 400], [120, 4])


POLICY_NAMES = registered_policy_names()
policy_names = pytest.mark.parametrize("name", POLICY_NAMES)


def test_the_registries_are_enumerated() -> None:
    assert {"thompson", "discounted_thompson", "kl_ucb", "epsilon_greedy", "uniform"} <= set(
        POLICY_NAMES
    )
    assert "contextual" in POLICY_NAMES


@policy_names
def test_every_registered_policy_can_be_built(name: str) -> None:
    policy = build(name)
    assert policy.n_arms == 2
    assert isinstance(policy.learns, bool)


@policy_names
def test_serving_probabilities_are_a_distribution(name: str) -> None:
    policy = build(name)
    assert_distribution(policy.probabilities(rng()), 2)
    winner, loser = winner_and_loser(policy)
    learn_clear_winner(policy, winner, loser)
    assert_distribution(policy.probabilities(rng()), 2)
    choices = policy.choices(rng(), 200)
    assert set(np.unique(choices)) <= {0, 1}


@policy_names
def test_learning_a_clear_winner_moves_traffic_to_it(name: str) -> None:
    policy = build(name)
    winner, loser = winner_and_loser(policy)
    before, share_before = policy.probabilities(rng())[winner], share(policy, winner)
    learn_clear_winner(policy, winner, loser)
    after, share_after = policy.probabilities(rng())[winner], share(policy, winner)
    if policy.learns:
        assert after > before and after > 0.5, (before, after)
        assert share_after > share_before and share_after > 0.5, (share_before, share_after)
    else:
        assert after == pytest.approx(before)


@policy_names
def test_state_round_trips_to_identical_outputs(name: str) -> None:
    policy = build(name)
    winner, loser = winner_and_loser(policy)
    learn_clear_winner(policy, winner, loser)
    restored = policy.restored()
    if isinstance(policy, CountPolicy):  # a JSON-safe dict, bit-exact
        assert restored.state() == policy.state()
    np.testing.assert_array_equal(restored.probabilities(rng()), policy.probabilities(rng()))
    np.testing.assert_array_equal(restored.choices(rng(), 100), policy.choices(rng(), 100))
    # And both keep learning alike.
    for p in (policy, restored):
        p.learn([loser], [50], [25])
    np.testing.assert_array_equal(restored.probabilities(rng()), policy.probabilities(rng()))


@policy_names
def test_one_batch_or_increments_agree(name: str) -> None:
    at_once, stepwise, clicks_later = build(name), build(name), build(name)
    winner, loser = winner_and_loser(at_once)
    learn_clear_winner(at_once, winner, loser)
    for step in range(10):
        stepwise.learn([winner, loser], [40, 40], [12, 1 if step < 4 else 0])
    others = [stepwise]
    if at_once.late_clicks:
        # Impressions first, their clicks in later batches (as the stream counts them).
        clicks_later.learn([winner, loser], [400, 400], [0, 0])
        clicks_later.learn([winner, winner, loser], [0, 0, 0], [60, 60, 4])
        others.append(clicks_later)
    for other in others:
        if at_once.exact_increments:
            assert other.state() == at_once.state()
            np.testing.assert_array_equal(other.probabilities(rng()), at_once.probabilities(rng()))
        else:
            assert np.argmax(other.probabilities(rng())) == np.argmax(at_once.probabilities(rng()))


@policy_names
def test_a_new_arm_is_served_and_can_win(name: str) -> None:
    policy = build(name)
    winner, loser = winner_and_loser(policy)
    learn_clear_winner(policy, winner, loser)
    new = policy.add_arm("c")
    assert new == 2 and policy.n_arms == 3
    assert policy.add_arm("c") == 2  # adding a known arm again changes nothing
    p = policy.probabilities(rng())
    assert_distribution(p, 3)
    assert p[new] > 0, p  # a new creative gets traffic to learn from
    before = p[new]
    policy.learn([new], [400], [300])
    after = policy.probabilities(rng())
    assert_distribution(after, 3)
    if policy.learns:
        assert after[new] >= before and np.argmax(after) == new, after
    assert set(np.unique(policy.choices(rng(), 300))) <= {0, 1, 2}


@policy_names
@pytest.mark.parametrize(
    ("arms", "impressions", "clicks"),
    [
        ([0], [-1], [0]),
        ([0], [10], [-1]),
        ([0], [float("nan")], [0]),
        ([0], [10], [float("inf")]),
    ],
    ids=["negative impressions", "negative clicks", "nan impressions", "infinite clicks"],
)
def test_invalid_counts_raise_and_change_nothing(
    name: str, arms: list[int], impressions: list[float], clicks: list[float]
) -> None:
    policy = build(name)
    policy.learn([0, 1], [100, 100], [10, 5])
    untouched = policy.restored()
    with pytest.raises(ValueError):
        policy.learn(arms, impressions, clicks)
    if isinstance(policy, CountPolicy):
        assert policy.state() == untouched.state()
    # Nothing was learnt: it answers and goes on learning as a copy taken before.
    for p in (policy, untouched):
        p.learn([1], [100], [60])
    np.testing.assert_array_equal(policy.probabilities(rng()), untouched.probabilities(rng()))


@policy_names
def test_an_unknown_arm_raises(name: str) -> None:
    policy = build(name)
    with pytest.raises(IndexError):
        policy.learn([2], [10], [1])


@policy_names
def test_clicks_above_impressions(name: str) -> None:
    policy = build(name)
    if not policy.late_clicks:
        with pytest.raises(ValueError):
            policy.learn([0], [10], [11])
        return
    # A batch may carry late clicks, but an arm never has more clicks than impressions.
    policy.learn([0], [10], [11])
    stats = policy.policy.stats
    assert stats.clicks[0] == stats.impressions[0] == 10
    assert_distribution(policy.probabilities(rng()), 2)
    # A state that says otherwise is refused.
    state = policy.state()
    state["stats"]["clicks"][0] = 11.0
    with pytest.raises(ValueError, match="clicks <= impressions"):
        BanditPolicy.from_dict(state)

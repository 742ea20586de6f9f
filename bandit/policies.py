"""Bandit policies over ad creatives behind one small, batched interface.

Modelled on River's ``learn_one``/``predict_one``, but batched, because the stream hands
the engine thousands of outcomes at a time and the serving layer wants a whole
serving distribution, not one draw:

* ``learn_many(arms, impressions, clicks, t)``: add outcome counts (arm positions may
  repeat) observed at time ``t`` (any monotone clock: event seconds in the stream,
  impression index in the simulator);
* ``serving_probabilities(rng)``: the probability with which the policy would show
  each arm now (what the decisions topic publishes and the serving layer samples);
* ``predict_many(rng, n)``: ``n`` independent choices;
* ``to_dict``/``from_dict``: JSON-safe state, bit-exact round trip.

Count-based policies (Thompson sampling, its discounted variant, KL-UCB, ε-greedy,
uniform) share :class:`ArmStats`: per-arm prior plus (possibly discounted) impressions
and clicks. Discounting is by elapsed time, ``0.5 ** (dt / half_life)``, applied to every
arm, so an arm that stops being shown slowly regains uncertainty and gets re-explored:
that is what lets the policy notice a creative that fatigued, or one that recovered.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from adloop.bandit.beta import UNIFORM_PRIOR, BetaPrior

__all__ = [
    "KLUCB",
    "POLICIES",
    "ArmStats",
    "BanditPolicy",
    "EpsilonGreedy",
    "ThompsonSampling",
    "Uniform",
    "make_policy",
    "policy_from_dict",
]

_MAX_BLOCK = 1 << 20


@dataclass(eq=False)
class ArmStats:
    """Per-arm prior and (discounted) evidence; float64 so discounting stays exact-ish.

    Without a half-life the counts are plain sums and equal the stream's exact totals.
    """

    half_life: float | None = None
    arm_ids: list[str] = field(default_factory=list)
    prior_alpha: np.ndarray = field(default_factory=lambda: np.zeros(0))
    prior_beta: np.ndarray = field(default_factory=lambda: np.zeros(0))
    impressions: np.ndarray = field(default_factory=lambda: np.zeros(0))
    clicks: np.ndarray = field(default_factory=lambda: np.zeros(0))
    t: float | None = None  # time the counts were last discounted to
    _index: dict[str, int] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.half_life is not None and not (
            math.isfinite(self.half_life) and self.half_life > 0
        ):
            raise ValueError(f"half_life must be finite and > 0, got {self.half_life!r}")
        self.arm_ids = list(self.arm_ids)
        self.prior_alpha = np.array(self.prior_alpha, dtype=np.float64)
        self.prior_beta = np.array(self.prior_beta, dtype=np.float64)
        self.impressions = np.array(self.impressions, dtype=np.float64)
        self.clicks = np.array(self.clicks, dtype=np.float64)
        n = len(self.arm_ids)
        for name in ("prior_alpha", "prior_beta", "impressions", "clicks"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},)")
        if not (np.all(self.prior_alpha > 0) and np.all(self.prior_beta > 0)):
            raise ValueError("priors must be > 0")
        if np.any(self.clicks < 0) or np.any(self.clicks > self.impressions + 1e-9):
            raise ValueError("need 0 <= clicks <= impressions")
        self._index = {a: i for i, a in enumerate(self.arm_ids)}
        if len(self._index) != n:
            raise ValueError("arm ids must be unique")

    @property
    def n_arms(self) -> int:
        return len(self.arm_ids)

    def __contains__(self, arm_id: object) -> bool:
        return arm_id in self._index

    def index(self, arm_id: str) -> int:
        try:
            return self._index[arm_id]
        except KeyError:
            raise KeyError(f"unknown arm id {arm_id!r}") from None

    def add_arm(self, arm_id: str, prior: BetaPrior = UNIFORM_PRIOR) -> int:
        if arm_id in self._index:
            return self._index[arm_id]
        self._index[arm_id] = len(self.arm_ids)
        self.arm_ids.append(arm_id)
        self.prior_alpha = np.append(self.prior_alpha, prior.alpha)
        self.prior_beta = np.append(self.prior_beta, prior.beta)
        self.impressions = np.append(self.impressions, 0.0)
        self.clicks = np.append(self.clicks, 0.0)
        return self._index[arm_id]

    def remove_arm(self, arm_id: str) -> None:
        i = self.index(arm_id)
        keep = np.arange(self.n_arms) != i
        del self.arm_ids[i]
        for name in ("prior_alpha", "prior_beta", "impressions", "clicks"):
            setattr(self, name, getattr(self, name)[keep])
        self._index = {a: j for j, a in enumerate(self.arm_ids)}

    def set_prior(self, arm_id: str, prior: BetaPrior) -> None:
        i = self.index(arm_id)
        self.prior_alpha[i] = prior.alpha
        self.prior_beta[i] = prior.beta

    def decay_to(self, t: float | None) -> None:
        """Discount the evidence to time ``t`` (no-op without a half-life or a clock)."""
        if t is None:
            return
        if self.t is not None and self.half_life is not None and t > self.t:
            factor = 0.5 ** ((t - self.t) / self.half_life)
            self.impressions *= factor
            self.clicks *= factor
        self.t = t if self.t is None else max(self.t, t)

    def add(self, arms: np.ndarray, impressions: np.ndarray, clicks: np.ndarray) -> None:
        idx, imps, clk = self.checked(arms, impressions, clicks)
        # A click may land in a later batch than its impression (the stream counts
        # impressions at once and clicks when they arrive), so only the totals are
        # bounded; discounting between the two can leave a click a hair above its
        # impression, which is clamped.
        np.add.at(self.impressions, idx, imps)
        np.add.at(self.clicks, idx, clk)
        np.minimum(self.clicks, self.impressions, out=self.clicks)

    def checked(
        self, arms: np.ndarray, impressions: np.ndarray, clicks: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch as flat arrays; raises (changing nothing) if it is invalid."""
        idx = np.asarray(arms, dtype=np.intp).reshape(-1)
        imps = np.asarray(impressions, dtype=np.float64).reshape(-1)
        clk = np.asarray(clicks, dtype=np.float64).reshape(-1)
        if not (idx.shape == imps.shape == clk.shape):
            raise ValueError("arms, impressions and clicks must have equal lengths")
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_arms):
            raise IndexError(f"arm positions must be in [0, {self.n_arms})")
        if not (np.all(np.isfinite(imps)) and np.all(np.isfinite(clk))):
            raise ValueError("impressions and clicks must be finite")
        if np.any(imps < 0) or np.any(clk < 0):
            raise ValueError("impressions and clicks must be non-negative")
        return idx, imps, clk

    @property
    def alpha(self) -> np.ndarray:
        return self.prior_alpha + self.clicks

    @property
    def beta(self) -> np.ndarray:
        return self.prior_beta + (self.impressions - self.clicks)

    def mean(self) -> np.ndarray:
        a = self.alpha
        return a / (a + self.beta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "half_life": self.half_life,
            "arm_ids": list(self.arm_ids),
            "prior_alpha": self.prior_alpha.tolist(),
            "prior_beta": self.prior_beta.tolist(),
            "impressions": self.impressions.tolist(),
            "clicks": self.clicks.tolist(),
            "t": self.t,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArmStats:
        return cls(
            **{
                k: d[k]
                for k in (
                    "half_life",
                    "arm_ids",
                    "prior_alpha",
                    "prior_beta",
                    "impressions",
                    "clicks",
                    "t",
                )
            }
        )


def _one_hot_ties(scores: np.ndarray) -> np.ndarray:
    """Probability 1 split evenly between the arms with the top score."""
    top = scores == scores.max()
    return top / top.sum()


class BanditPolicy(ABC):
    """Common machinery: arms, priors, batched learning, sampling, state."""

    name: ClassVar[str]
    #: Whether outcomes change the serving distribution (False: a fixed baseline).
    learns: ClassVar[bool] = True

    def __init__(self, half_life: float | None = None) -> None:
        self.stats = ArmStats(half_life=half_life)

    # -- arms ------------------------------------------------------------------------
    @property
    def arm_ids(self) -> list[str]:
        return self.stats.arm_ids

    @property
    def n_arms(self) -> int:
        return self.stats.n_arms

    def add_arm(self, arm_id: str, prior: BetaPrior = UNIFORM_PRIOR) -> int:
        """Add an arm (a no-op for a known id); returns its position."""
        return self.stats.add_arm(arm_id, prior)

    def remove_arm(self, arm_id: str) -> None:
        self.stats.remove_arm(arm_id)

    # -- learning --------------------------------------------------------------------
    def learn_many(
        self,
        arms: Sequence[int] | np.ndarray,
        impressions: Sequence[float] | np.ndarray,
        clicks: Sequence[float] | np.ndarray,
        t: float | None = None,
    ) -> None:
        """Add outcome counts observed at time ``t``; positions may repeat.

        Raises ``ValueError`` (``IndexError`` for an unknown position) and changes
        nothing when the batch is invalid: negative or non-finite counts. A batch may
        carry clicks on impressions learnt in an earlier batch (the stream counts a
        click when it arrives), so its clicks may exceed its impressions; an arm's
        total clicks never exceed its total impressions (clamped).
        """
        batch = self.stats.checked(np.asarray(arms), np.asarray(impressions), np.asarray(clicks))
        self.stats.decay_to(t)
        self.stats.add(*batch)

    def learn_one(self, arm: int, clicked: bool, t: float | None = None) -> None:
        self.learn_many([arm], [1], [int(bool(clicked))], t)

    # -- deciding --------------------------------------------------------------------
    @abstractmethod
    def serving_probabilities(self, rng: np.random.Generator, draws: int = 2000) -> np.ndarray:
        """P(show arm i) under this policy now; sums to 1."""

    def predict_many(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` independent choices (arm positions)."""
        if self.n_arms == 0:
            raise ValueError("cannot choose from zero arms; add_arm() first")
        p = self.serving_probabilities(rng)
        return rng.choice(self.n_arms, size=int(n), p=p)

    def predict_one(self, rng: np.random.Generator) -> int:
        return int(self.predict_many(rng, 1)[0])

    # -- state -----------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "params": self.params(), "stats": self.stats.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BanditPolicy:
        policy = make_policy(d["policy"], **d.get("params", {}))
        policy.stats = ArmStats.from_dict(d["stats"])
        return policy

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BanditPolicy):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


class ThompsonSampling(BanditPolicy):
    """Beta-Bernoulli Thompson sampling; with ``half_life`` it is discounted TS."""

    name = "thompson"

    def __init__(self, half_life: float | None = None) -> None:
        super().__init__(half_life)

    def params(self) -> dict[str, Any]:
        return {"half_life": self.stats.half_life}

    def serving_probabilities(self, rng: np.random.Generator, draws: int = 2000) -> np.ndarray:
        k = self.n_arms
        if k <= 1:
            return np.ones(k)
        a, b = self.stats.alpha, self.stats.beta
        wins = np.zeros(k, dtype=np.int64)
        block = max(1, _MAX_BLOCK // k)
        remaining = int(draws)
        while remaining:
            m = min(block, remaining)
            wins += np.bincount(np.argmax(rng.beta(a, b, size=(m, k)), axis=1), minlength=k)
            remaining -= m
        return wins / float(draws)

    def predict_many(self, rng: np.random.Generator, n: int) -> np.ndarray:
        # One posterior draw per decision: exact Thompson sampling, no Monte Carlo
        # approximation of the serving distribution.
        k = self.n_arms
        if k == 0:
            raise ValueError("cannot choose from zero arms; add_arm() first")
        if k == 1:
            return np.zeros(int(n), dtype=np.int64)
        return np.argmax(rng.beta(self.stats.alpha, self.stats.beta, size=(int(n), k)), axis=1)


def _kl_bernoulli(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    eps = 1e-12
    p = np.clip(p, eps, 1 - eps)
    q = np.clip(q, eps, 1 - eps)
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


class KLUCB(BanditPolicy):
    """KL-UCB (Garivier & Cappé 2011): the largest q with n·KL(p̂, q) ≤ log t + c·log log t.

    Uses the posterior mean as p̂ (so an informative prior counts) and bisection,
    vectorized over arms. Deterministic: the serving distribution is the arg-max.
    """

    name = "kl_ucb"

    def __init__(self, half_life: float | None = None, c: float = 0.0) -> None:
        super().__init__(half_life)
        self.c = float(c)

    def params(self) -> dict[str, Any]:
        return {"half_life": self.stats.half_life, "c": self.c}

    def indices(self) -> np.ndarray:
        s = self.stats
        n = s.impressions + s.prior_alpha + s.prior_beta
        p = s.mean()
        total = max(float(n.sum()), math.e)
        budget = math.log(total) + self.c * math.log(max(math.log(total), 1.0))
        lo, hi = p.copy(), np.ones_like(p)
        for _ in range(32):  # 2^-32 precision is far below any CTR difference that matters
            mid = (lo + hi) / 2
            ok = n * _kl_bernoulli(p, mid) <= budget
            lo = np.where(ok, mid, lo)
            hi = np.where(ok, hi, mid)
        return lo

    def serving_probabilities(self, rng: np.random.Generator, draws: int = 2000) -> np.ndarray:
        if self.n_arms == 0:
            return np.zeros(0)
        return _one_hot_ties(self.indices())


class EpsilonGreedy(BanditPolicy):
    """Best posterior mean with probability 1-ε, uniform otherwise (a baseline)."""

    name = "epsilon_greedy"

    def __init__(self, epsilon: float = 0.1, half_life: float | None = None) -> None:
        super().__init__(half_life)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        self.epsilon = float(epsilon)

    def params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "half_life": self.stats.half_life}

    def serving_probabilities(self, rng: np.random.Generator, draws: int = 2000) -> np.ndarray:
        k = self.n_arms
        if k == 0:
            return np.zeros(0)
        return (1 - self.epsilon) * _one_hot_ties(self.stats.mean()) + self.epsilon / k


class Uniform(BanditPolicy):
    """Every arm equally often (the baseline every optimizer must beat)."""

    name = "uniform"
    learns = False

    def serving_probabilities(self, rng: np.random.Generator, draws: int = 2000) -> np.ndarray:
        k = self.n_arms
        return np.full(k, 1.0 / k) if k else np.zeros(0)


POLICIES: dict[str, type[BanditPolicy]] = {
    cls.name: cls for cls in (ThompsonSampling, KLUCB, EpsilonGreedy, Uniform)
}


def make_policy(name: str, **params: Any) -> BanditPolicy:
    """Policy by name; ``discounted_thompson`` is Thompson sampling with a half-life."""
    if name == "discounted_thompson":
        params.setdefault("half_life", 50_000.0)
        name = "thompson"
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy {name!r}; choose one of {sorted([*POLICIES, 'discounted_thompson'])}"
        ) from None
    return cls(**params)


def policy_from_dict(d: dict[str, Any]) -> BanditPolicy:
    return BanditPolicy.from_dict(d)

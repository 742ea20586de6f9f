"""A synthetic ad exchange for bandit benchmarks: deterministic with a seed.

The world:

* audiences are the cross of context features (age × device); a creative's true CTR
  in an audience is ``base · affinity(theme, age) · device effect``, so audiences
  differ and a contextual policy has something to learn;
* fatigue: a creative's CTR in an audience decays with its exposure there,
  ``floor + (1 - floor) · exp(-exposure / tau)``;
* new creatives arrive mid-run (some better than the incumbents), with a noisy CTR
  prediction, as the CTR model would give;
* a planted abrupt drop: at ``drop_at`` the strongest creative loses ``drop`` of its
  CTR (a news event, a competitor copying it), to measure time to adapt;
* delayed clicks: a click lands ``Geometric(1/mean_delay)`` impressions after its
  impression, capped at ``max_delay`` (the attribution window).

Clicks use common random numbers (one uniform per impression), so two policies that
show the same creative to the same impression get the same outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Scenario", "SimCreative", "World"]

AGES = ("young", "adult", "senior")
DEVICES = ("mobile", "desktop")
THEMES = ("price", "quality", "speed", "style", "trust")


@dataclass(frozen=True)
class Scenario:
    name: str = "nonstationary"
    seed: int = 7
    n_creatives: int = 6
    base_ctr: tuple[float, float] = (0.008, 0.035)
    fatigue_tau: float | None = 60_000.0  # exposures per creative x audience
    fatigue_floor: float = 0.45
    arrivals: tuple[int, ...] = (150_000, 400_000, 650_000)  # impression index of arrivals
    drop_at: int | None = 300_000
    drop: float = 0.6
    mean_click_delay: float = 150.0  # impressions
    max_click_delay: int = 1_000
    prediction_noise: float = 0.25  # log-normal sigma of the CTR model's prediction

    @classmethod
    def stationary(cls, seed: int = 7) -> Scenario:
        return cls(name="stationary", seed=seed, fatigue_tau=None, arrivals=(), drop_at=None)


@dataclass
class SimCreative:
    creative_id: str
    theme: str
    ctr: np.ndarray  # true base CTR per audience
    arrives_at: int
    predicted_ctr: float  # what a CTR model would say: noisy audience-average CTR

    @property
    def features(self) -> dict[str, str]:
        return {"theme": self.theme}


@dataclass
class World:
    scenario: Scenario
    audiences: list[dict[str, str]] = field(init=False)
    audience_weights: np.ndarray = field(init=False)
    creatives: list[SimCreative] = field(init=False)
    dropped: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        sc = self.scenario
        rng = np.random.default_rng(sc.seed)
        self.audiences = [{"age": a, "device": d} for a in AGES for d in DEVICES]
        w = rng.dirichlet(np.full(len(self.audiences), 4.0))
        self.audience_weights = w
        affinity = {(t, a): float(rng.lognormal(0.0, 0.35)) for t in THEMES for a in AGES}
        device_effect = {"mobile": 1.0, "desktop": 0.8}
        n_total = sc.n_creatives + len(sc.arrivals)
        arrivals = [0] * sc.n_creatives + list(sc.arrivals)
        lo, hi = np.log(sc.base_ctr[0]), np.log(sc.base_ctr[1])
        self.creatives = []
        for j in range(n_total):
            theme = THEMES[int(rng.integers(len(THEMES)))]
            # Later arrivals skew better: fresh copy written against the winners.
            base = float(np.exp(rng.uniform(lo, hi))) * (1.25 if arrivals[j] else 1.0)
            ctr = np.array(
                [
                    base * affinity[(theme, aud["age"])] * device_effect[aud["device"]]
                    for aud in self.audiences
                ]
            )
            ctr = np.clip(ctr, 1e-4, 0.2)
            avg = float(np.dot(w, ctr))
            pred = float(np.clip(avg * rng.lognormal(0.0, sc.prediction_noise), 1e-4, 0.5))
            self.creatives.append(SimCreative(f"c{j:02d}", theme, ctr, arrivals[j], pred))
        if sc.drop_at is not None:
            initial = [j for j in range(n_total) if arrivals[j] <= sc.drop_at]
            self.dropped = max(initial, key=lambda j: float(np.dot(w, self.creatives[j].ctr)))

    @property
    def n_audiences(self) -> int:
        return len(self.audiences)

    def audience_name(self, a: int) -> str:
        return f"{self.audiences[a]['age']}-{self.audiences[a]['device']}"

    def live(self, t: int) -> list[int]:
        """Creatives available at impression ``t``."""
        return [j for j, c in enumerate(self.creatives) if c.arrives_at <= t]

    def true_ctr(self, t: int, exposure: np.ndarray) -> np.ndarray:
        """CTR matrix [audience, creative] at time ``t`` given exposures [audience, creative]."""
        sc = self.scenario
        ctr = np.stack([c.ctr for c in self.creatives], axis=1)
        if sc.fatigue_tau is not None:
            ctr = ctr * (
                sc.fatigue_floor + (1 - sc.fatigue_floor) * np.exp(-exposure / sc.fatigue_tau)
            )
        if self.dropped is not None and sc.drop_at is not None and t >= sc.drop_at:
            ctr[:, self.dropped] *= 1 - sc.drop
        return ctr

    def traffic(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Audience per impression, a uniform per impression (clicks), click delays."""
        rng = np.random.default_rng(self.scenario.seed + 1)
        audiences = rng.choice(self.n_audiences, size=n, p=self.audience_weights)
        uniforms = rng.random(n)
        delays = np.minimum(
            rng.geometric(1.0 / self.scenario.mean_click_delay, size=n),
            self.scenario.max_click_delay,
        )
        return audiences, uniforms, delays

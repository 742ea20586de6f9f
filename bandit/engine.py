"""The creative engine: a policy plus what ad creatives need on top of a textbook bandit.

:class:`CreativeEngine` is what the stream and the benchmarks run for one
campaign × audience:

* a count-based policy (default: discounted Thompson sampling);
* a per-creative CUSUM change detector; when it fires, the creative's evidence is cut
  back to what came after the change, so a fatigued creative is demoted in one step
  instead of after its whole history has been outweighed;
* the exploration guard (a minimum share for creatives still ``learning``) and an
  exploration floor (every servable creative keeps a positive propensity, which
  off-policy evaluation needs);
* :meth:`report`: labels, P(best), expected loss, traffic shares and verdicts with
  their numbers, per creative.

Pure numpy, no I/O; ``to_dict``/``from_dict`` round-trip bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adloop.bandit.analysis import (
    LabelRules,
    PosteriorSummary,
    guard_exploration,
    label_arms,
    summarize,
)
from adloop.bandit.beta import UNIFORM_PRIOR, BetaPrior
from adloop.bandit.detect import (
    MIN_EVIDENCE,
    Alarm,
    CusumDetector,
    Verdict,
    VerdictRules,
    judge,
)
from adloop.bandit.policies import BanditPolicy, ThompsonSampling, make_policy

__all__ = ["ArmReport", "CreativeEngine", "EngineConfig"]


@dataclass(frozen=True)
class EngineConfig:
    policy: str = "discounted_thompson"
    # Evidence half-life in the caller's clock (event seconds in the stream).
    half_life: float | None = 7 * 24 * 3600.0
    detect_changes: bool = True
    cusum_drop: float = 0.3
    cusum_threshold: float = 10.0
    min_evidence: int = MIN_EVIDENCE
    min_learning_share: float = 0.05
    exploration_floor: float = 0.01
    within: float = 0.10
    draws: int = 2000
    labels: LabelRules = field(default_factory=LabelRules)

    def make_policy(self) -> BanditPolicy:
        # The half-life applies to the discounted policy only; the others are the
        # textbook stationary versions (what the peers in the benchmark run).
        if self.policy == "discounted_thompson":
            return make_policy("thompson", half_life=self.half_life)
        return make_policy(self.policy)


@dataclass(frozen=True)
class ArmReport:
    creative_id: str
    label: str
    mean: float
    ci_low: float
    ci_high: float
    p_best: float
    expected_loss: float
    serving_probability: float
    verdict: Verdict


class CreativeEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.policy = self.config.make_policy()
        self.detector: CusumDetector | None = (
            CusumDetector(
                drop=self.config.cusum_drop,
                threshold=self.config.cusum_threshold,
                min_evidence=self.config.min_evidence,
            )
            if self.config.detect_changes
            else None
        )
        # Exact (undiscounted) impressions per arm, for evidence rules and reports.
        self.impressions = np.zeros(0)
        self.last_alarm: dict[str, Alarm] = {}

    # -- arms ------------------------------------------------------------------------
    @property
    def arm_ids(self) -> list[str]:
        return self.policy.arm_ids

    def add_arm(self, arm_id: str, prior: BetaPrior = UNIFORM_PRIOR) -> int:
        if arm_id in self.policy.stats:
            return self.policy.stats.index(arm_id)
        i = self.policy.add_arm(arm_id, prior)
        self.impressions = np.append(self.impressions, 0.0)
        if self.detector is not None:
            self.detector.add_arm()
        return i

    def remove_arm(self, arm_id: str) -> None:
        i = self.policy.stats.index(arm_id)
        self.policy.remove_arm(arm_id)
        self.impressions = np.delete(self.impressions, i)
        if self.detector is not None:
            self.detector.remove_arm(i)
        self.last_alarm.pop(arm_id, None)

    # -- learning --------------------------------------------------------------------
    def learn_many(
        self,
        arms: np.ndarray,
        impressions: np.ndarray,
        clicks: np.ndarray,
        t: float | None = None,
    ) -> list[Alarm]:
        arms = np.asarray(arms, dtype=np.intp)
        impressions = np.asarray(impressions, dtype=np.float64)
        clicks = np.asarray(clicks, dtype=np.float64)
        self.policy.learn_many(arms, impressions, clicks, t)
        np.add.at(self.impressions, arms, impressions)
        if self.detector is None:
            return []
        alarms = self.detector.update(arms, impressions, clicks)
        stats = self.policy.stats
        for alarm in alarms:
            # Forget the pre-change history: the creative is judged on what it earns now.
            i = alarm.arm
            stats.impressions[i] = min(stats.impressions[i], alarm.post_impressions)
            stats.clicks[i] = min(stats.clicks[i], alarm.post_clicks, stats.impressions[i])
            self.last_alarm[stats.arm_ids[i]] = alarm
        return alarms

    # -- deciding --------------------------------------------------------------------
    def summary(self, rng: np.random.Generator) -> PosteriorSummary:
        s = self.policy.stats
        # A budget of variates, not of draws: many arms get fewer (never < 400) draws.
        draws = max(400, min(self.config.draws, 40_000 // max(len(s.arm_ids), 1)))
        return summarize(
            s.alpha,
            s.beta,
            rng,
            draws=draws,
            within=self.config.within,
            max_relative_width=self.config.labels.max_relative_width,
        )

    def serving_probabilities(
        self, rng: np.random.Generator, summary: PosteriorSummary | None = None
    ) -> np.ndarray:
        k = len(self.arm_ids)
        if k == 0:
            return np.zeros(0)
        if summary is None and self.config.min_learning_share > 0 and k > 1:
            summary = self.summary(rng)
        if summary is not None and isinstance(self.policy, ThompsonSampling):
            # Thompson's serving distribution is P(best): reuse the summary's draws.
            p = summary.p_best.copy()
        else:
            p = self.policy.serving_probabilities(rng, draws=self.config.draws)
        if self.config.min_learning_share > 0 and k > 1:
            assert summary is not None
            learning = np.array(
                [lb == "learning" for lb in label_arms(summary, self.config.labels)]
            )
            p = guard_exploration(p, learning, self.config.min_learning_share)
        floor = self.config.exploration_floor
        return (1 - floor) * p + floor / k if floor > 0 else p

    def predict_many(self, rng: np.random.Generator, n: int) -> np.ndarray:
        p = self.serving_probabilities(rng)
        return rng.choice(len(p), size=int(n), p=p)

    def report(self, rng: np.random.Generator) -> list[ArmReport]:
        """Per creative: label, posterior, P(best), expected loss, share and verdict."""
        if not self.arm_ids:
            return []
        summary = self.summary(rng)
        labels = label_arms(summary, self.config.labels)
        probabilities = self.serving_probabilities(rng, summary)
        verdicts = judge(
            self.arm_ids,
            labels,
            summary.p_within,
            self.impressions,
            summary.within,
            self.last_alarm,
            VerdictRules(min_evidence=self.config.min_evidence),
        )
        return [
            ArmReport(
                creative_id=cid,
                label=labels[i],
                mean=float(summary.mean[i]),
                ci_low=float(summary.ci_low[i]),
                ci_high=float(summary.ci_high[i]),
                p_best=float(summary.p_best[i]),
                expected_loss=float(summary.expected_loss[i]),
                serving_probability=float(probabilities[i]),
                verdict=verdicts[i],
            )
            for i, cid in enumerate(self.arm_ids)
        ]

    # -- state -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "config": {
                **{k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "labels"},
                "labels": vars(cfg.labels),
            },
            "policy": self.policy.to_dict(),
            "detector": self.detector.to_dict() if self.detector else None,
            "impressions": self.impressions.tolist(),
            "last_alarm": {cid: vars(a) for cid, a in self.last_alarm.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CreativeEngine:
        cfg = dict(d["config"])
        cfg["labels"] = LabelRules(**cfg["labels"])
        engine = cls(EngineConfig(**cfg))
        engine.policy = BanditPolicy.from_dict(d["policy"])
        engine.detector = CusumDetector.from_dict(d["detector"]) if d["detector"] else None
        engine.impressions = np.array(d["impressions"], dtype=np.float64)
        engine.last_alarm = {cid: Alarm(**a) for cid, a in d["last_alarm"].items()}
        return engine

"""Change detection on each creative's click stream, and the underperformance verdict.

:class:`CusumDetector` runs a one-sided Bernoulli CUSUM per arm (Page 1954): the
log-likelihood ratio of "CTR fell by ``drop`` (relative) from its reference" against
"CTR is at its reference", accumulated and clipped at zero. An alarm when it passes
``threshold`` nats. The reference is the arm's CTR over all its evidence since the last alarm
(re-estimated continually), so a reference that started too high by chance is
corrected by more data rather than turning into a false alarm. Updates are batched:
one increment ``(n, k)`` per arm per batch adds ``k·log(p1/p0) + (n-k)·log((1-p1)/(1-p0))``.

False alarms are controlled three ways: no alarm before ``min_evidence`` of
reference evidence; the threshold (``threshold`` nats ⇒ average run length between
false alarms grows like e^threshold); and a confirmation that the run's own CTR is
below the reference with posterior probability ≥ ``confirm``. ``bench bandits``
measures the resulting false-alarm rate on stationary traffic, and the tests bound it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import betainc

__all__ = ["Alarm", "CusumDetector", "Verdict", "VerdictRules", "judge"]


#: Impressions of evidence a creative needs before it can be called an underperformer
#: (the detector's reference and the verdict both wait for it). The engine's
#: ``EngineConfig.min_evidence`` and the ``ADLOOP_MIN_EVIDENCE`` setting default to it.
MIN_EVIDENCE = 2000


@dataclass(frozen=True)
class Alarm:
    arm: int
    ctr_before: float
    ctr_after: float
    detected_at: float  # impression count of the arm when the alarm fired
    change_at: float  # impression count where the drop began (CUSUM's change-point estimate)
    post_impressions: float  # evidence since the estimated change
    post_clicks: float

    def reason(self) -> str:
        return (
            f"CTR dropped from {self.ctr_before:.2%} to {self.ctr_after:.2%} "
            f"(change detected at impression {self.detected_at:,.0f}, "
            f"estimated start {self.change_at:,.0f})"
        )


@dataclass(eq=False)
class CusumDetector:
    drop: float = 0.3
    threshold: float = 10.0
    min_evidence: float = float(MIN_EVIDENCE)
    confirm: float = 0.99
    # Per-arm arrays: totals, the current run (evidence since the CUSUM last sat at 0).
    n: np.ndarray = field(default_factory=lambda: np.zeros(0))
    k: np.ndarray = field(default_factory=lambda: np.zeros(0))
    s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    run_n: np.ndarray = field(default_factory=lambda: np.zeros(0))
    run_k: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0))  # never reset

    def __post_init__(self) -> None:
        if not 0 < self.drop < 1:
            raise ValueError("drop must be in (0, 1)")
        for name in ("n", "k", "s", "run_n", "run_k", "seen"):
            setattr(self, name, np.array(getattr(self, name), dtype=np.float64))

    def add_arm(self) -> None:
        for name in ("n", "k", "s", "run_n", "run_k", "seen"):
            setattr(self, name, np.append(getattr(self, name), 0.0))

    def remove_arm(self, i: int) -> None:
        for name in ("n", "k", "s", "run_n", "run_k", "seen"):
            setattr(self, name, np.delete(getattr(self, name), i))

    def reference(self) -> np.ndarray:
        """Each arm's CTR over everything seen since the last alarm (add-one smoothed).

        The current run is included on purpose: a run starts when non-clicks push the
        CUSUM up, so excluding it would bias the reference upwards and turn plain noise
        into alarms.
        """
        return (self.k + 0.5) / (self.n + 1.0)

    def update(self, arms: np.ndarray, impressions: np.ndarray, clicks: np.ndarray) -> list[Alarm]:
        """Add increments (positions may repeat); returns the alarms raised, arms reset."""
        idx = np.asarray(arms, dtype=np.intp)
        n_inc = np.zeros_like(self.n)
        k_inc = np.zeros_like(self.k)
        np.add.at(n_inc, idx, np.asarray(impressions, dtype=np.float64))
        np.add.at(k_inc, idx, np.asarray(clicks, dtype=np.float64))
        touched = (n_inc > 0) | (k_inc > 0)
        if not touched.any():
            return []
        p0 = np.clip(self.reference(), 1e-6, 1 - 1e-6)
        p1 = p0 * (1 - self.drop)
        llr = k_inc * np.log(p1 / p0) + (n_inc - k_inc) * np.log((1 - p1) / (1 - p0))
        s_new = self.s + llr
        # Until the reference has min_evidence behind it, everything is reference
        # evidence: a CUSUM against an unknown baseline would only measure its error.
        warming = (self.n - self.run_n) < self.min_evidence
        reset = touched & ((s_new <= 0) | warming)
        self.n += n_inc
        self.k += k_inc
        self.seen += n_inc
        self.s = np.where(touched, np.where(warming, 0.0, np.maximum(s_new, 0.0)), self.s)
        self.run_n = np.where(reset, 0.0, self.run_n + n_inc)
        self.run_k = np.where(reset, 0.0, self.run_k + k_inc)
        ref_n = self.n - self.run_n
        candidates = np.flatnonzero(
            touched & (self.s > self.threshold) & (ref_n >= self.min_evidence)
        )
        alarms = []
        for i in candidates:
            before_k, before_n = self.k[i] - self.run_k[i], ref_n[i]
            # Confirm: P(run CTR < reference CTR) under independent Beta(½,½) posteriors,
            # approximated by the run's posterior CDF at the reference mean.
            ref_ctr = (before_k + 0.5) / (before_n + 1.0)
            p_lower = betainc(self.run_k[i] + 0.5, self.run_n[i] - self.run_k[i] + 0.5, ref_ctr)
            if p_lower < self.confirm:
                continue
            alarms.append(
                Alarm(
                    arm=int(i),
                    ctr_before=float(ref_ctr),
                    ctr_after=float((self.run_k[i] + 0.5) / (self.run_n[i] + 1.0)),
                    detected_at=float(self.seen[i]),
                    change_at=float(self.seen[i] - self.run_n[i]),
                    post_impressions=float(self.run_n[i]),
                    post_clicks=float(self.run_k[i]),
                )
            )
            # Restart with the post-change regime as the new reference.
            self.n[i], self.k[i] = self.run_n[i], self.run_k[i]
            self.s[i] = 0.0
            self.run_n[i] = self.run_k[i] = 0.0
        return alarms

    def to_dict(self) -> dict[str, Any]:
        return {
            "drop": self.drop,
            "threshold": self.threshold,
            "min_evidence": self.min_evidence,
            "confirm": self.confirm,
            **{
                name: getattr(self, name).tolist()
                for name in ("n", "k", "s", "run_n", "run_k", "seen")
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CusumDetector:
        d = dict(d)
        # State written before the field was renamed (worker tables persist it).
        if "min_impressions" in d:
            d["min_evidence"] = d.pop("min_impressions")
        return cls(**d)


@dataclass(frozen=True)
class VerdictRules:
    """When a creative is called an underperformer (and may be replaced)."""

    min_evidence: int = MIN_EVIDENCE
    # P(within δ of the best) below this, after min_evidence, is a verdict.
    max_p_within: float = 0.01


@dataclass(frozen=True)
class Verdict:
    creative_id: str
    label: str
    underperforming: bool
    reasons: tuple[str, ...]
    p_within: float
    impressions: int

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons) if self.reasons else self.label


def judge(
    creative_ids: list[str],
    labels: list[str],
    p_within: np.ndarray,
    impressions: np.ndarray,
    within: float,
    alarms: dict[str, Alarm] | None = None,
    rules: VerdictRules = VerdictRules(),
) -> list[Verdict]:
    """A verdict per creative, with the numbers that justify it.

    Underperforming when, with at least ``min_evidence`` of evidence, either the
    creative is confidently more than δ below the best, or a drop in its own CTR was
    detected and it is no longer labelled best.
    """
    alarms = alarms or {}
    out = []
    for i, cid in enumerate(creative_ids):
        imps = int(impressions[i])
        reasons: list[str] = []
        enough = imps >= rules.min_evidence
        if enough and p_within[i] < rules.max_p_within:
            reasons.append(
                f"P(within {within:.0%} of best) = {p_within[i]:.1%} after {imps:,} impressions"
            )
        alarm = alarms.get(cid)
        if alarm is not None and enough and labels[i] != "best":
            reasons.append(alarm.reason())
        out.append(
            Verdict(
                creative_id=cid,
                label=labels[i],
                underperforming=bool(reasons),
                reasons=tuple(reasons),
                p_within=float(p_within[i]),
                impressions=imps,
            )
        )
    return out

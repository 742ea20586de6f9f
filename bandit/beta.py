"""Beta-Bernoulli Thompson sampling over a growing set of arms (ad creatives).

Pure numpy, no I/O: the stream layer owns events and persistence and hands this
module counts; this module owns the posterior maths and a JSON-safe state format.

Each arm i has a prior Beta(alpha0_i, beta0_i) and exact integer totals of
impressions n_i and clicks k_i, so its posterior is Beta(alpha0_i + k_i,
beta0_i + n_i - k_i). Counts are stored, not posterior parameters, so that the
stream can overwrite them with its exact running totals (``set_counts``) and a
prior can be inspected or changed without losing data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np
from scipy.special import betaincinv

__all__ = ["STATE_FORMAT", "STATE_VERSION", "UNIFORM_PRIOR", "BetaArms", "BetaPrior"]

STATE_FORMAT = "adloop.bandit.BetaArms"
STATE_VERSION = 1

# selection_probabilities draws in blocks of at most this many Beta variates, so memory
# stays bounded (~8 MB) however many arms or draws are asked for.
_MAX_BLOCK = 1 << 20
_INT64_MAX = int(np.iinfo(np.int64).max)


def _positive_finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def _float_array(values: Any, name: str) -> np.ndarray:
    """Copy to a float64 array, refusing non-numeric input (numpy would parse "1.5")."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=True)


def _count_array(values: Any, name: str) -> np.ndarray:
    """Coerce to an int64 array of non-negative whole numbers, or raise ValueError."""
    arr = np.asarray(values)
    kind = arr.dtype.kind
    if kind in "iu":
        if kind == "u" and arr.size and arr.max() > _INT64_MAX:
            raise ValueError(f"{name} overflows int64")
        out = arr.astype(np.int64, copy=False)
    elif kind == "f":
        # Accept whole-valued floats (counts that passed through JSON or pandas as
        # floats) but never silently truncate a fractional count.
        if not (np.isfinite(arr).all() and (arr == np.floor(arr)).all()):
            raise ValueError(f"{name} must be whole numbers")
        if arr.size and np.abs(arr).max() >= 2.0**63:
            raise ValueError(f"{name} overflows int64")
        out = arr.astype(np.int64)
    elif kind == "b":
        raise TypeError(f"{name} must be integer counts, not booleans")
    else:
        raise TypeError(f"{name} must be integer counts, got dtype {arr.dtype}")
    if out.size and out.min() < 0:
        raise ValueError(f"{name} must be non-negative")
    return out


def _count_scalar(value: Any, name: str) -> int:
    """Scalar twin of _count_array, in plain Python because set_counts is a per-event call."""
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an integer count, not a boolean")
    if isinstance(value, float | np.floating):
        # Whole-valued floats are accepted, fractional ones (and inf/nan) never truncated.
        if not float(value).is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    elif not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer count, got {type(value).__name__}")
    v = int(value)
    if v < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    if v > _INT64_MAX:
        raise ValueError(f"{name} overflows int64")
    return v


def _check_clicks(impressions: np.ndarray, clicks: np.ndarray) -> None:
    if (clicks > impressions).any():
        raise ValueError("clicks must not exceed impressions")


@dataclass(frozen=True)
class BetaPrior:
    """Prior Beta(alpha, beta) on an arm's click-through rate; both must be finite and > 0."""

    alpha: float = 1.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        # Normalise to float so equality, hashing and serialization never depend on
        # whether the caller wrote 1 or 1.0.
        object.__setattr__(self, "alpha", _positive_finite(self.alpha, "alpha"))
        object.__setattr__(self, "beta", _positive_finite(self.beta, "beta"))

    @classmethod
    def from_mean(cls, mean: float, strength: float) -> BetaPrior:
        """Prior with the given mean CTR worth ``strength`` pseudo-impressions."""
        m = float(mean)
        s = float(strength)
        if not (0.0 < m < 1.0):
            raise ValueError(f"mean must be in (0, 1), got {mean!r}")
        if not (math.isfinite(s) and s > 0.0):
            raise ValueError(f"strength must be finite and > 0, got {strength!r}")
        return cls(alpha=m * s, beta=(1.0 - m) * s)

    @property
    def mean(self) -> float:
        """Prior mean alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)


UNIFORM_PRIOR = BetaPrior()


@dataclass(eq=False)
class BetaArms:
    """Posterior Beta(alpha0+clicks, beta0+impressions-clicks) for n arms, arrays of float64.

    Fields are public for reading; mutate only through the methods, which keep the
    arrays validated and the id -> index map in step.
    """

    arm_ids: list[str] = field(default_factory=list)
    prior_alpha: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    prior_beta: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    impressions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    clicks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _index: dict[str, int] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        # Copy everything so the instance never aliases caller-owned lists or arrays.
        self.arm_ids = list(self.arm_ids)
        self.prior_alpha = _float_array(self.prior_alpha, "prior_alpha")
        self.prior_beta = _float_array(self.prior_beta, "prior_beta")
        self.impressions = _count_array(self.impressions, "impressions").copy()
        self.clicks = _count_array(self.clicks, "clicks").copy()
        self.validate()

    # -- construction ---------------------------------------------------------------

    @classmethod
    def empty(cls) -> BetaArms:
        """No arms yet."""
        return cls()

    def validate(self) -> None:
        """Raise ValueError/TypeError unless the state is consistent; rebuilds the id index."""
        n = len(self.arm_ids)
        for aid in self.arm_ids:
            if not isinstance(aid, str):
                raise TypeError(f"arm ids must be str, got {type(aid).__name__}")
        index = {aid: i for i, aid in enumerate(self.arm_ids)}
        if len(index) != n:
            raise ValueError("arm ids must be unique")
        for name in ("prior_alpha", "prior_beta", "impressions", "clicks"):
            arr = getattr(self, name)
            if arr.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
        for name in ("prior_alpha", "prior_beta"):
            arr = getattr(self, name)
            if not np.all(np.isfinite(arr) & (arr > 0.0)):
                raise ValueError(f"{name} must be finite and > 0")
        if np.any(self.impressions < 0) or np.any(self.clicks < 0):
            raise ValueError("counts must be non-negative")
        _check_clicks(self.impressions, self.clicks)
        self._index = index

    def copy(self) -> BetaArms:
        """Independent deep copy."""
        return BetaArms(
            self.arm_ids, self.prior_alpha, self.prior_beta, self.impressions, self.clicks
        )

    def __len__(self) -> int:
        return len(self.arm_ids)

    def __contains__(self, arm_id: object) -> bool:
        return arm_id in self._index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BetaArms):
            return NotImplemented
        return (
            self.arm_ids == other.arm_ids
            and np.array_equal(self.prior_alpha, other.prior_alpha)
            and np.array_equal(self.prior_beta, other.prior_beta)
            and np.array_equal(self.impressions, other.impressions)
            and np.array_equal(self.clicks, other.clicks)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    # -- arms and counts ------------------------------------------------------------

    @property
    def n_arms(self) -> int:
        """Number of arms."""
        return len(self.arm_ids)

    def add_arm(self, arm_id: str, prior: BetaPrior = UNIFORM_PRIOR) -> None:
        """Append an arm with zero counts; re-adding a known id keeps its counts and prior."""
        if not isinstance(arm_id, str):
            raise TypeError(f"arm_id must be str, got {type(arm_id).__name__}")
        if arm_id in self._index:
            return
        self._index[arm_id] = len(self.arm_ids)
        self.arm_ids.append(arm_id)
        self.prior_alpha = np.append(self.prior_alpha, prior.alpha)
        self.prior_beta = np.append(self.prior_beta, prior.beta)
        self.impressions = np.append(self.impressions, np.int64(0))
        self.clicks = np.append(self.clicks, np.int64(0))

    def set_prior(self, arm_id: str, prior: BetaPrior) -> None:
        """Replace an arm's prior; its counts are untouched."""
        i = self.index(arm_id)
        self.prior_alpha[i] = prior.alpha
        self.prior_beta[i] = prior.beta

    def index(self, arm_id: str) -> int:
        """Position of ``arm_id`` in the arrays; KeyError if unknown."""
        try:
            return self._index[arm_id]
        except KeyError:
            raise KeyError(f"unknown arm id {arm_id!r}") from None

    def set_counts(self, arm_id: str, impressions: int, clicks: int) -> None:
        """Overwrite an arm's totals with exact absolute counts (the stream keeps the truth)."""
        i = self.index(arm_id)
        imps = _count_scalar(impressions, "impressions")
        clk = _count_scalar(clicks, "clicks")
        if clk > imps:
            raise ValueError(f"clicks ({clk}) must not exceed impressions ({imps})")
        self.impressions[i] = imps
        self.clicks[i] = clk

    def update(
        self,
        arm_ids: Sequence[str] | np.ndarray,
        impressions: np.ndarray,
        clicks: np.ndarray,
    ) -> None:
        """Add a batch of (impressions, clicks) increments; ids may repeat.

        ``arm_ids`` may also be an integer array of arm positions, which skips the id
        lookup on hot paths. The batch is validated in full before anything changes.
        """
        if isinstance(arm_ids, str):
            # A str is itself a Sequence[str]; treating it as one id per character is
            # never what the caller meant.
            raise TypeError("arm_ids must be a sequence of ids, not a single str")
        if isinstance(arm_ids, np.ndarray) and arm_ids.dtype.kind in "iu":
            idx = arm_ids.astype(np.intp).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= self.n_arms):
                raise IndexError(f"arm positions must be in [0, {self.n_arms})")
        else:
            idx = np.fromiter((self.index(a) for a in arm_ids), dtype=np.intp)
        imps = _count_array(impressions, "impressions").reshape(-1)
        clk = _count_array(clicks, "clicks").reshape(-1)
        if not (imps.shape == clk.shape == idx.shape):
            raise ValueError(
                f"arm_ids, impressions and clicks must have equal lengths, got "
                f"{idx.size}, {imps.size}, {clk.size}"
            )
        _check_clicks(imps, clk)
        # add.at (unbuffered) so repeated ids accumulate instead of overwriting each other.
        np.add.at(self.impressions, idx, imps)
        np.add.at(self.clicks, idx, clk)

    # -- posterior ------------------------------------------------------------------

    @property
    def alpha(self) -> np.ndarray:
        """Posterior alpha = prior alpha + clicks."""
        return self.prior_alpha + self.clicks

    @property
    def beta(self) -> np.ndarray:
        """Posterior beta = prior beta + non-clicked impressions."""
        return self.prior_beta + (self.impressions - self.clicks)

    def mean(self) -> np.ndarray:
        """Posterior mean CTR per arm."""
        a = self.alpha
        return a / (a + self.beta)

    def credible_interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Equal-tailed posterior interval: the (1-level)/2 and (1+level)/2 Beta quantiles."""
        lv = float(level)
        if not (0.0 < lv < 1.0):
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        a = self.alpha
        b = self.beta
        n = a.size
        q = betaincinv(
            np.concatenate([a, a]),
            np.concatenate([b, b]),
            np.repeat([(1.0 - lv) / 2.0, (1.0 + lv) / 2.0], n),
        )
        return q[:n], q[n:]

    # -- Thompson sampling ----------------------------------------------------------

    def sample(self, rng: np.random.Generator, n: int = 1) -> np.ndarray:
        """``n`` joint posterior draws, shape (n, n_arms)."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        return rng.beta(self.alpha, self.beta, size=(int(n), self.n_arms))

    def thompson_select(self, rng: np.random.Generator) -> int:
        """Index of the arm whose single posterior draw is largest (one Thompson decision).

        Serving paths that decide many times per posterior should use
        ``selection_probabilities`` once and sample from it, or ``thompson_select_many``.
        """
        k = len(self.arm_ids)
        if k == 0:
            raise ValueError("cannot select from zero arms; add_arm() first")
        if k == 1:
            return 0
        return int(np.argmax(rng.beta(self.alpha, self.beta)))

    def thompson_select_many(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` independent Thompson decisions in one call (int64 arm indices)."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        k = self.n_arms
        if k == 0:
            raise ValueError("cannot select from zero arms; add_arm() first")
        if k == 1:
            return np.zeros(int(n), dtype=np.int64)
        a = self.alpha
        b = self.beta
        out = np.empty(int(n), dtype=np.int64)
        block = max(1, _MAX_BLOCK // k)
        for start in range(0, int(n), block):
            m = min(block, int(n) - start)
            out[start : start + m] = np.argmax(rng.beta(a, b, size=(m, k)), axis=1)
        return out

    def selection_probabilities(self, rng: np.random.Generator, draws: int = 2000) -> np.ndarray:
        """Monte Carlo P(arm has the largest draw), i.e. Thompson's serving probabilities.

        Sums to 1 (up to float rounding); the Monte Carlo standard error of each entry
        is sqrt(p(1-p)/draws).
        """
        if isinstance(draws, bool) or not isinstance(draws, int | np.integer) or draws < 1:
            raise ValueError(f"draws must be a positive int, got {draws!r}")
        k = self.n_arms
        if k == 0:
            return np.zeros(0, dtype=np.float64)
        if k == 1:
            return np.ones(1, dtype=np.float64)
        a = self.alpha
        b = self.beta
        wins = np.zeros(k, dtype=np.int64)
        block = max(1, _MAX_BLOCK // k)
        remaining = int(draws)
        while remaining:
            m = min(block, remaining)
            winners = np.argmax(rng.beta(a, b, size=(m, k)), axis=1)
            wins += np.bincount(winners, minlength=k)
            remaining -= m
        return wins / float(draws)

    # -- serialization --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state (lists of Python floats/ints), exact under ``from_dict``."""
        # float64 -> Python float is exact and json writes floats with repr, which
        # round-trips every finite double bit for bit.
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "arm_ids": list(self.arm_ids),
            "prior_alpha": self.prior_alpha.tolist(),
            "prior_beta": self.prior_beta.tolist(),
            "impressions": self.impressions.tolist(),
            "clicks": self.clicks.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BetaArms:
        """Rebuild from ``to_dict`` output; ValueError on a foreign or malformed state."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict, got {type(d).__name__}")
        if d.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state: format={d.get('format')!r}")
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {d.get('version')!r}")
        keys = ("arm_ids", "prior_alpha", "prior_beta", "impressions", "clicks")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"state is missing {missing}")
        if not isinstance(d["arm_ids"], list | tuple):
            # list("abc") would silently yield three one-letter ids.
            raise ValueError("state arm_ids must be a list of str")
        # Coercion and full validation happen in __post_init__.
        return cls(
            arm_ids=list(d["arm_ids"]),
            prior_alpha=d["prior_alpha"],
            prior_beta=d["prior_beta"],
            impressions=d["impressions"],
            clicks=d["clicks"],
        )

"""Contextual Thompson sampling on a Bayesian logistic regression (pure numpy).

The model (Chapelle & Li 2011, "An Empirical Evaluation of Thompson Sampling"): the
click probability of creative ``a`` in context ``c`` is ``sigmoid(w · x(c, a))`` with
a diagonal Gaussian posterior ``w ~ N(m, diag(v))`` over named features:

* shared: ``bias`` and ``k=v`` for each context item (they move every creative's score
  alike: they calibrate the click rate and cancel in the choice);
* per creative: ``@id``, ``@id|k=v`` (the creative in that context) and its text
  features ``t:<name>`` (words or embedding coordinates, shared by creatives that have
  them: a brand-new creative starts from what its words earned elsewhere).

**Learning from counts.** The stream hands over increments: ``n`` impressions of one
creative in one context with ``k`` clicks. Impressions with the same context and
creative share ``x``, so the model's sufficient statistics are the counts per (context,
creative): learning adds to them (exactly the same whether the counts come one by one
or in one increment, in any order). The posterior is Chapelle & Li's Laplace
approximation, refitted from those counts when it is next needed: the mode ``m`` of
the log posterior (Newton-CG, warm-started from the last fit) and
``v_i = 1 / (1/v0_i + Σ_r x_ri² n_r p_r (1 - p_r))``. An online update instead (one
diagonal assumed-density step per increment) measured badly here: a large increment
went mostly into the shared bias, and the creatives' differences stayed uncertain.

**Serving.** For a context, the per-creative part of the score is approximately
``N(μ_a, σ²_a)`` and independent across creatives (shared features cancel; text
features shared by two creatives make them slightly correlated, which this ignores).
Thompson sampling shows creative ``a`` with probability ``P(a has the highest
score)``, computed by Gauss-Hermite quadrature, not Monte Carlo: the serving
distribution is deterministic, so the propensity a server reports for it is exact and
reproducible.

The model's state is a few arrays and its feature names (``to_bytes``), so it lives in
the worker's table next to the counts it learned.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import log_ndtr

__all__ = ["LogisticThompson"]

Features = Mapping[str, str | int | float | bool]

# Gauss-Hermite nodes for E[f(Z)], Z ~ N(0, 1): 48 points keep the error of P(best)
# below 1e-6 for the score spreads met here, and cost little.
_GH_X, _GH_W = np.polynomial.hermite.hermgauss(48)
_GH_Z = _GH_X * math.sqrt(2.0)
_GH_W = _GH_W / math.sqrt(math.pi)


def _item(key: str, value: Any) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{key}={value}"


class LogisticThompson:
    """Thompson sampling over creatives with a Bayesian logistic model of the context."""

    name = "logistic_ts"

    def __init__(
        self,
        arm_ids: Sequence[str] = (),
        arm_features: Mapping[str, Mapping[str, float]] | None = None,
        bias_mean: float = -4.0,
        bias_variance: float = 4.0,
        shared_variance: float = 1.0,
        arm_variance: float = 1.0,
        interaction_variance: float = 0.1,
        text_variance: float = 0.5,
    ) -> None:
        # Prior variances per feature group: the creative's own effect in a context is
        # a priori smaller than its overall effect, and text is shared evidence.
        self.config = {
            "bias_mean": float(bias_mean),
            "bias_variance": float(bias_variance),
            "shared_variance": float(shared_variance),
            "arm_variance": float(arm_variance),
            "interaction_variance": float(interaction_variance),
            "text_variance": float(text_variance),
        }
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        # Prior mean and variance, posterior mean and variance, per feature.
        self.m0 = np.zeros(64)
        self.v0 = np.zeros(64)
        self.m = np.zeros(64)
        self.v = np.zeros(64)
        self.arm_ids: list[str] = []
        # Every creative's text features, also of removed ones: their counts still
        # teach the shared text features.
        self.arm_features: dict[str, dict[str, float]] = {}
        self.learned = [0.0, 0.0]
        self.stats: dict[tuple[tuple[str, ...], str], list[float]] = {}
        self._fitted = True
        # The last fit's design matrix (columns), curvatures and prior precisions, and
        # the covariance blocks derived from it per creative: not part of the state.
        self._fit: tuple[Any, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._restored_fit = False
        # Each creative's own weights (``@id...``), by creative id.
        self._own: dict[str, list[int]] = {}
        self._blocks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # (context items, arm, with shared part) -> (indices, values): feature vectors
        # are rebuilt often with the same context cells; not part of the state.
        self._cache: dict[tuple[tuple[str, ...], str, bool], tuple[np.ndarray, np.ndarray]] = {}
        for arm_id in arm_ids:
            self.add_arm(arm_id, (arm_features or {}).get(arm_id))

    # -- arms --------------------------------------------------------------------------
    @property
    def n_arms(self) -> int:
        return len(self.arm_ids)

    def add_arm(self, arm_id: str, features: Mapping[str, float] | None = None) -> int:
        """Add a creative (no-op when active); ``features``: text features, name -> value."""
        if arm_id not in self.arm_ids:
            self.arm_ids.append(arm_id)
        if features is not None or arm_id not in self.arm_features:
            new = {str(k): float(v) for k, v in (features or {}).items()}
            if new != self.arm_features.get(arm_id):
                # New text for a creative with counts: the fit must see it.
                self.arm_features[arm_id] = new
                self._cache = {k: x for k, x in self._cache.items() if k[1] != arm_id}
                self._fitted = False
        return self.arm_ids.index(arm_id)

    def remove_arm(self, arm_id: str) -> None:
        """Stop choosing it; what it taught the shared features stays."""
        self.arm_ids.remove(arm_id)

    # -- features ----------------------------------------------------------------------
    def _feature(self, name: str) -> int:
        i = self.index.get(name)
        if i is None:
            i = len(self.names)
            if i >= self.m.size:
                grow = np.zeros(self.m.size)
                self.m0, self.v0 = np.concatenate([self.m0, grow]), np.concatenate([self.v0, grow])
                self.m, self.v = np.concatenate([self.m, grow]), np.concatenate([self.v, grow])
            self.index[name] = i
            self.names.append(name)
            if name.startswith("@"):
                self._own.setdefault(name[1:].partition("|")[0], []).append(i)
            self.m0[i], self.v0[i] = self._prior(name)
            self.m[i], self.v[i] = self.m0[i], self.v0[i]
        return i

    def _prior(self, name: str) -> tuple[float, float]:
        """A feature's prior mean and variance, from its group (a function of its name)."""
        c = self.config
        if name == "bias":
            return c["bias_mean"], c["bias_variance"]
        if name.startswith("t:"):
            return 0.0, c["text_variance"] / (2 if "|" in name else 1)
        if name.startswith("@"):
            return 0.0, c["interaction_variance" if "|" in name else "arm_variance"]
        return 0.0, c["shared_variance"]

    def _vector(
        self, items: tuple[str, ...], arm_id: str, shared: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Feature indices and values of (context, creative); without the shared part
        when ``shared`` is False (what the choice between creatives depends on)."""
        cache_key = (items, arm_id, shared)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        feature = self._feature
        idx: list[int] = []
        val: list[float] = []
        if shared:
            idx.append(feature("bias"))
            val.append(1.0)
            for item in items:
                idx.append(feature(item))
                val.append(1.0)
        arm = f"@{arm_id}"
        idx.append(feature(arm))
        val.append(1.0)
        for item in items:
            idx.append(feature(f"{arm}|{item}"))
            val.append(1.0)
        text = self.arm_features.get(arm_id, {})
        if text:
            # Scaled so the text part's prior variance does not grow with its length.
            # Main effects only: text × context features measured no better and made
            # every creative's score depend on a hundred more weights.
            scale = 1.0 / math.sqrt(sum(x * x for x in text.values()) or 1.0)
            for name, x in text.items():
                idx.append(feature(f"t:{name}"))
                val.append(x * scale)
        out = (np.asarray(idx, dtype=np.intp), np.asarray(val))
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[cache_key] = out
        return out

    @staticmethod
    def items(context: Features) -> tuple[str, ...]:
        return tuple(sorted(_item(k, v) for k, v in context.items()))

    # -- learning ----------------------------------------------------------------------
    def learn_counts(
        self,
        context: Features,
        arm: int | str,
        clicks: float,
        non_clicks: float,
        propensity: float = 1.0,
    ) -> None:
        """Learn ``clicks`` and ``non_clicks`` of one creative in one context at once.

        ``propensity`` is accepted for the learners' common interface and unused: the
        model is a likelihood of the clicks given the creative shown, which the
        logging probabilities do not change (no importance weighting needed).
        """
        self.learn_increment(context, arm, float(clicks) + float(non_clicks), float(clicks))

    def learn_increment(
        self, context: Features, arm: int | str, impressions: float, clicks: float
    ) -> None:
        """Add counted impressions and clicks (the stream's increments: a click may come
        in a later increment than its impression; the counts are what is learned)."""
        if impressions <= 0 and clicks <= 0:
            return
        arm_id = arm if isinstance(arm, str) else self.arm_ids[arm]
        if arm_id not in self.arm_features:
            self.arm_features[arm_id] = {}
        items = self.items(context)
        row = self.stats.get((items, arm_id))
        if row is None:
            row = self.stats[(items, arm_id)] = [0.0, 0.0]
        row[0] += impressions
        row[1] += clicks
        self.learned[0] += impressions
        self.learned[1] += clicks
        self._fitted = False

    def learn_one(
        self, context: Features, arm: int | str, clicked: bool, propensity: float = 1.0
    ) -> None:
        self.learn_counts(context, arm, 1.0 if clicked else 0.0, 0.0 if clicked else 1.0)

    def fit(self) -> None:
        """The Laplace posterior from the counts learned (a no-op when up to date)."""
        if self._fitted:
            return
        self._fitted = True
        if not self.stats:
            return
        from scipy import sparse
        from scipy.optimize import minimize

        vectors = [self._vector(items, arm) for items, arm in self.stats]
        k = np.array([r[1] for r in self.stats.values()])
        # Trials: impressions (a row's clicks never outnumber them once counted).
        n = np.maximum(np.array([r[0] for r in self.stats.values()]), k)
        f = len(self.names)
        indptr = np.cumsum([0] + [idx.size for idx, _ in vectors])
        x = sparse.csr_matrix(
            (
                np.concatenate([val for _, val in vectors]),
                np.concatenate([idx for idx, _ in vectors]),
                indptr,
            ),
            shape=(len(vectors), f),
        )
        xt = x.T.tocsr()
        m0, inv_v0 = self.m0[:f], 1.0 / self.v0[:f]

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            s = x @ w
            d = w - m0
            loss = float(n @ np.logaddexp(0.0, s) - k @ s + 0.5 * (d * d) @ inv_v0)
            return loss, xt @ (n * _sigmoid(s) - k) + d * inv_v0

        def hessp(w: np.ndarray, p: np.ndarray) -> np.ndarray:
            q = _sigmoid(x @ w)
            return xt @ (n * q * (1.0 - q) * (x @ p)) + p * inv_v0

        squares = x.multiply(x).T.tocsr()
        interaction = self._interactions(f)
        w = self.m[:f].copy()
        # A model read back from bytes that was fitted when written: its weights are the
        # fit; only what follows from them is recomputed (identical predictions).
        rounds = 0 if self._restored_fit else 4
        self._restored_fit = False
        q = _sigmoid(x @ w)
        curvature = n * q * (1.0 - q)
        information = squares @ curvature
        for _ in range(rounds):
            w = minimize(
                objective,
                w,
                jac=True,
                hessp=hessp,
                method="Newton-CG",
                options={"xtol": 1e-6, "maxiter": 50},
            ).x
            q = _sigmoid(x @ w)
            curvature = n * q * (1.0 - q)
            information = squares @ curvature
            # Empirical Bayes for how much context matters: the prior variance of the
            # creative × context weights is set to their posterior second moment where
            # the data informs them (EM). Where context does not matter it shrinks and
            # the model serves like a context-free one; where it does, it grows.
            tau2 = self.config["interaction_variance"]
            v = 1.0 / (inv_v0 + information)
            # Informed: worth ~500 impressions at a 2 % CTR. A threshold that moved with
            # the estimate let an early, data-poor estimate shrink it past the point
            # where any weight counted as informed again.
            estimate = self._interaction_spread(w, v, information > 10.0)
            if estimate is None or abs(math.log(estimate / tau2)) < 0.1:
                break
            self.config["interaction_variance"] = estimate
            self.v0[:f][interaction] = estimate
            inv_v0 = 1.0 / self.v0[:f]
        self.m[:f] = w
        self.v[:f] = 1.0 / (inv_v0 + information)
        # Kept for the creatives' score covariances (``_covariance``).
        self._fit = (x.tocsc(), curvature, inv_v0, information)
        self._blocks.clear()

    def _interaction_spread(
        self, w: np.ndarray, v: np.ndarray, informed: np.ndarray
    ) -> float | None:
        """How much a creative's weight varies across the values of one context key
        (device=mobile vs desktop, ...), from the weights the data informs: the mean of
        ``(m - group mean)² · k/(k-1) + v`` over groups of at least two values. Contrasts,
        not the weights themselves: a key with one value (one placement) is the
        creative's own effect over again and says nothing about context."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i in np.flatnonzero(informed):
            name = self.names[int(i)]
            if not name.startswith("@") or "|" not in name:
                continue
            arm, _, item = name.partition("|")
            groups.setdefault((arm, item.partition("=")[0]), []).append(int(i))
        terms: list[float] = []
        for members in groups.values():
            if len(members) < 2:
                continue
            idx = np.asarray(members)
            k = idx.size
            centered = w[idx] - w[idx].mean()
            terms.extend(centered**2 * k / (k - 1) + v[idx])
        if len(terms) < 4:
            return None
        return float(np.clip(np.mean(terms), 5e-3, 1.0))

    def _interactions(self, f: int) -> np.ndarray:
        """Which of the first ``f`` features are creative × context weights."""
        return np.fromiter(
            (name.startswith("@") and "|" in name for name in self.names[:f]), bool, f
        )

    def _covariance(self, arm_id: str, need: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The Laplace covariance of a creative's own features (``@id...`` and its text
        features) given the shared ones: ``inv(X_b' D X_b + diag(1/v0_b))`` over the
        block ``b`` of those features (at least ``need``). Summing the diagonal
        variances instead made a well-observed creative look as uncertain as its number
        of features times the truth, and the policy never stopped exploring."""
        found = self._blocks.get(arm_id)
        if found is not None:
            missing = np.setdiff1d(need, found[0])
            if missing.size == 0:
                return found
            if self._fit is None or not self._fit[3][missing[missing < self._fit[3].size]].any():
                # Weights no data has touched (a context new to this creative) are
                # independent of the rest: their prior variances extend the block.
                block = np.concatenate([found[0], missing])
                order = np.argsort(block)
                cov = np.zeros((block.size, block.size))
                n = found[0].size
                cov[:n, :n] = found[1]
                cov[np.arange(n, block.size), np.arange(n, block.size)] = self.v0[missing]
                found = (block[order], cov[np.ix_(order, order)])
                self._blocks[arm_id] = found
                return found
        # All of the creative's own weights and its text weights at once: a context
        # new to it then only adds untouched weights (the cheap path above).
        text = [
            self.index[f"t:{name}"]
            for name in self.arm_features.get(arm_id, {})
            if f"t:{name}" in self.index
        ]
        own = np.asarray(self._own.get(arm_id, []) + text, dtype=np.intp)
        block = np.unique(np.concatenate([need, own]))
        if self._fit is None:
            cov = np.diag(self.v0[block])
        else:
            xc, curvature, _, _ = self._fit
            inside = block[block < xc.shape[1]]
            xb = xc[:, inside]
            precision = np.diag(1.0 / self.v0[block])
            at = np.searchsorted(block, inside)
            precision[np.ix_(at, at)] += (xb.T @ xb.multiply(curvature[:, None])).toarray()
            cov = np.linalg.inv(precision)
        self._blocks[arm_id] = (block, cov)
        return block, cov

    # -- prediction --------------------------------------------------------------------
    def scores(self, context: Features) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of each creative's own score (shared features left out)."""
        mean, var = self._scores([self.items(context)])
        return mean[0], var[0]

    def _scores(self, contexts: Sequence[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray]:
        # Features first (a new context or creative adds some), then the fit.
        vectors = [
            self._vector(items, arm_id, shared=False)
            for items in contexts
            for arm_id in self.arm_ids
        ]
        self.fit()
        # One gather over every (context, creative) feature vector: the decision asks
        # for dozens of contexts at once, and numpy's per-call overhead dominates.
        sizes = np.array([idx.size for idx, _ in vectors], dtype=np.intp)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        idx = np.concatenate([i for i, _ in vectors])
        x = np.concatenate([v for _, v in vectors])
        shape = (len(contexts), self.n_arms)
        mean = np.add.reduceat(self.m[idx] * x, starts).reshape(shape)
        var = np.empty(shape)
        for a, arm_id in enumerate(self.arm_ids):
            mine = vectors[a :: self.n_arms]
            block, cov = self._covariance(arm_id, np.concatenate([i for i, _ in mine]))
            dense = np.zeros((len(contexts), block.size))
            for c, (i, v) in enumerate(mine):
                np.add.at(dense[c], np.searchsorted(block, i), v)
            var[:, a] = np.einsum("cb,bd,cd->c", dense, cov, dense)
        return mean, np.maximum(var, 1e-12)

    def ctr(self, context: Features) -> np.ndarray:
        """Posterior-mean click probability of each creative (probit approximation)."""
        items = self.items(context)
        vectors = [self._vector(items, arm_id) for arm_id in self.arm_ids]
        self.fit()
        out = np.empty(self.n_arms)
        for a, (idx, x) in enumerate(vectors):
            mu = self.m[idx] @ x
            var = (self.v[idx] * x) @ x
            out[a] = 1.0 / (1.0 + math.exp(-mu / math.sqrt(1.0 + math.pi * var / 8.0)))
        return out

    def serving_probabilities(self, context: Features) -> np.ndarray:
        """P(each creative has the highest sampled score): Thompson sampling's
        distribution for this context, deterministic (quadrature)."""
        if not self.arm_ids:
            return np.zeros(0)
        mean, var = self.scores(context)
        return p_best_normal(mean[None, :], var[None, :])[0]

    def serving_table(self, contexts: Sequence[Features]) -> np.ndarray:
        """``serving_probabilities`` for many contexts at once: (contexts, arms)."""
        if not contexts or not self.arm_ids:
            return np.zeros((len(contexts), self.n_arms))
        mean, var = self._scores([self.items(c) for c in contexts])
        return p_best_normal(mean, var)

    def predict_one(self, context: Features, rng: np.random.Generator) -> tuple[int, float]:
        p = self.serving_probabilities(context)
        arm = int(rng.choice(self.n_arms, p=p))
        return arm, float(p[arm])

    # -- explanation -------------------------------------------------------------------
    def effects(self, arm_id: str, top: int = 3) -> dict[str, float]:
        """The context items that move this creative's score most, against the average
        creative: ``{"device=mobile": +0.41, ...}`` in logit units (posterior means)."""
        self.fit()
        prefix = f"@{arm_id}|"
        own = {
            name[len(prefix) :]: float(self.m[i])
            for name, i in self.index.items()
            if name.startswith(prefix)
        }
        if not own:
            return {}
        # The same item's average weight over creatives: an effect every creative has
        # in that context is not this one's strength.
        others: dict[str, list[float]] = {}
        for other in self.arm_ids:
            p = f"@{other}|"
            for item in own:
                i = self.index.get(p + item)
                if i is not None:
                    others.setdefault(item, []).append(float(self.m[i]))
        relative = {item: w - float(np.mean(others.get(item, [w]))) for item, w in own.items()}
        ranked = sorted(relative.items(), key=lambda kv: -abs(kv[1]))[:top]
        return {item: round(w, 4) for item, w in ranked}

    # -- state -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """A JSON header (features, creatives, counts, priors) and the fitted weights."""
        n = len(self.names)
        header = json.dumps(
            {
                "names": self.names,
                "arm_ids": self.arm_ids,
                "arm_features": self.arm_features,
                "config": self.config,
                "learned": self.learned,
                # Sufficient statistics: (context items, creative, impressions, clicks).
                "stats": [[list(items), arm, r[0], r[1]] for (items, arm), r in self.stats.items()],
                "fitted": self._fitted,
            },
            separators=(",", ":"),
        ).encode()
        return len(header).to_bytes(4, "big") + header + self.m[:n].astype("<f8").tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LogisticThompson:
        size = int.from_bytes(raw[:4], "big")
        state = json.loads(raw[4 : 4 + size])
        model = cls(**state["config"])
        model.arm_features = {k: dict(v) for k, v in state["arm_features"].items()}
        # Features in their stored order; priors are a function of the name.
        for name in state["names"]:
            model._feature(name)
        fitted = np.frombuffer(raw[4 + size :], dtype="<f8")
        model.m[: fitted.size] = fitted
        model.arm_ids = list(state["arm_ids"])
        model.learned = list(state["learned"])
        model.stats = {(tuple(items), arm): [n, k] for items, arm, n, k in state["stats"]}
        # The variances follow from the fit: recomputed on first use (from the stored
        # weights when they were the fit of these counts, else by fitting again from
        # them as a warm start).
        model._fitted = not model.stats
        model._restored_fit = bool(state["fitted"] and model.stats)
        return model


def _sigmoid(s: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * s))


def p_best_normal(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """P(arm a has the largest of independent N(mean, var) scores), per row:
    ``E_{s ~ N(μ_a, σ_a²)} Π_{b≠a} Φ((s - μ_b) / σ_b)`` by Gauss-Hermite quadrature.
    ``mean``, ``var``: (rows, arms). Rows sum to 1."""
    rows, arms = mean.shape
    if arms == 1:
        return np.ones((rows, 1))
    sd = np.sqrt(np.maximum(var, 1e-12))
    if arms > 8:
        # Arms that some other arm beats with certainty (6 sd apart) have P(best) ≈ 0
        # and never change another arm's: leave them out of the arms² quadrature.
        bar = (mean - 6.0 * sd).max(axis=1, keepdims=True)
        alive = mean + 6.0 * sd >= bar
        if not alive.all():
            out = np.zeros((rows, arms))
            for r in range(rows):
                keep = np.flatnonzero(alive[r])
                out[r, keep] = p_best_normal(mean[r : r + 1, keep], var[r : r + 1, keep])[0]
            return out
    # s[r, a, q]: node q of arm a's score distribution.
    s = mean[:, :, None] + sd[:, :, None] * _GH_Z[None, None, :]
    # log Φ((s[r, a, q] - μ_b) / σ_b) for every b: (rows, a, b, q).
    z = (s[:, :, None, :] - mean[:, None, :, None]) / sd[:, None, :, None]
    log_cdf = log_ndtr(z)
    eye = np.eye(arms, dtype=bool)[None, :, :, None]
    log_cdf = np.where(eye, 0.0, log_cdf)
    p = np.exp(log_cdf.sum(axis=2)) @ _GH_W
    total = p.sum(axis=1, keepdims=True)
    return p / np.where(total > 0, total, 1.0)

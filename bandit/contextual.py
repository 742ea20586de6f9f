"""Contextual policies over context features × creative features.

Two learners behind one interface (``ContextualLearner``): Vowpal Wabbit here, and
Thompson sampling on a Bayesian logistic model in :mod:`bandit.linear_ts`. Both learn
from counts (an increment of ``n`` impressions of one creative in one context, with
``k`` clicks, is one example), give a serving distribution per context, and keep their
state in bytes (``learner_to_bytes`` / ``learner_from_bytes``, tagged by kind).

Vowpal Wabbit:

``cb_explore_adf`` (contextual bandit with action-dependent features) through
``vowpal-wabbit-next``: the context (audience, placement, device, hour, ...) goes in a
shared namespace ``c``, each creative's features (its id and whatever describes it:
theme, length, predicted CTR bucket) in namespace ``a``, and ``-q ca`` lets the model
learn which creative suits which context. The model is a byte string
(:meth:`to_bytes`), which the stream keeps in its table store, so it survives restarts.

Rewards are clicks (cost -1) and non-clicks (cost 0); propensities are the logged
probabilities of the shown creative, which VW needs for its importance weighting.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import vowpal_wabbit_next as vw

from adloop.bandit.linear_ts import LogisticThompson

__all__ = [
    "LEARNERS",
    "ContextualLearner",
    "VowpalContextual",
    "learner_from_bytes",
    "learner_to_bytes",
    "make_learner",
    "project_embedding",
    "word_features",
]

Features = Mapping[str, str | int | float | bool]
_UNSAFE = re.compile(r"[\s|:]+")


def _feature_text(features: Features) -> str:
    """VW text-format features: strings become indicator features, numbers real-valued."""
    parts = []
    for key, value in features.items():
        name = _UNSAFE.sub("_", str(key))
        if isinstance(value, bool | str):
            parts.append(f"{name}={_UNSAFE.sub('_', str(value))}")
        else:
            parts.append(f"{name}:{float(value):.6g}")
    return " ".join(parts)


class VowpalContextual:
    name = "vw_contextual"

    def __init__(
        self,
        # ε-greedy over VW's cost regression: unlike --squarecb it honours the
        # importance weights that learn_counts folds the stream's counts into.
        vw_args: Sequence[str] = ("--cb_explore_adf", "--epsilon", "0.05", "-q", "ca"),
        seed: int = 0,
        model: bytes | None = None,
        arm_ids: Sequence[str] = (),
        arm_features: Mapping[str, Features] | None = None,
    ) -> None:
        self.vw_args = list(vw_args)
        self.seed = int(seed)
        args = [*self.vw_args, "--quiet", "--random_seed", str(self.seed)]
        self._ws = vw.Workspace(args, model_data=model) if model else vw.Workspace(args)
        self._parser = vw.TextFormatParser(self._ws)
        self.arm_ids: list[str] = list(arm_ids)
        self.arm_features: dict[str, dict[str, Any]] = {
            a: dict((arm_features or {}).get(a, {})) for a in self.arm_ids
        }
        self._action_lines: list[str] = [self._action_line(a) for a in self.arm_ids]
        self.learned = [0.0, 0.0]  # impressions, clicks learned

    @property
    def n_arms(self) -> int:
        return len(self.arm_ids)

    def _action_line(self, arm_id: str) -> str:
        features = {"id": arm_id, **self.arm_features.get(arm_id, {})}
        return f"|a {_feature_text(features)}"

    def add_arm(self, arm_id: str, features: Features | None = None) -> int:
        if arm_id not in self.arm_ids:
            self.arm_ids.append(arm_id)
            self.arm_features[arm_id] = dict(features or {})
            self._action_lines.append(self._action_line(arm_id))
        return self.arm_ids.index(arm_id)

    def remove_arm(self, arm_id: str) -> None:
        i = self.arm_ids.index(arm_id)
        del self.arm_ids[i]
        del self._action_lines[i]
        self.arm_features.pop(arm_id, None)

    def _examples(self, context: Features, label: tuple[int, float, float] | None = None):
        lines = [f"shared |c {_feature_text(context)}"]
        for i, line in enumerate(self._action_lines):
            if label is not None and i == label[0]:
                lines.append(f"0:{label[1]:.6g}:{label[2]:.6g} {line}")
            else:
                lines.append(line)
        return [self._parser.parse_line(line) for line in lines]

    def serving_probabilities(self, context: Features) -> np.ndarray:
        """VW's exploration distribution over the arms for this context."""
        p = np.zeros(self.n_arms)
        if not self.arm_ids:
            return p
        for action, prob in self._ws.predict_one(self._examples(context)):
            p[action] = prob
        return p / p.sum()

    def predict_one(self, context: Features, rng: np.random.Generator) -> tuple[int, float]:
        """A choice and its propensity."""
        p = self.serving_probabilities(context)
        arm = int(rng.choice(self.n_arms, p=p))
        return arm, float(p[arm])

    def learn_one(self, context: Features, arm: int, clicked: bool, propensity: float) -> None:
        cost = -1.0 if clicked else 0.0
        self._ws.learn_one(self._examples(context, (arm, cost, max(propensity, 1e-6))))

    def learn_counts(
        self,
        context: Features,
        arm: int | str,
        clicks: float,
        non_clicks: float,
        propensity: float = 1.0,
    ) -> None:
        """Learn aggregated outcomes (the stream's increments) as one example.

        The cost regression under ``cb_explore_adf`` is least squares, and
        ``sum w (y_i - f)^2`` equals ``W (mean(y) - f)^2`` plus a constant: so
        ``n`` outcomes weigh as one example whose cost is their mean (minus the
        click rate) and whose importance weight is ``n`` times larger. VW's
        importance weight for a CB example is 1/probability, so the count is folded
        into the probability. (Learning the clicks and the non-clicks as two
        examples instead let the second, heavier one overwrite the first whenever an
        increment was large, and the model forgot which creative earned clicks.)
        """
        clicks, non_clicks = float(clicks), float(non_clicks)
        if not (math.isfinite(clicks) and math.isfinite(non_clicks)):
            raise ValueError("clicks and non_clicks must be finite")
        if clicks < 0 or non_clicks < 0:
            raise ValueError("clicks and non_clicks must be non-negative")
        total = clicks + non_clicks
        if total == 0:
            return
        if isinstance(arm, str):
            arm = self.arm_ids.index(arm)
        p = max(float(propensity), 1e-6)
        cost = -clicks / total
        self._ws.learn_one(self._examples(context, (arm, cost, p / total)))
        self.learned[0] += total
        self.learned[1] += float(clicks)

    def learn_increment(
        self, context: Features, arm: int | str, impressions: float, clicks: float
    ) -> None:
        """The stream's increment: ``clicks`` clicks and the rest of ``impressions`` as
        non-clicks. A click counted after its impression was learned as a non-click
        cannot be unlearned by an online learner: it is learned as one more click, so VW
        sees a few more trials than there were impressions (``learned`` keeps the
        counts)."""
        if impressions <= 0 and clicks <= 0:
            return
        before = list(self.learned)
        self.learn_counts(context, arm, clicks, max(impressions - clicks, 0.0))
        self.learned = [before[0] + impressions, before[1] + clicks]

    def serving_table(self, contexts: Sequence[Features]) -> np.ndarray:
        """``serving_probabilities`` for each context: (contexts, arms)."""
        out = np.zeros((len(contexts), self.n_arms))
        for i, context in enumerate(contexts):
            out[i] = self.serving_probabilities(context)
        return out

    def effects(self, arm_id: str, top: int = 3) -> dict[str, float]:
        """VW's hashed weights carry no names: explanations are the per-context
        choices (``serving_table``), not feature weights."""
        return {}

    def learn_many(
        self,
        contexts: Sequence[Features],
        arms: Sequence[int] | np.ndarray,
        clicks: Sequence[bool] | np.ndarray,
        propensities: Sequence[float] | np.ndarray,
    ) -> None:
        for context, arm, clicked, prop in zip(contexts, arms, clicks, propensities, strict=True):
            self.learn_one(context, int(arm), bool(clicked), float(prop))

    # -- state: model bytes plus the arm list (the table value in the stream) --------
    def to_bytes(self) -> bytes:
        header = json.dumps(
            {
                "vw_args": self.vw_args,
                "seed": self.seed,
                "arm_ids": self.arm_ids,
                "arm_features": self.arm_features,
                "learned": self.learned,
            }
        ).encode()
        return len(header).to_bytes(4, "big") + header + self._ws.serialize()

    @classmethod
    def from_bytes(cls, raw: bytes) -> VowpalContextual:
        size = int.from_bytes(raw[:4], "big")
        meta = json.loads(raw[4 : 4 + size])
        model = cls(
            vw_args=meta["vw_args"],
            seed=meta["seed"],
            model=raw[4 + size :],
            arm_ids=meta["arm_ids"],
            arm_features=meta["arm_features"],
        )
        model.learned = list(meta.get("learned", [0.0, 0.0]))
        return model


# -- the learners' common interface -----------------------------------------------------


class ContextualLearner(Protocol):
    """What the stream needs of a contextual learner (both classes here satisfy it)."""

    name: str
    arm_ids: list[str]
    learned: list[float]

    def add_arm(self, arm_id: str, features: Any = None) -> int: ...

    def remove_arm(self, arm_id: str) -> None: ...

    def learn_counts(
        self,
        context: Features,
        arm: int | str,
        clicks: float,
        non_clicks: float,
        propensity: float = 1.0,
    ) -> None: ...

    def learn_increment(
        self, context: Features, arm: int | str, impressions: float, clicks: float
    ) -> None: ...

    def serving_probabilities(self, context: Features) -> np.ndarray: ...

    def serving_table(self, contexts: Sequence[Features]) -> np.ndarray: ...

    def effects(self, arm_id: str, top: int = 3) -> dict[str, float]: ...

    def to_bytes(self) -> bytes: ...


#: ``ADLOOP_CONTEXT_LEARNER`` values.
LEARNERS = ("logistic_ts", "vw")
_TAGS = {"logistic_ts": b"T1", "vw": b"V1"}


def make_learner(kind: str, seed: int = 0) -> ContextualLearner:
    """A fresh learner: ``logistic_ts`` (Thompson sampling on a Bayesian logistic
    model) or ``vw`` (Vowpal Wabbit ``cb_explore_adf``, ε-greedy)."""
    if kind == "logistic_ts":
        return LogisticThompson()
    if kind == "vw":
        return VowpalContextual(seed=seed)
    raise ValueError(f"unknown contextual learner {kind!r}; choose one of {', '.join(LEARNERS)}")


def learner_kind(learner: ContextualLearner) -> str:
    return "vw" if isinstance(learner, VowpalContextual) else "logistic_ts"


def learner_to_bytes(learner: ContextualLearner) -> bytes:
    """The learner's state with a tag saying which kind it is."""
    return _TAGS[learner_kind(learner)] + learner.to_bytes()


def learner_from_bytes(raw: bytes) -> ContextualLearner:
    tag, body = raw[:2], raw[2:]
    if tag == _TAGS["logistic_ts"]:
        return LogisticThompson.from_bytes(body)
    if tag == _TAGS["vw"]:
        return VowpalContextual.from_bytes(body)
    raise ValueError(f"unknown contextual model tag {tag!r}")


# -- creative features ------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9%]+")
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "our",
        "the",
        "to",
        "with",
        "you",
        "your",
    ]
)


def word_features(text: str, limit: int = 12) -> dict[str, float]:
    """A creative's words as features (``w_<word>`` = 1): creatives that share words
    share what those words earned, so a new variant starts from its relatives.
    Lower-cased, stop words out, the first ``limit`` distinct words."""
    out: dict[str, float] = {}
    for word in _WORD.findall(text.lower()):
        if word in _STOPWORDS or len(word) < 2:
            continue
        out[f"w_{word}"] = 1.0
        if len(out) >= limit:
            break
    return out


def project_embedding(vector: Sequence[float] | np.ndarray, dims: int = 8) -> dict[str, float]:
    """A sentence embedding reduced to ``dims`` features by a fixed random projection
    (seeded: the same in every process and release), unit length: ``e0``..``e7``."""
    v = np.asarray(vector, dtype=np.float64)
    rng = np.random.default_rng(20240611 + v.size)
    projection = rng.standard_normal((v.size, dims)) / np.sqrt(dims)
    z = v @ projection
    norm = float(np.linalg.norm(z)) or 1.0
    return {f"e{i}": round(float(x / norm), 6) for i, x in enumerate(z)}

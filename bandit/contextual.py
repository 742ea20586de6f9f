"""Contextual policy over context features × creative features, on Vowpal Wabbit.

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
from typing import Any

import numpy as np
import vowpal_wabbit_next as vw

__all__ = ["VowpalContextual"]

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
        arm: int,
        clicks: float,
        non_clicks: float,
        propensity: float,
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
        p = max(float(propensity), 1e-6)
        cost = -clicks / total
        self._ws.learn_one(self._examples(context, (arm, cost, p / total)))

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
            }
        ).encode()
        return len(header).to_bytes(4, "big") + header + self._ws.serialize()

    @classmethod
    def from_bytes(cls, raw: bytes) -> VowpalContextual:
        size = int.from_bytes(raw[:4], "big")
        meta = json.loads(raw[4 : 4 + size])
        return cls(
            vw_args=meta["vw_args"],
            seed=meta["seed"],
            model=raw[4 + size :],
            arm_ids=meta["arm_ids"],
            arm_features=meta["arm_features"],
        )

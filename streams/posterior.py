"""Pure logic of the posterior table: merge outcome snapshots, build decisions.

No Faust, no Kafka: the agent in ``streams.app`` is a thin adapter around this.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import numpy as np

from bandit import BetaArms, BetaPrior
from schemas import (
    Creative,
    CreativeCounts,
    Decision,
    OutcomeSnapshot,
    RankedCreative,
)

DEFAULT_PRIOR_STRENGTH = 20.0


class PosteriorState(msgspec.Struct):
    """Table value for one campaign x audience.

    ``sources[p]`` is the latest cumulative snapshot from ingest partition ``p``;
    the totals are their sum. Replacing (never adding) is what makes re-delivered
    or re-emitted snapshots harmless.
    """

    sources: dict[int, dict[str, dict[str, CreativeCounts]]] = {}
    last_event_at: float = 0.0

    def apply(self, snapshot: OutcomeSnapshot) -> None:
        self.sources.update(snapshot.sources)
        self.last_event_at = max(self.last_event_at, snapshot.last_event_at)

    def totals(self) -> dict[str, CreativeCounts]:
        """Counts per creative, summed over source partitions and placements."""
        out: dict[str, CreativeCounts] = {}
        for by_creative in self.sources.values():
            for creative_id, by_placement in by_creative.items():
                total = out.setdefault(creative_id, CreativeCounts())
                for cell in by_placement.values():
                    total.impressions += cell.impressions
                    total.clicks += cell.clicks
                    total.conversions += cell.conversions
                    total.conversion_value += cell.conversion_value
        return out

    def by_placement(self) -> dict[tuple[str, str], CreativeCounts]:
        """Counts per (creative, placement), summed over source partitions."""
        out: dict[tuple[str, str], CreativeCounts] = {}
        for by_creative in self.sources.values():
            for creative_id, by_placement in by_creative.items():
                for placement, cell in by_placement.items():
                    total = out.setdefault((creative_id, placement), CreativeCounts())
                    total.impressions += cell.impressions
                    total.clicks += cell.clicks
                    total.conversions += cell.conversions
                    total.conversion_value += cell.conversion_value
        return out


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(PosteriorState)


def encode_state(state: PosteriorState) -> bytes:
    return _state_encoder.encode(state)


def decode_state(raw: bytes | None) -> PosteriorState:
    return _state_decoder.decode(raw) if raw else PosteriorState()


def prior_for(creative: Creative | None) -> BetaPrior:
    """The creative's informative prior when it has a predicted CTR, else uniform."""
    if creative is None or creative.predicted_ctr is None:
        return BetaPrior()
    return BetaPrior.from_mean(
        creative.predicted_ctr, creative.prior_strength or DEFAULT_PRIOR_STRENGTH
    )


def with_exploration_floor(probabilities: np.ndarray, floor: float) -> np.ndarray:
    """Mix in ``floor`` of uniform traffic so every servable arm keeps a propensity > 0.

    Logged propensities must be positive for off-policy evaluation to work.
    """
    n = probabilities.size
    if n == 0 or floor <= 0:
        return probabilities
    return (1.0 - floor) * probabilities + floor / n


def build_arms(servable: Iterable[Creative], totals: dict[str, CreativeCounts]) -> BetaArms:
    arms = BetaArms.empty()
    for creative in servable:
        arms.add_arm(creative.creative_id, prior_for(creative))
        counts = totals.get(creative.creative_id)
        if counts is not None:
            arms.set_counts(creative.creative_id, counts.impressions, counts.clicks)
    return arms


def _ranked(
    arms: BetaArms, totals: dict[str, CreativeCounts], probabilities: np.ndarray
) -> list[RankedCreative]:
    """Arms as decision rows, best posterior mean first."""
    means = arms.mean()
    low, high = arms.credible_interval(0.95)
    rows = []
    for i in np.argsort(-means, kind="stable"):
        creative_id = arms.arm_ids[int(i)]
        counts = totals.get(creative_id, CreativeCounts())
        rows.append(
            RankedCreative(
                creative_id=creative_id,
                impressions=counts.impressions,
                clicks=counts.clicks,
                conversions=counts.conversions,
                alpha=float(arms.alpha[i]),
                beta=float(arms.beta[i]),
                mean=float(means[i]),
                ci_low=float(low[i]),
                ci_high=float(high[i]),
                serving_probability=float(probabilities[i]),
            )
        )
    return rows


def build_decision(
    campaign: str,
    audience: str,
    state: PosteriorState,
    servable: list[Creative],
    registry_lookup: dict[str, Creative],
    rng: np.random.Generator,
    now: float,
    exploration_floor: float = 0.01,
    draws: int = 4000,
) -> Decision:
    """Rank the servable creatives; non-servable ones with traffic follow, at probability 0."""
    totals = state.totals()
    arms = build_arms(servable, totals)
    ranked: list[RankedCreative] = []
    if arms.arm_ids:
        probabilities = with_exploration_floor(
            arms.selection_probabilities(rng, draws=draws), exploration_floor
        )
        ranked = _ranked(arms, totals, probabilities)
    # Creatives with traffic that are not servable (paused, retired, or not yet
    # known to this process's registry) keep their counts in the decision.
    servable_ids = set(arms.arm_ids)
    others = [cid for cid in sorted(totals) if cid not in servable_ids]
    if others:
        extra = BetaArms.empty()
        for cid in others:
            extra.add_arm(cid, prior_for(registry_lookup.get(cid)))
            extra.set_counts(cid, totals[cid].impressions, totals[cid].clicks)
        ranked += _ranked(extra, totals, np.zeros(len(extra.arm_ids)))
    return Decision(
        campaign=campaign,
        audience=audience,
        best_creative_id=ranked[0].creative_id if arms.arm_ids else None,
        creatives=ranked,
        impressions=sum(c.impressions for c in totals.values()),
        clicks=sum(c.clicks for c in totals.values()),
        updated_at=now,
        last_event_at=state.last_event_at,
    )

"""Pure logic of the posterior table: merge outcome snapshots, build decisions.

No Faust, no Kafka: the agent in ``streams.worker`` is a thin adapter around this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import numpy as np

from adloop.bandit import BetaArms, BetaPrior, CreativeEngine, EngineConfig
from adloop.bandit.contextual import ContextualLearner
from adloop.schemas import (
    Creative,
    CreativeCounts,
    Decision,
    OutcomeSnapshot,
    RankedCreative,
)
from adloop.streams import context as ctx

DEFAULT_PRIOR_STRENGTH = 20.0
log = logging.getLogger("adloop.posterior")


# creative_id -> placement -> (impressions, clicks) added by one snapshot
Increments = dict[str, dict[str, tuple[int, int]]]


class PosteriorState(msgspec.Struct):
    """Table value for one campaign x audience.

    ``sources[p]`` is the latest cumulative snapshot from ingest partition ``p``;
    the totals are their sum. Replacing (never adding) is what makes re-delivered
    or re-emitted snapshots harmless. ``engine`` is the bandit engine's state
    (:meth:`bandit.CreativeEngine.to_dict`): the policy's view of the same evidence,
    discounted, with change detection, fed with the increments between snapshots.
    """

    sources: dict[int, dict[str, dict[str, CreativeCounts]]] = {}
    last_event_at: float = 0.0
    engine: dict[str, Any] | None = None
    # ADLOOP_POLICY=contextual: the context-cell rows learned (the largest cumulative
    # counts seen per source partition and row, streams/context.py) and the model that
    # learned exactly them, in one table value so they are written together.
    context_rows: dict[int, dict[str, list[int]]] = {}
    context_model: bytes | None = None

    def apply_contexts(self, snapshot: OutcomeSnapshot) -> list[ctx.Increment]:
        """Take the snapshot's context-cell rows; returns what they add per row."""
        return ctx.merge_rows(self.context_rows, snapshot.contexts) if snapshot.contexts else []

    def apply(self, snapshot: OutcomeSnapshot) -> Increments:
        """Take the snapshot's sources; returns what it added, per creative and placement.

        A source snapshot with fewer events than the one held is older (a re-delivery,
        or an ingest re-counting after a restart) and is skipped: the cumulative counts
        of one source never go down, so the increments are never negative.
        """
        increments: Increments = {}
        for partition, by_creative in snapshot.sources.items():
            old = self.sources.get(partition, {})
            if _events(by_creative) < _events(old):
                continue
            for creative_id, by_placement in by_creative.items():
                old_cells = old.get(creative_id, {})
                for placement, cell in by_placement.items():
                    before = old_cells.get(placement)
                    d_imps = cell.impressions - (before.impressions if before else 0)
                    d_clicks = cell.clicks - (before.clicks if before else 0)
                    if d_imps or d_clicks:
                        by = increments.setdefault(creative_id, {})
                        imps, clicks = by.get(placement, (0, 0))
                        by[placement] = (imps + d_imps, clicks + d_clicks)
            self.sources[partition] = by_creative
        self.last_event_at = max(self.last_event_at, snapshot.last_event_at)
        return increments

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


def _sum_cells(by_placement: dict[str, CreativeCounts]) -> tuple[int, int]:
    imps = clicks = 0
    for cell in by_placement.values():
        imps += cell.impressions
        clicks += cell.clicks
    return imps, clicks


def _events(by_creative: dict[str, dict[str, CreativeCounts]]) -> int:
    return sum(
        cell.impressions + cell.clicks + cell.conversions
        for by_placement in by_creative.values()
        for cell in by_placement.values()
    )


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
    """Arms as decision rows, best posterior mean first (for non-servable creatives)."""
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


PriorOf = Callable[[str], BetaPrior]


def engine_for(state: PosteriorState, config: EngineConfig, prior_of: PriorOf) -> CreativeEngine:
    """The key's engine, rebuilt from the exact totals when absent or configured differently.

    A rebuild (first snapshot of a key, state from an older version, or a changed
    ``ADLOOP_POLICY``/half-life) starts the policy from the totals as if they were all
    observed at the newest event: the discount history is lost, the counts are not.
    Creatives with totals that the engine lacks are added with their totals.
    """
    totals = state.totals()
    engine = CreativeEngine.from_dict(state.engine) if state.engine is not None else None
    if engine is not None and engine.config != config:
        log.info(
            "policy configuration changed: rebuilding the engine from exact totals",
            extra={"policy": config.policy},
        )
        engine = None
    if engine is None:
        engine = CreativeEngine(config)
    missing = sorted(totals.keys() - set(engine.arm_ids))
    if missing:
        arms = np.array([engine.add_arm(cid, prior_of(cid)) for cid in missing])
        engine.learn_many(
            arms,
            np.array([totals[cid].impressions for cid in missing]),
            np.array([totals[cid].clicks for cid in missing]),
            t=state.last_event_at or None,
        )
    return engine


def learn_increments(
    state: PosteriorState,
    increments: Increments,
    config: EngineConfig,
    prior_of: PriorOf,
    t: float | None,
) -> list[str]:
    """Feed a snapshot's increments to the key's engine; returns the alarms' reasons.

    Call after ``state.apply(snapshot)``, with what it returned.
    """
    engine = CreativeEngine.from_dict(state.engine) if state.engine is not None else None
    if engine is None or engine.config != config:
        # A rebuild from the totals (first snapshot of the key, or a new configuration)
        # already holds the increments.
        state.engine = engine_for(state, config, prior_of).to_dict()
        return []
    reasons: list[str] = []
    if increments:
        ids = sorted(increments)
        arms = np.array([engine.add_arm(cid, prior_of(cid)) for cid in ids])
        sums = [
            (
                sum(i for i, _ in increments[cid].values()),
                sum(c for _, c in increments[cid].values()),
            )
            for cid in ids
        ]
        imps = np.array([x[0] for x in sums], dtype=np.float64)
        clicks = np.array([x[1] for x in sums], dtype=np.float64)
        for alarm in engine.learn_many(arms, imps, clicks, t=t or None):
            reasons.append(f"{engine.arm_ids[alarm.arm]}: {alarm.reason()}")
    state.engine = engine.to_dict()
    return reasons


def learn_contexts(
    state: PosteriorState,
    snapshot: OutcomeSnapshot,
    setup: ctx.ContextSetup,
    model: ContextualLearner | None = None,
) -> ContextualLearner:
    """Merge the snapshot's context-cell rows and teach the key's model what they add.

    ``model``: the deserialized model of ``state`` when the caller kept it (the worker
    caches models between snapshots); the returned model is the state's, already
    written into ``state.context_model``.
    """
    if model is None:
        model = ctx.load_model(state.context_model, setup.learner)
        if (
            state.context_model is None
            or ctx.learner_kind(model) != setup.learner
            or (not model.learned[0] and state.context_rows)
        ):
            # New, or another learner configured: it learns every row held so far.
            model = ctx.make_learner(setup.learner)
            ctx.relearn_totals(model, state.context_rows, setup.features_of)
    increments = state.apply_contexts(snapshot)
    if increments:
        ctx.learn_rows(model, increments, setup.features_of)
    if increments or state.context_model is None:
        state.context_model = ctx.dumps(model)
    return model


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
    engine_config: EngineConfig | None = None,
    prior_of: PriorOf | None = None,
    context: ctx.ContextSetup | None = None,
    context_model: ContextualLearner | None = None,
) -> Decision:
    """Rank the servable creatives; non-servable ones with traffic follow, at probability 0.

    ``context``: the contextual policy's setup; ``context_model``: the state's model
    when the caller keeps it deserialized (else it is read from the state).
    """
    config = engine_config or EngineConfig(exploration_floor=exploration_floor, draws=draws)
    if prior_of is None:

        def prior_of(creative_id: str) -> BetaPrior:
            return prior_for(registry_lookup.get(creative_id))

    totals = state.totals()
    engine = engine_for(state, config, prior_of)
    servable_ids = [c.creative_id for c in servable]
    for creative_id in set(engine.arm_ids) - set(servable_ids):
        engine.remove_arm(creative_id)
    for creative_id in servable_ids:
        engine.add_arm(creative_id, prior_of(creative_id))
    total_imps = sum(c.impressions for c in totals.values())
    placements: dict[str, dict[str, float]] = {}
    audience_probability: dict[str, float] = {}
    compiled: ctx.Compiled | None = None
    if context is not None and state.context_model and servable_ids:
        by_placement = state.by_placement()
        compiled = ctx.compile_policy(
            context_model or ctx.load_model(state.context_model, context.learner),
            state.context_rows,
            sorted({pl for _, pl in by_placement}),
            servable_ids,
            context.features_of,
            config.exploration_floor,
            context.features,
        )
        placements = compiled.placements
        if placements:
            # The audience-level share: placements weighted by their traffic.
            traffic: dict[str, int] = {}
            for (_, pl), c in by_placement.items():
                traffic[pl] = traffic.get(pl, 0) + c.impressions
            weights = {pl: traffic.get(pl, 0) for pl in placements}
            if not any(weights.values()):
                weights = dict.fromkeys(placements, 1)
            norm = sum(weights.values())
            for placement, probs in placements.items():
                for cid, prob in probs.items():
                    audience_probability[cid] = (
                        audience_probability.get(cid, 0.0) + prob * weights[placement] / norm
                    )
    ranked: list[RankedCreative] = []
    for row in sorted(engine.report(rng), key=lambda r: -r.mean):
        counts = totals.get(row.creative_id, CreativeCounts())
        i = engine.policy.stats.index(row.creative_id)
        ranked.append(
            RankedCreative(
                creative_id=row.creative_id,
                impressions=counts.impressions,
                clicks=counts.clicks,
                conversions=counts.conversions,
                alpha=float(engine.policy.stats.alpha[i]),
                beta=float(engine.policy.stats.beta[i]),
                mean=row.mean,
                ci_low=row.ci_low,
                ci_high=row.ci_high,
                serving_probability=audience_probability.get(
                    row.creative_id, row.serving_probability
                ),
                label=row.label,
                p_best=row.p_best,
                expected_loss=row.expected_loss,
                traffic_share=counts.impressions / total_imps if total_imps else 0.0,
                underperforming=row.verdict.underperforming,
                reasons=list(row.verdict.reasons),
                wins_in=compiled.wins.get(row.creative_id, []) if compiled else [],
                context_effects=compiled.effects.get(row.creative_id, {}) if compiled else {},
            )
        )
    # Creatives with traffic that are not servable (paused, retired, or not yet
    # known to this process's registry) keep their exact counts in the decision.
    servable_set = set(servable_ids)
    others = [cid for cid in sorted(totals) if cid not in servable_set]
    if others:
        extra = BetaArms.empty()
        for cid in others:
            extra.add_arm(cid, prior_for(registry_lookup.get(cid)))
            extra.set_counts(cid, totals[cid].impressions, totals[cid].clicks)
        for row in _ranked(extra, totals, np.zeros(len(extra.arm_ids))):
            known = registry_lookup.get(row.creative_id)
            row.label = known.status if known is not None else "unregistered"
            row.traffic_share = row.impressions / total_imps if total_imps else 0.0
            ranked.append(row)
    return Decision(
        campaign=campaign,
        audience=audience,
        best_creative_id=ranked[0].creative_id if servable_ids else None,
        creatives=ranked,
        impressions=total_imps,
        clicks=sum(c.clicks for c in totals.values()),
        updated_at=now,
        last_event_at=state.last_event_at,
        policy="contextual" if compiled is not None else config.policy,
        placements=placements,
        contextual=compiled.policy if compiled is not None else None,
    )

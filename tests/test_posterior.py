"""The worker's pure logic: snapshots in, engine increments, decisions out (no Kafka)."""

from __future__ import annotations

import numpy as np

from adloop.bandit import EngineConfig
from adloop.schemas import ContextRow, Creative, CreativeCounts, OutcomeSnapshot
from adloop.streams.context import ContextSetup
from adloop.streams.posterior import (
    PosteriorState,
    build_decision,
    decode_state,
    encode_state,
    learn_contexts,
    learn_increments,
    prior_for,
)


def snap(sources: dict[int, dict[str, tuple[int, int]]], t: float = 100.0) -> OutcomeSnapshot:
    return OutcomeSnapshot(
        campaign="spring",
        audience="students",
        sources={
            p: {cid: {"feed": CreativeCounts(i, c)} for cid, (i, c) in by.items()}
            for p, by in sources.items()
        },
        emitted_at=t,
        last_event_at=t,
    )


CREATIVES = {
    cid: Creative(creative_id=cid, campaign="spring", headline=f"headline {cid}")
    for cid in ("c1", "c2", "c3")
}


def feed(state: PosteriorState, snapshot: OutcomeSnapshot, config: EngineConfig) -> list[str]:
    increments = state.apply(snapshot)
    return learn_increments(
        state, increments, config, lambda cid: prior_for(CREATIVES.get(cid)), snapshot.last_event_at
    )


def test_increments_are_differences_and_stale_snapshots_are_skipped() -> None:
    state = PosteriorState()
    assert state.apply(snap({0: {"c1": (10, 1)}, 1: {"c2": (5, 0)}})) == {
        "c1": {"feed": (10, 1)},
        "c2": {"feed": (5, 0)},
    }
    assert state.apply(snap({0: {"c1": (15, 1), "c2": (3, 1)}})) == {
        "c1": {"feed": (5, 0)},
        "c2": {"feed": (3, 1)},
    }
    # A re-delivered older snapshot of partition 0 changes nothing...
    assert state.apply(snap({0: {"c1": (10, 1)}})) == {}
    # ...and the same snapshot twice adds nothing the second time.
    assert state.apply(snap({0: {"c1": (15, 1), "c2": (3, 1)}})) == {}
    totals = state.totals()
    assert (totals["c1"].impressions, totals["c2"].impressions, totals["c2"].clicks) == (15, 8, 1)


def test_engine_evidence_equals_exact_totals_without_discounting() -> None:
    config = EngineConfig(policy="thompson", detect_changes=False)
    state = PosteriorState()
    rng = np.random.default_rng(0)
    cum = {0: {"c1": [0, 0], "c2": [0, 0]}, 1: {"c1": [0, 0], "c2": [0, 0]}}
    for step in range(50):
        p = int(rng.integers(2))
        for cid in ("c1", "c2"):
            n = int(rng.integers(0, 40))
            cum[p][cid][0] += n
            cum[p][cid][1] += int(rng.binomial(n, 0.05))
        feed(state, snap({p: {c: tuple(v) for c, v in cum[p].items()}}, t=float(step)), config)
        if step % 7 == 0:  # re-deliveries
            feed(state, snap({p: {c: tuple(v) for c, v in cum[p].items()}}, t=float(step)), config)
    totals = state.totals()
    engine_stats = state.engine["policy"]["stats"]
    for i, cid in enumerate(engine_stats["arm_ids"]):
        assert engine_stats["impressions"][i] == totals[cid].impressions
        assert engine_stats["clicks"][i] == totals[cid].clicks


def test_decision_ranks_servable_creatives_and_keeps_retired_counts() -> None:
    config = EngineConfig(min_evidence=100)
    state = PosteriorState()
    feed(state, snap({0: {"c1": (2000, 200), "c2": (2000, 20), "c3": (500, 5)}}), config)
    retired = Creative(creative_id="c3", campaign="spring", headline="old", status="retired")
    lookup = {**CREATIVES, "c3": retired}
    decision = build_decision(
        "spring",
        "students",
        state,
        [CREATIVES["c1"], CREATIVES["c2"]],
        lookup,
        np.random.default_rng(1),
        now=200.0,
        engine_config=config,
    )
    rows = {r.creative_id: r for r in decision.creatives}
    assert decision.best_creative_id == "c1" and decision.policy == "discounted_thompson"
    assert rows["c1"].label == "best" and rows["c2"].label == "low"
    assert rows["c2"].underperforming
    assert rows["c3"].label == "retired" and rows["c3"].serving_probability == 0.0
    assert rows["c3"].impressions == 500
    assert abs(sum(r.serving_probability for r in decision.creatives) - 1.0) < 1e-9
    assert abs(rows["c1"].traffic_share - 2000 / 4500) < 1e-12


def test_contextual_policy_learns_which_creative_suits_which_placement() -> None:
    """Placement rows without context features (cell "-"), as the ingest sends them
    when impressions carry no context: the model learns placement x creative."""
    config = EngineConfig(min_evidence=100)
    setup = ContextSetup(learner="logistic_ts", features=("device",))
    state = PosteriorState()
    rng = np.random.default_rng(2)
    best = {"feed": "c1", "story": "c2"}
    cum: dict[str, dict[str, list[int]]] = {}
    shown: dict[str, dict[str, float]] = {}
    for step in range(60):
        # Exposures follow the published distribution, as serving does.
        for placement, winner in best.items():
            probs = shown.get(placement, {"c1": 0.5, "c2": 0.5})
            exposures = rng.multinomial(100, [probs["c1"], probs["c2"]])
            for cid, n in zip(("c1", "c2"), exposures, strict=True):
                k = int(rng.binomial(n, 0.15 if cid == winner else 0.02))
                cell = cum.setdefault(cid, {}).setdefault(placement, [0, 0])
                cell[0] += int(n)
                cell[1] += k
        snapshot = OutcomeSnapshot(
            campaign="spring",
            audience="students",
            sources={
                0: {
                    cid: {pl: CreativeCounts(*v) for pl, v in by.items()} for cid, by in cum.items()
                }
            },
            contexts={
                0: [
                    ContextRow("-", cid, pl, v[0], v[1])
                    for cid, by in cum.items()
                    for pl, v in by.items()
                ]
            },
            emitted_at=float(step),
            last_event_at=float(step),
        )
        increments = state.apply(snapshot)
        learn_increments(state, increments, config, lambda cid: prior_for(None), float(step))
        learn_contexts(state, snapshot, setup)
        decision = build_decision(
            "spring",
            "students",
            state,
            [CREATIVES["c1"], CREATIVES["c2"]],
            CREATIVES,
            np.random.default_rng(3),
            now=100.0,
            engine_config=config,
            context=setup,
        )
        shown = decision.placements
    assert decision.policy == "contextual"
    for placement, winner in best.items():
        assert decision.placements[placement][winner] > 0.9, decision.placements
    # Every counted impression and click was learned once, and the model is in the
    # table value: it survives the state's msgpack round trip.
    assert decision.contextual is not None
    assert decision.contextual.learned_impressions == sum(
        v[0] for by in cum.values() for v in by.values()
    )
    assert decision.contextual.learned_clicks == sum(
        v[1] for by in cum.values() for v in by.values()
    )
    assert decode_state(encode_state(state)).context_model == state.context_model

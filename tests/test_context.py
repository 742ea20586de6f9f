"""Context cells (streams/context.py): counted by the ingest's partition state, merged
and learned by the worker's pure logic, mapped the same way by serving. No Kafka."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from adloop.bandit.contextual import word_features
from adloop.schemas import (
    Click,
    ContextRow,
    ContextualPolicy,
    Creative,
    Impression,
    OutcomeSnapshot,
)
from adloop.schemas.privacy import PrivacyPolicy
from adloop.streams.config import Settings
from adloop.streams.context import (
    NO_FEATURES,
    OTHER,
    ContextCells,
    ContextSetup,
    RequestCells,
    merge_rows,
    parse_features,
    row_totals,
)
from adloop.streams.ingest import PartitionState, open_store
from adloop.streams.posterior import PosteriorState, build_decision, learn_contexts

NOW = float(int(time.time()))


def _imp(i: int, context: dict, creative: str = "c1", audience: str = "students") -> Impression:
    return Impression(
        impression_id=f"i{i}",
        timestamp=NOW - 100 + i * 0.001,
        campaign="spring",
        audience=audience,
        placement="feed",
        creative_id=creative,
        propensity=0.5,
        policy="test",
        context=context,
    )


# -- cells --------------------------------------------------------------------------------


def test_a_cell_is_the_cleaned_features_in_canonical_form() -> None:
    privacy = PrivacyPolicy(
        context_keys=("device", "hour"),
        personal_fields=frozenset({"user_id"}),
        keys={"1": b"0123456789abcdef0123"},
    )
    cells = ContextCells(parse_features("device,hour/6,region,user_id"), privacy)
    # Bucketed hour, lower-cased values; region is not allow-listed: never part of a cell.
    assert cells.cell({"hour": 13, "device": "Mobile", "region": "x"}) == "device=mobile,hour=12"
    assert cells.cell({"hour": "23.5"}) == "hour=18"
    assert cells.cell({"browser": "firefox"}) == NO_FEATURES
    # A personal field forms a cell only as its keyed hash, never its value.
    cell = cells.cell({"user_id": "alice@example.com"})
    assert "alice" not in cell and cell == f"user_id={privacy.pseudonym('alice@example.com')}"
    # Characters that separate cells, rows and keys never appear inside a value.
    assert cells.cell({"device": "a,b=c|d e"}) == "device=a_b_c_d_e"


def test_serving_maps_a_request_context_as_the_ingest_does() -> None:
    settings = Settings(policy="contextual", context_features="device,hour/6")
    features = parse_features(settings.context_features)
    ingest_cells = ContextCells(features, Settings().privacy_policy())
    serving = RequestCells(settings.privacy_policy())

    policy = ContextualPolicy(learner="logistic_ts", version=1, features=["device", "hour/6"])
    for context in ({"device": "mobile", "hour": 7}, {"hour": 0}, {}, {"os": "ios"}):
        assert serving.cell(policy, context) == ingest_cells.cell(context)


def test_bad_context_features_are_refused_with_the_variable_named() -> None:
    with pytest.raises(ValueError, match="ADLOOP_CONTEXT_FEATURES"):
        Settings(context_features="device,hour/0")


# -- ingest: counting -------------------------------------------------------------------------


def _state(tmp_path: Path, cap: int = 64, **overrides: object) -> tuple[PartitionState, object]:
    settings = Settings(
        policy="contextual",
        context_features="device,hour/6",
        context_cells_max=cap,
        data_dir=tmp_path,
        **overrides,  # type: ignore[arg-type]
    )
    db = open_store(tmp_path / "ingest")
    return PartitionState(db, 0, settings), db


def _rows(state: PartitionState, key: str = "spring|students") -> dict[tuple[str, str], tuple]:
    assert state.contexts is not None
    rows = state.contexts.snapshot_rows(key, now=1e12)  # far ahead: all rows
    return {(r.cell, r.creative_id): (r.impressions, r.clicks) for r in rows}


def test_impressions_and_their_clicks_are_counted_in_the_impressions_cell(tmp_path: Path) -> None:
    state, _ = _state(tmp_path)
    contexts = [{"device": "mobile", "hour": 8}, {"device": "desktop", "hour": 20}, {}]
    for i in range(30):
        assert state.add_impression(_imp(i, contexts[i % 3]), i, NOW) is None
    for i in range(0, 30, 2):  # a click on every other impression
        assert state.attribute(Click(impression_id=f"i{i}", timestamp=NOW - 50), NOW) is None
    assert _rows(state) == {
        ("device=mobile,hour=6", "c1"): (10, 5),
        ("device=desktop,hour=18", "c1"): (10, 5),
        (NO_FEATURES, "c1"): (10, 5),
    }


def test_cells_past_the_cap_count_as_other_and_survive_a_restart(tmp_path: Path) -> None:
    state, db = _state(tmp_path, cap=2)
    for i, device in enumerate(["a", "b", "c", "d", "a"]):
        state.add_impression(_imp(i, {"device": device}), i, NOW)
    # The checkpoint: state and offsets in one batch.
    db.write(state.write_batch({"impressions": 5}).batch)
    state.committed()
    assert _rows(state) == {
        ("device=a", "c1"): (2, 0),
        ("device=b", "c1"): (1, 0),
        (OTHER, "c1"): (2, 0),
    }
    # A restarted ingest reloads the rows, so the same cells are admitted: "c" is
    # still other, and a click on an impression counted before the restart lands in
    # its impression's cell.
    del state
    reloaded = PartitionState(
        db,
        0,
        Settings(
            policy="contextual", context_features="device", context_cells_max=2, data_dir=tmp_path
        ),
    )
    reloaded.add_impression(_imp(10, {"device": "c"}), 10, NOW)
    reloaded.add_impression(_imp(11, {"device": "b"}), 11, NOW)
    reloaded.attribute(Click(impression_id="i2", timestamp=NOW - 50), NOW)
    assert _rows(reloaded) == {
        ("device=a", "c1"): (2, 0),
        ("device=b", "c1"): (2, 0),
        (OTHER, "c1"): (3, 1),
    }


def test_snapshots_carry_changed_rows_and_now_and_then_all(tmp_path: Path) -> None:
    state, db = _state(tmp_path)
    assert state.contexts is not None
    state.add_impression(_imp(0, {"device": "a"}), 0, NOW)
    state.add_impression(_imp(1, {"device": "b"}), 1, NOW)
    first = state.contexts.snapshot_rows("spring|students", now=100.0)
    assert len(first) == 2  # the key's first snapshot carries all its rows
    db.write(state.write_batch({"impressions": 2}).batch)
    state.committed()
    state.add_impression(_imp(2, {"device": "b"}), 2, NOW)
    changed = state.contexts.snapshot_rows("spring|students", now=101.0)
    assert [(r.cell, r.impressions) for r in changed] == [("device=b", 2)]
    everything = state.contexts.snapshot_rows("spring|students", now=110.0)
    assert sorted((r.cell, r.impressions) for r in everything) == [("device=a", 1), ("device=b", 2)]


def test_no_cells_without_the_contextual_policy(tmp_path: Path) -> None:
    db = open_store(tmp_path / "ingest")
    state = PartitionState(db, 0, Settings(data_dir=tmp_path))
    assert state.contexts is None
    assert state.add_impression(_imp(0, {"device": "a"}), 0, NOW) is None


# -- worker: merging ----------------------------------------------------------------------------


@hsettings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 5), st.integers(0, 2)),
        min_size=1,
        max_size=40,
    ),
    deliveries=st.lists(st.integers(0, 39), max_size=60),
)
def test_merged_rows_learn_every_count_once_whatever_is_repeated_or_reordered(
    steps: list[tuple[int, int, int, int]], deliveries: list[int]
) -> None:
    """Per source partition, counters only grow; snapshots carry some rows at their
    cumulative values and can be re-delivered in any order: what the worker learns adds
    up to the counts once the last snapshot of each row has arrived."""
    cumulative: dict[tuple[int, str], list[int]] = {}
    sent: list[dict[int, list[ContextRow]]] = []
    for partition, cell, imps, clicks in steps:
        counts = cumulative.setdefault((partition, f"cell{cell}"), [0, 0])
        counts[0] += imps
        counts[1] += min(clicks, imps)
        sent.append({partition: [ContextRow(f"cell{cell}", "c1", "feed", *counts)]})
    held: dict[int, dict[str, list[int]]] = {}
    learned: dict[tuple[int, str], list[int]] = {}

    def deliver(contexts: dict[int, list[ContextRow]]) -> None:
        for cell, _, _, d_imps, d_clicks in merge_rows(held, contexts):
            (partition,) = contexts
            total = learned.setdefault((partition, cell), [0, 0])
            total[0] += d_imps
            total[1] += d_clicks

    for i in deliveries:  # repeats and stale re-deliveries first
        if i < len(sent):
            deliver(sent[i])
    for contexts in sent:  # then everything, in order
        deliver(contexts)
    for i in reversed(deliveries):
        if i < len(sent):
            deliver(sent[i])
    assert {k: v for k, v in learned.items() if v != [0, 0]} == {
        k: v for k, v in cumulative.items() if v != [0, 0]
    }
    assert row_totals(held) == {
        (cell, "c1", "feed"): tuple(
            map(sum, zip(*[v for (_, c), v in cumulative.items() if c == cell], strict=True))
        )
        for cell in {c for _, c in cumulative}
    }


# -- worker: learning and the decision ----------------------------------------------------------


def test_the_decision_serves_each_cell_its_winner_and_explains_it() -> None:
    creatives = {
        cid: Creative(creative_id=cid, campaign="spring", headline=text)
        for cid, text in (("c1", "Fast delivery tonight"), ("c2", "Half price for students"))
    }
    setup = ContextSetup(
        learner="logistic_ts",
        features=("device",),
        features_of=lambda cid: word_features(creatives[cid].headline),
    )
    rates = {"device=mobile": {"c1": 0.12, "c2": 0.02}, "device=desktop": {"c1": 0.02, "c2": 0.12}}
    rng = np.random.default_rng(5)
    counts: dict[tuple[str, str], list[int]] = {}
    state = PosteriorState()
    for step in range(40):
        for cell, by_creative in rates.items():
            for cid, ctr in by_creative.items():
                total = counts.setdefault((cell, cid), [0, 0])
                total[0] += 50
                total[1] += int(rng.binomial(50, ctr))
        snapshot = OutcomeSnapshot(
            campaign="spring",
            audience="students",
            sources={},
            contexts={0: [ContextRow(c, cid, "feed", *v) for (c, cid), v in counts.items()]},
            emitted_at=float(step),
        )
        state.apply(snapshot)
        learn_contexts(state, snapshot, setup)
    decision = build_decision(
        "spring",
        "students",
        state,
        list(creatives.values()),
        creatives,
        np.random.default_rng(1),
        now=1.0,
        context=setup,
    )
    policy = decision.contextual
    assert policy is not None and decision.policy == "contextual"
    cells = {(c.placement, c.cell): c for c in policy.cells}
    assert cells[("feed", "device=mobile")].best_creative_id == "c1"
    assert cells[("feed", "device=desktop")].best_creative_id == "c2"
    assert cells[("feed", "device=mobile")].probabilities["c1"] > 0.9
    # Serving's fallbacks are always there: no context features, and unknown contexts.
    assert {("feed", NO_FEATURES), ("feed", OTHER)} <= cells.keys()
    for cell in policy.cells:
        assert sum(cell.probabilities.values()) == pytest.approx(1.0)
        assert min(cell.probabilities.values()) >= 0.01 / 2 - 1e-12  # the floor
    rows = {r.creative_id: r for r in decision.creatives}
    assert rows["c1"].wins_in == ["feed device=mobile"]
    assert rows["c2"].wins_in == ["feed device=desktop"]
    assert (
        rows["c1"].context_effects["device=mobile"]
        > 0
        > rows["c2"].context_effects["device=mobile"]
    )
    assert policy.learned_impressions == sum(v[0] for v in counts.values())
    assert policy.learned_clicks == sum(v[1] for v in counts.values())
    assert policy.version == policy.learned_impressions + policy.learned_clicks


def test_a_new_learner_kind_relearns_every_row_held() -> None:
    state = PosteriorState()
    snapshot = OutcomeSnapshot(
        campaign="spring",
        audience="students",
        sources={},
        contexts={0: [ContextRow("device=a", "c1", "feed", 100, 7)]},
        emitted_at=0.0,
    )
    state.apply(snapshot)
    learn_contexts(state, snapshot, ContextSetup(learner="logistic_ts"))
    again = OutcomeSnapshot(
        campaign="spring",
        audience="students",
        sources={},
        contexts={0: [ContextRow("device=a", "c1", "feed", 110, 7)]},
        emitted_at=1.0,
    )
    model = learn_contexts(state, again, ContextSetup(learner="vw"))
    assert model.name == "vw_contextual" and model.learned == [110.0, 7.0]

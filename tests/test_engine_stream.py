"""The bandit engine inside the live stream: labels, verdicts, change detection, policy choice.

Real ingest, worker and serving processes on the embedded broker; the test publishes
impressions and clicks with kafka-python and reads decisions over HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from adloop.schemas import Creative
from adloop.streams.config import Settings

from stack import Stack

pytestmark = pytest.mark.integration

# A second of event time per impression, up to 14,000: starting a day ago keeps every
# event time within the ingest's bounds (ADLOOP_MAX_EVENT_AGE_S behind the clock, the
# skew ahead of it).
T0 = float(int(time.time())) - 86400.0


def _publish(
    stack: Stack,
    start: int,
    n: int,
    ctr: dict[str, float],
    seed: int,
    placements: dict[str, dict[str, float]] | None = None,
) -> dict[str, int]:
    """n impressions alternating over the creatives, clicks drawn at the given CTRs
    (or per placement, alternating over the placements)."""
    rng = np.random.default_rng(seed)
    creatives = sorted(ctr)
    clicks = dict.fromkeys(creatives, 0)
    for i in range(start, start + n):
        creative = creatives[i % len(creatives)]
        placement = "feed"
        rate = ctr[creative]
        if placements:
            placement = sorted(placements)[(i // len(creatives)) % len(placements)]
            rate = placements[placement][creative]
        iid = f"imp-{i}"
        stack.publish(
            "impressions",
            iid,
            {
                "schema_version": 1,
                "impression_id": iid,
                "timestamp": T0 + i,
                "campaign": "spring",
                "audience": "students",
                "placement": placement,
                "creative_id": creative,
                "propensity": 0.5,
                "policy": "test",
            },
        )
        if rng.random() < rate:
            stack.publish(
                "clicks", iid, {"schema_version": 1, "impression_id": iid, "timestamp": T0 + i + 1}
            )
            clicks[creative] += 1
    stack.flush()
    return clicks


def _rows(stack: Stack) -> dict[str, dict]:
    decision = stack.decision("spring", "students")
    return {r["creative_id"]: r for r in decision["creatives"]} if decision else {}


def _wait_counted(stack: Stack, impressions: dict[str, int], clicks: dict[str, int]) -> None:
    """Until the decision counts exactly these impressions and clicks per creative
    (a click is counted after its impression, maybe in a later snapshot)."""
    want = {c: (impressions[c], clicks[c]) for c in impressions}

    def counted() -> dict[str, tuple[int, int]]:
        return {c: (r["impressions"], r["clicks"]) for c, r in _rows(stack).items()}

    stack.wait_for(lambda: counted() == want, what=f"counts {want}", state=counted)


@pytest.fixture
def make_stack(settings: Settings) -> Iterator:
    stacks: list[Stack] = []

    def make(**overrides: object) -> Stack:
        # A second of event time per impression: a click fetched a few polls before its
        # impression would have "waited" minutes of event time. The click wait (in event
        # time) must cover the compressed stream, as it covers real delays in production.
        overrides = {"click_wait_s": 3000.0, "attribution_window_s": 7200.0, **overrides}
        stack = Stack(settings.with_overrides(**overrides)).start()
        stack.register(
            Creative(creative_id="c1", campaign="spring", headline="Spring sale: 30% off"),
            Creative(creative_id="c2", campaign="spring", headline="Free shipping today"),
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def test_labels_verdicts_and_a_detected_drop_reach_the_decisions(make_stack) -> None:
    stack = make_stack(min_evidence=500)
    # Phase 1: c1 clearly better.
    clicks = _publish(stack, 0, 6000, {"c1": 0.10, "c2": 0.03}, seed=1)
    _wait_counted(stack, {"c1": 3000, "c2": 3000}, clicks)
    rows = _rows(stack)
    assert rows["c1"]["label"] == "best" and rows["c2"]["label"] == "low"
    assert rows["c2"]["underperforming"]
    assert rows["c2"]["reasons"][0].startswith("P(within 10% of best) = ")
    assert "after 3,000 impressions" in rows["c2"]["reasons"][0]
    assert rows["c1"]["serving_probability"] > 0.9
    assert rows["c1"]["traffic_share"] == pytest.approx(0.5)
    assert rows["c1"]["p_best"] > 0.99
    # Phase 2: c1 wears out (10 % -> 1 %); the change detector cuts its history.
    more = _publish(stack, 6000, 8000, {"c1": 0.01, "c2": 0.03}, seed=2)
    _wait_counted(stack, {"c1": 7000, "c2": 7000}, {c: clicks[c] + more[c] for c in clicks})
    rows = _rows(stack)
    assert any(reason.startswith("CTR dropped from") for reason in rows["c1"]["reasons"]), rows
    assert rows["c1"]["label"] != "best" and rows["c2"]["label"] == "best"
    # The exact counts are untouched by the policy's discounting and cuts.
    assert rows["c1"]["impressions"] == 7000 and rows["c2"]["impressions"] == 7000
    status, best = stack.get("/v1/campaigns/spring/audiences/students/best")
    assert status == 200 and best["creative"]["creative_id"] == "c2"
    assert best["label"] == "best" and best["policy"] == "discounted_thompson"


def test_the_policy_is_configuration(make_stack) -> None:
    stack = make_stack(policy="kl_ucb", min_learning_share=0.0, exploration_floor=0.02)
    clicks = _publish(stack, 0, 2000, {"c1": 0.08, "c2": 0.02}, seed=3)
    _wait_counted(stack, {"c1": 1000, "c2": 1000}, clicks)
    decision = stack.decision("spring", "students")
    assert decision["policy"] == "kl_ucb"
    probabilities = {r["creative_id"]: r["serving_probability"] for r in decision["creatives"]}
    # KL-UCB is deterministic: all traffic to the top index, plus the 2 % floor.
    assert probabilities == pytest.approx({"c1": 0.99, "c2": 0.01})


def test_contextual_policy_serves_by_placement(make_stack) -> None:
    stack = make_stack(policy="contextual")
    rates = {"feed": {"c1": 0.15, "c2": 0.02}, "story": {"c1": 0.02, "c2": 0.15}}
    clicks = _publish(stack, 0, 4000, {"c1": 0.0, "c2": 0.0}, seed=4, placements=rates)
    _wait_counted(stack, {"c1": 2000, "c2": 2000}, clicks)
    decision = stack.decision("spring", "students")
    assert decision["policy"] == "contextual"
    # The better creative per placement gets most traffic; a learning share and the
    # floor keep exploring the other, more with the Thompson learner's posterior width.
    assert decision["placements"]["feed"]["c1"] > 0.75
    assert decision["placements"]["story"]["c2"] > 0.75
    assert stack.api is not None
    for placement, winner in (("feed", "c1"), ("story", "c2")):
        chosen = [stack.api("spring", "students", placement)["creative_id"] for _ in range(100)]
        assert chosen.count(winner) >= 60, (placement, chosen)

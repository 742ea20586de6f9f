"""The contextual policy on the real stack: per-impression context learned through the
ingest's context cells, a context-dependent choice served with its exact propensity,
the model on a second serving replica, and exactness after SIGKILLs.

Real ingest, worker and serving processes on the embedded broker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from adloop.bench.exchange import HttpSelector
from adloop.bench.harness import free_port
from adloop.schemas import Creative
from adloop.streams.config import Settings
from adloop.streams.supervisor import Supervisor

from stack import Stack

pytestmark = pytest.mark.integration

# Event times near now (the join refuses events older than ADLOOP_MAX_EVENT_AGE_S).
T0 = float(int(time.time())) - 3600.0
# Mobile users click the sale, desktop users the delivery promise.
RATES = {"mobile": {"c1": 0.20, "c2": 0.02}, "desktop": {"c1": 0.02, "c2": 0.20}}
DEVICES = ("mobile", "desktop")


def _publish(stack: Stack, start: int, n: int, seed: int, expected: dict[str, list[int]]) -> None:
    """n impressions alternating over creatives and devices (hour 9 or 21), each
    clicked at its device's rate; ``expected[cell]`` adds up [impressions, clicks]."""
    rng = np.random.default_rng(seed)
    for i in range(start, start + n):
        creative = ("c1", "c2")[i % 2]
        device = DEVICES[(i // 2) % 2]
        hour = 9 if (i // 4) % 2 else 21
        iid = f"imp-{i}"
        stack.publish(
            "impressions",
            iid,
            {
                "schema_version": 1,
                "impression_id": iid,
                "timestamp": T0 + i * 0.01,
                "campaign": "spring",
                "audience": "students",
                "placement": "feed",
                "creative_id": creative,
                "propensity": 0.25,
                "policy": "test",
                # user_id is not allow-listed: it never reaches a cell.
                "context": {"device": device, "hour": hour, "user_id": f"u{i}"},
            },
        )
        cell = expected.setdefault(f"device={device},hour={hour // 12 * 12}", [0, 0])
        cell[0] += 1
        if rng.random() < RATES[device][creative]:
            stack.publish(
                "clicks",
                iid,
                {"schema_version": 1, "impression_id": iid, "timestamp": T0 + i * 0.01 + 1},
            )
            cell[1] += 1
    stack.flush()


def _contextual(stack: Stack) -> dict:
    decision = stack.decision("spring", "students")
    return (decision or {}).get("contextual") or {}


def _learned(stack: Stack) -> tuple[int, int]:
    policy = _contextual(stack)
    return policy.get("learned_impressions", 0), policy.get("learned_clicks", 0)


def _cells(stack: Stack) -> dict[str, list[int]]:
    return {
        c["cell"]: [c["impressions"], c["clicks"]]
        for c in _contextual(stack).get("cells", [])
        if c["impressions"] or c["clicks"]
    }


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    started = Stack(
        settings.with_overrides(policy="contextual", context_features="device,hour/12")
    ).start()
    started.register(
        Creative(creative_id="c1", campaign="spring", headline="Spring sale: 30% off"),
        Creative(creative_id="c2", campaign="spring", headline="Delivered tomorrow"),
    )
    yield started
    started.stop()


def test_context_is_learned_and_served_with_its_propensity_on_every_replica(
    stack: Stack,
) -> None:
    expected: dict[str, list[int]] = {}
    _publish(stack, 0, 4000, seed=1, expected=expected)
    total = (4000, sum(c for _, c in expected.values()))
    stack.wait_for(
        lambda: _learned(stack) == total,
        what="every impression and click learned by context",
        state=lambda: (_learned(stack), total),
    )
    # Each cell's counts in the decision are exactly what was published in it.
    assert _cells(stack) == expected
    policy = _contextual(stack)
    assert policy["learner"] == "logistic_ts" and policy["features"] == ["device", "hour/12"]
    entries = {(c["placement"], c["cell"]): c for c in policy["cells"]}
    for hour in ("0", "12"):
        assert entries[("feed", f"device=mobile,hour={hour}")]["best_creative_id"] == "c1"
        assert entries[("feed", f"device=desktop,hour={hour}")]["best_creative_id"] == "c2"
    rows = {r["creative_id"]: r for r in stack.decision("spring", "students")["creatives"]}
    assert all("device=mobile" in w for w in rows["c1"]["wins_in"]), rows["c1"]["wins_in"]
    assert all("device=desktop" in w for w in rows["c2"]["wins_in"]), rows["c2"]["wins_in"]
    assert rows["c1"]["context_effects"]["device=mobile"] > 0

    # Serving: the choice depends on the context, and the propensity is the drawn
    # creative's probability in that context's cell, as published.
    assert stack.api is not None
    second = Supervisor(stack.settings.with_overrides(api_port=free_port()), roles=("serve",))
    second.start()
    try:
        second.wait_http_ready()
        replica = HttpSelector.local(second.settings)

        def same_model() -> bool:
            status, body = replica.get("/v1/campaigns/spring/audiences/students/decision")
            return (
                status == 200
                and (body.get("contextual") or {}).get("version") == (policy["version"])
            )

        stack.wait_for(same_model, what="the second replica has the same model version")
        for api in (stack.api, replica):
            for device, hour, winner in (("mobile", 8, "c1"), ("desktop", 20, "c2")):
                cell = f"device={device},hour={hour // 12 * 12}"
                probabilities = entries[("feed", cell)]["probabilities"]
                chosen = [
                    api("spring", "students", "feed", {"device": device, "hour": hour})
                    for _ in range(100)
                ]
                assert {c["context_cell"] for c in chosen} == {cell}
                assert {c["policy"] for c in chosen} == {"contextual"}
                for c in chosen:
                    assert c["propensity"] == pytest.approx(probabilities[c["creative_id"]])
                assert sum(c["creative_id"] == winner for c in chosen) >= 80, chosen
            # A context the ingest never counted gets the cell of unknown contexts.
            unknown = api("spring", "students", "feed", {"device": "tablet", "hour": 3})
            assert unknown["context_cell"] == "other"
            other = entries[("feed", "other")]["probabilities"]
            assert unknown["propensity"] == pytest.approx(other[unknown["creative_id"]])
            # Without a context: the placement's policy, as before.
            plain = api("spring", "students", "feed")
            assert plain["context_cell"] is None and plain["policy"] == "contextual"
    finally:
        second.stop()


def test_context_counts_stay_exact_when_ingest_and_worker_are_killed(stack: Stack) -> None:
    """SIGKILL at event counts (impressions learned so far), not at times."""
    expected: dict[str, list[int]] = {}
    _publish(stack, 0, 3000, seed=2, expected=expected)
    stack.wait_for(lambda: _learned(stack)[0] >= 1000, what="1,000 impressions learned")
    stack.sup.kill("worker")
    stack.sup.start("worker")
    _publish(stack, 3000, 3000, seed=3, expected=expected)
    stack.wait_for(lambda: _learned(stack)[0] >= 4000, what="4,000 impressions learned")
    stack.sup.kill("ingest")
    stack.sup.kill("worker")
    stack.sup.start("ingest")
    stack.sup.start("worker")
    _publish(stack, 6000, 2000, seed=4, expected=expected)
    total = (8000, sum(c for _, c in expected.values()))
    stack.wait_for(
        lambda: _learned(stack) == total,
        timeout=120,
        what="exact context counts after the kills",
        state=lambda: (_learned(stack), total, _cells(stack), expected),
    )
    assert _cells(stack) == expected
    # No dead letters: redelivered events were recognised as already counted.
    assert stack.dead_letters(expected=0, timeout=1.0) == []

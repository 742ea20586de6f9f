"""The closed loop end to end on the embedded broker, with the real small models.

ingest + worker + serve + loop + generator as real processes. An underperformer gets
a verdict, the loop asks for variants, the generator writes and scores them, they wait
for review (auto_approve off) and are never served before approval; a person approves
one, it goes live, the underperformer is retired in that audience, and the generated
creative is served. Its story is complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest

from adloop.schemas import Creative
from adloop.streams.config import Settings
from adloop.streams.supervisor import Supervisor

from stack import Stack

pytestmark = pytest.mark.integration


def call(stack: Stack, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    assert stack.api is not None
    return stack.api.call(method, path, body)


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(
        settings.with_overrides(
            min_evidence=300, loop_tick_s=0.5, generator_seed=3, generator_time_limit_s=240
        )
    )
    s.sup = Supervisor(s.settings, roles=("ingest", "worker", "serve", "loop", "generator"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.timeout(1200)
def test_underperformer_replaced_by_an_approved_generated_creative(stack: Stack) -> None:
    stack.register(
        Creative(creative_id="c1", campaign="shoes", headline="Fast shoes, 30% off"),
        Creative(creative_id="c2", campaign="shoes", headline="Shop our shoes"),
    )
    status, _ = call(
        stack,
        "PUT",
        "/v1/campaigns/shoes/settings",
        {
            "reason": "start the loop, with review",
            "brief": {"product": "running shoes", "key_message": "light, fast, 30% off"},
            "auto_approve": False,
            "cooldown_s": 5.0,
            "n_variants": 3,
        },
    )
    assert status == 200
    rng = np.random.default_rng(0)
    # Event times a second apart, in the last hour: the ingest refuses event times far
    # from its clock (ADLOOP_MAX_EVENT_AGE_S, ADLOOP_MAX_CLOCK_SKEW_S).
    t0 = float(int(time.time())) - 3600.0
    for i in range(1200):
        creative = ("c1", "c2")[i % 2]
        iid = f"i{i}"
        stack.publish(
            "impressions",
            iid,
            {
                "schema_version": 1,
                "impression_id": iid,
                "timestamp": t0 + i,
                "campaign": "shoes",
                "audience": "students",
                "placement": "feed",
                "creative_id": creative,
                "propensity": 0.5,
                "policy": "test",
            },
        )
        if rng.random() < (0.12 if creative == "c1" else 0.01):
            stack.publish(
                "clicks",
                iid,
                {"schema_version": 1, "impression_id": iid, "timestamp": t0 + 1 + i},
            )
    stack.flush()

    def review() -> list[dict]:
        return call(stack, "GET", "/v1/campaigns/shoes/review")[1]["candidates"]

    stack.wait_for(
        lambda: bool(review()),
        timeout=400,
        what="candidates in the review queue",
        state=lambda: call(stack, "GET", "/v1/campaigns/shoes/audit")[1],
    )
    candidates = review()
    # Waiting for review: never served.
    served = {stack.api("shoes", "students", "feed")["creative_id"] for _ in range(100)}
    assert served <= {"c1", "c2"}
    chosen = candidates[0]
    assert chosen["parent_id"] == "c2" and chosen["predicted_ctr"] > 0
    assert chosen["lineage"]["trigger"].startswith("creative c2 low")
    status, approved = call(
        stack,
        "POST",
        f"/v1/creatives/{chosen['creative_id']}/approve",
        {"reason": "on brand"},
    )
    assert status == 200 and approved["status"] == "active"
    # Approving twice is refused with the reason.
    status, again = call(stack, "POST", f"/v1/creatives/{chosen['creative_id']}/approve", {})
    assert status == 409 and again["error"] == "invalid_status"

    def c2_retired() -> bool:
        creatives = call(stack, "GET", "/v1/campaigns/shoes/creatives")[1]["creatives"]
        return any(
            c["creative_id"] == "c2" and "students" in c["retired_audiences"] for c in creatives
        )

    stack.wait_for(c2_retired, what="c2 retired in students")
    seen: set[str] = set()
    stack.wait_for(
        lambda: (
            seen.update(stack.api("shoes", "students", "feed")["creative_id"] for _ in range(50))
            or chosen["creative_id"] in seen
        ),
        what="the generated creative served",
    )
    assert "c2" not in {stack.api("shoes", "students", "feed")["creative_id"] for _ in range(200)}
    # The story: lineage, trigger, prior, status changes; the audit trail names people.
    story = {
        c["creative"]["creative_id"]: c
        for c in call(stack, "GET", "/v1/campaigns/shoes/story")[1]["creatives"]
    }
    mine = story[chosen["creative_id"]]
    assert [h["action"] for h in mine["creative"]["history"]] == ["created", "approved"]
    assert mine["creative"]["history"][1]["actor"] == "human:local-admin"
    assert mine["prior_ctr"] == chosen["predicted_ctr"]
    assert mine["creative"]["lineage"]["request_id"]
    old = story["c2"]["creative"]["history"][-1]
    assert old["action"] == "retired_in_audience" and old["reason"].startswith("replaced by")

    def actions() -> set[str]:
        entries = call(stack, "GET", "/v1/campaigns/shoes/audit")[1]["entries"]
        return {e["action"] for e in entries}

    # The generator publishes each variant as it passes, so the one approved above may
    # have been served before the request's result (and its audit entry) was written.
    stack.wait_for(lambda: "generation_answered" in actions(), what="the request answered")
    assert {
        "settings_changed",
        "generation_requested",
        "generation_answered",
        "approved",
        "retired",
    } <= actions()
    # The CTR model keeps learning: the loop's scheduled retraining (a `train-ctr
    # --from-kafka` child process) trains a new version from these topics, where the
    # generator's scorer looks for it.
    import asyncio

    from adloop.generator.ctr import CtrScorer
    from adloop.streams.controller import LoopController

    controller = LoopController(stack.settings.with_overrides(ctr_retrain_max_steps=4))
    assert asyncio.run(controller.retrain()) == 0
    models = stack.settings.models_path
    cards = [json.loads(p.read_text()) for p in (models / "ctr").glob("*/model_card.json")]
    assert cards, "no CTR model trained"
    newest = max(cards, key=lambda card: card["version"])  # versions start with their time
    assert newest["data"]["impressions"] >= 1200, cards
    assert CtrScorer.load(models).version == newest["version"]

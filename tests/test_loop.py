"""The loop's rules (pure): debounce, budget, cap, retries, retirement, human steering."""

from __future__ import annotations

from msgspec import structs

from adloop.schemas import (
    Brief,
    CampaignSettings,
    Creative,
    Decision,
    GenerationResult,
    Lineage,
    RankedCreative,
)
from adloop.streams.loop import LoopRules, plan

NOW = 1_760_000_000.0
BRIEF = Brief(product="running shoes", key_message="light and fast")


def row(cid: str, mean: float, label: str = "good", under: bool = False) -> RankedCreative:
    return RankedCreative(
        creative_id=cid,
        impressions=5000,
        clicks=int(5000 * mean),
        alpha=1,
        beta=1,
        mean=mean,
        ci_low=mean * 0.9,
        ci_high=mean * 1.1,
        serving_probability=0.5,
        label=label,
        p_best=0.0 if under else 0.9,
        underperforming=under,
        reasons=["P(within 10% of best) = 0.1% after 5,000 impressions"] if under else [],
    )


def decision(*rows: RankedCreative) -> Decision:
    return Decision(
        campaign="spring",
        audience="students",
        best_creative_id=rows[0].creative_id,
        creatives=list(rows),
        impressions=10_000,
        clicks=300,
        updated_at=NOW,
    )


def creative(cid: str, **kw: object) -> Creative:
    return Creative(creative_id=cid, campaign="spring", headline=f"headline {cid}", **kw)


def failed_result(
    request_id: str, error: str, finished_at: float, retryable: bool = True
) -> GenerationResult:
    return GenerationResult(
        request_id=request_id,
        campaign="spring",
        audience="students",
        status="failed",
        error=error,
        retryable=retryable,
        finished_at=finished_at,
    )


HUMAN = {"c1": creative("c1"), "c2": creative("c2")}
SETTINGS = CampaignSettings(campaign="spring", brief=BRIEF, cooldown_s=600, generation_budget=5)
UNDER = decision(row("c1", 0.03, "best"), row("c2", 0.01, "low", under=True))


def test_an_underperformer_asks_for_variants_with_winners_and_the_trigger() -> None:
    p = plan(UNDER, SETTINGS, HUMAN, [], {}, 0, NOW)
    assert p.request is not None
    r = p.request
    assert r.underperformer is not None and r.underperformer.creative_id == "c2"
    assert [w.creative_id for w in r.winners] == ["c1"]
    assert r.n_variants == 8 and r.auto_approve is False and r.brief == BRIEF
    assert "c2 low" in (r.trigger or "") and "after 5,000 impressions" in (r.trigger or "")


def test_nothing_without_an_underperformer_or_while_paused() -> None:
    fine = decision(row("c1", 0.03, "best"), row("c2", 0.029))
    assert plan(fine, SETTINGS, HUMAN, [], {}, 0, NOW).request is None
    paused = structs.replace(SETTINGS, paused=True)
    p = plan(UNDER, paused, HUMAN, [], {}, 0, NOW)
    assert p.request is None and p.held_back == "campaign automation paused"


def test_one_open_request_per_key_then_cool_down_then_budget() -> None:
    first = plan(UNDER, SETTINGS, HUMAN, [], {}, 0, NOW).request
    assert first is not None
    # Open: nothing new.
    p = plan(UNDER, SETTINGS, HUMAN, [first], {}, 1, NOW + 10)
    assert p.request is None and "is open" in (p.held_back or "")
    done = GenerationResult(
        request_id=first.request_id,
        campaign="spring",
        audience="students",
        status="ok",
        finished_at=NOW + 20,
    )
    # Answered, but within the cool-down.
    p = plan(UNDER, SETTINGS, HUMAN, [first], {first.request_id: done}, 1, NOW + 100)
    assert p.request is None and p.held_back == "cool-down after the last request"
    # After the cool-down: a second request with a new id.
    p = plan(UNDER, SETTINGS, HUMAN, [first], {first.request_id: done}, 1, NOW + 700)
    assert p.request is not None and p.request.request_id != first.request_id
    # Budget used up.
    p = plan(UNDER, SETTINGS, HUMAN, [first], {first.request_id: done}, 5, NOW + 700)
    assert p.request is None and "budget" in (p.held_back or "")


def test_failed_or_silent_requests_are_retried_then_reported() -> None:
    rules = LoopRules(request_timeout_s=60, max_attempts=2)
    first = plan(UNDER, SETTINGS, HUMAN, [], {}, 0, NOW, rules).request
    assert first is not None
    retry = plan(UNDER, SETTINGS, HUMAN, [first], {}, 1, NOW + 61, rules).request
    assert retry is not None and retry.request_id.endswith("-a2")
    failed = failed_result(retry.request_id, "model could not load", NOW + 70)
    p = plan(UNDER, SETTINGS, HUMAN, [first, retry], {retry.request_id: failed}, 2, NOW + 80, rules)
    assert p.request is None
    assert p.failures == [
        f"request {retry.request_id} failed after 2 attempts: model could not load"
    ]
    # Reported once.
    again = plan(
        UNDER,
        SETTINGS,
        HUMAN,
        [first, retry],
        {retry.request_id: failed},
        2,
        NOW + 90,
        rules,
        reported=frozenset({retry.request_id}),
    )
    assert again.failures == []


def test_cap_on_live_creatives_counts_pending_ones() -> None:
    capped = structs.replace(SETTINGS, max_live_per_audience=2)
    lineage = Lineage(request_id="gen-x-1-a1", prompt_version="v1", llm_model="m")
    pool = {**HUMAN, "g1": creative("g1", status="pending_review", lineage=lineage)}
    p = plan(UNDER, capped, pool, [], {}, 0, NOW)
    assert p.request is None and "at the cap" in (p.held_back or "")


def test_retire_once_the_replacement_is_live_never_pinned_never_the_last() -> None:
    request = plan(UNDER, SETTINGS, HUMAN, [], {}, 0, NOW).request
    assert request is not None
    done = {
        request.request_id: GenerationResult(
            request_id=request.request_id,
            campaign="spring",
            audience="students",
            status="ok",
            finished_at=NOW,
        )
    }
    lineage = Lineage(request_id=request.request_id, prompt_version="v1", llm_model="m")
    # Candidate waiting for review: not live, nothing retired.
    pool = {**HUMAN, "g1": creative("g1", status="pending_review", lineage=lineage)}
    assert plan(UNDER, SETTINGS, pool, [request], done, 1, NOW + 10).retire == []
    # Approved (live): the underperformer goes, in this audience, with the reason.
    pool["g1"] = creative("g1", lineage=lineage)
    retire = plan(UNDER, SETTINGS, pool, [request], done, 1, NOW + 10).retire
    assert [(r.creative_id, r.audience) for r in retire] == [("c2", "students")]
    assert retire[0].reason.startswith(f"replaced by g1 (request {request.request_id})")
    # Pinned: kept.
    pinned = structs.replace(SETTINGS, pinned=["c2"])
    assert plan(UNDER, pinned, pool, [request], done, 1, NOW + 10).retire == []
    # The last live creative of the audience is never retired.
    alone = {"c2": HUMAN["c2"], "g1": creative("g1", lineage=lineage, audiences=["others"])}
    assert plan(UNDER, SETTINGS, alone, [request], done, 1, NOW + 10).retire == []


def test_retired_in_an_audience_is_not_served_there() -> None:
    c = creative("c2", retired_audiences=["students"])
    assert not c.targets("students") and c.targets("parents")


def test_a_request_carries_the_keys_earlier_creatives_so_none_is_written_again() -> None:
    pool = {
        **HUMAN,
        "g1": creative("g1", retired_audiences=["students"]),  # retired here: still "seen"
        "g2": creative("g2", status="rejected"),  # a person said no
        "g3": creative("g3", status="pending_review"),
        "x1": creative("x1", audiences=["parents"]),  # another audience's creative
        "o1": Creative(creative_id="o1", campaign="autumn", headline="other campaign"),
    }
    request = plan(UNDER, SETTINGS, pool, [], {}, 0, NOW).request
    assert request is not None
    # Winners (c1) and the underperformer (c2) travel in their own fields.
    assert [c.creative_id for c in request.earlier_creatives] == ["g1", "g2", "g3"]
    assert request.earlier_creatives[0].headline == "headline g1"
    newest = plan(UNDER, SETTINGS, pool, [], {}, 0, NOW, LoopRules(earlier_creatives_max=2))
    assert newest.request is not None
    assert [c.creative_id for c in newest.request.earlier_creatives] == ["g2", "g3"]


def test_a_refused_request_is_not_retried_until_the_brief_changes_or_the_hold_ends() -> None:
    zh = structs.replace(SETTINGS, brief=Brief(product="跑鞋", language="zh"), cooldown_s=0)
    rules = LoopRules(refusal_hold_s=3600)
    first = plan(UNDER, zh, HUMAN, [], {}, 0, NOW, rules).request
    assert first is not None
    refused = failed_result(
        first.request_id, "unsupported_language: set ADLOOP_LLM_MODEL", NOW + 1, retryable=False
    )
    done = {first.request_id: refused}
    p = plan(UNDER, zh, HUMAN, [first], done, 1, NOW + 60, rules)
    assert p.request is None  # no "-a2" retry of a request that cannot succeed
    assert p.failures == [f"request {first.request_id} refused: {refused.error}"]
    assert "change the campaign's brief" in (p.held_back or "")
    # A new brief: a new request at once.
    english = structs.replace(zh, brief=BRIEF)
    fresh = plan(UNDER, english, HUMAN, [first], done, 1, NOW + 60, rules).request
    assert fresh is not None and fresh.request_id.endswith("-2-a1") and fresh.brief == BRIEF
    # The same brief after the hold (the model may have changed): asked again.
    later = plan(UNDER, zh, HUMAN, [first], done, 1, NOW + 3602, rules).request
    assert later is not None and later.request_id.endswith("-2-a1")

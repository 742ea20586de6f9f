"""The closed loop's rules, pure: decisions and history in, actions out (no Kafka).

For one campaign × audience, :func:`plan` looks at the latest decision (labels and
verdicts from the bandit engine), the campaign's settings, the creatives, and the
generation requests and results so far, and says what to do:

* ask for variants when a creative is underperforming — at most one open request per
  campaign × audience, not within the cool-down after the last one, not beyond the
  campaign's generation budget, not when the audience already has its cap of live
  creatives, never while the campaign's automation is paused;
* retry a request that failed or timed out, a bounded number of times, then report it
  (never drop it silently);
* retire an underperformer in this audience once a replacement generated for it is
  live there — never a pinned creative, never the audience's last creative.

Everything it needs is on Kafka topics (requests and results are logs), so the
process that runs it keeps no state of its own and can be restarted at any time.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from msgspec import structs

from adloop.schemas import (
    AuditEntry,
    Brief,
    CampaignSettings,
    Creative,
    Decision,
    ExampleCreative,
    GenerationRequest,
    GenerationResult,
)

__all__ = ["ACTOR", "LoopRules", "Plan", "Retirement", "audit", "plan", "request_base"]

#: Who the loop's own actions are attributed to in histories and the audit trail.
ACTOR = "system:loop"


def audit(
    campaign: str,
    action: str,
    reason: str,
    actor: str = ACTOR,
    creative_id: str | None = None,
    audience: str | None = None,
    **details: Any,
) -> AuditEntry:
    """One entry of a campaign's audit trail, stamped now. Here rather than with the
    loop's process because the steering API (people's actions) writes them too."""
    return AuditEntry(
        at=time.time(),
        actor=actor,
        campaign=campaign,
        action=action,
        creative_id=creative_id,
        audience=audience,
        reason=reason,
        details=details,
    )


@dataclass(frozen=True)
class LoopRules:
    request_timeout_s: float = 300.0
    max_attempts: int = 3
    winners_as_examples: int = 3
    # The newest this many of the key's other creatives travel with a request, so the
    # generator does not write one of them again (the schema's bound).
    earlier_creatives_max: int = 100
    # A refused request (not retryable) is asked again only after the brief changes or
    # this long (the generator's model may have been changed meanwhile).
    refusal_hold_s: float = 3600.0


@dataclass(frozen=True)
class Retirement:
    creative_id: str
    audience: str
    reason: str


@dataclass
class Plan:
    request: GenerationRequest | None = None
    retire: list[Retirement] = field(default_factory=list)
    # Requests that exhausted their attempts: reported once, with why.
    failures: list[str] = field(default_factory=list)
    # Why nothing was requested although something underperforms (for the logs).
    held_back: str | None = None


def request_base(campaign: str, audience: str) -> str:
    """A request-id stem that is a valid Identifier whatever the audience's characters."""
    digest = hashlib.sha1(f"{campaign}|{audience}".encode()).hexdigest()[:10]
    return f"gen-{campaign[:40]}-{digest}"


def _example(creative: Creative, ctr: float | None) -> ExampleCreative:
    return ExampleCreative(
        creative_id=creative.creative_id,
        headline=creative.headline,
        description=creative.description[:300],
        ctr=ctr,
    )


def _attempt_of(request_id: str) -> int:
    head, _, tail = request_id.rpartition("-a")
    return int(tail) if head and tail.isdigit() else 1


def plan(
    decision: Decision,
    settings: CampaignSettings,
    creatives: dict[str, Creative],
    requests: list[GenerationRequest],
    results: dict[str, GenerationResult],
    campaign_requests: int,
    now: float,
    rules: LoopRules = LoopRules(),
    reported: frozenset[str] = frozenset(),
) -> Plan:
    """What to do for ``decision``'s campaign × audience now (see the module docstring).

    ``requests`` are this key's requests, oldest first; ``campaign_requests`` counts the
    campaign's requests over all audiences (the budget); ``reported`` the request ids
    whose failure was already reported.
    """
    out = Plan()
    if settings.paused:
        out.held_back = "campaign automation paused"
        return out
    audience = decision.audience
    rows = {r.creative_id: r for r in decision.creatives}
    live = [
        c
        for c in creatives.values()
        if c.campaign == decision.campaign and c.status == "active" and c.targets(audience)
    ]
    pending = [
        c
        for c in creatives.values()
        if c.campaign == decision.campaign
        and c.status == "pending_review"
        and c.targets(audience)
        and c.lineage is not None
    ]

    # -- retire underperformers whose replacement is live here ----------------------
    live_ids = {c.creative_id for c in live}
    remaining = len(live)
    for request in requests:
        under = request.underperformer
        if under is None or under.creative_id not in live_ids:
            continue
        if under.creative_id in settings.pinned:
            continue
        replacements = [
            c
            for c in live
            if c.lineage is not None and _stem(c.lineage.request_id) == _stem(request.request_id)
        ]
        if not replacements or remaining <= 1:
            continue
        row = rows.get(under.creative_id)
        reasons = "; ".join(row.reasons) if row is not None and row.reasons else "underperformer"
        out.retire.append(
            Retirement(
                creative_id=under.creative_id,
                audience=audience,
                reason=f"replaced by {', '.join(sorted(c.creative_id for c in replacements))} "
                f"(request {request.request_id}): {reasons}",
            )
        )
        live_ids.discard(under.creative_id)
        remaining -= 1

    # -- the open request, if any: wait, retry, or report ---------------------------
    last = requests[-1] if requests else None
    if last is not None:
        result = results.get(last.request_id)
        failed = result is not None and result.status == "failed"
        timed_out = result is None and now - last.requested_at > rules.request_timeout_s
        if result is None and not timed_out:
            out.held_back = f"request {last.request_id} is open"
            return out
        if failed and result is not None and not result.retryable:
            # Refused for good (e.g. a language the model does not write): asking again
            # with the same brief would be refused again, so hold until the brief changes.
            if last.request_id not in reported:
                out.failures.append(f"request {last.request_id} refused: {result.error}")
            held_for = now - _finished_at(last, result)
            if last.brief == settings.brief and held_for < rules.refusal_hold_s:
                out.held_back = (
                    f"request {last.request_id} was refused ({result.error}): change the "
                    "campaign's brief, or configure a generator model that writes it (asked "
                    f"again in {rules.refusal_hold_s - held_for:.0f} s)"
                )
                return out
        elif failed or timed_out:
            why = result.error if failed and result is not None else "no answer in time"
            attempt = _attempt_of(last.request_id)
            if attempt >= rules.max_attempts:
                if last.request_id not in reported:
                    out.failures.append(
                        f"request {last.request_id} failed after {attempt} attempts: {why}"
                    )
                # A failed chain still counts for the cool-down below.
            else:
                out.request = _retry(last, attempt + 1, now)
                return out
        if now - _finished_at(last, result) < settings.cooldown_s:
            out.held_back = "cool-down after the last request"
            return out

    # -- a new request for the worst underperformer -----------------------------------
    candidates = [
        rows[c.creative_id]
        for c in live
        if c.creative_id in rows
        and rows[c.creative_id].underperforming
        and c.creative_id in live_ids
        and c.creative_id not in settings.pinned
    ]
    if not candidates:
        return out
    if settings.brief is None:
        out.held_back = "the campaign has no brief: set one with PUT /v1/campaigns/{c}/settings"
        return out
    if campaign_requests >= settings.generation_budget:
        out.held_back = f"generation budget used ({settings.generation_budget} requests)"
        return out
    if len(live_ids) + len(pending) >= settings.max_live_per_audience + 1:
        out.held_back = f"{len(live_ids)} live and {len(pending)} pending: at the cap"
        return out
    worst = min(candidates, key=lambda r: (r.p_best, r.mean))
    winners = sorted(
        (rows[cid] for cid in live_ids if cid in rows and not rows[cid].underperforming),
        key=lambda r: -r.mean,
    )[: rules.winners_as_examples]
    shown = {r.creative_id for r in winners} | {worst.creative_id}
    earlier = [
        c
        for c in creatives.values()
        # Retired and rejected ones too: a person or the bandit already said no to them.
        if c.campaign == decision.campaign
        and (not c.audiences or audience in c.audiences)
        and c.creative_id not in shown
    ][-rules.earlier_creatives_max :]
    n = sum(1 for r in requests if _attempt_of(r.request_id) == 1) + 1
    out.request = GenerationRequest(
        request_id=f"{request_base(decision.campaign, audience)}-{n}-a1",
        campaign=decision.campaign,
        audience=audience,
        audience_description=settings.audience_descriptions.get(audience, audience),
        brief=settings.brief or Brief(product=decision.campaign),
        winners=[_example(creatives[r.creative_id], r.mean) for r in winners],
        underperformer=_example(creatives[worst.creative_id], worst.mean),
        earlier_creatives=[_example(c, None) for c in earlier],
        n_variants=settings.n_variants,
        auto_approve=settings.auto_approve,
        trigger=f"creative {worst.creative_id} {worst.label}: " + "; ".join(worst.reasons),
        requested_at=now,
    )
    return out


def _stem(request_id: str) -> str:
    """The request id without its attempt suffix (retries share the stem)."""
    head, _, tail = request_id.rpartition("-a")
    return head if head and tail.isdigit() else request_id


def _retry(request: GenerationRequest, attempt: int, now: float) -> GenerationRequest:
    return structs.replace(
        request, request_id=f"{_stem(request.request_id)}-a{attempt}", requested_at=now
    )


def _finished_at(request: GenerationRequest, result: GenerationResult | None) -> float:
    return result.finished_at if result is not None and result.finished_at else request.requested_at

"""People steer the loop over HTTP: campaign settings, the review queue, pins, the story.

Routes (mounted by the serving API):

* ``GET|PUT /v1/campaigns/{c}/settings``  brief, ``auto_approve``, pause, pins, budget;
* ``GET /v1/campaigns/{c}/review``  generated candidates waiting for a person, with their
  predicted CTR, filters passed and the verdict that asked for them;
* ``POST /v1/creatives/{id}/approve|reject|pin|unpin``  (body: ``{"actor", "reason"}``);
* ``GET /v1/campaigns/{c}/story``  every creative with its story: parent, request,
  trigger, prior, live CTR with its interval per audience, label, status changes;
* ``GET /v1/campaigns/{c}/audit``  the audit trail, newest first.

Every change is published (creatives / campaigns topics) together with an audit entry
naming the actor. ``auto_approve`` changes only here, by a named person: the loop never
turns it on.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from aiohttp import web
from msgspec import structs

from adloop.schemas import AuditEntry, Brief, CampaignSettings, Creative, StatusChange
from adloop.streams.follower import Follower
from adloop.streams.loop import audit

if TYPE_CHECKING:
    from adloop.streams.serving import ServingApi

_json = msgspec.json.Encoder()
Actor = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class Action(msgspec.Struct, kw_only=True):
    actor: Actor
    reason: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class SettingsUpdate(msgspec.Struct, kw_only=True, omit_defaults=True):
    actor: Actor
    reason: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    brief: Brief | None = None
    auto_approve: bool | None = None
    paused: bool | None = None
    n_variants: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    generation_budget: Annotated[int, msgspec.Meta(ge=0, le=100_000)] | None = None
    max_live_per_audience: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    cooldown_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    audience_descriptions: dict[str, str] | None = None


class AudienceStats(msgspec.Struct, kw_only=True):
    audience: str
    impressions: int
    clicks: int
    ctr: float
    ci_low: float
    ci_high: float
    label: str
    p_best: float
    serving_probability: float
    reasons: list[str]


class CreativeStory(msgspec.Struct, kw_only=True):
    creative: Creative
    pinned: bool
    prior_ctr: float | None
    audiences: list[AudienceStats]


class Story(msgspec.Struct, kw_only=True):
    campaign: str
    auto_approve: bool
    paused: bool
    creatives: list[CreativeStory]


class ReviewQueue(msgspec.Struct, kw_only=True):
    campaign: str
    auto_approve: bool
    candidates: list[Creative]


class AuditTrail(msgspec.Struct, kw_only=True):
    campaign: str
    entries: list[AuditEntry]


def _respond(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _respond({"error": code, "message": message}, status)


class Steering:
    def __init__(self, api: ServingApi, audit_keep: int = 1000) -> None:
        self.api = api
        self.campaigns: dict[str, CampaignSettings] = {}
        self.audit_log: dict[str, deque[AuditEntry]] = defaultdict(lambda: deque(maxlen=audit_keep))
        self.followers: list[Follower[Any]] = [
            Follower.latest(api.settings, "campaigns", self.campaigns),
            Follower(api.settings, "audit", self._on_audit),
        ]
        self._action = msgspec.json.Decoder(Action)
        self._update = msgspec.json.Decoder(SettingsUpdate)

    def _on_audit(self, a: AuditEntry) -> None:
        self.audit_log[a.campaign].append(a)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/campaigns/{campaign}/settings", self.get_settings),
            web.put("/v1/campaigns/{campaign}/settings", self.put_settings),
            web.get("/v1/campaigns/{campaign}/review", self.review),
            web.get("/v1/campaigns/{campaign}/story", self.story),
            web.get("/v1/campaigns/{campaign}/audit", self.audit_trail),
            web.post("/v1/creatives/{creative_id}/approve", self.approve),
            web.post("/v1/creatives/{creative_id}/reject", self.reject),
            web.post("/v1/creatives/{creative_id}/pin", self.pin),
            web.post("/v1/creatives/{creative_id}/unpin", self.unpin),
        ]

    def settings_for(self, campaign: str) -> CampaignSettings:
        return self.campaigns.get(campaign) or CampaignSettings(campaign=campaign)

    async def _publish(self, role: Any, key: str, value: msgspec.Struct) -> None:
        producer = self.api._producer
        assert producer is not None
        await producer.send_and_wait(
            self.api.settings.topic(role), _json.encode(value), key=key.encode()
        )

    async def _record(self, entry: AuditEntry) -> None:
        await self._publish("audit", entry.campaign, entry)
        self._on_audit(entry)

    # -- settings -----------------------------------------------------------------------
    async def get_settings(self, request: web.Request) -> web.Response:
        return _respond(self.settings_for(request.match_info["campaign"]))

    async def put_settings(self, request: web.Request) -> web.Response:
        campaign = request.match_info["campaign"]
        try:
            update = self._update.decode(await request.read())
        except msgspec.MsgspecError as exc:
            return _error(400, "invalid_request", f"settings body: {exc}")
        current = self.settings_for(campaign)
        changes = {
            name: getattr(update, name)
            for name in SettingsUpdate.__struct_fields__
            if name not in ("actor", "reason") and getattr(update, name) is not None
        }
        try:
            new = CampaignSettings(
                **{
                    **structs.asdict(current),
                    **changes,
                    "campaign": campaign,
                    "updated_at": time.time(),
                    "updated_by": update.actor,
                }
            )
        except (TypeError, msgspec.ValidationError) as exc:
            return _error(400, "invalid_request", str(exc))
        await self._publish("campaigns", campaign, new)
        self.campaigns[campaign] = new
        changed = {
            k: str(v) if not isinstance(v, bool | int | float) else v
            for k, v in changes.items()
            if k != "brief" and getattr(current, k) != v
        }
        if "brief" in changes and changes["brief"] != current.brief:
            changed["brief"] = "edited"
        await self._record(
            audit(campaign, "settings_changed", update.reason, actor=update.actor, **changed)
        )
        return _respond(new)

    # -- review -------------------------------------------------------------------------
    async def review(self, request: web.Request) -> web.Response:
        campaign = request.match_info["campaign"]
        pending = sorted(
            (
                c
                for c in self.api.registry.campaign_creatives(campaign)
                if c.status == "pending_review"
            ),
            key=lambda c: -(c.predicted_ctr or 0.0),
        )
        return _respond(
            ReviewQueue(
                campaign=campaign,
                auto_approve=self.settings_for(campaign).auto_approve,
                candidates=pending,
            )
        )

    async def _action_on_creative(
        self, request: web.Request
    ) -> tuple[Action, Creative] | web.Response:
        """The action's body and its creative, or the error response saying what is wrong."""
        creative_id = request.match_info["creative_id"]
        try:
            body = self._action.decode(await request.read())
        except msgspec.MsgspecError as exc:
            return _error(400, "invalid_request", f'body must be {{"actor", "reason"}}: {exc}')
        creative = self.api.registry.get(creative_id)
        if creative is None:
            return _error(404, "unknown_creative", f"creative {creative_id!r} is not known")
        return body, creative

    async def _change_status(
        self, request: web.Request, action: str, allowed_from: set[str], to: str
    ) -> web.Response:
        found = await self._action_on_creative(request)
        if isinstance(found, web.Response):
            return found
        body, creative = found
        creative_id = creative.creative_id
        if creative.status not in allowed_from:
            return _error(
                409,
                "invalid_status",
                f"creative {creative_id!r} is {creative.status}; {action} needs one of "
                f"{sorted(allowed_from)}",
            )
        change = StatusChange(
            at=time.time(), actor=body.actor, action=action, status=to, reason=body.reason
        )
        updated = structs.replace(creative, status=to, history=[*creative.history, change])
        await self._publish("creatives", creative_id, updated)
        self.api.registry.put(updated)
        await self._record(
            audit(
                creative.campaign,
                action,
                body.reason,
                actor=body.actor,
                creative_id=creative_id,
                from_status=creative.status,
                to_status=to,
            )
        )
        return _respond(updated)

    async def approve(self, request: web.Request) -> web.Response:
        return await self._change_status(request, "approved", {"pending_review"}, "active")

    async def reject(self, request: web.Request) -> web.Response:
        return await self._change_status(request, "rejected", {"pending_review"}, "rejected")

    async def _pin(self, request: web.Request, pinned: bool) -> web.Response:
        found = await self._action_on_creative(request)
        if isinstance(found, web.Response):
            return found
        body, creative = found
        creative_id = creative.creative_id
        current = self.settings_for(creative.campaign)
        pins = set(current.pinned)
        pins = pins | {creative_id} if pinned else pins - {creative_id}
        new = structs.replace(
            current, pinned=sorted(pins), updated_at=time.time(), updated_by=body.actor
        )
        await self._publish("campaigns", creative.campaign, new)
        self.campaigns[creative.campaign] = new
        await self._record(
            audit(
                creative.campaign,
                "pinned" if pinned else "unpinned",
                body.reason,
                actor=body.actor,
                creative_id=creative_id,
            )
        )
        return _respond(new)

    async def pin(self, request: web.Request) -> web.Response:
        return await self._pin(request, True)

    async def unpin(self, request: web.Request) -> web.Response:
        return await self._pin(request, False)

    # -- story and audit -------------------------------------------------------------
    async def story(self, request: web.Request) -> web.Response:
        campaign = request.match_info["campaign"]
        creatives = self.api.registry.campaign_creatives(campaign)
        if not creatives:
            return _error(404, "unknown_campaign", f"campaign {campaign!r} is not known")
        settings = self.settings_for(campaign)
        stats: dict[str, list[AudienceStats]] = defaultdict(list)
        for decision in self.api.decisions.values():
            if decision.campaign != campaign:
                continue
            for row in decision.creatives:
                stats[row.creative_id].append(
                    AudienceStats(
                        audience=decision.audience,
                        impressions=row.impressions,
                        clicks=row.clicks,
                        ctr=row.clicks / row.impressions if row.impressions else 0.0,
                        ci_low=row.ci_low,
                        ci_high=row.ci_high,
                        label=row.label,
                        p_best=row.p_best,
                        serving_probability=row.serving_probability,
                        reasons=row.reasons,
                    )
                )
        return _respond(
            Story(
                campaign=campaign,
                auto_approve=settings.auto_approve,
                paused=settings.paused,
                creatives=[
                    CreativeStory(
                        creative=c,
                        pinned=c.creative_id in settings.pinned,
                        prior_ctr=c.predicted_ctr,
                        audiences=sorted(stats.get(c.creative_id, []), key=lambda s: s.audience),
                    )
                    for c in sorted(creatives, key=lambda c: c.creative_id)
                ],
            )
        )

    async def audit_trail(self, request: web.Request) -> web.Response:
        campaign = request.match_info["campaign"]
        entries = list(reversed(self.audit_log.get(campaign, deque())))
        return _respond(AuditTrail(campaign=campaign, entries=entries))

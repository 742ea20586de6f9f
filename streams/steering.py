"""People steer the loop over HTTP: campaign settings, the review queue, pins, the story.

Routes (mounted by the serving API):

* ``GET|PUT /v1/campaigns/{c}/settings``  brief, ``auto_approve``, pause, pins, budget;
* ``GET /v1/campaigns/{c}/review``  generated candidates waiting for a person, with their
  predicted CTR, filters passed and the verdict that asked for them;
* ``POST /v1/creatives/{id}/approve|reject|pin|unpin``  (body: ``{"reason"}``);
* ``GET /v1/campaigns/{c}/story``  every creative with its story: parent, request,
  trigger, prior, live CTR with its interval per audience, label, status changes;
* ``GET /v1/campaigns/{c}/audit``  the audit trail, newest first.

Every change is published (creatives / campaigns topics) together with one audit entry
naming the actor, which is the authenticated token's name (streams/auth.py), never a
field of the body. ``auto_approve`` changes only here, by an admin: the loop never
turns it on.

Writes are validated with the decoder the readers use before they are published;
unknown fields are refused. Each write raises the record's ``version``; ``If-Match``
on settings makes a stale write a 409; a write that loses a race with another replica
(schemas/versioning.py) is a 409 too, and never undoes the winner.
"""

from __future__ import annotations

import asyncio
import time
import unicodedata
from collections import OrderedDict, defaultdict
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from aiohttp import web

from adloop.schemas import AuditEntry, Brief, CampaignSettings, Creative, StatusChange
from adloop.schemas.privacy import is_safe_token
from adloop.schemas.records import Identifier
from adloop.schemas.versioning import bump
from adloop.streams.auth import Principal, principal_of
from adloop.streams.follower import Follower
from adloop.streams.loop import audit

if TYPE_CHECKING:
    from adloop.streams.serving import ServingApi

_json = msgspec.json.Encoder()
_settings_decoder = msgspec.json.Decoder(CampaignSettings)
_creative_decoder = msgspec.json.Decoder(Creative)
_id_decoder = msgspec.json.Decoder(Identifier)
Reason = Annotated[str, msgspec.Meta(max_length=1000)]


class Action(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of approve/reject/pin/unpin. The actor is the token's name."""

    reason: Reason = ""


#: Settings an editor may change; every other field needs an admin.
EDITOR_FIELDS = frozenset({"brief", "audience_descriptions"})


class SettingsUpdate(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    reason: Reason = ""
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


def _unsafe_text(value: str) -> bool:
    """Control, format (bidirectional marks, zero-width) or line-break characters: they
    flow into RocksDB keys, logs and the LLM prompt, where they hide or reorder text."""
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value)


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [*value.keys(), *(s for v in value.values() for s in _texts(v))]
    if isinstance(value, list):
        return [s for v in value for s in _texts(v)]
    if isinstance(value, msgspec.Struct):
        return _texts(msgspec.structs.asdict(value))
    return []


def validate_identifier(value: str, what: str) -> web.Response | None:
    """400 unless ``value`` follows the id alphabet (what every reader decodes)."""
    try:
        _id_decoder.decode(_json.encode(value))
    except msgspec.ValidationError:
        return _error(
            400,
            "invalid_id",
            f"{what} {value[:80]!r}: 1-128 characters, letters, digits and _ . : @ - (not first)",
        )
    return None


def _diff(old: Any, new: Any, prefix: str) -> dict[str, str]:
    """What changed, field by field, as audit details ("brief.product": "'a' -> 'b'")."""
    if isinstance(old, msgspec.Struct) or isinstance(new, msgspec.Struct):
        a = msgspec.structs.asdict(old) if isinstance(old, msgspec.Struct) else {}
        b = msgspec.structs.asdict(new) if isinstance(new, msgspec.Struct) else {}
        out: dict[str, str] = {}
        for name in sorted({*a, *b}):
            out.update(_diff(a.get(name), b.get(name), f"{prefix}.{name}"))
        return out
    if old == new:
        return {}
    return {prefix: f"{old!r} -> {new!r}"[:300]}


class Steering:
    def __init__(self, api: ServingApi, audit_keep: int = 1000) -> None:
        self.api = api
        self.campaigns: dict[str, CampaignSettings] = {}
        # The newest entries per campaign, once each: this replica appends its own entries
        # at once and meets them again on the topic (keyed by writer and sequence).
        self.audit_keep = audit_keep
        self.audit_log: dict[str, OrderedDict[tuple[str, int] | int, AuditEntry]] = defaultdict(
            OrderedDict
        )
        self.followers: list[Follower[Any]] = [
            Follower.latest(api.settings, "campaigns", self.campaigns),
            Follower(api.settings, "audit", self._on_audit),
        ]
        self._action = msgspec.json.Decoder(Action)
        self._update = msgspec.json.Decoder(SettingsUpdate)
        # One write at a time per campaign / creative in this process (read-modify-write).
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def _on_audit(self, a: AuditEntry) -> None:
        entries = self.audit_log[a.campaign]
        entries[(a.writer, a.seq) if a.writer else id(a)] = a
        while len(entries) > self.audit_keep:
            entries.popitem(last=False)

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
        sealed = self.api.audit_chain.seal(entry)
        await self._publish("audit", entry.campaign, sealed)
        self._on_audit(sealed)

    async def _publish_settings(self, new: CampaignSettings) -> web.Response | None:
        """Validate with the readers' decoder, publish, read back: None when ours won."""
        try:
            new = _settings_decoder.decode(_json.encode(new))
        except msgspec.ValidationError as exc:
            return _error(400, "invalid_request", f"settings: {exc}")
        await self._publish("campaigns", new.campaign, new)
        campaigns_follower = self.followers[0]
        await campaigns_follower.sync(timeout=10.0)
        current = self.campaigns.get(new.campaign)
        if current != new:
            # Another replica's write of the same version came first: it stands, and
            # re-publishing it keeps it the last record of its key for compaction.
            if current is not None:
                await self._publish("campaigns", current.campaign, current)
            return _error(
                409,
                "write_conflict",
                f"campaign {new.campaign!r} settings changed concurrently (now version "
                f"{current.version if current else 0}); read them again and retry",
            )
        return None

    # -- settings -----------------------------------------------------------------------
    async def get_settings(self, request: web.Request) -> web.Response:
        campaign = request.match_info["campaign"]
        bad = validate_identifier(campaign, "campaign")
        if bad is not None:
            return bad
        current = self.settings_for(campaign)
        response = _respond(current)
        response.headers["ETag"] = f'"{current.version}"'
        return response

    async def put_settings(self, request: web.Request) -> web.Response:
        campaign = request.match_info["campaign"]
        bad = validate_identifier(campaign, "campaign")
        if bad is not None:
            return bad
        principal = principal_of(request)
        try:
            update = self._update.decode(await request.read())
        except msgspec.MsgspecError as exc:
            return _error(400, "invalid_request", f"settings body: {exc}")
        changes = {
            name: getattr(update, name)
            for name in SettingsUpdate.__struct_fields__
            if name != "reason" and getattr(update, name) is not None
        }
        if not changes:
            return _error(400, "invalid_request", "settings body changes nothing")
        if set(changes) - EDITOR_FIELDS:
            principal.require("admin", campaign)
        unsafe = [s for s in _texts(changes) if _unsafe_text(s)]
        if unsafe:
            return _error(
                400,
                "invalid_text",
                f"text with control, line-break or bidirectional characters: {unsafe[0][:60]!r}",
            )
        bad_audiences = [
            a for a in changes.get("audience_descriptions") or {} if not is_safe_token(a)
        ]
        if bad_audiences:
            return _error(
                400, "invalid_id", f"audience id {bad_audiences[0][:80]!r}: letters, digits, _.:@-"
            )
        async with self._locks[f"campaign:{campaign}"]:
            current = self.settings_for(campaign)
            expected = request.headers.get("If-Match")
            if expected is not None and expected.strip('"W/') != str(current.version):
                return _error(
                    409,
                    "stale_version",
                    f"settings of {campaign!r} are at version {current.version}, "
                    f"not {expected}; read them again (GET) and retry",
                )
            new = bump(
                current,
                **changes,
                updated_at=time.time(),
                updated_by=principal.actor,
            )
            failed = await self._publish_settings(new)
            if failed is not None:
                return failed
            changed: dict[str, Any] = {}
            for name, value in changes.items():
                before = getattr(current, name)
                if isinstance(value, msgspec.Struct) or isinstance(before, msgspec.Struct):
                    changed.update(_diff(before, value, name))
                elif before != value:
                    changed[name] = value if isinstance(value, bool | int | float) else str(value)
            if changed:
                await self._record(
                    audit(
                        campaign,
                        "settings_changed",
                        update.reason,
                        actor=principal.actor,
                        version=new.version,
                        **changed,
                    )
                )
        response = _respond(self.campaigns[campaign])
        response.headers["ETag"] = f'"{new.version}"'
        return response

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
    ) -> tuple[Action, Creative, Principal] | web.Response:
        """The action's body, its creative and the caller, or the error response."""
        creative_id = request.match_info["creative_id"]
        bad = validate_identifier(creative_id, "creative id")
        if bad is not None:
            return bad
        try:
            body = self._action.decode(await request.read() or b"{}")
        except msgspec.MsgspecError as exc:
            return _error(
                400,
                "invalid_request",
                f'body must be {{"reason": "..."}} (the actor is your token): {exc}',
            )
        creative = self.api.registry.get(creative_id)
        if creative is None:
            return _error(404, "unknown_creative", f"creative {creative_id!r} is not known")
        principal = principal_of(request)
        principal.require("review", creative.campaign)
        return body, creative, principal

    async def _change_status(
        self, request: web.Request, action: str, allowed_from: set[str], to: str
    ) -> web.Response:
        found = await self._action_on_creative(request)
        if isinstance(found, web.Response):
            return found
        body, _, principal = found
        creative_id = request.match_info["creative_id"]
        async with self._locks[f"creative:{creative_id}"]:
            creative = self.api.registry.get(creative_id)
            assert creative is not None
            if creative.status not in allowed_from:
                return _error(
                    409,
                    "invalid_status",
                    f"creative {creative_id!r} is {creative.status}; {action} needs one of "
                    f"{sorted(allowed_from)}",
                )
            change = StatusChange(
                at=time.time(),
                actor=principal.actor,
                action=action,
                status=to,
                reason=body.reason,
            )
            updated = bump(creative, status=to, history=[*creative.history, change])
            failed = await self.api.publish_creative(updated)
            if failed is not None:
                return failed
            await self._record(
                audit(
                    creative.campaign,
                    action,
                    body.reason,
                    actor=principal.actor,
                    creative_id=creative_id,
                    from_status=creative.status,
                    to_status=to,
                    version=updated.version,
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
        body, creative, principal = found
        creative_id = creative.creative_id
        async with self._locks[f"campaign:{creative.campaign}"]:
            current = self.settings_for(creative.campaign)
            if (creative_id in current.pinned) == pinned:
                return _respond(current)  # already so: no change, no audit entry
            pins = set(current.pinned)
            pins = pins | {creative_id} if pinned else pins - {creative_id}
            new = bump(
                current, pinned=sorted(pins), updated_at=time.time(), updated_by=principal.actor
            )
            failed = await self._publish_settings(new)
            if failed is not None:
                return failed
            await self._record(
                audit(
                    creative.campaign,
                    "pinned" if pinned else "unpinned",
                    body.reason,
                    actor=principal.actor,
                    creative_id=creative_id,
                    version=new.version,
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
        entries = list(reversed(self.audit_log.get(campaign, OrderedDict()).values()))
        return _respond(AuditTrail(campaign=campaign, entries=entries))

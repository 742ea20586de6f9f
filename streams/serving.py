"""The serving API: which creative to show, and creative registration.

A stateless process: it follows the compacted decisions and creatives topics
(every partition, from the earliest record) and answers from memory, so it scales
out independently of the stream workers and never waits on a rebalance.

``POST /v1/select`` draws from the Thompson serving probabilities of the
latest decision (with an exploration floor), so the propensity it returns is
the exact probability with which the creative was chosen — what off-policy
evaluation needs in the logs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adloop.bandit import BetaPrior, CreativeEngine
from adloop.schemas import Creative, Decision, StatusChange, decision_key
from adloop.schemas.audit import AuditChain
from adloop.schemas.records import Identifier
from adloop.schemas.versioning import bump
from adloop.streams import metrics
from adloop.streams.auth import TokenStore, auth_middleware, principal_of
from adloop.streams.config import Settings
from adloop.streams.context import RequestCells
from adloop.streams.follower import Follower
from adloop.streams.kafka_io import producer_kwargs
from adloop.streams.loop import audit
from adloop.streams.posterior import prior_for
from adloop.streams.registry import CreativeRegistry, registry_follower
from adloop.streams.steering import Steering, _diff, _unsafe_text, validate_identifier

log = logging.getLogger("adloop.serve")


ContextKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
BoundedContextValue = Annotated[str, msgspec.Meta(max_length=256)] | int | float | bool


class SelectRequest(msgspec.Struct, kw_only=True):
    campaign: Identifier
    audience: Identifier
    placement: Identifier = "default"
    # Bounded: 64 features of at most 256 characters (a request is never a payload).
    context: Annotated[dict[ContextKey, BoundedContextValue], msgspec.Meta(max_length=64)] = {}


class CreativeDraft(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a person authors when registering or editing a creative. Everything else
    (status, origin, lineage, history, priors, version) is adloop's alone."""

    creative_id: Identifier
    campaign: Identifier
    headline: Annotated[str, msgspec.Meta(min_length=1, max_length=90)]
    description: Annotated[str, msgspec.Meta(max_length=300)] = ""
    audiences: Annotated[list[Identifier], msgspec.Meta(max_length=256)] = []
    reason: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class BatchSelectRequest(SelectRequest, kw_only=True):
    """``n`` independent choices for the same campaign × audience × placement."""

    n: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100


class Choice(msgspec.Struct, kw_only=True, array_like=True):
    impression_id: str
    creative_id: str
    propensity: float


class BatchSelectResponse(msgspec.Struct, kw_only=True):
    campaign: str
    audience: str
    placement: str
    policy: str
    cold_start: bool
    decided_at: float
    # [impression_id, creative_id, propensity] per choice.
    choices: list[Choice]


class SelectResponse(msgspec.Struct, kw_only=True):
    impression_id: str
    campaign: str
    audience: str
    placement: str
    creative_id: str
    headline: str
    description: str
    propensity: float
    policy: str
    cold_start: bool
    decided_at: float
    # The contextual policy's cell the request's context mapped to (None: not used).
    context_cell: str | None = None


class BestResponse(msgspec.Struct, kw_only=True):
    campaign: str
    audience: str
    creative: Creative
    mean: float
    ci_low: float
    ci_high: float
    impressions: int
    clicks: int
    serving_probability: float
    label: str
    p_best: float
    policy: str
    updated_at: float


class CreativeList(msgspec.Struct, kw_only=True):
    campaign: str
    creatives: list[Creative]


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: str
    message: str


class Health(msgspec.Struct, kw_only=True):
    status: str
    creatives: int
    decisions: int


class Readiness(msgspec.Struct, kw_only=True):
    ready: bool
    reasons: list[str]
    newest_decision_age_s: float | None
    followers: list[dict[str, Any]]
    registry_ignored: dict[str, int]


_json = msgspec.json.Encoder()
_creative_decoder = msgspec.json.Decoder(Creative)
#: Selections cached per campaign|audience|placement (LRU): bounded whatever audiences
#: callers send.
SELECTION_CACHE_SIZE = 10_000


def _respond(body: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _respond(ErrorResponse(error=code, message=message), status)


@dataclass
class _Selection:
    version: tuple[int, float]
    creatives: list[Creative]
    cumulative: np.ndarray
    probabilities: np.ndarray
    cold_start: bool
    policy: str
    context_cell: str | None = None


class ServingApi:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = CreativeRegistry()
        self.registry_follower = registry_follower(settings, self.registry)
        # The latest decision per campaign|audience. Selection waits on it, so it polls
        # with the configured (short) fetch wait, not the followers' gentle one.
        self.decisions: dict[str, Decision] = {}
        self.decision_follower = Follower(
            settings, "decisions", self._on_decision, fetch_max_wait_ms=settings.fetch_wait_ms
        )
        self.rng = np.random.default_rng()
        self.engine_config = settings.engine_config()
        self._selections: OrderedDict[str, _Selection] = OrderedDict()
        self._producer: AIOKafkaProducer | None = None
        self._select_decoder = msgspec.json.Decoder(SelectRequest)
        self._batch_decoder = msgspec.json.Decoder(BatchSelectRequest)
        self._draft_decoder = msgspec.json.Decoder(CreativeDraft)
        self.tokens = TokenStore(settings.tokens_path)
        # This process's audit chains (schemas/audit.py): one writer id per process.
        writer = f"serve-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.audit_chain = AuditChain(writer, settings.audit_key_bytes())
        self._newest_decision_at = 0.0
        self.steering = Steering(self)
        # The contextual policy's cells: a request's context -> the decision's entry.
        self.context_cells = RequestCells(settings.privacy_policy())

    def _on_decision(self, decision: Decision) -> None:
        self.decisions[decision_key(decision.campaign, decision.audience)] = decision
        now = time.time()
        self._newest_decision_at = max(self._newest_decision_at, decision.updated_at)
        if decision.last_event_at:
            # Newest event counted -> visible here: the click -> decision latency.
            metrics.EVENT_TO_DECISION.labels("serve").observe(
                max(0.0, now - decision.last_event_at)
            )

    @property
    def followers(self) -> list[Follower[Any]]:
        return [self.registry_follower, self.decision_follower, *self.steering.followers]

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**producer_kwargs(self.settings, acks="all"))
        await self._producer.start()
        # Together: each start lists offsets and reads the true ends, a few fetch waits.
        await asyncio.gather(*(follower.start() for follower in self.followers))
        for follower in self.followers:
            await follower.wait_caught_up()

    async def stop(self) -> None:
        for follower in self.followers:
            await follower.stop()
        if self._producer is not None:
            await self._producer.stop()

    def web_app(self) -> web.Application:
        auth = auth_middleware(self.tokens, self.settings.requires_select_token())
        app = web.Application(middlewares=[_error_middleware, auth], client_max_size=1024 * 1024)
        app.add_routes(
            [
                web.get("/healthz", self.health),
                web.get("/readyz", self.ready),
                web.get("/metrics", self.metrics),
                web.post("/v1/select", self.select),
                web.post("/v1/select/batch", self.select_batch),
                web.post("/v1/creatives", self.register_creative),
                web.get("/v1/campaigns/{campaign}/creatives", self.list_creatives),
                web.get("/v1/campaigns/{campaign}/audiences/{audience}/best", self.best),
                web.get("/v1/campaigns/{campaign}/audiences/{audience}/decision", self.decision),
                *self.steering.routes(),
            ]
        )

        async def on_startup(_: web.Application) -> None:
            await self.start()

        async def on_cleanup(_: web.Application) -> None:
            await self.stop()

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app

    # -- selection -----------------------------------------------------------------
    def selection(
        self,
        campaign: str,
        audience: str,
        placement: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> _Selection | None:
        key = decision_key(campaign, audience)
        decision = self.decisions.get(key)
        # The contextual policy publishes a distribution per placement, and one per
        # placement and context cell for requests with a context (streams/context.py).
        cell = None
        if context and decision is not None and decision.contextual is not None:
            cell = self.context_cells.entry(decision.contextual, placement or "", context)
        by_placement = decision.placements.get(placement or "") if decision else None
        if cell is not None:
            by_placement = cell.probabilities
        cache_key = f"{key}|{placement}" if by_placement else key
        if cell is not None:
            cache_key = f"{cache_key}|{cell.cell}"
        version = (self.registry.version, decision.updated_at if decision else 0.0)
        cached = self._selections.get(cache_key)
        if cached is not None and cached.version == version:
            self._selections.move_to_end(cache_key)
            return cached
        creatives = self.registry.servable(campaign, audience)
        if not creatives:
            return None
        probabilities = None
        if by_placement and {c.creative_id for c in creatives} <= by_placement.keys():
            probabilities = np.array([by_placement[c.creative_id] for c in creatives])
            probabilities = probabilities / probabilities.sum()
        served_cell = cell.cell if cell is not None and probabilities is not None else None
        if probabilities is None:
            probabilities = self._decision_probabilities(decision, creatives)
        if probabilities is None:
            probabilities = self._local_probabilities(decision, creatives)
        cumulative = np.cumsum(probabilities)
        cumulative[-1] = 1.0
        cached = _Selection(
            version,
            creatives,
            cumulative,
            probabilities,
            decision is None,
            decision.policy if decision else self.settings.policy,
            served_cell,
        )
        self._selections[cache_key] = cached
        self._selections.move_to_end(cache_key)
        while len(self._selections) > SELECTION_CACHE_SIZE:
            self._selections.popitem(last=False)
        return cached

    @staticmethod
    def _decision_probabilities(
        decision: Decision | None, creatives: list[Creative]
    ) -> np.ndarray | None:
        """The worker's serving probabilities, if it served the same creatives we would."""
        if decision is None:
            return None
        served = {
            r.creative_id: r.serving_probability
            for r in decision.creatives
            if r.serving_probability > 0
        }
        if set(served) != {c.creative_id for c in creatives}:
            return None
        probabilities = np.array([served[c.creative_id] for c in creatives])
        return probabilities / probabilities.sum()

    def _local_probabilities(
        self, decision: Decision | None, creatives: list[Creative]
    ) -> np.ndarray:
        """The configured policy's probabilities over the creatives we would serve, from
        the worker's posteriors (a creative the worker does not know yet starts from its
        prior). Used only until the worker publishes a decision for this set."""
        posteriors = {
            row.creative_id: BetaPrior(row.alpha, row.beta)
            for row in (decision.creatives if decision else [])
        }
        engine = CreativeEngine(self.engine_config)
        for creative in creatives:
            engine.add_arm(
                creative.creative_id,
                posteriors.get(creative.creative_id) or prior_for(creative),
            )
        return engine.serving_probabilities(self.rng)

    async def select_batch(self, request: web.Request) -> web.Response:
        """Many impressions at once (exchanges that decide in bulk, simulators, replays)."""
        try:
            body = self._batch_decoder.decode(await request.read())
        except msgspec.MsgspecError as exc:
            return _error(400, "invalid_request", f"select body: {exc}")
        principal_of(request).require("select", body.campaign)
        chosen = self._choose(body)
        if isinstance(chosen, web.Response):
            return chosen
        indices = np.minimum(
            np.searchsorted(chosen.cumulative, self.rng.random(body.n), side="right"),
            len(chosen.creatives) - 1,
        )
        prefix = uuid.uuid4().hex
        return _respond(
            BatchSelectResponse(
                campaign=body.campaign,
                audience=body.audience,
                placement=body.placement,
                policy=chosen.policy,
                cold_start=chosen.cold_start,
                decided_at=time.time(),
                choices=[
                    Choice(
                        impression_id=f"{prefix}-{i}",
                        creative_id=chosen.creatives[int(j)].creative_id,
                        propensity=float(chosen.probabilities[int(j)]),
                    )
                    for i, j in enumerate(indices)
                ],
            )
        )

    def _choose(self, body: SelectRequest) -> _Selection | web.Response:
        """The selection for a request, or the error response saying why there is none."""
        if not self.registry.has_campaign(body.campaign):
            return _error(
                404,
                "unknown_campaign",
                f"campaign {body.campaign!r} has no registered creatives; "
                "register some with POST /v1/creatives",
            )
        chosen = self.selection(body.campaign, body.audience, body.placement, body.context)
        if chosen is None:
            return _error(
                404,
                "no_servable_creative",
                f"campaign {body.campaign!r} has no active creative for audience {body.audience!r}",
            )
        return chosen

    async def select(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = self._select_decoder.decode(await request.read())
        except msgspec.MsgspecError as exc:
            return _error(400, "invalid_request", f"select body: {exc}")
        principal_of(request).require("select", body.campaign)
        chosen = self._choose(body)
        if isinstance(chosen, web.Response):
            return chosen
        index = int(np.searchsorted(chosen.cumulative, self.rng.random(), side="right"))
        index = min(index, len(chosen.creatives) - 1)
        creative = chosen.creatives[index]
        metrics.SELECT_SECONDS.observe(time.perf_counter() - started)
        return _respond(
            SelectResponse(
                impression_id=uuid.uuid4().hex,
                campaign=body.campaign,
                audience=body.audience,
                placement=body.placement,
                creative_id=creative.creative_id,
                headline=creative.headline,
                description=creative.description,
                propensity=float(chosen.probabilities[index]),
                policy=chosen.policy,
                cold_start=chosen.cold_start,
                decided_at=time.time(),
                context_cell=chosen.context_cell,
            )
        )

    # -- reads --------------------------------------------------------------------------
    def _decision_or_error(self, request: web.Request) -> Decision | web.Response:
        campaign = request.match_info["campaign"]
        audience = request.match_info["audience"]
        if not self.registry.has_campaign(campaign):
            return _error(404, "unknown_campaign", f"campaign {campaign!r} is not known")
        decision = self.decisions.get(decision_key(campaign, audience))
        if decision is None:
            known = sorted(
                k.split("|", 1)[1] for k in self.decisions if k.startswith(f"{campaign}|")
            )
            return _error(
                404,
                "unknown_audience",
                f"no traffic yet for audience {audience!r} of campaign {campaign!r}; "
                f"audiences with traffic: {known}",
            )
        return decision

    async def decision(self, request: web.Request) -> web.Response:
        found = self._decision_or_error(request)
        return found if isinstance(found, web.Response) else _respond(found)

    async def best(self, request: web.Request) -> web.Response:
        found = self._decision_or_error(request)
        if isinstance(found, web.Response):
            return found
        decision = found
        row = next(
            (
                r
                for r in decision.creatives
                if r.serving_probability > 0 and self.registry.get(r.creative_id) is not None
            ),
            None,
        )
        if row is None:
            return _error(
                404,
                "no_servable_creative",
                f"no active creative for {decision.campaign}/{decision.audience}",
            )
        creative = self.registry.get(row.creative_id)
        assert creative is not None
        return _respond(
            BestResponse(
                campaign=decision.campaign,
                audience=decision.audience,
                creative=creative,
                mean=row.mean,
                ci_low=row.ci_low,
                ci_high=row.ci_high,
                impressions=row.impressions,
                clicks=row.clicks,
                serving_probability=row.serving_probability,
                label=row.label,
                p_best=row.p_best,
                policy=decision.policy,
                updated_at=decision.updated_at,
            )
        )

    async def list_creatives(self, request: web.Request) -> web.Response:
        campaign = request.match_info["campaign"]
        if not self.registry.has_campaign(campaign):
            return _error(404, "unknown_campaign", f"campaign {campaign!r} is not known")
        creatives = sorted(self.registry.campaign_creatives(campaign), key=lambda c: c.creative_id)
        return _respond(CreativeList(campaign=campaign, creatives=creatives))

    async def health(self, request: web.Request) -> web.Response:
        return _respond(
            Health(
                status="ok",
                creatives=len(self.registry.creatives),
                decisions=len(self.decisions),
            )
        )

    def readiness(self) -> Readiness:
        reasons = []
        statuses = [f.status() for f in self.followers]
        for status in statuses:
            if not status.caught_up:
                reasons.append(f"{status.topic}: not caught up")
            if not status.running:
                reasons.append(f"{status.topic}: not running ({status.last_error})")
        age = time.time() - self._newest_decision_at if self._newest_decision_at else None
        ready = not reasons
        metrics.READY.labels("serve").set(1.0 if ready else 0.0)
        return Readiness(
            ready=ready,
            reasons=reasons,
            newest_decision_age_s=round(age, 3) if age is not None else None,
            followers=[
                msgspec.structs.asdict(s) if isinstance(s, msgspec.Struct) else vars(s)
                for s in statuses
            ],
            registry_ignored=dict(self.registry.ignored),
        )

    async def ready(self, request: web.Request) -> web.Response:
        """503 until every follower has caught up (and while one is down); the body says
        which, with each follower's decode errors and the newest decision's age."""
        readiness = self.readiness()
        return web.Response(
            body=msgspec.json.encode(readiness, enc_hook=str),
            status=200 if readiness.ready else 503,
            content_type="application/json",
        )

    async def metrics(self, request: web.Request) -> web.Response:
        if self._newest_decision_at:
            metrics.DECISION_AGE.set(time.time() - self._newest_decision_at)
        self.readiness()
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- writes -----------------------------------------------------------------------
    async def publish_creative(self, creative: Creative) -> web.Response | None:
        """Validate with the readers' decoder, publish, read back: None when ours won
        (schemas/versioning.py), else the 409 saying what happened."""
        try:
            creative = _creative_decoder.decode(_json.encode(creative))
        except msgspec.ValidationError as exc:
            return _error(400, "invalid_request", f"creative: {exc}")
        assert self._producer is not None
        topic = self.settings.topic("creatives")
        key = creative.creative_id.encode()
        await self._producer.send_and_wait(topic, _json.encode(creative), key=key)
        await self.registry_follower.sync(timeout=10.0)
        current = self.registry.get(creative.creative_id)
        if current == creative:
            return None
        if current is not None:
            # The winner stays the last record of its key, whatever compaction keeps.
            await self._producer.send_and_wait(topic, _json.encode(current), key=key)
        if current is not None and current.campaign != creative.campaign:
            return _error(
                409,
                "creative_id_taken",
                f"creative {creative.creative_id!r} belongs to campaign "
                f"{current.campaign!r}; choose another id",
            )
        return _error(
            409,
            "write_conflict",
            f"creative {creative.creative_id!r} changed concurrently (now version "
            f"{current.version if current else 0}); read it again and retry",
        )

    async def register_creative(self, request: web.Request) -> web.Response:
        """Register a human-written creative, or edit one's text (back to review)."""
        try:
            draft = self._draft_decoder.decode(await request.read())
        except msgspec.MsgspecError as exc:
            return _error(
                400,
                "invalid_request",
                f"creative body: {exc} (clients set creative_id, campaign, headline, "
                "description, audiences; status, origin, lineage, history and priors are "
                "adloop's)",
            )
        principal = principal_of(request)
        principal.require("edit", draft.campaign)
        unsafe = [s for s in (draft.headline, draft.description) if _unsafe_text(s)]
        if unsafe:
            return _error(
                400, "invalid_text", "headline/description with control or bidi characters"
            )
        for audience in draft.audiences:
            bad = validate_identifier(audience, "audience")
            if bad is not None:
                return bad
        now = time.time()
        async with self.steering._locks[f"creative:{draft.creative_id}"]:
            existing = self.registry.get(draft.creative_id)
            if existing is None:
                creative = Creative(
                    creative_id=draft.creative_id,
                    campaign=draft.campaign,
                    headline=draft.headline,
                    description=draft.description,
                    audiences=draft.audiences,
                    origin="human",
                    status="active",
                    created_at=now,
                    version=1,
                    history=[
                        StatusChange(
                            at=now,
                            actor=principal.actor,
                            action="registered",
                            status="active",
                            reason=draft.reason,
                        )
                    ],
                )
                action, details, status_code = "creative_registered", {}, 201
            else:
                refused = _refuse_edit(existing, draft)
                if refused is not None:
                    return refused
                fields = ("headline", "description", "audiences")
                if all(getattr(existing, f) == getattr(draft, f) for f in fields):
                    return _respond(existing)  # nothing changed: no write, no audit entry
                # An edited text is a new ad: a person reviews it before it serves again.
                status = "pending_review" if existing.status == "active" else existing.status
                creative = bump(
                    existing,
                    headline=draft.headline,
                    description=draft.description,
                    audiences=draft.audiences,
                    status=status,
                    history=[
                        *existing.history,
                        StatusChange(
                            at=now,
                            actor=principal.actor,
                            action="edited",
                            status=status,
                            reason=draft.reason,
                        ),
                    ],
                )
                action, status_code = "creative_edited", 200
                details = {
                    **{
                        k: v
                        for f in fields
                        for k, v in _diff(getattr(existing, f), getattr(draft, f), f).items()
                    },
                    "from_status": existing.status,
                    "to_status": status,
                }
            failed = await self.publish_creative(creative)
            if failed is not None:
                return failed
            await self.steering._record(
                audit(
                    creative.campaign,
                    action,
                    draft.reason,
                    actor=principal.actor,
                    creative_id=creative.creative_id,
                    version=creative.version,
                    **details,
                )
            )
        return _respond(creative, status_code)


def _refuse_edit(existing: Creative, draft: CreativeDraft) -> web.Response | None:
    if existing.campaign != draft.campaign:
        return _error(
            409,
            "creative_id_taken",
            f"creative {draft.creative_id!r} belongs to campaign {existing.campaign!r}; "
            "choose another id",
        )
    if existing.origin == "generated":
        return _error(
            409,
            "generated_creative",
            f"creative {draft.creative_id!r} was generated: only review actions (approve, "
            "reject, pin) change it; register your own text under a new id",
        )
    if existing.status in ("rejected", "retired"):
        return _error(
            409,
            "creative_closed",
            f"creative {draft.creative_id!r} is {existing.status}; it does not come back by "
            "an edit: register the text under a new id",
        )
    return None


@web.middleware
async def _error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type == "application/json":
            # Already an API error (auth's 401/403): keep its code and message.
            return web.Response(
                text=exc.text,
                status=exc.status,
                content_type="application/json",
                headers={k: v for k, v in exc.headers.items() if k == "WWW-Authenticate"},
            )
        if exc.status >= 400:
            return _error(
                exc.status,
                exc.reason.lower().replace(" ", "_"),
                f"{request.method} {request.path}: {exc.reason}",
            )
        raise
    except Exception:  # never a stack trace to the client; it goes to the log
        log.exception("unhandled error", extra={"path": request.path})
        return _error(500, "internal_error", "internal error; see the adloop serve log")


def run_serving(settings: Settings) -> None:
    api = ServingApi(settings)
    log.info("serving API on http://%s:%d", settings.api_host, settings.api_port)
    web.run_app(
        api.web_app(), host=settings.api_host, port=settings.api_port, print=None, access_log=None
    )

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
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
from aiohttp import web
from aiokafka import AIOKafkaProducer

from adloop.bandit import BetaPrior, CreativeEngine
from adloop.schemas import Creative, Decision, RecordDecoder, decision_key
from adloop.schemas.records import ContextValue, Identifier
from adloop.schemas.validation import InvalidRecord
from adloop.streams.config import Settings
from adloop.streams.follower import Follower
from adloop.streams.kafka_io import producer_kwargs
from adloop.streams.posterior import prior_for
from adloop.streams.registry import CreativeRegistry, registry_follower
from adloop.streams.steering import Steering

log = logging.getLogger("adloop.serve")


class SelectRequest(msgspec.Struct, kw_only=True):
    campaign: Identifier
    audience: Identifier
    placement: Identifier = "default"
    context: dict[Annotated[str, msgspec.Meta(max_length=64)], ContextValue] = {}


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


_json = msgspec.json.Encoder()


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


class ServingApi:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = CreativeRegistry()
        self.registry_follower = registry_follower(settings, self.registry)
        # The latest decision per campaign|audience. Selection waits on it, so it polls
        # with the configured (short) fetch wait, not the followers' gentle one.
        self.decisions: dict[str, Decision] = {}
        self.decision_follower = Follower.latest(
            settings, "decisions", self.decisions, fetch_max_wait_ms=settings.fetch_wait_ms
        )
        self.rng = np.random.default_rng()
        self.engine_config = settings.engine_config()
        self._selections: dict[str, _Selection] = {}
        self._producer: AIOKafkaProducer | None = None
        self._select_decoder = msgspec.json.Decoder(SelectRequest)
        self._batch_decoder = msgspec.json.Decoder(BatchSelectRequest)
        self._creative_decoder = RecordDecoder(Creative, settings.max_payload_bytes)
        self.steering = Steering(self)

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
        app = web.Application(middlewares=[_error_middleware], client_max_size=1024 * 1024)
        app.add_routes(
            [
                web.get("/healthz", self.health),
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
        self, campaign: str, audience: str, placement: str | None = None
    ) -> _Selection | None:
        key = decision_key(campaign, audience)
        decision = self.decisions.get(key)
        # The contextual policy publishes a distribution per placement.
        by_placement = decision.placements.get(placement or "") if decision else None
        cache_key = f"{key}|{placement}" if by_placement else key
        version = (self.registry.version, decision.updated_at if decision else 0.0)
        cached = self._selections.get(cache_key)
        if cached is not None and cached.version == version:
            return cached
        creatives = self.registry.servable(campaign, audience)
        if not creatives:
            return None
        probabilities = None
        if by_placement and {c.creative_id for c in creatives} <= by_placement.keys():
            probabilities = np.array([by_placement[c.creative_id] for c in creatives])
            probabilities = probabilities / probabilities.sum()
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
        )
        self._selections[cache_key] = cached
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
        chosen = self.selection(body.campaign, body.audience, body.placement)
        if chosen is None:
            return _error(
                404,
                "no_servable_creative",
                f"campaign {body.campaign!r} has no active creative for audience {body.audience!r}",
            )
        return chosen

    async def select(self, request: web.Request) -> web.Response:
        try:
            body = self._select_decoder.decode(await request.read())
        except msgspec.MsgspecError as exc:
            return _error(400, "invalid_request", f"select body: {exc}")
        chosen = self._choose(body)
        if isinstance(chosen, web.Response):
            return chosen
        index = int(np.searchsorted(chosen.cumulative, self.rng.random(), side="right"))
        index = min(index, len(chosen.creatives) - 1)
        creative = chosen.creatives[index]
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

    # -- writes -----------------------------------------------------------------------
    async def register_creative(self, request: web.Request) -> web.Response:
        try:
            creative = self._creative_decoder.decode(await request.read())
        except InvalidRecord as exc:
            return _error(400, exc.code, exc.reason)
        existing = self.registry.get(creative.creative_id)
        if existing is not None and existing.campaign != creative.campaign:
            return _error(
                409,
                "creative_id_taken",
                f"creative {creative.creative_id!r} belongs to campaign "
                f"{existing.campaign!r}; choose another id",
            )
        if not creative.created_at:
            creative = msgspec.structs.replace(creative, created_at=time.time())
        assert self._producer is not None
        await self._producer.send_and_wait(
            self.settings.topic("creatives"),
            _json.encode(creative),
            key=creative.creative_id.encode(),
        )
        # Read-your-writes: the follower will apply the same record again.
        self.registry.put(creative)
        return _respond(creative, 201)


@web.middleware
async def _error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
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

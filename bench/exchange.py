"""A simulated ad exchange: asks adloop which creative to show, publishes the
impression, and publishes a click with the creative's hidden CTR for the audience.

It talks to adloop only through public interfaces (HTTP select, Kafka topics),
like a real exchange. Deterministic for a seed, except for what adloop chooses.
"""

from __future__ import annotations

import heapq
import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adloop.schemas import Click, Creative, Impression

HEADLINES = [
    ("c-spring-01", "Spring sale: 30% off everything"),
    ("c-spring-02", "Fresh styles for a new season"),
    ("c-spring-03", "Free shipping on orders over $25"),
    ("c-spring-04", "Members save more this week"),
    ("c-spring-05", "Limited drop: new arrivals today"),
]
AUDIENCES = ["students", "parents", "professionals"]


@dataclass
class Scenario:
    """Creatives with a hidden CTR per audience (what the exchange 'knows')."""

    campaign: str
    creatives: list[Creative]
    audiences: list[str]
    ctr: dict[tuple[str, str], float]  # (creative_id, audience) -> true CTR

    @classmethod
    def default(cls, seed: int = 7, campaign: str = "spring-sale") -> Scenario:
        rng = np.random.default_rng(seed)
        creatives = [
            Creative(creative_id=cid, campaign=campaign, headline=text, origin="human")
            for cid, text in HEADLINES
        ]
        ctr = {}
        for audience in AUDIENCES:
            # Realistic CTRs (0.5-6 %), a different winner per audience.
            base = rng.uniform(0.005, 0.03, size=len(creatives))
            base[rng.integers(len(creatives))] = rng.uniform(0.04, 0.06)
            for creative, value in zip(creatives, base, strict=True):
                ctr[(creative.creative_id, audience)] = float(value)
        return cls(campaign, creatives, list(AUDIENCES), ctr)

    # Text-aware scenario only: the hidden CTR comes from the creative's text, so
    # creatives that did not exist at the start (generated ones) have one too.
    text_world: Any = None
    texts: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def text_aware(cls, seed: int = 7, campaign: str = "shoes") -> Scenario:
        from adloop.bench.textsim import POOL, SHARES, TextWorld

        world = TextWorld(seed=seed)
        creatives = [
            Creative(creative_id=cid, campaign=campaign, headline=text, origin="human")
            for cid, text in POOL
        ]
        scenario = cls(campaign, creatives, list(SHARES), {}, text_world=world)
        for c in creatives:
            scenario.observe(c.creative_id, c.headline, c.description)
        return scenario

    def observe(self, creative_id: str, headline: str, description: str) -> None:
        """Remember a creative's text (the exchange sees it in every select answer)."""
        if self.text_world is not None and creative_id not in self.texts:
            self.texts[creative_id] = (headline, description)
            for audience in self.audiences:
                self.ctr[(creative_id, audience)] = self.text_world.intrinsic_ctr(
                    headline, description, audience
                )

    def best_ctr(self, audience: str) -> float:
        """Best CTR of the *initial* creatives: the bar generated ones must beat."""
        return max(self.ctr[(c.creative_id, audience)] for c in self.creatives)

    def mean_ctr(self, audience: str) -> float:
        return float(np.mean([self.ctr[(c.creative_id, audience)] for c in self.creatives]))


@dataclass
class ExchangeTally:
    impressions: int = 0
    clicks: int = 0
    bad_events: int = 0
    per_creative: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    expected_best: float = 0.0  # sum over impressions of the best CTR for the audience
    expected_uniform: float = 0.0  # ... of the mean CTR
    select_ms: list[float] = field(default_factory=list)

    def record(self, creative_id: str, audience: str, clicked: bool) -> None:
        cell = self.per_creative.setdefault((creative_id, audience), [0, 0])
        cell[0] += 1
        cell[1] += int(clicked)


class HttpSelector:
    """Keep-alive HTTP client of the serving API (select, registration, steering)."""

    @classmethod
    def local(cls, settings: Any) -> HttpSelector:
        """A client of the local stack's API with its admin token (made by the
        Supervisor in the data dir, mode 0600)."""
        path = settings.admin_token_path
        token = path.read_text().strip() if path.exists() else None
        return cls(settings.api_host, settings.api_port, token)

    def __init__(self, host: str, port: int, token: str | None = None) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        # A bearer token (the local stack's admin token: Supervisor.admin_token).
        self.token = token

    def send(
        self, method: str, path: str, body: str | bytes | None = None
    ) -> http.client.HTTPResponse:
        """One request on the kept-alive connection; reconnects once if the server closed
        it while idle (aiohttp drops idle keep-alive connections after 75 s)."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body, headers)
                return self.conn.getresponse()
            except (
                BrokenPipeError,
                ConnectionResetError,
                http.client.RemoteDisconnected,
                http.client.ImproperConnectionState,  # a request interrupted half-way
            ):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.conn.host, self.conn.port, timeout=60)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def __call__(
        self, campaign: str, audience: str, placement: str, context: dict | None = None
    ) -> dict:
        request = {"campaign": campaign, "audience": audience, "placement": placement}
        if context:
            request["context"] = context
        body = json.dumps(request)
        response = self.send("POST", "/v1/select", body)
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"select failed ({response.status}): {payload.decode()}")
        return json.loads(payload)

    def select_batch(self, campaign: str, audience: str, placement: str, n: int) -> dict:
        body = json.dumps(
            {"campaign": campaign, "audience": audience, "placement": placement, "n": n}
        )
        response = self.send("POST", "/v1/select/batch", body)
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"select failed ({response.status}): {payload.decode()}")
        return json.loads(payload)

    def texts(self, campaign: str) -> dict[str, tuple[str, str]]:
        """Headline and description of every creative of a campaign."""
        status, body = self.get(f"/v1/campaigns/{campaign}/creatives")
        if status != 200:
            return {}
        return {c["creative_id"]: (c["headline"], c["description"]) for c in body["creatives"]}

    def register(self, creative: Creative) -> None:
        """Register a human-written creative (only the fields a person authors)."""
        draft = {
            "creative_id": creative.creative_id,
            "campaign": creative.campaign,
            "headline": creative.headline,
            "description": creative.description,
            "audiences": creative.audiences,
        }
        response = self.send("POST", "/v1/creatives", json.dumps(draft))
        payload = response.read()
        if response.status not in (200, 201):
            raise RuntimeError(f"registering {creative.creative_id} failed: {payload.decode()}")

    def get(self, path: str) -> tuple[int, dict]:
        response = self.send("GET", path)
        return response.status, json.loads(response.read())

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict]:
        """Any JSON call: (status, decoded body)."""
        response = self.send(method, path, json.dumps(body) if body is not None else None)
        payload = response.read()
        return response.status, json.loads(payload) if payload else {}


Publish = Callable[[str, bytes, bytes], None]  # (role, key, value)


class SimulatedExchange:
    """Drives traffic: select -> impression -> (maybe) delayed click."""

    def __init__(
        self,
        scenario: Scenario,
        select: Callable[[str, str, str], dict],
        publish: Publish,
        seed: int = 7,
        click_delay_s: float = 0.2,
        bad_event_rate: float = 0.0,
    ) -> None:
        self.scenario = scenario
        self.select = select
        self.publish = publish
        self.rng = np.random.default_rng(seed)
        self.click_delay_s = click_delay_s
        self.bad_event_rate = bad_event_rate
        self.tally = ExchangeTally()
        self._pending_clicks: list[tuple[float, str, bytes]] = []
        self._placements = ["feed", "sidebar"]
        self._texts: dict[str, tuple[str, str]] = {}

    def step(self, now: float) -> None:
        """One impression (and the clicks that are due)."""
        sc = self.scenario
        audience = sc.audiences[int(self.rng.integers(len(sc.audiences)))]
        placement = self._placements[int(self.rng.integers(len(self._placements)))]
        t0 = time.perf_counter()
        choice = self.select(sc.campaign, audience, placement)
        self.tally.select_ms.append((time.perf_counter() - t0) * 1000)
        self.show(choice, audience, placement, now)

    def step_batch(self, now: float, n: int, selector: HttpSelector) -> None:
        """``n`` impressions of one audience and placement from one bulk select."""
        sc = self.scenario
        audience = sc.audiences[int(self.rng.integers(len(sc.audiences)))]
        placement = self._placements[int(self.rng.integers(len(self._placements)))]
        t0 = time.perf_counter()
        answer = selector.select_batch(sc.campaign, audience, placement, n)
        self.tally.select_ms.append((time.perf_counter() - t0) * 1000)
        for impression_id, creative_id, propensity in answer["choices"]:
            if creative_id not in self._texts:
                self._texts.update(selector.texts(sc.campaign))
            headline, description = self._texts.get(creative_id, ("", ""))
            choice = {
                "impression_id": impression_id,
                "creative_id": creative_id,
                "propensity": propensity,
                "policy": answer["policy"],
                "headline": headline,
                "description": description,
            }
            self.show(choice, audience, placement, now)

    def show(self, choice: dict, audience: str, placement: str, now: float) -> None:
        """Publish the impression of a choice adloop made, and maybe its (delayed) click."""
        sc = self.scenario
        sc.observe(choice["creative_id"], choice["headline"], choice.get("description", ""))
        impression = Impression(
            impression_id=choice["impression_id"],
            timestamp=now,
            campaign=sc.campaign,
            audience=audience,
            placement=placement,
            creative_id=choice["creative_id"],
            propensity=choice["propensity"],
            policy=choice["policy"],
            context={"hour": time.gmtime(now).tm_hour},
        )
        key = impression.impression_id.encode()
        self.publish("impressions", key, _encode(impression))
        clicked = bool(self.rng.random() < sc.ctr[(choice["creative_id"], audience)])
        self.tally.impressions += 1
        self.tally.clicks += int(clicked)
        self.tally.record(choice["creative_id"], audience, clicked)
        self.tally.expected_best += sc.best_ctr(audience)
        self.tally.expected_uniform += sc.mean_ctr(audience)
        if clicked:
            delay = float(self.rng.exponential(self.click_delay_s))
            click = Click(impression_id=impression.impression_id, timestamp=now + delay)
            heapq.heappush(
                self._pending_clicks, (now + delay, impression.impression_id, _encode(click))
            )
        if self.bad_event_rate and self.rng.random() < self.bad_event_rate:
            self.tally.bad_events += 1
            self.publish("impressions", b"bad", b'{"schema_version": 1, "impression_id": ')
        self.flush_clicks(now)

    def flush_clicks(self, now: float, force: bool = False) -> None:
        while self._pending_clicks and (force or self._pending_clicks[0][0] <= now):
            _, impression_id, value = heapq.heappop(self._pending_clicks)
            self.publish("clicks", impression_id.encode(), value)


def _encode(record: Impression | Click) -> bytes:
    import msgspec

    return msgspec.json.encode(record)

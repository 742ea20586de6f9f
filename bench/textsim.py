"""``adloop simulate``: a text-aware exchange, to prove the closed loop pays off.

The exchange's hidden click-through rate depends on what the creative *says* and to
whom: each audience has affinities for themes (price, speed, quality, style, trust),
recognised by their words in the headline and description; headlines that are too
short or too long do worse; every creative fatigues with exposure in an audience.
So better-written variants truly earn more clicks, and a pool of generic human
headlines leaves clicks on the table.

The exchange talks to adloop only through public interfaces, like a real one:
``POST /v1/select/batch`` to choose, impressions and clicks on Kafka (clicks delayed),
campaign settings over HTTP. Two runs over the same traffic and seed:

* (a) the initial human-written pool with adloop's bandit and no generation;
* (b) the full loop: the detector's verdicts ask the generator for variants (LLM +
  CTR model), which go live (``auto_approve`` on for the simulated advertiser) and
  are promoted or retired by the same engine.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adloop.schemas import Brief, Creative

__all__ = ["TextWorld", "run_simulation"]

THEMES: dict[str, tuple[str, ...]] = {
    "price": ("sale", "off", "deal", "save", "cheap", "discount", "free", "%", "price"),
    "speed": ("fast", "quick", "light", "speed", "run", "lightweight", "race", "pace"),
    "quality": ("premium", "quality", "durable", "crafted", "comfort", "best", "cushion"),
    "style": ("style", "look", "trend", "new", "fresh", "color", "design"),
    "trust": ("rated", "trusted", "guarantee", "returns", "reviews", "loved"),
}
AUDIENCES: dict[str, dict[str, float]] = {
    # theme affinities (log-CTR per matched theme) and the audience's share of traffic
    "students": {"price": 0.55, "speed": 0.15, "quality": -0.10, "style": 0.25},
    "runners": {"speed": 0.55, "quality": 0.30, "price": 0.05},
    "parents": {"trust": 0.50, "quality": 0.30, "price": 0.25},
}
SHARES = {"students": 0.4, "runners": 0.35, "parents": 0.25}
# What a busy advertiser writes on day one: generic, and one headline too long to read.
POOL = (
    ("h1", "Shop our shoes today"),
    ("h2", "Shoes for every day"),
    ("h3", "Visit our shoe store and browse the whole catalogue"),
)
BRIEF = Brief(
    product="running shoes",
    key_message="lightweight and fast, 30% off this week, free returns, rated 4.8 by runners",
    constraints=["no competitor names", "no medical claims"],
)
DESCRIPTIONS = {
    "students": "university students on a budget who like new styles",
    "runners": "amateur and club runners who care about speed and comfort",
    "parents": "parents buying for the family who want trusted quality",
}
_WORD = re.compile(r"[a-z%]+")


@dataclass
class TextWorld:
    base_ctr: float = 0.02
    fatigue_tau: float = 40_000.0
    fatigue_floor: float = 0.6
    seed: int = 7
    exposure: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))

    def themes(self, text: str) -> dict[str, int]:
        words = _WORD.findall(text.lower())
        return {t: sum(w in vocab for w in words) for t, vocab in THEMES.items()}

    def intrinsic_ctr(self, headline: str, description: str, audience: str) -> float:
        """CTR before fatigue: theme affinities, headline length, a per-text quirk."""
        hits = self.themes(f"{headline} {description}")
        score = sum(AUDIENCES[audience].get(t, 0.0) * min(n, 2) for t, n in hits.items())
        length = len(headline)
        # A headline over 30 characters is cut off in most placements.
        shape = 1.0 if 14 <= length <= 30 else (0.5 if length > 30 else 0.8)
        quirk = int(hashlib.sha1(f"{self.seed}|{headline}".encode()).hexdigest()[:8], 16)
        noise = math.exp(0.15 * (quirk / 0xFFFFFFFF * 2 - 1))
        return min(0.25, self.base_ctr * math.exp(score) * shape * noise)

    def ctr(self, creative: Creative, audience: str) -> float:
        fatigue = self.fatigue_floor + (1 - self.fatigue_floor) * math.exp(
            -self.exposure[(creative.creative_id, audience)] / self.fatigue_tau
        )
        return self.intrinsic_ctr(creative.headline, creative.description, audience) * fatigue


def _http(base: str, method: str, path: str, body: Any = None, token: str = "") -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@dataclass
class RunResult:
    name: str
    impressions: int = 0
    clicks: int = 0
    timeline: list[tuple[int, float]] = field(default_factory=list)  # (impressions, window CTR)
    loop: dict[str, Any] = field(default_factory=dict)

    @property
    def ctr(self) -> float:
        return self.clicks / max(self.impressions, 1)


def run_once(
    name: str,
    impressions: int,
    seed: int,
    with_loop: bool,
    out: Path,
    rate: float,
    progress: Any = None,
) -> RunResult:
    from kafka import KafkaProducer

    from adloop.bench.harness import deployment
    from adloop.streams.kafka_io import kafka_python_kwargs
    from adloop.streams.supervisor import Supervisor

    world = TextWorld(seed=seed)
    rng = np.random.default_rng(seed)
    result = RunResult(name)
    campaign = "sim-shoes"
    roles = (
        ("ingest", "worker", "serve", "loop", "generator")
        if with_loop
        else ("ingest", "worker", "serve")
    )
    from adloop.bench.harness import free_port

    overrides: dict[str, Any] = {
        "api_port": free_port(),
        "min_evidence": 1000,
        "loop_tick_s": 1.0,
        "generator_seed": seed,
        "ctr_retrain_interval_s": 240.0,
        "ctr_retrain_max_steps": 60,
    }
    with deployment(None, **overrides) as settings, Supervisor(settings, roles=roles) as sup:
        sup.wait_http_ready()
        base = f"http://{settings.api_host}:{settings.api_port}"
        token = sup.admin_token or ""
        for cid, headline in POOL:
            _http(
                base,
                "POST",
                "/v1/creatives",
                {"creative_id": cid, "campaign": campaign, "headline": headline},
                token=token,
            )
        if with_loop:
            _http(
                base,
                "PUT",
                f"/v1/campaigns/{campaign}/settings",
                {
                    "reason": "simulated advertiser opts in",
                    "brief": _builtins(BRIEF),
                    "auto_approve": True,
                    "cooldown_s": 15.0,
                    "generation_budget": 60,
                    "max_live_per_audience": 6,
                    "n_variants": 6,
                    "audience_descriptions": DESCRIPTIONS,
                },
                token=token,
            )
        # Large batches: the embedded broker's fetch cost grows with a partition's batch count.
        producer = KafkaProducer(
            **kafka_python_kwargs(KafkaProducer, settings, linger_ms=20, batch_size=262_144)
        )
        creatives: dict[str, Creative] = {}
        pending_clicks: list[tuple[int, bytes, bytes]] = []
        batch = 500
        window_imps = window_clicks = 0
        started = time.monotonic()
        audiences = list(SHARES)
        shares = np.array([SHARES[a] for a in audiences])
        # A millisecond of event time per impression, ending a minute ago at the latest:
        # the ingest refuses event times ahead of its clock (ADLOOP_MAX_CLOCK_SKEW_S).
        t_event = time.time() - impressions * 0.001 - 60.0
        sent = 0
        while sent < impressions:
            audience = audiences[int(rng.choice(len(audiences), p=shares))]
            answer = _http(
                base,
                "POST",
                "/v1/select/batch",
                {"campaign": campaign, "audience": audience, "placement": "feed", "n": batch},
            )
            for impression_id, creative_id, propensity in answer["choices"]:
                creative = creatives.get(creative_id)
                if creative is None:
                    listed = _http(base, "GET", f"/v1/campaigns/{campaign}/creatives", token=token)
                    creatives = {
                        c["creative_id"]: Creative(
                            **{
                                k: v
                                for k, v in c.items()
                                if k in ("creative_id", "campaign", "headline", "description")
                            }
                        )
                        for c in listed["creatives"]
                    }
                    creative = creatives[creative_id]
                p = world.ctr(creative, audience)
                world.exposure[(creative_id, audience)] += 1
                t_event += 0.001
                key = impression_id.encode()
                producer.send(
                    settings.topic("impressions"),
                    key=key,
                    value=json.dumps(
                        {
                            "schema_version": 1,
                            "impression_id": impression_id,
                            "timestamp": t_event,
                            "campaign": campaign,
                            "audience": audience,
                            "placement": "feed",
                            "creative_id": creative_id,
                            "propensity": propensity,
                            "policy": answer["policy"],
                        }
                    ).encode(),
                )
                if rng.random() < p:
                    result.clicks += 1
                    window_clicks += 1
                    delay = int(rng.geometric(1 / 300))
                    click = json.dumps(
                        {
                            "schema_version": 1,
                            "impression_id": impression_id,
                            "timestamp": t_event + delay / 1000,
                        }
                    ).encode()
                    pending_clicks.append((sent + delay, key, click))
                sent += 1
                window_imps += 1
            result.impressions = sent
            due = [c for c in pending_clicks if c[0] <= sent]
            pending_clicks = [c for c in pending_clicks if c[0] > sent]
            for _, key, click in due:
                producer.send(settings.topic("clicks"), key=key, value=click)
            if window_imps >= 10_000:
                result.timeline.append((sent, window_clicks / window_imps))
                window_imps = window_clicks = 0
                if progress:
                    progress(name, sent, result.ctr)
            # Pace: the loop needs wall time (generation takes seconds on a CPU).
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
            sup.check()
        for _, key, click in pending_clicks:
            producer.send(settings.topic("clicks"), key=key, value=click)
        producer.flush()
        producer.close()
        if with_loop:
            result.loop = _loop_stats(base, campaign, token)
            result.loop["ctr_models"] = _model_cards(settings.models_path)
    return result


def _model_cards(models_dir: Path) -> list[dict[str, Any]]:
    """Each CTR model version trained during the run, with its validation metrics."""
    cards = []
    for path in sorted((models_dir / "ctr").glob("*/model_card.json")):
        card = json.loads(path.read_text())
        cards.append({"version": card.get("version"), "metrics": card.get("metrics")})
    return cards


def _builtins(struct: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(struct)


def _loop_stats(base: str, campaign: str, token: str) -> dict[str, Any]:
    story = _http(base, "GET", f"/v1/campaigns/{campaign}/story", token=token)
    trail = _http(base, "GET", f"/v1/campaigns/{campaign}/audit", token=token)["entries"]
    generated = [
        c["creative"] for c in story["creatives"] if c["creative"]["origin"] == "generated"
    ]
    requested = [e for e in trail if e["action"] == "generation_requested"]
    retired = [e for e in trail if e["action"] == "retired"]
    failed = [e for e in trail if e["action"] == "generation_failed"]
    answered = [e for e in trail if e["action"] == "generation_answered"]
    served = [
        c
        for c in story["creatives"]
        if c["creative"]["origin"] == "generated"
        and sum(a["impressions"] for a in c["audiences"]) > 0
    ]
    request_at = {e["details"].get("request_id"): e["at"] for e in requested}
    to_live = sorted(
        c["created_at"] - request_at[c["lineage"]["request_id"]]
        for c in generated
        if c.get("lineage") and c["lineage"]["request_id"] in request_at
    )
    return {
        "requested": len(requested),
        "answered": len(answered),
        "generated": sum(int(e["details"].get("generated", 0)) for e in answered),
        "passed_filters": len(generated),
        "adopted": len(served),
        "retired": len(retired),
        "failed": len(failed),
        "detection_to_live_s_p50": float(np.median(to_live)) if to_live else None,
        "top_generated": sorted(
            (
                (
                    c["creative"]["headline"],
                    sum(a["clicks"] for a in c["audiences"]),
                    sum(a["impressions"] for a in c["audiences"]),
                )
                for c in story["creatives"]
                if c["creative"]["origin"] == "generated"
            ),
            key=lambda x: -x[2],
        )[:8],
    }


def run_simulation(
    out: Path,
    impressions: int,
    seed: int,
    rate: float,
    progress: Any = None,
    pool_rate: float | None = None,
) -> dict[str, Any]:
    """Run (a) then (b) over the same traffic. ``pool_rate`` lets (a), which waits on no
    model, go faster: the world's fatigue counts impressions, not seconds."""
    out.mkdir(parents=True, exist_ok=True)
    pool_rate = pool_rate or rate
    a = run_once("a-pool-only", impressions, seed, False, out, pool_rate, progress)
    b = run_once("b-full-loop", impressions, seed, True, out, rate, progress)
    lift = b.ctr / a.ctr if a.ctr else float("nan")
    summary = {
        "impressions": impressions,
        "seed": seed,
        "rate_a": pool_rate,
        "rate_b": rate,
        "ctr_a": a.ctr,
        "ctr_b": b.ctr,
        "lift": lift,
        "loop": b.loop,
        "timeline_a": a.timeline,
        "timeline_b": b.timeline,
    }
    (out / "simulate.json").write_text(json.dumps(summary, indent=2, default=str))
    _plot(a, b, out / "simulate.png")
    return summary


def _plot(a: RunResult, b: RunResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in (a, b):
        if r.timeline:
            x, y = zip(*r.timeline, strict=True)
            ax.plot(x, y, label=f"{r.name} (CTR {r.ctr:.2%})")
    ax.set(
        xlabel="impressions",
        ylabel="CTR per 10k impressions",
        title="Realized CTR: initial pool vs the full loop",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The bandit simulator's traffic through the full Kafka path (``adloop bench bandits --kafka``).

Same world as the fast path (:mod:`bench.simulator`), but adloop runs as it does in
production: the exchange asks ``POST /v1/select/batch`` per audience, publishes
impressions and delayed clicks to Kafka, and the ingest, worker (with the engine) and
serving processes decide. Regret is computed exactly as on the fast path, so the two
numbers say what the stream's delays and batching cost the policy.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import msgspec
import numpy as np

from adloop.bench.simulator import Scenario, World
from adloop.schemas import Creative


def _wait_known(base: str, token: str, creative_id: str, timeout: float = 60.0) -> None:
    """Until the serving API follows the creative (it reads the creatives topic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        req = urllib.request.Request(
            base + "/v1/campaigns/sim/creatives", headers={"authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                listed = json.loads(resp.read())["creatives"]
            if any(c["creative_id"] == creative_id for c in listed):
                return
        except urllib.error.HTTPError:
            pass  # 404 until the campaign's first creative arrives
        time.sleep(0.05)
    raise TimeoutError(f"serving never saw creative {creative_id}")


def _post(base: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def run_kafka_path(impressions: int, seed: int = 7, rate: float = 5000.0) -> dict[str, Any]:
    """adloop's default engine on the non-stationary scenario, through Kafka."""
    from kafka import KafkaProducer

    from adloop.bench.harness import deployment, free_port
    from adloop.streams.kafka_io import kafka_python_kwargs
    from adloop.streams.supervisor import Supervisor

    world = World(Scenario(seed=seed))
    audiences, uniforms, delays = world.traffic(impressions)
    exposure = np.zeros((world.n_audiences, len(world.creatives)))
    names = [world.audience_name(a) for a in range(world.n_audiences)]
    index = {c.creative_id: j for j, c in enumerate(world.creatives)}
    # One impression = one second of event time, so the fast path's half-life in
    # impressions carries over. It ends now: the ingest refuses event times more than
    # ADLOOP_MAX_EVENT_AGE_S (a week: 604,800 impressions here) behind its clock.
    t0 = time.time() - impressions
    overrides = {"api_port": free_port(), "half_life_s": 500_000.0}
    regret = 0.0
    regret_at: dict[int, float] = {}
    added: set[int] = set()
    pending: list[tuple[int, bytes, bytes]] = []
    started = time.monotonic()
    with deployment(None, **overrides) as settings, Supervisor(settings) as sup:
        sup.wait_http_ready()
        base = f"http://{settings.api_host}:{settings.api_port}"
        producer = KafkaProducer(**kafka_python_kwargs(KafkaProducer, settings, linger_ms=5))
        for start in range(0, impressions, 1000):
            end = min(start + 1000, impressions)
            for j in world.live(start):
                if j not in added:
                    added.add(j)
                    c = world.creatives[j]
                    # With a CTR-model prior, as the generator publishes its candidates
                    # (priors are adloop's own fields: the HTTP API refuses them).
                    creative = Creative(
                        creative_id=c.creative_id,
                        campaign="sim",
                        headline=c.theme,
                        origin="generated",
                        predicted_ctr=c.predicted_ctr,
                        prior_strength=20.0,
                        version=1,
                    )
                    producer.send(
                        settings.topic("creatives"),
                        key=c.creative_id.encode(),
                        value=msgspec.json.encode(creative),
                    )
                    producer.flush()
                    _wait_known(base, sup.admin_token or "", c.creative_id)
            live = np.asarray(sorted(added))
            ctr_now = world.true_ctr(start, exposure)
            aud = audiences[start:end]
            arms = np.empty(end - start, dtype=np.int64)
            props = np.empty(end - start)
            ids: list[str] = [""] * (end - start)
            for a in range(world.n_audiences):
                rows = np.flatnonzero(aud == a)
                if rows.size == 0:
                    continue
                answer = _post(
                    base,
                    "/v1/select/batch",
                    {
                        "campaign": "sim",
                        "audience": names[a],
                        "placement": "feed",
                        "n": int(rows.size),
                    },
                )
                for row, (iid, cid, prop) in zip(rows, answer["choices"], strict=True):
                    arms[row], props[row], ids[row] = index[cid], prop, iid
            p = ctr_now[aud, arms]
            best = ctr_now[:, live].max(axis=1)[aud]
            steps = np.cumsum(best - p) + regret
            for cp in (10_000, 100_000, 1_000_000):
                if start < cp <= end:
                    regret_at[cp] = float(steps[cp - start - 1])
            regret = float(steps[-1])
            np.add.at(exposure, (aud, arms), 1.0)
            for k in range(end - start):
                i = start + k
                key = ids[k].encode()
                producer.send(
                    settings.topic("impressions"),
                    key=key,
                    value=json.dumps(
                        {
                            "schema_version": 1,
                            "impression_id": ids[k],
                            "timestamp": t0 + i,
                            "campaign": "sim",
                            "audience": names[int(aud[k])],
                            "placement": "feed",
                            "creative_id": world.creatives[int(arms[k])].creative_id,
                            "propensity": float(props[k]),
                            "policy": "bench",
                        }
                    ).encode(),
                )
                if uniforms[i] < p[k]:
                    pending.append(
                        (
                            i + int(delays[i]),
                            key,
                            json.dumps(
                                {
                                    "schema_version": 1,
                                    "impression_id": ids[k],
                                    "timestamp": t0 + i + int(delays[i]),
                                }
                            ).encode(),
                        )
                    )
            due = [c for c in pending if c[0] < end]
            pending = [c for c in pending if c[0] >= end]
            for _, key, value in due:
                producer.send(settings.topic("clicks"), key=key, value=value)
            ahead = end / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
            sup.check()
        producer.flush()
        producer.close()
    return {
        "impressions": impressions,
        "rate": rate,
        "regret_at": regret_at,
        "regret": regret,
        "seconds": time.monotonic() - started,
    }

"""Speed and memory of the pure engine (no Kafka): ``adloop bench bandits`` runs it too.

What the stream asks of the engine, per campaign × audience key:

* absorb a snapshot's increments: ``CreativeEngine.from_dict`` → ``learn_many`` →
  ``to_dict`` (the worker keeps the engine's state in its table);
* build a decision: serving probabilities (Monte Carlo over the posteriors), labels,
  P(best), verdicts (``report``);
* serve: one choice from the published probabilities (what ``POST /v1/select`` does),
  or one exact Thompson draw.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from adloop.bandit import BetaPrior, CreativeEngine, EngineConfig

__all__ = ["EngineSpeed", "measure"]


@dataclass
class EngineSpeed:
    arms: int
    updates_per_s: float  # learn_many calls/s, one increment per arm per call
    absorb_per_s: float  # from_dict + learn_many + to_dict per second (the worker's step)
    decisions_per_s: float  # report(): probabilities, labels, P(best), verdicts
    selections_per_s: float  # choices from a published distribution, batched
    select_p99_us: float  # one choice from a published distribution, in-process
    thompson_draw_p99_us: float  # one exact Thompson decision
    state_bytes_per_arm: float  # JSON state size / arms


def _timed(fn: Any, seconds: float = 0.5, min_calls: int = 5) -> float:
    """Calls per second of ``fn``."""
    calls = 0
    started = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and calls >= min_calls:
            return calls / elapsed


def _p99_us(fn: Any, calls: int = 5000) -> float:
    samples = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter_ns()
        fn()
        samples[i] = time.perf_counter_ns() - started
    return float(np.percentile(samples, 99) / 1000)


def measure(arms: int, seed: int = 0, draws: int = 2000) -> EngineSpeed:
    rng = np.random.default_rng(seed)
    engine = CreativeEngine(EngineConfig(draws=draws))
    for i in range(arms):
        engine.add_arm(f"creative-{i:04d}", BetaPrior.from_mean(0.02, 20.0))
    ctr = rng.uniform(0.005, 0.04, size=arms)
    idx = np.arange(arms)
    t = [0.0]

    def update() -> None:
        t[0] += 1.0
        imps = rng.integers(0, 50, size=arms).astype(float)
        engine.learn_many(idx, imps, rng.binomial(imps.astype(int), ctr), t=t[0])

    for _ in range(200):  # some history, so posteriors are not all alike
        update()
    state = engine.to_dict()

    def absorb() -> None:
        e = CreativeEngine.from_dict(state)
        imps = rng.integers(0, 50, size=arms).astype(float)
        e.learn_many(idx, imps, rng.binomial(imps.astype(int), ctr), t=t[0] + 1)
        e.to_dict()

    probabilities = engine.serving_probabilities(rng)
    cumulative = np.cumsum(probabilities)

    def select_one() -> int:
        return int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))

    a, b = engine.policy.stats.alpha, engine.policy.stats.beta

    def thompson_one() -> int:
        return int(np.argmax(rng.beta(a, b)))

    started = time.perf_counter()
    batch = 100_000
    np.searchsorted(cumulative, rng.random(batch) * cumulative[-1], side="right")
    selections = batch / (time.perf_counter() - started)
    return EngineSpeed(
        arms=arms,
        updates_per_s=_timed(update),
        absorb_per_s=_timed(absorb),
        decisions_per_s=_timed(lambda: engine.report(rng), min_calls=3),
        selections_per_s=selections,
        select_p99_us=_p99_us(select_one),
        thompson_draw_p99_us=_p99_us(thompson_one, calls=2000),
        state_bytes_per_arm=len(json.dumps(state)) / arms,
    )


def run(arm_counts: tuple[int, ...] = (10, 100, 1000)) -> list[dict[str, Any]]:
    return [asdict(measure(n)) for n in arm_counts]


def markdown(rows: list[dict[str, Any]], spine_events_per_s: float | None = None) -> str:
    lines = [
        "| arms | updates/s | absorb snapshot/s | decisions/s | selections/s | "
        "select p99 | Thompson draw p99 | state bytes/arm |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arms']:,} | {r['updates_per_s']:,.0f} | {r['absorb_per_s']:,.0f} | "
            f"{r['decisions_per_s']:,.0f} | {r['selections_per_s']:,.0f} | "
            f"{r['select_p99_us']:.1f} µs | {r['thompson_draw_p99_us']:.1f} µs | "
            f"{r['state_bytes_per_arm']:.0f} |"
        )
    return "\n".join(lines)

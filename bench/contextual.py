"""``adloop bench contextual``: does the contextual policy use the context, and what does
it cost?

* **Simulator** (``simulate``): a world where an impression's CTR depends on the
  creative × audience × device × hour of day (``context_matters``), and one where it
  depends on creative × audience only (``context_free``). The policies (adloop's
  context-free engine, adloop's contextual policy with each learner, MABWiser LinTS and
  LinUCB, Vowpal Wabbit with its defaults and as its tutorials set it up, uniform, the
  oracle) see the same traffic in batches of 1,000 impressions, as ``bench.bandits``
  does: count learners (adloop) learn impressions at once and clicks when they land,
  example learners (MABWiser, VW) learn an impression when its attribution window
  closes. adloop's contextual policy runs as the stream runs it: one model per
  audience, learning count increments per context cell (``streams.context``), serving
  the compiled per-cell distribution with the 1 % floor. Regret is on expected CTRs.
* **Ingest cost** (``ingest_cost``): the ingest's partition state (``PartitionState``,
  RocksDB, checkpoints and snapshots every 20,000 events) on impressions with a context,
  with and without context cells, in one process: µs per event.
* **Serving latency** (``serving_latency``): the real stack on the embedded broker with
  the contextual policy; ``POST /v1/select`` with a context from another process, paced
  at a target rate; client-side percentiles.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adloop.bandit import BetaPrior, CreativeEngine
from adloop.bandit.contextual import (
    ContextualLearner,
    VowpalContextual,
    make_learner,
    word_features,
)
from adloop.bench.bandits import sim_engine_config
from adloop.streams.context import learner_context

__all__ = ["ContextScenario", "ContextWorld", "ingest_cost", "run", "serving_latency", "simulate"]

AUDIENCES = ("young", "adult", "senior")
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_WEIGHTS = (0.55, 0.35, 0.10)
# Traffic by hour of day: quiet nights, busy evenings.
HOUR_WEIGHTS = np.array([1, 1, 1, 1, 1, 2, 3, 4, 5, 5, 5, 5, 6, 6, 5, 5, 5, 6, 7, 8, 8, 7, 4, 2])
DAYPART_HOURS = 6  # the context cell's hour bucket (ADLOOP_CONTEXT_FEATURES=device,hour/6)
HEADLINES = (
    "Half price on every order this week",
    "Delivered to your door tomorrow",
    "Built to last, quality you can feel",
    "Join a million happy customers",
    "New season styles just landed",
    "Save 30% when you order today",
    "Fast free shipping on everything",
    "Premium craft, lifetime warranty",
)
CHECKPOINTS = (10_000, 50_000, 200_000, 1_000_000)


@dataclass(frozen=True)
class ContextScenario:
    name: str = "context_matters"
    context_matters: bool = True
    seed: int = 7
    n_creatives: int = 6
    base_ctr: tuple[float, float] = (0.01, 0.03)
    # Log-scale spread of each creative's effect per device, per day part, and of its
    # device × day-part interaction.
    strength: float = 0.5
    mean_click_delay: float = 150.0  # impressions
    max_click_delay: int = 1_000


@dataclass
class ContextWorld:
    scenario: ContextScenario
    ctr: np.ndarray = field(init=False)  # [audience, device, day part, creative]
    headlines: list[str] = field(init=False)

    def __post_init__(self) -> None:
        sc = self.scenario
        rng = np.random.default_rng(sc.seed)
        n = sc.n_creatives
        parts = 24 // DAYPART_HOURS
        base = np.exp(rng.uniform(np.log(sc.base_ctr[0]), np.log(sc.base_ctr[1]), size=n))
        audience = rng.normal(0.0, 0.35, size=(len(AUDIENCES), n))
        log_ctr = np.log(base)[None, None, None, :] + audience[:, None, None, :]
        if sc.context_matters:
            device = rng.normal(0.0, sc.strength, size=(len(DEVICES), n))
            daypart = rng.normal(0.0, sc.strength, size=(parts, n))
            both = rng.normal(0.0, sc.strength / 2, size=(len(DEVICES), parts, n))
            log_ctr = log_ctr + (device[:, None, :] + daypart[None, :, :] + both)[None]
        else:
            log_ctr = np.broadcast_to(log_ctr, (len(AUDIENCES), len(DEVICES), parts, n))
        self.ctr = np.clip(np.exp(log_ctr), 1e-4, 0.3)
        self.headlines = [HEADLINES[j % len(HEADLINES)] for j in range(n)]

    @property
    def n_creatives(self) -> int:
        return self.ctr.shape[-1]

    def traffic(self, n: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.scenario.seed + 1)
        hour = rng.choice(24, size=n, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
        return {
            "audience": rng.integers(len(AUDIENCES), size=n),
            "device": rng.choice(len(DEVICES), size=n, p=DEVICE_WEIGHTS),
            "hour": hour,
            "part": hour // DAYPART_HOURS,
            "uniform": rng.random(n),
            "delay": np.minimum(
                rng.geometric(1.0 / self.scenario.mean_click_delay, size=n),
                self.scenario.max_click_delay,
            ),
        }


# -- agents --------------------------------------------------------------------------------


class Agent:
    """One policy. ``choose`` fixes the batch's choices; one of the two feedback paths."""

    name = "agent"

    def __init__(self, world: ContextWorld) -> None:
        self.world = world
        self.k = world.n_creatives
        self.propensity = np.ones(0)

    def choose(self, t: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def learn_counts(self, t: dict[str, np.ndarray], arms, imps, clicks) -> None:  # type: ignore[no-untyped-def]
        pass

    def learn_examples(self, t: dict[str, np.ndarray], arms, clicked, propensity) -> None:  # type: ignore[no-untyped-def]
        pass

    def _sample(self, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One arm per impression from per-impression distributions (rows)."""
        cum = np.cumsum(probs, axis=1)
        cum[:, -1] = 1.0
        arms = (rng.random(probs.shape[0])[:, None] > cum).sum(axis=1)
        self.propensity = probs[np.arange(arms.size), arms]
        return arms


class Oracle(Agent):
    name = "oracle"

    def choose(self, t, rng):  # type: ignore[no-untyped-def]
        ctr = self.world.ctr[t["audience"], t["device"], t["part"]]
        self.propensity = np.ones(ctr.shape[0])
        return ctr.argmax(axis=1)


class Uniform(Agent):
    name = "uniform"

    def choose(self, t, rng):  # type: ignore[no-untyped-def]
        return self._sample(np.full((t["audience"].size, self.k), 1.0 / self.k), rng)


class AdloopFree(Agent):
    """adloop's default engine, one per audience: the context is ignored."""

    name = "adloop (context-free engine)"

    def __init__(self, world: ContextWorld) -> None:
        super().__init__(world)
        self.engines = [CreativeEngine(sim_engine_config()) for _ in AUDIENCES]
        for engine in self.engines:
            for j in range(self.k):
                engine.add_arm(f"c{j}", BetaPrior())

    def choose(self, t, rng):  # type: ignore[no-untyped-def]
        probs = np.stack([e.serving_probabilities(rng) for e in self.engines])
        return self._sample(probs[t["audience"]], rng)

    def learn_counts(self, t, arms, imps, clicks):  # type: ignore[no-untyped-def]
        for a, engine in enumerate(self.engines):
            sel = t["audience"] == a
            if sel.any():
                engine.learn_many(arms[sel], imps[sel], clicks[sel], t=float(t["end"]))


def _cell(device: int, part: int) -> str:
    return f"device={DEVICES[device]},hour={part * DAYPART_HOURS}"


class AdloopContextual(Agent):
    """adloop's contextual policy as the stream runs it: a model per audience, count
    increments per context cell, a compiled table per cell with the 1 % floor."""

    def __init__(self, world: ContextWorld, learner: str, text: bool = True) -> None:
        super().__init__(world)
        self.name = f"adloop contextual ({learner})"
        self.models: list[ContextualLearner] = [make_learner(learner, seed=7) for _ in AUDIENCES]
        for model in self.models:
            for j in range(self.k):
                model.add_arm(f"c{j}", word_features(world.headlines[j]) if text else None)
        parts = 24 // DAYPART_HOURS
        self.cells = [(d, p) for d in range(len(DEVICES)) for p in range(parts)]
        self.contexts = [learner_context("feed", _cell(d, p)) for d, p in self.cells]
        self.floor = 0.01

    def choose(self, t, rng):  # type: ignore[no-untyped-def]
        parts = 24 // DAYPART_HOURS
        tables = np.stack([m.serving_table(self.contexts) for m in self.models])
        tables = (1 - self.floor) * tables / tables.sum(axis=2, keepdims=True) + self.floor / self.k
        probs = tables[t["audience"], t["device"] * parts + t["part"]]
        return self._sample(probs, rng)

    def learn_counts(self, t, arms, imps, clicks):  # type: ignore[no-untyped-def]
        parts = 24 // DAYPART_HOURS
        key = ((t["audience"] * len(DEVICES) + t["device"]) * parts + t["part"]) * self.k + arms
        size = len(AUDIENCES) * len(DEVICES) * parts * self.k
        n = np.bincount(key, weights=imps, minlength=size)
        c = np.bincount(key, weights=clicks, minlength=size)
        for i in np.flatnonzero((n > 0) | (c > 0)):
            i = int(i)
            arm = i % self.k
            cell = i // self.k
            part = cell % parts
            device = (cell // parts) % len(DEVICES)
            audience = cell // (parts * len(DEVICES))
            self.models[audience].learn_increment(
                learner_context("feed", _cell(device, part)), f"c{arm}", float(n[i]), float(c[i])
            )


def _one_hot(t: dict[str, np.ndarray]) -> np.ndarray:
    parts = 24 // DAYPART_HOURS
    x = np.zeros((t["audience"].size, len(AUDIENCES) + len(DEVICES) + parts))
    rows = np.arange(x.shape[0])
    x[rows, t["audience"]] = 1.0
    x[rows, len(AUDIENCES) + t["device"]] = 1.0
    x[rows, len(AUDIENCES) + len(DEVICES) + t["part"]] = 1.0
    return x


class Mabwiser(Agent):
    """MABWiser's linear contextual policies over one-hot audience, device, day part."""

    def __init__(self, world: ContextWorld, name: str, make: Callable[[], Any]) -> None:
        super().__init__(world)
        from mabwiser.mab import MAB

        self.name = name
        self.mab = MAB(list(range(self.k)), make(), seed=world.scenario.seed)
        self.fitted = False

    def choose(self, t, rng):  # type: ignore[no-untyped-def]
        if not self.fitted:
            return rng.integers(self.k, size=t["audience"].size)
        return np.asarray(self.mab.predict(_one_hot(t)), dtype=np.int64)

    def learn_examples(self, t, arms, clicked, propensity):  # type: ignore[no-untyped-def]
        if arms.size == 0:
            return
        fit = self.mab.partial_fit if self.fitted else self.mab.fit
        fit(arms.tolist(), clicked.astype(int), _one_hot(t))
        self.fitted = True


class Vowpal(Agent):
    """Vowpal Wabbit ``cb_explore_adf`` learning each impression, context in namespace c."""

    def __init__(self, world: ContextWorld, name: str, vw_args: tuple[str, ...]) -> None:
        super().__init__(world)
        self.name = name
        self.model = VowpalContextual(vw_args=vw_args, seed=world.scenario.seed)
        for j in range(self.k):
            self.model.add_arm(f"c{j}")
        parts = 24 // DAYPART_HOURS
        self.contexts = [
            {"audience": a, "device": d, "daypart": p}
            for a in AUDIENCES
            for d in DEVICES
            for p in range(parts)
        ]

    def _index(self, t: dict[str, np.ndarray]) -> np.ndarray:
        parts = 24 // DAYPART_HOURS
        return (t["audience"] * len(DEVICES) + t["device"]) * parts + t["part"]

    def choose(self, t, rng):  # type: ignore[no-untyped-def]
        # VW learns only between batches: one prediction per context is the exact
        # distribution of every impression with that context in the batch.
        table = self.model.serving_table(self.contexts)
        return self._sample(table[self._index(t)], rng)

    def learn_examples(self, t, arms, clicked, propensity):  # type: ignore[no-untyped-def]
        for i, arm, c, p in zip(self._index(t), arms, clicked, propensity, strict=True):
            self.model.learn_one(self.contexts[int(i)], int(arm), bool(c), float(p))


def agents(world: ContextWorld, which: set[str] | None = None) -> list[Agent]:
    from mabwiser.mab import LearningPolicy

    makers: dict[str, Callable[[], Agent]] = {
        "adloop_contextual_ts": lambda: AdloopContextual(world, "logistic_ts"),
        "adloop_contextual_vw": lambda: AdloopContextual(world, "vw"),
        "adloop": lambda: AdloopFree(world),
        "mabwiser_lints": lambda: Mabwiser(
            world, "MABWiser LinTS", lambda: LearningPolicy.LinTS(alpha=1.0)
        ),
        "mabwiser_linucb": lambda: Mabwiser(
            world, "MABWiser LinUCB", lambda: LearningPolicy.LinUCB(alpha=1.0)
        ),
        "vw_default": lambda: Vowpal(world, "VW cb_explore_adf (defaults)", ("--cb_explore_adf",)),
        "vw_tutorial": lambda: Vowpal(
            world,
            "VW cb_explore_adf (ε = 0.05, -q ca)",
            ("--cb_explore_adf", "--epsilon", "0.05", "-q", "ca"),
        ),
        "uniform": lambda: Uniform(world),
        "oracle": lambda: Oracle(world),
    }
    return [make() for name, make in makers.items() if which is None or name in which]


@dataclass
class Run:
    policy: str
    scenario: str
    seed: int
    impressions: int
    regret_at: dict[int, float]
    expected_clicks: float
    seconds: float


def simulate(world: ContextWorld, agent: Agent, impressions: int, batch: int = 1000) -> Run:
    """One policy over ``impressions`` of the world's traffic (see ``bench.bandits``)."""
    sc = world.scenario
    rng = np.random.default_rng(sc.seed + 2)
    tr = world.traffic(impressions)
    never = np.iinfo(np.int64).max
    arms_all = np.zeros(impressions, dtype=np.int64)
    clicked_all = np.zeros(impressions, dtype=bool)
    prop_all = np.ones(impressions)
    arrival = np.full(impressions, never, dtype=np.int64)
    delivered = finalized = 0
    cum_regret = expected = 0.0
    regret_at: dict[int, float] = {}
    started = time.perf_counter()
    for start in range(0, impressions, batch):
        end = min(start + batch, impressions)
        t = {k: v[start:end] for k, v in tr.items()}
        arms = agent.choose(t, rng)
        ctr = world.ctr[t["audience"], t["device"], t["part"]]
        p = ctr[np.arange(end - start), arms]
        step = np.cumsum(ctr.max(axis=1) - p) + cum_regret
        for cp in CHECKPOINTS:
            if start < cp <= end:
                regret_at[cp] = float(step[cp - start - 1])
        cum_regret = float(step[-1])
        expected += float(p.sum())
        clicked = t["uniform"] < p
        arms_all[start:end] = arms
        clicked_all[start:end] = clicked
        prop_all[start:end] = agent.propensity if agent.propensity.size == arms.size else 1.0
        idx = np.arange(start, end)
        arrival[idx[clicked]] = idx[clicked] + t["delay"][clicked]
        # Counts: this batch's impressions now, the clicks that have landed by `end`.
        landed = np.flatnonzero(arrival[delivered:end] < end) + delivered
        arrival[landed] = never
        both = np.concatenate([idx, landed])
        c = {k: v[both] for k, v in tr.items()}
        c["end"] = np.array(end)
        agent.learn_counts(
            c,
            arms_all[both],
            np.concatenate([np.ones(end - start), np.zeros(landed.size)]),
            np.concatenate([np.zeros(end - start), np.ones(landed.size)]),
        )
        delivered = max(delivered, end - sc.max_click_delay - 1)
        # Examples: impressions whose attribution window has closed.
        done = max(finalized, end - sc.max_click_delay)
        if done > finalized:
            s = slice(finalized, done)
            agent.learn_examples(
                {k: v[s] for k, v in tr.items()}, arms_all[s], clicked_all[s], prop_all[s]
            )
            finalized = done
    return Run(
        policy=agent.name,
        scenario=sc.name,
        seed=sc.seed,
        impressions=impressions,
        regret_at=regret_at,
        expected_clicks=expected,
        seconds=time.perf_counter() - started,
    )


def run_simulation(
    impressions: int,
    seeds: int,
    which: set[str] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Both scenarios × ``seeds`` seeds × every policy; the regret table as data."""
    runs: list[Run] = []
    for context_matters in (True, False):
        for s in range(seeds):
            scenario = ContextScenario(
                name="context_matters" if context_matters else "context_free",
                context_matters=context_matters,
                seed=7 + s,
            )
            world = ContextWorld(scenario)
            for agent in agents(world, which):
                run = simulate(world, agent, impressions)
                runs.append(run)
                final = run.regret_at.get(impressions, max(run.regret_at.values(), default=0))
                progress(
                    f"{scenario.name:>15} seed {scenario.seed} {run.policy:<40} regret "
                    f"{final:>8,.0f}  {run.seconds:.1f}s"
                )
    return {"impressions": impressions, "seeds": seeds, "runs": [vars(r) for r in runs]}


def simulation_markdown(result: dict[str, Any]) -> list[str]:
    n = result["impressions"]
    checkpoints = [cp for cp in CHECKPOINTS if cp <= n]
    lines: list[str] = []
    for scenario, title in (
        ("context_matters", "CTR depends on creative × audience × device × hour"),
        ("context_free", "CTR depends on creative × audience only"),
    ):
        runs = [r for r in result["runs"] if r["scenario"] == scenario]
        if not runs:
            continue
        by_policy: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            by_policy.setdefault(r["policy"], []).append(r)
        oracle = by_policy.get("oracle", [])
        oracle_clicks = np.mean([r["expected_clicks"] for r in oracle]) if oracle else np.nan
        lines += [
            f"### {title} (`{scenario}`)",
            "",
            "| policy | "
            + " | ".join(f"regret @{cp:,}" for cp in checkpoints)
            + " | CTR / oracle | s per run |",
            "|---|" + "---:|" * (len(checkpoints) + 2),
        ]
        for policy, rs in sorted(
            by_policy.items(), key=lambda kv: np.mean([r["regret_at"].get(n, 0) for r in kv[1]])
        ):
            cells = []
            for cp in checkpoints:
                values = [r["regret_at"][cp] for r in rs if cp in r["regret_at"]]
                sd = f" ± {np.std(values, ddof=1):,.0f}" if len(values) > 1 else ""
                cells.append(f"{np.mean(values):,.0f}{sd}" if values else "—")
            ratio = np.mean([r["expected_clicks"] for r in rs]) / oracle_clicks
            seconds = np.mean([r["seconds"] for r in rs])
            lines.append(f"| {policy} | " + " | ".join(cells) + f" | {ratio:.3f} | {seconds:.1f} |")
        lines.append("")
    return lines


def margins(result: dict[str, Any], ours: str = "adloop contextual (logistic_ts)") -> dict:
    """Per scenario: our final regret against each other policy's, with the seeds' spread
    (paired differences: the seeds share their traffic across policies)."""
    n = result["impressions"]
    out: dict[str, dict[str, Any]] = {}
    for scenario in ("context_matters", "context_free"):
        runs = [r for r in result["runs"] if r["scenario"] == scenario]
        mine = {r["seed"]: r["regret_at"].get(n) for r in runs if r["policy"] == ours}
        for r in runs:
            if r["policy"] in (ours, "oracle"):
                continue
            entry = out.setdefault(scenario, {}).setdefault(r["policy"], [])
            if mine.get(r["seed"]) is not None and r["regret_at"].get(n) is not None:
                entry.append(r["regret_at"][n] - mine[r["seed"]])
    return {
        scenario: {
            policy: {
                "their_regret_minus_ours_mean": float(np.mean(d)),
                "sd": float(np.std(d, ddof=1)) if len(d) > 1 else None,
                "seeds": len(d),
            }
            for policy, d in by.items()
            if d
        }
        for scenario, by in out.items()
    }


# -- ingest cost -------------------------------------------------------------------------------


def _events(n: int, seed: int = 3) -> tuple[list[bytes], list[bytes]]:
    import msgspec

    from adloop.schemas import Click, Impression

    rng = np.random.default_rng(seed)
    enc = msgspec.json.Encoder()
    t0 = time.time() - n * 1e-3 - 60.0
    impressions, clicks = [], []
    hours = rng.integers(24, size=n)
    devices = rng.choice(len(DEVICES), size=n, p=DEVICE_WEIGHTS)
    for i in range(n):
        impression_id = f"b{i:09d}"
        impressions.append(
            enc.encode(
                Impression(
                    impression_id=impression_id,
                    timestamp=t0 + i * 1e-3,
                    campaign="bench",
                    audience=AUDIENCES[i % 3],
                    placement="feed",
                    creative_id=f"c{i % 6}",
                    propensity=1 / 6,
                    policy="uniform",
                    context={
                        "device": DEVICES[int(devices[i])],
                        "hour": int(hours[i]),
                        "os": "android",
                        "language": "en",
                    },
                )
            )
        )
        if rng.random() < 0.05:
            clicks.append(enc.encode(Click(impression_id=impression_id, timestamp=t0 + i * 1e-3)))
    return impressions, clicks


def ingest_cost(n: int = 200_000, batch: int = 20_000, repeats: int = 3) -> dict[str, Any]:
    """µs per event of the ingest's per-partition work (decode, join, count, and every
    ``batch`` events a checkpoint write and the snapshots' JSON), with and without
    context cells. The best of ``repeats`` runs each (the machine is shared)."""
    import msgspec

    from adloop.schemas import Click, Impression, OutcomeSnapshot
    from adloop.streams.config import Settings
    from adloop.streams.ingest import PartitionState, open_store

    impressions, clicks = _events(n)
    dec_imp = msgspec.json.Decoder(Impression).decode
    dec_click = msgspec.json.Decoder(Click).decode
    enc = msgspec.json.Encoder().encode
    out: dict[str, Any] = {"impressions": n, "clicks": len(clicks), "batch_events": batch}
    for label, policy in (("without cells", "discounted_thompson"), ("with cells", "contextual")):
        best = float("inf")
        snapshot_bytes = 0
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                settings = Settings(
                    policy=policy, context_features="device,hour/6", data_dir=Path(tmp)
                )
                db = open_store(Path(tmp) / "ingest")
                state = PartitionState(db, 0, settings)
                now = time.time()
                events = [(True, raw) for raw in impressions] + [(False, raw) for raw in clicks]
                started = time.perf_counter()
                sent = 0
                for start in range(0, len(events), batch):
                    for is_impression, raw in events[start : start + batch]:
                        if is_impression:
                            state.add_impression(dec_imp(raw), 0, now)
                        else:
                            state.attribute(dec_click(raw), now)
                    for key, counts, last in state.dirty():
                        campaign, _, audience = key.partition("|")
                        snapshot = OutcomeSnapshot(
                            campaign=campaign,
                            audience=audience,
                            sources={0: counts},
                            emitted_at=now,
                            last_event_at=last,
                        )
                        if state.contexts is not None:
                            snapshot.contexts[0] = state.contexts.snapshot_rows(key, now)
                        sent += len(enc(snapshot))
                    db.write(state.write_batch({"impressions": start + batch}))
                    state.committed()
                elapsed = time.perf_counter() - started
                db.close()
            if elapsed < best:
                best, snapshot_bytes = elapsed, sent
        out[label] = {
            "us_per_event": best / len(events) * 1e6,
            "events_per_s": len(events) / best,
            "snapshot_bytes": snapshot_bytes,
        }
    base, cells = out["without cells"], out["with cells"]
    out["added_us_per_event"] = cells["us_per_event"] - base["us_per_event"]
    out["relative"] = cells["us_per_event"] / base["us_per_event"]
    return out


# -- serving latency -----------------------------------------------------------------------------


def _select_paced(
    host: str, port: int, rate: float, seconds: float, seed: int, queue: mp.Queue
) -> None:
    """Run in another process: selects with a context, paced at ``rate`` per second
    (one keep-alive connection), client-side latency in ms."""
    from adloop.bench.exchange import HttpSelector

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    api = HttpSelector(host, port)
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    cells: dict[str, int] = {}
    late = 0
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < seconds:
        due = started + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        else:
            late += 1
        context = {
            "device": DEVICES[int(rng.integers(len(DEVICES)))],
            "hour": int(rng.integers(24)),
            "os": "android",
        }
        t0 = time.perf_counter()
        chosen = api("ctx", AUDIENCES[i % 3], "feed", context)
        latencies.append((time.perf_counter() - t0) * 1000)
        cell = chosen.get("context_cell") or "none"
        cells[cell] = cells.get(cell, 0) + 1
        i += 1
    queue.put(
        {
            "latencies_ms": latencies,
            "seconds": time.monotonic() - started,
            "late": late,
            "cells": cells,
        }
    )


def serving_latency(
    rate: float = 1000.0, seconds: float = 10.0, broker: str | None = None
) -> dict[str, Any]:
    """The contextual stack (ingest, worker, serving) on the embedded broker, trained on
    20,000 impressions with contexts; then ``select`` with a context at ``rate``/s from
    another process."""
    from kafka import KafkaProducer

    from adloop.bench.exchange import HttpSelector
    from adloop.bench.harness import deployment, free_port
    from adloop.schemas import Creative
    from adloop.streams.kafka_io import kafka_python_kwargs
    from adloop.streams.supervisor import Supervisor

    with (
        deployment(broker, api_port=free_port(), worker_web_port=0, policy="contextual") as s,
        Supervisor(s) as sup,
    ):
        sup.wait_http_ready()
        api = HttpSelector.local(s)
        for j in range(6):
            api.register(Creative(creative_id=f"ctx-c{j}", campaign="ctx", headline=HEADLINES[j]))
        producer = KafkaProducer(**kafka_python_kwargs(KafkaProducer, s, linger_ms=5, acks=1))
        rng = np.random.default_rng(5)
        t0 = time.time() - 600.0
        n = 20_000
        for i in range(n):
            iid = f"ctx{i}"
            device = DEVICES[int(rng.integers(3))]
            value = {
                "schema_version": 1,
                "impression_id": iid,
                "timestamp": t0 + i * 0.01,
                "campaign": "ctx",
                "audience": AUDIENCES[i % 3],
                "placement": "feed",
                "creative_id": f"ctx-c{i % 6}",
                "propensity": 1 / 6,
                "policy": "uniform",
                "context": {"device": device, "hour": int(rng.integers(24))},
            }
            producer.send(s.topic("impressions"), json.dumps(value).encode(), key=iid.encode())
            if rng.random() < 0.03 * (1 + (i % 6 == DEVICES.index(device))):
                click = {"schema_version": 1, "impression_id": iid, "timestamp": t0 + i * 0.01}
                producer.send(s.topic("clicks"), json.dumps(click).encode(), key=iid.encode())
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 180
        learned = 0
        while time.monotonic() < deadline:
            total = 0
            for audience in AUDIENCES:
                status, body = api.get(f"/v1/campaigns/ctx/audiences/{audience}/decision")
                if status == 200 and body.get("contextual"):
                    total += body["contextual"]["learned_impressions"]
            learned = total
            if learned >= n:
                break
            time.sleep(0.5)
        status, body = api.get("/v1/campaigns/ctx/audiences/young/decision")
        decision_bytes = len(json.dumps(body))
        ctx = mp.get_context("spawn")
        queue: mp.Queue = ctx.Queue()
        client = ctx.Process(
            target=_select_paced, args=(s.api_host, s.api_port, rate, seconds, 9, queue)
        )
        client.start()
        measured = queue.get(timeout=seconds + 120)
        client.join(timeout=30)
    latencies = np.asarray(measured["latencies_ms"])
    return {
        "target_rate": rate,
        "achieved_rate": latencies.size / measured["seconds"],
        "requests": int(latencies.size),
        "late_requests": measured["late"],
        "p50_ms": float(np.percentile(latencies, 50)),
        "p90_ms": float(np.percentile(latencies, 90)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "max_ms": float(latencies.max()),
        "cells_served": measured["cells"],
        "learned_impressions": learned,
        "decision_json_bytes": decision_bytes,
    }


def spine_ratio(n: int = 100_000, broker: str | None = None) -> dict[str, Any]:
    """``adloop bench spine``'s throughput measurement (preloaded events, ingest +
    worker until every count is in a decision, against the raw-consume ceiling) on
    impressions with a context: the default policy, then the contextual one."""
    from rich.console import Console

    from adloop.bench.harness import deployment
    from adloop.bench.spine import SpineReport, throughput

    console = Console(stderr=True)
    out: dict[str, Any] = {"impressions": n}
    for label, policy in (("default policy", "discounted_thompson"), ("contextual", "contextual")):
        report = SpineReport()
        with deployment(broker, worker_web_port=0, policy=policy) as settings:
            throughput(settings, n, report, console, context=True)
        out[label] = {
            "ceiling_events_per_s": report.ceiling_events_per_s,
            "adloop_events_per_s": report.adloop_events_per_s,
            "ratio": report.ratio,
            "counts_exact": report.counts_exact,
            "process_usage": report.process_usage,
        }
    return out


# -- the command -----------------------------------------------------------------------------


def run(
    out: Path,
    impressions: int = 200_000,
    seeds: int = 3,
    which: set[str] | None = None,
    serving: bool = True,
    ingest: bool = True,
    spine: int = 0,
    broker: str | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Writes ``contextual.md`` and ``contextual.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    result["simulation"] = run_simulation(impressions, seeds, which, progress)
    result["margins"] = margins(result["simulation"])
    if ingest:
        result["ingest_cost"] = ingest_cost()
        progress(f"ingest cost: {json.dumps(result['ingest_cost'])}")
    if spine:
        result["spine"] = spine_ratio(spine, broker)
        progress(f"spine on impressions with a context: {json.dumps(result['spine'])}")
    if serving:
        result["serving"] = serving_latency(broker=broker)
        progress(
            "select with a context: "
            + json.dumps({k: v for k, v in result["serving"].items() if k != "cells_served"})
        )
    (out / "contextual.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "contextual.md").write_text("\n".join(markdown(result)) + "\n")
    return result


def markdown(result: dict[str, Any]) -> list[str]:
    sim = result["simulation"]
    lines = [
        "# The contextual policy",
        "",
        f"Simulator: {sim['impressions']:,} impressions per run, {sim['seeds']} seed(s) "
        "(mean ± standard deviation over seeds), batches of 1,000, clicks delayed up to "
        "1,000 impressions. 3 audiences, 3 devices, 24 hours (cells: device × 6-hour "
        "day part), 6 creatives. Regret: expected clicks lost against the best creative "
        "for the impression's audience, device and hour.",
        "",
        *simulation_markdown(sim),
    ]
    m = result.get("margins", {})
    if m:
        lines += [
            "Margin: other policy's final regret minus adloop contextual (logistic_ts)'s, "
            "paired by seed (positive: ours lost fewer clicks).",
            "",
            "| scenario | policy | margin | sd over seeds |",
            "|---|---|---:|---:|",
        ]
        for scenario, by in m.items():
            for policy, d in sorted(by.items()):
                sd = f"{d['sd']:,.0f}" if d["sd"] is not None else "—"
                lines.append(
                    f"| {scenario} | {policy} | {d['their_regret_minus_ours_mean']:+,.0f} | {sd} |"
                )
        lines.append("")
    if "ingest_cost" in result:
        c = result["ingest_cost"]
        lines += [
            "## Ingest cost per event (in-process partition state, RocksDB, checkpoints)",
            "",
            "| | µs per event | events/s | snapshot JSON bytes |",
            "|---|---:|---:|---:|",
        ]
        for label in ("without cells", "with cells"):
            x = c[label]
            lines.append(
                f"| {label} | {x['us_per_event']:.2f} | {x['events_per_s']:,.0f} | "
                f"{x['snapshot_bytes']:,} |"
            )
        lines += [
            "",
            f"Context cells add {c['added_us_per_event']:.2f} µs per event "
            f"(×{c['relative']:.2f}); {c['impressions']:,} impressions with 4 context keys, "
            f"{c['clicks']:,} clicks.",
            "",
        ]
    if "spine" in result:
        sp = result["spine"]
        lines += [
            f"## Throughput against the ceiling, {sp['impressions']:,} impressions with a "
            "context (+5 % clicks), embedded broker",
            "",
            "| | ceiling events/s | adloop events/s | ratio (goal ≥ 0.3) | counts |",
            "|---|---:|---:|---:|---|",
        ]
        for label in ("default policy", "contextual"):
            x = sp[label]
            lines.append(
                f"| {label} | {x['ceiling_events_per_s']:,.0f} | {x['adloop_events_per_s']:,.0f} "
                f"| {x['ratio']:.2f} | {'exact' if x['counts_exact'] else 'NOT exact'} |"
            )
        lines.append("")
    if "serving" in result:
        s = result["serving"]
        lines += [
            "## `POST /v1/select` with a context, from another process",
            "",
            f"Target {s['target_rate']:,.0f} req/s, achieved {s['achieved_rate']:,.0f} req/s "
            f"({s['requests']:,} requests, one keep-alive connection): p50 "
            f"{s['p50_ms']:.2f} ms, p90 {s['p90_ms']:.2f} ms, **p99 {s['p99_ms']:.2f} ms**, "
            f"max {s['max_ms']:.1f} ms (goal: p99 ≤ 5 ms). Decision record with the compiled "
            f"policy: {s['decision_json_bytes']:,} bytes of JSON.",
            "",
        ]
    return lines

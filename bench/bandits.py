"""``adloop bench bandits``: adloop's engine against the libraries people use instead.

Every policy sees the same simulated traffic (:mod:`bench.simulator`) in batches of
``batch`` impressions: it fixes its serving distribution at the start of a batch (as
the stream does between decisions), and learns at the end of the batch from what is
known by then:

* count-based learners (adloop) count impressions at once and clicks when they land,
  which is how adloop's stream works;
* per-impression learners (MABWiser, Vowpal Wabbit) need one labelled example per
  impression, so they learn an impression once its attribution window has closed.

Regret is measured on expected CTRs: Σ (best live CTR in the audience now − CTR of
the shown creative now), both under the policy's own fatigue state. The oracle shows
the best live creative for the audience at every batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from adloop.bandit import BetaPrior
from adloop.bandit.contextual import VowpalContextual
from adloop.bandit.engine import CreativeEngine, EngineConfig
from adloop.bench.simulator import Scenario, SimCreative, World

__all__ = ["SimResult", "run_comparison", "simulate"]

CHECKPOINTS = (10_000, 100_000, 1_000_000)


class Agent(Protocol):
    name: str

    def add_creative(self, j: int, creative: SimCreative, t: int) -> None: ...

    def choose(self, audiences: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray: ...

    def learn_counts(
        self, t: int, audiences: np.ndarray, arms: np.ndarray, imps: np.ndarray, clicks: np.ndarray
    ) -> None: ...

    def learn_examples(
        self, audiences: np.ndarray, arms: np.ndarray, clicked: np.ndarray, propensity: np.ndarray
    ) -> None: ...


class _Base:
    """Defaults: an agent uses one of the two feedback paths and ignores the other."""

    name = "base"
    propensity: np.ndarray

    def __init__(self, world: World) -> None:
        self.world = world
        self.live: list[int] = []  # global creative indices, in arm order

    def add_creative(self, j: int, creative: SimCreative, t: int) -> None:
        self.live.append(j)

    def learn_counts(self, t, audiences, arms, imps, clicks) -> None:  # type: ignore[no-untyped-def]
        pass

    def learn_examples(self, audiences, arms, clicked, propensity) -> None:  # type: ignore[no-untyped-def]
        pass

    def _sample(
        self, audiences: np.ndarray, probs: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Sample one arm per impression from per-audience distributions probs[audience]."""
        cum = np.cumsum(probs, axis=1)
        cum[:, -1] = 1.0
        u = rng.random(audiences.size)
        pos = (u[:, None] > cum[audiences]).sum(axis=1)
        self.propensity = probs[audiences, pos]
        return np.asarray(self.live)[pos]


class AdloopAgent(_Base):
    """adloop's CreativeEngine, one per audience (the stream keys by campaign × audience)."""

    def __init__(self, world: World, config: EngineConfig, name: str, prior_strength: float = 20.0):
        super().__init__(world)
        self.name = name
        self.engines = [CreativeEngine(config) for _ in range(world.n_audiences)]
        self.prior_strength = prior_strength
        self.alarms: list[tuple[int, int, str, str]] = []  # (t, audience, creative, reason)

    def add_creative(self, j: int, creative: SimCreative, t: int) -> None:
        super().add_creative(j, creative, t)
        prior = BetaPrior.from_mean(creative.predicted_ctr, self.prior_strength)
        for engine in self.engines:
            engine.add_arm(creative.creative_id, prior)

    def choose(self, audiences: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
        probs = np.stack([e.serving_probabilities(rng) for e in self.engines])
        return self._sample(audiences, probs, rng)

    def learn_counts(self, t, audiences, arms, imps, clicks) -> None:  # type: ignore[no-untyped-def]
        pos = {j: i for i, j in enumerate(self.live)}
        for a, engine in enumerate(self.engines):
            sel = audiences == a
            if not sel.any():
                continue
            idx = np.array([pos[j] for j in arms[sel]], dtype=np.intp)
            for alarm in engine.learn_many(idx, imps[sel], clicks[sel], t=float(t)):
                self.alarms.append((t, a, engine.arm_ids[alarm.arm], alarm.reason()))


class UniformAgent(_Base):
    name = "uniform"

    def choose(self, audiences: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
        k = len(self.live)
        return self._sample(audiences, np.full((self.world.n_audiences, k), 1.0 / k), rng)


class OracleAgent(_Base):
    """Shows the best live creative for the audience (knows the true CTRs)."""

    name = "oracle"
    ctr_now: np.ndarray

    def choose(self, audiences: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
        live = np.asarray(self.live)
        best = live[np.argmax(self.ctr_now[:, live], axis=1)]
        self.propensity = np.ones(audiences.size)
        return best[audiences]


def _context_matrix(world: World) -> np.ndarray:
    """One-hot audience features (age, device) for the linear contextual peers."""
    names = sorted({f"{k}={v}" for aud in world.audiences for k, v in aud.items()})
    return np.array(
        [
            [
                1.0 if f"{k}={v}" in {f"{kk}={vv}" for kk, vv in aud.items()} else 0.0
                for k, v in (n.split("=") for n in names)
            ]
            for aud in world.audiences
        ]
    )


class MabwiserAgent(_Base):
    """MABWiser as a user would set it up: one MAB per audience, or one LinTS over features."""

    def __init__(self, world: World, name: str, make_policy: Callable[[], Any], contextual: bool):
        super().__init__(world)
        from mabwiser.mab import MAB

        self.name = name
        self._mab_cls = MAB
        self._make_policy = make_policy
        self.contextual = contextual
        self.X = _context_matrix(world)
        self.mabs: list[Any] = []
        self.fitted: list[bool] = []

    def add_creative(self, j: int, creative: SimCreative, t: int) -> None:
        super().add_creative(j, creative, t)
        if not self.mabs:
            n = 1 if self.contextual else self.world.n_audiences
            self.mabs = [
                self._mab_cls([j], self._make_policy(), seed=self.world.scenario.seed + i)
                for i in range(n)
            ]
            self.fitted = [False] * n
        else:
            for m in self.mabs:
                m.add_arm(j)

    def choose(self, audiences: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty(audiences.size, dtype=np.int64)
        if self.contextual:
            if not self.fitted[0]:
                return rng.choice(np.asarray(self.live), size=audiences.size)
            out[:] = self.mabs[0].predict(self.X[audiences])
            return out
        for a, mab in enumerate(self.mabs):
            sel = np.flatnonzero(audiences == a)
            if sel.size == 0:
                continue
            if not self.fitted[a]:
                out[sel] = rng.choice(np.asarray(self.live), size=sel.size)
            else:
                out[sel] = mab.predict(np.zeros((sel.size, 1)))
        return out

    def learn_examples(self, audiences, arms, clicked, propensity) -> None:  # type: ignore[no-untyped-def]
        if audiences.size == 0:
            return
        groups = (
            [(0, np.arange(audiences.size))]
            if self.contextual
            else [(a, np.flatnonzero(audiences == a)) for a in range(len(self.mabs))]
        )
        for a, sel in groups:
            if sel.size == 0:
                continue
            mab = self.mabs[a]
            ctx = self.X[audiences[sel]] if self.contextual else None
            decisions = arms[sel].tolist()
            rewards = clicked[sel].astype(int)
            if self.fitted[a]:
                mab.partial_fit(decisions, rewards, ctx)
            else:
                mab.fit(decisions, rewards, ctx)
                self.fitted[a] = True


class VowpalAgent(_Base):
    """Vowpal Wabbit ``cb_explore_adf`` as its tutorials configure it (ε-greedy, -q)."""

    name = "vw_cb_explore_adf"

    def __init__(
        self,
        world: World,
        vw_args: tuple[str, ...] = ("--cb_explore_adf", "--epsilon", "0.05", "-q", "ca"),
    ):
        super().__init__(world)
        self.model = VowpalContextual(vw_args=vw_args, seed=world.scenario.seed)

    def add_creative(self, j: int, creative: SimCreative, t: int) -> None:
        super().add_creative(j, creative, t)
        self.model.add_arm(creative.creative_id, creative.features)

    def choose(self, audiences: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
        # The context is the audience, and VW learns only between batches, so one
        # prediction per audience gives exactly the distribution per impression.
        probs = np.stack([self.model.serving_probabilities(aud) for aud in self.world.audiences])
        return self._sample(audiences, probs, rng)

    def learn_examples(self, audiences, arms, clicked, propensity) -> None:  # type: ignore[no-untyped-def]
        pos = {j: i for i, j in enumerate(self.live)}
        for a, j, c, p in zip(audiences, arms, clicked, propensity, strict=True):
            self.model.learn_one(self.world.audiences[int(a)], pos[int(j)], bool(c), float(p))


@dataclass
class SimResult:
    policy: str
    scenario: str
    impressions: int
    clicks: int
    expected_clicks: float
    regret_at: dict[int, float]
    regret_curve: list[tuple[int, float]]
    ctr_curve: list[tuple[int, float]]  # (t, expected CTR of the batch)
    adapt_impressions: int | None = None
    seconds: float = 0.0
    alarms: list[tuple[int, int, str, str]] = field(default_factory=list)

    @property
    def ctr(self) -> float:
        return self.clicks / max(self.impressions, 1)

    def expected_clicks_after(self, t: int) -> float:
        """Expected clicks of the impressions after ``t`` (steady state, learning done)."""
        total, prev = 0.0, 0
        for end, ctr in self.ctr_curve:
            if prev >= t:
                total += ctr * (end - prev)
            prev = end
        return total


def simulate(
    world: World, agent: Agent, impressions: int, batch: int = 1000, seed: int = 0
) -> SimResult:
    """Run one policy over ``impressions`` of the world's traffic."""
    sc = world.scenario
    rng = np.random.default_rng(seed)
    audiences, uniforms, delays = world.traffic(impressions)
    n_aud, n_cre = world.n_audiences, len(world.creatives)
    exposure = np.zeros((n_aud, n_cre))
    added: set[int] = set()
    # Shown impressions waiting for their final label (per-impression learners).
    hist_aud = np.empty(impressions, dtype=np.int64)
    hist_arm = np.empty(impressions, dtype=np.int64)
    hist_click = np.zeros(impressions, dtype=bool)
    hist_prop = np.ones(impressions)
    click_arrival = np.full(impressions, np.iinfo(np.int64).max, dtype=np.int64)
    finalized = 0
    delivered = 0
    cum_regret = 0.0
    clicks_total = 0
    expected_total = 0.0
    regret_at: dict[int, float] = {}
    regret_curve: list[tuple[int, float]] = []
    ctr_curve: list[tuple[int, float]] = []
    dropped_share: list[tuple[int, float]] = []
    started = time.perf_counter()
    for start in range(0, impressions, batch):
        end = min(start + batch, impressions)
        for j in world.live(start):
            if j not in added:
                added.add(j)
                agent.add_creative(j, world.creatives[j], start)
        live = np.asarray(sorted(added))
        ctr_now = world.true_ctr(start, exposure)
        if isinstance(agent, OracleAgent):
            agent.ctr_now = ctr_now
        aud = audiences[start:end]
        arms = agent.choose(aud, start, rng)
        p = ctr_now[aud, arms]
        best = ctr_now[:, live].max(axis=1)[aud]
        clicked = uniforms[start:end] < p
        step_regret = np.cumsum(best - p) + cum_regret
        for cp in CHECKPOINTS:
            if start < cp <= end:
                regret_at[cp] = float(step_regret[cp - start - 1])
        cum_regret = float(step_regret[-1])
        clicks_total += int(clicked.sum())
        expected_total += float(p.sum())
        regret_curve.append((end, cum_regret))
        ctr_curve.append((end, float(p.mean())))
        if world.dropped is not None:
            dropped_share.append((start, float(np.mean(arms == world.dropped))))
        np.add.at(exposure, (aud, arms), 1.0)
        hist_aud[start:end] = aud
        hist_arm[start:end] = arms
        hist_click[start:end] = clicked
        hist_prop[start:end] = getattr(agent, "propensity", np.ones(end - start))
        idx = np.arange(start, end)
        click_arrival[idx[clicked]] = idx[clicked] + delays[start:end][clicked]
        # Count feedback: this batch's impressions now, clicks that have landed by `end`.
        arrived = np.flatnonzero(click_arrival[delivered:end] < end) + delivered
        click_arrival[arrived] = np.iinfo(np.int64).max  # delivered once
        c_aud = np.concatenate([aud, hist_aud[arrived]])
        c_arm = np.concatenate([arms, hist_arm[arrived]])
        c_imp = np.concatenate([np.ones(end - start), np.zeros(arrived.size)])
        c_clk = np.concatenate([np.zeros(end - start), np.ones(arrived.size)])
        agent.learn_counts(end, c_aud, c_arm, c_imp, c_clk)
        delivered = max(delivered, end - sc.max_click_delay - 1)
        # Example feedback: impressions whose attribution window has closed.
        done = max(finalized, end - sc.max_click_delay)
        if done > finalized:
            s = slice(finalized, done)
            agent.learn_examples(hist_aud[s], hist_arm[s], hist_click[s], hist_prop[s])
            finalized = done
    adapt = None
    if world.dropped is not None and sc.drop_at is not None and sc.drop_at < impressions:
        before = [s for t, s in dropped_share if sc.drop_at - 20 * batch <= t < sc.drop_at]
        pre = float(np.mean(before)) if before else 0.0
        if pre > 0.05:
            after = [(t, s) for t, s in dropped_share if t >= sc.drop_at]
            adapt = next((t - sc.drop_at for t, s in after if s < pre / 2), None)
    return SimResult(
        policy=agent.name,
        scenario=sc.name,
        impressions=impressions,
        clicks=clicks_total,
        expected_clicks=expected_total,
        regret_at=regret_at,
        regret_curve=regret_curve,
        ctr_curve=ctr_curve,
        adapt_impressions=adapt,
        seconds=time.perf_counter() - started,
        alarms=list(getattr(agent, "alarms", [])),
    )


def sim_engine_config(**overrides: Any) -> EngineConfig:
    """adloop's defaults with the clock in impressions instead of event seconds."""
    return EngineConfig(**{"half_life": 500_000.0, **overrides})


def agents(world: World, which: set[str] | None = None) -> list[Agent]:
    from mabwiser.mab import LearningPolicy

    makers: dict[str, Callable[[], Agent]] = {
        "adloop": lambda: AdloopAgent(world, sim_engine_config(), "adloop"),
        "adloop_stationary_ts": lambda: AdloopAgent(
            world,
            sim_engine_config(policy="thompson", detect_changes=False, min_learning_share=0.0),
            "adloop_stationary_ts",
        ),
        "mabwiser_ts": lambda: MabwiserAgent(
            world, "mabwiser_ts", LearningPolicy.ThompsonSampling, contextual=False
        ),
        "mabwiser_ucb1": lambda: MabwiserAgent(
            world, "mabwiser_ucb1", lambda: LearningPolicy.UCB1(alpha=1.0), contextual=False
        ),
        "mabwiser_lints": lambda: MabwiserAgent(
            world, "mabwiser_lints", lambda: LearningPolicy.LinTS(alpha=1.0), contextual=True
        ),
        "vw_cb_explore_adf": lambda: VowpalAgent(world),
        "uniform": lambda: UniformAgent(world),
        "oracle": lambda: OracleAgent(world),
    }
    return [make() for name, make in makers.items() if which is None or name in which]


def false_alarms(impressions: int, seed: int, batch: int = 1000) -> dict[str, float]:
    """The detector on stationary traffic: alarms per creative × audience per 1M impressions."""
    world = World(Scenario.stationary(seed))
    agent = AdloopAgent(world, sim_engine_config(), "adloop")
    result = simulate(world, agent, impressions, batch)
    cells = world.n_audiences * len(world.creatives)
    return {
        "impressions": impressions,
        "alarms": len(result.alarms),
        "cells": cells,
        "alarms_per_cell_per_1m": len(result.alarms) / cells / (impressions / 1e6),
    }


def _fmt_regret(r: SimResult, cp: int) -> str:
    return f"{r.regret_at[cp]:,.0f}" if cp in r.regret_at else "—"


def _plot(results: dict[str, list[SimResult]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for scenario, rows in results.items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        for r in rows:
            t, reg = zip(*r.regret_curve, strict=True)
            ax1.plot(t, reg, label=r.policy)
            t, ctr = zip(*r.ctr_curve, strict=True)
            window = max(1, len(ctr) // 100)
            smooth = np.convolve(ctr, np.ones(window) / window, mode="valid")
            ax2.plot(t[window - 1 :], smooth, label=r.policy)
        ax1.set(
            title=f"cumulative regret — {scenario}",
            xlabel="impressions",
            ylabel="expected clicks lost",
        )
        ax1.set_xscale("log")
        ax1.legend(fontsize=8)
        ax2.set(title=f"expected CTR (rolling) — {scenario}", xlabel="impressions", ylabel="CTR")
        fig.tight_layout()
        path = out / f"bandits_{scenario}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run_comparison(
    out_dir: Path,
    quick: bool = False,
    impressions: int | None = None,
    seed: int = 7,
    which: set[str] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Both scenarios × every policy; writes bandits.md, bandits.json and PNG plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = impressions or (100_000 if quick else 1_000_000)
    results: dict[str, list[SimResult]] = {}
    for scenario in (Scenario.stationary(seed), Scenario(seed=seed)):
        world = World(scenario)
        rows = []
        for agent in agents(world, which):
            r = simulate(world, agent, n)
            regret = r.regret_at.get(min(n, 100_000), 0.0)
            progress(
                f"{scenario.name:>13} {r.policy:<22} regret {regret:>9,.0f} @100k  "
                f"CTR {r.ctr:.3%}  {r.seconds:.1f}s"
            )
            rows.append(r)
        results[scenario.name] = rows
    fa = false_alarms(n, seed)
    lines = [
        f"# Bandit comparison ({n:,} impressions per run, seed {seed})",
        "",
        "Regret: expected clicks lost against the best live creative per audience.",
        "CTR ratio: expected clicks / the oracle's expected clicks.",
        "",
    ]
    summary: dict[str, Any] = {"impressions": n, "seed": seed, "false_alarms": fa, "runs": []}
    for scenario, rows in results.items():
        oracle = next((r for r in rows if r.policy == "oracle"), None)
        lines += [
            f"## {scenario}",
            "",
            "| policy | regret @10k | @100k | @1M | CTR | CTR / oracle | CTR / oracle after 100k "
            "| time to adapt | s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            ratio = r.expected_clicks / oracle.expected_clicks if oracle else float("nan")
            after = (
                r.expected_clicks_after(100_000) / oracle.expected_clicks_after(100_000)
                if oracle and n > 100_000
                else float("nan")
            )
            adapt = f"{r.adapt_impressions:,}" if r.adapt_impressions is not None else "—"
            lines.append(
                f"| {r.policy} | {_fmt_regret(r, 10_000)} | {_fmt_regret(r, 100_000)} | "
                f"{_fmt_regret(r, 1_000_000)} | {r.ctr:.3%} | {ratio:.3f} | {after:.3f} | "
                f"{adapt} | {r.seconds:.1f} |"
            )
            summary["runs"].append(
                {
                    "scenario": scenario,
                    "policy": r.policy,
                    "regret_at": r.regret_at,
                    "ctr": r.ctr,
                    "ctr_ratio_to_oracle": ratio,
                    "ctr_ratio_to_oracle_after_100k": after,
                    "adapt_impressions": r.adapt_impressions,
                    "seconds": r.seconds,
                    "alarms": len(r.alarms),
                }
            )
        lines.append("")
    lines += [
        "## Change detector false alarms (stationary traffic)",
        "",
        f"{fa['alarms']} alarms over {fa['cells']} creative × audience cells in "
        f"{fa['impressions']:,} impressions = {fa['alarms_per_cell_per_1m']:.3f} per cell per "
        "1M impressions.",
        "",
    ]
    for path in _plot(results, out_dir):
        lines.append(f"![{path.stem}]({path.name})")
    (out_dir / "bandits.md").write_text("\n".join(lines) + "\n")
    (out_dir / "bandits.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary

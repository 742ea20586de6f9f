"""Pure bandit maths for ad creatives: no I/O, numpy state, JSON-safe serialization.

* :mod:`bandit.beta`        exact Beta-Bernoulli posteriors (the stream's counts);
* :mod:`bandit.policies`    Thompson (stationary / discounted), KL-UCB, ε-greedy, uniform;
* :mod:`bandit.contextual`  contextual learners' interface, Vowpal Wabbit ``cb_explore_adf``;
* :mod:`bandit.linear_ts`   contextual Thompson sampling on a Bayesian logistic model;
* :mod:`bandit.analysis`    P(best), expected loss, labels, exploration guard;
* :mod:`bandit.detect`      CUSUM change detector and underperformance verdicts;
* :mod:`bandit.priors`      empirical-Bayes priors for new audiences;
* :mod:`bandit.engine`      all of it for one campaign × audience.
"""

from .beta import STATE_FORMAT, STATE_VERSION, UNIFORM_PRIOR, BetaArms, BetaPrior
from .engine import ArmReport, CreativeEngine, EngineConfig
from .policies import POLICIES, BanditPolicy, make_policy

__all__ = [
    "POLICIES",
    "STATE_FORMAT",
    "STATE_VERSION",
    "UNIFORM_PRIOR",
    "ArmReport",
    "BanditPolicy",
    "BetaArms",
    "BetaPrior",
    "CreativeEngine",
    "EngineConfig",
    "make_policy",
]

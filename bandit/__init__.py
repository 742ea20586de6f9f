"""Beta-Bernoulli Thompson sampling: pure numpy posteriors with JSON-safe state."""

from .beta import STATE_FORMAT, STATE_VERSION, UNIFORM_PRIOR, BetaArms, BetaPrior

__all__ = ["STATE_FORMAT", "STATE_VERSION", "UNIFORM_PRIOR", "BetaArms", "BetaPrior"]

"""pyro-relax: reparameterizable relaxations of discrete random variables for Pyro."""

from pyro_relax import kl  # noqa: F401  (registers the KL divergences)
from pyro_relax.distributions import (
    GenGS,
    GenGSBinomial,
    GenGSGeometric,
    GenGSMultinomial,
    GenGSNegativeBinomial,
    GenGSPoisson,
    TruncatedGenGS,
    TruncationWarning,
    automatic_truncation,
    truncated_log_probs,
)
from pyro_relax.schedules import ExponentialDecay

__version__ = "0.1.0"

__all__ = [
    "ExponentialDecay",
    "GenGS",
    "GenGSBinomial",
    "GenGSGeometric",
    "GenGSMultinomial",
    "GenGSNegativeBinomial",
    "GenGSPoisson",
    "TruncatedGenGS",
    "TruncationWarning",
    "automatic_truncation",
    "truncated_log_probs",
]

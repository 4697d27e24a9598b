"""Relaxed distributions of discrete random variables, one family per module."""

from pyro_relax.distributions.gengs import (
    GenGS,
    GenGSBinomial,
    GenGSGeometric,
    GenGSMultinomial,
    GenGSNegativeBinomial,
    GenGSPoisson,
    TruncatedGenGS,
    TruncationWarning,
)
from pyro_relax.distributions.truncation import automatic_truncation, truncated_log_probs

__all__ = [
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

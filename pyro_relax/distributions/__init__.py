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
from pyro_relax.distributions.igr import IGR, IGRCount, IGRPlanar, IGRStickBreaking, igr_log_probs
from pyro_relax.distributions.igr_priors import fit_igr_prior, uniform_igr_prior
from pyro_relax.distributions.straight_through import (
    GappedST,
    GappedSTBernoulli,
    GappedSTCategorical,
    GRMCKBernoulli,
    GRMCKCategorical,
    STBernoulli,
    STCategorical,
    STGSBernoulli,
    STGSCategorical,
)
from pyro_relax.distributions.truncation import automatic_truncation, truncated_log_probs

__all__ = [
    "GRMCKBernoulli",
    "GRMCKCategorical",
    "GappedST",
    "GappedSTBernoulli",
    "GappedSTCategorical",
    "GenGS",
    "GenGSBinomial",
    "GenGSGeometric",
    "GenGSMultinomial",
    "GenGSNegativeBinomial",
    "GenGSPoisson",
    "IGR",
    "IGRCount",
    "IGRPlanar",
    "IGRStickBreaking",
    "STBernoulli",
    "STCategorical",
    "STGSBernoulli",
    "STGSCategorical",
    "TruncatedGenGS",
    "TruncationWarning",
    "automatic_truncation",
    "fit_igr_prior",
    "igr_log_probs",
    "truncated_log_probs",
    "uniform_igr_prior",
]

"""Relaxed distributions of discrete random variables, one family per module."""

from pyro_relax.distributions import (
    finite_discrete,
    gengs,
    igr,
    igr_priors,
    straight_through,
    truncation,
)

# One export list: each family module's own ``__all__``.
_MODULES = (finite_discrete, gengs, igr, igr_priors, straight_through, truncation)
__all__ = sorted(name for module in _MODULES for name in module.__all__)
globals().update({name: getattr(module, name) for module in _MODULES for name in module.__all__})

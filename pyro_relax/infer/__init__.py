"""Inference tools for Pyro models with relaxed sites: the discrete model's ELBO and
log-likelihood, gradient diagnostics, the leave-one-out ELBO and an autoguide for relaxed
sites."""

from pyro_relax.infer import autoguide, evaluation, gradients, handlers, rloo

# One export list: each module's own ``__all__``.
_MODULES = (autoguide, evaluation, gradients, handlers, rloo)
__all__ = sorted(name for module in _MODULES for name in module.__all__)
globals().update({name: getattr(module, name) for module in _MODULES for name in module.__all__})

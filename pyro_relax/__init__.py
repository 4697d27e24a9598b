"""pyro-relax: reparameterizable relaxations of discrete random variables for Pyro."""

from pyro_relax import (
    _carry,
    distributions,
    infer,  # noqa: F401  (pyro_relax.infer, the inference tools, without a second import)
    kl,  # noqa: F401  (registers the KL divergences)
    schedules,
    transforms,
)

__version__ = "0.1.0"

# One export list: the public names are those of each module's own ``__all__``, re-exported
# here so that ``pyro_relax.GenGSPoisson`` and ``pyro_relax.distributions.GenGSPoisson`` are the
# same object.
_MODULES = (distributions, transforms, schedules, _carry)
__all__ = sorted(name for module in _MODULES for name in module.__all__)
globals().update({name: getattr(module, name) for module in _MODULES for name in module.__all__})

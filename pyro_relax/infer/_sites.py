"""Finding the relaxed distribution of a Pyro site inside the wrappers Pyro puts around it."""

import pyro.distributions as dist
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import Distribution, Independent

__all__: list = []


def is_relaxed(fn) -> bool:
    """Whether ``fn`` is itself a relaxation: a distribution with a ``discrete()`` method (every
    relaxed class of the library has one; see ``docs/architecture.md``)."""
    return isinstance(fn, Distribution) and callable(getattr(fn, "discrete", None))


def relaxed_base(fn):
    """The relaxed distribution inside ``fn`` (under ``to_event``, ``mask`` and Pyro's generic
    ``expand``), or ``None`` if there is none."""
    while not is_relaxed(fn):
        if isinstance(fn, Independent | MaskedDistribution | ExpandedDistribution):
            fn = fn.base_dist
        else:
            return None
    return fn


def rewrap(fn, replace):
    """``fn`` with its relaxed base ``b`` replaced by ``replace(b)`` and every wrapper around it
    rebuilt (``replace`` keeps the batch and event shapes)."""
    if is_relaxed(fn):
        return replace(fn)
    inner = rewrap(fn.base_dist, replace)
    if isinstance(fn, Independent):
        # Pyro's Independent: a site's distribution must be callable.
        return dist.Independent(inner, fn.reinterpreted_batch_ndims)
    if isinstance(fn, MaskedDistribution):
        return MaskedDistribution(inner, fn._mask)
    if isinstance(fn, ExpandedDistribution):
        return inner.expand(fn.batch_shape)
    raise TypeError(f"no relaxed distribution inside {type(fn).__name__}")


def site_is_relaxed(site) -> bool:
    """Whether a trace site is a sample site whose distribution is relaxed."""
    return site["type"] == "sample" and relaxed_base(site["fn"]) is not None

"""The record that describes one example distribution to the generic tests.

An example declares what it can do (its KL
partners, whether it builds without reading tensors on the host, how a sample maps to the
category it stands for), so the generic tests need no branches on the distribution's class.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.distributions import constraints

__all__ = ["Example"]


@dataclass(frozen=True)
class Example:
    """One distribution built from named parameters.

    Attributes:
        id: the test id.
        factory: builds the distribution from ``params`` (keyword arguments) and
            ``validate_args``.
        params: tensors passed to ``factory``; their dtype is the example's dtype.
        learnable: the parameters an SVI guide learns, with the constraint of each.
        prior: builds a model-side distribution that scores this example's samples under
            ``Trace_ELBO`` and has a registered KL from it (``None``: no SVI test).
        kl_partners: builds the distributions ``q`` for which ``KL(d || q)`` is registered.
        categories: maps ``(d, sample)`` to the index of the discrete outcome the sample
            stands for (``None``: not a relaxation of a categorical over ``category_probs``).
        category_probs: the discrete PMF the categories follow, ``batch_shape + (n,)``.
        reference_probs: maps ``(params, d)`` to the PMF ``category_probs`` must equal,
            computed from the example's ``params`` without the code under test (torch's,
            Pyro's or scipy's distributions, or a Monte Carlo of the definition); ``d`` serves
            only for an outcome table of vectors. Required where ``category_probs`` is given:
            ``category_probs`` alone reads the PMF off the class it tests.
        reference_tolerance: the absolute error ``reference_probs`` may have (a Monte Carlo
            reference's; 0 for an exact one, compared to the dtype's rounding).
        values_of: maps ``(d, index)`` to the plain value of that outcome, which ``log_prob``
            scores as the discrete distribution does.
        static_shapes: builds and samples without reading tensors on the host.
        exact_density: ``log_prob`` of an ``rsample`` value is the exact density of the
            latent it carries, so a registered KL equals the mean of ``log p - log q`` over
            ``rsample`` values (continuous relaxations such as IGR).
        through: the parameters that reach the distribution inside an object the factory
            builds with another library (a torch base distribution, Pyro's flows), each with
            the argument of the distribution that receives the object. The generated-input
            test leaves their types (lists, devices, dtypes) to that library.
        surrogate_gradient: the gradient of an ``rsample`` value is a surrogate's by design
            (straight-through estimators, GST), not the derivative of the value; the
            finite-difference test then differentiates ``log_prob`` of a fixed value instead.
    """

    id: str
    factory: Callable[..., torch.distributions.Distribution]
    params: dict[str, torch.Tensor]
    learnable: dict[str, constraints.Constraint] = field(default_factory=dict)
    prior: Callable[[], torch.distributions.Distribution] | None = None
    kl_partners: tuple[Callable[[], torch.distributions.Distribution], ...] = ()
    categories: Callable | None = None
    category_probs: Callable | None = None
    reference_probs: Callable | None = None
    reference_tolerance: float = 0.0
    values_of: Callable | None = None
    static_shapes: bool = True
    exact_density: bool = False
    through: dict[str, str] = field(default_factory=dict)
    surrogate_gradient: bool = False

    def parameters(self, *, requires_grad=False, device=None):
        """Fresh copies of ``params``; the learnable ones require grad if asked."""
        return {
            name: value.detach()
            .clone()
            .to(device)
            .requires_grad_(requires_grad and name in self.learnable)
            for name, value in self.params.items()
        }

    def build(self, params=None, *, validate_args=None, **overrides):
        params = {**(params if params is not None else self.parameters()), **overrides}
        return self.factory(validate_args=validate_args, **params)

    @property
    def dtype(self):
        return next(iter(self.params.values())).dtype

"""The recipe of docs/architecture.md, followed end to end for a new relaxation.

A made-up straight-through estimator, written as the recipe says (a subclass of the family's
base implementing the surrogate, a Bernoulli twin through ``_categorical_class``, inherited
KLs, one registry ``Example`` each). The registry runs every generic suite on these examples
as on the library's own: if a step of the recipe is missing or wrong, those tests fail.
"""

import torch
from example import Example
from examples_gst import _BINARY, _ONE_HOT, _onehot_uniform
from torch.distributions import constraints

from pyro_relax.distributions.straight_through import (
    _StraightThroughBernoulli,
    _StraightThroughCategorical,
)

__all__ = ["RECIPE_EXAMPLES"]


class HalfNoiseSTCategorical(_StraightThroughCategorical):
    r"""A straight-through estimator whose surrogate sees half of the Gumbel noise,
    :math:`h = \operatorname{softmax}((l + g / 2) / \tau)` (an illustration, not a method)."""

    def _surrogate(self, logits, index, one_hot, gumbels):
        return torch.softmax((logits + gumbels / 2) / self.temperature.unsqueeze(-1), -1), None


class HalfNoiseSTBernoulli(_StraightThroughBernoulli):
    """Its Bernoulli twin: step 2 of the recipe."""

    _categorical_class = HalfNoiseSTCategorical


_f64 = torch.float64
RECIPE_EXAMPLES = [
    Example(
        "HalfNoiseSTCategorical",
        lambda logits, temperature, **kw: HalfNoiseSTCategorical(temperature, logits=logits, **kw),
        {
            "logits": torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.2, -0.3]], dtype=_f64),
            "temperature": torch.tensor(0.5, dtype=_f64),
        },
        learnable={"logits": constraints.real},
        prior=_onehot_uniform(3),
        kl_partners=(_onehot_uniform(3),),
        **_ONE_HOT,
    ),
    Example(
        "HalfNoiseSTBernoulli",
        lambda logits, temperature, **kw: HalfNoiseSTBernoulli(temperature, logits=logits, **kw),
        {
            "logits": torch.tensor([0.5, -1.0], dtype=_f64),
            "temperature": torch.tensor(0.5, dtype=_f64),
        },
        learnable={"logits": constraints.real},
        **_BINARY,
    ),
]

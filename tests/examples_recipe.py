"""The recipe of docs/architecture.md, followed end to end for a new relaxation.

A made-up straight-through estimator, written as the recipe says (a subclass of the family's
base implementing the surrogate, a Bernoulli twin through ``_categorical_class``, inherited
KLs, one registry ``Example`` each), must pass every generic check of the test suite with no
other change: if a step of the recipe is missing or wrong, these tests fail.
"""

import pytest
import test_conformance
import test_fuzz
import test_pyro_integration
import torch
from example import Example
from examples_gst import _ONE_HOT, _onehot_uniform
from torch.distributions import constraints

from pyro_relax.distributions.straight_through import (
    _StraightThroughBernoulli,
    _StraightThroughCategorical,
)


class HalfNoiseSTCategorical(_StraightThroughCategorical):
    r"""A straight-through estimator whose surrogate sees half of the Gumbel noise,
    :math:`h = \operatorname{softmax}((l + g / 2) / \tau)` (an illustration, not a method)."""

    def _surrogate(self, logits, index, one_hot, gumbels):
        return torch.softmax((logits + gumbels / 2) / self.temperature.unsqueeze(-1), -1), None


class HalfNoiseSTBernoulli(_StraightThroughBernoulli):
    """Its Bernoulli twin: step 2 of the recipe."""

    _categorical_class = HalfNoiseSTCategorical


_f64 = torch.float64
CATEGORICAL = Example(
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
)
BERNOULLI = Example(
    "HalfNoiseSTBernoulli",
    lambda logits, temperature, **kw: HalfNoiseSTBernoulli(temperature, logits=logits, **kw),
    {"logits": torch.tensor([0.5, -1.0], dtype=_f64), "temperature": torch.tensor(0.5, dtype=_f64)},
    learnable={"logits": constraints.real},
)
NEW = [CATEGORICAL, BERNOULLI]
each = pytest.mark.parametrize("example", NEW, ids=lambda e: e.id)
# The Pyro integration tests expect an empty, seeded param store.
pytestmark = pytest.mark.usefixtures("fresh_pyro")


@each
def test_generic_distribution_checks(example):
    for sample_shape in [(), (5,)]:
        test_conformance.test_shapes_and_dtype(example, sample_shape)
    test_conformance.test_expand(example)
    test_conformance.test_samples_lie_in_support(example)
    test_conformance.test_pickle_round_trip(example)
    test_conformance.test_bad_temperature_is_rejected(example)
    test_conformance.test_values_and_gradients_are_finite(example)
    test_conformance.test_noise_and_constants_follow_the_parameters_device(example)
    test_conformance.test_discrete_is_the_distribution_relaxed(example)


def test_discrete_checks_and_pyro_integration():
    test_conformance.test_category_probs_are_normalized(CATEGORICAL)
    test_conformance.test_plain_outcomes_are_scored_by_the_discrete_pmf(CATEGORICAL)
    test_conformance.test_goodness_of_fit(CATEGORICAL)
    test_conformance.test_kl_matches_monte_carlo(CATEGORICAL)
    test_pyro_integration.test_trace_elbo_trains_inside_plates(CATEGORICAL)
    test_pyro_integration.test_trace_mean_field_elbo_uses_the_registered_kl(CATEGORICAL)
    test_pyro_integration.test_predictive(CATEGORICAL)


@each
def test_generated_inputs(example):
    test_fuzz.test_generated_inputs_are_refused_clearly_or_give_finite_results(example)

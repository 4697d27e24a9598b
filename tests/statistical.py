"""The tests' statistical checks: p-values from scipy at a stated level.

A check compares estimates with their expected values in units of standard errors (z-scores),
assuming each estimate is approximately normal (a mean of many independent draws, or a sum of
many independent terms) with the standard error given. It rejects a correct estimate with
probability at most ``level``, ``LEVEL`` unless a test states another. The tests seed their
draws, so a pass is deterministic.

(Not named ``statistics``: tests/ is on ``sys.path``, and that name would shadow the standard
library module, which the package and other tests import.)
"""

import torch
from scipy import stats

LEVEL = 1e-3


def z_scores(error, standard_error, allowance=0.0):
    """``max(|error| - allowance, 0) / standard_error``, elementwise: the distance from the
    expected value, less a deterministic allowance (a known systematic difference, which the
    test states), in standard errors. With an allowance at least the systematic difference,
    the scores are no larger in magnitude than standard normal ones."""
    error = torch.as_tensor(error, dtype=torch.float64).detach()
    standard_error = torch.as_tensor(standard_error, dtype=torch.float64).detach()
    excess = (error.abs() - allowance).clamp(min=0)
    return torch.where(excess > 0, excess / standard_error, 0.0)  # 0, not 0 / 0, within it


def assert_z_scores_are_standard(
    z, what, level=LEVEL, *, df=None, one_sided=False, independent=True
):
    """z-scores (a number, tensor or array), each about N(0, 1) for a correct estimate: none
    beyond the level ``level / K`` (Bonferroni over the K of them, valid however they depend on
    each other), two-sided, or with ``one_sided`` only the upper tail (an estimate that may
    fall short of its expected value, as a lower bound may, but not exceed it). With K > 1
    ``independent`` scores and two sides, also their sum of squares within chi-square with K
    degrees of freedom: a pattern of moderate errors that no single one reveals. The two
    assertions then run at ``level / 2`` each, so that together they reject correct estimates
    with probability at most ``level``.

    ``df``: the scores are Student t with ``df`` degrees of freedom (standard errors estimated
    from ``df + 1`` draws), replaced by the normal scores of equal tail probability."""
    z = torch.as_tensor(z, dtype=torch.float64).detach().flatten()
    if df is not None:
        z = z.sign() * torch.as_tensor(stats.norm.isf(stats.t.sf(z.abs().numpy(), df)))
    if one_sided:
        p = stats.norm.sf(z.numpy())
    else:
        p = 2 * stats.norm.sf(z.abs().numpy())
    both = independent and not one_sided and z.numel() > 1
    level = level / 2 if both else level
    assert p.min() > level / z.numel(), f"{what}: z-scores {z.tolist()}, p-values {p.tolist()}"
    if both:
        p_sum = stats.chi2.sf(float(z.square().sum()), z.numel())
        assert p_sum > level, f"{what}: z-scores {z.tolist()}, chi-square p-value {p_sum}"

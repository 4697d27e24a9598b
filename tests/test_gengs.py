"""Family-specific tests of GenGS: truncation, tails, temperature limits, log_prob, KL.

Every reference value is computed independently of the library, with ``scipy.stats`` or plain
numpy. Shapes, ``expand``, pickling, support and SVI are covered by the generic conformance suite.
"""

import io
import itertools
import math
import warnings

import numpy as np
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from statistical import assert_z_scores_are_standard, z_scores
from torch.distributions import Binomial, Geometric, NegativeBinomial, Poisson, kl_divergence

import pyro_relax as pr
from pyro_relax import (
    ExponentialDecay,
    GenGS,
    GenGSBinomial,
    GenGSGeometric,
    GenGSMultinomial,
    GenGSNegativeBinomial,
    GenGSPoisson,
    TruncatedGenGS,
    TruncationWarning,
    automatic_truncation,
    truncated_log_probs,
)
from pyro_relax.distributions.truncation import log_survival

# The attribute by which a relaxed sample carries its relaxed one-hot weights (DESIGN 2.3).

# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def scipy_base(family, params):
    """The base distribution on 0, 1, ... as a frozen scipy distribution."""
    if family == "poisson":
        return scipy.stats.poisson(*params)
    if family == "geometric":
        # scipy's geom lives on 1, 2, ...; torch's Geometric counts failures, on 0, 1, ...
        return scipy.stats.geom(*params, loc=-1)
    if family == "negative_binomial":
        # torch: pmf(k) ∝ (1 - p)^r p^k with p = probs, i.e. scipy's nbinom(n=r, p=1-p).
        total_count, probs = params
        return scipy.stats.nbinom(total_count, 1 - probs)
    if family == "binomial":
        return scipy.stats.binom(*params)
    raise AssertionError(family)


def torch_base(family, params, dtype=torch.float64):
    """The torch base distribution; each parameter a number or a list (a batch)."""
    tensors = [torch.tensor(x, dtype=dtype) for x in params]
    cls = {
        "poisson": Poisson,
        "geometric": Geometric,
        "negative_binomial": NegativeBinomial,
        "binomial": Binomial,
    }[family]
    return cls(*tensors)


def scipy_truncated_log_probs(frozen, n):
    """log P(X = k) for k < n - 1 and log P(X >= n - 1) in the last bin."""
    head = frozen.logpmf(np.arange(n - 1))
    return np.append(head, frozen.logsf(n - 2))  # sf(n - 2) = P(X > n - 2) = P(X >= n - 1)


def automatic_rule(frozen, mass):
    """The smallest n with P(X <= n - 2) >= mass, from scipy's cdf."""
    cdf = frozen.cdf(np.arange(10_000))
    return int(np.argmax(cdf >= mass)) + 2


def numpy_kl(log_q, log_p):
    """Categorical KL sum_k q_k (log q_k - log p_k), skipping outcomes that q gives no mass."""
    log_q, log_p = np.asarray(log_q, dtype=float), np.asarray(log_p, dtype=float)
    q = np.exp(log_q)
    support = q > 0
    return float(np.sum(q[support] * (log_q[support] - log_p[support])))


def chisquare_pvalue(counts, probs, min_expected=5.0):
    """Chi-square goodness of fit; bins from the first one with a small expectation are merged."""
    counts, expected = np.asarray(counts, dtype=float), np.asarray(probs) * np.sum(counts)
    last = int(np.nonzero(expected >= min_expected)[0].max())
    observed = np.append(counts[:last], counts[last:].sum())
    expected = np.append(expected[:last], expected[last:].sum())
    return scipy.stats.chisquare(observed, expected).pvalue


# ---------------------------------------------------------------------------------------------
# 1. Truncated PMFs
# ---------------------------------------------------------------------------------------------

PMF_CASES = [
    ("poisson", (2.0,), 12),
    ("poisson", (30.0,), 45),
    ("poisson", (0.1,), 60),  # the tail underflows gammainc: the series bound takes over
    ("geometric", (0.3,), 15),
    ("geometric", (0.9,), 40),
    ("negative_binomial", (3.0, 0.5), 30),
    ("negative_binomial", (5.0, 0.3), 30),
    ("negative_binomial", (0.5, 0.7), 20),
    ("binomial", (20, 0.3), 21),  # exact: no tail
    ("binomial", (20, 0.3), 8),
]


@pytest.mark.parametrize("family, params, n", PMF_CASES)
def test_truncated_log_probs_match_scipy_float64(family, params, n):
    log_probs = truncated_log_probs(torch_base(family, params), n)
    reference = scipy_truncated_log_probs(scipy_base(family, params), n)
    assert log_probs.shape == (n,)
    # Log-space absolute error 1e-9 is a relative error of 1e-9 on every probability. The
    # negative binomial tail has no closed form in torch: 1e-6 relative, as in its own test.
    atol = 1e-6 if family == "negative_binomial" else 1e-9
    np.testing.assert_allclose(log_probs.numpy(), reference, rtol=1e-10, atol=atol)
    assert abs(float(log_probs.logsumexp(-1))) < (1e-9 if family == "negative_binomial" else 1e-12)


@pytest.mark.parametrize("family, params, n", PMF_CASES)
def test_truncated_log_probs_match_scipy_float32(family, params, n):
    log_probs = truncated_log_probs(torch_base(family, params, torch.float32), n)
    reference = scipy_truncated_log_probs(scipy_base(family, params), n)
    assert log_probs.dtype == torch.float32
    # float32 lgamma of arguments near 60 and logs near -320 are good to a few 1e-5 relative.
    np.testing.assert_allclose(log_probs.double().numpy(), reference, rtol=1e-5, atol=1e-4)
    assert abs(float(log_probs.logsumexp(-1))) < 1e-5


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_poisson_far_tail_value_and_gradient(dtype, rtol):
    # Rate 0.1, n = 60: P(X >= 59) is about 1e-139, far below float32's range and where
    # 1 - sum(head) is exactly 0 in any precision.
    rate = torch.tensor(0.1, dtype=dtype, requires_grad=True)
    log_probs = truncated_log_probs(Poisson(rate), 60)
    frozen = scipy.stats.poisson(0.1)
    assert torch.isfinite(log_probs).all()
    assert abs(float(log_probs[-1].detach()) / frozen.logsf(58) - 1) < rtol
    (grad,) = torch.autograd.grad(log_probs.sum(), rate)
    assert torch.isfinite(grad)
    # d/d rate log P(X >= m) = P(X = m - 1) / P(X >= m), here m = 59.
    (tail_grad,) = torch.autograd.grad(truncated_log_probs(Poisson(rate), 60)[-1], rate)
    expected = math.exp(frozen.logpmf(58) - frozen.logsf(58))
    assert abs(float(tail_grad) / expected - 1) < 1e-5


def test_poisson_log_survival_gradient_at_every_count():
    # The tail has its derivative in closed form (one backward for the GPU's sake): checked
    # against scipy's P(X = m - 1) / P(X >= m) at every m, in the accurate and the series
    # regimes, with a batch of rates that share one backward, and by finite differences to the
    # second order (a guide's gradient may itself be differentiated).
    rates = torch.tensor([0.05, 1.5, 8.0], dtype=torch.float64, requires_grad=True)
    log_tail = log_survival(Poisson(rates), 60)
    (grad,) = torch.autograd.grad(log_tail.sum(), rates)
    m = np.arange(1, 60)
    for rate, actual in zip(rates.tolist(), grad.tolist(), strict=True):
        frozen = scipy.stats.poisson(rate)
        expected = np.exp(frozen.logpmf(m - 1) - frozen.logsf(m - 1)).sum()
        assert abs(actual / expected - 1) < 1e-9, (rate, actual, expected)
    assert torch.equal(log_tail[:, 0], torch.zeros(3, dtype=torch.float64))

    def tail_at(r):
        return log_survival(Poisson(r), 12, counts=torch.tensor([0.0, 1.0, 5.0, 11.0]))

    assert torch.autograd.gradcheck(tail_at, (rates.detach().requires_grad_(),))
    assert torch.autograd.gradgradcheck(tail_at, (rates.detach().requires_grad_(),))


@pytest.mark.parametrize("family", ["poisson", "geometric", "negative-binomial", "binomial"])
def test_an_int_truncation_gives_the_tail_of_a_tensor_truncation(family):
    # An int truncation hands each family its last outcome as a Python int (the Poisson tail
    # then keeps its constants on the host); a tensor truncation goes the general way. The two
    # must agree in value and gradient, in the accurate and the series regimes of the Poisson
    # tail (rate 0.05 at 12 outcomes is far in the tail); the Poisson tail's own backward
    # (the one the int path changes) is also checked to the second order by finite
    # differences.
    params = {
        "poisson": lambda r: Poisson(r),
        "geometric": lambda r: Geometric(probs=r / 10),
        "negative-binomial": lambda r: NegativeBinomial(3.0, probs=r / 10),
        "binomial": lambda r: Binomial(20, probs=r / 10),
    }[family]
    rates = torch.tensor([0.05, 1.5, 8.0], dtype=torch.float64, requires_grad=True)
    for n in (2, 5, 12):
        as_int = truncated_log_probs(params(rates), n)
        as_tensor = truncated_log_probs(params(rates), torch.full((3,), n), size=n)
        torch.testing.assert_close(as_int, as_tensor, rtol=1e-12, atol=1e-12)
        weights = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)
        (grad_int,) = torch.autograd.grad((as_int * weights).sum(), rates)
        (grad_tensor,) = torch.autograd.grad((as_tensor * weights).sum(), rates)
        torch.testing.assert_close(grad_int, grad_tensor, rtol=1e-10, atol=1e-12)

    if family == "poisson":
        torch.manual_seed(0)  # gradgradcheck draws its upstream gradients at random
        assert torch.autograd.gradgradcheck(
            lambda r: truncated_log_probs(params(r), 12), (rates.detach().requires_grad_(),)
        )


# (total_count, probs); the tail P(X >= m) of every m with a tail above 1e-30 is checked. Tails
# above 1e-8 come from the complement of the head (taken in float64), smaller ones from an
# explicit sum plus a geometric bound; both regimes occur in every case. The contract: relative
# error below rtol above 1e-8, and below 1e-3 relative (under 1e-11 of mass) beneath it.
NB_TAIL_CASES = [(3.0, 0.5), (5.0, 0.3), (0.5, 0.3), (1.0, 0.7), (20.0, 0.5)]
# Success probabilities near 1 make the ratio of consecutive terms near 1 in the series regime.
NB_TAIL_CASES += [(3.0, 0.9), (0.5, 0.9), (0.3, 0.8)]


@pytest.mark.parametrize("total_count, probs", NB_TAIL_CASES)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_negative_binomial_tail_relative_accuracy(total_count, probs, dtype, rtol):
    frozen = scipy.stats.nbinom(total_count, 1 - probs)
    m = np.arange(400)
    reference = frozen.logsf(m - 1)  # log P(X >= m)
    checked = reference > math.log(1e-30)
    assert (reference[checked] > math.log(1e-2)).any() and (reference[checked] < -5).any()
    base = torch_base("negative_binomial", (total_count, probs), dtype)
    log_tail = log_survival(base, 400).double().numpy()
    relative_error = np.abs(np.expm1(log_tail - reference))
    for region, bound in [(reference >= math.log(1e-8), rtol), (checked, max(rtol, 1e-3))]:
        worst = int(np.argmax(np.where(region, relative_error, 0)))
        assert relative_error[region].max() < bound, (
            f"relative error {relative_error[worst]:.3g} of P(X >= {worst}) "
            f"= {math.exp(reference[worst]):.3g}"
        )
    # The last bin of the truncated PMF is that tail.
    n = 25
    last = float(truncated_log_probs(base, n)[-1])
    assert abs(math.expm1(last - reference[n - 1])) < rtol


@pytest.mark.parametrize(
    "family, params",
    [
        ("poisson", ([0.5, 3.0, 9.0],)),
        ("geometric", ([0.2, 0.5, 0.9],)),
        ("negative_binomial", ([1.0, 3.0, 0.5], [0.5, 0.3, 0.6])),
        ("binomial", ([10.0, 10.0, 10.0], [0.2, 0.5, 0.7])),
    ],
)
def test_per_element_truncation_equals_int_path(family, params):
    base = torch_base(family, params)
    truncations, size = torch.tensor([3, 11, 7]), 12
    rows = truncated_log_probs(base, truncations, size)
    assert rows.shape == (3, size)
    for i, n in enumerate(truncations.tolist()):
        element = torch_base(family, [x[i] for x in params])
        assert torch.equal(rows[i, :n], truncated_log_probs(element, n))
        assert torch.all(rows[i, n:] == -math.inf)
        reference = scipy_truncated_log_probs(scipy_base(family, [x[i] for x in params]), n)
        np.testing.assert_allclose(rows[i, :n].numpy(), reference, rtol=1e-10, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 2. Automatic truncation
# ---------------------------------------------------------------------------------------------

AUTO_CASES = [
    ("poisson", ([0.5, 2.0, 7.0],)),
    ("geometric", ([0.6, 0.25],)),
    ("negative_binomial", ([3.0, 5.0], [0.5, 0.3])),
    ("binomial", ([20.0, 5.0], [0.3, 0.9])),
    # The rule alone would add the outcome 4, which has no mass.
    ("binomial", ([3.0, 0.0], [0.99, 0.5])),
]


def elementwise_rule(family, params, mass):
    size = len(params[0])
    rule = [automatic_rule(scipy_base(family, [x[i] for x in params]), mass) for i in range(size)]
    if family == "binomial":  # at most the N + 1 exact outcomes 0..N
        rule = [min(n, max(int(total) + 1, 2)) for n, total in zip(rule, params[0], strict=True)]
    return rule


@pytest.mark.parametrize("mass", [0.9, 0.999])
@pytest.mark.parametrize("family, params", AUTO_CASES)
def test_automatic_truncation_is_smallest_capturing_mass(family, params, mass):
    base = torch_base(family, params)
    expected = max(elementwise_rule(family, params, mass))
    n = automatic_truncation(base, mass)
    assert isinstance(n, int) and n == expected
    d = GenGS(base, 0.5, mass=mass, tail_tolerance=None)
    assert d.truncation == expected and d.num_outcomes == expected


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_automatic_truncation_is_refused_under_a_jit_trace_and_the_cap_follows_the_rate():
    # The number of outcomes was read on the host and frozen into the trace: traced at rate 1
    # (7 outcomes), a rate of 30 put all its mass in the tail bin (JitTrace_ELBO then trained
    # on it), with TracerWarnings only.
    with pytest.raises(ValueError, match="max_truncation"):
        torch.jit.trace(lambda rate: GenGSPoisson(rate, 0.5).logits, (torch.tensor(1.0),))
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        capped = torch.jit.trace(
            lambda rate: GenGSPoisson(rate, 0.5, max_truncation=60).logits, (torch.tensor(1.0),)
        )
    rate = torch.tensor(30.0)
    expected = GenGSPoisson(rate, 0.5, max_truncation=60).logits
    torch.testing.assert_close(capped(rate), expected)
    assert float(expected.exp()[-1]) < 1e-3
    # The same class of host read: a tensor total_count chooses GenGSBinomial's outcomes.
    with pytest.raises(ValueError, match="pass an int"):
        torch.jit.trace(
            lambda counts, p: pr.GenGSBinomial(counts, 0.5, probs=p).logits,
            (torch.tensor([3.0, 5.0]), torch.tensor([0.2, 0.4])),
        )


def test_automatic_truncation_grows_beyond_initial_size():
    # Rate 200 needs about 250 outcomes, more than the first guess.
    expected = automatic_rule(scipy.stats.poisson(200.0), 0.999)
    assert (
        automatic_truncation(Poisson(torch.tensor(200.0, dtype=torch.float64)), 0.999) == expected
    )
    assert GenGSPoisson(torch.tensor(200.0, dtype=torch.float64), 0.5).truncation == expected


@pytest.mark.parametrize("family, params", AUTO_CASES)
def test_capped_truncation_is_elementwise_rule(family, params):
    base = torch_base(family, params)
    rule = elementwise_rule(family, params, 0.999)
    for cap in (max(rule), max(max(rule) - 3, 2)):
        capped = automatic_truncation(base, 0.999, max_truncation=cap)
        assert torch.is_tensor(capped) and capped.shape == base.batch_shape
        assert capped.tolist() == [min(n, cap) for n in rule]


def test_capped_gengs_masks_outcomes_beyond_each_truncation():
    rates = [1e-4, 0.5, 2.0, 7.0, 12.0]
    cap = 22
    rule = [automatic_rule(scipy.stats.poisson(r), 0.999) for r in rates]
    assert rule[-1] > cap  # the last element is capped
    d = GenGSPoisson(torch.tensor(rates, dtype=torch.float64), 0.5, max_truncation=cap)
    assert d.truncation.tolist() == [min(n, cap) for n in rule]
    assert d.logits.shape == (len(rates), cap)
    assert torch.allclose(d.logits.logsumexp(-1), torch.zeros(len(rates), dtype=torch.float64))
    for i, (rate, n) in enumerate(zip(rates, d.truncation.tolist(), strict=True)):
        frozen = scipy.stats.poisson(rate)
        np.testing.assert_allclose(
            d.logits[i, :n].numpy(), scipy_truncated_log_probs(frozen, n), rtol=1e-10, atol=1e-9
        )
        assert torch.all(d.logits[i, n:] == -math.inf)
        assert abs(float(d.tail_mass[i]) / frozen.sf(n - 1) - 1) < 1e-9  # P(X >= n)
    z = d.rsample((200,))
    assert torch.all(z <= d.truncation.to(z.dtype) - 1)


# ---------------------------------------------------------------------------------------------
# 3. The truncation warning
# ---------------------------------------------------------------------------------------------


def test_truncation_warning_and_tail_mass():
    with pytest.warns(TruncationWarning) as record:
        d = GenGSPoisson(2.0, 0.5, 5)
    # The warning points at the caller, not at the library.
    assert record[0].filename == __file__
    expected = scipy.stats.poisson(2.0).sf(4)  # P(X >= 5), about 0.053
    assert abs(float(d.tail_mass) / expected - 1) < 1e-5


def test_no_truncation_warning_without_validation_or_below_tolerance():
    d = GenGSPoisson(2.0, 0.5, 5, validate_args=False)
    assert float(d.tail_mass) > 0.05
    GenGSPoisson(2.0, 0.5, 5, tail_tolerance=0.1, validate_args=True)
    GenGSPoisson(2.0, 0.5, 12, validate_args=True)


def test_binomial_never_warns():
    d = GenGSBinomial(torch.tensor([2.0, 40.0]), 0.5, probs=0.5, validate_args=True)
    assert d.num_outcomes == 41
    assert torch.all(d.logits[0, 3:] == -math.inf)
    np.testing.assert_allclose(
        d.logits[1].double().numpy(), scipy.stats.binom(40, 0.5).logpmf(np.arange(41)), atol=1e-4
    )
    GenGSBinomial(1, 0.5, probs=0.5, validate_args=True)


# ---------------------------------------------------------------------------------------------
# 4. Convergence as the temperature falls
# ---------------------------------------------------------------------------------------------


def test_relaxed_samples_concentrate_on_integers():
    torch.manual_seed(0)
    distances = []
    for tau in (1.0, 0.3, 0.1, 0.03):
        z = GenGSPoisson(torch.tensor(3.0, dtype=torch.float64), tau, 20).rsample((20000,))
        distances.append(float((z - z.round()).abs().mean()))
    # Measured 0.24, 0.15, 0.064, 0.022: strictly decreasing.
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False))
    assert distances[-1] < 0.05


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nearest_outcomes_follow_truncated_pmf_at_low_temperature(dtype):
    n, num_samples = 20, 20000
    probs = np.exp(scipy_truncated_log_probs(scipy.stats.poisson(3.0), n))

    def pvalue(tau):
        d = GenGSPoisson(torch.tensor(3.0, dtype=dtype), tau, n, validate_args=True)
        z = d.rsample((num_samples,))
        assert torch.isfinite(d.log_prob(z)).all()  # validation on, float32 included
        counts = np.bincount(z.round().long().numpy(), minlength=n)
        return chisquare_pvalue(counts, probs)

    torch.manual_seed(1)
    # Seeded; a correct sampler passes at level 1e-3 (measured p of 0.2 to 0.5).
    assert pvalue(0.01) > 1e-3
    # At temperature 1 the relaxed values pile up between the outcomes: measured p = 0.
    assert pvalue(1.0) < 1e-3


# ---------------------------------------------------------------------------------------------
# 5. Convergence as the truncation grows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, params",
    [
        ("poisson", (3.0,)),
        ("geometric", (0.3,)),
        ("negative_binomial", (3.0, 0.5)),
    ],
)
def test_total_variation_to_base_is_tail_mass_and_vanishes(family, params):
    frozen = scipy_base(family, params)
    support = np.arange(400)
    base_probs = frozen.pmf(support)
    distances = []
    for n in (4, 8, 16, 32, 64, 128):
        d = GenGS(torch_base(family, params), 0.5, n, tail_tolerance=None)
        truncated = np.zeros_like(base_probs)
        truncated[:n] = d.probs.numpy()
        distance = 0.5 * np.abs(truncated - base_probs).sum()
        # TV = P(X >= n): the tail moved onto the last outcome.
        assert abs(distance - frozen.sf(n - 1)) < 1e-12
        assert abs(distance - float(d.tail_mass)) < 1e-12
        distances.append(distance)
    # Strictly decreasing until it reaches rounding level, and vanishing.
    assert all(a > b or a < 1e-14 for a, b in zip(distances, distances[1:], strict=False))
    assert distances[-1] < 1e-10


# ---------------------------------------------------------------------------------------------
# 6. Gradient bias for the Poisson (Joo et al., 2020, section 6.1)
# ---------------------------------------------------------------------------------------------


def pathwise_gradient(tau, num_samples, rate=3.0, target=0.45, groups=50):
    """Mean and standard error of the GenGS estimate of d/d rate E[(z - target)^2]."""
    rate = torch.tensor(rate, dtype=torch.float64, requires_grad=True)
    d = GenGSPoisson(rate, tau, 30)  # P(X >= 30) ~ 1e-20: no truncation bias
    estimates = []
    for _ in range(groups):
        z = d.rsample((num_samples // groups,))
        (grad,) = torch.autograd.grad((z - target).square().mean(), rate, retain_graph=True)
        estimates.append(float(grad))
    estimates = np.array(estimates)
    return estimates.mean(), estimates.std(ddof=1) / math.sqrt(groups)


def test_poisson_gradient_bias_falls_with_temperature():
    rate, target = 3.0, 0.45
    exact = 1 + 2 * (rate - target)  # d/d rate E[(X - t)^2] = d/d rate (rate + (rate - t)^2)
    torch.manual_seed(2)
    # The estimator's standard deviation grows like 1 / tau: more samples at low temperatures.
    # Reference run (2e6 samples each): bias -0.485 (tau 1), -0.41 (0.5), -0.28 (0.3),
    # -0.21 (0.2), -0.11 (0.1), -0.11 (0.05), -0.04 +- 0.04 (0.02), against exact = 6.1.
    plan = [(1.0, 40_000), (0.3, 100_000), (0.1, 250_000)]
    results = [pathwise_gradient(tau, num, rate, target) for tau, num in plan]
    biases = [abs(mean - exact) for mean, _ in results]
    errors = [se for _, se in results]
    # The relaxation is biased at tau = 1 (measured -0.48 +- 0.02): the test has power.
    assert biases[0] > 4 * errors[0]
    assert all(a > b for a, b in zip(biases, biases[1:], strict=False))
    assert biases[0] - biases[-1] > 3 * math.hypot(errors[0], errors[-1])
    # At tau = 0.1 the size of the bias beyond an allowance of 0.12 (2% of the exact gradient)
    # for the residual relaxation bias, measured at 0.11, in standard errors (SE about 0.04,
    # from 50 groups: Student t with 49 degrees of freedom), one-sided at the level 1e-2: a
    # bound of about 0.21, as the earlier 0.1 plus 3 standard errors.
    z = z_scores(biases[-1], errors[-1], 0.12)
    assert_z_scores_are_standard(z, "the bias at tau = 0.1", 1e-2, df=49, one_sided=True)


# ---------------------------------------------------------------------------------------------
# 7. log_prob semantics (DESIGN 2.3)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_prob_of_rsample_is_soft_log_pmf(dtype):
    torch.manual_seed(3)
    n = 15
    log_pi = torch.tensor(scipy_truncated_log_probs(scipy.stats.poisson(4.0), n), dtype=dtype)
    d = GenGSPoisson(torch.tensor(4.0, dtype=dtype), 0.3, n, validate_args=True)
    z = d.rsample((500,))
    weights = pr.relaxation_of(z).weights
    # The carried weights are the relaxed one-hot that produced the value.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(weights.sum(-1), torch.ones((), dtype=dtype), atol=tol)
    assert torch.allclose(weights @ torch.arange(n, dtype=dtype), z, atol=100 * tol)
    assert torch.allclose(d.log_prob(z), weights @ log_pi, rtol=10 * tol, atol=10 * tol)


def test_soft_log_pmf_tends_to_log_pmf_of_sampled_outcome():
    torch.manual_seed(4)
    n = 20
    log_pi = scipy_truncated_log_probs(scipy.stats.poisson(3.0), n)
    gaps = []
    for tau in (1.0, 0.1, 0.01, 0.001):
        d = GenGSPoisson(torch.tensor(3.0, dtype=torch.float64), tau, n)
        z = d.rsample((5000,))
        sampled = pr.relaxation_of(z).weights.argmax(-1)  # the outcome the relaxed one-hot nears
        gap = np.abs(d.log_prob(z).numpy() - log_pi[sampled.numpy()])
        gaps.append(gap.mean())
        if tau == 0.001:
            # Measured: about 0.5% of samples (near ties of the top two perturbed logits)
            # differ by more than 1e-3; the median differs by an ulp.
            assert np.median(gap) < 1e-12
            assert np.mean(gap > 1e-3) < 0.02
    # Measured 0.33, 0.04, 0.005, 0.0005.
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False))


def test_a_hard_sample_is_scored_by_the_log_pmf_at_its_outcome():
    # A hard sample was scored by the soft log-PMF of its relaxed one-hot: the same count
    # scored otherwise with its record than without (Importance weights, Trace_ELBO's value).
    rate = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    log_pi = torch.as_tensor(scipy_truncated_log_probs(scipy.stats.poisson(3.0), 15))
    torch.manual_seed(5)
    hard = GenGSPoisson(rate, 0.5, 15, hard=True)
    z = hard.rsample((400,))
    score = hard.log_prob(z)
    torch.testing.assert_close(score, log_pi[z.long()], rtol=1e-12, atol=0)
    torch.testing.assert_close(score, hard.log_prob(z.detach().clone()), rtol=0, atol=0)
    # The gradient: straight through the relaxed one-hot w (the same noise, drawn soft), with
    # the log-PMF's own derivative taken at the hard outcome,
    # sum_k (dw_k) log pi_k + d log pi_z.
    (gradient,) = torch.autograd.grad(score.sum(), rate)
    torch.manual_seed(5)
    soft = GenGSPoisson(rate, 0.5, 15)
    w = pr.relaxation_of(soft.rsample((400,))).weights
    chosen = torch.nn.functional.one_hot(w.argmax(-1), 15).to(w.dtype)
    expected = (w - w.detach() + chosen) @ soft.logits.unsqueeze(-1)
    (reference,) = torch.autograd.grad(expected.sum(), rate)
    torch.testing.assert_close(gradient, reference)


@pytest.mark.parametrize(
    "make, frozen, n",
    [
        (lambda: GenGSPoisson(3.0, 0.5, 12), scipy.stats.poisson(3.0), 12),
        (
            lambda: GenGSGeometric(0.5, 20, probs=0.3),
            scipy.stats.geom(0.3, loc=-1),
            20,
        ),
        (
            lambda: GenGSNegativeBinomial(3.0, 0.5, 30, probs=0.5),
            scipy.stats.nbinom(3.0, 0.5),
            30,
        ),
        (lambda: GenGSBinomial(6, 0.5, probs=0.3), scipy.stats.binom(6, 0.3), 7),
    ],
)
def test_log_prob_of_plain_outcome_is_truncated_log_pmf(make, frozen, n):
    d = make()
    values = torch.tensor([0.0, 1.0, 2.0, n - 2.0, n - 1.0])
    expected = scipy_truncated_log_probs(frozen, n)[[0, 1, 2, n - 2, n - 1]]
    np.testing.assert_allclose(d.log_prob(values).double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_log_prob_rejects_value_without_weights():
    d = GenGSPoisson(3.0, 0.5, 12, validate_args=True)
    z = d.rsample((10,))
    with pytest.raises(ValueError, match="rsample"):
        d.log_prob(z.clone())


def test_log_prob_rejects_value_from_other_number_of_outcomes():
    d = GenGSPoisson(3.0, 0.5, 12, validate_args=True)
    torch.manual_seed(5)
    z = GenGSPoisson(0.2, 0.5, 14).rsample((10,))
    assert float(z.max()) < 11  # inside d's support, so only the weights betray it
    with pytest.raises(ValueError, match="outcomes"):
        d.log_prob(z)


def test_straight_through_samples_are_scored_by_pyro_poisson():
    torch.manual_seed(6)
    rate = torch.tensor(2.5, requires_grad=True)
    z = GenGSPoisson(rate, 0.5, 20, hard=True).rsample((200,))
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 19
    log_prob = dist.Poisson(torch.tensor(3.0), validate_args=True).log_prob(z)
    expected = scipy.stats.poisson(3.0).logpmf(z.detach().numpy())
    np.testing.assert_allclose(log_prob.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(log_prob.sum(), rate)
    assert torch.isfinite(grad) and grad != 0


def test_multinomial_samples_and_count_vectors():
    torch.manual_seed(7)
    probs = [0.2, 0.3, 0.5]
    d = GenGSMultinomial(4, 0.5, probs=torch.tensor(probs), validate_args=True)
    assert d.num_outcomes == math.comb(4 + 2, 2)
    z = d.rsample((1000,))
    assert torch.allclose(z.sum(-1), torch.tensor(4.0), atol=1e-5) and z.min() >= 0
    assert torch.isfinite(d.log_prob(z)).all()
    values = torch.tensor([[4.0, 0, 0], [1, 1, 2], [0, 2, 2], [0, 0, 4]])
    expected = scipy.stats.multinomial(4, probs).logpmf(values.numpy())
    np.testing.assert_allclose(d.log_prob(values).numpy(), expected, rtol=1e-5, atol=1e-5)
    hard = GenGSMultinomial(4, 0.5, probs=torch.tensor(probs), hard=True)
    counts = hard.rsample((100,))
    assert torch.equal(counts, counts.round()) and torch.all(counts.sum(-1) == 4)


# ---------------------------------------------------------------------------------------------
# 8. Bad input
# ---------------------------------------------------------------------------------------------

BAD_INPUTS = [
    ("temperature", lambda: GenGSPoisson(2.0, 0.0, 10)),
    ("temperature", lambda: GenGSPoisson(2.0, -1.0, 10)),
    ("temperature", lambda: TruncatedGenGS(0.0, logits=torch.zeros(3))),
    ("rate", lambda: GenGSPoisson(0.0, 0.5, 10)),
    ("rate", lambda: GenGSPoisson(-1.0, 0.5, 10)),
    ("probs", lambda: TruncatedGenGS(0.5, probs=torch.tensor([1.5, -0.5]))),
    ("probs", lambda: TruncatedGenGS(0.5, probs=torch.tensor([0.3, 0.3]))),
    ("probs", lambda: GenGSGeometric(0.5, 10, probs=1.5)),
    ("probs", lambda: GenGSNegativeBinomial(3.0, 0.5, 10, probs=1.5)),
    ("probs", lambda: GenGSBinomial(5, 0.5, probs=1.5)),
    ("probs", lambda: GenGSMultinomial(3, 0.5, probs=torch.tensor([1.5, -0.5]))),
    ("total_count", lambda: GenGSNegativeBinomial(0.0, 0.5, 10, probs=0.5)),
    ("total_count", lambda: GenGSMultinomial(0, 0.5, probs=torch.tensor([0.5, 0.5]))),
    ("truncation", lambda: GenGSPoisson(2.0, 0.5, 1)),
    ("max_truncation", lambda: GenGSPoisson(2.0, 0.5, max_truncation=1)),
    ("temperature", lambda: GenGSPoisson(torch.ones(3), torch.full((2,), 0.5), 10)),
    ("temperature", lambda: TruncatedGenGS(torch.full((2,), 0.5), logits=torch.zeros(3, 4))),
    (
        "total_count",
        lambda: GenGSNegativeBinomial(torch.ones(3), 0.5, 10, probs=torch.full((2,), 0.5)),
    ),
    (
        "total_count",
        lambda: GenGSBinomial(torch.full((3,), 4.0), 0.5, probs=torch.full((2,), 0.5)),
    ),
    ("mass", lambda: GenGSPoisson(2.0, 0.5, mass=0.0)),
    ("mass", lambda: GenGSPoisson(2.0, 0.5, mass=1.0)),
    ("mass", lambda: GenGSPoisson(2.0, 0.5, mass=1.5, max_truncation=20)),
    ("mass", lambda: automatic_truncation(Poisson(torch.tensor(2.0)), -0.1)),
    ("Normal", lambda: GenGS(dist.Normal(0.0, 1.0), 0.5, 10)),
    ("Normal", lambda: GenGS(dist.Normal(0.0, 1.0), 0.5)),
]


@pytest.mark.parametrize("name, make", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_parameter(name, make):
    with pytest.raises(ValueError, match=name):
        make()


# A count that is not an integer is a TypeError, as in Python (range(1.5)); one too small a
# ValueError.
BAD_TYPES = [
    ("truncation", lambda: GenGSPoisson(2.0, 0.5, 1.5)),
    ("truncation", lambda: GenGSPoisson(2.0, 0.5, True)),
    ("max_truncation", lambda: GenGSPoisson(2.0, 0.5, max_truncation=True)),
    # These reached torch's internals: "'list' object has no attribute 'mean'", "'<' not
    # supported between instances of 'float' and 'NoneType'", "no truncation rule for NoneType".
    ("automatic_truncation: `base`", lambda: automatic_truncation([1.0], 0.99)),
    (
        "automatic_truncation: `mass`",
        lambda: automatic_truncation(Poisson(torch.tensor(2.0)), None),
    ),
    ("GenGS: `base_dist`", lambda: GenGS(None, 0.5, 10)),
    ("GenGSBinomial: `total_count`", lambda: GenGSBinomial(None, 0.5, probs=0.3)),
]


@pytest.mark.parametrize("name, make", BAD_TYPES)
def test_bad_type_raises_type_error_naming_parameter(name, make):
    with pytest.raises(TypeError, match=name):
        make()


@pytest.mark.parametrize(
    "truncation, error", [(0, ValueError), (1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_truncated_log_probs_rejects_bad_truncation(truncation, error):
    # DESIGN 1: a truncation below 2 raises naming the parameter, never a silent result.
    with pytest.raises(error, match="truncation"):
        truncated_log_probs(Poisson(torch.tensor(2.0)), truncation)


@pytest.mark.parametrize(
    "max_truncation, error", [(1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_automatic_truncation_rejects_bad_cap(max_truncation, error):
    with pytest.raises(error, match="max_truncation"):
        automatic_truncation(Poisson(torch.tensor(2.0)), 0.9, max_truncation)


# ---------------------------------------------------------------------------------------------
# 9. KL divergences
# ---------------------------------------------------------------------------------------------


def test_kl_between_truncated_gengs_is_categorical_kl():
    generator = torch.Generator().manual_seed(8)
    q_logits = torch.randn(2, 3, 6, dtype=torch.float64, generator=generator)
    p_logits = torch.randn(2, 3, 6, dtype=torch.float64, generator=generator)
    kl = kl_divergence(TruncatedGenGS(0.5, logits=q_logits), TruncatedGenGS(0.1, logits=p_logits))
    assert kl.shape == (2, 3)
    log_q = q_logits.numpy() - np.logaddexp.reduce(q_logits.numpy(), -1, keepdims=True)
    log_p = p_logits.numpy() - np.logaddexp.reduce(p_logits.numpy(), -1, keepdims=True)
    for i in np.ndindex(2, 3):
        assert abs(float(kl[i]) - numpy_kl(log_q[i], log_p[i])) < 1e-12


@pytest.mark.parametrize(
    "guide, prior, frozen_q, frozen_p, n",
    [
        (
            lambda: GenGSPoisson(torch.tensor(2.0, dtype=torch.float64), 0.5, 15),
            lambda: dist.Poisson(torch.tensor(3.5, dtype=torch.float64)),
            scipy.stats.poisson(2.0),
            scipy.stats.poisson(3.5),
            15,
        ),
        (
            lambda: GenGSGeometric(0.5, 20, probs=torch.tensor(0.3, dtype=torch.float64)),
            lambda: dist.Geometric(torch.tensor(0.5, dtype=torch.float64)),
            scipy.stats.geom(0.3, loc=-1),
            scipy.stats.geom(0.5, loc=-1),
            20,
        ),
        (
            lambda: GenGSNegativeBinomial(
                torch.tensor(3.0, dtype=torch.float64),
                0.5,
                30,
                probs=torch.tensor(0.5, dtype=torch.float64),
            ),
            lambda: dist.NegativeBinomial(
                torch.tensor(5.0, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
            ),
            scipy.stats.nbinom(3.0, 0.5),
            scipy.stats.nbinom(5.0, 0.7),
            30,
        ),
        (
            lambda: GenGSBinomial(20, 0.5, probs=torch.tensor(0.3, dtype=torch.float64)),
            lambda: dist.Binomial(20, torch.tensor(0.4, dtype=torch.float64)),
            scipy.stats.binom(20, 0.3),
            scipy.stats.binom(20, 0.4),
            21,
        ),
    ],
)
def test_kl_to_count_distribution_is_truncated_categorical_kl(guide, prior, frozen_q, frozen_p, n):
    kl = kl_divergence(guide(), prior())
    expected = numpy_kl(
        scipy_truncated_log_probs(frozen_q, n), scipy_truncated_log_probs(frozen_p, n)
    )
    assert abs(float(kl) - expected) < 1e-10


_EDGE_CASES = {
    # (relaxation, the count distribution alike, the outcomes 0..5 it makes impossible)
    "binomial-p0": (
        lambda p: GenGSBinomial(5, 0.5, probs=p),
        lambda p: dist.Binomial(5, probs=p),
        0.0,
        [1, 2, 3, 4, 5],
    ),
    "binomial-p1": (
        lambda p: GenGSBinomial(5, 0.5, probs=p),
        lambda p: dist.Binomial(5, probs=p),
        1.0,
        [0, 1, 2, 3, 4],
    ),
    # A binomial with p = 1 truncated below N + 1: X = 5 lies in the tail bin, the last outcome.
    "binomial-p1-truncated": (
        lambda p: GenGS(dist.Binomial(5, probs=p), 0.5, 3, tail_tolerance=None),
        lambda p: dist.Binomial(5, probs=p),
        1.0,
        [0, 1],
    ),
    "geometric-p1": (
        lambda p: GenGSGeometric(0.5, 6, probs=p, tail_tolerance=None),
        lambda p: dist.Geometric(probs=p),
        1.0,
        [1, 2, 3, 4, 5],
    ),
    "negative-binomial-p0": (
        lambda p: GenGSNegativeBinomial(2.0, 0.5, 6, probs=p, tail_tolerance=None),
        lambda p: dist.NegativeBinomial(2.0, probs=p),
        0.0,
        [1, 2, 3, 4, 5],
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(_EDGE_CASES))
def test_a_probability_of_0_or_1_gives_its_impossible_outcomes_no_mass(case, dtype):
    # The log-odds of p = 0 or 1 are clamped at the smallest normal number: an impossible outcome
    # scored about -87 k (float32) or -708 k (float64) in place of -inf, and a KL to such a
    # prior was finite, its value set by the dtype.
    relaxed, count, edge, impossible = _EDGE_CASES[case]
    d = relaxed(torch.tensor(edge, dtype=dtype))
    possible = [k for k in range(d.num_outcomes) if k not in impossible]
    assert torch.isneginf(d.logits[impossible]).all()
    assert torch.isfinite(d.logits[possible]).all()
    torch.testing.assert_close(d.logits[possible].logsumexp(-1), torch.zeros((), dtype=dtype))
    other = relaxed(torch.tensor(0.5, dtype=dtype))
    assert kl_divergence(other, count(torch.tensor(edge, dtype=dtype))) == math.inf
    assert kl_divergence(other, d) == math.inf
    assert math.isfinite(kl_divergence(d, other))


def test_kl_rejects_mismatched_outcomes():
    with pytest.raises(ValueError, match="outcomes"):
        kl_divergence(
            TruncatedGenGS(0.5, logits=torch.zeros(3)), TruncatedGenGS(0.5, logits=torch.zeros(4))
        )
    with pytest.raises(ValueError, match="outcomes"):
        kl_divergence(GenGSPoisson(2.0, 0.5, 10), GenGSPoisson(2.0, 0.5, 12))
    with pytest.raises(ValueError, match="total count"):
        kl_divergence(
            GenGSMultinomial(3, 0.5, probs=torch.tensor([0.5, 0.5])),
            dist.Multinomial(4, torch.tensor([0.5, 0.5])),
        )


def test_kl_of_capped_guide_uses_per_element_truncation():
    guide_rates, prior_rates = [0.5, 2.0, 7.0, 12.0], [1.0, 1.5, 9.0, 10.0]
    q_rate = torch.tensor(guide_rates, dtype=torch.float64, requires_grad=True)
    p_rate = torch.tensor(prior_rates, dtype=torch.float64, requires_grad=True)
    guide = GenGSPoisson(q_rate, 0.5, max_truncation=22)
    kl = kl_divergence(guide, dist.Poisson(p_rate))
    assert kl.shape == (4,)
    for i, (a, b) in enumerate(zip(guide_rates, prior_rates, strict=True)):
        n = min(automatic_rule(scipy.stats.poisson(a), 0.999), 22)
        expected = numpy_kl(
            scipy_truncated_log_probs(scipy.stats.poisson(a), n),
            scipy_truncated_log_probs(scipy.stats.poisson(b), n),
        )
        assert abs(float(kl[i].detach()) - expected) < 1e-10
    # Outcomes beyond each element's truncation are -inf in both distributions.
    grads = torch.autograd.grad(kl.sum(), [q_rate, p_rate])
    assert all(torch.isfinite(g).all() for g in grads)


def test_kl_gradient_finite_with_shared_excluded_outcomes():
    q_logits = torch.tensor([0.3, -1.0, -math.inf, 0.2, -math.inf], requires_grad=True)
    p_logits = torch.tensor([-0.5, 0.4, -math.inf, 1.0, -math.inf], requires_grad=True)
    kl = kl_divergence(TruncatedGenGS(0.5, logits=q_logits), TruncatedGenGS(0.5, logits=p_logits))
    keep = [0, 1, 3]
    log_q = q_logits.detach().numpy()[keep]
    log_p = p_logits.detach().numpy()[keep]
    expected = numpy_kl(log_q - np.logaddexp.reduce(log_q), log_p - np.logaddexp.reduce(log_p))
    assert abs(float(kl.detach()) - expected) < 1e-6
    grads = torch.autograd.grad(kl, [q_logits, p_logits])
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.all(g[[2, 4]] == 0) for g in grads)


# ---------------------------------------------------------------------------------------------
# 10. ExponentialDecay
# ---------------------------------------------------------------------------------------------


def test_exponential_decay_values_and_floor():
    schedule = ExponentialDecay(1.0, 0.1, steps=4)
    values = [float(schedule.step()) for _ in range(6)]
    # tau_t = tau_0 (tau_min / tau_0)^(t / T) until the floor, reached at T = 4.
    expected = [0.1 ** (t / 4) for t in (1, 2, 3)] + [0.1, 0.1, 0.1]
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert schedule.value_at(100) == 0.1


def test_exponential_decay_reaches_exactly_its_floor_at_the_last_step():
    # The exponential alone rounds one unit in the last place above the floor at step T.
    schedule = ExponentialDecay(3.3, 0.01, steps=999)
    assert schedule.value_at(999) == 0.01
    assert schedule.value_at(998) > 0.01


def test_exponential_decay_anneals_a_float64_distribution():
    # The schedule's tensor has the dtype asked for: a float32 one would be copied by a float64
    # distribution (with a warning), whose temperature then never moves.
    schedule = ExponentialDecay(1.0, 0.1, steps=4, dtype=torch.float64)
    assert schedule.temperature.dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = GenGSPoisson(torch.tensor(3.0, dtype=torch.float64), schedule.temperature, 10)
    schedule.step()
    schedule.step()
    assert float(d.temperature) == pytest.approx(10 ** (-2 / 4), rel=1e-12)


def test_exponential_decay_updates_temperature_in_place():
    schedule = ExponentialDecay(2.0, 0.5, steps=2)
    temperature = schedule.temperature
    before = GenGSPoisson(3.0, temperature, 10)
    assert schedule.step() is temperature
    after = GenGSPoisson(3.0, schedule.temperature, 10)
    assert float(after.temperature) == pytest.approx(1.0, rel=1e-6)
    # Built before the step, annealed without being rebuilt.
    assert float(before.temperature) == pytest.approx(1.0, rel=1e-6)


def test_exponential_decay_resumes_from_its_state_dict():
    # A schedule saved after 3 steps and loaded into a new one continues the same curve, with the
    # temperature tensor updated in place (distributions built before the load see it).
    schedule = ExponentialDecay(1.0, 0.1, steps=5)
    for _ in range(3):
        schedule.step()
    resumed = ExponentialDecay(1.0, 0.1, steps=5)
    temperature = resumed.temperature
    resumed.load_state_dict(torch.load(_saved(schedule.state_dict()), weights_only=True))
    assert resumed.step_count == 3 and resumed.temperature is temperature
    assert float(temperature) == pytest.approx(0.1 ** (3 / 5), rel=1e-6)
    assert float(resumed.step()) == float(schedule.step())


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    "state, message",
    [
        ({"initial": 2.0, "floor": 0.1, "steps": 5, "step_count": 1}, "initial 2.0"),
        ({"initial": 1.0, "floor": 0.1, "steps": 50, "step_count": 1}, "steps 50"),
        ({"step_count": 1}, "initial None"),
        ({"initial": 1.0, "floor": 0.1, "steps": 5, "step_count": -1}, "step_count"),
    ],
)
def test_exponential_decay_refuses_the_state_of_another_schedule(state, message):
    schedule = ExponentialDecay(1.0, 0.1, steps=5)
    with pytest.raises(ValueError, match=message):
        schedule.load_state_dict(state)
    assert schedule.step_count == 0 and float(schedule.temperature) == 1.0


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("initial", {"initial": 0.0}),
        ("initial", {"initial": -1.0}),
        ("floor", {"initial": 1.0, "floor": 0.0}),
        ("floor", {"initial": 1.0, "floor": 2.0}),
        ("steps", {"steps": 0}),
    ],
)
def test_exponential_decay_rejects_bad_arguments(name, kwargs):
    with pytest.raises(ValueError, match=name):
        ExponentialDecay(**kwargs)


@pytest.mark.parametrize(
    "name, kwargs",
    [("steps", {"steps": 1.5}), ("steps", {"steps": True}), ("initial", {"initial": "1.0"})],
)
def test_exponential_decay_rejects_bad_types(name, kwargs):
    with pytest.raises(TypeError, match=name):
        ExponentialDecay(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_truncation_warning_decides_as_the_tail_mass_does(dtype):
    # The warning reads the last outcome's mass first and computes the tail mass beyond it only
    # where that bound could exceed the tolerance; per batch element, over families, fixed,
    # capped automatic and automatic truncations and tolerances, it must warn exactly where the
    # tail mass exceeds the tolerance.
    grid = torch.linspace(0.0, 1.0, 13, dtype=dtype)
    bases = [
        lambda i: Poisson(10 ** (4 * grid[i : i + 1] - 2)),
        lambda i: Geometric(probs=0.02 + 0.96 * grid[i : i + 1]),
        lambda i: NegativeBinomial(torch.tensor(2.5, dtype=dtype), logits=6 * grid[i : i + 1] - 4),
        lambda i: Binomial(20, probs=0.02 + 0.96 * grid[i : i + 1]),
    ]
    truncations = [{"truncation": 3}, {"truncation": 12}, {"max_truncation": 10}, {}]
    decisions = set()
    for base, truncation, tolerance in itertools.product(bases, truncations, (0.0, 1e-3, 0.2)):
        for i in range(len(grid)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pr.GenGS(base(i), 0.5, tail_tolerance=tolerance, validate_args=True, **truncation)
            warned = any(issubclass(w.category, TruncationWarning) for w in caught)
            exact = pr.GenGS(base(i), 0.5, validate_args=False, **truncation).tail_mass
            assert warned == bool((exact > tolerance).any()), (base(i), truncation, tolerance)
            decisions.add(warned)
    assert decisions == {False, True}


def test_truncation_warning_is_shown_once_per_location():
    # Training builds the distribution at every step with changing parameters; the default
    # warning filter must show the warning once, not every step.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for rate in (5.0, 6.0, 7.0):
            GenGSPoisson(torch.tensor(rate), 0.5, 8)
    assert len([w for w in caught if issubclass(w.category, TruncationWarning)]) == 1


@pytest.mark.parametrize("upstream", ["weights and value", "value", "weights"])
@pytest.mark.parametrize(
    "outcomes", [torch.arange(6.0), torch.randn(6, 3)], ids=["scalar", "vector"]
)
def test_fused_relaxed_one_hot_backward_equals_autograd(outcomes, upstream):
    # The fused backward of GenGS's relaxed one-hot and linear map against autograd of the
    # plain formula, in float64, with upstream gradients on the weights, the value or both
    # (the value alone takes the backward's shortcut), and one outcome excluded by -inf.
    from pyro_relax.distributions.gengs import _RelaxedOneHotMap

    torch.manual_seed(5)
    outcomes = outcomes.double().requires_grad_()
    scores = 3 * torch.randn(4, 6, dtype=torch.float64)
    scores[1, 2] = -math.inf
    scores.requires_grad_()
    floor = -700.0  # inactive for these scores
    # The outcomes' range: the clamp of the value is inactive here (its derivative is not
    # part of the backward).
    low, high = outcomes.detach().min(0).values, outcomes.detach().max(0).values
    weights, value = _RelaxedOneHotMap.apply(scores, floor, outcomes, low, high)
    a = torch.randn_like(weights) * ("weights" in upstream)
    b = torch.randn_like(value) * ("value" in upstream)

    def loss(weights, value):
        terms = []
        if "weights" in upstream:
            terms.append((a * weights).sum())
        if "value" in upstream:
            terms.append((b * value).sum())
        return sum(terms)

    # The outcomes' gradient too (z = w c: learned outcomes), where the value has one.
    inputs = (scores, outcomes) if "value" in upstream else (scores,)
    grads = torch.autograd.grad(loss(weights, value), inputs)
    reference_weights = torch.softmax(scores, -1)
    reference_value = reference_weights @ outcomes
    torch.testing.assert_close(weights, reference_weights)
    assert weights[1, 2] == 0
    torch.testing.assert_close(value, reference_value)
    references = torch.autograd.grad(loss(reference_weights, reference_value), inputs)
    for grad, reference in zip(grads, references, strict=True):
        torch.testing.assert_close(grad, reference)
        assert grad.abs().sum() > 0


# Forward mode loads torch's jvp decompositions through torch.jit.script once per process.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shape", [(5,), (5, 2)], ids=["scalar", "vector"])
def test_learned_outcomes_get_the_gradient_of_the_relaxed_value(shape, hard):
    # z = sum_k w_k c_k, so dz/dc_k = w_k (hard: the straight-through estimate, that of the
    # relaxed z), in reverse and in forward mode.
    torch.manual_seed(0)
    outcomes = torch.randn(shape, dtype=torch.float64).requires_grad_()
    logits = torch.randn(3, 5, dtype=torch.float64)
    torch.manual_seed(1)
    value = TruncatedGenGS(0.5, logits=logits, outcomes=outcomes, hard=hard).rsample()
    torch.manual_seed(1)  # the relaxed one-hot of the same noise (a hard sample's is one-hot)
    relaxed = TruncatedGenGS(0.5, logits=logits, outcomes=outcomes.detach()).rsample()
    weights = pr.relaxation_of(relaxed).weights
    upstream = torch.randn_like(value)
    (grad,) = torch.autograd.grad((upstream * value).sum(), outcomes)
    expected = torch.einsum("bk,b...->k...", weights, upstream)
    torch.testing.assert_close(grad, expected)
    tangent = torch.randn(shape, dtype=torch.float64)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(outcomes.detach(), tangent)
        torch.manual_seed(1)
        d = TruncatedGenGS(0.5, logits=logits, outcomes=dual, hard=hard)
        out = torch.autograd.forward_ad.unpack_dual(d.rsample())
    torch.testing.assert_close(out.tangent, weights @ tangent)


@pytest.mark.parametrize("logit", [-100.0, -20.0, 20.0, 100.0])
def test_geometric_gradients_stay_finite_where_the_probability_rounds_to_0_or_1(logit):
    # An encoder's logit of 20 rounds p to 1 in float32; the log-PMF taken from p then had
    # log1p(-p) = -inf and NaN gradients, which ended a VAE run.
    logits = torch.tensor([logit], requires_grad=True)
    guide = GenGSGeometric(0.5, 15, logits=logits, tail_tolerance=None)
    prior = GenGSGeometric(0.5, 15, probs=torch.tensor(0.5))
    (guide.rsample((50,)).sum() + kl_divergence(guide, prior).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    # The truncated PMF still matches scipy's geometric (shifted to start at 0).
    p = torch.sigmoid(torch.tensor(logit, dtype=torch.float64)).item()
    expected = scipy.stats.geom.logpmf(np.arange(1, 15), p) if 0 < p < 1 else None
    if expected is not None and np.isfinite(expected).all():
        np.testing.assert_allclose(guide.logits[0, :14].detach().double(), expected, rtol=1e-4)


def test_a_relaxed_sample_weighing_an_outcome_the_scorer_excludes_has_a_moderate_gradient():
    # The weights' gradient took log 0 as -1e30: a guide giving weight to an outcome its prior
    # excludes got gradients near 1e30 times the weights' (inf once squared by Adam in
    # float32). The value keeps -1e30 (an infinite KL); the gradient takes log(tiny).
    logits = torch.zeros(3, requires_grad=True)
    guide = TruncatedGenGS(0.5, logits=logits)
    prior = TruncatedGenGS(0.5, logits=torch.tensor([0.0, -math.inf, 0.0]))
    torch.manual_seed(0)
    z = guide.rsample((100,))
    score = prior.log_prob(z)
    weights = pr.relaxation_of(z).weights
    assert (score < -1e20).all()  # log 0 in the value, times weights of 1e-10 and more
    expected = -1e30 * weights[:, 1] + (weights[:, [0, 2]] * prior.logits[[0, 2]]).sum(-1)
    torch.testing.assert_close(score, expected)
    (gradient,) = torch.autograd.grad(score.sum(), logits)
    assert torch.isfinite(gradient).all() and gradient.abs().max() < 1e5


def test_vector_outcomes_score_an_empty_batch_under_validation():
    # torch's independent constraint reshapes with -1, ambiguous for 0 elements: a validated
    # log_prob of an empty sample of vector outcomes raised "cannot reshape tensor of 0
    # elements" (every scalar-outcome class returned an empty result).
    outcomes = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    d = TruncatedGenGS(0.5, logits=torch.zeros(3), outcomes=outcomes, validate_args=True)
    assert d.log_prob(d.rsample((0,))).shape == (0,)
    assert d.expand((0,)).log_prob(d.expand((0,)).rsample()).shape == (0,)
    assert d.support.check(torch.tensor([[0.5, 1.0], [3.0, 0.0]])).tolist() == [True, False]


def test_another_familys_relaxed_sample_is_named_as_such():
    # An IGRCount guide's count scored by a GenGS prior was called "not a relaxed sample drawn
    # by rsample" and blamed on AutoNormal or AutoDelta: it is a relaxed sample, of another
    # family.
    torch.manual_seed(0)
    count = pr.IGRCount(torch.zeros(2, 9), torch.ones(2, 9), 0.5).rsample()
    prior = GenGSPoisson(torch.ones(2), 0.5, 10, validate_args=True)
    with pytest.raises(ValueError, match="a relaxed sample of another family") as error:
        prior.log_prob(count)
    assert "AutoNormal" not in str(error.value)


def test_entropy_is_that_of_the_discrete_distribution():
    # As mean and variance are (README): entropy raised a bare NotImplementedError, though the
    # straight-through classes have theirs. Against scipy: a Poisson truncated far in its tail
    # and an exact Binomial.
    poisson = GenGSPoisson(torch.tensor(2.0, dtype=torch.float64), 0.5, 40)
    assert float(poisson.entropy()) == pytest.approx(
        float(scipy.stats.poisson(2.0).entropy()), abs=1e-9
    )
    binomial = GenGSBinomial(
        torch.tensor(5.0, dtype=torch.float64), 0.5, probs=torch.tensor(0.3, dtype=torch.float64)
    )
    assert float(binomial.entropy()) == pytest.approx(
        float(scipy.stats.binom(5, 0.3).entropy()), abs=1e-12
    )

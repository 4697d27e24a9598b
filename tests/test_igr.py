"""Checks unique to the IGR family: normalization, Proposition 2, priors, SVI, stick-breaking."""

import copy
import dataclasses
import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.integrate
import scipy.stats
import torch
from examples_igr import IGR_EXAMPLES, limit_frequencies
from pyro.distributions.transforms import Planar, Spline
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from statistical import assert_z_scores_are_standard
from torch.distributions import StickBreakingTransform, kl_divergence

import pyro_relax as pr
from pyro_relax.distributions import igr as igr_module

_f64 = torch.float64


def _t(*values, dtype=_f64):
    return torch.tensor(values, dtype=dtype)


def _sticks(y):
    """The stick-breaking pieces w_k = s_k prod_{j<k} (1 - s_j), s = sigmoid(y), from their
    definition: a reference that shares nothing with the library's transform (whose errors
    would cancel against themselves)."""
    s = torch.sigmoid(y)
    rest = torch.cumprod(1 - s, -1)
    return s * torch.cat([torch.ones_like(rest[..., :1]), rest[..., :-1]], -1)


def _standard_sticks(num_sticks, temperature, dtype=torch.float32, **options):
    """IGR-SB with standard Gaussian parameters in ``dtype``, scoring without validation (values
    outside its image score -inf): the model side of the cross-map scoring tests."""
    return pr.IGRStickBreaking(
        torch.zeros(num_sticks, dtype=dtype),
        torch.ones(num_sticks, dtype=dtype),
        torch.as_tensor(temperature).to(dtype),
        validate_args=False,
        **options,
    )


# --- normalization --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: pr.IGR(_t(0.3), _t(0.8), 0.5, delta=1.5),
        lambda: pr.IGR(_t(-1.0), _t(2.0), 0.2),
        lambda: pr.IGRStickBreaking(_t(0.3), _t(0.8), 0.5, delta=1.5),
    ],
    ids=["IGR", "IGR-cold", "IGRStickBreaking"],
)
def test_density_integrates_to_one_for_two_categories(make):
    # A 1-D integral of the density of the point (z_1, 1 - z_1), built with its log-space twin
    # (so that 1 - z_1 does not round to 0; no Gaussian pre-image is attached, the value is
    # inverted), in the variable v = logit(z_1), where it is smooth:
    # dz_1 = z_1 (1 - z_1) dv. Stick-breaking maps onto an interval only: z_1 = softmax++(w /
    # tau)_1 for w in (0, 1). scipy's adaptive quadrature; tolerance 1e-6.
    d = make()
    if isinstance(d, pr.IGRStickBreaking):
        edges = [-math.log(d.delta), 1 / float(d.temperature) - math.log(d.delta)]
    else:
        edges = [-np.inf, np.inf]

    def density(v):
        v = torch.tensor([v, -v], dtype=_f64)
        log_z = torch.nn.functional.logsigmoid(v)
        value = pr.with_relaxation(torch.sigmoid(v), pr.Relaxation(log_weights=log_z))
        return float((d.log_prob(value) + value.log().sum()).exp())

    total, _ = scipy.integrate.quad(density, *edges, epsabs=1e-10)
    assert abs(total - 1) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_density_integrates_to_one_for_three_categories(temperature):
    # A 2-D integral over the simplex, pulled back to R^2 through torch's StickBreakingTransform
    # (an independent map with its own log-Jacobian): a tensor-product composite Gauss-Legendre
    # rule on [-40, 40]^2, 80 panels of 8 nodes per axis. Refining it changes the result by
    # less than 1e-7; the tolerance is 1e-5.
    d = pr.IGR(_t(0.4, -0.6), _t(0.7, 1.3), temperature, delta=0.7)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    edges = np.linspace(-40, 40, 81)
    half = np.diff(edges)[:, None] / 2
    u = torch.tensor((edges[:-1, None] + half * (nodes + 1)).ravel(), dtype=_f64)
    w = torch.tensor((half * weights).ravel(), dtype=_f64)
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    pullback = StickBreakingTransform()
    z = pullback(grid)
    density = (d.log_prob(z) + pullback.log_abs_det_jacobian(grid, z)).exp()
    total = (density * (w[:, None] * w[None, :]).reshape(-1)).sum()
    assert abs(float(total) - 1) < 1e-5


# --- numerics at low temperature ------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.05, 0.01])
def test_own_samples_are_scored_finitely_in_float32(temperature):
    torch.manual_seed(0)
    loc = torch.linspace(-3, 3, 9 * 4).reshape(4, 9)
    d = pr.IGR(loc, torch.full_like(loc, 2.0), temperature, validate_args=True)
    z = d.rsample((500,))
    assert (z == 0).any()  # coordinates underflow ...
    log_prob = d.log_prob(z)  # ... and validation and scoring still work
    assert torch.isfinite(log_prob).all()
    # Against float64 scoring of the same Gaussian draws.
    d64 = pr.IGR(loc.double(), torch.full_like(loc, 2.0).double(), temperature)
    y = pr.relaxation_of(z).preimage.double()
    expected = d64.log_prob(d64.softmax_plus_plus(y))
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-4, atol=1e-2)


def test_samples_pass_the_simplex_check_for_fifty_categories_in_float32():
    torch.manual_seed(1)
    d = pr.IGR(torch.zeros(20, 49), torch.ones(20, 49), 0.5, validate_args=True)
    z = d.rsample((100,))
    assert torch.distributions.constraints.simplex.check(z).all()
    assert torch.isfinite(d.log_prob(z)).all()


def test_a_prior_scores_a_guide_sample_that_underflowed():
    # The model-side IGR has other parameters: it inverts through the log-space twin.
    torch.manual_seed(2)
    guide = pr.IGR(torch.full((9,), 2.0), torch.ones(9), 0.05)
    prior = pr.IGR(*pr.uniform_igr_prior(10), 0.05)
    z = guide.rsample((200,))
    assert (z == 0).any()
    assert torch.isfinite(prior.log_prob(z)).all()


# --- Proposition 1 and straight-through -----------------------------------------------------


def test_straight_through_samples_are_the_limit_vertex_with_soft_gradients():
    loc = _t(0.5, -1.0, 0.2).requires_grad_()
    d = pr.IGR(loc, _t(1.0, 2.0, 0.5), 0.3, hard=True)
    soft = pr.IGR(loc, _t(1.0, 2.0, 0.5), 0.3)
    torch.manual_seed(3)
    hard = d.rsample((1000,))
    torch.manual_seed(3)
    relaxed = soft.rsample((1000,))
    y = pr.relaxation_of(hard).preimage
    limit = torch.where(y.max(-1).values > 0, y.argmax(-1), 3)
    assert torch.equal(hard, torch.nn.functional.one_hot(limit, 4).to(_f64))
    # The soft relaxation it carries is scored, exactly as the soft sample.
    torch.testing.assert_close(d.log_prob(hard), soft.log_prob(relaxed))
    (hard * _t(1.0, 2.0, 3.0, 4.0)).sum().backward()
    assert torch.isfinite(loc.grad).all() and (loc.grad != 0).any()


def test_straight_through_rejects_values_that_are_not_one_hot():
    d = pr.IGR(torch.zeros(2), torch.ones(2), 0.3, hard=True, validate_args=True)
    with pytest.raises(ValueError, match="one-hot"):
        d.log_prob(_t(0.2, 0.3, 0.5, dtype=torch.float32))


# --- Proposition 2 --------------------------------------------------------------------------


def test_proposition_2_matches_monte_carlo_with_unequal_scales():
    # 4 million float64 draws: the frequencies' errors in their standard errors
    # sqrt(p (1 - p) / N) (at most 2.5e-4) standard normal at LEVEL, Bonferroni alone (the
    # frequencies of one sample are dependent).
    loc, scale = _t(0.3, -0.2, 0.6), _t(0.5, 2.0, 1.0)
    torch.manual_seed(4)
    num_draws = 4_000_000
    observed = limit_frequencies(loc, scale, num_draws)
    probs = pr.igr_log_probs(loc, scale).exp()
    assert abs(float(probs.sum()) - 1) < 1e-9
    standard_error = (probs * (1 - probs) / num_draws).sqrt()
    z = (observed - probs) / standard_error
    assert_z_scores_are_standard(z, "the frequencies of the categories", independent=False)
    # The reference implementation scales each factor by its own sigma_j: it computes the
    # argmax of the standardized variables y_j / sigma_j, far outside the tolerance.
    reference = pr.igr_log_probs(loc / scale, torch.ones_like(scale)).exp()
    assert (reference - observed).abs().max() > 2e-2
    # With equal scales both agree.
    torch.testing.assert_close(
        pr.igr_log_probs(loc, torch.full_like(loc, 1.7)),
        pr.igr_log_probs(loc / 1.7, torch.ones_like(loc)),
    )


@pytest.mark.parametrize(
    "loc, scale",
    [([0.0], [1.0]), ([0.3, 0.3], [1.0, 1.0]), ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]), (None, None)],
    ids=["one-at-0", "tied", "three-at-0", "uniform-prior"],
)
def test_proposition_2_gradients_hold_where_break_points_coincide(loc, scale):
    # The quadrature's break points moved with the parameters: where they coincided (equal
    # means, means at 0), zero-width panels cut the terms by which the edges' motion cancels,
    # and the gradient was wrong: 0.399 for d log P(H=0) / d loc at loc 0 (exact 0.798), and
    # asymmetric in symmetric coordinates at the uniform prior (off by 0.11 of 0.29).
    if loc is None:
        loc, scale = pr.uniform_igr_prior(4, dtype=_f64)
    loc = torch.as_tensor(loc, dtype=_f64).clone().requires_grad_()
    scale = torch.as_tensor(scale, dtype=_f64).clone().requires_grad_()
    assert torch.autograd.gradcheck(pr.igr_log_probs, (loc, scale), atol=1e-7, rtol=1e-6)
    if loc.shape == (1,):  # K = 2: P(H = 0) = Phi(mu / sigma), d/dmu log = phi / (sigma Phi)
        (gradient,) = torch.autograd.grad(pr.igr_log_probs(loc, scale)[0], loc)
        torch.testing.assert_close(gradient, torch.tensor([math.sqrt(2 / math.pi)], dtype=_f64))


@pytest.mark.parametrize("mean", [-11.5, -13.0, -40.0, -300.0])
def test_proposition_2_holds_for_means_far_below_0(mean):
    # Once every mean was below -12 scales, every break point clamped to 0: the panels had
    # width 0 and log P(H = 0) was hundreds of nats off (-784.2 for log Phi(-12.5) = -81.6).
    # For K = 2, P(H = 0) = Phi(mu / sigma) exactly.
    for scale in (1.0, 0.25):
        log_probs = pr.igr_log_probs(_t(mean), _t(scale))
        expected = torch.special.log_ndtr(_t(mean / scale))[0]
        torch.testing.assert_close(log_probs[0], expected, rtol=1e-10, atol=0)
    # One coordinate far below, others not: that coordinate's share against scipy.
    loc, scale = [1.0, -9.0], [1.0, 0.5]
    log_probs = pr.igr_log_probs(_t(*loc), _t(*scale))

    def density(t):
        return scipy.stats.norm.pdf(t, loc[1], scale[1]) * scipy.stats.norm.cdf(t, loc[0], scale[0])

    reference, _ = scipy.integrate.quad(density, 0, 5, epsabs=0, epsrel=1e-12, limit=500)
    assert float(log_probs[1]) == pytest.approx(math.log(reference), rel=1e-9)


def test_quadrature_integrates_the_batch_in_bounded_chunks(monkeypatch):
    # igr_log_probs held the whole batch's rows x coordinates x nodes at once: 2 GiB for
    # 100 x 20 latents of 10 categories, out of memory at 10,000 x 20 (IGR.discrete(), hence
    # discretize, discrete_elbo and the igr-vae experiment's score). Chunked, each row's
    # integral is what it was, with its gradient.
    generator = torch.Generator().manual_seed(0)
    loc = torch.randn(4, 3, 5, generator=generator, dtype=_f64).requires_grad_()
    scale = (0.2 + torch.rand(4, 3, 5, generator=generator, dtype=_f64)).requires_grad_()
    whole = pr.igr_log_probs(loc, scale)
    (grad_whole,) = torch.autograd.grad(whole[..., 1].sum(), loc)
    nodes = 7 * 5 * 16  # break points per coordinate x coordinates x Gauss-Legendre nodes
    monkeypatch.setattr(igr_module, "_PIECE_ELEMENTS", 5 * 5 * nodes)  # 5 rows a chunk
    rows = []
    quadrature = igr_module._quadrature

    def counted(loc, *rest):
        rows.append(len(loc))
        return quadrature(loc, *rest)

    monkeypatch.setattr(igr_module, "_quadrature", counted)
    chunked = pr.igr_log_probs(loc, scale)
    assert rows == [5, 5, 2]
    (grad_chunked,) = torch.autograd.grad(chunked[..., 1].sum(), loc)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=0, atol=0)


def test_quadrature_of_an_empty_batch_is_empty():
    # An empty batch gave no chunk to integrate, and torch.cat of no pieces raised.
    log_probs = pr.igr_log_probs(torch.zeros(0, 2), torch.ones(0, 2))
    assert log_probs.shape == (0, 3)


def test_quadrature_does_not_change_when_loc_and_scale_are_scaled_together():
    # P(H = k) depends on loc / scale only (H is the argmax of y, or K where no y_k > 0, and
    # scaling y by c > 0 keeps both), so the rule must scale with the parameters. The break
    # points of a mean below 0 sit at multiples of sigma^2 / (sigma + |mu|), a length; a rule
    # with sigma / (sigma + |mu|) (equal where sigma = 1) does not scale, and was off by 1.9
    # nats at c = 1000. Means 20 and 30 scales below 0; tolerance 1e-9 of float64's rounding.
    loc, scale = _t(-20.0, -30.0), _t(1.0, 1.5)
    torch.testing.assert_close(
        pr.igr_log_probs(1e3 * loc, 1e3 * scale), pr.igr_log_probs(loc, scale), rtol=1e-9, atol=0
    )


def test_categorical_is_batched_and_differentiable():
    loc = torch.randn(2, 3, 4, dtype=_f64, requires_grad=True)
    d = pr.IGR(loc, torch.rand(2, 3, 4, dtype=_f64) + 0.5, 0.2)
    c = d.categorical()
    assert isinstance(c, torch.distributions.Categorical)
    assert c.probs.shape == (2, 3, 5)
    torch.testing.assert_close(c.probs.sum(-1), torch.ones(2, 3, dtype=_f64))
    c.probs[..., 0].sum().backward()
    assert torch.isfinite(loc.grad).all()


@pytest.mark.parametrize("budget", [None, 1000], ids=["one-pass", "passes"])
@pytest.mark.parametrize("family", ["stick-breaking", "planar"])
def test_monte_carlo_categoricals(family, budget, monkeypatch):
    if budget is not None:  # 250 draws of 4 categories per pass: 160 passes
        monkeypatch.setattr(igr_module, "_PIECE_ELEMENTS", budget)
    torch.manual_seed(5)
    loc, scale = _t(0.3, -0.2, 0.6), _t(0.5, 2.0, 1.0)
    if family == "planar":
        # A planar layer with u = log(e - 1) w has u_hat = 0, the identity: the PMF is
        # Proposition 2's.
        c = math.log(math.e - 1)
        flat = ConditionedPlanar((_t(0.0), _t(c, 0.0, 0.0), _t(1.0, 0.0, 0.0)))
        d = pr.IGRPlanar(loc, scale, 0.1, flows=[flat])
        expected = pr.igr_log_probs(loc, scale).exp()
    else:
        d = pr.IGRStickBreaking(loc, scale, 0.1)
        y = loc + scale * torch.randn(200_000, 3, dtype=_f64)
        expected = torch.bincount(_sticks(y).argmax(-1), minlength=4).double() / 200_000
        assert expected[-1] == 0  # the last category has no mass in the limit
    probs = d.categorical(num_samples=40_000).probs
    # Standard error <= 2.5e-3: five of them.
    assert (probs - expected).abs().max() < 1.3e-2


@pytest.mark.parametrize("family", [pr.IGRStickBreaking, pr.IGRPlanar])
def test_monte_carlo_categoricals_draw_in_bounded_passes(family, monkeypatch):
    # All 10,000 draws were taken at once: tensors of 10,000 x batch x K, 3.6 GiB of memory for
    # IGR-SB's discrete() over 100 x 20 latents of 10 categories, and out of memory at ten times
    # that (discretize, discrete_elbo and AutoRelaxed.median call it).
    d = family(torch.zeros(3, 5, dtype=_f64), torch.ones(3, 5, dtype=_f64), 0.5)
    monkeypatch.setattr(igr_module, "_PIECE_ELEMENTS", 1000)
    sizes = []
    sample_categories = d._sample_categories
    monkeypatch.setattr(d, "_sample_categories", lambda n: sizes.append(n) or sample_categories(n))
    probs = d.categorical(num_samples=1234).probs
    assert sum(sizes) == 1234 and max(sizes) * 3 * 6 <= 1000
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, dtype=_f64))
    counts = probs * 1234  # counts over the draws
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-9)
    for bad, error in ((0, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="`num_samples` must be an integer"):
            d.categorical(num_samples=bad)


# --- KL -------------------------------------------------------------------------------------


def test_igr_kl_is_in_closed_form_for_any_temperatures_and_deltas():
    # The pre-images of two softmax++ maps are related by an affine map, so the KL is the
    # Gaussian KL of the mapped pre-image: checked against Monte Carlo over 200,000 draws, the
    # error in standard errors standard normal at LEVEL (statistical.py) (q: tau 0.7, delta 1;
    # p: tau 0.4, delta 0.3; K = 5).
    torch.manual_seed(0)
    q = pr.IGR(torch.randn(4, dtype=_f64), torch.rand(4, dtype=_f64) + 0.5, 0.7, delta=1.0)
    p = pr.IGR(torch.randn(4, dtype=_f64), torch.rand(4, dtype=_f64) + 0.5, 0.4, delta=0.3)
    value = q.rsample((200_000,))
    ratio = q.log_prob(value) - p.log_prob(value)
    error = ratio.mean() - kl_divergence(q, p)
    assert_z_scores_are_standard(error / (ratio.std() / math.sqrt(ratio.numel())), "the KL")
    # Equal maps: the plain Gaussian KL.
    same = kl_divergence(
        pr.IGR(torch.zeros(3), torch.ones(3), 0.5),
        pr.IGR(torch.ones(3), torch.ones(3), torch.tensor(0.5)),
    )
    torch.testing.assert_close(same, torch.tensor(1.5))


def test_stick_breaking_kl_needs_equal_temperature_and_delta():
    p = pr.IGRStickBreaking(torch.zeros(3), torch.ones(3), 0.5)
    for q in (
        pr.IGRStickBreaking(torch.zeros(3), torch.ones(3), 0.4),
        pr.IGRStickBreaking(torch.zeros(3), torch.ones(3), 0.5, delta=2.0),
    ):
        with pytest.raises(NotImplementedError, match="temperature and delta"):
            kl_divergence(p, q)
    sb = pr.IGRStickBreaking(torch.zeros(3), torch.ones(3), 0.5, precision=0.9)
    with pytest.raises(NotImplementedError, match="no closed form"):
        kl_divergence(sb, sb)


def test_kl_fires_after_expand_and_to_event():
    p = pr.IGR(torch.zeros(2, 3), torch.ones(2, 3), 0.5).expand((4, 2)).to_event(1)
    q = pr.IGR(torch.ones(3), torch.ones(3), 0.5).expand((4, 2)).to_event(1)
    torch.testing.assert_close(kl_divergence(p, q), torch.full((4,), 3.0))


# --- priors ---------------------------------------------------------------------------------


def test_uniform_prior_closed_form():
    loc, scale = pr.uniform_igr_prior(10, dtype=_f64)
    ratio = -scipy.stats.norm.ppf(10 ** (-1 / 9))
    assert abs(ratio + 0.753) < 1e-3
    torch.testing.assert_close(loc / scale, torch.full((9,), ratio, dtype=_f64))
    torch.testing.assert_close(
        pr.igr_log_probs(loc, scale).exp(), torch.full((10,), 0.1, dtype=_f64)
    )
    torch.manual_seed(6)
    # 1e6 draws: standard error sqrt(0.1 * 0.9 / N) = 3e-4 per category; the errors in it
    # standard normal at LEVEL, Bonferroni alone (the frequencies are dependent).
    num_draws = 1_000_000
    observed = limit_frequencies(loc, scale, num_draws)
    z = (observed - 0.1) / math.sqrt(0.1 * 0.9 / num_draws)
    assert_z_scores_are_standard(z, "the frequencies of the categories", independent=False)


def test_prior_fitting_reaches_the_target():
    torch.manual_seed(7)
    target = _t(0.6, 0.25, 0.1, 0.05)
    loc, scale = pr.fit_igr_prior(target, temperature=0.1, num_samples=100, num_steps=100, lr=0.1)
    probs = pr.IGR(loc, scale, 0.1).categorical().probs
    assert 0.5 * (probs - target).abs().sum() < 0.03


def test_fit_igr_prior_rejects_unknown_options():
    target = _t(0.6, 0.3, 0.1)
    with pytest.raises(ValueError, match="objective"):
        pr.fit_igr_prior(target, objective="kl", num_steps=0)
    with pytest.raises(ValueError, match="`init`"):
        pr.fit_igr_prior(target, init="ones", num_steps=0)
    with pytest.raises(ValueError, match="stick-breaking"):
        pr.fit_igr_prior(target, family=pr.IGR, init="hazard", num_steps=0)


def test_the_hazard_start_has_the_law_of_the_target_in_the_limit():
    # num_steps=0 returns the start: the first k with y_k > 0 has hazard Phi(mu_k / sigma), so
    # the law h_0, (1 - h_0) h_1, ..., prod (1 - h_k) must be the target (scipy's Phi).
    target = [0.1, 0.2, 0.3, 0.4]
    loc, scale = pr.fit_igr_prior(
        torch.tensor(target, dtype=_f64), family=pr.IGRStickBreaking, init="hazard", num_steps=0
    )
    hazard = scipy.stats.norm.cdf((loc / scale).numpy())
    law, remaining = [], 1.0
    for h in hazard:
        law.append(remaining * h)
        remaining *= 1 - h
    np.testing.assert_allclose(law + [remaining], target, atol=1e-12)


def _count_moments(probs, target):
    k = torch.arange(probs.shape[-1], dtype=_f64)
    probs = probs.double()
    mean = (probs * k).sum()
    sd = ((probs * (k - mean).square()).sum()).sqrt()
    return float(mean), float(sd), float(0.5 * (probs - target.double()).abs().sum())


def test_fitted_count_prior_approximates_poisson_50():
    # The paper approximates a Poisson(50) with IGR counts over K = 100 outcomes. The hazard
    # initialization (sigma = 5) and 1000 cross-entropy steps at tau = 0.05, float32. Measured
    # (seed 12, one thread): the initialization alone has hard counts with mean 48.55, sd 6.67
    # and total variation 0.083 from the target; the fit, hard counts (argmax stick, 20000
    # draws) with mean 49.92, sd 7.01, TV 0.023 (the Monte Carlo floor of a TV estimate from
    # 20000 draws is about 0.017), relaxed counts at tau = 0.05 with mean 49.8, sd 6.48
    # (Poisson(50): 50 and 7.07). About 8 s. The previous recipe (squared error, zero
    # initialization, tau = 0.1) ends with mean 46.9, sd 2.75, TV 0.51.
    target = torch.tensor(scipy.stats.poisson.pmf(np.arange(100), 50), dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: threads only contend on a shared machine
    try:
        torch.manual_seed(12)
        fit = dict(family=pr.IGRCount, temperature=0.05, init="hazard", init_scale=5.0)
        fit.update(objective="cross_entropy", lr=0.01, num_samples=1000)
        start = pr.IGRCount(*pr.fit_igr_prior(target, num_steps=0, **fit), 0.05)
        d = pr.IGRCount(*pr.fit_igr_prior(target, num_steps=1000, **fit), 0.05)
        _, _, tv_start = _count_moments(start.categorical(20_000).probs, target)
        mean, sd, tv = _count_moments(d.categorical(20_000).probs, target)
        relaxed = d.sample((20_000,)).double()
    finally:
        torch.set_num_threads(threads)
    assert abs(mean - 50) < 2 and abs(sd / math.sqrt(50) - 1) < 0.2
    assert abs(float(relaxed.mean()) - 50) < 2
    assert abs(float(relaxed.std()) / math.sqrt(50) - 1) < 0.2
    assert tv < 0.06 < tv_start  # the fit improves on its initialization


# --- SVI ------------------------------------------------------------------------------------

_CENTERS = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0], [-3.0, 0.0]])


def _model(data=None, num=8, temperature=0.05):
    loc0, scale0 = pr.uniform_igr_prior(5)
    with pyro.plate("data", num):
        z = pyro.sample("z", pr.IGR(loc0, scale0, temperature))
        if data is not None:
            pyro.sample("x", dist.Normal(z @ _CENTERS, 0.5).to_event(1), obs=data)


def _guide(data=None, num=8, temperature=0.05):
    loc = pyro.param("loc", torch.zeros(num, 4))
    scale = pyro.param("scale", torch.ones(num, 4), constraint=dist.constraints.positive)
    with pyro.plate("data", num):
        pyro.sample("z", pr.IGR(loc, scale, temperature))


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_svi_in_a_plate_in_float32_at_low_temperature(elbo):
    pyro.clear_param_store()
    torch.manual_seed(8)
    data = _CENTERS[torch.arange(8) % 5] + 0.3 * torch.randn(8, 2)
    with pyro.validation_enabled(True):
        svi = SVI(_model, _guide, Adam({"lr": 0.05}), elbo())
        losses = [svi.step(data) for _ in range(60)]
    assert all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    for name in ("loc", "scale"):
        assert torch.isfinite(pyro.param(name)).all()


def test_trace_mean_field_uses_the_closed_form_kl():
    # Without observations the loss is the KL summed over the plate, exactly, when the
    # registered KL is used (a Monte-Carlo estimate would differ).
    pyro.clear_param_store()
    _guide()
    loss = TraceMeanField_ELBO().loss(_model, _guide)
    prior = pr.IGR(*pr.uniform_igr_prior(5), 0.05)
    guide = pr.IGR(pyro.param("loc"), pyro.param("scale"), 0.05)
    expected = kl_divergence(guide, prior.expand((8,))).sum().detach()
    assert loss == pytest.approx(expected.item(), rel=1e-6)


def test_planar_flows_train_in_a_guide():
    pyro.clear_param_store()
    torch.manual_seed(9)
    flows = [pyro.distributions.transforms.Planar(4) for _ in range(2)]
    before = [p.detach().clone() for f in flows for p in f.parameters()]

    def guide(data=None, num=8, temperature=0.05):
        pyro.module("flows", torch.nn.ModuleList(flows))
        loc = pyro.param("loc", torch.zeros(num, 4))
        with pyro.plate("data", num):
            pyro.sample("z", pr.IGRPlanar(loc, torch.ones(num, 4), temperature, flows=flows))

    data = _CENTERS[torch.arange(8) % 5]
    svi = SVI(_model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(10)]
    assert all(math.isfinite(loss) for loss in losses)
    after = [p.detach() for f in flows for p in f.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_planar_rejects_values_it_did_not_draw():
    d = pr.IGRPlanar(torch.zeros(3), torch.ones(3), 0.3, flows=1)
    with pytest.raises(ValueError, match="planar layers have no closed-form inverse"):
        d.log_prob(torch.full((4,), 0.25))
    # A model that builds its layers at every call (flows=<number>, the docstring's form) could
    # not score its guide's samples, and the message did not say why or what to do.
    other = pr.IGRPlanar(torch.zeros(3), torch.ones(3), 0.3, flows=1)
    with pytest.raises(ValueError, match="build the layers once, outside it, and pass them"):
        d.log_prob(other.rsample())


def test_planar_flows_that_give_non_finite_values_are_refused_under_validation():
    # A planar layer with w = 0 divides by |w|^2 = 0: NaN draws, refused by name under
    # validation rather than returned.
    flow = Planar(3)
    with torch.no_grad():
        flow.w.zero_()
    d = pr.IGRPlanar(torch.zeros(3), torch.ones(3), 0.5, flows=[flow], validate_args=True)
    with pytest.raises(ValueError, match="non-finite values"):
        d.rsample((2,))


# --- countably infinite stick-breaking ------------------------------------------------------


def test_infinite_mode_conserves_mass_and_reports_its_truncation():
    torch.manual_seed(10)
    loc = torch.linspace(-2.0, 0.5, 3 * 29).reshape(3, 29)
    d = pr.IGRStickBreaking(loc, torch.ones(3, 29), 0.1, precision=0.95, validate_args=True)
    z = d.rsample((400,))
    assert z.shape == (400, 3, 30)
    torch.testing.assert_close(z.sum(-1), torch.ones(400, 3))
    kept = d.truncation_of(z)
    # The smallest n whose sticks reach the precision, for every sample and batch element.
    sticks = _sticks(pr.relaxation_of(z).preimage)
    cumulative = sticks.cumsum(-1)
    reached = cumulative >= 0.95
    expected = torch.where(reached.any(-1), reached.int().argmax(-1) + 1, 29)
    assert torch.equal(kept, expected)
    assert kept.unique().numel() > 3  # not one truncation for the whole batch
    assert (kept[:, 0] != kept[:, 1]).any()  # nor that of the first latent variable
    mass = d.captured_mass_of(z)
    assert ((mass >= 0.95) | (kept == 29)).all()
    # The crossing stick is kept, the sticks after it are exact zeros.
    positions = torch.arange(29)
    assert (z[..., :-1][positions >= kept.unsqueeze(-1)] == 0).all()
    assert torch.isfinite(d.log_prob(z)).all()
    # A plain copy: the truncation is read from the zeros, the density from inversion.
    plain = z.detach().clone()
    assert torch.equal(d.truncation_of(plain), kept)
    torch.testing.assert_close(d.log_prob(plain), d.log_prob(z), rtol=1e-4, atol=1e-3)


def test_infinite_mode_when_the_first_stick_already_reaches_the_precision():
    # The reference code crashed here.
    d = pr.IGRStickBreaking(_t(8.0, 0.0, 0.0), _t(0.1, 1.0, 1.0), 0.1, precision=0.99)
    z = d.rsample((50,))
    assert (d.truncation_of(z) == 1).all()
    assert (z[:, 1:3] == 0).all() and (z[:, 0] > 0.99).all()
    torch.testing.assert_close(z.sum(-1), torch.ones(50, dtype=_f64))
    assert torch.isfinite(d.log_prob(z)).all()


def test_infinite_mode_density_integrates_to_one_on_each_face():
    # Three sticks at most (K_max = 4): samples keep 1, 2 or 3 sticks; the faces' densities
    # integrate to the probabilities of keeping that many. Check the one-stick face in 1-D.
    d = pr.IGRStickBreaking(_t(1.0, 0.0, 0.0), _t(1.0, 1.0, 1.0), 0.5, precision=0.6)
    face = scipy.stats.norm.sf(math.log(0.6 / 0.4), loc=1.0)  # P(s_1 >= 0.6)
    lower, upper = 1 / (1 + math.exp(-0.6 / 0.5)), 1 / (1 + math.exp(-1 / 0.5))

    # The density is smooth on the face: a 100-node Gauss-Legendre rule, error below 1e-9.
    nodes, weights = np.polynomial.legendre.leggauss(100)
    z1 = torch.tensor(lower + (upper - lower) * (nodes + 1) / 2, dtype=_f64)
    zeros = torch.zeros_like(z1)
    values = torch.stack([z1, zeros, zeros, 1 - z1], -1)
    total = float((d.log_prob(values).exp() * torch.tensor(weights)).sum()) * (upper - lower) / 2
    assert abs(total - face) < 1e-6


def test_infinite_mode_trains_in_a_plate_in_float32():
    # No closed-form KL in this mode: the prior is an IGRStickBreaking with the same
    # temperature, delta and precision, which scores the guide's samples on the face they span
    # (a prior with another precision, or a finite one, recomputes its own truncation from the
    # pre-image and scores a different point).
    pyro.clear_param_store()
    torch.manual_seed(13)
    num, k_max = 8, 10
    centers = 3 * torch.randn(k_max, 2)
    data = centers[torch.arange(num)] + 0.3 * torch.randn(num, 2)

    def model(data):
        prior = pr.IGRStickBreaking(torch.full((k_max - 1,), -1.0), 1.0, 0.1, precision=0.9)
        with pyro.plate("data", num):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(z @ centers, 0.5).to_event(1), obs=data)

    def guide(data):
        loc = pyro.param("loc", torch.full((num, k_max - 1), -1.0))
        scale = pyro.param(
            "scale", torch.ones(num, k_max - 1), constraint=dist.constraints.positive
        )
        with pyro.plate("data", num):
            pyro.sample("z", pr.IGRStickBreaking(loc, scale, 0.1, precision=0.9))

    with pyro.validation_enabled(True):
        svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
        svi.step(data)
        before = {name: pyro.param(name).detach().clone() for name in ("loc", "scale")}
        losses = []
        for _ in range(40):
            losses.append(svi.step(data))
            # A NaN gradient would turn Adam's parameters into NaN.
            assert all(torch.isfinite(pyro.param(name)).all() for name in before)
        assert all(math.isfinite(loss) for loss in losses)
        # SVI zeroes the gradients after each step: check those of one more step explicitly.
        Trace_ELBO().loss_and_grads(model, guide, data)
        for name in before:
            grad = pyro.param(name).unconstrained().grad
            assert torch.isfinite(grad).all() and (grad != 0).any()
        assert np.mean(losses[-10:]) < np.mean(losses[:10])
        for name, value in before.items():
            assert pyro.param(name).dtype == torch.float32
            assert not torch.equal(pyro.param(name), value)
        # TraceMeanField_ELBO catches the KL's NotImplementedError and falls back to Monte
        # Carlo: the same estimate as Trace_ELBO on the same draw.
        torch.manual_seed(14)
        expected = Trace_ELBO().loss(model, guide, data)
        torch.manual_seed(14)
        assert TraceMeanField_ELBO().loss(model, guide, data) == pytest.approx(expected)
        svi = SVI(model, guide, Adam({"lr": 0.05}), TraceMeanField_ELBO())
        assert all(math.isfinite(svi.step(data)) for _ in range(5))


def test_the_discrete_limit_with_a_precision_takes_the_largest_kept_stick():
    # With a precision the limit tau -> 0 is the argmax of the kept sticks only: a dropped
    # stick (an exact zero in every sample) can be the largest of all. Sticks by hand from loc
    # (scale 1e-3: the same sticks in every draw): 0.1, 0.09, 0.081, then 0.69; the first
    # three reach 0.271 >= rho = 0.25, so they are kept and the fourth is dropped. The limit is
    # category 0 in every draw, where the argmax over all sticks gives 3.
    loc = _t(math.log(1 / 9), math.log(1 / 9), math.log(1 / 9), 3.0, 0.0)
    d = pr.IGRStickBreaking(loc, torch.full((5,), 1e-3, dtype=_f64), 0.5, precision=0.25)
    sticks = _sticks(loc)
    kept = int((sticks.cumsum(-1) < 0.25).sum()) + 1
    assert kept == 3 and int(sticks.argmax()) == 3  # the setting the test is about
    expected = torch.nn.functional.one_hot(sticks[:kept].argmax(), 6).double()
    torch.manual_seed(0)
    torch.testing.assert_close(d.categorical(200).probs.double(), expected, rtol=0, atol=0)


def test_a_vertex_without_sticks_reads_as_one_kept_stick():
    # Every sample keeps at least one stick (n >= 1). The last vertex (0, ..., 0, 1) has no
    # non-zero stick coordinate: it reads as the first stick kept and underflowed (its
    # density undetermined: NaN, or the matching error under validation), not as 0 sticks
    # (-inf and an error about the precision).
    vertex = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    d = pr.IGRStickBreaking(torch.zeros(4), torch.ones(4), 0.5, precision=0.9)
    assert int(d.truncation_of(vertex)) == 1
    with pytest.raises(ValueError, match="does not determine its pre-image"):
        d.log_prob(vertex)


# --- counts ---------------------------------------------------------------------------------


def test_count_values_and_scoring():
    torch.manual_seed(11)
    d = pr.IGRCount(torch.zeros(2, 9), torch.ones(2, 9), 1e-3, validate_args=True)
    c = d.rsample((300,))
    assert c.shape == (300, 2)
    assert ((c >= 0) & (c <= 9)).all()
    # At low temperature the relaxed count is the index of the largest stick.
    sticks = _sticks(pr.relaxation_of(pr.relaxation_of(c).simplex).preimage)
    near = (c - sticks.argmax(-1)).abs() < 0.05
    assert near.double().mean() > 0.97  # all but near-ties of the two largest sticks
    torch.testing.assert_close(d.log_prob(c), d.simplex_dist.log_prob(pr.relaxation_of(c).simplex))
    with pytest.raises(ValueError, match="plain count"):
        d.log_prob(torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("num_sticks", [1, 2])
def test_a_relaxed_count_is_the_mean_outcome_up_to_the_largest(num_sticks):
    # A relaxed count is sum_k k z_k over the outcomes 0..K-1 (the definition); the clamp to
    # [0, K - 1] only absorbs rounding. A large delta puts most of the mass on the last
    # outcome, so counts above K - 2 are drawn, which a clamp at K - 2 cut down.
    torch.manual_seed(0)
    d = pr.IGRCount(torch.zeros(num_sticks), torch.ones(num_sticks), 2.0, delta=50.0)
    c = d.rsample((20,))
    assert bool((c > num_sticks - 1).all())  # above K - 2, the setting the test is about
    simplex = pr.relaxation_of(c).simplex
    torch.testing.assert_close(c, simplex @ torch.arange(num_sticks + 1.0))


def test_the_support_of_a_count_ends_at_k_minus_1_and_expansion_keeps_checking_it():
    # The outcomes are 0..K-1 (here K = 4): 3.5 is outside the support, and an expanded count
    # validates as the original does (it dropped validation and scored such values).
    d = pr.IGRCount(torch.zeros(3), torch.ones(3), 0.5, validate_args=True)
    assert d.support.upper_bound == 3
    expanded = d.expand((2,))
    record = pr.relaxation_of(expanded.rsample())
    outside = pr.with_relaxation(torch.full((2,), 3.5), record)
    with pytest.raises(ValueError, match="support"):
        expanded.log_prob(outside)


@pytest.mark.parametrize("precision", [0.8, None], ids=["other-precision", "finite"])
def test_stick_breaking_rejects_samples_cut_at_other_sticks(precision):
    # An infinite-mode sample cut at rho = 0.9 is outside the image of a distribution that cuts
    # at another precision (or never): density 0 there, and a clear error under validation,
    # never the density of some other point.
    torch.manual_seed(0)
    guide = pr.IGRStickBreaking(torch.zeros(9), torch.ones(9), 0.1, precision=0.9)
    value = guide.rsample((200,))
    same = pr.IGRStickBreaking(torch.zeros(9), torch.ones(9), 0.1, precision=0.9)
    assert torch.isfinite(same.log_prob(value)).all()
    other = pr.IGRStickBreaking(torch.zeros(9), torch.ones(9), 0.1, precision=precision)
    with pytest.raises(ValueError, match="precision"):
        other.log_prob(value)
    unvalidated = pr.IGRStickBreaking(
        torch.zeros(9), torch.ones(9), 0.1, precision=precision, validate_args=False
    )
    log_prob = unvalidated.log_prob(value)
    assert not torch.isnan(log_prob).any() and torch.isneginf(log_prob).any()


@pytest.mark.parametrize("family", [pr.IGR, pr.IGRStickBreaking])
def test_closed_form_kl_off_the_cpu(family):
    # Off the CPU, stick-breaking parameters are compared by identity (a value comparison
    # would synchronize with the device). The map is identified by the arguments as the user
    # passed them, so one temperature tensor or equal Python numbers give the closed form there
    # too, not a silent Monte-Carlo fallback in TraceMeanField_ELBO. IGR-I compares nothing.
    # The meta device takes the non-CPU path.
    loc, scale = torch.zeros(4, 3, device="meta"), torch.ones(4, 3, device="meta")
    tau = torch.tensor(0.5, device="meta")
    for temperature in (tau, 0.5):
        guide = family(loc, scale, temperature, validate_args=False)
        prior = family(loc, scale, temperature, validate_args=False).expand([2, 4])
        assert kl_divergence(guide.expand([2, 4]), prior).device.type == "meta"
    other = torch.tensor(0.5, device="meta")  # equal, perhaps, but not known to be
    guide = family(loc, scale, tau, validate_args=False)
    prior = family(loc, scale, other, validate_args=False)
    if family is pr.IGR:
        assert kl_divergence(guide, prior).device.type == "meta"
    else:
        with pytest.raises(NotImplementedError):
            kl_divergence(guide, prior)


@pytest.mark.parametrize(
    "example",
    [e for e in IGR_EXAMPLES if e.id != "IGRCount" and not e.id.endswith("-infinite")],
    ids=lambda e: e.id,
)
def test_the_fast_construction_and_sampler_agree_with_the_transformed_distribution(example):
    # The IGR family sets its shapes and draws its pre-image without TransformedDistribution's
    # general machinery: the shapes must be those torch infers from the base and the
    # transforms, before and after expand, and a sample the base's draw pushed through the
    # transforms, under the same seed (to torch's default tolerance of the dtype: the pre-image
    # is one fused multiply-add here, two operators in Normal.rsample).
    d = example.build()
    for dist_ in (d, d.expand((3, *d.batch_shape))):
        general = torch.distributions.TransformedDistribution(dist_.base_dist, dist_.transforms)
        assert (dist_.batch_shape, dist_.event_shape) == (general.batch_shape, general.event_shape)
        torch.manual_seed(7)
        value = dist_.rsample((2,))
        torch.manual_seed(7)
        expected = general.rsample((2,))
        if getattr(dist_, "hard", False):
            expected = torch.nn.functional.one_hot(expected.argmax(-1), expected.shape[-1])
        torch.testing.assert_close(value, expected.to(value.dtype))


@pytest.mark.parametrize("precision", [None, 0.9], ids=["finite", "infinite"])
def test_stick_breaking_does_not_read_an_underflowed_stick_as_dropped(precision):
    # A coordinate that underflowed to 0 (float32, temperature 0.001) was read as a dropped
    # stick: a copy of the distribution's own sample raised "cut at other sticks than this
    # distribution's precision" (without one), and scored -inf with validation off. Such a copy
    # does not determine its pre-image: an error naming that under validation, NaN without.
    torch.manual_seed(0)
    d = pr.IGRStickBreaking(torch.zeros(3), torch.ones(3), 0.001, precision=precision)
    plain = d.sample((1000,)).clone()
    underflowed = (plain == 0).any(-1)
    assert bool(underflowed.any())  # the setting the test is about
    if precision is None:
        assert (d.truncation_of(plain) == 3).all()
    with pytest.raises(ValueError, match="does not determine its pre-image"):
        d.log_prob(plain)
    lax = pr.IGRStickBreaking(
        torch.zeros(3), torch.ones(3), 0.001, precision=precision, validate_args=False
    )
    log_prob = lax.log_prob(plain)
    assert bool(torch.isnan(log_prob[underflowed]).all())
    assert bool(torch.isfinite(log_prob[~underflowed]).all())


def test_stick_breaking_scores_values_outside_its_image_as_impossible():
    # Softmax++ of sticks reaches only the z whose implied sticks are positive and sum to less
    # than one; a value made by a map of another temperature or delta may lie outside. Those
    # were scored finitely (about -5e5, through the inverse's clamps): a finite ELBO where the
    # true KL is infinite. Now -inf, and an error naming the cause under validation.
    dt = torch.float64

    def model(validate):
        zeros, ones = torch.zeros(3, dtype=dt), torch.ones(3, dtype=dt)
        return pr.IGRStickBreaking(zeros, ones, 0.5, validate_args=validate)

    softmax = pr.SoftmaxPlusPlusTransform(0.5)
    sum_above_one = softmax(torch.tensor([0.9, 0.9, 0.9], dtype=dt)).clone()
    negative_stick = torch.tensor([0.1, 0.3, 0.3, 0.3], dtype=dt)
    guide = pr.IGRStickBreaking(torch.zeros(3, dtype=dt), torch.ones(3, dtype=dt), 0.2, delta=0.3)
    torch.manual_seed(0)
    foreign = guide.rsample((200,))  # carries its exact log z
    for value in (sum_above_one, negative_stick, foreign):
        assert bool((model(False).log_prob(value) == -math.inf).all())
        with pytest.raises(ValueError, match="outside the image of its map"):
            model(True).log_prob(value)


@pytest.mark.parametrize("delta", [1e-3, 1.0, 30.0])
@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_stick_breaking_own_samples_and_their_copies_lie_in_its_image(temperature, delta):
    # The image check allows the rounding of the sticks' computation, and a copy whose
    # coordinates underflowed (read through the documented fallback) is not judged by it.
    # A copy is scored, or refused as not determining its pre-image (deep sticks lost to
    # rounding): never placed outside the image.
    torch.manual_seed(0)
    loc, scale = 2 * torch.randn(30), 2 * torch.ones(30)
    d = pr.IGRStickBreaking(loc, scale, temperature, delta=delta, validate_args=True)
    value = d.rsample((2000,))
    assert bool(torch.isfinite(d.log_prob(value)).all())
    try:
        assert bool(torch.isfinite(d.log_prob(value.clone())).all())
    except ValueError as error:
        assert "does not determine its pre-image" in str(error)
    lax = pr.IGRStickBreaking(loc, scale, temperature, delta=delta, validate_args=False)
    assert not bool(torch.isinf(lax.log_prob(value.clone())).any())


def test_a_learned_guide_temperature_equal_to_the_models_keeps_its_gradient():
    # Equal values, different tensors, one learned: the shortcuts taken on equal maps (the
    # carried pre-image, the closed-form KL) dropped the derivative by the guide's temperature
    # (IGR-SB: 1.6 where the derivative is 330). Now the model inverts the guide's sample, and
    # the derivative at equal temperatures is the limit of that at nearby ones.
    dt = torch.float64

    def derivative(model_temperature):
        torch.manual_seed(0)
        tau = torch.tensor(0.5, dtype=dt, requires_grad=True)
        loc, scale = torch.linspace(-1, 1, 4, dtype=dt), torch.full((4,), 0.5, dtype=dt)
        guide = pr.IGRStickBreaking(loc, scale, tau)
        model = pr.IGRStickBreaking(
            torch.zeros(4, dtype=dt), torch.ones(4, dtype=dt), model_temperature
        )
        with pyro.validation_enabled(False):
            log_ratio = model.log_prob(guide.rsample((400,))).sum()
        return torch.autograd.grad(log_ratio, tau)[0]

    at_equal = derivative(torch.tensor(0.5, dtype=dt))
    nearby = derivative(torch.tensor(0.5 + 1e-9, dtype=dt))
    torch.testing.assert_close(at_equal, nearby, rtol=1e-5, atol=1e-6)
    tau = torch.tensor(0.5, requires_grad=True)
    guide = pr.IGRStickBreaking(torch.zeros(3), torch.ones(3), tau)
    with pytest.raises(NotImplementedError):  # TraceMeanField_ELBO falls back to Monte Carlo
        kl_divergence(guide, pr.IGRStickBreaking(torch.zeros(3), torch.ones(3), torch.tensor(0.5)))
    planar = pr.IGRPlanar(torch.zeros(3), torch.ones(3), tau, flows=1)
    model = pr.IGRPlanar(torch.zeros(3), torch.ones(3), 0.5, flows=planar.flows)
    with pytest.raises(ValueError, match="the same tensors where one requires a gradient"):
        model.log_prob(planar.rsample())


def test_kl_between_different_numbers_of_categories_is_refused():
    for family in (pr.IGR, pr.IGRStickBreaking):
        small, large = (
            family(torch.zeros(1), torch.ones(1), 0.5),
            family(torch.zeros(4), torch.ones(4), 0.5),
        )
        for p, q in ((small, large), (large, small)):
            with pytest.raises(ValueError, match="same number of categories"):
                kl_divergence(p, q)


def test_a_value_on_the_boundary_has_density_zero_not_nan():
    # A stick-breaking sample with dropped sticks (log z = -inf there), scored by IGR-I, gave
    # NaN (-inf - -inf); its density under IGR-I is 0.
    torch.manual_seed(0)
    cut = pr.IGRStickBreaking(torch.zeros(5), torch.ones(5), 0.5, precision=0.5).rsample((4,))
    assert bool((cut == 0).any(-1).all())  # every draw dropped a stick
    igr = pr.IGR(torch.zeros(5), torch.ones(5), 0.5)
    assert bool((igr.log_prob(cut) == -math.inf).all())
    edge = pr.SoftmaxPlusPlusTransform(0.5)(torch.tensor([0.3, -math.inf, 0.1, 0.2, 0.0]))
    assert igr.log_prob(edge) == -math.inf


def test_planar_log_prob_of_a_drawn_sample_differentiates_the_flows():
    # `sample` runs without gradients and Pyro's planar layer caches its last output: log_prob
    # of that sample then had no derivative by the layer's parameters.
    torch.manual_seed(0)
    d = pr.IGRPlanar(torch.zeros(3), torch.ones(3), 0.5, flows=1)
    parameters = [p for p in d.flows[0].parameters()]
    value = d.sample()
    gradients = torch.autograd.grad(d.log_prob(value), parameters)
    record = pr.relaxation_of(value)
    fresh = dataclasses.replace(record, preimage=record.preimage.clone())  # not in the cache
    expected = torch.autograd.grad(d.log_prob(pr.with_relaxation(value.clone(), fresh)), parameters)
    for actual, reference in zip(gradients, expected, strict=True):
        torch.testing.assert_close(actual, reference)
        assert bool((reference != 0).any())


def test_planar_can_be_copied_after_scoring_and_names_a_flow_of_another_size():
    # A planar layer kept its last output, in the autograd graph, in its cache: copy.deepcopy
    # of the distribution (or of its flows) then raised "Only Tensors created explicitly by
    # the user support the deepcopy protocol". A layer of another size failed at rsample with
    # torch's "mat1 and mat2 shapes cannot be multiplied".
    loc = torch.zeros(3, requires_grad=True)
    d = pr.IGRPlanar(loc, torch.ones(3), 0.5, flows=1)
    d.log_prob(d.rsample((2,)))
    copied = copy.deepcopy(d)
    torch.manual_seed(1)
    value = copied.rsample((2,))
    torch.manual_seed(1)
    original = d.rsample((2,))
    torch.testing.assert_close(value, original)
    torch.testing.assert_close(copied.log_prob(value), d.log_prob(original))
    with pytest.raises(ValueError, match=r"`flows\[1\]` maps 5 coordinates.*K - 1 = 3"):
        pr.IGRPlanar(torch.zeros(3), torch.ones(3), 0.5, flows=[Planar(3), Planar(5)])


def test_planar_sums_an_elementwise_flows_log_jacobian_over_the_coordinates():
    # A flow acting coordinate by coordinate (a spline) gave log_prob an extra dimension of
    # K - 1 (torch's broadcasting error for other sample shapes).
    torch.manual_seed(0)
    spline = Spline(3)
    d = pr.IGRPlanar(torch.zeros(3), torch.ones(3), 0.5, flows=[spline])
    value = d.rsample((2,))
    reference = dist.TransformedDistribution(
        dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1),
        [spline, pr.SoftmaxPlusPlusTransform(0.5)],
    )
    torch.testing.assert_close(d.log_prob(value), reference.log_prob(value.detach().clone()))


def test_kl_of_batch_shapes_that_do_not_broadcast_is_refused_by_name():
    for family in (pr.IGR, pr.IGRStickBreaking):
        p = family(torch.zeros(2, 3), torch.ones(3), 0.5)
        q = family(torch.zeros(5, 3), torch.ones(3), 0.5)
        with pytest.raises(ValueError, match=r"batch shapes \(2,\) and \(5,\) do not broadcast"):
            kl_divergence(p, q)


def test_softmax_plus_plus_inverse_needs_two_coordinates():
    # One coordinate was inverted silently to an empty tensor.
    with pytest.raises(ValueError, match="at least 2 coordinates"):
        pr.SoftmaxPlusPlusTransform(1.0).inv(torch.ones(1))


def test_softmax_plus_plus_computes_in_the_dtype_of_its_input():
    t = pr.SoftmaxPlusPlusTransform(torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0))
    x = torch.randn(4, 3)
    z = t(x)
    assert z.dtype == t.inv(z).dtype == t.log_abs_det_jacobian(x, z).dtype == torch.float32


def test_loc_without_coordinates_is_refused():
    with pytest.raises(ValueError, match="K - 1 >= 1 coordinates"):
        pr.IGR(torch.zeros(0), torch.ones(0), 0.5)


@pytest.mark.parametrize("precision", [None, 0.9], ids=["finite", "infinite"])
@pytest.mark.parametrize("num_sticks", [2, 4, 9, 19])
def test_stick_breaking_scores_an_inverted_value_accurately_or_not_at_all(num_sticks, precision):
    # A copy of a float32 sample is inverted from its coordinates, which do not resolve the
    # deep sticks: the density was off by thousands of nats (K = 20, temperature 0.5: median
    # error 7,000 nats). Now a row is scored only where the rounding of its sticks, carried to
    # its density, is estimated below 0.1 nats, and then within 0.1 nats of the sample's own
    # density (narrow scales amplify the pre-image's error: 0.8 nats at scale 0.01 under a rule
    # on the sticks alone); the other rows score NaN, or raise under validation.
    torch.manual_seed(num_sticks)
    scored = refused = 0
    for temperature, delta, width in itertools.product(
        (0.1, 0.5, 2.0), (0.3, 1.0, 30.0), (0.002, 0.01, 2.0)
    ):
        loc, scale = 2 * torch.randn(num_sticks), width * (0.5 + torch.rand(num_sticks))
        d = pr.IGRStickBreaking(
            loc, scale, temperature, delta=delta, precision=precision, validate_args=False
        )
        value = d.rsample((500,))
        own, copy_ = d.log_prob(value), d.log_prob(value.clone())
        ok = ~torch.isnan(copy_)
        assert torch.isfinite(own).all() and not torch.isinf(copy_).any()
        assert max((own - copy_)[ok].abs().tolist(), default=0.0) < 0.1
        scored, refused = scored + int(ok.sum()), refused + int((~ok).sum())
        if bool(ok.all()):
            continue
        strict = pr.IGRStickBreaking(
            loc, scale, temperature, delta=delta, precision=precision, validate_args=True
        )
        with pytest.raises(ValueError, match="does not determine its pre-image"):
            strict.log_prob(value.clone())
    # Few sticks, or few kept ones, are mostly resolved (narrow scales refuse more); K = 20
    # with all sticks kept is not.
    if num_sticks == 19 and precision is None:
        assert refused == scored + refused
    elif num_sticks < 9 or precision is not None:
        assert scored > 0.6 * (scored + refused)
    else:
        assert 0 < scored < refused


@pytest.mark.parametrize(
    ("other_temperature", "other_delta"), [(0.7, 1.0), (0.5, 1.0), (1.0, 0.97)]
)
def test_stick_breaking_scores_another_maps_draw_from_its_preimage(other_temperature, other_delta):
    # A guide's sample scored by a model of another temperature or delta (or of equal values in
    # other tensors) was inverted from its float32 coordinates: noise for the deep sticks. The
    # model now maps the guide's pre-image to its own through the sticks' affine relation,
    # as accurate as float64 arithmetic on the same pre-image.
    torch.manual_seed(0)
    num_sticks, temperature, delta = 19, torch.tensor(0.5), torch.tensor(1.0)
    loc, scale = torch.randn(num_sticks), 0.5 + torch.rand(num_sticks)
    guide = pr.IGRStickBreaking(loc, scale, torch.tensor(other_temperature), delta=other_delta)
    value = guide.rsample((300,))
    model = _standard_sticks(num_sticks, temperature, delta=delta)
    log_prob = model.log_prob(value)
    # The reference: float64 through the sticks from the same pre-image, inverted by hand.
    y = pr.relaxation_of(value).preimage.double()
    sticks = _sticks(y)
    logits = (sticks / other_temperature - math.log(other_delta)) + delta.double().log()
    model_sticks = temperature.double() * logits
    remainders = 1 - model_sticks.cumsum(-1)
    inside = (model_sticks > 0).all(-1) & (remainders > 0).all(-1)
    model64 = _standard_sticks(num_sticks, temperature, _f64, delta=delta.double())
    preimage = model_sticks.log() - remainders.log()
    expected = model64._log_density(preimage)
    assert bool(torch.isneginf(log_prob[~inside]).all())
    assert bool(inside.any())
    torch.testing.assert_close(log_prob[inside].double(), expected[inside], rtol=1e-4, atol=0.02)


@pytest.mark.parametrize(
    ("num_sticks", "other_temperature", "other_delta", "shift"),
    [(6, 0.4, 1.0, -1.0), (2, 0.5, 1.2, 0.0)],
    ids=["colder-guide", "guide-with-larger-delta"],
)
def test_stick_breaking_scores_another_maps_draw_where_the_affine_offsets_are_negative(
    num_sticks, other_temperature, other_delta, shift
):
    # The test above has b >= 0 and remainders' offsets 1 - a - k b >= 0 only. A guide colder
    # than the model (a = tau / tau' = 1.25: offset 1 - a < 0), the usual case with
    # AutoRelaxed(temperature=...), or one with a larger delta (b < 0) takes the other branches
    # of log(a e^x + b): the validity test log|b| < log(a e^x) and log1mexp. Reading every such
    # row as outside the image, or adding log1mexp where it is subtracted, scored the model's
    # own image -inf or 84 nats off. The reference inverts the pre-image by hand in float64;
    # the tolerance is float32's rounding of the guide's draw.
    torch.manual_seed(0)
    temperature, delta = 0.5, 1.0
    guide = pr.IGRStickBreaking(
        torch.randn(num_sticks) + shift,
        0.5 + torch.rand(num_sticks),
        torch.tensor(other_temperature),
        delta=other_delta,
    )
    value = guide.rsample((2000,))
    model = _standard_sticks(num_sticks, temperature, delta=delta)
    log_prob = model.log_prob(value)
    y = pr.relaxation_of(value).preimage.double()
    guide_sticks = _sticks(y)
    sticks = (temperature / other_temperature) * guide_sticks + temperature * (
        math.log(delta) - math.log(other_delta)
    )
    remainders = 1 - sticks.cumsum(-1)
    inside = (sticks > 0).all(-1) & (remainders > 0).all(-1)
    model64 = _standard_sticks(num_sticks, temperature, _f64, delta=delta)
    preimage = sticks.clamp(min=1e-300).log() - remainders.clamp(min=1e-300).log()
    expected = model64._log_density(preimage)
    assert 50 < int(inside.sum()) < 1950  # rows in the model's image and rows outside it
    assert bool(torch.isneginf(log_prob[~inside]).all())
    torch.testing.assert_close(log_prob[inside].double(), expected[inside], rtol=1e-4, atol=0.02)


def test_stick_breaking_scores_the_deep_sticks_of_a_warmer_guide_finitely():
    # Equal deltas (b = 0) and other temperatures: log(a e^x + b) is x + log a, computed as
    # term + log1p(b e^-term). A stick below e^-88 overflows e^-term in float32, and 0 * inf
    # made every such draw's density NaN unless the exponent is capped. Loc 6 and 19 sticks
    # put the deepest log-stick near -109. The reference: the model's sticks a w' and
    # remainders (1 - a) + a r' by hand in float64 from the same pre-image (1 - a = 0.29, no
    # cancellation); tolerance as above.
    torch.manual_seed(0)
    num_sticks, a = 19, 0.5 / 0.7
    guide = pr.IGRStickBreaking(
        torch.full((num_sticks,), 6.0), torch.full((num_sticks,), 0.3), torch.tensor(0.7)
    )
    value = guide.rsample((4,))
    model = _standard_sticks(num_sticks, 0.5)
    log_prob = model.log_prob(value)
    y = pr.relaxation_of(value).preimage.double()
    log_rest = torch.nn.functional.logsigmoid(-y)
    log_after = log_rest.cumsum(-1)
    log_guide_sticks = torch.nn.functional.logsigmoid(y) + log_after - log_rest
    assert float(log_guide_sticks.min()) < -100  # the setting the test is about
    log_sticks = math.log(a) + log_guide_sticks
    log_remainders = torch.log((1 - a) + a * log_after.exp())
    model64 = _standard_sticks(num_sticks, 0.5, _f64)
    expected = model64._log_density(log_sticks - log_remainders)
    assert bool(torch.isfinite(log_prob).all())
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-4, atol=0.02)


def test_a_dropped_stick_outside_the_affine_image_does_not_void_the_row():
    # With a precision, the sticks after the cut are dropped: their affine images (here
    # negative, as the model's delta is below the guide's, b < 0) do not matter. Reading them
    # voided every row whose later sticks fell below |b|. The rule by hand: a row is possible
    # where the model's kept sticks w = w' + tau (log 0.8 - log 1) are positive, the
    # remainders after them positive, and the model cuts those sticks where the guide did.
    torch.manual_seed(0)
    num_sticks = 8
    guide = pr.IGRStickBreaking(
        torch.tensor([3.0] + [0.0] * (num_sticks - 1)),
        torch.full((num_sticks,), 0.3),
        0.5,
        delta=1.0,
        precision=0.8,
    )
    value = guide.rsample((2000,))
    model = _standard_sticks(num_sticks, 0.5, delta=0.8, precision=0.8)
    log_prob = model.log_prob(value)
    record = pr.relaxation_of(value)
    y = record.preimage.double()
    kept = torch.arange(num_sticks) < record.kept_sticks.unsqueeze(-1)
    guide_sticks = _sticks(y)
    sticks = torch.where(kept, guide_sticks + 0.5 * math.log(0.8), 0.0)
    cumulative = sticks.cumsum(-1)
    in_image = ((sticks > 0) | ~kept).all(-1) & (1 - cumulative > 0).all(-1)
    model_cut = ((cumulative < 0.8) & kept).sum(-1).clamp(max=num_sticks - 1) + 1
    possible = in_image & (model_cut == kept.sum(-1))
    assert 0 < int(possible.sum()) < 2000  # both kinds of rows
    assert torch.equal(torch.isfinite(log_prob), possible)


def test_stick_breaking_gradient_through_another_maps_draw():
    # The affine path from a guide's pre-image to the model's is differentiable in both maps'
    # parameters, also where they are equal (b = 0 there, and the logarithm of b + a e^x is
    # smooth through it).
    dt = torch.float64
    loc = torch.randn(4, dtype=dt, requires_grad=True)

    def score(loc, guide_temperature, model_delta):
        torch.manual_seed(0)
        guide = pr.IGRStickBreaking(loc, torch.full((4,), 0.5, dtype=dt), guide_temperature)
        model = pr.IGRStickBreaking(
            torch.zeros(4, dtype=dt), torch.ones(4, dtype=dt), 0.5, delta=model_delta
        )
        return model.log_prob(guide.rsample((5,)))

    for guide_temperature, model_delta in ((0.5, 1.0), (0.7, 1.05)):
        tau = torch.tensor(guide_temperature, dtype=dt, requires_grad=True)
        delta = torch.tensor(model_delta, dtype=dt, requires_grad=True)
        assert torch.autograd.gradcheck(score, (loc, tau, delta))


@pytest.mark.parametrize(
    "example", [e for e in IGR_EXAMPLES if e.id != "IGRCount"], ids=lambda e: e.id
)
def test_a_vertex_typed_by_hand_is_scored_or_refused_by_name(example):
    # An integer or boolean one-hot vector raised TypeError (torch.finfo of an integer dtype)
    # in every soft IGR, and a float vertex was scored finitely (IGR: -782 in float32 where the
    # density is 0): the coordinates at 0 are the boundary, or a copy's underflowed ones. Now
    # the soft classes refuse it by name under validation and score NaN without; the straight-
    # through IGR scores it by the discrete PMF, whatever its dtype.
    d = example.build()
    num_categories = d.event_shape[-1]
    vertex = torch.nn.functional.one_hot(torch.tensor(1), num_categories)
    vertex = vertex.expand(d.batch_shape + (num_categories,))
    lax = example.build(validate_args=False)
    for typed in (vertex, vertex.bool(), vertex.to(example.dtype)):
        if getattr(d, "hard", False):
            expected = d.categorical().logits[..., 1]
            torch.testing.assert_close(d.log_prob(typed), expected)
            continue
        with pytest.raises(ValueError):
            d.log_prob(typed)
        if isinstance(d, pr.IGRPlanar):  # no inverse: a value it did not draw is refused
            continue
        assert bool(torch.isnan(lax.log_prob(typed)).all())


def test_a_saved_planar_sample_is_scored_under_no_grad():
    # torch.save keeps a sample's record, but an IGRPlanar compares its learned flows by
    # identity where gradients flow (their values would score the sample with a wrong
    # derivative by the flows): a loaded sample is scored under no_grad, and the error says so.
    import io

    torch.manual_seed(0)
    d = pr.IGRPlanar(torch.zeros(3), torch.ones(3), 0.1, flows=2)
    z = d.rsample((4,))
    buffer = io.BytesIO()
    torch.save(z, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    with torch.no_grad():
        torch.testing.assert_close(d.log_prob(loaded), d.log_prob(z))
    with pytest.raises(ValueError, match="under torch.no_grad"):
        d.log_prob(loaded)


def test_kl_without_a_closed_form_names_the_pair():
    # torch's KL of transformed distributions raised NotImplementedError("") for IGR-Planar
    # pairs and mixed families, and IGRCount's category check named its inner IGRStickBreaking.
    # IGR-Planar pairs with the very same flows keep their closed form.
    zeros, ones = torch.zeros(3), torch.ones(3)
    planar = pr.IGRPlanar(zeros, ones, 0.5, flows=2)
    pairs = [
        (pr.IGRPlanar(zeros, ones, 0.5), pr.IGRPlanar(zeros, ones, 0.5), "is in closed form only"),
        (pr.IGR(zeros, ones, 0.5), pr.IGRStickBreaking(zeros, ones, 0.5), "has no closed form"),
        (pr.IGRStickBreaking(zeros, ones, 0.5), planar, "has no closed form"),
    ]
    for p, q, message in pairs:
        pair = f"KL\\({type(p).__name__} \\|\\| {type(q).__name__}\\) {message}"
        with pytest.raises(NotImplementedError, match=pair):
            kl_divergence(p, q)
    same_flows = pr.IGRPlanar(torch.ones(3), ones, 0.5, flows=planar.flows)
    expected = kl_divergence(planar.base_dist, same_flows.base_dist)
    torch.testing.assert_close(kl_divergence(planar, same_flows), expected)
    small, large = pr.IGRCount(zeros, ones, 0.5), pr.IGRCount(torch.zeros(4), torch.ones(4), 0.5)
    with pytest.raises(ValueError, match=r"KL\(IGRCount \|\| IGRCount\) needs the same number"):
        kl_divergence(small, large)


@pytest.mark.parametrize("family", [pr.IGRStickBreaking, pr.IGRCount])
def test_an_autoguide_of_the_whole_support_is_told_what_the_site_needs(family):
    # AutoNormal proposes points of the whole simplex (or plain counts), outside the image of
    # an IGR-SB map: the errors blamed another temperature or delta, or said nothing of guides.
    from pyro.infer.autoguide import AutoNormal

    def model():
        pyro.sample("z", family(torch.zeros(2), torch.ones(2), 0.5))

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="AutoRelaxed"):
        for _ in range(20):  # AutoNormal's point may fall inside the image
            Trace_ELBO().loss(model, AutoNormal(model))
            pyro.clear_param_store()


def test_a_numpy_temperature_identifies_its_map():
    # A numpy-array temperature was kept as passed to identify the map: scoring a sample of
    # another map compared two arrays with == ("truth value ... ambiguous").
    torch.manual_seed(0)
    temperatures = np.array([0.5, 1.0, 2.0])
    loc, scale = torch.zeros(3, 4), torch.ones(3, 4)
    for family in (pr.IGRStickBreaking, pr.IGRPlanar, pr.IGR):
        kwargs = {"flows": 0} if family is pr.IGRPlanar else {}
        d = family(loc, scale, temperatures, **kwargs)
        z = d.rsample((2,))
        torch.testing.assert_close(
            family(loc, scale, temperatures, **kwargs).log_prob(z), d.log_prob(z)
        )
        if family is not pr.IGRPlanar:
            other = family(loc, scale, 0.3, validate_args=False).log_prob(z)
            assert other.shape == (2, 3) and not bool(torch.isnan(other).any())


def test_stick_breaking_samples_reach_their_discrete_variable_only_at_low_temperatures():
    # The documented caveat of IGR-SB: its scores w / tau differ by less than 1 / tau, so at
    # tau = 0.3 (K = 20) its samples spread their mass where IGR-I's are near their vertices.
    # L1 distance between the mean of 20,000 samples and the discrete distribution's mean,
    # seed 0: 1.25 for IGR-SB, 0.02 for IGR-I at tau = 0.3; 0.006 for IGR-SB at tau = 0.03.
    torch.manual_seed(0)

    def distance(cls, tau):
        d = cls(torch.zeros(19), torch.ones(19), tau)
        return float((d.sample((20000,)).mean(0) - d.discrete().mean).abs().sum())

    assert distance(pr.IGRStickBreaking, 0.3) > 0.8
    assert distance(pr.IGR, 0.3) < 0.1
    assert distance(pr.IGRStickBreaking, 0.03) < 0.1

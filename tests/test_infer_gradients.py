"""gradient_moments: exact moments on toys with closed forms, every ELBO, and bookkeeping."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro.infer import (
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)
from statistical import LEVEL
from torch import nn
from torch.distributions import constraints

import pyro_relax
from pyro_relax.infer.gradients import GradientMoments, gradient_moments

# Each statistical check rejects a correct implementation with probability LEVEL (the suite's,
# statistical.py); the draws are seeded, so a pass is deterministic.
ELEMENTS = 2000  # independent copies of each toy, one per plate element


pytestmark = pytest.mark.usefixtures("fresh_pyro")


def _two_sided(distribution, statistic):
    return 2 * min(distribution.cdf(statistic), distribution.sf(statistic))


def _assert_means(moments, mean, variance):
    """The estimated means against the exact ones: the z-scores of the K elements have no
    bias (their sum is about N(0, K), by the central limit theorem over elements) and unit
    spread (their sum of squares is about chi-square with K degrees of freedom)."""
    z = ((moments.mean - mean) / (variance / moments.num_draws).sqrt()).double()
    count = z.numel()
    assert _two_sided(scipy.stats.norm(), float(z.sum()) / math.sqrt(count)) > LEVEL
    assert _two_sided(scipy.stats.chi2(count), float((z**2).sum())) > LEVEL


def _assert_gaussian_variances(moments, variance):
    """For Gaussian draws, (N - 1) s^2 / sigma^2 is exactly chi-square with N - 1 degrees of
    freedom, and the sum over the K independent elements chi-square with K (N - 1)."""
    dof = moments.num_draws - 1
    statistic = float((dof * moments.variance / variance).double().sum())
    assert _two_sided(scipy.stats.chi2(dof * variance.numel()), statistic) > LEVEL


def _assert_variances(moments, variance, fourth_moment):
    """For any draws, s^2 is unbiased with Var(s^2) = mu_4 / N - sigma^4 (N - 3) / (N (N - 1));
    the standardized errors of the K elements sum to about N(0, K)."""
    n = moments.num_draws
    spread = (fourth_moment / n - variance**2 * (n - 3) / (n * (n - 1))).sqrt()
    u = ((moments.variance - variance) / spread).double()
    assert _two_sided(scipy.stats.norm(), float(u.sum()) / math.sqrt(u.numel())) > LEVEL


# A conjugate Gaussian toy, in a plate of independent copies: z ~ N(0, 1), x ~ N(z, 1) observed
# at x0, guide z ~ N(mu, sigma) with sigma = exp(u) (u is the unconstrained parameter).
def _gaussian_model(x0):
    with pyro.plate("copies", len(x0)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x0)


def _gaussian_guide(x0):
    mu = pyro.param("mu", torch.linspace(-1.0, 1.0, len(x0)))
    sigma = pyro.param("sigma", torch.linspace(0.5, 2.0, len(x0)), constraint=constraints.positive)
    with pyro.plate("copies", len(x0)):
        pyro.sample("z", dist.Normal(mu, sigma))


def test_reparameterized_gradient_matches_its_closed_form():
    # With z = mu + sigma eps, eps ~ N(0, 1), Trace_ELBO differentiates the loss
    #   L = (x0 - z)^2 / 2 + z^2 / 2 + log q(z) + const,  log q(z) = -log sigma - eps^2 / 2 + c
    # (log q at its own reparameterized sample depends on the parameters only through sigma).
    #   dL/dmu = 2 z - x0 = (2 mu - x0) + 2 sigma eps:  Gaussian, mean 2 mu - x0, var 4 sigma^2.
    #   dL/du = sigma dL/dsigma = sigma ((2 z - x0) eps - 1 / sigma) = a eps + b eps^2 - 1,
    #   a = sigma (2 mu - x0), b = 2 sigma^2:  mean b - 1, variance a^2 + 2 b^2 (E eps^3 = 0,
    #   Var eps^2 = 2), fourth central moment of a eps + b (eps^2 - 1), odd powers vanishing:
    #   3 a^4 + 6 a^2 b^2 E[eps^2 (eps^2 - 1)^2] + b^4 E[(eps^2 - 1)^4]
    #   = 3 a^4 + 60 a^2 b^2 + 60 b^4.
    x0 = torch.linspace(-2.0, 2.0, ELEMENTS)
    mu, sigma = torch.linspace(-1.0, 1.0, ELEMENTS), torch.linspace(0.5, 2.0, ELEMENTS)
    moments = gradient_moments(_gaussian_model, _gaussian_guide, Trace_ELBO(), x0, num_draws=20)

    _assert_means(moments["mu"], 2 * mu - x0, 4 * sigma**2)
    _assert_gaussian_variances(moments["mu"], 4 * sigma**2)
    a, b = sigma * (2 * mu - x0), 2 * sigma**2
    variance = a**2 + 2 * b**2
    _assert_means(moments["sigma"], b - 1, variance)
    _assert_variances(moments["sigma"], variance, 3 * a**4 + 60 * a**2 * b**2 + 60 * b**4)


# A score-function toy: z ~ Bernoulli(0.3), x ~ N(z, 1) observed at x0, guide z ~ Bernoulli
# with logits theta, in a plate of independent copies.
def _bernoulli_model(x0):
    with pyro.plate("copies", len(x0)):
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x0)


def _bernoulli_guide(x0):
    theta = pyro.param("theta", torch.linspace(-1.5, 1.5, len(x0)))
    with pyro.plate("copies", len(x0)):
        pyro.sample("z", dist.Bernoulli(logits=theta))


def _negative_elbo(theta, x0, z):
    log_q = dist.Bernoulli(logits=theta).log_prob(z)
    log_joint = dist.Bernoulli(0.3).log_prob(z) + dist.Normal(z, 1.0).log_prob(x0)
    return log_q, log_q - log_joint


def test_score_function_gradient_matches_its_exact_moments():
    # Trace_ELBO's surrogate loss for a non-reparameterized site is, per element (the entropy
    # term of a score-function site is 0 in Pyro, as E[d log q / d theta] = 0):
    #   -[log p(x0, z) + log q(z) * r(z)],  r(z) = log p(x0, z) - log q(z) detached,
    # whose gradient in theta is g(z) = -(z - p) r(z) with p = sigmoid(theta). It takes two
    # values, g(1) with probability p and g(0) with 1 - p: with d = g(1) - g(0), the mean is
    # p g(1) + (1 - p) g(0), the variance d^2 p (1 - p) and the fourth central moment
    # d^4 p (1 - p) (1 - 3 p (1 - p)).
    x0 = torch.linspace(-1.0, 2.0, ELEMENTS)
    theta = torch.linspace(-1.5, 1.5, ELEMENTS).requires_grad_()
    p = torch.sigmoid(theta.detach())
    g = {}
    for value in (0.0, 1.0):
        _, loss = _negative_elbo(theta.detach(), x0, torch.full_like(x0, value))
        g[value] = (value - p) * loss
    mean = p * g[1.0] + (1 - p) * g[0.0]
    d = g[1.0] - g[0.0]
    variance = d**2 * p * (1 - p)

    # The exact mean is the gradient of the exact -ELBO, a sum over z.
    exact = sum(
        (log_q.exp() * loss).sum()
        for log_q, loss in (_negative_elbo(theta, x0, torch.full_like(x0, v)) for v in (0.0, 1.0))
    )
    (gradient,) = torch.autograd.grad(exact, theta)
    torch.testing.assert_close(gradient, mean, rtol=1e-5, atol=1e-5)

    moments = gradient_moments(_bernoulli_model, _bernoulli_guide, Trace_ELBO(), x0, num_draws=30)[
        "theta"
    ]
    _assert_means(moments, mean, variance)
    _assert_variances(moments, variance, d**4 * p * (1 - p) * (1 - 3 * p * (1 - p)))


def test_enumerated_gradient_is_exact():
    # A mixture with its assignment enumerated in the model and no latent in the guide: the
    # loss is -log p(x) exactly, so every draw gives its gradient (no variance, infinite SNR).
    x = torch.tensor([-1.0, 0.5, 2.0])

    @config_enumerate
    def model():
        logits = pyro.param("logits", torch.tensor([0.2, -0.3]))
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(logits=logits))
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    moments = gradient_moments(model, lambda: None, elbo, num_draws=5)

    logits = pyro.param("logits").detach().requires_grad_()
    locs = pyro.param("locs").detach().requires_grad_()
    components = dist.Normal(locs, 1.0).log_prob(x.unsqueeze(-1)) + logits.log_softmax(-1)
    exact = torch.autograd.grad(-components.logsumexp(-1).sum(), (logits, locs))
    for name, gradient in zip(("logits", "locs"), exact, strict=True):
        torch.testing.assert_close(moments[name].mean, gradient)
        # Identical draws: Welford's update keeps the variance exactly 0.
        assert bool((moments[name].variance == 0).all())
        assert bool(torch.isinf(moments[name].snr).all())


def _normal_model(net):
    # The model gets the guide's arguments too; it has no parameters of its own.
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=torch.tensor(1.0))


def _normal_guide(net):
    pyro.module("net", net)
    scale = pyro.param("scale", torch.ones(3), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(net(torch.ones(2)), scale).to_event(1))


def _moments_by_hand(model, guide, elbo, *args, num_draws, seed):
    """The draws as SVI takes them, from ``seed``: after each ``loss_and_grads`` the gradient of
    every param-store tensor (unconstrained), and their numpy mean and variance (ddof 1)."""
    pyro.set_rng_seed(seed)
    draws = {}
    for _ in range(num_draws):
        for _, unconstrained in pyro.get_param_store().named_parameters():
            unconstrained.grad = None
        elbo.loss_and_grads(model, guide, *args)
        for name, unconstrained in pyro.get_param_store().named_parameters():
            grad = unconstrained.grad
            draws.setdefault(name, []).append(
                np.zeros(grad.shape) if grad is None else grad.numpy()
            )
    return {name: (np.mean(d, 0), np.var(d, 0, ddof=1)) for name, d in draws.items()}


@pytest.mark.parametrize(
    "elbo",
    [
        Trace_ELBO(),
        TraceGraph_ELBO(),
        TraceEnum_ELBO(strict_enumeration_warning=False),
        TraceMeanField_ELBO(),
        RenyiELBO(),
    ],
    ids=lambda elbo: type(elbo).__name__,
)
def test_every_elbo(elbo):
    net = nn.Linear(2, 3)
    # One call first: an ELBO's first call may trace the model once more (to guess
    # max_plate_nesting), which would shift the random draws of the one against the other.
    elbo.loss(_normal_model, _normal_guide, net)
    pyro.set_rng_seed(6)
    moments = gradient_moments(_normal_model, _normal_guide, elbo, net, num_draws=5)
    expected = {f"net$$${name}": p.shape for name, p in net.named_parameters()}
    assert {name: m.mean.shape for name, m in moments.items()} == {**expected, "scale": (3,)}
    by_hand = _moments_by_hand(_normal_model, _normal_guide, elbo, net, num_draws=5, seed=6)
    for name, m in moments.items():
        assert m.num_draws == 5
        mean, variance = (torch.as_tensor(v, dtype=m.mean.dtype) for v in by_hand[name])
        torch.testing.assert_close(m.mean, mean)
        torch.testing.assert_close(m.variance, variance)
        assert bool((m.variance > 0).all())


def test_relaxed_site():
    def model():
        z = pyro.sample("z", pyro_relax.GenGSPoisson(torch.tensor(2.0), 0.5, 12))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(3.0))

    def guide():
        rate = pyro.param("rate", torch.tensor([1.5]), constraint=constraints.positive)
        pyro.sample("z", pyro_relax.GenGSPoisson(rate[0], 0.5, 12))

    pyro.set_rng_seed(4)
    moments = gradient_moments(model, guide, Trace_ELBO(), num_draws=20)["rate"]
    assert moments.mean.shape == moments.variance.shape == (1,)
    mean, variance = _moments_by_hand(model, guide, Trace_ELBO(), num_draws=20, seed=4)["rate"]
    torch.testing.assert_close(moments.mean, torch.as_tensor(mean, dtype=torch.float32))
    torch.testing.assert_close(moments.variance, torch.as_tensor(variance, dtype=torch.float32))
    assert (variance > 0).all()


def test_decaying_average_baseline_is_left_out():
    def guide(x0):
        theta = pyro.param("theta", torch.linspace(-1.5, 1.5, len(x0)))
        with pyro.plate("copies", len(x0)):
            baseline = {"use_decaying_avg_baseline": True}
            pyro.sample("z", dist.Bernoulli(logits=theta), infer={"baseline": baseline})

    x0 = torch.zeros(4)
    moments = gradient_moments(_bernoulli_model, guide, TraceGraph_ELBO(), x0, num_draws=5)
    assert list(moments) == ["theta"]
    assert "__baseline_avg_downstream_cost_z" in pyro.get_param_store()


def test_parameters_and_gradients_are_left_as_they_were():
    net = nn.Linear(2, 3)
    before = pyro.param("scale", torch.ones(3), constraint=constraints.positive).unconstrained()
    before.grad = sentinel = torch.full((3,), 7.0)
    # A module first registered during the call, with a gradient of its own.
    net.weight.grad = weight_grad = torch.ones(3, 2)
    values = {name: p.detach().clone() for name, p in net.named_parameters()}
    values["scale"] = before.detach().clone()

    pyro.set_rng_seed(1)
    moments = gradient_moments(_normal_model, _normal_guide, Trace_ELBO(), net, num_draws=5)

    assert before.grad is sentinel and net.weight.grad is weight_grad and net.bias.grad is None
    after = dict(net.named_parameters(), scale=pyro.param("scale").unconstrained())
    for name, value in values.items():
        assert torch.equal(after[name], value), name
    # The pre-existing gradients did not leak into the first draw.
    pyro.set_rng_seed(1)
    net.weight.grad = before.grad = None
    clean = gradient_moments(_normal_model, _normal_guide, Trace_ELBO(), net, num_draws=5)
    for name, m in moments.items():
        assert torch.equal(m.mean, clean[name].mean) and torch.equal(
            m.variance, clean[name].variance
        )


def test_gradients_are_restored_after_an_error():
    calls = []

    def model(net):
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("model failed")
        _normal_model(net)

    net = nn.Linear(2, 3)
    pyro.module("net", net)
    net.bias.grad = sentinel = torch.zeros(3)
    with pytest.raises(RuntimeError, match="model failed"):
        gradient_moments(model, _normal_guide, Trace_ELBO(), net, num_draws=5)
    assert net.bias.grad is sentinel and net.weight.grad is None


def _selected(params, net):
    pyro.set_rng_seed(0)
    return gradient_moments(
        _normal_model, _normal_guide, Trace_ELBO(), net, num_draws=10, params=params
    )


def test_parameter_selections_agree():
    net = nn.Linear(2, 3)
    everything = _selected(None, net)
    names = ["net$$$weight", "scale"]
    by_name = _selected(names, net)
    by_value = _selected({"weight": net.weight, "scale": pyro.param("scale")}, net)
    by_pairs = _selected(net.named_parameters(), net)
    one_name = _selected("scale", net)
    assert list(by_name) == names and list(by_value) == ["weight", "scale"]
    assert list(by_pairs) == ["weight", "bias"] and list(one_name) == ["scale"]
    same = [
        (by_name["scale"], "scale"),
        (by_value["scale"], "scale"),
        (by_value["weight"], "net$$$weight"),
        (by_pairs["bias"], "net$$$bias"),
        (one_name["scale"], "scale"),
    ]
    for moments, name in same:
        assert torch.equal(moments.mean, everything[name].mean)
        assert torch.equal(moments.variance, everything[name].variance)


def test_parameters_missing_from_some_draws_count_as_zero_gradients():
    # Deterministic gradients: d/dloc of (loc - 1)^2 / 2 in every draw, and d/da of (a - 3)^2 / 2
    # in draws 1, 4, 7 only, where "a" is created (draw 1, not 0). The draws of "a" are then
    # c = a - 3 three times in ten and 0 otherwise: mean 0.3 c, variance 10 / 9 c^2 0.3 0.7.
    draws = []

    def model():
        draws.append(None)
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.factor("loc_term", -((loc - 1) ** 2) / 2)
        if len(draws) % 3 == 2:
            a = pyro.param("a", torch.tensor([0.5, 5.0]))
            pyro.factor("a_term", -((a - 3) ** 2).sum() / 2)

    moments = gradient_moments(model, lambda: None, Trace_ELBO(), num_draws=10)
    c = torch.tensor([0.5, 5.0]) - 3
    torch.testing.assert_close(moments["a"].mean, 0.3 * c)
    torch.testing.assert_close(moments["a"].variance, 10 / 9 * c**2 * 0.3 * 0.7)
    assert moments["loc"].mean == -1 and moments["loc"].variance == 0
    assert moments["loc"].snr == math.inf


def test_selected_parameter_without_gradient():
    unused = torch.zeros(2, requires_grad=True)
    selection = {"unused": unused}
    net = nn.Linear(2, 3)
    elbo = Trace_ELBO()
    moments = gradient_moments(_normal_model, _normal_guide, elbo, net, params=selection)["unused"]
    assert torch.equal(moments.mean, torch.zeros(2)) and torch.equal(
        moments.variance, torch.zeros(2)
    )
    assert bool(moments.snr.isnan().all()) and math.isnan(moments.mean_snr)
    assert unused.grad is None


def test_gradient_moments_properties():
    m = GradientMoments(torch.tensor([3.0, -2.0, 0.0]), torch.tensor([4.0, 0.0, 0.0]), 16)
    torch.testing.assert_close(m.standard_error, torch.tensor([0.5, 0.0, 0.0]))
    assert torch.equal(m.snr[:2], torch.tensor([1.5, math.inf])) and bool(m.snr[2].isnan())
    assert m.mean_snr == math.inf
    finite = GradientMoments(torch.tensor([3.0, 0.0]), torch.tensor([4.0, 0.0]), 16)
    assert finite.mean_snr == 1.5
    assert str(finite) == "shape (2,), 16 draws: mean SNR 1.5, total variance 4"


def test_keyword_arguments_and_progress_bar(capsys):
    x0 = torch.zeros(3)
    moments = gradient_moments(
        _gaussian_model, _gaussian_guide, Trace_ELBO(), num_draws=3, progress=True, x0=x0
    )
    assert moments["mu"].mean.shape == (3,)
    assert "gradient draws" in capsys.readouterr().err


@pytest.mark.parametrize(
    "num_draws, error",
    [(1, ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError), ("10", TypeError)],
)
def test_bad_num_draws(num_draws, error):
    with pytest.raises(error, match="gradient_moments: `num_draws`"):
        gradient_moments(_normal_model, _normal_guide, Trace_ELBO(), num_draws=num_draws)


@pytest.mark.parametrize("elbo", [object(), Trace_ELBO], ids=["object", "class"])
def test_bad_elbo(elbo):
    with pytest.raises(TypeError, match="loss_and_grads"):
        gradient_moments(_normal_model, _normal_guide, elbo, nn.Linear(2, 3))


def test_bad_parameter_selections():
    net = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="no parameter named 'missing'"):
        gradient_moments(_normal_model, _normal_guide, Trace_ELBO(), net, params=["missing"])
    for tensor in (torch.zeros(2), net.weight * 2):
        with pytest.raises(ValueError, match="leaf tensor that requires grad"):
            gradient_moments(_normal_model, _normal_guide, Trace_ELBO(), net, params={"t": tensor})
    for params in (net.weight, [net.weight], {"weight": None}, 3):
        with pytest.raises(TypeError, match="must (name its parameters|be a tensor)"):
            gradient_moments(_normal_model, _normal_guide, Trace_ELBO(), net, params=params)

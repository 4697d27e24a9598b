"""What is unique to the straight-through family: GST, ST, STGS, GR-MCK and their binary forms."""

import math

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from registry import EXAMPLES
from statistical import assert_z_scores_are_standard
from torch.autograd.functional import jacobian
from torch.distributions import kl_divergence

import pyro_relax as pr
from pyro_relax._numerics import gumbel_like
from pyro_relax.distributions.straight_through import (
    _conditional_perturbed_logits,
    _expected_gap,
)

_f64 = torch.float64


def _estimator(cls, **options):
    # One estimator as the tests call it: logits first, the temperature 1.0 unless given.
    return lambda logits, temperature=1.0, **kw: cls(temperature, logits=logits, **options, **kw)


CATEGORICAL_ESTIMATORS = {
    "ST": _estimator(pr.STCategorical),
    "STGS": _estimator(pr.STGSCategorical),
    "GR-MC3": _estimator(pr.GRMCKCategorical, num_draws=3),
    "GST-1.0": _estimator(pr.GappedSTCategorical, gap=1.0),
    "GST-expected": _estimator(pr.GappedSTCategorical, gap="expected"),
    "GST-ablation": _estimator(pr.GappedSTCategorical, gap=0.0, detach_perturbations=False),
}
BINARY_ESTIMATORS = {
    "ST": _estimator(pr.STBernoulli),
    "STGS": _estimator(pr.STGSBernoulli),
    "GR-MC3": _estimator(pr.GRMCKBernoulli, num_draws=3),
    "GST-1.0": _estimator(pr.GappedSTBernoulli, gap=1.0),
}
categorical_estimators = pytest.mark.parametrize(
    "make", CATEGORICAL_ESTIMATORS.values(), ids=CATEGORICAL_ESTIMATORS.keys()
)
binary_estimators = pytest.mark.parametrize(
    "make", BINARY_ESTIMATORS.values(), ids=BINARY_ESTIMATORS.keys()
)


def _random_logits(*shape, seed=0, scale=2.0, dtype=_f64):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=generator, dtype=dtype)


def _chi_square_p_value(index, probs):
    """One chi-square test of integer samples ``(n, m)`` against ``m`` PMFs ``(m, K)``, bins
    with expected count below 5 pooled (scipy's p-value)."""
    num_samples = index.shape[0]
    statistic, dof = 0.0, 0
    for element in range(probs.shape[0]):
        observed = torch.bincount(index[:, element], minlength=probs.shape[1]).double()
        expected = num_samples * probs[element].double()
        small = expected < 5
        observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
        keep = expected > 0
        statistic += float(((observed - expected).square() / expected)[keep].sum())
        dof += int(keep.sum()) - 1
    return scipy.stats.chi2.sf(statistic, dof)


# --- Forward samples are exact -------------------------------------------------------------


@categorical_estimators
@pytest.mark.parametrize("dtype, temperature", [(_f64, 1.0), (torch.float32, 0.01)])
def test_forward_samples_are_categorical(make, dtype, temperature):
    # 4000 draws of 6 random categoricals over 5 classes, against Categorical(softmax(logits))
    # with scipy's chi-square p-value; rejected at p < 1e-3.
    torch.manual_seed(0)
    logits = _random_logits(6, 5, dtype=dtype)
    value = make(logits, temperature=temperature).rsample((4000,))
    assert ((value == 0) | (value == 1)).all() and (value.sum(-1) == 1).all()
    index = value.argmax(-1)
    assert _chi_square_p_value(index, torch.softmax(logits.double(), -1)) > 1e-3


@binary_estimators
def test_binary_forward_samples_are_bernoulli(make):
    torch.manual_seed(1)
    logits = _random_logits(6)
    value = make(logits, temperature=0.5).rsample((4000,))
    assert ((value == 0) | (value == 1)).all()
    probs = torch.stack([torch.sigmoid(-logits), torch.sigmoid(logits)], -1)
    assert _chi_square_p_value(value.long(), probs) > 1e-3


# --- Consistency and the gap ----------------------------------------------------------------


def _hard_and_soft(make, logits, seed, **kwargs):
    # The same noise gives the hard value D and the surrogate h (the soft mode's value).
    torch.manual_seed(seed)
    hard = make(logits=logits, hard=True, **kwargs).rsample((500,))
    torch.manual_seed(seed)
    soft = make(logits=logits, hard=False, **kwargs).rsample((500,))
    return hard, soft


@pytest.mark.parametrize(
    "make",
    [CATEGORICAL_ESTIMATORS[name] for name in ("STGS", "GR-MC3", "GST-1.0", "GST-expected")],
    ids=["STGS", "GR-MC3", "GST-1.0", "GST-expected"],
)
def test_consistency(make):
    # argmax h = D, on random logits (the naive ST and the gap-0 ablation are not consistent).
    logits = _random_logits(8, 6, seed=2)
    hard, soft = _hard_and_soft(make, logits, seed=3, temperature=0.5)
    assert torch.equal(soft.argmax(-1), hard.argmax(-1))


@pytest.mark.parametrize("gap", [0.5, 1.0, 3.0, "expected"])
def test_gap_of_the_perturbed_logits(gap):
    # At tau = 1, tau * log h recovers the perturbed logits l + m1 - m2 up to a constant. Their
    # top-1 minus top-2 is exactly max(kappa, max_j l_j - max_{j != D} l_j) >= kappa, with
    # kappa = -log(1 - p_D) / p_D for the expected gap; tolerance 1e-9 in float64.
    logits = _random_logits(8, 6, seed=4)
    hard, soft = _hard_and_soft(pr.GappedSTCategorical, logits, seed=5, temperature=1.0, gap=gap)
    index = hard.argmax(-1, keepdim=True)
    perturbed = soft.log()
    top2 = perturbed.topk(2, -1).values
    observed_gap = top2[..., 0] - top2[..., 1]
    log_probs = torch.log_softmax(logits, -1).expand_as(hard)
    if gap == "expected":
        p = log_probs.gather(-1, index).squeeze(-1).exp()
        kappa = -torch.log1p(-p) / p
    else:
        kappa = torch.full_like(observed_gap, gap)
    others = log_probs.masked_fill(hard.bool(), -math.inf).max(-1).values
    natural_gap = log_probs.max(-1).values - others
    torch.testing.assert_close(observed_gap, torch.maximum(kappa, natural_gap), rtol=0, atol=1e-9)
    assert (observed_gap >= kappa - 1e-9).all()


def test_expected_gap_matches_monte_carlo():
    # E[top-1 minus top-2 of l + g | argmax = D] against -log(1 - p_D) / p_D: 400000 Gumbel
    # draws of 4 classes, the errors in standard errors standard normal at LEVEL
    # (statistical.py; each class averages its own draws).
    torch.manual_seed(6)
    logits = torch.tensor([1.5, 0.0, -1.0, 0.5], dtype=_f64)
    perturbed = logits + gumbel_like(logits, (400_000, 4))
    top2 = perturbed.topk(2, -1)
    gaps = top2.values[:, 0] - top2.values[:, 1]
    log_probs = torch.log_softmax(logits, -1)
    z = []
    for k in range(4):
        chosen = gaps[top2.indices[:, 0] == k]
        error = chosen.mean() - _expected_gap(log_probs[k])
        z.append(error / (chosen.std() / math.sqrt(len(chosen))))
    assert_z_scores_are_standard(torch.stack(z), "the mean gaps per class")


@pytest.mark.parametrize("dtype", [torch.float32, _f64])
def test_expected_gap_limits(dtype):
    # -> 1 as p -> 0 (also where p underflows), finite and large as p -> 1, finite gradient.
    log_p = torch.tensor([-1e4, -200.0, -30.0, -1e-3, -1e-12, 0.0], dtype=dtype)
    log_p.requires_grad_()
    gap = _expected_gap(log_p)
    assert torch.isfinite(gap).all()
    torch.testing.assert_close(gap[:3], torch.ones(3, dtype=dtype))
    assert (gap[3:] > 5).all()
    gap.sum().backward()
    assert torch.isfinite(log_p.grad).all()


# --- The backward pass is the Jacobian of the surrogate -------------------------------------


def _gst_reference(logits, one_hot, gap, temperature, detach=True):
    # DESIGN section 4: m1 lifts the sampled logit to the maximum, m2 pushes the others at
    # least kappa below it.
    fixed = logits.detach() if detach else logits
    top = fixed.max(-1, keepdim=True).values
    sampled = (fixed * one_hot).sum(-1, keepdim=True)
    if gap == "expected":
        p = torch.softmax(fixed, -1).mul(one_hot).sum(-1, keepdim=True)
        gap = -torch.log1p(-p) / p
    m1 = (top - sampled) * one_hot
    m2 = torch.relu(fixed + gap - top) * (1 - one_hot)
    return torch.softmax((logits + m1 - m2) / temperature, -1)


def _references(name, one_hot, shape, seed, temperature):
    """The surrogate h(logits) of each estimator, rebuilt from DESIGN's formulas. The noise of
    STGS and GR-MCK is redrawn with the seed, in the order rsample draws it (the Gumbels that
    choose D, then the Exp(1) variables of GR-MCK as minus Gumbels)."""
    torch.manual_seed(seed)
    gumbels = gumbel_like(torch.zeros((), dtype=_f64), shape)
    log_e = -gumbel_like(torch.zeros((), dtype=_f64), (3,) + shape)

    def grmck(logits):
        fixed = torch.log_softmax(logits, -1).detach()
        log_norm = fixed.logsumexp(-1, keepdim=True)
        log_e_top = (log_e * one_hot).sum(-1, keepdim=True)
        top = log_norm - log_e_top
        others = -torch.logaddexp(log_e - fixed, log_e_top - log_norm)
        noise = torch.where(one_hot.bool(), top, others) - fixed
        return torch.softmax((logits + noise) / temperature, -1).mean(0)

    return {
        "ST": lambda logits: torch.softmax(logits / temperature, -1).expand(shape),
        "STGS": lambda logits: torch.softmax((logits + gumbels) / temperature, -1),
        "GR-MC3": grmck,
        "GST-1.0": lambda logits: _gst_reference(logits, one_hot, 1.0, temperature),
        "GST-expected": lambda logits: _gst_reference(logits, one_hot, "expected", temperature),
        "GST-ablation": lambda logits: _gst_reference(logits, one_hot, 0.0, temperature, False),
    }[name]


@pytest.mark.parametrize("name", CATEGORICAL_ESTIMATORS)
def test_backward_is_the_jacobian_of_the_surrogate(name):
    # In float64: the Jacobian of the hard sample (one backward pass per output coordinate)
    # equals the autograd Jacobian of the surrogate rebuilt from DESIGN's formulas, and that
    # of the soft sample (which is the surrogate); the soft value equals the reference.
    make, logits, temperature, seed = CATEGORICAL_ESTIMATORS[name], _random_logits(2, 4), 0.7, 7

    def sample(hard):
        def draw(logits):
            torch.manual_seed(seed)
            return make(logits, temperature=temperature, hard=hard).rsample((3,))

        return draw

    hard_jacobian = jacobian(sample(True), logits)
    one_hot = sample(True)(logits)
    reference = _references(name, one_hot, one_hot.shape, seed, temperature)
    torch.testing.assert_close(hard_jacobian, jacobian(reference, logits))
    torch.testing.assert_close(hard_jacobian, jacobian(sample(False), logits))
    torch.testing.assert_close(sample(False)(logits), reference(logits))


@pytest.mark.parametrize("gap", [0.4, 2.0])
def test_binary_gst_matches_its_closed_form(gap):
    # GappedSTBernoulli's docstring: perturbed log-odds max(M, kappa) after a 1 and
    # -max(M - theta, kappa) after a 0, M = max(0, theta); h_1 = sigma((theta + c) / tau).
    theta, temperature = _random_logits(6, seed=8), 0.6

    def draw(theta):
        torch.manual_seed(9)
        return pr.GappedSTBernoulli(temperature, logits=theta, gap=gap).rsample((4,))

    value = draw(theta)
    top = theta.clamp(min=0)
    perturbed = torch.where(value == 1, top.clamp(min=gap), -(top - theta).clamp(min=gap))

    def closed_form(theta):
        return torch.sigmoid((theta + (perturbed - theta).detach()) / temperature)

    torch.testing.assert_close(jacobian(draw, theta), jacobian(closed_form, theta))


def test_log_prob_is_linear_in_the_value():
    # log pi_D, as OneHotCategorical scores it, with gradient log pi with respect to the value,
    # so Trace_ELBO's log q(z) term passes the straight-through gradient to the surrogate.
    logits = _random_logits(3, 5, seed=10).requires_grad_()
    d = pr.GappedSTCategorical(0.5, logits=logits)
    value = d.rsample((4,))
    log_prob = d.log_prob(value)
    torch.testing.assert_close(log_prob, dist.OneHotCategorical(logits=logits).log_prob(value))
    (grad,) = torch.autograd.grad(log_prob.sum(), value, retain_graph=True)
    torch.testing.assert_close(grad, torch.log_softmax(logits, -1).detach().expand_as(grad))


# --- GR-MCK ---------------------------------------------------------------------------------


def _moment_z_scores(x, y):
    """Differences of means and of variances of two samples, in standard errors."""
    x_c, y_c = x - x.mean(0), y - y.mean(0)
    mean_se = (x.var(0) / len(x) + y.var(0) / len(y)).sqrt()
    var_se = (x_c.square().var(0) / len(x) + y_c.square().var(0) / len(y)).sqrt()
    return (x.mean(0) - y.mean(0)) / mean_se, (x.var(0) - y.var(0)) / var_se


def test_conditional_gumbels_match_rejection_sampling():
    # For each category D, the perturbed logits l + G given argmax = D, drawn in log space, have
    # the per-coordinate mean and variance of rejection-sampled Gumbel-max draws (300000
    # proposals), the differences in standard errors standard normal at LEVEL (statistical.py;
    # Bonferroni only: the coordinates of a draw, and a mean and a variance, are dependent).
    torch.manual_seed(11)
    logits = torch.log_softmax(torch.tensor([1.0, 0.0, -0.5, 0.3], dtype=_f64), -1)
    proposals = logits + gumbel_like(logits, (300_000, 4))
    accepted = proposals.argmax(-1)
    for k in range(4):
        rejected = proposals[accepted == k]
        index = torch.full((100_000,), k)
        log_e = -gumbel_like(logits, (100_000, 4))
        conditional = _conditional_perturbed_logits(logits, index, log_e)
        assert (conditional.argmax(-1) == k).all()
        z = torch.cat(_moment_z_scores(conditional, rejected))
        assert_z_scores_are_standard(z, f"category {k}: means, variances", independent=False)


def _per_sample_gradients(make, num_samples, seed):
    # Gradient of <w, z> with respect to the first logit, one independent sample per row.
    logits = torch.tensor([0.5, -0.5, 1.0, 0.0], dtype=_f64).expand(num_samples, 4).clone()
    logits.requires_grad_()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=_f64)
    torch.manual_seed(seed)
    (make(logits).rsample() * weights).sum().backward()
    return logits.grad[:, 0]


def test_grmck_with_one_draw_has_the_gradient_distribution_of_stgs():
    # Two-sample Kolmogorov-Smirnov test on 4000 independent gradients each, p > 1e-3; and
    # more draws reduce the variance (the point of Rao-Blackwellization).
    stgs = _per_sample_gradients(lambda logits: pr.STGSCategorical(0.5, logits=logits), 4000, 12)
    grmc1 = _per_sample_gradients(
        lambda logits: pr.GRMCKCategorical(0.5, logits=logits, num_draws=1), 4000, 13
    )
    assert scipy.stats.ks_2samp(stgs.numpy(), grmc1.numpy()).pvalue > 1e-3
    grmc20 = _per_sample_gradients(
        lambda logits: pr.GRMCKCategorical(0.5, logits=logits, num_draws=20), 4000, 14
    )
    assert grmc20.var() < 0.8 * grmc1.var()
    torch.testing.assert_close(grmc20.mean(), grmc1.mean(), atol=0.1, rtol=0)


def test_grmck_keeps_excluded_categories_excluded():
    logits = torch.tensor([0.0, -math.inf, 1.0], requires_grad=True)
    value = pr.GRMCKCategorical(1.0, logits=logits, num_draws=5).rsample((50,))
    assert (value[:, 1] == 0).all()
    value.square().sum().backward()
    assert torch.isfinite(logits.grad[[0, 2]]).all()


# --- The Concrete density of soft STGS samples ----------------------------------------------


def test_concrete_density_matches_torch_in_float64():
    torch.manual_seed(15)
    logits = _random_logits(3, 4, seed=16)
    temperature = torch.tensor([0.3, 0.7, 1.5], dtype=_f64)
    value = pr.STGSCategorical(temperature, logits=logits, hard=False).rsample((5,))
    log_prob = pr.STGSCategorical(temperature, logits=logits, hard=False).log_prob(value)
    for i in range(3):  # torch's batched temperature broadcasts wrongly (pytorch#37162)
        expected = dist.RelaxedOneHotCategorical(temperature[i], logits=logits[i])
        torch.testing.assert_close(log_prob[:, i], expected.log_prob(value[:, i]))
    # A clone loses the log-weights; at these temperatures its coordinates are positive.
    torch.testing.assert_close(
        pr.STGSCategorical(temperature, logits=logits, hard=False).log_prob(value.clone()),
        log_prob,
    )


def test_binary_concrete_density_matches_torch():
    torch.manual_seed(17)
    logits = _random_logits(4, seed=18)
    d = pr.STGSBernoulli(0.5, logits=logits, hard=False)
    value = d.rsample((6,))
    expected = dist.RelaxedBernoulli(torch.tensor(0.5, dtype=_f64), logits=logits)
    torch.testing.assert_close(d.log_prob(value), expected.log_prob(value))
    torch.testing.assert_close(d.log_prob(value.clone()), expected.log_prob(value))


def test_soft_stgs_density_is_accurate_in_float32_at_temperature_001():
    # float32 at tau = 0.01: coordinates underflow, the log-weights do not; the density agrees
    # with the float64 evaluation of the same log-weights to 1e-5 relative.
    torch.manual_seed(19)
    logits = _random_logits(20, 10, seed=20, dtype=torch.float32)
    d = pr.STGSCategorical(0.01, logits=logits, hard=False)
    value = d.rsample((50,))
    assert (value == 0).any()
    log_prob = d.log_prob(value)
    assert torch.isfinite(log_prob).all()
    exact = pr.STGSCategorical(0.01, logits=logits.double(), hard=False)
    log_weights = pr.relaxation_of(value).log_weights.double()
    value64 = pr.with_relaxation(log_weights.exp(), pr.Relaxation(log_weights=log_weights))
    torch.testing.assert_close(log_prob.double(), exact.log_prob(value64), rtol=1e-5, atol=0)


# --- Pyro's RelaxedOneHotCategoricalStraightThrough: the fragility ours fixes ---------------


def test_cloned_samples_never_give_nan():
    # Pyro's straight-through relaxed categorical returns NaN for a cloned sample: the premise.
    torch.manual_seed(21)
    logits = _random_logits(4, 6, seed=22, dtype=torch.float32)
    theirs = dist.RelaxedOneHotCategoricalStraightThrough(torch.tensor(0.5), logits=logits)
    assert torch.isnan(theirs.log_prob(theirs.rsample().clone())).all()
    # Ours: a hard value is scored as the categorical does, clone or not.
    ours = pr.STGSCategorical(0.5, logits=logits)
    value = ours.rsample()
    torch.testing.assert_close(ours.log_prob(value.clone()), ours.log_prob(value))
    # A soft value at tau = 0.01 loses coordinates to underflow: a clear error under
    # validation, the documented finite fallback without.
    cold = pr.STGSCategorical(0.01, logits=logits, hard=False)
    soft = cold.rsample((20,))
    assert torch.isfinite(cold.log_prob(soft)).all()
    with pytest.raises(ValueError, match="log-weights"):
        cold.log_prob(soft.clone())
    unchecked = pr.STGSCategorical(0.01, logits=logits, hard=False, validate_args=False)
    assert torch.isfinite(unchecked.log_prob(soft.clone())).all()


def _categorical_model_and_guide(make, dtype=torch.float32, observe=True):
    # 6 latents over 12 classes in a plate, observed through a fixed linear Bernoulli decoder.
    decoder = _random_logits(12, 3, seed=23, dtype=dtype)
    data = torch.tensor([[1.0, 0.0, 1.0]] * 6, dtype=dtype)

    def model():
        with pyro.plate("items", 6):
            z = pyro.sample("z", make(torch.zeros(6, 12, dtype=dtype)))
            if observe:
                pyro.sample("x", dist.Bernoulli(logits=z @ decoder).to_event(1), obs=data)

    def guide():
        logits = pyro.param("logits", torch.zeros(6, 12, dtype=dtype))
        with pyro.plate("items", 6):
            pyro.sample("z", make(logits))

    return model, guide


def test_pyro_straight_through_fails_validation_in_float32_at_temperature_001():
    # The premise: Pyro clamps its soft samples' coordinates to [eps, 1 - eps], so with 12
    # classes at tau = 0.01 their sum exceeds 1 by about 10 eps, beyond the simplex tolerance.
    torch.manual_seed(27)

    def make(logits):
        return dist.RelaxedOneHotCategoricalStraightThrough(torch.tensor(0.01), logits=logits)

    pyro.clear_param_store()
    model, guide = _categorical_model_and_guide(make)
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="Simplex"):
        SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO()).step()


_SVI_ESTIMATORS = {
    "STGS-hard": lambda logits, tau: pr.STGSCategorical(tau, logits=logits),
    "STGS-soft": lambda logits, tau: pr.STGSCategorical(tau, logits=logits, hard=False),
    "ST": lambda logits, tau: pr.STCategorical(tau, logits=logits),
    "GR-MC5": lambda logits, tau: pr.GRMCKCategorical(tau, logits=logits, num_draws=5),
    "GST-1.0": lambda logits, tau: pr.GappedSTCategorical(tau, logits=logits),
    "GST-expected-soft": lambda logits, tau: pr.GappedSTCategorical(
        tau, logits=logits, gap="expected", hard=False
    ),
}


@pytest.mark.parametrize("make", _SVI_ESTIMATORS.values(), ids=_SVI_ESTIMATORS.keys())
@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_svi_in_plates_float32_with_validation(make, elbo, temperature):
    # Model and guide of the same kind inside a plate, an observed decoder, float32, validation
    # on: finite losses at tau = 0.01, and a guide that moves at tau = 0.5 (at 0.01 GST's
    # gap saturates the softmax and its likelihood gradient vanishes, as it should).
    pyro.clear_param_store()
    torch.manual_seed(24)
    model, guide = _categorical_model_and_guide(lambda logits: make(logits, temperature))
    with pyro.validation_enabled(True):
        svi = SVI(model, guide, Adam({"lr": 0.05}), elbo())
        losses = [svi.step() for _ in range(5)]
    assert all(math.isfinite(loss) for loss in losses)
    if temperature == 0.5:
        assert pyro.param("logits").abs().sum() > 0


@pytest.mark.parametrize(
    "make, prior",
    [
        (lambda logits: pr.GappedSTCategorical(0.5, logits=logits), None),
        (lambda logits: pr.GRMCKCategorical(0.5, logits=logits, num_draws=5), None),
        (
            lambda logits: pr.GappedSTCategorical(0.5, logits=logits),
            lambda logits: dist.OneHotCategorical(logits=logits),
        ),
    ],
    ids=["GST", "GR-MC5", "GST-with-OneHotCategorical-prior"],
)
def test_trace_mean_field_uses_the_categorical_kl(make, prior):
    # With no observed site the loss is the KL summed over the plate: deterministic and equal
    # to the categorical KL (the Monte-Carlo fallback would be random).
    pyro.clear_param_store()
    model, guide = _categorical_model_and_guide(make, observe=False)
    if prior is not None:
        model, _ = _categorical_model_and_guide(prior, observe=False)
    with pyro.validation_enabled(True):
        guide()
        pyro.param("logits").data.copy_(_random_logits(6, 12, seed=25, dtype=torch.float32))
        elbo = TraceMeanField_ELBO()
        loss = elbo.loss(model, guide)
        assert elbo.loss(model, guide) == loss
    q = dist.Categorical(logits=pyro.param("logits").detach())
    expected = kl_divergence(q, dist.Categorical(logits=torch.zeros(6, 12))).sum()
    assert loss == pytest.approx(float(expected), rel=1e-5)


@binary_estimators
@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_binary_svi_in_plates(make, elbo):
    pyro.clear_param_store()
    torch.manual_seed(1)

    def model():
        with pyro.plate("items", 8):
            z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.5)))
            pyro.sample("x", dist.Normal(3 * z, 1.0), obs=torch.full((8,), 3.0))

    def guide():
        logits = pyro.param("logits", torch.zeros(8))
        with pyro.plate("items", 8):
            pyro.sample("z", make(logits, temperature=0.5))

    with pyro.validation_enabled(True):
        svi = SVI(model, guide, Adam({"lr": 0.2}), elbo())
        losses = [svi.step() for _ in range(12)]
    assert all(math.isfinite(loss) for loss in losses)
    # The observations pull every z towards 1 (posterior log-odds 4.5); the mean log-odds
    # after 12 steps was 0.37 to 1.34 over 5 seeds and every estimator, from 0.
    assert pyro.param("logits").mean() > 0.2


# --- Arguments ------------------------------------------------------------------------------


def test_bad_arguments_are_rejected():
    logits = torch.zeros(3)
    with pytest.raises(ValueError, match="gap"):
        pr.GappedSTCategorical(1.0, logits=logits, gap=-1.0)
    with pytest.raises(ValueError, match="gap"):
        pr.GappedSTBernoulli(1.0, logits=logits, gap="largest")
    with pytest.raises(ValueError, match="num_draws"):
        pr.GRMCKCategorical(1.0, logits=logits, num_draws=0)
    with pytest.raises(TypeError, match="num_draws"):
        pr.GRMCKBernoulli(1.0, logits=logits, num_draws=2.5)
    with pytest.raises(TypeError, match="gap"):
        pr.GappedSTCategorical(1.0, logits=logits, gap=None)
    with pytest.raises(ValueError, match="probs"):
        pr.STCategorical(1.0, logits=logits, probs=logits.softmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        pr.STGSCategorical(torch.ones(3), logits=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="GappedST: `base_dist`"):
        pr.GappedST(dist.Bernoulli(0.5), 1.0)


def test_wrapper_keeps_the_parameterization_and_expands():
    probs = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    d = pr.GappedST(dist.Categorical(probs=probs), 0.5, gap="expected")
    assert torch.equal(d.probs, probs) and d.gap == "expected"
    expanded = d.expand((3, 2))
    assert type(expanded) is pr.GappedST and expanded.base_dist.batch_shape == (3, 2)
    assert expanded.gap == "expected" and expanded.temperature.shape == (3, 2)


def test_wrapper_of_a_one_hot_categorical_built_from_logits_keeps_its_logits():
    # torch's OneHotCategorical computes its probabilities at construction, and the wrapper took
    # them as what the base was built from: a logit 200 below the others underflowed to an
    # excluded category (log_prob -1e30 where the base gives -200.7).
    logits = torch.tensor([-200.0, 0.0, 0.0])
    d = pr.GappedST(dist.OneHotCategorical(logits=logits), 0.5)
    vertex = torch.tensor([1.0, 0.0, 0.0])
    expected = dist.OneHotCategorical(logits=logits).log_prob(vertex)
    torch.testing.assert_close(d.log_prob(vertex), expected)
    probs = torch.tensor([0.2, 0.3, 0.5])
    assert torch.equal(pr.GappedST(dist.OneHotCategorical(probs=probs), 0.5).probs, probs)


def test_soft_mode_has_no_enumerate_support():
    assert pr.GappedSTCategorical(1.0, logits=torch.zeros(3)).has_enumerate_support
    assert not pr.GappedSTCategorical(1.0, logits=torch.zeros(3), hard=False).has_enumerate_support
    support = pr.GappedSTCategorical(1.0, logits=torch.zeros(2, 3)).enumerate_support()
    assert support.shape == (3, 2, 3)


def test_registered_kls_replace_torchs_masked_ones():
    # torch's categorical and Bernoulli KLs mark impossible outcomes by boolean-mask assignment,
    # a host read per step on CUDA. Ours must be the ones dispatched, with the same values.
    from torch.distributions.kl import _dispatch_kl

    from pyro_relax import kl

    assert (
        _dispatch_kl(pr.GappedSTCategorical, dist.OneHotCategorical)
        is kl._kl_straightthroughcategorical_onehotcategorical
    )
    assert _dispatch_kl(pr.STBernoulli, dist.Bernoulli) is kl._kl_straightthroughbernoulli_bernoulli
    torch.manual_seed(0)
    logits = torch.randn(4, 5, dtype=torch.float64)
    prior_logits = torch.randn(5, dtype=torch.float64)
    expected = kl_divergence(
        dist.OneHotCategorical(logits=logits), dist.OneHotCategorical(logits=prior_logits)
    )
    for cls in (pr.GappedSTCategorical, pr.STCategorical, pr.STGSCategorical, pr.GRMCKCategorical):
        guide = cls(logits=logits, temperature=0.5)
        torch.testing.assert_close(
            kl_divergence(guide, dist.OneHotCategorical(logits=prior_logits)), expected
        )
    bits = torch.tensor([-50.0, -1.0, 0.0, 2.0, 50.0], dtype=torch.float64)
    prior = dist.Bernoulli(logits=torch.tensor(3.0, dtype=torch.float64))
    for cls in (pr.GappedSTBernoulli, pr.STBernoulli, pr.STGSBernoulli, pr.GRMCKBernoulli):
        torch.testing.assert_close(
            kl_divergence(cls(logits=bits, temperature=0.5), prior),
            kl_divergence(dist.Bernoulli(logits=bits), prior),
        )


@pytest.mark.parametrize(
    "prior, guide",
    [
        (
            lambda: pr.STBernoulli(1.0, probs=torch.tensor([0.0, 0.5])),
            lambda logits: pr.STBernoulli(1.0, logits=logits[:, 0]),
        ),
        (
            lambda: pr.STCategorical(1.0, probs=torch.tensor([[0.5, 0.0, 0.5]] * 2)),
            lambda logits: pr.STCategorical(
                1.0, logits=torch.stack([-logits[:, 0], logits[:, 0], torch.zeros(2)], -1)
            ),  # fmt: skip
        ),
    ],
    ids=["bernoulli", "categorical"],
)
def test_a_guide_drawing_an_outcome_the_prior_excludes_learns_to_avoid_it(prior, guide):
    # log 0 stood as -1e30 in the straight-through gradient too: 7e28 on the guide's weights,
    # whose square overflowed Adam's second moment in float32 and froze the guide for good
    # (the impossible outcome kept probability 0.63 after 200 steps).
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = torch.tensor([[0.3], [1.0]])
    net = torch.nn.Linear(1, 1)

    def model(x):
        with pyro.plate("d", 2):
            value = pyro.sample("b", prior())
            location = value if value.dim() == 1 else value[:, 1]
            pyro.sample("x", dist.Normal(location, 1.0), obs=x[:, 0])

    def guide_fn(x):
        pyro.module("net", net)
        with pyro.plate("d", 2):
            pyro.sample("b", guide(net(x)))

    def impossible():  # the guide's probability of the first item's excluded outcome
        with torch.no_grad():
            probs = guide(net(x)).probs
        return float(probs[0] if probs.dim() == 1 else probs[0, 1])

    start = impossible()
    svi = SVI(model, guide_fn, Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(200)]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
    assert impossible() < min(0.05, start / 5), (start, impossible(), losses[-3:])


def test_the_gst_gradient_vanishes_as_the_temperature_falls_below_the_gap():
    # The class's documented limit: the weights of h off the sampled category are at most
    # exp(-gap / tau), so the surrogate gradient of a linear function shrinks like
    # exp(-gap / tau) / tau, while STGS keeps a gradient of the exact one's size.
    torch.manual_seed(0)
    costs = torch.tensor([0.0, -1.0, 1.0])
    logits = torch.tensor([0.0, 0.5, -0.5], requires_grad=True)

    def gradient(cls, tau):
        d = cls(tau, logits=logits.expand(20000, 3), hard=True)
        (grad,) = torch.autograd.grad((d.rsample() * costs).sum(-1).mean(), logits)
        return grad.norm()

    exact = torch.autograd.grad((logits.softmax(-1) * costs).sum(), logits)[0].norm()
    bound = 3 * math.exp(-1.0 / 0.1) / 0.1  # a few times exp(-gap / tau) / tau
    assert gradient(pr.GappedSTCategorical, 1.0) > 0.5 * exact
    assert gradient(pr.GappedSTCategorical, 0.1) < bound < 0.01 * exact
    assert gradient(pr.STGSCategorical, 0.1) > 0.5 * exact


@pytest.mark.parametrize("temperature", [100.0, 1e5])
def test_soft_stgs_density_stays_exact_at_high_temperatures_in_float32(monkeypatch, temperature):
    # The density was evaluated from tau times the rounded log-weights: in float32 with 500
    # categories 72 nats off at tau = 1e5 (0.08 at 100). The reference is the Concrete
    # log-density in float64 from the very Gumbel noise drawn: with y = log_softmax((l + g) /
    # tau), log p = log (K-1)! + (K-1) log tau - sum g - K logsumexp(-g) - sum y.
    import pyro_relax.distributions.straight_through as st

    drawn = []
    original = st.gumbel_like

    def spy(logits, shape):
        noise = original(logits, shape)
        drawn.append(noise.detach().double())
        return noise

    monkeypatch.setattr(st, "gumbel_like", spy)
    torch.manual_seed(0)
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    d = pr.STGSCategorical(temperature, logits=logits, hard=False)
    value = d.rsample((200,))
    base, g = logits.double(), drawn[-1]
    y = torch.log_softmax((base + g) / temperature, -1)
    exact = (
        math.lgamma(500) + 499 * math.log(temperature) - g.sum(-1)
        - 500 * torch.logsumexp(-g, -1) - y.sum(-1)
    )  # fmt: skip
    assert (d.log_prob(value).double() - exact).abs().max() < 1e-2
    # The binary version shares the density.
    b = pr.STGSBernoulli(temperature, logits=torch.tensor(0.3), hard=False)
    value = b.rsample((200,))
    pair, g = torch.tensor([0.0, 0.3], dtype=torch.float64), drawn[-1]
    y = torch.log_softmax((pair + g) / temperature, -1)
    exact = math.log(temperature) - g.sum(-1) - 2 * torch.logsumexp(-g, -1) - y.sum(-1)
    assert (b.log_prob(value).double() - exact).abs().max() < 1e-3


@pytest.mark.parametrize("num_categories", [2, 4])
def test_soft_stgs_scores_another_familys_sample_from_its_coordinates(num_categories):
    # The Concrete density took the record's pre-image as its own tempered scores: an IGR
    # sample (whose pre-image is its Gaussian draw, K - 1 coordinates) raised a size mismatch,
    # and at K = 2 scored silently wrong. Only a soft STGS draw's own scores are read.
    torch.manual_seed(0)
    igr = pr.IGR(torch.zeros(num_categories - 1), torch.ones(num_categories - 1), 0.5)
    value = igr.rsample((4,))
    stgs = pr.STGSCategorical(0.5, logits=torch.zeros(num_categories), hard=False)
    torch.testing.assert_close(stgs.log_prob(value), stgs.log_prob(value.clone()))


# Every straight-through Bernoulli class of the registry (the recipe's made-up one included):
# the scalar relaxations whose outcomes Pyro may enumerate.
_BERNOULLIS = sorted(
    {
        type(d)
        for d in (e.build() for e in EXAMPLES)
        if d.has_enumerate_support and d.event_shape == ()
    },
    key=lambda cls: cls.__name__,
)


@pytest.mark.parametrize("cls", _BERNOULLIS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("built_by", ["logits-probs", "probs-logits"])
def test_bernoulli_kl_holds_whichever_way_each_side_is_given(cls, built_by):
    # An encoder's logits against a prior's probs (and the reverse), the prior plain or relaxed:
    # pairs built alike cancel a swapped pair of log-probabilities, and q = 0.5 is symmetric, so
    # neither would show one. The closed form p log(p / q) + (1 - p) log((1 - p) / (1 - q)).
    f64 = torch.float64
    if built_by == "logits-probs":
        p, q = 1 / (1 + math.exp(-1.0)), 0.2
        d = cls(0.5, logits=torch.tensor(1.0, dtype=f64))
        priors = [dist.Bernoulli(probs=torch.tensor(q, dtype=f64)), cls(0.5, probs=q)]
    else:
        p, q = 0.7, 1 / (1 + math.exp(1.0))
        d = cls(0.5, probs=torch.tensor(p, dtype=f64))
        priors = [dist.Bernoulli(logits=torch.tensor(-1.0, dtype=f64)), cls(0.5, logits=-1.0)]
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    for prior in priors:
        assert float(kl_divergence(d, prior)) == pytest.approx(expected, rel=1e-6)

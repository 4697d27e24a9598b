"""TraceRLOO_ELBO: unbiased gradients against exact enumeration, lower variance than REINFORCE
without a baseline and, in minibatch training near the posterior, than TraceGraph_ELBO's
decaying average, Trace_ELBO's loss and pathwise gradients, errors, SVI with subsampling.

Many independent gradient draws come from one call: every model below runs inside a plate of
copies (``REPLICATES`` unless said otherwise), each with its own row of parameters, so that row
``r`` of a parameter's gradient is one draw of the estimator for the model without the plate
(the estimator is Rao-Blackwellized per plate element, and the copies share nothing).
Everything is float64.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions.testing.rejection_gamma import RejectionGamma
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO, config_enumerate
from pyro.infer.util import torch_item
from pyro.optim import Adam
from scipy import stats
from statistical import assert_z_scores_are_standard
from torch.nn.functional import one_hot

from pyro_relax import GappedSTBernoulli, GenGSPoisson
from pyro_relax.infer.rloo import TraceRLOO_ELBO

REPLICATES = 2000
# Each check of unbiasedness rejects a correct estimator with probability at most LEVEL (1e-3,
# statistical.LEVEL); the draws are seeded by the fixture, so a pass is deterministic.

F64 = {"dtype": torch.float64}
PRIOR = torch.tensor([0.1, 0.2, 0.3, 0.4], **F64)
LOCS = torch.tensor([-2.0, -0.5, 1.0, 3.0], **F64)
NOISE = 2.0
DATA = torch.tensor([1.2, 0.3, 2.0], **F64)
LOGITS = torch.tensor([0.5, -0.3, 0.2, -1.0], **F64)


pytestmark = pytest.mark.usefixtures("fresh_pyro")


def replicated(params, replicates=REPLICATES):
    """One independent row of each parameter per copy of the model, as leaves with gradients."""
    return {
        name: value.expand(replicates, *value.shape).clone().requires_grad_()
        for name, value in params.items()
    }


def gradient_draws(elbo, model, guide, params, replicates=REPLICATES):
    """``replicates`` independent draws of the gradient of the loss (the negative ELBO)."""
    rows = replicated(params, replicates)
    elbo.loss_and_grads(model, guide, rows)
    return {name: row.grad for name, row in rows.items()}


def exact_gradient(elbo_fn, params):
    """The gradient of the exact negative ELBO, differentiated by autograd."""
    leaves = {name: value.clone().requires_grad_() for name, value in params.items()}
    grads = torch.autograd.grad(-elbo_fn(**leaves), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def assert_unbiased(draws, exact):
    """z-scores of mean gradients against exact ones, about N(0, 1) each for an unbiased
    estimator (2000 draws): no one beyond the two-sided level LEVEL / K (Bonferroni over the K
    of them), and their sum of squares within chi-square with K degrees of freedom at LEVEL
    (assert_z_scores_are_standard in statistical.py)."""
    for name, values in draws.items():
        standard_error = values.std(0) / math.sqrt(len(values))
        # The coordinates of one gradient share their draws (a softmax's logits sum to 0 in
        # each): Bonferroni alone, which holds however they depend on each other.
        z = (values.mean(0) - exact[name]) / standard_error
        assert_z_scores_are_standard(z, name, independent=False)


def expected_normal_log_lik(locs, variance):
    r""":math:`E \log N(x; m, \sigma)` for each location, summed over ``DATA``, with
    :math:`m \sim N(\text{locs}, \text{variance})`."""
    squares = (DATA - locs.unsqueeze(-1)).square() + variance
    return (-math.log(NOISE) - 0.5 * math.log(2 * math.pi) - squares / (2 * NOISE**2)).sum(-1)


# The categorical model: z ~ Categorical(PRIOR), the three DATA ~ Normal(LOCS[z], NOISE).


def categorical_model(params):
    with pyro.plate("replicates", len(params["logits"])):
        z = pyro.sample("z", dist.Categorical(PRIOR))
        pyro.sample("x", dist.Normal(LOCS[z].unsqueeze(-1), NOISE).to_event(1), obs=DATA)


def categorical_guide(params):
    with pyro.plate("replicates", len(params["logits"])):
        pyro.sample("z", dist.Categorical(logits=params["logits"]))


def categorical_elbo(logits):
    log_q = logits.log_softmax(-1)
    return (log_q.exp() * (PRIOR.log() + expected_normal_log_lik(LOCS, 0.0) - log_q)).sum()


# The plate model: a global cluster c ~ Categorical(1/3), three local z_i | c ~ Bernoulli, with
# the guide's logits of z_i one per element and cluster, and x_i ~ Normal(2 z_i - 1, 1).

CLUSTER_PROBS = torch.tensor([0.2, 0.5, 0.8], **F64)
OBSERVATIONS = torch.tensor([-1.0, 0.5, 2.0], **F64)
PLATE_PARAMS = {
    "cluster_logits": torch.tensor([0.3, -0.4, 0.1], **F64),
    "local_logits": torch.tensor([[0.5, -1.0, 0.2], [0.0, 0.7, -0.3], [-0.6, 0.4, 1.1]], **F64),
}


def plate_model(params):
    with pyro.plate("replicates", len(params["cluster_logits"]), dim=-2):
        c = pyro.sample("c", dist.Categorical(torch.ones(3, **F64) / 3))
        with pyro.plate("data", 3, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(CLUSTER_PROBS[c]))
            pyro.sample("x", dist.Normal(2 * z - 1, 1.0), obs=OBSERVATIONS)


def plate_guide(params):
    with pyro.plate("replicates", len(params["cluster_logits"]), dim=-2):
        c = pyro.sample("c", dist.Categorical(logits=params["cluster_logits"].unsqueeze(-2)))
        with pyro.plate("data", 3, dim=-1):
            # The logit of z_i in the sampled cluster: (particles, replicates, data).
            logits = (params["local_logits"] * one_hot(c, 3)).sum(-1)
            pyro.sample("z", dist.Bernoulli(logits=logits))


def plate_elbo(cluster_logits, local_logits):
    log_qc = cluster_logits.log_softmax(-1)
    z = torch.tensor([0.0, 1.0], **F64).view(2, 1, 1)  # (z, data, cluster)
    log_qz = dist.Bernoulli(logits=local_logits).log_prob(z)
    log_pz = dist.Bernoulli(CLUSTER_PROBS).log_prob(z)
    log_px = dist.Normal(2 * z - 1, 1.0).log_prob(OBSERVATIONS.unsqueeze(-1))
    local = (log_qz.exp() * (log_pz + log_px - log_qz)).sum((0, 1))
    return (log_qc.exp() * (-math.log(3) - log_qc + local)).sum()


# The mixed model: the categorical model with a shift y ~ Normal(0, 1) of the locations,
# reparameterized in the guide and downstream of z there: y | z ~ Normal(locs[z], scale).

MIXED_PARAMS = {
    "logits": LOGITS,
    "locs": torch.tensor([0.4, -0.2, 0.1, -0.5], **F64),
    "log_scale": torch.tensor(-0.5, **F64),
}


def mixed_model(params):
    with pyro.plate("replicates", len(params["logits"])):
        z = pyro.sample("z", dist.Categorical(PRIOR))
        y = pyro.sample("y", dist.Normal(torch.zeros((), **F64), 1.0))
        pyro.sample("x", dist.Normal((LOCS[z] + y).unsqueeze(-1), NOISE).to_event(1), obs=DATA)


def mixed_guide(params):
    with pyro.plate("replicates", len(params["logits"])):
        z = pyro.sample("z", dist.Categorical(logits=params["logits"]))
        loc = (params["locs"] * one_hot(z, 4)).sum(-1)
        pyro.sample("y", dist.Normal(loc, params["log_scale"].exp()))


def mixed_elbo(logits, locs, log_scale):
    log_q = logits.log_softmax(-1)
    variance = (2 * log_scale).exp()
    prior_y = -0.5 * math.log(2 * math.pi) - 0.5 * (locs.square() + variance)
    entropy_y = 0.5 * math.log(2 * math.pi * math.e) + log_scale
    log_lik = expected_normal_log_lik(LOCS + locs, variance)
    return (log_q.exp() * (PRIOR.log() - log_q + prior_y + entropy_y + log_lik)).sum()


# A partially reparameterized site: Pyro's rejection-sampled Gamma has a score-function term.


def gamma_model(params):
    with pyro.plate("replicates", len(params["log_concentration"])):
        pyro.sample("y", dist.Gamma(torch.tensor(2.0, **F64), 1.0))


def gamma_guide(params):
    with pyro.plate("replicates", len(params["log_concentration"])):
        rate = torch.ones((), **F64)
        pyro.sample("y", RejectionGamma(params["log_concentration"].exp(), rate))


def gamma_elbo(log_concentration):
    guide = dist.Gamma(log_concentration.exp(), 1.0)
    return -torch.distributions.kl_divergence(guide, dist.Gamma(2.0, 1.0))


UNBIASED_CASES = {
    "categorical": (categorical_model, categorical_guide, categorical_elbo, {"logits": LOGITS}),
    "plate": (plate_model, plate_guide, plate_elbo, PLATE_PARAMS),
    "mixed": (mixed_model, mixed_guide, mixed_elbo, MIXED_PARAMS),
    "rejection": (
        gamma_model,
        gamma_guide,
        gamma_elbo,
        {"log_concentration": torch.tensor(0.3, **F64)},
    ),
}


@pytest.mark.parametrize("case", UNBIASED_CASES)
def test_gradient_is_unbiased(case):
    """The mean of 2000 RLOO gradients (K = 4) against the exact gradient, computed by
    enumeration (and closed forms) with autograd: z-scores standard normal at LEVEL."""
    model, guide, elbo_fn, params = UNBIASED_CASES[case]
    draws = gradient_draws(TraceRLOO_ELBO(num_particles=4), model, guide, params)
    assert_unbiased(draws, exact_gradient(elbo_fn, params))


def test_variance_below_reinforce_without_baseline():
    """Per parameter, 4000 RLOO gradients (K = 4) vary less than half as much as the REINFORCE
    gradients of TraceGraph_ELBO without a baseline (same K, vectorized), on the categorical
    model, whose ELBO terms sit far from 0. The gradients are discrete mixtures, far from normal,
    where an F-test's p-value is invalid: Brown-Forsythe's test (scipy's levene around the
    median) gives the p-value, required below 1e-6.

    Against TraceGraph_ELBO's decaying-average baseline warmed up at fixed parameters on a fixed
    batch, RLOO has the larger variance at K = 2, 4 and 8: see ``benchmarks/rloo_variance.py``
    and, for minibatches, ``test_minibatch_variance_below_decaying_average``."""
    params, draws = {"logits": LOGITS}, 4000
    rloo = gradient_draws(TraceRLOO_ELBO(4), categorical_model, categorical_guide, params, draws)
    elbo = TraceGraph_ELBO(num_particles=4, vectorize_particles=True)
    plain = gradient_draws(elbo, categorical_model, categorical_guide, params, draws)
    for rloo_values, plain_values in zip(rloo["logits"].T, plain["logits"].T, strict=True):
        assert rloo_values.var() < 0.5 * plain_values.var()
        assert stats.levene(rloo_values, plain_values, center="median").pvalue < 1e-6


# Minibatch training: 200 items from a mixture of four unit Normals at -6, -2, 2 and 6, one
# Categorical latent per item, 20 items a step. Each copy of the model trains on its own
# subsamples: a plate of 20 positions, the log-densities scaled by 200 / 20 (what pyro.plate's
# subsampling does), observing the items that a (copies, 20) index names, each copy with its own
# row of logits of shape (200, 4).

ITEMS, SUBSAMPLE = 200, 20
ITEM_LOCS = torch.tensor([-6.0, -2.0, 2.0, 6.0], **F64)


def _item_data():
    generator = torch.Generator().manual_seed(0)
    clusters = torch.multinomial(PRIOR, ITEMS, replacement=True, generator=generator)
    return ITEM_LOCS[clusters] + torch.randn(ITEMS, generator=generator, **F64)


ITEM_DATA = _item_data()
ITEM_LOG_JOINT = PRIOR.log() + dist.Normal(ITEM_LOCS, 1.0).log_prob(ITEM_DATA.unsqueeze(-1))


def minibatch_model(logits, index, infer):
    with pyro.plate("copies", len(index), dim=-2), pyro.plate("data", SUBSAMPLE, dim=-1):
        with poutine.scale(scale=ITEMS / SUBSAMPLE):
            z = pyro.sample("z", dist.Categorical(PRIOR))
            pyro.sample("x", dist.Normal(ITEM_LOCS[z], 1.0), obs=ITEM_DATA[index])


def minibatch_guide(logits, index, infer):
    copies = torch.arange(len(index)).unsqueeze(-1)
    with pyro.plate("copies", len(index), dim=-2), pyro.plate("data", SUBSAMPLE, dim=-1):
        with poutine.scale(scale=ITEMS / SUBSAMPLE):
            pyro.sample("z", dist.Categorical(logits=logits[copies, index]), infer=infer)


def near_posterior_gradients():
    """Logits 90% of the way from the prior to each item's posterior (normalized
    0.1 log p(z) + 0.9 log p(z | x_i)), and each item's exact gradient of the loss when it is in
    the subsample (by enumeration, scaled by 200 / 20)."""
    logits = (0.1 * PRIOR.log() + 0.9 * ITEM_LOG_JOINT.log_softmax(-1)).log_softmax(-1)
    leaf = logits.clone().requires_grad_()
    log_q = leaf.log_softmax(-1)
    item_elbos = (log_q.exp() * (ITEM_LOG_JOINT - log_q)).sum(-1)
    (exact,) = torch.autograd.grad(-ITEMS / SUBSAMPLE * item_elbos.sum(), leaf)
    return logits, exact


def minibatch_deviations(elbo, infer, logits, exact, indices):
    """Per step and copy, the gradient less its exact expectation given the subsample, summed
    over the subsample's items: (steps, copies, 4)."""
    draws, copies = [], torch.arange(indices.shape[1]).unsqueeze(-1)
    for index in indices:
        rows = logits.expand(len(copies), -1, -1).clone().requires_grad_()
        elbo.loss_and_grads(minibatch_model, minibatch_guide, rows, index, infer)
        draws.append((rows.grad - exact)[copies, index].sum(-2))
    return torch.stack(draws)


def test_minibatch_variance_below_decaying_average():
    """In minibatch training the decaying average is kept per plate position, and mixes the
    costs of the different items that a position holds step after step. With the guide 90% of
    the way to each item's posterior, K = 4, and 50 copies that each train on their own fresh
    subsamples (the same for both estimators) for 8 steps, after 50 steps that warm the
    decaying average up: per logit, the sum over a step's 20 items of the gradient less its
    exact expectation given the subsample varies less than half as much with RLOO over the 400
    draws, with a Brown-Forsythe p-value below 1e-6. (Single items' deviations are mostly 0,
    where the guide is sure, and too heavy-tailed for the test.)

    With the guide at the prior the decaying average has the lower variance at K = 2 and 4, and
    halfway about the same: see ``benchmarks/rloo_variance.py``."""
    copies, warm_up, steps = 50, 50, 8
    logits, exact = near_posterior_gradients()
    generator = torch.Generator().manual_seed(0)
    indices = torch.rand(warm_up + steps, copies, ITEMS, generator=generator).argsort(-1)
    indices = indices[..., :SUBSAMPLE]
    rloo_elbo = TraceRLOO_ELBO(4, max_plate_nesting=2)
    rloo = minibatch_deviations(rloo_elbo, {}, logits, exact, indices[warm_up:]).flatten(0, 1)
    elbo = TraceGraph_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=2)
    baseline = {"baseline": {"use_decaying_avg_baseline": True}}
    decaying = minibatch_deviations(elbo, baseline, logits, exact, indices)[warm_up:]
    for rloo_values, decaying_values in zip(rloo.T, decaying.flatten(0, 1).T, strict=True):
        assert rloo_values.var() < 0.5 * decaying_values.var()
        assert stats.levene(rloo_values, decaying_values, center="median").pvalue < 1e-6


def test_loss_equals_trace_elbo():
    """Same seed, same draws: the three ways to get the loss agree with Trace_ELBO's."""
    params = replicated(MIXED_PARAMS, 5)
    losses = []
    for elbo, method in [
        (Trace_ELBO(num_particles=4, vectorize_particles=True), "loss"),
        (TraceRLOO_ELBO(4), "loss"),
        (TraceRLOO_ELBO(4), "loss_and_grads"),
        (TraceRLOO_ELBO(4), "differentiable_loss"),
    ]:
        pyro.set_rng_seed(1)
        losses.append(torch_item(getattr(elbo, method)(mixed_model, mixed_guide, params)))
    assert losses == pytest.approx([losses[0]] * 4, rel=1e-12)


def _bernoulli_model(logits):
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.3, **F64)))
        pyro.sample("x", dist.Normal(2 * z - 1, 1.0), obs=OBSERVATIONS)


def _relaxed_model(logits):
    with pyro.plate("data", 3):
        z = pyro.sample("z", GenGSPoisson(torch.tensor(2.0, **F64), 0.5, 12))
        pyro.sample("x", dist.Normal(z, 1.0), obs=OBSERVATIONS)


def _normal_model(logits):
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Normal(torch.zeros((), **F64), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=OBSERVATIONS)


PATHWISE_CASES = {
    "normal": (_normal_model, lambda logits: dist.Normal(logits, 1.0)),
    "gengs_poisson": (_relaxed_model, lambda logits: GenGSPoisson(logits.exp(), 0.5, 12)),
    "gapped_st": (_bernoulli_model, lambda logits: GappedSTBernoulli(1.0, logits=logits)),
}


@pytest.mark.parametrize("case", PATHWISE_CASES)
def test_pathwise_sites_match_trace_elbo(case):
    """Reparameterized guides (Normal, the library's relaxed and straight-through distributions)
    get Trace_ELBO's gradient exactly, on the same draws."""
    model, guide_dist = PATHWISE_CASES[case]

    def guide(logits):
        with pyro.plate("data", 3):
            pyro.sample("z", guide_dist(logits))

    grads = []
    for elbo in (Trace_ELBO(num_particles=4, vectorize_particles=True), TraceRLOO_ELBO(4)):
        logits = torch.tensor([0.2, -0.4, 0.9], **F64, requires_grad=True)
        pyro.set_rng_seed(2)
        grads.append(torch.autograd.grad(elbo.differentiable_loss(model, guide, logits), logits))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("num_particles", [1, 0])
def test_needs_two_particles(num_particles):
    with pytest.raises(ValueError, match="num_particles >= 2"):
        TraceRLOO_ELBO(num_particles=num_particles)


def test_num_particles_must_be_an_int():
    with pytest.raises(TypeError, match="TraceRLOO_ELBO: `num_particles` must be an int"):
        TraceRLOO_ELBO(num_particles=4.0)


def test_takes_trace_elbos_vectorize_particles_keyword():
    # A user swapping Trace_ELBO(num_particles=K, vectorize_particles=True) for this class got
    # "unexpected keyword argument 'vectorize_particles'".
    elbo = TraceRLOO_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    assert elbo.vectorize_particles and elbo.num_particles == 4
    with pytest.raises(ValueError, match="vectorize_particles must be True, got False"):
        TraceRLOO_ELBO(num_particles=4, vectorize_particles=False)
    # Positional arguments keep their meaning (the keyword came in before retain_graph).
    assert TraceRLOO_ELBO(4, 1, True).retain_graph is True


@pytest.mark.parametrize("enumerate_", ["parallel", "sequential"])
def test_enumerated_guide_site_raises(enumerate_):
    params = {"logits": LOGITS.expand(3, 4)}
    guide = config_enumerate(categorical_guide, default=enumerate_)
    with pytest.raises(ValueError, match="site 'z' asks to be enumerated.*TraceEnum_ELBO"):
        TraceRLOO_ELBO(2).loss(categorical_model, guide, params)


# Subsampling: ten data, five a step, the log-densities scaled by 10 / 5.

SIGNS = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0], **F64)


def subsampled_model(logits, subsamples=None):
    with pyro.plate("replicates", len(logits), dim=-2):
        with pyro.plate("data", 10, subsample_size=5, dim=-1) as index:
            z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.5, **F64)))
            pyro.sample("x", dist.Normal(4 * z - 2, 1.0), obs=2 * SIGNS[index])


def subsampled_guide(logits, subsamples=None):
    with pyro.plate("replicates", len(logits), dim=-2):
        with pyro.plate("data", 10, subsample_size=5, dim=-1) as index:
            pyro.sample("z", dist.Bernoulli(logits=logits[:, index]))
    if subsamples is not None:
        subsamples.append(index)


def test_svi_with_subsampling():
    """40 SVI steps on five of ten data at a time move every datum's logit to the side of its
    observation, and the losses stay finite."""

    def guide(logits):
        subsampled_guide(pyro.param("logits", logits))

    svi = SVI(subsampled_model, guide, Adam({"lr": 0.2}), TraceRLOO_ELBO(4))
    losses = [svi.step(torch.zeros(1, 10, **F64)) for _ in range(40)]
    assert all(math.isfinite(loss) for loss in losses)
    assert torch.equal(pyro.param("logits").detach().sign(), SIGNS.unsqueeze(0))


def test_subsampled_gradient_is_scaled_and_unbiased():
    """Given the five data of a step, each one's gradient estimates 10 / 5 times its exact
    gradient: 20 steps of 500 copies, their z-scores standard normal (LEVEL)."""
    subsamples, draws = [], {i: [] for i in range(10)}
    elbo = TraceRLOO_ELBO(4, max_plate_nesting=2)  # traces the guide once per step
    for _ in range(20):
        logits = torch.full((500, 10), 0.4, **F64, requires_grad=True)
        elbo.loss_and_grads(subsampled_model, subsampled_guide, logits, subsamples)
        for i in subsamples[-1].tolist():
            draws[i].append(logits.grad[:, i])
    leaf = torch.full((10,), 0.4, **F64, requires_grad=True)
    z = torch.tensor([[0.0], [1.0]], **F64)
    log_q = dist.Bernoulli(logits=leaf).log_prob(z)
    cost = math.log(0.5) + dist.Normal(4 * z - 2, 1.0).log_prob(2 * SIGNS) - log_q
    (exact,) = torch.autograd.grad(-(log_q.exp() * cost).sum(), leaf)
    z_scores = []
    for i, values in draws.items():
        values = torch.cat(values)
        z_scores.append((values.mean() - 2 * exact[i]) / (values.std() / math.sqrt(len(values))))
    assert_z_scores_are_standard(torch.stack(z_scores), "the data")

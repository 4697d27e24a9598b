"""AutoRelaxed: the guide of each relaxed family, trained to the exact posterior of the discrete
model, alone and next to AutoNormal."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.transforms import Planar
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.optim import Adam, ClippedAdam
from registry import EXAMPLES
from torch.distributions import kl_divergence

import pyro_relax as pr
from pyro_relax.infer._sites import relaxed_base
from pyro_relax.infer.autoguide import AutoRelaxed

pytestmark = pytest.mark.usefixtures("fresh_pyro")


def _total_variation(p, q):
    return 0.5 * (p - q).abs().sum(-1)


def _exact_posterior(prior, x):
    """The posterior PMF of the truncated discrete model ``k ~ prior.discrete()``,
    ``x ~ Normal(k, 1)``, by enumerating the outcomes."""
    discrete = prior.discrete()
    x = torch.as_tensor(x, dtype=discrete.logits.dtype).unsqueeze(-1)
    return (discrete.logits + dist.Normal(prior.outcomes, 1.0).log_prob(x)).softmax(-1)


def _schedule():
    # The README's schedule with a lower floor: the relaxation's bias is about proportional to
    # the temperature.
    return pr.ExponentialDecay(1.0, 0.05, steps=200)


def _train(model, guide, schedule, x, steps, particles, max_plate_nesting):
    """Trains with the temperature annealed in place by ``schedule``, which the guide shares
    with the model, while the learning rate decays from 0.1 to 0.001, so that the last
    iterates average out Adam's noise."""
    elbo = Trace_ELBO(
        num_particles=particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting
    )
    svi = SVI(model, guide, ClippedAdam({"lr": 0.1, "lrd": 0.01 ** (1 / steps)}), elbo)
    for _ in range(steps):
        svi.step(x)
        schedule.step()


# --- 1. The README's quick-start model reaches the exact posterior -------------------------------


def test_quick_start_model_reaches_the_exact_posterior():
    # The README's model (Poisson(3) prior truncated to 25 outcomes, x = 7 seen through unit
    # Gaussian noise) with free logits in place of the Poisson rate: the family holds the exact
    # posterior, which Trace_ELBO reaches as the temperature falls. The relaxation leaves a
    # total variation of about 0.02 at temperature 0.1 (3000 steps, 256 particles), less at
    # 0.05; with Adam's noise after 400 steps, 0.018 to 0.025 over seeds 0 to 11. The prior is
    # 0.6 away.
    schedule = _schedule()

    def model(x):
        z = pyro.sample("z", pr.GenGSPoisson(torch.tensor(3.0), schedule.temperature, 25))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    guide = AutoRelaxed(model)
    _train(model, guide, schedule, torch.tensor(7.0), steps=400, particles=64, max_plate_nesting=0)
    prior = pr.GenGSPoisson(torch.tensor(3.0), 0.1, 25)
    exact = _exact_posterior(prior, 7.0)
    assert _total_variation(prior.discrete().probs, exact) > 0.5
    assert _total_variation(guide.discrete()["z"].probs, exact) < 0.05


@pytest.mark.parametrize("family", ["IGR", "GappedSTCategorical"])
def test_igr_and_straight_through_guides_reach_the_exact_posterior(family):
    # One category of three, x = 2.5 seen through unit Gaussian noise of the effects (-1, 0, 2).
    # The prior PMF in closed form: IGR(0, 1)'s limit puts Phi(0)^2 = 1/4 on the last category
    # and 3/8 on each other, the uniform logits 1/3 each; the posterior by enumeration. Over
    # seeds 0 to 3 the guides ended 0.056 to 0.076 (IGR, its relaxation's bias) and 0.014 to
    # 0.024 (GST) from it in total variation; the prior is over 0.6 away.
    schedule = _schedule()
    effects = torch.tensor([-1.0, 0.0, 2.0])

    def model(x):
        if family == "IGR":
            prior = pr.IGR(torch.zeros(2), torch.ones(2), schedule.temperature)
        else:
            prior = pr.GappedSTCategorical(schedule.temperature, logits=torch.zeros(3))
        z = pyro.sample("z", prior)
        pyro.sample("x", dist.Normal(z @ effects, 1.0), obs=x)

    guide = AutoRelaxed(model)
    _train(model, guide, schedule, torch.tensor(2.5), steps=400, particles=64, max_plate_nesting=0)
    prior = [3 / 8, 3 / 8, 1 / 4] if family == "IGR" else [1 / 3] * 3
    joint = [p * math.exp(-0.5 * (2.5 - e) ** 2) for p, e in zip(prior, [-1, 0, 2], strict=True)]
    exact = torch.tensor(joint) / sum(joint)
    assert _total_variation(torch.tensor(prior), exact) > 0.6
    assert _total_variation(guide.discrete()["z"].probs, exact) < 0.12


# --- 2. One latent per item inside a plate, subsampled or not ------------------------------------

ITEMS = torch.tensor([0.0, 2.0, 4.0, 6.0, 8.0])


def _plated_model(schedule, subsample_size):
    def model(x):
        with pyro.plate("items", len(x), subsample_size=subsample_size) as index:
            z = pyro.sample("z", pr.GenGSPoisson(torch.tensor(3.0), schedule.temperature, 20))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[index])

    return model


@pytest.mark.parametrize("subsample_size", [None, 3])
def test_plated_model_reaches_each_items_posterior(subsample_size):
    # Five items, each its own count latent and observation, with the quick-start test's
    # tolerance per item. A subsample of 3 updates each item on 3 steps in 5, hence more steps.
    # The largest of the five distances was 0.023 to 0.039 over seeds 0 to 11 without
    # subsampling, 0.017 to 0.030 with.
    schedule = _schedule()
    model = _plated_model(schedule, subsample_size)
    guide = AutoRelaxed(model)
    steps = 400 if subsample_size is None else 600
    _train(model, guide, schedule, ITEMS, steps=steps, particles=64, max_plate_nesting=1)
    exact = _exact_posterior(pr.GenGSPoisson(torch.tensor(3.0), 0.1, 20), ITEMS)
    posterior = guide.discrete()["z"].probs
    assert posterior.shape == (5, 20)
    assert (_total_variation(posterior, exact) < 0.05).all()


def test_subsampled_plate_uses_the_rows_of_the_subsample():
    model = _plated_model(pr.ExponentialDecay(1.0, 0.1, steps=10), subsample_size=3)
    guide = AutoRelaxed(model)
    guide(ITEMS)
    logits = pyro.param("AutoRelaxed.logits.z").detach()
    with torch.no_grad():
        logits.copy_(torch.randn(logits.shape))  # distinct rows
    trace = poutine.trace(guide).get_trace(ITEMS)
    index = trace.nodes["items"]["value"]
    site = trace.nodes["z"]
    assert logits.shape == (5, 20)
    assert site["value"].shape == (3,)
    torch.testing.assert_close(site["fn"].logits, logits[index].log_softmax(-1))


def test_a_temperature_expanded_over_a_subsample_of_two_is_seen_through():
    # The model expands its temperature over a subsample of 2: the guide reads it without the
    # added dimension (stride 0, size 2), so that it broadcasts with the plate's 6 items, as
    # for a subsample of 3 (a size-2 expansion was kept, and discrete() raised that (2,) does
    # not broadcast with (6,)).
    tau = torch.tensor(0.5)

    def model():
        with pyro.plate("items", 6, subsample_size=2):
            pyro.sample("z", pr.GenGSPoisson(torch.tensor(3.0), tau.expand(2), 10))

    guide = AutoRelaxed(model)
    guide()
    assert guide.discrete()["z"].probs.shape == (6, 10)
    fn = relaxed_base(poutine.trace(guide).get_trace().nodes["z"]["fn"])
    torch.testing.assert_close(fn.temperature, torch.full((2,), 0.5))


def test_exclusions_item_by_item_in_a_subsampled_plate_are_refused():
    # The guide's logits started from the first subsample's prior, repeated to the other items,
    # -inf included: an item with a total count of 8 got the exclusions of one with 1, and its
    # guide could never reach its own outcomes (posterior mean 0.99 where 7 is right), silently.
    # Any subsample of three holds an item with a total count of 1.
    counts = torch.tensor([1.0, 1.0, 1.0, 1.0, 8.0, 8.0])
    observed = torch.tensor([1.0, 0.0, 1.0, 1.0, 7.0, 6.0])

    def model(subsample_size):
        with pyro.plate("items", 6, subsample_size=subsample_size) as index:
            z = pyro.sample("z", pr.GenGS(dist.Binomial(counts[index], 0.5), 0.5, 9))
            pyro.sample("x", dist.Normal(z, 0.5), obs=observed[index])

    with pytest.raises(ValueError, match="'z' lies in the subsampled plate 'items'.*item by"):
        AutoRelaxed(lambda: model(3))()
    # Without subsampling every item starts from its own prior.
    guide = AutoRelaxed(lambda: model(None))
    guide()
    logits = pyro.param("AutoRelaxed.logits.z").detach()
    assert logits[:4, 2:].isneginf().all() and logits[4:].isfinite().all()


def test_an_exclusion_shared_by_every_item_is_repeated_to_the_whole_plate():
    outcomes = torch.tensor([0.0, 1.0, 2.0, 3.0])
    prior_logits = torch.tensor([0.0, 0.5, -math.inf, 0.2])  # the same for every item

    def model():
        with pyro.plate("items", 6, subsample_size=2):
            pyro.sample("z", pr.TruncatedGenGS(0.5, logits=prior_logits, outcomes=outcomes))

    guide = AutoRelaxed(model)
    guide()
    logits = pyro.param("AutoRelaxed.logits.z").detach()
    assert logits.shape == (6, 4)
    assert logits[:, 2].isneginf().all() and logits[:, [0, 1, 3]].isfinite().all()

    # The same exclusion held item by item (a table indexed by the subsample) cannot be told
    # from one that differs between items outside the subsample: refused, saying how to pass it.
    table = prior_logits.expand(6, 4).clone()

    def per_item_model():
        with pyro.plate("items", 6, subsample_size=2) as index:
            pyro.sample("z", pr.TruncatedGenGS(0.5, logits=table[index], outcomes=outcomes))

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="give the prior its parameter unexpanded"):
        AutoRelaxed(per_item_model)()


# --- 3. Each family gets a guide of its own kind -------------------------------------------------

TAU = torch.tensor(0.5)  # one temperature tensor: the guides must share it
FLOWS = [Planar(3)]  # an IGR-Planar prior with fixed flows, built once


def _family(prior, guide_class, parameters, options=(), kl=True):
    """A prior, the class its guide must have, the guide's parameter shapes inside a plate of
    4 (by container), the options the guide must copy from the prior, and whether a KL from
    the guide to the prior is registered."""
    return pytest.param(prior, guide_class, parameters, options, kl, id=type(prior()).__name__)


FAMILIES = [
    _family(
        lambda: pr.GenGSPoisson(torch.tensor(2.0), TAU, 12, hard=True),
        pr.TruncatedGenGS,
        {"logits": (4, 12)},
        ("hard", "outcomes"),
    ),
    _family(
        lambda: pr.GenGS(dist.Poisson(torch.tensor(2.0)), TAU, max_truncation=12),
        pr.TruncatedGenGS,
        {"logits": (4, 12)},  # -inf logits beyond the automatic truncation
        ("outcomes",),
    ),
    _family(lambda: pr.GenGSGeometric(TAU, 10, probs=0.4), pr.TruncatedGenGS, {"logits": (4, 10)}),
    _family(
        lambda: pr.GenGSNegativeBinomial(3.0, TAU, 15, probs=0.3),
        pr.TruncatedGenGS,
        {"logits": (4, 15)},
    ),
    _family(lambda: pr.GenGSBinomial(6, TAU, probs=0.3), pr.TruncatedGenGS, {"logits": (4, 7)}),
    _family(
        lambda: pr.GenGSMultinomial(3, TAU, probs=torch.tensor([0.2, 0.3, 0.5])),
        pr.TruncatedGenGS,
        {"logits": (4, 10)},  # vector outcomes: the 10 count vectors summing to 3
        ("outcomes",),
    ),
    _family(
        lambda: pr.TruncatedGenGS(TAU, logits=torch.zeros(4), outcomes=[-1.0, 0.5, 2.0, 3.0]),
        pr.TruncatedGenGS,
        {"logits": (4, 4)},
        ("outcomes",),
    ),
    _family(
        lambda: pr.IGR(torch.zeros(3), torch.ones(3), TAU, delta=2.0, hard=True),
        pr.IGR,
        {"locs": (4, 3), "scales": (4, 3)},
        ("delta", "hard"),
    ),
    _family(
        lambda: pr.IGRStickBreaking(torch.zeros(5), torch.ones(5), TAU, precision=0.9),
        pr.IGRStickBreaking,
        {"locs": (4, 5), "scales": (4, 5)},
        ("precision",),
        kl=False,  # no closed form with a precision
    ),
    _family(
        lambda: pr.IGRPlanar(torch.zeros(3), torch.ones(3), TAU, flows=FLOWS),
        pr.IGRPlanar,
        {"locs": (4, 3), "scales": (4, 3)},
        ("flows",),  # torch's KL of transformed distributions: the same transforms
    ),
    _family(
        lambda: pr.IGRCount(torch.zeros(6), torch.ones(6), TAU),
        pr.IGRCount,
        {"locs": (4, 6), "scales": (4, 6)},
    ),
    _family(
        lambda: pr.STCategorical(TAU, logits=torch.zeros(5)), pr.STCategorical, {"logits": (4, 5)}
    ),
    _family(
        lambda: pr.STGSCategorical(TAU, logits=torch.zeros(5), hard=False),
        pr.STGSCategorical,
        {"logits": (4, 5)},
        ("hard",),
    ),
    _family(
        lambda: pr.GRMCKCategorical(TAU, logits=torch.zeros(5), num_draws=3),
        pr.GRMCKCategorical,
        {"logits": (4, 5)},
        ("num_draws",),
    ),
    _family(
        lambda: pr.GappedSTCategorical(
            TAU, logits=torch.zeros(5), gap="expected", detach_perturbations=False
        ),
        pr.GappedSTCategorical,
        {"logits": (4, 5)},
        ("gap", "detach_perturbations"),
    ),
    _family(
        lambda: pr.GappedST(dist.OneHotCategorical(logits=torch.zeros(5)), TAU, gap=0.5),
        pr.GappedSTCategorical,
        {"logits": (4, 5)},
        ("gap",),
    ),
    _family(lambda: pr.STBernoulli(TAU, logits=0.3), pr.STBernoulli, {"logits": (4,)}),
    _family(
        lambda: pr.STGSBernoulli(TAU, logits=0.3, hard=False),
        pr.STGSBernoulli,
        {"logits": (4,)},
        ("hard",),
    ),
    _family(
        lambda: pr.GRMCKBernoulli(TAU, logits=0.3, num_draws=3),
        pr.GRMCKBernoulli,
        {"logits": (4,)},
        ("num_draws",),
    ),
    _family(
        lambda: pr.GappedSTBernoulli(TAU, logits=0.3, gap=0.5),
        pr.GappedSTBernoulli,
        {"logits": (4,)},
        ("gap",),
    ),
]


def test_every_public_relaxation_has_its_family_case():
    # The cases above are written by hand (each names the guide's class, parameters and copied
    # options): a public relaxation the registry builds and no case covers fails here, rather
    # than going untested by AutoRelaxed.
    public = {getattr(pr, name) for name in pr.__all__}
    built = {type(e.build()) for e in EXAMPLES} & public
    covered = {type(case.values[0]()) for case in FAMILIES}
    assert not built - covered, sorted(cls.__name__ for cls in built - covered)


def _plated(prior):
    def model():
        with pyro.plate("items", 4):
            pyro.sample("z", prior())

    return model


def _observed(prior):
    # The latent seen through Gaussian noise (a weighted sum of a vector's coordinates: a
    # one-hot's plain sum says nothing), so that the posterior differs from the prior at which
    # the guide starts (there a closed-form KL has no gradient).
    def model():
        with pyro.plate("items", 4):
            z = pyro.sample("z", prior())
            score = z if z.dim() == 1 else z @ torch.arange(1.0, z.shape[-1] + 1)
            pyro.sample("x", dist.Normal(score, 1.0), obs=torch.full((4,), 2.0))

    return model


def _options_equal(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("prior, guide_class, parameters, options, kl", FAMILIES)
def test_each_family_gets_its_guide(prior, guide_class, parameters, options, kl):
    model = _plated(prior)
    guide = AutoRelaxed(model)
    guide_site = poutine.trace(guide).get_trace().nodes["z"]
    model_site = poutine.trace(model).get_trace().nodes["z"]
    relaxed = relaxed_base(guide_site["fn"])
    assert type(relaxed) is guide_class
    assert guide_site["value"].shape == model_site["value"].shape
    assert guide_site["fn"].batch_shape == model_site["fn"].batch_shape
    assert guide_site["fn"].event_shape == model_site["fn"].event_shape
    store = pyro.get_param_store()
    shapes = {name: tuple(store[name].shape) for name in store}
    assert shapes == {f"AutoRelaxed.{kind}.z": shape for kind, shape in parameters.items()}
    model_prior = relaxed_base(model_site["fn"])
    for name in options:
        assert _options_equal(getattr(relaxed, name), getattr(model_prior, name)), name
    if kl:  # TraceMeanField_ELBO's closed form
        divergence = kl_divergence(guide_site["fn"], model_site["fn"])
        assert divergence.shape == (4,) and torch.isfinite(divergence).all()
    else:
        with pytest.raises(NotImplementedError):
            kl_divergence(guide_site["fn"], model_site["fn"])


@pytest.mark.parametrize("prior, guide_class, parameters, options, kl", FAMILIES)
def test_discrete_posteriors_carry_no_gradient(prior, guide_class, parameters, options, kl):
    # discrete() runs without gradients, but a Bernoulli built from the parameter leaf computed
    # its probs later, with one: .numpy() on them raised.
    guide = AutoRelaxed(_plated(prior))
    guide()
    posterior = guide.discrete()["z"]
    while isinstance(posterior, dist.Independent):
        posterior = posterior.base_dist
    for name in ("probs", "logits"):
        assert not getattr(posterior, name).requires_grad, name


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("prior, guide_class, parameters, options, kl", FAMILIES)
def test_each_family_trains(prior, guide_class, parameters, options, kl, elbo):
    model = _observed(prior)
    guide = AutoRelaxed(model)
    svi = SVI(model, guide, Adam({"lr": 0.05}), elbo(max_plate_nesting=1))
    losses = [svi.step()]  # creates the parameters
    start = {name: value.detach().clone() for name, value in guide.named_parameters()}
    losses += [svi.step() for _ in range(2)]
    assert all(math.isfinite(loss) for loss in losses), losses
    # No NaN; -inf logits (outcomes beyond an automatic truncation) stay excluded.
    assert not any(p.isnan().any() or p.isposinf().any() for p in guide.parameters())
    # Every parameter learns: a detached or unused one would keep its start.
    assert start and all(
        not torch.equal(value, start[name]) for name, value in guide.named_parameters()
    ), sorted(name for name, value in guide.named_parameters() if torch.equal(value, start[name]))


def test_reinterpreted_batch_dimensions_get_parameters_per_element():
    # `to_event` makes the 3 rates one event: the guide keeps a relaxation per element.
    def model():
        with pyro.plate("items", 4):
            rates = torch.tensor([1.0, 2.0, 3.0])
            pyro.sample("z", pr.GenGSPoisson(rates, TAU, 12).to_event(1))

    guide = AutoRelaxed(model)
    site = poutine.trace(guide).get_trace().nodes["z"]
    assert (site["fn"].batch_shape, site["fn"].event_shape) == ((4,), (3,))
    assert pyro.param("AutoRelaxed.logits.z").shape == (4, 3, 12)
    prior = pr.GenGSPoisson(torch.tensor([1.0, 2.0, 3.0]), TAU, 12)
    torch.testing.assert_close(guide.discrete()["z"].base_dist.probs[0], prior.discrete().probs)


# --- Temperature and initialization --------------------------------------------------------------


# The model's own float64 distributions hold copies of the float32 temperature, and say so.
@pytest.mark.filterwarnings("ignore:.*updating it in place .annealing. does not reach")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_guides_share_the_model_temperature_tensor(dtype):
    # A float32 schedule with parameters of either dtype: with float64 parameters, each
    # distribution's own temperature is a float64 copy, which the in-place update does not
    # reach (the guide stayed at 1.0 while the model annealed); the guide follows the tensor
    # the model passed.
    schedule = pr.ExponentialDecay(1.0, 0.1, steps=2)

    def model():
        tau = schedule.temperature
        with pyro.plate("items", 3):
            pyro.sample("count", pr.GenGSPoisson(torch.tensor(2.0, dtype=dtype), tau, 10))
            outcomes = torch.tensor([0.0, 1.5, 4.0], dtype=dtype)
            pyro.sample("table", pr.TruncatedGenGS(tau, logits=outcomes, outcomes=outcomes))
            pyro.sample("category", pr.GappedSTCategorical(tau, logits=torch.zeros(4, dtype=dtype)))
            pyro.sample("binary", pr.STGSBernoulli(tau, logits=torch.zeros((), dtype=dtype)))
            pyro.sample(
                "simplex", pr.IGR(torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype), tau)
            )

    guide = AutoRelaxed(model)
    guide()
    schedule.step()  # anneals the tensor in place
    trace = poutine.trace(guide).get_trace()
    for name in ("count", "table", "category", "binary", "simplex"):
        temperature = relaxed_base(trace.nodes[name]["fn"]).temperature
        assert temperature.dtype == dtype, name
        expected = torch.full((3,), schedule.value_at(1), dtype=dtype)
        torch.testing.assert_close(temperature, expected, msg=name)


def test_temperature_argument_replaces_the_models():
    prior = lambda: pr.STGSCategorical(TAU, logits=torch.zeros(5))  # noqa: E731
    guide = AutoRelaxed(_plated(prior), temperature=0.2)
    fn = relaxed_base(poutine.trace(guide).get_trace().nodes["z"]["fn"])
    torch.testing.assert_close(fn.temperature, torch.full((4,), 0.2))
    # A tensor (say, a schedule's, annealed in place) raised AttributeError '_pyro_params'.
    schedule = pr.ExponentialDecay(1.0, 0.1, steps=2)
    guide = AutoRelaxed(_plated(prior), temperature=schedule.temperature)
    guide()
    schedule.step()
    fn = relaxed_base(poutine.trace(guide).get_trace().nodes["z"]["fn"])
    torch.testing.assert_close(fn.temperature, torch.full((4,), schedule.value_at(1)))


def test_a_planar_site_keeps_the_temperature_of_the_model_under_a_temperature_argument():
    # IGR-Planar has no inverse: its prior scores only samples of its own map, temperature
    # included. So AutoRelaxed(temperature=...) leaves such a site at the model's temperature
    # (documented); at the argument's, the first SVI step raised that the flows differ.
    prior = lambda: pr.IGRPlanar(torch.zeros(3), torch.ones(3), TAU, flows=FLOWS)  # noqa: E731
    model = _plated(prior)
    guide = AutoRelaxed(model, temperature=0.2)
    loss = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO()).step()
    assert math.isfinite(loss)
    fn = relaxed_base(poutine.trace(guide).get_trace().nodes["z"]["fn"])
    torch.testing.assert_close(fn.temperature, torch.full((4,), float(TAU)))


def test_guides_start_at_the_prior():
    def model():
        pyro.sample("count", pr.GenGSPoisson(torch.tensor(2.0), TAU, 10))
        pyro.sample("simplex", pr.IGR(torch.zeros(3), torch.full((3,), 2.0), TAU))

    guide = AutoRelaxed(model, init_scale=0.5)
    discrete = guide.discrete()
    prior = pr.GenGSPoisson(torch.tensor(2.0), TAU, 10).discrete()
    torch.testing.assert_close(discrete["count"].probs, prior.probs)
    torch.testing.assert_close(guide.locs.simplex.detach(), torch.zeros(3))
    torch.testing.assert_close(guide.scales.simplex.detach(), torch.ones(3))


# --- 4. Next to AutoNormal, through AutoGuideList ------------------------------------------------


def test_autoguidelist_combines_autorelaxed_with_autonormal():
    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 5.0))
        z = pyro.sample("z", pr.GenGSPoisson(torch.tensor(3.0), 0.3, 15))
        pyro.sample("count", pr.GenGSPoisson(torch.tensor(3.0), 0.3, 15), obs=torch.tensor(2.0))
        pyro.sample("x", dist.Normal(z + shift, 1.0), obs=x)

    x = torch.tensor(7.0)
    relaxed = AutoRelaxed.relaxed_sites(model, x)
    assert relaxed == ["z"]  # observed relaxed sites are the model's
    guide = AutoGuideList(model)
    guide.append(AutoRelaxed(poutine.block(model, expose=relaxed)))
    guide.append(AutoNormal(poutine.block(model, hide=relaxed)))
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(20)]
    assert all(math.isfinite(loss) for loss in losses)
    store = pyro.get_param_store()
    assert {"AutoGuideList.0.logits.z", "AutoGuideList.1.locs.shift"} <= set(store)
    trace = poutine.trace(guide).get_trace(x)
    assert type(trace.nodes["z"]["fn"]) is pr.TruncatedGenGS
    assert set(guide(x)) == {"z", "shift"}


# --- 5. Errors -----------------------------------------------------------------------------------


def test_non_relaxed_latent_site_is_named_with_the_recipe():
    def model():
        pyro.sample("z", pr.GenGSPoisson(torch.tensor(3.0), 0.3, 15))
        pyro.sample("shift", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'shift'.*AutoGuideList"):
        AutoRelaxed(model)()


def test_model_without_latent_sites_is_an_error():
    def model():
        pyro.sample("x", pr.GenGSPoisson(torch.tensor(3.0), 0.3, 15), obs=torch.tensor(1.0))

    with pytest.raises(ValueError, match="no latent site"):
        AutoRelaxed(model)()


@pytest.mark.parametrize(
    "init_scale, error",
    [
        (0.0, ValueError),
        (-1.0, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ("1", TypeError),
    ],
)
def test_bad_init_scale_is_an_error(init_scale, error):
    with pytest.raises(error, match="init_scale"):
        AutoRelaxed(lambda: None, init_scale=init_scale)


class _OtherRelaxation(dist.Normal):
    """A relaxation (it has ``discrete``) of no family AutoRelaxed knows."""

    def discrete(self):
        return dist.Bernoulli(0.5)


def test_relaxation_of_an_unknown_family_is_an_error():
    def model():
        pyro.sample("z", _OtherRelaxation(0.0, 1.0))

    with pytest.raises(ValueError, match="no guide for the site 'z'"):
        AutoRelaxed(model)()


# --- median and quantiles -----------------------------------------------------------------------


def _prior_guide(prior, plate_size=None):
    """AutoRelaxed of a model with one site of ``prior``, at its initialization (the prior's
    own discrete distribution, for the GenGS and straight-through families)."""

    def model():
        if plate_size is None:
            pyro.sample("z", prior)
        else:
            with pyro.plate("items", plate_size):
                pyro.sample("z", prior)

    pyro.clear_param_store()  # a second guide of a site "z" would find the first's values
    guide = AutoRelaxed(model)
    guide()
    return guide


@pytest.mark.parametrize("rate", [0.3, 2.2, 4.7])
def test_median_and_quantiles_of_a_count_site_are_those_of_its_pmf(rate):
    # AutoGuideList.median and .quantiles call every part: AutoRelaxed raised a bare
    # NotImplementedError, so a guide with a relaxed part gave neither. A guide initialized at
    # a Poisson prior truncated far in its tail has the Poisson's quantiles (scipy's ppf: the
    # smallest count whose CDF reaches the level).
    import scipy.stats

    guide = _prior_guide(pr.GenGSPoisson(torch.tensor(rate), 0.5, 40))
    levels = [0.05, 0.25, 0.5, 0.9, 0.99]
    expected = torch.tensor(scipy.stats.poisson.ppf(levels, rate), dtype=torch.float32)
    assert torch.equal(guide.quantiles(levels)["z"], expected)
    assert guide.median()["z"] == float(scipy.stats.poisson.median(rate))


def test_median_of_outcomes_in_any_order_and_of_bernoulli_sites():
    # TruncatedGenGS outcomes need not be sorted: the CDF runs over the sorted values.
    outcomes = torch.tensor([5.0, -1.0, 2.0])
    # P(-1) = 0.3, P(2) = 0.15, P(5) = 0.55: CDF -1: 0.3, 2: 0.45, 5: 1.
    probs = torch.tensor([0.55, 0.3, 0.15])
    guide = _prior_guide(pr.TruncatedGenGS(0.5, probs=probs, outcomes=outcomes))
    assert guide.median()["z"] == 5.0
    levels = [0.0, 0.29, 0.31, 0.44, 0.46, 1.0]  # off the CDF's steps, which float32 rounds
    assert guide.quantiles(levels)["z"].tolist() == [-1, -1, 2, 2, 5, 5]
    # An outcome without mass is never a quantile, also at level 0 (the least outcome with mass).
    guide = _prior_guide(
        pr.TruncatedGenGS(0.5, probs=torch.tensor([0.0, 0.5, 0.5]), outcomes=[0.0, 1.0, 2.0])
    )
    assert guide.quantiles([0.0, 0.5, 1.0])["z"].tolist() == [1, 1, 2]
    # Bernoulli: P(X <= 0) = 1 - p, so the median is 1 exactly where p > 1/2.
    logits = torch.tensor([-1.0, 0.0, 2.0])
    guide = _prior_guide(pr.STBernoulli(0.5, logits=logits), plate_size=3)
    assert guide.median()["z"].tolist() == [0.0, 0.0, 1.0]
    # P(X <= 0) = 0.73, 0.5, 0.12.
    assert guide.quantiles([0.1, 0.6, 0.8])["z"].tolist() == [[0, 0, 0], [0, 1, 1], [1, 1, 1]]


def test_median_and_quantiles_of_a_vector_site_are_its_most_probable_outcome():
    # Quantiles of a vector site raised NotImplementedError, and AutoGuideList.quantiles, which
    # asks every part, then gave no quantiles of the other parts' sites either.
    import itertools

    import scipy.stats

    guide = _prior_guide(pr.GappedSTCategorical(1.0, logits=torch.tensor([0.0, 2.0, 1.0])))
    assert guide.median()["z"].tolist() == [0.0, 1.0, 0.0]
    assert guide.quantiles([0.1, 0.5, 0.9])["z"].tolist() == [[0.0, 1.0, 0.0]] * 3
    probs = [0.2, 0.3, 0.5]
    vectors = [v for v in itertools.product(range(5), repeat=3) if sum(v) == 4]
    mode = max(vectors, key=lambda v: scipy.stats.multinomial.pmf(v, 4, probs))
    guide = _prior_guide(pr.GenGSMultinomial(4, 0.5, probs=torch.tensor(probs)))
    assert tuple(guide.median()["z"].tolist()) == mode


def test_median_and_quantiles_come_through_autoguidelist_with_the_full_plate():
    # The usual composition: AutoNormal for the continuous site, AutoRelaxed for the counts,
    # in a subsampled plate; the medians have the plate's full size, as AutoNormal's.
    def model():
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        with pyro.plate("items", 6, subsample_size=2):
            pyro.sample("z", pr.GenGSPoisson(rate, 0.5, 30))

    relaxed = AutoRelaxed.relaxed_sites(model)
    guide = AutoGuideList(model)
    guide.append(AutoRelaxed(poutine.block(model, expose=relaxed)))
    guide.append(AutoNormal(poutine.block(model, hide=relaxed)))
    guide()
    medians = guide.median()
    assert set(medians) == {"rate", "z"} and medians["z"].shape == (6,)
    quantiles = guide.quantiles([0.1, 0.9])
    assert quantiles["z"].shape == (2, 6) and bool((quantiles["z"][0] <= quantiles["z"][1]).all())


# A Bernoulli site's quantiles are a comparison with the CDF, which does not check the levels
# itself (as a GenGS site's icdf does): AutoRelaxed must.
@pytest.mark.parametrize(
    "prior",
    [
        lambda: pr.GenGSPoisson(torch.tensor(2.0), 0.5, 20),
        lambda: pr.STBernoulli(0.5, probs=torch.tensor(0.3)),
    ],
    ids=["GenGSPoisson", "STBernoulli"],
)
@pytest.mark.parametrize("levels", [[], [1.5], [-0.1], [math.nan]])
def test_quantile_levels_outside_the_unit_interval_are_refused(levels, prior):
    guide = _prior_guide(prior())
    with pytest.raises(ValueError, match=r"levels must lie in \[0, 1\]"):
        guide.quantiles(levels)


def test_a_run_resumed_as_the_readme_says_continues_exactly():
    # The README's recipe: rebuild the guide, call it once (its first call traces the model and
    # draws noise), then load the guide's, the schedule's and the optimizer's states and the
    # random state. Loading the random state before that call changed every later draw.
    x = ITEMS

    def run(steps, saved=None):
        pyro.clear_param_store()
        schedule = pr.ExponentialDecay(1.0, 0.1, steps=20)
        model = _plated_model(schedule, subsample_size=None)
        guide = AutoRelaxed(model)
        optim = Adam({"lr": 0.05})
        svi = SVI(model, guide, optim, Trace_ELBO(max_plate_nesting=1))
        if saved is not None:
            guide(x)
            guide.load_state_dict(saved["guide"])
            schedule.load_state_dict(saved["schedule"])
            optim.set_state(saved["optim"])  # (taken up by the optimizer's first step)
            torch.set_rng_state(saved["rng"])
        for _ in range(steps):
            svi.step(x)
            schedule.step()
        state = {
            "guide": {k: v.clone() for k, v in guide.state_dict().items()},
            "schedule": schedule.state_dict(),
            "optim": optim.get_state(),
            "rng": torch.get_rng_state(),
        }
        return state

    torch.manual_seed(0)
    uninterrupted = run(10)
    torch.manual_seed(0)
    first = run(5)
    resumed = run(5, saved=first)
    for name, value in uninterrupted["guide"].items():
        assert torch.equal(resumed["guide"][name], value), name

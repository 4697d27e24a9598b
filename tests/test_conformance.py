"""Generic checks that every example in the registry passes."""

import copy
import inspect
import io
import math
import pickle
import warnings

import pytest
import scipy.stats
import torch
from registry import EXAMPLES
from statistical import assert_z_scores_are_standard, z_scores
from torch.distributions import kl_divergence
from torch.distributions.utils import lazy_property

from pyro_relax import TruncatedGenGS, relaxation_of, with_relaxation

every_example = pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
categorical = [e for e in EXAMPLES if e.categories is not None]


def _first_partner_or_none(example):
    return example.kl_partners[0]() if example.kl_partners else None


@every_example
@pytest.mark.parametrize("sample_shape", [(), (5,), (2, 3)], ids=str)
def test_shapes_and_dtype(example, sample_shape):
    d = example.build()
    for value in (d.rsample(sample_shape), d.sample(sample_shape)):
        assert value.shape == torch.Size(sample_shape) + d.batch_shape + d.event_shape
        assert value.dtype == example.dtype
        log_prob = d.log_prob(value)
        assert log_prob.shape == torch.Size(sample_shape) + d.batch_shape
        assert log_prob.dtype == example.dtype


@every_example
def test_expand(example):
    d = example.build()
    batch_shape = torch.Size((4,)) + d.batch_shape
    expanded = d.expand(list(batch_shape))  # Pyro's plates pass a list
    assert type(expanded) is type(d)
    assert expanded.batch_shape == batch_shape
    assert expanded.rsample((2,)).shape == (2,) + batch_shape + d.event_shape
    value = d.rsample((2, 1))
    expected = d.log_prob(value).expand((2,) + batch_shape)
    torch.testing.assert_close(expanded.log_prob(value), expected)
    for partner in example.kl_partners:
        assert kl_divergence(expanded, partner()).shape == batch_shape


def _read_every_property(d):
    # What a user's code (or a plate's repr) may read before a plate expands the distribution:
    # each property and lazy property of the distribution and of the distribution it wraps.
    for obj in (d, getattr(d, "base_dist", None)):
        if obj is None:
            continue
        for name in dir(type(obj)):
            attribute = inspect.getattr_static(type(obj), name, None)
            if isinstance(attribute, (property, lazy_property)) and not name.startswith("__"):
                try:
                    getattr(obj, name)
                except (NotImplementedError, ValueError, RuntimeError):
                    pass


@every_example
def test_expand_draws_what_the_distribution_draws(example):
    # An expanded distribution is the distribution repeated: under one seed it draws the same
    # values as the original asked for the same leading shape (a dropped option, `hard` say, or
    # parameters not expanded along with the batch fail here, as shapes alone do not), its
    # parameters have the new batch shape, and expansion works whatever was read before (a
    # lazy property of a wrapped distribution can make it refuse to expand).
    d = example.build()
    _read_every_property(d)
    batch_shape = torch.Size((4,)) + d.batch_shape
    expanded = d.expand(batch_shape)
    for sample_shape in ((), (2,)):
        torch.manual_seed(7)
        expected = d.rsample(sample_shape + (4,))
        torch.manual_seed(7)
        torch.testing.assert_close(expanded.rsample(sample_shape), expected)
    for name in example.learnable:
        parameter = getattr(expanded, name, None)
        if torch.is_tensor(parameter):
            assert parameter.shape[: len(batch_shape)] == batch_shape, name


@every_example
def test_samples_lie_in_support(example):
    torch.manual_seed(0)
    d = example.build()
    value = d.rsample((500,))
    assert d.support.check(value).all()
    assert torch.isfinite(d.log_prob(value)).all()


@every_example
def test_pickle_round_trip(example):
    d = example.build()
    clone = pickle.loads(pickle.dumps(d))
    torch.manual_seed(1)
    value = d.rsample((3,))
    torch.manual_seed(1)
    torch.testing.assert_close(clone.rsample((3,)), value, rtol=0, atol=0)
    torch.testing.assert_close(clone.log_prob(value), d.log_prob(value))


@every_example
def test_a_record_moves_only_to_a_value_of_its_shape(example):
    # with_relaxation attached any record to any tensor: a batch of draws' record on one value
    # (or one draw's on a batch) was then scored silently, as the record's draw and shape.
    d = example.build()
    value = d.rsample((2,))
    record = relaxation_of(value)
    moved = with_relaxation(value.detach().clone(), record)
    torch.testing.assert_close(d.log_prob(moved), d.log_prob(value))
    for other in (value[0].detach().clone(), torch.stack([value, value]).detach()):
        with pytest.raises(ValueError, match="a record must describe the same draw"):
            with_relaxation(other, record)


def _changed(name, value, example):
    """A new value for a parameter: the temperature halved (an annealing step), a real one
    shifted (an optimizer step); others kept (a new rate can change the outcomes)."""
    if name == "temperature":
        return value * 0.5
    if example.learnable.get(name) is torch.distributions.constraints.real:
        return value + 0.25
    return value


@every_example
def test_a_sample_scores_alike_whether_its_parameters_change_in_place_or_are_replaced(example):
    # A record held the map parameters an IGR draw was made with by reference: after an
    # in-place update (ExponentialDecay's temperature, an optimizer step on a flow) it described
    # the draw by the new values, and the sample was scored through its old pre-image. So were
    # a copy of the sample and a saved one, made after the update.
    params = example.parameters()
    old = {name: value.clone() for name, value in params.items()}
    torch.manual_seed(2)
    value = example.build(params).rsample((3,))
    torch.manual_seed(2)
    reference = example.build(old).rsample((3,))
    new = {name: _changed(name, tensor, example) for name, tensor in params.items()}
    for name, tensor in params.items():
        tensor.copy_(new[name])  # the sample's own parameters, updated in place
    replaced = _score(example.build(new), reference)
    for sample in (value, copy.deepcopy(value), _saved_and_loaded(value)):
        in_place = _score(example.build(params), sample)
        if isinstance(replaced, str):  # outside the new map's image, or no inverse (planar)
            assert in_place == replaced
        else:
            tolerance = dict(rtol=1e-4, atol=1e-4) if example.dtype == torch.float32 else {}
            torch.testing.assert_close(in_place, replaced, **tolerance)


def _reloaded(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@every_example
def test_a_sample_changed_in_place_is_scored_as_a_plain_value(example):
    # In-place operations keep a tensor's attributes: a sample overwritten with another draw
    # (or shifted by add_) was scored silently by its old record, as the draw it no longer is.
    d = example.build()
    torch.manual_seed(6)
    value, other = d.rsample((2,)), d.rsample((2,))
    d.log_prob(value)
    with torch.no_grad():
        value.copy_(other)
    assert relaxation_of(value) is None
    # A copy made after the change, in memory or through a file, does not revive the record
    # (the copy's counter is its own, and it took the stale record on trust).
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(value), torch.load(buffer)):
        assert relaxation_of(copied) is None
    # A copy read once, then changed in place, is void as the original is; so is a copy of it.
    for copied in (copy.deepcopy(other), _reloaded(other)):
        assert relaxation_of(copied) is not None
        with torch.no_grad():
            copied.add_(1)
        assert relaxation_of(copied) is None and relaxation_of(copy.deepcopy(copied)) is None
    in_place, plain = _score(d, value), _score(d, other.detach().clone())
    if isinstance(plain, str):
        assert in_place == plain
    else:
        torch.testing.assert_close(in_place, plain)
    moved = with_relaxation(value, relaxation_of(other))  # attached again: the draw's own score
    torch.testing.assert_close(d.log_prob(moved), d.log_prob(other))


def _saved_and_loaded(value):
    """``value`` after ``torch.save`` and ``torch.load`` (its default, ``weights_only``)."""
    buffer = io.BytesIO()
    torch.save({"value": value}, buffer)
    buffer.seek(0)
    return torch.load(buffer)["value"]


def _score(d, value):
    """``log_prob``, or the message of the ``ValueError`` it raises."""
    try:
        return d.log_prob(value)
    except ValueError as error:
        return str(error)


@every_example
def test_a_temperature_annealed_in_place_reaches_the_distribution_or_a_warning_says_why(example):
    # A temperature of another dtype than the parameters' is converted, a copy: annealing the
    # tensor in place then left the distribution at its first temperature, silently.
    params = example.parameters()
    d = example.build(params)
    params["temperature"].mul_(0.5)
    torch.testing.assert_close(
        d.temperature, params["temperature"].expand_as(d.temperature), rtol=0, atol=0
    )
    other = torch.float32 if example.dtype == torch.float64 else torch.float64
    with pytest.warns(UserWarning, match="updating it in place .annealing. does not reach"):
        example.build(params, temperature=params["temperature"].to(other))


@every_example
def test_bad_temperature_is_rejected(example):
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            example.build(temperature=torch.tensor(bad, dtype=example.dtype))
    for bad in (None, "hot"):  # None gave AttributeError: 'NoneType' object has no attribute
        with pytest.raises(TypeError, match="`temperature` must be a"):
            example.build(temperature=bad)


@every_example
def test_values_and_gradients_are_finite(example):
    torch.manual_seed(2)
    params = example.parameters(requires_grad=True)
    d = example.build(params)
    value = d.rsample((64,))
    loss = value.square().sum() + d.log_prob(value).sum()
    for partner in example.kl_partners:
        loss = loss + kl_divergence(d, partner()).sum()
    assert torch.isfinite(value).all() and torch.isfinite(loss)
    loss.backward()
    for name in example.learnable:
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name


def _weighted_sum(value):
    # A scalar of the sample with unequal weights: a plain sum is constant where the
    # coordinates sum to one, and would carry no gradient.
    weights = torch.linspace(0.5, 2.0, value.numel(), dtype=value.dtype).reshape(value.shape)
    return (weights * value).sum()


@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if e.learnable and not e.surrogate_gradient], ids=lambda e: e.id
)
def test_samples_alone_carry_the_gradient(example):
    # The pathwise gradient reaches every learnable parameter through the sample itself, not
    # only through log_prob or a KL (a detached rsample passes the test above).
    torch.manual_seed(2)
    params = example.parameters(requires_grad=True)
    d = example.build(params)
    value = d.rsample((64,))
    grads = torch.autograd.grad(_weighted_sum(value), [params[n] for n in example.learnable])
    for name, grad in zip(example.learnable, grads, strict=True):
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if "temperature" in e.params], ids=lambda e: e.id
)
def test_the_temperature_changes_what_is_drawn(example):
    # Under one seed, a temperature four times larger gives other values or, for a
    # straight-through estimator whose values are the outcomes themselves, another surrogate
    # gradient. No other test differentiates a straight-through class by its temperature.
    def draw(scale):
        torch.manual_seed(8)
        params = example.parameters(requires_grad=True)
        params["temperature"] = params["temperature"] * scale
        value = example.build(params).rsample((16,))
        if not example.surrogate_gradient:
            return [value.detach()]
        return torch.autograd.grad(_weighted_sum(value), [params[n] for n in example.learnable])

    for cold, warm in zip(draw(1.0), draw(4.0), strict=True):
        assert not torch.allclose(cold, warm, rtol=1e-6, atol=0)


# By the temperature only where the value's gradient is the derivative: a straight-through
# value's gradient is a surrogate's, and log_prob of a fixed one-hot does not involve it.
_differentiated = [(e, "learnable") for e in EXAMPLES if e.learnable] + [
    (e, "temperature") for e in EXAMPLES if "temperature" in e.params and not e.surrogate_gradient
]


@pytest.mark.parametrize(
    "example, wrt", _differentiated, ids=[f"{wrt}-{e.id}" for e, wrt in _differentiated]
)
@pytest.mark.filterwarnings("ignore:.*temperature requires a gradient")
def test_gradients_match_finite_differences_to_the_second_order(example, wrt):
    # Every hand-written backward and every composition of them, against central differences
    # in float64, first and second order (a guide's gradient may itself be differentiated:
    # gradient penalties, Hessian-vector products), by the learnable parameters and by the
    # temperature (which a user may learn). The function: an rsample value (the noise fixed by
    # the seed) and its log_prob, and by the learnable parameters every registered KL (some
    # have a closed form only between equal temperatures); for a straight-through estimator,
    # whose gradient is a surrogate's by design, log_prob of a fixed value instead of the
    # sample. gradcheck's tolerances: atol 1e-5, rtol 1e-3. The temperature's gradient past
    # excluded outcomes (a score of -inf) failed as NaN before `tempered`.
    base = {name: value.detach().double() for name, value in example.params.items()}
    names = list(example.learnable) if wrt == "learnable" else ["temperature"]
    torch.manual_seed(7)
    fixed = example.build(base, validate_args=False).sample((2,))

    def outputs(*differentiated):
        params = {**base, **dict(zip(names, differentiated, strict=True))}
        d = example.build(params, validate_args=False)
        torch.manual_seed(8)
        if example.surrogate_gradient:
            values = [d.log_prob(fixed)]
        else:
            z = d.rsample((2,))
            values = [z, d.log_prob(z)]
        if wrt == "learnable":
            values += [kl_divergence(d, partner()) for partner in example.kl_partners]
        return tuple(values)

    inputs = tuple(base[name].clone().requires_grad_() for name in names)
    assert torch.autograd.gradcheck(outputs, inputs)
    torch.manual_seed(9)  # gradgradcheck draws its upstream gradients at random
    assert torch.autograd.gradgradcheck(outputs, inputs)


def _torch_func_examples(test):
    """Every example with a learnable parameter and static shapes (automatic truncation reads
    the host to build and cannot be vmapped). functorch runs the relaxed one-hot's in-place
    addcmul_ (its backward) through a slower loop; torch's forward mode scripts its
    decompositions at first use (torch 2.13)."""
    examples = [e for e in EXAMPLES if e.learnable and e.static_shapes]
    for ignored in (
        "ignore:There is a performance drop because we have not yet",
        "ignore:`torch.jit.script` is deprecated:DeprecationWarning",
    ):
        test = pytest.mark.filterwarnings(ignored)(test)
    return pytest.mark.parametrize("example", examples, ids=lambda e: e.id)(test)


def _draw_at(example):
    """The example's first learnable parameter in float64, and a function that builds the
    distribution at a value of it and draws two samples under a fixed seed."""
    base = {name: value.detach().double() for name, value in example.params.items()}
    name = next(iter(example.learnable))

    def draw(x):
        d = example.build({**base, name: x}, validate_args=False)
        torch.manual_seed(3)
        return d, d.rsample((2,))

    return base[name], draw


def _sample_score_and_kls(example, draw, x):
    d, z = draw(x)
    kls = sum(kl_divergence(d, partner()).sum() for partner in example.kl_partners)
    return z.sum() + d.log_prob(z).sum() + kls


@_torch_func_examples
def test_torch_func_grad_and_vmap_agree_with_autograd(example):
    # torch.func runs through the library's autograd Functions (setup_context, a vmap rule, a
    # jvp): its gradient of an rsample value, its log_prob and the KLs, by the first learnable
    # parameter, equals autograd's, and so does its forward-mode derivative along a direction;
    # vmap over three copies of that parameter (the noise shared,
    # randomness="same") equals autograd on each copy with the same noise. Examples that read
    # the host to build (automatic truncation) cannot be vmapped, by design.
    x, draw = _draw_at(example)

    def loss(x):
        return _sample_score_and_kls(example, draw, x)

    def autograd_grad(x):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(loss(x), x)[0]

    gradient = autograd_grad(x)
    torch.testing.assert_close(torch.func.grad(loss)(x), gradient, rtol=1e-10, atol=1e-12)
    # Forward mode: the derivative along a direction is the gradient's inner product with it.
    direction = torch.linspace(-1.0, 1.0, x.numel(), dtype=x.dtype).reshape(x.shape)
    _, derivative = torch.func.jvp(loss, (x,), (direction,))
    torch.testing.assert_close(derivative, (gradient * direction).sum(), rtol=1e-9, atol=1e-11)
    with torch.autograd.forward_ad.dual_level():  # forward mode without torch.func
        dual = loss(torch.autograd.forward_ad.make_dual(x, direction))
        derivative = torch.autograd.forward_ad.unpack_dual(dual).tangent
    torch.testing.assert_close(derivative, (gradient * direction).sum(), rtol=1e-9, atol=1e-11)
    batch = torch.stack([x, x * 0.9, x * 1.1])
    vmapped = torch.func.vmap(torch.func.grad(loss), randomness="same")(batch)
    looped = torch.stack([autograd_grad(row) for row in batch])
    torch.testing.assert_close(vmapped, looped, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.learnable], ids=lambda e: e.id)
def test_parameters_that_carry_provenance_keep_their_gradient_and_provenance(example):
    # Pyro's TraceGraph_ELBO wraps what depends on a score-function site in ProvenanceTensor,
    # which cut the library's autograd Functions' outputs from the graph: a relaxed site
    # downstream of such a site got no gradient at all. The sample, its score and the KLs must
    # keep both the gradient (equal to the plain parameters') and the provenance.
    from pyro.ops.provenance import ProvenanceTensor, get_provenance

    name = next(iter(example.learnable))

    def run(wrap):
        params = example.parameters(requires_grad=True)
        leaf = params[name]
        if wrap:
            params[name] = ProvenanceTensor(leaf * 1, frozenset({"k"}))
        d = example.build(params)
        torch.manual_seed(3)
        z = d.rsample((2,))
        terms = [z, d.log_prob(z)] + [
            kl_divergence(d, partner()) for partner in example.kl_partners
        ]
        if wrap:
            assert all(get_provenance(term) == {"k"} for term in terms)
        total = sum(term.sum() for term in terms)
        return torch.autograd.grad(total, leaf)[0]

    torch.testing.assert_close(run(True), run(False))


# Where a repr shows a parameter under another name than the factory's.
_SHOWN_AS = {"GenGSMultinomial": {"probs": "class_logits"}}


@every_example
def test_the_repr_shows_the_parameters(example):
    # torch's repr lists only arg_constraints entries in the instance's __dict__: a
    # GenGSPoisson showed its temperature and not its rate, an IGRCount nothing at all.
    d = example.build()
    text = repr(d)
    assert text.startswith(type(d).__name__ + "(")
    for name in example.learnable:
        shown = [name, example.through.get(name), _SHOWN_AS.get(example.id, {}).get(name)]
        assert any(n is not None and f"{n}:" in text for n in shown), (name, text)


@every_example
def test_an_integral_sample_is_scored_alike_in_an_integer_dtype(example):
    # Observed data come as integer or boolean tensors: the straight-through Bernoulli classes
    # raised from torch's Bernoulli (which scores floating values only) where the categorical
    # and count classes scored them as the same floating value.
    torch.manual_seed(0)
    d = example.build()
    value = d.sample((3,))
    if not bool((value == value.round()).all()):  # a relaxed value: no integer twin
        assert not (getattr(d, "hard", False) and example.categories is not None)
        return
    expected = d.log_prob(value.clone())
    dtypes = [torch.long] + ([torch.bool] if bool(((value == 0) | (value == 1)).all()) else [])
    for dtype in dtypes:
        torch.testing.assert_close(d.log_prob(value.to(dtype)), expected)


@pytest.mark.parametrize(
    "example",
    [e for e in EXAMPLES if torch.is_tensor(e.params.get("temperature"))],
    ids=lambda e: e.id,
)
def test_a_temperature_copied_to_another_dtype_is_warned_of_once(example):
    # The copy is not reached by in-place annealing: one warning per construction (the count
    # classes and GenGSMultinomial parsed the temperature twice and warned twice).
    params = example.parameters()
    other = torch.float32 if example.dtype == torch.float64 else torch.float64
    params["temperature"] = params["temperature"].to(other)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        example.build(params)
    copied = [w for w in caught if "the temperature tensor" in str(w.message)]
    assert len(copied) == 1, [str(w.message) for w in caught]


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kl_partners], ids=lambda e: e.id)
def test_a_kl_of_batch_shapes_that_do_not_broadcast_is_refused_by_name(example):
    # Only the IGR pairs named the problem; the others raised torch's broadcasting error from
    # deep in the arithmetic ("The size of tensor a (2) must match ...").
    d = example.build()
    p = d.expand((2,) + d.batch_shape)
    for partner in example.kl_partners:
        q = partner().expand((3,) + d.batch_shape)
        with pytest.raises(ValueError, match=r"KL\(.* \|\| .*\).*do not broadcast"):
            kl_divergence(p, q)


@_torch_func_examples
def test_torch_func_jacobians_and_hessians_agree_with_autograd(example):
    # jacrev batches the cotangents that reach the library's backward formulas while the
    # tensors they saved are not batched: an in-place update of a saved-size tensor by a
    # cotangent failed there (GenGS's value alone: "vmap: inplace arithmetic"). The Jacobian of
    # the sample, and the Hessians the README prescribes (forward over reverse with the noise
    # shared, reverse over reverse) of the sample alone and of sample + log_prob + KLs, equal
    # autograd's.
    x, draw = _draw_at(example)

    def value(x):
        return draw(x)[1].reshape(-1)

    def total(x):
        return _sample_score_and_kls(example, draw, x)

    expected = torch.autograd.functional.jacobian(value, x)
    torch.testing.assert_close(torch.func.jacrev(value)(x), expected, rtol=1e-10, atol=1e-12)
    for f in (lambda x: value(x).sum(), total):
        hessian = torch.autograd.functional.hessian(f, x)
        forward_over_reverse = torch.func.jacfwd(torch.func.jacrev(f), randomness="same")(x)
        reverse_over_reverse = torch.func.jacrev(torch.func.jacrev(f))(x)
        torch.testing.assert_close(forward_over_reverse, hessian, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(reverse_over_reverse, hessian, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.static_shapes], ids=lambda e: e.id)
def test_noise_and_constants_follow_the_parameters_device(example):
    # On the meta device any tensor made on the CPU by mistake fails to combine, and any read
    # on the host (.item(), bool(), int()) raises: the path a GPU user pays for each step.
    d = example.build(example.parameters(device="meta"), validate_args=False)
    value = d.rsample((2,))
    assert value.device.type == "meta"
    assert d.log_prob(value).device.type == "meta"
    assert d.expand((3,) + d.batch_shape).rsample().device.type == "meta"


@pytest.mark.parametrize("example", categorical, ids=lambda e: e.id)
def test_category_probs_match_an_independent_reference(example):
    # `category_probs` reads the PMF off the class under test, so every test below that scores
    # against it would pass a wrong PMF that is wrong alike everywhere; the registry's reference
    # computes it from the parameters with torch's, Pyro's or scipy's own distributions.
    assert example.reference_probs is not None, f"{example.id}: give a reference_probs"
    params = example.parameters()
    d = example.build(params)
    probs = example.category_probs(d)
    expected = example.reference_probs(params, d)
    assert probs.shape == expected.shape and probs.dtype == expected.dtype
    tolerance = example.reference_tolerance
    torch.testing.assert_close(
        probs, expected, atol=tolerance or None, rtol=0 if tolerance else None
    )


@pytest.mark.parametrize("example", categorical, ids=lambda e: e.id)
def test_plain_outcomes_carry_all_the_mass(example):
    # From log_prob, not from `category_probs`: a class's `probs` is a softmax of its logits,
    # normalized whatever logits log_prob scores with. Every outcome of positive probability
    # lies in the support (draws at small rates need not reach the last outcomes).
    d = example.build()
    probs = example.category_probs(d)
    total = 0
    for k in range(probs.shape[-1]):
        index = torch.full(d.batch_shape, k, dtype=torch.long)
        value = example.values_of(d, index)
        assert d.support.check(value)[probs[..., k] > 0].all(), k
        total = total + d.log_prob(value).exp()
    torch.testing.assert_close(total, torch.ones_like(total))


@pytest.mark.parametrize("example", categorical, ids=lambda e: e.id)
def test_plain_outcomes_are_scored_by_the_discrete_pmf(example):
    d = example.build()
    probs = example.category_probs(d)
    for k in range(probs.shape[-1]):
        index = torch.full(d.batch_shape, k, dtype=torch.long)
        torch.testing.assert_close(d.log_prob(example.values_of(d, index)), probs[..., k].log())


@pytest.mark.parametrize("example", categorical, ids=lambda e: e.id)
def test_goodness_of_fit(example):
    # The outcome each sample stands for follows the discrete PMF: one chi-square test over all
    # batch elements (bins with expected count below 5 pooled), rejecting at p < 1e-3.
    torch.manual_seed(3)
    num_samples = 4000
    d = example.build()
    probs = example.category_probs(d).reshape(-1, example.category_probs(d).shape[-1])
    index = example.categories(d, d.sample((num_samples,))).reshape(num_samples, -1)
    statistic, dof = 0.0, 0
    for element in range(probs.shape[0]):
        observed = torch.bincount(index[:, element], minlength=probs.shape[1]).double()
        expected = num_samples * probs[element].double()
        small = expected < 5
        assert observed[expected == 0].sum() == 0
        observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
        keep = expected > 0
        statistic += float(((observed - expected).square() / expected)[keep].sum())
        dof += int(keep.sum()) - 1
    assert scipy.stats.chi2.sf(statistic, dof) > 1e-3


def _point_mass_effect(d, q):
    """What a plain count distribution ``q`` adds to the average log-ratio by scoring the last
    outcome ``n - 1`` of a GenGS over the counts ``0..n-1`` by its point mass, where the KL
    scores it by the tail ``P(X >= n - 1)``: ``P_d(n - 1) log(P_q(X >= n - 1) / P_q(n - 1))``
    per batch element, and 0 for other pairs."""
    if not isinstance(d, TruncatedGenGS) or isinstance(q, TruncatedGenGS):
        return 0.0
    n = d.logits.shape[-1]
    counts = torch.arange(n, dtype=torch.float64)
    if d.outcomes.shape != counts.shape or not torch.equal(d.outcomes.double(), counts):
        return 0.0
    batch = tuple(d.batch_shape)
    last = torch.as_tensor(d.truncation - 1).expand(batch).unsqueeze(-1)
    grid = counts.to(q.mean.dtype).reshape((-1,) + (1,) * len(batch))
    log_q = q.log_prob(grid).double().expand((n, *batch)).movedim(0, -1)
    head = torch.where(torch.arange(n) < last, log_q.exp(), 0.0).sum(-1)
    p_last = d.probs.double().expand((*batch, n)).gather(-1, last).squeeze(-1)
    return p_last * (torch.log1p(-head) - log_q.gather(-1, last).squeeze(-1))


@pytest.mark.parametrize("example", [e for e in categorical if e.kl_partners], ids=lambda e: e.id)
def test_kl_matches_monte_carlo(example):
    # KL(d || q) against the average log-ratio of outcomes drawn from d's discrete PMF, in
    # standard errors, standard normal at LEVEL per partner (statistical.py; the batch
    # elements' draws are independent). A plain count distribution scores the last outcome by
    # its point mass, not its tail as the KL does: that effect is computed and subtracted
    # (below 1e-3 in these examples but one: 0.056 nats for TruncatedGenGS-implicit against
    # Poisson(2), whose d gives the last of its 8 outcomes mass 0.2). The error less a fixed
    # allowance of 2e-3, as before: where the log-ratio is nearly constant its standard error is
    # near 0, and rounding alone spans many of them.
    torch.manual_seed(4)
    num_samples = 20000
    d = example.build()
    index = torch.distributions.Categorical(example.category_probs(d)).sample((num_samples,))
    value = example.values_of(d, index)
    for make_partner in example.kl_partners:
        q = make_partner()
        kl = kl_divergence(d, q)
        assert kl.shape == d.batch_shape
        ratio = d.log_prob(value) - q.log_prob(value)
        error = ratio.mean(0) - kl - _point_mass_effect(d, q)
        z = z_scores(error, ratio.std(0) / math.sqrt(num_samples), 2e-3)
        assert_z_scores_are_standard(z, f"{example.id}, KL(d || {type(q).__name__})")


@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if e.exact_density and e.kl_partners], ids=lambda e: e.id
)
def test_kl_matches_monte_carlo_of_the_density(example):
    # KL(d || q) against the average of log d - log q over d's own rsample values (exact
    # densities: the estimate is unbiased): the error less a fixed allowance of 1e-3, in
    # standard errors, standard normal at LEVEL per partner (statistical.py).
    torch.manual_seed(5)
    num_samples = 10000
    d = example.build()
    value = d.rsample((num_samples,))
    for make_partner in example.kl_partners:
        q = make_partner()
        kl = kl_divergence(d, q)
        assert kl.shape == d.batch_shape
        ratio = (d.log_prob(value) - q.log_prob(value)).detach()
        z = z_scores(ratio.mean(0) - kl.detach(), ratio.std(0) / math.sqrt(num_samples), 1e-3)
        assert_z_scores_are_standard(z, f"{example.id}, KL(d || {type(q).__name__})")


@every_example
def test_discrete_is_the_distribution_relaxed(example):
    # `discrete()` has the relaxation's shapes, its draws are values it scores finitely, and
    # (where the registry knows the PMF) it scores each outcome by that PMF.
    torch.manual_seed(5)
    d = example.build()
    discrete = d.discrete()
    assert discrete.batch_shape == d.batch_shape and discrete.event_shape == d.event_shape
    assert not discrete.has_rsample
    value = discrete.sample((50,))
    assert value.shape == (50,) + d.batch_shape + d.event_shape
    assert torch.isfinite(discrete.log_prob(value)).all()
    if example.category_probs is None:
        return
    torch.manual_seed(6)  # Monte Carlo PMFs (IGR-SB, IGR-Planar) drawn alike in both calls
    probs = example.category_probs(d)
    torch.manual_seed(6)
    discrete = d.discrete()
    for k in range(probs.shape[-1]):
        index = torch.full(d.batch_shape, k, dtype=torch.long)
        expected = probs[..., k].log()
        torch.testing.assert_close(discrete.log_prob(example.values_of(d, index)), expected)


@every_example
def test_moments_and_entropy_are_those_of_the_discrete_distribution(example):
    # The library's one convention (README, "What log_prob and the KL mean"): `mean`,
    # `variance` and `entropy` describe the discrete variable the relaxation stands for, as
    # its KLs do, or raise NotImplementedError (IGR: its relaxed samples' have no closed
    # form). A soft straight-through class returned the categorical's mean undocumented.
    # Every statistic a class lacks says so and where to look instead: torch's base classes
    # raised NotImplementedError with no message (GenGS's entropy, IGR's mean), and a
    # TransformedDistribution's cdf of a number failed inside softmax++'s inverse.
    d = example.build()
    discrete = d.discrete()
    for name in ("mean", "variance", "mode", "entropy", "cdf", "icdf"):
        try:
            value = getattr(d, name)
            if name in ("cdf", "icdf"):
                value = value(torch.tensor(0.5))
            value = value() if callable(value) else value
        except NotImplementedError as error:
            message = str(error)
            assert message.startswith(f"{type(d).__name__}.{name}: ") and "discrete()" in message
            continue
        if name not in ("mean", "variance", "entropy"):
            continue
        expected = getattr(discrete, name)
        expected = expected() if callable(expected) else expected
        torch.testing.assert_close(value, expected, msg=f"{example.id}: {name}")


@pytest.mark.parametrize(
    "example", [e for e in categorical if not e.reference_tolerance], ids=lambda e: e.id
)
def test_moments_and_entropy_follow_the_reference_pmf(example):
    # The test above compares a class with its own discrete(), often the same code: here the
    # moments come from the registry's exact PMF (not a Monte Carlo one) and the outcomes'
    # plain values, as sum_k p_k v_k, sum_k p_k (v_k - mean)^2 per coordinate, -sum_k p_k log p_k.
    params = example.parameters()
    d = example.build(params)
    probs = example.reference_probs(params, d)
    outcomes = range(probs.shape[-1])
    index = [torch.full(d.batch_shape, k, dtype=torch.long) for k in outcomes]
    values = torch.stack([example.values_of(d, k) for k in index])  # (n,) + batch + event
    weights = probs.movedim(-1, 0).reshape(
        values.shape[: 1 + len(d.batch_shape)] + (1,) * len(d.event_shape)
    )
    mean = (weights * values).sum(0)
    torch.testing.assert_close(d.mean, mean)
    torch.testing.assert_close(d.variance, (weights * (values - mean).square()).sum(0))
    torch.testing.assert_close(d.entropy(), -torch.special.xlogy(probs, probs).sum(-1))


@every_example
def test_autocast_changes_neither_samples_nor_densities(example):
    # Under torch.autocast the relaxations keep float32 (README): IGRCount's map onto the
    # counts and IGRPlanar's flows ran their products in bfloat16 (counts off by 0.16,
    # log-densities by 0.02). The same draws with and without autocast must agree.
    params = {
        name: value.float() if value.is_floating_point() else value
        for name, value in example.parameters().items()
    }

    def draw():
        d = example.build(params, validate_args=False)
        torch.manual_seed(2)
        value = d.rsample((3,))
        return value, d.log_prob(value)

    value, log_prob = draw()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_value, cast_log_prob = draw()
    assert cast_value.dtype == value.dtype and cast_log_prob.dtype == log_prob.dtype
    torch.testing.assert_close(cast_value, value)
    torch.testing.assert_close(cast_log_prob, log_prob)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.static_shapes], ids=lambda e: e.id)
def test_vmap_draws_different_noise_with_validation_on(example):
    # randomness="different" (the README names it): the IGR family filled its Gaussian noise
    # in place, which vmap refuses on an unbatched tensor. With validation on (Pyro's
    # default), every class failed with torch's "data-dependent control flow" error from its
    # own parameter check.
    params = example.parameters()
    name = next(name for name, value in params.items() if value.is_floating_point())

    def draw(x):
        d = example.build({**params, name: x}, validate_args=True)
        value = d.rsample()
        return value, d.log_prob(value)

    batch = torch.stack([params[name]] * 16)
    torch.manual_seed(0)
    values, scores = torch.func.vmap(draw, randomness="different")(batch)
    assert values.shape[0] == scores.shape[0] == 16 and torch.isfinite(values).all()
    # Hard or cold values may repeat an outcome, but not over 16 independent draws.
    assert not all(torch.equal(values[0], row) for row in values[1:])


@every_example
def test_a_relaxed_sample_space_refuses_enumeration_by_name(example):
    # A relaxed site marked for enumeration raised a bare NotImplementedError (GenGS) or was
    # enumerated anyway and failed in log_prob (soft straight-through).
    d = example.build()
    if d.has_enumerate_support:
        assert d.enumerate_support().shape[1:] == d.batch_shape + d.event_shape
        return
    with pytest.raises(NotImplementedError, match=f"{type(d).__name__} .*cannot be enumerated"):
        d.enumerate_support()


@every_example
def test_a_saved_sample_loads_with_its_record(example):
    # torch.load's default (weights_only=True) refused the record a relaxed sample carries
    # (and, for the IGR family, the class it names).
    d = example.build()
    torch.manual_seed(4)
    value = d.rsample()
    loaded = _saved_and_loaded(value)
    assert (relaxation_of(loaded) is None) == (relaxation_of(value) is None)
    torch.testing.assert_close(d.log_prob(loaded), d.log_prob(value))


@every_example
def test_log_prob_of_anything_but_a_tensor_is_torchs_value_error(example):
    # A list or a Python number reached `value.is_floating_point()` in most classes: an
    # AttributeError, where torch (and the straight-through categoricals) raise ValueError.
    d = example.build()
    value = d.sample()
    for plain in (value.tolist(), 1.0):
        with pytest.raises(ValueError, match="must be a Tensor"):
            d.log_prob(plain)

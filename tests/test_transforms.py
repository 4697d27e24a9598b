"""Generic checks of the library's transforms, generated from a list of instances (float64)."""

import math
import pickle

import pyro
import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_relax.transforms import SigmoidSticksTransform, SoftmaxPlusPlusTransform

_f64 = torch.float64

# (id, transform, input shape): every transform maps R^(K-1) vectors, batched.
TRANSFORMS = [
    ("softmax++", SoftmaxPlusPlusTransform(0.5), (3, 4)),
    ("softmax++-delta", SoftmaxPlusPlusTransform(2.0, delta=0.1), (3, 4)),
    ("softmax++-cold", SoftmaxPlusPlusTransform(0.05, delta=3.0), (2, 3)),
    (
        "softmax++-batched",
        SoftmaxPlusPlusTransform(torch.tensor([0.3, 1.0], dtype=_f64), torch.tensor(2.0)),
        (2, 5),
    ),
    ("softmax++-K2", SoftmaxPlusPlusTransform(0.7), (4, 1)),
    ("sticks", SigmoidSticksTransform(), (3, 4)),
    ("sticks-K2", SigmoidSticksTransform(), (2, 1)),
]
every_transform = pytest.mark.parametrize(
    "transform, shape", [t[1:] for t in TRANSFORMS], ids=[t[0] for t in TRANSFORMS]
)


def _inputs(shape):
    torch.manual_seed(0)
    return torch.randn(shape, dtype=_f64) * 1.5


def _plain(value):
    # A copy without the attributes a transform attaches to its outputs.
    return value.detach().clone()


@every_transform
def test_round_trip(transform, shape):
    x = _inputs(shape)
    y = transform(x)
    assert transform.codomain.check(y).all()
    torch.testing.assert_close(transform.inv(y), x)  # through what the output carries
    torch.testing.assert_close(transform.inv(_plain(y)), x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(transform(transform.inv(_plain(y))), y)


@every_transform
def test_log_det_matches_autograd(transform, shape):
    x = _inputs(shape)
    log_det = transform.log_abs_det_jacobian(x, transform(x))
    assert log_det.shape == shape[:-1]
    for index in range(shape[0]):

        def row(v, index=index):
            # Only the first K - 1 coordinates of a simplex point are free.
            return transform(torch.cat([x[:index], v[None], x[index + 1 :]]))[index, : shape[-1]]

        expected = torch.linalg.slogdet(jacobian(row, x[index]))[1]
        torch.testing.assert_close(log_det[index], expected)


@every_transform
def test_shapes(transform, shape):
    x = _inputs(shape)
    y = transform(x)
    assert transform.forward_shape(x.shape) == y.shape
    assert transform.inverse_shape(y.shape) == x.shape
    assert transform.inv(y).shape == x.shape


@every_transform
def test_equality_and_pickling(transform, shape):
    clone = pickle.loads(pickle.dumps(transform))
    assert clone == transform and not clone != transform
    # Equal transforms hash alike (softmax++ hashed its identity: a set held two equal ones).
    assert hash(clone) == hash(transform) and len({clone, transform}) == 1
    assert transform != SoftmaxPlusPlusTransform(123.0)
    x = _inputs(shape)
    torch.testing.assert_close(clone(x), transform(x))


@every_transform
def test_cache(transform, shape):
    cached = transform.with_cache(1)
    assert cached == transform
    x = _inputs(shape)
    y = cached(x)
    assert cached(x) is y
    assert cached.inv(y) is x


def test_softmax_plus_plus_temperature_limits():
    x = torch.tensor([[1.0, -2.0, 0.5], [-1.0, -0.3, -2.0]], dtype=_f64)
    # Proposition 1: the vertex of argmax x when max x > 0, else the last one.
    cold = SoftmaxPlusPlusTransform(1e-3, delta=2.0)(x)
    torch.testing.assert_close(cold, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]], dtype=_f64))
    hot = SoftmaxPlusPlusTransform(1e9, delta=2.0)(x)
    torch.testing.assert_close(hot, torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=_f64).expand(2, 4) / 5)


def test_softmax_plus_plus_outputs_pass_the_simplex_check_in_float32():
    # torch's check allows 1e-6; summing 50 float32 softmax outputs can miss it.
    torch.manual_seed(1)
    x = torch.randn(2000, 49) * 3
    for temperature in (1.0, 0.1, 0.01):
        z = SoftmaxPlusPlusTransform(temperature)(x)
        assert torch.distributions.constraints.simplex.check(z).all()


def test_softmax_plus_plus_inverts_underflowed_outputs_through_the_log_twin():
    x = torch.tensor([[3.0, -3.0, 0.5]])
    t = SoftmaxPlusPlusTransform(0.01)
    z = t(x)
    assert (z == 0).any()  # float32 underflow at this temperature
    torch.testing.assert_close(t.inv(z), x)
    # Another softmax++ (a prior scoring a guide's sample) inverts it as well.
    other = SoftmaxPlusPlusTransform(0.02, delta=2.0)
    expected = other.inv(t(x.double())).float()
    torch.testing.assert_close(other.inv(z), expected)
    assert torch.isfinite(t.inv(_plain(z))).all()  # without the twin: clamped, finite


SOFTMAX_PLUS_PLUS = [t for t in TRANSFORMS if isinstance(t[1], SoftmaxPlusPlusTransform)]


@pytest.mark.parametrize(
    "transform, shape", [t[1:] for t in SOFTMAX_PLUS_PLUS], ids=[t[0] for t in SOFTMAX_PLUS_PLUS]
)
@pytest.mark.parametrize("outputs", ["z", "log z", "both"])
def test_softmax_plus_plus_gradients_match_finite_differences(transform, shape, outputs):
    # The fused backward of z and log z, first and second order, against finite differences,
    # for each output alone (the other's gradient is None) and both together.
    picked = {"z": [0], "log z": [1], "both": [0, 1]}[outputs]

    def forward(x):
        pair = transform.simplex_and_log(x)
        return tuple(pair[i] for i in picked)

    x = _inputs(shape).requires_grad_()
    assert torch.autograd.gradcheck(forward, (x,))
    assert torch.autograd.gradgradcheck(forward, (x,))


def test_softmax_plus_plus_gradient_of_a_coordinate_near_one_is_accurate():
    # At a low temperature the top coordinate rounds to 1 in float32; its gradient must still
    # be the float64 one (to float32's resolution), not the difference of two rounded numbers.
    x = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    transform = SoftmaxPlusPlusTransform(0.05)
    jac32 = jacobian(lambda v: transform(v)[..., :-1], x[0])
    jac64 = jacobian(lambda v: transform(v)[..., :-1], x[0].double())
    assert transform(x)[0, 0] == 1.0
    torch.testing.assert_close(jac32.double(), jac64, rtol=1e-4, atol=1e-30)


def test_softmax_plus_plus_validation_follows_its_argument_then_the_global_setting():
    with pyro.validation_enabled(True):
        with pytest.raises(ValueError, match="temperature"):
            SoftmaxPlusPlusTransform(-1.0)
        SoftmaxPlusPlusTransform(-1.0, validate_args=False)  # the caller checked (or chose not to)
    with pyro.validation_enabled(False):
        SoftmaxPlusPlusTransform(-1.0)
        with pytest.raises(ValueError, match="delta"):
            SoftmaxPlusPlusTransform(0.5, delta=float("nan"), validate_args=True)


def test_sticks_inverse_of_an_input_changed_in_place_is_computed():
    # The forward kept its input by reference as the pre-image: changed in place afterwards,
    # the inverse returned the new values, which do not map to w.
    t = SigmoidSticksTransform()
    x = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    w = t(x)
    x.add_(1.0)
    torch.testing.assert_close(t.inv(w), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))


def test_softmax_plus_plus_names_a_batch_its_parameters_do_not_broadcast_with():
    # A temperature of batch shape (3,) and an input of batch (2,) raised torch's "The size of
    # tensor a (2) must match ..." from the division, forward and inverse alike.
    transform = SoftmaxPlusPlusTransform(torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"an input of batch shape \(2,\) does not broadcast"):
        transform(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"a point of batch shape \(2,\) does not broadcast"):
        transform.inv(torch.full((2, 5), 0.2))
    assert transform(torch.zeros(3, 4)).shape == (3, 5)


def test_sticks_are_the_pieces_their_definition_breaks_off():
    # At an asymmetric input (the docstring's zeros cannot tell sigmoid(x) from sigmoid(-x)):
    # s_k = 1 / (1 + e^-x_k), w_k = s_k prod_{j<k} (1 - s_j), in Python floats.
    x = [0.7, -1.3, 2.0, -0.2]
    expected, rest = [], 1.0
    for value in x:
        s = 1 / (1 + math.exp(-value))
        expected.append(s * rest)
        rest *= 1 - s
    actual = SigmoidSticksTransform()(torch.tensor(x, dtype=torch.float64))
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64))

"""The softmax++ bijection from R^(K-1) onto the open K-simplex, computed in log space."""

import torch
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from pyro_relax._carry import carried, carry
from pyro_relax._numerics import (
    broadcast_shapes,
    finite_positive,
    parse_parameters,
    same_values,
    static_size,
    validation_enabled,
)

__all__ = [
    "SoftmaxPlusPlusTransform",
    "on_simplex",
]


def on_simplex(log_z: torch.Tensor) -> torch.Tensor:
    """``exp(log_z)``, with the largest coordinate recomputed as one minus the others.

    The identity :math:`z_{\\max} = 1 - \\sum_{k \\neq \\max} z_k` holds exactly, so the gradient
    is unchanged, and the coordinates then sum to one within a few ulp: torch's simplex check
    (tolerance 1e-6) passes in float32 even for large :math:`K`.
    """
    z = log_z.exp()
    # z_top + (1 - sum(z)) = 1 - sum of the others: the same value and gradient as replacing
    # the top coordinate, in fewer passes over the tensor.
    top = log_z.argmax(-1, keepdim=True)
    return z.scatter_add(-1, top, 1 - z.sum(-1, keepdim=True))


class SoftmaxPlusPlusTransform(Transform):
    r"""The softmax++ bijection of IGR, from :math:`\mathbb{R}^{K-1}` onto the open
    :math:`K`-simplex.

    .. math::
        z_k = \frac{e^{x_k / \tau}}{\sum_{j=1}^{K-1} e^{x_j / \tau} + \delta} \ (k < K),
        \qquad z_K = \frac{\delta}{\sum_{j=1}^{K-1} e^{x_j / \tau} + \delta},

    computed as :math:`\log z = \operatorname{log\_softmax}([x / \tau, \log \delta])`. The
    inverse is :math:`x_k = \tau (\log z_k - \log z_K + \log \delta)` and

    .. math::
        \log \left|\det \frac{\partial z_{1:K-1}}{\partial x}\right|
        = -(K - 1) \log \tau + \sum_{k=1}^{K} \log z_k,

    all :math:`K` coordinates included (the formula in the paper's appendix is garbled).

    As :math:`\tau \to 0`, :math:`z` tends to the vertex :math:`e_{k^*}` with
    :math:`k^* = \arg\max_k x_k` when :math:`\max_k x_k > 0` and :math:`k^* = K` otherwise
    (the paper's Proposition 1); as :math:`\tau \to \infty` it tends to the point
    :math:`(1, \dots, 1, \delta) / (K - 1 + \delta)`.

    What this adds to torch's transforms: each output carries its log-space twin
    :math:`\log z`, and the inverse reads it. At low temperature a coordinate of :math:`z` can
    underflow to zero in float32 while :math:`\log z` stays finite, so the values this transform
    produces are always inverted accurately, also by another softmax++ transform (a prior
    scoring a guide's sample). A value without the twin is inverted from :math:`z`, each
    coordinate read as at least the smallest normal number. The largest coordinate is computed
    as one minus the others, so that outputs pass torch's simplex check in float32.

    Warning:
        ``__eq__`` compares the parameters' values, which reads CPU tensors on the host; tensors
        on other devices are equal only when they are the same objects.

    References:
        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/1912.09588

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0`; a tensor broadcasts
            with the batch shape of :math:`x` (without its last dimension).
        delta (float or Tensor): the weight :math:`\delta > 0` of the last category.
        cache_size (int): torch's cache of the last ``(x, z)`` pair, 0 or 1.

    Example:
        >>> t = SoftmaxPlusPlusTransform(0.5)
        >>> z = t(torch.tensor([0.0, 1.0]))
        >>> round(float(z.sum()), 6), t.inv(z)
        (1.0, tensor([0., 1.]))
    """

    domain = constraints.real_vector
    codomain = constraints.simplex
    bijective = True

    def __init__(self, temperature, delta=1.0, cache_size=0):
        super().__init__(cache_size=cache_size)
        params, _ = parse_parameters(
            type(self).__name__,
            {"temperature": temperature, "delta": delta},
            # Finite and positive only: the dtype the map computes in is that of its input.
            {"temperature": finite_positive, "delta": finite_positive},
            # A transform has no validate_args of its own: it follows the global setting.
            validate=validation_enabled(None),
        )
        self.temperature, self.delta = params["temperature"], params["delta"]

    def __eq__(self, other):
        return (
            isinstance(other, SoftmaxPlusPlusTransform)
            and same_values(self.temperature, other.temperature)
            and same_values(self.delta, other.delta)
        )

    def __hash__(self):
        return id(self)

    def with_cache(self, cache_size=1):
        if self._cache_size == cache_size:
            return self
        return SoftmaxPlusPlusTransform(self.temperature, self.delta, cache_size=cache_size)

    def _parameter_shape(self):
        return broadcast_shapes(self.temperature.shape, self.delta.shape)

    def forward_shape(self, shape):
        if len(shape) < 1:
            raise ValueError("too few dimensions on input")
        batch = broadcast_shapes(shape[:-1], self._parameter_shape())
        return batch + (shape[-1] + 1,)

    def inverse_shape(self, shape):
        if len(shape) < 1 or static_size(shape[-1]) < 2:
            raise ValueError("the simplex needs at least 2 coordinates")
        batch = broadcast_shapes(shape[:-1], self._parameter_shape())
        return batch + (shape[-1] - 1,)

    def _parameters_like(self, x):
        # On the value's device: a transform built with Python floats keeps CPU scalars.
        tau = self.temperature.to(x.device).unsqueeze(-1)
        return tau, torch.log(self.delta).to(x.device).unsqueeze(-1)

    def log_call(self, x: torch.Tensor) -> torch.Tensor:
        """The forward map in log space, :math:`\\log z`; finite wherever :math:`x` is."""
        tau, log_delta = self._parameters_like(x)
        scaled = x / tau
        log_delta = log_delta.to(scaled.dtype)
        shape = broadcast_shapes(scaled.shape[:-1], log_delta.shape[:-1])
        logits = torch.cat(
            [scaled.expand(shape + x.shape[-1:]), log_delta.expand(shape + (1,))], -1
        )
        # Shifted by the (detached) row maximum before the logarithm of the sum, not
        # log_softmax: on CPU, torch's log_softmax kernel is several times slower for short rows
        # (measured 350 us against 78 us for 100 x 20 rows of 10). Unlike x - logsumexp(x),
        # the shift keeps log z exact for large x, where the sum's logarithm would vanish
        # against the maximum and several coordinates come out as 0 (z = 1 each).
        shifted = logits - logits.amax(-1, keepdim=True).detach()
        return shifted - shifted.exp().sum(-1, keepdim=True).log()

    def _call(self, x):
        log_z = self.log_call(x)
        return carry(on_simplex(log_z), log_weights=log_z)

    def _inverse(self, z):
        log_z = carried(z, "log_weights")
        if log_z is None:
            # A coordinate that underflowed to zero has no finite logarithm; the smallest normal
            # number is the nearest value whose inverse is finite.
            log_z = z.clamp(min=torch.finfo(z.dtype).tiny).log()
        tau, log_delta = self._parameters_like(z)
        return tau * (log_z[..., :-1] - log_z[..., -1:] + log_delta)

    def log_abs_det_jacobian(self, x, y):
        # From x, not y: log z is finite even where z underflowed.
        num_free = x.shape[-1]
        return self.log_call(x).sum(-1) - num_free * torch.log(self.temperature.to(x.device))

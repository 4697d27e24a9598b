"""Sigmoid stick-breaking from R^(K-1) onto K-1 sticks of total length below one."""

import torch
import torch.nn.functional as F
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from pyro_relax._carry import carried, carry, drawn_by, tensor_versions

__all__ = ["SigmoidSticksTransform"]


class SigmoidSticksTransform(Transform):
    r"""Sigmoid stick-breaking: the first :math:`K - 1` pieces of a unit stick.

    .. math::
        s_k = \sigma(x_k), \qquad w_k = s_k \prod_{j<k} (1 - s_j), \qquad k = 1, \dots, K - 1,

    so :math:`w_k > 0` and :math:`\sum_k w_k < 1`; the remainder is *not* returned (unlike
    torch's ``StickBreakingTransform``, which maps onto the simplex). IGR-SB passes the sticks
    to softmax++. The Jacobian is lower triangular, with

    .. math::
        \log \left|\det \frac{\partial w}{\partial x}\right|
        = \sum_k \log\big(s_k (1 - s_k)\big) + \sum_k \log r_k, \qquad
        r_k = \prod_{j<k} (1 - s_j),

    computed with ``logsigmoid``. Outputs carry their pre-image, which the inverse returns: the
    explicit inverse :math:`x_k = \log w_k - \log(1 - \sum_{j \leq k} w_j)` cancels for the
    deep sticks, whose remainder is close to zero.

    References:
        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/1912.09588

    Arguments:
        cache_size (int): torch's cache of the last ``(x, w)`` pair, 0 or 1.

    Example:
        >>> t = SigmoidSticksTransform()
        >>> t(torch.zeros(3))
        tensor([0.5000, 0.2500, 0.1250])
    """

    domain = constraints.real_vector
    codomain = constraints.independent(constraints.unit_interval, 1)
    bijective = True

    def __init__(self, cache_size=0):
        super().__init__(cache_size=cache_size)

    def __eq__(self, other):
        return isinstance(other, SigmoidSticksTransform)

    def __hash__(self):
        return hash(SigmoidSticksTransform)

    def with_cache(self, cache_size=1):
        if self._cache_size == cache_size:
            return self
        return SigmoidSticksTransform(cache_size=cache_size)

    def log_sticks(self, x: torch.Tensor) -> torch.Tensor:
        r"""The sticks in log space, :math:`\log w_k = \log s_k + \log r_k`."""
        return F.logsigmoid(x) + _log_remainders(x)

    def _call(self, x):
        w = self.log_sticks(x).exp()
        # The map has no parameters: the pre-image is valid for every instance, while it holds
        # the input's values (its version counter, as a map parameter's: an input changed in
        # place since is not the pre-image any more, and w is inverted).
        carry(w, preimage=x, source=(SigmoidSticksTransform, (x,), tensor_versions((x,))))
        return w

    def _inverse(self, w):
        if drawn_by(w, SigmoidSticksTransform) is not None:
            return carried(w, "preimage")
        # Sticks that underflowed, or whose remainder cancelled, are read as the smallest normal
        # number: the nearest values with a finite inverse.
        tiny = torch.finfo(w.dtype).tiny
        remainder = 1 - w.cumsum(-1)
        return w.clamp(min=tiny).log() - remainder.clamp(min=tiny).log()

    def log_jacobian_diagonal(self, x: torch.Tensor) -> torch.Tensor:
        r"""The log-diagonal of the triangular Jacobian, :math:`\log(s_k (1 - s_k) r_k)`."""
        return F.logsigmoid(x) + F.logsigmoid(-x) + _log_remainders(x)

    def log_abs_det_jacobian(self, x, y):
        return self.log_jacobian_diagonal(x).sum(-1)


def _log_remainders(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log r_k = \sum_{j<k} \log(1 - s_j)`, zero for the first stick."""
    log_rest = F.logsigmoid(-x).cumsum(-1)
    return torch.cat([torch.zeros_like(log_rest[..., :1]), log_rest[..., :-1]], -1)

"""Invertible Gaussian reparameterization (IGR) of categorical and count variables."""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from pyro.distributions import (
    Categorical,
    Independent,
    Normal,
    OneHotCategorical,
    TorchDistribution,
    TransformedDistribution,
    constraints,
)
from pyro.distributions.transforms import Planar
from torch.distributions.transforms import Transform
from torch.distributions.utils import lazy_property

from pyro_relax._carry import (
    allow_in_torch_load,
    carried,
    carry,
    drawn_by,
    relaxation_of,
    tensor_versions,
)
from pyro_relax._numerics import (
    all_last,
    any_last,
    as_float,
    check_constraint,
    check_count,
    check_flag,
    check_number,
    clamp_with_identity_gradient,
    common_dtype_and_device,
    distribution_repr,
    finite_positive,
    finite_real,
    floating,
    is_integer,
    known_same_shape,
    lacks,
    location,
    log1mexp,
    one_hot,
    parse_parameters,
    probability_vector,
    relaxed_enumerate_support,
    same_values,
    static_size,
    straight_through,
    validation_enabled,
    without_autocast,
)
from pyro_relax._numerics import scale as scale_constraint
from pyro_relax.distributions.finite_discrete import FiniteDiscrete
from pyro_relax.transforms.softmax_plus_plus import SoftmaxPlusPlusTransform
from pyro_relax.transforms.stick_breaking import SigmoidSticksTransform

__all__ = ["IGR", "IGRCount", "IGRPlanar", "IGRStickBreaking", "igr_log_probs"]

# Proposition 2's integrals run over t > 0 in panels whose break points sit at each
# coordinate's mean plus these multiples of its scale (clamped at 0): every density peak and
# CDF step gets panels of its own width, whatever the other scales. Beyond 12 scales a normal
# density is below 1e-31 of its peak.
_BREAKS = (-12.0, -4.0, -1.5, 0.0, 1.5, 4.0, 12.0)
# Those that fall below 0 move to these multiples of the coordinate's decay length from 0
# (see _break_point_rule), one for one.
_DECAY_BREAKS = (1 / 16, 1 / 4, 1.0, 4.0, 16.0, 64.0, 256.0)

# The numbers one piece of the discrete distribution's computation holds per tensor: the Monte
# Carlo estimate's draws x batch x categories, the quadrature's rows x coordinates x nodes
# (about 16 MiB in float32, 32 in float64). The whole batch at once took gigabytes for a VAE's.
_PIECE_ELEMENTS = 2**22
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# IGR-SB scores a value it must invert from its coordinates only where the estimated error of
# its density stays below this many nats: the rounding of each stick and of the remainder after
# it, carried to the pre-image, and the change of the log-density by such a shift of each
# coordinate (the Gaussian's to second order, at most K times it for the Jacobian). Where the
# estimate was below 0.1, the density of float32 copies was within 0.06 nats of the samples'
# own (the grid of test_igr's test_stick_breaking_scores_an_inverted_value_accurately_or_not_at_all:
# K 3 to 20, scales 0.002 to 2, temperatures 0.1 to 2); beyond it the error grew to thousands
# of nats.
_DENSITY_ERROR = 0.1


@functools.lru_cache(maxsize=8)
def _legendre(num_points: int):
    return np.polynomial.legendre.leggauss(num_points)


def _break_point_rule(loc, scale, num_panels: int, points_per_panel: int):
    """Nodes ``t`` and log-weights of a composite Gauss-Legendre rule on ``[0, max(loc + 12
    scale)]`` whose panels break at ``loc + c scale`` (``c`` in ``_BREAKS``) of every
    coordinate, or where that is not positive, at the matching multiple in ``_DECAY_BREAKS`` of
    ``scale^2 / (scale + max(-loc, 0))``; each interval between break points split into
    ``num_panels`` equal panels; shape ``batch_shape + (nodes,)``. No gradient reaches the
    nodes."""
    # The rule is a discretization, not a function of the parameters: with break points in the
    # autograd graph, coinciding ones (equal means, or several clamped at 0) left zero-width
    # panels whose clamped width cut the terms by which the edges' motion cancels, and the
    # gradient was wrong (by 0.4 of 0.8 at loc 0, scale 1); the gradient of the rule at fixed
    # nodes is the rule applied to the integrand's gradient.
    loc, scale = loc.detach(), scale.detach()
    offsets = torch.tensor(_BREAKS, dtype=loc.dtype, device=loc.device)
    breaks = torch.addcmul(loc.unsqueeze(-1), scale.unsqueeze(-1), offsets)
    # A break point below 0 is replaced by one near 0: the density over t > 0 of a mean below
    # 0 decays from the origin over sigma^2 / |mu| (clamped at 0, they left panels of width 0,
    # and once every mean was 12 scales below 0, log-probabilities hundreds of nats off).
    decay = scale.square() / (scale + (-loc).clamp(min=0))
    multiples = torch.tensor(_DECAY_BREAKS, dtype=loc.dtype, device=loc.device)
    breaks = torch.where(breaks > 0, breaks, decay.unsqueeze(-1) * multiples).flatten(-2)
    breaks = torch.cat([torch.zeros_like(breaks[..., :1]), breaks], -1)
    breaks = breaks.sort(-1).values
    fractions = torch.linspace(0, 1, num_panels + 1, dtype=loc.dtype, device=loc.device)
    lower, width = breaks[..., :-1], breaks[..., 1:] - breaks[..., :-1]
    edges = (lower.unsqueeze(-1) + width.unsqueeze(-1) * fractions).flatten(-2)
    nodes, weights = (
        torch.as_tensor(a, dtype=loc.dtype, device=loc.device) for a in _legendre(points_per_panel)
    )
    # Panels of width 0 (break points clamped at 0, equal means) get weight tiny, not log 0,
    # whose gradient would be infinite.
    half = ((edges[..., 1:] - edges[..., :-1]) / 2).clamp(min=torch.finfo(loc.dtype).tiny)
    points = (edges[..., :-1].unsqueeze(-1) + (nodes + 1) * half.unsqueeze(-1)).flatten(-2)
    log_weights = (torch.log(weights) + torch.log(half).unsqueeze(-1)).flatten(-2)
    return points, log_weights


def igr_log_probs(loc, scale, *, num_panels: int = 1, points_per_panel: int = 16):
    r"""The log-PMF of the categorical variable an IGR stands for (Proposition 2).

    With :math:`y \sim \mathcal{N}(\mu, \operatorname{diag} \sigma^2)`, the limit
    :math:`\tau \to 0` of IGR is the category :math:`H = \arg\max_k y_k` when
    :math:`\max_k y_k > 0` and :math:`H = K` otherwise, so

    .. math::
        P(H = k) = \int_0^\infty \frac{1}{\sigma_k}
        \phi\Big(\frac{t - \mu_k}{\sigma_k}\Big)
        \prod_{j \neq k} \Phi\Big(\frac{t - \mu_j}{\sigma_j}\Big)\, dt \ (k < K), \qquad
        P(H = K) = \prod_j \Phi(-\mu_j / \sigma_j),

    with the same :math:`t` in every factor. (The reference implementation scales each factor
    by its own :math:`\sigma_j`, which computes the argmax of the standardized variables
    :math:`y_j / \sigma_j`, wrong whenever the scales differ.)

    Each integral is computed in log space (``log_ndtr``), in float64 whatever the dtype, by a
    composite Gauss-Legendre rule in :math:`t` shared by all coordinates, whose panels break at
    :math:`\mu_j + c\,\sigma_j` for :math:`c \in \{0, \pm 1.5, \pm 4, \pm 12\}` and every
    coordinate :math:`j`: each density peak and CDF step is integrated on panels of its own
    width, so the error stays near float64's resolution whatever the ratio of the scales (a
    rule in each coordinate's standardized variable missed the steps of much narrower
    coordinates: 3e-3 at a ratio of 1000). The exception is a category whose mean lies tens
    of standard deviations below another's: the integrand of its (then astronomically small,
    below 1e-200) probability peaks between the two means, where no break point is, and its
    logarithm can be off by nats. A mean below 0 puts its density's mass over
    :math:`t > 0` at the origin, decaying over :math:`\sigma_j^2 / |\mu_j|`: a break point
    that would fall below 0 sits instead at a multiple (1/16 to 256) of
    :math:`\sigma_j^2 / (\sigma_j + \max(-\mu_j, 0))`. The gradient is the rule applied to
    the integrand's gradient (the nodes are fixed). Time grows as :math:`K^2` times the nodes
    per panel per batch element; the batch is integrated a few hundred elements at a time, so
    that the memory does not grow with it (except for what autograd keeps where a gradient is
    recorded). The result is differentiable in :math:`\mu` and :math:`\sigma`.

    References:
        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/1912.09588

    Arguments:
        loc (Tensor): :math:`\mu`, shape ``batch_shape + (K - 1,)``.
        scale (Tensor): :math:`\sigma > 0`, broadcasting with ``loc``.
        num_panels (int): panels each interval between break points is split into.
        points_per_panel (int): Gauss-Legendre nodes per panel.

    Returns:
        Tensor: :math:`\log P(H = k)`, shape ``batch_shape + (K,)``.

    Example:
        >>> igr_log_probs(torch.zeros(2), torch.ones(2)).exp()
        tensor([0.3750, 0.3750, 0.2500])
    """
    check_count("igr_log_probs", "num_panels", num_panels)
    check_count("igr_log_probs", "points_per_panel", points_per_panel)
    params, _ = parse_parameters(
        "igr_log_probs",
        {"loc": loc, "scale": scale},
        {"loc": finite_real, "scale": finite_positive},
        validate=validation_enabled(None),
    )
    try:
        loc, scale = torch.broadcast_tensors(params["loc"], params["scale"])
    except RuntimeError:
        raise ValueError(
            f"igr_log_probs: `scale` of shape {tuple(params['scale'].shape)} does not broadcast "
            f"with `loc` of shape {tuple(params['loc'].shape)}"
        ) from None
    if loc.dim() < 1:
        raise ValueError("igr_log_probs: `loc` needs a last dimension of K - 1 >= 1 coordinates")
    dtype, batch_shape, coordinates = loc.dtype, loc.shape[:-1], static_size(loc.shape[-1])
    flat = (math.prod(batch_shape), coordinates)
    loc, scale = loc.double().reshape(flat), scale.double().reshape(flat)
    nodes = len(_BREAKS) * coordinates * num_panels * points_per_panel
    rows = _per_piece(coordinates * nodes)
    pieces = [
        _quadrature(loc[start : start + rows], scale[start : start + rows], num_panels,
                    points_per_panel)
        for start in range(0, max(flat[0], 1), rows)
    ]  # fmt: skip
    return torch.cat(pieces).reshape(batch_shape + (coordinates + 1,)).to(dtype)


def _per_piece(numbers_per_item: int) -> int:
    """How many items (draws, rows) one piece of ``_PIECE_ELEMENTS`` numbers holds, at least
    one."""
    return max(1, _PIECE_ELEMENTS // max(numbers_per_item, 1))


def _quadrature(loc, scale, num_panels: int, points_per_panel: int):
    """:func:`igr_log_probs` of rows of float64 parameters, shape ``(rows, K - 1)``."""
    t, log_weights = _break_point_rule(loc, scale, num_panels, points_per_panel)
    standardized = (t.unsqueeze(-2) - loc.unsqueeze(-1)) / scale.unsqueeze(-1)  # [..., k, node]
    log_cdf = torch.special.log_ndtr(standardized)
    # log f_k(t) = log phi_k(t) + sum over j != k of log Phi_j(t): the sum over all j, less k's.
    log_others = log_cdf.sum(-2, keepdim=True) - log_cdf
    log_normal = -0.5 * standardized.square() - _HALF_LOG_2PI - scale.log().unsqueeze(-1)
    head = torch.logsumexp(log_weights.unsqueeze(-2) + log_normal + log_others, -1)
    last = torch.special.log_ndtr(-loc / scale).sum(-1, keepdim=True)
    return torch.cat([head, last], -1)


def _normal_log_density(y, loc, scale):
    r"""Elementwise :math:`\log N(y; \mu, \sigma)`, as ``Normal(loc, scale).log_prob(y)``
    with six operators against its nine (a pass over the sample each, forward and backward)."""
    u = (y - loc) / scale
    return torch.addcmul(scale.log().add_(_HALF_LOG_2PI), u, u, value=0.5).neg_()


def _limit_category(x: torch.Tensor) -> torch.Tensor:
    """Proposition 1: the vertex softmax++ tends to, :math:`\\arg\\max_k x_k` if positive, else
    the last category (index ``K - 1``)."""
    return torch.cat([x, torch.zeros_like(x[..., :1])], -1).argmax(-1)


def _expanded(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``tensor.expand(shape)``, or ``tensor`` itself where it has that shape (no view, and no
    node in the autograd graph)."""
    return tensor if known_same_shape(tensor, shape) else tensor.expand(shape)


@lacks("mean", "variance", "mode", "entropy", "cdf", "icdf")
class _IGRBase(TransformedDistribution):
    """Gaussian noise pushed onto the simplex: shared parameters, shapes and scoring."""

    enumerate_support = relaxed_enumerate_support

    arg_constraints = {
        "loc": constraints.independent(location, 1),
        "scale": constraints.independent(scale_constraint, 1),
        "temperature": scale_constraint,
        "delta": finite_positive,
    }
    support = probability_vector  # torch's simplex, with a tolerance that grows with K
    has_rsample = True

    def _set_parameters(self, loc, scale, temperature, delta, validate_args):
        owner = type(self).__name__
        validate = validation_enabled(validate_args)
        # loc and scale broadcast in every dimension, the last one included (a first parse
        # only where they are not already tensors of one shape: it costs tens of microseconds
        # at every construction).
        if not (torch.is_tensor(loc) and torch.is_tensor(scale) and known_same_shape(loc, scale)):
            # The temperature and delta take part in choosing the dtype, not in these shapes.
            everything = {"loc": loc, "scale": scale, "temperature": temperature, "delta": delta}
            dtype, device = common_dtype_and_device(owner, everything)
            params, _ = parse_parameters(
                owner,
                {"loc": as_float(owner, "loc", loc, dtype, device), "scale": scale},
                {},
                validate=False,
            )
            loc, scale = torch.broadcast_tensors(params["loc"], params["scale"])
        if loc.dim() < 1 or static_size(loc.shape[-1]) < 1:
            raise ValueError(f"{owner}: `loc` needs a last dimension of K - 1 >= 1 coordinates")
        params = {"loc": loc, "scale": scale, "temperature": temperature, "delta": delta}
        params, batch_shape = parse_parameters(owner, params, self.arg_constraints, validate)
        self.loc = _expanded(params["loc"], batch_shape + loc.shape[-1:])
        self.scale = _expanded(params["scale"], batch_shape + loc.shape[-1:])
        self.temperature = _expanded(params["temperature"], batch_shape)
        self.delta = _expanded(params["delta"], batch_shape)
        # As passed: the same tensor object or equal Python numbers identify the same map
        # without reading a device (the expanded views above are new objects every time). A
        # numpy array stands as its parsed tensor (== of two arrays is no truth value).
        self._map_arguments = tuple(
            params[name] if isinstance(value, np.ndarray) else value
            for name, value in (("temperature", temperature), ("delta", delta))
        )
        # The map keeps them as parsed: they broadcast with the batch shape, and a scalar
        # temperature divides a sample without broadcasting an expanded view.
        softmax = SoftmaxPlusPlusTransform.of_parsed(params["temperature"], params["delta"])
        return validate, softmax

    def __repr__(self):
        names = ("loc", "scale", "temperature", "delta", "hard", "precision")
        flows = getattr(self, "flows", None)
        shown = {"flows": f"{len(flows)} x {type(flows[0]).__name__}"} if flows else {}
        return distribution_repr(self, *names, **shown)

    def _set_distribution(self, transforms, validate):
        """Sets the maps to the simplex (``transforms``, softmax++ last) and the shapes, as
        ``TransformedDistribution.__init__`` does, with the shapes known: its general shape
        inference through the transforms costs more than the rest of a construction. The
        Gaussian base is built when first used (:attr:`base_dist`)."""
        self.transforms = transforms
        batch_shape = self.loc.shape[:-1]
        event_shape = torch.Size([self.loc.shape[-1] + 1])
        TorchDistribution.__init__(self, batch_shape, event_shape, validate_args=False)
        self._validate_args = validate

    @lazy_property
    def base_dist(self) -> Independent:
        r"""The Gaussian base :math:`\mathcal{N}(\mu, \operatorname{diag} \sigma^2)` of the
        pre-image, an ``Independent`` ``Normal`` over the last dimension."""
        return Normal(self.loc, self.scale, validate_args=False).to_event(1)

    def _gaussian(self, sample_shape=torch.Size()):
        r"""A reparameterized draw :math:`y = \mu + \sigma \epsilon` of the base (one fused
        operator where ``Normal.rsample`` takes two)."""
        shape = torch.Size(sample_shape) + self.loc.shape
        # Out of place: vmap(randomness='different') cannot fill an unbatched tensor in place.
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return torch.addcmul(self.loc, eps, self.scale)

    def _expand_parameters(self, new, batch_shape):
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.loc.shape[-1:])
        new.scale = self.scale.expand(batch_shape + self.scale.shape[-1:])
        new.temperature = self.temperature.expand(batch_shape)
        new.delta = self.delta.expand(batch_shape)
        new._map_arguments = self._map_arguments

    @property
    def num_categories(self) -> int:
        """The number :math:`K` of categories (coordinates of a sample)."""
        return self.loc.shape[-1] + 1

    @property
    def softmax_plus_plus(self) -> SoftmaxPlusPlusTransform:
        return self.transforms[-1]

    def _map_parameters(self) -> tuple:
        return self._map_arguments

    def _tag(self, value, base, **fields):
        """Attaches the pre-image ``base`` and the map that made ``value`` (and ``fields``)."""
        parameters = self._map_parameters()
        source = (type(self), parameters, tensor_versions(parameters))
        return carry(value, preimage=base, source=source, **fields)

    def _preimage(self, value):
        """The Gaussian pre-image of ``value``: the one it carries when it was pushed forward by
        the same map, else the inverse (from the log-space twin the value carries, if any)."""
        carried_preimage = self._carried_preimage(value)
        return self._invert(value) if carried_preimage is None else carried_preimage

    def _carried_preimage(self, value):
        """The pre-image ``value`` carries if this map (same family and parameters) drew it,
        else ``None``."""
        theirs = drawn_by(value, type(self))
        if theirs is not None:
            mine = self._map_parameters()
            if len(mine) == len(theirs) and all(
                same_values(a, b) for a, b in zip(mine, theirs, strict=True)
            ):
                return carried(value, "preimage")
        return None

    def _invert(self, value):
        for transform in reversed(self.transforms):
            value = transform.inv(value)
        return value

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value):
        value = floating(value, self.loc.dtype)
        if self._validate_args:
            self._validate_sample(value)
        return self._log_density(self._preimage(value))

    def discrete(self) -> OneHotCategorical:
        r"""The discrete distribution this relaxes, the limit :math:`\tau \to 0`: the one-hot
        categorical of :meth:`categorical` (exact for :class:`IGR`, a Monte Carlo estimate of
        10,000 draws for the others, drawn anew at each call; the draws are taken in passes of
        about four million numbers, whatever the batch). Its logits are those of
        :meth:`categorical`'s probabilities, which torch clamps at the dtype's ``eps``: a
        category no draw reached gets probability ``eps`` (1.2e-7 in float32), whatever its
        own, and a rare category's logarithm is that of a count of a few draws."""
        logits = self.categorical().logits
        return OneHotCategorical(logits=logits, validate_args=self._validate_args)

    def _sample_categories(self, num_samples):
        raise NotImplementedError

    def _monte_carlo_categorical(self, num_samples):
        num_samples = check_count(f"{type(self).__name__}.categorical", "num_samples", num_samples)
        draws = _per_piece(math.prod(self.batch_shape) * self.num_categories)
        # Counted in float64, exact to 2^53 draws whatever the parameters' dtype (float16 holds
        # integers exactly only to 2048).
        shape = self.batch_shape + (self.num_categories,)
        counts = torch.zeros(shape, dtype=torch.float64, device=self.loc.device)
        with torch.no_grad():
            for start in range(0, num_samples, draws):
                index = self._sample_categories(min(draws, num_samples - start))
                counts += one_hot(index, self.num_categories, counts).sum(0)
        return Categorical(probs=(counts / num_samples).to(self.loc.dtype))


class IGR(_IGRBase):
    r"""Invertible Gaussian reparameterization of a categorical variable (IGR-I).

    Gaussian noise pushed onto the :math:`K`-simplex by softmax++
    (:class:`~pyro_relax.transforms.SoftmaxPlusPlusTransform`):

    .. math::
        y = \mu + \sigma \odot \epsilon, \quad \epsilon \sim \mathcal{N}(0, I_{K-1}), \qquad
        z = \operatorname{softmax{+}{+}}(y / \tau), \qquad
        \log q(z) = \sum_{k<K} \log \mathcal{N}(y_k; \mu_k, \sigma_k) + (K - 1) \log \tau
        - \sum_{k=1}^{K} \log z_k.

    Unlike the Gumbel-Softmax, the density is exact and the KL divergence between two IGRs is a
    Gaussian KL in closed form, for any two temperatures and deltas: the pre-images of two
    softmax++ maps differ by the affine map
    :math:`y' = (\tau' / \tau) y + \tau' (\log \delta' - \log \delta)`.

    As :math:`\tau \to 0`, :math:`z` tends to the vertex :math:`e_H` with
    :math:`H = \arg\max_k y_k` when :math:`\max_k y_k > 0` and :math:`H = K` otherwise
    (Proposition 1): the categorical variable the IGR stands for, whose PMF
    :meth:`categorical` computes by quadrature (Proposition 2). Samples stay close to the
    vertices without underflow, since they are computed in log space. As :math:`\tau \to \infty`
    :math:`z` tends to the point :math:`(1, \dots, 1, \delta) / (K - 1 + \delta)`.

    A sample carries its Gaussian pre-image and its log-space twin :math:`\log z`, so
    :meth:`log_prob` scores the distribution's own samples (and those of another IGR) without
    the underflow of inverting :math:`z` in float32. A value built by hand (or a copy) is
    inverted from :math:`z`; one with a coordinate at 0 (the simplex's boundary, where the
    density is 0, or a coordinate that underflowed, whose pre-image is lost: the value does not
    say which) raises ``ValueError`` under validation and scores NaN without. An integer or
    boolean value is read in the parameters' dtype.

    With ``hard=True`` the forward value is the vertex :math:`e_H` of
    Proposition 1 (a one-hot vector) and the gradient is that of :math:`z`. Such a sample
    carries its soft relaxation, which :meth:`log_prob` scores; a plain one-hot vector (built by
    hand, or a sample whose attributes were lost to ``clone``) is scored by the discrete PMF
    :math:`\log P(H = k)`.

    References:
        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/1912.09588

    Arguments:
        loc (Tensor): the mean :math:`\mu`, shape ``batch_shape + (K - 1,)``.
        scale (Tensor): the standard deviations :math:`\sigma > 0`, broadcasting with ``loc``.
        temperature (float or Tensor): the temperature :math:`\tau > 0`, broadcasting with the
            batch shape.
        delta (float or Tensor): the weight :math:`\delta > 0` of the last category in
            softmax++ (default 1.0, as in the final reference code).
        hard (bool): return the one-hot limit :math:`e_H` in the forward pass.

    Example:
        >>> d = IGR(torch.zeros(3), torch.ones(3), temperature=0.1)
        >>> z = d.rsample((2,))
        >>> z.shape, d.log_prob(z).shape, d.categorical().probs
        (torch.Size([2, 4]), torch.Size([2]), tensor([0.2917, 0.2917, 0.2917, 0.1250]))
    """

    def __init__(self, loc, scale, temperature, *, delta=1.0, hard=False, validate_args=None):
        validate, softmax = self._set_parameters(loc, scale, temperature, delta, validate_args)
        self.hard = check_flag("IGR", "hard", hard)
        self._set_distribution([softmax], validate)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(IGR, _instance)
        self._expand_parameters(new, batch_shape)
        new.hard = self.hard
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape=torch.Size()):
        y = self._gaussian(sample_shape)
        z, log_z = self.softmax_plus_plus.simplex_and_log(y)
        if self.hard:
            hard = one_hot(_limit_category(y), self.num_categories, z)
            z = straight_through(hard, z)
        return self._tag(z, y, log_weights=log_z)

    def _map_parameters(self):
        # IGR-I compares no maps (see _preimage): the parameters themselves, as tensors.
        return (self.temperature, self.delta)

    def _preimage(self, value):
        r"""The pre-image of ``value`` under this softmax++, from the pre-image it carries when
        an IGR-I drew it, whatever that one's temperature and delta.

        Softmax++ gives :math:`\log z_k - \log z_K = y_k / \tau - \log \delta`, so the
        pre-images under two maps are related by the affine
        :math:`y = (\tau / \tau') y' + \tau (\log \delta - \log \delta')`: exact, with
        no comparison of the parameters (a host read on an accelerator, a constant in a jit
        trace), and the identity when they are equal.
        """
        theirs = drawn_by(value, IGR)
        if theirs is None:
            return self._invert(value)
        preimage = carried(value, "preimage")
        if all(a is b for a, b in zip(theirs, self._map_parameters(), strict=True)):
            return preimage  # this distribution's own sample: the affine is the identity
        tau, log_delta = self.temperature.unsqueeze(-1), self.delta.log().unsqueeze(-1)
        other_tau, other_delta = (t.unsqueeze(-1) for t in theirs)
        return (tau / other_tau) * preimage + tau * (log_delta - other_delta.log())

    def sample_hard(self, sample_shape=torch.Size()):
        """One-hot draws of the discrete variable :math:`H` (Proposition 1), no gradient."""
        with torch.no_grad():
            y = self._gaussian(sample_shape)
            return one_hot(_limit_category(y), self.num_categories, y)

    def log_prob(self, value):
        value = floating(value, self.loc.dtype)
        plain = carried(value, "preimage") is None and carried(value, "log_weights") is None
        if self.hard and plain:
            return self._log_prob_of_vertex(value)
        if self._validate_args:
            self._validate_sample(value)
        # A plain value's coordinate at 0 is on the simplex's boundary (density 0) or a
        # sample's that underflowed (pre-image lost): which one, the value does not say.
        lost = any_last(value <= torch.finfo(value.dtype).tiny) if plain else None
        if lost is not None and self._validate_args and bool(lost.any()):
            raise ValueError(
                "IGR.log_prob got a value without its record with a coordinate at 0: a point "
                "on the simplex's boundary, where the density is 0, or a sample whose "
                "coordinate underflowed, whose pre-image is lost. Score the sample itself, "
                "attach its record again (pyro_relax.with_relaxation), or work in float64; "
                "with validation off such values score NaN"
            )
        y = self._preimage(value)
        # The log-coordinates of the value, whichever softmax++ produced it: no second
        # log_softmax for a sample.
        record = relaxation_of(value)
        log_z = None if record is None else record.log_weights
        foreign = log_z is not None and (record.source is None or record.source[0] is not IGR)
        if log_z is None:
            log_z = self.softmax_plus_plus.log_call(y)  # finite wherever y is
        num_free = y.shape[-1]
        log_det = log_z.sum(-1) - num_free * self.temperature.log()
        log_density = _normal_log_density(y, self.loc, self.scale).sum(-1) - log_det
        if foreign:
            # Another family's value may lie on the boundary (a dropped stick: log z = -inf),
            # where the density is 0, not -inf - -inf.
            log_density = log_density.masked_fill(any_last(log_z.isneginf()), -math.inf)
        if lost is not None:
            log_density = log_density.masked_fill(lost, math.nan)
        return log_density

    def _log_prob_of_vertex(self, value):
        vertex = all_last((value == 0) | (value == 1))
        if self._validate_args:
            self._validate_sample(value)
            if not bool(vertex.all()):
                raise ValueError(
                    "IGR(hard=True).log_prob got a value that is neither a sample "
                    "drawn by rsample (which carries its relaxation) nor a one-hot vector"
                )
        logits = self.categorical().logits
        # Elsewhere NaN: sum_k z_k log P(H = k) at an interior point is no density, and a
        # sampler running without validation (NUTS) took it for one.
        return torch.where(vertex, (value * logits).sum(-1), math.nan)

    def categorical(self) -> Categorical:
        """The discrete distribution of :math:`H`, by quadrature (Proposition 2); see
        :func:`~pyro_relax.distributions.igr_log_probs`."""
        return Categorical(logits=self._category_log_probs)

    @lazy_property
    def _category_log_probs(self):
        return igr_log_probs(self.loc, self.scale)


class IGRStickBreaking(_IGRBase):
    r"""IGR with stick-breaking (IGR-SB), for finitely or countably infinitely many
    categories.

    .. math::
        y \sim \mathcal{N}(\mu, \operatorname{diag} \sigma^2), \quad s = \sigma(y), \quad
        w_k = s_k \prod_{j<k} (1 - s_j), \qquad z = \operatorname{softmax{+}{+}}(w / \tau),

    so the density chains the two Jacobians
    (:class:`~pyro_relax.transforms.SigmoidSticksTransform`, then softmax++, the temperature
    dividing the sticks as in the reference code); the support is the image of the map.

    As :math:`\tau \to 0`, :math:`z` tends to the vertex of :math:`\arg\max_k w_k`, the largest
    stick: the implied discrete variable is *not* "category :math:`k` with probability
    :math:`w_k`", and the last category (weight :math:`\delta`) gets no mass in the limit.
    :meth:`categorical` estimates its PMF by Monte Carlo. As :math:`\tau \to \infty`, :math:`z`
    tends to :math:`(1, \dots, 1, \delta) / (K - 1 + \delta)`.

    The limit comes much later than IGR-I's: the sticks lie in :math:`(0, 1)`, so the
    softmax++ scores :math:`w_k / \tau` differ by less than :math:`1 / \tau`, and at the
    temperatures where IGR-I's samples are near a vertex (0.1 to 0.5) a sample of IGR-SB (and
    of :class:`IGRCount`, whose counts it weights) still spreads its mass over many
    categories: its relaxed model is then far from the discrete one :meth:`discrete` gives.
    Anneal it further than IGR-I's, and compare the two (the mean of samples against that of
    :meth:`discrete`) before trusting a temperature.

    **Countably infinite support** (``precision`` :math:`\rho` given): ``loc`` holds the first
    :math:`K_{\max} - 1` sticks, and each sample keeps the smallest number :math:`n` of sticks
    whose cumulative mass reaches :math:`\rho` (the crossing stick included; :math:`n = 1`
    when the first stick already reaches it; :math:`n = K_{\max} - 1` when no stick does), each
    sample and batch element with its own :math:`n`. Shapes stay static: a sample has
    :math:`K_{\max}` coordinates summing to one, softmax++ over the kept sticks and the last
    category, with exact zeros at the dropped sticks. :meth:`truncation_of` and
    :meth:`captured_mass_of` report :math:`n` and the sticks' cumulative mass. The density is
    that of the kept coordinates (on the face of the simplex they span); the KL divergence has
    no closed form in this mode.

    A sample of another stick-breaking map (a guide of another temperature or delta, or of a
    learned temperature) is scored through the pre-image it carries: the two maps' sticks are
    related by an affine map, computed in log space. A value without such a record (a copy,
    observed simplex data, another family's draw) is inverted from its coordinates: each stick
    is divided by the remainder :math:`1 - \sum_{j<k} w_j` of those before it, which float32
    coordinates do not resolve for deep sticks (many categories, low temperatures; a copy of a
    :math:`K = 20` sample at :math:`\tau = 0.5` was scored thousands of nats off). Such a
    value is scored only where the rounding of its sticks, carried to its density, is
    estimated below 0.1 nats (measured within 0.06); elsewhere ``log_prob`` raises
    ``ValueError`` under validation and gives NaN without, as for a value with an underflowed
    coordinate. Score the samples themselves, attach their records again
    (:func:`~pyro_relax.with_relaxation`), or work in float64. Without ``precision`` every
    stick of such a value is kept.

    References:
        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/1912.09588

    Arguments:
        loc (Tensor): the mean :math:`\mu`, shape ``batch_shape + (K - 1,)``.
        scale (Tensor): the standard deviations :math:`\sigma > 0`.
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        delta (float or Tensor): the weight :math:`\delta > 0` of the last category.
        precision (float): the mass :math:`\rho \in (0, 1)` a sample's sticks must reach, for
            countably infinite support; ``None`` (default) keeps all sticks.

    Example:
        >>> d = IGRStickBreaking(torch.zeros(9), torch.ones(9), 0.1, precision=0.9)
        >>> z = d.rsample((4,))
        >>> z.shape, bool((d.captured_mass_of(z) >= 0.9).all())
        (torch.Size([4, 10]), True)
    """

    def __init__(self, loc, scale, temperature, *, delta=1.0, precision=None, validate_args=None):
        if precision is not None:
            check_number(
                type(self).__name__, "precision", precision, "lie in (0, 1)", lambda p: 0 < p < 1
            )
        validate, softmax = self._set_parameters(loc, scale, temperature, delta, validate_args)
        self.precision = precision
        self._set_distribution([SigmoidSticksTransform(cache_size=1), softmax], validate)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(IGRStickBreaking, _instance)
        self._expand_parameters(new, batch_shape)
        new.precision = self.precision
        return super().expand(batch_shape, _instance=new)

    def _map_parameters(self):
        return (*self._map_arguments, self.precision)

    def _kept(self, log_sticks):
        """A mask of the sticks each sample keeps."""
        if self.precision is None:
            return torch.ones_like(log_sticks, dtype=torch.bool)
        before = (log_sticks.exp().cumsum(-1) < self.precision).sum(-1, keepdim=True)
        kept = before.clamp(max=log_sticks.shape[-1] - 1) + 1
        return torch.arange(log_sticks.shape[-1], device=log_sticks.device) < kept

    def _simplex(self, y):
        """:math:`z`, :math:`\\log z` and the mask of kept sticks, from the Gaussian
        pre-image."""
        log_sticks = self.transforms[0].log_sticks(y)
        kept = self._kept(log_sticks)
        # Dropped sticks get logit -inf: exact zeros, and the kept coordinates still sum to one.
        sticks = torch.where(kept, log_sticks.exp(), torch.full_like(log_sticks, -float("inf")))
        return (*self.softmax_plus_plus.simplex_and_log(sticks), kept)

    def rsample(self, sample_shape=torch.Size()):
        y = self._gaussian(sample_shape)
        z, log_z, kept = self._simplex(y)
        return self._tag(z, y, log_weights=log_z, kept_sticks=kept.sum(-1))

    def _preimage(self, value):
        return self._preimage_and_checks(value)[0]

    def _preimage_and_checks(self, value):
        """The pre-image of ``value``, whether the value lies in the image of the map and
        whether it determines its pre-image (both ``None`` for this map's own draw)."""
        y = self._carried_preimage(value)
        if y is not None:
            return y, None, None
        theirs = drawn_by(value, IGRStickBreaking)
        if theirs is not None:
            return (*self._preimage_from(value, *theirs[:2]), None)
        return self._invert_and_check(value)

    def _preimage_from(self, value, other_temperature, other_delta):
        r"""The pre-image of a value another stick-breaking map (temperature :math:`\tau'`,
        delta :math:`\delta'`) drew, from the pre-image :math:`y'` it carries, and whether the
        value lies in this map's image.

        Softmax++ gives :math:`\log z_k - \log z_K = w_k / \tau - \log \delta`, so this map's
        sticks are :math:`w_k = a w'_k + b` with :math:`a = \tau / \tau'` and
        :math:`b = \tau (\log \delta - \log \delta')`, and the remainders after them
        :math:`r_{k+1} = 1 - \sum_{j \leq k} w_j = (1 - a - k b) + a r'_{k+1}`. With
        :math:`w'` and :math:`r'` in log space from :math:`y'`, the pre-image
        :math:`y_k = \log w_k - \log r_{k+1}` is as accurate as the map allows; inverting the
        value's coordinates instead loses the deep sticks to rounding (the remainders cancel).
        The identity when the maps are equal."""
        y_other = carried(value, "preimage")
        kept = self._kept_of(value)
        log_rest = F.logsigmoid(-y_other)
        log_after = log_rest.cumsum(-1)  # log r'_{k+1}
        log_sticks = F.logsigmoid(y_other) + (log_after - log_rest)  # log w'_k
        tau, log_delta = self.temperature.unsqueeze(-1), self.delta.log().unsqueeze(-1)
        log_a = tau.log() - _log_column(other_temperature)
        b = tau * (log_delta - _log_column(other_delta))
        count = torch.arange(1, y_other.shape[-1] + 1, device=y_other.device, dtype=y_other.dtype)
        log_w, valid_w = _log_affine(log_sticks, log_a, b)
        log_r, valid_r = _log_affine(log_after, log_a, 1 - log_a.exp() - count * b)
        inside = all_last((valid_w & valid_r) | ~kept)
        y = torch.where(kept & valid_w & valid_r, log_w - log_r, torch.zeros_like(y_other))
        return y, inside

    def _invert(self, value):
        return self._invert_and_check(value)[0]

    def _invert_and_check(self, value):
        r"""The pre-image of ``value``, whether the value lies in the image of the map, and
        whether it determines its pre-image.

        In the image, the sticks :math:`w_k = \tau (\log z_k - \log z_K + \log \delta)` are
        positive and sum to less than one, up to the rounding of their computation (a value
        made by a map of another temperature or delta may not; its density here is 0).

        Determined: the rounding of each kept stick and of the remainder
        :math:`1 - \sum_{j \leq k} w_j` after it, carried to the pre-image and weighed by the
        log-density's sensitivity to it, is estimated below ``_DENSITY_ERROR`` nats. The
        pre-image divides each stick by that remainder, which for deep sticks is far smaller
        than the coordinates of :math:`z` can resolve in float32; there the inverse, and the
        density with it, is noise (thousands of nats off, measured), also from the exact
        :math:`\log z` another family's draw carries. A value with an underflowed kept
        coordinate is never determined. (Another stick-breaking map's draw is not inverted:
        see :meth:`_preimage_from`.)"""
        kept = self._kept_of(value)
        log_z = carried(value, "log_weights")
        exact = log_z is not None
        if not exact:
            tiny = torch.finfo(value.dtype).tiny
            # The smallest normal number stands for a coordinate that underflowed to zero.
            log_z = value.clamp(min=tiny).log()
        tau = self.temperature.unsqueeze(-1)
        log_delta = self.delta.log().unsqueeze(-1)
        sticks = tau * (log_z[..., :-1] - log_z[..., -1:] + log_delta)
        sticks = torch.where(kept, sticks, torch.zeros_like(sticks))
        # Each stick is a difference of logarithms: its rounding error scales with them.
        magnitude = tau * (log_z[..., :-1].abs() + log_z[..., -1:].abs() + log_delta.abs() + 1)
        error = torch.finfo(value.dtype).eps * torch.where(kept, magnitude, 0)
        slack = 64 * error
        inside = all_last(sticks >= -slack) & (sticks.sum(-1) <= 1 + slack.sum(-1))
        y = self.transforms[0].inv(sticks)
        # The pre-image's rounding, from each stick's and the following remainder's.
        remainders = 1 - sticks.cumsum(-1)
        spread = error / sticks.abs() + error.cumsum(-1) / remainders.abs()
        # The Gaussian term moves by (|y - mu| d + d^2 / 2) / sigma^2 for a shift d (the second
        # order rules where y is near mu), the Jacobian's by at most K d.
        gaussian = spread * ((y - self.loc).abs() + spread / 2) / self.scale.square()
        estimate = torch.where(kept, gaussian + sticks.shape[-1] * spread, 0).sum(-1)
        determined = estimate <= _DENSITY_ERROR
        if not exact:
            # A kept stick's coordinate is at least z_K / delta (its logit w_k / tau >= 0), so
            # a zero is a dropped stick, not an underflowed one, unless z_K / delta underflows.
            underflowed = any_last((value[..., :-1] <= tiny) & kept)
            underflowed = underflowed | (value[..., -1] <= tiny * self.delta.clamp(min=1))
            determined = determined & ~underflowed
            # Approximate sticks cannot place a row outside the image.
            inside = inside | underflowed
        return torch.where(kept, y, torch.zeros_like(y)), inside, determined

    def _kept_of(self, value):
        count = carried(value, "kept_sticks")
        if count is None:
            count = self.truncation_of(value)
        return torch.arange(value.shape[-1] - 1, device=value.device) < count.unsqueeze(-1)

    def truncation_of(self, value):
        """The number :math:`n` of sticks each sample kept (all of them without ``precision``).

        Read from the sample; for a value built by hand, all of them without ``precision``
        (a coordinate that underflowed to 0 is a kept stick, read as the smallest normal
        number), else the last non-zero stick coordinate.
        """
        count = carried(value, "kept_sticks")
        if count is not None:
            return count
        if self.precision is None:
            return torch.full(value.shape[:-1], value.shape[-1] - 1, device=value.device)
        positions = torch.arange(1, value.shape[-1], device=value.device)
        return torch.where(value[..., :-1] > 0, positions, 0).amax(-1).clamp(min=1)

    def captured_mass_of(self, value):
        r"""The cumulative mass :math:`\sum_{k \leq n} w_k` of each sample's kept sticks."""
        y = self._preimage(value)
        sticks = self.transforms[0](y)
        kept = self._kept_of(value)
        return torch.where(kept, sticks, torch.zeros_like(sticks)).sum(-1)

    def log_prob(self, value):
        value = floating(value, self.loc.dtype)
        if self._validate_args:
            self._validate_sample(value)
        y, in_image, determined = self._preimage_and_checks(value)
        if determined is not None:  # only an outside value's density is known (0)
            determined = determined | ~in_image
        # A value cut at other sticks than this distribution cuts its pre-image (a guide with
        # another precision, or a finite one) is not in this distribution's image: its density
        # is 0 here, not that of the point this distribution would map the pre-image to. The
        # cut of an undetermined value is not known either (a zero may be a kept stick that
        # underflowed).
        same_cut = all_last(self._kept_of(value) == self._kept(self.transforms[0].log_sticks(y)))
        if determined is not None:
            same_cut = same_cut | ~determined
        if self._validate_args:
            self._check_scored_value(value, in_image, determined, same_cut)
        possible = same_cut if in_image is None else same_cut & in_image
        log_density = self._log_density(y)
        log_density = torch.where(possible, log_density, torch.full_like(log_density, -math.inf))
        if determined is None:
            return log_density
        return torch.where(determined, log_density, torch.full_like(log_density, math.nan))

    @staticmethod
    def _check_scored_value(value, in_image, determined, same_cut):
        """The errors ``log_prob`` raises under validation, in place of densities of 0 (a
        value outside the image, or cut at other sticks) and NaN (an undetermined value)."""
        if in_image is not None and not bool(in_image.all()):
            raise ValueError(
                "IGRStickBreaking.log_prob got a value outside the image of its map (the "
                "sticks it implies are negative or sum to more than one), where its density "
                "is 0: a map of another temperature or delta made it (give model and guide "
                "the same temperature and delta), or a guide of the whole simplex proposed it "
                "(an autoguide such as AutoNormal or AutoDelta, or NUTS: the site needs "
                "pyro_relax.infer.AutoRelaxed or an IGRStickBreaking guide)"
            )
        if determined is not None and not bool(determined.all()):
            raise ValueError(
                f"IGRStickBreaking.log_prob got a value it must invert (one without the record "
                f"of a stick-breaking draw) that does not determine its pre-image in "
                f"{value.dtype}: a coordinate underflowed to 0, or its deep sticks (or what "
                f"remains of the stick after them) are below the rounding error of their "
                f"inversion, and its density would be noise (thousands of nats off). Score the "
                f"sample itself, attach its record again (pyro_relax.with_relaxation), or work "
                f"in float64; with validation off such values score NaN"
            )
        if not bool(same_cut.all()):
            raise ValueError(
                "IGRStickBreaking.log_prob got a value cut at other sticks than this "
                "distribution's precision cuts it: model and guide need the same `precision`"
            )

    def _log_density(self, y):
        _, log_z, kept = self._simplex(y)
        zero = torch.zeros_like(y)
        sticks = self.transforms[0]
        log_det_sticks = sticks.log_jacobian_diagonal(y)
        log_normal = _normal_log_density(y, self.loc, self.scale)
        log_z_kept = torch.where(kept, log_z[..., :-1], zero).sum(-1) + log_z[..., -1]
        num_kept = kept.sum(-1).to(y.dtype)
        log_det_softmax = log_z_kept - num_kept * self.temperature.log()
        return torch.where(kept, log_normal - log_det_sticks, zero).sum(-1) - log_det_softmax

    def _sample_categories(self, num_samples):
        y = self._gaussian((num_samples,))
        log_sticks = self.transforms[0].log_sticks(y)
        kept = self._kept(log_sticks)
        return torch.where(kept, log_sticks, -float("inf")).argmax(-1)

    def categorical(self, num_samples=10_000) -> Categorical:
        r"""The discrete distribution of :math:`\arg\max_k w_k` (the limit
        :math:`\tau \to 0`), estimated from ``num_samples`` draws: standard error
        :math:`\sqrt{p (1 - p) / N}` per category."""
        return self._monte_carlo_categorical(num_samples)


def _log_column(parameter):
    """The logarithm of a map parameter as the user passed it (a Python number or a tensor of
    the batch shape), as a column against the last dimension; no host transfer."""
    if torch.is_tensor(parameter):
        return parameter.log().unsqueeze(-1)
    return math.log(parameter)


def _log_affine(log_x, log_a, b):
    r""":math:`\log(a e^{x} + b)` for :math:`a > 0` and real :math:`b` (tensors), and where
    the argument is positive (elsewhere the logarithm is 0, its gradient too): without forming
    :math:`e^{x}`, which underflows for a deep stick, and smooth in :math:`b` through 0 (equal
    maps give :math:`b = 0`, where a learned parameter still needs the derivative
    :math:`1 / (a e^{x})`)."""
    term = log_a + log_x
    b = b.expand_as(term)
    nonzero = b != 0
    log_b = torch.where(nonzero, torch.where(nonzero, b, 1).abs().log(), -math.inf)
    small = log_b - term < -math.log(2)  # |b| below half the other term, 0 included
    valid = small | (b > 0) | (log_b < term)
    # Near: term + log1p(b e^-term); the exponent is capped where b is 0 and e^-term would
    # overflow (0 * inf), so the gradient there is the largest finite one.
    cap = math.log(torch.finfo(log_x.dtype).max) - 1
    near = term + torch.log1p(torch.where(small, b, 0) * (-term).clamp(max=cap).exp())
    # Far: logaddexp for b > 0, log1mexp for b < 0, each fed a safe input where unselected
    # (see _numerics.log1mexp).
    below = torch.where(valid & ~small & (b < 0), log_b - term, -1.0)
    far = torch.where(b > 0, torch.logaddexp(term, log_b), term + log1mexp(below))
    value = torch.where(small, near, far)
    return torch.where(valid, value, torch.zeros_like(value)), valid


class IGRPlanar(_IGRBase):
    r"""IGR with planar normalizing flows before softmax++ (IGR-Planar).

    .. math::
        y \sim \mathcal{N}(\mu, \operatorname{diag} \sigma^2), \quad
        x = f_L \circ \dots \circ f_1(y), \quad
        f_l(x) = x + \hat u_l \tanh(w_l^\top x + b_l), \qquad
        z = \operatorname{softmax{+}{+}}(x / \tau),

    with Pyro's :class:`~pyro.distributions.transforms.Planar` layers, whose
    :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \|w\|^2` guarantees invertibility (the
    reference code divided by :math:`\|w\|`, which does not). The density chains the flows'
    log-Jacobians and that of softmax++.

    As :math:`\tau \to 0`, :math:`z` tends to the vertex of Proposition 1 applied to :math:`x`;
    :meth:`categorical` estimates that PMF by Monte Carlo. As :math:`\tau \to \infty`, :math:`z`
    tends to :math:`(1, \dots, 1, \delta) / (K - 1 + \delta)`.

    Planar layers have no closed-form inverse: :meth:`log_prob` scores samples drawn from this
    distribution (or one with the same flows and parameters), and raises ``ValueError`` for
    other values. The flows are ``torch.nn.Module`` objects: register them in a guide with
    ``pyro.module("flows", torch.nn.ModuleList(d.flows))`` to train them.

    References:
        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/1912.09588

    Arguments:
        loc (Tensor): the mean :math:`\mu`, shape ``batch_shape + (K - 1,)``.
        scale (Tensor): the standard deviations :math:`\sigma > 0`.
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        delta (float or Tensor): the weight :math:`\delta > 0` of the last category.
        flows (int or list): the layers :math:`f_l` (``Planar`` or ``ConditionedPlanar``
            transforms on :math:`\mathbb{R}^{K-1}`), or their number, to build new ``Planar``
            layers (random, new at each construction: in a model or guide, build the layers
            once outside it and pass the list).

    Example:
        >>> d = IGRPlanar(torch.zeros(3), torch.ones(3), 0.1, flows=2)
        >>> z = d.rsample((5,))
        >>> z.shape, d.log_prob(z).shape
        (torch.Size([5, 4]), torch.Size([5]))
    """

    def __init__(self, loc, scale, temperature, *, delta=1.0, flows=1, validate_args=None):
        validate, softmax = self._set_parameters(loc, scale, temperature, delta, validate_args)
        if is_integer(flows):
            flows = check_count("IGRPlanar", "flows", flows, minimum=0)
            flows = [Planar(self.loc.shape[-1]).to(self.loc) for _ in range(flows)]
        elif not isinstance(flows, (list, tuple)) or not all(
            isinstance(flow, Transform) for flow in flows
        ):
            raise TypeError(
                "IGRPlanar: `flows` must be a number of layers or a list of transforms, got "
                f"{flows!r}"
            )
        self.flows = list(flows)
        self._check_flows(validate)
        self._set_distribution([*self.flows, softmax], validate)

    def _check_flows(self, validate):
        """The flows' parameters must be floating tensors of the computation's dtype, on the
        parameters' device (a planar layer multiplies them with the Gaussian draws), and, with
        validation on, finite."""
        coordinates = static_size(self.loc.shape[-1])
        for index, flow in enumerate(self.flows):
            dimension = _flow_dimension(flow)
            if dimension is not None and dimension != coordinates:
                raise ValueError(
                    f"IGRPlanar: `flows[{index}]` maps {dimension} coordinates, and the Gaussian "
                    f"draws have K - 1 = {coordinates} (the last dimension of `loc`)"
                )
            for tensor in _flow_tensors(flow):
                if not torch.is_tensor(tensor):
                    continue
                if tensor.device != self.loc.device or tensor.dtype != self.loc.dtype:
                    raise ValueError(
                        f"IGRPlanar: the parameters of `flows` ({tensor.dtype} on "
                        f"{tensor.device}) must have the dtype and device the distribution "
                        f"computes in, those of `loc` ({self.loc.dtype} on {self.loc.device})"
                    )
                if validate:
                    check_constraint("IGRPlanar", "flows", tensor, finite_real)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(IGRPlanar, _instance)
        self._expand_parameters(new, batch_shape)
        new.flows = self.flows
        return super().expand(batch_shape, _instance=new)

    def _map_parameters(self):
        return (*self._map_arguments, *(t for f in self.flows for t in _flow_tensors(f)))

    def _flow(self, y):
        """The flows' output and the sum of their log-Jacobians."""
        x, log_det = y, 0.0
        with without_autocast(y.device.type):  # Pyro's planar layers multiply matrices
            for flow in self.flows:
                out = flow(x)
                layer = flow.log_abs_det_jacobian(x, out)
                if flow.domain.event_dim == 0:  # elementwise (a spline, an affine map)
                    layer = layer.sum(-1)
                log_det = log_det + layer
                _clear_cache(flow)
                x = out
        if self._validate_args and not bool(torch.isfinite(x).all()):
            # Pyro's planar layer divides by |w|^2: a layer with w = 0 gives NaN.
            raise ValueError(
                "IGRPlanar: `flows` map the Gaussian draws to non-finite values (a planar layer "
                "with w = 0, or parameters too large)"
            )
        return x, log_det

    def rsample(self, sample_shape=torch.Size()):
        y = self._gaussian(sample_shape)
        x, _ = self._flow(y)
        z, log_z = self.softmax_plus_plus.simplex_and_log(x)
        return self._tag(z, y, log_weights=log_z)

    def _invert(self, value):
        try:
            return super()._invert(value)
        except KeyError:
            raise ValueError(
                "IGRPlanar.log_prob scores only samples drawn from an IGRPlanar with the same "
                "flows, temperature and delta (the same tensors where one requires a gradient; "
                "equal values under torch.no_grad(), as for a sample saved and loaded): "
                "planar layers have no closed-form inverse. In a model, build the layers once, "
                "outside it, and pass them as flows= (pyro.module them to learn them): "
                "flows=<number> makes new random layers at every call"
            ) from None

    def _log_density(self, y):
        x, log_det_flows = self._flow(y)
        log_det = log_det_flows + self.softmax_plus_plus.log_abs_det_jacobian(x, None)
        return _normal_log_density(y, self.loc, self.scale).sum(-1) - log_det

    def _sample_categories(self, num_samples):
        x, _ = self._flow(self._gaussian((num_samples,)))
        return _limit_category(x)

    def categorical(self, num_samples=10_000) -> Categorical:
        """The discrete distribution of the limit :math:`\\tau \\to 0` (Proposition 1 applied to
        the flows' output), estimated from ``num_samples`` draws."""
        return self._monte_carlo_categorical(num_samples)


# A record names the family that drew its pre-image (Relaxation.source).
allow_in_torch_load(IGR, IGRStickBreaking, IGRPlanar)


def _clear_cache(flow):
    """Empties a layer's cache of its last call: a later call on the same input (the carried
    pre-image) would get an output computed with another gradient (none, after ``sample``),
    and a cached output in a graph makes the layer, hence the distribution, refuse
    ``copy.deepcopy``. The library never inverts through the cache (it carries pre-images)."""
    if getattr(flow, "_cache_size", 0):
        flow._cached_x_y = None, None
    if getattr(flow, "_cached_logDetJ", None) is not None:
        flow._cached_logDetJ = None


def _flow_dimension(flow):
    """The number of coordinates a planar layer maps (``None`` for another layer)."""
    if isinstance(flow, Planar):
        return static_size(flow.u.shape[-1])
    params = getattr(flow, "_params", None)
    if isinstance(params, tuple) and len(params) == 3 and torch.is_tensor(params[1]):
        return static_size(params[1].shape[-1])  # ConditionedPlanar's (bias, u, w)
    return None


def _flow_tensors(flow):
    if isinstance(flow, torch.nn.Module):
        return tuple(flow.parameters())
    params = getattr(flow, "_params", None)
    if isinstance(params, tuple):
        return params
    return (flow,)  # compared by identity


@lacks("mean", "variance", "mode", "entropy", "cdf", "icdf")
class IGRCount(TorchDistribution):
    r"""IGR relaxation of a count variable: stick-breaking IGR over the outcomes
    :math:`0, \dots, K - 1`, mapped to a count.

    .. math::
        z \sim \operatorname{IGR\text{-}SB}(\mu, \sigma, \tau, \delta), \qquad
        c = \sum_{k=0}^{K-1} k\, z_k,

    the linear map GenGS uses (:class:`~pyro_relax.distributions.TruncatedGenGS`). As
    :math:`\tau \to 0`, :math:`c` tends to the index of the largest stick, an integer in
    :math:`0, \dots, K - 2` (see :class:`IGRStickBreaking`); as :math:`\tau \to \infty` to the
    average outcome. Fit ``loc`` and ``scale`` to a count PMF (a truncated Poisson, say) with
    :func:`~pyro_relax.distributions.fit_igr_prior` to use it as a prior.

    The density of :math:`c` is intractable; :meth:`log_prob` scores the simplex point
    :math:`z` a sample carries (the augmented latent, whose KL divergence is the Gaussian KL in
    closed form, as the paper trains), and raises ``ValueError`` for a plain count.

    References:
        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/1912.09588

    Arguments:
        loc (Tensor): the mean :math:`\mu`, shape ``batch_shape + (K - 1,)``.
        scale (Tensor): the standard deviations :math:`\sigma > 0`.
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        delta (float or Tensor): the weight :math:`\delta > 0` of the last category.
        precision (float): as for :class:`IGRStickBreaking`.

    Example:
        >>> d = IGRCount(torch.zeros(5), torch.ones(5), 0.1)
        >>> c = d.rsample((3,))
        >>> c.shape, d.log_prob(c).shape
        (torch.Size([3]), torch.Size([3]))
    """

    enumerate_support = relaxed_enumerate_support

    arg_constraints = _IGRBase.arg_constraints
    has_rsample = True

    def __init__(self, loc, scale, temperature, *, delta=1.0, precision=None, validate_args=None):
        try:
            self.simplex_dist = IGRStickBreaking(
                loc,
                scale,
                temperature,
                delta=delta,
                precision=precision,
                validate_args=validate_args,
            )
        except (TypeError, ValueError) as error:
            # The parameters are this class's: so is the message.
            inner = "IGRStickBreaking: "
            if str(error).startswith(inner):
                raise type(error)("IGRCount: " + str(error)[len(inner) :]) from None
            raise
        super().__init__(self.simplex_dist.batch_shape, validate_args=False)
        self._validate_args = self.simplex_dist._validate_args

    def __repr__(self):
        return distribution_repr(self, "simplex_dist")

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(IGRCount, _instance)
        new.simplex_dist = self.simplex_dist.expand(batch_shape)
        super(IGRCount, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    loc = property(lambda self: self.simplex_dist.loc)
    scale = property(lambda self: self.simplex_dist.scale)
    temperature = property(lambda self: self.simplex_dist.temperature)
    delta = property(lambda self: self.simplex_dist.delta)

    @property
    def outcomes(self):
        """The outcomes :math:`0, \\dots, K - 1`."""
        loc = self.simplex_dist.loc
        return torch.arange(self.simplex_dist.num_categories, dtype=loc.dtype, device=loc.device)

    @property
    def support(self):
        return constraints.interval(0, self.simplex_dist.num_categories - 1)

    def rsample(self, sample_shape=torch.Size()):
        z = self.simplex_dist.rsample(sample_shape)
        with without_autocast(z.device.type):
            count = z @ self.outcomes
        count = clamp_with_identity_gradient(count, 0, self.outcomes.shape[-1] - 1)
        carry(count, simplex=z)
        return count

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        z = carried(value, "simplex")
        if z is None:
            raise ValueError(
                "IGRCount.log_prob scores relaxed counts drawn by rsample (they carry their "
                "simplex point; clone, detach and .to drop it, an in-place change voids it); a "
                "plain count has no density. An autoguide such as AutoNormal or AutoDelta "
                "proposes plain values: the site needs pyro_relax.infer.AutoRelaxed or an "
                "IGRCount guide"
            )
        return self.simplex_dist.log_prob(z)

    def categorical(self, num_samples=10_000) -> Categorical:
        """The PMF of the count in the limit :math:`\\tau \\to 0`, by Monte Carlo."""
        return self.simplex_dist.categorical(num_samples)

    def discrete(self) -> FiniteDiscrete:
        r"""The discrete distribution this relaxes, the limit :math:`\tau \to 0`: the counts
        :math:`0, \dots, K - 1` with the probabilities of :meth:`categorical` (10,000 draws)."""
        logits = self.categorical().logits
        return FiniteDiscrete(self.outcomes, logits=logits, validate_args=self._validate_args)

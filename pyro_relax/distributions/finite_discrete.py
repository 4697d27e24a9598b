"""A categorical distribution over given outcomes: the discrete distribution a GenGS relaxes."""

import math

import torch
from pyro.distributions import Categorical, TorchDistribution, constraints
from torch.distributions.utils import lazy_property, logits_to_probs

from pyro_relax._numerics import (
    LOG_ZERO,
    all_last,
    any_last,
    as_float,
    broadcast_shapes,
    check_constraint,
    check_devices,
    finite_real,
    floating,
    log_of_probs,
    log_weights,
    parse_parameters,
    probability_vector,
    static_size,
    validation_enabled,
)

__all__ = ["FiniteDiscrete"]


class _Outcomes(constraints.Constraint):
    """Values equal to one of the given outcomes (scalars, or vectors with ``event_dim=1``)."""

    is_discrete = True

    def __init__(self, outcomes: torch.Tensor):
        self.outcomes = outcomes
        self.event_dim = outcomes.dim() - 1
        super().__init__()

    def check(self, value):
        distance, _ = nearest_outcome(value, self.outcomes)
        return distance <= _tolerance(value, self.event_dim)


def nearest_outcome(value: torch.Tensor, outcomes: torch.Tensor):
    """The distance (L1 for vector outcomes) from each value to its nearest outcome, and that
    outcome's index; ``outcomes`` has shape ``(n,)`` or ``(n, d)``. The outcomes are rounded
    to the value's dtype first: a half-precision value is compared with the outcomes as half
    precision holds them."""
    outcomes = outcomes.to(value.dtype)
    if outcomes.dim() == 2:
        distance = (value.unsqueeze(-2) - outcomes).abs().sum(-1)
    else:
        distance = (value.unsqueeze(-1) - outcomes).abs()
    return distance.min(-1)


def _tolerance(value: torch.Tensor, event_dim: int) -> torch.Tensor:
    # A few units in the last place of the value's magnitude, at least float32's: outcomes
    # stored in the value's dtype compare equal to themselves however they were computed,
    # and a half-precision value must be an outcome as half precision rounds it (its own
    # units were wide enough at 31.5 to take it for 31).
    magnitude = value.abs().sum(-1) if event_dim else value.abs()
    eps = min(torch.finfo(value.dtype).eps, torch.finfo(torch.float32).eps)
    return 16 * eps * (1 + magnitude)


# The attribute by which an outcome table remembers the version found distinct.
_DISTINCT = "_pyro_relax_distinct_at_version"


def check_outcomes(owner: str, outcomes: torch.Tensor) -> None:
    """Raises ``ValueError`` naming ``owner`` unless ``outcomes`` (shape ``(n,)`` or
    ``(n, d)``) are finite and distinct: a value equal to two outcomes would be scored by the
    probability of one of them only. Reads the outcomes on the host (a validation check); a
    table found distinct is not sorted again until it is modified (GenGSMultinomial passes
    its cached table at every construction)."""
    check_constraint(owner, "outcomes", outcomes, finite_real)
    if outcomes.device.type == "meta" or getattr(outcomes, _DISTINCT, None) == outcomes._version:
        return
    distinct = static_size(torch.unique(outcomes.detach(), dim=0).shape[0])
    if distinct != static_size(outcomes.shape[0]):
        raise ValueError(
            f"{owner}: `outcomes` must be distinct, got {static_size(outcomes.shape[0])} "
            f"outcomes of which only {distinct} are distinct in {outcomes.dtype} (the dtype the "
            "distribution computes in, to which they are converted); merge repeated outcomes "
            "and add their probabilities, or give the parameters a dtype that tells them apart"
        )
    setattr(outcomes, _DISTINCT, outcomes._version)


def log_probs_at(outcomes, other_outcomes, other_logits):
    """The log-probabilities ``other_logits`` over ``other_outcomes`` (distinct) at each of
    ``outcomes``, in their order, ``-inf`` where the other table has no such outcome: outcomes
    are paired by value, not by position (two tables may list them in different orders),
    unless they are one tensor. Elementwise, no host read."""
    if outcomes is other_outcomes:
        return other_logits
    same = outcomes.unsqueeze(1) == other_outcomes.unsqueeze(0)  # (n, m), or (n, m, d)
    if same.dim() == 3:
        same = all_last(same)
    # The other outcomes are distinct, so at most one matches: the sum picks its logit.
    log_probs = torch.where(same, other_logits.unsqueeze(-2), other_logits.new_zeros(())).sum(-1)
    return torch.where(any_last(same), log_probs, torch.full_like(log_probs, -math.inf))


def outcome_log_prob(owner: str, value, outcomes, logits, validate: bool, hint=""):
    """The log-probability in ``logits`` of the outcome each value is; for a value that is
    none of the ``outcomes``, ``ValueError`` with ``validate`` (naming ``owner``, followed by
    ``hint``), else NaN (it has no probability here; the nearest outcome's would be a step
    function of the value, which samplers such as NUTS, running without validation, took for
    a density). Excluded outcomes have logit -inf, which is their log-probability."""
    distance, index = nearest_outcome(value, outcomes)
    is_outcome = distance <= _tolerance(value, outcomes.dim() - 1)
    if validate and not bool(is_outcome.all()):
        raise ValueError(f"{owner}.log_prob got a value that is not one of the outcomes{hint}")
    index, logits = torch.broadcast_tensors(index.unsqueeze(-1), logits)
    log_prob = logits.gather(-1, index[..., :1]).squeeze(-1)
    return log_prob if validate else torch.where(is_outcome, log_prob, math.nan)


class FiniteDiscrete(TorchDistribution):
    r"""A categorical distribution over given outcomes :math:`c_1, \dots, c_n`:

    .. math::
        P(X = c_k) = \pi_k, \qquad \pi = \operatorname{softmax}(\text{logits}).

    This is the discrete distribution a :class:`~pyro_relax.distributions.TruncatedGenGS`
    relaxes (what its ``discrete()`` method returns, and what
    :class:`~pyro_relax.infer.discretize` puts in its place): its samples are outcomes exactly
    (the integer counts of a GenGS count class, as floating-point numbers of the parameters'
    dtype), its :meth:`log_prob` is :math:`\log \pi_k` of the outcome given, and Pyro can
    enumerate it (``infer={"enumerate": "parallel"}``).

    Outcomes may be scalars, shape ``(n,)``, or vectors, shape ``(n, d)`` (the count vectors of
    a multinomial); they are shared by the whole batch.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Arguments:
        outcomes (Tensor): the outcomes, shape ``(n,)`` or ``(n, d)``, ``n >= 2``.
        probs (Tensor): the probabilities :math:`\pi`, shape ``batch_shape + (n,)``.
        logits (Tensor): unnormalized :math:`\log \pi` (pass ``probs`` or ``logits``).

    Example:
        >>> d = FiniteDiscrete(torch.tensor([0.0, 1.0, 5.0]), probs=torch.tensor([0.2, 0.3, 0.5]))
        >>> d.sample((4,)).shape
        torch.Size([4])
        >>> d.log_prob(torch.tensor(5.0)).exp()
        tensor(0.5000)
    """

    arg_constraints = {"probs": probability_vector, "logits": log_weights}
    has_enumerate_support = True

    def __init__(self, outcomes, *, probs=None, logits=None, validate_args=None):
        owner = type(self).__name__
        validate = validation_enabled(validate_args)
        if (probs is None) == (logits is None):
            raise ValueError(f"{owner}: pass exactly one of `probs` and `logits`")
        name = "probs" if probs is not None else "logits"
        params, batch_shape = parse_parameters(
            owner, {name: probs if probs is not None else logits}, self.arg_constraints, validate
        )
        param = params[name]
        num_outcomes = static_size(param.shape[-1])
        if num_outcomes < 2:
            raise ValueError(f"{owner}: `{name}` needs a last dimension of at least 2 outcomes")
        if probs is not None:
            self.probs = (param / param.sum(-1, keepdim=True)).expand(batch_shape + (-1,))
            self.logits = log_of_probs(self.probs)
        else:
            self.logits = (param - param.logsumexp(-1, keepdim=True)).expand(batch_shape + (-1,))
        if torch.is_tensor(outcomes):
            check_devices(owner, {name: param, "outcomes": outcomes})
        outcomes = as_float(owner, "outcomes", outcomes, param.dtype, param.device)
        if outcomes.dim() not in (1, 2) or static_size(outcomes.shape[0]) != num_outcomes:
            raise ValueError(
                f"{owner}: `outcomes` must have shape ({num_outcomes},) or ({num_outcomes}, d) "
                f"to match `{name}`, got {tuple(outcomes.shape)}"
            )
        if validate:
            check_outcomes(owner, outcomes)
        self.outcomes = outcomes
        super().__init__(batch_shape, outcomes.shape[1:], validate_args=False)
        self._validate_args = validate

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(FiniteDiscrete, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.logits.shape[-1:])
        if "probs" in self.__dict__:
            new.probs = self.probs.expand(batch_shape + self.probs.shape[-1:])
        new.outcomes = self.outcomes
        super(FiniteDiscrete, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @lazy_property
    def probs(self):
        return logits_to_probs(self.logits)

    @property
    def num_outcomes(self) -> int:
        """The number :math:`n` of outcomes."""
        return static_size(self.outcomes.shape[0])

    @lazy_property
    def support(self):
        return _Outcomes(self.outcomes)

    @property
    def mean(self):
        return self.probs @ self.outcomes

    @property
    def variance(self):
        return self.probs @ self.outcomes.square() - self.mean.square()

    @property
    def mode(self):
        """The most probable outcome (the first of equally probable ones)."""
        return self.outcomes[self.logits.argmax(-1)]

    def _scalar_outcomes(self, what: str) -> None:
        if self.outcomes.dim() != 1:
            raise NotImplementedError(
                f"{type(self).__name__}.{what}: outcomes that are vectors have no order to "
                "accumulate probabilities along; sum the probabilities of the outcomes you "
                "need (probs, enumerate_support)"
            )

    def cdf(self, value):
        r""":math:`P(X \le x)` for scalar outcomes (in any order), ``x`` broadcasting with the
        batch shape."""
        self._scalar_outcomes("cdf")
        value = torch.as_tensor(value, dtype=self.probs.dtype, device=self.probs.device)
        below = self.outcomes <= value.unsqueeze(-1)
        return (self.probs * below).sum(-1)

    def icdf(self, value):
        r"""For each level :math:`q` in ``value`` (broadcasting with the batch shape), the
        smallest outcome :math:`x` with :math:`P(X \le x) \ge q`, for scalar outcomes; a level
        of 0 gives the least outcome of positive probability."""
        self._scalar_outcomes("icdf")
        order = self.outcomes.argsort()
        cdf = self.probs[..., order].cumsum(-1)
        value = torch.as_tensor(value, dtype=cdf.dtype, device=cdf.device)
        if self._validate_args and not bool(((value >= 0) & (value <= 1)).all()):
            raise ValueError(f"{type(self).__name__}.icdf: the levels must lie in [0, 1]")
        # Level 0 as the least positive number: the least outcome with mass, not one of
        # probability 0 before it.
        value = value.clamp(min=torch.finfo(cdf.dtype).tiny)
        shape = broadcast_shapes(value.shape, cdf.shape[:-1])
        cdf = cdf.expand(shape + cdf.shape[-1:])
        # Rounding may leave the total just under 1: a level above it is the total, whose
        # first position is the last outcome of positive probability (not a later one of
        # probability 0).
        targets = torch.minimum(value.expand(shape).unsqueeze(-1), cdf[..., -1:]).contiguous()
        # The first position whose cumulative probability reaches the level.
        index = torch.searchsorted(cdf.contiguous(), targets)
        return self.outcomes[order][index.squeeze(-1)]

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            index = Categorical(logits=self.logits, validate_args=False).sample(sample_shape)
            return self.outcomes[index]

    def _fits(self, shape) -> bool:
        """Whether a value of ``shape`` has this event shape and a batch that broadcasts."""
        batch_dims = len(shape) - len(self.event_shape)
        if batch_dims < 0 or shape[batch_dims:] != self.event_shape:
            return False
        try:
            broadcast_shapes(shape[:batch_dims], self.batch_shape)
        except RuntimeError:
            return False
        return True

    def log_prob(self, value):
        value = floating(value, self.logits.dtype)  # integer counts: the outcomes they are
        owner = type(self).__name__
        if self._validate_args and not self._fits(value.shape):
            # Pyro names the site of a ValueError, not of torch's broadcasting error; whether
            # the value is an outcome is checked next.
            raise ValueError(
                f"{owner}.log_prob got a value of shape {tuple(value.shape)}, which does not "
                f"broadcast with batch shape {tuple(self.batch_shape)} and event shape "
                f"{tuple(self.event_shape)}"
            )
        return outcome_log_prob(owner, value, self.outcomes, self.logits, self._validate_args)

    def enumerate_support(self, expand=True):
        outcomes = self.outcomes.reshape(
            (self.num_outcomes,) + (1,) * len(self.batch_shape) + self.event_shape
        )
        if expand:
            outcomes = outcomes.expand((self.num_outcomes,) + self.batch_shape + self.event_shape)
        return outcomes

    def entropy(self):
        log_probs = self.logits.clamp(min=LOG_ZERO)  # 0 * log 0 = 0, not 0 * -inf
        return -(self.probs * log_probs).sum(-1)

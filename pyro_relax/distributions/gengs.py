"""Generalized Gumbel-Softmax (GenGS) relaxations of truncated discrete distributions."""

import functools
import itertools
import math
import warnings
from numbers import Real

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import Binomial, Categorical, Geometric, NegativeBinomial, Poisson
from torch.distributions.utils import lazy_property, logits_to_probs

from pyro_relax._carry import carry, relaxation_of
from pyro_relax._numerics import (
    VectorOf,
    as_float,
    caller_stacklevel,
    categorical_log_probs,
    categorical_parameters,
    check_count,
    check_devices,
    check_flag,
    distribution_repr,
    fast_apply,
    finite_positive,
    floating,
    gumbel_like,
    is_integer,
    lacks,
    linear_log_prob,
    log_of_probs,
    log_weights,
    nonnegative_rows,
    one_hot,
    parse_parameters,
    probability_vector,
    relaxed_enumerate_support,
    scale,
    static_shape,
    static_size,
    straight_through,
    tempered,
    validation_enabled,
    warn_if_learned_temperature,
    without_autocast,
)
from pyro_relax.distributions.finite_discrete import (
    FiniteDiscrete,
    check_outcomes,
    log_probs_at,
    outcome_log_prob,
)
from pyro_relax.distributions.truncation import (
    automatic_truncation,
    check_base,
    log_probs_truncated,
    log_survival,
)

__all__ = [
    "GenGS",
    "GenGSBinomial",
    "GenGSGeometric",
    "GenGSMultinomial",
    "GenGSNegativeBinomial",
    "GenGSPoisson",
    "TruncatedGenGS",
    "TruncationWarning",
]

# The largest number of outcomes GenGSMultinomial enumerates.
_MAX_OUTCOMES = 100_000


class TruncationWarning(UserWarning):
    """The mass beyond the last outcome of a truncated distribution exceeds the tolerance."""


class _RelaxedOneHotMap(torch.autograd.Function):
    r"""The relaxed one-hot :math:`w = \operatorname{softmax}(s)` and its image
    :math:`z = \sum_k w_k c_k`, with one fused backward.

    :math:`z` is clamped to the outcomes' range ``[low, high]``: its rounding can put it an ulp
    outside, which fails Pyro's support check. The clamp is no part of the backward, whose
    derivative for :math:`z` is that of the sum (the identity's, through the clamp).

    The scores are floored, relative to their row maximum, where ``exp`` would return a
    subnormal number: x86 CPUs compute those about 100 times slower (a truncated Poisson PMF at
    low temperature is full of them), and a weight below ``n * tiny`` is zero to the dtype
    anyway. ``floor`` is that lowest score relative to the maximum, a number; outcomes excluded
    by a ``-inf`` score keep weight exactly 0. The softmax is taken as
    ``exp(s - max s) / sum exp(s - max s)`` with elementwise operators, reusing the row maximum
    the floor needs: torch's softmax kernel is several times slower on rows as short as 15 on
    CPU, and ``logsumexp`` would take the maximum again and guard against infinities the floor
    has already removed.

    The backward is the softmax Jacobian applied to the combined upstream gradient,
    :math:`\partial L / \partial s = w \odot (G - \langle w, G \rangle)` with
    :math:`G = \partial L / \partial w + (\partial L / \partial z) c^\top`; it ignores the
    floor, whose entries have weights below ``n * tiny`` and so gradients that small. When only
    :math:`z` is differentiated (no ``log_prob`` of the sample in the loss),
    :math:`\langle w, G \rangle = (\partial L / \partial z) z` and the gradient is
    :math:`(\partial L / \partial z)\, w \odot (c - z)`, which skips a reduction.
    """

    generate_vmap_rule = True  # torch.func may vmap it (see _numerics._StraightThrough)

    @staticmethod
    def forward(scores, floor, outcomes, low, high):
        # One new tensor of the scores' size, updated in place (no graph is recorded here).
        excluded = scores.isneginf()
        weights = scores - scores.amax(-1, keepdim=True)
        weights.clamp_min_(floor).masked_fill_(excluded, -math.inf).exp_()
        weights.div_(weights.sum(-1, keepdim=True))
        with without_autocast(scores.device.type):
            value = weights @ outcomes
        return weights, value.clamp(low, high)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weights, value = output
        ctx.save_for_backward(weights, inputs[2], value)
        ctx.save_for_forward(weights, inputs[2])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_weights, grad_value):
        weights, outcomes, value = ctx.saved_tensors
        grad_outcomes = None
        if grad_value is not None and ctx.needs_input_grad[2]:
            grad_outcomes = _outcomes_gradient(weights, grad_value, outcomes)
        if grad_weights is None and grad_value is not None and outcomes.dim() == 1:
            # g w (c - z): three passes over the weights instead of four. Updated in place is
            # the product with the upstream gradient, which torch.func may batch (jacrev's
            # cotangents) where the saved tensors are not.
            grad_scores = grad_value.unsqueeze(-1) * weights
            return grad_scores.mul_(outcomes - value.unsqueeze(-1)), None, grad_outcomes, None, None
        upstream = grad_weights
        if grad_value is not None:
            mapped = (
                grad_value.unsqueeze(-1) * outcomes
                if outcomes.dim() == 1
                else grad_value @ outcomes.T
            )
            upstream = mapped if upstream is None else upstream + mapped
        if upstream is None:
            return None, None, grad_outcomes, None, None
        # w * (G - <w, G>), with one new tensor of the weights' size.
        grad_scores = weights * upstream
        grad_scores.addcmul_(weights, grad_scores.sum(-1, keepdim=True), value=-1)
        return grad_scores, None, grad_outcomes, None, None

    @staticmethod
    def jvp(ctx, scores_tangent, _, outcomes_tangent, *__):
        # Forward mode: dw = w (t - <w, t>) and dz = dw c + w dc (the clamp's derivative is the
        # identity's, as in the backward).
        weights, outcomes = ctx.saved_tensors
        if scores_tangent is None:  # only the outcomes carry a tangent
            weights_tangent = torch.zeros_like(weights)
        else:
            inner = (weights * scores_tangent).sum(-1, True)
            weights_tangent = weights * (scores_tangent - inner)
        value_tangent = weights_tangent @ outcomes
        if outcomes_tangent is not None:
            value_tangent = value_tangent + weights @ outcomes_tangent
        return weights_tangent, value_tangent


def _outcomes_gradient(weights, grad_value, outcomes):
    r"""The gradient of :math:`z = w c` by the outcomes :math:`c`, summed over the batch:
    :math:`\sum_b w_b^\top (\partial L / \partial z_b)`, the shape of ``outcomes``."""
    flat_weights = weights.reshape(-1, weights.shape[-1])
    return flat_weights.T @ grad_value.reshape(-1, *outcomes.shape[1:])


_relaxed_one_hot_map = fast_apply(_RelaxedOneHotMap)


@lacks("mode", "cdf", "icdf")
class TruncatedGenGS(TorchDistribution):
    r"""Generalized Gumbel-Softmax relaxation of a distribution over finitely many outcomes.

    A relaxed one-hot vector :math:`w` is drawn by the Gumbel-Softmax trick over the log-PMF
    :math:`\log \pi` and mapped linearly onto the outcomes :math:`c_k`:

    .. math::
        w = \operatorname{softmax}\big((\log \pi + g) / \tau\big), \quad
        g_k \sim \operatorname{Gumbel}(0, 1), \qquad z = \sum_k w_k c_k.

    As :math:`\tau \to 0`, :math:`w` tends to the one-hot vector of
    :math:`\arg\max_k (\log \pi_k + g_k) \sim \operatorname{Categorical}(\pi)`, so :math:`z`
    tends to a draw of the discrete distribution. As :math:`\tau \to \infty`, :math:`w` tends to
    the uniform vector and :math:`z` to the average outcome.

    Passing free logits (say, an encoder's output) gives the implicit variant "GenGS IMP", whose
    PMF is not tied to a parametric family.

    The density of :math:`z` is intractable, so :meth:`log_prob` is defined deliberately:

    - for a value drawn by :meth:`rsample` (it carries its relaxed one-hot :math:`w`),
      the *soft log-PMF* :math:`\sum_k w_k \log \pi_k`, which tends to :math:`\log \pi_k` of
      the sampled outcome as :math:`\tau \to 0`. With GenGS distributions in model and guide,
      ``Trace_ELBO`` then estimates the ELBO of the discrete model. A hard sample
      (``hard=True``) carries the one-hot vector of its outcome in place of :math:`w` in the
      forward pass, with the gradient of :math:`w`: its score is :math:`\log \pi_k` of the
      outcome it is, as a plain count's;
    - for a plain value (an observed count, a tensor built by hand), the value must be one of
      the outcomes and the result is its log-PMF :math:`\log \pi_k`;
    - anything else (a relaxed value whose weights were lost by ``clone``, ``detach`` or
      ``.to``) raises ``ValueError`` when validation is on and scores NaN with validation
      off (Pyro's MCMC, which turns validation off, then stops at such a value).

    The Concrete density of :math:`w` is deliberately *not* used: its KL between two relaxed
    distributions is dominated by outcomes both give almost no mass and pins a guide to its
    prior.

    The attributes :attr:`probs` and :attr:`logits` are the (normalized) PMF over the outcomes;
    :attr:`mean` and :attr:`variance` are the moments of that discrete distribution, the limit of
    the relaxed moments as :math:`\tau \to 0` and exactly those of straight-through samples;
    :meth:`entropy` is its entropy too.

    A relaxed value is scored with the weights it carries over the outcomes of the
    distribution that drew it, paired with this one's by value, as the KLs pair them: the two
    need the same number of outcomes (else ``ValueError``), in any order, and an outcome of the
    drawing distribution that this one lacks has probability 0 here.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0`, broadcasting with the
            batch shape. A tensor of the parameters' dtype can be annealed in place.
        probs (Tensor): the PMF :math:`\pi`, shape ``batch_shape + (n,)``, ``n >= 2``.
        logits (Tensor): unnormalized :math:`\log \pi` (pass ``probs`` or ``logits``).
        outcomes (Tensor): the outcomes :math:`c`, shape ``(n,)`` or ``(n, d)`` for vector
            outcomes; default :math:`0, 1, \dots, n - 1`.
        hard (bool): return the hard outcome :math:`c_{\arg\max w}` in the forward
            pass, with the gradient of the relaxed :math:`z`, and score it by its log-PMF.

    Example:
        >>> d = TruncatedGenGS(0.5, logits=torch.zeros(4))
        >>> z = d.rsample((2,))
        >>> z.shape, d.log_prob(z).shape
        (torch.Size([2]), torch.Size([2]))
    """

    enumerate_support = relaxed_enumerate_support

    arg_constraints = {
        "temperature": scale,
        "probs": probability_vector,
        "logits": log_weights,
    }
    has_rsample = True
    # Subclasses whose logits are normalized by construction skip the logsumexp.
    _logits_are_normalized = False

    def __init__(
        self,
        temperature,
        *,
        probs=None,
        logits=None,
        outcomes=None,
        hard=False,
        validate_args=None,
    ):
        owner = type(self).__name__
        validate = validation_enabled(validate_args)
        # As passed (parsing may copy it to another dtype or device): AutoRelaxed's guide
        # follows a schedule that anneals this object in place.
        self._temperature_argument = temperature
        name, param, temperature, batch_shape = categorical_parameters(
            owner, probs, logits, temperature, validate, "outcomes"
        )
        if probs is not None:
            # Normalized, as torch's Categorical does: half-precision inputs sum to 1 only
            # within their rounding.
            self.probs = param / param.sum(-1, keepdim=True)
            logits = log_of_probs(self.probs)
        elif self._logits_are_normalized:
            logits = param
        else:
            logits = param - param.logsumexp(-1, keepdim=True)
        num_outcomes = logits.shape[-1]
        self.temperature = temperature
        self.logits = logits.expand(batch_shape + (num_outcomes,))
        if probs is not None:
            self.probs = self.probs.expand(batch_shape + (num_outcomes,))
        self._outcomes_are_counts = outcomes is None
        self.outcomes = self._parse_outcomes(owner, name, outcomes, validate)
        self.hard = check_flag(owner, "hard", hard)
        warn_if_learned_temperature(owner, temperature)
        super().__init__(batch_shape, self.outcomes.shape[1:], validate_args=False)
        self._validate_args = validate

    def _parse_outcomes(self, owner, name, outcomes, validate):
        like = self.logits
        if outcomes is None:
            return torch.arange(like.shape[-1], dtype=like.dtype, device=like.device)
        if torch.is_tensor(outcomes):
            check_devices(owner, {name: like, "outcomes": outcomes})
        outcomes = as_float(owner, "outcomes", outcomes, like.dtype, like.device)
        num_outcomes = static_size(like.shape[-1])
        if outcomes.dim() not in (1, 2) or static_size(outcomes.shape[0]) != num_outcomes:
            raise ValueError(
                f"{owner}: `outcomes` must have shape ({like.shape[-1]},) or "
                f"({like.shape[-1]}, d) to match `{name}`, got {tuple(outcomes.shape)}"
            )
        if validate:
            check_outcomes(owner, outcomes)
        return outcomes

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TruncatedGenGS, _instance)
        batch_shape = torch.Size(batch_shape)
        pmf_shape = batch_shape + self.logits.shape[-1:]
        new.logits = self.logits.expand(pmf_shape)
        if "probs" in self.__dict__:
            new.probs = self.probs.expand(pmf_shape)
        new.temperature = self.temperature.expand(batch_shape)
        new._temperature_argument = self._temperature_argument
        new.outcomes = self.outcomes
        new.hard = self.hard
        new._outcomes_are_counts = self._outcomes_are_counts
        super(TruncatedGenGS, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @lazy_property
    def probs(self):
        return logits_to_probs(self.logits)

    @property
    def num_outcomes(self) -> int:
        """The number :math:`n` of outcomes."""
        return static_size(self.logits.shape[-1])

    @property
    def truncation(self):
        """The number of outcomes the distribution is truncated to (here all of them)."""
        return self.num_outcomes

    # What a repr shows, in this order (the count classes show their base's parameters).
    _repr_names = ("logits", "outcomes", "temperature", "hard")

    def __repr__(self):
        parameter = "probs" if "probs" in self.__dict__ else "logits"
        return distribution_repr(
            self, *(parameter if n == "logits" else n for n in self._repr_names)
        )

    @lazy_property
    def _outcome_range(self):
        if self._outcomes_are_counts:
            # 0, 1, ..., n - 1: numbers, no reduction (two kernels a construction on a GPU).
            return 0.0, float(self.num_outcomes - 1)
        return self.outcomes.min(0).values, self.outcomes.max(0).values

    @property
    def support(self):
        box = constraints.interval(*self._outcome_range)
        return VectorOf(box) if self.event_shape else box

    @property
    def mean(self):
        return self.probs @ self.outcomes

    @property
    def variance(self):
        return self.probs @ self.outcomes.square() - self.mean.square()

    def entropy(self):
        # That of the discrete distribution, as the moments and the KLs are.
        return self.discrete().entropy()

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.logits.shape
        # One expression, so that the noise and the sum are freed once used: the step then holds
        # no more tensors of the sample's size than with the sum taken in place, which
        # torch.func.vmap refuses (its noise can be one tensor for a whole batch of logits).
        perturbed = tempered(
            gumbel_like(self.logits, shape) + self.logits, self.temperature.unsqueeze(-1)
        )
        weights, value = _relaxed_one_hot_map(
            perturbed, self._score_floor, self.outcomes, *self._outcome_range
        )
        if self.hard:
            # The weights too are the hard one-hot in the forward pass: log_prob is then the
            # log-PMF at the outcome returned, as for a plain count.
            index = perturbed.argmax(-1)
            weights = straight_through(one_hot(index, self.num_outcomes, weights), weights)
            value = straight_through(self.outcomes[index], value)
        # The outcomes the weights are over, for a scorer that lists them otherwise (counts:
        # 0..n - 1 for every GenGS over counts, so none is kept).
        carry(value, weights=weights, outcomes=None if self._outcomes_are_counts else self.outcomes)
        return value

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    @property
    def _score_floor(self) -> float:
        # The lowest score, relative to the row maximum, whose weight is still a normal number.
        return math.log(torch.finfo(self.logits.dtype).tiny) + math.log(self.num_outcomes) + 1

    def log_prob(self, value):
        record = relaxation_of(value)
        weights = None if record is None else record.weights
        # Before the support check: a sample of a GenGS over more outcomes can lie outside this
        # one's support, and the mismatch is what the user needs to hear about.
        if weights is not None and static_size(weights.shape[-1]) != self.num_outcomes:
            raise ValueError(
                f"the value was drawn from a GenGS over {weights.shape[-1]} outcomes and cannot "
                f"be scored by {type(self).__name__} over {self.num_outcomes} outcomes (model "
                "and guide need the same outcomes)"
            )
        value = floating(value, self.logits.dtype)  # integer counts: the outcomes they are
        if self._validate_args:
            self._validate_sample(value)
        if weights is None:
            owner, validate = type(self).__name__, self._validate_args
            hint = _NOT_AN_OUTCOME if record is None else _ANOTHER_FAMILY
            return outcome_log_prob(owner, value, self.outcomes, self.logits, validate, hint)
        # Outcomes excluded here (logit -inf) that the sample gives no weight would make
        # 0 * -inf = NaN: LOG_ZERO stands for log 0. (The most negative float did until a
        # second derivative, which multiplies it again, overflowed to -inf against a zero
        # weight.)
        # The weights' own gradient takes log(tiny) there (see linear_log_prob): a guide that
        # weighs an outcome the scorer excludes is pushed off it at a pace an optimizer holds.
        return linear_log_prob(weights, self._log_probs_at(record.outcomes, weights))

    def _log_probs_at(self, drawn, weights):
        """The log-PMF at the outcomes a sample's weights are over (``drawn``, ``None`` for the
        counts 0..n - 1), paired with this distribution's by value."""
        if drawn is None and self._outcomes_are_counts:
            return self.logits
        if drawn is None:
            drawn = torch.arange(weights.shape[-1], dtype=weights.dtype, device=weights.device)
        if static_shape(drawn.shape[1:]) != static_shape(self.outcomes.shape[1:]):
            raise ValueError(
                f"the value was drawn over outcomes of shape {tuple(drawn.shape[1:])} and cannot "
                f"be scored by {type(self).__name__} over outcomes of shape "
                f"{tuple(self.outcomes.shape[1:])}"
            )
        return log_probs_at(drawn, self.outcomes, self.logits)

    def discrete(self) -> FiniteDiscrete:
        r"""The discrete distribution this relaxes, the limit :math:`\tau \to 0`: the PMF
        :math:`\pi` over the outcomes (for a count class, the truncated PMF, its last outcome
        holding the tail)."""
        return FiniteDiscrete(self.outcomes, logits=self.logits, validate_args=self._validate_args)


# A relaxed sample of another family (an IGRCount's count, a soft straight-through's point):
# its record carries no GenGS weights.
_ANOTHER_FAMILY = (
    ": it is a relaxed sample of another family (IGR, a soft straight-through estimator), "
    "which carries no GenGS weights. A GenGS scores its own family's samples: give the site's "
    "model and guide the same family (a GenGS over the same outcomes)"
)

# What a value that is not an outcome usually is, and what to do about it.
_NOT_AN_OUTCOME = (
    " nor a relaxed sample drawn by rsample (which carries its relaxed one-hot weights; clone, "
    "detach and .to drop them, and an in-place change voids them). An autoguide such as "
    "AutoNormal or AutoDelta proposes such "
    "values: a relaxed site needs a guide of its own (pyro_relax.infer.AutoRelaxed, or a GenGS "
    "over the same outcomes; combine it with the autoguide of the other sites through "
    "AutoGuideList, or block it from the autoguide with poutine.block)"
)


def _count_base(family, owner, temperature, **params):
    """The torch distribution of ``family`` from a count class's parameters (numbers, lists or
    tensors), converted to one dtype and device with the ``temperature`` and checked to
    broadcast with it. :class:`GenGS` checks its values
    (:func:`~pyro_relax.distributions.truncation.check_base`)."""
    owner = type(owner).__name__
    if "probs" in params and (params["probs"] is None) == (params.get("logits") is None):
        raise ValueError(f"{owner}: pass exactly one of `probs` and `logits`")
    # Only the one of probs and logits not given is left out: the parse refuses any other
    # None, which torch's constructor would fill with its default (a Binomial's count of 1).
    given = {
        name: value
        for name, value in params.items()
        if value is not None or name not in ("probs", "logits")
    }
    parsed, _ = parse_parameters(
        owner, {**given, "temperature": temperature}, {}, False, warn_copy=False
    )
    del parsed["temperature"]
    try:
        return family(**parsed, validate_args=False)
    except ValueError as error:
        raise ValueError(f"{owner}: {error}") from None


class GenGS(TruncatedGenGS):
    r"""GenGS relaxation of a count distribution truncated to :math:`n` outcomes.

    The base distribution :math:`X` (Poisson, Geometric, NegativeBinomial or Binomial) is
    truncated to the outcomes :math:`0, \dots, n-1`, the last one absorbing the tail,

    .. math::
        \pi_k = P(X = k) \ (k < n - 1), \qquad \pi_{n-1} = P(X \geq n - 1),

    and relaxed as in :class:`TruncatedGenGS`. The tail is computed from a closed-form survival
    function where one exists. As :math:`n \to \infty` the truncated variable converges to
    :math:`X` almost surely; as :math:`\tau \to 0` samples follow the truncated PMF.

    The truncation is fixed (``truncation``), or automatic ("GenGS NP"): the smallest :math:`n`
    whose exact outcomes capture at least ``mass`` of :math:`X`. Automatic truncation without a
    cap takes the maximum over the batch, which reads tensors on the host; with
    ``max_truncation`` every batch element gets its own :math:`n \leq` ``max_truncation``, with
    static shapes and no device synchronization (outcomes beyond an element's :math:`n` get
    probability zero).

    With validation on, a :class:`TruncationWarning` is raised when the mass beyond the last
    outcome, :attr:`tail_mass` :math:`= P(X \geq n)`, exceeds ``tail_tolerance``.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Arguments:
        base_dist: the count distribution :math:`X`.
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        truncation (int): the number of outcomes :math:`n \geq 2`; ``None`` for automatic.
        mass (float): the mass :math:`\eta` automatic truncation captures.
        max_truncation (int): the cap of automatic truncation, for static shapes.
        hard (bool): return hard integer outcomes (see :class:`TruncatedGenGS`).
        tail_tolerance (float): the largest :attr:`tail_mass` accepted without a warning.

    Example:
        >>> from torch.distributions import Poisson
        >>> d = GenGS(Poisson(torch.tensor([1.0, 4.0])), 0.1, max_truncation=20)
        >>> d.truncation
        tensor([ 7, 13])
    """

    _logits_are_normalized = True  # log_probs_truncated returns normalized rows
    _repr_names = ("base_dist", "truncation", "temperature", "hard")

    def __init__(
        self,
        base_dist,
        temperature,
        truncation=None,
        *,
        mass=0.999,
        max_truncation=None,
        hard=False,
        tail_tolerance=1e-2,
        validate_args=None,
    ):
        owner = type(self).__name__
        if truncation is not None and max_truncation is not None:
            raise ValueError(f"{owner}: pass `truncation` or `max_truncation`, not both")
        if tail_tolerance is not None and not (
            isinstance(tail_tolerance, Real) and 0 <= tail_tolerance < 1
        ):
            raise ValueError(
                f"{owner}: `tail_tolerance` must be None or a number in [0, 1), got "
                f"{tail_tolerance!r}"
            )
        passed = temperature
        base_dist, others = check_base(
            owner, base_dist, validation_enabled(validate_args), temperature=temperature
        )
        temperature = others["temperature"]
        if truncation is not None:
            truncation = size = check_count(owner, "truncation", truncation, minimum=2)
        elif max_truncation is not None:
            size = check_count(owner, "max_truncation", max_truncation, minimum=2)
            truncation = automatic_truncation(base_dist, mass, max_truncation)
        else:
            truncation = size = automatic_truncation(base_dist, mass)
        self.base_dist = base_dist
        self._truncation = truncation
        self.tail_tolerance = tail_tolerance
        super().__init__(
            temperature,
            logits=log_probs_truncated(base_dist, truncation, size),
            hard=hard,
            validate_args=validate_args,
        )
        self._temperature_argument = passed
        if static_shape(self.base_dist.batch_shape) != static_shape(self.batch_shape):
            # A temperature of a larger batch shape: the base's parameters, the truncation and
            # the tail mass are reported per batch element too.
            self.base_dist = self.base_dist.expand(self.batch_shape)
            if torch.is_tensor(self._truncation):
                self._truncation = self._truncation.expand(self.batch_shape)
        if self._validate_args and tail_tolerance is not None:
            if self._tail_may_exceed(tail_tolerance) and bool(
                (self.tail_mass > tail_tolerance).any()
            ):
                # A constant message, so Python's once-per-location filter shows it once rather
                # than at every SVI step; the masses are in `tail_mass`.
                warnings.warn(
                    f"{type(self).__name__}: more than tail_tolerance={tail_tolerance} of the "
                    "mass lies beyond the last outcome (see .tail_mass); raise the truncation, "
                    "keeping the same outcomes in model and guide",
                    TruncationWarning,
                    stacklevel=caller_stacklevel(),
                )

    def _tail_may_exceed(self, tolerance: float) -> bool:
        r"""Whether some element's last outcome holds more than ``tolerance``, the only case in
        which the mass beyond it, :math:`P(X \geq n) \leq P(X \geq n - 1)`, can exceed it. The
        last outcome's probability is already in the PMF; the tail mass costs a second
        evaluation of the survival function (as much as the truncation itself), so the warning
        computes it only then. A margin of 0.1% keeps the bound safe from rounding."""
        n = self._truncation
        if torch.is_tensor(n):
            index = (n - 1).long().unsqueeze(-1)
            last = torch.take_along_dim(self.logits, index, -1).squeeze(-1)
        else:
            last = self.logits[..., n - 1]
        return bool((last.exp() > tolerance * (1 - 1e-3)).any())

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GenGS, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.base_dist = self.base_dist.expand(batch_shape)
        truncation = self._truncation
        new._truncation = (
            truncation.expand(batch_shape) if torch.is_tensor(truncation) else truncation
        )
        new.tail_tolerance = self.tail_tolerance
        return new

    @property
    def truncation(self):
        """The number of outcomes :math:`n` (an ``int``, or a tensor of one per batch element)."""
        return self._truncation

    @lazy_property
    def tail_mass(self):
        r"""The mass :math:`P(X \geq n)` that the last outcome absorbs from beyond it."""
        n = self._truncation
        if torch.is_tensor(n):
            return (
                log_survival(self.base_dist, self.num_outcomes + 1, n.unsqueeze(-1))
                .squeeze(-1)
                .exp()
            )
        counts = torch.full((1,), n, dtype=self.logits.dtype, device=self.logits.device)
        return log_survival(self.base_dist, n + 1, counts).squeeze(-1).exp()


class GenGSPoisson(GenGS):
    r"""GenGS relaxation of a Poisson distribution truncated to :math:`n` outcomes.

    .. math::
        \pi_k = \frac{\lambda^k e^{-\lambda}}{k!} \ (k < n - 1), \qquad
        \pi_{n-1} = P(n - 1, \lambda),

    where :math:`P(a, x)` is the regularized lower incomplete gamma function. See :class:`GenGS`
    for the truncation options and :class:`TruncatedGenGS` for the relaxation and the meaning
    of ``log_prob``.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Arguments:
        rate (float or Tensor): the rate :math:`\lambda > 0`.
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        truncation (int): the number of outcomes :math:`n`; ``None`` for automatic truncation.
        **kwargs: ``mass``, ``max_truncation``, ``hard``, ``tail_tolerance``,
            ``validate_args`` as for :class:`GenGS`.

    Example:
        >>> import pyro
        >>> def model():
        ...     return pyro.sample("z", GenGSPoisson(torch.tensor(2.0), 0.5, 12))
        >>> model().shape
        torch.Size([])
    """

    arg_constraints = {"rate": finite_positive, "temperature": scale}

    def __init__(self, rate, temperature, truncation=None, *, validate_args=None, **kwargs):
        base = _count_base(Poisson, self, temperature, rate=rate)
        super().__init__(base, temperature, truncation, validate_args=validate_args, **kwargs)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GenGSPoisson, _instance)
        return super().expand(batch_shape, _instance=new)

    @property
    def rate(self):
        return self.base_dist.rate


class GenGSGeometric(GenGS):
    r"""GenGS relaxation of a Geometric distribution on :math:`0, 1, \dots`, truncated.

    .. math::
        \pi_k = p (1 - p)^k \ (k < n - 1), \qquad \pi_{n-1} = (1 - p)^{n-1}.

    Pass ``probs`` :math:`p` or ``logits``; the attributes :attr:`probs` and :attr:`logits` are
    those of the truncated PMF, and :attr:`base_dist` holds the geometric parameters.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        probs (float or Tensor): the success probability :math:`p \in (0, 1]`.
        logits (float or Tensor): its log-odds.
        truncation (int): the number of outcomes :math:`n`; ``None`` for automatic truncation.
        **kwargs: as for :class:`GenGS`.

    Example:
        >>> GenGSGeometric(temperature=0.5, truncation=15, probs=0.5).rsample((3,)).shape
        torch.Size([3])
    """

    def __init__(
        self, temperature, truncation=None, *, probs=None, logits=None, validate_args=None, **kwargs
    ):
        base = _count_base(Geometric, self, temperature, probs=probs, logits=logits)
        super().__init__(base, temperature, truncation, validate_args=validate_args, **kwargs)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GenGSGeometric, _instance)
        return super().expand(batch_shape, _instance=new)


class GenGSNegativeBinomial(GenGS):
    r"""GenGS relaxation of a NegativeBinomial distribution, truncated.

    With torch's convention (:math:`k` successes of probability :math:`p` before :math:`r`
    failures):

    .. math::
        \pi_k = \binom{k + r - 1}{k} (1 - p)^r p^k \ (k < n - 1), \qquad
        \pi_{n-1} = P(X \geq n - 1).

    There is no incomplete beta function in torch: the tail is the complement of the head
    where it is large and an explicit sum with a geometric bound where it is small (below
    1e-8). Where :math:`p` is close to 1, many terms lie beyond the sum, and where
    :math:`r < 1` they decay faster than the bound's ratio :math:`p`: the bound then
    overestimates such a tail by a few percent.

    Pass ``probs`` :math:`p` or ``logits``; the attributes :attr:`probs` and :attr:`logits` are
    those of the truncated PMF, and :attr:`base_dist` holds the negative binomial parameters.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Arguments:
        total_count (float or Tensor): the number of failures :math:`r > 0`.
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        probs (float or Tensor): the success probability :math:`p`.
        logits (float or Tensor): its log-odds.
        truncation (int): the number of outcomes :math:`n`; ``None`` for automatic truncation.
        **kwargs: as for :class:`GenGS`.

    Example:
        >>> round(float(GenGSNegativeBinomial(3.0, 0.5, 30, probs=0.5).mean), 4)
        3.0
    """

    arg_constraints = {"total_count": finite_positive, "temperature": scale}

    def __init__(
        self,
        total_count,
        temperature,
        truncation=None,
        *,
        probs=None,
        logits=None,
        validate_args=None,
        **kwargs,
    ):
        base = _count_base(
            NegativeBinomial,
            self,
            temperature,
            total_count=total_count,
            probs=probs,
            logits=logits,
        )
        super().__init__(base, temperature, truncation, validate_args=validate_args, **kwargs)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GenGSNegativeBinomial, _instance)
        return super().expand(batch_shape, _instance=new)

    @property
    def total_count(self):
        return self.base_dist.total_count


class GenGSBinomial(GenGS):
    r"""GenGS relaxation of a Binomial distribution, exact: :math:`N + 1` outcomes.

    .. math::
        \pi_k = \binom{N}{k} p^k (1 - p)^{N - k}, \qquad k = 0, \dots, N.

    No truncation is needed. With a tensor of total counts the outcomes run to the largest one
    (read once on the host) and each element gives zero mass beyond its own :math:`N`. A
    relaxation needs two outcomes: with :math:`N = 0` alone the outcomes are 0 and 1, the second
    of mass zero (every sample is 0).

    Pass ``probs`` :math:`p` or ``logits``; the attributes :attr:`probs` and :attr:`logits` are
    those of the PMF over the outcomes, and :attr:`base_dist` holds the binomial parameters.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Arguments:
        total_count (int or Tensor): the number of trials :math:`N`.
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        probs (float or Tensor): the success probability :math:`p`.
        logits (float or Tensor): its log-odds.
        **kwargs: ``hard``, ``validate_args`` as for :class:`GenGS`.

    Example:
        >>> GenGSBinomial(20, temperature=0.5, probs=0.3).num_outcomes
        21
    """

    def __init__(
        self, total_count, temperature, *, probs=None, logits=None, validate_args=None, **kwargs
    ):
        for name in ("truncation", "max_truncation", "mass", "tail_tolerance"):
            if name in kwargs:
                raise TypeError(
                    f"GenGSBinomial takes no `{name}`: its outcomes are 0..total_count, exactly"
                )
        base = _count_base(
            Binomial,
            self,
            temperature,
            total_count=total_count,
            probs=probs,
            logits=logits,
        )
        if is_integer(total_count):
            total_count = int(total_count)
            truncation = max(total_count + 1, 2)
        else:
            # The outcomes run to the largest total count: read on the host, once per
            # construction, after the values are checked (GenGS checks them again, cheaply).
            if torch.jit.is_tracing():
                raise ValueError(
                    "GenGSBinomial: a tensor `total_count` is read on the host to choose the "
                    "number of outcomes, which torch.jit.trace (JitTrace_ELBO) would freeze at "
                    "its traced value; pass an int"
                )
            base = check_base(type(self).__name__, base, validation_enabled(validate_args))[0]
            counts = base.total_count
            truncation = max(int(counts.max()) + 1 if counts.numel() else 0, 2)
        if truncation > _MAX_OUTCOMES:
            raise ValueError(
                f"GenGSBinomial: `total_count` up to {truncation - 1} gives more than "
                f"{_MAX_OUTCOMES} outcomes to enumerate"
            )
        super().__init__(
            base,
            temperature,
            truncation,
            tail_tolerance=None,
            validate_args=validate_args,
            **kwargs,
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GenGSBinomial, _instance)
        return super().expand(batch_shape, _instance=new)

    @property
    def total_count(self):
        return self.base_dist.total_count


@functools.lru_cache(maxsize=64)
def _count_vectors_on_cpu(total_count: int, num_classes: int) -> torch.Tensor:
    # Stars and bars: each choice of num_classes - 1 bar positions among
    # total_count + num_classes - 1 slots is one count vector.
    slots = total_count + num_classes - 1
    rows = []
    for bars in itertools.combinations(range(slots), num_classes - 1):
        edges = (-1,) + bars + (slots,)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(num_classes)])
    if torch.compiler.is_compiling():
        # torch.compile traces through the cache to a constant; a warnings filter would break
        # its graph.
        return torch.tensor(rows, dtype=torch.float64)
    with warnings.catch_warnings():
        # A table of constants, and a constant in a jit trace too.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.tensor(rows, dtype=torch.float64)


@functools.lru_cache(maxsize=64)
def _count_vectors(total_count: int, num_classes: int, dtype, device) -> torch.Tensor:
    # Built on the CPU and copied to each device once: cached per device and dtype.
    return _count_vectors_on_cpu(total_count, num_classes).to(device=device, dtype=dtype)


class _ScaledSimplex(constraints.Constraint):
    """Non-negative vectors summing to ``total``, up to the rounding of a relaxed sample."""

    is_discrete = False
    event_dim = 1

    def __init__(self, total):
        self.total = total
        super().__init__()

    def check(self, value):
        # Relaxed samples are softmax weights times counts: their sum is off by a few ulp.
        tolerance = self.total * max(1e-6, 64 * torch.finfo(value.dtype).eps)
        return nonnegative_rows(value) & ((value.sum(-1) - self.total).abs() <= tolerance)


class GenGSMultinomial(TruncatedGenGS):
    r"""GenGS relaxation of a Multinomial distribution over all its count vectors.

    The outcomes are the :math:`\binom{N + K - 1}{K - 1}` count vectors :math:`c` with
    :math:`\sum_j c_j = N`, each with its multinomial probability,

    .. math::
        \pi_c = \frac{N!}{\prod_j c_j!} \prod_j p_j^{c_j}, \qquad z = \sum_c w_c\, c,

    so a relaxed sample is a non-negative :math:`K`-vector summing to :math:`N`.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Arguments:
        total_count (int): the number of trials :math:`N`.
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        probs (Tensor): the class probabilities :math:`p`, shape ``batch_shape + (K,)``.
        logits (Tensor): their unnormalized log-probabilities.
        hard (bool): return hard count vectors.

    Example:
        >>> d = GenGSMultinomial(3, temperature=0.5, probs=torch.tensor([0.2, 0.3, 0.5]))
        >>> d.num_outcomes, round(float(d.rsample().sum()), 4)
        (10, 3.0)
    """

    _repr_names = ("total_count", "class_logits", "temperature", "hard")

    def __init__(
        self,
        total_count,
        temperature,
        *,
        probs=None,
        logits=None,
        hard=False,
        validate_args=None,
    ):
        owner = type(self).__name__
        total_count = check_count(owner, "total_count", total_count)
        # TruncatedGenGS parses the temperature again, and warns of a copy then.
        name, param, _, _ = categorical_parameters(
            owner,
            probs,
            logits,
            temperature,
            validation_enabled(validate_args),
            "classes",
            warn_copy=False,
        )
        # A Categorical normalizes the class parameters; torch's Multinomial would validate its
        # inner Categorical even with validate_args=False (a host read per step).
        classes = Categorical(**{name: param}, validate_args=False)
        num_classes = classes.param_shape[-1]
        if math.comb(total_count + num_classes - 1, num_classes - 1) > _MAX_OUTCOMES:
            raise ValueError(
                f"GenGSMultinomial({total_count} trials, {num_classes} classes) has more than "
                f"{_MAX_OUTCOMES} outcomes to enumerate"
            )
        class_logits = categorical_log_probs(classes)  # exact from probs, -inf for a 0
        outcomes = _count_vectors(total_count, num_classes, class_logits.dtype, class_logits.device)
        self.class_logits = class_logits
        self.total_count = total_count
        super().__init__(
            temperature,
            logits=_multinomial_log_probs(class_logits, total_count, outcomes),
            outcomes=outcomes,
            hard=hard,
            validate_args=validate_args,
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GenGSMultinomial, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.class_logits = self.class_logits.expand(new.batch_shape + self.class_logits.shape[-1:])
        new.total_count = self.total_count
        return new

    @property
    def support(self):
        return _ScaledSimplex(self.total_count)


def _multinomial_log_probs(class_logits, total_count: int, outcomes) -> torch.Tensor:
    """Multinomial log-probabilities of each count vector, shape ``batch_shape + (n,)``.

    ``class_logits`` are normalized class log-probabilities, shape ``batch_shape + (K,)``.
    """
    log_p = class_logits.unsqueeze(-2)
    # 0 * log 0 = 0: a class with no mass contributes nothing when it is not chosen.
    terms = torch.where(outcomes > 0, outcomes * log_p, torch.zeros_like(log_p))
    log_coefficient = math.lgamma(total_count + 1) - torch.lgamma(outcomes + 1).sum(-1)
    return log_coefficient + terms.sum(-1)

"""Straight-through estimators for categorical and binary latents: GST, ST, STGS and GR-MCK."""

import math
import warnings

import torch
from pyro.distributions import Bernoulli, OneHotCategorical, constraints
from pyro.distributions.score_parts import ScoreParts
from torch.distributions import Categorical, Distribution

from pyro_relax._carry import carry, relaxation_of
from pyro_relax._numerics import (
    binary_log_probs,
    built_from_probs,
    categorical_log_probs,
    categorical_parameters,
    check_count,
    check_flag,
    check_number,
    distribution_repr,
    finite_real,
    floating,
    gumbel_like,
    lacks,
    linear_log_prob,
    log1mexp,
    log_weights,
    one_hot,
    probability_vector,
    relaxed_enumerate_support,
    scale,
    static_size,
    straight_through,
    tempered,
    validation_enabled,
    warn_if_learned_temperature,
)

__all__ = [
    "GRMCKBernoulli",
    "GRMCKCategorical",
    "GappedST",
    "GappedSTBernoulli",
    "GappedSTCategorical",
    "STBernoulli",
    "STCategorical",
    "STGSBernoulli",
    "STGSCategorical",
]


def _check_gap(owner: str, gap):
    if isinstance(gap, str) and gap == "expected":
        return gap
    requirement = 'be a finite non-negative number or "expected"'
    if isinstance(gap, str):  # another word: a bad value, not a bad type
        raise ValueError(f"{owner}: `gap` must {requirement}, got {gap!r}")
    return float(check_number(owner, "gap", gap, requirement, lambda g: 0 <= g < math.inf))


def _expected_gap(log_p: torch.Tensor) -> torch.Tensor:
    r"""The expected gap :math:`-\log(1 - p) / p` between the two largest Gumbel-perturbed
    logits, given that the one of probability :math:`p` is the largest (Fan et al., 2022)."""
    tiny_p = log_p < math.log(torch.finfo(log_p.dtype).eps)
    # p = 1 would give an infinite gap: keep p one machine epsilon below 1.
    log_p = log_p.clamp(max=math.log1p(-torch.finfo(log_p.dtype).eps))
    # Below eps the ratio is 0/0 once p underflows; its series 1 + p/2 is exact to rounding there.
    safe = torch.where(tiny_p, torch.full_like(log_p, -1.0), log_p)
    ratio = -log1mexp(safe) / safe.exp()
    return torch.where(tiny_p, 1 + log_p.exp() / 2, ratio)


def _conditional_perturbed_logits(logits, index, log_exponentials):
    r"""Gumbel-perturbed logits :math:`l + G` conditioned on :math:`\arg\max = D` (Paulus et
    al., 2021), in log space, from :math:`\log E` with :math:`E \sim \operatorname{Exp}(1)`.

    The maximum is :math:`\log \sum_j e^{l_j} - \log E_D`, the others are Gumbels of location
    :math:`l_j` truncated below it: :math:`-\operatorname{logaddexp}(\log E_j - l_j,
    \log E_D - \log \sum_j e^{l_j})`. ``log_exponentials`` may have extra leading dimensions
    (independent draws).
    """
    index = index.expand(log_exponentials.shape[:-1]).unsqueeze(-1)
    top = logits.logsumexp(-1, keepdim=True) - log_exponentials.gather(-1, index)
    others = -torch.logaddexp(log_exponentials - logits, -top)
    return others.scatter(-1, index, top)


def _concrete_log_density(logits, temperature, log_weights, scores=None):
    r"""The Concrete (Gumbel-Softmax) log-density of the relaxed one-hot :math:`w = e^y`,
    evaluated from its log-weights :math:`y` (so it stays finite where :math:`w` underflows):

    .. math::
        \log p(w) = \log (K - 1)! + (K - 1) \log \tau + \sum_k s_k - K \log \sum_k e^{s_k}
        - \sum_k y_k, \qquad s_k = l_k - \tau y_k.

    The terms in :math:`s` do not change when a constant is added to every :math:`s_k`. With
    the ``scores`` :math:`t` whose softmax :math:`w` is (:math:`y = t - \log \sum e^t`, a
    draw's tempered scores), :math:`s_k = l_k - \tau t_k` stands for them: at a high
    temperature, :math:`\tau y_k` from the rounded :math:`y` is off by :math:`\tau` times its
    rounding (72 nats at :math:`\tau = 10^5` with 500 categories in float32), while
    :math:`\tau t_k` is the logit plus the Gumbel noise again.

    Unlike ``torch.distributions.ExpRelaxedCategorical``, a batched temperature broadcasts with
    the batch, not with the categories (pytorch#37162).
    """
    # Excluded categories (logit -inf, weight exactly 0) leave the density of the K' others,
    # on their face of the simplex: their terms are zeros (-inf + inf would be NaN, and so
    # would the gradients of any masked-out branch computed from them).
    excluded = logits.isneginf()
    log_weights = log_weights.masked_fill(excluded, 0.0)
    scores = log_weights if scores is None else scores.masked_fill(excluded, 0.0)
    scores = logits.masked_fill(excluded, 0.0) - temperature.unsqueeze(-1) * scores
    kept = static_size(logits.shape[-1]) - excluded.sum(-1)
    return (
        torch.lgamma(kept.to(scores.dtype))
        + (kept - 1) * temperature.log()
        + scores.sum(-1)
        - kept * scores.masked_fill(excluded, -math.inf).logsumexp(-1)
        - log_weights.sum(-1)
    )


def _concrete_inputs(value, validate: bool, name: str, binary: bool = False):
    """The log-weights and the tempered scores a soft STGS sample carries (one read of its
    record) or, without them, the logarithm of its coordinates and ``None`` (see
    :class:`STGSCategorical` for this fallback); ``binary``: ``value`` is the second coordinate
    of a pair (the Bernoulli versions)."""
    record = relaxation_of(value)
    if record is not None and record.log_weights is not None:
        return record.log_weights, record.scores
    point = torch.stack([1 - value, value], -1) if binary else value
    if validate and not bool((point > 0).all()):
        raise ValueError(
            f"{name}.log_prob got a relaxed value with a coordinate 0 and without the "
            "log-weights that rsample attaches (clone, detach and .to drop them, an in-place "
            "change voids them): its Concrete "
            "density cannot be evaluated"
        )
    # A coordinate that underflowed to 0 has lost its log-weight; the smallest normal number
    # keeps the density finite (the documented fallback).
    return point.clamp(min=torch.finfo(point.dtype).tiny).log(), None


def _score_parts(self, value):
    """Pyro's estimator ingredients: a draw of ``rsample`` (it carries its record, also when
    drawn without gradients or from parameters that need none, as under
    ``SVI.evaluate_loss``) or any value with a pathwise gradient is reparameterized; any other
    value (one Pyro enumerated, or passed in) gets its score function, as a
    non-reparameterized ``OneHotCategorical`` or ``Bernoulli`` would, so that
    ``TraceEnum_ELBO`` weights enumerated guide values by their probabilities and
    differentiates through them. The entropy term is kept in both cases:
    ``TraceMeanField_ELBO`` reads the loss from it where no KL is registered."""
    log_prob = self.log_prob(value)
    drawn = value.requires_grad or relaxation_of(value) is not None
    score_function = 0 if drawn else log_prob
    return ScoreParts(log_prob=log_prob, score_function=score_function, entropy_term=log_prob)


@lacks("cdf", "icdf")
class _StraightThroughCategorical(OneHotCategorical):
    """Base of the straight-through one-hot categoricals: exact one-hot samples of
    ``Categorical(softmax(logits))`` whose gradient is that of a surrogate :math:`h`, which each
    estimator defines in :meth:`_surrogate`."""

    arg_constraints = {
        "probs": probability_vector,
        "logits": log_weights,
        "temperature": scale,
    }
    has_rsample = True
    # Estimator options, copied by `expand` (and used by the Bernoulli versions).
    _option_names = ()
    # Whether log_prob of a soft sample is a density (in the temperature too): then the
    # temperature may be learned (see warn_if_learned_temperature).
    _soft_density = False

    @classmethod
    def _checked_options(cls, owner: str, options: dict) -> dict:
        """The estimator's ``options`` (given ones of ``_option_names``), checked and
        normalized, with errors naming ``owner``: this class, or its Bernoulli version."""
        return {}

    @classmethod
    def _temperature_may_be_learned(cls, hard: bool) -> bool:
        return not hard and cls._soft_density

    def __init__(self, temperature, *, probs=None, logits=None, hard=True, validate_args=None):
        validate = validation_enabled(validate_args)
        self._temperature_argument = temperature  # as passed (see TruncatedGenGS)
        _, param, temperature, batch_shape = categorical_parameters(
            type(self).__name__, probs, logits, temperature, validate, "categories"
        )
        param = param.expand(batch_shape + param.shape[-1:])
        self.temperature = temperature
        self.hard = check_flag(type(self).__name__, "hard", hard)
        if not self._temperature_may_be_learned(self.hard):
            warn_if_learned_temperature(type(self).__name__, temperature)
        # torch's OneHotCategorical would build its Categorical with default validation, which
        # reads the parameters on the host at every construction, even with validate_args=False.
        self._categorical = Categorical(
            probs=param if probs is not None else None,
            logits=param if logits is not None else None,
            validate_args=False,
        )
        if probs is not None:
            # torch would take the logits from the probs clamped at the dtype's epsilon.
            self._categorical.logits = categorical_log_probs(self._categorical)
        Distribution.__init__(self, batch_shape, param.shape[-1:], validate_args=False)
        self._validate_args = validate

    def __repr__(self):
        parameter = "probs" if built_from_probs(self._categorical) else "logits"
        return distribution_repr(self, parameter, "temperature", "hard", *self._option_names)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_StraightThroughCategorical, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.temperature = self.temperature.expand(batch_shape)
        new._temperature_argument = self._temperature_argument
        new.hard = self.hard
        for name in self._option_names:
            setattr(new, name, getattr(self, name))
        return new

    @property
    def support(self):
        # A soft sample sums to one within its dtype's rounding, summed over K coordinates.
        return constraints.one_hot if self.hard else probability_vector

    score_parts = _score_parts

    @property
    def has_enumerate_support(self):
        return self.hard

    def enumerate_support(self, expand=True):
        if not self.hard:
            relaxed_enumerate_support(self)
        return super().enumerate_support(expand)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        logits = self.logits.expand(shape)
        gumbels = gumbel_like(logits, shape)
        # Gumbel-max: an exact draw of Categorical(softmax(logits)), device-agnostic.
        index = (logits.detach() + gumbels).argmax(-1)
        hard = one_hot(index, logits.shape[-1], logits)
        surrogate, fields = self._surrogate(logits, index, hard, gumbels)
        # Every draw carries a record (with the log-weights of a Concrete sample): it marks
        # the value as a draw for score_parts.
        if self.hard:
            return carry(straight_through(hard, surrogate))
        return carry(surrogate, **fields)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            if not self.hard:
                return self.rsample(sample_shape)
            shape = self._extended_shape(sample_shape)
            logits = self.logits.expand(shape)
            return one_hot(
                (logits + gumbel_like(logits, shape)).argmax(-1), logits.shape[-1], logits
            )

    def discrete(self) -> OneHotCategorical:
        """The discrete distribution whose samples this estimator draws (in every temperature):
        ``OneHotCategorical`` with the same logits."""
        return OneHotCategorical(logits=self.logits, validate_args=self._validate_args)

    def _surrogate(self, logits, index, one_hot, gumbels):
        """The surrogate :math:`h` (shape of ``logits``) and the fields of the record a soft
        sample carries (empty unless :math:`h` has a Concrete density), for the sampled
        ``index`` drawn with ``gumbels``."""
        raise NotImplementedError

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return self._log_prob(value)

    def _log_prob(self, value):
        # Linear in the value: log pi_D for a one-hot, and the gradient reaches the surrogate
        # (so Trace_ELBO gets the straight-through estimate of the KL's gradient). An excluded
        # category (logit -inf) would make 0 * -inf = NaN: LOG_ZERO stands for log 0 (a
        # finite number that a second derivative can multiply again without overflowing).
        return linear_log_prob(value, self.logits)


class STCategorical(_StraightThroughCategorical):
    r"""One-hot categorical with the naive straight-through gradient.

    The forward value is an exact draw :math:`D \sim \operatorname{Categorical}(\pi)`, one-hot;
    the backward pass uses the noiseless surrogate

    .. math::
        h = \operatorname{softmax}(l / \tau), \qquad
        \frac{\partial D}{\partial l} := \frac{\partial h}{\partial l}.

    The gradient does not depend on the sample (the estimator is biased and, with
    :math:`\tau = 1`, it is the derivative of the mean :math:`\pi`). As :math:`\tau \to 0`,
    :math:`h` tends to the one-hot of the mode and its gradient vanishes; as
    :math:`\tau \to \infty`, :math:`h` tends to the uniform vector.

    :meth:`log_prob` of a one-hot value is :math:`\log \pi_D`, as for ``OneHotCategorical``,
    computed as :math:`\sum_k x_k \log \pi_k` so its gradient reaches the surrogate. The
    categorical KLs of ``OneHotCategorical`` apply. With ``hard=False`` the value is :math:`h`
    itself and :meth:`log_prob` the soft log-PMF :math:`\sum_k h_k \log \pi_k`.

    References:
        Estimating or Propagating Gradients Through Stochastic Neurons for Conditional
        Computation. Yoshua Bengio, Nicholas Léonard, Aaron Courville, 2013.
        https://arxiv.org/abs/1308.3432

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0` of the surrogate,
            broadcasting with the batch shape. A tensor of the parameters' dtype can be
            annealed in place.
        logits (Tensor): unnormalized log-probabilities :math:`l`, shape
            ``batch_shape + (K,)``, ``K >= 2`` (pass ``logits`` or ``probs``).
        probs (Tensor): the probabilities :math:`\pi = \operatorname{softmax}(l)`.
        hard (bool): return the hard one-hot :math:`D` (default), or the surrogate :math:`h`
            itself (``mean`` and ``variance`` stay the categorical's: see the README).

    Example:
        >>> d = STCategorical(0.5, logits=torch.tensor([0.0, 1.0, 2.0]))
        >>> d.rsample((2,)).sum(-1)
        tensor([1., 1.])
    """

    def _surrogate(self, logits, index, one_hot, gumbels):
        return torch.softmax(tempered(logits, self.temperature.unsqueeze(-1)), -1), {}


class STGSCategorical(_StraightThroughCategorical):
    r"""One-hot categorical with the straight-through Gumbel-Softmax (STGS) gradient.

    With Gumbel noise :math:`g_k`, the forward value is the one-hot of
    :math:`D = \arg\max_k (l_k + g_k) \sim \operatorname{Categorical}(\pi)` and the backward
    pass uses the Gumbel-Softmax sample built from the same noise,

    .. math::
        h = \operatorname{softmax}\big((l + g) / \tau\big).

    As :math:`\tau \to 0`, :math:`h \to D` (and the gradient's variance grows); as
    :math:`\tau \to \infty`, :math:`h` tends to the uniform vector.

    With ``hard=True`` (default), :meth:`log_prob` is :math:`\log \pi_D` (see
    :class:`STCategorical`). With ``hard=False`` the value is the Gumbel-Softmax sample
    :math:`h` and :meth:`log_prob` its Concrete density, computed in log space from the
    log-weights :math:`\log h` that the sample carries, so it is finite in float32 at
    temperatures down to 0.01, where coordinates of :math:`h` underflow to 0. A value without
    them (``clone``, ``detach`` and ``.to`` drop them) is scored from the logarithm of its
    coordinates: with validation on, a coordinate equal to 0 raises ``ValueError``; with
    validation off it is clamped at the smallest normal number.

    Warning:
        ``kl_divergence`` and ``TraceMeanField_ELBO`` use the KL of the categorical
        distributions, also for soft samples, not that of the Concrete ones: the latter is
        dominated by categories that both distributions give almost no mass and pins a guide
        to its prior. So ``TraceMeanField_ELBO`` and ``Trace_ELBO`` (the Concrete
        densities) are different objectives for soft samples, and the KL gives a learned
        temperature no gradient: learn it with ``Trace_ELBO``. ``mean``, ``variance`` and
        ``entropy`` are the categorical's too.

    References:
        Categorical Reparameterization with Gumbel-Softmax.
        Eric Jang, Shixiang Gu, Ben Poole, 2017.
        https://arxiv.org/abs/1611.01144

        The Concrete Distribution: A Continuous Relaxation of Discrete Random Variables.
        Chris J. Maddison, Andriy Mnih, Yee Whye Teh, 2017.
        https://arxiv.org/abs/1611.00712

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0` of the surrogate,
            broadcasting with the batch shape. A tensor of the parameters' dtype can be
            annealed in place.
        logits (Tensor): unnormalized log-probabilities :math:`l`, shape
            ``batch_shape + (K,)``, ``K >= 2`` (pass ``logits`` or ``probs``).
        probs (Tensor): the probabilities :math:`\pi = \operatorname{softmax}(l)`.
        hard (bool): return the hard one-hot :math:`D` (default), or the surrogate :math:`h`
            itself (``mean`` and ``variance`` stay the categorical's: see the README).

    Example:
        >>> d = STGSCategorical(0.01, logits=torch.zeros(10), hard=False)
        >>> w = d.rsample()
        >>> bool(torch.isfinite(d.log_prob(w)))
        True
    """

    _soft_density = True  # the Concrete density

    def _surrogate(self, logits, index, one_hot, gumbels):
        scores = tempered(logits + gumbels, self.temperature.unsqueeze(-1))
        log_weights = torch.log_softmax(scores, -1)
        # The scores themselves too: the density's terms l - tau log h are -g up to a shift,
        # which tau times the rounded log-weights would not give at high temperatures.
        return log_weights.exp(), {"log_weights": log_weights, "scores": scores}

    def _log_prob(self, value):
        if self.hard:
            return super()._log_prob(value)
        log_weights, scores = _concrete_inputs(value, self._validate_args, type(self).__name__)
        return _concrete_log_density(self.logits, self.temperature, log_weights, scores)


class GRMCKCategorical(_StraightThroughCategorical):
    r"""One-hot categorical with the Rao-Blackwellized STGS gradient (GR-MCK).

    The forward value is the one-hot of :math:`D \sim \operatorname{Categorical}(\pi)`; the
    surrogate averages the Gumbel-Softmax over :math:`K` draws of the Gumbel noise conditioned
    on :math:`\arg\max = D`,

    .. math::
        h = \frac{1}{K} \sum_{k=1}^{K} \operatorname{softmax}\big((l + G^{(k)}) / \tau\big),
        \qquad G^{(k)} \sim \operatorname{Gumbel} \mid \arg\max_j (l_j + G^{(k)}_j) = D,

    a Monte-Carlo estimate of :math:`E[\operatorname{STGS} \mid D]`, with lower variance than
    STGS at :math:`K` times its cost. The conditional Gumbels are drawn in log space from
    :math:`E \sim \operatorname{Exp}(1)`: :math:`l_D + G_D = \log \sum_j e^{l_j} - \log E_D`,
    :math:`l_j + G_j = -\operatorname{logaddexp}(\log E_j - l_j, \log E_D - \log \sum_i
    e^{l_i})`, and detached (the references detach them; differentiating through them is a
    known mistake). With :math:`K = 1` the gradient has the distribution of STGS's. The
    temperature limits are those of :class:`STGSCategorical`.

    :meth:`log_prob` is as for :class:`STCategorical`.

    References:
        Rao-Blackwellizing the Straight-Through Gumbel-Softmax Gradient Estimator.
        Max B. Paulus, Chris J. Maddison, Andreas Krause, 2021.
        https://arxiv.org/abs/2010.04838

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0` of the surrogate,
            broadcasting with the batch shape. A tensor of the parameters' dtype can be
            annealed in place.
        logits (Tensor): unnormalized log-probabilities :math:`l`, shape
            ``batch_shape + (K,)``, ``K >= 2`` (pass ``logits`` or ``probs``).
        probs (Tensor): the probabilities :math:`\pi = \operatorname{softmax}(l)`.
        hard (bool): return the hard one-hot :math:`D` (default), or the surrogate :math:`h`
            itself (``mean`` and ``variance`` stay the categorical's: see the README).
        num_draws (int): the number :math:`K \geq 1` of conditional draws (100 in the
            paper's baseline "GR-MC100").

    Example:
        >>> d = GRMCKCategorical(0.5, logits=torch.zeros(2, 4), num_draws=10)
        >>> d.rsample((3,)).shape
        torch.Size([3, 2, 4])
    """

    _option_names = ("num_draws",)

    @classmethod
    def _checked_options(cls, owner, options):
        return {name: check_count(owner, name, value) for name, value in options.items()}

    def __init__(
        self,
        temperature,
        *,
        probs=None,
        logits=None,
        num_draws=100,
        hard=True,
        validate_args=None,
    ):
        options = self._checked_options(type(self).__name__, {"num_draws": num_draws})
        self.num_draws = options["num_draws"]
        super().__init__(
            temperature, probs=probs, logits=logits, hard=hard, validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GRMCKCategorical, _instance)
        return super().expand(batch_shape, _instance=new)

    def _surrogate(self, logits, index, one_hot, gumbels):
        fixed = logits.detach()
        log_exponentials = -gumbel_like(fixed, (self.num_draws,) + fixed.shape)
        noise = _conditional_perturbed_logits(fixed, index, log_exponentials) - fixed
        # An excluded category (logit -inf) gets noise -inf - -inf = NaN; it stays excluded.
        noise = torch.where(torch.isneginf(fixed), torch.zeros_like(noise), noise)
        scores = tempered(logits + noise, self.temperature.unsqueeze(-1))
        return torch.softmax(scores, -1).mean(0), {}


class GappedSTCategorical(_StraightThroughCategorical):
    r"""One-hot categorical with the Gapped Straight-Through (GST) gradient.

    The forward value is the one-hot of :math:`D \sim \operatorname{Categorical}(\pi)` (no
    Gumbel noise enters the surrogate). With the detached logits :math:`\bar l`, the sampled
    logit is lifted to the maximum and the others pushed at least a gap :math:`\kappa` below
    it:

    .. math::
        m_1 = \big(\max_j \bar l_j - \langle \bar l, D \rangle\big) D, \qquad
        m_2 = \operatorname{relu}\big(\bar l + \kappa - \max_j \bar l_j\big) \odot (1 - D),

    .. math::
        h = \operatorname{softmax}\big((l + m_1 - m_2) / \tau\big).

    So :math:`\arg\max h = D` (consistency, for :math:`\kappa > 0`) and the top perturbed logit
    exceeds the others by at least :math:`\kappa` (the gap), as the Gumbel-perturbed logits of
    STGS do in expectation, but with no noise: a lower-variance gradient at the cost of STGS,
    without the resampling of GR-MCK. ``gap="expected"`` uses
    :math:`\kappa = -\log(1 - \pi_D) / \pi_D`, the expected gap between the two largest
    Gumbel-perturbed logits given :math:`D` (it tends to 1 as :math:`\pi_D \to 0`). As
    :math:`\tau \to 0`, :math:`h \to D`; as :math:`\tau \to \infty`, :math:`h` tends to uniform.

    The gradient vanishes with the temperature: the weights of :math:`h` off :math:`D` are at
    most :math:`e^{-\kappa / \tau}`, so the gradient through them shrinks like
    :math:`e^{-\kappa / \tau} / \tau` once :math:`\tau` falls well below the gap (STGS's
    noisy gaps keep some of it). Keep :math:`\tau` of the order of :math:`\kappa` (the
    paper's 0.5 and 1 with :math:`\kappa = 1`) rather than annealing it towards 0.

    Ablations of the paper: ``gap=0`` (no gap; consistency can fail on ties) and
    ``detach_perturbations=False`` (gradients also flow through :math:`m_1, m_2`).

    :meth:`log_prob` of a one-hot value is :math:`\log \pi_D`, computed as
    :math:`\sum_k x_k \log \pi_k` so its gradient reaches :math:`h`; ``enumerate_support`` and
    the categorical KLs of ``OneHotCategorical`` apply. With ``hard=False`` the value is
    :math:`h` and :meth:`log_prob` the soft log-PMF :math:`\sum_k h_k \log \pi_k`.

    References:
        Training Discrete Deep Generative Models via Gapped Straight-Through Estimator.
        Ting-Han Fan, Ta-Chung Chi, Alexander I. Rudnicky, Peter J. Ramadge, 2022.
        https://arxiv.org/abs/2206.07235

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0` of the surrogate,
            broadcasting with the batch shape. A tensor of the parameters' dtype can be
            annealed in place.
        logits (Tensor): unnormalized log-probabilities :math:`l`, shape
            ``batch_shape + (K,)``, ``K >= 2`` (pass ``logits`` or ``probs``).
        probs (Tensor): the probabilities :math:`\pi = \operatorname{softmax}(l)`.
        hard (bool): return the hard one-hot :math:`D` (default), or the surrogate :math:`h`
            itself (``mean`` and ``variance`` stay the categorical's: see the README).
        gap (float or str): the gap :math:`\kappa \geq 0` (default 1.0), or ``"expected"``.
        detach_perturbations (bool): detach :math:`m_1, m_2` (default; ``False`` is an
            ablation).

    Example:
        >>> import pyro
        >>> def guide():
        ...     logits = torch.zeros(30, 10, requires_grad=True)
        ...     return pyro.sample("z", GappedSTCategorical(1.0, logits=logits, gap=1.0))
        >>> z = guide()
        >>> z.shape, bool(((z == 0) | (z == 1)).all()), z.requires_grad
        (torch.Size([30, 10]), True, True)
    """

    _option_names = ("gap", "detach_perturbations")

    @classmethod
    def _checked_options(cls, owner, options):
        checks = {
            "gap": lambda value: _check_gap(owner, value),
            "detach_perturbations": lambda value: check_flag(owner, "detach_perturbations", value),
        }
        return {name: checks[name](value) for name, value in options.items()}

    def __init__(
        self,
        temperature,
        *,
        probs=None,
        logits=None,
        gap=1.0,
        hard=True,
        detach_perturbations=True,
        validate_args=None,
    ):
        options = {"gap": gap, "detach_perturbations": detach_perturbations}
        options = self._checked_options(type(self).__name__, options)
        self.gap, self.detach_perturbations = options["gap"], options["detach_perturbations"]
        super().__init__(
            temperature, probs=probs, logits=logits, hard=hard, validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GappedSTCategorical, _instance)
        return super().expand(batch_shape, _instance=new)

    def _surrogate(self, logits, index, one_hot, gumbels):
        fixed = logits.detach() if self.detach_perturbations else logits
        top = fixed.max(-1, keepdim=True).values
        # gather, not <l, D>: 0 * -inf = NaN for an excluded category.
        sampled = fixed.gather(-1, index.unsqueeze(-1))
        gap = _expected_gap(sampled) if self.gap == "expected" else self.gap
        m1 = (top - sampled) * one_hot
        m2 = torch.relu(fixed + gap - top) * (1 - one_hot)
        scores = tempered(logits + m1 - m2, self.temperature.unsqueeze(-1))
        return torch.softmax(scores, -1), {}


class GappedST(GappedSTCategorical):
    r"""The gapped straight-through version of a ``Categorical`` or ``OneHotCategorical``.

    ``GappedST(base_dist, temperature, gap=...)`` is :class:`GappedSTCategorical` with the
    parameters of ``base_dist`` (its ``probs`` if it was built from them, else its
    ``logits``); ``base_dist`` is kept as :attr:`base_dist`. A base that was expanded after
    torch computed both (a ``OneHotCategorical`` computes its logits when validated) keeps
    no trace of which it was built from, and its logits are taken: a probability 0 there is
    torch's clamped ``log(eps)`` (1.2e-7 in float32). Pass the base unexpanded; the wrapper
    expands with its batch. The forward value is the one-hot
    draw :math:`D` and the gradient is that of the gapped surrogate

    .. math::
        h = \operatorname{softmax}\big((l + m_1 - m_2) / \tau\big),

    where :math:`m_1` lifts the sampled logit to the maximum and :math:`m_2` pushes the others
    at least a gap :math:`\kappa` below it (see :class:`GappedSTCategorical`).

    Values are one-hot, also for a ``Categorical`` base: its outcome :math:`k` becomes
    :math:`e_k` (an index carries no useful straight-through gradient), so score them with a
    ``OneHotCategorical``.

    References:
        Training Discrete Deep Generative Models via Gapped Straight-Through Estimator.
        Ting-Han Fan, Ta-Chung Chi, Alexander I. Rudnicky, Peter J. Ramadge, 2022.
        https://arxiv.org/abs/2206.07235

    Arguments:
        base_dist (Categorical or OneHotCategorical): the distribution to relax.
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        gap (float or str): the gap :math:`\kappa \geq 0`, or ``"expected"``.
        **kwargs: ``hard``, ``detach_perturbations``, ``validate_args`` as for
            :class:`GappedSTCategorical`.

    Example:
        >>> import pyro.distributions as dist
        >>> d = GappedST(dist.OneHotCategorical(logits=torch.zeros(3, 4)), 0.5, gap=1.0)
        >>> d.batch_shape, d.event_shape
        (torch.Size([3]), torch.Size([4]))
    """

    def __init__(self, base_dist, temperature, *, gap=1.0, **kwargs):
        if isinstance(base_dist, torch.distributions.OneHotCategorical):
            categorical = base_dist._categorical
        elif isinstance(base_dist, Categorical):
            categorical = base_dist
        else:
            raise TypeError(
                "GappedST: `base_dist` must be a Categorical or a OneHotCategorical, got "
                f"{type(base_dist).__name__}"
            )
        self.base_dist = base_dist
        # (torch's OneHotCategorical computes its categorical's probs at construction: which
        # parameter it was built from is the one torch keeps.)
        if built_from_probs(categorical):
            super().__init__(temperature, probs=categorical.probs, gap=gap, **kwargs)
        else:
            super().__init__(temperature, logits=categorical.logits, gap=gap, **kwargs)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GappedST, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.base_dist = self.base_dist.expand(batch_shape)
        return new


@lacks("cdf", "icdf")
class _StraightThroughBernoulli(Bernoulli):
    """Base of the binary versions: the estimator of ``_categorical_class`` applied to the
    categorical over ``(0, 1)`` with logits ``(0, logits)``."""

    arg_constraints = {
        "probs": constraints.unit_interval,
        "logits": finite_real,
        "temperature": scale,
    }
    has_rsample = True
    _categorical_class = _StraightThroughCategorical

    def __init__(
        self, temperature, *, probs=None, logits=None, hard=True, validate_args=None, **options
    ):
        validate = validation_enabled(validate_args)
        self._temperature_argument = temperature  # as passed (see TruncatedGenGS)
        _, param, temperature, batch_shape = categorical_parameters(
            type(self).__name__, probs, logits, temperature, validate, event_dim=0
        )
        param = param.expand(batch_shape)
        self.temperature = temperature
        self.hard = check_flag(type(self).__name__, "hard", hard)
        if probs is not None:
            super().__init__(probs=param, validate_args=False)
        else:
            super().__init__(logits=param, validate_args=False)
        self._validate_args = validate
        # The estimator's options (gap, num_draws ...) are those of the categorical class, which
        # checks them; the binary version keeps them as that class normalized them.
        names = self._categorical_class._option_names
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}"
            )
        options = self._categorical_class._checked_options(type(self).__name__, options)
        if not temperature.requires_grad:
            self._relaxed = self._build_relaxed(options)
        else:
            if not self._categorical_class._temperature_may_be_learned(self.hard):
                warn_if_learned_temperature(type(self).__name__, temperature)
            with warnings.catch_warnings():
                # The relaxed categorical would repeat that warning under its own name.
                warnings.filterwarnings("ignore", message=".*temperature requires a gradient")
                self._relaxed = self._build_relaxed(options)
        for name in names:
            setattr(self, name, getattr(self._relaxed, name))

    def __repr__(self):
        parameter = "probs" if built_from_probs(self) else "logits"
        options = self._categorical_class._option_names
        return distribution_repr(self, parameter, "temperature", "hard", *options)

    def _build_relaxed(self, options):
        if built_from_probs(self):
            pair = binary_log_probs(self)  # exact, -inf for an impossible value
        else:
            pair = torch.stack([torch.zeros_like(self.logits), self.logits], -1)
        return self._categorical_class(
            self.temperature, logits=pair, hard=self.hard, validate_args=False, **options
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_StraightThroughBernoulli, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.temperature = self.temperature.expand(batch_shape)
        new._temperature_argument = self._temperature_argument
        new.hard = self.hard
        for name in self._categorical_class._option_names:
            setattr(new, name, getattr(self, name))
        new._relaxed = self._relaxed.expand(batch_shape)
        return new

    @property
    def support(self):
        return constraints.boolean if self.hard else constraints.unit_interval

    score_parts = _score_parts

    @property
    def has_enumerate_support(self):
        return self.hard

    def enumerate_support(self, expand=True):
        if not self.hard:
            relaxed_enumerate_support(self)
        return super().enumerate_support(expand)

    def rsample(self, sample_shape=torch.Size()):
        pair = self._relaxed.rsample(sample_shape)
        record = relaxation_of(pair)  # every draw carries one
        return carry(pair[..., 1], log_weights=record.log_weights, scores=record.scores)

    def log_prob(self, value):
        value = floating(value, self._param.dtype)  # torch scores floats
        if not built_from_probs(self):
            return super().log_prob(value)
        # Bernoulli's, from the probability as given (torch's would clamp it at epsilon): the
        # pair of exact log-probabilities the estimator was built on; linear in the value,
        # LOG_ZERO standing for log 0 as in the categorical versions.
        if self._validate_args:
            self._validate_sample(value)
        return linear_log_prob(torch.stack([1 - value, value], -1), self._relaxed.logits)

    def discrete(self) -> Bernoulli:
        """The discrete distribution whose samples this estimator draws (in every temperature):
        ``Bernoulli`` with the same parameter."""
        if built_from_probs(self):
            return Bernoulli(probs=self.probs, validate_args=self._validate_args)
        return Bernoulli(logits=self.logits, validate_args=self._validate_args)

    def sample(self, sample_shape=torch.Size()):
        if self.hard:
            return self._relaxed.sample(sample_shape)[..., 1]
        with torch.no_grad():
            return self.rsample(sample_shape)


class STBernoulli(_StraightThroughBernoulli):
    r"""Bernoulli with the naive straight-through gradient.

    :class:`STCategorical` on the pair of logits :math:`(0, \theta)`: the surrogate is

    .. math::
        h_1 = \sigma(\theta / \tau),

    with the temperature limits of :class:`STCategorical`.

    The estimator is applied to the categorical over :math:`(0, 1)` with logits
    :math:`(0, \theta)`, as for every Bernoulli version (see the section on them in the API
    reference): values are exactly 0 or 1, ``log_prob`` and the KLs are Bernoulli's.

    References:
        Estimating or Propagating Gradients Through Stochastic Neurons for Conditional
        Computation. Yoshua Bengio, Nicholas Léonard, Aaron Courville, 2013.
        https://arxiv.org/abs/1308.3432

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        logits (float or Tensor): the log-odds :math:`\theta` (pass ``logits`` or ``probs``).
        probs (float or Tensor): the probability :math:`p = \sigma(\theta)` of a 1.
        hard (bool): return exact 0/1 values (default), or the surrogate :math:`h_1`
            (``mean`` and ``variance`` stay the Bernoulli's: see the README).

    Example:
        >>> STBernoulli(1.0, logits=torch.tensor([-1.0, 1.0])).rsample((4,)).shape
        torch.Size([4, 2])
    """

    _categorical_class = STCategorical


class STGSBernoulli(_StraightThroughBernoulli):
    r"""Bernoulli with the straight-through Gumbel-Softmax (STGS) gradient.

    :class:`STGSCategorical` on the pair of logits :math:`(0, \theta)`: with logistic noise
    :math:`L`, the value is :math:`D = [\theta + L > 0]` and the surrogate

    .. math::
        h_1 = \sigma\big((\theta + L) / \tau\big),

    with the temperature limits of :class:`STGSCategorical`.

    The estimator is applied to the categorical over :math:`(0, 1)` with logits
    :math:`(0, \theta)`, as for every Bernoulli version (see the section on them in the API
    reference): values are exactly 0 or 1, ``log_prob`` and the KLs are Bernoulli's.
    With ``hard=False``, :meth:`log_prob` is the binary Concrete density of :math:`h_1`,
    evaluated in log space from the log-weights the sample carries (the fallback without them
    is that of :class:`STGSCategorical`).

    References:
        Categorical Reparameterization with Gumbel-Softmax.
        Eric Jang, Shixiang Gu, Ben Poole, 2017.
        https://arxiv.org/abs/1611.01144

        The Concrete Distribution: A Continuous Relaxation of Discrete Random Variables.
        Chris J. Maddison, Andriy Mnih, Yee Whye Teh, 2017.
        https://arxiv.org/abs/1611.00712

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        logits (float or Tensor): the log-odds :math:`\theta` (pass ``logits`` or ``probs``).
        probs (float or Tensor): the probability :math:`p = \sigma(\theta)` of a 1.
        hard (bool): return exact 0/1 values (default), or the surrogate :math:`h_1`
            (``mean`` and ``variance`` stay the Bernoulli's: see the README).

    Example:
        >>> d = STGSBernoulli(0.01, probs=torch.tensor(0.3), hard=False)
        >>> bool(torch.isfinite(d.log_prob(d.rsample((100,)))).all())
        True
    """

    _categorical_class = STGSCategorical

    def log_prob(self, value):
        if self.hard:
            return super().log_prob(value)
        value = floating(value, self._param.dtype)  # torch scores floats
        if self._validate_args:
            self._validate_sample(value)
        log_weights, scores = _concrete_inputs(
            value, self._validate_args, type(self).__name__, binary=True
        )
        return _concrete_log_density(self._relaxed.logits, self.temperature, log_weights, scores)


class GRMCKBernoulli(_StraightThroughBernoulli):
    r"""Bernoulli with the Rao-Blackwellized STGS gradient (GR-MCK).

    :class:`GRMCKCategorical` on the pair of logits :math:`(0, \theta)`: the surrogate averages
    :math:`K` logistic draws :math:`L^{(k)}` conditioned on the value :math:`D`,

    .. math::
        h_1 = \frac{1}{K} \sum_{k=1}^{K} \sigma\big((\theta + L^{(k)}) / \tau\big),

    with the temperature limits of :class:`STGSCategorical`.

    The estimator is applied to the categorical over :math:`(0, 1)` with logits
    :math:`(0, \theta)`, as for every Bernoulli version (see the section on them in the API
    reference): values are exactly 0 or 1, ``log_prob`` and the KLs are Bernoulli's.

    References:
        Rao-Blackwellizing the Straight-Through Gumbel-Softmax Gradient Estimator.
        Max B. Paulus, Chris J. Maddison, Andreas Krause, 2021.
        https://arxiv.org/abs/2010.04838

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        logits (float or Tensor): the log-odds :math:`\theta` (pass ``logits`` or ``probs``).
        probs (float or Tensor): the probability :math:`p = \sigma(\theta)` of a 1.
        hard (bool): return exact 0/1 values (default), or the surrogate :math:`h_1`
            (``mean`` and ``variance`` stay the Bernoulli's: see the README).
        num_draws (int): the number :math:`K \geq 1` of conditional draws.

    Example:
        >>> GRMCKBernoulli(1.0, logits=torch.zeros(3), num_draws=8).rsample().shape
        torch.Size([3])
    """

    _categorical_class = GRMCKCategorical


class GappedSTBernoulli(_StraightThroughBernoulli):
    r"""Bernoulli with the Gapped Straight-Through (GST) gradient.

    :class:`GappedSTCategorical` on the pair of logits :math:`(0, \theta)`. With
    :math:`M = \max(0, \theta)` (detached), the perturbed log-odds are
    :math:`\Delta = \max(M, \kappa)` after a 1 and :math:`\Delta = -\max(M - \theta, \kappa)`
    after a 0, and

    .. math::
        h_1 = \sigma\big((\theta + c) / \tau\big), \qquad
        c = \operatorname{stop\_grad}(\Delta - \theta),

    with the temperature limits of :class:`GappedSTCategorical`.

    The estimator is applied to the categorical over :math:`(0, 1)` with logits
    :math:`(0, \theta)`, as for every Bernoulli version (see the section on them in the API
    reference): values are exactly 0 or 1, ``log_prob`` and the KLs are Bernoulli's.

    References:
        Training Discrete Deep Generative Models via Gapped Straight-Through Estimator.
        Ting-Han Fan, Ta-Chung Chi, Alexander I. Rudnicky, Peter J. Ramadge, 2022.
        https://arxiv.org/abs/2206.07235

    Arguments:
        temperature (float or Tensor): the temperature :math:`\tau > 0`.
        logits (float or Tensor): the log-odds :math:`\theta` (pass ``logits`` or ``probs``).
        probs (float or Tensor): the probability :math:`p = \sigma(\theta)` of a 1.
        hard (bool): return exact 0/1 values (default), or the surrogate :math:`h_1`
            (``mean`` and ``variance`` stay the Bernoulli's: see the README).
        gap (float or str): the gap :math:`\kappa \geq 0` (default 1.0), or ``"expected"``.
        detach_perturbations (bool): detach the perturbations (``False`` is an ablation).

    Example:
        >>> z = GappedSTBernoulli(1.0, logits=torch.zeros(5, requires_grad=True)).rsample()
        >>> bool(((z == 0) | (z == 1)).all()), z.requires_grad
        (True, True)
    """

    _categorical_class = GappedSTCategorical

"""Truncated probability mass functions of count distributions, with an accurate tail bin."""

import math
from collections.abc import Callable
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.distributions import (
    Binomial,
    Distribution,
    Geometric,
    NegativeBinomial,
    Poisson,
    constraints,
)

from pyro_relax._numerics import (
    built_from_probs,
    check_constraint,
    check_count,
    fast_apply,
    finite_positive,
    finite_real,
    log1mexp,
    parse_parameters,
    positive_probability,
    success_logits,
    validation_enabled,
)

# The public names; check_base, log_probs_truncated and log_survival serve the GenGS classes.
__all__ = ["automatic_truncation", "truncated_log_probs"]

# Terms summed explicitly before the geometric bound takes over in the negative binomial tail.
_NB_TAIL_TERMS = 32
# Below this tail mass the complement 1 - P(X < k), taken in float64, keeps fewer than 8 digits.
_NB_COMPLEMENT_FLOOR = 1e-8


def _counts(size: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(size, dtype=like.dtype, device=like.device)


def _count_tensor(k, like: torch.Tensor) -> torch.Tensor:
    """Counts ``k`` as a tensor; a Python int (one count) becomes shape ``(1,)``, made on
    ``like``'s device without a host-to-device copy."""
    if torch.is_tensor(k):
        return k
    return torch.full((1,), k, dtype=like.dtype, device=like.device)


def _poisson_log_pmf(base: Poisson, k: torch.Tensor) -> torch.Tensor:
    rate = base.rate.unsqueeze(-1)
    return _log_pmf_of_rate(rate, torch.log(rate), k)


def _log_pmf_of_rate(rate, log_rate, k):
    r""":math:`k \log \lambda - \lambda - \log k!` for counts ``k``, a tensor or a Python int
    (whose constants then stay Python numbers: two operators instead of four)."""
    # The rate is positive: k * log(rate) needs no xlogy, and the log is taken per rate, not
    # per (rate, k) pair (this is the hot path of GenGSPoisson).
    if not torch.is_tensor(k):
        return torch.add(torch.rsub(rate, -math.lgamma(k + 1)), log_rate, alpha=k)
    return torch.addcmul(-rate - torch.lgamma(k + 1), k, log_rate)


class _PoissonLogTail(torch.autograd.Function):
    r""":math:`\log P(X \geq m)` of :math:`X \sim \operatorname{Poisson}(\lambda)`, for
    :math:`m \geq 0`, with its derivative in closed form.

    :math:`P(X \geq m)` is the regularized lower incomplete gamma function
    :math:`P(m, \lambda)`, whose derivative in :math:`\lambda` is the PMF at :math:`m - 1`; so
    :math:`\partial_\lambda \log P(X \geq m) = \exp(\log p(m - 1) - \log P(X \geq m))`, exact
    also where the value comes from the series below. One backward of a few operators replaces
    autograd's trip through ``igamma``, the series and three selections (the tail is in every
    GenGS Poisson's rsample, and at small sizes each operator is a kernel launch on a GPU).

    ``k`` is a tensor of counts, or one count as a Python int (a GenGS row's last outcome):
    its constants, :math:`\log m!` and the selection at :math:`m = 0`, then stay on the host,
    which saves about ten operators per rsample and backward. ``log_rate`` is
    :math:`\log \lambda`, taken by the caller; the derivative returned for ``rate`` is the
    whole one, and none flows through ``log_rate``.
    """

    generate_vmap_rule = True  # torch.func may vmap it (see _numerics._StraightThrough)

    @staticmethod
    def forward(rate, log_rate, k):
        # gammainc underflows far in the tail (below tiny / eps); there m exceeds the rate by
        # many standard deviations and the geometric series pmf(m) / (1 - rate / (m + 1))
        # bounds the tail from above, within 1% where it is used (rates 10 to 1e6, measured
        # against scipy). The ratio is clamped below 1 only so that the branch stays finite
        # where it is not used (clamped at 1/2 it was 3.7 off in log at a rate of 1e6).
        m, at_zero = _tail_count(k)
        if torch.is_tensor(k):
            m_tensor, ratio = m, -(rate / (m + 1))
        else:
            m_tensor = torch.full((1,), m, dtype=rate.dtype, device=rate.device)
            ratio = rate * (-1.0 / (m + 1))
        tail = torch.special.gammainc(m_tensor, rate)
        finfo = torch.finfo(tail.dtype)
        accurate = tail > finfo.tiny / finfo.eps  # gammainc loses relative accuracy in subnormals
        series = _log_pmf_of_rate(rate, log_rate, m) - torch.log1p(ratio.clamp(min=finfo.eps - 1))
        log_tail = torch.where(accurate, torch.log(torch.where(accurate, tail, 1.0)), series)
        return _zero_at(log_tail, at_zero)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # Inputs and the output are saved as such, and the rest recomputed, so that the backward
        # stays differentiable (a guide's gradient may itself be differentiated).
        rate, log_rate, k = inputs
        saved = (rate, log_rate, output, k) if torch.is_tensor(k) else (rate, log_rate, output)
        ctx.count = None if torch.is_tensor(k) else k
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def _derivative(ctx):
        r""":math:`\partial_\lambda \log P(X \geq m)`, zero where :math:`m = 0`."""
        rate, log_rate, log_tail, *count = ctx.saved_tensors
        m, at_zero = _tail_count(count[0] if count else ctx.count)
        log_density = _log_pmf_of_rate(rate, log_rate, m - 1)
        return _zero_at(torch.exp(log_density - log_tail), at_zero)

    @staticmethod
    def backward(ctx, grad):
        rate = ctx.saved_tensors[0]
        return (grad * _PoissonLogTail._derivative(ctx)).sum_to_size(rate.shape), None, None

    @staticmethod
    def jvp(ctx, rate_tangent, log_rate_tangent, count_tangent):
        # The rate's tangent carries the whole derivative; none flows through log_rate (as in
        # the backward).
        return _PoissonLogTail._derivative(ctx) * rate_tangent


_poisson_log_tail = fast_apply(_PoissonLogTail)


def _tail_count(k):
    r"""The count :math:`m = \max(k, 1)` the tail is computed at, and where :math:`k = 0`
    (:math:`P(X \geq 0) = 1`, whatever the rate): tensors for a tensor ``k``, Python values for
    an int."""
    if torch.is_tensor(k):
        return k.clamp(min=1), k == 0
    return max(k, 1), k == 0


def _zero_at(values: torch.Tensor, at_zero) -> torch.Tensor:
    """``values`` with zeros where ``at_zero`` (a mask, or one Python bool for all)."""
    if torch.is_tensor(at_zero):
        return values.masked_fill(at_zero, 0.0)
    return torch.zeros_like(values) if at_zero else values


def _poisson_log_sf(base: Poisson, k, size: int) -> torch.Tensor:
    rate = base.rate.unsqueeze(-1)
    return _poisson_log_tail(rate, torch.log(rate), k)


def _geometric_log_pmf(base: Geometric, k: torch.Tensor) -> torch.Tensor:
    # From the logits: log p and log(1 - p) stay finite, with finite gradients, where p rounds
    # to 0 or 1 (an encoder's logit of 20 gives p = 1 in float32, and log1p(-p) = -inf).
    logits = success_logits(base).unsqueeze(-1)
    return k * F.logsigmoid(-logits) + F.logsigmoid(logits)


def _geometric_log_sf(base: Geometric, k, size: int) -> torch.Tensor:
    # Support 0, 1, ...: P(X >= m) = (1 - p)^m in closed form.
    return k * F.logsigmoid(-success_logits(base).unsqueeze(-1))


def _negative_binomial_log_pmf(base: NegativeBinomial, k: torch.Tensor) -> torch.Tensor:
    return _nb_log_pmf(base.total_count.unsqueeze(-1), success_logits(base).unsqueeze(-1), k)


def _nb_log_pmf(r, logits, k):
    # torch's convention: k successes (probability sigmoid(logits)) before r failures.
    log_binom = torch.lgamma(k + r) - torch.lgamma(r) - torch.lgamma(k + 1)
    return log_binom + r * F.logsigmoid(-logits) + k * F.logsigmoid(logits)


def _negative_binomial_log_sf(base: NegativeBinomial, k, size: int) -> torch.Tensor:
    # No incomplete beta function in torch. The tail is the complement of the head, computed in
    # float64 whatever the input dtype so that it keeps 8 digits down to a tail of 1e-8. Below
    # that, sum the next terms explicitly and bound the rest by a geometric series in the ratio
    # pmf(j + 1) / pmf(j) = p (j + r) / (j + 1), which tends to p; the bound's error is then
    # far below the float32 resolution of the row.
    k = _count_tensor(k, _like(base))
    r = base.total_count.unsqueeze(-1).double()
    logits = success_logits(base).unsqueeze(-1).double()
    counts = _counts(size, k).double()
    extended = _nb_log_pmf(r, logits, _counts(size + _NB_TAIL_TERMS, counts))
    head = torch.logcumsumexp(extended[..., : size - 1], -1)
    before = torch.cat([torch.full_like(extended[..., :1], -float("inf")), head], -1)
    use_complement = before <= math.log1p(-_NB_COMPLEMENT_FLOOR)
    complement = log1mexp(torch.where(use_complement, before, torch.full_like(before, -1.0)))

    # The explicit sum only at the requested counts: gathering their windows (a scatter-add
    # backward) rather than unfolding every count's window (a slow as_strided backward) makes
    # a training step several times faster.
    terms = torch.arange(_NB_TAIL_TERMS, device=k.device)
    starts = k.long().expand(extended.shape[:-1] + k.shape[-1:])
    index = (starts.unsqueeze(-1) + terms).flatten(-2)
    window = extended.gather(-1, index).unflatten(-1, (starts.shape[-1], _NB_TAIL_TERMS))
    last = starts.double() + (_NB_TAIL_TERMS - 1)
    # The ratio in log space: p underflows to 0 for very negative logits, where log(p) and its
    # gradient would be infinite and the NaN of 0 * inf would reach the logits.
    log_ratio = F.logsigmoid(logits) + torch.where(
        r >= 1, torch.log((last + r) / (last + 1)), torch.zeros_like(last)
    )
    # Below 1, so that the bound is finite where this branch is not used.
    log_ratio = log_ratio.clamp(max=math.log1p(-torch.finfo(log_ratio.dtype).eps))
    remainder = window[..., -1] + log_ratio - log1mexp(log_ratio)
    series = torch.logaddexp(torch.logsumexp(window, -1), remainder)
    return torch.where(_at(use_complement, k), _at(complement, k), series).to(k.dtype)


def _binomial_log_pmf(base: Binomial, k: torch.Tensor) -> torch.Tensor:
    n = base.total_count.unsqueeze(-1)
    logits = success_logits(base).unsqueeze(-1)
    valid = k <= n
    rest = torch.where(valid, n - k, torch.zeros_like(n - k))
    log_binom = torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(rest + 1)
    log_pmf = log_binom + k * F.logsigmoid(logits) + rest * F.logsigmoid(-logits)
    return torch.where(valid, log_pmf, torch.full_like(log_pmf, -float("inf")))


def _binomial_log_sf(base: Binomial, k, size: int) -> torch.Tensor:
    # Finite support: the tail is an exact finite sum, no complement needed. The host reads
    # the largest total count once, to know how far the sum runs.
    k = _count_tensor(k, _like(base))
    if base.total_count.numel():
        size = max(size, int(base.total_count.max()) + 1)
    log_pmf = _binomial_log_pmf(base, _counts(size, k))
    return _at(torch.logcumsumexp(log_pmf.flip(-1), -1).flip(-1), k)


def _at(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``values[..., k]`` for a tensor of counts ``k`` broadcasting with the batch shape."""
    index = k.long().expand(values.shape[:-1] + k.shape[-1:])
    return values.gather(-1, index)


def _binomial_impossible(base, p, k, last):
    # p = 1: X = n, so a count below n has no mass; the tail bin P(X >= last) has all of it
    # when last <= n (and none otherwise, which its survival function already says).
    n = base.total_count.unsqueeze(-1)
    return ((p == 0) & (k > 0)) | ((p == 1) & (k < n) & (k < last))


def _negative_binomial_impossible(base, p, k, last):
    return (p == 0) & (k > 0)  # no success before the r failures: X = 0


def _geometric_impossible(base, p, k, last):
    return (p == 1) & (k > 0)  # success at the first trial: X = 0


class _Family(NamedTuple):
    cls: type
    log_pmf: Callable
    # log_sf(base, k, size): the log survival function at counts k, a tensor broadcasting with
    # batch_shape + (m,), or one count as a Python int (the result then has a last dimension
    # of 1).
    log_sf: Callable
    # The parameters a distribution of the family may hold (by torch's attribute names), with
    # the values the truncated PMF can be computed from: finite, and away from the degenerate
    # limits whose log-PMF is 0 * -inf.
    constraints: dict
    # impossible(base, p, k, last): where a success probability p of exactly 0 or 1 (built
    # from probs) leaves count k, or the tail at last, no mass; None for a family without one.
    impossible: Callable | None = None


# Most derived classes first: the lookup takes the first isinstance match.
_FAMILIES = (
    _Family(
        Binomial,
        _binomial_log_pmf,
        _binomial_log_sf,
        {
            "total_count": constraints.nonnegative_integer,
            "probs": constraints.unit_interval,
            "logits": finite_real,
        },
        _binomial_impossible,
    ),
    _Family(
        NegativeBinomial,
        _negative_binomial_log_pmf,
        _negative_binomial_log_sf,
        {
            "total_count": finite_positive,
            "probs": constraints.half_open_interval(0.0, 1.0),
            "logits": finite_real,
        },
        _negative_binomial_impossible,
    ),
    _Family(
        Geometric,
        _geometric_log_pmf,
        _geometric_log_sf,
        {"probs": positive_probability, "logits": finite_real},
        _geometric_impossible,
    ),
    _Family(Poisson, _poisson_log_pmf, _poisson_log_sf, {"rate": finite_positive}),
)


def _in_float64(family: _Family, base: Distribution) -> Distribution:
    """``base`` with its parameters in float64 (the probabilities read exactly), no gradient."""
    if _like(base).dtype == torch.float64:
        return base
    params = {}
    for name in family.constraints:
        if name == "probs":
            continue  # the logits below carry them, read exactly
        value = success_logits(base) if name == "logits" else getattr(base, name)
        params[name] = value.detach().double()
    return family.cls(**params, validate_args=False)


def _family(base: Distribution) -> _Family:
    for family in _FAMILIES:
        if isinstance(base, family.cls):
            return family
    names = ", ".join(family.cls.__name__ for family in _FAMILIES)
    if not isinstance(base, Distribution):
        raise TypeError(
            f"GenGS: `base_dist` must be a distribution ({names}), got {type(base).__name__}"
        )
    raise ValueError(
        f"GenGS has no truncation rule for {type(base).__name__}; supported bases are {names}. "
        "For another family pass its truncated log-probabilities as `logits` to TruncatedGenGS."
    )


def check_base(owner: str, base: Distribution, validate: bool, **others):
    """Checks the parameters of a count distribution, and returns it ready to truncate.

    Its parameters (those held, by torch's names: ``rate``, ``total_count``, ``probs``,
    ``logits``) and ``others`` (say the ``temperature``) must share a device; with ``validate``
    they must lie where the truncated PMF is defined (finite, and not a degenerate limit), else
    ``ValueError`` names the parameter. A base in half precision or with integer parameters is
    rebuilt in float32 or the default dtype, the dtypes the PMF is computed in.

    Returns:
        ``(base, others)``: the base, and ``others`` as tensors on its device, in its dtype.
    """
    family = _family(base)
    held = {name: base.__dict__[name] for name in family.constraints if name in base.__dict__}
    if "probs" in held and "logits" in held:
        # One was given, the other computed on first use (torch's lazy property, stored after
        # __init__): keep the given one, the first in the instance's dict, or a rebuilt base
        # would get both.
        given = next(name for name in base.__dict__ if name in ("probs", "logits"))
        del held["logits" if given == "probs" else "probs"]
    parsed, _ = parse_parameters(owner, {**held, **others}, {}, validate=False)
    if validate:
        for name in held:
            check_constraint(owner, name, parsed[name], family.constraints[name])
    if any(parsed[name] is not value for name, value in held.items()):
        base = type(base)(**{name: parsed[name] for name in held}, validate_args=False)
    return base, {name: parsed[name] for name in others}


def _like(base: Distribution) -> torch.Tensor:
    return base.mean


def log_survival(base: Distribution, size: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    r"""Log survival function :math:`\log P(X \geq k)` for :math:`k = 0, \dots, size - 1`.

    Returns a tensor of shape ``base.batch_shape + (size,)``, computed from a closed form where
    one exists (Poisson: the regularized incomplete gamma function; Geometric: :math:`(1-p)^k`;
    Binomial: an exact finite sum) and never as a bare :math:`1 - \sum` of the head. With
    ``counts`` (values in ``[0, size)``, broadcasting with ``batch_shape + (m,)``) it returns the
    survival function at those counts only.
    """
    if counts is None:
        counts = _counts(size, _like(base))
    return _family(base).log_sf(base, counts.to(_like(base).dtype), size)


def truncated_log_probs(base: Distribution, truncation, size: int | None = None) -> torch.Tensor:
    r"""Log-probabilities of ``base`` truncated to ``truncation`` outcomes :math:`0, \dots, n-1`.

    .. math::
        \pi_k = P(X = k) \quad (k < n - 1), \qquad \pi_{n-1} = P(X \geq n - 1).

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Args:
        base: a Poisson, Geometric, NegativeBinomial or Binomial distribution.
        truncation: the number of outcomes :math:`n`, an ``int`` or a tensor of them broadcasting
            with the batch shape (one truncation per batch element).
        size: the length of the last dimension, at least the largest truncation (default
            ``truncation``). Outcomes at or beyond an element's truncation get ``-inf``.

    Returns:
        A tensor of shape ``batch_shape + (size,)`` whose rows are normalized.

    Example:
        >>> from torch.distributions import Poisson
        >>> round(float(truncated_log_probs(Poisson(torch.tensor(2.0)), 4).exp().sum()), 6)
        1.0
    """
    if not torch.is_tensor(truncation):
        truncation = check_count("truncated_log_probs", "truncation", truncation, minimum=2)
    if size is None:
        if torch.is_tensor(truncation):
            raise ValueError("`size` is required when `truncation` is a tensor")
        size = truncation
    size = check_count("truncated_log_probs", "size", size, minimum=2)
    if not torch.is_tensor(truncation) and truncation > size:
        raise ValueError(
            f"truncated_log_probs: `size` ({size}) must be at least the truncation ({truncation})"
        )
    if torch.is_tensor(truncation) and validation_enabled(None):
        # Each element's truncation an integer in [2, size] (a host read, under validation).
        check_constraint(
            "truncated_log_probs", "truncation", truncation, constraints.integer_interval(2, size)
        )
    return log_probs_truncated(base, truncation, size)


def log_probs_truncated(base: Distribution, truncation, size: int) -> torch.Tensor:
    """:func:`truncated_log_probs` of arguments its callers in the library know to be valid (no
    checks: the GenGS classes call it at every construction, also under torch.func)."""
    family = _family(base)
    log_pmf, log_sf = family.log_pmf, family.log_sf
    k = _counts(size, _like(base))
    # The survival function is needed at the last outcome only (it is the costly part). An int
    # truncation passes its last outcome as a Python int: a family's tail keeps what constants
    # it can on the host (one kernel each fewer on a GPU), and the others make it a tensor.
    if torch.is_tensor(truncation):
        last = (truncation - 1).unsqueeze(-1).to(k.dtype)
    else:
        last = truncation - 1
    tail = log_sf(base, last, size)
    if not torch.is_tensor(truncation) and truncation == size:
        # No outcome is masked: a concatenation is cheaper than two selects and their backward.
        head = log_pmf(base, k[:-1])
        row = torch.cat([head, tail.expand(head.shape[:-1] + (1,))], -1)
    else:
        head = log_pmf(base, k)
        minus_inf = torch.full_like(head, -float("inf"))
        row = torch.where(k < last, head, torch.where(k == last, tail, minus_inf))
    impossible = _impossible_at_the_edges(family, base, k, last)
    return row if impossible is None else row.masked_fill(impossible, -float("inf"))


def _impossible_at_the_edges(family: _Family, base: Distribution, k: torch.Tensor, last):
    """Where a success probability of exactly 0 or 1 leaves outcome ``k`` (the tail
    ``P(X >= last)`` at ``last``) no mass, or ``None``: the log-odds that the log-PMFs take
    are clamped at the smallest normal number, which leaves those outcomes finite (about
    -708 per count in float64), and a KL to such a distribution would be finite."""
    if family.impossible is None or not built_from_probs(base):
        return None
    return family.impossible(base, base.probs.unsqueeze(-1), k, last)


def automatic_truncation(base: Distribution, mass: float, max_truncation: int | None = None):
    r"""The smallest truncation whose exact outcomes capture at least ``mass``.

    The truncation of each batch element is

    .. math::
        n = k^* + 2, \qquad k^* = \min\{k : P(X \leq k) \geq \eta\},

    so outcomes :math:`0..k^*` are exact and the last one absorbs the rest (the "GenGS NP" rule
    of Joo et al., 2020, Algorithm 2); a Binomial's is at most :math:`N + 1`, its exact
    outcomes :math:`0..N`. ``mass`` must be resolvable in the dtype the truncated PMF is
    computed in (the base's, float32 for half precision): at most :math:`1 - 1.9 \cdot
    10^{-6}` in float32.

    Without ``max_truncation`` the result is the maximum over the batch, a Python ``int``; finding
    it reads tensors on the host (a device synchronization). With ``max_truncation`` the result is
    a tensor of per-element truncations capped at ``max_truncation``, computed with static shapes
    and no synchronization, for GPU training.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Args:
        base: a Poisson, Geometric, NegativeBinomial or Binomial distribution.
        mass: :math:`\eta \in (0, 1)`, the probability the exact outcomes must capture.
        max_truncation: a cap on each element's truncation; ``None`` for one truncation (the
            batch maximum).

    Returns:
        An ``int``, or with ``max_truncation`` a tensor of shape ``batch_shape``.

    Example:
        >>> from torch.distributions import Poisson
        >>> rate = torch.tensor([0.5, 2.0, 9.0])
        >>> automatic_truncation(Poisson(rate), 0.99), automatic_truncation(Poisson(rate), 0.99, 10)
        (19, tensor([ 5,  8, 10]))
    """
    owner = "automatic_truncation"
    if not isinstance(base, Distribution):
        raise TypeError(f"{owner}: `base` must be a torch distribution, got {type(base).__name__}")
    if isinstance(mass, bool) or not (isinstance(mass, Real) or torch.is_tensor(mass)):
        raise TypeError(f"{owner}: `mass` must be a number in (0, 1), got {mass!r}")
    if not 0.0 < mass < 1.0:
        raise ValueError(f"{owner}: `mass` must lie in (0, 1), got {mass}")
    if max_truncation is not None:
        max_truncation = check_count(
            "automatic_truncation", "max_truncation", max_truncation, minimum=2
        )
    like = _like(base).detach()
    # The distributions compute a half-precision base's PMF in float32.
    row_dtype = torch.promote_types(like.dtype, torch.float32)
    if 1 - mass < 16 * torch.finfo(row_dtype).eps:
        # A row of this dtype cannot tell such a mass from 1 (the search below runs in float64,
        # the truncated PMF it chooses for does not).
        raise ValueError(
            f"automatic_truncation: `mass` {mass} is closer to 1 than {row_dtype} resolves "
            f"(at most 1 - {16 * torch.finfo(row_dtype).eps:.2g}); use float64 parameters or "
            "pass `truncation`"
        )
    if max_truncation is None and torch.jit.is_tracing():
        raise ValueError(
            "automatic truncation without `max_truncation` reads the parameters on the host to "
            "choose the number of outcomes, which torch.jit.trace (JitTrace_ELBO) would freeze "
            "at its traced value; pass `max_truncation` or a fixed `truncation`"
        )
    # An empty batch: nothing to capture. (torch.Size again: a parameter that carries Pyro's
    # provenance makes the batch shape a plain tuple.)
    if torch.Size(base.batch_shape).numel() == 0:
        if max_truncation is None:
            return 2
        return torch.full(base.batch_shape, 2, dtype=torch.long, device=like.device)
    family = _family(base)
    # The search runs in float64: a float32 head loses about rate * eps of relative accuracy
    # (at a Poisson rate of 1e4, rows summed to 1.001 and the truncation chosen captured
    # 0.999 of the mass where 0.99999 was asked).
    search = _in_float64(family, base)
    threshold = math.log(mass)
    size = max_truncation if max_truncation is not None else 16
    while True:
        with torch.no_grad():
            head = torch.logcumsumexp(family.log_pmf(search, _counts(size, like).double()), -1)
        below = (head < threshold).sum(-1)
        truncation = below + 2
        if isinstance(base, Binomial):
            # N + 1 outcomes are exact (the last absorbs P(X >= N) = P(X = N)): none beyond N,
            # which would have no mass.
            exact = (base.total_count.detach().to(below.dtype) + 1).clamp(min=2)
            truncation = torch.minimum(truncation, exact.expand_as(truncation))
        if max_truncation is not None:
            return truncation.clamp(max=max_truncation)
        if bool((below < size).all()):
            return int(truncation.max())
        if size >= 2**16:
            raise ValueError(
                f"automatic truncation needs more than {size} outcomes to capture mass {mass} of "
                f"{base!r}; pass `truncation` or `max_truncation`"
            )
        size *= 4

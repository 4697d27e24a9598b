"""Shared numerics: parameter parsing, noise, log-space helpers and gradient-preserving clamps."""

import contextlib
import math
import sys
import warnings
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from pyro.ops.provenance import ProvenanceTensor, extract_provenance, track_provenance
from torch.distributions import Distribution, biject_to, constraints, transform_to

__all__ = [
    "LOG_ZERO",
    "as_float",
    "all_last",
    "any_last",
    "broadcast_shapes",
    "caller_stacklevel",
    "categorical_kl",
    "categorical_parameters",
    "check_constraint",
    "check_count",
    "check_flag",
    "check_number",
    "check_devices",
    "clamp_with_identity_gradient",
    "fast_apply",
    "finite_positive",
    "finite_real",
    "gumbel_like",
    "is_integer",
    "lacks",
    "log1mexp",
    "log_of_probs",
    "location",
    "log_weights",
    "nonnegative_rows",
    "one_hot",
    "parse_parameters",
    "positive_probability",
    "probability_vector",
    "same_values",
    "scale",
    "static_shape",
    "static_size",
    "straight_through",
    "tempered",
    "validation_enabled",
    "warn_if_learned_temperature",
]


# A finite stand-in for log 0 where a value of weight 0 meets an excluded outcome (0 * -inf is
# NaN): far below any log-probability that matters, yet small enough that the derivatives that
# multiply it (a gradient of a gradient: by weights, temperatures, upstream gradients) stay
# finite, where the most negative float overflows to -inf as soon as it is doubled.
LOG_ZERO = -1e30


def linear_log_prob(value: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``sum(value * log_probs, -1)`` for a value (one-hot, or a pair of Bernoulli weights)
    scored linearly, ``-inf`` log-probabilities standing as :data:`LOG_ZERO` in the result. The
    value's own gradient sees the log of the smallest normal number there instead: a
    straight-through draw of an outcome the scorer excludes got a gradient 1e30 times the
    surrogate's, whose square overflowed Adam's moments and froze the guide for good."""
    forward = log_probs.clamp(min=LOG_ZERO)
    slope = log_probs.clamp(min=math.log(torch.finfo(log_probs.dtype).tiny))
    return (value * slope + value.detach() * (forward - slope)).sum(-1)


def gumbel_like(logits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    r"""Standard Gumbel noise :math:`g = -\log(-\log u)` of the given shape.

    The noise is drawn on the device and in the dtype of ``logits``. The uniforms lie in
    ``(tiny, 1)``: ``torch.rand`` can return 0, whose double logarithm is infinite. Their
    resolution bounds the noise: in float32 it lies in about [-4.47, 16.64] (the uniforms
    ``tiny`` and ``1 - 2^-24``), so Gumbel-max never picks a category less probable than about
    ``exp(-21.1) = 6.8e-10`` times another, and picks those near that bound too seldom; in
    float64 the bound is ``exp(-43.3) = 1.6e-19``.
    """
    u = torch.rand(shape, dtype=logits.dtype, device=logits.device)
    # In place: the noise is a fresh tensor that needs no gradient.
    return u.clamp_min_(torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r"""Computes :math:`\log(1 - e^{x})` for :math:`x \leq 0` without cancellation.

    Uses ``log(-expm1(x))`` near zero and ``log1p(-exp(x))`` below :math:`-\log 2`
    (Maechler, 2012, "Accurately computing log(1 - exp(-|a|))").
    """
    near_zero = x > -0.6931471805599453
    # Each branch is fed a safe input where it is not selected, so that neither the value nor
    # the gradient of the branch that torch.where discards can be infinite or NaN.
    a = torch.where(near_zero, x, torch.full_like(x, -1.0))
    b = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def categorical_kl(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
    r"""KL divergence :math:`\sum_k q_k (\log q_k - \log p_k)` between two categoricals.

    Both arguments are normalized log-probabilities over the last dimension. Outcomes that
    ``q`` gives no mass contribute zero, even where ``p`` gives none either (``-inf - -inf``).
    """
    q_probs = q_logits.exp()
    difference = q_logits - p_logits
    # Zero the log-ratio where q has no mass *before* multiplying: otherwise the product's
    # gradient is 0 * NaN = NaN for outcomes that both distributions exclude.
    difference = torch.where(q_probs > 0, difference, torch.zeros_like(difference))
    return (q_probs * difference).sum(-1)


def clamp_with_identity_gradient(x: torch.Tensor, low, high) -> torch.Tensor:
    """Clamps the value of ``x`` to ``[low, high]`` but passes the gradient through unchanged.

    Relaxed values are convex combinations of outcomes; their rounding error can put them an
    ulp outside the outcomes' range, which fails Pyro's support check. A plain clamp would also
    zero the gradient there. The added difference is exact (Sterbenz), so the value is clamped.
    """
    return x + (x.clamp(low, high) - x).detach()


def log_of_probs(probs: torch.Tensor) -> torch.Tensor:
    """``log(probs)`` with ``-inf`` for a zero, exact down to the smallest normal number (torch's
    ``probs_to_logits`` clamps at the dtype's epsilon: a probability of 0 or 1e-10 became
    1.2e-7 in float32, and a KL to it finite)."""
    logits = probs.clamp(min=torch.finfo(probs.dtype).tiny).log()
    return torch.where(probs > 0, logits, -torch.inf)


def built_from_probs(distribution) -> bool:
    # torch keeps the parameter most distributions were built with as `_param` (after
    # `expand`, the logits whenever they were computed); a Geometric keeps none, and whichever
    # of its lazy parameters was computed first is then unknown (the logits are taken).
    given = distribution.__dict__
    if "probs" not in given:
        return False
    if "_param" in given:
        return given["_param"] is not given.get("logits")
    return "logits" not in given


def categorical_log_probs(distribution) -> torch.Tensor:
    """The normalized log-probabilities of a torch ``Categorical``, ``OneHotCategorical`` or
    ``Multinomial``: :func:`log_of_probs` of its ``probs`` when it was built from them (its
    ``logits`` are then clamped at the dtype's epsilon), else its ``logits``."""
    categorical = getattr(distribution, "_categorical", distribution)
    if built_from_probs(categorical):
        return log_of_probs(categorical.probs)
    return categorical.logits


def binary_log_probs(distribution) -> torch.Tensor:
    """``(log(1 - p), log p)`` (stacked in a last dimension) of a torch ``Bernoulli``: exact
    from its ``probs`` when it was built from them, ``-inf`` for an impossible value, else from
    its ``logits``, each finite where the other underflows."""
    if built_from_probs(distribution):
        p = distribution.probs
        # log(1 - p) with -inf at p = 1 from a constant, so that its gradient there is 0 (as
        # log_of_probs's at p = 0), not 0 * inf = NaN.
        below_one = p < 1
        log_fail = torch.log1p(-torch.where(below_one, p, torch.zeros_like(p)))
        log_fail = torch.where(below_one, log_fail, torch.full_like(p, -math.inf))
        return torch.stack([log_fail, log_of_probs(p)], -1)
    logits = distribution.logits
    return torch.stack([-F.softplus(logits), -F.softplus(-logits)], -1)


def binary_logits(probs: torch.Tensor) -> torch.Tensor:
    r"""The log-odds :math:`\log p - \log(1 - p)` of success probabilities, exact for
    :math:`p` and :math:`1 - p` down to the smallest normal number, which stands for a
    probability of 0 (finite, so that a count PMF's :math:`0 \cdot \log p` terms and their
    gradients stay numbers; torch's ``probs_to_logits`` clamps at the dtype's epsilon, which
    made :math:`p = 10^{-8}` about :math:`1.2 \cdot 10^{-7}` in float32)."""
    tiny = torch.finfo(probs.dtype).tiny
    below_one = probs < 1
    log_fail = torch.log1p(-torch.where(below_one, probs, torch.zeros_like(probs)))
    log_fail = torch.where(below_one, log_fail, torch.full_like(probs, math.log(tiny)))
    return probs.clamp(min=tiny).log() - log_fail.clamp(min=math.log(tiny))


def success_logits(distribution) -> torch.Tensor:
    """The log-odds of a torch ``Geometric``, ``NegativeBinomial``, ``Binomial`` or ``Bernoulli``:
    :func:`binary_logits` of its ``probs`` when it was built from them, else its ``logits``."""
    if built_from_probs(distribution):
        return binary_logits(distribution.probs)
    return distribution.logits


def without_autocast(device_type: str):
    """A context with ``torch.autocast`` off for ``device_type`` where it is on, else a null
    context: the library's products (a relaxed one-hot onto the outcomes, planar flows) would
    otherwise run in half precision, while its relaxations keep float32 under autocast."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know (meta), old torch
        enabled = False
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def relaxed_enumerate_support(distribution, expand=True):
    """``enumerate_support`` of a relaxed sample space, which has none: raises naming the
    class and what to enumerate instead (Pyro calls it for a site marked for enumeration)."""
    raise NotImplementedError(
        f"{type(distribution).__name__} relaxes a discrete variable onto a continuous sample "
        "space, which cannot be enumerated: enumerate its discrete() distribution instead "
        "(pyro_relax.infer.discretize puts it in the site's place), or use a straight-through "
        "class with hard=True"
    )


def tempered(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``scores / temperature``, with a finite gradient by a temperature that requires one.

    A score of ``-inf`` (an excluded outcome, a dropped stick) has weight zero and a zero
    gradient, but torch's division gives the temperature ``-grad * score / temperature**2 =
    0 * inf = NaN`` there. When the temperature requires a gradient, those scores are divided
    as zeros and set back to ``-inf``; otherwise (the usual case) this is one division.
    """
    if not (temperature.requires_grad and torch.is_grad_enabled()):
        return scores / temperature
    excluded = scores.isneginf()
    return (scores.masked_fill(excluded, 0.0) / temperature).masked_fill(excluded, -math.inf)


def caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning, issued by the function calling this one, at
    the first frame outside this library, Pyro and torch (a construction passes through
    subclasses and Pyro's metaclass)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        ("pyro_relax.", "pyro.", "torch.")
    ):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_learned_temperature(owner: str, temperature: torch.Tensor) -> None:
    """Warns (``UserWarning``) when ``temperature`` requires a gradient, for a distribution whose
    ``log_prob`` is not a density in it (a soft log-PMF, or the discrete PMF of a
    straight-through sample): no objective built from it bounds what the temperature can be
    fitted to."""
    if temperature.requires_grad and torch.is_grad_enabled():
        warnings.warn(
            f"{owner}: the temperature requires a gradient, but {owner}.log_prob is not a "
            "density in the temperature (a soft log-PMF, or the discrete PMF of a "
            "straight-through sample), so Trace_ELBO and the other objectives are no bound "
            "that it can be fitted to: a guide that learns it drives it up without limit. "
            "Anneal it (pyro_relax.ExponentialDecay) or fix it; IGR and STGS with hard=False "
            "have densities and may learn theirs. The gradient itself is exact; "
            "to silence this warning: warnings.filterwarnings('ignore', "
            "message='.*temperature requires a gradient')",
            stacklevel=caller_stacklevel(),
        )


# Whether a torch.func transform (grad, vmap, ...) runs; None on a torch without the check.
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def fast_apply(function: type[torch.autograd.Function]):
    """``function.apply`` for an autograd Function written with ``setup_context`` (which
    torch.func needs), without the cost of torch's ``apply`` for such Functions: it binds the
    arguments with ``inspect.signature`` at every call, which costs more than the operators of
    a small sample. Inside torch.func transforms the Function runs as itself; under torch.compile
    without its ``jvp`` (TorchDynamo traces no custom jvp, and cannot bind variadic arguments);
    elsewhere as a twin in the older style, whose ``forward`` calls the same ``forward`` and
    ``setup_context`` (forward mode through ``torch.autograd.forward_ad`` included). The
    library's Functions take positional arguments only."""

    class Twin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = function.forward(*args)
            function.setup_context(ctx, args, output)
            return output

        backward = staticmethod(function.backward)
        jvp = staticmethod(function.jvp)

    traceable = type(
        function.__name__,
        (torch.autograd.Function,),
        {
            name: staticmethod(getattr(function, name))
            for name in ("forward", "setup_context", "backward")
        },
    )
    Twin.__name__ = Twin.__qualname__ = function.__name__
    if _TRANSFORMS_ACTIVE is None:  # a torch without the check: the Function itself
        run = function.apply
    else:

        def run(*args):
            if _TRANSFORMS_ACTIVE():
                return function.apply(*args)
            return (traceable if torch.compiler.is_compiling() else Twin).apply(*args)

    def apply(*args):
        # Pyro's TraceGraph_ELBO (and TraceRLOO_ELBO) wrap what depends on a score-function
        # site in ProvenanceTensor, whose __torch_function__ cuts a custom Function's outputs
        # from the graph: the Function runs on the plain tensors and its outputs get the
        # provenance back, as any torch operator's do.
        if not any(isinstance(arg, ProvenanceTensor) for arg in args):
            return run(*args)
        plain, provenance = extract_provenance(args)
        return track_provenance(run(*plain), provenance)

    return apply


class _StraightThrough(torch.autograd.Function):
    # The library's autograd Functions keep forward and setup_context apart, let functorch vmap
    # them and have a jvp: so torch.func (grad, vmap, jacrev, jvp, jacfwd, hessian) and forward
    # mode run through them. They are called through fast_apply.
    generate_vmap_rule = True

    @staticmethod
    def forward(hard, soft):
        return hard.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return None, grad

    @staticmethod
    def jvp(ctx, hard_tangent, soft_tangent):
        return soft_tangent


_straight_through = fast_apply(_StraightThrough)


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Returns ``hard`` exactly in the forward pass, with the gradient of ``soft``.

    Unlike ``soft + (hard - soft).detach()``, the forward value is bit-exact, so an integer
    outcome stays an integer and a plain discrete distribution can score it.
    """
    return _straight_through(hard.detach(), soft)


def broadcast_shapes(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` of shapes (sequences of sizes), in plain Python: torch's
    version reads its configuration at each call and costs about 100 microseconds (torch 2.13,
    CPU), paid several times each time a distribution is built.

    Raises:
        RuntimeError: for shapes that do not broadcast, as torch's.
    """
    if torch.jit.is_tracing():
        # Sizes are traced values here: comparing them in Python would warn (TracerWarning)
        # and freeze the comparison into the trace; torch's records it.
        return torch.broadcast_shapes(*shapes)
    if len(shapes) == 2:
        # The common case (a parameter against the batch shape so far): nothing to broadcast.
        first, second = shapes
        if len(second) == 0 or tuple(first) == tuple(second):
            return torch.Size(first)
        if len(first) == 0:
            return torch.Size(second)
    # No max(..., default=0): torch.compile cannot trace that keyword (a graph break).
    ndim = max([0, *(len(shape) for shape in shapes)])
    result = [1] * ndim
    for shape in shapes:
        offset = ndim - len(shape)
        for i, size in enumerate(shape):
            current = result[offset + i]
            if size == 1 or size == current:
                continue
            if current != 1:
                raise RuntimeError(
                    f"shapes {[tuple(s) for s in shapes]} cannot be broadcast: size {size} "
                    f"against {current} at dimension {offset + i - ndim}"
                )
            result[offset + i] = size
    return torch.Size(result)


def same_values(a, b) -> bool:
    """Whether two parameters are equal, reading values on the host only for CPU tensors.

    The same object, equal Python numbers, or equal CPU tensors after broadcasting; tensors on
    another device are compared by identity only, so that no call synchronizes with an
    accelerator. While ``torch.jit.trace`` records, tensors are compared by identity too: a
    value comparison would be baked into the trace as a constant. Two different tensors of
    which one requires a gradient are not the same parameter whatever their values: a shortcut
    taken on their equality (a carried pre-image, a closed-form KL) would drop the derivative
    by the learned one.
    """
    if a is b:
        return True
    if not torch.is_tensor(a) and not torch.is_tensor(b):
        return a == b  # Python numbers (or None), as passed by the user
    if torch.jit.is_tracing() or any(
        torch.is_tensor(x) and x.requires_grad and torch.is_grad_enabled() for x in (a, b)
    ):
        return False
    if not torch.is_tensor(a):
        a, b = b, a
    b = torch.as_tensor(b, dtype=a.dtype)  # a number takes the tensor's dtype, as in IGR
    if a.device.type != "cpu" or b.device.type != "cpu":
        return False
    try:
        shape = broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        return False
    return torch.equal(a.detach().expand(shape), b.detach().expand(shape).to(a.dtype))


def one_hot(index: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """One-hot vectors of ``index`` in the dtype and on the device of ``like``.

    A comparison rather than ``F.one_hot``, which checks the indices' range on the host.
    """
    classes = torch.arange(num_classes, device=like.device)
    return (index.unsqueeze(-1) == classes).to(like.dtype)


# --- Row reductions -------------------------------------------------------------------------
# On CPU, torch reduces booleans with all/any (and takes maxima) over short last dimensions
# several times slower than it sums: 100 x 20 rows of 50, `all(-1)` took 265 us where the integer
# sum of the same rows took 25 us (this project's AMD EPYC, one thread). The row tests of checks
# that run at every construction and every validated log_prob are written as sums.


def all_last(mask: torch.Tensor) -> torch.Tensor:
    """Whether each row (last dimension) of ``mask`` is all true: its count of true entries is
    the row's length."""
    return mask.sum(-1) == mask.shape[-1]


def floating(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in ``dtype`` if it is an integer or boolean tensor (observed counts, bits or a
    one-hot vector typed by hand), else as it is, with the record it may carry. Anything but a
    tensor raises torch's ``ValueError`` for a ``log_prob`` value."""
    if not torch.is_tensor(value):
        raise ValueError("The value argument to log_prob must be a Tensor")
    return value if value.is_floating_point() else value.to(dtype)


class VectorOf(constraints.independent):
    """torch's ``independent(constraint, 1)`` (a vector of entries that each satisfy it),
    whose ``check`` also takes an empty batch: torch's reshapes the entries' results with a
    ``-1``, ambiguous for 0 elements (a validated ``log_prob`` of a sample of shape ``(0, d)``
    raised "cannot reshape tensor of 0 elements")."""

    def __init__(self, base_constraint):
        super().__init__(base_constraint, 1)

    def check(self, value):
        result = self.base_constraint.check(value)
        if result.dim() < 1:
            return super().check(value)  # torch's error for a value without the dimension
        return all_last(result)


def distribution_repr(d, *names: str, **shown: str) -> str:
    """``Class(name: value, ...)`` for the attributes ``names`` that ``d`` has (``None`` ones
    left out), then the ``shown`` descriptions: a one-element tensor by its value (its shape
    on the meta device), a larger one by its shape, anything else by its own repr. torch's
    repr lists only the ``arg_constraints`` entries of the instance's ``__dict__``, so a
    GenGSPoisson showed its temperature and not its rate."""
    parts = []
    for name in names:
        value = getattr(d, name, None)
        if value is None:
            continue
        if torch.is_tensor(value):
            one = value.numel() == 1 and value.device.type != "meta"
            value = value.item() if one else value.size()
        parts.append(f"{name}: {value!r}" if isinstance(value, str) else f"{name}: {value}")
    parts += [f"{name}: {text}" for name, text in shown.items()]
    return f"{type(d).__name__}({', '.join(parts)})"


_PROPERTIES = ("mean", "variance", "mode")


def lacks(*names: str):
    """A class decorator: the statistics ``names`` (``mean``, ``variance``, ``mode``,
    ``entropy``, ``cdf``, ``icdf``) raise ``NotImplementedError`` saying that the relaxed
    distribution has none in closed form and where to look instead, where torch's base classes
    raise it with no message, or compute something that is not the relaxation's (a
    ``TransformedDistribution``'s ``cdf`` of a simplex point)."""

    def unavailable(d, name):
        raise NotImplementedError(
            f"{type(d).__name__}.{name}: the relaxed distribution has none in closed form; "
            f"estimate it from samples, or take that of the discrete distribution it stands "
            f"for, d.discrete().{name}, where that one has it"
        )

    def decorate(cls):
        for name in names:
            if name in _PROPERTIES:
                setattr(cls, name, property(lambda d, name=name: unavailable(d, name)))
            else:
                setattr(cls, name, lambda d, *args, name=name, **kwargs: unavailable(d, name))
        return cls

    return decorate


def any_last(mask: torch.Tensor) -> torch.Tensor:
    """Whether each row (last dimension) of ``mask`` has a true entry: a positive count."""
    return mask.sum(-1) > 0


def nonnegative_rows(value: torch.Tensor) -> torch.Tensor:
    """Whether each row (last dimension) of ``value`` has no negative entry and no NaN: the
    negative parts of a row sum to zero exactly then (a sum of non-positive numbers cannot round
    to zero)."""
    return value.clamp(max=0).sum(-1) == 0


# --- Parameters: one parser for every distribution and helper ---------------------------------


def _limits_dtype(value) -> torch.dtype:
    """The dtype whose limits bound ``value``: the one the library computes it in."""
    dtype = value.dtype if value.is_floating_point() else torch.get_default_dtype()
    return _compute_dtype(dtype)


class _Bounded(constraints.Constraint):
    """Numbers between two bounds, each open or closed, which :meth:`bounds` gives for a dtype.

    ``check`` compares elementwise, as torch's constraints do; ``holds_everywhere`` reads a
    whole tensor from its least and greatest entries alone (one reduction, several times faster
    than the elementwise tests and their ``all``). NaN fails every comparison, so it violates
    any bounds; an open infinite bound excludes that infinity."""

    def bounds(self, dtype: torch.dtype) -> tuple:
        """``(low, low_closed, high, high_closed)`` for values of ``dtype``."""
        raise NotImplementedError

    def check(self, value):
        return _within(value, value, self.bounds(_limits_dtype(value)))

    def holds_everywhere(self, value: torch.Tensor) -> bool:
        """Whether every entry of the floating tensor ``value`` lies within the bounds."""
        return _within_everywhere(value, self.bounds(_limits_dtype(value)))


def _within(least, greatest, bounds):
    """Whether ``least`` is above the lower bound and ``greatest`` below the upper one."""
    low, low_closed, high, high_closed = bounds
    above = least >= low if low_closed else least > low
    below = greatest <= high if high_closed else greatest < high
    return above & below


def _within_everywhere(value: torch.Tensor, bounds) -> bool:
    """Whether every entry of ``value`` lies within ``bounds`` (NaN propagates to both)."""
    least, greatest = torch.aminmax(value)
    return bool(_within(least, greatest, bounds))


class _FiniteReal(_Bounded):
    """Finite real numbers: ``constraints.real`` admits infinities."""

    description = "finite"

    def bounds(self, dtype):
        return (-math.inf, False, math.inf, False)


class _FinitePositive(_Bounded):
    """Finite positive numbers: ``constraints.positive`` admits infinity."""

    description = "finite and positive"

    def bounds(self, dtype):
        return (0.0, False, math.inf, False)


class _Scale(_Bounded):
    """A temperature or a standard deviation: finite, positive and between the machine epsilon
    of the dtype computed in and its inverse (float32: about 1.2e-7 to 8.4e6). Beyond, logits
    divided by the temperature and squared inverse scales overflow, and gradients become NaN;
    the relaxation is then numerically its hard or its uniform limit anyway."""

    description = "finite, positive and within [eps, 1/eps] of its dtype (float32: 1.2e-7 to 8.4e6)"

    def bounds(self, dtype):
        eps = torch.finfo(dtype).eps
        return (eps, True, 1 / eps, True)


class _Location(_Bounded):
    """A Gaussian mean: finite, with a magnitude at most the inverse machine epsilon of the
    dtype computed in (float32: about 8.4e6); beyond, squared differences in a KL overflow."""

    description = "finite, with magnitude at most 1/eps of its dtype (float32: 8.4e6)"

    def bounds(self, dtype):
        limit = 1 / torch.finfo(dtype).eps
        return (-limit, True, limit, True)


class _LogWeights(constraints.Constraint):
    """Unnormalized log-probabilities: finite or ``-inf`` (an excluded outcome), at least one
    finite per row."""

    description = "finite or -inf (an excluded outcome), with a finite entry in every row"
    event_dim = 1

    def check(self, value):
        return ~any_last(torch.isnan(value) | torch.isposinf(value)) & any_last(
            torch.isfinite(value)
        )

    def holds_everywhere(self, value: torch.Tensor) -> bool:
        """Whether every row of the floating tensor ``value`` holds: no NaN and no ``+inf``
        anywhere (its maximum, to which NaN propagates, is below infinity), then a finite
        entry, that is one above ``-inf``, in each row."""
        if not bool(value.amax() < math.inf):
            return False
        return bool(any_last(value > -math.inf).all())


class _PositiveProbability(_Bounded):
    """Probabilities in ``(0, 1]``: a Geometric distribution with ``p = 0`` has no mass."""

    description = "in (0, 1]"

    def bounds(self, dtype):
        return (0.0, False, 1.0, True)


class _Simplex(constraints.Constraint):
    """Non-negative vectors summing to one, within the rounding of their own dtype (torch's
    ``simplex`` allows 1e-6, which a bfloat16 softmax does not reach)."""

    description = "non-negative and summing to 1 over the last dimension"
    event_dim = 1

    def check(self, value):
        eps = torch.finfo(value.dtype).eps if value.is_floating_point() else 0.0
        tolerance = max(1e-6, value.shape[-1] * eps)
        total = value.sum(-1, dtype=torch.float64 if value.dtype == torch.float64 else None)
        return nonnegative_rows(value) & ((total - 1).abs() <= tolerance)


finite_real = _FiniteReal()
finite_positive = _FinitePositive()
scale = _Scale()
location = _Location()
log_weights = _LogWeights()
positive_probability = _PositiveProbability()
probability_vector = _Simplex()


# Unconstrained parameterizations of the library's simplex are torch's (pyro.param with it as
# constraint, an autoguide over a relaxed simplex site).
@biject_to.register(_Simplex)
def _biject_to_simplex(constraint):
    return biject_to(constraints.simplex)


@transform_to.register(_Simplex)
def _transform_to_simplex(constraint):
    return transform_to(constraints.simplex)


# How an error names what a constraint asks for; the finite ones above carry `description`.
_DESCRIPTIONS = {
    constraints.simplex: "non-negative and summing to 1 over the last dimension",
    constraints.unit_interval: "in [0, 1]",
    constraints.nonnegative_integer: "a non-negative integer",
    constraints.positive: "positive",
    constraints.real: "a number (not NaN)",
}


def _describe(constraint) -> str:
    base = getattr(constraint, "base_constraint", constraint)
    text = getattr(base, "description", None) or _DESCRIPTIONS.get(base)
    if text is None and hasattr(base, "lower_bound") and hasattr(base, "upper_bound"):
        closing = ")" if isinstance(base, constraints.half_open_interval) else "]"
        text = f"in [{base.lower_bound}, {base.upper_bound}{closing}"
    return text or f"in {base}"


def static_size(size) -> int:
    """A tensor size as a Python ``int``.

    While ``torch.jit.trace`` records, sizes come back as tensors, and converting one prints a
    ``TracerWarning``. The sizes the library reads this way (numbers of outcomes or categories)
    are fixed for a trace, so the conversion is exact and the warning is noise.
    """
    if not torch.is_tensor(size):
        return size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(size)


def static_shape(shape) -> tuple:
    """A shape as a tuple of Python ``int`` (see :func:`static_size`): comparing two of them
    freezes nothing into a jit trace and warns of nothing."""
    return tuple(static_size(size) for size in shape)


def known_same_shape(a: torch.Tensor, b) -> bool:
    """Whether tensor ``a`` has the shape ``b`` (a tensor or a shape), known without tracing.

    For shortcuts only: ``False`` while ``torch.jit.trace`` records, where sizes are traced
    values and comparing them would freeze the comparison into the trace (and warn).
    """
    if torch.jit.is_tracing():
        return False
    return a.shape == (b.shape if torch.is_tensor(b) else b)


def validation_enabled(validate_args) -> bool:
    """Whether to check values: ``validate_args``, else torch's (and Pyro's) global default.

    Never while ``torch.jit.trace`` records or a ``torch.func`` transform runs: a check reads
    values on the host, which a trace cannot replay (and each one would print a
    ``TracerWarning``) and ``vmap`` cannot do at all (data-dependent control flow).
    """
    if torch.jit.is_tracing() or (_TRANSFORMS_ACTIVE is not None and _TRANSFORMS_ACTIVE()):
        return False
    return Distribution._validate_args if validate_args is None else bool(validate_args)


def _torch_bounds(constraint):
    """``(low, low_closed, high, high_closed)`` of one of torch's constraints on real numbers
    between two numeric bounds, else ``None``."""
    kind = type(constraint)
    if kind is type(constraints.real):
        return (-math.inf, True, math.inf, True)  # NaN only
    low, high = getattr(constraint, "lower_bound", None), getattr(constraint, "upper_bound", None)
    if not all(bound is None or isinstance(bound, Real) for bound in (low, high)):
        return None  # tensor bounds: elementwise
    return {
        constraints.greater_than: lambda: (low, False, math.inf, True),
        constraints.greater_than_eq: lambda: (low, True, math.inf, True),
        constraints.less_than: lambda: (-math.inf, True, high, False),
        constraints.interval: lambda: (low, True, high, True),
        constraints.half_open_interval: lambda: (low, True, high, False),
    }.get(kind, lambda: None)()


def _holds_everywhere(constraint, value: torch.Tensor) -> bool:
    """Whether every entry of ``value`` satisfies ``constraint``: by the constraint's own
    ``holds_everywhere`` (the library's) or its bounds (torch's) for a floating tensor, else
    elementwise; an independent constraint without its per-row reduction (all rows of all
    entries hold exactly when all entries do)."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    if value.is_floating_point():
        if hasattr(constraint, "holds_everywhere"):
            return constraint.holds_everywhere(value)
        bounds = _torch_bounds(constraint)
        if bounds is not None:
            return _within_everywhere(value, bounds)
    return bool(constraint.check(value).all())


def check_constraint(owner: str, name: str, value, constraint) -> None:
    """Raises ``ValueError`` naming ``name`` if ``value`` violates ``constraint``.

    Values on the meta device have no data, and empty tensors no values: neither is checked
    (torch's event constraints cannot reshape an empty batch).
    """
    if value is None or (
        torch.is_tensor(value) and (value.device.type == "meta" or not value.numel())
    ):
        return
    checked = value.detach() if torch.is_tensor(value) else torch.as_tensor(value)
    if not _holds_everywhere(constraint, checked):
        shown = checked if checked.numel() <= 8 else f"a tensor of shape {tuple(checked.shape)}"
        raise ValueError(f"{owner}: `{name}` must be {_describe(constraint)}, got {shown}")


def is_integer(value) -> bool:
    """Whether ``value`` is an integral number (a Python or NumPy integer; not a ``bool``, not
    a tensor)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_count(owner: str, name: str, value, minimum: int = 1) -> int:
    """``value`` as a Python ``int`` if it is an integral number of at least ``minimum``; else
    ``TypeError`` for anything but an integer (a float, a string, ``None``, a tensor: Python's
    rule, ``range(2.0)``) and ``ValueError`` for a smaller one, both naming ``owner`` and
    ``name``. The library's one check of a count argument."""
    if not is_integer(value):
        # A count fixes shapes or loops: a tensor is refused, even of one integer (reading it
        # would wait on its device), and told apart from a bad number.
        hint = " (a tensor: pass a Python int, such as int(t))" if torch.is_tensor(value) else ""
        raise TypeError(
            f"{owner}: `{name}` must be an integer of at least {minimum}, got {value!r}{hint}"
        )
    if value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an integer of at least {minimum}, got {value}")
    return int(value)


def _finite_positive(value) -> bool:
    return 0 < value < math.inf


def check_number(
    owner: str,
    name: str,
    value,
    requirement: str = "be a finite positive number",
    valid=_finite_positive,
):
    """``value`` if it is a real number (Python's or NumPy's, not a bool) for which
    ``valid(value)`` holds (by default: finite and positive); else ``TypeError`` for anything
    that is not a real number (a string, a tensor, ``None``) and ``ValueError`` for one that
    is not valid, both saying that ``name`` must ``requirement``. The library's one check of a
    numeric option (a parameter, which may be a tensor, is parsed by
    :func:`parse_parameters`)."""
    message = f"{owner}: `{name}` must {requirement}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(message)
    if not valid(value):
        raise ValueError(message)
    return value


def check_flag(owner: str, name: str, value) -> bool:
    """``value`` as a ``bool`` if it is one (Python or NumPy), else ``TypeError`` naming
    ``name``: ``bool("False")`` is true, so a string would silently switch the option on."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: `{name}` must be True or False, got {value!r}")
    return bool(value)


def check_devices(owner: str, tensors: dict):
    """The one device of ``tensors`` (a dict by name; ``None`` if empty), else ``ValueError``
    naming two parameters and their devices."""
    device = None
    for name, value in tensors.items():
        if device is None:
            device, first = value.device, name
        elif value.device != device:
            raise ValueError(
                f"{owner}: `{first}` is on {device} but `{name}` is on {value.device}; put "
                "every parameter on the same device"
            )
    return device


_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision cannot hold a truncated log-PMF, a Gumbel's double logarithm at low
    # temperature or a softmax++ density: compute in float32, as torch.autocast does for exp,
    # log and softmax.
    return torch.float32 if dtype in _HALF else dtype


def as_float(owner: str, name: str, value, dtype=None, device=None) -> torch.Tensor:
    """``value`` (a tensor, a Python number or a nested sequence of numbers) as a floating tensor.

    A tensor keeps its device; it is converted to ``dtype`` if given, else to its own floating
    dtype, or the default dtype for integers (half precision becomes float32). A Python number
    becomes a tensor on ``device`` without a host-to-device copy.
    """
    if isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool):
        raise TypeError(f"{owner}: `{name}` must be a number or a floating tensor, got a boolean")
    if torch.is_tensor(value):
        if value.is_complex():
            raise TypeError(f"{owner}: `{name}` must be real, got a complex tensor")
        if dtype is None:
            dtype = _compute_dtype(value.dtype) if value.is_floating_point() else None
        return value.to(dtype or torch.get_default_dtype())
    dtype = dtype or torch.get_default_dtype()
    if isinstance(value, Real):
        return torch.full((), float(value), dtype=dtype, device=device)
    try:
        tensor = torch.as_tensor(value, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{owner}: `{name}` must be a number, a sequence of numbers or a tensor, got "
            f"{type(value).__name__}"
        ) from None
    return tensor


def common_dtype_and_device(owner: str, params: dict):
    """The dtype and device :func:`parse_parameters` converts ``params`` to: those of the first
    tensor (the dtype of the first floating one, half precision computed in float32), else the
    default dtype and no device. Raises ``ValueError`` naming both for two devices."""
    tensors = {name: value for name, value in params.items() if torch.is_tensor(value)}
    device = check_devices(owner, tensors)
    floating = [v.dtype for v in tensors.values() if v.is_floating_point()]
    return (_compute_dtype(floating[0]) if floating else torch.get_default_dtype()), device


def _copied_for_good(original, value) -> bool:
    """Whether ``value`` is a floating tensor ``original`` converted to another floating dtype
    (a copy, which in-place updates of ``original`` do not reach, half precision's to float32
    included), not one taking gradients (which flow through the conversion)."""
    return (
        torch.is_tensor(original)
        and value.dtype != original.dtype
        and original.is_floating_point()
        and not original.requires_grad
    )


def parse_parameters(
    owner: str, params: dict, arg_constraints: dict, validate: bool, *, warn_copy: bool = True
):
    """Converts a distribution's parameters to tensors of one dtype on one device, checks them
    and finds their batch shape; warns where a temperature tensor is copied to another dtype
    (unless ``warn_copy`` is false: a first pass that the constructor's own parse repeats).

    The first tensor in ``params`` (in order) sets the device and, if it is floating, the dtype
    (half precision becomes float32, the dtype the library computes in); otherwise the first
    floating tensor does, else the default dtype. A ``None`` raises ``TypeError``.

    Raises:
        ValueError: naming both parameters, for tensors on different devices or shapes that do
            not broadcast; naming the parameter, when validation is on and a value violates its
            constraint in ``arg_constraints`` (whose ``event_dim`` also gives each parameter's
            event dimensions).
        TypeError: naming the parameter, for a value that is not a number or a tensor.

    Returns:
        ``(tensors, batch_shape)``: a dict with the same keys, and the broadcast batch shape.
    """
    dtype, device = common_dtype_and_device(owner, params)
    parsed, batch_shape, shaped_by = {}, torch.Size(), None
    for name, value in params.items():
        if value is None:
            raise TypeError(f"{owner}: `{name}` must be a number or a tensor, got None")
        original = value
        value = as_float(owner, name, value, dtype, device)
        if warn_copy and name == "temperature" and _copied_for_good(original, value):
            warnings.warn(
                f"{owner}: the temperature tensor ({original.dtype}) is copied to "
                f"{value.dtype}, the parameters' dtype, so that updating it in place (annealing) "
                "does not reach this distribution; give it the parameters' dtype",
                stacklevel=caller_stacklevel(),
            )
        constraint = arg_constraints.get(name)
        event_dim = constraint.event_dim if constraint is not None else 0
        if value.dim() < event_dim:
            raise ValueError(f"{owner}: `{name}` needs at least {event_dim} dimension(s)")
        if validate and constraint is not None:
            # Half precision is checked as given, to the rounding of its own dtype.
            half = torch.is_tensor(original) and original.dtype in _HALF
            check_constraint(owner, name, original if half else value, constraint)
        shape = value.shape[: value.dim() - event_dim]
        try:
            batch_shape = broadcast_shapes(batch_shape, shape)
        except RuntimeError:
            raise ValueError(
                f"{owner}: `{name}` of batch shape {tuple(shape)} does not broadcast with "
                f"`{shaped_by}` of batch shape {tuple(batch_shape)}"
            ) from None
        if shape:
            shaped_by = shaped_by or name
        parsed[name] = value
    return parsed, batch_shape


def categorical_parameters(
    owner: str,
    probs,
    logits,
    temperature,
    validate: bool,
    what: str = "",
    event_dim: int = 1,
    *,
    warn_copy: bool = True,
):
    """Parses the ``probs`` xor ``logits`` and the ``temperature`` of a relaxed distribution.

    Checks that exactly one of ``probs`` and ``logits`` is given (with ``event_dim=1``, with a
    last dimension of at least 2 ``what``: "outcomes", "categories"; with ``event_dim=0``, a
    Bernoulli's scalar parameter), then parses them with :func:`parse_parameters` (which
    ``warn_copy`` is passed to).

    Returns:
        ``(name, param, temperature, batch_shape)``: the name of the parameter given, it as a
        floating tensor (neither normalized nor expanded), and the temperature as a tensor of its
        dtype and device, expanded to ``batch_shape``.
    """
    if (probs is None) == (logits is None):
        raise ValueError(f"{owner}: pass exactly one of `probs` and `logits`")
    name = "probs" if probs is not None else "logits"
    if event_dim:
        param_constraint = probability_vector if name == "probs" else log_weights
    else:
        param_constraint = constraints.unit_interval if name == "probs" else finite_real
    arg_constraints = {name: param_constraint, "temperature": scale}
    raw = {name: probs if probs is not None else logits, "temperature": temperature}
    if event_dim:
        if not torch.is_tensor(raw[name]):
            # In the dtype the parse below chooses (a float64 temperature makes a list float64).
            raw[name] = as_float(owner, name, raw[name], *common_dtype_and_device(owner, raw))
        if raw[name].dim() < 1 or static_size(raw[name].shape[-1]) < 2:
            raise ValueError(f"{owner}: `{name}` needs a last dimension of at least 2 {what}")
    parsed, batch_shape = parse_parameters(
        owner, raw, arg_constraints, validate, warn_copy=warn_copy
    )
    return name, parsed[name], parsed["temperature"].expand(batch_shape), batch_shape

"""Gradient diagnostics: the mean, variance and signal-to-noise ratio of an ELBO's gradients."""

import dataclasses
from collections.abc import Iterable, Mapping

import pyro
import torch
from pyro.poutine.messenger import Messenger
from tqdm import tqdm

from pyro_relax._numerics import check_count, check_flag

__all__ = ["GradientMoments", "gradient_moments"]


@dataclasses.dataclass(frozen=True, eq=False)
class GradientMoments:
    r"""The moments of one parameter's gradient estimate over :math:`N` independent draws
    :math:`g_1, \dots, g_N`, elementwise:

    .. math::
        \bar g = \frac{1}{N} \sum_{n=1}^{N} g_n, \qquad
        s^2 = \frac{1}{N - 1} \sum_{n=1}^{N} (g_n - \bar g)^2, \qquad
        \mathrm{SNR} = \frac{|\bar g|}{s}.

    Rainforth et al. (2018) use this signal-to-noise ratio to show that tighter bounds can give
    an inference network noisier gradients: the lower it is, the more a single gradient step
    is dominated by noise. Where :math:`s = 0` it is ``inf`` if :math:`\bar g \neq 0` (an exact
    gradient, such as one that ``TraceEnum_ELBO`` sums out) and ``nan`` if :math:`\bar g = 0`
    too (no signal and no noise, such as a parameter that received no gradient).

    References:
        Tighter Variational Bounds are Not Necessarily Better.
        Tom Rainforth, Adam R. Kosiorek, Tuan Anh Le, Chris J. Maddison, Maximilian Igl,
        Frank Wood, Yee Whye Teh, 2018. https://arxiv.org/abs/1802.04537

    Arguments:
        mean (Tensor): the mean :math:`\bar g`, shaped like the parameter.
        variance (Tensor): the unbiased variance :math:`s^2`, shaped like the parameter.
        num_draws (int): the number :math:`N \geq 2` of draws.

    Example:
        >>> m = GradientMoments(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 4.0]), 4)
        >>> m.snr, m.standard_error
        (tensor([inf, nan, 1.]), tensor([0., 0., 1.]))
        >>> m.mean_snr
        inf
    """

    mean: torch.Tensor
    variance: torch.Tensor
    num_draws: int

    @property
    def standard_error(self) -> torch.Tensor:
        r"""The standard error :math:`\sqrt{s^2 / N}` of the mean, elementwise."""
        return (self.variance / self.num_draws).sqrt()

    @property
    def snr(self) -> torch.Tensor:
        r"""The signal-to-noise ratio :math:`|\bar g| / s`, elementwise."""
        # IEEE division gives the documented limits: x / 0 = inf for x > 0, and 0 / 0 = nan.
        return self.mean.abs() / self.variance.sqrt()

    @property
    def mean_snr(self) -> float:
        """The SNR averaged over the parameter's elements where it is defined (``nan`` ones are
        left out): ``inf`` if any element's gradient is exact, ``nan`` if no element has one."""
        return float(self.snr.nanmean())

    def __str__(self) -> str:
        return (
            f"shape {tuple(self.mean.shape)}, {self.num_draws} draws: mean SNR "
            f"{self.mean_snr:.4g}, total variance {float(self.variance.sum()):.4g}"
        )


class _SavedGradients:
    """The ``.grad`` each leaf tensor had when first seen, to put back at the end."""

    def __init__(self):
        self._saved = {}  # tensors hash by identity

    def save(self, tensor):
        if tensor not in self._saved:
            self._saved[tensor] = tensor.grad
            tensor.grad = None

    def clear(self):
        for tensor in self._saved:
            tensor.grad = None

    def restore(self):
        for tensor, grad in self._saved.items():
            tensor.grad = grad


class _ParameterWatcher(Messenger):
    """Records the unconstrained tensor of each ``pyro.param`` the ELBO reads, by name, and
    clears the gradient of a tensor it has not seen before (before any backward pass reaches
    it), as :class:`_SavedGradients` keeps the old one."""

    def __init__(self, saved: _SavedGradients):
        super().__init__()
        self.saved = saved
        self.seen = {}

    def _pyro_post_param(self, msg):
        tensor = _unconstrained(msg["value"])
        self.saved.save(tensor)
        self.seen[msg["name"]] = tensor


class _Welford:
    """Running mean and sum of squared deviations in float64 (Welford's update, which stays
    exact for constant draws, where sums of squares would cancel)."""

    def __init__(self, like: torch.Tensor, count: int):
        # The draws before this one are zeros, for which (mean, m2) = (0, 0) is exact.
        self.dtype = like.dtype
        self.count = count
        self.mean = torch.zeros_like(like, dtype=torch.float64)
        self.m2 = torch.zeros_like(like, dtype=torch.float64)
        self.received_gradient = False

    def add(self, grad):
        self.count += 1
        self.received_gradient |= grad is not None
        value = self.mean.new_zeros(()) if grad is None else _dense(grad).double()
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    def moments(self) -> GradientMoments:
        variance = self.m2 / (self.count - 1)
        return GradientMoments(self.mean.to(self.dtype), variance.to(self.dtype), self.count)


def _dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


def _unconstrained(value):
    # pyro.param returns the constrained value, with a weak reference to the leaf tensor that
    # the optimizer updates and that receives the gradient.
    reference = getattr(value, "unconstrained", None)
    tensor = reference() if callable(reference) else None
    return value if tensor is None else tensor


def _check_arguments(elbo, num_draws, progress):
    check_count("gradient_moments", "num_draws", num_draws, minimum=2)  # (a variance)
    check_flag("gradient_moments", "progress", progress)
    if isinstance(elbo, type) or not callable(getattr(elbo, "loss_and_grads", None)):
        raise TypeError(
            "gradient_moments: `elbo` must be an ELBO instance with a loss_and_grads method "
            f"(such as pyro.infer.Trace_ELBO()), got {elbo!r}"
        )


def _requested(params):
    """``params`` as a dict from name to a leaf tensor, or to ``None`` for a param-store name
    to look up after the first draw."""
    if isinstance(params, str):
        params = [params]
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise _unnamed(params)
    requested = {}
    for item in params.items() if isinstance(params, Mapping) else params:
        if isinstance(item, str):
            requested[item] = None
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            requested[item[0]] = _leaf(*item)
        else:
            raise _unnamed(item)
    return requested


def _unnamed(value):
    return TypeError(
        "`params` must name its parameters: a dict from name to tensor, (name, tensor) pairs "
        f"or param-store names, got {type(value).__name__}"
    )


def _leaf(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"parameter {name!r} must be a tensor, got {type(tensor).__name__}")
    tensor = _unconstrained(tensor)
    if not (tensor.is_leaf and tensor.requires_grad):
        raise ValueError(
            f"parameter {name!r} is not a leaf tensor that requires grad: it can receive no "
            "gradient (pass the parameter itself, or its pyro.param value)"
        )
    return tensor


def _resolve(requested, seen):
    """Looks up the parameters requested by name, once the first draw has created them."""
    store = dict(pyro.get_param_store().named_parameters())
    resolved = {}
    for name, tensor in requested.items():
        tensor = tensor if tensor is not None else seen.get(name, store.get(name))
        if tensor is None:
            raise ValueError(
                f"no parameter named {name!r}: the ELBO read {sorted(seen)} and the param "
                f"store holds {sorted(store)}"
            )
        resolved[name] = tensor
    return resolved


def _draw(elbo, model, guide, args, kwargs, saved):
    """One gradient estimate: the names and leaf tensors of the parameters the ELBO read."""
    saved.clear()
    with _ParameterWatcher(saved) as watcher:
        elbo.loss_and_grads(model, guide, *args, **kwargs)
    return watcher.seen


def _accumulate(accumulators, tensors, draw):
    """Adds the gradient of each tensor, and a zero for each parameter missing from this draw."""
    for name, tensor in tensors.items():
        if name not in accumulators:
            accumulators[name] = _Welford(tensor, draw)
    for name, accumulator in accumulators.items():
        accumulator.add(tensors[name].grad if name in tensors else None)


def gradient_moments(
    model, guide, elbo, *args, num_draws=100, params=None, progress=False, **kwargs
):
    r"""The mean, variance and signal-to-noise ratio of an ELBO's gradient estimate, per
    parameter, from ``num_draws`` independent draws at fixed parameters.

    Each draw clears the gradients and calls ``elbo.loss_and_grads(model, guide, *args,
    **kwargs)``, as :class:`pyro.infer.SVI` does at each step; it works for every Pyro ELBO
    (``Trace_ELBO``, ``TraceGraph_ELBO``, ``TraceEnum_ELBO``, ``TraceMeanField_ELBO``,
    ``RenyiELBO`` ...) and any object with that method. The gradient :math:`g_n` is that of
    the loss that SVI minimizes, :math:`-\mathrm{ELBO}` (plus any auxiliary loss the ELBO
    adds, such as that of a neural baseline), with respect to the unconstrained tensor the
    optimizer updates: the mean is the expected direction of ascent of the loss, so SVI
    follows :math:`-\bar g`. Elementwise,

    .. math::
        \bar g = \frac{1}{N} \sum_{n=1}^{N} g_n, \qquad
        s^2 = \frac{1}{N - 1} \sum_{n=1}^{N} (g_n - \bar g)^2, \qquad
        \mathrm{SNR} = \frac{|\bar g|}{s},

    accumulated in float64 with Welford's update (no draw is stored). A parameter that
    receives no gradient in a draw counts as a zero gradient there, as for a loss that does
    not depend on it (see :class:`GradientMoments` for the SNR where :math:`s = 0`). Seed the draws
    with ``pyro.set_rng_seed``.

    The parameter values are not changed and no optimizer steps. The first draw creates the
    parameters that the model and guide declare lazily, as SVI's first step does. The
    ``.grad`` of every parameter in the param store, read by the ELBO or selected is put back
    as it was before the call (``None`` for those the call created), also if a draw raises.

    Warning:
        ``TraceGraph_ELBO``'s decaying-average baselines are state that the ELBO writes to the
        param store at every draw: they evolve across the draws, so the moments are those of
        the estimator with its baseline as it evolves, and the baseline keeps its last value.

    References:
        Tighter Variational Bounds are Not Necessarily Better.
        Tom Rainforth, Adam R. Kosiorek, Tuan Anh Le, Chris J. Maddison, Maximilian Igl,
        Frank Wood, Yee Whye Teh, 2018. https://arxiv.org/abs/1802.04537

    Arguments:
        model: the model, as for SVI.
        guide: the guide, as for SVI.
        elbo (pyro.infer.ELBO): the loss, an instance with a ``loss_and_grads`` method.
        *args: passed to the model and guide.
        num_draws (int): the number :math:`N \geq 2` of draws.
        params: the parameters to measure. ``None`` (default): every parameter the ELBO reads
            through ``pyro.param`` or ``pyro.module`` (those SVI hands to its optimizer) that
            receives a gradient in at least one draw; this leaves out the decaying-average
            baselines, which the ELBO sets rather than differentiates. Otherwise a dict from
            name to tensor, an iterable of ``(name, tensor)`` pairs (such as
            ``module.named_parameters()``) or of param-store names, looked up after the first
            draw; a tensor may be the value ``pyro.param`` returns. A selected parameter that
            receives no gradient in any draw gets zero moments and ``nan`` SNR.
        progress (bool): show a progress bar over the draws.
        **kwargs: passed to the model and guide (except ``num_draws``, ``params`` and
            ``progress``, which are this function's).

    Returns:
        dict: parameter name to :class:`GradientMoments`, with tensors shaped like the
        (unconstrained) parameter and in its dtype.

    Raises:
        ValueError: if ``num_draws`` is an integer below 2, a selected tensor is not a leaf
            that requires grad, or a selected name is not found after the first draw.
        TypeError: if ``num_draws`` is not an integer, ``elbo`` has no ``loss_and_grads``
            method, or ``params`` has no names.

    Example:
        >>> import pyro
        >>> import pyro.distributions as dist
        >>> from pyro.infer import Trace_ELBO
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.5)), 1.0))
        >>> pyro.clear_param_store()
        >>> moments = gradient_moments(model, guide, Trace_ELBO(), num_draws=10)
        >>> list(moments), moments["loc"].mean.shape, moments["loc"].num_draws
        (['loc'], torch.Size([]), 10)
        >>> pyro.clear_param_store()
    """
    _check_arguments(elbo, num_draws, progress)
    requested = None if params is None else _requested(params)
    saved = _SavedGradients()
    # The parameters known before the first draw; the watcher saves the others when read.
    stored = [tensor for _, tensor in pyro.get_param_store().named_parameters()]
    for tensor in stored + [t for t in (requested or {}).values() if t is not None]:
        saved.save(tensor)
    accumulators = {}
    try:
        for draw in tqdm(range(num_draws), disable=not progress, desc="gradient draws"):
            seen = _draw(elbo, model, guide, args, kwargs, saved)
            if requested is not None and draw == 0:
                requested = _resolve(requested, seen)
            # By name, the tensor read in this draw (TraceGraph_ELBO replaces its baselines).
            _accumulate(accumulators, seen if requested is None else requested, draw)
    finally:
        saved.restore()
    return {
        name: accumulator.moments()
        for name, accumulator in accumulators.items()
        if requested is not None or accumulator.received_gradient
    }

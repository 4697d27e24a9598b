"""Shared numerics: noise, log-space helpers and gradient-preserving clamps."""

import torch

__all__ = [
    "categorical_kl",
    "categorical_parameters",
    "clamp_with_identity_gradient",
    "gumbel_like",
    "log1mexp",
    "straight_through",
]


def gumbel_like(logits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    r"""Standard Gumbel noise :math:`g = -\log(-\log u)` of the given shape.

    The noise is drawn on the device and in the dtype of ``logits``. The uniforms lie in
    ``(tiny, 1)``: ``torch.rand`` can return 0, whose double logarithm is infinite.
    """
    u = torch.rand(shape, dtype=logits.dtype, device=logits.device)
    # In place: the noise is a fresh tensor that needs no gradient.
    return u.clamp_(min=torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()


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


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hard, soft):
        return hard.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Returns ``hard`` exactly in the forward pass, with the gradient of ``soft``.

    Unlike ``soft + (hard - soft).detach()``, the forward value is bit-exact, so an integer
    outcome stays an integer and a plain discrete distribution can score it.
    """
    return _StraightThrough.apply(hard.detach(), soft)


def categorical_parameters(probs, logits, temperature, what: str = "", event_dim: int = 1):
    """Parses the ``probs`` xor ``logits`` and the ``temperature`` of a relaxed distribution.

    Checks that exactly one of ``probs`` and ``logits`` is given (with ``event_dim=1``, with a
    last dimension of at least 2 ``what``: "outcomes", "categories"; with ``event_dim=0``, a
    Bernoulli's scalar parameter), and broadcasts ``temperature`` with its batch shape, raising
    ``ValueError`` naming the parameter otherwise.

    Returns:
        ``(name, param, temperature, batch_shape)``: the name of the parameter given, it as a
        floating tensor (neither normalized nor expanded), and the temperature as a tensor of its
        dtype and device, expanded to ``batch_shape``.
    """
    if (probs is None) == (logits is None):
        raise ValueError("pass exactly one of `probs` and `logits`")
    name = "probs" if probs is not None else "logits"
    param = torch.as_tensor(probs if probs is not None else logits)
    if not param.is_floating_point():
        param = param.to(torch.get_default_dtype())
    if event_dim and (param.dim() < 1 or param.shape[-1] < 2):
        raise ValueError(f"`{name}` needs a last dimension of at least 2 {what}")
    param_batch_shape = param.shape[: param.dim() - event_dim]
    temperature = torch.as_tensor(temperature, dtype=param.dtype, device=param.device)
    try:
        batch_shape = torch.broadcast_shapes(temperature.shape, param_batch_shape)
    except RuntimeError:
        raise ValueError(
            f"`temperature` of shape {tuple(temperature.shape)} does not broadcast with the "
            f"batch shape {tuple(param_batch_shape)} of `{name}`"
        ) from None
    return name, param, temperature.expand(batch_shape), batch_shape

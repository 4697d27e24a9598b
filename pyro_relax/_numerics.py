"""Shared numerics: noise, log-space helpers and gradient-preserving clamps."""

import torch

__all__ = [
    "categorical_kl",
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

"""Priors for IGR: the closed form of a uniform prior, and fitting to a target PMF."""

import torch

from pyro_relax.distributions.igr import IGR

__all__ = ["fit_igr_prior", "uniform_igr_prior"]


def uniform_igr_prior(num_categories: int, scale=1.0, *, dtype=None, device=None):
    r"""The IGR parameters :math:`(\mu_0, \sigma_0)` whose discrete limit is uniform over
    :math:`K` categories, in closed form.

    With equal coordinates, :math:`P(H = K) = \Phi(-\mu_0 / \sigma_0)^{K-1} = 1 / K` and the
    other categories share the rest equally by symmetry, so

    .. math::
        \mu_0 / \sigma_0 = -\Phi^{-1}\big(K^{-1/(K-1)}\big),

    about :math:`-0.753` for :math:`K = 10`. Any :math:`\sigma_0` works; the relaxation at a
    given temperature depends on it.

    References:
        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/2001.05069

    Arguments:
        num_categories (int): :math:`K \geq 2`.
        scale (float): :math:`\sigma_0 > 0`.

    Returns:
        tuple: ``(loc, scale)``, each of shape ``(K - 1,)``.

    Example:
        >>> loc, scale = uniform_igr_prior(10)
        >>> round(float(loc[0]), 3)
        -0.753
    """
    if isinstance(num_categories, bool) or not isinstance(num_categories, int):
        raise ValueError(f"`num_categories` must be an integer, got {num_categories!r}")
    if num_categories < 2:
        raise ValueError(f"`num_categories` must be at least 2, got {num_categories}")
    like = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    k = torch.tensor(float(num_categories), dtype=torch.float64)
    ratio = -torch.special.ndtri(k ** (-1 / (k - 1)))
    scale = torch.full((num_categories - 1,), float(scale), **like)
    return ratio.to(**like) * scale, scale


def fit_igr_prior(
    target_probs,
    *,
    family=IGR,
    temperature=0.1,
    delta=1.0,
    num_samples=1000,
    num_steps=500,
    lr=0.05,
    **family_kwargs,
):
    r"""Fits :math:`(\mu_0, \sigma_0)` so that relaxed samples match a target PMF (the paper's
    eq. 14).

    .. math::
        \min_{\mu_0, \sigma_0} \Big\| \frac{1}{N} \sum_{i=1}^{N} z^{(i)} - p_0 \Big\|^2,
        \qquad z^{(i)} \sim \operatorname{IGR}(\mu_0, \sigma_0, \tau, \delta),

    with Adam, a fresh batch of :math:`N` reparameterized samples per step, :math:`\sigma_0`
    parameterized by its logarithm, starting from :math:`\mu_0 = 0, \sigma_0 = 1`. At small
    :math:`\tau` the mean of the relaxed samples is close to the PMF of the discrete limit, so
    the fit matches that PMF. Use a fixed seed for a reproducible fit.

    References:
        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/2001.05069

    Arguments:
        target_probs (Tensor): :math:`p_0`, shape ``(K,)`` or ``batch_shape + (K,)``.
        family (type): :class:`~pyro_relax.distributions.IGR` or
            :class:`~pyro_relax.distributions.IGRStickBreaking` (or any class with the
            signature ``family(loc, scale, temperature, delta, **family_kwargs)`` whose samples
            lie on the :math:`K`-simplex).
        temperature (float): :math:`\tau` of the samples matched.
        delta (float): :math:`\delta`.
        num_samples (int): :math:`N`.
        num_steps (int): Adam steps.
        lr (float): Adam's learning rate.

    Returns:
        tuple: detached ``(loc, scale)``, each of shape ``batch_shape + (K - 1,)``.

    Example:
        >>> loc, scale = fit_igr_prior(torch.tensor([0.7, 0.2, 0.1]), num_steps=50)
        >>> loc.shape
        torch.Size([2])
    """
    target = torch.as_tensor(target_probs)
    if not target.is_floating_point():
        target = target.to(torch.get_default_dtype())
    shape = target.shape[:-1] + (target.shape[-1] - 1,)
    loc = torch.zeros(shape, dtype=target.dtype, device=target.device, requires_grad=True)
    log_scale = torch.zeros_like(loc, requires_grad=True)
    optimizer = torch.optim.Adam([loc, log_scale], lr=lr)
    for _ in range(num_steps):
        optimizer.zero_grad()
        d = family(loc, log_scale.exp(), temperature, delta, validate_args=False, **family_kwargs)
        mean = d.rsample((num_samples,)).mean(0)
        loss = (mean - target).square().sum()
        loss.backward()
        optimizer.step()
    return loc.detach(), log_scale.detach().exp()

"""KL divergences between the library's distributions and the discrete ones they relax.

Importing :mod:`pyro_relax` registers them with :func:`torch.distributions.kl.register_kl`, so
``TraceMeanField_ELBO`` uses them in place of a Monte-Carlo estimate.
"""

import functools
import math

import torch
from torch.distributions import Bernoulli, Multinomial, Normal, OneHotCategorical
from torch.distributions.kl import kl_divergence, register_kl

from pyro_relax._numerics import (
    binary_log_probs,
    broadcast_shapes,
    categorical_kl,
    categorical_log_probs,
    same_values,
    static_shape,
)
from pyro_relax.distributions.finite_discrete import FiniteDiscrete, log_probs_at
from pyro_relax.distributions.gengs import GenGSMultinomial, TruncatedGenGS, _multinomial_log_probs
from pyro_relax.distributions.igr import IGR, IGRCount, IGRPlanar, IGRStickBreaking, _IGRBase
from pyro_relax.distributions.straight_through import (
    _StraightThroughBernoulli,
    _StraightThroughCategorical,
)
from pyro_relax.distributions.truncation import _FAMILIES, log_probs_truncated

__all__ = []


def _check_shapes(p, q):
    """Every pair registered here relates distributions over one event space: ``ValueError``
    naming both classes for event shapes that differ (categories, outcomes' shapes) or batch
    shapes that do not broadcast, in place of a raw broadcasting error from the arithmetic."""
    pair = f"KL({type(p).__name__} || {type(q).__name__})"
    if static_shape(p.event_shape) != static_shape(q.event_shape):
        raise ValueError(
            f"{pair} needs one event shape (the same number of categories or outcome shape); "
            f"got {tuple(p.event_shape)} and {tuple(q.event_shape)}"
        )
    try:
        broadcast_shapes(p.batch_shape, q.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{pair}: batch shapes {tuple(p.batch_shape)} and {tuple(q.batch_shape)} do not "
            f"broadcast"
        ) from None


def _registered(type_p, type_q):
    """``register_kl`` of a function that gets the pair's shapes checked first."""

    def register(kl):
        @functools.wraps(kl)
        def checked(p, q):
            _check_shapes(p, q)
            return kl(p, q)

        return register_kl(type_p, type_q)(checked)

    return register


@_registered(TruncatedGenGS, TruncatedGenGS)
def _kl_truncatedgengs_truncatedgengs(p, q):
    r"""The categorical KL :math:`\sum_k \pi^p_k (\log \pi^p_k - \log \pi^q_k)` (Joo et al.,
    2020, Proposition 6): the relaxations share their outcomes, so their KL is that of the
    truncated discrete distributions they stand for."""
    if p.num_outcomes != q.num_outcomes:
        raise ValueError(
            f"KL between GenGS distributions needs the same outcomes; got {p.num_outcomes} "
            f"and {q.num_outcomes} outcomes"
        )
    if p._outcomes_are_counts and q._outcomes_are_counts:
        return categorical_kl(p.logits, q.logits)
    return categorical_kl(p.logits, log_probs_at(p.outcomes, q.outcomes, q.logits))


@_registered(FiniteDiscrete, FiniteDiscrete)
def _kl_finitediscrete_finitediscrete(p, q):
    r"""The KL :math:`\sum_k \pi^p_k (\log \pi^p_k - \log q(c_k))` over the outcomes
    :math:`c_k` of ``p``, each found among those of ``q`` by value (the KL of the discrete
    distributions two GenGS relax)."""
    return categorical_kl(p.logits, log_probs_at(p.outcomes, q.outcomes, q.logits))


def _kl_finitediscrete_count(p, q):
    r"""The KL :math:`\sum_k \pi_k (\log \pi_k - \log q(c_k))` from a distribution over scalar
    outcomes :math:`c_k` to an (untruncated) count distribution: exact, a finite sum. An
    outcome outside the count distribution's support has probability zero there (the KL is
    infinite if ``p`` gives it mass); the outcomes are scalars (the event shapes are checked)."""
    batch_dims = max(len(p.batch_shape), len(q.batch_shape))
    values = p.outcomes.view((-1,) + (1,) * batch_dims)
    inside = q.support.check(values)
    log_q = q.log_prob(torch.where(inside, values, torch.zeros_like(values)))
    log_q = torch.where(inside, log_q, torch.full_like(log_q, -math.inf)).movedim(0, -1)
    return categorical_kl(p.logits, log_q)


def _kl_truncatedgengs_count(p, q):
    r"""KL from a GenGS over the counts :math:`0..n-1` to a count distribution truncated at the
    same :math:`n`, tail bin included (what the GenGS paper trains with)."""
    if not p._outcomes_are_counts:
        raise NotImplementedError(
            "KL to a count distribution needs a GenGS over the default outcomes 0..n-1"
        )
    return categorical_kl(p.logits, log_probs_truncated(q, p.truncation, p.num_outcomes))


for _family in _FAMILIES:  # every count family a GenGS truncates
    _registered(TruncatedGenGS, _family.cls)(_kl_truncatedgengs_count)
    _registered(FiniteDiscrete, _family.cls)(_kl_finitediscrete_count)


@_registered(GenGSMultinomial, Multinomial)
def _kl_gengsmultinomial_multinomial(p, q):
    """KL from a relaxed multinomial to a multinomial with the same number of trials."""
    if p.total_count != q.total_count:
        raise ValueError(f"KL needs equal total counts; got {p.total_count} and {q.total_count}")
    class_log_probs = categorical_log_probs(q)
    return categorical_kl(
        p.logits, _multinomial_log_probs(class_log_probs, q.total_count, p.outcomes)
    )


# --- IGR -----------------------------------------------------------------------------------


def _igr_gaussian_kl(p, q):
    """The KL between two Gaussians pushed through the same bijection: that of the Gaussians."""
    mine, theirs = p._map_parameters(), q._map_parameters()
    if len(mine) != len(theirs) or not all(
        same_values(a, b) for a, b in zip(mine, theirs, strict=True)
    ):
        raise NotImplementedError(
            f"KL({type(p).__name__} || {type(q).__name__}) is in closed form only for the "
            "same map: equal temperature and delta, and the same flows (TraceMeanField_ELBO "
            "then falls back to Monte Carlo)"
        )
    kl = kl_divergence(p.base_dist, q.base_dist)
    return kl.expand(broadcast_shapes(kl.shape, p.batch_shape))


@_registered(IGR, IGR)
def _kl_igr_igr(p, q):
    r"""The Gaussian KL in closed form, for any temperatures and deltas.

    The map from the pre-image of ``p`` to that of ``q`` is affine per coordinate,
    :math:`y_q = a\, y_p + b` with :math:`a = \tau_q / \tau_p` and
    :math:`b = \tau_q (\log \delta_q - \log \delta_p)`, and a bijection leaves the KL
    unchanged: :math:`\mathrm{KL}(p \| q) = \mathrm{KL}(\mathcal{N}(a \mu_p + b,
    a \sigma_p) \| \mathcal{N}(\mu_q, \sigma_q))`. No parameter is compared, so no
    value is read on the host."""
    a = (q.temperature / p.temperature).unsqueeze(-1)
    b = q.temperature.unsqueeze(-1) * (q.delta.log() - p.delta.log()).unsqueeze(-1)
    mapped = Normal(a * p.loc + b, a * p.scale, validate_args=False)
    kl = kl_divergence(mapped, Normal(q.loc, q.scale, validate_args=False)).sum(-1)
    return kl.expand(broadcast_shapes(kl.shape, p.batch_shape))


@_registered(IGRStickBreaking, IGRStickBreaking)
def _kl_igrstickbreaking_igrstickbreaking(p, q):
    r"""The Gaussian KL in closed form for equal temperatures and deltas and all sticks kept;
    ``NotImplementedError`` otherwise (with a ``precision``, a sample drops the Gaussian
    coordinates of its dropped sticks and the KL has no closed form)."""
    if p.precision is not None or q.precision is not None:
        raise NotImplementedError(
            "KL between IGRStickBreaking with countably infinite support has no closed form "
            "(TraceMeanField_ELBO then falls back to Monte Carlo)"
        )
    return _igr_gaussian_kl(p, q)


@_registered(IGRCount, IGRCount)
def _kl_igrcount_igrcount(p, q):
    """The KL of the simplex points the counts carry (the augmented latents)."""
    if static_shape(p.simplex_dist.event_shape) != static_shape(q.simplex_dist.event_shape):
        raise ValueError(
            f"KL(IGRCount || IGRCount) needs the same number of categories; got "
            f"{p.simplex_dist.event_shape[-1]} and {q.simplex_dist.event_shape[-1]}"
        )
    return kl_divergence(p.simplex_dist, q.simplex_dist)


@_registered(IGRPlanar, IGRPlanar)
def _kl_igrplanar_igrplanar(p, q):
    """The Gaussian KL in closed form for the same flows (the very layers), temperature and
    delta; ``NotImplementedError`` otherwise."""
    return _igr_gaussian_kl(p, q)


@_registered(_IGRBase, _IGRBase)
def _kl_igr_families(p, q):
    """No closed form between two IGR families; a message in place of torch's empty one for
    transformed distributions."""
    raise NotImplementedError(
        f"KL({type(p).__name__} || {type(q).__name__}) has no closed form: the closed forms "
        "are within one IGR family (TraceMeanField_ELBO falls back to Monte Carlo)"
    )


# --- The straight-through family (GST, ST, STGS, GR-MCK) ----------------------------------

# torch's categorical and Bernoulli KLs, which these classes would inherit, mark impossible
# outcomes by boolean-mask assignment: a host synchronization on CUDA at every
# TraceMeanField_ELBO step. The same KLs without it:


@_registered(_StraightThroughCategorical, OneHotCategorical)
def _kl_straightthroughcategorical_onehotcategorical(p, q):
    """The categorical KL, from a straight-through categorical to a one-hot categorical."""
    return categorical_kl(categorical_log_probs(p), categorical_log_probs(q))


@_registered(_StraightThroughBernoulli, Bernoulli)
def _kl_straightthroughbernoulli_bernoulli(p, q):
    """The Bernoulli KL, from a straight-through Bernoulli to a Bernoulli."""
    return categorical_kl(binary_log_probs(p), binary_log_probs(q))

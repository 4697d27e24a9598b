"""Registry examples of the IGR family."""

import torch
from example import Example
from pyro.distributions.transforms.planar import ConditionedPlanar
from torch.distributions import constraints

import pyro_relax as pr

__all__ = ["IGR_EXAMPLES", "limit_frequencies"]

_f64 = torch.float64
_f32 = torch.float32
_GAUSSIAN = {"loc": constraints.real, "scale": constraints.positive}


def _t(*values, dtype=_f64):
    return torch.tensor(values, dtype=dtype)


def _loc(*shape, dtype=_f64):
    # Distinct, moderate means: some categories favoured, some not.
    n = torch.Size(shape).numel()
    return torch.linspace(-1.5, 1.0, n, dtype=dtype).reshape(shape).sin()


def _scale(*shape, dtype=_f64):
    n = torch.Size(shape).numel()
    return torch.linspace(0.5, 1.5, n, dtype=dtype).reshape(shape)


def _standard(*shape, dtype=_f64):
    return torch.zeros(shape, dtype=dtype), torch.ones(shape, dtype=dtype)


def _planar_flows(planar_bias, planar_u, planar_w):
    # ConditionedPlanar takes its parameters as tensors, so they follow the example's device.
    return [
        ConditionedPlanar((b, u, w))
        for b, u, w in zip(planar_bias, planar_u, planar_w, strict=True)
    ]


def _one_hot(d, index):
    return torch.nn.functional.one_hot(index, d.num_categories).to(d.loc.dtype)


def limit_frequencies(loc, scale, num_draws, generator=None):
    """Proposition 1 by simulation, per batch element: y ~ N(loc, scale), H = argmax_k y_k where
    that is positive, else the last category K (whatever delta); the frequencies of H, shape
    ``batch_shape + (K + 1,)``. Standard error sqrt(p (1 - p) / num_draws) per category."""
    noise = torch.randn((num_draws,) + loc.shape, generator=generator, dtype=loc.dtype)
    y = loc + scale * noise
    index = torch.cat([y, torch.zeros_like(y[..., :1])], -1).argmax(-1)
    # One bincount over all elements: each element's categories offset by its position.
    size, elements = loc.shape[-1] + 1, loc.shape[:-1].numel()
    offsets = size * torch.arange(elements)
    counts = torch.bincount(
        (index.reshape(num_draws, -1) + offsets).flatten(), minlength=size * elements
    )
    return counts.reshape(loc.shape[:-1] + (size,)).to(loc.dtype) / num_draws


def _argmax_frequencies(params, d):
    # 400,000 draws: standard error at most 0.5 / sqrt(400,000) = 8e-4; the example's
    # tolerance is five of them, and the seeded generator makes it one draw.
    generator = torch.Generator().manual_seed(11)
    return limit_frequencies(params["loc"], params["scale"], 400_000, generator)


_IGR_CATEGORICAL = dict(
    categories=lambda d, value: value.argmax(-1),
    category_probs=lambda d: d.categorical().probs,
    reference_probs=_argmax_frequencies,
    reference_tolerance=4e-3,
    values_of=_one_hot,
)

IGR_EXAMPLES = [
    Example(
        "IGR",
        lambda loc, scale, temperature, **kw: pr.IGR(loc, scale, temperature, **kw),
        {"loc": _loc(4), "scale": _scale(4), "temperature": _t(0.5)},
        learnable=_GAUSSIAN,
        prior=lambda: pr.IGR(*_standard(4), 0.5),
        kl_partners=(
            lambda: pr.IGR(*_standard(4), 0.5),
            lambda: pr.IGR(_t(0.5, -0.5, 0.0, 1.0), _t(2.0, 1.0, 0.5, 1.0), 0.5),
        ),
        exact_density=True,
    ),
    Example(
        "IGR-batched-delta",
        lambda loc, scale, temperature, **kw: pr.IGR(loc, scale, temperature, delta=0.5, **kw),
        {"loc": _loc(3, 4), "scale": _scale(3, 4), "temperature": _t(0.2, 0.5, 1.0)},
        learnable=_GAUSSIAN,
        prior=lambda: pr.IGR(*_standard(4), _t(0.2, 0.5, 1.0), delta=0.5),
        kl_partners=(lambda: pr.IGR(*_standard(4), _t(0.2, 0.5, 1.0), delta=0.5),),
        exact_density=True,
    ),
    Example(
        "IGR-broadcast-temperature",
        lambda loc, scale, temperature, **kw: pr.IGR(loc, scale, temperature, **kw),
        {"loc": _loc(3, 2), "scale": _scale(2), "temperature": _t([0.2], [1.0])},
        learnable=_GAUSSIAN,
        prior=lambda: pr.IGR(*_standard(2), _t([0.2], [1.0])),
        kl_partners=(lambda: pr.IGR(*_standard(2), _t([0.2], [1.0])),),
        exact_density=True,
    ),
    Example(
        # The setting the issue asks for: float32, temperature 0.05, K = 10, validation on.
        "IGR-float32-cold",
        lambda loc, scale, temperature, **kw: pr.IGR(loc, scale, temperature, **kw),
        {
            "loc": _loc(2, 9, dtype=_f32) * 3,
            "scale": _scale(2, 9, dtype=_f32),
            "temperature": _t(0.05, dtype=_f32),
        },
        learnable=_GAUSSIAN,
        prior=lambda: pr.IGR(*pr.uniform_igr_prior(10, dtype=_f32), 0.05),
        kl_partners=(lambda: pr.IGR(*pr.uniform_igr_prior(10, dtype=_f32), 0.05),),
        exact_density=True,
    ),
    Example(
        # Hard one-hot samples; a plain one-hot vector is scored by the discrete PMF
        # (Proposition 2), so the categorical tests apply. No KL partner: the registered KL
        # is the Gaussian KL of the relaxations, not the categorical KL those tests compare.
        "IGR-straight-through",
        lambda loc, scale, temperature, **kw: pr.IGR(loc, scale, temperature, hard=True, **kw),
        {"loc": _loc(2, 3), "scale": _scale(2, 3), "temperature": _t(0.3)},
        learnable=_GAUSSIAN,
        prior=lambda: pr.IGR(*_standard(3), 0.3, hard=True),
        exact_density=True,
        surrogate_gradient=True,
        **_IGR_CATEGORICAL,
    ),
    Example(
        "IGRStickBreaking",
        lambda loc, scale, temperature, **kw: pr.IGRStickBreaking(loc, scale, temperature, **kw),
        {"loc": _loc(2, 5), "scale": _scale(2, 5), "temperature": _t(0.3)},
        learnable=_GAUSSIAN,
        prior=lambda: pr.IGRStickBreaking(*_standard(5), 0.3),
        kl_partners=(lambda: pr.IGRStickBreaking(*_standard(5), 0.3),),
        exact_density=True,
    ),
    Example(
        # Countably infinite support: 20 coordinates at most, cut at 90% of the mass. The KL
        # has no closed form (TraceMeanField_ELBO falls back to Monte Carlo).
        "IGRStickBreaking-infinite",
        lambda loc, scale, temperature, **kw: pr.IGRStickBreaking(
            loc, scale, temperature, precision=0.9, **kw
        ),
        {"loc": _loc(2, 19) - 1, "scale": _scale(2, 19), "temperature": _t(0.3)},
        learnable=_GAUSSIAN,
        # No prior: the integration tests require a closed-form KL for TraceMeanField_ELBO.
        exact_density=True,
    ),
    Example(
        "IGRPlanar",
        lambda loc, scale, temperature, planar_bias, planar_u, planar_w, **kw: pr.IGRPlanar(
            loc, scale, temperature, flows=_planar_flows(planar_bias, planar_u, planar_w), **kw
        ),
        {
            "loc": _loc(2, 3),
            "scale": _scale(2, 3),
            "temperature": _t(0.3),
            "planar_bias": _t([0.1], [-0.2]),
            "planar_u": _t([0.5, -0.3, 0.2], [0.1, 0.4, -0.6]),
            "planar_w": _t([0.3, 0.8, -0.5], [-0.7, 0.2, 0.4]),
        },
        learnable={**_GAUSSIAN, "planar_u": constraints.real, "planar_w": constraints.real},
        # No prior: there is no closed-form KL to an IGR (TraceMeanField_ELBO would fall back to
        # Monte Carlo), which the integration tests require; test_igr.py trains planar flows.
        exact_density=True,
        through={"planar_bias": "flows", "planar_u": "flows", "planar_w": "flows"},
    ),
    Example(
        # A count over 0..9; the paper approximates a Poisson(50) with 100 outcomes this way.
        "IGRCount",
        lambda loc, scale, temperature, **kw: pr.IGRCount(loc, scale, temperature, **kw),
        {"loc": _loc(3, 9), "scale": _scale(3, 9), "temperature": _t(0.2)},
        learnable=_GAUSSIAN,
        prior=lambda: pr.IGRCount(*_standard(9), 0.2),
        kl_partners=(lambda: pr.IGRCount(*_standard(9), 0.2),),
        exact_density=True,
    ),
]

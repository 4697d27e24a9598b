"""Registry examples of the GenGS family."""

import pyro.distributions as dist
import torch
from example import Example
from torch.distributions import constraints

import pyro_relax as pr

__all__ = ["GENGS_EXAMPLES"]

_f64 = torch.float64


def _gengs_categories(d, value):
    # The relaxed one-hot a GenGS sample carries: its argmax is the Gumbel-max draw.
    return pr.relaxation_of(value).weights.argmax(-1)


def _gengs_values(d, index):
    return d.outcomes[index]


_GENGS = dict(
    categories=_gengs_categories,
    category_probs=lambda d: d.probs,
    values_of=_gengs_values,
)


def _truncated_pmf(base, truncation=None, *, mass=0.999, max_truncation=None, largest=None):
    """The PMF a GenGS relaxes, from torch's own ``base.log_prob``: outcomes ``0..n-2`` exact,
    the last ``n - 1`` holding ``P(X >= n - 1)``. Without ``truncation``, each element's
    ``n = k* + 2`` with ``k*`` the smallest ``k`` where ``P(X <= k) >= mass`` (at most
    ``largest + 1`` for a support bounded by ``largest``): capped per element by
    ``max_truncation``, else the batch maximum for all (docs of ``automatic_truncation``)."""
    batch = base.batch_shape
    top = 400 if largest is None else largest
    grid = torch.arange(top + 1, dtype=_f64).reshape((-1,) + (1,) * len(batch))
    pmf = base.log_prob(grid).exp().movedim(0, -1).to(_f64)
    if truncation is None:
        size = (pmf.cumsum(-1) < mass).sum(-1) + 2
        if largest is not None:
            size = size.clamp(max=largest + 1)
        if max_truncation is None:
            truncation = int(size.max())
            size = torch.full(batch, truncation)
        else:
            truncation = max_truncation
            size = size.clamp(max=max_truncation)
    else:
        size = torch.full(batch, truncation)
    outcome = torch.arange(truncation)
    last = (size - 1).unsqueeze(-1)
    probs = torch.where(outcome < last, pmf[..., :truncation], 0.0)
    return torch.where(outcome == last, 1 - probs.sum(-1, keepdim=True), probs)


def _multinomial(params, d):
    # Pyro's Multinomial at each outcome of the table, which must be every count vector of the
    # total (checked here against an enumeration of its own).
    total, probs = 3, params["probs"]
    table = {(a, b, total - a - b) for a in range(total + 1) for b in range(total + 1 - a)}
    assert sorted(map(tuple, d.outcomes.long().tolist())) == sorted(table)
    value = d.outcomes.reshape((-1,) + (1,) * (probs.dim() - 1) + (probs.shape[-1],))
    return dist.Multinomial(total, probs).log_prob(value).exp().movedim(0, -1)


_RATE = {"rate": constraints.positive}
_PROBS = {"probs": constraints.unit_interval}
_SIMPLEX = {"probs": constraints.simplex}


def _t(*values, dtype=_f64):
    return torch.tensor(values, dtype=dtype)


GENGS_EXAMPLES = [
    Example(
        "TruncatedGenGS-probs",
        lambda probs, temperature, **kw: pr.TruncatedGenGS(temperature, probs=probs, **kw),
        {"probs": _t([0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]), "temperature": _t(0.5)},
        learnable=_SIMPLEX,
        prior=lambda: pr.TruncatedGenGS(0.5, logits=torch.zeros(4, dtype=_f64)),
        kl_partners=(lambda: pr.TruncatedGenGS(0.5, logits=torch.zeros(4, dtype=_f64)),),
        reference_probs=lambda p, d: p["probs"] / p["probs"].sum(-1, keepdim=True),
        **_GENGS,
    ),
    Example(
        # Free logits over counts: the implicit variant "GenGS IMP", with a Poisson prior.
        "TruncatedGenGS-implicit",
        lambda logits, temperature, **kw: pr.TruncatedGenGS(temperature, logits=logits, **kw),
        {
            "logits": torch.linspace(-2.0, 2.0, 24, dtype=_f64).reshape(3, 8).cos(),
            "temperature": _t(0.3, 0.5, 1.0),
        },
        learnable={"logits": constraints.real},
        prior=lambda: pr.GenGSPoisson(torch.tensor(2.0, dtype=_f64), 0.5, 8),
        kl_partners=(
            lambda: pr.GenGSPoisson(torch.tensor(2.0, dtype=_f64), 0.5, 8),
            lambda: dist.Poisson(torch.tensor(2.0, dtype=_f64)),
        ),
        reference_probs=lambda p, d: torch.softmax(p["logits"], -1),
        **_GENGS,
    ),
    Example(
        "TruncatedGenGS-vector-outcomes",
        lambda logits, temperature, **kw: pr.TruncatedGenGS(
            temperature,
            logits=logits,
            outcomes=_t([0.0, 0.0], [1.0, -1.0], [2.0, 0.5], [3, 3]).to(
                logits.device if torch.is_tensor(logits) else None
            ),
            **kw,
        ),
        {"logits": _t([0.5, -1.0, 0.0, 1.0]), "temperature": _t(0.2)},
        learnable={"logits": constraints.real},
        prior=lambda: pr.TruncatedGenGS(
            0.5,
            logits=torch.zeros(4, dtype=_f64),
            outcomes=_t([0.0, 0.0], [1.0, -1.0], [2.0, 0.5], [3, 3]),
        ),
        kl_partners=(
            lambda: pr.TruncatedGenGS(
                1.0,
                logits=_t(0.0, 1.0, 2.0, 3.0),
                outcomes=_t([0.0, 0.0], [1.0, -1.0], [2.0, 0.5], [3, 3]),
            ),
        ),
        reference_probs=lambda p, d: torch.softmax(p["logits"], -1),
        **_GENGS,
    ),
    Example(
        "GenGSPoisson",
        lambda rate, temperature, **kw: pr.GenGSPoisson(rate, temperature, 12, **kw),
        {"rate": _t(0.5, 2.0, 3.5), "temperature": _t(0.5)},
        learnable=_RATE,
        prior=lambda: pr.GenGSPoisson(torch.tensor(2.0, dtype=_f64), 0.5, 12),
        kl_partners=(
            lambda: pr.GenGSPoisson(torch.tensor(2.0, dtype=_f64), 0.5, 12),
            lambda: dist.Poisson(torch.tensor(2.0, dtype=_f64)),
        ),
        reference_probs=lambda p, d: _truncated_pmf(dist.Poisson(p["rate"]), 12),
        **_GENGS,
    ),
    Example(
        # The hardest setting DESIGN asks for: float32, temperature 0.01, validation on.
        "GenGSPoisson-float32-cold",
        lambda rate, temperature, **kw: pr.GenGSPoisson(rate, temperature, 15, **kw),
        {"rate": _t(1.0, 4.0, dtype=torch.float32), "temperature": _t(0.01, dtype=torch.float32)},
        learnable=_RATE,
        prior=lambda: pr.GenGSPoisson(2.0, 0.01, 15),
        kl_partners=(lambda: dist.Poisson(2.0),),
        reference_probs=lambda p, d: _truncated_pmf(dist.Poisson(p["rate"]), 15).float(),
        **_GENGS,
    ),
    Example(
        "GenGSPoisson-straight-through",
        lambda rate, temperature, **kw: pr.GenGSPoisson(rate, temperature, 15, hard=True, **kw),
        {"rate": _t(1.0, 3.0), "temperature": _t(0.5)},
        learnable=_RATE,
        # Hard integer samples: a plain Poisson prior scores them.
        prior=lambda: dist.Poisson(torch.tensor(2.0, dtype=_f64)),
        kl_partners=(lambda: dist.Poisson(torch.tensor(2.0, dtype=_f64)),),
        surrogate_gradient=True,
        reference_probs=lambda p, d: _truncated_pmf(dist.Poisson(p["rate"]), 15),
        **_GENGS,
    ),
    Example(
        "GenGSPoisson-broadcast",
        lambda rate, temperature, **kw: pr.GenGSPoisson(rate, temperature, 10, **kw),
        {"rate": _t(0.5, 1.0, 2.0), "temperature": _t([0.2], [1.0])},
        learnable=_RATE,
        prior=lambda: pr.GenGSPoisson(torch.tensor(1.0, dtype=_f64), 0.5, 10),
        kl_partners=(lambda: dist.Poisson(torch.tensor(1.0, dtype=_f64)),),
        reference_probs=lambda p, d: _truncated_pmf(dist.Poisson(p["rate"]), 10).expand(2, 3, 10),
        **_GENGS,
    ),
    Example(
        # "GenGS NP" with a cap: per-element truncation, static shapes.
        "GenGSPoisson-capped",
        lambda rate, temperature, **kw: pr.GenGSPoisson(rate, temperature, max_truncation=20, **kw),
        {"rate": _t(0.3, 2.0, 6.0), "temperature": _t(0.3)},
        learnable=_RATE,
        prior=lambda: pr.GenGSPoisson(torch.tensor(2.0, dtype=_f64), 0.3, 20),
        kl_partners=(lambda: dist.Poisson(torch.tensor(2.0, dtype=_f64)),),
        reference_probs=lambda p, d: _truncated_pmf(dist.Poisson(p["rate"]), max_truncation=20),
        **_GENGS,
    ),
    Example(
        "GenGSPoisson-automatic",
        lambda rate, temperature, **kw: pr.GenGSPoisson(rate, temperature, **kw),
        {"rate": _t(3.0), "temperature": _t(0.5)},
        learnable=_RATE,
        kl_partners=(lambda: dist.Poisson(torch.tensor(2.0, dtype=_f64)),),
        static_shapes=False,
        reference_probs=lambda p, d: _truncated_pmf(dist.Poisson(p["rate"])),
        **_GENGS,
    ),
    Example(
        "GenGS-of-Poisson",
        lambda rate, temperature, **kw: pr.GenGS(
            dist.Poisson(rate, validate_args=kw.get("validate_args")), temperature, 10, **kw
        ),
        {"rate": _t(1.5), "temperature": _t(0.2)},
        learnable=_RATE,
        prior=lambda: pr.GenGSPoisson(torch.tensor(1.0, dtype=_f64), 0.2, 10),
        kl_partners=(lambda: dist.Poisson(torch.tensor(1.0, dtype=_f64)),),
        through={"rate": "base_dist"},
        reference_probs=lambda p, d: _truncated_pmf(dist.Poisson(p["rate"]), 10),
        **_GENGS,
    ),
    Example(
        "GenGSGeometric",
        lambda probs, temperature, **kw: pr.GenGSGeometric(temperature, 25, probs=probs, **kw),
        {"probs": _t(0.3, 0.6), "temperature": _t(0.3)},
        learnable=_PROBS,
        prior=lambda: pr.GenGSGeometric(0.3, 25, probs=torch.tensor(0.5, dtype=_f64)),
        kl_partners=(lambda: dist.Geometric(torch.tensor(0.5, dtype=_f64)),),
        reference_probs=lambda p, d: _truncated_pmf(dist.Geometric(p["probs"]), 25),
        **_GENGS,
    ),
    Example(
        "GenGSNegativeBinomial",
        lambda total_count, probs, temperature, **kw: pr.GenGSNegativeBinomial(
            total_count, temperature, 30, probs=probs, **kw
        ),
        {"total_count": _t(3.0), "probs": _t(0.3, 0.5), "temperature": _t(0.4)},
        learnable=_PROBS,
        prior=lambda: pr.GenGSNegativeBinomial(
            torch.tensor(3.0, dtype=_f64), 0.4, 30, probs=torch.tensor(0.5, dtype=_f64)
        ),
        kl_partners=(
            lambda: dist.NegativeBinomial(
                torch.tensor(3.0, dtype=_f64), torch.tensor(0.5, dtype=_f64)
            ),
        ),
        reference_probs=lambda p, d: _truncated_pmf(
            dist.NegativeBinomial(p["total_count"], p["probs"]), 30
        ),
        **_GENGS,
    ),
    Example(
        "GenGSBinomial",
        lambda probs, temperature, **kw: pr.GenGSBinomial(10, temperature, probs=probs, **kw),
        {"probs": _t(0.2, 0.5, 0.9), "temperature": _t(0.3)},
        learnable=_PROBS,
        prior=lambda: pr.GenGSBinomial(10, 0.3, probs=torch.tensor(0.5, dtype=_f64)),
        kl_partners=(lambda: dist.Binomial(10, torch.tensor(0.5, dtype=_f64)),),
        static_shapes=False,
        reference_probs=lambda p, d: _truncated_pmf(dist.Binomial(10, p["probs"]), largest=10),
        **_GENGS,
    ),
    Example(
        "GenGSMultinomial",
        lambda probs, temperature, **kw: pr.GenGSMultinomial(3, temperature, probs=probs, **kw),
        {"probs": _t([0.2, 0.3, 0.5], [0.6, 0.2, 0.2]), "temperature": _t(0.3)},
        learnable=_SIMPLEX,
        prior=lambda: pr.GenGSMultinomial(3, 0.3, probs=torch.full((3,), 1 / 3, dtype=_f64)),
        kl_partners=(
            lambda: pr.GenGSMultinomial(3, 1.0, probs=_t(0.5, 0.25, 0.25)),
            lambda: dist.Multinomial(3, _t(0.5, 0.25, 0.25)),
        ),
        reference_probs=_multinomial,
        **_GENGS,
    ),
]

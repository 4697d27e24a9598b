"""Registry examples of the GST family."""

import pyro.distributions as dist
import torch
from example import Example
from torch.distributions import constraints

import pyro_relax as pr

__all__ = ["GST_EXAMPLES"]

_f64 = torch.float64
_f32 = torch.float32


def _one_hot(d, index):
    classes = torch.arange(d.event_shape[-1], device=index.device)
    return (index.unsqueeze(-1) == classes).to(d.probs.dtype)


def _class_probs(params, d):
    # The categorical the parameters name, by torch's softmax or normalization.
    if "logits" in params:
        probs = torch.softmax(params["logits"], -1)
    else:
        probs = params["probs"] / params["probs"].sum(-1, keepdim=True)
    return probs.expand(d.batch_shape + probs.shape[-1:])


def _bernoulli_probs(params, d):
    one = params["logits"].sigmoid() if "logits" in params else params["probs"]
    return torch.stack([1 - one, one], -1).expand(d.batch_shape + (2,))


# One-hot values: the category is the position of the 1 (for soft GST and GR-MCK values, the
# largest coordinate, which is the sampled category by consistency). Every example built with
# these two is a straight-through estimator (soft GST included: its perturbations are
# detached), so its gradient is a surrogate's; the soft STGS examples (pathwise Gumbel-Softmax)
# do without them.
_ONE_HOT = dict(
    categories=lambda d, value: value.argmax(-1),
    category_probs=lambda d: d.probs,
    reference_probs=_class_probs,
    values_of=_one_hot,
    surrogate_gradient=True,
)
_BINARY = dict(
    categories=lambda d, value: value.long(),
    category_probs=lambda d: torch.stack([1 - d.probs, d.probs], -1),
    reference_probs=_bernoulli_probs,
    values_of=lambda d, index: index.to(d.probs.dtype),
    surrogate_gradient=True,
)
_LOGITS = {"logits": constraints.real}
_SIMPLEX = {"probs": constraints.simplex}


def _t(*values, dtype=_f64):
    return torch.tensor(values, dtype=dtype)


def _uniform(cls, num_classes, dtype=_f64, temperature=1.0, **kwargs):
    # A uniform prior of the same kind: it scores soft values too, and the categorical KL
    # from any straight-through categorical to it is registered (OneHotCategorical's).
    return lambda: cls(temperature, logits=torch.zeros(num_classes, dtype=dtype), **kwargs)


def _onehot_uniform(num_classes, dtype=_f64):
    return lambda: dist.OneHotCategorical(logits=torch.zeros(num_classes, dtype=dtype))


def _bernoulli_half(dtype=_f64):
    return lambda: dist.Bernoulli(torch.tensor(0.5, dtype=dtype))


_BATCHED_LOGITS = torch.linspace(-2.0, 2.0, 15, dtype=_f64).reshape(3, 5).cos() * 2

GST_EXAMPLES = [
    Example(
        "GappedSTCategorical",
        lambda logits, temperature, **kw: pr.GappedSTCategorical(temperature, logits=logits, **kw),
        {"logits": _t(0.5, -1.0, 0.0, 1.0), "temperature": _t(1.0)},
        learnable=_LOGITS,
        prior=_uniform(pr.GappedSTCategorical, 4),
        kl_partners=(_uniform(pr.GappedSTCategorical, 4), _onehot_uniform(4)),
        **_ONE_HOT,
    ),
    Example(
        "GappedSTCategorical-batched",
        lambda logits, temperature, **kw: pr.GappedSTCategorical(temperature, logits=logits, **kw),
        {"logits": _BATCHED_LOGITS, "temperature": _t(0.3, 0.5, 1.0)},
        learnable=_LOGITS,
        # A plain OneHotCategorical prior scores the exact one-hot values.
        prior=_onehot_uniform(5),
        kl_partners=(_onehot_uniform(5),),
        **_ONE_HOT,
    ),
    Example(
        "GappedSTCategorical-probs",
        lambda probs, temperature, **kw: pr.GappedSTCategorical(temperature, probs=probs, **kw),
        {"probs": _t([0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]), "temperature": _t(0.5)},
        learnable=_SIMPLEX,
        prior=_uniform(pr.GappedSTCategorical, 4),
        kl_partners=(_onehot_uniform(4),),
        **_ONE_HOT,
    ),
    Example(
        "GappedSTCategorical-broadcast",
        lambda logits, temperature, **kw: pr.GappedSTCategorical(temperature, logits=logits, **kw),
        {"logits": _BATCHED_LOGITS[:, :4], "temperature": _t([0.2], [1.0])},
        learnable=_LOGITS,
        prior=_uniform(pr.GappedSTCategorical, 4),
        kl_partners=(_onehot_uniform(4),),
        **_ONE_HOT,
    ),
    Example(
        # The hardest setting DESIGN asks for: float32, temperature 0.01, validation on.
        "GappedSTCategorical-float32-cold",
        lambda logits, temperature, **kw: pr.GappedSTCategorical(temperature, logits=logits, **kw),
        {
            "logits": torch.linspace(-3.0, 3.0, 30, dtype=_f32).reshape(3, 10).sin() * 3,
            "temperature": _t(0.01, dtype=_f32),
        },
        learnable=_LOGITS,
        prior=_uniform(pr.GappedSTCategorical, 10, _f32, temperature=0.01),
        kl_partners=(_onehot_uniform(10, _f32),),
        **_ONE_HOT,
    ),
    Example(
        "GappedSTCategorical-expected-gap",
        lambda logits, temperature, **kw: pr.GappedSTCategorical(
            temperature, logits=logits, gap="expected", **kw
        ),
        {"logits": _BATCHED_LOGITS, "temperature": _t(0.5)},
        learnable=_LOGITS,
        prior=_uniform(pr.GappedSTCategorical, 5, gap="expected"),
        kl_partners=(_onehot_uniform(5),),
        **_ONE_HOT,
    ),
    Example(
        # Soft values are the surrogate itself; by consistency their argmax is the category.
        "GappedSTCategorical-soft",
        lambda logits, temperature, **kw: pr.GappedSTCategorical(
            temperature, logits=logits, hard=False, **kw
        ),
        {"logits": _BATCHED_LOGITS, "temperature": _t(0.5)},
        learnable=_LOGITS,
        prior=_uniform(pr.GappedSTCategorical, 5, hard=False),
        kl_partners=(_uniform(pr.GappedSTCategorical, 5, hard=False), _onehot_uniform(5)),
        **_ONE_HOT,
    ),
    Example(
        # The paper's ablations: no gap, perturbations not detached.
        "GappedSTCategorical-ablation",
        lambda logits, temperature, **kw: pr.GappedSTCategorical(
            temperature, logits=logits, gap=0.0, detach_perturbations=False, **kw
        ),
        {"logits": _BATCHED_LOGITS, "temperature": _t(1.0)},
        learnable=_LOGITS,
        prior=_uniform(pr.GappedSTCategorical, 5),
        kl_partners=(_onehot_uniform(5),),
        **_ONE_HOT,
    ),
    Example(
        "STCategorical",
        lambda logits, temperature, **kw: pr.STCategorical(temperature, logits=logits, **kw),
        {"logits": _BATCHED_LOGITS, "temperature": _t(1.0)},
        learnable=_LOGITS,
        prior=_uniform(pr.STCategorical, 5),
        kl_partners=(_onehot_uniform(5),),
        **_ONE_HOT,
    ),
    Example(
        "STGSCategorical",
        lambda logits, temperature, **kw: pr.STGSCategorical(temperature, logits=logits, **kw),
        {"logits": _BATCHED_LOGITS, "temperature": _t(0.5)},
        learnable=_LOGITS,
        prior=_uniform(pr.STGSCategorical, 5),
        kl_partners=(_onehot_uniform(5),),
        **_ONE_HOT,
    ),
    Example(
        # Soft Gumbel-Softmax values, scored by their Concrete density: a Concrete prior, and
        # the one-hot categorical tests do not apply (a vertex has no Concrete density).
        "STGSCategorical-soft",
        lambda logits, temperature, **kw: pr.STGSCategorical(
            temperature, logits=logits, hard=False, **kw
        ),
        {"logits": _BATCHED_LOGITS, "temperature": _t(0.5, 1.0, 2.0)},
        learnable=_LOGITS,
        prior=_uniform(pr.STGSCategorical, 5, temperature=0.5, hard=False),
        kl_partners=(_onehot_uniform(5),),
    ),
    Example(
        "STGSCategorical-soft-float32-cold",
        lambda logits, temperature, **kw: pr.STGSCategorical(
            temperature, logits=logits, hard=False, **kw
        ),
        {
            "logits": torch.linspace(-3.0, 3.0, 30, dtype=_f32).reshape(3, 10).sin() * 3,
            "temperature": _t(0.01, dtype=_f32),
        },
        learnable=_LOGITS,
        prior=_uniform(pr.STGSCategorical, 10, _f32, temperature=0.01, hard=False),
        kl_partners=(_onehot_uniform(10, _f32),),
    ),
    Example(
        "GRMCKCategorical",
        lambda logits, temperature, **kw: pr.GRMCKCategorical(
            temperature, logits=logits, num_draws=4, **kw
        ),
        {"logits": _BATCHED_LOGITS, "temperature": _t(0.5)},
        learnable=_LOGITS,
        prior=_uniform(pr.GRMCKCategorical, 5, num_draws=4),
        kl_partners=(_onehot_uniform(5),),
        **_ONE_HOT,
    ),
    Example(
        "GRMCKCategorical-float32-cold",
        lambda logits, temperature, **kw: pr.GRMCKCategorical(
            temperature, logits=logits, num_draws=3, **kw
        ),
        {
            "logits": torch.linspace(-3.0, 3.0, 30, dtype=_f32).reshape(3, 10).sin() * 3,
            "temperature": _t(0.01, dtype=_f32),
        },
        learnable=_LOGITS,
        prior=_onehot_uniform(10, _f32),
        kl_partners=(_onehot_uniform(10, _f32),),
        **_ONE_HOT,
    ),
    Example(
        # The wrapper around a Categorical: torch's Categorical honours validate_args.
        "GappedST-of-Categorical",
        lambda logits, temperature, **kw: pr.GappedST(
            dist.Categorical(logits=logits, validate_args=kw.get("validate_args")),
            temperature,
            gap=1.0,
            **kw,
        ),
        {"logits": _BATCHED_LOGITS, "temperature": _t(0.5)},
        learnable=_LOGITS,
        prior=_onehot_uniform(5),
        kl_partners=(_onehot_uniform(5),),
        **_ONE_HOT,
        through={"logits": "base_dist"},
    ),
    Example(
        "GappedST-of-OneHotCategorical",
        lambda probs, temperature, **kw: pr.GappedST(
            dist.OneHotCategorical(probs=probs, validate_args=kw.get("validate_args")),
            temperature,
            gap="expected",
            **kw,
        ),
        {"probs": _t([0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]), "temperature": _t(0.5)},
        learnable=_SIMPLEX,
        prior=_onehot_uniform(4),
        kl_partners=(_onehot_uniform(4),),
        # torch's OneHotCategorical validates its inner Categorical on the host at every build
        # while validation is on globally (the tests' setting), whatever validate_args says.
        static_shapes=False,
        **_ONE_HOT,
        through={"probs": "base_dist"},
    ),
    Example(
        "GappedSTBernoulli",
        lambda logits, temperature, **kw: pr.GappedSTBernoulli(temperature, logits=logits, **kw),
        {"logits": _t(-2.0, 0.0, 0.5, 3.0), "temperature": _t(0.5)},
        learnable={"logits": constraints.real},
        prior=_bernoulli_half(),
        kl_partners=(_bernoulli_half(),),
        **_BINARY,
    ),
    Example(
        "GappedSTBernoulli-probs-expected-gap",
        lambda probs, temperature, **kw: pr.GappedSTBernoulli(
            temperature, probs=probs, gap="expected", **kw
        ),
        {"probs": _t([0.1, 0.5], [0.9, 0.3]), "temperature": _t([0.5], [1.0])},
        learnable={"probs": constraints.unit_interval},
        prior=_uniform(pr.GappedSTBernoulli, ()),
        kl_partners=(_bernoulli_half(),),
        **_BINARY,
    ),
    Example(
        "STBernoulli",
        lambda logits, temperature, **kw: pr.STBernoulli(temperature, logits=logits, **kw),
        {"logits": _t(-1.0, 0.0, 2.0), "temperature": _t(1.0)},
        learnable={"logits": constraints.real},
        prior=_bernoulli_half(),
        kl_partners=(_bernoulli_half(),),
        **_BINARY,
    ),
    Example(
        "STGSBernoulli",
        lambda logits, temperature, **kw: pr.STGSBernoulli(temperature, logits=logits, **kw),
        {"logits": _t(-1.0, 0.0, 2.0), "temperature": _t(0.5)},
        learnable={"logits": constraints.real},
        prior=_bernoulli_half(),
        kl_partners=(_bernoulli_half(),),
        **_BINARY,
    ),
    Example(
        "STGSBernoulli-soft-float32-cold",
        lambda logits, temperature, **kw: pr.STGSBernoulli(
            temperature, logits=logits, hard=False, **kw
        ),
        {"logits": _t(-1.0, 0.0, 2.0, dtype=_f32), "temperature": _t(0.01, dtype=_f32)},
        learnable={"logits": constraints.real},
        prior=lambda: pr.STGSBernoulli(0.01, logits=torch.tensor(0.0), hard=False),
        kl_partners=(_bernoulli_half(_f32),),
    ),
    Example(
        "GRMCKBernoulli",
        lambda logits, temperature, **kw: pr.GRMCKBernoulli(
            temperature, logits=logits, num_draws=4, **kw
        ),
        {"logits": _t(-1.0, 0.0, 2.0), "temperature": _t(0.5)},
        learnable={"logits": constraints.real},
        prior=_bernoulli_half(),
        kl_partners=(_bernoulli_half(),),
        **_BINARY,
    ),
]

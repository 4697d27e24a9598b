"""torch.compile over the library's distributions: every example that reads nothing on the host
(``static_shapes``) is traced by TorchDynamo into one graph, and a compiled step computes what
the eager one does."""

import pyro
import pytest
import torch
import torch._dynamo
from registry import EXAMPLES

static = [e for e in EXAMPLES if e.static_shapes]

# TorchDynamo's own warnings while it traces (torch 2.13): it instantiates autograd Functions
# itself, and says that it traces through functools.lru_cache (the multinomial outcome table,
# which the library builds without side effects under torch.compile).
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`"),
]


def _step(example):
    """Builds the distribution, draws (reparameterized where it can) and scores the draw."""

    def step(**params):
        d = example.factory(**params)
        z = d.rsample() if d.has_rsample else d.sample()
        return z, d.log_prob(z).sum()

    return step


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with pyro.validation_enabled(False):  # validation reads the host by design
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("example", static, ids=lambda e: e.id)
def test_one_graph_without_breaks(example):
    explanation = torch._dynamo.explain(_step(example))(**example.parameters())
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    "example",
    [e for e in static if e.id in ("GenGSPoisson", "GenGSMultinomial", "IGR", "IGRStickBreaking",
                                   "GappedSTCategorical", "STGSCategorical-soft")],
    ids=lambda e: e.id,
)  # fmt: skip
def test_a_compiled_step_equals_the_eager_one(example):
    # aot_eager: the graph torch.compile captures, run by eager kernels, so the draws come from
    # the same generator in the same order; values and gradients agree to rounding.
    def run(step):
        params = example.parameters(requires_grad=True)
        torch.manual_seed(3)
        z, log_prob = step(**params)
        weights = torch.linspace(-1.0, 1.0, z.numel(), dtype=z.dtype).reshape(z.shape)
        loss = (z * weights).sum() + log_prob
        learnable = [params[name] for name in example.learnable]
        grads = torch.autograd.grad(loss, learnable, allow_unused=True) if learnable else ()
        return z.detach(), log_prob.detach(), grads

    eager = run(_step(example))
    compiled = run(torch.compile(_step(example), backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    assert len(compiled[2]) == len(eager[2])
    for a, b in zip(compiled[2], eager[2], strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b)

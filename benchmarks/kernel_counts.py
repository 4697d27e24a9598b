"""Operator counts: how many aten operators one rsample (+ log_prob) + backward dispatches.

At small sizes a GPU step is bound by kernel launches, not arithmetic, so the number of
operators a call dispatches is what the GPU pays there; counting them needs no GPU. Each case
builds its distribution, samples, and backpropagates a fixed linear function of the sample, as a
training step does, once under torch's profiler on the CPU. The count is of the innermost aten
operators of each call tree that compute something: views, reshapes, allocations and
conversions (``aten::view``, ``aten::expand``, ``aten::empty``, ``aten::to`` ...) launch no
kernel and are left out, and an operator counts where none of those it calls computes
(``clamp_`` with a Python bound calls only ``to``). Cases:

- GenGS: ``GenGSPoisson(rate, 0.5, n)`` from a rate (its truncated Poisson log-PMF included);
- torch: ``RelaxedOneHotCategorical(0.5, logits=...)`` from logits, and
  ``F.gumbel_softmax(logits, 0.5)`` followed by the map onto the counts (``w @ counts``);
- IGR: ``IGR(loc, scale, 0.5)`` rsample + log_prob, against torch's relaxed categorical's
  rsample + log_prob.

With ``--compiled`` each step is also compiled by ``torch.compile`` and its kernels counted:
those TorchInductor generates (on the CPU, C++ loops; on a GPU, Triton kernels, fused alike)
plus the operators the compiled step still dispatches. That is what a GPU launches per step
once the hot path is compiled.

    python benchmarks/kernel_counts.py [--batch 100 50] [--outcomes 15 50] [--compiled]
"""

import argparse
import collections

import torch
import torch._inductor.metrics as metrics
import torch.nn.functional as F
from bench_gengs import machine
from torch.distributions import RelaxedOneHotCategorical
from torch.profiler import ProfilerActivity, profile

from pyro_relax import IGR, GenGSPoisson
from pyro_relax._cli import integer_at_least, positive_int

TEMPERATURE = 0.5
# Operators that only describe memory (views, shapes, allocation) or whose work is that of the
# operators they call (`to`, `_to_copy` and `contiguous` convert through `copy_`, counted where
# it copies a tensor): no kernel of their own on a GPU.
_NO_KERNEL = {
    "aten::alias",
    "aten::as_strided",
    "aten::as_strided_",
    "aten::broadcast_tensors",
    "aten::chunk",
    "aten::contiguous",
    "aten::detach",
    "aten::diagonal",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_permuted",
    "aten::empty_strided",
    "aten::expand",
    "aten::expand_as",
    "aten::flatten",
    "aten::lift_fresh",
    "aten::mT",
    "aten::movedim",
    "aten::narrow",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::permute",
    "aten::real",
    "aten::reshape",
    "aten::resize_",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::result_type",
    "aten::scalar_tensor",
    "aten::select",
    "aten::set_",
    "aten::slice",
    "aten::split",
    "aten::split_with_sizes",
    "aten::squeeze",
    "aten::squeeze_",
    "aten::sum_to_size",
    "aten::t",
    "aten::to",
    "aten::transpose",
    "aten::unbind",
    "aten::unflatten",
    "aten::unfold",
    "aten::unsqueeze",
    "aten::unsqueeze_",
    "aten::view",
    "aten::view_as",
    "aten::_reshape_alias",
    "aten::_to_copy",
    "aten::_unsafe_view",
}


def _computes(event) -> bool:
    """Whether ``event`` is an aten operator that launches a kernel of its own when none of the
    operators it calls does."""
    if not event.name.startswith("aten::") or event.name in _NO_KERNEL:
        return False
    # A Python number's conversion to the operand's dtype (``x > 1``, ``x + 0.5``): 0-dimensional
    # host scalars, which a GPU kernel takes as an argument.
    return not (event.name == "aten::copy_" and not any(event.input_shapes[:2]))


def _kernels(event, counts: collections.Counter) -> int:
    """Counts in ``counts`` the kernels of ``event``'s call tree: those of the operators it
    calls, or, where none of them computes (a conversion of a Python scalar, a view), the
    operator itself. Returns how many it counted."""
    inner = sum(_kernels(child, counts) for child in event.cpu_children)
    if inner or not _computes(event):
        return inner
    counts[event.name] += 1
    return 1


def kernel_operators(work) -> collections.Counter:
    """The aten operators that ``work()`` dispatches and that launch a kernel: the innermost
    computing operator of each call (``clamp_`` counts although it calls ``to`` on its
    Python bound; ``clone`` counts as its ``copy_``)."""
    work()  # warm-up: lazy initialization is not part of a training step
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        work()
    counts = collections.Counter()
    for event in prof.events():
        if event.cpu_parent is None:
            _kernels(event, counts)
    return counts


def cases(batch, outcomes):
    """The name and the loss of each case, for one number of outcomes: a training step is
    ``loss().backward()``."""
    rate = torch.full(batch, 3.0, requires_grad=True)
    logits = torch.randn(*batch, outcomes, requires_grad=True)
    counts = torch.arange(outcomes, dtype=torch.float32)
    loc = torch.randn(*batch, outcomes - 1, requires_grad=True)
    scale = torch.ones(*batch, outcomes - 1, requires_grad=True)
    downstream = torch.randn(batch)
    downstream_simplex = torch.randn(*batch, outcomes)
    tau = torch.tensor(TEMPERATURE)  # torch's log_prob needs a tensor temperature

    def gengs():
        z = GenGSPoisson(rate, TEMPERATURE, outcomes, validate_args=False).rsample()
        return (z * downstream).sum()

    def torch_relaxed():
        w = RelaxedOneHotCategorical(tau, logits=logits, validate_args=False).rsample()
        return ((w @ counts) * downstream).sum()

    def gumbel_softmax():
        w = F.gumbel_softmax(logits, TEMPERATURE)
        return ((w @ counts) * downstream).sum()

    def igr():
        d = IGR(loc, scale, TEMPERATURE, validate_args=False)
        z = d.rsample()
        return (z * downstream_simplex).sum() + d.log_prob(z).sum()

    def torch_relaxed_log_prob():
        d = RelaxedOneHotCategorical(tau, logits=logits, validate_args=False)
        z = d.rsample()
        return (z * downstream_simplex).sum() + d.log_prob(z).sum()

    return {
        "GenGSPoisson rsample+backward": gengs,
        "torch RelaxedOneHotCategorical rsample+backward": torch_relaxed,
        "F.gumbel_softmax + map, backward": gumbel_softmax,
        "IGR rsample+log_prob+backward": igr,
        "torch RelaxedOneHotCategorical rsample+log_prob+backward": torch_relaxed_log_prob,
    }


def step_count(loss) -> int:
    """Operators one eager step ``loss().backward()`` dispatches."""
    return sum(kernel_operators(lambda: loss().backward()).values())


def compiled_step_count(loss) -> int:
    """Kernels one step runs with ``loss`` compiled by ``torch.compile`` (TorchInductor; the
    backward is compiled with it): the kernels Inductor generates for the forward and backward
    graphs, each run once a step, plus the aten operators the compiled step still dispatches
    (the seeds of its random numbers, the gradient's seed and accumulation). ``fullgraph``: a
    graph break would leave operators uncounted, so it fails instead."""
    torch._dynamo.reset()
    metrics.reset()
    compiled = torch.compile(loss, fullgraph=True)
    compiled().backward()
    return metrics.generated_kernel_count + step_count(compiled)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[100, 50])
    parser.add_argument("--outcomes", type=integer_at_least(2), nargs="+", default=[15, 50])
    parser.add_argument(
        "--top", type=integer_at_least(0), default=0, help="also list each case's top operators"
    )
    parser.add_argument(
        "--compiled", action="store_true", help="also count kernels under torch.compile"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(machine(torch.device("cpu")))
    print(
        f"batch {tuple(args.batch)}, temperature {TEMPERATURE}; innermost computing aten "
        "operators per call"
    )
    columns = [f"n = {n:>3}" for n in args.outcomes]
    if args.compiled:
        columns += [f"compiled, n = {n:>3}" for n in args.outcomes]
    print(f"| {'case':<56} | " + " | ".join(columns) + " |")
    print(f"|{'-' * 58}|" + "|".join("-" * (len(c) + 1) + ":" for c in columns) + "|")
    by_n = {n: cases(tuple(args.batch), n) for n in args.outcomes}
    names = list(by_n[args.outcomes[0]])
    # Every eager count before the first compilation, which leaves torch's state changed (the
    # eager counts of torch's relaxed categorical drop by four after it).
    counters = [step_count] + ([compiled_step_count] if args.compiled else [])
    counts = {name: [] for name in names}
    for count in counters:
        for name in names:
            counts[name] += [count(by_n[n][name]) for n in args.outcomes]
    for name in names:
        cells = " | ".join(f"{k:>{len(c)}}" for k, c in zip(counts[name], columns, strict=True))
        print(f"| {name:<56} | {cells} |")
    if args.top:
        for name, loss in by_n[args.outcomes[0]].items():
            counts = kernel_operators(lambda loss=loss: loss().backward())
            common = ", ".join(f"{op[6:]} {k}" for op, k in counts.most_common(args.top))
            print(f"{name} (n = {args.outcomes[0]}): {common}")


if __name__ == "__main__":
    main()

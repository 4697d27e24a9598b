"""Benchmark: IGR against torch's RelaxedOneHotCategorical, rsample + log_prob + backward.

Both sides relax a categorical over the same number K of categories for a batch of 100 x 20
latents: each step builds the distribution, draws a reparameterized sample, scores it with
``log_prob`` and backpropagates ``value.sum() + log_prob.sum()`` to the parameters (IGR:
``loc`` and ``scale`` of shape ``(100, 20, K - 1)``; torch: ``logits`` of shape
``(100, 20, K)``). The two measurements alternate within each repetition and the median is
reported, with the ratio IGR / torch (target, benchmarks/README.md: at most 1.1).

Where the package ``relaxit`` is installed (``pip install --no-deps relaxit``; it is not a
dependency of this project), a second table compares IGR with its ``InvertibleGaussian`` on the
same ``loc`` and ``scale``, for ``rsample`` + backward and ``rsample`` + ``log_prob`` +
backward, each with validation off and on (Pyro's default: both sides check their parameters,
relaxit its value in ``log_prob``). That class computes softmax++ as ``exp(y / tau)`` over its
sum plus ``delta`` (which overflows for ``y / tau`` above about 88 in float32) and its density
without the last coordinate's term; IGR computes in log space and carries ``log z`` for its
density. A last row times the one reduction IGR's map makes that relaxit's leaves out, the row
maximum of the ``(100, 20, K)`` logits, against relaxit's rsample + backward. The rows before
it take IGR's Python away: IGR's operators alone (the Gaussian draw and softmax++, no
distribution object), then the same arithmetic as one autograd node (no Python between the
operators, one node in the graph), which bounds what fusing them could gain; then the least a
stable softmax++ computes (shifted by the row maximum, plain autograd, without ``log z`` and
without the library's sum-to-one and top-gradient accuracy), which measures what those
guarantees cost. Target (benchmarks/README.md): IGR / relaxit at most 1.0.

With validation on, a side whose own check refuses a sample (torch's simplex check, relaxit's
value check in ``log_prob``) gets "failed validation" and the check's message in place of a
time; any other error stops the script.

    python benchmarks/bench_igr.py [--repeats 30] [--number 20] [--device cpu|cuda]
"""

import argparse
import statistics
import warnings

import pyro
import torch
from bench_gengs import add_clock_option, add_timing_options, machine, use_clock
from bench_gengs import alternate as alternate_times
from torch.distributions import RelaxedOneHotCategorical

from pyro_relax import IGR
from pyro_relax.transforms import SoftmaxPlusPlusTransform
from pyro_relax.transforms.softmax_plus_plus import _SimplexAndLog

BATCH = (100, 20)
CATEGORIES = (10, 50)
TEMPERATURE = 0.5
# How the checks that validate_args turns on begin their refusals: torch's of a parameter and of
# a value, relaxit's of a value in its log_prob.
VALIDATION_MESSAGES = ("Expected parameter ", "Expected value argument ", "Sample value must be ")


def _failed_validation(error: ValueError, validate_args: bool) -> bool:
    """Whether ``error`` is a validation check's refusal (possible only with validation on)."""
    return validate_args and str(error).startswith(VALIDATION_MESSAGES)


def _inputs(num_categories: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    shape = BATCH + (num_categories - 1,)
    loc = torch.randn(shape, generator=generator).to(device).requires_grad_()
    scale = (0.5 + torch.rand(shape, generator=generator)).to(device).requires_grad_()
    logits = torch.randn(BATCH + (num_categories,), generator=generator)
    temperature = torch.tensor(TEMPERATURE, device=device)
    return loc, scale, logits.to(device).requires_grad_(), temperature


def igr_step(loc, scale, temperature, validate_args):
    d = IGR(loc, scale, temperature, validate_args=validate_args)
    value = d.rsample()
    (value.sum() + d.log_prob(value).sum()).backward()


def torch_step(logits, temperature, validate_args):
    d = RelaxedOneHotCategorical(temperature, logits=logits, validate_args=validate_args)
    value = d.rsample()
    (value.sum() + d.log_prob(value).sum()).backward()


def sample_step(build, with_log_prob):
    """Builds a distribution with ``build()``, samples, optionally scores, backpropagates."""
    d = build()
    value = d.rsample()
    loss = value.sum()
    if with_log_prob:
        loss = loss + d.log_prob(value).sum()
    loss.backward()


def alternate(steps, device, repeats, number):
    """Median ms per call of each of the ``steps``, measured in turns."""
    return [statistics.median(times) for times in alternate_times(steps, device, repeats, number)]


def compare(num_categories, device, repeats, number, validate_args):
    """Median ms per call of (torch, IGR), measured alternately."""
    loc, scale, logits, temperature = _inputs(num_categories, device)

    def run_torch():
        torch_step(logits, temperature, validate_args)
        logits.grad = None

    def run_igr():
        igr_step(loc, scale, temperature, validate_args)
        loc.grad = scale.grad = None

    return alternate((run_torch, run_igr), device, repeats, number)


def _relaxit_step(cls, loc, scale, temperature, with_log_prob=False, validate_args=False):
    """One step of relaxit's class on ``loc`` and ``scale``, gradients cleared after it."""

    def run_relaxit():
        sample_step(lambda: cls(loc, scale, temperature, validate_args), with_log_prob)
        loc.grad = scale.grad = None

    return run_relaxit


def compare_relaxit(cls, num_categories, device, repeats, number, with_log_prob, validate_args):
    """Median ms per call of (relaxit's InvertibleGaussian, IGR), both with ``validate_args``."""
    loc, scale, _, temperature = _inputs(num_categories, device)
    run_relaxit = _relaxit_step(cls, loc, scale, temperature, with_log_prob, validate_args)

    def run_igr():
        sample_step(
            lambda: IGR(loc, scale, temperature, validate_args=validate_args), with_log_prob
        )
        loc.grad = scale.grad = None

    return alternate((run_relaxit, run_igr), device, repeats, number)


def compare_construction(cls, num_categories, device, repeats, number):
    """Median ms per construction of (relaxit's InvertibleGaussian, IGR), validation off."""
    loc, scale, _, temperature = _inputs(num_categories, device)
    return alternate(
        (
            lambda: cls(loc, scale, temperature),
            lambda: IGR(loc, scale, temperature, validate_args=False),
        ),
        device,
        repeats,
        number,
    )


def compare_row_maximum(cls, num_categories, device, repeats, number):
    """Median ms of (relaxit's rsample + backward, softmax++'s row maximum alone): the one
    reduction IGR's map makes that relaxit's leaves out (the shift against overflow, and the
    position of the largest coordinate for the simplex correction and the gradient)."""
    loc, scale, logits, temperature = _inputs(num_categories, device)
    logits = logits.detach()
    run_relaxit = _relaxit_step(cls, loc, scale, temperature)
    return alternate((run_relaxit, lambda: logits.max(-1, keepdim=True)), device, repeats, number)


def compare_bare_operators(cls, num_categories, device, repeats, number):
    """Median ms of (relaxit's rsample + backward, IGR's operators alone): the Gaussian draw and
    softmax++ of a transform built once, without the distribution object, the sample's record
    or any parsing. What is left between this and IGR's own step is Python; what is left
    between this and relaxit is the arithmetic (the row maximum, log z, the simplex
    correction)."""
    loc, scale, _, temperature = _inputs(num_categories, device)
    softmax = SoftmaxPlusPlusTransform(temperature, validate_args=False)
    run_relaxit = _relaxit_step(cls, loc, scale, temperature)

    def run_operators():
        eps = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        z, _ = softmax.simplex_and_log(torch.addcmul(loc, eps, scale))
        z.sum().backward()
        loc.grad = scale.grad = None

    return alternate((run_relaxit, run_operators), device, repeats, number)


class _OneNode(torch.autograd.Function):
    """IGR-I's draw as a single autograd node: the pre-image ``loc + scale * eps``, the
    division by the temperature, the ``log delta`` column and softmax++'s own forward and
    backward (``_SimplexAndLog``'s), with no distribution object, no Python between operators
    and one node in the graph instead of four. A measuring device for the bound on what fusing
    could gain, not a code path of the library (a scalar temperature, gradients for ``loc`` and
    ``scale`` only)."""

    @staticmethod
    def forward(ctx, loc, scale, eps, temperature, log_delta):
        scaled = torch.addcmul(loc, eps, scale).div_(temperature)
        logits = torch.cat([scaled, log_delta.expand(scaled.shape[:-1] + (1,))], -1)
        z, log_z, top = _SimplexAndLog.forward(logits)
        ctx.save_for_backward(z, top, eps, temperature)
        return z, log_z

    @staticmethod
    def backward(ctx, grad_z, grad_log_z):
        z, top, eps, temperature = ctx.saved_tensors
        grad_logits = _SimplexAndLog.backward(_Saved(z, top), grad_z, grad_log_z, None)
        grad_y = grad_logits[..., :-1] / temperature
        return grad_y, grad_y * eps, None, None, None


class _Saved:
    """What ``_SimplexAndLog.backward`` reads of its context."""

    def __init__(self, *saved_tensors):
        self.saved_tensors = saved_tensors


def compare_one_node(cls, num_categories, device, repeats, number):
    """Median ms of (relaxit's rsample + backward, IGR's arithmetic as one autograd node)."""
    loc, scale, _, temperature = _inputs(num_categories, device)
    log_delta = torch.zeros(1, device=device)
    run_relaxit = _relaxit_step(cls, loc, scale, temperature)

    def run_one_node():
        eps = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        z, _ = _OneNode.apply(loc, scale, eps, temperature, log_delta)
        z.sum().backward()
        loc.grad = scale.grad = None

    return alternate((run_relaxit, run_one_node), device, repeats, number)


def _without_correction(loc, scale, eps, temperature, log_delta):
    """softmax++ of the pre-image ``loc + scale * eps`` as the least a stable map computes:
    shifted by the row maximum (taken without a gradient: the map does not depend on it), plain
    autograd, no ``log z`` and none of the library's two accuracy guarantees (the top
    coordinate recomputed as one minus the others, so that float32 samples pass torch's simplex
    check for any K; its gradient accurate where it rounds to 1). A measuring device for what
    those cost, not a code path of the library."""
    scaled = torch.addcmul(loc, eps, scale) / temperature
    with torch.no_grad():
        shift = scaled.amax(-1, keepdim=True).clamp(min=log_delta)
    weights = (scaled - shift).exp()
    last = (log_delta - shift).exp()
    return torch.cat([weights, last], -1) / (weights.sum(-1, keepdim=True) + last)


def compare_without_correction(cls, num_categories, device, repeats, number):
    """Median ms of (relaxit's rsample + backward, the stable map without the library's
    accuracy guarantees)."""
    loc, scale, _, temperature = _inputs(num_categories, device)
    log_delta = torch.zeros((), device=device)
    run_relaxit = _relaxit_step(cls, loc, scale, temperature)

    def run_stable():
        eps = torch.randn(loc.shape, dtype=loc.dtype, device=loc.device)
        _without_correction(loc, scale, eps, temperature, log_delta).sum().backward()
        loc.grad = scale.grad = None

    return alternate((run_relaxit, run_stable), device, repeats, number)


def relaxit_table(cls, device, repeats, number) -> str:
    lines = [f"{'K':>4}  {'step':<40}  {'relaxit ms':>10}  {'IGR ms':>9}  {'IGR/relaxit':>11}"]
    for k in CATEGORIES:
        theirs, ours = compare_construction(cls, k, device, repeats, number)
        step = "construction only"
        lines.append(f"{k:>4}  {step:<40}  {theirs:>10.3f}  {ours:>9.3f}  {ours / theirs:>11.2f}")
    # Both sides check their parameters (and relaxit its value in log_prob) with validation on,
    # Pyro's default.
    for validate_args in (False, True):
        for with_log_prob in (False, True):
            step = "rsample + log_prob + backward" if with_log_prob else "rsample + backward"
            step += ", validated" if validate_args else ""
            for k in CATEGORIES:
                try:
                    theirs, ours = compare_relaxit(
                        cls, k, device, repeats, number, with_log_prob, validate_args
                    )
                except ValueError as error:
                    # relaxit's log_prob refuses its own samples where the last coordinate,
                    # one minus the others, rounds below zero: a finding, not a crash.
                    if not _failed_validation(error, validate_args):
                        raise
                    message = str(error).splitlines()[0]
                    lines.append(f"{k:>4}  {step:<40}  failed validation: {message}")
                    continue
                lines.append(
                    f"{k:>4}  {step:<40}  {theirs:>10.3f}  {ours:>9.3f}  {ours / theirs:>11.2f}"
                )
    for step, compare_side in (
        ("IGR's operators alone", compare_bare_operators),
        ("IGR's arithmetic, one node", compare_one_node),
        ("stable, no accuracy fixes", compare_without_correction),
        ("row maximum alone (IGR side)", compare_row_maximum),
    ):
        for k in CATEGORIES:
            theirs, ours = compare_side(cls, k, device, repeats, number)
            lines.append(
                f"{k:>4}  {step:<40}  {theirs:>10.3f}  {ours:>9.3f}  {ours / theirs:>11.2f}"
            )
    return "\n".join(lines)


def table(device, repeats, number, validate_args) -> str:
    lines = [f"{'K':>4}  {'torch ms':>9}  {'IGR ms':>9}  {'IGR/torch':>9}"]
    for k in CATEGORIES:
        try:
            torch_ms, igr_ms = compare(k, device, repeats, number, validate_args)
        except ValueError as error:
            # torch's relaxed categorical can fail the simplex check on its own float32 samples
            # (their sum is off by more than 1e-6): a finding, not a crash.
            if not _failed_validation(error, validate_args):
                raise
            lines.append(f"{k:>4}  failed validation: {str(error).splitlines()[0]}")
            continue
        lines.append(f"{k:>4}  {torch_ms:>9.3f}  {igr_ms:>9.3f}  {igr_ms / torch_ms:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_options(parser)
    add_clock_option(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("error")  # a warning inside a timed loop would distort it
    clock_line = use_clock(args.clock, device)  # its refusal before anything is printed
    print(machine(device))
    print(clock_line)
    print(f"batch {BATCH[0]} x {BATCH[1]} latents, temperature {TEMPERATURE}, ", end="")
    print("rsample + log_prob + backward,")
    print(f"median over {args.repeats} alternating repetitions of {args.number} calls each")
    for validate_args in (False, True):
        print(f"\nvalidate_args={validate_args}")
        print(table(device, args.repeats, args.number, validate_args))
    try:
        import relaxit
        from relaxit.distributions import InvertibleGaussian
    except ImportError:
        print("\nrelaxit is not installed (pip install --no-deps relaxit): no comparison with it")
        return
    print(
        f"\nagainst relaxit {relaxit.__version__} InvertibleGaussian (validation off unless said)"
    )
    with pyro.validation_enabled(False):
        print(relaxit_table(InvertibleGaussian, device, args.repeats, args.number))


if __name__ == "__main__":
    main()

"""Benchmark: GenGSPoisson against torch's RelaxedOneHotCategorical, rsample plus backward.

Both sides relax a categorical over the same number n of outcomes for a batch of 100 x 50
latents, and each call builds its distribution, as a training step does. GenGS also computes
the truncated Poisson log-PMF from the rate; torch starts from logits, given two ways:
standard normal logits (its best case) and the same truncated Poisson log-PMF as GenGS (what a
user relaxing a Poisson would pass it; its long thin tail makes exp return subnormal numbers,
which x86 CPUs compute about 100 times slower). The measurements alternate within each
repetition; the table gives medians over the repetitions and the ratios of GenGS to each.

``--compile`` adds a table of the GenGS step compiled by ``torch.compile`` (TorchInductor, with
``fallback_random`` so that it draws the same noise as eager) against the same step in eager
mode: the first call's seconds (the compilation), the median times, and the largest differences
of the sample z and of the gradient from eager's. ``--no-small`` leaves out the small-size
tables (with ``--sizes`` and no size, ``--compile`` then prints its table alone).

Targets (benchmarks/README.md): GenGS / torch's relaxed categorical at most 1.2, GenGS /
``F.gumbel_softmax`` + map at most 2, peak memory GenGS / ``F.gumbel_softmax`` at most 1.2.

    python benchmarks/bench_gengs.py [--repeats 30] [--device cpu|cuda] [--profile] [--compile]
"""

import argparse
import math
import os
import platform
import statistics
import subprocess
import time
import warnings

import torch
import torch.nn.functional as F
from torch.distributions import Poisson, RelaxedOneHotCategorical

import pyro_relax
from pyro_relax import GenGSPoisson, truncated_log_probs
from pyro_relax._cli import device as device_name
from pyro_relax._cli import positive_int

BATCH = (100, 50)
TRUNCATIONS = (15, 50)
TEMPERATURE = 0.5


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _revision() -> str:
    """The git commit of the library's checkout, if any: that of the ``pyro_relax`` imported,
    which ``PYTHONPATH`` may take from another checkout (a ``git worktree`` of an older
    commit, to compare versions) than the benchmark script's."""
    try:
        command = ["git", "describe", "--always", "--dirty"]
        folder = os.path.dirname(os.path.abspath(pyro_relax.__file__))
        return subprocess.run(command, cwd=folder, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _load() -> str:
    # Other processes on the machine distort timings: say how busy it was.
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def machine(device: torch.device) -> str:
    """A one-paragraph description of where the benchmark ran."""
    lines = [
        f"platform: {platform.platform()}",
        f"cpu: {_cpu_name()}, {os.cpu_count()} logical cpus, load average {_load()}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}",
        f"pyro-relax {pyro_relax.__version__} {_revision()}".rstrip(),
    ]
    if device.type == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name(device)}")
    return "\n".join(lines)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# What the timings read: wall time, or the process's CPU time (``--clock cpu``, CPU devices
# only), which other jobs on a shared machine do not inflate while they hold its cores.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def add_timing_options(parser: argparse.ArgumentParser) -> None:
    """The options of the scripts that time alternating calls: repetitions, calls per
    repetition, device and threads."""
    parser.add_argument("--repeats", type=positive_int, default=30, help="alternating repetitions")
    parser.add_argument(
        "--number", type=positive_int, default=20, help="calls per timed repetition"
    )
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads", type=positive_int, help="torch.set_num_threads (default: torch's)"
    )


def add_clock_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time (default), or the process's CPU time: steadier on a shared machine, "
        "and for a CPU device only (it does not see a GPU working)",
    )


def use_clock(name: str, device: torch.device) -> str:
    """Makes every timing read the clock ``name``; returns the line that says so."""
    global clock
    if name == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu times the CPU only: use the wall clock on a GPU")
    clock = CLOCKS[name]
    return "clock: " + ("the process's CPU time" if name == "cpu" else "wall time")


def _inputs(truncation: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    # Rates whose tail beyond 15 outcomes stays under GenGS's 1% warning tolerance.
    rate = (0.5 + 4.5 * torch.rand(BATCH, generator=generator)).to(device).requires_grad_()
    logits = torch.randn(BATCH + (truncation,), generator=generator).to(device).requires_grad_()
    temperature = torch.tensor(TEMPERATURE, device=device)
    poisson_logits = truncated_log_probs(Poisson(rate.detach()), truncation).requires_grad_()
    return rate, logits, poisson_logits, temperature


def gengs_step(rate, temperature, truncation, validate_args):
    """Builds the GenGS Poisson, draws a relaxed sample and backpropagates to the rate."""
    value = GenGSPoisson(rate, temperature, truncation, validate_args=validate_args).rsample()
    value.sum().backward()


def torch_step(logits, temperature, validate_args):
    """Draws a relaxed one-hot sample from torch's Concrete and backpropagates to the logits."""
    value = RelaxedOneHotCategorical(temperature, logits=logits, validate_args=validate_args)
    value.rsample().sum().backward()


def time_per_call(step, device, number: int) -> float:
    """Milliseconds per call of ``step``, averaged over ``number`` calls."""
    synchronize(device)
    start = clock()
    for _ in range(number):
        step()
    synchronize(device)
    return (clock() - start) / number * 1e3


def compare(truncation, device, repeats, number, validate_args):
    """Lists of ms per call (torch on normal logits, torch on the Poisson PMF, GenGS), one entry
    per repetition, measured in turns."""
    rate, logits, poisson_logits, temperature = _inputs(truncation, device)

    def run_torch():
        torch_step(logits, temperature, validate_args)
        logits.grad = None

    def run_torch_poisson():
        torch_step(poisson_logits, temperature, validate_args)
        poisson_logits.grad = None

    def run_gengs():
        gengs_step(rate, temperature, truncation, validate_args)
        rate.grad = None

    return alternate((run_torch, run_torch_poisson, run_gengs), device, repeats, number)


def alternate(steps, device, repeats: int, number: int) -> list:
    """Ms per call of each of ``steps`` (a list per step, one entry per repetition), measured in
    turns after a warm-up call of each."""
    for step in steps:  # warm-up: allocator, kernels, lazy imports
        time_per_call(step, device, number)
    times = [[] for _ in steps]
    for repeat in range(repeats):
        # Rotate which goes first, so that drifts in the machine's load hit every side.
        for offset in range(len(steps)):
            side = (repeat + offset) % len(steps)
            times[side].append(time_per_call(steps[side], device, number))
    return times


def table(device, repeats, number, validate_args) -> str:
    """The comparison table for each truncation, medians over the repetitions."""
    header = ("n", "torch N(0,1)", "torch PMF", "GenGS", "GenGS/N(0,1)", "GenGS/PMF")
    lines = ["{:>4}  {:>12}  {:>10}  {:>8}  {:>12}  {:>10}".format(*header)]
    for n in TRUNCATIONS:
        medians = [statistics.median(t) for t in compare(n, device, repeats, number, validate_args)]
        normal, pmf, gengs = medians
        lines.append(
            f"{n:>4}  {normal:>9.3f} ms  {pmf:>7.3f} ms  {gengs:>5.3f} ms  "
            f"{gengs / normal:>12.2f}  {gengs / pmf:>10.2f}"
        )
    return "\n".join(lines)


def _map_step(sampler, logits, values):
    """A relaxed one-hot from ``sampler`` mapped to a relaxed count, then backpropagated."""
    (sampler(logits) * values).sum().backward()


def scale_compare(latents, outcomes, device, repeats):
    """Milliseconds per call and peak step memory (MiB) of each side at one size.

    Sides: GenGS (its PMF, relaxation and map to a count); torch's relaxed categorical and
    ``F.gumbel_softmax``, each followed by the same linear map to a count (given standard
    normal logits, their best case); and one device copy of the ``latents x outcomes`` relaxed
    one-hot, the least an unfused pipeline moves.
    """
    generator = torch.Generator().manual_seed(0)
    rate = (0.5 + 4.5 * torch.rand(latents, generator=generator)).to(device).requires_grad_()
    logits = torch.randn(latents, outcomes, generator=generator).to(device).requires_grad_()
    values = torch.arange(outcomes, dtype=logits.dtype, device=device)
    temperature = torch.tensor(TEMPERATURE, device=device)
    one_hot = logits.detach().softmax(-1)

    def relaxed(x):
        return RelaxedOneHotCategorical(temperature, logits=x, validate_args=False).rsample()

    def run_gengs():
        gengs_step(rate, temperature, outcomes, False)
        rate.grad = None

    def run_relaxed():
        _map_step(relaxed, logits, values)
        logits.grad = None

    def run_gumbel():
        _map_step(lambda x: F.gumbel_softmax(x, tau=TEMPERATURE), logits, values)
        logits.grad = None

    def run_copy():
        one_hot.clone()

    steps = (run_gengs, run_relaxed, run_gumbel, run_copy)
    memory = [peak_step_memory(step, device) / 2**20 for step in steps]
    for step in steps:
        time_per_call(step, device, 2)  # warm-up
    times = tuple([] for _ in steps)
    for repeat in range(repeats):
        for offset in range(len(steps)):
            side = (repeat + offset) % len(steps)
            times[side].append(time_per_call(steps[side], device, 1))
    return [statistics.median(t) for t in times], memory


def peak_step_memory(step, device) -> float:
    """Bytes held by tensors at the peak of one ``step()``, above those live before it (on CPU,
    from the profiler's allocation events, as ``bench_gst.cpu_step_peak`` explains)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from bench_gst import cpu_step_peak

    return cpu_step_peak(step)


def scale_table(device, sizes, repeats) -> str:
    """The large-size comparison: ratios of GenGS's time to each side's, and memory ratio."""
    header = ("latents x n", "GenGS", "relaxed", "gumbel", "copy", "/relaxed", "/gumbel")
    header += ("/copy", "MiB GenGS", "MiB gumbel", "mem ratio")
    lines = [
        "{:>14} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>7} {:>10} {:>10} {:>9}".format(*header)
    ]
    for latents, outcomes in sizes:
        (gengs, relaxed, gumbel, copy), memory = scale_compare(latents, outcomes, device, repeats)
        lines.append(
            f"{f'{latents:.0e} x {outcomes}':>14} {gengs:>7.2f} ms {relaxed:>7.2f} ms "
            f"{gumbel:>7.2f} ms {copy:>7.3f} ms {gengs / relaxed:>8.2f} {gengs / gumbel:>8.2f} "
            f"{gengs / copy:>7.1f} {memory[0]:>10.1f} {memory[2]:>10.1f} "
            f"{memory[0] / memory[2]:>9.2f}"
        )
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    """An argparse type: ``LATENTSxOUTCOMES``, at least one latent and two outcomes."""
    try:
        latents, outcomes = text.lower().split("x")
        latents, outcomes = float(latents), int(outcomes)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be LATENTSxOUTCOMES, e.g. 1e4x32, got {text!r}"
        ) from None
    if not (math.isfinite(latents) and latents >= 1 and latents.is_integer() and outcomes >= 2):
        raise argparse.ArgumentTypeError(
            f"needs a whole number of latents of at least 1 and at least 2 outcomes, got {text}"
        )
    return int(latents), outcomes


def profile(truncation, device, number: int) -> str:
    """Profiler tables of both sides (ops sorted by self time) for one truncation."""
    from torch.profiler import ProfilerActivity

    rate, logits, _, temperature = _inputs(truncation, device)
    steps = {
        "torch RelaxedOneHotCategorical": lambda: torch_step(logits, temperature, False),
        "GenGSPoisson": lambda: gengs_step(rate, temperature, truncation, False),
    }
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = []
    for name, step in steps.items():
        time_per_call(step, device, number)  # warm-up
        with torch.profiler.profile(activities=activities) as prof:
            time_per_call(step, device, number)
        table = prof.key_averages().table(sort_by=sort, row_limit=20)
        tables.append(f"{name}, n = {truncation}, {number} calls\n{table}")
    return "\n".join(tables)


def compile_table(device, repeats, number) -> str:
    """The GenGS step (validation off) compiled by torch.compile against eager, per n."""
    import torch._inductor.config

    # Eager's random numbers, so that the values compare; set for this table only.
    with torch._inductor.config.patch(fallback_random=True):
        return _compile_table(device, repeats, number)


def _compile_table(device, repeats, number) -> str:
    lines = [
        f"{'n':>4}  {'compile s':>9}  {'eager ms':>9}  {'compiled ms':>11}  {'compiled/eager':>14}"
        f"  {'max |dz|':>9}  {'max |dgrad|':>11}"
    ]
    for truncation in TRUNCATIONS:
        rate, _, _, temperature = _inputs(truncation, device)
        weights = torch.linspace(-1.0, 1.0, rate.numel(), device=device).reshape(rate.shape)

        def sample_and_loss(rate, truncation=truncation, temperature=temperature, weights=weights):
            value = GenGSPoisson(rate, temperature, truncation, validate_args=False).rsample()
            return value, (value * weights).sum()

        compiled = torch.compile(sample_and_loss, fullgraph=True)
        results = []
        for fn in (sample_and_loss, compiled):
            torch.manual_seed(0)
            began = time.perf_counter()
            value, loss = fn(rate)
            (grad,) = torch.autograd.grad(loss, rate)
            synchronize(device)
            results.append((value.detach(), grad, time.perf_counter() - began))
        (value_e, grad_e, _), (value_c, grad_c, seconds) = results

        def step(fn, rate=rate):
            def run():
                fn(rate)[1].backward()
                rate.grad = None

            return run

        times = alternate((step(sample_and_loss), step(compiled)), device, repeats, number)
        eager_ms, compiled_ms = (statistics.median(t) for t in times)
        lines.append(
            f"{truncation:>4}  {seconds:>9.1f}  {eager_ms:>9.3f}  {compiled_ms:>11.3f}  "
            f"{compiled_ms / eager_ms:>14.2f}  {(value_c - value_e).abs().max().item():>9.1e}  "
            f"{(grad_c - grad_e).abs().max().item():>11.1e}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_options(parser)
    parser.add_argument(
        "--small",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the small-size tables, n = 15 and 50 with validation off and on (default: on)",
    )
    parser.add_argument("--profile", action="store_true", help="also profile GenGS")
    parser.add_argument(
        "--compile", action="store_true", help="also time the step compiled by torch.compile"
    )
    parser.add_argument(
        "--sizes",
        nargs="*",
        type=_size,
        help="LATENTSxOUTCOMES of the large-size table, e.g. 1e4x32 (default: 1e4x32 1e5x32, "
        "and 1e6x32 1e6x128 on CUDA; none: skip it)",
    )
    parser.add_argument(
        "--scale-repeats", type=positive_int, default=10, help="repetitions per size"
    )
    add_clock_option(parser)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [(10**4, 32), (10**5, 32)]
        if args.device.startswith("cuda"):
            args.sizes += [(10**6, 32), (10**6, 128)]
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("error")  # a warning inside a timed loop would distort it
    clock_line = use_clock(args.clock, device)  # its refusal before anything is printed
    print(machine(device))
    print(clock_line)
    print(f"batch {BATCH[0]} x {BATCH[1]} latents, temperature {TEMPERATURE}, rsample + backward,")
    print(f"median over {args.repeats} alternating repetitions of {args.number} calls each")
    for validate_args in (False, True) if args.small else ():
        print(f"\nvalidate_args={validate_args}")
        print(table(device, args.repeats, args.number, validate_args))
    if args.sizes:
        print(
            "\nlarge sizes, validate_args=False: GenGS against torch's relaxed categorical and "
            "F.gumbel_softmax (each with the linear map to a count) and one copy of the "
            "one-hot;\nmedian ms over "
            f"{args.scale_repeats} alternating calls; peak step memory of GenGS and gumbel"
        )
        print(scale_table(device, args.sizes, args.scale_repeats))
    if args.compile:
        print(
            "\ntorch.compile (inductor, fallback_random) of the GenGS step against eager, "
            f"validate_args=False;\nmedian over {args.repeats} alternating repetitions of "
            f"{args.number} calls; largest differences from eager's sample z and gradient"
        )
        with warnings.catch_warnings():
            # torch's own deprecations inside torch.compile (torch 2.13: TorchDynamo instantiates
            # autograd Functions, TorchInductor imports torch.jit.script_method).
            warnings.simplefilter("ignore", DeprecationWarning)
            print(compile_table(device, args.repeats, args.number))
    if args.profile:
        for n in TRUNCATIONS:
            print(f"\nprofiles, validate_args=False\n{profile(n, device, args.number)}")


if __name__ == "__main__":
    main()

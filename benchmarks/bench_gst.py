"""Time and peak memory of one training step of the GST paper's MNIST VAE: STGS, GST-1.0, GR-MC100.

The model is the paper's (Fan et al., 2022, section 5): an encoder 784-512-256 to 30 x 10 logits,
a symmetric decoder 300-256-512-784, batch 100, Adam 1e-3. One training step is: encoder forward,
a straight-through sample ``z = d.rsample()`` of the estimator under test, decoder forward, the
negative ELBO (Bernoulli reconstruction plus the categorical KL to the uniform prior, computed with
the library's sync-free ``categorical_kl``), backward, Adam step. Inputs are dynamically binarized
MNIST digits from the IDX files in ``--data`` (a folder without them is refused); without
``--data``, from ``../shared/data/mnist`` from the project root, else ``/work/shared/data/mnist``,
else random binary images (the cost does not depend on the values).

Time: each variant has its own model (same initial weights) and optimizer; after warm-up steps
the variants take turns, one step each, in a rotating order, for ``--steps`` rounds, so drifts of
a shared machine hit all of them alike; the table reports the median and the interquartile range
of the milliseconds per step (CUDA steps are synchronized before the clock is read).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step (its peak statistic reset
before it) less what was allocated before the step, which holds every variant's model and all
the preloaded batches; on CUDA as on CPU that is the step's peak, and "peak" adds this variant's
own tensors to it (below). On CPU there is no allocator
statistic, so the step runs under ``torch.profiler`` with ``profile_memory=True``: every
allocation and free of torch's CPU allocator inside the step is an event with its byte count
(self memory of each op, frees as ``[memory]`` events); their running sum in time order is the
memory held by tensors, and its maximum the step's peak above what was live before it. This is
the CPU analogue of ``max_memory_allocated``: it counts tensor memory only, not the allocator's
caches or the process's resident set (``ru_maxrss`` would mix in both, and a high-water mark
cannot be reset between variants in one process). The profiler window isolates each variant, so
no subprocess is needed. "peak" adds the tensors live before the step (parameters, Adam states,
the batch); "step" is the peak above them (activations, saved tensors, gradients).

Run from the project root::

    python benchmarks/bench_gst.py                  # CPU
    python benchmarks/bench_gst.py --device cuda    # GPU

Targets (benchmarks/README.md): GST/STGS time ratio and memory ratio at most 1.02; GR-MC100
costs more.
"""

import argparse
import functools
import gzip
import statistics
from pathlib import Path

import numpy as np
import torch
from bench_gengs import add_clock_option, machine, synchronize, time_per_call, use_clock
from torch import nn
from torch.profiler import ProfilerActivity, profile

import pyro_relax as pr
from pyro_relax._cli import device as device_name
from pyro_relax._cli import integer_at_least, positive_int, seed, temperature_value
from pyro_relax._numerics import categorical_kl

NUM_LATENTS, NUM_CLASSES, BATCH = 30, 10, 100
IMAGES = "train-images-idx3-ubyte.gz"


def variants(temperature, num_draws):
    return {
        "STGS": lambda logits: pr.STGSCategorical(temperature, logits=logits),
        "GST-1.0": lambda logits: pr.GappedSTCategorical(temperature, logits=logits, gap=1.0),
        f"GR-MC{num_draws}": lambda logits: pr.GRMCKCategorical(
            temperature, logits=logits, num_draws=num_draws
        ),
    }


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        latent = NUM_LATENTS * NUM_CLASSES
        self.encoder = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, latent)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 784)
        )

    def loss(self, x, make_posterior):
        logits = self.encoder(x).view(-1, NUM_LATENTS, NUM_CLASSES)
        posterior = make_posterior(logits)
        z = posterior.rsample()
        x_logits = self.decoder(z.flatten(-2))
        nll = nn.functional.binary_cross_entropy_with_logits(x_logits, x, reduction="none")
        uniform = torch.full_like(posterior.logits, -np.log(NUM_CLASSES))
        kl = categorical_kl(posterior.logits, uniform)
        return (nll.sum(-1) + kl.sum(-1)).mean()


def load_batches(data, num_batches, device, seed):
    generator = torch.Generator().manual_seed(seed)
    path = Path(data) / IMAGES if data else None
    if path is not None and path.exists():
        with gzip.open(path, "rb") as file:
            raw = np.frombuffer(file.read(), dtype=np.uint8, offset=16)
        images = torch.from_numpy(raw.reshape(-1, 784)[: num_batches * BATCH].astype(np.float32))
        source = f"MNIST ({path.parent}), dynamically binarized"
        probs = images / 255.0
    else:
        source = "random binary images"
        probs = torch.full((num_batches * BATCH, 784), 0.13)
    images = torch.bernoulli(probs, generator=generator)
    return list(images.view(num_batches, BATCH, 784).to(device)), source


def default_data():
    root = Path(__file__).resolve().parent.parent
    for candidate in (root.parent / "shared" / "data" / "mnist", Path("/work/shared/data/mnist")):
        if candidate.exists():
            return str(candidate)
    return None


def train_step(model, optimizer, batch, make_posterior):
    optimizer.zero_grad(set_to_none=True)
    loss = model.loss(batch, make_posterior)
    loss.backward()
    optimizer.step()
    return loss


def live_tensor_bytes(model, optimizer, batch):
    tensors = list(model.parameters()) + [batch]
    for state in optimizer.state.values():
        tensors += [value for value in state.values() if torch.is_tensor(value)]
    return sum(t.numel() * t.element_size() for t in tensors)


def cpu_step_peak(step):
    """Peak bytes held by tensors during ``step()``, above those live before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.events() if e.self_cpu_memory_usage != 0]
    events.sort(key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure_memory(model, optimizer, batch, make_posterior, device):
    """(peak bytes including the tensors live before the step, peak bytes above them)."""

    def step():
        train_step(model, optimizer, batch, make_posterior)
        synchronize(device)

    optimizer.zero_grad(set_to_none=True)
    before = live_tensor_bytes(model, optimizer, batch)
    if device.type == "cuda":
        # The device also holds the other variants' models and every preloaded batch: only
        # the rise above what this step found allocated is its own.
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        step_peak = torch.cuda.max_memory_allocated(device) - base
    else:
        step_peak = max(cpu_step_peak(step) for _ in range(3))
    return before + step_peak, step_peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)"
    )
    # At least two: the interquartile range needs two times per variant.
    parser.add_argument(
        "--steps", type=integer_at_least(2), default=30, help="timed rounds (default 30)"
    )
    parser.add_argument(
        "--warmup", type=integer_at_least(0), default=5, help="untimed steps per variant"
    )
    parser.add_argument("--temperature", type=temperature_value, default=1.0)
    parser.add_argument(
        "--num-draws", type=positive_int, default=100, help="K of GR-MCK (default 100)"
    )
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    parser.add_argument(
        "--data",
        help="directory of MNIST IDX files (default: the project's copy if there is one, else "
        "random binary images)",
    )
    parser.add_argument("--seed", type=seed, default=0)
    add_clock_option(parser)
    args = parser.parse_args(argv)
    if args.data is None:
        args.data = default_data()
    elif not (Path(args.data) / IMAGES).exists():
        parser.error(f"--data {args.data}: no {IMAGES} there")

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock_line = use_clock(args.clock, device)
    batches, source = load_batches(args.data, 20, device, args.seed)
    # Before the runs: the load average is the one they start under, and a long run shows what
    # it is doing.
    print(machine(device))
    print(clock_line)
    print(
        f"MNIST VAE 784-512-256 -> {NUM_LATENTS}x{NUM_CLASSES} categorical latents, batch "
        f"{BATCH}, Adam; tau = {args.temperature}; data: {source}"
    )
    print(f"{args.steps} interleaved rounds after {args.warmup} warm-up steps per variant")
    print(flush=True)
    runs = {}
    for name, make_posterior in variants(args.temperature, args.num_draws).items():
        torch.manual_seed(args.seed)  # the same initial weights for every variant
        model = VAE().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        runs[name] = (model, optimizer, make_posterior, [])

    names = list(runs)
    for name in names:
        model, optimizer, make_posterior, _ = runs[name]
        for i in range(args.warmup):
            train_step(model, optimizer, batches[i % len(batches)], make_posterior)
    for round_ in range(args.steps):
        batch = batches[round_ % len(batches)]
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            model, optimizer, make_posterior, times = runs[name]
            step = functools.partial(train_step, model, optimizer, batch, make_posterior)
            times.append(time_per_call(step, device, 1))

    memory = {
        name: measure_memory(model, optimizer, batches[0], make_posterior, device)
        for name, (model, optimizer, make_posterior, _) in runs.items()
    }

    header = (
        f"{'estimator':<10} {'ms/step':>8} {'IQR':>13} {'time/STGS':>9} "
        f"{'peak MiB':>9} {'mem/STGS':>8} {'step MiB':>9} {'step/STGS':>9}"
    )
    print(header)
    print("-" * len(header))
    base_time = statistics.median(runs["STGS"][3])
    base_peak, base_step = memory["STGS"]
    for name, (_, _, _, times) in runs.items():
        quartiles = statistics.quantiles(times, n=4, method="inclusive")
        median = statistics.median(times)
        peak, step = memory[name]
        print(
            f"{name:<10} {median:>8.2f} {quartiles[0]:>6.2f}-{quartiles[2]:<6.2f} "
            f"{median / base_time:>9.3f} {peak / 2**20:>9.2f} {peak / base_peak:>8.3f} "
            f"{step / 2**20:>9.2f} {step / base_step:>9.3f}"
        )


if __name__ == "__main__":
    main()

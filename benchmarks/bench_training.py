"""One training step of the count VAE and the GST VAE: Pyro SVI with each ELBO, traced by the JIT
or not, against a hand-written PyTorch loop of the same model and estimator.

Models, built by the experiments' own builders at their default sizes, on random binary images
(the cost of a step does not depend on the pixels' values), batch 100, Adam 1e-3:

- count VAE (``pyro_relax.experiments.vae``, ``build_estimator``): prior ``Pois(2)``, 32 count
  latents, encoder 784-512-256, mirrored decoder, temperature 0.5 (a 0-dimensional tensor, as
  the experiment's schedule passes it); estimators explicit GenGS (truncation 12), GenGS-IMP
  (free logits over 12 outcomes) and REINFORCE (Poisson guide and prior, decaying-average
  baseline);
- GST VAE (``pyro_relax.experiments.gst_vae``, ``model_and_guide``): 30 one-hot latents of 10
  categories, encoder 784-512-256, mirrored decoder, temperature 1.0; estimators STGS and
  GST-1.0.

A step is forward, backward and Adam step, timed under each of:

- ``torch, MC`` and ``torch, KL``: no Pyro inference (no SVI, poutine or param store), the same
  networks and the same distribution objects as the Pyro model and guide, ``torch.optim.Adam``
  (the GST experiment's ``--loop torch`` step, ``gst_vae._TorchLoop``). ``MC`` is the loss
  ``Trace_ELBO`` computes for a reparameterized guide, ``log q(z) - log p(z) - log p(x | z)`` of
  one ``rsample``; ``KL`` the one ``TraceMeanField_ELBO`` computes, ``kl_divergence(q, p) -
  log p(x | z)`` through the registered KL. For REINFORCE, ``torch, score function``: the
  surrogate ``TraceGraph_ELBO`` builds, with the same decaying average (beta 0.9) per image.
- ``Trace_ELBO`` and ``TraceMeanField_ELBO`` for the relaxed and straight-through estimators;
  REINFORCE's guide cannot be reparameterized, so it trains with ``TraceGraph_ELBO`` (as the
  experiment does) and has no mean-field rows.
- their JIT versions ``JitTrace_ELBO``, ``JitTraceMeanField_ELBO`` and ``JitTraceGraph_ELBO``.
  Pyro 1.9.2's ``JitTraceMeanField_ELBO`` looks for its compiled loss under one attribute name
  and stores it under another, so it traces the model again at every step; the row
  ``JitTraceMeanField_ELBO (traced once)`` is the same ELBO with that cache repaired (a
  three-line subclass below). ``JitTraceGraph_ELBO`` fails with a decaying-average baseline:
  Pyro stores the baseline's running average in the param store still wrapped in its
  provenance tracking (a ``ProvenanceTensor``), and ``torch.jit.trace``, given the wrapper as
  an input, meets the tensor inside it as an unknown one ("Cannot insert a Tensor that requires
  grad as a constant"); the table says so instead of a time.

Every ELBO gets ``max_plate_nesting=1`` (as the GST experiment's loop does: no extra guide run
to find it). A JIT ELBO records the model for fixed structure: Pyro caches one trace per number
of positional arguments and keyword arguments, not per shape, so a batch of another size
reuses it (correctly for these two models, whose sizes are recorded as tensor sizes; a size
that reaches Python as a number would be baked in). The benchmark's batches all have one size.

Each model x estimator is measured on its own: one set of networks (seeded) that all its sides
train in turn, each with its own optimizer. Warm-up steps first: the first step of a JIT side
traces the model (reported as ``first step``), and TorchScript's profiling executor optimizes
the trace over the next two calls, which are slow too. Then ``--steps`` rounds in which the
sides take one step each, in a rotating order, so that a shared machine's drifts hit them alike.
Reported: the median and interquartile range of the milliseconds per step, and each Pyro side's
median over that of the torch loop computing the same loss. On CUDA every step is synchronized
before the clock is read, and one extra step per side runs under
``torch.cuda.set_sync_debug_mode("warn")`` to count the host synchronizations (``syncs``).

Validation is off unless ``--validation``: ``pyro.enable_validation(False)`` (Pyro's default is
on), which the library's distributions and torch's follow. Warnings raised during the warm-up
steps are counted by origin and printed below the table (``TracerWarning`` from torch or Pyro
is theirs; one from a ``pyro_relax`` file would be ours).

Target (benchmarks/README.md): a count VAE step with explicit GenGS at most 1.2 times one with
GenGS-IMP, in the same loop.

Run from the project root::

    python benchmarks/bench_training.py --threads 1     # CPU
    python benchmarks/bench_training.py --device cuda   # GPU
"""

import argparse
import collections
import dataclasses
import statistics
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from bench_gengs import add_clock_option, machine, time_per_call, use_clock
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from torch.distributions import kl_divergence

from pyro_relax._cli import device as device_name
from pyro_relax._cli import integer_at_least, positive_int, seed
from pyro_relax.experiments import gst_vae, image_vae, vae

PIXELS = 784
LR = 1e-3
COUNT_PRIOR = "Pois(2)"
COUNT_TEMPERATURE = 0.5  # mid-way along the experiment's annealing from 1.0 to 0.1
GST_TEMPERATURE = 1.0
BASELINE_BETA = 0.9  # Pyro's default for the decaying-average baseline
CASES = (
    ("count VAE", "GenGS"),
    ("count VAE", "GenGS-IMP"),
    ("count VAE", "REINFORCE"),
    ("GST VAE", "STGS"),
    ("GST VAE", "GST-1.0"),
)
# Sizes: the experiments' defaults, and tiny ones for the test that keeps this script working.
FULL = {"batch": 100, "hidden": vae.DEFAULT_HIDDEN, "count_latents": vae.DEFAULT_LATENTS}
FULL |= {"gst_latents": gst_vae.DEFAULT_LATENTS, "categories": gst_vae.DEFAULT_CATEGORIES}
SMOKE = {"batch": 8, "hidden": (16, 8), "count_latents": 4, "gst_latents": 3, "categories": 4}


class CachedJitTraceMeanField_ELBO(JitTraceMeanField_ELBO):
    """``JitTraceMeanField_ELBO`` that traces once: Pyro 1.9.2's checks for a compiled loss
    named ``_loss_and_surrogate_loss`` but stores it as ``_differentiable_loss``."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        self._loss_and_surrogate_loss = self._differentiable_loss  # the name Pyro checks
        return loss


# Pyro sides of a reparameterized estimator: (name, ELBO class, the torch loss it matches).
REPARAMETERIZED_SIDES = (
    ("Trace_ELBO", Trace_ELBO, "torch, MC"),
    ("TraceMeanField_ELBO", TraceMeanField_ELBO, "torch, KL"),
    ("JitTrace_ELBO", JitTrace_ELBO, "torch, MC"),
    ("JitTraceMeanField_ELBO", JitTraceMeanField_ELBO, "torch, KL"),
    ("JitTraceMeanField_ELBO (traced once)", CachedJitTraceMeanField_ELBO, "torch, KL"),
)
SCORE_FUNCTION_SIDES = (
    ("TraceGraph_ELBO", TraceGraph_ELBO, "torch, score function"),
    ("JitTraceGraph_ELBO", JitTraceGraph_ELBO, "torch, score function"),
)


@dataclasses.dataclass
class Case:
    """One model and estimator: the Pyro model and guide, and the same pieces without Pyro."""

    model: object
    guide: object
    guide_dist: object  # images -> the guide's distribution, batch shape (B, latents)
    prior: object  # the model's prior, batch shape () or (latents,)
    likelihood: object  # latents -> the Bernoulli distribution of the images
    parameters: list
    reparameterized: bool


def bernoulli_likelihood(decoder, flatten):
    def likelihood(z):
        return dist.Bernoulli(logits=decoder(z.flatten(-2) if flatten else z)).to_event(1)

    return likelihood


def count_case(estimator, sizes, device):
    """The count VAE of ``vae.build_estimator``, with the guide distribution it builds."""
    prior, latents, hidden = vae.PRIORS[COUNT_PRIOR], sizes["count_latents"], sizes["hidden"]
    width = prior.truncation if estimator == "GenGS-IMP" else prior.num_guide_parameters
    encoder = image_vae.mlp([PIXELS, *hidden, latents * width]).to(device)
    decoder = image_vae.mlp([latents, *hidden[::-1], PIXELS]).to(device)
    temperature = torch.tensor(COUNT_TEMPERATURE, device=device)
    built = vae.build_estimator(estimator, prior, encoder, decoder, temperature, latents)
    parameters = [*encoder.parameters(), *decoder.parameters()]
    likelihood = bernoulli_likelihood(decoder, flatten=False)
    reparameterized = estimator != "REINFORCE"
    return Case(
        built.model,
        built.guide,
        built.guide_dist,
        built.prior,
        likelihood,
        parameters,
        reparameterized,
    )


def gst_case(estimator, sizes, device):
    """The GST VAE of ``gst_vae.model_and_guide``, the guide from ``guide_distribution``."""
    latents, categories, hidden = sizes["gst_latents"], sizes["categories"], sizes["hidden"]
    encoder = image_vae.mlp([PIXELS, *hidden, latents * categories]).to(device)
    decoder = image_vae.mlp([latents * categories, *hidden[::-1], PIXELS]).to(device)
    temperature = torch.tensor(GST_TEMPERATURE, device=device)
    model, guide = gst_vae.model_and_guide(
        estimator, encoder, decoder, temperature, latents, categories
    )

    def guide_dist(x):
        logits = encoder(x).view(x.shape[0], latents, categories)
        return gst_vae.guide_distribution(estimator, temperature, logits)

    prior = dist.OneHotCategorical(logits=torch.zeros(latents, categories, device=device))
    parameters = [*encoder.parameters(), *decoder.parameters()]
    likelihood = bernoulli_likelihood(decoder, flatten=True)
    return Case(model, guide, guide_dist, prior, likelihood, parameters, True)


# --- The losses of the hand-written loop --------------------------------------------------


def guide_and_prior(case, x):
    """The guide's and the prior's distributions over a batch's latents, as Pyro's sites hold
    them: expanded to the guide's batch shape, the latents as one event."""
    guide = case.guide_dist(x)
    return guide.to_event(1), case.prior.expand(guide.batch_shape).to_event(1)


def monte_carlo_loss(case):
    """The negative ELBO ``Trace_ELBO`` computes for a reparameterized guide."""

    def loss(x):
        guide, prior = guide_and_prior(case, x)
        z = guide.rsample()
        return (guide.log_prob(z) - prior.log_prob(z) - case.likelihood(z).log_prob(x)).sum()

    return loss


def analytic_kl_loss(case):
    """The negative ELBO ``TraceMeanField_ELBO`` computes: the registered KL plus the
    likelihood of a reparameterized sample."""

    def loss(x):
        guide, prior = guide_and_prior(case, x)
        z = guide.rsample()
        return (kl_divergence(guide, prior) - case.likelihood(z).log_prob(x)).sum()

    return loss


def score_function_loss(case):
    """The surrogate loss ``TraceGraph_ELBO`` differentiates for a guide without
    ``rsample``: the model's log-densities plus the guide's log-density times its downstream
    cost less a decaying average of that cost per image (the baseline)."""
    average = None

    def loss(x):
        nonlocal average
        guide, prior = guide_and_prior(case, x)
        z = guide.sample()
        log_q, log_prior = guide.log_prob(z), prior.log_prob(z)
        log_likelihood = case.likelihood(z).log_prob(x)
        with torch.no_grad():
            elbo = log_likelihood + log_prior - log_q
            baseline = torch.zeros_like(elbo) if average is None else average
            average = (1 - BASELINE_BETA) * elbo + BASELINE_BETA * baseline
        score = log_q * (elbo - baseline)
        return -(log_likelihood.sum() + log_prior.sum() + score.sum())

    return loss


# --- Sides, warm-up and timing ------------------------------------------------------------


@dataclasses.dataclass
class Side:
    """One way of taking a training step, and what was measured of it."""

    name: str
    step: object
    reference: str | None = None  # the torch side computing the same loss
    times: list = dataclasses.field(default_factory=list)
    first_ms: float | None = None
    syncs: int | None = None
    warnings: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    error: str | None = None


def torch_side(name, loss, parameters):
    loop = gst_vae._TorchLoop(loss, parameters, LR)
    return Side(name, loop.step)


def pyro_side(name, elbo_class, reference, case):
    elbo = elbo_class(max_plate_nesting=1)
    svi = SVI(case.model, case.guide, pyro.optim.Adam({"lr": LR}), elbo)
    return Side(name, svi.step, reference)


def build_sides(case):
    if case.reparameterized:
        torch_sides = [
            torch_side("torch, MC", monte_carlo_loss(case), case.parameters),
            torch_side("torch, KL", analytic_kl_loss(case), case.parameters),
        ]
        pyro_sides = REPARAMETERIZED_SIDES
    else:
        loss = score_function_loss(case)
        torch_sides = [torch_side("torch, score function", loss, case.parameters)]
        pyro_sides = SCORE_FUNCTION_SIDES
    return torch_sides + [pyro_side(*spec, case) for spec in pyro_sides]


def origin(warning):
    """``Category path:line`` of a warning, the path from the package root onwards."""
    path = Path(warning.filename).as_posix()
    for root in ("site-packages/", "/pyro_relax/"):
        if root in path:
            path = ("pyro_relax/" if root == "/pyro_relax/" else "") + path.split(root)[-1]
    return f"{warning.category.__name__} {path}:{warning.lineno}"


def timed_step(side, batch, device):
    return time_per_call(lambda: side.step(batch), device, 1)


def warm_up(side, batches, count, device):
    """Untimed steps (the first one timed apart: a JIT side traces there), their warnings
    counted by origin; a side whose step raises keeps the error instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            side.first_ms = timed_step(side, batches[0], device)
            for i in range(1, count):
                side.step(batches[i % len(batches)])
        except Exception as error:  # a JIT ELBO that cannot trace this model
            side.error = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    side.warnings.update(origin(w) for w in caught)


def count_syncs(side, batch, device):
    """Host synchronizations during one step, by torch's sync debug mode (CUDA only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            side.step(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    side.syncs = sum("synchroniz" in str(w.message) for w in caught)


def measure(sides, batches, args, device):
    for side in sides:
        warm_up(side, batches, args.warmup, device)
    running = [side for side in sides if side.error is None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted during the warm-up; not inside the timings
        for round_ in range(args.steps):
            batch = batches[round_ % len(batches)]
            shift = round_ % len(running)
            for side in running[shift:] + running[:shift]:
                side.times.append(timed_step(side, batch, device))
        if device.type == "cuda":
            for side in running:
                count_syncs(side, batches[0], device)


# --- Report -------------------------------------------------------------------------------


def table_rows(model_name, estimator, sides, device):
    medians = {s.name: statistics.median(s.times) for s in sides if s.error is None}
    rows = []
    for side in sides:
        cells = [model_name, estimator, side.name]
        if side.error is not None:
            rows.append(cells + ["fails (see below)", "", "", ""])
            continue
        low, _, high = statistics.quantiles(side.times, n=4, method="inclusive")
        ratio = medians[side.name] / medians[side.reference] if side.reference else None
        cells += [
            f"{medians[side.name]:.2f}",
            f"{low:.2f} - {high:.2f}",
            f"{ratio:.2f}" if ratio is not None else "",
            f"{side.first_ms:.0f}",
        ]
        if device.type == "cuda":
            cells.append(str(side.syncs))
        rows.append(cells)
    return rows


def print_table(rows, device):
    header = ["model", "estimator", "loop", "ms / step", "IQR", "/ torch", "first step ms"]
    if device.type == "cuda":
        header.append("syncs / step")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row + [""] * (len(header) - len(row))) + " |")


def print_notes(results, warmup):
    """The warnings of the warm-up steps, by origin, and the sides that failed."""
    by_origin = collections.defaultdict(lambda: [0, set()])
    for sides in results.values():
        for side in sides:
            for where, count in side.warnings.items():
                by_origin[where][0] += count
                by_origin[where][1].add(side.name)
    ours = sorted(where for where in by_origin if " pyro_relax/" in where)
    print(f"\nWarnings raised during the warm-up steps ({warmup} per side), by origin; from")
    print(f"pyro_relax: {', '.join(ours) if ours else 'none'}")
    for where, (count, names) in sorted(by_origin.items()):
        print(f"  {count} x {where}, in: {'; '.join(sorted(names))}")
    for (model_name, estimator), sides in results.items():
        for side in sides:
            if side.error is not None:
                print(f"{model_name}, {estimator}, {side.name} fails: {side.error}")


def random_images(sizes, count, device, seed):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.full((count, sizes["batch"], PIXELS), 0.13)
    return list(torch.bernoulli(probs, generator=generator).to(device))


def run_case(model_name, estimator, sizes, args, device):
    pyro.clear_param_store()  # each case's networks are "encoder" and "decoder" in the store
    torch.manual_seed(args.seed)
    builder = count_case if model_name == "count VAE" else gst_case
    case = builder(estimator, sizes, device)
    sides = build_sides(case)
    measure(sides, random_images(sizes, 10, device, args.seed), args, device)
    return sides


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)"
    )
    parser.add_argument(
        "--steps", type=integer_at_least(2), help="timed rounds (default 30; smoke: 2)"
    )
    parser.add_argument(
        "--warmup",
        type=integer_at_least(1),
        help="untimed steps per side, at least 3 for a JIT side to reach its steady state "
        "(default 5; smoke: 1)",
    )
    parser.add_argument(
        "--threads", type=positive_int, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--validation", action="store_true", help="Pyro's and torch's validation on (default off)"
    )
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny networks and batch, 2 rounds: a check it runs"
    )
    add_clock_option(parser)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.smoke else 30
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 5
    return args


def main(argv=None):
    args = parse_arguments(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validation)
    clock_line = use_clock(args.clock, device)
    sizes = SMOKE if args.smoke else FULL
    results = {case: run_case(*case, sizes, args, device) for case in CASES}

    print(machine(device))
    print(clock_line)
    print(
        f"batch {sizes['batch']}, hidden {sizes['hidden']}, random binary images, Adam {LR}; "
        f"validation {'on' if args.validation else 'off'}"
    )
    print(f"{args.steps} interleaved rounds after {args.warmup} warm-up steps per side\n")
    rows = [row for case, sides in results.items() for row in table_rows(*case, sides, device)]
    print_table(rows, device)
    print_notes(results, args.warmup)


if __name__ == "__main__":
    main()

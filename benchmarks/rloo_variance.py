"""Gradient variance and time: TraceRLOO_ELBO against TraceGraph_ELBO's decaying-average baseline
and REINFORCE without a baseline.

The toy is the categorical model of ``tests/test_infer_rloo.py``: z ~ Categorical(0.1, 0.2, 0.3,
0.4), three observations ~ Normal(locs[z], 2), and the guide Categorical(logits) at fixed logits.
For K = 2, 4 and 8 particles (vectorized in every estimator), the variance of the gradient with
respect to each of the four logits comes from --draws independent draws, taken in one call: the
model runs in a plate of copies, each with its own row of logits. The table gives the sum of the
four variances and the ratios of RLOO's to the others'. Estimators:

- RLOO: ``TraceRLOO_ELBO(num_particles=K)``;
- decaying: ``TraceGraph_ELBO(num_particles=K, vectorize_particles=True)`` with
  ``infer={"baseline": {"use_decaying_avg_baseline": True}}`` (Pyro's beta = 0.9), after 50
  warm-up steps at the same logits (0.9 ** 50 < 1%: the average has forgotten its initial 0);
- none: ``Trace_ELBO(num_particles=K, vectorize_particles=True)``, REINFORCE weighted by the
  whole log p - log q;
- exact mean (for reference): ``TraceGraph_ELBO`` with ``baseline_value`` set to the exact ELBO,
  the constant that the RLOO and decaying baselines estimate.

Time: milliseconds per gradient (``loss_and_grads``) for one copy of the model, the estimators in
turns, median over --repeats rounds.

That setting favours the decaying average: it averages the costs of the very item whose
gradient it centres. In minibatch training Pyro keeps one average per *plate position* (the
shape of the downstream cost), and every step a position holds another datum. The second pair
of tables measures that: N = 200 items x_i from a mixture of four unit Normals at -6, -2, 2, 6
(prior weights 0.1 to 0.4, drawn once with seed 0, each --spread standard deviations around its
cluster: 1 draws from the model, 3 makes it misspecified), one z_i ~ Categorical per item, the
guide Categorical(logits[i]) with ``pyro.param("logits")`` of shape (200, 4), inside
``pyro.plate("data", 200, subsample=index)`` with B = 20 indices a step, the log-densities scaled
by N / B = 10. Every draw takes a fresh subsample from one seeded generator, the same for every
estimator (so the minibatch noise is common to all), and the decaying average is warmed up by 50
steps on random subsamples first and keeps updating, as training leaves it. The guide's logits
are fixed at (1 - t) log p(z) + t log p(z | x_i), normalized, for t = 0 (the prior, as at the
start of training), 0.5 and 0.9 (near the posterior, where training heads). Each item's ELBO
term (its expected cost) spans 58 nats at t = 0 and 5 at t = 0.5 and 0.9 (133 and 41 with
--spread 3), ten times that once scaled. At t = 1 each item's cost is the same for every z, and
RLOO's gradient is exactly 0.

Columns: the total variance over --minibatch-draws draws, summed over the 800 logits (subsample
noise included); its part due to the subsample alone, the same for every estimator (the variance
of the exact gradient given the subsample, in closed form); and the variance given the
subsample, the mean over draws of the squared distance to the exact gradient given the subsample
(enumerated per item). Time: mean milliseconds per gradient over the draws, in turns.

Run from the project root::

    python benchmarks/rloo_variance.py [--draws 4000] [--repeats 30] [--minibatch-draws 2000]
        [--spread 1] [--table both] [--threads 1]
"""

import argparse
import functools
import math
import statistics

import bench_gengs
import pyro
import pyro.distributions as dist
import torch
from bench_gengs import add_clock_option, machine, use_clock
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

from pyro_relax._cli import integer_at_least, positive_int, seed
from pyro_relax.infer.rloo import TraceRLOO_ELBO

F64 = {"dtype": torch.float64}
PRIOR = torch.tensor([0.1, 0.2, 0.3, 0.4], **F64)
LOCS = torch.tensor([-2.0, -0.5, 1.0, 3.0], **F64)
NOISE = 2.0
DATA = torch.tensor([1.2, 0.3, 2.0], **F64)
LOGITS = torch.tensor([0.5, -0.3, 0.2, -1.0], **F64)
PARTICLES = (2, 4, 8)
WARM_UP = 50
BATCHES = 20  # the batches of draws whose spread gives a variance's standard error


def _draws(text: str) -> int:
    """An argparse type: a number of draws that splits into ``BATCHES`` batches of at least
    two, so that each batch has a variance."""
    value = integer_at_least(2 * BATCHES)(text)
    if value % BATCHES:
        raise argparse.ArgumentTypeError(f"must be a multiple of {BATCHES}, got {text}")
    return value


def _largest(errors) -> float:
    """The largest of ``errors``, NaN if any is (``max`` keeps whichever comes first)."""
    errors = list(errors)
    return math.nan if any(math.isnan(error) for error in errors) else max(errors)


def model(logits, infer):
    with pyro.plate("copies", len(logits)):
        z = pyro.sample("z", dist.Categorical(PRIOR))
        pyro.sample("x", dist.Normal(LOCS[z].unsqueeze(-1), NOISE).to_event(1), obs=DATA)


def guide(logits, infer):
    with pyro.plate("copies", len(logits)):
        pyro.sample("z", dist.Categorical(logits=logits), infer=infer(len(logits)))


def exact_elbo() -> float:
    log_q = LOGITS.log_softmax(-1)
    log_lik = dist.Normal(LOCS.unsqueeze(-1), NOISE).log_prob(DATA).sum(-1)
    return float((log_q.exp() * (PRIOR.log() + log_lik - log_q)).sum())


def estimators(num_particles):
    """Name: (ELBO, the guide site's ``infer`` given the number of copies, warm-up steps)."""
    # One plate, given: Pyro would guess it at every gradient, with a log line in the table.
    nesting = {"max_plate_nesting": 1}
    vectorized = {"num_particles": num_particles, "vectorize_particles": True, **nesting}
    exact = torch.tensor(exact_elbo(), **F64)

    def nothing(copies):
        return {}

    def decaying(copies):
        return {"baseline": {"use_decaying_avg_baseline": True}}

    def exact_mean(copies):
        # TraceGraph_ELBO wants the shape of the downstream cost: (particles, copies).
        return {"baseline": {"baseline_value": exact.expand(num_particles, copies)}}

    return {
        "RLOO": (TraceRLOO_ELBO(num_particles, **nesting), nothing, 0),
        "decaying": (TraceGraph_ELBO(**vectorized), decaying, WARM_UP),
        "none": (Trace_ELBO(**vectorized), nothing, 0),
        "exact mean": (TraceGraph_ELBO(**vectorized), exact_mean, 0),
    }


def gradients(elbo, infer, copies):
    """The gradients of the loss with respect to each copy's logits, one row per copy."""
    logits = LOGITS.expand(copies, -1).clone().requires_grad_()
    # Trace_ELBO.loss_and_grads only differentiates pyro.param sites: use the surrogate.
    if isinstance(elbo, Trace_ELBO):
        (grad,) = torch.autograd.grad(elbo.differentiable_loss(model, guide, logits, infer), logits)
        return grad
    elbo.loss_and_grads(model, guide, logits, infer)
    return logits.grad


def total_variance(elbo, infer, warm_up, draws):
    """The variance summed over the logits, and its relative standard error from the spread of
    the same sum over 20 batches of the draws (the draws are far from normal)."""
    pyro.clear_param_store()  # the decaying averages live in the param store
    for _ in range(warm_up):
        gradients(elbo, infer, draws)
    grads = gradients(elbo, infer, draws)
    batches = grads.reshape(BATCHES, -1, grads.shape[-1]).var(1).sum(-1)
    total = float(grads.var(0).sum())
    return total, float(batches.std()) / math.sqrt(BATCHES) / total


def milliseconds(variants, repeats) -> dict:
    """Median milliseconds per gradient of one copy, the variants in turns (which goes first
    rotates, so that a drift in the machine's load hits every variant)."""
    steps = [functools.partial(gradients, elbo, infer, 1) for elbo, infer, _ in variants.values()]
    # On a fork of the random stream: the variances, drawn from it, depend on --seed alone, not
    # on how many timing calls (and warm-up calls) ran between them.
    with torch.random.fork_rng():
        times = bench_gengs.alternate(steps, torch.device("cpu"), repeats, 1)
    return {name: statistics.median(values) for name, values in zip(variants, times, strict=True)}


def row(num_particles, draws, repeats) -> tuple[str, float]:
    variants = estimators(num_particles)
    results = {name: total_variance(*spec, draws) for name, spec in variants.items()}
    variance = {name: value for name, (value, _) in results.items()}
    worst_error = _largest(error for _, error in results.values())
    pyro.clear_param_store()
    ms = milliseconds(variants, repeats)
    cells = [str(num_particles)]
    cells += [f"{variance[name]:.4f}" for name in variants]
    cells += [f"{variance['RLOO'] / variance[name]:.2f}" for name in ("decaying", "none")]
    cells += [f"{ms[name]:.1f}" for name in ("RLOO", "decaying", "none")]
    return "| " + " | ".join(cells) + " |", worst_error


# The minibatch scenario: 200 items, 20 a step, one Categorical latent per item.

ITEMS, SUBSAMPLE = 200, 20
ITEM_LOCS = torch.tensor([-6.0, -2.0, 2.0, 6.0], **F64)
# Where the guide sits between the prior (0) and each item's exact posterior (1).
GUIDE_POSITIONS = (0.0, 0.5, 0.9)


def item_data(spread: float) -> torch.Tensor:
    """200 items from the mixture, each ``spread`` standard deviations around its cluster."""
    generator = torch.Generator().manual_seed(0)
    clusters = torch.multinomial(PRIOR, ITEMS, replacement=True, generator=generator)
    return ITEM_LOCS[clusters] + spread * torch.randn(ITEMS, generator=generator, **F64)


def item_log_joint(data) -> torch.Tensor:
    """log p(z = c, x_i), one row per item."""
    return PRIOR.log() + dist.Normal(ITEM_LOCS, 1.0).log_prob(data.unsqueeze(-1))


def minibatch_model(index, data, infer):
    with pyro.plate("data", ITEMS, subsample=index):
        z = pyro.sample("z", dist.Categorical(PRIOR))
        pyro.sample("x", dist.Normal(ITEM_LOCS[z], 1.0), obs=data[index])


def minibatch_guide(index, data, infer):
    logits = pyro.param("logits", lambda: torch.zeros(ITEMS, len(PRIOR), **F64))
    with pyro.plate("data", ITEMS, subsample=index):
        pyro.sample("z", dist.Categorical(logits=logits[index]), infer=infer(index))


def guide_logits(data, position: float) -> torch.Tensor:
    """The normalized logits ``(1 - position) log p(z) + position log p(z | x_i)``."""
    posterior = item_log_joint(data).log_softmax(-1)
    return ((1 - position) * PRIOR.log() + position * posterior).log_softmax(-1)


def item_elbos(logits, data) -> torch.Tensor:
    """Each item's exact ELBO term, by enumerating its latent."""
    log_q = logits.log_softmax(-1)
    return (log_q.exp() * (item_log_joint(data) - log_q)).sum(-1)


def minibatch_estimators(num_particles, logits, data):
    """Name: (ELBO, the guide site's ``infer`` given the subsample's indices)."""
    vectorized = {"num_particles": num_particles, "vectorize_particles": True}
    nesting = {"max_plate_nesting": 1}
    scaled_elbos = ITEMS / SUBSAMPLE * item_elbos(logits, data)

    def nothing(index):
        return {}

    def decaying(index):
        return {"baseline": {"use_decaying_avg_baseline": True}}

    def exact_mean(index):
        return {"baseline": {"baseline_value": scaled_elbos[index].expand(num_particles, -1)}}

    return {
        "RLOO": (TraceRLOO_ELBO(num_particles, **nesting), nothing),
        "decaying": (TraceGraph_ELBO(**vectorized, **nesting), decaying),
        "none": (Trace_ELBO(**vectorized, **nesting), nothing),
        "exact mean": (TraceGraph_ELBO(**vectorized, **nesting), exact_mean),
    }


def minibatch_gradient(elbo, infer, index, data) -> torch.Tensor:
    """One draw of the gradient of the loss with respect to all 200 x 4 logits."""
    elbo.loss_and_grads(minibatch_model, minibatch_guide, index, data, infer)
    leaf = pyro.param("logits").unconstrained()
    grad, leaf.grad = leaf.grad.clone(), None
    return grad


def conditional_means(logits, data):
    """Each item's exact gradient of the loss when it is in the subsample: scaled by N / B."""
    leaf = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(-item_elbos(leaf, data).sum(), leaf)
    return ITEMS / SUBSAMPLE * grad


def minibatch_draws(variants, logits, data, draws, generator):
    """Per estimator, ``draws`` gradients on fresh subsamples (the same ones for every estimator)
    and the mean seconds per gradient; the decaying average warmed up first."""
    pyro.clear_param_store()  # the decaying averages live in the param store
    pyro.param("logits", logits.clone())
    for _ in range(WARM_UP):
        index = torch.randperm(ITEMS, generator=generator)[:SUBSAMPLE]
        minibatch_gradient(*variants["decaying"], index, data)
    grads = {name: [] for name in variants}
    seconds = dict.fromkeys(variants, 0.0)
    indices = []
    for _ in range(draws):
        indices.append(torch.randperm(ITEMS, generator=generator)[:SUBSAMPLE])
        for name, (elbo, infer) in variants.items():
            start = bench_gengs.clock()
            grads[name].append(minibatch_gradient(elbo, infer, indices[-1], data))
            seconds[name] += bench_gengs.clock() - start
    grads = {name: torch.stack(values) for name, values in grads.items()}
    return grads, torch.stack(indices), {name: value / draws for name, value in seconds.items()}


def minibatch_variances(grads, indices, means):
    """Total variance (summed over the logits), and the mean squared distance to the exact
    gradient given the subsample, each with its relative standard error."""
    total = float(grads.var(0).sum())
    batches = grads.reshape(BATCHES, -1, *grads.shape[1:]).var(1).sum((-2, -1))
    given = torch.zeros_like(grads)
    given.scatter_(1, indices.unsqueeze(-1).expand(-1, -1, means.shape[-1]), means[indices])
    squares = (grads - given).square().sum((-2, -1))
    conditional = float(squares.mean())
    errors = (
        float(batches.std()) / math.sqrt(BATCHES) / total,
        float(squares.std()) / math.sqrt(len(squares)) / conditional,
    )
    return total, conditional, _largest(errors)


def minibatch_rows(num_particles, position, data, draws, generator) -> tuple[str, str, float]:
    """The rows of the total and the conditional table, and the largest relative error."""
    logits = guide_logits(data, position)
    means = conditional_means(logits, data)
    variants = minibatch_estimators(num_particles, logits, data)
    grads, indices, seconds = minibatch_draws(variants, logits, data, draws, generator)
    results = {name: minibatch_variances(g, indices, means) for name, g in grads.items()}
    # Each item is in the subsample with probability B / N, where its exact gradient is `means`.
    subsample_part = float((1 - SUBSAMPLE / ITEMS) * SUBSAMPLE / ITEMS * means.square().sum())
    cells = []
    for column in (0, 1):
        values = [result[column] for result in results.values()]
        row = [f"{position:g}", str(num_particles)] + [f"{value:.4g}" for value in values]
        cells.append(row + [f"{values[0] / values[i]:.3f}" for i in (1, 2)])
    cells[0].append(f"{subsample_part:.4g}")
    cells[1] += [f"{1e3 * seconds[name]:.1f}" for name in ("RLOO", "decaying", "none")]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    return lines[0], lines[1], _largest(result[2] for result in results.values())


def fixed_table(args) -> None:
    print(f"exact ELBO {exact_elbo():.4f}; variances summed over the 4 logits, {args.draws} draws;")
    print(f"decaying average warmed up for {WARM_UP} steps; ms: median of {args.repeats} rounds\n")
    print(
        "| K | RLOO | decaying | none | exact mean | RLOO / decaying | RLOO / none "
        "| ms RLOO | ms decaying | ms none |"
    )
    print("|---:" * 10 + "|")
    errors = []
    for num_particles in PARTICLES:
        line, error = row(num_particles, args.draws, args.repeats)
        errors.append(error)
        print(line)
    worst_error = _largest(errors)
    print(f"\nlargest relative standard error of a variance above: {worst_error:.1%}")


def minibatch_table(args) -> None:
    data = item_data(args.spread)
    evidence = item_log_joint(data).logsumexp(-1)
    generator = torch.Generator().manual_seed(args.seed)
    totals, conditionals, errors = [], [], []
    for position in GUIDE_POSITIONS:
        for num_particles in PARTICLES:
            total, conditional, error = minibatch_rows(
                num_particles, position, data, args.minibatch_draws, generator
            )
            totals.append(total)
            conditionals.append(conditional)
            errors.append(error)
    worst_error = _largest(errors)
    print(f"minibatch: {ITEMS} items (spread {args.spread:g}), {SUBSAMPLE} a step, ", end="")
    print(f"{args.minibatch_draws} draws a row; decaying average warmed up for {WARM_UP} steps")
    print(
        f"log p(x_i) from {float(evidence.min()):.1f} to {float(evidence.max()):.1f}, "
        f"standard deviation {float(evidence.std()):.2f}; t: the guide's position between "
        "the prior (0) and the posterior (1)\n"
    )
    header = "| t | K | RLOO | decaying | none | exact mean | RLOO / decaying | RLOO / none "
    print("total variance, summed over the 200 x 4 logits\n")
    print(header + "| subsample part |")
    print("|---:" * 9 + "|")
    print("\n".join(totals))
    print("\nvariance given the subsample\n")
    print(header + "| ms RLOO | ms decaying | ms none |")
    print("|---:" * 11 + "|")
    print("\n".join(conditionals))
    print(f"\nlargest relative standard error of a variance above: {worst_error:.1%}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--draws",
        type=_draws,
        default=4000,
        help="draws per variance (a multiple of 20, at least 40)",
    )
    parser.add_argument("--repeats", type=positive_int, default=30, help="timed rounds")
    parser.add_argument(
        "--minibatch-draws",
        type=_draws,
        default=2000,
        help="minibatch draws per row (a multiple of 20, at least 40)",
    )
    parser.add_argument(
        "--spread", type=float, default=1.0, help="the items' spread around their clusters"
    )
    parser.add_argument("--table", choices=("fixed", "minibatch", "both"), default="both")
    parser.add_argument(
        "--threads", type=positive_int, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--seed", type=seed, default=0)
    add_clock_option(parser)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    print(machine(torch.device("cpu")))
    print(use_clock(args.clock, torch.device("cpu")) + "\n")
    if args.table in ("fixed", "both"):
        fixed_table(args)
    if args.table == "both":
        print()
    if args.table in ("minibatch", "both"):
        minibatch_table(args)


if __name__ == "__main__":
    main()

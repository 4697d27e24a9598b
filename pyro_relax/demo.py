"""Demo: a Poisson-latent VAE on the digits, trained with GenGS and with REINFORCE."""

import contextlib
import dataclasses
import importlib.util
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from pyro.optim import Adam
from torch import nn
from tqdm import tqdm

from pyro_relax.distributions import GenGSPoisson
from pyro_relax.schedules import ExponentialDecay

__all__ = [
    "GENGS",
    "REINFORCE",
    "DemoConfig",
    "DemoResult",
    "MissingDependencyError",
    "discrete_elbo",
    "format_table",
    "load_binary_digits",
    "plot_curves",
    "require_dependencies",
    "run_demo",
    "train",
]

GENGS = "GenGS, Trace_ELBO"
REINFORCE = "REINFORCE + decaying-avg baseline, TraceGraph_ELBO"
# Samples per image of the discrete ELBO after each epoch (the final one takes eval_samples).
_CURVE_SAMPLES = 4
_INSTALL_HINT = 'the demo needs scikit-learn and matplotlib: pip install "pyro-relax[demo]"'


class MissingDependencyError(RuntimeError):
    """An optional dependency of the demo (scikit-learn or matplotlib) is not installed."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings shared by both training runs, so that the comparison is fair.

    The variance of REINFORCE grows with the number of latents: with 8 the two estimators end
    level here, with 32 GenGS is ahead by about 0.5 nats per image (seeds 0 to 2). The truncation
    leaves room for posterior rates up to about 10: at 12 outcomes the encoder's larger rates
    (7 to 8) put more than 1% of the mass in the tail and GenGS warns.
    """

    epochs: int = 75
    seed: int = 0
    latent_dim: int = 32
    hidden_dim: int = 128
    prior_rate: float = 2.0
    truncation: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-3
    eval_samples: int = 16  # samples per image for the final ELBO
    steps_per_epoch: int | None = None  # None: every full batch of the data (smoke runs cap it)


@dataclasses.dataclass
class DemoResult:
    """One training run: the discrete ELBO (nats per image) per epoch and at the end."""

    method: str
    curve: list
    final_elbo: float
    seconds: float
    params_changed: bool


def require_dependencies() -> None:
    """Raises :class:`MissingDependencyError` unless scikit-learn and matplotlib are installed."""
    if any(importlib.util.find_spec(name) is None for name in ("sklearn", "matplotlib")):
        raise MissingDependencyError(_INSTALL_HINT)


def load_binary_digits() -> torch.Tensor:
    """The 1797 8x8 digits of scikit-learn, binarized at half intensity, shape (1797, 64)."""
    from sklearn.datasets import load_digits

    pixels = torch.as_tensor(load_digits().data, dtype=torch.float32)
    return (pixels > 8).float()


def _networks(config: DemoConfig, num_pixels: int):
    torch.manual_seed(config.seed)
    hidden, latent = config.hidden_dim, config.latent_dim
    encoder = nn.Sequential(
        nn.Linear(num_pixels, hidden), nn.ReLU(), nn.Linear(hidden, latent), nn.Softplus()
    )
    decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, num_pixels))
    return encoder, decoder


def _model_and_guide(encoder, decoder, config, temperature=None):
    """GenGS distributions in model and guide, or Poisson ones if ``temperature`` is None."""

    def latent(rate):
        if temperature is None:
            return dist.Poisson(rate)
        return GenGSPoisson(rate, temperature, config.truncation)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            prior = latent(torch.tensor(config.prior_rate))
            z = pyro.sample("z", prior.expand([x.shape[0], config.latent_dim]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        # Only the score-function (REINFORCE) estimator reads the baseline.
        infer = {"baseline": {"use_decaying_avg_baseline": True}} if temperature is None else {}
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", latent(encoder(x)).to_event(1), infer=infer)

    return model, guide


@torch.no_grad()
def discrete_elbo(encoder, decoder, data, prior_rate, num_samples, seed=0) -> float:
    r"""The ELBO of the discrete model, in nats per image, averaged over ``data``.

    Guide :math:`\operatorname{Poisson}(\lambda(x))`, prior
    :math:`\operatorname{Poisson}(\lambda_0)` and the decoder, whichever estimator trained them.
    The reconstruction term averages ``num_samples`` integer draws (from a generator of their
    own, leaving the global one alone); the KL between the Poissons is exact.
    """
    rate = encoder(data)
    generator = torch.Generator().manual_seed(seed)
    z = torch.poisson(rate.expand((num_samples,) + rate.shape), generator=generator)
    log_likelihood = dist.Bernoulli(logits=decoder(z)).log_prob(data).sum(-1).mean(0)
    prior = dist.Poisson(torch.full_like(rate, prior_rate))
    kl = torch.distributions.kl_divergence(dist.Poisson(rate), prior).sum(-1)
    return float((log_likelihood - kl).mean())


def _steps_per_epoch(num_items: int, config: DemoConfig) -> int:
    # Full batches only: the decaying-average baseline keeps one value per batch position.
    full = num_items // config.batch_size
    return full if config.steps_per_epoch is None else min(full, config.steps_per_epoch)


def _batches(num_items: int, config: DemoConfig, generator) -> torch.Tensor:
    count = _steps_per_epoch(num_items, config)
    order = torch.randperm(num_items, generator=generator)
    return order[: count * config.batch_size].view(count, config.batch_size)


def _svi(method: str, encoder, decoder, config: DemoConfig, total_steps: int):
    """The SVI of ``method`` and its temperature schedule (which REINFORCE ignores)."""
    schedule = ExponentialDecay(1.0, 0.1, steps=max(total_steps, 1))
    if method == GENGS:
        model, guide = _model_and_guide(encoder, decoder, config, schedule.temperature)
        loss = Trace_ELBO()
    elif method == REINFORCE:
        model, guide = _model_and_guide(encoder, decoder, config)
        loss = TraceGraph_ELBO()
    else:
        raise ValueError(f"unknown method {method!r}; use {GENGS!r} or {REINFORCE!r}")
    return SVI(model, guide, Adam({"lr": config.learning_rate}), loss), schedule


def train(method: str, data: torch.Tensor, config: DemoConfig) -> DemoResult:
    """Trains the VAE with ``method`` (:data:`GENGS` or :data:`REINFORCE`) and evaluates it."""
    pyro.clear_param_store()
    encoder, decoder = _networks(config, data.shape[-1])
    initial = [p.detach().clone() for p in encoder.parameters()]
    total_steps = config.epochs * _steps_per_epoch(len(data), config)
    svi, schedule = _svi(method, encoder, decoder, config, total_steps)
    pyro.set_rng_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    curve, start = [], time.perf_counter()
    with tqdm(range(config.epochs), desc=method.split(",")[0], unit="epoch") as epochs:
        for epoch in epochs:
            for index in _batches(len(data), config, shuffle):
                svi.step(data[index])
                schedule.step()
            curve.append(
                discrete_elbo(encoder, decoder, data, config.prior_rate, _CURVE_SAMPLES, epoch)
            )
            epochs.set_postfix(elbo=f"{curve[-1]:.2f}")
    seconds = time.perf_counter() - start
    final = discrete_elbo(encoder, decoder, data, config.prior_rate, config.eval_samples)
    changed = any(not torch.equal(a, b) for a, b in zip(initial, encoder.parameters(), strict=True))
    return DemoResult(method, curve, final, seconds, changed)


def format_table(results, config: DemoConfig) -> str:
    """A plain-text table of the final discrete ELBO and training time of each run."""
    width = max(len(r.method) for r in results)
    header = f"{'method':<{width}}  {'ELBO (nats/image, higher is better)':>35}  {'seconds':>7}"
    rows = [f"{r.method:<{width}}  {r.final_elbo:>35.3f}  {r.seconds:>7.1f}" for r in results]
    note = (
        f"ELBO of the discrete model (Poisson guide and Poisson({config.prior_rate:g}) prior) "
        f"over all images, {config.eval_samples} samples; both runs: {config.epochs} epochs, "
        f"Adam(lr={config.learning_rate:g}), batch {config.batch_size}, seed {config.seed}"
    )
    return "\n".join([header, "-" * len(header), *rows, note])


def plot_curves(results, path) -> None:
    """Writes the per-epoch discrete ELBO of each run to a PNG file at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display: any backend set elsewhere is not needed here
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for result in results:
        axes.plot(range(1, len(result.curve) + 1), result.curve, label=result.method)
    axes.set_xlabel("epoch")
    axes.set_ylabel("ELBO of the discrete model (nats/image)")
    axes.set_title("Poisson-latent VAE on the digits: GenGS vs REINFORCE")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@contextlib.contextmanager
def _single_threaded():
    # The matrices here are tiny: a second intra-op thread buys nothing, and on a shared machine
    # every op waits for it whenever it is descheduled (measured: 10 ms a step against 200 ms).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_demo(config: DemoConfig, output) -> list:
    """Trains with both methods, prints the table and writes the plot to ``output``."""
    require_dependencies()
    data = load_binary_digits()
    with _single_threaded():
        results = [train(method, data, config) for method in (GENGS, REINFORCE)]
    print(format_table(results, config))
    plot_curves(results, output)
    print(f"training curves written to {output}")
    return results

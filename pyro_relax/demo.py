"""Demo: a Poisson-latent VAE on the digits, trained with GenGS, GenGS-IMP and REINFORCE."""

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

from pyro_relax.distributions import GenGSPoisson, TruncatedGenGS
from pyro_relax.infer import discrete_elbo, gradient_moments
from pyro_relax.schedules import ExponentialDecay

__all__ = [
    "GENGS",
    "GENGS_IMP",
    "METHODS",
    "REINFORCE",
    "DemoConfig",
    "DemoResult",
    "MissingDependencyError",
    "encoder_snr",
    "format_table",
    "load_binary_digits",
    "plot_curves",
    "require_dependencies",
    "run_demo",
    "train",
]

GENGS = "GenGS, Trace_ELBO"
GENGS_IMP = "GenGS-IMP (free logits), Trace_ELBO"
REINFORCE = "REINFORCE + decaying-avg baseline, TraceGraph_ELBO"
METHODS = (GENGS, GENGS_IMP, REINFORCE)
# Samples per image of the discrete ELBO after each epoch (the final one takes eval_samples).
_CURVE_SAMPLES = 4
_INSTALL_HINT = 'the demo needs scikit-learn and matplotlib: pip install "pyro-relax[demo]"'


class MissingDependencyError(RuntimeError):
    """An optional dependency of the demo (scikit-learn or matplotlib) is not installed."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings shared by every training run, so that the comparison is fair.

    The truncation leaves room for posterior rates up to about 10: at 12 outcomes the encoder's
    larger rates (7 to 8) put more than 1% of the mass in the tail and GenGS warns. The gradient
    signal-to-noise ratio is measured every ``snr_every`` epochs on one fixed batch, from
    ``snr_draws`` gradient draws at fixed parameters.
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
    snr_every: int = 5
    snr_draws: int = 50


@dataclasses.dataclass
class DemoResult:
    """One training run: the discrete ELBO (nats per image) per epoch and at the end, and the
    encoder's gradient signal-to-noise ratio, as ``(epoch, snr)`` pairs and at the end."""

    method: str
    curve: list
    final_elbo: float
    final_elbo_se: float
    snr_curve: list
    final_snr: float
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


def _networks(method: str, config: DemoConfig, num_pixels: int):
    torch.manual_seed(config.seed)
    hidden, latent = config.hidden_dim, config.latent_dim
    if method == GENGS_IMP:  # free logits over the outcomes of every latent
        head = [nn.Linear(hidden, latent * config.truncation), nn.Unflatten(-1, (latent, -1))]
    else:  # a positive rate per latent
        head = [nn.Linear(hidden, latent), nn.Softplus()]
    encoder = nn.Sequential(nn.Linear(num_pixels, hidden), nn.ReLU(), *head)
    decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, num_pixels))
    return encoder, decoder


def _model_and_guide(method, encoder, decoder, config, temperature=None):
    """GenGS distributions in model and guide (a ``GenGSPoisson`` guide, or free logits over
    the same outcomes for GenGS-IMP), or Poisson ones for REINFORCE."""

    def prior():
        if method == REINFORCE:
            return dist.Poisson(torch.tensor(config.prior_rate))
        return GenGSPoisson(config.prior_rate, temperature, config.truncation)

    def posterior(x):
        if method == REINFORCE:
            return dist.Poisson(encoder(x))
        if method == GENGS_IMP:
            return TruncatedGenGS(temperature, logits=encoder(x))
        return GenGSPoisson(encoder(x), temperature, config.truncation)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            latent = prior().expand([x.shape[0], config.latent_dim]).to_event(1)
            z = pyro.sample("z", latent)
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        # Only the score-function (REINFORCE) estimator reads the baseline.
        infer = {"baseline": {"use_decaying_avg_baseline": True}} if method == REINFORCE else {}
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", posterior(x).to_event(1), infer=infer)

    return model, guide


def encoder_snr(model, guide, elbo, batch, encoder, num_draws: int) -> float:
    r"""The signal-to-noise ratio of the encoder's gradient under ``elbo``, as one vector:

    .. math::
        \mathrm{SNR} = \frac{\lVert \bar g \rVert_2}{\sqrt{\sum_j s_j^2}},

    the norm of the mean gradient over the root of its total variance, from ``num_draws``
    draws at fixed parameters on ``batch`` (:func:`~pyro_relax.infer.gradient_moments`). The
    median of the elementwise ratios would mislead here: the logits of outcomes a free-logits
    guide never samples get tiny gradients of almost no variance, and huge ratios."""
    moments = gradient_moments(
        model, guide, elbo, batch, num_draws=num_draws, params=encoder.named_parameters()
    )
    signal = sum(float(m.mean.double().square().sum()) for m in moments.values())
    noise = sum(float(m.variance.double().sum()) for m in moments.values())
    return (signal / noise) ** 0.5


def _steps_per_epoch(num_items: int, config: DemoConfig) -> int:
    # Full batches only: the decaying-average baseline keeps one value per batch position.
    full = num_items // config.batch_size
    return full if config.steps_per_epoch is None else min(full, config.steps_per_epoch)


def _batches(num_items: int, config: DemoConfig, generator) -> torch.Tensor:
    count = _steps_per_epoch(num_items, config)
    order = torch.randperm(num_items, generator=generator)
    return order[: count * config.batch_size].view(count, config.batch_size)


def _svi(method: str, encoder, decoder, config: DemoConfig, total_steps: int):
    """The model, guide, loss and SVI of ``method``, and its temperature schedule (which
    REINFORCE ignores)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    schedule = ExponentialDecay(1.0, 0.1, steps=max(total_steps, 1))
    model, guide = _model_and_guide(method, encoder, decoder, config, schedule.temperature)
    loss = TraceGraph_ELBO() if method == REINFORCE else Trace_ELBO()
    svi = SVI(model, guide, Adam({"lr": config.learning_rate}), loss)
    return model, guide, loss, svi, schedule


def _baselines() -> dict:
    """The decaying-average baselines of ``TraceGraph_ELBO`` in Pyro's param store."""
    store = pyro.get_param_store()
    return {name: store[name] for name in store.keys() if name.startswith("__baseline")}


@contextlib.contextmanager
def _measuring(seed: int):
    """Leaves training as it would be without the measurement inside: the global random state
    (measurements draw from one seeded with ``seed``) and the decaying-average baselines, which
    every gradient draw of ``TraceGraph_ELBO`` updates."""
    baselines = _baselines()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield
    store = pyro.get_param_store()
    for name, value in baselines.items():
        store[name] = value


class _FrozenBaselines:
    """``elbo`` with the decaying-average baselines put back before every gradient draw: each
    draw then sees the baseline training left, as the next training step would, instead of one
    that has adapted to the measured batch over the previous draws."""

    def __init__(self, elbo):
        self.elbo, self.baselines = elbo, _baselines()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        store = pyro.get_param_store()
        for name, value in self.baselines.items():
            store[name] = value
        return self.elbo.loss_and_grads(model, guide, *args, **kwargs)


def train(method: str, data: torch.Tensor, config: DemoConfig) -> DemoResult:
    """Trains the VAE with ``method`` (one of :data:`METHODS`) and evaluates it: the discrete
    ELBO after each epoch and at the end (:func:`~pyro_relax.infer.discrete_elbo`), and the
    encoder's gradient SNR every ``snr_every`` epochs and at the end (:func:`encoder_snr`)."""
    pyro.clear_param_store()
    encoder, decoder = _networks(method, config, data.shape[-1])
    initial = [p.detach().clone() for p in encoder.parameters()]
    total_steps = config.epochs * _steps_per_epoch(len(data), config)
    model, guide, loss, svi, schedule = _svi(method, encoder, decoder, config, total_steps)
    pyro.set_rng_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    snr_batch = data[: config.batch_size]

    def elbo(num_samples, seed):
        with _measuring(seed):
            estimate = discrete_elbo(model, guide, data, num_samples=num_samples)
        return estimate.value / len(data), estimate.standard_error / len(data)

    def snr(seed):
        with _measuring(seed):
            frozen = _FrozenBaselines(loss)
            return encoder_snr(model, guide, frozen, snr_batch, encoder, config.snr_draws)

    curve, snr_curve, seconds = [], [], 0.0
    with tqdm(range(config.epochs), desc=method.split(",")[0], unit="epoch") as epochs:
        for epoch in epochs:
            start = time.perf_counter()
            for index in _batches(len(data), config, shuffle):
                svi.step(data[index])
                schedule.step()
            seconds += time.perf_counter() - start
            curve.append(elbo(_CURVE_SAMPLES, epoch)[0])
            if (epoch + 1) % config.snr_every == 0 or epoch + 1 == config.epochs:
                snr_curve.append((epoch + 1, snr(epoch)))
            epochs.set_postfix(elbo=f"{curve[-1]:.2f}")
    final, final_se = elbo(config.eval_samples, config.seed)
    changed = any(not torch.equal(a, b) for a, b in zip(initial, encoder.parameters(), strict=True))
    return DemoResult(method, curve, final, final_se, snr_curve, snr_curve[-1][1], seconds, changed)


def format_table(results, config: DemoConfig) -> str:
    """A plain-text table of each run's final discrete ELBO, gradient SNR and training time."""
    width = max(len(r.method) for r in results)
    header = f"{'method':<{width}}  {'ELBO (nats/image)':>19}  {'gradient SNR':>12}  {'seconds':>7}"
    rows = [
        f"{r.method:<{width}}  {r.final_elbo:>10.3f} ± {r.final_elbo_se:<6.3f}  "
        f"{r.final_snr:>12.3f}  {r.seconds:>7.1f}"
        for r in results
    ]
    note = (
        f"ELBO of the discrete model (truncated at {config.truncation} outcomes under "
        f"pyro_relax.infer.discretize, Poisson({config.prior_rate:g}) prior; higher is better) "
        f"over all images, {config.eval_samples} samples, ± one standard error. Gradient SNR: "
        f"norm of the mean over root total variance of the encoder's gradient of the training "
        f"loss, {config.snr_draws} draws on one batch after training, each with the baseline "
        f"training left (higher is better). "
        f"Every run: "
        f"{config.epochs} epochs, Adam(lr={config.learning_rate:g}), batch {config.batch_size}, "
        f"seed {config.seed}; seconds count training steps only."
    )
    curves = [
        f"{r.method.split(',')[0]} SNR by epoch: "
        + ", ".join(f"{epoch}: {snr:.2f}" for epoch, snr in r.snr_curve)
        for r in results
    ]
    return "\n".join([header, "-" * len(header), *rows, note, *curves])


def plot_curves(results, path) -> None:
    """Writes each run's per-epoch discrete ELBO and gradient SNR to a PNG file at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display: any backend set elsewhere is not needed here
    import matplotlib.pyplot as plt

    figure, (elbo_axes, snr_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
    for result in results:
        label = result.method.split(",")[0]
        elbo_axes.plot(range(1, len(result.curve) + 1), result.curve, label=label)
        epochs, snr = zip(*result.snr_curve, strict=True)
        snr_axes.plot(epochs, snr, marker="o", label=label)
    elbo_axes.set_xlabel("epoch")
    elbo_axes.set_ylabel("ELBO of the discrete model (nats/image)")
    elbo_axes.set_title("Discrete ELBO (higher is better)")
    elbo_axes.legend()
    snr_axes.set_xlabel("epoch")
    snr_axes.set_ylabel("encoder gradient: |mean| / sqrt(total variance)")
    snr_axes.set_yscale("log")
    snr_axes.set_title("Gradient signal-to-noise ratio")
    snr_axes.legend()
    figure.suptitle("Poisson-latent VAE on the digits: GenGS, GenGS-IMP and REINFORCE")
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
    """Trains with every method, prints the table and writes the plot to ``output``."""
    require_dependencies()
    data = load_binary_digits()
    with _single_threaded():
        results = [train(method, data, config) for method in METHODS]
    print(format_table(results, config))
    plot_curves(results, output)
    print(f"training curves written to {output}")
    return results

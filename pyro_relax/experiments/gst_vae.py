"""The MNIST VAE with categorical latents of the GST paper (Fan et al., 2022, Tables 2 and 3,
Figure 3).

A VAE on binarized MNIST whose latent is 30 categorical variables of 10 categories each,
trained with the straight-through estimators of the paper, and every trained model scored by
the same objective: the negative ELBO of the *discrete* model.

Model: ``z`` is ``--latents`` (30) independent one-hot categoricals of ``--categories`` (10)
classes under the uniform prior ``OneHotCategorical(logits=0)``; the image is Bernoulli with
logits ``decoder(z)`` of the flattened one-hot latents. Networks: encoder 784-512-256-300 giving
the guide's logits, of shape (30, 10), and the mirrored decoder 300-256-512-784, ReLU, PyTorch's
default initialization (``--hidden``). Adam (``--lr`` 1e-3), batch 100, 40 epochs, one sample per
image, a fixed temperature (``--temperature``, the paper's 1.0, 0.5 and 0.1). Training images are
binarized dynamically (a fresh Bernoulli image at every batch), evaluation images once, with a
fixed seed, the same for every run.

Estimators: the guide's site is the library's straight-through class inside
``pyro.plate("data", B)`` with ``.to_event(1)`` over the latents; its forward value is an exact
one-hot draw of ``Categorical(softmax(logits))`` and its gradient that of a surrogate:

- ``STGS``: :class:`~pyro_relax.STGSCategorical` (Gumbel-Softmax with the noise that chose
  the sample);
- ``GST-1.0``, ``GST-0.8``, ``GST-1.2``: :class:`~pyro_relax.GappedSTCategorical` with the gap
  ``kappa`` of the name; ``GST-pi``: the same with ``gap="expected"``, the expected gap
  ``-log(1 - pi_D) / pi_D`` between the two largest Gumbel-perturbed logits;
- ``GR-MC100``, ``GR-MC10``: :class:`~pyro_relax.GRMCKCategorical` with 100 or 10 conditional
  Gumbel draws (Rao-Blackwellized STGS);
- ablations: ``ST`` (:class:`~pyro_relax.STCategorical`, ``softmax(logits / tau)``),
  ``GST-0.0`` (no gap) and ``NZ-GST-1.0`` (gap 1, ``detach_perturbations=False``: gradients
  also flow through the perturbations ``m1, m2``).

Two training loops (``--loop``), seeded identically, which draw the same noise: ``pyro``, SVI
with ``TraceMeanField_ELBO`` (the KL of the straight-through class to the one-hot prior is
registered, so it is the analytic categorical KL plus the likelihood of the straight-through
sample); ``torch``, the same objective written without Pyro (``rsample``, decoder, Bernoulli
log-likelihood, minus ``torch.distributions.kl_divergence`` of the guide's categorical to the
uniform one) and ``torch.optim.Adam``: the check that SVI loses nothing.

Scoring, the same for every estimator and loop: the negative ELBO of the discrete model in nats
per image, :func:`pyro_relax.infer.discrete_elbo` of the model and the trained guide (the
straight-through classes become ``OneHotCategorical`` under
:func:`~pyro_relax.infer.discretize`), ``--eval-samples`` draws per image under a private
generator, with its standard error: ``train_neg_elbo`` on the whole training set and
``test_neg_elbo`` on the test set, after training. ``history`` holds per epoch the training loss
(per image), the test negative ELBO with two draws per image, and Figure 3's measurement: the
variance of the encoder's gradient of the training loss (summed over the encoder's parameters,
and their mean signal-to-noise ratio, ``None`` where an element's gradient is exact) over
``--gradient-draws`` draws on a fixed batch of 100 training images, by
:func:`pyro_relax.infer.gradient_moments` under a private generator (the same function for
both loops; training's state and noise are left alone).

The paper reports the test negative ELBO, ten seeds, tau 1.0 / 0.5 (Table 2): STGS 122.96 /
118.96, GR-MC100 120.65 / 117.88, GST-1.0 113.63 / 108.43, GST-1.2 112.58 / 107.33, GST-pi
112.72 / 109.42, GST-0.8 113.61 / 111.54; ablations (Table 3, on its dev set): ST 123.35 /
133.84, GST-0.0 115.48 / 119.10, NZ-GST-1.0 205.88 / 205.90. They are in
:data:`PAPER_TEST_NEG_ELBO`.
"""

import argparse
import dataclasses
import itertools
import math
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled

from pyro_relax._cli import integer_at_least, positive_int, temperature_value
from pyro_relax.distributions import (
    GappedSTCategorical,
    GRMCKCategorical,
    STCategorical,
    STGSCategorical,
)
from pyro_relax.experiments import common, image_vae
from pyro_relax.experiments.data import batches
from pyro_relax.experiments.vae import discrete_neg_elbo
from pyro_relax.infer import gradient_moments

__all__ = [
    "DESCRIPTION",
    "ESTIMATORS",
    "LOOPS",
    "PAPER_TEST_NEG_ELBO",
    "add_arguments",
    "encoder_gradient_variance",
    "guide_distribution",
    "lead_rows",
    "model_and_guide",
    "run",
    "torch_loss",
    "train",
    "write_reports",
]

DESCRIPTION = (
    "VAE with 30 categorical latents of 10 classes on MNIST (GST paper, Tables 2-3, Figure 3): "
    "GST, STGS, GR-MCK and ST, trained by Pyro SVI or a plain PyTorch loop, scored by the "
    "ELBO of the discrete model"
)

# name: (straight-through class, its options).
_GUIDES = {
    "STGS": (STGSCategorical, {}),
    "GST-1.0": (GappedSTCategorical, {"gap": 1.0}),
    "GST-pi": (GappedSTCategorical, {"gap": "expected"}),
    "GST-0.8": (GappedSTCategorical, {"gap": 0.8}),
    "GST-1.2": (GappedSTCategorical, {"gap": 1.2}),
    "GR-MC100": (GRMCKCategorical, {"num_draws": 100}),
    "GR-MC10": (GRMCKCategorical, {"num_draws": 10}),
    "ST": (STCategorical, {}),
    "GST-0.0": (GappedSTCategorical, {"gap": 0.0}),
    "NZ-GST-1.0": (GappedSTCategorical, {"gap": 1.0, "detach_perturbations": False}),
}
ESTIMATORS = tuple(_GUIDES)
LOOPS = ("pyro", "torch")
# The paper's test negative ELBO on MNIST (nats), (estimator, temperature): Table 2, and the
# ablations of Table 3 (reported on its dev set).
PAPER_TEST_NEG_ELBO = {
    ("STGS", 1.0): 122.96,
    ("STGS", 0.5): 118.96,
    ("GR-MC100", 1.0): 120.65,
    ("GR-MC100", 0.5): 117.88,
    ("GST-1.0", 1.0): 113.63,
    ("GST-1.0", 0.5): 108.43,
    ("GST-1.2", 1.0): 112.58,
    ("GST-1.2", 0.5): 107.33,
    ("GST-pi", 1.0): 112.72,
    ("GST-pi", 0.5): 109.42,
    ("GST-0.8", 1.0): 113.61,
    ("GST-0.8", 0.5): 111.54,
    ("ST", 1.0): 123.35,
    ("ST", 0.5): 133.84,
    ("GST-0.0", 1.0): 115.48,
    ("GST-0.0", 0.5): 119.10,
    ("NZ-GST-1.0", 1.0): 205.88,
    ("NZ-GST-1.0", 0.5): 205.90,
}
RESULTS_NAME = "gst_vae"
DEFAULT_EPOCHS = 40
DEFAULT_LATENTS = 30
DEFAULT_CATEGORIES = 10
DEFAULT_HIDDEN = (512, 256)
DEFAULT_TEMPERATURES = (1.0, 0.5)
# Smoke runs (CI): the digits, one epoch of three batches, small networks.
_SMOKE = {
    "epochs": 1,
    "steps_per_epoch": 3,
    "latents": 8,
    "hidden": (64, 32),
    "eval_samples": 2,
    "gradient_draws": 3,
}
_CURVE_SAMPLES = 2  # draws per test image of the negative ELBO after each epoch
_GRADIENT_IMAGES = 100  # the fixed batch of training images Figure 3's variance is measured on
# Seeds of the private generators of the evaluations (far from any training seed's stream).
_CURVE_SEED, _TEST_SEED, _TRAIN_SEED, _GRADIENT_SEED = 0, 10**6, 2 * 10**6, 3 * 10**6


# --- Model, guide and the two losses ------------------------------------------------------


def guide_distribution(estimator: str, temperature, logits):
    """The guide's straight-through distribution of ``estimator`` over one-hot latents with
    ``logits`` of shape ``(..., latents, categories)``.

    Example:
        >>> d = guide_distribution("GST-pi", 0.5, torch.zeros(3, 10))
        >>> type(d).__name__, d.gap, d.batch_shape
        ('GappedSTCategorical', 'expected', torch.Size([3]))
    """
    if estimator not in _GUIDES:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    cls, options = _GUIDES[estimator]
    return cls(temperature, logits=logits, **options)


def model_and_guide(estimator, encoder, decoder, temperature, latents: int, categories: int):
    """The VAE's model (uniform one-hot prior, Bernoulli pixels with logits ``decoder(z)`` of the
    flattened latents) and guide (``estimator``'s class with logits ``encoder(x)``), both in a
    plate ``"data"`` over the images, for SVI and for scoring.

    Example:
        >>> from torch import nn
        >>> pyro.clear_param_store()
        >>> model, guide = model_and_guide("STGS", nn.Linear(4, 6), nn.Linear(6, 4), 1.0, 3, 2)
        >>> trace = pyro.poutine.trace(guide).get_trace(torch.zeros(5, 4))
        >>> trace.nodes["z"]["value"].shape
        torch.Size([5, 3, 2])
        >>> pyro.clear_param_store()
    """
    device = next(decoder.parameters()).device
    prior = dist.OneHotCategorical(logits=torch.zeros(latents, categories, device=device))

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior.expand([x.shape[0], latents]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z.flatten(-2))).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        logits = encoder(x).view(x.shape[0], latents, categories)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", guide_distribution(estimator, temperature, logits).to_event(1))

    return model, guide


def torch_loss(estimator, encoder, decoder, temperature, x, latents: int, categories: int):
    """The negative ELBO that ``TraceMeanField_ELBO`` computes for :func:`model_and_guide`,
    summed over the batch ``x``, written without Pyro: the straight-through sample's Bernoulli
    log-likelihood minus the KL to the uniform one-hot prior (the KL the library registers and
    ``TraceMeanField_ELBO`` takes; torch's categorical KL would read the host on a GPU)."""
    logits = encoder(x).view(x.shape[0], latents, categories)
    guide = guide_distribution(estimator, temperature, logits)
    z = guide.rsample()
    log_likelihood = torch.distributions.Bernoulli(logits=decoder(z.flatten(-2))).log_prob(x)
    uniform = torch.distributions.OneHotCategorical(logits=torch.zeros_like(logits))
    kl = torch.distributions.kl_divergence(guide, uniform)
    return (kl.sum(-1) - log_likelihood.sum(-1)).sum()


class _PyroLoop:
    """Training steps by Pyro SVI with ``TraceMeanField_ELBO``."""

    def __init__(self, model, guide, lr):
        self.optimizer = pyro.optim.Adam({"lr": lr})
        # A known plate nesting: no extra guide run (and draw) to guess it at the first step.
        self.svi = SVI(model, guide, self.optimizer, TraceMeanField_ELBO(max_plate_nesting=1))

    def step(self, x):
        return self.svi.step(x)

    def state_dict(self):
        return self.optimizer.get_state()

    def load_state_dict(self, state):
        self.optimizer.set_state(state)


class _TorchLoop:
    """Training steps by ``torch.optim.Adam`` on ``loss(x)``; a step returns its loss as a tensor
    (no host read)."""

    def __init__(self, loss, parameters, lr):
        self.loss = loss
        self.optimizer = torch.optim.Adam(parameters, lr=lr)

    def step(self, x):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


def _training_loop(settings, encoder, decoder, temperature, model, guide):
    if settings.loop == "pyro":
        return _PyroLoop(model, guide, settings.lr)

    def loss(x):
        return torch_loss(
            settings.estimator, encoder, decoder, temperature, x, settings.latents,
            settings.categories,
        )  # fmt: skip

    return _TorchLoop(loss, [*encoder.parameters(), *decoder.parameters()], settings.lr)


# --- Figure 3: the variance of the encoder's gradient ---------------------------------------


def encoder_gradient_variance(model, guide, encoder, x, *, num_draws: int, seed: int) -> dict:
    """The variance of the encoder's gradient of the training loss (``TraceMeanField_ELBO``, the
    negative ELBO summed over the batch ``x``) over ``num_draws`` draws, summed over the
    encoder's parameters, and their signal-to-noise ratio averaged over all elements.

    The draws come from a private generator seeded with ``seed``; the parameters, their
    gradients and the global random state are left as they were.
    """
    with common.private_rng(seed, x.device):
        moments = gradient_moments(
            model, guide, TraceMeanField_ELBO(max_plate_nesting=1), x, num_draws=num_draws,
            params=list(encoder.named_parameters()),
        )  # fmt: skip
    variance = sum(float(m.variance.sum()) for m in moments.values())
    snr = float(torch.cat([m.snr.flatten() for m in moments.values()]).nanmean())
    # Infinite once an element's gradient is exact (the same in every draw): null in the
    # results, where Python's json would write Infinity, which strict JSON readers refuse.
    return {"grad_variance": variance, "grad_snr": snr if math.isfinite(snr) else None}


# --- Training -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Every setting that changes a run's numbers, resolved (``dataset`` is the data set's name,
    ``steps_per_epoch`` the batches each epoch trains on). They identify the run's record in
    the results, where each is a field of the record; all but ``eval_samples``, which changes
    only the final score, name its checkpoint.

    ``gradient_draws`` changes no trained number (the measurement draws from its own generator)
    but what the history holds. Left out because they do not change what is computed:
    ``--threads``, ``--no-validation``, ``--data-dir``, ``--results`` and ``--smoke`` (which
    only changes defaults; the values it picks are here).
    """

    dataset: str
    estimator: str
    temperature: float
    loop: str
    seed: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    lr: float
    latents: int
    categories: int
    hidden: tuple
    eval_samples: int
    gradient_draws: int
    device: str


def _record_settings(record) -> dict:
    """The settings of the run that made ``record``, as ``dataclasses.asdict`` of its
    :class:`_Settings`."""
    return image_vae.record_settings(_Settings, record)


def _checkpoint(results: Path, settings: _Settings) -> common.Checkpoint:
    label = (
        f"gst-vae-{settings.dataset}-{settings.estimator}-t{settings.temperature}-"
        f"{settings.loop}-seed{settings.seed}"
    )
    return image_vae.settings_checkpoint(results, label, settings)


def _after_epoch(epoch: int) -> None:
    """Called after each epoch's checkpoint is written (the tests interrupt runs here)."""


def _networks(settings: _Settings, num_pixels: int, device):
    width = settings.latents * settings.categories
    encoder = image_vae.mlp([num_pixels, *settings.hidden, width]).to(device)
    decoder = image_vae.mlp([width, *settings.hidden[::-1], num_pixels]).to(device)
    return encoder, decoder


class _Run:
    """The state of one run (networks, model and guide, training loop, batch order) and its
    per-epoch work."""

    def __init__(self, settings: _Settings, data):
        self.settings = settings
        self.data = data
        self.device = torch.device(settings.device)
        common.seed_everything(settings.seed)
        # The torch loop registers its networks here only to be measured and scored.
        pyro.clear_param_store()
        self.encoder, self.decoder = _networks(settings, data.num_pixels, self.device)
        temperature = torch.tensor(settings.temperature, device=self.device)
        self.model, self.guide = model_and_guide(
            settings.estimator, self.encoder, self.decoder, temperature, settings.latents,
            settings.categories,
        )  # fmt: skip
        self.loop = _training_loop(
            settings, self.encoder, self.decoder, temperature, self.model, self.guide
        )
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.eval_train, self.eval_test = image_vae.evaluation_images(data, "dynamic", self.device)

    def state_dict(self) -> dict:
        return {
            "encoder": self.encoder.state_dict(),
            "decoder": self.decoder.state_dict(),
            "optimizer": self.loop.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.decoder.load_state_dict(state["decoder"])
        self.loop.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    def named_parameters(self):
        """The networks' parameters, named."""
        yield from self.encoder.named_parameters(prefix="encoder")
        yield from self.decoder.named_parameters(prefix="decoder")

    def train_epoch(self, bar) -> float:
        """One epoch of training; the loss per image, averaged over the epoch."""
        s = self.settings
        total = 0.0
        images = batches(self.data.train_images, s.batch_size, generator=self.generator)
        for x in itertools.islice(images, s.steps_per_epoch):
            total += self.loop.step(x.to(self.device))
            bar.update()
        return float(total) / (s.steps_per_epoch * s.batch_size)

    def score(self, images, num_samples: int, seed: int) -> tuple:
        """The discrete model's negative ELBO per image and its standard error."""
        return discrete_neg_elbo(self.model, self.guide, images, num_samples=num_samples, seed=seed)

    def measure(self, epoch: int) -> dict:
        """After ``epoch``: the test negative ELBO and the encoder's gradient variance."""
        value, error = self.score(self.eval_test, _CURVE_SAMPLES, _CURVE_SEED + epoch)
        entry = {"test_neg_elbo": value, "test_neg_elbo_se": error}
        draws = self.settings.gradient_draws
        if draws:
            x = self.eval_train[:_GRADIENT_IMAGES]
            moments = encoder_gradient_variance(
                self.model, self.guide, self.encoder, x, num_draws=draws,
                seed=_GRADIENT_SEED + epoch,
            )  # fmt: skip
            entry.update(moments)
        return entry


def train(settings: _Settings, data, checkpoint=None, *, quiet=False) -> dict:
    """Trains one VAE (one estimator, temperature, loop and seed) and returns its record.

    With a :class:`~pyro_relax.experiments.common.Checkpoint`, the state is saved after every
    epoch and the trained model with its record at the end, and a saved state is resumed (see
    :func:`~pyro_relax.experiments.image_vae.finished_record`); the caller removes the
    checkpoint once the record is merged.
    """
    run = _Run(settings, data)
    state = checkpoint.load() if checkpoint is not None else None
    record = image_vae.finished_record(state, settings, _record_settings)
    if record is not None:
        return record
    if state is not None and "epoch" not in state:
        state = None  # a record alone (written before finished runs kept their model): train
    start, history, seconds = 0, [], 0.0
    if state is not None:
        with state.restoring():
            run.load_state_dict(state["run"])
            start, history, seconds = state["epoch"], state["history"], state["seconds"]
    steps = settings.steps_per_epoch
    desc = f"{settings.estimator} tau={settings.temperature} {settings.loop}"
    bar = common.progress(
        total=settings.epochs * steps, initial=start * steps, desc=desc, unit="step", disable=quiet
    )
    with bar:
        for epoch in range(start, settings.epochs):
            where = f"{desc}, epoch {epoch + 1}"
            with common.diverging(where, run.named_parameters, settings.lr):
                began = time.perf_counter()
                loss = run.train_epoch(bar)  # its float() waits for the device
                seconds += time.perf_counter() - began
                loss = common.finite(loss, "the loss", where, settings.lr)
                began = time.perf_counter()
                measured = run.measure(epoch + 1)
                for name, value in measured.items():  # the gradient's variance overflows first
                    if isinstance(value, float):
                        what = "the " + name.replace("grad_", "gradient ").replace("_", " ")
                        common.finite(value, what, where, settings.lr)
            entry = {"epoch": epoch + 1, "loss": loss, **measured}
            entry.update(
                temperature=settings.temperature,
                seconds=seconds,
                eval_seconds=time.perf_counter() - began,
            )
            history.append(entry)
            bar.set_postfix(test=f"{entry['test_neg_elbo']:.2f}", refresh=False)
            state = {
                "epoch": epoch + 1, "run": run.state_dict(), "history": history,
                "seconds": seconds,
            }  # fmt: skip
            if checkpoint is not None:
                checkpoint.save(state)
            _after_epoch(epoch + 1)
    record = _record(settings, run, history, seconds)
    if checkpoint is not None:
        checkpoint.save({**state, "record": record})
    return record


def _record(settings: _Settings, run: _Run, history: list, seconds: float) -> dict:
    began = time.perf_counter()
    train_value, train_error = run.score(run.eval_train, settings.eval_samples, _TRAIN_SEED)
    test_value, test_error = run.score(run.eval_test, settings.eval_samples, _TEST_SEED)
    paper = PAPER_TEST_NEG_ELBO.get((settings.estimator, settings.temperature))
    return {
        **dataclasses.asdict(settings),
        "hidden": list(settings.hidden),
        "train_neg_elbo": train_value,
        "train_neg_elbo_se": train_error,
        "test_neg_elbo": test_value,
        "test_neg_elbo_se": test_error,
        "paper_test_neg_elbo": paper if settings.dataset == "MNIST" else None,
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(settings.epochs, 1),
        "eval_seconds": time.perf_counter() - began,
        "binarization": "dynamic",
        "objective": (
            "TraceMeanField_ELBO" if settings.loop == "pyro" else "torch: ELBO, categorical KL"
        ),
        "scorer": "pyro_relax.infer.discrete_elbo",
        "threads": torch.get_num_threads(),
        "validation": is_validation_enabled(),
        "machine": common.machine(),
        "history": history,
    }


# --- Reports --------------------------------------------------------------------------------


def _group_key(record, *ignored) -> str:
    """The settings of ``record`` but its seed (and the ``ignored`` ones): runs with equal keys
    differ only in those."""
    ignored = {"seed", *ignored}
    return common.settings_digest(
        {k: v for k, v in _record_settings(record).items() if k not in ignored}
    )


def _order(record):
    estimators = list(ESTIMATORS)
    return (
        record.get("dataset", ""),
        -record.get("temperature", 0.0),
        record.get("loop", ""),
        estimators.index(record["estimator"])
        if record.get("estimator") in estimators
        else len(estimators),
        record.get("seed", 0),
    )


def _groups(records) -> list:
    """Lists of records that differ only in their seed, in the tables' order."""
    groups = {}
    for record in sorted(records, key=_order):
        groups.setdefault(_group_key(record), []).append(record)
    return list(groups.values())


# What the tables and labels show of a group's settings; the others, where groups differ in
# them, are named in a `settings` column.
_SHOWN = ("dataset", "estimator", "temperature", "loop", "epochs", "seed")


def _differing(groups, *shown) -> list:
    """For each group, the settings in which it differs from the others, apart from
    ``_SHOWN`` and ``shown``."""
    firsts = [group[0] for group in groups]
    return common.differing_settings(firsts, _record_settings, shown=(*_SHOWN, *shown))


def _mean_sd(values) -> tuple:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _plus_minus(mean, sd) -> str:
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def _summary_row(group) -> dict:
    first = group[0]
    test_mean, test_sd = _mean_sd([r["test_neg_elbo"] for r in group])
    train_mean, train_sd = _mean_sd([r["train_neg_elbo"] for r in group])
    return {
        **{k: first.get(k) for k in ("dataset", "estimator", "temperature", "loop", "epochs")},
        "seeds": len(group),
        "test_neg_elbo": _plus_minus(test_mean, test_sd),
        "train_neg_elbo": _plus_minus(train_mean, train_sd),
        "paper_test_neg_elbo": first.get("paper_test_neg_elbo"),
        "seconds_per_epoch": _mean_sd([r["seconds_per_epoch"] for r in group])[0],
    }


def lead_rows(records, baseline: str = "STGS", contender: str = "GST-1.0") -> list:
    """Per group of settings (temperature, loop, ...), the lead of ``contender`` over
    ``baseline`` in test negative ELBO over seeds (``baseline``'s mean minus ``contender``'s: a
    positive lead is a lower negative ELBO), its standard error and Welch's two-sided t-test
    p-value (``None`` with fewer than two seeds each)."""
    by_estimator = {}
    groups = _groups(records)
    for group, differing in zip(groups, _differing(groups), strict=True):
        key = _group_key(group[0], "estimator")
        by_estimator.setdefault(key, {})[group[0]["estimator"]] = (group, differing)
    return [
        _lead_row(pair[baseline][0], pair[contender][0], baseline, contender)
        | {"settings": pair[baseline][1]}
        for pair in by_estimator.values()
        if baseline in pair and contender in pair
    ]


def _lead_row(baseline, contender, baseline_name, contender_name) -> dict:
    from scipy import stats

    a = [r["test_neg_elbo"] for r in baseline]
    b = [r["test_neg_elbo"] for r in contender]
    (mean_a, sd_a), (mean_b, sd_b) = _mean_sd(a), _mean_sd(b)
    enough = len(a) >= 2 and len(b) >= 2
    first = baseline[0]
    paper = [
        PAPER_TEST_NEG_ELBO.get((n, first["temperature"])) for n in (baseline_name, contender_name)
    ]
    return {
        **{k: first.get(k) for k in ("dataset", "temperature", "loop", "epochs")},
        baseline_name: _plus_minus(mean_a, sd_a),
        contender_name: _plus_minus(mean_b, sd_b),
        "seeds": f"{len(a)} / {len(b)}",
        "lead": mean_a - mean_b,
        "lead_se": math.sqrt(sd_a**2 / len(a) + sd_b**2 / len(b)) if enough else None,
        "p_value": float(stats.ttest_ind(a, b, equal_var=False).pvalue) if enough else None,
        "paper_lead": (
            paper[0] - paper[1] if None not in paper and first["dataset"] == "MNIST" else None
        ),
    }


def _markdown(records) -> str:
    groups = _groups(records)
    summary = common.markdown_table(
        [_summary_row(group) for group in groups],
        ["dataset", "estimator", "temperature", "loop", "epochs", "seeds", "test_neg_elbo",
         "train_neg_elbo", "paper_test_neg_elbo", "seconds_per_epoch"],
        {"paper_test_neg_elbo": ".2f", "seconds_per_epoch": ".1f"},
        _differing(groups),
    )  # fmt: skip
    leads = lead_rows(records)
    lead = common.markdown_table(
        leads,
        ["dataset", "temperature", "loop", "epochs", "STGS", "GST-1.0", "seeds", "lead",
         "lead_se", "p_value", "paper_lead"],
        {"lead": ".2f", "lead_se": ".2f", "p_value": ".3g", "paper_lead": ".2f"},
        [row["settings"] for row in leads],
    )  # fmt: skip
    header = (
        "# Categorical VAE (GST paper, Tables 2 and 3)\n\n"
        "Negative ELBO of the discrete model in nats per image (lower is better), scored by "
        "`pyro_relax.infer.discrete_elbo` for every estimator and loop, after training: mean ± "
        "sample standard deviation over `seeds` runs. `paper_test_neg_elbo` is the paper's "
        "(Table 2; the ablations ST, GST-0.0 and NZ-GST-1.0 from Table 3, on its dev set). "
        "`loop`: `pyro` is SVI with TraceMeanField_ELBO, `torch` the same objective in a "
        "plain PyTorch loop. Generated by `pyro-relax experiment gst-vae` from "
        f"`{RESULTS_NAME}.json`, which holds each run's settings, command and curves.\n\n"
    )
    lead_header = (
        "\n## The lead of GST-1.0 over STGS\n\n"
        "STGS's test negative ELBO minus GST-1.0's (positive: GST-1.0 is better), its standard "
        "error, and the two-sided p-value of Welch's t-test over seeds (with at least two "
        "seeds each); `paper_lead` from the paper's Table 2.\n\n"
    )
    return header + summary + lead_header + lead


def _mean_curve(group, key) -> tuple:
    """Epochs and the mean over ``group``'s seeds of the history's ``key`` (where all have it)."""
    length = min(len(r["history"]) for r in group)
    epochs, values = [], []
    for i in range(length):
        points = [r["history"][i].get(key) for r in group]
        if None not in points:
            epochs.append(group[0]["history"][i]["epoch"])
            values.append(sum(points) / len(points))
    return epochs, values


def _plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    panels = {}
    groups = _groups([r for r in records if r.get("history")])
    for group, differing in zip(groups, _differing(groups), strict=True):
        group = [dict(record, differing=differing) for record in group]
        panels.setdefault((group[0]["dataset"], group[0]["temperature"]), []).append(group)
    columns = max(len(panels), 1)
    figure, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), squeeze=False)
    for column, ((dataset, temperature), groups) in enumerate(panels.items()):
        top, bottom = axes[0][column], axes[1][column]
        for group in groups:
            estimator, loop = group[0]["estimator"], group[0]["loop"]
            slot = ESTIMATORS.index(estimator) if estimator in ESTIMATORS else len(ESTIMATORS)
            style = {"color": f"C{slot}", "linestyle": "-" if loop == "pyro" else "--"}
            label = f"{estimator} ({loop}, {len(group)} seed{'s' if len(group) > 1 else ''})"
            label += f", {group[0]['differing']}" if group[0]["differing"] else ""
            top.plot(*_mean_curve(group, "test_neg_elbo"), marker=".", label=label, **style)
            epochs, variance = _mean_curve(group, "grad_variance")
            if epochs:
                bottom.plot(epochs, variance, marker=".", label=label, **style)
        top.set_title(f"{dataset}, temperature {temperature}")
        top.set_ylabel("test negative ELBO, discrete model (nats)")
        bottom.set_yscale("log")
        bottom.set_ylabel("variance of the encoder's gradient")
        for ax in (top, bottom):
            ax.set_xlabel("epoch")
            if ax.get_lines():  # no gradient curves with --gradient-draws 0
                ax.legend(fontsize="small")
    figure.tight_layout()
    common.save_figure(figure, path)
    plt.close(figure)


def write_reports(results: Path, records) -> None:
    """Writes the Markdown tables and the plot of curves of ``records`` next to the JSON."""
    common.atomic_write_text(results / f"{RESULTS_NAME}.md", _markdown(records))
    _plot(records, results / f"{RESULTS_NAME}.png")


# --- Command line ---------------------------------------------------------------------------


def _gradient_draws(text: str) -> int:
    value = integer_at_least(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be 0 (none) or at least 2 (a variance), got 1")
    return value


def add_arguments(parser) -> None:
    """Adds this experiment's options to its subcommand's ``parser``."""
    image_vae.add_training_arguments(
        parser, estimators=ESTIMATORS, default_epochs=DEFAULT_EPOCHS, default_batch_size=100
    )
    parser.add_argument(
        "--temperature",
        nargs="+",
        type=temperature_value,
        default=list(DEFAULT_TEMPERATURES),
        help="temperature(s) of the surrogates (default: 1.0 0.5; the paper also tried 0.1)",
    )
    parser.add_argument(
        "--loop",
        nargs="+",
        default=["pyro"],
        choices=LOOPS,
        help="training loop(s): pyro (SVI, TraceMeanField_ELBO) or torch (default: pyro)",
    )
    parser.add_argument(
        "--latents", type=positive_int, help=f"categorical latents (default {DEFAULT_LATENTS})"
    )
    parser.add_argument(
        "--categories",
        type=integer_at_least(2),
        help=f"categories of each latent (default {DEFAULT_CATEGORIES})",
    )
    parser.add_argument(
        "--hidden",
        type=image_vae.layer_sizes,
        help="encoder hidden sizes, mirrored in the decoder (default 512,256)",
    )
    parser.add_argument(
        "--eval-samples",
        type=integer_at_least(2),
        help="guide draws per image of the final scores (default 10; smoke: 2)",
    )
    parser.add_argument(
        "--gradient-draws",
        type=_gradient_draws,
        help="draws of the encoder's gradient measured after each epoch, 0 for none "
        "(default 50; smoke: 3)",
    )


def _settings(args, data, estimator: str, temperature: float, loop: str) -> _Settings:
    """The settings of one run of the command line ``args`` on the data set ``data``."""
    pick = image_vae.smoke_picker(args, _SMOKE)
    return _Settings(
        dataset=data.name,
        estimator=estimator,
        temperature=temperature,
        loop=loop,
        seed=args.seed,
        epochs=pick(args.epochs, "epochs", DEFAULT_EPOCHS),
        steps_per_epoch=image_vae.steps_per_epoch(args, data, pick),
        batch_size=args.batch_size,
        lr=args.lr,
        latents=pick(args.latents, "latents", DEFAULT_LATENTS),
        categories=pick(args.categories, "categories", DEFAULT_CATEGORIES),
        hidden=pick(args.hidden, "hidden", DEFAULT_HIDDEN),
        eval_samples=pick(args.eval_samples, "eval_samples", 10),
        gradient_draws=pick(args.gradient_draws, "gradient_draws", 50),
        device=args.device,
    )


def run(args) -> int:
    """Trains and scores every requested estimator, temperature and loop; returns the exit
    code."""
    results = Path(args.results)
    path = results / f"{RESULTS_NAME}.json"
    common.read_records(path, write_reports)  # a damaged file stops the run at once
    data = image_vae.dataset(args)
    runs = itertools.product(
        dict.fromkeys(args.temperature),
        dict.fromkeys(args.loop),
        image_vae.expand(args.estimator, ESTIMATORS),
    )
    finished = []
    with common.torch_threads(args.threads), pyro.validation_enabled(not args.no_validation):
        for temperature, loop, estimator in runs:
            settings = _settings(args, data, estimator, temperature, loop)
            checkpoint = _checkpoint(results, settings)
            record = train(settings, data, checkpoint)
            record["command"] = args.command_line
            record["smoke"] = bool(args.smoke)
            common.update_records(
                path, [record], _record_settings, lambda merged: write_reports(results, merged)
            )
            finished.append(checkpoint)
            print(
                f"{record['dataset']} {estimator} tau {temperature} {loop} seed {args.seed}: "
                f"negative ELBO train {record['train_neg_elbo']:.2f}, test "
                f"{record['test_neg_elbo']:.2f} ({record['seconds']:.0f} s)"
            )
    # Only now: until the whole command ends, a finished run's checkpoint holds its record,
    # so that the command run again after an interruption does not train it again.
    for checkpoint in finished:
        checkpoint.remove()
    return 0

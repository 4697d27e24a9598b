"""The count-latent VAE of the GenGS paper (Joo et al., 2020, section 6.2, Table 1).

A VAE on binarized MNIST whose latent is a vector of counts with a Poisson, Geometric or
Negative Binomial prior, trained through Pyro SVI with four estimators, and every trained model
scored by the same objective: the negative ELBO of the *discrete* model.

Model: ``z`` is ``--latents`` (default 32) independent counts from the prior; the image is
Bernoulli with logits ``decoder(z)``. Networks: encoder 784-512-256 and the mirrored decoder
32-256-512-784, ReLU, PyTorch's default initialization (``--hidden``). Adam (``--lr`` 1e-3),
batch 100, single-sample objectives. The temperature is annealed from 1.0 to 0.1 with
:class:`~pyro_relax.ExponentialDecay` over the whole run (all steps of all epochs).

Priors (the paper's, with its truncations): ``Pois(2)`` 12, ``Pois(3)`` 15, ``Geom(.25)`` 25,
``Geom(.5)`` 15, ``NB(3,.5)`` 30, ``NB(5,.3)`` 30. Geometric is torch's, on ``0, 1, ...`` with
success probability ``p`` (mean ``(1-p)/p``). ``NB(r, p)`` is the paper's: the number of failures
before the ``r``-th success, success probability ``p``, mean ``r(1-p)/p`` (11.7 for NB(5,.3),
hence its truncation at 30); in torch's convention (successes of probability ``probs`` before
``total_count`` failures) that is ``NegativeBinomial(total_count=r, probs=1-p)``.

The guide's parameters per latent, from the encoder: a Poisson rate (softplus), a Geometric
success logit, or a Negative Binomial ``total_count`` (softplus) and logit (both learned).

Estimators:

- ``GenGS``: guide ``GenGS<Family>(encoder parameters, tau, n)``, prior the same family at
  the prior's parameters with the same ``n``, ``TraceMeanField_ELBO``: the registered analytic
  KL between the truncated PMFs plus the relaxed likelihood (the paper's objective).
- ``GenGS-IMP``: guide ``TruncatedGenGS(tau, logits=...)`` with free logits of shape
  ``(latents, n)`` from the encoder, the same prior, ``TraceMeanField_ELBO`` (the categorical
  KL ``TruncatedGenGS || GenGS<Family>`` is registered).
- ``GenGS-NP``: automatic truncation in the guide, ``GenGS<Family>(..., max_truncation=M,
  mass=0.999)`` with ``M`` twice the paper's truncation: each latent of each image gets the
  smallest ``n <= M`` whose exact outcomes hold 99.9% of its mass. The prior is the same family
  truncated at ``M``, so model and guide share the outcomes ``0..M-1`` (the guide gives zero
  mass beyond its own ``n``) and the analytic KL applies, with static shapes. The alternative,
  an uncapped ``n`` (the batch maximum) with a prior rebuilt to match it at every step, would
  need a side channel from guide to model and a host read per step.
- ``REINFORCE``: ``dist.Poisson``/``Geometric``/``NegativeBinomial`` in guide and prior,
  ``TraceGraph_ELBO`` with a decaying-average baseline (score-function gradient).
- ``REINFORCE-KL``: the same guide and prior, the KL in closed form and the score function
  only for the likelihood (:class:`AnalyticKLReinforce`; Poisson and Geometric priors, the
  families for which torch has the KL).

Scoring, the same for every estimator: the negative ELBO of the discrete model
(:func:`discrete_neg_elbo`, which is :func:`pyro_relax.infer.discrete_elbo`), with the
untruncated prior (:func:`scoring_model`) and the trained guide under
:func:`~pyro_relax.infer.discretize` (for GenGS guides the truncated PMF, whose last outcome
``n-1`` carries ``P(X >= n-1)``; for REINFORCE the count distribution), estimated with
``--eval-samples`` hard draws per image, with its standard error. Dynamically binarized images
are scored on one fixed binarization (seeded, the same for every run). Reported in nats per
image: ``train_neg_elbo`` on the whole training set and ``test_neg_elbo`` on the test set, after
training. Beside it each record has ``final_relaxed_objective`` and ``best_relaxed_objective``
(the training objective per image averaged over the last epoch, and its lowest epoch: for the
GenGS estimators the relaxed objective, with the truncated prior), ``kl_to_prior`` and
``kl_to_truncated_prior`` (the exact KL from the guide's discrete distribution to the prior and
to the prior truncated as in training, summed over the latents, averaged over the test images).
``history`` holds per epoch the training loss and the discrete negative ELBO on the first
10000 training images and on the test set (two draws per image). Records written before this
scorer (no ``scorer`` field) summed the KL exactly and averaged only the likelihood; the two
agree within the standard error (``tests/test_experiments_vae.py``).

The paper reports the training negative ELBO; its numbers are in :data:`PAPER_TRAIN_NEG_ELBO`.
"""

import dataclasses
import math
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled

from pyro_relax._cli import integer_at_least, positive_int
from pyro_relax.distributions import (
    GenGSGeometric,
    GenGSNegativeBinomial,
    GenGSPoisson,
    TruncatedGenGS,
)
from pyro_relax.experiments import common, image_vae
from pyro_relax.experiments.data import BINARIZATIONS
from pyro_relax.infer import discrete_elbo
from pyro_relax.schedules import ExponentialDecay

__all__ = [
    "AnalyticKLReinforce",
    "DESCRIPTION",
    "ESTIMATORS",
    "PAPER_TRAIN_NEG_ELBO",
    "PRIORS",
    "Prior",
    "add_arguments",
    "build_estimator",
    "discrete_neg_elbo",
    "mean_kl",
    "run",
    "scoring_model",
    "train",
    "write_reports",
]

DESCRIPTION = (
    "count-latent VAE on MNIST (GenGS paper, Table 1): GenGS, GenGS-IMP, GenGS-NP and "
    "REINFORCE, scored by the ELBO of the discrete model"
)

ESTIMATORS = ("GenGS", "GenGS-IMP", "GenGS-NP", "REINFORCE", "REINFORCE-KL")
# The paper's training negative ELBO on MNIST (nats), Table 1; its REINFORCE is "REINFORCE*".
PAPER_TRAIN_NEG_ELBO = {
    ("Pois(2)", "REINFORCE"): 122.81,
    ("Pois(2)", "GenGS"): 103.18,
    ("Pois(2)", "GenGS-IMP"): 96.04,
    ("Pois(2)", "GenGS-NP"): 104.98,
    ("Geom(.5)", "REINFORCE"): 129.20,
    ("Geom(.5)", "GenGS"): 100.92,
    ("Geom(.5)", "GenGS-IMP"): 93.81,
    ("NB(3,.5)", "REINFORCE"): 116.67,
    ("NB(3,.5)", "GenGS-IMP"): 94.52,
}
RESULTS_NAME = "gengs_vae"
DEFAULT_EPOCHS = 100
DEFAULT_LATENTS = 32
DEFAULT_HIDDEN = (512, 256)
# Smoke runs (CI): the digits, one epoch of three batches, small networks.
_SMOKE = {"epochs": 1, "steps_per_epoch": 3, "latents": 8, "hidden": (64, 32), "eval_samples": 2}
NP_MASS = 0.999  # the mass GenGS-NP's automatic truncation captures
_RATE_FLOOR = 1e-4  # keeps softplus outputs (Poisson rates, NB total counts) positive in float32
_CURVE_TRAIN_IMAGES = 10_000  # training images scored after each epoch
_PROBE_IMAGES = 16  # images whose guide the divergence check computes, once per epoch


@dataclasses.dataclass(frozen=True)
class Prior:
    """A prior of the paper: its family, its parameters and the truncation the paper used.

    ``parameters`` are the paper's: a rate (Poisson), a success probability ``p`` (Geometric
    on ``0, 1, ...``) or ``(r, p)`` for the failures before the ``r``-th success (Negative
    Binomial, torch's ``NegativeBinomial(total_count=r, probs=1-p)``).

    Example:
        >>> prior = PRIORS["NB(5,.3)"]
        >>> round(float(prior.distribution().mean), 4), prior.truncation
        (11.6667, 30)
    """

    name: str
    family: str  # "poisson", "geometric" or "negative_binomial"
    parameters: tuple
    truncation: int

    @property
    def num_guide_parameters(self) -> int:
        """How many numbers per latent the encoder gives a guide of this family."""
        return 2 if self.family == "negative_binomial" else 1

    def prior_kwargs(self, device=None) -> dict:
        """The prior's parameters as the keyword arguments of torch's (and GenGS's) class."""

        def tensor(value):
            return torch.tensor(float(value), device=device)

        if self.family == "poisson":
            return {"rate": tensor(self.parameters[0])}
        if self.family == "geometric":
            return {"probs": tensor(self.parameters[0])}
        r, p = self.parameters
        return {"total_count": tensor(r), "probs": tensor(1 - p)}

    def guide_kwargs(self, raw: torch.Tensor) -> dict:
        """The guide's parameters from the encoder output ``raw`` of shape ``(..., k)``."""
        if self.family == "poisson":
            return {"rate": F.softplus(raw[..., 0]) + _RATE_FLOOR}
        if self.family == "geometric":
            return {"logits": raw[..., 0]}
        return {"total_count": F.softplus(raw[..., 0]) + _RATE_FLOOR, "logits": raw[..., 1]}

    def distribution(self, device=None, **kwargs):
        """The (untruncated) count distribution: at the prior's parameters, or at ``kwargs``."""
        kwargs = kwargs or self.prior_kwargs(device)
        cls = {
            "poisson": dist.Poisson,
            "geometric": dist.Geometric,
            "negative_binomial": dist.NegativeBinomial,
        }[self.family]
        return cls(**kwargs)

    def relaxed(self, temperature, truncation=None, **kwargs):
        """The GenGS relaxation of this family, ``GenGS<Family>(..., temperature, truncation)``;
        ``kwargs`` are the distribution's parameters plus GenGS options (``max_truncation``)."""
        cls = {
            "poisson": GenGSPoisson,
            "geometric": GenGSGeometric,
            "negative_binomial": GenGSNegativeBinomial,
        }[self.family]
        return cls(temperature=temperature, truncation=truncation, **kwargs)


PRIORS = {
    prior.name: prior
    for prior in (
        Prior("Pois(2)", "poisson", (2.0,), 12),
        Prior("Pois(3)", "poisson", (3.0,), 15),
        Prior("Geom(.25)", "geometric", (0.25,), 25),
        Prior("Geom(.5)", "geometric", (0.5,), 15),
        Prior("NB(3,.5)", "negative_binomial", (3.0, 0.5), 30),
        Prior("NB(5,.3)", "negative_binomial", (5.0, 0.3), 30),
    )
}


# --- Model, guide and estimators --------------------------------------------------------------


@dataclasses.dataclass
class _Estimator:
    """What one estimator trains with (model, guide, ELBO) and how its guide is scored."""

    name: str
    model: object
    guide: object
    loss: object
    guide_dist: object  # images -> the guide's distribution, batch (B, latents)
    discrete_guide: object  # images -> the guide's discrete distribution, batch (B, latents)
    truncation: int | None
    prior: object  # the model's prior over one latent (GenGS relaxation or count distribution)


def build_estimator(
    estimator: str, prior: Prior, encoder, decoder, temperature, latents: int
) -> _Estimator:
    """Model, guide, ELBO and discrete guide of ``estimator`` for the VAE with ``prior``.

    ``encoder`` maps images to ``latents * k`` numbers (``k``: the family's number of
    parameters, or the truncation for ``GenGS-IMP``); ``decoder`` maps counts to pixel logits.

    Example:
        >>> from torch import nn
        >>> prior = PRIORS["Pois(2)"]
        >>> e = build_estimator("GenGS-IMP", prior, nn.Linear(4, 3 * 12), nn.Linear(3, 4), 0.5, 3)
        >>> e.discrete_guide(torch.zeros(2, 4)).batch_shape, e.truncation
        (torch.Size([2, 3]), 12)
    """
    device = next(decoder.parameters()).device
    n = prior.truncation

    def parameters(x):
        return encoder(x).view(x.shape[0], latents, -1)

    if estimator in ("REINFORCE", "REINFORCE-KL"):
        prior_dist = prior.distribution(device)

        def guide_dist(x):
            return prior.distribution(**prior.guide_kwargs(parameters(x)))

        discrete, truncation = guide_dist, None
        if estimator == "REINFORCE":
            infer = {"baseline": {"use_decaying_avg_baseline": True}}
            loss = TraceGraph_ELBO()
        else:
            if prior.family == "negative_binomial":
                raise ValueError(
                    "REINFORCE-KL needs the KL between two guides' family in closed form, "
                    "which torch has for the Poisson and the Geometric, not the Negative "
                    "Binomial"
                )
            infer, loss = {}, AnalyticKLReinforce()
    else:
        if estimator == "GenGS":
            truncation = n

            def guide_dist(x):
                kwargs = prior.guide_kwargs(parameters(x))
                return prior.relaxed(temperature, n, tail_tolerance=None, **kwargs)

        elif estimator == "GenGS-IMP":
            truncation = n

            def guide_dist(x):
                return TruncatedGenGS(temperature, logits=parameters(x))

        elif estimator == "GenGS-NP":
            truncation = 2 * n
            options = {"max_truncation": truncation, "mass": NP_MASS, "tail_tolerance": None}

            def guide_dist(x):
                return prior.relaxed(temperature, **options, **prior.guide_kwargs(parameters(x)))

        else:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        # The paper's truncation of NB(5,.3) leaves 1.2% of the prior's mass in the last
        # outcome; the record keeps the prior's tail mass instead of warning at every run.
        prior_dist = prior.relaxed(
            temperature, truncation, tail_tolerance=None, **prior.prior_kwargs(device)
        )
        infer = {}
        loss = TraceMeanField_ELBO()

        def discrete(x):
            return guide_dist(x).discrete()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior_dist.expand([x.shape[0], latents]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", guide_dist(x).to_event(1), infer=infer)

    return _Estimator(estimator, model, guide, loss, guide_dist, discrete, truncation, prior_dist)


class AnalyticKLReinforce:
    r"""The score-function estimator with the KL in closed form: a loss for
    :class:`~pyro.infer.SVI` on this experiment's model and guide (one latent site ``z``, one
    observed site ``x``, in the plate ``data``).

    The ELBO is :math:`\mathbb{E}_q \log p(x \mid z) - \mathrm{KL}(q \,\|\, p)`: the KL
    (torch's closed form, Poisson or Geometric) is differentiated exactly, and the likelihood
    term by the score function :math:`(\log p(x \mid z) - b) \nabla \log q(z)` with one
    draw per image, where :math:`b` is a decaying average (weight ``beta`` on the past) of the
    batch's mean log-likelihood, kept in Pyro's param store (``reinforce_kl_baseline``) so
    that a checkpoint carries it. ``TraceGraph_ELBO`` cannot do this: it puts the Monte-Carlo
    :math:`\log p(z) - \log q(z)` in the score function's cost too.

    Returns the negative ELBO estimate (summed over the batch), whose gradient is that of the
    surrogate.
    """

    baseline_name = "reinforce_kl_baseline"

    def __init__(self, beta: float = 0.9):
        self.beta = beta

    def __call__(self, model, guide, x):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
        q, z = guide_trace.nodes["z"]["fn"], guide_trace.nodes["z"]["value"]
        log_likelihood = model_trace.nodes["x"]["fn"].log_prob(x)
        kl = torch.distributions.kl_divergence(q, model_trace.nodes["z"]["fn"])
        signal = log_likelihood.detach()
        stored = pyro.param(self.baseline_name, lambda: signal.mean())
        baseline = stored.detach()
        surrogate = -(log_likelihood + (signal - baseline) * q.log_prob(z) - kl).sum()
        with torch.no_grad():  # in place: one tensor for the whole run, as the optimizer sees it
            stored.mul_(self.beta).add_((1 - self.beta) * signal.mean())
        neg_elbo = -(signal - kl.detach()).sum()
        return surrogate + (neg_elbo - surrogate).detach()


# --- Scoring: the ELBO of the discrete model --------------------------------------------------


def scoring_model(prior, decoder, latents: int):
    """The discrete model every run is scored on: ``latents`` counts from the untruncated
    ``prior`` per image, Bernoulli pixels with logits ``decoder(z)``."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior.expand([x.shape[0], latents]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    return model


def discrete_neg_elbo(
    model, guide, images, *, num_samples=2, seed=0, chunk_size=1000
) -> tuple[float, float]:
    r"""The negative ELBO of the discrete model in nats per image over ``images``, and its
    standard error.

    :func:`pyro_relax.infer.discrete_elbo` of ``model`` (:func:`scoring_model`) and the
    trained ``guide``, ``num_samples`` guide draws per image (at least 2), under a private
    generator seeded with ``seed`` (the global one is left alone). The images go through in
    chunks of ``chunk_size`` with independent draws, so the chunks' variances add.

    Example:
        >>> prior = dist.Poisson(torch.tensor(1.0))
        >>> model = scoring_model(prior, lambda z: torch.zeros(z.shape[:-1] + (3,)), 1)
        >>> def guide(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         pyro.sample("z", dist.Poisson(torch.ones(x.shape[0], 1)).to_event(1))
        >>> value, error = discrete_neg_elbo(model, guide, torch.ones(5, 3))
        >>> round(value, 4), error  # guide = prior: KL 0, and every pixel 1/2: 3 log 2
        (2.0794, 0.0)
    """
    total, variance = 0.0, 0.0
    with common.private_rng(seed, images.device):
        for start in range(0, len(images), chunk_size):
            estimate = discrete_elbo(
                model,
                guide,
                images[start : start + chunk_size],
                num_samples=num_samples,
                max_plate_nesting=1,
            )
            total += estimate.value
            variance += estimate.standard_error**2
    return -total / len(images), math.sqrt(variance) / len(images)


@torch.no_grad()
def mean_kl(discrete_guide, prior, images, chunk_size=1000) -> float | None:
    """The exact KL from the guide's discrete distribution to ``prior`` (summed over the
    latents), averaged over ``images``; ``None`` where no closed form is registered."""
    total = 0.0
    for start in range(0, len(images), chunk_size):
        try:
            kl = torch.distributions.kl_divergence(
                discrete_guide(images[start : start + chunk_size]), prior
            )
        except NotImplementedError:
            return None
        total += float(kl.sum())
    return total / len(images)


# --- Training -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Every setting that changes a run's numbers, resolved (``dataset`` is the data set's name,
    ``steps_per_epoch`` the batches each epoch trains on). They identify the run's record in
    the results, where each is a field of the record; all but ``eval_samples``, which changes
    only the final score, name its checkpoint.

    Left out because they do not change what is computed: ``--threads`` and
    ``--no-validation`` (how fast it runs: Pyro's validation only checks arguments and draws no
    random numbers, and torch's CPU kernels give the same results with any thread count up to
    rounding), ``--data-dir`` (where the data set's files are, not which data set), ``--results``
    and ``--smoke`` (which only changes defaults; the values it picks are here).
    """

    dataset: str
    prior: str
    estimator: str
    seed: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    lr: float
    latents: int
    hidden: tuple
    binarization: str
    eval_samples: int
    device: str


# What records written before a setting was stored in them ran with.
_STORED_BEFORE = {"device": "cpu"}


def _record_settings(record) -> dict:
    """The settings of the run that made ``record``, as ``dataclasses.asdict`` of its
    :class:`_Settings` (a setting that an older record lacks is the one it ran with)."""
    return image_vae.record_settings(_Settings, record, _STORED_BEFORE)


def _checkpoint(results: Path, settings: _Settings) -> common.Checkpoint:
    label = f"vae-{settings.dataset}-{settings.prior}-{settings.estimator}-seed{settings.seed}"
    return image_vae.settings_checkpoint(results, label, settings)


def _after_epoch(epoch: int) -> None:
    """Called after each epoch's checkpoint is written (the tests interrupt runs here)."""


def train(settings: _Settings, data, checkpoint=None, *, quiet=False) -> dict:
    """Trains one VAE (one prior, one estimator, one seed) and returns its record.

    With a :class:`~pyro_relax.experiments.common.Checkpoint`, the state is saved after every
    epoch and the trained model with its record at the end, and a saved state is resumed (see
    :func:`~pyro_relax.experiments.image_vae.finished_record`); the caller removes the
    checkpoint once the record is merged.
    """
    device = torch.device(settings.device)
    prior = PRIORS[settings.prior]
    common.seed_everything(settings.seed)
    pyro.clear_param_store()
    k = prior.truncation if settings.estimator == "GenGS-IMP" else prior.num_guide_parameters
    encoder = image_vae.mlp([data.num_pixels, *settings.hidden, settings.latents * k]).to(device)
    decoder = image_vae.mlp([settings.latents, *settings.hidden[::-1], data.num_pixels]).to(device)
    steps = settings.steps_per_epoch
    schedule = ExponentialDecay(1.0, 0.1, steps=max(settings.epochs * steps, 1), device=device)
    estimator = build_estimator(
        settings.estimator, prior, encoder, decoder, schedule.temperature, settings.latents
    )
    optimizer = pyro.optim.Adam({"lr": settings.lr})
    svi = SVI(estimator.model, estimator.guide, optimizer, estimator.loss)
    generator = torch.Generator().manual_seed(settings.seed)
    eval_train, eval_test = image_vae.evaluation_images(data, settings.binarization, device)
    prior_dist = prior.distribution(device)
    model = scoring_model(prior_dist, decoder, settings.latents)

    def score(images, num_samples):
        return discrete_neg_elbo(model, estimator.guide, images, num_samples=num_samples)

    state = checkpoint.load() if checkpoint is not None else None
    start, history, seconds = 0, [], 0.0
    record = image_vae.finished_record(state, settings, _record_settings)
    if record is not None:
        return record
    if state is not None and "epoch" not in state:
        state = None  # a record alone (written before finished runs kept their model): train
    if state is not None:
        with state.restoring():
            image_vae.restore_params(state["params"], {"encoder": encoder, "decoder": decoder})
            optimizer.set_state(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            start, history, seconds = state["epoch"], state["history"], state["seconds"]
        if start < settings.epochs:
            print(f"resuming {checkpoint.path} after epoch {start}", file=sys.stderr)
        else:
            print(f"scoring the model trained in {checkpoint.path}", file=sys.stderr)

    desc = f"{settings.prior} {settings.estimator}"

    def guide_mean(images):
        # A count guide's mean overflows first (a geometric's from a logit of -90), where
        # its draws wrap around as integers and the decoder's logits turn NaN.
        yield "the guide's mean count", estimator.discrete_guide(images).mean

    modules = {"encoder": encoder, "decoder": decoder}
    quantities = image_vae.training_quantities(modules, guide_mean, eval_train[:_PROBE_IMAGES])
    bar = common.progress(
        total=settings.epochs * steps, initial=start * steps, desc=desc, unit="step", disable=quiet
    )
    with bar:
        for epoch in range(start, settings.epochs):
            began = time.perf_counter()
            where = f"{desc}, epoch {epoch + 1}"
            with common.diverging(where, quantities, settings.lr):
                total_loss = image_vae.svi_epoch(svi, data, settings, generator, bar, schedule.step)
                seconds += time.perf_counter() - began
                total_loss = common.finite(total_loss, "the loss", where, settings.lr)
                history.append(
                    {
                        "epoch": epoch + 1,
                        "loss": total_loss / (steps * settings.batch_size),
                        "train_neg_elbo": score(eval_train[:_CURVE_TRAIN_IMAGES], 2)[0],
                        "test_neg_elbo": score(eval_test, 2)[0],
                        "temperature": float(schedule.temperature),
                        "seconds": seconds,
                    }
                )
            bar.set_postfix(test=f"{history[-1]['test_neg_elbo']:.2f}", refresh=False)
            state = {
                "epoch": epoch + 1,
                "params": pyro.get_param_store().get_state(),
                "optimizer": optimizer.get_state(),
                "schedule": schedule.state_dict(),
                "generator": generator.get_state(),
                "history": history,
                "seconds": seconds,
            }
            if checkpoint is not None:
                checkpoint.save(state)
            _after_epoch(epoch + 1)

    began = time.perf_counter()
    train_neg_elbo, train_error = score(eval_train, settings.eval_samples)
    test_neg_elbo, test_error = score(eval_test, settings.eval_samples)
    losses = [h["loss"] for h in history]
    truncated_prior = estimator.prior.discrete() if estimator.truncation is not None else None
    record = {
        "dataset": settings.dataset,
        "prior": settings.prior,
        "estimator": settings.estimator,
        "seed": settings.seed,
        "epochs": settings.epochs,
        "train_neg_elbo": train_neg_elbo,
        "train_neg_elbo_se": train_error,
        "test_neg_elbo": test_neg_elbo,
        "test_neg_elbo_se": test_error,
        "final_relaxed_objective": losses[-1] if losses else None,
        "best_relaxed_objective": min(losses) if losses else None,
        "best_relaxed_epoch": losses.index(min(losses)) + 1 if losses else None,
        "kl_to_prior": mean_kl(estimator.discrete_guide, prior_dist, eval_test),
        "kl_to_truncated_prior": (
            mean_kl(estimator.discrete_guide, truncated_prior, eval_test)
            if truncated_prior is not None
            else None
        ),
        "scorer": "pyro_relax.infer.discrete_elbo",
        "paper_train_neg_elbo": (
            PAPER_TRAIN_NEG_ELBO.get((settings.prior, settings.estimator))
            if settings.dataset == "MNIST"
            else None
        ),
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(settings.epochs, 1),
        "eval_seconds": time.perf_counter() - began,
        "steps_per_epoch": steps,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "latents": settings.latents,
        "hidden": list(settings.hidden),
        "binarization": settings.binarization,
        "truncation": estimator.truncation,
        "prior_tail_mass": (
            float(estimator.prior.tail_mass) if estimator.truncation is not None else None
        ),
        "objective": type(estimator.loss).__name__,
        "eval_samples": settings.eval_samples,
        "device": settings.device,
        "threads": torch.get_num_threads(),
        "validation": is_validation_enabled(),
        "machine": common.machine(),
        "history": history,
    }
    if checkpoint is not None:
        params = image_vae.copy_params(state["params"])
        checkpoint.save({**state, "params": params, "record": record})
    return record


# --- Reports ----------------------------------------------------------------------------------


def _order(record):
    priors, estimators = list(PRIORS), list(ESTIMATORS)
    return (
        record.get("dataset", ""),
        priors.index(record["prior"]) if record.get("prior") in priors else len(priors),
        estimators.index(record["estimator"])
        if record.get("estimator") in estimators
        else len(estimators),
        record.get("seed", 0),
    )


def _markdown(records) -> str:
    def losses(record):  # records from before these fields have them in the history
        return [h["loss"] for h in record.get("history") or []]

    records = sorted(records, key=_order)
    rows = [
        {
            "final_relaxed_objective": losses(r)[-1] if losses(r) else None,
            "best_relaxed_objective": min(losses(r)) if losses(r) else None,
            **{k: v for k, v in r.items() if v is not None},
            "scorer": "infer" if r.get("scorer") else "exact KL",
        }
        for r in records
    ]
    columns = {
        "dataset": "",
        "prior": "",
        "estimator": "",
        "seed": "",
        "epochs": "",
        "latents": "",
        "train_neg_elbo": ".2f",
        "test_neg_elbo": ".2f",
        "test_neg_elbo_se": ".3f",
        "final_relaxed_objective": ".2f",
        "best_relaxed_objective": ".2f",
        "kl_to_prior": ".2f",
        "kl_to_truncated_prior": ".2f",
        "paper_train_neg_elbo": ".2f",
        "scorer": "",
        "seconds_per_epoch": ".1f",
    }
    settings = common.differing_settings(records, _record_settings, shown=columns)
    table = common.markdown_table(rows, list(columns), columns, settings)
    header = (
        "# Count-latent VAE (GenGS paper, Table 1)\n\n"
        "Negative ELBO of the discrete model in nats per image (lower is better): untruncated "
        "prior, the guide's discrete distribution, hard samples; `train_neg_elbo` over the "
        "whole training set, `test_neg_elbo` (standard error `test_neg_elbo_se`) over the test "
        "set, after training. `paper_train_neg_elbo` is the paper's training negative ELBO "
        "(its REINFORCE is REINFORCE*). `final_relaxed_objective` is the objective each "
        "estimator trained on, per image and averaged over the last epoch, and "
        "`best_relaxed_objective` the lowest such epoch: for the GenGS estimators the relaxed "
        "one (truncated prior, analytic KL of the truncated PMFs, relaxed samples in the "
        "decoder), for REINFORCE a Monte-Carlo estimate of the discrete negative ELBO. "
        "`kl_to_prior` and `kl_to_truncated_prior` are the exact KL of the guide's discrete "
        "distribution to the prior and to the prior truncated as in training (summed over "
        "the latents, averaged over the test images). `scorer`: `infer` is "
        "`pyro_relax.infer.discrete_elbo` (KL and likelihood by Monte Carlo), `exact KL` the "
        "earlier scorer (KL summed exactly, likelihood by Monte Carlo); both estimate the same "
        "number. Generated by `pyro-relax experiment vae` from "
        f"`{RESULTS_NAME}.json`, which holds each run's settings, command and curves.\n\n"
    )
    return header + table


def _plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    records = sorted(records, key=_order)
    # Runs that differ in more than the panel, estimator and seed say how in their label.
    settings = common.differing_settings(
        records, _record_settings, shown=("dataset", "prior", "estimator", "seed")
    )
    groups = {}
    for record, differing in zip(records, settings, strict=True):
        if record.get("history"):
            record = dict(record, differing=differing)
            groups.setdefault((record["dataset"], record["prior"]), []).append(record)
    figure, axes = plt.subplots(
        1, max(len(groups), 1), figsize=(5 * max(len(groups), 1), 4), squeeze=False
    )
    for ax, ((dataset, prior), group) in zip(axes[0], groups.items(), strict=False):
        for index, record in enumerate(group):
            epochs = [h["epoch"] for h in record["history"]]
            # One colour per estimator in every panel.
            estimator = record["estimator"]
            slot = ESTIMATORS.index(estimator) if estimator in ESTIMATORS else 4 + index
            color = f"C{slot}"
            label = f"{record['estimator']} (seed {record['seed']})"
            label += f", {record['differing']}" if record["differing"] else ""
            train_curve = [h["train_neg_elbo"] for h in record["history"]]
            test_curve = [h["test_neg_elbo"] for h in record["history"]]
            ax.plot(epochs, train_curve, color=color, marker=".", label=label)
            ax.plot(epochs, test_curve, color=color, marker=".", linestyle="--")
        ax.set_title(f"{dataset}, prior {prior}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("negative ELBO, discrete model (nats)")
        ax.legend(fontsize="small", title="solid: train, dashed: test", title_fontsize="small")
    figure.tight_layout()
    common.save_figure(figure, path)
    plt.close(figure)


def write_reports(results: Path, records) -> None:
    """Writes the Markdown table and the plot of curves of ``records`` next to the JSON."""
    common.atomic_write_text(results / f"{RESULTS_NAME}.md", _markdown(records))
    _plot(records, results / f"{RESULTS_NAME}.png")


# --- Command line -----------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """Adds this experiment's options to its subcommand's ``parser``."""
    image_vae.add_training_arguments(
        parser, estimators=ESTIMATORS, default_epochs=DEFAULT_EPOCHS, default_batch_size=100
    )
    parser.add_argument(
        "--prior",
        nargs="+",
        default=["Pois(2)"],
        choices=[*PRIORS, "all"],
        help="prior(s), or all (default: Pois(2))",
    )
    parser.add_argument(
        "--binarization",
        choices=BINARIZATIONS,
        default="dynamic",
        help="dynamic: each pixel drawn as Bernoulli(gray level) for every batch (default); "
        "fixed: gray level > 0.5",
    )
    parser.add_argument(
        "--latents", type=positive_int, help=f"number of count latents (default {DEFAULT_LATENTS})"
    )
    parser.add_argument(
        "--hidden",
        type=image_vae.layer_sizes,
        help="encoder hidden sizes, mirrored in the decoder (default 512,256)",
    )
    parser.add_argument(
        "--eval-samples",
        type=integer_at_least(2),
        help="hard samples per image of the final score (default 5; smoke: 2)",
    )


def _settings(args, data, prior: str, estimator: str) -> _Settings:
    """The settings of one run of the command line ``args`` on the data set ``data``."""
    pick = image_vae.smoke_picker(args, _SMOKE)
    return _Settings(
        dataset=data.name,
        prior=prior,
        estimator=estimator,
        seed=args.seed,
        epochs=pick(args.epochs, "epochs", DEFAULT_EPOCHS),
        steps_per_epoch=image_vae.steps_per_epoch(args, data, pick),
        batch_size=args.batch_size,
        lr=args.lr,
        latents=pick(args.latents, "latents", DEFAULT_LATENTS),
        hidden=pick(args.hidden, "hidden", DEFAULT_HIDDEN),
        binarization=args.binarization,
        eval_samples=pick(args.eval_samples, "eval_samples", 5),
        device=args.device,
    )


def _pairs(args) -> list:
    """The (prior, estimator) runs the command asks for. A pair that cannot run stops the
    command before anything trains when both were named, and is left out under ``all``."""
    pairs = []
    for prior in image_vae.expand(args.prior, PRIORS):
        for estimator in image_vae.expand(args.estimator, ESTIMATORS):
            if estimator == "REINFORCE-KL" and PRIORS[prior].family == "negative_binomial":
                if "all" not in args.estimator and "all" not in args.prior:
                    raise common.ExperimentError(
                        f"REINFORCE-KL cannot run with {prior}: torch has no closed-form KL "
                        "between Negative Binomials"
                    )
                continue
            pairs.append((prior, estimator))
    return pairs


def run(args) -> int:
    """Trains and scores every requested prior and estimator; returns the exit code."""
    results = Path(args.results)
    path = results / f"{RESULTS_NAME}.json"
    common.read_records(path, write_reports)  # a damaged file stops the run at once
    pairs = _pairs(args)
    data = image_vae.dataset(args)
    finished = []
    with common.torch_threads(args.threads), pyro.validation_enabled(not args.no_validation):
        for prior, estimator in pairs:
            settings = _settings(args, data, prior, estimator)
            checkpoint = _checkpoint(results, settings)
            record = train(settings, data, checkpoint)
            record["command"] = args.command_line
            record["smoke"] = bool(args.smoke)
            common.update_records(
                path, [record], _record_settings, lambda merged: write_reports(results, merged)
            )
            finished.append(checkpoint)
            print(
                f"{record['dataset']} {prior} {estimator} seed {args.seed}: negative "
                f"ELBO train {record['train_neg_elbo']:.2f}, test "
                f"{record['test_neg_elbo']:.2f} ({record['seconds']:.0f} s)"
            )
    # Only now: until the whole command ends, a finished run's checkpoint holds its record,
    # so that the command run again after an interruption does not train it again.
    for checkpoint in finished:
        checkpoint.remove()
    return 0

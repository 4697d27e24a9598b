"""The discrete VAE of the IGR paper (Potapczynski, Loaiza-Ganem, Cunningham, 2020, Table 1).

A VAE on binarized MNIST (or Fashion-MNIST) whose latent is 20 categorical variables of 10
categories with a uniform prior, trained through Pyro SVI on the relaxed objective with each
estimator's continuous KL, and every trained model scored by the same metric: the test
log-likelihood of the *discrete* model the relaxation stands for, by importance sampling.

Model (Maddison et al.'s "linear" discrete VAE, as the paper): the image is Bernoulli with
logits ``decoder(z)``, ``decoder`` one ``nn.Linear`` from the 20 one-hot (relaxed) latents,
flattened to 200 numbers, to the 784 pixel logits; the encoder is one ``nn.Linear`` from the
784 pixels to the guide's parameters. PyTorch's default initialization. Adam (``--lr`` 1e-3),
batch 64, single-sample objectives, 100 epochs. ``--architecture nonlinear`` puts two ReLU
layers on each side instead (encoder 784-512-256, decoder 256-512-784), as the reference code's
``dense_nonlinear`` model, the architecture the later version of the paper describes (a dense
784-512-256 encoder). The images have one fixed binarization for
training and test (``--binarization fixed``: a pixel is 1 where its gray level exceeds 0.5, as
the reference code rounds MNIST).

Estimators (``--temperature-pair 0.5``: IGR at 0.5, GS at 0.67; ``0.1``: IGR at 0.1, GS at
0.25, the paper's cross-validated pairs; the record keeps the temperature used):

- ``IGR-I``: guide :class:`~pyro_relax.IGR` ``(loc, exp(log_scale), tau)``, ``loc`` and
  ``log_scale`` of shape ``(20, 9)`` from the encoder; prior ``IGR`` at
  :func:`~pyro_relax.uniform_igr_prior` (``mu0 / sigma0 = -0.753``, ``sigma0 = 1``), whose
  discrete limit is exactly uniform; ``TraceMeanField_ELBO`` with the registered Gaussian KL.
- ``IGR-SB``: guide :class:`~pyro_relax.IGRStickBreaking` likewise; prior the same class at
  :func:`~pyro_relax.fit_igr_prior` of the uniform PMF with the hazard initialization
  (``sigma0 = 10``, no Adam steps: deterministic). The discrete limit of stick-breaking is the
  largest stick, which never selects the last category, so this prior's limit is close to
  uniform over the first 9 categories (total variation 0.007 from it), and no guide's limit
  selects the last category either (the bound cannot reach log p(x) there); the record keeps
  the prior's limit PMF (``prior_probs``). KL: the Gaussian KL in closed form (guide and prior
  share the temperature tensor and delta).
- ``IGR-Planar``: guide :class:`~pyro_relax.IGRPlanar` with ``--planar-layers`` (default 2,
  as the reference code) planar layers per latent variable, global (not amortized) parameters,
  one ``(b, u, w)`` per layer and latent (Pyro's ``ConditionedPlanar``, which guarantees
  invertibility); prior the ``IGR-I`` prior. No closed-form KL exists between a flow and an
  IGR, so ``TraceMeanField_ELBO`` falls back to the Monte-Carlo density ratio.
- ``GS``: guide :class:`~pyro_relax.STGSCategorical` ``(tau, logits, hard=False)`` (the
  Concrete relaxation, its log density computed in log space), prior the same at uniform logits,
  ``Trace_ELBO``: the KL is the Monte-Carlo density ratio of the two Concrete densities, as
  Maddison et al. (``TraceMeanField_ELBO`` would use the categorical KL registered for these
  classes instead). torch's ``RelaxedOneHotCategorical`` is not used: its density is not finite
  in float32 at low temperature.

Scoring, the same for every estimator: the discrete model has the uniform categorical prior and
the decoder; its guide is the trained guide's ``discrete()`` distribution, what
:func:`~pyro_relax.infer.discretize` puts in its place (IGR-I: the categorical of Proposition 2
by quadrature; IGR-SB and IGR-Planar: a Monte-Carlo estimate from 10,000 draws per latent;
GS: the categorical of its logits), computed once per chunk of test images and shared by both
scores. ``test_log_likelihood``: :func:`~pyro_relax.infer.discrete_log_likelihood` with
``--num-particles`` (default 1000, the paper's m) per image (Burda et al.'s bound);
``test_neg_elbo``: minus :func:`~pyro_relax.infer.discrete_elbo` with ``--eval-samples``
draws; both in nats per image over the first ``--eval-images`` test images (default all),
with standard errors (chunks combined in quadrature), drawn under a private seeded generator.
``test_reference_score``: what the paper's code reports as the test log-likelihood, the log of
the mean likelihood p(x | z_i) over the same ``--num-particles`` draws z_i of the discrete guide,
minus the discrete KL from the guide to the uniform prior (the KL outside the mean, where Burda
et al.'s bound has p(z_i) / q(z_i) inside it; not a bound on log p(x)).
``history`` holds per epoch the training loss (the relaxed objective, per image, averaged over
the epoch) and the same relaxed objective on the test set (``test_loss``, cheap: the discrete
scores cost about a second per 25 images for IGR-I's quadrature and three for the Monte-Carlo
categoricals, too much for every epoch).

A run keeps its checkpoint in ``results/checkpoints`` (named by the training settings alone):
once trained, it holds the trained model and the record of its score, so the same command run
again with other ``--num-particles``, ``--eval-samples`` or ``--eval-images`` scores the same
model without training (and adds a record with those settings); delete the file to train again.

The paper's figures are in :data:`PAPER_TEST_LOG_LIKELIHOOD`; its Fashion-MNIST decoder is
Gaussian on gray levels, ours Bernoulli on binarized images, so those are not comparable.
"""

import dataclasses
import math
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_relax._cli import integer_at_least, positive_int
from pyro_relax._numerics import categorical_kl
from pyro_relax.distributions import (
    IGR,
    IGRPlanar,
    IGRStickBreaking,
    STGSCategorical,
    fit_igr_prior,
    uniform_igr_prior,
)
from pyro_relax.experiments import common, image_vae
from pyro_relax.experiments.data import BINARIZATIONS
from pyro_relax.infer import Estimate, discrete_elbo, discrete_log_likelihood

__all__ = [
    "ARCHITECTURES",
    "DESCRIPTION",
    "ESTIMATORS",
    "PAPER_TEST_LOG_LIKELIHOOD",
    "TEMPERATURE_PAIRS",
    "PlanarFlows",
    "add_arguments",
    "build_estimator",
    "differences",
    "evaluate",
    "run",
    "summarize",
    "temperature_of",
    "train",
    "write_reports",
]

DESCRIPTION = (
    "the linear discrete VAE of the IGR paper (Table 1): 20 categorical latents of 10 "
    "categories trained with IGR-I, IGR-SB, IGR-Planar and GS, scored by the importance-sampled "
    "test log-likelihood of the discrete model"
)

ESTIMATORS = ("IGR-I", "IGR-SB", "IGR-Planar", "GS")
# The paper's cross-validated temperature pairs: name -> (IGR's temperature, GS's).
TEMPERATURE_PAIRS = {"0.5": (0.5, 0.67), "0.1": (0.1, 0.25)}
# The paper's test log-likelihood (nats per image, m = 1000), Table 1; its Fashion-MNIST VAE has
# a Gaussian decoder.
PAPER_TEST_LOG_LIKELIHOOD = {
    ("MNIST", "IGR-I"): -94.65,
    ("MNIST", "IGR-Planar"): -96.21,
    ("MNIST", "IGR-SB"): -96.74,
    ("MNIST", "GS"): -106.17,
    ("Fashion-MNIST", "IGR-I"): -38.12,
    ("Fashion-MNIST", "GS"): -46.65,
}
RESULTS_NAME = "igr_vae"
DEFAULT_EPOCHS = 100
DEFAULT_LATENTS = 20
CATEGORIES = 10
DEFAULT_PLANAR_LAYERS = 2
# Hidden layer sizes of the encoder (the decoder's, reversed), ReLU between layers.
ARCHITECTURES = {"linear": (), "nonlinear": (512, 256)}
# Smoke runs (CI): the digits, one epoch of three batches, few latents, particles and images.
_SMOKE = {
    "epochs": 1,
    "steps_per_epoch": 3,
    "latents": 4,
    "num_particles": 20,
    "eval_samples": 2,
    "eval_images": 50,
}
_SB_PRIOR_SCALE = 10.0  # sigma0 of the stick-breaking prior's hazard initialization
_EVAL_CHUNK = 100  # test images scored at a time (bounds the particles' memory)
_LOSS_CHUNK = 1000  # test images per evaluation of the relaxed objective
_PARTICLE_CHUNK = 100  # draws of the guide decoded at a time by the reference score
_SCORES = ("test_log_likelihood", "test_neg_elbo", "test_reference_score")
_PROBE_IMAGES = 16  # images whose guide the divergence check computes, once per epoch


def temperature_of(estimator: str, pair: str) -> float:
    """The temperature ``estimator`` trains at in the temperature pair ``pair``.

    Example:
        >>> temperature_of("IGR-SB", "0.5"), temperature_of("GS", "0.5")
        (0.5, 0.67)
    """
    igr, gs = TEMPERATURE_PAIRS[pair]
    return gs if estimator == "GS" else igr


# --- Model, guide and estimators --------------------------------------------------------------


class PlanarFlows(nn.Module):
    """Planar layers with one ``(b, u, w)`` per layer and latent variable, global parameters
    (the reference code's layout), initialized as Pyro's ``Planar``: uniform in
    ``(-1/sqrt(d), 1/sqrt(d))``."""

    def __init__(self, layers: int, latents: int, dim: int):
        super().__init__()
        bound = 1 / math.sqrt(dim)

        def uniform(*shape):
            return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

        self.bias = uniform(layers, latents, 1)
        self.u = uniform(layers, latents, dim)
        self.w = uniform(layers, latents, dim)

    def transforms(self) -> list:
        """The layers as transforms on a batch ``(..., latents, dim)``."""
        return [
            ConditionedPlanar((b, u, w)) for b, u, w in zip(self.bias, self.u, self.w, strict=True)
        ]


@dataclasses.dataclass
class _Estimator:
    """What one estimator trains with (model, guide, ELBO) and what its guide stands for."""

    name: str
    model: object  # model(x, prior=None): the relaxed prior by default
    guide: object
    guide_dist: object  # images -> the relaxed guide, batch (images, latents)
    loss: object
    prior: object  # the relaxed prior over one latent
    modules: dict  # the networks, by their names in the param store
    categories: int


def _relaxed_prior(estimator: str, temperature, categories: int, device):
    if estimator == "GS":
        logits = torch.zeros(categories, device=device)
        return STGSCategorical(temperature, logits=logits, hard=False)
    if estimator == "IGR-SB":
        uniform = torch.full((categories,), 1 / categories, device=device)
        loc, scale = fit_igr_prior(
            uniform, family=IGRStickBreaking, init="hazard", init_scale=_SB_PRIOR_SCALE,
            num_steps=0,
        )  # fmt: skip
        return IGRStickBreaking(loc, scale, temperature)
    if estimator in ("IGR-I", "IGR-Planar"):
        return IGR(*uniform_igr_prior(categories, device=device), temperature)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")


def build_estimator(
    estimator: str, encoder, decoder, temperature, latents: int, flows=None
) -> _Estimator:
    """Model, guide and ELBO of ``estimator`` for the VAE with ``latents`` categorical latents;
    the number of categories is the input size of the decoder's first linear layer over
    ``latents``.

    ``encoder`` maps images to ``latents * (K - 1) * 2`` numbers (``loc`` and ``log_scale``;
    ``latents * K`` logits for ``GS``); ``temperature`` is one tensor, shared by guide and
    prior; ``flows`` (``IGR-Planar`` only) a :class:`PlanarFlows`.

    Example:
        >>> from torch import nn
        >>> e = build_estimator("IGR-I", nn.Linear(6, 3 * 9 * 2), nn.Linear(30, 6), 0.5, 3)
        >>> e.guide_dist(torch.zeros(2, 6)).batch_shape, type(e.prior).__name__
        (torch.Size([2, 3]), 'IGR')
    """
    device = next(decoder.parameters()).device
    first_layer = next(m for m in decoder.modules() if isinstance(m, nn.Linear))
    categories = first_layer.in_features // latents
    prior = _relaxed_prior(estimator, temperature, categories, device)
    modules = {"encoder": encoder, "decoder": decoder}
    if estimator == "GS":

        def guide_dist(x):
            logits = encoder(x).view(x.shape[0], latents, categories)
            return STGSCategorical(temperature, logits=logits, hard=False)

        loss = Trace_ELBO()
    else:
        family = {"IGR-I": IGR, "IGR-SB": IGRStickBreaking, "IGR-Planar": IGRPlanar}[estimator]
        options = {}
        if estimator == "IGR-Planar":
            if flows is None:
                raise ValueError("IGR-Planar needs its `flows` (a PlanarFlows module)")
            modules["flows"] = flows

        def guide_dist(x):
            out = encoder(x).view(x.shape[0], latents, 2, categories - 1)
            if estimator == "IGR-Planar":
                options["flows"] = flows.transforms()
            return family(out[..., 0, :], out[..., 1, :].exp(), temperature, **options)

        loss = TraceMeanField_ELBO()

    def model(x, prior=prior):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior.expand([x.shape[0], latents]).to_event(1))
            logits = decoder(z.reshape(z.shape[:-2] + (-1,)))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x, prior=None):  # takes the model's arguments
        for name, module in modules.items():
            if name != "decoder":
                pyro.module(name, module)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", guide_dist(x).to_event(1))

    return _Estimator(estimator, model, guide, guide_dist, loss, prior, modules, categories)


# --- Scoring: the discrete model --------------------------------------------------------------


def _uniform_prior(categories: int, device):
    return dist.OneHotCategorical(logits=torch.zeros(categories, device=device))


@torch.no_grad()
def _discrete_guide(estimator: _Estimator, x):
    """The trained guide's discrete distribution for the images ``x`` (what ``discretize``
    puts in its place), computed once (the Monte-Carlo estimate bounds its own memory)."""
    q = dist.OneHotCategorical(logits=estimator.guide_dist(x).discrete().logits)

    def guide(images, prior=None):
        with pyro.plate("data", images.shape[0]):
            pyro.sample("z", q.to_event(1))

    return guide, q


def _reference_score(decoder, q, x, num_particles: int) -> torch.Tensor:
    r"""The score the paper's code reports as the test log-likelihood, per image:
    :math:`\log \frac{1}{m} \sum_i p(x \mid z_i) - \mathrm{KL}(q \,\|\, \text{uniform})`
    with :math:`z_i` drawn from the discrete guide ``q`` (batch: images x latents).

    The reference code (``Utils/estimate_loglike.py`` of cunningham-lab/igr, which runs its
    ``compute_loss`` with ``run_iwae``) takes the log-mean-exp of the likelihoods of one-hot
    draws and subtracts the discrete KL from the guide to the uniform prior, outside the mean.
    Burda et al.'s bound puts :math:`p(z_i) / q(z_i)` inside it instead. The two agree for
    :math:`m = 1` (the ELBO); for larger :math:`m` this score is not a bound on
    :math:`\log p(x)` and can exceed it.
    """
    log_likelihoods = []
    for start in range(0, num_particles, _PARTICLE_CHUNK):
        z = q.sample((min(_PARTICLE_CHUNK, num_particles - start),))
        logits = decoder(z.reshape(z.shape[:-2] + (-1,)))
        log_likelihoods.append(dist.Bernoulli(logits=logits).log_prob(x).sum(-1))
    log_mean = torch.logsumexp(torch.cat(log_likelihoods), 0) - math.log(num_particles)
    uniform = torch.full_like(q.logits, -math.log(q.event_shape[-1]))
    return log_mean - categorical_kl(q.logits, uniform).sum(-1)  # summed over the latents


def evaluate(estimator: _Estimator, images, *, num_particles: int, eval_samples: int, seed=0):
    """The discrete model's importance-sampled log-likelihood and negative ELBO, each a
    :class:`~pyro_relax.infer.Estimate` in nats per image (standard errors per image too), and
    the paper's code's score (:func:`_reference_score` with ``num_particles`` draws, a number
    in nats per image).

    The discrete model has the uniform categorical prior; its guide is the trained guide's
    ``discrete()`` distribution (see :func:`_discrete_guide`). Images are scored in chunks of
    100 whose totals are summed and whose standard errors are combined in quadrature; the
    draws come from a generator seeded with ``seed`` (training's are left alone).
    """
    device = images.device
    uniform = _uniform_prior(estimator.categories, device)
    totals = {"ll": [0.0, 0.0], "elbo": [0.0, 0.0]}
    reference = 0.0
    decoder = estimator.modules["decoder"]
    with common.private_rng(seed, device), torch.no_grad():
        for start in range(0, len(images), _EVAL_CHUNK):
            x = images[start : start + _EVAL_CHUNK]
            guide, q = _discrete_guide(estimator, x)
            options = {"prior": uniform, "max_plate_nesting": 1}
            ll = discrete_log_likelihood(
                estimator.model, guide, x, num_particles=num_particles, data_plate="data",
                **options,
            )  # fmt: skip
            elbo = discrete_elbo(estimator.model, guide, x, num_samples=eval_samples, **options)
            for key, estimate in (("ll", ll), ("elbo", elbo)):
                totals[key][0] += estimate.value
                totals[key][1] += estimate.standard_error**2
            reference += float(_reference_score(decoder, q, x, num_particles).sum())
    n = len(images)
    ll, elbo = totals["ll"], totals["elbo"]
    return (
        Estimate(ll[0] / n, math.sqrt(ll[1]) / n, num_particles),
        Estimate(-elbo[0] / n, math.sqrt(elbo[1]) / n, eval_samples),
        reference / n,
    )


@torch.no_grad()
def _relaxed_loss(svi, images, seed: int) -> float:
    """The relaxed training objective on ``images``, per image, with private draws."""
    total = 0.0
    with common.private_rng(seed, images.device):
        for start in range(0, len(images), _LOSS_CHUNK):
            total += svi.evaluate_loss(images[start : start + _LOSS_CHUNK])
    return total / len(images)


# --- Training -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Every setting that changes a run's numbers, resolved (``dataset`` is the data set's name,
    ``steps_per_epoch`` the batches each epoch trains on, ``eval_images`` the test images
    scored, ``planar_layers`` ``None`` but for IGR-Planar). They name the run's checkpoint and
    identify its record in the results, where each is a field of the record.

    Left out because they do not change what is computed: ``--threads`` and
    ``--no-validation``, ``--data-dir``, ``--results`` and ``--smoke`` (which only changes
    defaults; the values it picks are here).
    """

    dataset: str
    estimator: str
    temperature_pair: str
    temperature: float
    seed: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    lr: float
    latents: int
    categories: int
    planar_layers: int | None
    architecture: str
    binarization: str
    num_particles: int
    eval_samples: int
    eval_images: int
    device: str


def _record_settings(record) -> dict:
    """The settings of the run that made ``record``, as ``dataclasses.asdict`` of its
    :class:`_Settings`."""
    return image_vae.record_settings(_Settings, record)


def _checkpoint(results: Path, settings: _Settings) -> common.Checkpoint:
    """The run's checkpoint, named by its *training* settings: it holds the training state
    after each epoch and, once trained, the trained model and the record of its last score, and
    the run keeps it (see :func:`train`)."""
    label = (
        f"igr-vae-{settings.dataset}-{settings.estimator}-{settings.temperature_pair}"
        f"-seed{settings.seed}"
    )
    return image_vae.settings_checkpoint(results, label, settings)


def _after_epoch(epoch: int) -> None:
    """Called after each epoch's checkpoint is written (the tests interrupt runs here)."""


def _network(sizes) -> nn.Module:
    # One nn.Linear without hidden layers: the parameter names of the first runs' checkpoints.
    return nn.Linear(*sizes) if len(sizes) == 2 else image_vae.mlp(sizes)


def _networks(settings: _Settings, num_pixels: int, device):
    k = settings.categories
    width = settings.latents * (k if settings.estimator == "GS" else 2 * (k - 1))
    hidden = ARCHITECTURES[settings.architecture]
    encoder = _network([num_pixels, *hidden, width]).to(device)
    decoder = _network([settings.latents * k, *reversed(hidden), num_pixels]).to(device)
    flows = None
    if settings.estimator == "IGR-Planar":
        flows = PlanarFlows(settings.planar_layers, settings.latents, k - 1).to(device)
    return encoder, decoder, flows


def _prior_probs(prior, seed: int, device) -> list:
    """The discrete limit of the relaxed prior (by Monte Carlo for stick-breaking)."""
    with common.private_rng(seed, device), torch.no_grad():
        return [round(float(p), 4) for p in prior.discrete().probs]


def train(settings: _Settings, data, checkpoint=None, *, quiet=False) -> dict:
    """Trains one VAE (one estimator, one temperature, one seed), scores it and returns its
    record.

    With a :class:`~pyro_relax.experiments.common.Checkpoint` (see :func:`_checkpoint`), the
    state is saved after every epoch and a saved state is resumed. The finished state stays in
    the checkpoint with the record of its score: a rerun with the same settings returns that
    record, and a rerun with other evaluation settings (``num_particles``, ``eval_samples``,
    ``eval_images``) scores the trained model again without training.
    """
    device = torch.device(settings.device)
    common.seed_everything(settings.seed)
    pyro.clear_param_store()
    encoder, decoder, flows = _networks(settings, data.num_pixels, device)
    temperature = torch.tensor(settings.temperature, device=device)
    estimator = build_estimator(
        settings.estimator, encoder, decoder, temperature, settings.latents, flows
    )
    optimizer = pyro.optim.Adam({"lr": settings.lr})
    svi = SVI(estimator.model, estimator.guide, optimizer, estimator.loss)
    generator = torch.Generator().manual_seed(settings.seed)
    _, test_images = image_vae.evaluation_images(data, settings.binarization, device)

    state = checkpoint.load() if checkpoint is not None else None
    start, history, seconds = 0, [], 0.0
    if state is not None:
        record = image_vae.finished_record(state, settings, _record_settings)
        # A record of other evaluation settings, or one without a score that this version
        # computes, is scored again.
        if record is not None and all(key in record for key in _SCORES):
            return record
        with state.restoring():
            image_vae.restore_params(state["params"], estimator.modules)
            optimizer.set_state(state["optimizer"])
            generator.set_state(state["generator"])
            start, history, seconds = state["epoch"], state["history"], state["seconds"]
        if start < settings.epochs:
            print(f"resuming {checkpoint.path} after epoch {start}", file=sys.stderr)
        else:
            print(f"scoring the model trained in {checkpoint.path}", file=sys.stderr)

    steps = settings.steps_per_epoch
    desc = f"{settings.estimator} tau={settings.temperature}"

    def guide_parameters(images):
        # IGR's scale is the exponential of an encoder output: it leaves [eps, 1/eps] (which
        # IGR refuses) while the weights stay moderate, upwards or (collapsing) downwards.
        guide = estimator.guide_dist(images)
        for name in ("loc", "scale", "logits"):
            if hasattr(guide, name):
                yield f"the guide's {name}", getattr(guide, name)
        if hasattr(guide, "scale"):
            yield "the inverse of the guide's scale", guide.scale.reciprocal()

    quantities = image_vae.training_quantities(
        estimator.modules, guide_parameters, test_images[:_PROBE_IMAGES]
    )
    bar = common.progress(
        total=settings.epochs * steps, initial=start * steps, desc=desc, unit="step", disable=quiet
    )
    with bar:
        for epoch in range(start, settings.epochs):
            began = time.perf_counter()
            where = f"{desc}, epoch {epoch + 1}"
            with common.diverging(where, quantities, settings.lr):
                total_loss = image_vae.svi_epoch(svi, data, settings, generator, bar)
                seconds += time.perf_counter() - began
                total_loss = common.finite(total_loss, "the loss", where, settings.lr)
                history.append(
                    {
                        "epoch": epoch + 1,
                        "loss": total_loss / (steps * settings.batch_size),
                        "test_loss": _relaxed_loss(svi, test_images, settings.seed),
                        "seconds": seconds,
                    }
                )
            bar.set_postfix(test=f"{history[-1]['test_loss']:.2f}", refresh=False)
            state = {
                "epoch": epoch + 1,
                "params": pyro.get_param_store().get_state(),
                "optimizer": optimizer.get_state(),
                "generator": generator.get_state(),
                "history": history,
                "seconds": seconds,
            }
            if checkpoint is not None:
                checkpoint.save(state)
            _after_epoch(epoch + 1)

    began = time.perf_counter()
    log_likelihood, neg_elbo, reference_score = evaluate(
        estimator,
        test_images[: settings.eval_images],
        num_particles=settings.num_particles,
        eval_samples=settings.eval_samples,
        seed=settings.seed,
    )
    record = {
        **dataclasses.asdict(settings),
        "test_log_likelihood": log_likelihood.value,
        "test_log_likelihood_se": log_likelihood.standard_error,
        "test_neg_elbo": neg_elbo.value,
        "test_neg_elbo_se": neg_elbo.standard_error,
        "test_reference_score": reference_score,
        "paper_test_log_likelihood": PAPER_TEST_LOG_LIKELIHOOD.get(
            (settings.dataset, settings.estimator)
        ),
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(settings.epochs, 1),
        "eval_seconds": time.perf_counter() - began,
        "objective": type(estimator.loss).__name__,
        "prior": type(estimator.prior).__name__,
        "prior_probs": _prior_probs(estimator.prior, settings.seed, device),
        "threads": torch.get_num_threads(),
        "validation": is_validation_enabled(),
        "machine": common.machine(),
        "history": history,
    }
    if checkpoint is not None:
        checkpoint.save(
            {**state, "params": image_vae.copy_params(state["params"]), "record": record}
        )
    return record


# --- Reports ----------------------------------------------------------------------------------


def _order(record):
    estimators, pairs = list(ESTIMATORS), list(TEMPERATURE_PAIRS)
    return (
        record.get("dataset", ""),
        pairs.index(record.get("temperature_pair")) if record.get("temperature_pair") in pairs
        else len(pairs),
        estimators.index(record.get("estimator")) if record.get("estimator") in estimators
        else len(estimators),
        record.get("seed", 0),
    )  # fmt: skip


def _group_key(record) -> str:
    """The settings of ``record`` but its seed: the records of one configuration."""
    settings = {k: v for k, v in _record_settings(record).items() if k != "seed"}
    return common.settings_digest({**settings, "smoke": bool(record.get("smoke"))})


def _mean_sd(values):
    """The mean and the sample standard deviation (``None`` for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(records) -> list:
    """One row per configuration (every setting but the seed): the mean and sample standard
    deviation over seeds of the test log-likelihood and negative ELBO, the number of seeds, and
    the paper's figure.

    Example:
        >>> base = {"dataset": "MNIST", "estimator": "GS", "temperature_pair": "0.5"}
        >>> rows = summarize([dict(base, seed=s, test_log_likelihood=v, test_neg_elbo=-v)
        ...                   for s, v in enumerate([-100.0, -102.0])])
        >>> rows[0]["test_log_likelihood"], rows[0]["test_log_likelihood_sd"], rows[0]["seeds"]
        (-101.0, 1.4142135623730951, 2)
    """
    groups = {}
    for record in sorted(records, key=_order):
        groups.setdefault(_group_key(record), []).append(record)
    rows = []
    for group in groups.values():
        first = group[0]
        row = {key: first.get(key) for key in _record_settings(first) if key != "seed"}
        row["smoke"] = bool(first.get("smoke"))
        row["seeds"] = len(group)
        for key in (*_SCORES, "seconds_per_epoch"):
            values = [r[key] for r in group if r.get(key) is not None]
            mean, sd = _mean_sd(values) if values else (None, None)
            row[key], row[f"{key}_sd"] = mean, sd
        row["paper_test_log_likelihood"] = PAPER_TEST_LOG_LIKELIHOOD.get(
            (first.get("dataset"), first.get("estimator"))
        )
        rows.append(row)
    return rows


def _differing(rows, *shown) -> list:
    """For each row of :func:`summarize`, the settings in which it differs from the others,
    apart from ``shown``."""
    names = [f.name for f in dataclasses.fields(_Settings) if f.name != "seed"] + ["smoke"]
    return common.differing_settings(
        rows, lambda row: {name: row.get(name) for name in names}, shown=shown
    )


def differences(rows) -> list:
    """IGR-I minus GS, per data set and temperature pair, from the rows of :func:`summarize`
    whose other settings agree (and the paper's difference)."""

    # The settings that must agree: all but the seed and what differs between estimators.
    own = {"seed", "estimator", "temperature", "planar_layers"}
    shared = [f.name for f in dataclasses.fields(_Settings) if f.name not in own] + ["smoke"]

    def other_settings(row):
        return common.settings_digest({name: row.get(name) for name in shared})

    gs = {other_settings(r): r for r in rows if r.get("estimator") == "GS"}
    pairs = [
        (row, gs[other_settings(row)])
        for row in rows
        if row.get("estimator") == "IGR-I" and other_settings(row) in gs
    ]
    # What tells the pairs apart besides the columns (say, how many images scored them).
    differing = _differing([row for row, _ in pairs], *own, *_GAP_COLUMNS)
    result = []
    for (row, partner), settings in zip(pairs, differing, strict=True):
        paper_igr = PAPER_TEST_LOG_LIKELIHOOD.get((row["dataset"], "IGR-I"))
        paper_gs = PAPER_TEST_LOG_LIKELIHOOD.get((row["dataset"], "GS"))
        result.append(
            {
                "dataset": row["dataset"],
                "architecture": row.get("architecture"),
                "temperature_pair": row["temperature_pair"],
                "epochs": row["epochs"],
                "smoke": row["smoke"],
                "seeds": f"{row['seeds']} / {partner['seeds']}",
                "difference": row["test_log_likelihood"] - partner["test_log_likelihood"],
                "paper_difference": (
                    paper_igr - paper_gs if None not in (paper_igr, paper_gs) else None
                ),
                "settings": settings,
            }
        )
    return result


def _with_sd(value, sd) -> str | None:
    if value is None:
        return None
    return f"{value:.2f}" if sd is None else f"{value:.2f} ± {sd:.2f}"


_GAP_COLUMNS = (
    "dataset", "architecture", "temperature_pair", "epochs", "smoke", "seeds", "difference",
    "paper_difference",
)  # fmt: skip


def _markdown(records) -> str:
    rows = summarize(records)
    for row in rows:
        row["log_likelihood"] = _with_sd(row["test_log_likelihood"], row["test_log_likelihood_sd"])
        row["neg_elbo"] = _with_sd(row["test_neg_elbo"], row["test_neg_elbo_sd"])
        row["reference_score"] = _with_sd(
            row["test_reference_score"], row["test_reference_score_sd"]
        )
    columns = [
        "dataset", "architecture", "temperature_pair", "estimator", "temperature", "epochs",
        "smoke", "seeds", "log_likelihood", "paper_test_log_likelihood", "reference_score",
        "neg_elbo", "num_particles", "eval_images", "seconds_per_epoch",
    ]  # fmt: skip
    table = common.markdown_table(
        rows,
        columns,
        {"paper_test_log_likelihood": ".2f", "seconds_per_epoch": ".1f"},
        _differing(rows, *columns, "planar_layers"),  # the flows' layers: IGR-Planar's own
    )
    gap_rows = differences(rows)
    gaps = common.markdown_table(
        gap_rows,
        list(_GAP_COLUMNS),
        {"difference": ".2f", "paper_difference": ".2f"},
        [row["settings"] for row in gap_rows],
    )
    header = (
        "# Discrete VAE (IGR paper, Table 1)\n\n"
        "Test log-likelihood of the discrete model in nats per image (higher is better), by "
        "importance sampling with `num_particles` particles per image (Burda et al.), with the "
        "uniform categorical prior and each trained guide's discrete distribution as the "
        "proposal; `reference_score` is what the paper's code reports as the test "
        "log-likelihood: the log of the mean likelihood of `num_particles` draws of the "
        "discrete guide minus its discrete KL to the uniform prior (not a bound on log p(x); "
        "see `_reference_score` in the module); `neg_elbo` is the discrete model's negative "
        "ELBO. Mean ± sample standard "
        "deviation over `seeds` seeds (no ± with one seed), over the first `eval_images` test "
        "images. Temperature pair 0.5: IGR at 0.5, GS at 0.67; pair 0.1: IGR at 0.1, GS at "
        "0.25. `paper_test_log_likelihood` is the paper's figure (it does not say which pair "
        "gave it). The paper's Fashion-MNIST decoder is Gaussian on gray levels, ours Bernoulli "
        "on the fixed binarization, so its Fashion-MNIST figures are not comparable to ours. "
        f"Generated by `pyro-relax experiment igr-vae` from `{RESULTS_NAME}.json`, which holds "
        "each run's settings, command and curves.\n\n"
    )
    return header + table + "\n## IGR-I minus GS (test log-likelihood, nats per image)\n\n" + gaps


def _plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    records = sorted(records, key=_order)
    # Runs that differ in more than the panel, estimator, temperature and seed say how.
    shown = ("dataset", "architecture", "temperature_pair", "estimator", "temperature", "seed")
    shown += ("planar_layers",)
    settings = common.differing_settings(records, _record_settings, shown=shown)
    groups = {}
    for record, differing in zip(records, settings, strict=True):
        if record.get("history"):
            record = dict(record, differing=differing)
            key = (record["dataset"], record.get("architecture"), record["temperature_pair"])
            groups.setdefault(key, []).append(record)
    count = max(len(groups), 1)
    figure, axes = plt.subplots(1, count, figsize=(5 * count, 4), squeeze=False)
    for ax, ((dataset, architecture, pair), group) in zip(axes[0], groups.items(), strict=False):
        for index, record in enumerate(group):
            epochs = [h["epoch"] for h in record["history"]]
            estimator = record["estimator"]
            slot = ESTIMATORS.index(estimator) if estimator in ESTIMATORS else 4 + index
            label = f"{estimator} {record['temperature']} (seed {record['seed']})"
            label += f", {record['differing']}" if record["differing"] else ""
            train_curve = [h["loss"] for h in record["history"]]
            test_curve = [h["test_loss"] for h in record["history"]]
            ax.plot(epochs, train_curve, color=f"C{slot}", marker=".", label=label)
            ax.plot(epochs, test_curve, color=f"C{slot}", marker=".", linestyle="--")
        ax.set_title(f"{dataset}, {architecture}, temperature pair {pair}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("relaxed negative ELBO (nats per image)")
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
        parser, estimators=ESTIMATORS, default_epochs=DEFAULT_EPOCHS, default_batch_size=64
    )
    parser.add_argument(
        "--temperature-pair",
        nargs="+",
        default=["0.5"],
        choices=[*TEMPERATURE_PAIRS, "all"],
        help="0.5: IGR at 0.5, GS at 0.67; 0.1: IGR at 0.1, GS at 0.25 (default 0.5)",
    )
    parser.add_argument(
        "--binarization",
        choices=BINARIZATIONS,
        default="fixed",
        help="fixed: gray level > 0.5, the same for training and test (default)",
    )
    parser.add_argument(
        "--latents",
        type=positive_int,
        help=f"number of categorical latents (default {DEFAULT_LATENTS}; smoke: 4)",
    )
    parser.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default="linear",
        help="linear: one linear map each way (default); nonlinear: encoder 784-512-256, "
        "decoder 256-512-784, ReLU",
    )
    parser.add_argument(
        "--planar-layers",
        type=positive_int,
        default=DEFAULT_PLANAR_LAYERS,
        help=f"planar layers of IGR-Planar (default {DEFAULT_PLANAR_LAYERS})",
    )
    parser.add_argument(
        "--num-particles",
        type=positive_int,
        help="importance samples per test image (default 1000; smoke: 20)",
    )
    parser.add_argument(
        "--eval-samples",
        type=integer_at_least(2),
        help="guide draws of the discrete negative ELBO (default 100; smoke: 2)",
    )
    parser.add_argument(
        "--eval-images",
        type=positive_int,
        help="test images scored, the first ones (default: all; smoke: 50)",
    )


def _settings(args, data, estimator: str, pair: str) -> _Settings:
    """The settings of one run of the command line ``args`` on the data set ``data``."""
    pick = image_vae.smoke_picker(args, _SMOKE)
    num_test = len(data.test_images)
    return _Settings(
        dataset=data.name,
        estimator=estimator,
        temperature_pair=pair,
        temperature=temperature_of(estimator, pair),
        seed=args.seed,
        epochs=pick(args.epochs, "epochs", DEFAULT_EPOCHS),
        steps_per_epoch=image_vae.steps_per_epoch(args, data, pick),
        batch_size=args.batch_size,
        lr=args.lr,
        latents=pick(args.latents, "latents", DEFAULT_LATENTS),
        categories=CATEGORIES,
        planar_layers=args.planar_layers if estimator == "IGR-Planar" else None,
        architecture=args.architecture,
        binarization=args.binarization,
        num_particles=pick(args.num_particles, "num_particles", 1000),
        eval_samples=pick(args.eval_samples, "eval_samples", 100),
        eval_images=min(pick(args.eval_images, "eval_images", num_test), num_test),
        device=args.device,
    )


def run(args) -> int:
    """Trains and scores every requested estimator and temperature pair; returns the exit
    code."""
    results = Path(args.results)
    path = results / f"{RESULTS_NAME}.json"
    common.read_records(path, write_reports)  # a damaged file stops the run at once
    data = image_vae.dataset(args)
    with common.torch_threads(args.threads), pyro.validation_enabled(not args.no_validation):
        for pair in image_vae.expand(args.temperature_pair, TEMPERATURE_PAIRS):
            for estimator in image_vae.expand(args.estimator, ESTIMATORS):
                settings = _settings(args, data, estimator, pair)
                checkpoint = _checkpoint(results, settings)
                record = train(settings, data, checkpoint)
                record["command"] = args.command_line
                record["smoke"] = bool(args.smoke)
                # The checkpoint stays: it holds the trained model, for scoring it again.
                common.update_records(
                    path, [record], _record_settings, lambda merged: write_reports(results, merged)
                )
                print(
                    f"{record['dataset']} {estimator} tau={record['temperature']} seed "
                    f"{args.seed}: test log-likelihood {record['test_log_likelihood']:.2f} "
                    f"± {record['test_log_likelihood_se']:.2f}, negative ELBO "
                    f"{record['test_neg_elbo']:.2f} ({record['seconds']:.0f} s)"
                )
    return 0

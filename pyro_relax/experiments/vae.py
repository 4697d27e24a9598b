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

Scoring, the same for every estimator: the negative ELBO of the discrete model, with the
untruncated prior and the guide's discrete distribution (for GenGS guides the truncated PMF,
whose last outcome ``n-1`` carries ``P(X >= n-1)``; for REINFORCE the count distribution), the
KL exact (a sum over the guide's finite support, torch's closed form for Poisson and Geometric
guides, and a sum over the head holding all but ``1e-10`` of the mass for Negative Binomial
guides, Monte Carlo for the rare one whose head is longer than 256 counts) and the
likelihood a Monte-Carlo average over hard samples. Dynamically binarized
images are scored on one fixed binarization (seeded, the same for every run). Reported in nats
per image: ``train_neg_elbo`` on the whole training set and ``test_neg_elbo`` on the test set,
after training; ``history`` holds per epoch the training loss (each estimator's own objective)
and the discrete negative ELBO on the first 10000 training images and on the test set.

The paper reports the training negative ELBO; its numbers are in :data:`PAPER_TRAIN_NEG_ELBO`.
"""

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.params.param_store import param_with_module_name
from torch import nn

from pyro_relax._cli import positive_int
from pyro_relax.distributions import (
    GenGSGeometric,
    GenGSNegativeBinomial,
    GenGSPoisson,
    TruncatedGenGS,
)
from pyro_relax.experiments import common
from pyro_relax.experiments.data import (
    BINARIZATIONS,
    DATASETS,
    batches,
    binarize,
    load_dataset,
)
from pyro_relax.schedules import ExponentialDecay

__all__ = [
    "DESCRIPTION",
    "ESTIMATORS",
    "PAPER_TRAIN_NEG_ELBO",
    "PRIORS",
    "Prior",
    "add_arguments",
    "build_estimator",
    "discrete_kl",
    "discrete_neg_elbo",
    "run",
    "train",
    "write_reports",
]

DESCRIPTION = (
    "count-latent VAE on MNIST (GenGS paper, Table 1): GenGS, GenGS-IMP, GenGS-NP and "
    "REINFORCE, scored by the ELBO of the discrete model"
)

ESTIMATORS = ("GenGS", "GenGS-IMP", "GenGS-NP", "REINFORCE")
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
_SMOKE = {"epochs": 1, "steps_per_epoch": 3, "latents": 8, "hidden": (64, 32), "eval_samples": 1}
NP_MASS = 0.999  # the mass GenGS-NP's automatic truncation captures
_RATE_FLOOR = 1e-4  # keeps softplus outputs (Poisson rates, NB total counts) positive in float32
_CURVE_TRAIN_IMAGES = 10_000  # training images scored after each epoch
_EVAL_BINARIZATION_SEED = 0  # one fixed binarization of the evaluation images, for every run
_NB_HEAD_MASS = 1 - 1e-10  # the mass of the head over which a Negative Binomial KL is summed
_KL_MAX_COUNTS = 256  # beyond this head an element's KL falls back to Monte Carlo
_KL_SAMPLES = 256  # draws of that Monte-Carlo estimate


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


def _mlp(sizes) -> nn.Sequential:
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclasses.dataclass
class _Estimator:
    """What one estimator trains with (model, guide, ELBO) and how its guide is scored."""

    name: str
    model: object
    guide: object
    loss: object
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

    if estimator == "REINFORCE":
        prior_dist = prior.distribution(device)

        def guide_dist(x):
            return prior.distribution(**prior.guide_kwargs(parameters(x)))

        infer = {"baseline": {"use_decaying_avg_baseline": True}}
        loss, discrete, truncation = TraceGraph_ELBO(), guide_dist, None
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
            return dist.Categorical(logits=guide_dist(x).logits)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior_dist.expand([x.shape[0], latents]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", guide_dist(x).to_event(1), infer=infer)

    return _Estimator(estimator, model, guide, loss, discrete, truncation, prior_dist)


# --- Scoring: the ELBO of the discrete model --------------------------------------------------


def _log_pmf_at_counts(p, num_counts: int, batch_dims: int, like: torch.Tensor):
    """``log p(k)`` for ``k = 0..num_counts-1`` in the last dimension (``p`` broadcasting with
    a batch of ``batch_dims`` dimensions)."""
    counts = torch.arange(num_counts, dtype=like.dtype, device=like.device)
    log_pmf = p.log_prob(counts.view((num_counts,) + (1,) * batch_dims))
    return log_pmf.movedim(0, -1)


def _as_float64(d):
    """A copy of the count distribution ``d`` in float64."""
    if isinstance(d, torch.distributions.Poisson):
        return dist.Poisson(d.rate.double())
    if isinstance(d, torch.distributions.Geometric):
        return dist.Geometric(logits=d.logits.double())
    return dist.NegativeBinomial(d.total_count.double(), logits=d.logits.double())


def _negative_binomial_kl(q, p, mass=_NB_HEAD_MASS):
    """KL(q || p) between Negative Binomials, summed in float64 over the head ``0..K-1`` that
    holds all but ``1 - mass`` of each element of ``q``; a Monte-Carlo estimate for an element
    whose head is longer than :data:`_KL_MAX_COUNTS` counts (a guide with a huge mean).

    Each element gets the shortest ``K`` in 16, 32, ..., 256 that a bound certifies: beyond
    ``K`` the ratio ``q(k+1) / q(k) = pi (k + r) / (k + 1)`` stays below
    ``rho = pi max(1, (K + r) / (K + 1))``, so the tail ``P(X >= K) <= q(K) / (1 - rho)``.
    """
    q64 = _as_float64(q)
    p64 = _as_float64(p)
    r, logits = q64.total_count.reshape(-1), q64.logits.reshape(-1)
    flat = dist.NegativeBinomial(r, logits=logits)
    kl = torch.empty_like(r)
    remaining = torch.ones_like(r, dtype=torch.bool)
    num_counts = 16
    while num_counts <= _KL_MAX_COUNTS and bool(remaining.any()):
        rho = flat.probs * torch.clamp((num_counts + r) / (num_counts + 1), min=1.0)
        geometric = rho < 1
        log_at_end = flat.log_prob(torch.full_like(r, num_counts))
        bound = log_at_end - torch.log1p(-torch.where(geometric, rho, torch.zeros_like(rho)))
        now = remaining & geometric & (bound <= math.log1p(-mass))
        if bool(now.any()):
            head = dist.NegativeBinomial(r[now], logits=logits[now])
            log_q = _log_pmf_at_counts(head, num_counts, 1, r)
            log_p = _log_pmf_at_counts(p64, num_counts, 1, r)
            kl[now] = (log_q.exp() * (log_q - log_p)).sum(-1)
        remaining &= ~now
        num_counts *= 2
    if bool(remaining.any()):
        tail = dist.NegativeBinomial(r[remaining], logits=logits[remaining])
        samples = tail.sample((_KL_SAMPLES,))
        kl[remaining] = (tail.log_prob(samples) - p64.log_prob(samples)).mean(0)
    return kl.reshape(q.batch_shape).to(q.mean.dtype)


def discrete_kl(q, p) -> torch.Tensor:
    r"""The KL divergence :math:`\sum_k q(k) \log(q(k) / p(k))` between a guide's discrete
    distribution ``q`` and an untruncated count prior ``p``, per batch element of ``q``.

    ``q`` is a ``Categorical`` over the counts ``0..n-1`` (a GenGS guide's truncated PMF; the
    sum runs over its support), a Poisson or a Geometric (torch's closed form), or a Negative
    Binomial (a float64 sum over the head holding all but 1e-10 of the mass, or for a guide
    whose head is longer than 256 counts, a Monte-Carlo estimate).

    Example:
        >>> q = dist.Categorical(probs=torch.tensor([0.5, 0.5]))
        >>> p = dist.Poisson(torch.tensor(1.0))
        >>> round(float(discrete_kl(q, p)), 4)  # 0.5 log(0.5 e) + 0.5 log(0.5 e)
        0.3069
    """
    if isinstance(q, torch.distributions.Categorical):
        log_q = q.logits
        log_p = _log_pmf_at_counts(p, log_q.shape[-1], len(q.batch_shape), log_q)
        difference = torch.where(log_q.isneginf(), torch.zeros_like(log_q), log_q - log_p)
        return (log_q.exp() * difference).sum(-1)
    if isinstance(q, torch.distributions.NegativeBinomial):
        return _negative_binomial_kl(q, p)
    return torch.distributions.kl_divergence(q, p.expand(q.batch_shape))


@torch.no_grad()
def discrete_neg_elbo(
    discrete_guide, decoder, prior, images, *, num_samples=1, seed=0, chunk_size=1000
) -> float:
    r"""The negative ELBO of the discrete model in nats per image, averaged over ``images``.

    .. math::
        -\mathrm{ELBO}(x) = \mathrm{KL}\big(q(z \mid x) \,\|\, p(z)\big)
            - \mathbb{E}_{q(z \mid x)} \log p(x \mid z),

    with :func:`discrete_kl` per latent (exact) and the expectation averaged over
    ``num_samples`` hard samples of ``q`` (from a generator seeded with ``seed``; the global
    one is left alone). ``discrete_guide`` maps a batch of images to ``q``, with batch shape
    ``(batch, latents)``; ``prior`` is the untruncated count prior; the decoder gives Bernoulli
    logits.

    Example:
        >>> q = lambda x: dist.Categorical(logits=torch.zeros(x.shape[0], 1, 2))
        >>> decoder = lambda z: torch.zeros(z.shape[:-1] + (3,))  # every pixel 1/2
        >>> value = discrete_neg_elbo(q, decoder, dist.Poisson(torch.tensor(1.0)), torch.ones(5, 3))
        >>> round(value, 4)  # KL 0.3069 + 3 log 2
        2.3863
    """
    device = images.device
    total = 0.0
    with common.private_rng(seed, device):
        for start in range(0, len(images), chunk_size):
            x = images[start : start + chunk_size]
            q = discrete_guide(x)
            kl = discrete_kl(q, prior).sum(-1)
            z = q.sample((num_samples,)).to(x.dtype)
            log_likelihood = dist.Bernoulli(logits=decoder(z)).log_prob(x).sum(-1).mean(0)
            total += float((kl - log_likelihood).sum())
    return total / len(images)


# --- Training -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Every setting that changes a run's numbers, resolved (``dataset`` is the data set's name,
    ``steps_per_epoch`` the batches each epoch trains on). They name the run's checkpoint and
    identify its record in the results, where each is a field of the record.

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
    return {
        field.name: record.get(field.name, _STORED_BEFORE.get(field.name))
        for field in dataclasses.fields(_Settings)
    }


def _checkpoint(results: Path, settings: _Settings) -> common.Checkpoint:
    label = f"vae-{settings.dataset}-{settings.prior}-{settings.estimator}-seed{settings.seed}"
    values = dataclasses.asdict(settings)
    return common.Checkpoint(common.checkpoint_path(results, label, values), values)


def _after_epoch(epoch: int) -> None:
    """Called after each epoch's checkpoint is written (the tests interrupt runs here)."""


def _restore_params(state: dict, modules: dict) -> None:
    """Loads the networks' weights and the other Pyro params (REINFORCE's baseline) from a
    param store state saved by ``pyro.get_param_store().get_state()``."""
    params, constraints = dict(state["params"]), dict(state["constraints"])
    for name, module in modules.items():
        prefix = param_with_module_name(name, "")
        weights = {k[len(prefix) :]: params.pop(k) for k in list(params) if k.startswith(prefix)}
        module.load_state_dict(weights)
        for key in [k for k in constraints if k.startswith(prefix)]:
            del constraints[key]
    store = pyro.get_param_store()
    store.clear()
    store.set_state({"params": params, "constraints": constraints})


def _evaluation_images(data, binarization: str, device):
    generator = torch.Generator().manual_seed(_EVAL_BINARIZATION_SEED)
    train = binarize(data.train_images, binarization, generator).to(device)
    test = binarize(data.test_images, binarization, generator).to(device)
    return train, test


def train(settings: _Settings, data, checkpoint=None, *, quiet=False) -> dict:
    """Trains one VAE (one prior, one estimator, one seed) and returns its record.

    With a :class:`~pyro_relax.experiments.common.Checkpoint`, the state is saved after every
    epoch and the finished record at the end, and a saved state is resumed (a saved record is
    returned as it is); the caller removes the checkpoint once the record is merged.
    """
    device = torch.device(settings.device)
    prior = PRIORS[settings.prior]
    common.seed_everything(settings.seed)
    pyro.clear_param_store()
    k = prior.truncation if settings.estimator == "GenGS-IMP" else prior.num_guide_parameters
    encoder = _mlp([data.num_pixels, *settings.hidden, settings.latents * k]).to(device)
    decoder = _mlp([settings.latents, *settings.hidden[::-1], data.num_pixels]).to(device)
    steps = settings.steps_per_epoch
    schedule = ExponentialDecay(1.0, 0.1, steps=max(settings.epochs * steps, 1), device=device)
    estimator = build_estimator(
        settings.estimator, prior, encoder, decoder, schedule.temperature, settings.latents
    )
    optimizer = pyro.optim.Adam({"lr": settings.lr})
    svi = SVI(estimator.model, estimator.guide, optimizer, estimator.loss)
    generator = torch.Generator().manual_seed(settings.seed)
    eval_train, eval_test = _evaluation_images(data, settings.binarization, device)
    prior_dist = prior.distribution(device)

    def score(images, num_samples):
        return discrete_neg_elbo(
            estimator.discrete_guide, decoder, prior_dist, images, num_samples=num_samples
        )

    state = checkpoint.load() if checkpoint is not None else None
    start, history, seconds = 0, [], 0.0
    if state is not None and "record" in state:
        return state["record"]
    if state is not None:
        _restore_params(state["params"], {"encoder": encoder, "decoder": decoder})
        optimizer.set_state(state["optimizer"])
        schedule.step_count = state["schedule_step"]
        schedule.temperature.fill_(schedule.value_at(schedule.step_count))
        generator.set_state(state["generator"])
        start, history, seconds = state["epoch"], state["history"], state["seconds"]
        print(f"resuming {checkpoint.path} after epoch {start}", file=sys.stderr)

    desc = f"{settings.prior} {settings.estimator}"
    bar = common.progress(
        total=settings.epochs * steps, initial=start * steps, desc=desc, unit="step", disable=quiet
    )
    with bar:
        for epoch in range(start, settings.epochs):
            began, total_loss = time.perf_counter(), 0.0
            for step, x in enumerate(
                batches(
                    data.train_images,
                    settings.batch_size,
                    generator=generator,
                    binarization=settings.binarization,
                )
            ):
                if step == steps:
                    break
                total_loss += svi.step(x.to(device))
                schedule.step()
                bar.update()
            seconds += time.perf_counter() - began
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": total_loss / (steps * settings.batch_size),
                    "train_neg_elbo": score(eval_train[:_CURVE_TRAIN_IMAGES], 1),
                    "test_neg_elbo": score(eval_test, 1),
                    "temperature": float(schedule.temperature),
                    "seconds": seconds,
                }
            )
            bar.set_postfix(test=f"{history[-1]['test_neg_elbo']:.2f}", refresh=False)
            if checkpoint is not None:
                checkpoint.save(
                    {
                        "epoch": epoch + 1,
                        "params": pyro.get_param_store().get_state(),
                        "optimizer": optimizer.get_state(),
                        "schedule_step": schedule.step_count,
                        "generator": generator.get_state(),
                        "history": history,
                        "seconds": seconds,
                    }
                )
            _after_epoch(epoch + 1)

    began = time.perf_counter()
    record = {
        "dataset": settings.dataset,
        "prior": settings.prior,
        "estimator": settings.estimator,
        "seed": settings.seed,
        "epochs": settings.epochs,
        "train_neg_elbo": score(eval_train, settings.eval_samples),
        "test_neg_elbo": score(eval_test, settings.eval_samples),
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
        checkpoint.save({"record": record})
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
    rows = [
        {**r, "last_epoch_loss": r["history"][-1]["loss"] if r.get("history") else None}
        for r in sorted(records, key=_order)
    ]
    table = common.markdown_table(
        rows,
        [
            "dataset",
            "prior",
            "estimator",
            "seed",
            "epochs",
            "latents",
            "train_neg_elbo",
            "test_neg_elbo",
            "paper_train_neg_elbo",
            "last_epoch_loss",
            "seconds_per_epoch",
        ],
        {
            "train_neg_elbo": ".2f",
            "test_neg_elbo": ".2f",
            "paper_train_neg_elbo": ".2f",
            "last_epoch_loss": ".2f",
            "seconds_per_epoch": ".1f",
        },
    )
    header = (
        "# Count-latent VAE (GenGS paper, Table 1)\n\n"
        "Negative ELBO of the discrete model in nats per image (lower is better): untruncated "
        "prior, the guide's discrete distribution, exact KL, Monte-Carlo likelihood with hard "
        "samples; `train_neg_elbo` over the whole training set, `test_neg_elbo` over the test "
        "set, after training. `paper_train_neg_elbo` is the paper's training negative ELBO "
        "(its REINFORCE is REINFORCE*). `last_epoch_loss` is the objective each estimator "
        "trained on, per image and averaged over the last epoch: for the GenGS estimators the "
        "relaxed one (truncated prior, analytic KL of the truncated PMFs, relaxed samples in "
        "the decoder), for REINFORCE a Monte-Carlo estimate of the discrete negative ELBO. "
        "Generated by `pyro-relax experiment vae` from "
        f"`{RESULTS_NAME}.json`, which holds each run's settings, command and curves.\n\n"
    )
    return header + table


def _plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    groups = {}
    for record in sorted(records, key=_order):
        if record.get("history"):
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


def _hidden(text: str) -> tuple:
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"takes comma-separated positive sizes, got {text!r}")
    return sizes


def add_arguments(parser) -> None:
    """Adds this experiment's options to its subcommand's ``parser``."""
    parser.add_argument(
        "--prior",
        nargs="+",
        default=["Pois(2)"],
        choices=[*PRIORS, "all"],
        help="prior(s), or all (default: Pois(2))",
    )
    parser.add_argument(
        "--estimator",
        nargs="+",
        default=["all"],
        choices=[*ESTIMATORS, "all"],
        help="estimator(s), or all (default: all)",
    )
    parser.add_argument(
        "--epochs", type=positive_int, help=f"training epochs (default {DEFAULT_EPOCHS}; smoke: 1)"
    )
    parser.add_argument(
        "--steps-per-epoch",
        type=positive_int,
        help="cap on the batches per epoch (default: all; smoke: 3)",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="mnist", help="default: mnist")
    parser.add_argument(
        "--data-dir", help="directory of the IDX files (default: see pyro_relax.experiments.data)"
    )
    parser.add_argument("--binarization", choices=BINARIZATIONS, default="dynamic")
    parser.add_argument(
        "--latents", type=positive_int, help=f"number of count latents (default {DEFAULT_LATENTS})"
    )
    parser.add_argument(
        "--hidden",
        type=_hidden,
        help="encoder hidden sizes, mirrored in the decoder (default 512,256)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=100, help="default: 100")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument(
        "--eval-samples",
        type=positive_int,
        help="hard samples per image of the final score (default 5)",
    )
    parser.add_argument(
        "--threads", type=positive_int, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--no-validation",
        action="store_true",
        help="turn Pyro's argument and support checks off (faster)",
    )


def _expand(values, everything) -> list:
    return list(everything) if "all" in values else list(dict.fromkeys(values))


def _settings(args, data, prior: str, estimator: str) -> _Settings:
    """The settings of one run of the command line ``args`` on the data set ``data``."""
    smoke = _SMOKE if args.smoke else {}

    def pick(value, name, default):
        return value if value is not None else smoke.get(name, default)

    full_steps = len(data.train_images) // args.batch_size
    cap = pick(args.steps_per_epoch, "steps_per_epoch", None)
    return _Settings(
        dataset=data.name,
        prior=prior,
        estimator=estimator,
        seed=args.seed,
        epochs=pick(args.epochs, "epochs", DEFAULT_EPOCHS),
        steps_per_epoch=min(full_steps, cap or full_steps),
        batch_size=args.batch_size,
        lr=args.lr,
        latents=pick(args.latents, "latents", DEFAULT_LATENTS),
        hidden=pick(args.hidden, "hidden", DEFAULT_HIDDEN),
        binarization=args.binarization,
        eval_samples=pick(args.eval_samples, "eval_samples", 5),
        device=args.device,
    )


def run(args) -> int:
    """Trains and scores every requested prior and estimator; returns the exit code."""
    results = Path(args.results)
    path = results / f"{RESULTS_NAME}.json"
    common.read_records(path)  # a damaged results file stops the run before it trains
    data = load_dataset("digits" if args.smoke else args.dataset, args.data_dir)
    with common.torch_threads(args.threads), pyro.validation_enabled(not args.no_validation):
        for prior in _expand(args.prior, PRIORS):
            for estimator in _expand(args.estimator, ESTIMATORS):
                settings = _settings(args, data, prior, estimator)
                checkpoint = _checkpoint(results, settings)
                record = train(settings, data, checkpoint)
                record["command"] = args.command_line
                record["smoke"] = bool(args.smoke)
                merged = common.update_records(path, [record], _record_settings)
                checkpoint.remove()  # only now: until the merge, it holds the finished record
                write_reports(results, merged)
                print(
                    f"{record['dataset']} {prior} {estimator} seed {args.seed}: negative "
                    f"ELBO train {record['train_neg_elbo']:.2f}, test "
                    f"{record['test_neg_elbo']:.2f} ({record['seconds']:.0f} s)"
                )
    return 0

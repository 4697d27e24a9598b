r"""A Neyman Type A regression on the RAND Health Insurance Experiment's doctor visits: which
GenGS model/guide pairs learn a count latent on real data, and why one of them does not.

The data are the 20,190 person-years of the RAND HIE bundled with statsmodels
(``statsmodels.datasets.randhie``): the response is ``mdvis``, the number of outpatient visits
to a doctor in a year, and the nine covariates (coinsurance, deductibles, income, health
status ...) are standardized with the training people's means and deviations. A permutation
drawn from the seed holds out ``test_fraction`` of the people.

The model has one count latent per person, the number of episodes of illness, each of which
brings a Poisson number of visits:

.. math::
    z_i \sim \operatorname{Poisson}(\lambda_i), \quad
    \lambda_i = \exp(b_0 + x_i^\top \beta), \qquad
    y_i \mid z_i \sim \operatorname{Poisson}(\epsilon + \phi z_i),

with :math:`b_0, \beta, \phi` learned and :math:`\epsilon` (``rate_offset``) fixed, so that a
person with no episode may still see a doctor. The guide is amortized: a small network of
:math:`(x_i, \log(1 + y_i))` gives each person's guide its parameters. Every latent truncation
has :math:`n` = ``truncation`` outcomes, the last absorbing the tail.

Estimators (each trains the same networks from the same initialization, with Adam, full-batch,
the temperature annealed with :class:`~pyro_relax.ExponentialDecay` from 1.0 to 0.1 over the
run):

- ``GenGS``: :class:`~pyro_relax.GenGSPoisson` guide and prior, ``Trace_ELBO`` (soft log-PMFs,
  the relaxed sample in the likelihood);
- ``GenGS-ST+Poisson``: ``GenGSPoisson(..., hard=True)`` guide and a plain
  ``dist.Poisson`` prior, ``Trace_ELBO`` (the pair the README listed as supported);
- ``GenGS-ST+Poisson-MF``: the same pair with ``TraceMeanField_ELBO`` (the registered KL from
  the guide's truncated PMF to the Poisson truncated at :math:`n`);
- ``GenGS-ST+Poisson-sym``: a prototype, not in the library: the straight-through guide scores
  its own sample with the Poisson log-density continued to real values, as the prior does, in
  place of the soft log-PMF (:class:`SymmetricStraightThroughPoisson`);
- ``GenGS-IMP``: :class:`~pyro_relax.TruncatedGenGS` guide with free logits over the
  :math:`n` outcomes from the network, ``GenGSPoisson`` prior, ``Trace_ELBO``;
- ``exact-ELBO``: the discrete ELBO of the truncated model with the (truncated) Poisson guide
  of the GenGS pairs, summed exactly over :math:`z`: the best that guide family can do with
  exact gradients;
- ``exact``: the marginal likelihood itself, summed over :math:`z`: the reference;
- ``GLM``: a Poisson GLM of :math:`y` on the covariates (statsmodels, maximum likelihood),
  the model without a latent.

The test score is the exact marginal log-likelihood of the learned model per test person,
:math:`\log \sum_{k<n} \pi_k(\lambda_i) \operatorname{Poisson}(y_i; \epsilon + \phi k)` with the
truncated prior PMF :math:`\pi`, the same for every estimator; the records also give the mass
:math:`P(z \geq n)` the truncation drops (``prior_tail_mass``).

The gradient study (:func:`gradient_study`) fixes all parameters and compares, per term of the
single-sample objective (likelihood, prior, guide's entropy term), the mean of many gradient
estimates with the exact gradient of the pair's own objective, the discrete ELBO summed over
the guide's :math:`n` outcomes. Gradients are those of the ELBO (ascent directions), with
respect to each person's guide log-rate (summed over people: a common shift of all the guide
rates; and pulled back through the guide network), the prior's coefficients and
:math:`\log \phi`.

References:
    Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
    Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
    https://arxiv.org/abs/2003.01847

    J. Neyman. On a new class of "contagious" distributions, applicable in entomology and
    bacteriology. Annals of Mathematical Statistics 10, 1939.

    J. P. Newhouse and the Insurance Experiment Group. Free for All? Lessons from the RAND
    Health Insurance Experiment. Harvard University Press, 1993.
"""

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_relax import ExponentialDecay, GenGSPoisson, TruncatedGenGS, truncated_log_probs
from pyro_relax._cli import integer_at_least, positive_float, positive_int, temperature_value
from pyro_relax.experiments import common

__all__ = [
    "DESCRIPTION",
    "ESTIMATORS",
    "SMOKE_CONFIG",
    "Encoder",
    "MissingDependencyError",
    "NeymanConfig",
    "Regression",
    "SymmetricStraightThroughPoisson",
    "Visits",
    "add_arguments",
    "discrete_elbo",
    "fit_glm",
    "gradient_study",
    "load_visits",
    "marginal_log_likelihood",
    "run",
    "train",
]

DESCRIPTION = (
    "Neyman Type A regression of doctor visits (RAND HIE, statsmodels) with a Poisson count "
    "latent per person: GenGS model/guide pairs against exact enumeration, and the gradient "
    "bias of the straight-through guide with a plain Poisson prior"
)
GENGS, ST, ST_MF, ST_SYM = (
    "GenGS",
    "GenGS-ST+Poisson",
    "GenGS-ST+Poisson-MF",
    "GenGS-ST+Poisson-sym",
)
IMP, EXACT_ELBO, EXACT, GLM = "GenGS-IMP", "exact-ELBO", "exact", "GLM"
ESTIMATORS = (GENGS, ST, ST_MF, ST_SYM, IMP, EXACT_ELBO, EXACT, GLM)
# The pairs whose gradients the study measures (GENGS, ST and ST_SYM; ST_MF's only sampled
# term is ST's likelihood term).
GRADIENT_PAIRS = (ST, ST_SYM, GENGS)
TERMS = ("likelihood", "prior", "entropy", "total")
# The smallest guide rate: a Poisson rate must be positive, and softplus underflows.
_MIN_RATE = 1e-3
# A prior rate (episodes a person) beyond which a run counts as diverged: the data hold at most
# 77 visits a person, and the untruncated score enumerates counts up to the largest rate.
_MAX_PRIOR_RATE = 1e4


@dataclasses.dataclass(frozen=True)
class NeymanConfig:
    """Settings shared by every estimator's run, so that the comparison is fair.

    ``people`` keeps that many people of the shuffled data (``None``: all 20,190);
    ``eval_every`` is the number of steps between two points of the curves.
    """

    steps: int = 3000
    truncation: int = 60
    hidden: int = 64
    learning_rate: float = 0.01
    rate_offset: float = 0.1
    initial_temperature: float = 1.0
    final_temperature: float = 0.1
    test_fraction: float = 0.2
    eval_every: int = 50
    people: int | None = None
    seed: int = 0


SMOKE_CONFIG = NeymanConfig(steps=6, truncation=20, hidden=8, eval_every=3, people=300)


# ---------------------------------------------------------------------------------------------
# Data


class MissingDependencyError(common.ExperimentError, ImportError):
    """A package the experiment needs is not installed (the message says how to install it)."""


@dataclasses.dataclass
class Visits:
    """Standardized covariates ``x_*`` (people by covariates) and visit counts ``y_*`` of the
    training and test people, float tensors; ``name`` tells records of other data apart."""

    name: str
    covariates: list
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


# The people of the RAND HIE data statsmodels bundles.
PEOPLE = 20_190


def load_visits(seed: int = 0, test_fraction: float = 0.2, people: int | None = None) -> Visits:
    """The RAND HIE doctor visits (``mdvis``) and their nine covariates from statsmodels, split
    into training and test people by a permutation drawn from ``seed`` (the first ``people``
    of it when given), the covariates standardized with the training people's moments."""
    try:
        from statsmodels.datasets import randhie
    except ImportError as error:
        raise MissingDependencyError(
            "the neyman experiment reads the RAND Health Insurance Experiment data bundled "
            "with statsmodels: pip install statsmodels (or pip install -e '.[experiments]')"
        ) from error
    frame = randhie.load_pandas()
    y = frame.endog.to_numpy(dtype=float)
    x = frame.exog.to_numpy(dtype=float)
    order = np.random.default_rng([seed, 0x4E7]).permutation(len(y))[:people]
    num_test = min(max(1, round(test_fraction * len(order))), len(order) - 1)
    test, train = order[:num_test], order[num_test:]
    mean, scale = x[train].mean(0), x[train].std(0)
    x = (x - mean) / np.where(scale > 0, scale, 1.0)

    def tensor(array):
        return torch.as_tensor(array, dtype=torch.float32)

    name = "randhie" if people is None or people >= len(y) else f"randhie-{len(order)}"
    return Visits(
        name,
        list(frame.exog.columns),
        tensor(x[train]),
        tensor(y[train]),
        tensor(x[test]),
        tensor(y[test]),
    )


# ---------------------------------------------------------------------------------------------
# The model, the guide network and exact scores


class Regression(nn.Module):
    r"""The model's parameters: the prior's intercept :math:`b_0` and coefficients
    :math:`\beta`, and :math:`\log \phi`, the log of the visits per episode."""

    def __init__(self, num_covariates: int):
        super().__init__()
        self.intercept = nn.Parameter(torch.zeros(()))
        self.coefficients = nn.Parameter(torch.zeros(num_covariates))
        self.log_scale = nn.Parameter(torch.zeros(()))

    def prior_rate(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\lambda = \exp(b_0 + x^\top \beta)`, one per person."""
        return (self.intercept + x @ self.coefficients).exp()

    @property
    def scale(self) -> torch.Tensor:
        r""":math:`\phi`."""
        return self.log_scale.exp()


class Encoder(nn.Module):
    """The guide's network: an MLP of the covariates and :math:`\\log(1 + y)`, giving
    ``outputs`` numbers per person (one, a rate's preimage; or ``n`` free logits)."""

    def __init__(self, num_covariates: int, hidden: int, outputs: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_covariates + 1, hidden),
            nn.Softplus(),
            nn.Linear(hidden, hidden),
            nn.Softplus(),
            nn.Linear(hidden, outputs),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, y.log1p().unsqueeze(-1)], -1))

    def rate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The guide's Poisson rate per person (for one output)."""
        return F.softplus(self(x, y).squeeze(-1)) + _MIN_RATE


def _counts(truncation: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(truncation, dtype=like.dtype, device=like.device)


def _log_likelihood_table(scale, y, truncation: int, rate_offset: float) -> torch.Tensor:
    r""":math:`\log \operatorname{Poisson}(y_i; \epsilon + \phi k)`, shape ``(people, n)``."""
    k = _counts(truncation, y)
    return dist.Poisson(rate_offset + scale * k).log_prob(y.unsqueeze(-1))


def marginal_log_likelihood(regression, x, y, truncation: int, rate_offset: float):
    r"""The exact log-likelihood :math:`\log \sum_{k<n} \pi_k(\lambda_i) p(y_i \mid k)` per
    person, with the prior truncated to :math:`n` outcomes (the last absorbing the tail)."""
    prior = truncated_log_probs(dist.Poisson(regression.prior_rate(x)), truncation)
    likelihood = _log_likelihood_table(regression.scale, y, truncation, rate_offset)
    return (prior + likelihood).logsumexp(-1)


def _expectation(log_q: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_k q_k v_k` over the last dimension, with 0 where ``q`` has no mass (where
    ``v`` may be infinite), and no NaN in the gradient there."""
    q = log_q.exp()
    values = torch.where(q > 0, values, torch.zeros_like(values))
    return (q * values).sum(-1)


def _guide_log_probs(estimator: str, output: torch.Tensor, truncation: int) -> torch.Tensor:
    """The guide's discrete log-PMF over the outcomes ``0..n-1``: the free logits of GenGS-IMP,
    else the truncated Poisson PMF at the network's rate."""
    if estimator == IMP:
        return output.log_softmax(-1)
    rate = F.softplus(output.squeeze(-1)) + _MIN_RATE
    return truncated_log_probs(dist.Poisson(rate), truncation)


def discrete_elbo(estimator, regression, encoder, x, y, truncation: int, rate_offset: float):
    r"""The ELBO of the truncated discrete model per person, summed exactly over :math:`z`,
    for the guide of ``estimator`` (its truncated PMF :math:`q`):
    :math:`\sum_{k<n} q_k [\log \pi_k(\lambda) + \log p(y \mid k) - \log q_k]`."""
    log_q = _guide_log_probs(estimator, encoder(x, y), truncation)
    prior = truncated_log_probs(dist.Poisson(regression.prior_rate(x)), truncation)
    likelihood = _log_likelihood_table(regression.scale, y, truncation, rate_offset)
    return _expectation(log_q, prior + likelihood - log_q)


def fit_glm(data: Visits) -> dict:
    """A Poisson GLM of the visits on the covariates (with an intercept), fitted by maximum
    likelihood with statsmodels; its mean test and training log-likelihood per person."""
    import statsmodels.api as sm

    def design(x):
        return sm.add_constant(x.double().numpy(), has_constant="add")

    glm = sm.GLM(data.y_train.double().numpy(), design(data.x_train), family=sm.families.Poisson())
    fitted = glm.fit()

    def score(x, y):
        rate = torch.as_tensor(fitted.predict(design(x)))
        return float(dist.Poisson(rate).log_prob(y.double()).mean())

    return {
        "test_log_likelihood": score(data.x_test, data.y_test),
        "train_log_likelihood": score(data.x_train, data.y_train),
    }


# ---------------------------------------------------------------------------------------------
# The prototype


class SymmetricStraightThroughPoisson(GenGSPoisson):
    r"""A straight-through :class:`~pyro_relax.GenGSPoisson` that scores its own samples as a
    plain ``dist.Poisson`` prior does (a prototype for the library, tested here only).

    A straight-through sample :math:`z` (the hard outcome forward, the relaxed
    :math:`\tilde z = \sum_k w_k k` backward) is scored by the Poisson log-density continued to
    real values, :math:`z \log \rho - \rho - \log\Gamma(z + 1)`, plus a constant (no gradient)
    that makes the value the truncated log-PMF of the hard outcome. Its gradient is then the
    score :math:`\partial_\rho \log q(z)` (mean zero) plus
    :math:`(\log\rho - \psi(z + 1))\, \partial \tilde z`: the same linearization that the
    prior's :math:`(\log\lambda - \psi(z + 1))\, \partial \tilde z` gets, so the two cancel
    where guide and prior agree. The library's score of a hard sample, :math:`\log \pi_z`
    with the gradient straight through :math:`w` (:math:`\sum_k \partial w_k \log \pi_k`),
    has no such counterpart in a plain Poisson prior.

    A value without the relaxed path (observed counts) is scored as by the parent class.

    Measured here (``results/README.md``): it removes the prior's share of the straight-through
    pair's bias, as the analytic KL of ``TraceMeanField_ELBO`` does, but not the likelihood's,
    which is the larger; its runs then collapsed onto the last outcome at low temperature. It
    is not proposed for the library.
    """

    def __init__(self, rate, temperature, truncation, **kwargs):
        super().__init__(rate, temperature, truncation, hard=True, **kwargs)

    def expand(self, batch_shape, _instance=None):
        new = _instance if _instance is not None else self.__new__(type(self))
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value):
        if not value.requires_grad:
            return super().log_prob(value)
        continued = dist.Poisson(self.rate, validate_args=False).log_prob(value)
        index = value.detach().round().long().clamp(0, self.num_outcomes - 1)
        exact = self.logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        # The tail bin's mass is P(X >= n - 1), not P(X = n - 1): correct the value only.
        return continued + (exact - continued).detach()


# ---------------------------------------------------------------------------------------------
# Training


def _guide_distribution(estimator, output, temperature, truncation):
    if estimator == IMP:
        return TruncatedGenGS(temperature, logits=output)
    rate = F.softplus(output.squeeze(-1)) + _MIN_RATE
    # The truncation is deliberate and reported (tail masses in the records): no warning.
    if estimator == ST_SYM:
        return SymmetricStraightThroughPoisson(rate, temperature, truncation, tail_tolerance=None)
    straight = estimator in (ST, ST_MF)
    return GenGSPoisson(rate, temperature, truncation, hard=straight, tail_tolerance=None)


def _prior_distribution(estimator, rate, temperature, truncation):
    if estimator in (ST, ST_MF, ST_SYM):
        return dist.Poisson(rate)
    return GenGSPoisson(rate, temperature, truncation, tail_tolerance=None)


def _model_and_guide(estimator, regression, encoder, config, temperature):
    """Model, guide and loss of ``estimator`` (the exact ones put their sum in a factor)."""
    truncation, rate_offset = config.truncation, config.rate_offset

    if estimator in (EXACT, EXACT_ELBO):

        def model(x, y):
            pyro.module("regression", regression)
            if estimator == EXACT:
                score = marginal_log_likelihood(regression, x, y, truncation, rate_offset)
            else:
                pyro.module("encoder", encoder)
                score = discrete_elbo(estimator, regression, encoder, x, y, truncation, rate_offset)
            pyro.factor("objective", score.sum())

        def guide(x, y):
            pass  # z is summed out in the model

        return model, guide, Trace_ELBO()

    def model(x, y):
        pyro.module("regression", regression)
        rate = regression.prior_rate(x)
        with pyro.plate("people", len(y)):
            z = pyro.sample("z", _prior_distribution(estimator, rate, temperature, truncation))
            pyro.sample("y", dist.Poisson(rate_offset + regression.scale * z), obs=y)

    def guide(x, y):
        pyro.module("encoder", encoder)
        output = encoder(x, y)
        with pyro.plate("people", len(y)):
            pyro.sample("z", _guide_distribution(estimator, output, temperature, truncation))

    loss = TraceMeanField_ELBO() if estimator == ST_MF else Trace_ELBO()
    return model, guide, loss


def _networks(estimator, num_covariates, config, device):
    common.seed_everything(config.seed)
    regression = Regression(num_covariates)
    encoder = Encoder(num_covariates, config.hidden, config.truncation if estimator == IMP else 1)
    return regression.to(device), encoder.to(device)


@torch.no_grad()
def _evaluate(estimator, regression, encoder, data, config) -> dict:
    """Scores of the current parameters: the exact marginal log-likelihood per test person,
    the discrete ELBO per test person (estimators with a guide), the model's parameters and
    the tail masses of the truncation."""
    truncation, offset = config.truncation, config.rate_offset
    test = marginal_log_likelihood(regression, data.x_test, data.y_test, truncation, offset)
    rates = regression.prior_rate(data.x_train)
    # P(z >= n): the mass beyond the last outcome, P(n, rate) (regularized lower gamma).
    tail = torch.special.gammainc(torch.full_like(rates, truncation), rates)
    scores = {
        "test_log_likelihood": float(test.mean()),
        "phi": float(regression.scale),
        "mean_prior_rate": float(rates.mean()),
        "max_prior_tail_mass": float(tail.max()),
        "mean_prior_tail_mass": float(tail.mean()),
        "test_elbo": None,
        "mean_guide_mean": None,
    }
    if estimator != EXACT:
        x, y = data.x_test, data.y_test
        scores["test_elbo"] = float(
            discrete_elbo(estimator, regression, encoder, x, y, truncation, offset).mean()
        )
        log_q = _guide_log_probs(estimator, encoder(data.x_train, data.y_train), truncation)
        scores["mean_guide_mean"] = float((log_q.exp() @ _counts(truncation, log_q)).mean())
    return scores


def _objective(estimator) -> str:
    return {
        GENGS: "Trace_ELBO, GenGSPoisson guide and prior (soft log-PMFs)",
        ST: "Trace_ELBO, straight-through GenGSPoisson guide, dist.Poisson prior",
        ST_MF: "TraceMeanField_ELBO, straight-through GenGSPoisson guide, dist.Poisson prior",
        ST_SYM: "Trace_ELBO, prototype symmetric straight-through guide, dist.Poisson prior",
        IMP: "Trace_ELBO, TruncatedGenGS guide (free logits), GenGSPoisson prior",
        EXACT_ELBO: "exact discrete ELBO, truncated Poisson guide, summed over z",
        EXACT: "exact marginal likelihood, summed over z",
        GLM: "Poisson GLM, maximum likelihood (statsmodels)",
    }[estimator]


def train(estimator, data: Visits, config: NeymanConfig, *, checkpoint=None, device="cpu"):
    """Trains ``estimator`` on the training people of ``data`` and returns ``(record,
    networks)``: its record (final scores, settings, curves) and the networks' final
    ``state_dict``s.

    With a :class:`~pyro_relax.experiments.common.Checkpoint`, the state is saved at every
    point of the curves and the finished record at the end, and a saved state is resumed (a
    saved record is returned as it is); the caller removes the checkpoint once the record is
    merged.
    """
    pyro.clear_param_store()
    data = _on_device(data, device)
    regression, encoder = _networks(estimator, data.x_train.shape[1], config, device)
    schedule = ExponentialDecay(
        config.initial_temperature, config.final_temperature, max(config.steps, 1), device=device
    )
    model, guide, loss = _model_and_guide(
        estimator, regression, encoder, config, schedule.temperature
    )
    svi = SVI(model, guide, Adam({"lr": config.learning_rate}), loss)
    history, start, seconds = [], 0, 0.0
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        if "record" in state:
            record = state["record"]
            if "parameters" not in record:  # saved before the untruncated score was added
                regression.load_state_dict(state["networks"]["regression"])
                record |= _untruncated(regression, data, config)
            return record, state["networks"]
        with state.restoring():
            regression.load_state_dict(state["networks"]["regression"])
            encoder.load_state_dict(state["networks"]["encoder"])
            svi.optim.set_state(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            history, start, seconds = state["history"], state["step"], state["seconds"]

    def networks():
        return {"regression": regression.state_dict(), "encoder": encoder.state_dict()}

    def quantities():
        yield from regression.named_parameters(prefix="regression")
        yield from encoder.named_parameters(prefix="encoder")
        # What overflows first: exp of the linear predictor, with parameters of moderate size.
        # The rate's bound is what the untruncated score can enumerate (counts up to the
        # largest test person's rate: a rate of 3e7 took 16 GB); phi need only be finite.
        with torch.no_grad():  # not around a yield: the check may stop before the end
            people = torch.cat([data.x_train, data.x_test])
            rate, scale = regression.prior_rate(people), regression.scale
        yield "the prior's rate", rate, _MAX_PRIOR_RATE
        yield "the scale phi", scale, math.inf

    x, y = data.x_train, data.y_train
    with common.progress(total=config.steps, initial=start, desc=estimator, unit="step") as bar:
        step = start
        while step < config.steps:
            # One stretch of steps up to the next evaluation (every eval_every, and the last).
            first, step = (
                step + 1,
                min(config.steps, (step // config.eval_every + 1) * config.eval_every),
            )
            where = f"{estimator}, steps {first} to {step}"
            with common.diverging(where, quantities, config.learning_rate):
                losses = []
                for _ in range(first, step + 1):
                    began = time.perf_counter()
                    losses.append(svi.step(x, y) / len(y))
                    schedule.step()
                    seconds += time.perf_counter() - began
                    bar.update()
                point = {"step": step, "temperature": float(schedule.temperature)}
                loss = common.finite(np.mean(losses), "the loss", where, config.learning_rate)
                point |= {"train_loss": loss}
                point |= _evaluate(estimator, regression, encoder, data, config)
            history.append(point | {"seconds": seconds})
            bar.set_postfix(test=f"{point['test_log_likelihood']:.4f}", phi=f"{point['phi']:.3f}")
            if checkpoint is not None:
                checkpoint.save(
                    {
                        "step": step,
                        "networks": networks(),
                        "optimizer": svi.optim.get_state(),
                        "schedule": schedule.state_dict(),
                        "history": history,
                        "seconds": seconds,
                    }
                )

    with torch.no_grad():
        train_score = marginal_log_likelihood(
            regression, x, y, config.truncation, config.rate_offset
        )
    record = _record(estimator, config, data, device)
    record |= _evaluate(estimator, regression, encoder, data, config)
    record |= _untruncated(regression, data, config)
    record |= {
        "train_log_likelihood": float(train_score.mean()),
        "seconds": seconds,
        "history": history,
    }
    if checkpoint is not None:
        checkpoint.save({"record": record, "networks": networks()})
    return record, networks()


@torch.no_grad()
def _untruncated(regression, data, config) -> dict:
    """The learned parameters, and the test score with the prior truncated far enough out to
    hold all but a negligible mass for every test person (the truncation at ``n`` drops
    ``prior_tail_mass``, much of it for models with large prior rates)."""
    rates = regression.prior_rate(data.x_test)
    largest = float(rates.max())
    outcomes = max(config.truncation, math.ceil(largest + 12 * math.sqrt(largest) + 20))
    score = marginal_log_likelihood(
        regression, data.x_test, data.y_test, outcomes, config.rate_offset
    )
    parameters = {
        "intercept": float(regression.intercept),
        "coefficients": regression.coefficients.tolist(),
        "log_phi": float(regression.log_scale),
    }
    return {
        "test_log_likelihood_untruncated": float(score.mean()),
        "untruncated_outcomes": outcomes,
        "parameters": parameters,
    }


def _on_device(data: Visits, device) -> Visits:
    moved = {
        name: getattr(data, name).to(device) for name in ("x_train", "y_train", "x_test", "y_test")
    }
    return dataclasses.replace(data, **moved)


def _record(estimator, config, data, device) -> dict:
    return {
        "study": "training",
        "data": data.name,
        "estimator": estimator,
        "device": str(device),
        "seed": config.seed,
        "point": None,
        "temperature": None,
        "term": None,
        "objective": _objective(estimator),
        "steps": config.steps,
        "people_train": len(data.y_train),
        "people_test": len(data.y_test),
        "settings": dataclasses.asdict(config),
    }


def _glm_record(data, config) -> dict:
    started = time.perf_counter()
    scores = fit_glm(data)
    record = _record(GLM, config, data, "cpu") | scores
    record |= {"steps": None, "seconds": time.perf_counter() - started, "history": []}
    return record


# ---------------------------------------------------------------------------------------------
# The gradient study


def _surrogate_terms(pair, u, v, w, y, temperature, config) -> dict:
    r"""The terms of the single-sample objective of ``pair`` that ``Trace_ELBO``
    differentiates, per draw and person: ``u``, ``v`` and ``w`` are the guide's log-rates, the
    prior's log-rates and :math:`\log \phi`, each of shape ``(draws, people)``."""
    truncation, offset = config.truncation, config.rate_offset
    if pair == ST_SYM:
        guide = SymmetricStraightThroughPoisson(
            u.exp(), temperature, truncation, tail_tolerance=None
        )
    else:
        straight = pair != GENGS
        guide = GenGSPoisson(u.exp(), temperature, truncation, hard=straight, tail_tolerance=None)
    z = guide.rsample()
    prior = _prior_distribution(pair, v.exp(), temperature, truncation)
    return {
        "likelihood": dist.Poisson(offset + w.exp() * z).log_prob(y),
        "prior": prior.log_prob(z),
        "entropy": -guide.log_prob(z),
    }


def _exact_terms(pair, u, v, w, y, config) -> dict:
    r"""The expectation of each term under the guide's truncated PMF :math:`q`, per person:
    together, the pair's own objective, the discrete ELBO (with the prior truncated for
    ``GenGS``, whose soft log-PMF tends to the truncated log-PMF, and the plain Poisson
    log-PMF for the straight-through pairs)."""
    truncation, offset = config.truncation, config.rate_offset
    k = _counts(truncation, u)
    log_q = truncated_log_probs(dist.Poisson(u.exp()), truncation)
    if pair == GENGS:
        prior = truncated_log_probs(dist.Poisson(v.exp()), truncation)
    else:
        prior = dist.Poisson(v.exp().unsqueeze(-1)).log_prob(k)
    likelihood = dist.Poisson(offset + w.exp().unsqueeze(-1) * k).log_prob(y.unsqueeze(-1))
    return {
        "likelihood": _expectation(log_q, likelihood),
        "prior": _expectation(log_q, prior),
        "entropy": -_expectation(log_q, log_q),
    }


def _slopes(pair, u, v, w, y, config) -> dict:
    r"""Per person and term of a straight-through pair, :math:`\rho\, E_q[t'(z)]`: the exact
    gradient :math:`\rho\, E_q[t(z + 1) - t(z)]` with respect to the guide's log-rate (for an
    untruncated Poisson guide) with the finite difference replaced by the slope at the hard
    integer, which is what the straight-through estimator differentiates (``None`` where a
    term is not a function of the hard value: the soft log-PMF, and every term of ``GenGS``).
    """
    if pair == GENGS:
        return dict.fromkeys((*TERMS,))
    offset = config.rate_offset
    k = _counts(config.truncation, u)
    log_q = truncated_log_probs(dist.Poisson(u.exp()), config.truncation)
    scale = w.exp().unsqueeze(-1)
    slopes = {
        "likelihood": scale * (y.unsqueeze(-1) / (offset + scale * k) - 1),
        "prior": v.unsqueeze(-1) - torch.digamma(k + 1),
        "entropy": torch.digamma(k + 1) - u.unsqueeze(-1) if pair == ST_SYM else None,
    }
    found = {
        name: None if slope is None else u.exp() * _expectation(log_q, slope)
        for name, slope in slopes.items()
    }
    parts = list(found.values())
    found["total"] = None if None in parts else sum(parts)
    return found


def _local_gradients(terms: dict, leaves) -> dict:
    """Per term (and for their total), the gradients of the term's sum with respect to each
    of ``leaves``."""
    grads = {}
    for index, name in enumerate(terms):
        found = torch.autograd.grad(
            terms[name].sum(), leaves, allow_unused=True, retain_graph=index < len(terms) - 1
        )
        grads[name] = [
            torch.zeros_like(leaf) if g is None else g
            for g, leaf in zip(found, leaves, strict=True)
        ]
    grads["total"] = [sum(parts) for parts in zip(*grads.values(), strict=True)]
    return grads


def _mean_and_se(draws: torch.Tensor):
    """Mean and standard error of the mean over the first dimension."""
    return draws.mean(0), draws.std(0) / math.sqrt(len(draws))


def _agreement(halves, exact) -> dict:
    """How the mean of two halves of the draws agrees with the exact vector: the relative
    error of their mean, its cosine with the exact vector, and the relative error that noise
    alone would give (half the distance between the halves' means)."""
    mean = (halves[0] + halves[1]) / 2
    tiny = torch.finfo(exact.dtype).tiny
    norm = exact.norm().clamp(min=tiny)
    return {
        "relative_error": float((mean - exact).norm() / norm),
        "cosine": float(mean @ exact / (mean.norm() * norm).clamp(min=tiny)),
        "noise": float((halves[0] - halves[1]).norm() / 2 / norm),
    }


class _Draws:
    """Per-draw gradients of one term, reduced as they arrive: per-person means of the guide
    log-rate gradient over each half of the draws, and per-draw sums over people."""

    def __init__(self, people: int, draws: int, dtype):
        self.half = draws // 2
        self.guide_halves = [torch.zeros(people, dtype=dtype) for _ in range(2)]
        self.counts = [self.half, draws - self.half]
        self.sums = {name: [] for name in ("shift", "shift_y0", "shift_y1", "intercept", "log_phi")}
        self.coefficients = []

    def add(self, first: int, gu, gv, gw, x, visited) -> None:
        index = torch.arange(first, first + len(gu))
        for half, rows in enumerate((index < self.half, index >= self.half)):
            self.guide_halves[half] += gu[rows].sum(0) / max(self.counts[half], 1)
        people = gu.shape[-1]
        self.sums["shift"].append(gu.sum(-1) / people)
        self.sums["shift_y0"].append(gu[:, ~visited].sum(-1) / people)
        self.sums["shift_y1"].append(gu[:, visited].sum(-1) / people)
        self.sums["intercept"].append(gv.sum(-1) / people)
        self.sums["log_phi"].append(gw.sum(-1) / people)
        self.coefficients.append(gv @ x / people)


def gradient_study(pair, networks, x, y, config, *, temperature, draws, seed=0, chunk=None):
    r"""Per term of the single-sample objective of ``pair`` (and their total), the mean of
    ``draws`` gradient estimates at the parameters ``networks`` (the ``state_dict``s of
    :func:`train`) against the exact gradient of the pair's own objective
    (:func:`_exact_terms`).

    Gradients are those of the ELBO (ascent directions), averaged over people, in float64 on
    copies of the networks, with respect to: the guide log-rates (``shift``: all of them moved
    together; ``shift_y0`` and ``shift_y1``: the parts from people with no visit and with
    visits; ``network``: pulled back to the guide network's weights), the prior's
    ``intercept`` and ``coefficients``, and ``log_phi``. Scalars get the exact value, the mean
    estimate and its standard error; vectors the agreement of :func:`_agreement`.
    """
    x, y = x.double(), y.double()
    regression = _float64(Regression(x.shape[1]), networks["regression"])
    encoder = _float64(Encoder(x.shape[1], config.hidden), networks["encoder"])
    people = len(y)
    visited = y > 0
    log_guide_rate = encoder.rate(x, y).log()
    with torch.no_grad():
        u0 = log_guide_rate.detach()
        v0 = regression.intercept + x @ regression.coefficients
        w0 = regression.log_scale.detach().expand(people)

    leaves = [t.clone().requires_grad_() for t in (u0, v0, w0)]
    exact = _local_gradients(_exact_terms(pair, *leaves, y, config), leaves)
    slopes = _slopes(pair, u0, v0, w0, y, config)

    common.seed_everything(seed)
    chunk = chunk or max(1, 50_000 // people)
    reduced = {}
    for first in range(0, draws, chunk):
        size = min(chunk, draws - first)
        leaves = [t.expand(size, people).clone().requires_grad_() for t in (u0, v0, w0)]
        terms = _surrogate_terms(pair, *leaves, y, temperature, config)
        for term, (gu, gv, gw) in _local_gradients(terms, leaves).items():
            term_draws = reduced.setdefault(term, _Draws(people, draws, x.dtype))
            term_draws.add(first, gu.detach(), gv.detach(), gw.detach(), x, visited)

    def pull_back(per_person):
        grads = torch.autograd.grad(
            log_guide_rate, list(encoder.parameters()), per_person, retain_graph=True
        )
        return torch.cat([g.reshape(-1) for g in grads])

    records = []
    for term in TERMS:
        gu, gv, gw = (g / people for g in exact[term])
        got = reduced[term]
        record = {
            "study": "gradients",
            "estimator": pair,
            "temperature": float(temperature),
            "term": term,
            "gradient_people": people,
            "draws": draws,
        }
        exact_scalars = {
            "shift": gu.sum(),
            "shift_y0": gu[~visited].sum(),
            "shift_y1": gu[visited].sum(),
            "intercept": gv.sum(),
            "log_phi": gw.sum(),
        }
        for name, value in exact_scalars.items():
            mean, se = _mean_and_se(torch.cat(got.sums[name]))
            record |= {
                f"{name}_exact": float(value),
                f"{name}_mean": float(mean),
                f"{name}_se": float(se),
            }
        slope = slopes[term]
        record["shift_slope"] = None if slope is None else float(slope.mean())
        network = _agreement([pull_back(h / people) for h in got.guide_halves], pull_back(gu))
        record |= {f"network_{k}": v for k, v in network.items()}
        rows = torch.cat(got.coefficients)
        halves = [rows[: got.half].mean(0), rows[got.half :].mean(0)]
        record |= {f"coefficients_{k}": v for k, v in _agreement(halves, gv @ x).items()}
        records.append(record)
    return records


def _float64(module: nn.Module, state: dict) -> nn.Module:
    """``module`` with the weights ``state``, in float64."""
    module.load_state_dict(state)
    return module.double()


# ---------------------------------------------------------------------------------------------
# Reporting


def _order(record):
    names = list(ESTIMATORS)
    rank = names.index(record["estimator"]) if record["estimator"] in names else len(names)
    return (record["data"], rank, record["seed"])


# What tells training records of one configuration apart.
_PER_RUN = ("study", "data", "estimator", "seed")


def _configurations(records, shown=_PER_RUN) -> dict:
    """Each record's configuration, by ``id``: the settings in which it differs from the
    other records, apart from ``shown`` (its data, estimator and seed; '' where they all
    agree)."""
    named = common.differing_settings(records, _record_settings, shown=shown)
    return {id(record): name for record, name in zip(records, named, strict=True)}


def _shared(values):
    """The value every run shares, or where to read each run's."""
    return values[0] if len({json.dumps(v) for v in values}) == 1 else "(see `settings`)"


def _exact_key(record, configurations) -> tuple:
    return record["data"], record["seed"], configurations[id(record)]


def _exact_scores(training, configurations) -> dict:
    """The final test score of the ``exact`` run per data set, seed and configuration (each
    seed has its own test people, so estimators are compared with the reference on the same
    split, trained with the same settings)."""
    return {
        _exact_key(r, configurations): r["test_log_likelihood"]
        for r in training
        if r["estimator"] == EXACT
    }


def _summary_rows(training, configurations) -> list:
    """One row per data set, configuration (:func:`_configurations`) and estimator: the mean
    and spread over seeds."""
    exact = _exact_scores(training, configurations)
    groups = {}
    for record in sorted(training, key=lambda r: (configurations[id(r)], _order(r))):
        key = (record["data"], configurations[id(record)], record["estimator"])
        groups.setdefault(key, []).append(record)
    rows = []
    for (data, configuration, estimator), group in groups.items():
        scores = np.array([r["test_log_likelihood"] for r in group])
        gaps = [
            r["test_log_likelihood"] - exact[_exact_key(r, configurations)]
            for r in group
            if _exact_key(r, configurations) in exact
        ]

        def mean(field, group=group):
            values = [r[field] for r in group if r.get(field) is not None]
            return float(np.mean(values)) if values else None

        rows.append(
            {
                "data": data,
                "estimator": estimator,
                "seeds": ", ".join(str(r["seed"]) for r in group),
                "test log-lik": float(scores.mean()),
                "sd": float(scores.std(ddof=1)) if len(scores) > 1 else None,
                "range": f"{scores.min():.3f} to {scores.max():.3f}",
                "minus exact": float(np.mean(gaps)) if gaps else None,
                "gap range": f"{min(gaps):+.3f} to {max(gaps):+.3f}" if gaps else None,
                "phi": mean("phi"),
                "prior rate": mean("mean_prior_rate"),
                "test ELBO": mean("test_elbo"),
                "seconds": mean("seconds"),
                "configuration": configuration,
            }
        )
    return rows


def _with_error(record, name) -> str:
    return f"{record[f'{name}_mean']:+.4f} ± {record[f'{name}_se']:.4f}"


def _gradient_rows(gradients) -> list:
    """The gradient study's rows, each with the settings (``settings``) in which its run
    differs from the others, apart from what the row shows."""
    configurations = _configurations(gradients, (*_PER_RUN, "point", "temperature", "term"))
    rows = []
    pairs = list(GRADIENT_PAIRS)
    for r in sorted(
        gradients,
        key=lambda r: (
            r["data"],
            r["point"],
            r["seed"],
            pairs.index(r["estimator"]),
            -r["temperature"],
            TERMS.index(r["term"]),
        ),
    ):
        rows.append(
            {
                "point": r["point"],
                "seed": r["seed"],
                "pair": r["estimator"],
                "τ": r["temperature"],
                "term": r["term"],
                "shift exact": f"{r['shift_exact']:+.4f}",
                "shift estimate": _with_error(r, "shift"),
                "shift slope": "—" if r.get("shift_slope") is None else f"{r['shift_slope']:+.4f}",
                "y=0 exact": f"{r['shift_y0_exact']:+.4f}",
                "y=0 estimate": _with_error(r, "shift_y0"),
                "network rel. error": r["network_relative_error"],
                "(noise)": r["network_noise"],
                "cosine": r["network_cosine"],
                "intercept exact": f"{r['intercept_exact']:+.4f}",
                "intercept estimate": _with_error(r, "intercept"),
                "log φ exact": f"{r['log_phi_exact']:+.4f}",
                "log φ estimate": _with_error(r, "log_phi"),
                "settings": configurations[id(r)],
            }
        )
    return rows


def _markdown(records) -> str:
    training = [r for r in records if r["study"] == "training"]
    gradients = [r for r in records if r["study"] == "gradients"]
    lines = [
        "# Neyman Type A regression of RAND HIE doctor visits",
        "",
        "Generated by `pyro-relax experiment neyman` from `neyman.json`, which holds every "
        "record's settings, command, machine and curves. Model, estimators and scores: the "
        "docstring of `pyro_relax/experiments/neyman.py`.",
        "",
    ]
    if training:

        def shared(name):
            return _shared([r["settings"][name] for r in training])

        configurations = _configurations(training)
        summary = _summary_rows(training, configurations)
        every_run = sorted(training, key=_order)
        lines += [
            "## Test log-likelihood per person",
            "",
            "Exact marginal log-likelihood of the learned model per test person (nats, higher "
            f"is better), z summed over the first {shared('truncation')} counts with the truncated "
            "Poisson prior; mean, standard deviation and range over seeds (each seed draws its "
            "own test people), and `minus exact`: the difference from the `exact` run of the "
            "same seed, mean and range. `phi` and `prior "
            "rate` (the mean of exp(b0 + x beta) over training people) are the learned model's; "
            "`test ELBO` is the discrete ELBO of the truncated model with the guide's truncated "
            "PMF, per test person. Training: Adam, learning rate "
            f"{shared('learning_rate')}, {shared('steps')} full-batch steps, temperature "
            f"{shared('initial_temperature')} to {shared('final_temperature')} "
            f"(ExponentialDecay over the run), rate offset {shared('rate_offset')}. Runs of "
            "other settings have their own rows, and their own `exact` reference.",
            "",
            common.markdown_table(
                summary,
                [
                    "data",
                    "estimator",
                    "seeds",
                    "test log-lik",
                    "sd",
                    "range",
                    "minus exact",
                    "gap range",
                    "phi",
                    "prior rate",
                    "test ELBO",
                    "seconds",
                ],
                {
                    "test log-lik": ".4f",
                    "sd": ".4f",
                    "minus exact": "+.4f",
                    "phi": ".3f",
                    "prior rate": ".2f",
                    "test ELBO": ".4f",
                    "seconds": ".0f",
                },
                [row["configuration"] for row in summary],
            ),
            "### Every run",
            "",
            "`test_log_likelihood_untruncated`: the same score with the prior truncated far "
            "enough out for every test person's prior rate (missing in records made before it "
            "was added); `max_prior_tail_mass` is the largest mass the truncation at n drops.",
            "",
            common.markdown_table(
                every_run,
                [
                    "data",
                    "estimator",
                    "seed",
                    "test_log_likelihood",
                    "test_log_likelihood_untruncated",
                    "train_log_likelihood",
                    "test_elbo",
                    "phi",
                    "mean_prior_rate",
                    "max_prior_tail_mass",
                    "steps",
                    "seconds",
                ],
                {
                    "test_log_likelihood": ".4f",
                    "test_log_likelihood_untruncated": ".4f",
                    "train_log_likelihood": ".4f",
                    "test_elbo": ".4f",
                    "phi": ".3f",
                    "mean_prior_rate": ".2f",
                    "max_prior_tail_mass": ".1e",
                    "seconds": ".0f",
                },
                [configurations[id(r)] for r in every_run],
            ),
        ]
    if gradients:
        rows = _gradient_rows(gradients)
        draws = _shared([r["draws"] for r in gradients])
        people = _shared([r["gradient_people"] for r in gradients])
        lines += [
            "## Gradient study",
            "",
            "At fixed parameters (`point`: the seed's initialization, or the end of that "
            "estimator's run), the mean of "
            f"{draws} single-sample gradient estimates on {people} "
            "training people against the exact gradient of the pair's own objective (the "
            "discrete ELBO summed over the guide's outcomes), per term of the objective. "
            "Gradients of the ELBO (ascent directions) averaged over people. `shift`: with "
            "respect to all guide log-rates moved together (`y=0`: the part from people "
            "without a visit; `slope`: the exact gradient with each finite difference "
            "t(z + 1) - t(z) replaced by the slope t'(z) at the hard integer, for the terms "
            "that the straight-through pairs evaluate at the hard value); `network`: pulled "
            "back to the guide network's weights, the relative error of the mean estimate, "
            "the part of it that noise alone gives, and "
            "the cosine with the exact gradient; `intercept` and `log φ`: the model's.",
            "",
            common.markdown_table(
                rows,
                [column for column in rows[0] if column != "settings"],
                {"network rel. error": ".3f", "(noise)": ".3f", "cosine": ".3f"},
                [row["settings"] for row in rows],
            ),
        ]
    commands = sorted({r["command"] for r in records})
    machines = sorted({r["machine"] for r in records})
    lines += ["Commands: " + "; ".join(f"`{c}`" for c in commands), ""]
    lines += ["Machines: " + "; ".join(machines), ""]
    return "\n".join(lines)


def _curve_panels(axes, training) -> None:
    configurations = _configurations(training)
    exact = _exact_scores(training, configurations)
    fields = [
        ("test_log_likelihood", "test log-likelihood per person minus exact's (nats)"),
        ("phi", "φ, visits per episode"),
        ("mean_prior_rate", "mean prior rate exp(b0 + xβ)"),
    ]
    names = list(ESTIMATORS)
    for axis, (field, label) in zip(axes, fields, strict=True):
        shown = set()
        for record in sorted(training, key=_order):
            color = f"C{names.index(record['estimator']) % 10}"
            name = record["estimator"]
            shift = 0.0
            if field == "test_log_likelihood":
                shift = exact.get(_exact_key(record, configurations), 0.0)
            if record["estimator"] == GLM:
                if field == "test_log_likelihood":
                    legend = None if name in shown else name
                    axis.axhline(record[field] - shift, color=color, ls=":", label=legend)
                    shown.add(name)
                continue
            steps = [h["step"] for h in record["history"]]
            values = [h[field] - shift for h in record["history"]]
            axis.plot(steps, values, color=color, lw=1, label=None if name in shown else name)
            shown.add(name)
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        if field != "test_log_likelihood":
            axis.set_yscale("log")
    axes[0].set_ylim(-1.3, 0.1)
    axes[0].set_title("each seed against its own exact fit (its own test people)", fontsize=9)
    axes[0].legend(fontsize=7)


def _bias_panel(axis, gradients) -> None:
    """The bias (mean estimate minus exact) of the guide-shift gradient against the
    temperature, at the end of the exact-ELBO run when it was measured: per term for the
    straight-through and the GenGS pairs, the total for the prototype (whose likelihood and
    prior terms are the straight-through pair's)."""
    points = {r["point"] for r in gradients}
    point = EXACT_ELBO if EXACT_ELBO in points else sorted(points)[0]
    chosen = [r for r in gradients if r["point"] == point and r["seed"] == gradients[0]["seed"]]
    styles = {ST: "-", ST_SYM: ":", GENGS: "--"}
    for pair in GRADIENT_PAIRS:
        for index, term in enumerate(TERMS):
            rows = sorted(
                (r for r in chosen if r["estimator"] == pair and r["term"] == term),
                key=lambda r: r["temperature"],
            )
            if not rows or (pair == ST_SYM and term != "total"):
                continue
            axis.errorbar(
                [r["temperature"] for r in rows],
                [r["shift_mean"] - r["shift_exact"] for r in rows],
                yerr=[2 * r["shift_se"] for r in rows],
                color=f"C{index}",
                ls=styles[pair],
                marker="o",
                ms=3,
                capsize=2,
                label=f"{pair}: {term}",
            )
    axis.axhline(0, color="k", lw=0.5)
    axis.set_xscale("log")
    axis.set_xlabel("temperature τ (fixed)")
    axis.set_ylabel("bias of d ELBO / d(guide log-rates), per person")
    axis.set_title(
        f"gradient bias at the end of the {point} run, ±2 s.e. (the exact ELBO's optimum)",
        fontsize=9,
    )
    axis.legend(fontsize=6.5, loc="center", bbox_to_anchor=(0.5, 0.47), ncol=2)


def _write_plot(path, records) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    training = [r for r in records if r["study"] == "training"]
    gradients = [r for r in records if r["study"] == "gradients"]
    figure = Figure(figsize=(12, 8.5), layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    if training:
        _curve_panels(axes[:3], training)
    if gradients:
        _bias_panel(axes[3], gradients)
    figure.suptitle("Neyman Type A regression of RAND HIE doctor visits, test set", fontsize=11)
    common.save_figure(figure, path)


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser) -> None:
    """Adds this experiment's options to its subcommand's ``parser``."""
    defaults = NeymanConfig()
    common.add_estimators_option(parser, ESTIMATORS)

    # Defaults None: an option given with --smoke is used (the help gives both defaults).
    default = functools.partial(common.both_defaults, defaults, SMOKE_CONFIG)

    parser.add_argument(
        "--steps", type=positive_int, help=f"full-batch Adam steps ({default('steps')})"
    )
    parser.add_argument("--lr", type=positive_float, help=default("learning_rate"))
    parser.add_argument(
        "--truncation", type=integer_at_least(2), help=f"outcomes n ({default('truncation')})"
    )
    parser.add_argument(
        "--hidden", type=positive_int, help=f"guide network width ({default('hidden')})"
    )
    parser.add_argument(
        "--people",
        type=integer_at_least(2),
        help="use this many people (default: all 20,190; --smoke 300)",
    )
    parser.add_argument(
        "--gradient-points",
        nargs="*",
        default=["start", EXACT_ELBO, ST],
        choices=["start", GENGS, ST, ST_MF, ST_SYM, EXACT_ELBO],
        metavar="POINT",
        help="parameters at which to measure the gradient bias: start (the initialization) or "
        "the end of an estimator's run (default: start exact-ELBO GenGS-ST+Poisson; give the "
        "option without a value to skip the study)",
    )
    parser.add_argument(
        "--gradient-temperatures",
        type=temperature_value,
        nargs="+",
        default=[1.0, 0.5, 0.3, 0.1, 0.05],
        metavar="TAU",
        help="temperatures of the gradient bias study (default: 1.0 0.5 0.3 0.1 0.05)",
    )
    parser.add_argument(
        "--gradient-draws",
        type=integer_at_least(2),
        help="gradient estimates per setting (default 1000; --smoke 4)",
    )
    parser.add_argument(
        "--gradient-people",
        type=positive_int,
        default=2000,
        help="training people in the gradient study (default 2000)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (default 1: the fastest here)",
    )


def _config(args) -> NeymanConfig:
    fields = {"steps": "steps", "truncation": "truncation", "hidden": "hidden"}
    fields.update(learning_rate="lr", people="people")
    config = common.given_options(SMOKE_CONFIG if args.smoke else NeymanConfig(), args, fields)
    if config.people is not None and config.people >= PEOPLE:
        # Everyone: the same run as without --people, with the same record (its name and
        # settings said 10000000 people where there are 20,190).
        config = dataclasses.replace(config, people=None)
    return config


def run(args) -> int:
    """Runs the experiment from the parsed command line; returns the exit code."""
    with common.torch_threads(args.threads):
        return _run(args)


_IDENTITY = ("study", "data", "estimator", "device", "point", "temperature", "term")


def _record_settings(record) -> dict:
    """The settings of the run that made ``record``: what it is (training or one gradient
    measurement, the data, the estimator or pair, where) and every field of the config."""
    identity = {name: record.get(name) for name in _IDENTITY}
    extra = {name: record.get(name) for name in ("draws", "gradient_people")}
    return identity | extra | record["settings"]


def _checkpoint(results, data, estimator, config, device) -> common.Checkpoint:
    settings = {"data": data.name, "estimator": estimator, "device": str(device)}
    settings |= dataclasses.asdict(config)
    name = f"neyman-{data.name}-{estimator}-seed{config.seed}"
    return common.Checkpoint(common.checkpoint_path(results, name, settings), settings)


def write_reports(results: Path, records) -> None:
    """Writes the Markdown tables and the figure of ``records`` next to the JSON."""
    common.atomic_write_text(results / "neyman.md", _markdown(records))
    _write_plot(results / "neyman.png", records)


def _run(args) -> int:
    results = Path(args.results)
    common.read_records(results / "neyman.json", write_reports)  # a damaged file stops the run
    config = _config(args)
    data = load_visits(config.seed, config.test_fraction, config.people)
    if args.smoke:
        data.name += "-smoke"
    records, networks, checkpoints = [], {}, []

    def merge(new_records):
        for record in new_records:
            record |= {"machine": common.machine(), "command": args.command_line}
        common.update_records(
            results / "neyman.json",
            new_records,
            _record_settings,
            lambda merged: write_reports(results, merged),
        )
        records.extend(new_records)

    def trained(estimator):
        if estimator not in networks:
            checkpoints.append(_checkpoint(results, data, estimator, config, args.device))
            record, networks[estimator] = train(
                estimator, data, config, checkpoint=checkpoints[-1], device=args.device
            )
            merge([record])  # at once: a later run that fails (or diverges) loses nothing
        return networks[estimator]

    for estimator in args.estimators:
        if estimator == GLM:
            merge([_glm_record(data, config)])
        else:
            trained(estimator)
    draws = args.gradient_draws or (4 if args.smoke else 1000)
    people = min(args.gradient_people, len(data.y_train))
    study = []
    for point in args.gradient_points if draws else []:
        if point == "start":
            regression, encoder = _networks(ST, data.x_train.shape[1], config, "cpu")
            state = {"regression": regression.state_dict(), "encoder": encoder.state_dict()}
        else:
            state = {k: _to_cpu(v) for k, v in trained(point).items()}
        for pair in GRADIENT_PAIRS:
            for temperature in args.gradient_temperatures:
                found = gradient_study(
                    pair,
                    state,
                    data.x_train[:people],
                    data.y_train[:people],
                    config,
                    temperature=temperature,
                    draws=draws,
                    seed=config.seed,
                )
                for record in found:
                    record |= {"data": data.name, "seed": config.seed, "point": point}
                    record |= {"device": "cpu", "settings": dataclasses.asdict(config)}
                study.extend(found)
                print(_bias_line(found), file=sys.stderr)
    if study:
        merge(study)  # once: each merge rewrites the reports
    # Only now: until the whole command ends, a finished run's checkpoint holds its record, so
    # that the command run again after an interruption does not train it again.
    for checkpoint in checkpoints:
        checkpoint.remove()
    print(_markdown(records))
    print(f"results written to {results}/neyman.json, neyman.md and neyman.png")
    return 0


def _to_cpu(state: dict) -> dict:
    return {name: tensor.cpu() for name, tensor in state.items()}


def _bias_line(found) -> str:
    total = next(r for r in found if r["term"] == "total")
    return (
        f"{total['point']}: {total['estimator']} "
        f"tau={total['temperature']:g}: shift {total['shift_mean']:+.4f} ± "
        f"{total['shift_se']:.4f} (exact {total['shift_exact']:+.4f}), log phi "
        f"{total['log_phi_mean']:+.4f} (exact {total['log_phi_exact']:+.4f})"
    )

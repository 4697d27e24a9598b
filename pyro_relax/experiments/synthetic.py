r"""The synthetic gradient study of GenGS (Joo et al., 2020, section 6.1).

Each problem minimizes an expected squared error over the parameter of a count distribution,

.. math::
    \min_\theta\; \mathcal{L}(\theta) = \mathbb{E}_{z \sim p_\theta}
    \Big[\sum_i \lVert z_i - t_i \rVert^2\Big]
    = \sum_i \big(\operatorname{Var} z_i + (\mathbb{E} z_i - t_i)^2\big),

with ``D = 20`` independent coordinates :math:`z_i` (the loss is summed over coordinates, and
over classes for the multinomial), and compares gradient estimators of :math:`\mathcal{L}`:
the loss curve of Adam (1000 steps, the learning rate decaying exponentially from 0.05 to
0.0005 so that the curves settle where each estimator's bias and variance leave them; the same
schedule, seed and number of samples ``S`` per step for every estimator; the *exact* expected
loss evaluated in closed form at every step),
and, at the initial parameter, the variance of many repeated gradient estimates and, for the
Poisson, their bias against the exact gradient
:math:`\partial \mathcal{L} / \partial \lambda_i = 1 + 2 (\lambda_i - t_i)`.

The problems (``linspace(a, b)`` has ``D`` evenly spaced points; parameters are optimized in the
unconstrained coordinates named; all coordinates start at the same parameter):

========================= ====================== ======================== =====================
distribution              targets :math:`t_i`    initial parameter        optimized as
========================= ====================== ======================== =====================
Poisson(rate)             linspace(1, 10)        rate 3                   log rate
Binomial(20, p)           linspace(2, 18)        p = 0.5                  logit p
Multinomial(10, p), 3     10 softmax(u, 0, -u),  p = (1/3, 1/3, 1/3)      class logits
classes                   u = linspace(-2, 2)
NegativeBinomial(3, p)    linspace(1, 10)        p = 0.5 (mean 3)         logit p
========================= ====================== ======================== =====================

The paper's own targets, initial values and multinomial total count are not stated in the
material available to us; "Multinomial(3, p)" is read here as three classes, with 10 trials
(66 outcomes, each a count vector). The negative binomial follows torch's convention, as
:class:`~pyro_relax.GenGSNegativeBinomial` does: :math:`z` counts the successes (probability
:math:`p`) before the third failure, so :math:`\mathbb{E} z = 3p/(1-p)` and
:math:`\operatorname{Var} z = \mathbb{E} z / (1 - p)`.

Estimators (``S = 4`` samples per gradient estimate for all):

- ``exact``: autograd of the closed-form :math:`\mathcal{L}` (the reference curve);
- ``GenGS`` at temperatures 1.0, 0.5, 0.2 and 0.1: ``rsample`` of the library's
  ``GenGSPoisson``, ``GenGSBinomial``, ``GenGSMultinomial`` and ``GenGSNegativeBinomial``,
  differentiated directly in torch. Fixed truncations (40 outcomes for the Poisson, 60 for the
  negative binomial) leave a tail mass below :math:`10^{-7}` at the minimizing parameters
  (rates up to 9.5, ``p`` up to 0.70) and below :math:`10^{-5}` up to rate 15 and ``p`` = 0.75,
  so the bias measured is the relaxation's; the binomial and multinomial need no truncation;
- ``GenGS NP`` (automatic truncation, ``truncation=None``, mass 0.999; Poisson and negative
  binomial) and ``GenGS ST`` (``hard=True``), both at temperature 0.5;
- ``REINFORCE`` and ``REINFORCE + baseline`` (Pyro's decaying-average baseline, beta 0.9), both
  through Pyro's ``TraceGraph_ELBO`` with vectorized particles. The loss is isolated as follows:
  the guide samples ``z`` from the discrete distribution with parameter :math:`\theta`; the
  model scores the same site with the same distribution at the *detached* parameter, then adds
  ``pyro.factor("loss", -sum (z - t)^2)``. The model's log-density of ``z`` then equals the
  guide's, bit for bit, so the ELBO is exactly :math:`-\mathcal{L}(\theta)`, and the cost that
  multiplies the score :math:`\nabla \log q_\theta(z)` in Pyro's surrogate is
  :math:`\log p - \log q - \text{loss} = -\text{loss}`: the gradient is exactly the
  score-function estimate of :math:`\nabla \mathcal{L}` (tested on the same draws). The
  detach matters: for a non-reparameterizable guide site Pyro differentiates
  :math:`\log q_\theta` only through the score term (the pathwise term has mean zero and is
  dropped), so a model density that depended on :math:`\theta` would add its pathwise
  gradient :math:`\nabla \log p_\theta(z) = \nabla \log q_\theta(z)`, zero-mean noise that
  acts as a baseline of 1. ``z`` is one site with the ``D`` coordinates as its event
  (``to_event``), so the score function sees the total loss as a black box, as in the paper
  (a ``pyro.plate`` over coordinates with a per-coordinate factor would let
  ``TraceGraph_ELBO`` Rao-Blackwellize the separable loss);
- ``RLOO``: REINFORCE with the leave-one-out baseline (each of the ``S`` samples is baselined
  by the mean loss of the other ``S - 1``), which Pyro lacks: the library's
  :class:`~pyro_relax.infer.TraceRLOO_ELBO` on the model above, its surrogate
  :math:`\frac1S \sum_s (\ell_s - b_s)\, \log q_\theta(z_s)` with the factor
  :math:`\ell_s - b_s` detached. It runs as the torch estimators do: the repeats are copies in a
  ``pyro.plate``, each with its own row of the parameter.

The gradient study differentiates with respect to the natural parameter (rate, ``p``, class
logits) at the initial parameter. For GenGS and RLOO, ``repeats`` independent estimates come
from one backward pass through a parameter with a leading axis of ``repeats`` copies (each
copy's loss depends on its own row only); the ``TraceGraph_ELBO`` estimators are called
``pyro_repeats`` times, the baseline first warmed up at the fixed parameter. The variance
reported is the variance of one ``S``-sample estimate, averaged over the parameter's
coordinates. The Poisson bias is the mean over coordinates of the estimator's mean minus the
exact gradient; its standard error is that of the mean over repeats of the coordinate-averaged
error, which is exact because the repeats are independent.

A separate sweep (:func:`poisson_bias_sweep`) measures the GenGS Poisson bias alone, from
``bias_repeats`` estimates at each of ``bias_temperatures``, and reports the root mean square
over coordinates next to the coordinate average.

Measured with the full settings (seed 0, 100,000 estimates per temperature): the GenGS
Poisson bias is +0.359 at temperature 2.0, -0.355 at 1.0, -0.413 at 0.7, -0.373 at 0.5,
-0.262 at 0.3, -0.184 at 0.2, -0.095 at 0.1 and -0.044 at 0.05 (standard errors 0.001 to
0.011). Below 0.7 it shrinks steadily towards zero, about in proportion to the temperature;
above, it changes sign between 2.0 and 1.0, so it is not monotone there. The variance of one
estimate grows from 4.6 at 1.0 to 123 at 0.1; RLOO's bias, -0.09 +- 0.07, is consistent with
zero. The bias shows in the loss curves of the negative binomial, whose excess loss after the
last step is 20 at temperature 1.0 and 2.3 at 0.2. ``synthetic.md`` holds the numbers of a run.

References:
    Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
    Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
    https://arxiv.org/abs/2003.01847

    Buy 4 REINFORCE Samples, Get a Baseline for Free! Wouter Kool, Herke van Hoof, Max
    Welling, 2019. https://openreview.net/forum?id=r1lgTGL5DE
"""

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceGraph_ELBO

from pyro_relax import GenGSBinomial, GenGSMultinomial, GenGSNegativeBinomial, GenGSPoisson
from pyro_relax._cli import decay, integer_at_least, positive_float, positive_int, temperature_value
from pyro_relax.experiments import common
from pyro_relax.infer import TraceRLOO_ELBO

__all__ = [
    "DESCRIPTION",
    "PROBLEMS",
    "Config",
    "Estimator",
    "Problem",
    "add_arguments",
    "estimators",
    "exact_gradient",
    "gradient_study",
    "optimize",
    "poisson_bias_sweep",
    "poisson_exact_gradient",
    "run",
]

DESCRIPTION = (
    "GenGS synthetic study (paper section 6.1): loss curves, gradient variance and Poisson "
    "bias of GenGS, REINFORCE and RLOO on Poisson, binomial, multinomial and negative binomial"
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of a run: problem size, optimization and gradient study."""

    dims: int = 20
    samples: int = 4
    steps: int = 1000
    lr: float = 0.05
    lr_decay: float = 0.01
    temperatures: tuple = (1.0, 0.5, 0.2, 0.1)
    variant_temperature: float = 0.5
    repeats: int = 5000
    bias_temperatures: tuple = (2.0, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)
    bias_repeats: int = 100_000
    pyro_repeats: int = 500
    baseline_warmup: int = 100
    chunk: int = 1000
    curve_points: int = 201


FULL = Config()
SMOKE = Config(
    dims=3,
    steps=10,
    temperatures=(1.0, 0.1),
    repeats=100,
    bias_temperatures=(1.0, 0.1),
    bias_repeats=200,
    pyro_repeats=4,
    baseline_warmup=2,
    curve_points=11,
)


# ---------------------------------------------------------------------------------------------
# Problems


class Problem:
    """One synthetic problem: a count distribution over ``dims`` coordinates and its targets.

    Subclasses define the natural parameter (the one gradients are studied in), its map from
    unconstrained coordinates, the moments of one coordinate, and the relaxed (GenGS) and
    discrete (Pyro) distributions. Parameters may carry leading batch axes (repeats); the
    coordinate axis (and the class axis of the multinomial) come last.
    """

    name = ""
    label = ""
    event_dims = 0  # 1 for vector-valued coordinates (the multinomial)
    truncation = None  # fixed GenGS truncation; None where the support is finite
    has_truncation = False

    def __init__(self, dims: int, device="cpu", dtype=torch.float32):
        self.dims = dims
        self.device = torch.device(device)
        self.dtype = dtype
        self.targets = self._targets()
        self.initial = self._initial()

    def _linspace(self, low, high):
        return torch.linspace(low, high, self.dims, dtype=self.dtype, device=self.device)

    def natural(self, theta):
        """The natural parameter from the unconstrained one."""
        return theta

    def unconstrained(self, param):
        """The unconstrained parameter from the natural one."""
        return param

    def moments(self, param):
        """Mean and variance of each coordinate (and class)."""
        raise NotImplementedError

    def exact_loss(self, param):
        r"""The expected loss in closed form, :math:`\sum_i \operatorname{Var} z_i +
        (\mathbb{E} z_i - t_i)^2`, with the batch shape of ``param``."""
        mean, variance = self.moments(param)
        return (variance + (mean - self.targets).square()).flatten(-1 - self.event_dims).sum(-1)

    def loss(self, z):
        r"""The loss :math:`\sum_i \lVert z_i - t_i \rVert^2` of samples ``z``."""
        return (z - self.targets).square().flatten(-1 - self.event_dims).sum(-1)

    def relaxed(self, param, temperature, truncation=None, hard=False):
        """The GenGS relaxation, batch shape ``param``'s batch shape and coordinates."""
        raise NotImplementedError

    def discrete(self, param):
        """The discrete distribution, its coordinates an event (``to_event``)."""
        raise NotImplementedError


class PoissonProblem(Problem):
    """Poisson(rate) coordinates, targets ``linspace(1, 10)``, initial rate 3."""

    name = "poisson"
    label = "Poisson(rate)"
    truncation = 40
    has_truncation = True

    def _targets(self):
        return self._linspace(1.0, 10.0)

    def _initial(self):
        return torch.full((self.dims,), 3.0, dtype=self.dtype, device=self.device)

    def natural(self, theta):
        return theta.exp()

    def unconstrained(self, param):
        return param.log()

    def moments(self, param):
        return param, param

    def relaxed(self, param, temperature, truncation=None, hard=False):
        return GenGSPoisson(param, temperature, truncation, hard=hard, validate_args=False)

    def discrete(self, param):
        return dist.Poisson(param).to_event(1)


class BinomialProblem(Problem):
    """Binomial(20, p) coordinates, targets ``linspace(2, 18)``, initial p = 0.5."""

    name = "binomial"
    label = "Binomial(20, p)"
    total_count = 20

    def _targets(self):
        return self._linspace(2.0, 18.0)

    def _initial(self):
        return torch.full((self.dims,), 0.5, dtype=self.dtype, device=self.device)

    def natural(self, theta):
        return theta.sigmoid()

    def unconstrained(self, param):
        return param.logit()

    def moments(self, param):
        mean = self.total_count * param
        return mean, mean * (1 - param)

    def relaxed(self, param, temperature, truncation=None, hard=False):
        return GenGSBinomial(
            self.total_count, temperature, probs=param, hard=hard, validate_args=False
        )

    def discrete(self, param):
        return dist.Binomial(self.total_count, param).to_event(1)


class MultinomialProblem(Problem):
    """Multinomial(10, p) coordinates over 3 classes, targets ``10 softmax(u, 0, -u)`` with
    ``u = linspace(-2, 2)``, initial p uniform; the natural parameter is the class logits."""

    name = "multinomial"
    label = "Multinomial(10, p), 3 classes"
    event_dims = 1
    total_count = 10

    def _targets(self):
        u = self._linspace(-2.0, 2.0)
        return self.total_count * torch.stack([u, torch.zeros_like(u), -u], -1).softmax(-1)

    def _initial(self):
        return torch.zeros((self.dims, 3), dtype=self.dtype, device=self.device)

    def moments(self, param):
        probs = param.softmax(-1)
        mean = self.total_count * probs
        return mean, mean * (1 - probs)

    def relaxed(self, param, temperature, truncation=None, hard=False):
        return GenGSMultinomial(
            self.total_count, temperature, logits=param, hard=hard, validate_args=False
        )

    def discrete(self, param):
        return dist.Multinomial(self.total_count, logits=param).to_event(1)


class NegativeBinomialProblem(Problem):
    """NegativeBinomial(3, p) coordinates (torch's convention: successes of probability p
    before the third failure), targets ``linspace(1, 10)``, initial p = 0.5 (mean 3)."""

    name = "negative_binomial"
    label = "NegativeBinomial(3, p)"
    total_count = 3.0
    truncation = 60
    has_truncation = True

    def _targets(self):
        return self._linspace(1.0, 10.0)

    def _initial(self):
        return torch.full((self.dims,), 0.5, dtype=self.dtype, device=self.device)

    def natural(self, theta):
        return theta.sigmoid()

    def unconstrained(self, param):
        return param.logit()

    def moments(self, param):
        mean = self.total_count * param / (1 - param)
        return mean, mean / (1 - param)

    def relaxed(self, param, temperature, truncation=None, hard=False):
        return GenGSNegativeBinomial(
            self.total_count,
            temperature,
            truncation,
            probs=param,
            hard=hard,
            validate_args=False,
        )

    def discrete(self, param):
        return dist.NegativeBinomial(self.total_count, param).to_event(1)


PROBLEMS = {
    problem.name: problem
    for problem in (PoissonProblem, BinomialProblem, MultinomialProblem, NegativeBinomialProblem)
}


def poisson_exact_gradient(rate, targets):
    r"""The exact gradient :math:`\partial_{\lambda_i} \mathbb{E}[(z_i - t_i)^2] =
    1 + 2 (\lambda_i - t_i)` for :math:`z_i \sim \operatorname{Poisson}(\lambda_i)`.

    Example:
        >>> poisson_exact_gradient(torch.tensor([3.0]), torch.tensor([1.0]))
        tensor([5.])
    """
    return 1 + 2 * (rate - targets)


def exact_gradient(problem: Problem, param):
    """The gradient of the closed-form expected loss with respect to the natural parameter."""
    param = param.detach().requires_grad_()
    (gradient,) = torch.autograd.grad(problem.exact_loss(param).sum(), param)
    return gradient


def minimum_loss(problem: Problem) -> float:
    """The minimum of the closed-form expected loss (L-BFGS in float64 from the initial
    parameter)."""
    theta = problem.unconstrained(problem.initial.double()).requires_grad_()
    lbfgs = torch.optim.LBFGS(
        [theta],
        max_iter=1000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        lbfgs.zero_grad()
        loss = problem.exact_loss(problem.natural(theta))
        loss.backward()
        return loss

    lbfgs.step(closure)
    with torch.no_grad():
        return float(problem.exact_loss(problem.natural(theta)))


# ---------------------------------------------------------------------------------------------
# Estimators


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A gradient estimator: its kind, and for GenGS its temperature and variant."""

    name: str
    kind: str  # "exact", "gengs", "reinforce", "rloo"
    temperature: float = None
    automatic_truncation: bool = False
    hard: bool = False
    baseline: bool = False

    @property
    def uses_pyro(self) -> bool:
        """Whether the estimator runs through Pyro's ``TraceGraph_ELBO``."""
        return self.kind == "reinforce"


def estimators(problem: Problem, config: Config) -> list:
    """The estimators compared on ``problem``, in the order of the tables and figures."""
    variant = config.variant_temperature
    result = [Estimator("exact", "exact")]
    result += [Estimator("GenGS", "gengs", tau) for tau in config.temperatures]
    if problem.has_truncation:
        result.append(Estimator("GenGS NP", "gengs", variant, automatic_truncation=True))
    result.append(Estimator("GenGS ST", "gengs", variant, hard=True))
    result.append(Estimator("REINFORCE", "reinforce"))
    result.append(Estimator("REINFORCE + baseline", "reinforce", baseline=True))
    result.append(Estimator("RLOO", "rloo"))
    return result


def _truncation(problem: Problem, estimator: Estimator):
    return None if estimator.automatic_truncation else problem.truncation


def _objective(problem: Problem, estimator: Estimator, param, samples: int):
    """A torch objective whose gradient in ``param`` is the estimator's (the batch shape of
    ``param`` is kept: each batch element is an independent estimate)."""
    if estimator.kind == "exact":
        return problem.exact_loss(param)
    if estimator.kind == "gengs":
        relaxed = problem.relaxed(
            param,
            torch.tensor(estimator.temperature, dtype=param.dtype, device=param.device),
            _truncation(problem, estimator),
            estimator.hard,
        )
        return problem.loss(relaxed.rsample((samples,))).mean(0)
    if estimator.kind == "rloo":
        return _rloo_loss(problem, param, samples)
    raise ValueError(f"{estimator.name} is not a torch estimator")


def _rloo_loss(problem: Problem, param, samples: int):
    """The differentiable loss of :class:`~pyro_relax.infer.TraceRLOO_ELBO` on the model of
    :class:`_PyroREINFORCE`, each element of ``param``'s batch an independent copy in a
    ``pyro.plate``, so that the gradient of each row is that row's RLOO estimate."""
    batch = problem.discrete(param).batch_shape

    def copies():
        return pyro.plate("copies", batch[0]) if batch else contextlib.nullcontext()

    def model():
        with copies():
            z = pyro.sample("z", problem.discrete(param.detach()))
            pyro.factor("loss", -problem.loss(z))

    def guide():
        with copies():
            pyro.sample("z", problem.discrete(param))

    elbo = TraceRLOO_ELBO(num_particles=samples, max_plate_nesting=len(batch))
    return elbo.differentiable_loss(model, guide)


class _PyroREINFORCE:
    """REINFORCE through ``TraceGraph_ELBO``: a model whose log-density of ``z`` equals the
    guide's, so that the ELBO is minus the expected loss (see the module docstring)."""

    def __init__(self, problem: Problem, estimator: Estimator, samples: int, parameter):
        self.problem = problem
        self.parameter = parameter
        self.infer = (
            {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}}
            if estimator.baseline
            else {}
        )
        self.elbo = TraceGraph_ELBO(
            num_particles=samples, vectorize_particles=True, max_plate_nesting=0
        )

    def model(self):
        # The detached parameter: log p(z) equals log q(z) and carries no gradient, so that
        # the surrogate's gradient is exactly the score-function estimate of the loss's.
        z = pyro.sample("z", self.problem.discrete(self.parameter().detach()))
        pyro.factor("loss", -self.problem.loss(z))

    def guide(self):
        pyro.sample("z", self.problem.discrete(self.parameter()), infer=self.infer)

    def loss_and_grads(self) -> float:
        """Accumulates the REINFORCE gradient of the expected loss into the parameters."""
        return self.elbo.loss_and_grads(self.model, self.guide)


# ---------------------------------------------------------------------------------------------
# Optimization and gradient study


def _curve_every(config: Config) -> int:
    return max(1, math.ceil(config.steps / (config.curve_points - 1)))


def optimize(problem: Problem, estimator: Estimator, config: Config, seed: int) -> list:
    """Adam on the unconstrained parameter with the estimator's gradients, the learning rate
    decaying exponentially from ``lr`` to ``lr * lr_decay``; returns the exact expected loss
    before each step and after the last one (``steps + 1`` values)."""
    common.seed_everything(seed)
    initial = problem.unconstrained(problem.initial).clone()
    if estimator.uses_pyro:
        pyro.clear_param_store()
        pyro.param("theta", initial)
        theta = pyro.get_param_store().get_param("theta").unconstrained()
        runner = _PyroREINFORCE(
            problem,
            estimator,
            config.samples,
            lambda: problem.natural(pyro.param("theta")),
        )
    else:
        theta = initial.requires_grad_()
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(
        optimizer, config.lr_decay ** (1 / max(1, config.steps))
    )
    tau = "" if estimator.temperature is None else f" tau={estimator.temperature:g}"
    where = f"{problem.name} {estimator.name}{tau}"

    def quantities():
        with torch.no_grad():
            return [("theta", theta), ("the natural parameter", problem.natural(theta))]

    curve = []
    for step in range(config.steps + 1):
        # Checked at every step: the parameters are a few numbers.
        with common.diverging(f"{where}, step {step}", quantities, config.lr):
            with torch.no_grad():
                # In float64: the gap to the minimum falls below float32's resolution.
                loss = problem.exact_loss(problem.natural(theta).double())
            curve.append(
                common.finite(loss, "the expected loss", f"{where}, step {step}", config.lr)
            )
            if step == config.steps:
                break
            optimizer.zero_grad()
            if estimator.uses_pyro:
                runner.loss_and_grads()
            else:
                _objective(problem, estimator, problem.natural(theta), config.samples).backward()
            optimizer.step()
            schedule.step()
    if estimator.uses_pyro:
        pyro.clear_param_store()
    return curve


def _torch_gradients(problem, estimator, config, param) -> torch.Tensor:
    """``config.repeats`` independent gradient estimates in the natural parameter, one
    backward pass per chunk of repeats."""
    gradients = []
    for start in range(0, config.repeats, config.chunk):
        rows = min(config.chunk, config.repeats - start)
        batch = param.expand((rows,) + param.shape).clone().requires_grad_()
        objective = _objective(problem, estimator, batch, config.samples)
        (gradient,) = torch.autograd.grad(objective.sum(), batch)
        gradients.append(gradient)
    return torch.cat(gradients)


def _pyro_gradients(problem, estimator, config, param) -> torch.Tensor:
    """``config.pyro_repeats`` REINFORCE gradient estimates through ``TraceGraph_ELBO``."""
    pyro.clear_param_store()
    pyro.param("param", param.clone())
    leaf = pyro.get_param_store().get_param("param").unconstrained()
    runner = _PyroREINFORCE(problem, estimator, config.samples, lambda: pyro.param("param"))
    warmup = config.baseline_warmup if estimator.baseline else 0
    gradients = []
    for index in range(warmup + config.pyro_repeats):
        leaf.grad = None
        runner.loss_and_grads()
        if index >= warmup:
            gradients.append(leaf.grad.detach().clone())
    pyro.clear_param_store()
    return torch.stack(gradients)


def gradient_study(problem: Problem, estimator: Estimator, config: Config, seed: int) -> dict:
    """Variance of one gradient estimate at the initial parameter (mean over the parameter's
    coordinates) and, for the Poisson, the bias against the exact gradient with its standard
    error; see the module docstring."""
    param = problem.initial
    if estimator.kind == "exact":
        zero = 0.0 if problem.name == "poisson" else None
        return {"grad_variance": 0.0, "bias": zero, "bias_se": zero, "repeats": 1}
    common.seed_everything(seed)
    if estimator.uses_pyro:
        gradients = _pyro_gradients(problem, estimator, config, param)
    else:
        gradients = _torch_gradients(problem, estimator, config, param)
    repeats = gradients.shape[0]
    result = {
        "grad_variance": float(gradients.var(0).mean()),
        "bias": None,
        "bias_se": None,
        "repeats": repeats,
    }
    if problem.name == "poisson":
        exact = poisson_exact_gradient(param, problem.targets)
        errors = (gradients - exact).mean(-1)
        result["bias"] = float(errors.mean())
        result["bias_se"] = float(errors.std() / math.sqrt(repeats))
    return result


def poisson_bias_sweep(problem: Problem, config: Config, seed: int) -> list:
    """The bias of GenGS's Poisson gradient at the initial rate, for each temperature of
    ``config.bias_temperatures``, from ``config.bias_repeats`` independent estimates.

    Each row has ``bias`` (the coordinate-averaged error, as in :func:`gradient_study`) with
    its standard error ``bias_se``; ``rms_bias``, the root mean square over coordinates of each
    coordinate's estimated bias (at least ``|bias|``), and ``rms_se``, the root mean square of
    their standard errors: where the two are close, the coordinates' biases are lost in their
    noise. ``coordinate_bias`` lists each coordinate's estimated bias, for targets
    ``problem.targets``.

    Example:
        >>> config = dataclasses.replace(SMOKE, bias_temperatures=(0.5,), bias_repeats=100)
        >>> [row] = poisson_bias_sweep(PoissonProblem(config.dims), config, seed=0)
        >>> row["temperature"], row["repeats"], len(row["coordinate_bias"])
        (0.5, 100, 3)
    """
    return [_bias_row(problem, tau, config, seed) for tau in config.bias_temperatures]


def _bias_row(problem: Problem, temperature: float, config: Config, seed: int) -> dict:
    """One row of :func:`poisson_bias_sweep`, seeded on its own: a sweep resumed after some
    rows draws the same numbers for the others."""
    if problem.name != "poisson":
        raise ValueError(f"the bias is known exactly only for the Poisson, not {problem.name}")
    exact = poisson_exact_gradient(problem.initial, problem.targets)
    sweep = dataclasses.replace(config, repeats=config.bias_repeats)
    common.seed_everything(seed)
    estimator = Estimator("GenGS", "gengs", temperature)
    errors = _torch_gradients(problem, estimator, sweep, problem.initial) - exact
    repeats = errors.shape[0]
    per_coordinate = errors.mean(0)
    averaged = errors.mean(-1)
    return {
        "temperature": temperature,
        "bias": float(averaged.mean()),
        "bias_se": float(averaged.std() / math.sqrt(repeats)),
        # Not the noise-corrected root mean square: it fell below |bias| (which the true
        # quantities cannot) where the noise dominates, and read 0 next to a bias of -0.33.
        "rms_bias": float(per_coordinate.square().mean().sqrt()),
        "rms_se": float((errors.var(0) / repeats).mean().sqrt()),
        "coordinate_bias": per_coordinate.tolist(),
        "repeats": repeats,
    }


# ---------------------------------------------------------------------------------------------
# Command line, records, tables and figures


def add_arguments(parser) -> None:
    """Adds the synthetic study's options to its ``pyro-relax experiment`` subcommand."""
    parser.add_argument("--steps", type=positive_int, help=f"Adam steps (default {FULL.steps})")
    parser.add_argument(
        "--lr", type=positive_float, help=f"initial Adam learning rate (default {FULL.lr})"
    )
    parser.add_argument(
        "--lr-decay",
        type=decay,
        help="factor by which the learning rate decays, exponentially, over the steps "
        f"(default {FULL.lr_decay})",
    )
    parser.add_argument(
        "--samples",
        type=integer_at_least(2),
        help=f"samples per gradient estimate, >= 2 (default {FULL.samples})",
    )
    parser.add_argument(
        "--repeats",
        type=integer_at_least(2),
        help=f"gradient estimates for variance and bias (default {FULL.repeats}; "
        f"{FULL.pyro_repeats} for the Pyro estimators)",
    )
    parser.add_argument(
        "--temperatures",
        type=temperature_value,
        nargs="+",
        help=f"GenGS temperatures (default {' '.join(map(str, FULL.temperatures))})",
    )
    parser.add_argument(
        "--bias-temperatures",
        type=temperature_value,
        nargs="+",
        help="temperatures of the Poisson bias sweep (default "
        f"{' '.join(map(str, FULL.bias_temperatures))})",
    )
    parser.add_argument(
        "--bias-repeats",
        type=integer_at_least(2),
        help=f"gradient estimates per temperature of the sweep (default {FULL.bias_repeats})",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch intra-op threads during the run (default 1: the tensors are small, and "
        "on a busy machine a second thread makes each small operation ~100 times slower)",
    )
    parser.add_argument(
        "--distributions",
        nargs="+",
        choices=list(PROBLEMS),
        default=list(PROBLEMS),
        help="problems to run (default: all)",
    )


def _config(args) -> Config:
    config = SMOKE if args.smoke else FULL
    overrides = {
        "steps": args.steps,
        "lr": args.lr,
        "lr_decay": args.lr_decay,
        "samples": args.samples,
        "temperatures": tuple(args.temperatures) if args.temperatures else None,
        "bias_temperatures": tuple(args.bias_temperatures) if args.bias_temperatures else None,
        "bias_repeats": args.bias_repeats,
    }
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
        overrides["pyro_repeats"] = min(args.repeats, config.pyro_repeats)
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if config.bias_repeats < 2:
        raise ValueError("--bias-repeats must be at least 2 (the bias needs a standard error)")
    if config.samples < 2:
        raise ValueError("--samples must be at least 2 (RLOO needs a leave-one-out baseline)")
    return config


_RESULTS, _SWEEP_RESULTS = "synthetic.json", "synthetic_bias.json"
# A record of synthetic.json is identified by its settings: every Config field but these, which
# shape other records (the record's own temperature replaces the lists; the bias sweep's rows
# have their own), plus the problem, the estimator, the seed and the device. --threads is left
# out: it changes how fast a run goes, not its numbers (up to rounding); --smoke only picks the
# defaults, and the values it picks are in the key.
_OTHER_RECORDS = ("temperatures", "variant_temperature", "bias_temperatures", "bias_repeats")
# The Config fields a row of the bias sweep depends on (its rate and truncation are fixed).
_SWEEP_FIELDS = ("dims", "samples", "bias_repeats", "chunk")
# The Config fields that records written before records stored their settings hold.
_STORED = ("dims", "samples", "steps", "lr", "lr_decay")


def _unit_settings(config, seed, device, distribution, estimator, temperature) -> dict:
    """The settings that change the numbers of one record of ``synthetic.json``."""
    shared = {k: v for k, v in dataclasses.asdict(config).items() if k not in _OTHER_RECORDS}
    identity = {"distribution": distribution, "estimator": estimator, "temperature": temperature}
    return shared | identity | {"seed": seed, "device": device}


def _row_settings(config, seed, device, temperature) -> dict:
    """The settings that change the numbers of one row of ``synthetic_bias.json``."""
    shared = {name: getattr(config, name) for name in _SWEEP_FIELDS}
    return shared | {"temperature": temperature, "seed": seed, "device": device}


def _stored_config(record) -> Config:
    """The configuration of a record written before records stored their settings: the fields
    it holds, and the defaults of its time for the others."""
    stored = {k: record[k] for k in _STORED if k in record}
    return dataclasses.replace(SMOKE if record.get("smoke") else FULL, **stored)


def _record_settings(record) -> dict:
    """The settings of the run that made a record of ``synthetic.json`` (records written before
    records stored them all ran on the CPU)."""
    if "settings" in record:
        return record["settings"]
    identity = (record["distribution"], record["estimator"], record["temperature"])
    return _unit_settings(_stored_config(record), record["seed"], "cpu", *identity)


def _sweep_settings(record) -> dict:
    """The settings of the run that made a row of ``synthetic_bias.json``."""
    if "settings" in record:
        return record["settings"]
    config = dataclasses.replace(_stored_config(record), bias_repeats=record["repeats"])
    return _row_settings(config, record["seed"], "cpu", record["temperature"])


def _record(problem, estimator, config, args, curve, study, minimum, seconds) -> dict:
    every = _curve_every(config)
    late = curve[-max(1, len(curve) // 5) :]
    truncation = None
    if problem.has_truncation and estimator.kind == "gengs":
        truncation = "auto" if estimator.automatic_truncation else problem.truncation
    return {
        "distribution": problem.name,
        "estimator": estimator.name,
        "temperature": estimator.temperature,
        "truncation": truncation,
        "final_loss": curve[-1],
        "late_loss": sum(late) / len(late),
        "minimum_loss": minimum,
        "grad_variance": study["grad_variance"],
        "bias": study["bias"],
        "bias_se": study["bias_se"],
        "repeats": study["repeats"],
        "samples": config.samples,
        "dims": config.dims,
        "steps": config.steps,
        "lr": config.lr,
        "lr_decay": config.lr_decay,
        "seed": args.seed,
        "smoke": bool(args.smoke),
        "seconds": seconds,
        "machine": common.machine(),
        "command": args.command_line,
        "curve_every": every,
        "loss_curve": curve[::every] + ([curve[-1]] if (len(curve) - 1) % every else []),
        "settings": _unit_settings(
            config,
            args.seed,
            str(args.device),
            problem.name,
            estimator.name,
            estimator.temperature,
        ),
    }


def _sweep_record(row, problem, config, args, seconds) -> dict:
    return {
        "distribution": problem.name,
        "estimator": "GenGS",
        **row,
        "truncation": problem.truncation,
        "rate": float(problem.initial[0]),
        "targets": problem.targets.tolist(),
        "samples": config.samples,
        "dims": config.dims,
        "seed": args.seed,
        "smoke": bool(args.smoke),
        "seconds": seconds,  # this row's (records written before resuming: the whole sweep's)
        "machine": common.machine(),
        "command": args.command_line,
        "settings": _row_settings(config, args.seed, str(args.device), row["temperature"]),
    }


def _order(record):
    names = ["exact", "GenGS", "GenGS NP", "GenGS ST", "REINFORCE", "REINFORCE + baseline", "RLOO"]
    distributions = list(PROBLEMS)
    return (
        distributions.index(record["distribution"])
        if record["distribution"] in distributions
        else len(distributions),
        names.index(record["estimator"]) if record["estimator"] in names else len(names),
        -(record["temperature"] or 0.0),
        record["seed"],
    )


def _markdown(records, sweep=()) -> str:
    records = sorted(records, key=_order)
    rows = []
    for record in records:
        row = dict(record)
        row["excess"] = record["final_loss"] - record["minimum_loss"]
        row["late_excess"] = record["late_loss"] - record["minimum_loss"]
        rows.append(row)
    columns = [
        "distribution",
        "estimator",
        "temperature",
        "final_loss",
        "excess",
        "late_excess",
        "grad_variance",
        "bias",
        "bias_se",
        "seed",
        "seconds",
    ]
    formats = {
        "final_loss": ".3f",
        "excess": ".3g",
        "late_excess": ".3g",
        "grad_variance": ".4g",
        "bias": "+.4f",
        "bias_se": ".4f",
        "seconds": ".1f",
    }
    settings = sorted(
        {(r["dims"], r["samples"], r["steps"], r["lr"], r["lr_decay"]) for r in records}
    )
    minima = {}
    for record in records:  # runs of other dimensions have other minima
        minima.setdefault(record["distribution"], set()).add(record["minimum_loss"])
    lines = [
        "# GenGS synthetic study (paper section 6.1)",
        "",
        "Minimize E[sum_i (z_i - t_i)^2] over the distribution's parameter with Adam. "
        "`final_loss` is the exact expected loss (closed form) after the last step, `excess` "
        "its gap to the minimum, `late_excess` the gap of its mean over the last fifth of the "
        "steps. `grad_variance` is the variance of one gradient estimate at the initial "
        "parameter (mean over coordinates); `bias` (Poisson only) is the mean over coordinates "
        "of the estimator's mean minus the exact gradient 1 + 2(rate - t), `bias_se` its "
        "standard error. Settings (dims, samples per estimate, steps, initial lr, final lr "
        "factor): "
        + ", ".join(str(s) for s in settings)
        + " (where they differ, each row's are in `settings`). Minima: "
        + ", ".join(
            f"{name} " + " or ".join(f"{value:.3f}" for value in sorted(values))
            for name, values in minima.items()
        )
        + ". See `pyro_relax/experiments/synthetic.py` for the problems and estimators.",
        "",
        common.markdown_table(
            rows, columns, formats, common.differing_settings(records, _record_settings, columns)
        ),
    ]
    if sweep:
        rows = []
        for record in sorted(sweep, key=lambda r: (-r["temperature"], r["seed"])):
            row = dict(record)
            row["coordinates"] = (
                f"{min(record['coordinate_bias']):+.3f} to {max(record['coordinate_bias']):+.3f}"
            )
            rows.append(row)
        columns = ["temperature", "bias", "bias_se", "rms_bias", "rms_se", "coordinates"]
        columns += ["repeats", "seed"]
        formats = {"bias": "+.4f", "bias_se": ".4f", "rms_bias": ".4f", "rms_se": ".4f"}
        first = sweep[0]
        samples = sorted({r["samples"] for r in sweep})
        per_estimate = (
            f"{samples[0]} samples per estimate"
            if len(samples) == 1
            else "samples per estimate in `settings`"
        )
        differing = common.differing_settings(sweep, _sweep_settings, shown=columns)
        lines += [
            "## GenGS Poisson gradient bias against temperature",
            "",
            f"At rate {first['rate']:g} (truncation {first['truncation']}, {per_estimate}), "
            "from `repeats` independent estimates per temperature "
            "(`synthetic_bias.json`). `bias` is the coordinate-averaged error with its standard "
            "error `bias_se`; `rms_bias` the root mean square over coordinates of each "
            "coordinate's estimated bias, `rms_se` that of their standard errors (where the two "
            "are close, the coordinates' biases are within their noise); `coordinates` the "
            "range of the coordinates' biases.",
            "",
            common.markdown_table(rows, columns, formats, differing),
        ]
        records = [*records, *sweep]
    commands = sorted({r["command"] for r in records})
    machines = sorted({r["machine"] for r in records})
    lines += ["Commands: " + "; ".join(f"`{c}`" for c in commands), ""]
    lines += ["Machines: " + "; ".join(machines), ""]
    return "\n".join(lines)


def _style(name, temperature, temperatures):
    if name == "GenGS":
        ordered = sorted(temperatures, reverse=True)
        shade = 0.35 + 0.65 * ordered.index(temperature) / max(1, len(ordered) - 1)
        from matplotlib import colormaps

        return {"color": colormaps["Blues"](shade), "label": f"GenGS, τ = {temperature:g}"}
    styles = {
        "exact": {"color": "black", "linestyle": "--", "label": "exact gradient"},
        "GenGS NP": {"color": "tab:green", "label": f"GenGS NP, τ = {temperature}"},
        "GenGS ST": {"color": "tab:orange", "label": f"GenGS ST, τ = {temperature}"},
        "REINFORCE": {"color": "tab:red", "label": "REINFORCE (TraceGraph_ELBO)"},
        "REINFORCE + baseline": {"color": "tab:purple", "label": "REINFORCE + baseline"},
        "RLOO": {"color": "tab:brown", "label": "RLOO"},
    }
    return styles[name]


def _loss_figure(records, config: Config, path: Path) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    names = [name for name in PROBLEMS if any(r["distribution"] == name for r in records)]
    columns = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(6.5 * columns, 4.2 * rows + 0.8), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, name in zip(axes, names, strict=False):
        for record in sorted((r for r in records if r["distribution"] == name), key=_order):
            curve = record["loss_curve"]
            steps = [min(i * record["curve_every"], record["steps"]) for i in range(len(curve))]
            excess = [max(loss - record["minimum_loss"], 1e-6) for loss in curve]
            style = _style(record["estimator"], record["temperature"], config.temperatures)
            axis.plot(steps, excess, linewidth=1.2, **style)
        axis.set_yscale("log")
        axis.set_title(PROBLEMS[name].label)
        axis.set_xlabel("Adam step")
        axis.set_ylabel("exact expected loss − minimum")
        axis.grid(alpha=0.3)
    for axis in axes[len(names) :]:
        axis.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=8)
    figure.suptitle(
        f"Exact expected loss E[Σ(z − t)²] during Adam (lr {config.lr} decaying to "
        f"{config.lr * config.lr_decay:g}, {config.samples} samples per gradient estimate)"
    )
    common.save_figure(figure, path, dpi=120)


def _gradient_figure(records, sweep, config: Config, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.8), layout="constrained")
    variance_axis, bias_axis = figure.subplots(1, 2, width_ratios=[1.6, 1])
    names = [name for name in PROBLEMS if any(r["distribution"] == name for r in records)]
    labels = []
    for record in sorted(records, key=_order):
        if record["estimator"] == "exact":
            continue
        label = _style(record["estimator"], record["temperature"], config.temperatures)["label"]
        if label not in labels:
            labels.append(label)
    width = 0.8 / max(1, len(labels))
    for index, label in enumerate(labels):
        xs, ys, color = [], [], None
        for position, name in enumerate(names):
            for record in records:
                if record["distribution"] != name or record["estimator"] == "exact":
                    continue
                style = _style(record["estimator"], record["temperature"], config.temperatures)
                if style["label"] == label:
                    xs.append(position - 0.4 + (index + 0.5) * width)
                    ys.append(record["grad_variance"])
                    color = style["color"]
        variance_axis.bar(xs, ys, width=width, color=color, label=label)
    variance_axis.set_yscale("log")
    variance_axis.set_xticks(range(len(names)), [PROBLEMS[n].label for n in names], fontsize=8)
    variance_axis.set_ylabel("variance of one gradient estimate (mean over coordinates)")
    variance_axis.set_title(
        f"Gradient variance at the initial parameter ({config.samples} samples)"
    )
    variance_axis.legend(fontsize=7, ncol=2)
    variance_axis.grid(axis="y", alpha=0.3)

    poisson = [r for r in records if r["distribution"] == "poisson" and r["bias"] is not None]
    # The sweep's many repeats where there is one, else the gradient study's points.
    gengs = sorted(
        sweep or (r for r in poisson if r["estimator"] == "GenGS"), key=lambda r: r["temperature"]
    )
    if gengs:
        bias_axis.errorbar(
            [r["temperature"] for r in gengs],
            [r["bias"] for r in gengs],
            yerr=[2 * r["bias_se"] for r in gengs],
            marker="o",
            capsize=3,
            color="tab:blue",
            label=f"GenGS (truncation {PoissonProblem.truncation}), mean over coordinates",
        )
    # Nudged sideways so that they do not hide the GenGS point at the same temperature.
    nudges = {"GenGS NP": 0.93, "GenGS ST": 1.07}
    for record in poisson:
        if record["estimator"] in nudges:
            style = _style(record["estimator"], record["temperature"], config.temperatures)
            bias_axis.errorbar(
                [record["temperature"] * nudges[record["estimator"]]],
                [record["bias"]],
                yerr=[2 * record["bias_se"]],
                marker="s",
                capsize=3,
                linestyle="none",
                color=style["color"],
                label=style["label"],
            )
    unbiased = [r for r in poisson if r["estimator"] == "RLOO"]
    if unbiased:
        record = unbiased[0]
        bias_axis.axhspan(
            record["bias"] - 2 * record["bias_se"],
            record["bias"] + 2 * record["bias_se"],
            color="tab:brown",
            alpha=0.12,
            label="RLOO (unbiased) ± 2 s.e.",
        )
    bias_axis.axhline(0.0, color="black", linewidth=0.8)
    bias_axis.set_xscale("log")
    bias_axis.set_xlabel("temperature τ")
    bias_axis.set_ylabel("bias of the gradient in the rate")
    bias_axis.set_title("Poisson: gradient bias vs 1 + 2(λ − t), ± 2 s.e.")
    if bias_axis.get_legend_handles_labels()[0]:  # empty without the Poisson
        bias_axis.legend(fontsize=7)
    bias_axis.grid(alpha=0.3)
    common.save_figure(figure, path, dpi=120)


def run(args) -> int:
    """Runs the study, writes ``synthetic.json``, ``synthetic.md`` and the two figures into
    ``args.results``, and returns the exit code. An interrupted run resumes from its checkpoint
    after the last estimator (or temperature of the bias sweep) it finished."""
    with common.torch_threads(args.threads):
        return _run(args)


def _run(args) -> int:
    config = _config(args)
    results = Path(args.results)
    # A damaged results file stops the run at once (its tables are the only reports of stored
    # records: the figures show this run's).
    common.read_records(results / _RESULTS, lambda _, records: _markdown(records))
    common.read_records(results / _SWEEP_RESULTS, lambda _, sweep: _markdown([], sweep))
    problems = [PROBLEMS[name](config.dims, args.device) for name in args.distributions]
    grid = [
        (problem, estimator) for problem in problems for estimator in estimators(problem, config)
    ]
    poisson = next((problem for problem in problems if problem.name == "poisson"), None)
    checkpoint = _checkpoint(results, config, args)
    # The finished records, in the order of the grid and of the sweep's temperatures: each is
    # seeded on its own, so a resumed run computes the others exactly as an uninterrupted one.
    done = checkpoint.load() or {"records": [], "sweep": []}
    records, sweep = done["records"], done["sweep"]
    minima = {problem.name: minimum_loss(problem) for problem in problems}
    bar = common.progress(total=len(grid), initial=len(records), desc="synthetic", unit="run")
    with bar:
        for problem, estimator in grid[len(records) :]:
            tau = "" if estimator.temperature is None else f" τ={estimator.temperature:g}"
            bar.set_postfix_str(f"{problem.name}: {estimator.name}{tau}")
            start = time.perf_counter()
            curve = optimize(problem, estimator, config, args.seed)
            study = gradient_study(problem, estimator, config, args.seed)
            seconds = time.perf_counter() - start
            minimum = minima[problem.name]
            records.append(
                _record(problem, estimator, config, args, curve, study, minimum, seconds)
            )
            checkpoint.save({"records": records, "sweep": sweep})
            bar.update()
    temperatures = config.bias_temperatures if poisson is not None else ()
    for temperature in temperatures[len(sweep) :]:
        start = time.perf_counter()
        row = _bias_row(poisson, temperature, config, args.seed)
        sweep.append(_sweep_record(row, poisson, config, args, time.perf_counter() - start))
        checkpoint.save({"records": records, "sweep": sweep})

    def write_table(merged, merged_sweep):
        shown = [r for r in merged if r.get("smoke") == bool(args.smoke)]
        shown_sweep = [r for r in merged_sweep if r.get("smoke") == bool(args.smoke)]
        common.atomic_write_text(results / "synthetic.md", _markdown(shown, shown_sweep))

    # The table of both files is written under both locks (the main file's, then the sweep's).
    common.update_records(
        results / _RESULTS,
        records,
        _record_settings,
        lambda merged: common.update_records(
            results / _SWEEP_RESULTS,
            sweep,
            _sweep_settings,
            lambda merged_sweep: write_table(merged, merged_sweep),
        ),
    )
    checkpoint.remove()  # only now: until both merges, it holds the finished records
    _loss_figure(records, config, results / "synthetic_loss.png")
    _gradient_figure(records, sweep, config, results / "synthetic_gradients.png")
    print(
        f"wrote {results / _RESULTS}, {_SWEEP_RESULTS}, synthetic.md, synthetic_loss.png and "
        "synthetic_gradients.png"
    )
    return 0


def _checkpoint(results, config, args) -> common.Checkpoint:
    """The checkpoint of a whole run: every setting, and the problems it runs."""
    settings = dataclasses.asdict(config) | {"seed": args.seed, "device": str(args.device)}
    settings["distributions"] = list(args.distributions)
    path = common.checkpoint_path(results, f"synthetic-seed{args.seed}", settings)
    return common.Checkpoint(path, settings)

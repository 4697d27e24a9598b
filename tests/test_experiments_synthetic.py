"""Tests of the synthetic gradient study (``pyro-relax experiment synthetic``)."""

import dataclasses
import json
import math

import pyro
import pytest
import torch

from pyro_relax.__main__ import main
from pyro_relax.experiments import synthetic

REQUIRED_FIELDS = {
    "distribution",
    "estimator",
    "temperature",
    "final_loss",
    "grad_variance",
    "bias",
    "bias_se",
    "steps",
    "seed",
    "seconds",
    "machine",
    "command",
}


def test_smoke_run_writes_results(tmp_path):
    argv = ["experiment", "synthetic", "--smoke", "--results", str(tmp_path)]
    assert main(argv) == 0

    records = json.loads((tmp_path / "synthetic.json").read_text())
    assert {r["distribution"] for r in records} == set(synthetic.PROBLEMS)
    poisson = {r["estimator"] for r in records if r["distribution"] == "poisson"}
    assert poisson == {
        "exact",
        "GenGS",
        "GenGS NP",
        "GenGS ST",
        "REINFORCE",
        "REINFORCE + baseline",
        "RLOO",
    }
    for record in records:
        assert REQUIRED_FIELDS <= record.keys()
        assert record["command"] == f"pyro-relax experiment synthetic --smoke --results {tmp_path}"
        assert record["steps"] == synthetic.SMOKE.steps and record["seed"] == 0
        assert math.isfinite(record["final_loss"]) and record["grad_variance"] >= 0
        if record["distribution"] == "poisson":
            assert math.isfinite(record["bias"]) and record["bias_se"] >= 0
        else:
            assert record["bias"] is None
    assert "| poisson | GenGS | 0.1 |" in (tmp_path / "synthetic.md").read_text()
    sweep = json.loads((tmp_path / "synthetic_bias.json").read_text())
    assert [r["temperature"] for r in sweep] == list(synthetic.SMOKE.bias_temperatures)
    for row in sweep:
        assert row["repeats"] == synthetic.SMOKE.bias_repeats and row["bias_se"] > 0
        assert math.isfinite(row["bias"]) and row["rms_bias"] >= 0
        assert len(row["coordinate_bias"]) == synthetic.SMOKE.dims
    assert (
        "## GenGS Poisson gradient bias against temperature"
        in (tmp_path / "synthetic.md").read_text()
    )
    for name in ("synthetic_loss.png", "synthetic_gradients.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun replaces its rows instead of appending them, and keeps the others.
    assert main([*argv, "--distributions", "poisson"]) == 0
    assert len(json.loads((tmp_path / "synthetic.json").read_text())) == len(records)
    assert "| binomial | RLOO |" in (tmp_path / "synthetic.md").read_text()


@pytest.mark.parametrize("name", list(synthetic.PROBLEMS))
def test_closed_form_loss_matches_monte_carlo(name):
    # Moments against torch's own, exactly; the loss against 200k draws, within 4 standard
    # errors, at the initial parameter and at a perturbed one.
    problem = synthetic.PROBLEMS[name](dims=6, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    theta = problem.unconstrained(problem.initial)
    perturbed = theta + 0.5 * torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
    pyro.set_rng_seed(0)
    for param in (problem.initial, problem.natural(perturbed)):
        discrete = problem.discrete(param)
        mean, variance = problem.moments(param)
        torch.testing.assert_close(mean, discrete.base_dist.mean)
        torch.testing.assert_close(variance, discrete.base_dist.variance)
        losses = problem.loss(discrete.sample((200_000,)))
        standard_error = losses.std() / math.sqrt(losses.numel())
        assert abs(losses.mean() - problem.exact_loss(param)) < 4 * standard_error


def test_poisson_exact_gradient_matches_autograd():
    problem = synthetic.PoissonProblem(dims=20, dtype=torch.float64)
    rate = torch.linspace(0.3, 12.0, 20, dtype=torch.float64)
    torch.testing.assert_close(
        synthetic.exact_gradient(problem, rate),
        synthetic.poisson_exact_gradient(rate, problem.targets),
    )


def test_minimum_loss_matches_the_poisson_optimum():
    # The rate minimizing rate + (rate - t)^2 is t - 1/2, where the loss is t - 1/4.
    problem = synthetic.PoissonProblem(dims=20)
    expected = float((problem.targets.double() - 0.25).sum())
    assert synthetic.minimum_loss(problem) == pytest.approx(expected, rel=1e-8)


def _study(estimator, repeats, seed=0):
    config = dataclasses.replace(synthetic.FULL, repeats=repeats, chunk=5000)
    return synthetic.gradient_study(synthetic.PoissonProblem(config.dims), estimator, config, seed)


def test_rloo_is_unbiased():
    # Tolerance: 4 standard errors of the coordinate-averaged bias, which must itself be small
    # enough (below 5% of the mean absolute gradient, 6.0) for the check to have power.
    study = _study(synthetic.Estimator("RLOO", "rloo"), repeats=20_000)
    assert study["bias_se"] < 0.3 / 4
    assert abs(study["bias"]) < 4 * study["bias_se"]


def test_gengs_poisson_bias_shrinks_with_temperature():
    # Measured (20 coordinates, 4 samples, 4000 repeats): about -0.35 +- 0.01 at tau = 1.0 and
    # -0.1 +- 0.04 at tau = 0.1. The high-temperature bias must be resolved (5 standard errors)
    # and exceed the low-temperature one by 3 standard errors of the difference.
    hot = _study(synthetic.Estimator("GenGS", "gengs", 1.0), repeats=4000)
    cold = _study(synthetic.Estimator("GenGS", "gengs", 0.1), repeats=4000)
    assert abs(hot["bias"]) > 5 * hot["bias_se"]
    margin = 3 * math.hypot(hot["bias_se"], cold["bias_se"])
    assert abs(cold["bias"]) + margin < abs(hot["bias"])
    assert cold["grad_variance"] > hot["grad_variance"]  # the price of a lower temperature


def test_bias_sweep_shrinks_below_temperature_half():
    # Measured with 100,000 repeats: coordinate-averaged bias -0.373 at tau 0.5, -0.184 at 0.2,
    # -0.095 at 0.1 (standard errors 0.003, 0.005, 0.008). With 20,000 repeats each step down
    # must shrink the bias's magnitude by 3 standard errors of the difference, and the root
    # mean square over coordinates must agree with the coordinate average (the biases of the
    # coordinates share their sign below tau = 1) to within 0.05.
    config = dataclasses.replace(
        synthetic.FULL, bias_temperatures=(0.5, 0.2, 0.1), bias_repeats=20_000, chunk=5000
    )
    rows = synthetic.poisson_bias_sweep(synthetic.PoissonProblem(config.dims), config, seed=0)
    for hot, cold in zip(rows[:-1], rows[1:], strict=True):
        margin = 3 * math.hypot(hot["bias_se"], cold["bias_se"])
        assert abs(cold["bias"]) + margin < abs(hot["bias"])
    for row in rows:
        assert row["bias"] < 0
        assert row["rms_bias"] == pytest.approx(abs(row["bias"]), abs=0.05)


def test_bias_sweep_agrees_with_the_gradient_study():
    # The sweep is the gradient study's bias with more repeats: with equal repeats and seed
    # the two draw the same estimates, so the numbers agree to rounding.
    config = dataclasses.replace(
        synthetic.FULL, bias_temperatures=(0.5,), bias_repeats=2000, repeats=2000
    )
    problem = synthetic.PoissonProblem(config.dims)
    [row] = synthetic.poisson_bias_sweep(problem, config, seed=3)
    study = synthetic.gradient_study(problem, synthetic.Estimator("GenGS", "gengs", 0.5), config, 3)
    assert row["bias"] == pytest.approx(study["bias"], abs=1e-5)
    assert row["bias_se"] == pytest.approx(study["bias_se"], rel=1e-4)


def test_bias_sweep_refuses_other_distributions():
    with pytest.raises(ValueError, match="only for the Poisson"):
        synthetic.poisson_bias_sweep(synthetic.BinomialProblem(3), synthetic.SMOKE, seed=0)


class _CapturingREINFORCE(synthetic._PyroREINFORCE):
    """The experiment's model, with a guide that keeps its draw."""

    def guide(self):
        self.z = pyro.sample("z", self.problem.discrete(self.parameter()), infer=self.infer)


def test_tracegraph_reinforce_is_the_score_function_estimate_of_the_loss():
    # The model's log-density of z equals the guide's, so TraceGraph_ELBO's loss is the sample
    # loss and its gradient is mean_s loss(z_s) * d log q(z_s) / d rate, on the same draws.
    problem = synthetic.PoissonProblem(dims=5, dtype=torch.float64)
    estimator = synthetic.Estimator("REINFORCE", "reinforce")
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    pyro.param("rate", problem.initial.clone())
    rate = pyro.get_param_store().get_param("rate").unconstrained()
    runner = _CapturingREINFORCE(problem, estimator, 8, lambda: pyro.param("rate"))
    loss = runner.loss_and_grads()
    z = runner.z.detach()
    losses = problem.loss(z)
    assert loss == pytest.approx(float(losses.mean()), rel=1e-12)
    leaf = problem.initial.clone().requires_grad_()
    score = pyro.distributions.Poisson(leaf).to_event(1).log_prob(z)
    (expected,) = torch.autograd.grad((losses * score).mean(), leaf)
    torch.testing.assert_close(rate.grad, expected)
    pyro.clear_param_store()

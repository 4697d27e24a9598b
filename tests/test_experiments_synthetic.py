"""Tests of the synthetic gradient study (``pyro-relax experiment synthetic``)."""

import dataclasses
import json
import math
import shlex
from pathlib import Path

import pyro
import pytest
import torch
from statistical import assert_z_scores_are_standard

from pyro_relax.__main__ import build_parser, main
from pyro_relax.experiments import common, synthetic

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
        assert math.isfinite(row["bias"]) and row["rms_se"] > 0
        # The noise-corrected root mean square read 0 next to a bias of -0.33 here.
        assert row["rms_bias"] >= abs(row["bias"])
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
    # Moments against torch's own, exactly; the loss against 200k draws, its error in standard
    # errors standard normal at LEVEL (statistical.py), at the initial parameter and at a
    # perturbed one.
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
        z = (losses.mean() - problem.exact_loss(param)) / standard_error
        assert_z_scores_are_standard(z, f"the {name} loss")


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
    # The coordinate-averaged bias in standard errors, standard normal at LEVEL
    # (statistical.py); the standard error must itself be small enough (4 of them below 5% of
    # the mean absolute gradient, 6.0) for the check to have power.
    study = _study(synthetic.Estimator("RLOO", "rloo"), repeats=20_000)
    assert study["bias_se"] < 0.3 / 4
    assert_z_scores_are_standard(study["bias"] / study["bias_se"], "RLOO's bias")


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


# --- Results: resuming, settings, committed records ------------------------------------------

QUICK = ["--distributions", "poisson", "binomial"]


def _run(results, *options):
    return main(["experiment", "synthetic", "--smoke", "--results", str(results), *options])


def _without_times(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "command")} for r in records]


class _Interrupt(Exception):
    pass


def _interrupt_on_call(monkeypatch, name, call):
    """Makes the ``call``-th call of ``synthetic.<name>`` raise :class:`_Interrupt`."""
    original, calls = getattr(synthetic, name), []

    def interrupted(*args, **kwargs):
        calls.append(None)
        if len(calls) == call:
            raise _Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic, name, interrupted)


@pytest.mark.parametrize("where", ["_bias_row", "gradient_study"])
def test_an_interrupted_run_resumes_to_the_same_records(tmp_path, monkeypatch, where):
    assert _run(tmp_path / "straight", *QUICK) == 0
    _interrupt_on_call(monkeypatch, where, call=2)
    with pytest.raises(_Interrupt):
        _run(tmp_path / "resumed", *QUICK)
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))) == 1
    monkeypatch.undo()
    optimized = []
    optimize = synthetic.optimize
    monkeypatch.setattr(synthetic, "optimize", lambda *a: optimized.append(a) or optimize(*a))
    pyro.set_rng_seed(123)  # whatever happens in between, every unit of work seeds itself
    assert _run(tmp_path / "resumed", *QUICK) == 0

    # Only the unfinished units ran again: in the grid, the one interrupted and those after it.
    grid = sum(
        len(synthetic.estimators(synthetic.PROBLEMS[name](3), synthetic.SMOKE))
        for name in ("poisson", "binomial")
    )
    assert len(optimized) == (grid - 1 if where == "gradient_study" else 0)
    for name in ("synthetic.json", "synthetic_bias.json"):
        straight, resumed = (
            json.loads((tmp_path / run / name).read_text()) for run in ("straight", "resumed")
        )
        assert _without_times(resumed) == _without_times(straight)
    assert not list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))


def test_a_damaged_checkpoint_is_one_clear_line(tmp_path, monkeypatch, capsys):
    _interrupt_on_call(monkeypatch, "gradient_study", call=3)
    with pytest.raises(_Interrupt):
        _run(tmp_path, *QUICK)
    monkeypatch.undo()
    [checkpoint] = (tmp_path / "checkpoints").glob("*.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    capsys.readouterr()
    assert _run(tmp_path, *QUICK) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(checkpoint) in error and "delete it" in error


def test_a_rerun_with_other_settings_keeps_the_earlier_records(tmp_path):
    assert _run(tmp_path, "--distributions", "poisson") == 0
    first = json.loads((tmp_path / "synthetic.json").read_text())
    assert _run(tmp_path, "--distributions", "poisson", "--steps", "5") == 0
    assert _run(tmp_path, "--distributions", "poisson", "--lr", "0.1") == 0
    assert _run(tmp_path, "--distributions", "poisson", "--bias-repeats", "50") == 0
    records = json.loads((tmp_path / "synthetic.json").read_text())
    assert len(records) == 3 * len(first)
    assert sorted({(r["steps"], r["lr"]) for r in records}) == [(5, 0.05), (10, 0.05), (10, 0.1)]
    sweep = json.loads((tmp_path / "synthetic_bias.json").read_text())
    assert sorted(r["repeats"] for r in sweep) == [50, 50, 200, 200]


def test_a_run_without_the_poisson_draws_its_figures_without_a_warning(tmp_path):
    assert _run(tmp_path, "--distributions", "binomial") == 0  # warnings are errors here


COMMITTED = Path(__file__).resolve().parents[1] / "results"


def test_committed_records_are_matched_by_the_settings_of_their_commands():
    # The committed records predate the settings they are now keyed by; each must be the
    # record its own command would replace, and no other.
    for file, settings_of in [
        ("synthetic.json", synthetic._record_settings),
        ("synthetic_bias.json", synthetic._sweep_settings),
    ]:
        records = json.loads((COMMITTED / file).read_text())
        digests = {common.settings_digest(settings_of(r)) for r in records}
        assert len(digests) == len(records)
        for record in records:
            argv = shlex.split(record["command"])[1:]
            config = synthetic._config(build_parser(argv).parse_args(argv))
            if file == "synthetic.json":
                identity = (record["distribution"], record["estimator"], record["temperature"])
                expected = synthetic._unit_settings(config, 0, "cpu", *identity)
            else:
                expected = synthetic._row_settings(config, 0, "cpu", record["temperature"])
            assert common.settings_digest(expected) == common.settings_digest(settings_of(record))


def test_rows_of_runs_with_other_settings_are_told_apart():
    # Rows of runs with other sample counts looked identical, and the sweep's header gave the
    # first row's count for all.
    records = json.loads((COMMITTED / "synthetic.json").read_text())[:1]
    sweep = json.loads((COMMITTED / "synthetic_bias.json").read_text())[:1]
    page = synthetic._markdown(
        [*records, dict(records[0], settings=dict(records[0]["settings"], samples=8))],
        [*sweep, dict(sweep[0], samples=8, settings=dict(sweep[0]["settings"], samples=8))],
    )
    assert page.count("| samples=4 |") == 2 and page.count("| samples=8 |") == 2
    assert "samples per estimate in `settings`" in page
    assert "settings" not in synthetic._markdown(records, sweep).split("## GenGS")[1]

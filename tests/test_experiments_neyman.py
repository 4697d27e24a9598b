"""The Neyman Type A experiment: smoke run, missing statsmodels, exact scores, the gradient
study's surrogate against Pyro's Trace_ELBO, and the symmetric straight-through prototype."""

import json
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from scipy import stats

import pyro_relax.__main__ as cli
from pyro_relax.experiments import common, neyman

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REQUIRED = (
    "study",
    "data",
    "estimator",
    "seed",
    "test_log_likelihood",
    "train_log_likelihood",
    "seconds",
    "settings",
    "machine",
    "command",
    "history",
)
# What every record of a trained latent-variable model holds besides.
LEARNED = ("phi", "mean_prior_rate", "max_prior_tail_mass", "test_elbo")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the experiment runs: tiny matrices gain nothing from a second."""
    with common.torch_threads(1):
        yield


def test_smoke_run_writes_results(tmp_path, capsys):
    argv = ["experiment", "neyman", "--smoke", "--results", str(tmp_path)]
    assert cli.main(argv) == 0

    records = json.loads((tmp_path / "neyman.json").read_text())
    training = [r for r in records if r["study"] == "training"]
    assert {r["estimator"] for r in training} == set(neyman.ESTIMATORS)
    for record in training:
        assert set(REQUIRED) <= set(record)
        assert record["data"] == "randhie-300-smoke" and record["seed"] == 0
        assert record["command"] == f"pyro-relax experiment neyman --smoke --results {tmp_path}"
        assert -10 < record["test_log_likelihood"] < 0
        if record["estimator"] != neyman.GLM:
            assert set(LEARNED) <= set(record)
            assert len(record["history"]) == 2  # steps 3 and 6
            assert record["history"][-1]["step"] == neyman.SMOKE_CONFIG.steps
    gradients = [r for r in records if r["study"] == "gradients"]
    points = {r["point"] for r in gradients}
    assert points == {"start", neyman.EXACT_ELBO, neyman.ST}
    assert {r["estimator"] for r in gradients} == set(neyman.GRADIENT_PAIRS)
    assert {r["term"] for r in gradients} == set(neyman.TERMS)
    assert all(np.isfinite(r["shift_mean"]) and np.isfinite(r["shift_exact"]) for r in gradients)
    table = (tmp_path / "neyman.md").read_text()
    assert "| randhie-300-smoke | GenGS | 0 |" in table and "## Gradient study" in table
    assert (tmp_path / "neyman.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # removed once merged

    # A second run replaces its rows rather than adding to them.
    assert cli.main([*argv, "--estimators", "GLM", "--gradient-points"]) == 0
    assert len(json.loads((tmp_path / "neyman.json").read_text())) == len(records)

    # A record whose curves only the figure reads (here without their steps) stops the next run
    # before it trains, in one line, and is left as it is: it passed the check of the tables
    # alone and stopped the run with a traceback once it had finished, at every rerun.
    damaged = next(r for r in records if r["study"] == "training" and r.get("history"))
    damaged["history"] = [{"loss": 1.0}]
    (tmp_path / "neyman.json").write_text(json.dumps(records))
    before = (tmp_path / "neyman.json").read_text()
    capsys.readouterr()
    assert cli.main([*argv, "--estimators", "GLM", "--gradient-points"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "neyman.json" in error and "left untouched" in error
    assert (tmp_path / "neyman.json").read_text() == before


def test_missing_statsmodels_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "statsmodels.datasets", None)  # import fails
    with pytest.raises(ImportError, match="pip install statsmodels"):
        neyman.load_visits()
    assert cli.main(["experiment", "neyman", "--smoke", "--results", str(tmp_path)]) == 1
    assert "pip install statsmodels" in capsys.readouterr().err


def test_more_people_than_the_data_holds_is_the_whole_data_and_its_run():
    # --people above the 20,190 was capped silently but kept in the settings and the data's
    # name: runs on the same data became separate rows claiming ten million people.
    data = neyman.load_visits(0)
    assert len(data.y_train) + len(data.y_test) == neyman.PEOPLE
    assert neyman.load_visits(0, people=10**7).name == data.name == "randhie"
    for people in ("20190", "99999"):
        argv = ["experiment", "neyman", "--people", people]
        assert neyman._config(cli.build_parser(argv).parse_args(argv)).people is None
    argv = ["experiment", "neyman", "--people", "20189"]
    assert neyman._config(cli.build_parser(argv).parse_args(argv)).people == 20189


def test_split_is_fixed_by_the_seed_and_standardized():
    first, again, other = (neyman.load_visits(seed, people=500) for seed in (3, 3, 4))
    assert torch.equal(first.y_test, again.y_test) and torch.equal(first.x_train, again.x_train)
    assert not torch.equal(first.y_test, other.y_test)
    assert (len(first.y_train), len(first.y_test)) == (400, 100)
    assert first.covariates[0] == "lncoins" and len(first.covariates) == 9
    torch.testing.assert_close(first.x_train.mean(0), torch.zeros(9), atol=1e-5, rtol=0)
    torch.testing.assert_close(first.x_train.std(0, correction=0), torch.ones(9), atol=1e-4, rtol=0)


def _small_problem(truncation=12):
    torch.manual_seed(0)
    regression = neyman.Regression(3).double()
    with torch.no_grad():
        regression.intercept.fill_(0.3)
        regression.coefficients.copy_(torch.tensor([0.2, -0.1, 0.4]))
        regression.log_scale.fill_(0.5)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 3.0, 7.0, 2.0], dtype=torch.float64)
    return regression, x, y


def test_marginal_log_likelihood_matches_scipy():
    regression, x, y = _small_problem()
    truncation, offset = 12, 0.1
    got = neyman.marginal_log_likelihood(regression, x, y, truncation, offset)
    rate = np.exp(0.3 + x.numpy() @ np.array([0.2, -0.1, 0.4]))
    k = np.arange(truncation)
    prior = stats.poisson.pmf(k, rate[:, None])
    prior[:, -1] = stats.poisson.sf(truncation - 2, rate)  # the last outcome takes the tail
    likelihood = stats.poisson.pmf(y.numpy()[:, None], offset + np.exp(0.5) * k)
    np.testing.assert_allclose(got.detach().numpy(), np.log((prior * likelihood).sum(1)))


def test_discrete_elbo_of_the_exact_posterior_is_the_marginal_likelihood():
    regression, x, y = _small_problem()
    truncation, offset = 12, 0.1
    marginal = neyman.marginal_log_likelihood(regression, x, y, truncation, offset)

    class Posterior(torch.nn.Module):  # free logits: the exact posterior over 0..n-1
        def forward(self, x, y):
            prior = neyman.truncated_log_probs(dist.Poisson(regression.prior_rate(x)), truncation)
            return prior + neyman._log_likelihood_table(regression.scale, y, truncation, offset)

    elbo = neyman.discrete_elbo(neyman.IMP, regression, Posterior(), x, y, truncation, offset)
    torch.testing.assert_close(elbo, marginal)


@pytest.mark.parametrize("pair", neyman.GRADIENT_PAIRS)
def test_study_differentiates_what_trace_elbo_does(pair):
    """One draw of the study's surrogate terms, pulled back to the networks, equals the
    gradient that Pyro's Trace_ELBO computes from the experiment's model and guide with the
    same noise (the study then averages many such draws)."""
    config = neyman.SMOKE_CONFIG
    regression, x, y = _small_problem()
    encoder = neyman.Encoder(3, config.hidden).double()
    temperature = torch.tensor(0.3, dtype=torch.float64)

    pyro.clear_param_store()
    model, guide, _ = neyman._model_and_guide(pair, regression, encoder, config, temperature)
    pyro.set_rng_seed(7)
    Trace_ELBO().loss_and_grads(model, guide, x, y)
    params = [regression.intercept, regression.coefficients, regression.log_scale]
    params += list(encoder.parameters())
    pyro_grads = [-p.grad.clone() for p in params]  # ELBO ascent

    log_rate = encoder.rate(x, y).log()
    leaves = [
        t.detach().expand(1, len(y)).clone().requires_grad_()
        for t in (log_rate, regression.intercept + x @ regression.coefficients,
                  regression.log_scale.expand(len(y)))
    ]  # fmt: skip
    pyro.set_rng_seed(7)
    terms = neyman._surrogate_terms(pair, *leaves, y, temperature, config)
    gu, gv, gw = (g[0] for g in neyman._local_gradients(terms, leaves)["total"])
    ours = [gv.sum(), x.T @ gv, gw.sum()]
    ours += torch.autograd.grad(log_rate, list(encoder.parameters()), gu)
    for got, expected in zip(ours, pyro_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_symmetric_straight_through_scores_like_a_poisson():
    rate = torch.tensor([0.7, 3.0, 9.0], dtype=torch.float64, requires_grad=True)
    guide = neyman.SymmetricStraightThroughPoisson(rate, 0.2, 25)
    pyro.set_rng_seed(0)
    z = guide.rsample()
    assert torch.equal(z, z.round())
    score = guide.log_prob(z)
    # The value: the truncated log-PMF of the hard outcome.
    torch.testing.assert_close(score, guide.logits.gather(-1, z.long().unsqueeze(-1)).squeeze(-1))
    # The gradient: the Poisson score at the hard outcome plus (log rate - digamma(z + 1))
    # times the gradient of the relaxed sample.
    (got,) = torch.autograd.grad(score.sum(), rate, retain_graph=True)
    (relaxed,) = torch.autograd.grad(z.sum(), rate, retain_graph=True)
    hard = z.detach()
    expected = hard / rate - 1 + (rate.log() - torch.digamma(hard + 1)) * relaxed
    torch.testing.assert_close(got, expected.detach())
    # A plain count is scored by the truncated log-PMF, as by GenGSPoisson.
    count = torch.tensor([0.0, 2.0, 24.0], dtype=torch.float64)
    plain = neyman.GenGSPoisson(rate, 0.2, 25)
    torch.testing.assert_close(guide.log_prob(count), plain.log_prob(count))


@pytest.mark.parametrize(
    "option", [["--truncation", "1"], ["--steps", "0"], ["--gradient-temperatures", "-0.1"]]
)
def test_bad_numbers_are_usage_errors(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["experiment", "neyman", *option])
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_options_given_with_smoke_are_used():
    # --smoke replaced the whole config and fixed the gradient draws at 4.
    def parse(*options):
        argv = ["experiment", "neyman", *options]
        return cli.build_parser(argv).parse_args(argv)

    args = parse("--smoke", "--steps", "9", "--people", "500", "--gradient-draws", "7")
    config = neyman._config(args)
    assert (config.steps, config.people, config.hidden) == (9, 500, neyman.SMOKE_CONFIG.hidden)
    assert args.gradient_draws == 7
    assert neyman._config(parse()) == neyman.NeymanConfig()


def test_runs_of_other_settings_have_their_own_rows_and_their_own_exact_reference():
    # Runs of two configurations in one results file were averaged as if they were seeds, and
    # each seed's `exact` reference came from whichever configuration was read last (`exact`
    # minus exact read +0.015 where it is 0 by definition). Here a second configuration (other
    # steps) scores every run 1 nat higher and GenGS 0.1 more.
    committed = json.loads(
        (Path(__file__).resolve().parents[1] / "results/neyman.json").read_text()
    )
    first = [
        r
        for r in committed
        if r["study"] == "training"
        and r["seed"] == 0
        and r["estimator"] in (neyman.EXACT, neyman.GENGS)
    ]
    second = [
        dict(
            r,
            settings=dict(r["settings"], steps=6),
            test_log_likelihood=r["test_log_likelihood"]
            + 1.0
            + 0.1 * (r["estimator"] == neyman.GENGS),
        )
        for r in first
    ]
    both = first + second
    rows = {
        (row["estimator"], row["configuration"]): row
        for row in neyman._summary_rows(both, neyman._configurations(both))
    }
    assert set(rows) == {
        (e, c) for e in (neyman.EXACT, neyman.GENGS) for c in ("steps=3000", "steps=6")
    }
    gap = rows[neyman.GENGS, "steps=3000"]["minus exact"]
    for configuration, extra in (("steps=3000", 0.0), ("steps=6", 0.1)):
        assert rows[neyman.EXACT, configuration]["minus exact"] == 0
        assert rows[neyman.GENGS, configuration]["minus exact"] == pytest.approx(gap + extra)
        assert rows[neyman.GENGS, configuration]["sd"] is None  # one seed each, not two
    page = neyman._markdown(first + second)
    assert "(see `settings`) full-batch steps" in page
    assert page.count("| steps=6 |") == 4  # two summary rows, two runs

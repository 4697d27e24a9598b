"""The categorical VAE of the GST paper: command line, resume, the two training loops, the
estimators, the discrete-ELBO scorer and the lead table."""

import itertools
import json
import math
import shlex
import statistics

import pyro
import pytest
import torch
from scipy import stats
from statistical import assert_z_scores_are_standard
from torch import nn

from pyro_relax import GappedSTCategorical, GRMCKCategorical, STCategorical, STGSCategorical
from pyro_relax.__main__ import main
from pyro_relax.experiments import gst_vae
from pyro_relax.experiments.data import batches, load_digits_dataset

pytestmark = pytest.mark.usefixtures("fresh_pyro")

REQUIRED = (
    "dataset",
    "estimator",
    "temperature",
    "seed",
    "epochs",
    "loop",
    "train_neg_elbo",
    "train_neg_elbo_se",
    "test_neg_elbo",
    "test_neg_elbo_se",
    "seconds",
    "seconds_per_epoch",
    "machine",
    "command",
    "smoke",
    "steps_per_epoch",
    "batch_size",
    "lr",
    "latents",
    "categories",
    "hidden",
    "eval_samples",
    "gradient_draws",
    "device",
    "history",
)
HISTORY = ("epoch", "loss", "test_neg_elbo", "grad_variance", "grad_snr", "temperature", "seconds")


def _smoke(results, *extra):
    argv = ["experiment", "gst-vae", "--smoke", "--threads", "1", "--results", str(results)]
    argv += extra
    assert main(argv) == 0
    return argv


def _records(results):
    return json.loads((results / "gst_vae.json").read_text())


def test_smoke_run_writes_records_of_both_loops_the_tables_and_the_plot(tmp_path, capsys):
    estimators = ["STGS", "GST-1.0"]
    argv = _smoke(
        tmp_path, "--estimator", *estimators, "--loop", "pyro", "torch", "--temperature", "0.5"
    )
    records = _records(tmp_path)
    assert sorted((r["estimator"], r["loop"]) for r in records) == sorted(
        itertools.product(estimators, ["pyro", "torch"])
    )
    for record in records:
        assert all(field in record for field in REQUIRED)
        assert record["dataset"] == "digits" and record["temperature"] == 0.5
        assert record["smoke"] is True
        assert record["command"] == shlex.join(["pyro-relax", *argv])
        for key in ("train_neg_elbo", "test_neg_elbo"):
            assert math.isfinite(record[key]) and record[key] > 0
            assert 0 < record[f"{key}_se"] < 1
        assert len(record["history"]) == record["epochs"] == 1
        entry = record["history"][0]
        assert all(field in entry for field in HISTORY)
        assert entry["grad_variance"] > 0 and math.isfinite(entry["loss"])
    table = (tmp_path / "gst_vae.md").read_text()
    for record in records:
        row = f"| digits | {record['estimator']} | 0.5 | {record['loop']} | 1 | 1 | "
        assert row + f"{record['test_neg_elbo']:.2f} |" in table
    # One seed each: the lead table has its rows, without a p-value.
    lead_lines = [line for line in table.splitlines() if line.startswith("| digits | 0.5 |")]
    assert len(lead_lines) == 2 and all(line.endswith("| — | — | — |") for line in lead_lines)
    assert (tmp_path / "gst_vae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    assert "negative ELBO train" in capsys.readouterr().out


class _Interrupt(Exception):
    pass


def _without_timings(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "eval_seconds")} for h in history]


@pytest.mark.parametrize("loop, estimator", [("pyro", "GR-MC10"), ("torch", "GST-pi")])
def test_an_interrupted_run_resumes_to_the_same_record(tmp_path, monkeypatch, loop, estimator):
    options = ["--estimator", estimator, "--loop", loop, "--temperature", "1.0", "--epochs", "2"]
    _smoke(tmp_path / "straight", *options)

    def interrupt(epoch):
        if epoch == 1:
            raise _Interrupt

    monkeypatch.setattr(gst_vae, "_after_epoch", interrupt)
    with pytest.raises(_Interrupt):
        _smoke(tmp_path / "resumed", *options)
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))) == 1
    pyro.set_rng_seed(123)  # whatever happens in between, the resumed run restores its state
    pyro.get_param_store().clear()
    monkeypatch.setattr(gst_vae, "_after_epoch", lambda epoch: None)
    _smoke(tmp_path / "resumed", *options)

    [straight], [resumed] = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    for key in ("train_neg_elbo", "test_neg_elbo", "train_neg_elbo_se", "test_neg_elbo_se"):
        assert resumed[key] == straight[key]
    assert _without_timings(resumed["history"]) == _without_timings(straight["history"])
    assert len(resumed["history"]) == 2
    assert not list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))


def test_a_rerun_with_other_eval_samples_trains_nothing_again(tmp_path, rerun_after_interruption):
    # As in the count VAE: --eval-samples no longer names the checkpoint, so the command rerun
    # with another value scores the finished run again and resumes the interrupted one.
    options = ["--estimator", "STGS", "GST-pi", "--temperature", "1.0", "--epochs", "2"]
    before = []

    def again():
        before.extend(_records(tmp_path))
        _smoke(tmp_path, *options, "--eval-samples", "3")

    epochs = rerun_after_interruption(gst_vae, lambda: _smoke(tmp_path, *options), again)
    assert epochs == [2]
    records = _records(tmp_path)
    evaluated = sorted((r["estimator"], r["eval_samples"]) for r in records)
    assert evaluated == [("GST-pi", 3), ("STGS", 2), ("STGS", 3)]
    [first] = before
    [rescored] = [r for r in records if r["estimator"] == "STGS" and r["eval_samples"] == 3]
    assert _without_timings(rescored["history"]) == _without_timings(first["history"])


def test_a_rerun_after_an_interruption_does_not_train_finished_runs_again(
    tmp_path, rerun_after_interruption
):
    # As in the count VAE: the finished run keeps its record in its checkpoint until the whole
    # command ends, so the command run again trains only what the interruption stopped.
    options = ["--estimator", "STGS", "GST-pi", "--temperature", "1.0", "--epochs", "2"]
    epochs = rerun_after_interruption(gst_vae, lambda: _smoke(tmp_path, *options))
    assert epochs == [2]
    assert sorted(r["estimator"] for r in _records(tmp_path)) == ["GST-pi", "STGS"]


@pytest.mark.parametrize("loop", gst_vae.LOOPS)
def test_measuring_the_gradient_changes_nothing_in_training(tmp_path, loop):
    options = ["--estimator", "STGS", "--loop", loop, "--temperature", "1.0", "--epochs", "2"]
    _smoke(tmp_path / "measured", *options, "--gradient-draws", "4")
    _smoke(tmp_path / "unmeasured", *options, "--gradient-draws", "0")
    [measured], [unmeasured] = _records(tmp_path / "measured"), _records(tmp_path / "unmeasured")
    assert measured["test_neg_elbo"] == unmeasured["test_neg_elbo"]
    assert [h["loss"] for h in measured["history"]] == [h["loss"] for h in unmeasured["history"]]
    assert all("grad_variance" not in h for h in unmeasured["history"])
    assert all(h["grad_variance"] > 0 for h in measured["history"])


def test_a_variance_needs_two_gradient_draws(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "experiment",
                "gst-vae",
                "--smoke",
                "--results",
                str(tmp_path),
                "--gradient-draws",
                "1",
            ]
        )
    assert "--gradient-draws" in capsys.readouterr().err


# --- The two training loops -----------------------------------------------------------------


def _settings(estimator, loop, steps=4):
    return gst_vae._Settings(
        dataset="digits", estimator=estimator, temperature=0.5, loop=loop, seed=3, epochs=1,
        steps_per_epoch=steps, batch_size=100, lr=1e-3, latents=6, categories=10,
        hidden=(32, 16), eval_samples=2, gradient_draws=0, device="cpu",
    )  # fmt: skip


@pytest.mark.parametrize("estimator", gst_vae.ESTIMATORS)
def test_the_pyro_and_torch_loops_take_the_same_steps(estimator):
    # Same seed, same batches, same noise: SVI with TraceMeanField_ELBO (analytic KL) and the
    # plain PyTorch loop compute the same loss, and Adam moves the networks the same way, for
    # every estimator (the MNIST runs of both loops agree to the last digit for two of them).
    data = load_digits_dataset()
    losses, weights = {}, {}
    for loop in gst_vae.LOOPS:
        run = gst_vae._Run(_settings(estimator, loop), data)
        images = batches(data.train_images, 100, generator=run.generator)
        losses[loop] = [float(run.loop.step(x)) for x in itertools.islice(images, 4)]
        weights[loop] = torch.cat([p.detach().flatten() for p in run.encoder.parameters()])
    assert losses["pyro"] == pytest.approx(losses["torch"], rel=1e-5)
    assert len(set(losses["pyro"])) == 4  # the steps did change something
    torch.testing.assert_close(weights["pyro"], weights["torch"], rtol=0, atol=1e-5)


# --- The estimators -------------------------------------------------------------------------

EXPECTED = {
    "STGS": (STGSCategorical, {}),
    "GST-1.0": (GappedSTCategorical, {"gap": 1.0, "detach_perturbations": True}),
    "GST-pi": (GappedSTCategorical, {"gap": "expected", "detach_perturbations": True}),
    "GST-0.8": (GappedSTCategorical, {"gap": 0.8, "detach_perturbations": True}),
    "GST-1.2": (GappedSTCategorical, {"gap": 1.2, "detach_perturbations": True}),
    "GR-MC100": (GRMCKCategorical, {"num_draws": 100}),
    "GR-MC10": (GRMCKCategorical, {"num_draws": 10}),
    "ST": (STCategorical, {}),
    "GST-0.0": (GappedSTCategorical, {"gap": 0.0, "detach_perturbations": True}),
    "NZ-GST-1.0": (GappedSTCategorical, {"gap": 1.0, "detach_perturbations": False}),
}


def test_the_estimators_are_the_papers():
    assert sorted(gst_vae.ESTIMATORS) == sorted(EXPECTED)


@pytest.mark.parametrize("estimator", sorted(EXPECTED))
def test_each_estimator_is_its_class_with_its_options(estimator):
    cls, options = EXPECTED[estimator]
    d = gst_vae.guide_distribution(estimator, torch.tensor(0.5), torch.zeros(3, 10))
    assert type(d) is cls and d.batch_shape == (3,)
    assert {name: getattr(d, name) for name in options} == options
    assert float(d.temperature[0]) == 0.5


def _logits_gradient(estimator, logits):
    logits = logits.clone().requires_grad_()
    pyro.set_rng_seed(7)
    z = gst_vae.guide_distribution(estimator, 0.5, logits).rsample()
    (z * torch.arange(1.0, 5.0)).sum().backward()
    return z, logits.grad


def test_nz_gst_differentiates_through_the_perturbations():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5]] * 64)
    z_gst, grad_gst = _logits_gradient("GST-1.0", logits)
    z_nz, grad_nz = _logits_gradient("NZ-GST-1.0", logits)
    assert torch.equal(z_gst, z_nz)  # the same samples
    assert not torch.allclose(grad_gst, grad_nz)  # different gradients


# --- Scoring --------------------------------------------------------------------------------


def _exact_neg_elbo(encoder, decoder, images, latents, categories):
    """The negative ELBO per image of the discrete model, summed over every configuration."""
    log_prior = -latents * math.log(categories)
    total = 0.0
    for x in images:
        log_q = torch.log_softmax(encoder(x).view(latents, categories), -1)
        for config in itertools.product(range(categories), repeat=latents):
            z = torch.nn.functional.one_hot(torch.tensor(config), categories).float()
            log_q_z = log_q[torch.arange(latents), torch.tensor(config)].sum()
            log_likelihood = torch.distributions.Bernoulli(logits=decoder(z.flatten()))
            log_joint = log_likelihood.log_prob(x).sum() + log_prior
            total -= float(log_q_z.exp() * (log_joint - log_q_z))
    return total / len(images)


@torch.no_grad()
def test_the_scorer_is_the_exact_discrete_elbo_within_its_error():
    latents, categories, pixels = 2, 3, 5
    torch.manual_seed(0)
    encoder = nn.Linear(pixels, latents * categories)
    decoder = nn.Linear(latents * categories, pixels)
    nn.init.normal_(encoder.weight, std=2.0)  # a guide far from uniform: the KL matters
    nn.init.normal_(decoder.weight, std=2.0)
    images = torch.bernoulli(torch.full((7, pixels), 0.5))
    exact = _exact_neg_elbo(encoder, decoder, images, latents, categories)
    scores = {}
    for estimator in ("STGS", "GST-1.0", "GR-MC10"):
        model, guide = gst_vae.model_and_guide(
            estimator, encoder, decoder, torch.tensor(0.5), latents, categories
        )
        # Chunks of three images: the chunks' values and variances add.
        scores[estimator] = gst_vae.discrete_neg_elbo(
            model, guide, images, num_samples=4000, seed=1, chunk_size=3
        )
    value, error = scores["STGS"]
    assert 0 < error < 0.05
    # The error in standard errors, standard normal at LEVEL (statistical.py).
    assert_z_scores_are_standard((value - exact) / error, "the scored negative ELBO")
    # Every estimator's guide is the same discrete distribution when scored.
    assert scores["GST-1.0"] == scores["STGS"] == scores["GR-MC10"]


# --- The lead table -------------------------------------------------------------------------


def _record(estimator, seed, test, temperature=1.0, lr=1e-3):
    settings = _settings(estimator, "pyro")
    return {
        **{name: getattr(settings, name) for name in gst_vae._Settings.__dataclass_fields__},
        "dataset": "MNIST",
        "temperature": temperature,
        "lr": lr,
        "seed": seed,
        "hidden": list(settings.hidden),
        "test_neg_elbo": test,
        "train_neg_elbo": test - 1.0,
        "seconds_per_epoch": 5.0,
        "paper_test_neg_elbo": gst_vae.PAPER_TEST_NEG_ELBO.get((estimator, temperature)),
    }


def test_the_lead_table_gives_welchs_p_value():
    stgs, gst = [121.0, 123.5, 120.2, 122.8], [114.1, 113.0, 115.9]
    records = [_record("STGS", seed, v) for seed, v in enumerate(stgs)]
    records += [_record("GST-1.0", seed, v) for seed, v in enumerate(gst)]
    # Another temperature with one seed each, and another learning rate: rows of their own.
    records += [_record("STGS", 0, 119.0, 0.5), _record("GST-1.0", 0, 108.0, 0.5)]
    records += [_record("STGS", 0, 130.0, lr=0.01)]
    rows = {row["temperature"]: row for row in gst_vae.lead_rows(records)}
    assert len(gst_vae.lead_rows(records)) == 2
    row = rows[1.0]
    expected = stats.ttest_ind(stgs, gst, equal_var=False).pvalue
    assert row["p_value"] == pytest.approx(expected, rel=1e-12)
    assert row["lead"] == pytest.approx(statistics.mean(stgs) - statistics.mean(gst))
    se = math.sqrt(statistics.variance(stgs) / 4 + statistics.variance(gst) / 3)
    assert row["lead_se"] == pytest.approx(se)
    assert row["paper_lead"] == pytest.approx(122.96 - 113.63)
    assert rows[0.5]["p_value"] is None and rows[0.5]["lead"] == pytest.approx(11.0)
    table = gst_vae._markdown(records)
    assert f"| {expected:.3g} |" in table
    summary = f"{statistics.mean(stgs):.2f} ± {statistics.stdev(stgs):.2f}"
    assert f"| MNIST | STGS | 1.0 | pyro | 1 | 4 | {summary} |" in table

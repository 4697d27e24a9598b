"""The discrete VAE of the IGR paper: command line, resume, the importance-sampled scorer
against an exact sum, the estimators and temperatures, the report's numbers."""

import itertools
import json
import math
import shlex
import types

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from statistical import assert_z_scores_are_standard, z_scores
from torch import nn

import pyro_relax as pr
from pyro_relax.__main__ import build_parser, main
from pyro_relax.experiments import igr_vae, image_vae
from pyro_relax.experiments.igr_vae import (
    ESTIMATORS,
    PAPER_TEST_LOG_LIKELIHOOD,
    PlanarFlows,
    build_estimator,
    evaluate,
)

pytestmark = pytest.mark.usefixtures("fresh_pyro")

REQUIRED = (
    "dataset",
    "estimator",
    "temperature_pair",
    "temperature",
    "seed",
    "epochs",
    "test_log_likelihood",
    "test_log_likelihood_se",
    "num_particles",
    "test_neg_elbo",
    "test_neg_elbo_se",
    "seconds",
    "seconds_per_epoch",
    "machine",
    "command",
    "smoke",
    "history",
    # every setting
    "steps_per_epoch",
    "batch_size",
    "lr",
    "latents",
    "categories",
    "planar_layers",
    "architecture",
    "binarization",
    "eval_samples",
    "eval_images",
    "device",
)


def _smoke(results, *extra):
    argv = ["experiment", "igr-vae", "--smoke", "--threads", "1", "--results", str(results)]
    argv += list(extra)
    assert main(argv) == 0
    return argv


def test_smoke_run_writes_a_complete_record_for_every_estimator(tmp_path, capsys):
    argv = _smoke(tmp_path)
    records = json.loads((tmp_path / "igr_vae.json").read_text())
    assert sorted(r["estimator"] for r in records) == sorted(ESTIMATORS)
    for record in records:
        missing = [field for field in REQUIRED if field not in record]
        assert not missing, missing
        assert record["dataset"] == "digits" and record["smoke"] is True
        assert record["command"] == shlex.join(["pyro-relax", *argv])
        assert record["temperature"] == (0.67 if record["estimator"] == "GS" else 0.5)
        assert len(record["history"]) == record["epochs"] == 1
        ll, neg_elbo = record["test_log_likelihood"], record["test_neg_elbo"]
        assert math.isfinite(ll) and ll < 0 and neg_elbo > 0
        # The importance-weighted bound is at least the ELBO, up to the estimates' noise.
        noise = 4 * (record["test_log_likelihood_se"] + record["test_neg_elbo_se"])
        assert ll >= -neg_elbo - noise
        assert record["num_particles"] == 20 and record["eval_images"] == 50
    table, gaps = (tmp_path / "igr_vae.md").read_text().split("## IGR-I minus GS")
    assert table.count("| digits | linear | 0.5 |") == len(ESTIMATORS)
    [igr] = [r for r in records if r["estimator"] == "IGR-I"]
    [gs] = [r for r in records if r["estimator"] == "GS"]
    difference = igr["test_log_likelihood"] - gs["test_log_likelihood"]
    assert gaps.count("| digits | linear | 0.5 |") == 1 and f"| {difference:.2f} |" in gaps
    assert (tmp_path / "igr_vae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each run keeps its trained model (one checkpoint per estimator).
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == len(ESTIMATORS)
    assert "test log-likelihood" in capsys.readouterr().out


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("estimator", ["IGR-SB", "IGR-Planar"])
def test_an_interrupted_run_resumes_to_the_same_record(tmp_path, monkeypatch, estimator):
    options = ["--estimator", estimator, "--epochs", "2"]
    _smoke(tmp_path / "straight", *options)

    def interrupt(epoch):
        if epoch == 1:
            raise _Interrupt

    monkeypatch.setattr(igr_vae, "_after_epoch", interrupt)
    with pytest.raises(_Interrupt):
        _smoke(tmp_path / "resumed", *options)
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))) == 1
    pyro.set_rng_seed(123)  # whatever happens in between, the resumed run restores its state
    monkeypatch.setattr(igr_vae, "_after_epoch", lambda epoch: None)
    _smoke(tmp_path / "resumed", *options)

    straight, resumed = (
        json.loads((tmp_path / name / "igr_vae.json").read_text())[0]
        for name in ("straight", "resumed")
    )
    for key in ("test_log_likelihood", "test_neg_elbo", "test_log_likelihood_se"):
        assert resumed[key] == straight[key]
    assert len(resumed["history"]) == 2
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))) == 1


def test_a_trained_model_is_scored_again_without_training(tmp_path, monkeypatch, capsys):
    options = ["--estimator", "IGR-I", "--epochs", "2"]
    _smoke(tmp_path, *options)
    [first] = json.loads((tmp_path / "igr_vae.json").read_text())

    def no_training(epoch):
        raise AssertionError(f"trained epoch {epoch} again")

    monkeypatch.setattr(igr_vae, "_after_epoch", no_training)
    capsys.readouterr()
    _smoke(tmp_path, *options)  # the same settings: the same record, not even scored again
    assert json.loads((tmp_path / "igr_vae.json").read_text()) == [first]

    # Other evaluation settings score the kept model: a second record, the same training.
    _smoke(tmp_path, *options, "--num-particles", "40", "--eval-images", "30")
    assert "scoring the model trained in" in capsys.readouterr().err
    records = json.loads((tmp_path / "igr_vae.json").read_text())
    [again] = [r for r in records if r["num_particles"] == 40]
    assert len(records) == 2 and again["eval_images"] == 30
    assert again["history"] == first["history"] and again["seconds"] == first["seconds"]
    assert again["test_log_likelihood"] != first["test_log_likelihood"]

    # The rescored model is the trained one: scoring it with the first settings directly, from
    # the parameters in the checkpoint, gives the first record's numbers.
    [path] = (tmp_path / "checkpoints").glob("*.pt")
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 2 and state["record"]["num_particles"] == 40
    argv = ["experiment", "igr-vae", "--smoke", "--threads", "1", *options]
    args = build_parser(argv).parse_args(argv)
    data = image_vae.dataset(args)
    settings = igr_vae._settings(args, data, "IGR-I", "0.5")
    torch.manual_seed(0)
    encoder, decoder, _ = igr_vae._networks(settings, data.num_pixels, "cpu")
    temperature = torch.tensor(settings.temperature)
    estimator = build_estimator("IGR-I", encoder, decoder, temperature, settings.latents)
    igr_vae.image_vae.restore_params(state["params"], estimator.modules)
    _, test_images = igr_vae.image_vae.evaluation_images(data, settings.binarization, "cpu")
    ll, _, reference = evaluate(
        estimator,
        test_images[: first["eval_images"]],
        num_particles=first["num_particles"],
        eval_samples=first["eval_samples"],
        seed=first["seed"],
    )
    assert ll.value == pytest.approx(first["test_log_likelihood"], rel=1e-6)
    assert reference == pytest.approx(first["test_reference_score"], rel=1e-6)

    # A kept record without a score that this version computes is scored again, not trained.
    del state["record"]["test_reference_score"]
    torch.save(state, path)
    capsys.readouterr()
    _smoke(tmp_path, *options, "--num-particles", "40", "--eval-images", "30")
    assert "scoring the model trained in" in capsys.readouterr().err
    assert "test_reference_score" in torch.load(path, weights_only=False)["record"]


# --- The importance-sampled log-likelihood against the exact sum -------------------------------

LATENTS, CATEGORIES, PIXELS = 2, 3, 5


def _tiny(estimator):
    """A linear VAE with 2 latents of 3 categories over 5 pixels, random weights."""
    torch.manual_seed(1)
    width = LATENTS * (CATEGORIES if estimator == "GS" else 2 * (CATEGORIES - 1))
    encoder, decoder = nn.Linear(PIXELS, width), nn.Linear(LATENTS * CATEGORIES, PIXELS)
    with torch.no_grad():
        decoder.weight.mul_(6.0)  # a posterior far from uniform, and from the guide
    flows = PlanarFlows(2, LATENTS, CATEGORIES - 1)
    images = torch.tensor(
        [[1, 0, 1, 1, 0], [0, 0, 0, 1, 1], [1, 1, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.float
    )
    return build_estimator(estimator, encoder, decoder, 0.5, LATENTS, flows), decoder, images


def _exact_log_evidence(decoder, images):
    """log p(x) per image: the sum over the 9 configurations, each of prior mass 1/9."""
    eye = torch.eye(CATEGORIES)
    terms = []
    for config in itertools.product(range(CATEGORIES), repeat=LATENTS):
        z = torch.cat([eye[k] for k in config])
        with torch.no_grad():
            log_lik = dist.Bernoulli(logits=decoder(z)).log_prob(images).sum(-1)
        terms.append(log_lik - LATENTS * math.log(CATEGORIES))
    return torch.stack(terms).logsumexp(0).double()


@pytest.mark.parametrize("estimator", ["IGR-I", "IGR-Planar", "GS"])
def test_the_log_likelihood_converges_to_the_exact_sum(estimator):
    tiny, decoder, images = _tiny(estimator)
    exact = float(_exact_log_evidence(decoder, images).mean())
    fewer, neg_elbo, _ = evaluate(tiny, images, num_particles=1000, eval_samples=4000, seed=0)
    more, _, _ = evaluate(tiny, images, num_particles=16_000, eval_samples=2, seed=1)
    # The guide is far from the posterior: the ELBO is well below log p(x) ...
    assert exact + neg_elbo.value > 0.5
    # ... the bound is above the ELBO and reaches log p(x) within its standard error (its
    # distance from log p(x), less the allowance of 2e-3 it always had, in standard errors,
    # standard normal at LEVEL: statistical.py), which shrinks as 1 / sqrt(particles) (1/4
    # from 1000 to 16000 particles).
    for bound in (fewer, more):
        assert bound.value > -neg_elbo.value + 0.5
        z = z_scores(bound.value - exact, bound.standard_error, 2e-3)
        assert_z_scores_are_standard(z, f"the bound of {bound.num_samples} particles")
    assert more.standard_error < 0.6 * fewer.standard_error and more.standard_error < 0.05


def test_a_stick_breaking_guide_gives_a_bound_below_the_exact_sum():
    # Its discrete limit never selects the last category, so the bound cannot reach log p(x)
    # when the posterior gives that category mass; it stays a bound, above the ELBO.
    tiny, decoder, images = _tiny("IGR-SB")
    exact = float(_exact_log_evidence(decoder, images).mean())
    bound, neg_elbo, _ = evaluate(tiny, images, num_particles=4000, eval_samples=1000, seed=0)
    assert bound.value < exact - 0.3 and bound.standard_error < 0.05
    assert bound.value > -neg_elbo.value


@pytest.mark.parametrize("estimator", ["IGR-I", "GS"])
def test_the_reference_score_is_its_formula_and_no_bound(estimator):
    # The paper's code's score, log mean_i p(x | z_i) - KL(q || uniform), against its limit by
    # enumeration of the 9 configurations: log E_q p(x | z) - KL. With m = 1 its mean is the
    # discrete ELBO; for large m it tends to that limit, which is not log p(x) (the next test).
    tiny, decoder, images = _tiny(estimator)
    with torch.no_grad():
        _, q = igr_vae._discrete_guide(tiny, images)
        eye = torch.eye(CATEGORIES)
        mean_likelihood, elbo_likelihood = 0.0, 0.0
        for config in itertools.product(range(CATEGORIES), repeat=LATENTS):
            z = torch.stack([eye[k] for k in config])  # latents x categories
            log_q = (q.logits * z).sum((-2, -1))  # per image
            log_lik = dist.Bernoulli(logits=decoder(z.reshape(-1))).log_prob(images).sum(-1)
            mean_likelihood = mean_likelihood + (log_q + log_lik).exp()
            elbo_likelihood = elbo_likelihood + log_q.exp() * log_lik
        kl = (q.probs * q.logits).sum((-2, -1)) + LATENTS * math.log(CATEGORIES)
        limit = (mean_likelihood.log() - kl).double()
        elbo = (elbo_likelihood - kl).double()
        torch.manual_seed(0)
        large = igr_vae._reference_score(decoder, q, images, 40_000).double()
        singles = torch.stack(
            [igr_vae._reference_score(decoder, q, images, 1) for _ in range(20_000)]
        ).double()
    # 40,000 draws: within 0.02 nats of the limit (the likelihoods here vary by a factor of at
    # most e^6 across configurations; the log-mean's standard error is below 0.01).
    torch.testing.assert_close(large, limit, atol=0.02, rtol=0)
    # One draw: unbiased for the discrete ELBO (the errors of the means of 20,000 in standard
    # errors, one per image, standard normal at LEVEL: statistical.py).
    se = singles.std(0) / math.sqrt(len(singles))
    assert_z_scores_are_standard((singles.mean(0) - elbo) / se, "the mean one-draw scores")


def test_the_reference_score_can_exceed_the_log_evidence():
    # One latent of 3 categories, one pixel, a likelihood proportional to the guide:
    # p(x | k) = q_k. Then log p(x) = log(sum_k q_k / 3) = -log 3, while the score tends to
    # log sum_k q_k^2 + H(q) - log 3, above it whenever q is not uniform (Renyi-2 entropy
    # -log sum q^2 is at most Shannon's H): 0.186 nats for q = (0.7, 0.2, 0.1).
    probs = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = dist.OneHotCategorical(probs=probs.expand(1, 1, 3))  # 1 image x 1 latent
    decoder = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        decoder.weight.copy_(torch.logit(probs)[None])  # sigmoid(logit q_k) = q_k
    torch.manual_seed(0)
    with torch.no_grad():
        score = igr_vae._reference_score(decoder, q, torch.ones(1, 1, dtype=torch.float64), 40_000)
    entropy = -(probs * probs.log()).sum()
    limit = (probs**2).sum().log() + entropy - math.log(3)
    assert float(limit + math.log(3)) == pytest.approx(0.1856, abs=1e-4)
    assert float(score) == pytest.approx(float(limit), abs=0.01)
    assert float(score) > -math.log(3) + 0.15


# --- Estimators and temperatures --------------------------------------------------------------


def _fake_data(num_train=60_000, num_test=10_000):
    return types.SimpleNamespace(
        name="MNIST", train_images=torch.empty(num_train, 0), test_images=torch.empty(num_test, 0)
    )


@pytest.mark.parametrize(
    "pair, estimator, temperature",
    [
        ("0.5", "IGR-I", 0.5),
        ("0.5", "IGR-SB", 0.5),
        ("0.5", "IGR-Planar", 0.5),
        ("0.5", "GS", 0.67),
        ("0.1", "IGR-I", 0.1),
        ("0.1", "IGR-Planar", 0.1),
        ("0.1", "GS", 0.25),
    ],
)
def test_the_command_line_gives_each_estimator_its_temperature(pair, estimator, temperature):
    argv = ["experiment", "igr-vae", "--temperature-pair", pair, "--estimator", estimator]
    args = build_parser(argv).parse_args(argv)
    settings = igr_vae._settings(args, _fake_data(), estimator, pair)
    assert settings.temperature == temperature
    # The paper's setup by default: batch 64, 100 epochs of all batches, 20 x 10, m = 1000.
    assert (settings.batch_size, settings.epochs, settings.steps_per_epoch) == (64, 100, 937)
    assert (settings.latents, settings.categories, settings.num_particles) == (20, 10, 1000)
    assert settings.binarization == "fixed" and settings.eval_images == 10_000
    assert settings.architecture == "linear"
    assert settings.planar_layers == (2 if estimator == "IGR-Planar" else None)


@pytest.mark.parametrize(
    "estimator, family, prior_family, loss",
    [
        ("IGR-I", pr.IGR, pr.IGR, TraceMeanField_ELBO),
        ("IGR-SB", pr.IGRStickBreaking, pr.IGRStickBreaking, TraceMeanField_ELBO),
        ("IGR-Planar", pr.IGRPlanar, pr.IGR, TraceMeanField_ELBO),
        ("GS", pr.STGSCategorical, pr.STGSCategorical, Trace_ELBO),
    ],
)
def test_each_estimator_builds_its_relaxation(estimator, family, prior_family, loss):
    latents, k = 20, 10
    width = latents * (k if estimator == "GS" else 2 * (k - 1))
    temperature = torch.tensor(0.3)
    flows = PlanarFlows(2, latents, k - 1)
    e = build_estimator(
        estimator, nn.Linear(784, width), nn.Linear(latents * k, 784), temperature, latents, flows
    )
    guide = e.guide_dist(torch.rand(3, 784))
    assert type(guide) is family and type(e.prior) is prior_family
    assert isinstance(e.loss, loss)
    assert guide.batch_shape == (3, latents) and guide.event_shape == (k,)
    assert torch.equal(guide.temperature, torch.full((3, latents), 0.3))
    z = guide.rsample()
    assert bool(((z > 0) & (z < 1)).any())  # a relaxed sample, not a one-hot vector
    if estimator == "IGR-Planar":
        assert len(guide.flows) == 2
    # The prior stands for the uniform categorical (stick-breaking: the first k - 1).
    probs = e.prior.discrete().probs
    if estimator == "IGR-SB":
        assert float(probs[-1]) < 1e-6  # no draw: probability 0, up to the logits' rounding
        assert torch.allclose(probs[:-1], torch.full((k - 1,), 1 / (k - 1)), atol=0.015)
    else:
        assert torch.allclose(probs, torch.full((k,), 1 / k), atol=1e-6)


@pytest.mark.parametrize("estimator", ["IGR-I", "IGR-SB"])
def test_the_training_loss_uses_the_gaussian_kl_in_closed_form(estimator):
    # With a decoder that ignores z, the likelihood is 5 log(1/2) whatever the sample, so the
    # loss is the KL alone: deterministic and equal to the Gaussian KL by hand if the registered
    # closed form fires inside the plate, random if TraceMeanField_ELBO fell back to Monte Carlo.
    tiny, decoder, images = _tiny(estimator)
    with torch.no_grad():
        decoder.weight.zero_()
        decoder.bias.zero_()
    losses = [tiny.loss.loss(tiny.model, tiny.guide, images) for _ in range(3)]
    with torch.no_grad():
        q = tiny.guide_dist(images)
    mu, sigma, mu0, sigma0 = q.loc, q.scale, tiny.prior.loc, tiny.prior.scale
    kl = torch.log(sigma0 / sigma) + (sigma**2 + (mu - mu0) ** 2) / (2 * sigma0**2) - 0.5
    expected = float(kl.sum()) + len(images) * PIXELS * math.log(2)
    assert losses == pytest.approx([expected] * 3, rel=1e-5)


def test_the_planar_kl_is_a_monte_carlo_estimate():
    tiny, decoder, images = _tiny("IGR-Planar")
    with torch.no_grad():
        decoder.weight.zero_()
    losses = {tiny.loss.loss(tiny.model, tiny.guide, images) for _ in range(3)}
    assert len(losses) == 3


# --- Reports ----------------------------------------------------------------------------------


def _record(estimator, seed, ll, neg_elbo, **overrides):
    record = {
        "dataset": "MNIST",
        "estimator": estimator,
        "temperature_pair": "0.5",
        "temperature": 0.67 if estimator == "GS" else 0.5,
        "seed": seed,
        "epochs": 100,
        "steps_per_epoch": 937,
        "batch_size": 64,
        "lr": 0.001,
        "latents": 20,
        "categories": 10,
        "planar_layers": None,
        "architecture": "linear",
        "binarization": "fixed",
        "num_particles": 1000,
        "eval_samples": 100,
        "eval_images": 10_000,
        "device": "cpu",
        "test_log_likelihood": ll,
        "test_log_likelihood_se": 0.01,
        "test_neg_elbo": neg_elbo,
        "test_neg_elbo_se": 0.02,
        "seconds_per_epoch": 20.0,
        "smoke": False,
        "history": [{"epoch": 1, "loss": 120.0, "test_loss": 118.0, "seconds": 20.0}],
    }
    record.update(overrides)
    return record


def test_the_table_reports_means_and_sample_sds_over_seeds(tmp_path):
    igr = [-97.13, -95.42, -96.87]
    gs = [-104.5, -106.25]
    records = [
        *(_record("IGR-I", s, v, -v + 3.0 + s) for s, v in enumerate(igr)),
        *(_record("GS", s, v, -v + 2.0) for s, v in enumerate(gs)),
        _record("IGR-SB", 0, -99.5, 103.0),
        # Another number of epochs is another configuration: never pooled with the others.
        _record("IGR-I", 0, -120.0, 125.0, epochs=10),
        # So is another architecture.
        _record("IGR-I", 0, -90.0, 95.0, architecture="nonlinear"),
    ]
    igr_vae.write_reports(tmp_path, records)
    table = (tmp_path / "igr_vae.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| MNIST |")]

    def row_of(estimator, epochs, architecture="linear"):
        [row] = [
            r
            for r in rows
            if f"| {estimator} |" in r and f"| {epochs} |" in r and f"| {architecture} |" in r
        ]
        return r_cells(row)

    def r_cells(row):
        return [cell.strip() for cell in row.strip("|").split("|")]

    igr_row = row_of("IGR-I", 100)
    mean, sd = np.mean(igr), np.std(igr, ddof=1)
    assert f"{mean:.2f} ± {sd:.2f}" in igr_row
    neg = [-v + 3.0 + s for s, v in enumerate(igr)]
    assert f"{np.mean(neg):.2f} ± {np.std(neg, ddof=1):.2f}" in igr_row
    assert "3" in igr_row and f"{PAPER_TEST_LOG_LIKELIHOOD['MNIST', 'IGR-I']:.2f}" in igr_row
    gs_row = row_of("GS", 100)
    assert f"{np.mean(gs):.2f} ± {np.std(gs, ddof=1):.2f}" in gs_row and "0.67" in gs_row
    sb_row = row_of("IGR-SB", 100)
    assert "-99.50" in sb_row and not any("±" in cell for cell in sb_row)
    assert "-120.00" in row_of("IGR-I", 10)
    assert "-90.00" in row_of("IGR-I", 100, "nonlinear")
    # The difference IGR-I minus GS, next to the paper's (-94.65 - -106.17 = 11.52).
    gaps = table.split("## IGR-I minus GS")[1]
    [gap] = [
        line for line in gaps.splitlines() if line.startswith("| MNIST | linear | 0.5 | 100 |")
    ]
    assert f"| {np.mean(igr) - np.mean(gs):.2f} | 11.52 |" in gap
    assert "Gaussian" in table  # the note on the paper's Fashion-MNIST decoder
    assert (tmp_path / "igr_vae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_smoke_run_of_the_nonlinear_architecture(tmp_path):
    _smoke(tmp_path, "--architecture", "nonlinear", "--estimator", "IGR-I", "IGR-Planar", "GS")
    records = json.loads((tmp_path / "igr_vae.json").read_text())
    assert sorted(r["estimator"] for r in records) == ["GS", "IGR-I", "IGR-Planar"]
    for record in records:
        assert record["architecture"] == "nonlinear"
        assert math.isfinite(record["test_log_likelihood"])
    assert "| digits | nonlinear | 0.5 |" in (tmp_path / "igr_vae.md").read_text()


@pytest.mark.parametrize(
    "architecture, encoder_sizes, decoder_sizes",
    [
        ("linear", [(784, 360)], [(200, 784)]),
        ("nonlinear", [(784, 512), (512, 256), (256, 360)], [(200, 256), (256, 512), (512, 784)]),
    ],
)
def test_the_architecture_option_builds_the_networks(architecture, encoder_sizes, decoder_sizes):
    argv = ["experiment", "igr-vae", "--estimator", "IGR-I", "--architecture", architecture]
    args = build_parser(argv).parse_args(argv)
    settings = igr_vae._settings(args, _fake_data(), "IGR-I", "0.5")
    assert settings.architecture == architecture
    encoder, decoder, _ = igr_vae._networks(settings, 784, "cpu")

    def linear_sizes(net):
        return [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]

    assert linear_sizes(encoder) == encoder_sizes and linear_sizes(decoder) == decoder_sizes
    relus = sum(isinstance(m, nn.ReLU) for m in [*encoder.modules(), *decoder.modules()])
    assert relus == 2 * (len(encoder_sizes) - 1)

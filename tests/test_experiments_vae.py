"""The count-latent VAE experiment: command line, resume, the discrete-ELBO scorer, the priors."""

import dataclasses
import itertools
import json
import math
import shlex
import types
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from statistical import assert_z_scores_are_standard
from torch.distributions import kl_divergence

from pyro_relax.__main__ import build_parser, main
from pyro_relax.distributions import TruncatedGenGS
from pyro_relax.experiments import common, image_vae, vae
from pyro_relax.experiments.data import IDX_FILES, write_idx
from pyro_relax.experiments.vae import (
    ESTIMATORS,
    PRIORS,
    AnalyticKLReinforce,
    build_estimator,
    discrete_neg_elbo,
    scoring_model,
)

REQUIRED = (
    "dataset",
    "prior",
    "estimator",
    "train_neg_elbo",
    "test_neg_elbo",
    "epochs",
    "seed",
    "seconds",
    "machine",
    "command",
    "history",
    "train_neg_elbo_se",
    "test_neg_elbo_se",
    "final_relaxed_objective",
    "best_relaxed_objective",
    "kl_to_prior",
    "kl_to_truncated_prior",
)


def _smoke(results, *extra):
    argv = ["experiment", "vae", "--smoke", "--results", str(results), *extra]
    assert main(argv) == 0
    return argv


def test_smoke_run_writes_the_records_table_and_plot(tmp_path, capsys):
    argv = _smoke(tmp_path, "--prior", "Pois(2)", "--estimator", "all")
    records = json.loads((tmp_path / "gengs_vae.json").read_text())
    assert sorted(r["estimator"] for r in records) == sorted(ESTIMATORS)
    for record in records:
        assert all(field in record for field in REQUIRED)
        assert record["dataset"] == "digits" and record["prior"] == "Pois(2)"
        assert record["command"] == shlex.join(["pyro-relax", *argv])
        assert math.isfinite(record["train_neg_elbo"]) and record["train_neg_elbo"] > 0
        assert len(record["history"]) == record["epochs"] == 1
        losses = [h["loss"] for h in record["history"]]
        assert record["final_relaxed_objective"] == losses[-1]
        assert record["best_relaxed_objective"] == min(losses)
        assert 0 < record["test_neg_elbo_se"] < 1
        # Only the GenGS estimators train against a truncated prior.
        gengs = record["estimator"].startswith("GenGS")
        assert (record["kl_to_truncated_prior"] is not None) == gengs
        assert record["kl_to_prior"] > 0
    table = (tmp_path / "gengs_vae.md").read_text()
    assert table.count("| digits | Pois(2) |") == len(ESTIMATORS)
    # Each row shows the last epoch's training objective next to the discrete score.
    header = next(line for line in table.splitlines() if line.startswith("| dataset"))
    assert "| final_relaxed_objective |" in header and "| kl_to_truncated_prior |" in header
    for record in records:
        loss = f"{record['history'][-1]['loss']:.2f}"
        assert f"| {record['estimator']} |" in table and f"| {loss} |" in table
    assert (tmp_path / "gengs_vae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    assert "negative ELBO train" in capsys.readouterr().out


def test_runs_of_other_priors_are_merged(tmp_path):
    _smoke(tmp_path, "--prior", "Geom(.5)", "--estimator", "GenGS")
    _smoke(tmp_path, "--prior", "NB(3,.5)", "--estimator", "GenGS-IMP", "REINFORCE")
    _smoke(tmp_path, "--prior", "Geom(.5)", "--estimator", "GenGS")  # a rerun replaces its row
    records = json.loads((tmp_path / "gengs_vae.json").read_text())
    assert sorted((r["prior"], r["estimator"]) for r in records) == [
        ("Geom(.5)", "GenGS"),
        ("NB(3,.5)", "GenGS-IMP"),
        ("NB(3,.5)", "REINFORCE"),
    ]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("estimator", ["GenGS", "REINFORCE"])
def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch, estimator):
    options = ["--prior", "Pois(2)", "--estimator", estimator, "--epochs", "3"]
    _smoke(tmp_path / "straight", *options)

    def interrupt(epoch):
        if epoch == 2:
            raise _Interrupt

    monkeypatch.setattr(vae, "_after_epoch", interrupt)
    with pytest.raises(_Interrupt):
        _smoke(tmp_path / "resumed", *options)
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))) == 1
    pyro.set_rng_seed(123)  # whatever happens in between, the resumed run restores its state
    monkeypatch.setattr(vae, "_after_epoch", lambda epoch: None)
    _smoke(tmp_path / "resumed", *options)

    straight, resumed = (
        json.loads((tmp_path / name / "gengs_vae.json").read_text())[0]
        for name in ("straight", "resumed")
    )
    for key in ("train_neg_elbo", "test_neg_elbo"):
        assert resumed[key] == straight[key]
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    assert not list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))


def _checkpoints(results):
    return sorted((results / "checkpoints").glob("*.pt"))


def test_a_rerun_after_an_interruption_does_not_train_finished_runs_again(
    tmp_path, rerun_after_interruption
):
    # The finished run's checkpoint was removed as soon as its record was merged, so running
    # the interrupted command again trained it from scratch (hours for MNIST runs). It now
    # keeps its record until the whole command ends.
    options = ["--prior", "Pois(2)", "--estimator", "GenGS", "REINFORCE", "--epochs", "2"]
    epochs = rerun_after_interruption(vae, lambda: _smoke(tmp_path, *options))
    assert epochs == [2]  # only the interrupted run's last epoch trains
    records = json.loads((tmp_path / "gengs_vae.json").read_text())
    assert sorted(r["estimator"] for r in records) == ["GenGS", "REINFORCE"]


def test_a_rerun_with_other_eval_samples_trains_nothing_again(
    tmp_path, rerun_after_interruption, capsys
):
    # --eval-samples changes only the final score, but it named the checkpoints: the command
    # rerun with another value after an interruption trained both runs again from scratch and
    # left the interrupted one's checkpoint behind. Now the finished run is scored again and
    # the interrupted one resumes.
    options = ["--prior", "Pois(2)", "--estimator", "GenGS", "REINFORCE", "--epochs", "2"]
    before = []

    def again():
        before.extend(json.loads((tmp_path / "gengs_vae.json").read_text()))
        capsys.readouterr()
        _smoke(tmp_path, *options, "--eval-samples", "3")

    epochs = rerun_after_interruption(vae, lambda: _smoke(tmp_path, *options), again)
    assert epochs == [2]
    error = capsys.readouterr().err
    assert "scoring the model trained in" in error and "resuming" in error
    records = json.loads((tmp_path / "gengs_vae.json").read_text())
    assert sorted((r["estimator"], r["eval_samples"]) for r in records) == [
        ("GenGS", 2), ("GenGS", 3), ("REINFORCE", 3)
    ]  # fmt: skip
    [first] = before
    [rescored] = [r for r in records if r["estimator"] == "GenGS" and r["eval_samples"] == 3]
    assert rescored["history"] == first["history"] and rescored["seconds"] == first["seconds"]


def test_a_batch_larger_than_the_training_set_is_one_clear_line(tmp_path, capsys):
    # Was a ZeroDivisionError traceback (no full batch: zero steps per epoch).
    argv = ["experiment", "vae", "--smoke", "--results", str(tmp_path), "--batch-size", "2000"]
    assert main([*argv, "--prior", "Pois(2)", "--estimator", "GenGS"]) == 1
    assert "--batch-size 2000 is larger than the 1500 training images" in capsys.readouterr().err


def test_reinforce_kl_is_left_out_for_the_negative_binomials_under_prior_all():
    argv = ["experiment", "vae", "--prior", "all", "--estimator", "REINFORCE-KL"]
    pairs = vae._pairs(build_parser(argv).parse_args(argv))
    assert pairs and all(prior.startswith(("Pois", "Geom")) for prior, _ in pairs)


def test_runs_of_other_settings_keep_their_own_checkpoints_and_records(tmp_path, monkeypatch):
    # A run interrupted with one learning rate, a run with another (as if concurrent), then
    # the first resumed: neither touches the other's checkpoint, and both records are kept.
    options = ["--prior", "Pois(2)", "--estimator", "GenGS-IMP", "--epochs", "2"]

    def interrupt(epoch):
        raise _Interrupt

    monkeypatch.setattr(vae, "_after_epoch", interrupt)
    with pytest.raises(_Interrupt):
        _smoke(tmp_path, *options)
    [interrupted] = _checkpoints(tmp_path)
    saved = interrupted.read_bytes()
    monkeypatch.setattr(vae, "_after_epoch", lambda epoch: None)
    _smoke(tmp_path, *options, "--lr", "0.002")
    assert _checkpoints(tmp_path) == [interrupted] and interrupted.read_bytes() == saved
    _smoke(tmp_path, *options)
    assert not _checkpoints(tmp_path)
    records = json.loads((tmp_path / "gengs_vae.json").read_text())
    assert sorted(r["lr"] for r in records) == [0.001, 0.002]


def test_a_rerun_with_other_settings_keeps_the_earlier_record(tmp_path):
    options = ["--prior", "Pois(2)", "--estimator", "REINFORCE"]
    _smoke(tmp_path, *options)
    _smoke(tmp_path, *options, "--epochs", "2")
    _smoke(tmp_path, *options, "--latents", "4")
    _smoke(tmp_path, *options, "--epochs", "2")  # the same settings: replaces its record
    records = json.loads((tmp_path / "gengs_vae.json").read_text())
    assert sorted((r["epochs"], r["latents"]) for r in records) == [(1, 4), (1, 8), (2, 8)]


def _fake_mnist(num_train=60_000):
    """What the settings read of MNIST: its name and how many training images it has."""
    return types.SimpleNamespace(name="MNIST", train_images=torch.empty(num_train, 0))


COMMITTED = Path(__file__).resolve().parents[1] / "results"


@pytest.mark.parametrize("file", ["gengs_vae.json", "vae_latents_128/gengs_vae.json"])
def test_committed_records_are_matched_by_the_settings_of_their_commands(file):
    # The committed records predate the settings in the key (the device) and each must be the
    # record its own command would replace, and no other.
    records = json.loads((COMMITTED / file).read_text())
    keys = set()
    for record in records:
        argv = shlex.split(record["command"])[1:]
        args = build_parser(argv).parse_args(argv)
        settings = vae._settings(args, _fake_mnist(), record["prior"], record["estimator"])
        stored = vae._record_settings(record)
        assert common.settings_digest(stored) == common.settings_digest(
            dataclasses.asdict(settings)
        )
        keys.add(common.settings_digest(stored))
    assert len(keys) == len(records)


def test_committed_records_are_replaced_only_by_their_own_rerun(tmp_path):
    path = tmp_path / "gengs_vae.json"
    committed = json.loads((COMMITTED / "gengs_vae.json").read_text())
    path.write_text(json.dumps(committed))
    rerun = dict(
        committed[3], train_neg_elbo=1.0, device="cpu", hidden=tuple(committed[3]["hidden"])
    )
    merged = common.update_records(path, [rerun], vae._record_settings)
    assert len(merged) == len(committed)
    assert [r for r in merged if r["train_neg_elbo"] == 1.0] == [rerun]
    other = dict(rerun, lr=0.002)
    assert len(common.update_records(path, [other], vae._record_settings)) == len(committed) + 1


def _truncated(path):
    path.write_bytes(path.read_bytes()[:1000])


def _without_the_schedule(path):
    # A mid-run checkpoint of a version that did not save the schedule's state: its resume was
    # a KeyError traceback.
    state = torch.load(path, weights_only=False)
    del state["schedule"]
    torch.save(state, path)


def _other_networks(path):
    # A mid-run checkpoint of a version whose networks have other layers: load_state_dict's
    # RuntimeError reached the user as a traceback.
    state = torch.load(path, weights_only=False)
    params = state["params"]["params"]
    state["params"]["params"] = {name + ".renamed": value for name, value in params.items()}
    torch.save(state, path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncated, "delete it"),
        (_without_the_schedule, "lacks the entry 'schedule'"),
        (_other_networks, "does not fit this run"),
    ],
    ids=["truncated", "another-version", "other-networks"],
)
def test_a_damaged_checkpoint_is_one_clear_line(tmp_path, monkeypatch, capsys, damage, message):
    options = ["--prior", "Pois(2)", "--estimator", "GenGS", "--epochs", "2"]

    def interrupt(epoch):
        raise _Interrupt

    monkeypatch.setattr(vae, "_after_epoch", interrupt)
    with pytest.raises(_Interrupt):
        _smoke(tmp_path, *options)
    [checkpoint] = _checkpoints(tmp_path)
    damage(checkpoint)
    before = checkpoint.read_bytes()
    capsys.readouterr()
    argv = ["experiment", "vae", "--smoke", "--results", str(tmp_path), *options]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(checkpoint) in error and message in error
    assert checkpoint.read_bytes() == before  # left for the user to look at


def _mnist_files(directory):
    for (split, kind), name in IDX_FILES.items():
        count = 200 if split == "train" else 50
        shape = (count, 28, 28) if kind == "images" else (count,)
        write_idx(directory / name, torch.zeros(shape, dtype=torch.uint8))


def test_a_damaged_idx_file_is_one_clear_line(tmp_path, capsys):
    _mnist_files(tmp_path)
    damaged = tmp_path / IDX_FILES["test", "images"]
    damaged.write_bytes(damaged.read_bytes()[:-20])  # a truncated download
    argv = ["experiment", "vae", "--results", str(tmp_path / "out"), "--data-dir", str(tmp_path)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(damaged) in error and "download" in error


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    argv = ["experiment", "vae", "--results", str(tmp_path), "--data-dir", str(tmp_path)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "MNIST not found" in error and "train-images-idx3-ubyte.gz" in error


@pytest.mark.parametrize("experiment", ["vae", "gst-vae", "igr-vae"])
def test_smoke_reads_the_dataset_given(tmp_path, capsys, experiment):
    # --smoke changes defaults only: with --dataset mnist it reads MNIST (here from an empty
    # folder, hence the missing-files error), where it trained on the digits instead, silently.
    argv = ["experiment", experiment, "--smoke", "--dataset", "mnist", "--data-dir", str(tmp_path)]
    assert main([*argv, "--results", str(tmp_path / "out")]) == 1
    assert "MNIST not found" in capsys.readouterr().err


@pytest.mark.parametrize("experiment", ["vae", "gst-vae", "igr-vae"])
def test_a_data_dir_for_the_digits_is_refused(tmp_path, capsys, experiment):
    argv = ["experiment", experiment, "--smoke", "--data-dir", str(tmp_path)]
    assert main([*argv, "--results", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--data-dir is for MNIST and Fashion-MNIST" in error


# --- The priors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, mean, truncation",
    [
        ("Pois(2)", 2.0, 12),
        ("Pois(3)", 3.0, 15),
        ("Geom(.25)", 3.0, 25),  # (1 - p) / p on 0, 1, ...
        ("Geom(.5)", 1.0, 15),
        ("NB(3,.5)", 3.0, 30),  # r (1 - p) / p failures before the r-th success
        ("NB(5,.3)", 35 / 3, 30),
    ],
)
def test_prior_conventions(name, mean, truncation):
    prior = PRIORS[name]
    assert prior.truncation == truncation
    base = prior.distribution()
    assert float(base.mean) == pytest.approx(mean, rel=1e-6)
    torch.manual_seed(0)
    samples = base.sample((200_000,))
    # The sample mean's error in standard errors, standard normal at LEVEL (statistical.py).
    z = (float(samples.mean()) - mean) / (float(base.stddev) / math.sqrt(len(samples)))
    assert_z_scores_are_standard(z, f"the mean of {name}")
    relaxed = prior.relaxed(0.5, truncation, tail_tolerance=None, **prior.prior_kwargs())
    # The truncated PMF agrees with the untruncated one below the last outcome.
    head = base.log_prob(torch.arange(truncation - 1.0))
    assert torch.allclose(relaxed.logits[:-1], head, atol=1e-5)
    assert float(relaxed.logits.exp()[-1]) == pytest.approx(1 - float(head.exp().sum()), abs=1e-6)


def test_nb_prior_is_failures_before_the_rth_success():
    # P(X = 0) = p^r: the first r trials all succeed.
    prior = PRIORS["NB(5,.3)"].distribution()
    assert float(prior.log_prob(torch.tensor(0.0)).exp()) == pytest.approx(0.3**5, rel=1e-5)


# --- Estimators: the analytic KL is what TraceMeanField_ELBO uses -----------------------------


def _tiny_estimator(estimator, prior, latents=3, pixels=6, temperature=0.5):
    k = prior.truncation if estimator == "GenGS-IMP" else prior.num_guide_parameters
    torch.manual_seed(0)
    encoder = torch.nn.Linear(pixels, latents * k)
    decoder = torch.nn.Linear(latents, pixels)
    return build_estimator(estimator, prior, encoder, decoder, torch.tensor(temperature), latents)


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("estimator", ["GenGS", "GenGS-IMP", "GenGS-NP"])
def test_gengs_estimators_use_the_registered_kl(prior, estimator):
    pyro.clear_param_store()
    e = _tiny_estimator(estimator, PRIORS[prior])
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    guide_trace = poutine.trace(e.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(e.model, trace=guide_trace)).get_trace(x)
    q, p = guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]
    kl = kl_divergence(q, p)  # NotImplementedError would make the ELBO fall back to Monte Carlo
    assert kl.shape == (4,) and torch.isfinite(kl).all()
    discrete = e.discrete_guide(x)
    # The categorical KL between the truncated PMFs, latent by latent.
    prior_logits = p.base_dist.logits
    expected = (discrete.probs * (discrete.logits - prior_logits)).nan_to_num().sum((-1, -2))
    assert torch.allclose(kl, expected, atol=1e-5)


def test_gengs_np_truncates_each_latent_on_its_own():
    e = _tiny_estimator("GenGS-NP", PRIORS["Pois(2)"])
    logits = e.discrete_guide(torch.ones(5, 6)).logits
    assert logits.shape == (5, 3, 24)  # the cap: twice the paper's truncation
    kept = (~logits.isneginf()).sum(-1)
    assert kept.min() >= 2 and kept.max() <= 24
    kl = kl_divergence(e.discrete_guide(torch.ones(5, 6)), PRIORS["Pois(2)"].distribution())
    assert kl.shape == (5, 3) and torch.isfinite(kl).all()


def test_reinforce_trains_with_a_decaying_average_baseline():
    pyro.clear_param_store()
    e = _tiny_estimator("REINFORCE", PRIORS["Geom(.5)"])
    svi = pyro.infer.SVI(e.model, e.guide, pyro.optim.Adam({"lr": 1e-2}), e.loss)
    svi.step(torch.ones(4, 6))
    assert "__baseline_avg_downstream_cost_z" in pyro.get_param_store()
    assert isinstance(e.loss, pyro.infer.TraceGraph_ELBO)


# --- The discrete-ELBO scorer -----------------------------------------------------------------


def _brute_force(q_probs, prior, decoder, x):
    """The exact KL and negative ELBO of one image, enumerating every latent vector."""
    latents, n = q_probs.shape
    kl = neg_elbo = 0.0
    for z in itertools.product(range(n), repeat=latents):
        z = torch.tensor(z, dtype=torch.float64)
        q_of_z = q_probs[torch.arange(latents), z.long()]
        log_ratio = float(q_of_z.log().sum() - prior.log_prob(z).sum())
        log_likelihood = float(dist.Bernoulli(logits=decoder(z)).log_prob(x).sum())
        kl += float(q_of_z.prod()) * log_ratio
        neg_elbo += float(q_of_z.prod()) * (log_ratio - log_likelihood)
    return kl, neg_elbo


def _tiny_scoring_problem():
    torch.manual_seed(0)
    latents, pixels = 2, 5
    # The guide gives the last outcome (the tail bin) much mass: scoring with a prior truncated
    # at n instead of the untruncated one would change the value by more than the tolerance.
    q_probs = [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.1, 0.4]]
    q_logits = torch.tensor(q_probs, dtype=torch.float64).log()
    weight = torch.randn(pixels, latents, dtype=torch.float64)

    def decoder(z):
        return z @ weight.T - 1.0

    def guide(images):  # a relaxed guide: the scorer must score its discrete distribution
        with pyro.plate("data", len(images)):
            relaxed = TruncatedGenGS(torch.tensor(0.5, dtype=torch.float64), logits=q_logits)
            pyro.sample("z", relaxed.expand([len(images), latents]).to_event(1))

    prior = dist.Poisson(torch.tensor(1.5, dtype=torch.float64))
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    return q_logits, decoder, guide, prior, x


def test_scorer_matches_brute_force_on_a_tiny_model():
    q_logits, decoder, guide, prior, x = _tiny_scoring_problem()
    latents, n = q_logits.shape
    exact_kl, exact = _brute_force(q_logits.exp(), prior, decoder, x[0])
    truncated = vae.PRIORS["Pois(2)"].relaxed(  # the prior truncated at n: a different KL
        1.0, n, tail_tolerance=None, rate=torch.tensor(1.5, dtype=torch.float64)
    )
    truncated_kl = float((q_logits.exp() * (q_logits - truncated.logits)).sum())
    assert abs(truncated_kl - exact_kl) > 0.05

    images = x.expand(40_000, -1)  # one image, many draws
    model = scoring_model(prior, decoder, latents)
    value, error = discrete_neg_elbo(
        model, guide, images, num_samples=4, seed=1, chunk_size=len(images)
    )
    # The error in standard errors, standard normal at LEVEL (statistical.py): a correct
    # scorer fails with probability LEVEL by chance.
    assert_z_scores_are_standard((value - exact) / error, "the scored value")
    assert 4 * error < 0.05  # finer than the truncated prior's error
    # Scored in chunks the draws are independent: the standard error is that of all draws.
    chunked, chunked_error = discrete_neg_elbo(
        model, guide, images, num_samples=4, seed=1, chunk_size=5000
    )
    assert_z_scores_are_standard((chunked - exact) / chunked_error, "the value scored in chunks")
    assert chunked_error == pytest.approx(error, rel=0.1)


def test_scorer_leaves_the_global_generator_alone():
    def guide(images):
        with pyro.plate("data", len(images)):
            pyro.sample("z", dist.Poisson(torch.full((len(images), 3), 2.0)).to_event(1))

    model = scoring_model(PRIORS["Pois(2)"].distribution(), lambda z: z[..., :2], 3)
    state = torch.get_rng_state()
    first = discrete_neg_elbo(model, guide, torch.ones(7, 2), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert discrete_neg_elbo(model, guide, torch.ones(7, 2), seed=5) == first
    assert discrete_neg_elbo(model, guide, torch.ones(7, 2), seed=6) != first


def test_exact_kl_of_the_guides_discrete_distribution():
    # GenGS guides: the finite sum against the untruncated prior, and the KL against the
    # truncated prior of training, each against a sum written out here.
    pyro.clear_param_store()
    e = _tiny_estimator("GenGS", PRIORS["Geom(.5)"])
    x = torch.bernoulli(torch.full((4, 6), 0.5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q = e.discrete_guide(x)
    base = PRIORS["Geom(.5)"].distribution()
    counts = torch.arange(15.0)
    expected = (q.probs * (q.logits - base.log_prob(counts))).sum(-1).sum(-1).mean()
    assert vae.mean_kl(e.discrete_guide, base, x) == pytest.approx(float(expected), rel=1e-5)
    truncated = e.prior.discrete()
    expected = (q.probs * (q.logits - truncated.logits)).sum(-1).sum(-1).mean()
    assert vae.mean_kl(e.discrete_guide, truncated, x) == pytest.approx(float(expected), rel=1e-5)
    # No closed form (Negative Binomial guide and prior): None, not a Monte-Carlo number.
    nb = _tiny_estimator("REINFORCE", PRIORS["NB(3,.5)"])
    assert vae.mean_kl(nb.discrete_guide, PRIORS["NB(3,.5)"].distribution(), x) is None


# --- REINFORCE with the KL in closed form ----------------------------------------------------


def _reinforce_kl_problem(batch):
    """One Poisson latent per image, guide rate ``exp(theta)``, decoder logit ``w z - 1``."""
    theta = torch.tensor(0.3, requires_grad=True)
    prior = dist.Poisson(torch.tensor(2.0))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior.expand([x.shape[0], 1]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=0.4 * z - 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Poisson(theta.exp().expand(x.shape[0], 1)).to_event(1))

    return theta, prior, model, guide, torch.ones(batch, 1)


def test_reinforce_kl_gradient_is_unbiased():
    theta, prior, model, guide, x = _reinforce_kl_problem(5000)
    # The exact ELBO of one image, summed over the counts 0..79 (the rest is below 1e-60).
    counts = torch.arange(80.0)
    q = dist.Poisson(theta.exp())
    log_likelihood = dist.Bernoulli(logits=0.4 * counts - 1.0).log_prob(torch.tensor(1.0))
    elbo = (q.log_prob(counts).exp() * log_likelihood).sum() - kl_divergence(q, prior)
    (exact,) = torch.autograd.grad(-elbo, theta)
    loss = AnalyticKLReinforce()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    estimates = []
    for _ in range(20):
        (gradient,) = torch.autograd.grad(loss(model, guide, x), theta)
        estimates.append(float(gradient) / len(x))  # the mean over 5000 images
    estimates = torch.tensor(estimates)
    error = float(estimates.std()) / math.sqrt(len(estimates))
    # The error of the mean in standard errors, at LEVEL (statistical.py): Student t with 19
    # degrees of freedom, the standard error coming from the 20 estimates.
    t = (float(estimates.mean()) - float(exact)) / error
    assert_z_scores_are_standard(t, "the mean gradient", df=len(estimates) - 1)
    assert error < 0.1 * abs(float(exact))  # fine enough to see a wrong term


def test_reinforce_kl_returns_the_negative_elbo_and_keeps_its_baseline():
    theta, prior, model, guide, x = _reinforce_kl_problem(3)
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    loss = AnalyticKLReinforce(beta=0.5)
    value = loss(model, guide, x)
    pyro.set_rng_seed(1)  # the same draw again
    trace = poutine.trace(guide).get_trace(x)
    z = trace.nodes["z"]["value"]
    log_likelihood = dist.Bernoulli(logits=0.4 * z - 1.0).log_prob(x).sum(-1)
    kl = kl_divergence(dist.Poisson(theta.exp()), prior)
    expected = -(log_likelihood - kl).sum()
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    # The first baseline is the batch's mean; the stored one moves half way to the next.
    first = float(pyro.param(AnalyticKLReinforce.baseline_name).detach())
    assert first == pytest.approx(float(log_likelihood.mean()), rel=1e-6)
    pyro.set_rng_seed(2)
    loss(model, guide, x)
    pyro.set_rng_seed(2)
    z = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
    mean = float(dist.Bernoulli(logits=0.4 * z - 1.0).log_prob(x).sum(-1).mean())
    second = float(pyro.param(AnalyticKLReinforce.baseline_name).detach())
    assert second == pytest.approx(0.5 * first + 0.5 * mean, rel=1e-6)


def test_reinforce_kl_needs_a_closed_form_kl(tmp_path, capsys):
    argv = ["experiment", "vae", "--smoke", "--results", str(tmp_path)]
    assert main([*argv, "--prior", "NB(3,.5)", "--estimator", "REINFORCE-KL"]) == 1
    assert "torch has no closed-form KL" in capsys.readouterr().err
    assert not (tmp_path / "gengs_vae.json").exists()
    args = build_parser(argv).parse_args([*argv, "--prior", "all", "--estimator", "all"])
    pairs = vae._pairs(args)
    assert ("NB(3,.5)", "REINFORCE-KL") not in pairs and ("Pois(2)", "REINFORCE-KL") in pairs
    assert len(pairs) == len(PRIORS) * len(ESTIMATORS) - 2  # the two Negative Binomials


def test_command_line_options(capsys):
    from pyro_relax.__main__ import build_parser

    def parse(*options):
        argv = ["experiment", "vae", *options]
        return build_parser(argv).parse_args(argv)

    args = parse("--prior", "all", "--hidden", "8,4")
    assert image_vae.expand(args.prior, PRIORS) == list(PRIORS) and args.hidden == (8, 4)
    assert image_vae.expand(args.estimator, ESTIMATORS) == list(ESTIMATORS)
    settings = vae._settings(args, _fake_mnist(), "Pois(2)", "GenGS")
    assert (settings.dataset, settings.epochs, settings.latents) == ("MNIST", 100, 32)
    assert (settings.steps_per_epoch, settings.device) == (600, "cpu")  # every batch
    capped = vae._settings(parse("--steps-per-epoch", "1000"), _fake_mnist(), "Pois(2)", "GenGS")
    # A cap above the batches of an epoch changes nothing: the same run.
    assert capped == vae._settings(parse(), _fake_mnist(), "Pois(2)", "GenGS")
    digits = types.SimpleNamespace(name="digits", train_images=torch.empty(1500, 0))
    smoke = vae._settings(parse("--smoke"), digits, "Pois(2)", "GenGS")
    assert (smoke.dataset, smoke.epochs, smoke.steps_per_epoch) == ("digits", 1, 3)
    for bad in (["--epochs", "0"], ["--prior", "Pois(4)"], ["--hidden", "8,x"]):
        with pytest.raises(SystemExit):
            parse(*bad)
    capsys.readouterr()

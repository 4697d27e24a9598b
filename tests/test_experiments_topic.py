"""The topic-model experiment: smoke run, synthetic corpus, perplexity scorer, corpora, resume."""

import dataclasses
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy import stats

import pyro_relax.__main__ as cli
from pyro_relax.experiments import common, topic
from pyro_relax.experiments.common import Checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REQUIRED = (
    "corpus",
    "estimator",
    "test_perplexity",
    "train_perplexity",
    "epochs",
    "seed",
    "seconds",
    "machine",
    "command",
    "history",
)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the experiment runs: tiny matrices gain nothing from a second."""
    with common.torch_threads(1):
        yield


def test_smoke_run_writes_results(tmp_path):
    argv = ["experiment", "topic", "--smoke", "--results", str(tmp_path)]
    assert cli.main(argv) == 0

    records = json.loads((tmp_path / "topic.json").read_text())
    assert {r["estimator"] for r in records} == {*topic.ESTIMATORS, topic.TRUE_MODEL}
    for record in records:
        assert set(REQUIRED) <= set(record)
        assert record["corpus"] == "synthetic-smoke" and record["seed"] == 0
        assert record["command"] == f"pyro-relax experiment topic --smoke --results {tmp_path}"
        assert 1 < record["test_perplexity"] < 10 * topic.SMOKE_SPEC.vocab_size
        assert 1 < record["train_perplexity"] < 10 * topic.SMOKE_SPEC.vocab_size
        assert record["epochs"] == len(record["history"]) == topic.SMOKE_CONFIG.epochs
    page = (tmp_path / "topic.md").read_text()
    assert "| synthetic-smoke | GenGS | 0 |" in page
    # The no-latent baseline, the same for every run on the corpus, in the page's note.
    baseline = {record["word_frequency_test_perplexity"] for record in records}
    assert len(baseline) == 1
    assert "Word frequencies alone on synthetic-smoke" in page
    assert f"test perplexity {baseline.pop():.2f}." in page
    assert (tmp_path / "topic.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # removed once merged
    true_model = next(r for r in records if r["estimator"] == topic.TRUE_MODEL)
    assert "true decoder" in true_model["objective"]

    # A second run replaces its rows rather than adding to them.
    assert cli.main(argv) == 0
    assert len(json.loads((tmp_path / "topic.json").read_text())) == len(records)


def test_word_frequency_perplexity_by_hand():
    # Training counts 3 and 1 of two words, plus one each: frequencies 4/6 and 2/6. A test
    # document with one of each: perplexity exp(-(log 2/3 + log 1/3) / 2) = sqrt(9 / 2).
    train = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    test = torch.tensor([[1.0, 1.0]])
    assert topic.word_frequency_perplexity(train, test) == pytest.approx(math.sqrt(4.5))
    # A word never seen in training still has a finite cost.
    unseen = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    expected = math.exp(-(5 * math.log(1 / 5) + math.log(4 / 5)) / 6)
    assert topic.word_frequency_perplexity(torch.tensor([[3.0, 0.0]]), unseen) == pytest.approx(
        expected
    )


def test_other_layers_than_the_corpus_train_and_the_true_model_keeps_its_own(tmp_path):
    # With --layers other than the synthetic corpus's, both estimators trained and then the true
    # model's run crashed (KeyError 'z2'): its guide was built from --layers, its decoder from
    # the corpus. Nothing was written.
    argv = ["experiment", "topic", "--smoke", "--layers", "3", "--results", str(tmp_path)]
    assert cli.main(argv + ["--estimators", topic.GENGS, "--epochs", "1"]) == 0
    records = json.loads((tmp_path / "topic.json").read_text())
    layers = {r["estimator"]: tuple(r["settings"]["layers"]) for r in records}
    assert layers == {topic.GENGS: (3,), topic.TRUE_MODEL: topic.SMOKE_SPEC.layers}
    with pytest.raises(ValueError, match="layers"):
        topic.train(
            topic.GENGS,
            topic.synthetic_corpus(0, topic.SMOKE_SPEC),
            dataclasses.replace(topic.SMOKE_CONFIG, layers=(3,)),
            decoder=topic.PoissonDEF(topic.SMOKE_SPEC.vocab_size, topic.SMOKE_SPEC.layers),
        )


# ---------------------------------------------------------------------------------------------
# The synthetic corpus

SPEC = topic.SyntheticSpec(vocab_size=30, layers=(6, 3), train_docs=3000, test_docs=100)


def test_synthetic_corpus_is_deterministic_per_seed():
    first, again, other = (topic.synthetic_corpus(seed, SPEC) for seed in (3, 3, 4))
    assert torch.equal(first.train, again.train) and torch.equal(first.test, again.test)
    assert np.array_equal(first.truth["loadings"], again.truth["loadings"])
    assert not torch.equal(first.train, other.train)


def test_synthetic_corpus_shapes_and_mean_counts():
    corpus = topic.synthetic_corpus(0, SPEC)
    assert corpus.train.shape == (SPEC.train_docs, SPEC.vocab_size)
    assert corpus.test.shape == (SPEC.test_docs, SPEC.vocab_size)
    assert len(corpus.vocabulary) == SPEC.vocab_size
    (weights,) = corpus.truth["weights"]
    loadings = corpus.truth["loadings"]
    assert loadings.shape == (6, SPEC.vocab_size) and weights.shape == (6, 3)
    assert ((loadings > 0).sum(-1) == SPEC.topic_words).all()
    z1, z2 = corpus.train_latents
    assert z1.shape == (SPEC.train_docs, 6) and z2.shape == (SPEC.train_docs, 3)

    def close(sample, expected):  # within 5 standard errors of the sample mean
        error = sample.std(0) / math.sqrt(len(sample))
        np.testing.assert_array_less(np.abs(sample.mean(0) - expected), 5 * error + 1e-12)

    close(z2, SPEC.prior_rate)
    close(z1, weights @ np.full(3, SPEC.prior_rate) + SPEC.rate_offset)
    lengths = corpus.train.sum(-1).numpy()
    close(lengths, SPEC.mean_length)
    # Each word's count has mean N p_v(z1) given the latents.
    decoder = topic.PoissonDEF.from_truth(corpus.truth)
    z1 = torch.as_tensor(z1, dtype=torch.float32)
    expected = (lengths[:, None] * decoder.word_log_probs(z1).exp().numpy()).mean(0)
    close(corpus.train.numpy(), expected)


# ---------------------------------------------------------------------------------------------
# Perplexity against exact enumeration on a two-layer model with one latent per layer

TRUTH = {
    "loadings": np.array([[1.0, -0.5, 0.0]]),
    "background": np.log([0.5, 0.3, 0.2]),
    "weights": [np.array([[1.5]])],
    "prior_rate": 1.2,
    "rate_offset": 0.1,
}
DOCS = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
RATES = [torch.tensor([[1.3], [0.7]]), torch.tensor([[0.8], [2.0]])]  # z1, z2
OUTCOMES = np.arange(60)  # enough for the Poisson sums: the rates are at most 3.1


def _log_joint(x, z1, z2):
    """log p(x, z1, z2) of the model TRUTH, for arrays of z1 and z2 that broadcast."""
    z1 = np.asarray(z1, dtype=float)
    logits = TRUTH["background"] + z1[..., None] * TRUTH["loadings"][0]
    log_words = (x * (logits - np.logaddexp.reduce(logits, axis=-1)[..., None])).sum(-1)
    rate1 = TRUTH["weights"][0][0, 0] * np.asarray(z2) + TRUTH["rate_offset"]
    return (
        log_words + stats.poisson.logpmf(z1, rate1) + stats.poisson.logpmf(z2, TRUTH["prior_rate"])
    )


def _guide_pmf(rate, truncation):
    """The guide's PMF over OUTCOMES: Poisson, or truncated to ``truncation`` outcomes with
    the last absorbing the tail."""
    pmf = stats.poisson.pmf(OUTCOMES, rate)
    if truncation is not None:
        pmf[truncation - 1] = stats.poisson.sf(truncation - 2, rate)
        pmf[truncation:] = 0
    return pmf


def _enumerated(x, rate1, rate2, truncation):
    """The ELBO and the log-mass of the outcomes the guide covers, by enumeration."""
    q1, q2 = _guide_pmf(rate1, truncation), _guide_pmf(rate2, truncation)
    z2, z1 = np.meshgrid(OUTCOMES, OUTCOMES, indexing="ij")
    weight = q2[:, None] * q1[None, :]
    covered = weight > 0
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 where the guide has no mass
        log_ratio = _log_joint(x, z1, z2) - np.log(q1)[None, :] - np.log(q2)[:, None]
        elbo = float(np.where(covered, weight * log_ratio, 0.0).sum())
    log_mass = float(np.logaddexp.reduce(_log_joint(x, z1, z2)[covered]))
    return elbo, log_mass


@pytest.mark.parametrize("truncation", [None, 4])
def test_perplexity_matches_enumeration(truncation):
    """Both perplexities against exact sums, for a Poisson guide and for the truncated PMF of a
    GenGS guide (rates up to 2 put up to a third of the mass in the tail bin of 4 outcomes): the
    ELBO summed over the documents from 100,000 draws within 0.05 nats, the importance-weighted
    bound from 1,000,000 particles within 0.02 of the log-mass of the outcomes the guide covers
    (its limit; standard errors are below a fifth of these tolerances)."""
    decoder = topic.PoissonDEF.from_truth(TRUTH).double()
    rates = [r.double() for r in RATES]
    x = DOCS.double()
    exact = [
        _enumerated(x[d].numpy(), float(rates[0][d]), float(rates[1][d]), truncation)
        for d in range(len(x))
    ]
    words = float(x.sum())

    class Encoder(torch.nn.Module):
        def forward(self, chunk):  # perplexity scores a few documents at a time
            rows = [int((x == document).all(-1).nonzero()) for document in chunk]
            return [rate[rows] for rate in rates]

    def total(bound, num_samples):
        value = topic.perplexity(
            decoder, Encoder(), x, truncation=truncation, num_samples=num_samples, bound=bound
        )
        return -math.log(value) * words

    elbo, log_mass = sum(e for e, _ in exact), sum(m for _, m in exact)
    assert total("elbo", 100_000) == pytest.approx(elbo, abs=0.05)
    assert total("iwae", 1_000_000) == pytest.approx(log_mass, abs=0.02)
    assert log_mass > elbo + 0.1  # the two bounds differ: each test can fail alone
    with pytest.raises(ValueError, match="unknown bound"):
        topic.perplexity(decoder, Encoder(), x, bound="exact")


# ---------------------------------------------------------------------------------------------
# User-supplied corpora


def _sorted_rows(counts):
    return sorted(map(tuple, np.asarray(counts).tolist()))


def test_corpus_file_round_trip(tmp_path):
    counts = np.random.default_rng(0).poisson(1.0, size=(25, 8))
    counts[3] = 0  # an empty document is dropped
    vocabulary = [f"word{v}" for v in range(8)]
    topic.save_corpus(tmp_path / "dense.npz", counts, vocabulary)
    scipy.sparse.save_npz(tmp_path / "sparse.npz", scipy.sparse.csr_matrix(counts))
    nonempty = counts[counts.sum(-1) > 0]

    for name in ("dense.npz", "sparse.npz"):
        corpus = topic.load_corpus(tmp_path / name, seed=1, test_fraction=0.2)
        assert corpus.name == name and len(corpus.test) == 5 and len(corpus.train) == 19
        assert _sorted_rows(torch.cat([corpus.train, corpus.test])) == _sorted_rows(nonempty)
        assert corpus.truth is None
    assert topic.load_corpus(tmp_path / "dense.npz").vocabulary == vocabulary
    assert topic.load_corpus(tmp_path / "sparse.npz").vocabulary[0] == "w0"
    # The split depends on the seed only.
    again = topic.load_corpus(tmp_path / "dense.npz", seed=1, test_fraction=0.2)
    assert torch.equal(again.test, topic.load_corpus(tmp_path / "dense.npz", seed=1).test)


def test_text_corpus(tmp_path):
    documents = tmp_path / "docs"
    (documents / "sub").mkdir(parents=True)
    (documents / "a.txt").write_text("Apples and pears; apples again!")
    (documents / "b.txt").write_text("pears 42 and plums")
    (documents / "sub" / "c.txt").write_text("Plums, apples, pears")
    (documents / "ignored.md").write_text("cherries")
    corpus = topic.load_corpus(documents, vocab_size=2)
    assert corpus.vocabulary == ["apples", "pears"]  # the two most frequent; "and" is a stop word
    assert _sorted_rows(torch.cat([corpus.train, corpus.test])) == [(0, 1), (1, 1), (2, 1)]

    lines = tmp_path / "lines.txt"
    lines.write_text("apples pears\nplums\n")
    assert len(topic.load_corpus(lines, vocab_size=10).train) == 1


def test_smoke_run_on_a_corpus_file(tmp_path):
    counts = np.random.default_rng(0).poisson(0.5, size=(80, 12))
    topic.save_corpus(tmp_path / "mine.npz", counts)
    argv = ["experiment", "topic", "--smoke", "--results", str(tmp_path)]
    assert cli.main([*argv, "--corpus", str(tmp_path / "mine.npz")]) == 0
    records = json.loads((tmp_path / "topic.json").read_text())
    assert {(r["corpus"], r["estimator"]) for r in records} == {
        ("mine.npz-smoke", estimator) for estimator in topic.ESTIMATORS
    }


# ---------------------------------------------------------------------------------------------
# Resuming


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("estimator", topic.ESTIMATORS)
def test_resumed_run_equals_uninterrupted_run(tmp_path, estimator):
    """A run stopped after its first epoch continues from the saved epoch and ends exactly as
    a run that was never stopped."""
    corpus = topic.synthetic_corpus(0, topic.SMOKE_SPEC)
    config = dataclasses.replace(topic.SMOKE_CONFIG, epochs=3)
    uninterrupted = topic.train(estimator, corpus, config)

    checkpoint = Checkpoint(tmp_path / "run.pt")

    def stop(epoch):
        raise _Interrupted

    with pytest.raises(_Interrupted):
        topic.train(estimator, corpus, config, checkpoint=checkpoint, on_epoch_end=stop)
    torch.manual_seed(12345)  # the checkpoint restores the generators, whatever happened since
    epochs = []
    resumed = topic.train(
        estimator, corpus, config, checkpoint=checkpoint, on_epoch_end=epochs.append
    )
    assert epochs == [2, 3]

    def without_times(record):
        history = [{k: v for k, v in h.items() if k != "seconds"} for h in record["history"]]
        return {k: v for k, v in record.items() if k != "seconds"} | {"history": history}

    assert without_times(resumed) == without_times(uninterrupted)
    # A finished run's checkpoint holds its record.
    assert topic.train(estimator, corpus, config, checkpoint=checkpoint) == resumed


# ---------------------------------------------------------------------------------------------
# Results: settings, checkpoints, committed records, damaged corpora


def test_a_rerun_on_another_split_keeps_the_earlier_records(tmp_path):
    counts = np.random.default_rng(0).poisson(0.5, size=(80, 12))
    topic.save_corpus(tmp_path / "mine.npz", counts)
    argv = ["experiment", "topic", "--smoke", "--results", str(tmp_path)]
    argv += ["--corpus", str(tmp_path / "mine.npz"), "--estimators", "GenGS"]
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--test-fraction", "0.5"]) == 0
    assert cli.main(argv) == 0  # the first split again: replaces its record
    records = json.loads((tmp_path / "topic.json").read_text())
    assert len(records) == 2 and len({r["corpus_digest"] for r in records}) == 2


def test_runs_of_other_settings_have_their_own_checkpoints(tmp_path):
    corpus = topic.synthetic_corpus(0, topic.SMOKE_SPEC)
    config = topic.SMOKE_CONFIG
    paths = {
        topic._checkpoint(tmp_path, corpus, label, other, device).path
        for label, other, device in [
            (topic.GENGS, config, "cpu"),
            (topic.REINFORCE, config, "cpu"),
            (topic.GENGS, dataclasses.replace(config, learning_rate=0.01), "cpu"),
            (topic.GENGS, dataclasses.replace(config, epochs=3), "cpu"),
            (topic.GENGS, config, "cuda"),
        ]
    }
    assert len(paths) == 5


def test_committed_records_are_matched_by_the_settings_of_their_commands():
    # The committed records predate the corpus fingerprint and the device in the key; each
    # must be the record its own command would replace, and no other.
    records = json.loads((Path(__file__).resolve().parents[1] / "results/topic.json").read_text())
    digests = set()
    for record in records:
        argv = shlex.split(record["command"])[1:]
        args = cli.build_parser(argv).parse_args(argv)
        config = dataclasses.asdict(topic._config(args))
        expected = topic._run_settings("synthetic", None, record["estimator"], "cpu", config)
        stored = topic._record_settings(record)
        assert common.settings_digest(stored) == common.settings_digest(expected)
        digests.add(common.settings_digest(stored))
    assert len(digests) == len(records)


@pytest.mark.parametrize(
    "content", [b"not a zip archive", b"PK\x03\x04 truncated"], ids=["garbage", "truncated"]
)
def test_a_damaged_corpus_file_is_one_clear_line(tmp_path, capsys, content):
    path = tmp_path / "mine.npz"
    path.write_bytes(content)
    argv = ["experiment", "topic", "--smoke", "--results", str(tmp_path), "--corpus", str(path)]
    assert cli.main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(path) in error and "write it again" in error


@pytest.mark.parametrize(
    "count", [np.inf, -1.0, 0.5, np.nan], ids=["inf", "negative", "half", "nan"]
)
def test_counts_that_are_not_nonnegative_integers_are_refused(tmp_path, count):
    # An infinite count passed the check (inf == round(inf)) and failed in the first step.
    path = tmp_path / "mine.npz"
    np.savez(path, counts=np.array([[count, 1.0], [1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(common.CorruptFileError, match="nonnegative integers"):
        topic.load_corpus(path)


def test_a_corpus_of_another_format_says_which_are_read(tmp_path):
    # A .csv file was read as .npz, and the message quoted NumPy's advice to unpickle it.
    path = tmp_path / "mine.csv"
    path.write_text("1,2\n3,4\n")
    with pytest.raises(common.ExperimentError, match="a corpus is a .npz file of counts"):
        topic.load_corpus(path)


@pytest.mark.parametrize("content", [None, "the and of\nis it\n"], ids=["empty", "stop-words"])
def test_a_corpus_without_words_is_one_clear_line(tmp_path, content):
    # scikit-learn's "empty vocabulary" ValueError reached the user as a traceback.
    path = tmp_path / "docs"
    path.mkdir()
    if content is not None:
        (path / "a.txt").write_text(content)
    with pytest.raises(common.CorruptFileError, match=str(path)):
        topic.load_corpus(path)


def test_the_test_fraction_lies_between_zero_and_one(capsys):
    argv = ["experiment", "topic", "--test-fraction", "5"]
    with pytest.raises(SystemExit):
        cli.build_parser(argv).parse_args(argv)
    assert "strictly between 0 and 1" in capsys.readouterr().err


def test_options_given_with_smoke_are_used():
    # --smoke replaced the whole config: --epochs 3 --truncation 20 ran 2 epochs over 12 outcomes.
    def config(*options):
        argv = ["experiment", "topic", *options]
        return topic._config(cli.build_parser(argv).parse_args(argv))

    given = config("--smoke", "--epochs", "3", "--truncation", "20", "--layers", "4", "2")
    assert (given.epochs, given.truncation, given.layers) == (3, 20, (4, 2))
    assert given.hidden == topic.SMOKE_CONFIG.hidden
    assert config("--smoke") == dataclasses.replace(topic.SMOKE_CONFIG, seed=0)
    assert config() == topic.TopicConfig()


def test_rows_of_runs_with_other_settings_are_told_apart():
    # Two runs that differed only in the learning rate printed identical leading cells.
    record = json.loads((Path(__file__).resolve().parents[1] / "results/topic.json").read_text())[0]
    other = dict(record, settings=dict(record["settings"], learning_rate=0.5))
    page = topic._table([record, other])
    rate = record["settings"]["learning_rate"]
    assert f"| learning_rate={rate} |" in page and "| learning_rate=0.5 |" in page
    assert "settings" not in topic._table([record])

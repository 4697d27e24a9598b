r"""Topic model of the GenGS paper (section 6.3): a neural variational Poisson deep exponential
family (NVPDEF) on bags of words, trained with GenGS and with REINFORCE.

The generative model, for a document with word counts :math:`x \in \mathbb{N}^V` and length
:math:`N = \sum_v x_v`, has :math:`L` layers of Poisson count latents (layer 1 at the bottom):

.. math::
    z_L \sim \operatorname{Poisson}(\lambda_0), \qquad
    z_l \mid z_{l+1} \sim \operatorname{Poisson}(W_{l+1} z_{l+1} + \epsilon), \qquad
    x \mid z_1, N \sim \operatorname{Multinomial}(N, \operatorname{softmax}(b + R^\top z_1)),

with nonnegative weights :math:`W_l = \operatorname{softplus}(\cdot)`, topic loadings
:math:`R \in \mathbb{R}^{K_1 \times V}` and background log-frequencies :math:`b`. The
observation layer is log-linear, as NVDM's softmax decoder: every count of topic :math:`k` adds
:math:`R_k` to the words' logits, so both which topics and how many counts matter. (The mixture
:math:`x \sim \operatorname{Multinomial}(N, \beta^\top z_1 / \sum_k z_{1k})`, the Poisson
likelihood conditioned on :math:`N`, was tried first: its likelihood ignores the scale of
:math:`z_1`, and both estimators collapsed to guides with nearly constant rates.) Words are
scored as a sequence (:math:`\sum_v x_v \log p_v`, without the multinomial coefficient), as
topic-model perplexities are. The guide is amortized and mean-field: an MLP of the normalized
bag of words :math:`x / N` gives a Poisson rate to every latent.

Estimators, with the same networks, initialization, batches, optimizer and epochs:

- GenGS: :class:`~pyro_relax.GenGSPoisson` in model and guide with one fixed truncation, the
  temperature annealed from 1.0 to 0.1, ``TraceMeanField_ELBO``. It uses the analytic
  categorical KL of each layer given the (relaxed) layer above plus the relaxed likelihood:
  the paper's objective, with less variance than the soft log-PMF of ``Trace_ELBO``. A prior
  whose rate depends on a relaxed upper-layer sample is fine: its truncated PMF is defined for
  any positive rate, and smooth in it;
- REINFORCE: ``dist.Poisson`` in model and guide, ``TraceGraph_ELBO`` with a decaying-average
  baseline at every latent site.

Perplexity is :math:`\exp(-\sum_d \mathrm{ELBO}_d / \sum_d N_d)` over held-out documents, with
the ELBO of the *discrete* model (untruncated Poisson priors) scored by
:func:`pyro_relax.infer.discrete_elbo` whichever estimator trained it (the GenGS guide under
:func:`~pyro_relax.infer.discretize`, its truncated PMF), and the importance-weighted bound by
:func:`pyro_relax.infer.discrete_log_likelihood`: see :func:`perplexity`.

References:
    Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
    Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
    https://arxiv.org/abs/2003.01847

    Deep Exponential Families. Rajesh Ranganath, Linpeng Tang, Laurent Charlin, David M. Blei,
    2015. https://arxiv.org/abs/1411.2581

    Neural Variational Inference for Text Processing. Yishu Miao, Lei Yu, Phil Blunsom, 2016.
    https://arxiv.org/abs/1511.06038

    Importance Weighted Autoencoders. Yuri Burda, Roger Grosse, Ruslan Salakhutdinov, 2016.
    https://arxiv.org/abs/1509.00519
"""

import dataclasses
import functools
import hashlib
import math
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_relax._cli import fraction, integer_at_least, positive_float, positive_int
from pyro_relax.distributions import GenGSPoisson
from pyro_relax.experiments import common
from pyro_relax.infer import discrete_elbo, discrete_log_likelihood
from pyro_relax.schedules import ExponentialDecay

__all__ = [
    "DESCRIPTION",
    "ESTIMATORS",
    "GENGS",
    "REINFORCE",
    "SMOKE_CONFIG",
    "SMOKE_SPEC",
    "TRUE_MODEL",
    "Corpus",
    "Encoder",
    "PoissonDEF",
    "SyntheticSpec",
    "TopicConfig",
    "add_arguments",
    "load_corpus",
    "perplexity",
    "run",
    "save_corpus",
    "synthetic_corpus",
    "train",
    "word_frequency_perplexity",
    "word_log_frequencies",
]

DESCRIPTION = (
    "Poisson deep exponential family topic model (NVPDEF, GenGS paper section 6.3) trained with "
    "GenGS and with REINFORCE; test perplexity on a synthetic or user-supplied corpus"
)
GENGS, REINFORCE = "GenGS", "REINFORCE"
ESTIMATORS = (GENGS, REINFORCE)
TRUE_MODEL = "true model"
# The smallest rate the encoder gives: a Poisson rate must be positive, and softplus underflows.
_MIN_RATE = 1e-3
# Documents scored at once by the evaluation, to bound its memory (documents x samples x V).
_EVAL_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    r"""The synthetic corpus: documents drawn from a known Poisson DEF of the form this module
    fits (the model class contains the truth).

    The background :math:`b` is the log of a Dirichlet(1) draw over the vocabulary; topic
    :math:`k` raises the logits of ``topic_words`` words, drawn at random, by
    ``topic_strength`` per count (:math:`R_{kv}`, zero elsewhere); each weight of
    :math:`W_l` is nonzero with probability ``weight_density`` (every row has at least one
    nonzero) and then Gamma with shape 2 and mean ``weight_mean``; document lengths are
    :math:`N = 1 + \operatorname{Poisson}(\bar N - 1)`, independent of the latents, so
    :math:`E[N] = \bar N` (``mean_length``).
    """

    vocab_size: int = 500
    layers: tuple = (20, 5)
    train_docs: int = 2000
    test_docs: int = 500
    mean_length: float = 100.0
    topic_words: int = 25
    topic_strength: float = 1.0
    weight_density: float = 0.3
    weight_mean: float = 0.5
    prior_rate: float = 1.0
    rate_offset: float = 0.1


SMOKE_SPEC = SyntheticSpec(vocab_size=40, layers=(4, 2), train_docs=40, test_docs=20)


@dataclasses.dataclass(frozen=True)
class TopicConfig:
    """Settings shared by both estimators' runs, so that the comparison is fair.

    ``layers`` lists the latent sizes from the bottom (topics) up; ``truncation`` is the number
    of outcomes of every GenGS latent (the guide's rates reach about 16 in training, where 25
    outcomes left more than 1% of the mass in the tail and 35 leave 1e-4); the temperature is
    annealed from ``initial_temperature`` to ``final_temperature`` over all training steps.
    ``curve_samples`` guide draws per document score the per-epoch curves,
    ``eval_samples`` the final perplexities and ``iwae_samples`` the importance-sampled ones.
    """

    layers: tuple = SyntheticSpec.layers
    hidden: int = 256
    epochs: int = 80
    batch_size: int = 100
    learning_rate: float = 3e-3
    truncation: int = 35
    prior_rate: float = SyntheticSpec.prior_rate
    rate_offset: float = SyntheticSpec.rate_offset
    initial_temperature: float = 1.0
    final_temperature: float = 0.1
    curve_samples: int = 4
    eval_samples: int = 32
    iwae_samples: int = 256
    seed: int = 0


SMOKE_CONFIG = TopicConfig(
    layers=SMOKE_SPEC.layers,
    hidden=16,
    epochs=2,
    batch_size=10,
    truncation=12,
    curve_samples=2,
    eval_samples=2,
    iwae_samples=4,
)


@dataclasses.dataclass
class Corpus:
    """A bag-of-words corpus split into training and test documents.

    ``train`` and ``test`` are float tensors of word counts, documents by vocabulary.
    ``truth`` holds the generating parameters of a synthetic corpus (``loadings`` :math:`R`,
    ``background`` :math:`b`, ``weights`` from the bottom up, ``prior_rate`` and
    ``rate_offset``) and
    ``train_latents`` / ``test_latents`` the latents that generated each document (one array
    per layer, bottom first); all three are ``None`` for a user-supplied corpus.
    """

    name: str
    vocabulary: list
    train: torch.Tensor
    test: torch.Tensor
    truth: dict | None = None
    train_latents: list | None = None
    test_latents: list | None = None


class PoissonDEF(nn.Module):
    r"""The generative network of the Poisson DEF (see the module docstring): topic loadings
    :math:`R` (``layers[0]`` by ``vocab_size``), background :math:`b` and the weights
    :math:`W_2 .. W_L`, which map each layer's latents to the rates of the layer below.

    Arguments:
        vocab_size (int): :math:`V`.
        layers (tuple): latent sizes :math:`K_1, \dots, K_L`, bottom first.
        prior_rate (float): :math:`\lambda_0`, the top layer's prior rate.
        rate_offset (float): :math:`\epsilon`, added to every lower layer's rate.
        background (Tensor): the initial :math:`b` (default zeros: uniform words).
    """

    def __init__(self, vocab_size, layers, prior_rate=1.0, rate_offset=0.1, background=None):
        super().__init__()
        self.layers = tuple(layers)
        self.prior_rate, self.rate_offset = prior_rate, rate_offset
        self.loadings = nn.Parameter(0.01 * torch.randn(self.layers[0], vocab_size))
        if background is None:
            background = torch.zeros(vocab_size)
        self.background = nn.Parameter(torch.as_tensor(background, dtype=torch.float32).clone())
        # Initial weights 0.2 make the expected lower-layer counts of order 1.
        start = math.log(math.expm1(0.2))
        self.weight_logits = nn.ParameterList(
            nn.Parameter(start + 0.1 * torch.randn(below, above))
            for below, above in zip(self.layers[:-1], self.layers[1:], strict=True)
        )

    @classmethod
    def from_truth(cls, truth: dict) -> "PoissonDEF":
        """The network with the generating parameters of a synthetic corpus (no gradients)."""
        loadings = torch.as_tensor(truth["loadings"], dtype=torch.float32)
        weights = [torch.as_tensor(w, dtype=torch.float32) for w in truth["weights"]]
        layers = [loadings.shape[0]] + [w.shape[1] for w in weights]
        network = cls(
            loadings.shape[1],
            layers,
            truth["prior_rate"],
            truth["rate_offset"],
            truth["background"],
        )
        with torch.no_grad():
            network.loadings.copy_(loadings)
            for logits, w in zip(network.weight_logits, weights, strict=True):
                logits.copy_(torch.log(torch.expm1(w)))  # softplus^-1; a zero weight is -inf
        return network.requires_grad_(False).eval()  # eval: Pyro registers no parameters

    def weights(self) -> list:
        r"""The nonnegative weights :math:`W_2, \dots, W_L`, each ``(K_{l-1}, K_l)``."""
        return [F.softplus(logits) for logits in self.weight_logits]

    def conditional_rate(self, layer: int, above: torch.Tensor) -> torch.Tensor:
        r"""The prior rate :math:`W z + \epsilon` of layer ``layer`` (0 at the bottom) given
        the latents ``above`` of the layer above it."""
        return above @ F.softplus(self.weight_logits[layer]).T + self.rate_offset

    def prior_rates(self, latents) -> list:
        r"""The prior rate of every layer (bottom first) given all the latents (bottom first);
        the top layer's rate is :math:`\lambda_0`, broadcast to the batch."""
        rates = [self.conditional_rate(layer, z) for layer, z in enumerate(latents[1:])]
        return rates + [torch.full_like(latents[-1], self.prior_rate)]

    def word_log_probs(self, z1: torch.Tensor) -> torch.Tensor:
        r"""The log-probabilities of the words given the bottom latents :math:`z_1`,
        :math:`\log \operatorname{softmax}(b + R^\top z_1)`."""
        return (self.background + z1 @ self.loadings).log_softmax(-1)

    def log_likelihood(self, x: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        r"""The log-probability of the words of ``x`` as a sequence,
        :math:`\sum_v x_v \log p_v`."""
        return (x * self.word_log_probs(z1)).sum(-1)


class Encoder(nn.Module):
    """The amortized guide's network: an MLP of the normalized bag of words :math:`x / N` that
    gives a Poisson rate to every latent of every layer (bottom first)."""

    def __init__(self, vocab_size, layers, hidden):
        super().__init__()
        self.layers = tuple(layers)
        self.net = nn.Sequential(
            nn.Linear(vocab_size, hidden),
            nn.Softplus(),
            nn.Linear(hidden, hidden),
            nn.Softplus(),
            nn.Linear(hidden, sum(self.layers)),
        )

    def forward(self, x: torch.Tensor) -> list:
        """The rates of each layer's latents, bottom first."""
        frequencies = x / x.sum(-1, keepdim=True).clamp(min=1)
        rates = F.softplus(self.net(frequencies)) + _MIN_RATE
        return list(rates.split(self.layers, -1))


# ---------------------------------------------------------------------------------------------
# Corpora


def synthetic_corpus(seed: int, spec: SyntheticSpec = SyntheticSpec()) -> Corpus:
    """Documents drawn from a known Poisson DEF (see :class:`SyntheticSpec`), deterministically
    from ``seed`` (NumPy's generator of its own; the global generators are left alone)."""
    rng = np.random.default_rng([seed, 0x70C1C])
    layers, vocab_size = spec.layers, spec.vocab_size
    background = np.log(rng.dirichlet(np.ones(vocab_size)))
    loadings = np.zeros((layers[0], vocab_size))
    for row in loadings:
        row[rng.choice(vocab_size, size=spec.topic_words, replace=False)] = spec.topic_strength
    weights = []
    for below, above in zip(layers[:-1], layers[1:], strict=True):
        mask = rng.random((below, above)) < spec.weight_density
        mask[np.arange(below), rng.integers(above, size=below)] = True
        weights.append(
            np.where(mask, rng.gamma(2.0, spec.weight_mean / 2, size=(below, above)), 0.0)
        )
    truth = {
        "loadings": loadings,
        "background": background,
        "weights": weights,
        "prior_rate": spec.prior_rate,
        "rate_offset": spec.rate_offset,
    }
    train, train_latents = _draw_documents(rng, truth, spec.train_docs, spec.mean_length)
    test, test_latents = _draw_documents(rng, truth, spec.test_docs, spec.mean_length)
    vocabulary = [f"w{v}" for v in range(vocab_size)]
    return Corpus("synthetic", vocabulary, train, test, truth, train_latents, test_latents)


def _draw_documents(rng, truth, num_docs, mean_length):
    """Documents and their latents (bottom first) from the Poisson DEF ``truth``."""
    loadings = truth["loadings"]
    top_size = truth["weights"][-1].shape[1] if truth["weights"] else loadings.shape[0]
    latents = [rng.poisson(truth["prior_rate"], size=(num_docs, top_size)).astype(float)]
    for w in reversed(truth["weights"]):
        latents.insert(0, rng.poisson(latents[0] @ w.T + truth["rate_offset"]).astype(float))
    logits = truth["background"] + latents[0] @ loadings
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    lengths = 1 + rng.poisson(mean_length - 1, size=num_docs)
    counts = rng.multinomial(lengths, probs)
    return torch.as_tensor(counts, dtype=torch.float32), latents


def save_corpus(path, counts, vocabulary=None) -> None:
    """Writes a document-term count matrix (dense array or SciPy sparse matrix, documents by
    vocabulary) to a ``.npz`` file that :func:`load_corpus` reads: the key ``counts`` and,
    if given, ``vocabulary`` (one string per column)."""
    import scipy.sparse

    counts = counts.toarray() if scipy.sparse.issparse(counts) else np.asarray(counts)
    arrays = {"counts": counts}
    if vocabulary is not None:
        arrays["vocabulary"] = np.asarray(vocabulary, dtype=str)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_corpus(path, *, seed=0, test_fraction=0.2, vocab_size=2000) -> Corpus:
    """A user-supplied corpus, split into training and test documents by a permutation drawn
    from ``seed``; documents without a word in the vocabulary are dropped.

    Formats:

    - a ``.npz`` file with a document-term count matrix, documents by vocabulary: either a
      SciPy sparse matrix saved by ``scipy.sparse.save_npz``, or a dense array under the key
      ``counts`` (:func:`save_corpus` writes one), with an optional ``vocabulary`` array;
    - a directory of ``.txt`` files (searched recursively, one document per file), or a
      ``.txt`` file with one document per line: tokenized by scikit-learn's
      ``CountVectorizer`` (lowercase, words of two or more letters, English stop words
      removed), keeping the ``vocab_size`` most frequent words.

    A file that cannot be read, or holds no valid counts, raises
    :class:`~pyro_relax.experiments.common.CorruptFileError` (a ``ValueError``) naming it.
    """
    path = Path(path)
    if not path.exists():
        raise common.ExperimentError(f"{path}: no such corpus file or directory")
    if path.is_dir() or path.suffix == ".txt":
        counts, vocabulary = _tokenize(path, vocab_size)
    elif path.suffix == ".npz":
        counts, vocabulary = _read_npz(path)
    else:
        raise common.ExperimentError(
            f"{path}: a corpus is a .npz file of counts, a .txt file of documents (one per "
            "line) or a folder of .txt files"
        )
    counts = counts[counts.sum(-1) > 0]
    if len(counts) < 2:
        raise common.CorruptFileError(
            f"{path}: need at least two nonempty documents, got {len(counts)}"
        )
    order = np.random.default_rng([seed, 0xC0B]).permutation(len(counts))
    num_test = min(max(1, round(test_fraction * len(counts))), len(counts) - 1)
    counts = torch.as_tensor(counts, dtype=torch.float32)
    test, train = counts[order[:num_test]], counts[order[num_test:]]
    return Corpus(path.name, vocabulary, train, test)


def _corpus_digest(corpus: Corpus) -> str | None:
    """A fingerprint of a user-supplied corpus's training and test counts, which its file,
    ``--test-fraction``, ``--vocab-size`` and the seed all change; ``None`` for a synthetic
    corpus, which its name and the seed determine."""
    if corpus.truth is not None:
        return None
    digest = hashlib.sha256()
    for counts in (corpus.train, corpus.test):
        digest.update(str(tuple(counts.shape)).encode())
        digest.update(counts.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_npz(path):
    import scipy.sparse

    try:
        # Opened here: NumPy leaves the file open when the archive is damaged.
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as arrays:
            names = arrays.files
            if "format" in names:  # written by scipy.sparse.save_npz
                counts = scipy.sparse.load_npz(path).toarray()
            else:
                counts = arrays["counts"] if "counts" in names else None
            vocabulary = arrays["vocabulary"].tolist() if "vocabulary" in names else None
    # A damaged archive fails in the zip reader (BadZipFile), in NumPy (ValueError, EOFError)
    # or in the file system (OSError).
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise common.CorruptFileError(
            f"{path} is not a readable .npz corpus ({common.describe(error)}); write it again"
        ) from None
    if counts is None:
        raise common.CorruptFileError(f"{path}: expected a sparse matrix or the key 'counts'")
    counts = np.asarray(counts, dtype=float)
    # (An infinite count passes the other two tests: inf == round(inf).)
    if (
        counts.ndim != 2
        or not np.isfinite(counts).all()
        or (counts < 0).any()
        or (counts != np.round(counts)).any()
    ):
        raise common.CorruptFileError(f"{path}: counts must be a 2-D array of nonnegative integers")
    if vocabulary is None:
        vocabulary = [f"w{v}" for v in range(counts.shape[1])]
    if len(vocabulary) != counts.shape[1]:
        raise common.CorruptFileError(
            f"{path}: {len(vocabulary)} words for {counts.shape[1]} columns"
        )
    return counts, vocabulary


def _tokenize(path: Path, vocab_size: int):
    from sklearn.feature_extraction.text import CountVectorizer

    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        documents = [p.read_text(errors="replace") for p in files]
    else:
        documents = path.read_text(errors="replace").splitlines()
    vectorizer = CountVectorizer(
        lowercase=True,
        stop_words="english",
        token_pattern=r"(?u)\b[^\W\d_]{2,}\b",
        max_features=vocab_size,
    )
    if not documents:
        raise common.CorruptFileError(
            f"{path}: no documents (a directory of .txt files or a text file)"
        )
    try:
        counts = vectorizer.fit_transform(documents).toarray().astype(float)
    except ValueError as error:  # scikit-learn's "empty vocabulary"
        raise common.CorruptFileError(
            f"{path}: no word to count ({error}); the documents hold only stop words, numbers "
            "or one-letter tokens"
        ) from None
    return counts, vectorizer.get_feature_names_out().tolist()


# ---------------------------------------------------------------------------------------------
# Scoring the discrete model


def _discrete_model_and_guide(decoder, encoder, truncation):
    """The discrete Poisson DEF that perplexity scores (untruncated Poisson priors) and the
    guide of the estimator: Poisson, or with ``truncation`` the GenGS guide, which
    :func:`~pyro_relax.infer.discretize` turns into its truncated PMF over ``0..n-1`` (the
    last outcome absorbing the tail)."""
    model, guide = _model_and_guide(decoder, encoder, None)
    if truncation is not None:
        # The truncation is deliberate here: no warning about the tail.
        _, guide = _model_and_guide(decoder, encoder, truncation, 1.0, tail_tolerance=None)
    return model, guide


@torch.no_grad()
def perplexity(
    decoder, encoder, x, *, truncation=None, num_samples=32, seed=0, bound="elbo"
) -> float:
    r""":math:`\exp(-\sum_d B_d / \sum_d N_d)` over the documents of ``x``, where :math:`B_d`
    bounds :math:`\log p(x_d)` under the discrete Poisson DEF of ``decoder`` (untruncated
    Poisson priors), with the guide of ``encoder``: Poisson, or with ``truncation`` the
    truncated PMF of a GenGS guide. ``bound="elbo"``: the ELBO, by
    :func:`~pyro_relax.infer.discrete_elbo` with ``num_samples`` draws; ``bound="iwae"``: the
    importance-weighted bound of Burda et al. per document, by
    :func:`~pyro_relax.infer.discrete_log_likelihood` with ``num_samples`` particles. Draws
    come from a generator seeded with ``seed`` (the global random state is left alone).
    ``inf`` where it exceeds the largest float (NaN where the bound is)."""
    if bound not in ("elbo", "iwae"):
        raise ValueError(f'unknown bound {bound!r}; use "elbo" or "iwae"')
    model, guide = _discrete_model_and_guide(decoder, encoder, truncation)
    # Documents per chunk: the samples-by-vocabulary tensors of a chunk stay near 16 MB.
    size = max(1, min(_EVAL_CHUNK, 2**22 // (num_samples * x.shape[1])))
    total = 0.0
    for start in range(0, len(x), size):
        chunk = x[start : start + size]
        with common.private_rng(seed + start, x.device):
            if bound == "elbo":
                estimate = discrete_elbo(
                    model, guide, chunk, num_samples=num_samples, max_plate_nesting=1,
                    chunk_size=num_samples,
                )  # fmt: skip
            else:
                estimate = discrete_log_likelihood(
                    model, guide, chunk, num_particles=num_samples, data_plate="documents",
                    max_plate_nesting=1, chunk_size=num_samples,
                )  # fmt: skip
        total += estimate.value
    nats_per_word = -total / float(x.sum())
    # Beyond float64's range (a bound of over 709 nats a word: a model gone wrong) it is inf.
    return math.exp(nats_per_word) if nats_per_word < math.log(sys.float_info.max) else math.inf


# ---------------------------------------------------------------------------------------------
# Training


def _model_and_guide(decoder, encoder, truncation, temperature=None, **gengs_options):
    """Model and guide with GenGS latents over ``truncation`` outcomes at ``temperature`` (and
    ``gengs_options``), or Poisson ones if it is None."""

    def latent(rate):
        if temperature is None:
            return dist.Poisson(rate).to_event(1)
        return GenGSPoisson(rate, temperature, truncation, **gengs_options).to_event(1)

    def model(x):
        pyro.module("decoder", decoder)
        top_size = decoder.layers[-1]
        with pyro.plate("documents", x.shape[0]):
            above = None
            for layer in reversed(range(len(decoder.layers))):
                if above is None:
                    rate = x.new_full((x.shape[0], top_size), decoder.prior_rate)
                else:
                    # With GenGS, `above` is relaxed: the prior's rate is a smooth function of
                    # it, and the truncated PMF (and the KL) are defined for any positive rate.
                    rate = decoder.conditional_rate(layer, above)
                above = pyro.sample(f"z{layer + 1}", latent(rate))
            pyro.factor("x", decoder.log_likelihood(x, above))

    def guide(x):
        pyro.module("encoder", encoder)
        # Only the score-function (REINFORCE) estimator reads the baseline.
        infer = {"baseline": {"use_decaying_avg_baseline": True}} if temperature is None else {}
        rates = encoder(x)
        with pyro.plate("documents", x.shape[0]):
            # The model's order, top layer first, as TraceMeanField_ELBO asks.
            for layer in reversed(range(len(rates))):
                pyro.sample(f"z{layer + 1}", latent(rates[layer]), infer=infer)

    return model, guide


def _steps_per_epoch(num_docs, config) -> int:
    # Full batches only: the decaying-average baseline keeps one value per batch position.
    return max(num_docs // config.batch_size, 1)


def word_log_frequencies(train: torch.Tensor) -> torch.Tensor:
    """The log word frequencies of the documents ``train`` (rows of word counts), each count
    plus one so that no word has probability 0: the background the decoder starts at."""
    frequencies = train.sum(0) + 1
    return (frequencies / frequencies.sum()).log()


def word_frequency_perplexity(train: torch.Tensor, x: torch.Tensor) -> float:
    r"""The perplexity :math:`\exp(-\sum_{d,v} x_{dv} \log f_v / \sum_{d,v} x_{dv})` of the
    documents ``x`` under the word frequencies :math:`f` of ``train``
    (:func:`word_log_frequencies`): the decoder's likelihood with no latents, what a model
    whose guide ignores its latents can reach at best (the KL terms of its ELBO only add)."""
    log_f = word_log_frequencies(train).to(x.device)
    return math.exp(-float((x * log_f).sum()) / float(x.sum()))


def _networks(corpus, config, device):
    common.seed_everything(config.seed)
    vocab_size = corpus.train.shape[1]
    background = word_log_frequencies(corpus.train)
    decoder = PoissonDEF(
        vocab_size, config.layers, config.prior_rate, config.rate_offset, background
    )
    encoder = Encoder(vocab_size, config.layers, config.hidden)
    return decoder.to(device), encoder.to(device)


def _svi(estimator, decoder, encoder, config, total_steps, device):
    """The SVI of ``estimator`` and its temperature schedule (which REINFORCE ignores)."""
    schedule = ExponentialDecay(
        config.initial_temperature, config.final_temperature, max(total_steps, 1), device=device
    )
    if estimator == GENGS:
        model, guide = _model_and_guide(decoder, encoder, config.truncation, schedule.temperature)
        # The analytic categorical KL of each layer given the (relaxed) layer above, plus the
        # relaxed likelihood: the paper's objective, with less variance than the soft log-PMF.
        loss = TraceMeanField_ELBO()
    elif estimator == REINFORCE:
        model, guide = _model_and_guide(decoder, encoder, config.truncation)
        loss = TraceGraph_ELBO()
    else:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")
    return SVI(model, guide, Adam({"lr": config.learning_rate}), loss), schedule


def _evaluation_truncation(estimator, config):
    return config.truncation if estimator == GENGS else None


def _max_tail_mass(encoder, x, truncation) -> float | None:
    """The largest mass beyond the last GenGS outcome over the guide's latents on ``x``."""
    if truncation is None:
        return None
    with torch.no_grad():
        rates = torch.cat(encoder(x), -1)
        return float(GenGSPoisson(rates, 1.0, truncation, tail_tolerance=None).tail_mass.max())


def _baselines():
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store if name.startswith("__baseline")}


def _named_parameters(encoder, decoder):
    """The trained parameters, named: not the score-function baselines (running averages of a
    cost, which may be large), nor a fixed true model's (whose excluded words are -inf)."""

    def named():
        networks = (("encoder", encoder), ("decoder", decoder))
        for prefix, network in networks:
            for name, parameter in network.named_parameters(prefix=prefix):
                if parameter.requires_grad:
                    yield name, parameter

    return named


def train(
    estimator, corpus, config, *, decoder=None, checkpoint=None, device="cpu", on_epoch_end=None
) -> dict:
    """Trains the NVPDEF on ``corpus.train`` with ``estimator`` and returns its record.

    With a fixed ``decoder`` (a :class:`PoissonDEF` without gradients, say the true model of a
    synthetic corpus) only the guide is trained, and the record's estimator is
    :data:`TRUE_MODEL`. With a :class:`~pyro_relax.experiments.common.Checkpoint`, the state
    is saved after every epoch and the finished record at the end, and a saved state is resumed
    (a saved record is returned as it is); the caller removes the checkpoint once the record is
    merged. ``on_epoch_end(epoch)`` is called after each epoch's checkpoint (tests interrupt a
    run with it).
    """
    if decoder is not None and tuple(decoder.layers) != tuple(config.layers):
        raise ValueError(
            f"the fixed decoder has layers {tuple(decoder.layers)} and the configuration "
            f"{tuple(config.layers)}: the guide is built from the configuration's, so they "
            "must be equal"
        )
    pyro.clear_param_store()
    learned, encoder = _networks(corpus, config, device)
    label = estimator if decoder is None else TRUE_MODEL
    decoder = learned if decoder is None else decoder.to(device)
    train_x, test_x = corpus.train.to(device), corpus.test.to(device)
    steps = _steps_per_epoch(len(train_x), config)
    svi, schedule = _svi(estimator, decoder, encoder, config, config.epochs * steps, device)
    truncation = _evaluation_truncation(estimator, config)
    shuffle = torch.Generator().manual_seed(config.seed)
    history, start_epoch, seconds = [], 0, 0.0

    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        if "record" in state:
            return state["record"]
        with state.restoring():
            decoder.load_state_dict(state["decoder"])
            encoder.load_state_dict(state["encoder"])
            for name, value in state["baselines"].items():
                pyro.get_param_store()[name] = value
            svi.optim.set_state(state["optimizer"])
            shuffle.set_state(state["shuffle"])
            schedule.load_state_dict(state["schedule"])
            history, start_epoch, seconds = state["history"], state["epoch"], state["seconds"]

    with common.progress(total=config.epochs, initial=start_epoch, desc=label, unit="epoch") as bar:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            where = f"{label}, epoch {epoch + 1}"
            quantities = _named_parameters(encoder, decoder)
            with common.diverging(where, quantities, config.learning_rate):
                order = torch.randperm(len(train_x), generator=shuffle)
                loss = 0.0
                for index in order[: steps * config.batch_size].view(steps, -1):
                    batch = train_x[index.to(device)]
                    loss += svi.step(batch) / float(batch.sum())
                    schedule.step()
                seconds += time.perf_counter() - started
                loss = common.finite(loss, "the loss", where, config.learning_rate)
                history.append(
                    {
                        "epoch": epoch + 1,
                        "temperature": float(schedule.temperature) if estimator == GENGS else None,
                        "train_loss_per_word": loss / steps,
                        "test_perplexity": common.finite(
                            perplexity(
                                decoder,
                                encoder,
                                test_x,
                                truncation=truncation,
                                num_samples=config.curve_samples,
                                seed=epoch,
                            ),
                            "the test perplexity",
                            where,
                            config.learning_rate,
                        ),
                        "max_tail_mass": _max_tail_mass(encoder, test_x, truncation),
                        "seconds": seconds,
                    }
                )
            bar.set_postfix(perplexity=f"{history[-1]['test_perplexity']:.1f}")
            bar.update()
            if checkpoint is not None:
                checkpoint.save(
                    {
                        "epoch": epoch + 1,
                        "decoder": decoder.state_dict(),
                        "encoder": encoder.state_dict(),
                        "baselines": _baselines(),
                        "optimizer": svi.optim.get_state(),
                        "shuffle": shuffle.get_state(),
                        "schedule": schedule.state_dict(),
                        "history": history,
                        "seconds": seconds,
                    }
                )
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)

    def final(x, seed, **kwargs):
        kwargs.setdefault("num_samples", config.eval_samples)
        return perplexity(decoder, encoder, x, truncation=truncation, seed=seed, **kwargs)

    objective = "TraceMeanField_ELBO" if estimator == GENGS else "TraceGraph_ELBO"
    if label == TRUE_MODEL:
        objective = f"true decoder, guide trained by {estimator} ({objective})"
    record = {
        "corpus": corpus.name,
        "corpus_digest": _corpus_digest(corpus),
        "estimator": label,
        "device": str(device),
        "seed": config.seed,
        "test_perplexity": final(test_x, 10**6),
        "train_perplexity": final(train_x, 2 * 10**6),
        "test_perplexity_iwae": final(
            test_x, 3 * 10**6, num_samples=config.iwae_samples, bound="iwae"
        ),
        "word_frequency_test_perplexity": word_frequency_perplexity(train_x, test_x),
        "epochs": config.epochs,
        "seconds": seconds,
        "objective": objective,
        "settings": dataclasses.asdict(config),
        "history": history,
    }
    if checkpoint is not None:
        checkpoint.save({"record": record})
    return record


# ---------------------------------------------------------------------------------------------
# Reporting


def _table(records) -> str:
    """The Markdown page of the results: a table and what its numbers mean."""
    rows = sorted(records, key=lambda r: (r["corpus"], r["seed"], r["estimator"]))
    columns = ["corpus", "estimator", "seed", "test_perplexity", "test_perplexity_iwae"]
    columns += ["train_perplexity", "epochs", "seconds"]
    formats = {c: ".2f" for c in columns if "perplexity" in c} | {"seconds": ".1f"}
    note = (
        "Perplexity exp(-sum_d B_d / sum_d N_d), lower is better. `test_perplexity` and "
        "`train_perplexity`: B_d is the ELBO of the discrete Poisson DEF (untruncated Poisson "
        "priors; the guide's discrete distribution, a GenGS one truncated), estimated by "
        "pyro_relax.infer.discrete_elbo, the same scorer for every estimator. "
        "`test_perplexity_iwae`: B_d is the importance-weighted bound with the guide as proposal "
        "(pyro_relax.infer.discrete_log_likelihood, per document). "
        "GenGS: GenGSPoisson in model and guide, TraceMeanField_ELBO, temperature 1.0 -> 0.1. "
        "REINFORCE: Poisson in model and guide, TraceGraph_ELBO with a decaying-average "
        "baseline. True model (synthetic corpora): the generating decoder, fixed, with a guide "
        "trained for it by GenGS. `seconds`: training steps only.\n"
    )
    baselines = {
        r["corpus"]: r["word_frequency_test_perplexity"]
        for r in rows
        if "word_frequency_test_perplexity" in r  # records written before it was stored
    }
    note += "".join(
        f"\nWord frequencies alone on {corpus} (no latents: the add-one smoothed training "
        f"frequencies the background starts at): test perplexity {value:.2f}.\n"
        for corpus, value in sorted(baselines.items())
    )
    settings = common.differing_settings(rows, _record_settings, shown=columns)
    table = common.markdown_table(rows, columns, formats, settings)
    return "# NVPDEF topic model: test perplexity\n\n" + table + "\n" + note


def _write_plot(path, records) -> None:
    """Test perplexity per epoch of each run, the true model's dashed, and the true model's
    importance-sampled perplexity dotted: all epochs on the left, the second half of training
    on the right."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.5))
    last = max(len(r["history"]) for r in records)
    for axes, first in zip(panels, (1, last // 2 + 1), strict=True):
        for record in records:
            points = [h for h in record["history"] if h["epoch"] >= first]
            true_model = record["estimator"] == TRUE_MODEL
            axes.plot(
                [h["epoch"] for h in points],
                [h["test_perplexity"] for h in points],
                "k--" if true_model else "-",
                label=f"{record['estimator']}: {record['objective']}",
            )
            if true_model:
                samples = record["settings"]["iwae_samples"]
                axes.axhline(
                    record["test_perplexity_iwae"],
                    color="k",
                    ls=":",
                    label=f"{TRUE_MODEL}: importance-sampled bound, {samples} draws",
                )
        axes.set_xlabel("epoch")
        axes.set_ylabel("test perplexity, discrete ELBO (lower is better)")
    corpus = records[0]["corpus"]
    panels[0].set_title(f"NVPDEF on {corpus}: test perplexity")
    panels[0].set_yscale("log")
    panels[1].set_title(f"epochs {last // 2 + 1} to {last}")
    panels[0].legend(fontsize=8)
    figure.tight_layout()
    common.save_figure(figure, path)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser) -> None:
    """Adds this experiment's options to its subcommand's ``parser``."""
    defaults = TopicConfig()
    parser.add_argument(
        "--corpus",
        default=None,
        help="a bag-of-words corpus: .npz count matrix (sparse from scipy.sparse.save_npz, or "
        "dense under 'counts'), a directory of .txt files, or a .txt file with one document "
        "per line (default: a synthetic corpus from a known Poisson DEF)",
    )
    parser.add_argument(
        "--vocab-size", type=positive_int, default=2000, help="words kept from text"
    )
    parser.add_argument(
        "--test-fraction", type=fraction, default=0.2, help="held-out documents of --corpus"
    )
    common.add_estimators_option(parser, ESTIMATORS)
    # Defaults None: an option given with --smoke is used (the help gives both defaults).
    default = functools.partial(common.both_defaults, defaults, SMOKE_CONFIG)

    parser.add_argument("--epochs", type=positive_int, help=default("epochs"))
    parser.add_argument(
        "--layers",
        type=positive_int,
        nargs="+",
        help=f"sizes, bottom first ({default('layers')})",
    )
    parser.add_argument("--hidden", type=positive_int, help=f"encoder width ({default('hidden')})")
    parser.add_argument("--batch-size", type=positive_int, help=default("batch_size"))
    parser.add_argument("--lr", type=positive_float, help=default("learning_rate"))
    parser.add_argument(
        "--truncation", type=integer_at_least(2), help=f"GenGS outcomes ({default('truncation')})"
    )
    parser.add_argument("--eval-samples", type=positive_int, help=default("eval_samples"))
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (default 1: the fastest here)",
    )


def _config(args) -> TopicConfig:
    config = common.given_options(
        SMOKE_CONFIG if args.smoke else TopicConfig(),
        args,
        {
            "hidden": "hidden",
            "epochs": "epochs",
            "batch_size": "batch_size",
            "learning_rate": "lr",
            "truncation": "truncation",
            "eval_samples": "eval_samples",
        },
    )
    return config if args.layers is None else dataclasses.replace(config, layers=tuple(args.layers))


def _corpus(args) -> Corpus:
    if args.corpus is None:
        corpus = synthetic_corpus(args.seed, SMOKE_SPEC if args.smoke else SyntheticSpec())
    else:
        corpus = load_corpus(
            args.corpus,
            seed=args.seed,
            test_fraction=args.test_fraction,
            vocab_size=args.vocab_size,
        )
    if args.smoke:  # few documents, and a name that keeps smoke rows apart from real ones
        corpus.name += "-smoke"
        corpus.train, corpus.test = corpus.train[:40], corpus.test[:20]
        if corpus.truth is not None:
            corpus.train_latents = [z[:40] for z in corpus.train_latents]
            corpus.test_latents = [z[:20] for z in corpus.test_latents]
    return corpus


def run(args) -> int:
    """Runs the experiment from the parsed command line; returns the exit code."""
    with common.torch_threads(args.threads):
        return _run(args)


def _run_settings(corpus: str, corpus_digest, estimator: str, device: str, config: dict) -> dict:
    """The settings that change a run's numbers: the corpus (its name, and the fingerprint of a
    user-supplied one), the estimator (or the true model), the device and every field of the
    :class:`TopicConfig`. ``--threads`` is left out: it changes how fast a run goes, not its
    numbers (up to rounding)."""
    identity = {"corpus": corpus, "corpus_digest": corpus_digest, "estimator": estimator}
    return identity | {"device": device} | config


def _record_settings(record) -> dict:
    """The settings of the run that made ``record`` (records written before the fingerprint
    and the device were stored are of the synthetic corpus, on the CPU)."""
    return _run_settings(
        record["corpus"],
        record.get("corpus_digest"),
        record["estimator"],
        record.get("device", "cpu"),
        record["settings"],
    )


def _checkpoint(results, corpus, label, config, device) -> common.Checkpoint:
    digest, values = _corpus_digest(corpus), dataclasses.asdict(config)
    settings = _run_settings(corpus.name, digest, label, str(device), values)
    name = f"topic-{corpus.name}-{label}-seed{config.seed}"
    return common.Checkpoint(common.checkpoint_path(results, name, settings), settings)


def _write_table(results: Path, records) -> None:
    """Writes the Markdown table of ``records`` next to the JSON (the figure shows this run's
    records only)."""
    common.atomic_write_text(results / "topic.md", _table(records))


def _run(args) -> int:
    results = Path(args.results)
    common.read_records(results / "topic.json", _write_table)  # a damaged file stops the run
    config, corpus = _config(args), _corpus(args)
    runs = [(estimator, None, config) for estimator in args.estimators]
    if corpus.truth is not None:
        # The true model's guide has the corpus's layers, whatever --layers gives the others.
        truth = PoissonDEF.from_truth(corpus.truth)
        runs.append((GENGS, truth, dataclasses.replace(config, layers=truth.layers)))
    records, checkpoints = [], []
    for estimator, decoder, run_config in runs:
        label = estimator if decoder is None else TRUE_MODEL
        checkpoints.append(_checkpoint(results, corpus, label, run_config, args.device))
        record = train(
            estimator,
            corpus,
            run_config,
            decoder=decoder,
            checkpoint=checkpoints[-1],
            device=args.device,
        )
        record.update(machine=common.machine(), command=args.command_line)
        # Merged as soon as it is finished: a later run that fails (or diverges) loses nothing.
        common.update_records(
            results / "topic.json",
            [record],
            _record_settings,
            lambda merged: _write_table(results, merged),
        )
        records.append(record)
    # Only now: until the whole command ends, a finished run's checkpoint holds its record, so
    # that the command run again after an interruption does not train it again.
    for checkpoint in checkpoints:
        checkpoint.remove()
    _write_plot(results / "topic.png", records)
    print(_table(records))
    print(f"results written to {results}/topic.json, topic.md and topic.png")
    return 0

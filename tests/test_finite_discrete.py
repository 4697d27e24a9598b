"""FiniteDiscrete: the categorical over given outcomes that a GenGS relaxes."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from torch.distributions import kl_divergence

import pyro_relax as pr

OUTCOMES = torch.tensor([0.0, 2.0, 5.0])
PROBS = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.0, 0.4]])


def test_log_prob_of_each_outcome_and_of_integer_values():
    d = pr.FiniteDiscrete(OUTCOMES, probs=PROBS)
    for k, outcome in enumerate(OUTCOMES.tolist()):
        expected = PROBS[:, k].log()
        torch.testing.assert_close(d.log_prob(torch.tensor(outcome)), expected)
    torch.testing.assert_close(d.log_prob(torch.tensor(5)), PROBS[:, 2].log())
    assert d.log_prob(torch.tensor(2.0))[1] == -torch.inf  # excluded outcome


def test_values_that_are_not_outcomes_are_refused():
    d = pr.FiniteDiscrete(OUTCOMES, probs=PROBS, validate_args=True)
    with pytest.raises(ValueError, match="not one of the outcomes"):
        d.log_prob(torch.tensor(1.0))
    assert not d.support.check(torch.tensor(1.0)) and d.support.check(torch.tensor(2.0))


def test_samples_follow_the_pmf():
    # A chi-square test of 20000 draws of the first row, rejecting at p < 1e-3.
    torch.manual_seed(0)
    d = pr.FiniteDiscrete(OUTCOMES, probs=PROBS)
    value = d.sample((20000,))
    assert value.shape == (20000, 2)
    observed = torch.stack([(value[:, 0] == c).sum() for c in OUTCOMES]).double()
    assert scipy.stats.chisquare(observed, 20000 * PROBS[0].double()).pvalue > 1e-3
    assert (value[:, 1] != 2.0).all()


def test_vector_outcomes_moments_and_enumeration():
    outcomes = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    d = pr.FiniteDiscrete(outcomes, logits=torch.zeros(4, 3))
    assert d.batch_shape == (4,) and d.event_shape == (2,)
    torch.testing.assert_close(d.mean, torch.ones(4, 2))
    torch.testing.assert_close(d.variance, torch.full((4, 2), 2 / 3))
    support = d.enumerate_support()
    assert support.shape == (3, 4, 2)
    torch.testing.assert_close(
        d.log_prob(support), torch.full((3, 4), -torch.log(torch.tensor(3.0)))
    )
    assert d.enumerate_support(expand=False).shape == (3, 1, 2)
    expanded = d.expand((5, 4))
    assert type(expanded) is pr.FiniteDiscrete and expanded.sample().shape == (5, 4, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"probs": PROBS, "logits": PROBS}, "exactly one"),
        ({"logits": torch.zeros(2)}, "shape \\(2,\\) or \\(2, d\\)"),
        ({"logits": torch.zeros(1)}, "at least 2"),
        ({"probs": torch.tensor([0.5, 0.6, -0.1])}, "probs"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pr.FiniteDiscrete(OUTCOMES, validate_args=True, **kwargs)


def test_kl_and_the_enumerated_elbo():
    q = pr.FiniteDiscrete(OUTCOMES, probs=PROBS[0])
    p = pr.FiniteDiscrete(OUTCOMES, logits=torch.zeros(3))
    expected = (PROBS[0] * (PROBS[0].log() + torch.log(torch.tensor(3.0)))).sum()
    torch.testing.assert_close(kl_divergence(q, p), expected)

    def model():
        z = pyro.sample("z", p)
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(2.0))

    def guide():
        pyro.sample("z", q)

    # The enumerated loss is exact: the expected log-likelihood minus the KL.
    log_likelihood = dist.Normal(OUTCOMES, 1.0).log_prob(torch.tensor(2.0))
    exact = -float((PROBS[0] * log_likelihood).sum() - expected)
    enumerated = TraceEnum_ELBO(max_plate_nesting=0).loss(model, config_enumerate(guide))
    assert enumerated == pytest.approx(exact, rel=1e-6)


def _kl_by_values(q, p):
    """sum over q's outcomes c of q(c) (log q(c) - log p(c)), p's probability found by value."""
    total = 0.0
    for c, q_c in zip(q.outcomes.tolist(), q.probs.tolist(), strict=True):
        p_c = sum(
            p_k for d, p_k in zip(p.outcomes.tolist(), p.probs.tolist(), strict=True) if d == c
        )
        if q_c > 0:
            total += q_c * (math.log(q_c) - (math.log(p_c) if p_c > 0 else -math.inf))
    return total


@pytest.mark.parametrize(
    "build",
    [pr.FiniteDiscrete, lambda outcomes, **kw: pr.TruncatedGenGS(0.5, outcomes=outcomes, **kw)],
    ids=["FiniteDiscrete", "TruncatedGenGS"],
)
@pytest.mark.parametrize(
    "q_outcomes, p_outcomes",
    [
        ([0.0, 1.0, 2.0], [2.0, 1.0, 0.0]),  # the same outcomes in another order
        ([0.0, 1.0, 2.0], [1.0, 2.0, 5.0]),  # some in common
        ([0.0, 1.0, 2.0], [10.0, 11.0, 12.0]),  # none in common
        ([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]], [[2.0, 2.0], [0.0, 1.0], [1.0, 0.0]]),  # vectors
    ],
    ids=["permuted", "overlapping", "disjoint", "vectors"],
)
def test_the_kl_pairs_outcomes_by_value(build, q_outcomes, p_outcomes):
    # The KL compared probabilities by position: two equal laws listed in different orders had
    # a positive KL, and laws on disjoint outcomes a KL of 0.
    q_outcomes, p_outcomes = torch.tensor(q_outcomes), torch.tensor(p_outcomes)
    q = build(q_outcomes, probs=torch.tensor([0.2, 0.3, 0.5]))
    p = build(p_outcomes, probs=torch.tensor([0.5, 0.2, 0.3]))
    scalar = lambda d: pr.FiniteDiscrete(torch.arange(3.0), probs=d.probs)  # noqa: E731
    if q_outcomes.dim() == 1:
        expected = _kl_by_values(q, p)
    else:  # vector outcomes: compare rows through their index in a common list
        rows = [tuple(r) for r in q_outcomes.tolist()]
        index = torch.tensor([float(rows.index(tuple(r))) for r in p_outcomes.tolist()])
        expected = _kl_by_values(scalar(q), pr.FiniteDiscrete(index, probs=p.probs))
    kl = kl_divergence(q, p)
    assert float(kl) == pytest.approx(expected, rel=1e-6)
    if q_outcomes.tolist() == [0.0, 1.0, 2.0] and p_outcomes.tolist() == [2.0, 1.0, 0.0]:
        permuted = build(p_outcomes, probs=torch.tensor([0.5, 0.3, 0.2]))  # q's law
        assert float(kl_divergence(q, permuted)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_a_relaxed_sample_is_scored_by_the_outcomes_it_was_drawn_over(vector):
    # log_prob paired the sample's weights with the scorer's outcomes by position: a prior
    # listing the guide's outcomes in another order scored each weight by another outcome's
    # probability, silently (the KL pairs them by value).
    table = [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]] if vector else [0.0, 1.0, 2.0]
    table, order = torch.tensor(table), torch.tensor([2, 0, 1])
    probs = torch.tensor([0.2, 0.3, 0.5])
    q = pr.TruncatedGenGS(0.5, probs=probs, outcomes=table)
    torch.manual_seed(0)
    z = q.rsample((50,))
    weights = pr.relaxation_of(z).weights
    same_law = pr.TruncatedGenGS(0.5, probs=probs[order], outcomes=table[order])
    torch.testing.assert_close(same_law.log_prob(z), q.log_prob(z))
    torch.testing.assert_close(q.log_prob(z), weights @ probs.log())
    # A scorer without the first outcome (replaced by another) gives it probability 0: the
    # score is about -1e30 times its weight, as in the KL (infinite).
    other_table = table.clone()
    other_table[0] = -1.0  # the support still holds the sample
    other = pr.TruncatedGenGS(0.5, probs=probs[order], outcomes=other_table[order])
    expected = weights[:, 1:] @ probs[1:].log() - 1e30 * weights[:, 0]
    torch.testing.assert_close(other.log_prob(z), expected)


def test_the_kl_by_value_has_finite_gradients_where_outcomes_are_missing():
    # q gives no mass to 2, which p lacks: a finite KL with finite gradients.
    logits = torch.tensor([0.5, -1.0], requires_grad=True)
    q_logits = torch.cat([logits.log_softmax(-1), torch.tensor([-math.inf])])
    q = pr.FiniteDiscrete(torch.tensor([0.0, 1.0, 2.0]), logits=q_logits)
    p = pr.FiniteDiscrete(torch.tensor([1.0, 0.0, 7.0]), probs=torch.tensor([0.4, 0.4, 0.2]))
    kl = kl_divergence(q, p)
    assert torch.isfinite(kl)
    (gradient,) = torch.autograd.grad(kl, logits)
    assert torch.isfinite(gradient).all()


# --- KL to an untruncated count distribution -------------------------------------------------


@pytest.mark.parametrize(
    "count",
    [
        dist.Poisson(torch.tensor([0.5, 3.0])),
        dist.Geometric(probs=torch.tensor([0.2, 0.7])),
        dist.NegativeBinomial(torch.tensor([2.0, 5.0]), probs=torch.tensor([0.3, 0.6])),
        dist.Binomial(torch.tensor([9.0, 12.0]), probs=torch.tensor([0.3, 0.6])),
    ],
    ids=["poisson", "geometric", "negative-binomial", "binomial"],
)
def test_kl_to_a_count_distribution_is_the_finite_sum(count):
    logits = torch.randn(3, 1, 10, generator=torch.Generator().manual_seed(0))
    logits[0, 0, 4] = -math.inf  # an outcome without mass contributes nothing
    q = pr.FiniteDiscrete(torch.arange(10.0), logits=logits)
    kl = kl_divergence(q, count)
    assert kl.shape == (3, 2)
    for i, j in itertools.product(range(3), range(2)):
        expected = 0.0
        for k in range(10):
            q_k = float(q.probs[i, 0, k])
            if q_k > 0:
                p_k = float(count.log_prob(torch.tensor(float(k)))[j])
                expected += q_k * (math.log(q_k) - p_k)
        assert float(kl[i, j]) == pytest.approx(expected, rel=1e-5)


def test_kl_to_a_count_distribution_is_infinite_outside_its_support():
    q = pr.FiniteDiscrete(torch.arange(4.0), probs=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert kl_divergence(q, dist.Binomial(2, torch.tensor(0.5))) == math.inf  # 3 > 2 trials
    inside = pr.FiniteDiscrete(torch.arange(4.0), probs=torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert math.isfinite(kl_divergence(inside, dist.Binomial(2, torch.tensor(0.5))))
    vectors = pr.FiniteDiscrete(torch.eye(3), probs=torch.ones(3) / 3)
    with pytest.raises(ValueError, match=r"KL\(FiniteDiscrete \|\| Poisson\) needs one event"):
        kl_divergence(vectors, dist.Poisson(torch.tensor(1.0)))


def test_a_value_that_is_no_outcome_scores_nan_without_validation():
    # Without validation such a value took the log-probability of its nearest outcome: a step
    # function of the value, which NUTS (Pyro's MCMC turns validation off) sampled as if it were
    # a density, drawing non-integer counts. It has no probability: NaN, loud where it lands.
    lax = {"validate_args": False}
    counts = pr.GenGSPoisson(torch.tensor([2.0, 3.0]), 0.5, 10, **lax)
    scores = counts.log_prob(torch.tensor([2.0, 2.4]))
    assert bool(torch.isfinite(scores[0])) and bool(torch.isnan(scores[1]))
    outcomes = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    finite = pr.FiniteDiscrete(outcomes, probs=torch.tensor([0.3, 0.7]), **lax)
    scores = finite.log_prob(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    assert bool(torch.isfinite(scores[0])) and bool(torch.isnan(scores[1]))
    hard = pr.IGR(torch.zeros(2), torch.ones(2), 0.5, hard=True, **lax)
    scores = hard.log_prob(torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.5, 0.3]]))
    assert bool(torch.isfinite(scores[0])) and bool(torch.isnan(scores[1]))


def test_a_value_of_the_wrong_shape_is_refused_by_name():
    # torch's broadcasting error came from the gather, which Pyro does not attribute to a site.
    d = pr.FiniteDiscrete(torch.arange(3.0), probs=torch.ones(2, 3) / 3, validate_args=True)
    with pytest.raises(ValueError, match=r"shape \(3,\), which does not broadcast"):
        d.log_prob(torch.zeros(3))
    vectors = pr.FiniteDiscrete(torch.eye(3), probs=torch.ones(3) / 3, validate_args=True)
    with pytest.raises(ValueError, match=r"event shape \(3,\)"):
        vectors.log_prob(torch.zeros(2))
    assert d.log_prob(torch.zeros(4, 1)).shape == (4, 2)


def test_mode_cdf_and_icdf_follow_their_definitions():
    # The relaxations send a user to d.discrete().mode / .cdf / .icdf, which raised torch's
    # bare NotImplementedError. Outcomes in no order, a batch of two PMFs, an outcome of
    # probability 0.
    outcomes = torch.tensor([5.0, 0.0, 1.0, 3.0])
    probs = torch.tensor([[0.1, 0.4, 0.0, 0.5], [0.3, 0.3, 0.2, 0.2]], dtype=torch.float64)
    d = pr.FiniteDiscrete(outcomes.double(), probs=probs)
    assert d.mode.tolist() == [3.0, 5.0]  # the first of the two most probable: 5
    for x in (-1.0, 0.0, 0.5, 1.0, 3.0, 4.9, 5.0, 9.0):
        expected = [
            sum(p for c, p in zip(outcomes.tolist(), row, strict=True) if c <= x)
            for row in probs.tolist()
        ]
        torch.testing.assert_close(
            d.cdf(torch.tensor(x)), torch.tensor(expected, dtype=torch.float64)
        )
    for q in (0.0, 0.1, 0.4, 0.45, 0.5, 0.9, 1.0):
        expected = []
        for row in probs.tolist():
            ranked = sorted(zip(outcomes.tolist(), row, strict=True))
            # The smallest outcome whose cumulative probability reaches q (of positive mass at 0).
            total, found = 0.0, None
            for c, p in ranked:
                total += p
                if total >= q and (q > 0 or p > 0):
                    found = c
                    break
            expected.append(found)
        assert d.icdf(torch.tensor(q, dtype=torch.float64)).tolist() == expected, q
    assert d.icdf(torch.tensor([[0.2], [0.7]])).shape == (2, 2)
    vectors = pr.FiniteDiscrete(torch.eye(3), probs=torch.tensor([0.2, 0.3, 0.5]))
    assert vectors.mode.tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(NotImplementedError, match="FiniteDiscrete.cdf: outcomes that are vectors"):
        vectors.cdf(torch.zeros(3))


def test_icdf_of_level_one_is_the_last_outcome_of_positive_probability():
    # In float32 the cumulative sum may end just under 1: level 1 fell past every position and
    # gave the largest outcome, of probability 0. Brute force over random float32 PMFs with
    # excluded outcomes, against the definition (the least outcome whose cumulative
    # probability, as summed, reaches min(q, total)).
    generator = torch.Generator().manual_seed(0)
    outcomes = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    for _ in range(300):
        logits = torch.randn(5, generator=generator) * 3
        logits[torch.rand(5, generator=generator) < 0.3] = -math.inf
        if logits.isneginf().all():
            continue
        d = pr.FiniteDiscrete(outcomes, logits=logits)
        probs = d.probs
        for q in (0.0, 0.5, 1.0):
            cumulative, expected = 0.0, None
            for c, p in zip(outcomes.tolist(), probs.tolist(), strict=True):
                cumulative += p
                if p > 0 and cumulative >= min(q, float(probs.sum())) - 1e-6:
                    expected = c
                    break
            got = float(d.icdf(torch.tensor(q)))
            assert probs[int(got)] > 0 and got == expected, (logits, q)


def test_the_entropy_of_a_batch_is_that_of_each_element():
    # Against scipy, per batch element: the registry's check compares a GenGS's entropy with its
    # discrete() distribution's, which is the same function.
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]], dtype=torch.float64)
    d = pr.FiniteDiscrete(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), probs=probs)
    expected = torch.as_tensor(scipy.stats.entropy(probs.numpy(), axis=-1))
    torch.testing.assert_close(d.entropy(), expected)
    # A GenGS's is that of its truncated PMF, tail bin from scipy's survival function.
    rate = [[1.0], [4.0]]
    pmf = torch.as_tensor(scipy.stats.poisson.pmf(range(11), mu=rate))
    tail = torch.as_tensor(scipy.stats.poisson.sf(10, mu=rate))
    truncated = torch.cat([pmf, tail], -1)
    relaxed = pr.GenGSPoisson(torch.tensor([1.0, 4.0], dtype=torch.float64), 0.5, 12)
    expected = torch.as_tensor(scipy.stats.entropy(truncated.numpy(), axis=-1))
    torch.testing.assert_close(relaxed.entropy(), expected)

"""How good is the discrete model: its ELBO and its importance-weighted log-likelihood."""

import dataclasses
import math

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from tqdm import tqdm

from pyro_relax._numerics import check_count, check_flag
from pyro_relax.infer.handlers import discretize

__all__ = ["Estimate", "discrete_elbo", "discrete_log_likelihood"]

# The plate that vectorizes the particles, outside every plate of the model.
_PARTICLES = "_pyro_relax_particles"


@dataclasses.dataclass(frozen=True)
class Estimate:
    r"""A Monte Carlo estimate and its standard error (both in nats), as
    :func:`discrete_elbo` and :func:`discrete_log_likelihood` return them: for the mean of
    :math:`S` draws :math:`v_s`,

    .. math::
        \hat v = \frac{1}{S} \sum_{s=1}^S v_s, \qquad
        \operatorname{se}(\hat v) = \frac{\hat\sigma}{\sqrt{S}}.

    ``str()`` shows ``value ± standard_error``.

    References:
        Importance Weighted Autoencoders.
        Yuri Burda, Roger Grosse, Ruslan Salakhutdinov, 2016.
        https://arxiv.org/abs/1509.00519

    Attributes:
        value (float): the estimate.
        standard_error (float): its standard error.
        num_samples (int): how many draws (particles) it averages.

    Example:
        >>> print(Estimate(-3.14159, 0.0123, 100))
        -3.1416 ± 0.012
    """

    value: float
    standard_error: float
    num_samples: int

    def __str__(self) -> str:
        return f"{self.value:.4f} ± {self.standard_error:.2g}"


def discrete_elbo(
    model,
    guide,
    *args,
    num_samples: int = 100,
    max_plate_nesting: int | None = None,
    vectorize_particles: bool = True,
    chunk_size: int = 100,
    progress: bool = False,
    **kwargs,
) -> Estimate:
    r"""The ELBO of the discrete model that the relaxed ``model`` and ``guide`` stand for.

    Both run under :func:`~pyro_relax.infer.discretize`, so every relaxed site is replaced
    by its discrete distribution, whichever estimator trained them; the estimate averages
    ``num_samples`` independent draws of the guide:

    .. math::
        \mathrm{ELBO} = \mathbb{E}_{q(z)}\big[\log p(x, z) - \log q(z)\big]
        \approx \frac{1}{S} \sum_{s=1}^S \log \frac{p(x, z^{(s)})}{q(z^{(s)})},

    with standard error :math:`\hat\sigma / \sqrt{S}`; where a plate of the model or the guide
    scores a subsample of its items, the particles of one vectorized pass share the subsample:
    they are then drawn in at least 10 passes (``num_samples`` passes of one if fewer), and the
    standard error is that of the mean over passes. It is the ELBO of the whole call (summed
    over the data the model sees, with subsampling scales applied as ``Trace_ELBO`` applies
    them): divide by the number of items for a per-item figure. No gradient is recorded.
    Draws come from Pyro's random state (seed it with ``pyro.set_rng_seed``).

    The discrete distribution of an ``IGRStickBreaking``, ``IGRCount`` or ``IGRPlanar`` site is
    itself a Monte Carlo estimate (10,000 draws, anew at each pass; see
    ``IGRStickBreaking.discrete``): where a guide draws categories that are rare under the
    model, their log-probabilities are those of counts of a few draws (or of ``eps``), the
    estimate is biased, and the standard error does not count that noise. The other families'
    discrete distributions are exact.

    Extra keyword arguments go to the model and guide; the options below take their names.

    References:
        Auto-Encoding Variational Bayes.
        Diederik P. Kingma, Max Welling, 2014.
        https://arxiv.org/abs/1312.6114

    Arguments:
        model, guide: a Pyro model and guide (relaxed or not); the guide samples every
            latent site of the model (a site enumerated in the model only is refused, and so
            is a guide that runs the model itself, a ``GuideMessenger``).
        *args: passed to ``model`` and ``guide``.
        num_samples (int): guide draws, at least 2.
        max_plate_nesting (int): the number of plate dimensions (guessed by tracing once if
            ``None``).
        vectorize_particles (bool): draw ``chunk_size`` particles at once in a plate outside
            the model's plates (the model must broadcast); else one at a time.
        chunk_size (int): particles per vectorized pass (bounds the memory).
        progress (bool): show a progress bar over the particles.

    Returns:
        Estimate: the ELBO, its standard error and ``num_samples``.

    Example:
        >>> import pyro
        >>> import pyro.distributions as dist
        >>> import pyro_relax as pr
        >>> def model(x):
        ...     z = pyro.sample("z", pr.GenGSPoisson(torch.tensor(2.0), 0.5, 12))
        ...     pyro.sample("x", dist.Poisson(z + 0.1), obs=x)
        >>> def guide(x):
        ...     pyro.sample("z", pr.GenGSPoisson(torch.tensor(3.0), 0.5, 12))
        >>> estimate = discrete_elbo(model, guide, torch.tensor(4.0), num_samples=1000)
        >>> -5 < estimate.value < 0
        True
    """
    num_samples = check_count("discrete_elbo", "num_samples", num_samples, minimum=2)
    weights = _log_weights(
        model, guide, args, kwargs, num_samples, max_plate_nesting, vectorize_particles,
        chunk_size, data_plate=None, scaled=True, min_passes=_SUBSAMPLED_PASSES,
        progress=progress, owner="discrete_elbo",
    )  # fmt: skip
    totals = weights.log_weights.sum(-1)
    value = float(totals.mean())
    if not weights.subsampled or not vectorize_particles:
        return Estimate(value, float(totals.std() / math.sqrt(num_samples)), num_samples)
    # The particles of one vectorized pass share the plate's subsample: they are not
    # independent, the passes are (at least two). The standard error of the mean over passes.
    passes = totals.split(weights.pass_sizes)
    means = torch.stack([chunk.mean() for chunk in passes])
    share = torch.tensor(weights.pass_sizes, dtype=torch.float64) / num_samples
    variance = (share * (means - value).square()).sum() / (1 - share.square().sum())
    return Estimate(value, float((share.square().sum() * variance).sqrt()), num_samples)


def discrete_log_likelihood(
    model,
    guide,
    *args,
    num_particles: int = 1000,
    data_plate: str | None = None,
    max_plate_nesting: int | None = None,
    vectorize_particles: bool = True,
    chunk_size: int = 100,
    progress: bool = False,
    **kwargs,
) -> Estimate:
    r"""The importance-weighted lower bound on :math:`\log p(x)` of the discrete model (Burda
    et al.), with the discrete guide as the proposal.

    Model and guide run under :func:`~pyro_relax.infer.discretize`. With ``data_plate``, the
    name of a plate every sample site lies in (items independent given nothing global), the
    bound is taken per item and summed,

    .. math::
        \log p(x) \ge \sum_i \mathbb{E}\Big[\log \frac{1}{K} \sum_{k=1}^K
        \frac{p(x_i, z_i^{(k)})}{q(z_i^{(k)})}\Big], \qquad z_i^{(k)} \sim q(z_i),

    which is what one reports for a VAE; without it the bound is taken over the whole call,
    which is tight only for small models. The bound rises with ``num_particles`` :math:`K`,
    is at least the ELBO and reaches :math:`\log p(x)` when the guide is the posterior. The
    standard error is that of the delta method, :math:`\hat\sigma_w / (\sqrt{K}\, \bar w)`
    per item (summed in quadrature); it is unreliable when a few weights dominate. A
    subsampled data plate scales the per-item bounds by its scale; a random subsample is drawn
    once and every particle scores the same items. The standard error then adds the variance
    of the subsample, that of :math:`N` times the mean of :math:`b` items drawn without
    replacement from :math:`N`, estimated from the spread :math:`s^2` of the :math:`b`
    per-item bounds: :math:`N^2 (1 - b / N)\, s^2 / b` (``NaN`` for one item). No gradient is
    recorded. As for :func:`discrete_elbo`, the discrete distributions of ``IGRStickBreaking``,
    ``IGRCount`` and ``IGRPlanar`` sites are Monte Carlo estimates, whose noise the standard
    error does not count.

    Extra keyword arguments go to the model and guide; the options below take their names.

    References:
        Importance Weighted Autoencoders.
        Yuri Burda, Roger Grosse, Ruslan Salakhutdinov, 2016.
        https://arxiv.org/abs/1509.00519

    Arguments:
        model, guide: a Pyro model and guide (relaxed or not); the guide samples every
            latent site of the model (a site enumerated in the model only is refused, and so
            is a guide that runs the model itself, a ``GuideMessenger``).
        *args: passed to ``model`` and ``guide``.
        num_particles (int): importance samples :math:`K` per item.
        data_plate (str): the name of the plate over independent items, or ``None``.
        max_plate_nesting (int): the number of plate dimensions (guessed by tracing once if
            ``None``).
        vectorize_particles (bool): draw ``chunk_size`` particles at once in a plate outside
            the model's plates (the model must broadcast); else one at a time.
        chunk_size (int): particles per vectorized pass (bounds the memory).
        progress (bool): show a progress bar over the particles.

    Returns:
        Estimate: the bound, its standard error and ``num_particles``.

    Example:
        >>> import pyro
        >>> import pyro.distributions as dist
        >>> import pyro_relax as pr
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", pr.GenGSPoisson(torch.tensor(2.0), 0.5, 12))
        ...         pyro.sample("x", dist.Poisson(z + 0.1), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", pr.GenGSPoisson(torch.tensor(3.0), 0.5, 12))
        >>> x = torch.tensor([4.0, 1.0])
        >>> bound = discrete_log_likelihood(model, guide, x, data_plate="data")
        >>> elbo = discrete_elbo(model, guide, x, num_samples=1000)
        >>> bound.value > elbo.value
        True
    """
    num_particles = check_count("discrete_log_likelihood", "num_particles", num_particles)
    if data_plate is not None and not isinstance(data_plate, str):
        raise TypeError(
            f"discrete_log_likelihood: `data_plate` must be the name of a plate, got {data_plate!r}"
        )
    weights = _log_weights(
        model, guide, args, kwargs, num_particles, max_plate_nesting, vectorize_particles,
        chunk_size, data_plate=data_plate, scaled=False, progress=progress,
        owner="discrete_log_likelihood",
    )  # fmt: skip
    log_weights, scale = weights.log_weights, weights.scale
    bounds = log_weights.logsumexp(0) - math.log(num_particles)
    ratios = (log_weights - log_weights.max(0).values).exp()
    if num_particles > 1:
        relative_variance = ratios.var(0) / ratios.mean(0).square() / num_particles
    else:
        relative_variance = torch.full_like(bounds, math.nan)
    variance = scale**2 * relative_variance.sum()
    if weights.population is not None:
        # The items are a sample of the plate's: the variance of N times the mean of b items
        # drawn without replacement, N^2 (1 - b / N) s^2 / b (NaN for one item).
        items = bounds.numel()
        spread = bounds.var() if items > 1 else torch.tensor(math.nan, dtype=bounds.dtype)
        population = weights.population
        variance = variance + population**2 * (1 - items / population) * spread / items
    return Estimate(scale * float(bounds.sum()), float(variance.sqrt()), num_particles)


# Vectorized passes of the discrete ELBO where a plate subsamples: its standard error is that of
# the mean over passes, estimated with one degree of freedom fewer than there are passes.
_SUBSAMPLED_PASSES = 10


@dataclasses.dataclass(frozen=True)
class _Weights:
    """What :func:`_log_weights` returns."""

    log_weights: torch.Tensor  # (particles, items), float64
    scale: float  # the scale of every site (1 when the log-probabilities came scaled)
    subsampled: bool  # a plate of the model or the guide scores a subsample of its items
    population: int | None  # the data plate's full size where it is subsampled
    pass_sizes: list  # particles per pass (each 1 unvectorized)


@torch.no_grad()
def _log_weights(
    model,
    guide,
    args,
    kwargs,
    total,
    nesting,
    vectorize,
    chunk_size,
    data_plate,
    scaled,
    min_passes=1,
    progress=False,
    *,
    owner: str,
) -> _Weights:
    """The log importance weights :math:`\\log p(x, z) - \\log q(z)` of ``total`` discrete
    particles, shape ``(total, items)`` (one item without ``data_plate``), in float64, and the
    scale that multiplies every site (1 when ``scaled``: the log-probabilities are then scaled
    as Pyro's ELBOs scale them). With ``data_plate``, every pass replays the subsample the
    first drew: the per-item bound pools the particles of one item, not of whichever item each
    pass drew. ``min_passes``: vectorized particles are drawn in at least that many passes
    (or ``total`` passes of one) where a plate scores a subsample, so that the passes, not the
    particles of one, are independent draws of it; the first pass, drawn before that is known,
    is that small in any case."""
    chunk_size = check_count(owner, "chunk_size", chunk_size)
    vectorize = check_flag(owner, "vectorize_particles", vectorize)
    progress = check_flag(owner, "progress", progress)
    for name, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"{owner}: `{name}` must be a callable, got {fn!r}")
    _check_guide_is_traced(owner, guide)
    small = math.ceil(total / min_passes)
    model, guide = discretize(model), discretize(guide)
    if nesting is None:
        nesting = _plate_nesting(model, guide, args, kwargs)
    else:
        nesting = check_count(owner, "max_plate_nesting", nesting, minimum=0)
    # With a data plate, every pass replays the plates' subsamples from one run of the guide
    # (get_importance_trace drops them); the run leaves the CPU's random stream as it found
    # it, so seeded estimates keep their draws.
    if data_plate is not None:
        with poutine.block(), torch.random.fork_rng(devices=[]):
            subsamples = _subsample_sites(poutine.trace(guide).get_trace(*args, **kwargs))
    chunks, scales, pass_sizes = [], set(), []
    done, subsampled = 0, {}
    with tqdm(total=total, disable=not progress, desc="discrete particles", unit="particle") as bar:
        while done < total:
            size = min(chunk_size, total - done) if vectorize else 1
            if not done or subsampled:
                size = min(size, small)
            traced_model, traced_guide = (
                (_in_particle_plate(model, size, nesting), _in_particle_plate(guide, size, nesting))
                if vectorize
                else (model, guide)
            )
            if data_plate is not None:
                traced_guide = poutine.replay(traced_guide, trace=subsamples)
            try:
                model_trace, guide_trace = get_importance_trace(
                    "flat", nesting + 1, traced_model, traced_guide, args, kwargs
                )
            except (ValueError, RuntimeError, TypeError) as error:
                if not vectorize:
                    raise
                # An error of the model or guide themselves (a bad parameter, the user's own
                # raise) is theirs whatever the particles: it is raised as it is, from one
                # particle; only one that a single particle does not meet is the vectorization's.
                # (That run leaves the CPU's random stream as it found it.)
                one = poutine.replay(guide, trace=subsamples) if data_plate is not None else guide
                with poutine.block(), torch.random.fork_rng(devices=[]):
                    get_importance_trace("flat", nesting, model, one, args, kwargs)
                raise ValueError(
                    f"drawing {size} particles at once (a plate at dim {-(nesting + 1)}, left of "
                    f"the model's {nesting} plate dimension(s)) failed: {error}\nA model or guide "
                    "that does not broadcast over one more dimension on the left needs "
                    "vectorize_particles=False (one particle at a time); a wrong guess of the "
                    "plates needs max_plate_nesting"
                ) from error
            if not done:
                _check_guide_covers_model(model_trace, guide_trace)
                _check_data_plate(data_plate, model_trace, guide_trace)
                subsampled = _subsampled_plates(model_trace, guide_trace)
            weights = _pass_weights(model_trace, guide_trace, nesting, data_plate, scaled, scales)
            chunks.append(torch.as_tensor(weights, dtype=torch.float64).expand(size, -1))
            pass_sizes.append(size)
            done += size
            bar.update(size)
    if len(scales) > 1:
        raise ValueError(
            "the sites carry different scales (subsampled plates or poutine.scale): "
            f"{sorted(scales)}; the importance-weighted bound needs one scale for every site"
            + ("" if data_plate else ", and without `data_plate` that scale must be 1")
        )
    scale = scales.pop() if scales else 1.0
    if not scaled and data_plate is None and scale != 1.0:
        raise ValueError(
            f"the sites are scaled by {scale} (a subsampled plate?): pass `data_plate`, the "
            "name of the plate over the independent items, for a per-item bound"
        )
    return _Weights(
        torch.cat(chunks),
        scale,
        subsampled=bool(subsampled),
        population=subsampled.get(data_plate),
        pass_sizes=pass_sizes,
    )


def _check_guide_is_traced(owner, guide) -> None:
    """``TypeError`` for a guide that runs the model itself (a ``GuideMessenger`` such as
    ``AutoNormalMessenger``): discretize cannot reach the model it runs, and traced beside the
    model, as the estimates trace a guide, it would score the model's own sites (the data
    included) as guide sites."""
    if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
        raise TypeError(
            f"{owner}: the guide ({type(poutine.unwrap(guide)).__name__}) runs the model "
            "itself, which the discrete estimates cannot discretize and trace: use a guide "
            "function or an AutoGuide (AutoNormal, pyro_relax.infer.AutoRelaxed, AutoGuideList)"
        )


def _pass_weights(model_trace, guide_trace, nesting, data_plate, scaled, scales: set):
    """One pass's log weights, ``log p - log q`` per particle and item; adds the scale of each
    site to ``scales``."""
    weights = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site["infer"].get("_deterministic"):
                continue  # a deterministic site has no log-probability and no scale
            terms, scale = _site_terms(site, nesting, data_plate, scaled)
            scales.add(scale)
            weights = weights + sign * terms
    return weights


def _plate_frames(*traces):
    """The plate frames of every sample site of ``traces`` (with repeats)."""
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] == "sample":
                yield from site["cond_indep_stack"]


def _subsampled_plates(*traces) -> dict:
    """The full size of each plate that scores a subsample of its items, by name, in the
    model's trace or the guide's (a plate may subsample in one of them only)."""
    return {
        frame.name: frame.full_size
        for frame in _plate_frames(*traces)
        if frame.full_size is not None and frame.size < frame.full_size
    }


def _check_data_plate(data_plate, *traces) -> None:
    """Refuses a ``data_plate`` that names no plate of the model or the guide (a misspelled
    name would otherwise be reported as a site outside it)."""
    if data_plate is None:
        return
    plates = {frame.name for frame in _plate_frames(*traces) if frame.name != _PARTICLES}
    if data_plate not in plates:
        raise ValueError(
            f"`data_plate` {data_plate!r} names no plate of the model or the guide; their plates: "
            f"{sorted(plates)}"
        )


def _check_guide_covers_model(model_trace, guide_trace) -> None:
    """Refuses a model latent that the guide does not sample: the bound would score its prior
    draw without its proposal (a site Pyro enumerates in the model only, for TraceEnum_ELBO)."""
    missing = [
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("_deterministic")
        and name not in guide_trace.nodes
    ]
    if missing:
        raise ValueError(
            f"the model's latent site(s) {missing} are not sampled by the guide (enumerated "
            "in the model for TraceEnum_ELBO?): the bounds need a guide that samples every "
            "latent; sum such a site out of the model by hand, or give it a guide site"
        )


def _subsample_sites(trace) -> Trace:
    """The sites of ``trace`` where a plate drew its indices (the particle plate excepted)."""
    sites = Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and isinstance(site["fn"], _Subsample) and name != _PARTICLES:
            sites.add_node(name, **site)
    return sites


def _site_terms(site, nesting: int, data_plate, scaled: bool):
    """A site's log-probability summed over all but the particle dimension (and the data
    plate's), shape ``(particles or 1, items or 1)``, and the scale it carries (1 when
    ``scaled``)."""
    if scaled:
        log_prob, scale = site["log_prob"], 1.0
    else:
        log_prob = scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])
        scale = site["scale"]
        if torch.is_tensor(scale) and scale.numel() != 1:
            raise ValueError(
                f"site {site['name']!r} carries a scale of shape {tuple(scale.shape)} "
                "(poutine.scale with a tensor): the importance-weighted bound needs one number "
                "for every site; weight the items with poutine.mask, or score them with "
                "discrete_elbo"
            )
        scale = float(scale)
    log_prob = torch.as_tensor(log_prob, dtype=torch.float64)
    log_prob = log_prob.reshape((1,) * (nesting + 1 - log_prob.dim()) + log_prob.shape)
    if data_plate is None:
        return log_prob.reshape(log_prob.shape[0], -1).sum(-1, keepdim=True), scale
    frames = [frame for frame in site["cond_indep_stack"] if frame.name == data_plate]
    if not frames:
        raise ValueError(
            f"site {site['name']!r} is not inside the plate {data_plate!r}: the per-item bound "
            "needs every sample site inside it (a global site, latent, observed or a factor, "
            "couples the items or is not theirs; leave `data_plate` out for the bound over the "
            "whole call)"
        )
    if frames[0].dim is None:
        raise ValueError(
            f"`data_plate` {data_plate!r} is a sequential plate (iterated with `for`): the "
            "per-item bound needs a vectorized plate (`with pyro.plate(...)`)"
        )
    items = log_prob.movedim(nesting + 1 + frames[0].dim, 1)
    return items.reshape(items.shape[0], items.shape[1], -1).sum(-1), scale


def _in_particle_plate(fn, size: int, nesting: int):
    def vectorized(*args, **kwargs):
        with pyro.plate(_PARTICLES, size, dim=-(nesting + 1)):
            return fn(*args, **kwargs)

    return vectorized


def _plate_nesting(model, guide, args, kwargs) -> int:
    """The number of plate dimensions the model and guide use, from one run of each."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    traces = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
    dims = [frame.dim for frame in _plate_frames(*traces) if frame.vectorized]
    return -min(dims) if dims else 0

"""An automatic guide that gives each relaxed site of a model a learnable relaxation of its own
family."""

import functools
from collections.abc import Callable
from contextlib import ExitStack
from operator import attrgetter
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam
from pyro.ops.tensor_utils import periodic_repeat
from torch.distributions import Bernoulli, Independent, OneHotCategorical

from pyro_relax._numerics import check_number
from pyro_relax.distributions.finite_discrete import FiniteDiscrete
from pyro_relax.distributions.gengs import TruncatedGenGS
from pyro_relax.distributions.igr import IGR, IGRCount, IGRPlanar, IGRStickBreaking
from pyro_relax.distributions.straight_through import (
    GappedST,
    GappedSTCategorical,
    _StraightThroughBernoulli,
    _StraightThroughCategorical,
)
from pyro_relax.infer._sites import relaxed_base, site_is_relaxed

__all__ = ["AutoRelaxed"]

# Each guide argument that is learned: the container the guide keeps it in (as AutoNormal's
# `locs` and `scales`) and its constraint. AutoNormal's softplus keeps the scale's gradient
# from growing with the scale, as exp would.
_PARAMETERS = {
    "logits": ("logits", constraints.real),
    "loc": ("locs", constraints.real),
    "scale": ("scales", constraints.softplus_positive),
}

_COMPOSITION = (
    "    relaxed = AutoRelaxed.relaxed_sites(model, *args)\n"
    "    guide = AutoGuideList(model)\n"
    "    guide.append(AutoRelaxed(poutine.block(model, expose=relaxed)))\n"
    "    guide.append(AutoNormal(poutine.block(model, hide=relaxed)))"
)


class _SiteGuide(NamedTuple):
    """How to build one site's guide: ``build(**parameters)`` makes the relaxed guide, and
    ``.to_event(reinterpreted)`` then gives it the site's event shape."""

    build: Callable
    parameters: tuple
    reinterpreted: int


def _unexpanded(tensor: torch.Tensor) -> torch.Tensor:
    """A view of ``tensor`` without the dimensions ``expand`` added to it (stride 0) or put in
    front of it: the same memory, so a temperature annealed in place is seen through it, and a
    shape that broadcasts with a subsampled batch."""
    for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride(), strict=True)):
        if stride == 0 and size > 1:
            tensor = tensor.narrow(dim, 0, 1)
    while tensor.dim() and tensor.shape[0] == 1:
        tensor = tensor[0]
    return tensor


def _model_temperature(prior, temperature):
    """``temperature``, else the one the model passed, the same object (the distribution's own
    may be a copy in its parameters' dtype or device, which an in-place schedule would not
    reach), without the dimensions an ``expand`` added."""
    if temperature is not None:
        return temperature
    passed = prior._temperature_argument
    return _unexpanded(passed) if torch.is_tensor(passed) else passed


def _gengs_guide(prior, temperature, init_scale):
    # Free logits over the prior's outcomes ("GenGS IMP"); -inf logits stay excluded.
    tau = _model_temperature(prior, temperature)
    build = functools.partial(TruncatedGenGS, tau, outcomes=prior.outcomes, hard=prior.hard)
    return {"logits": prior.logits}, build


def _igr_guide(family, option_names, prior, temperature, init_scale, same_map=False):
    simplex = getattr(prior, "simplex_dist", prior)  # IGRCount keeps its IGR-SB there
    # The temperature and delta as the model passed them: the same object (or equal numbers)
    # tells the closed-form KL of IGR-SB that the maps agree. `same_map`: the prior scores
    # only samples of its own map (IGR-Planar, which has no inverse).
    model_temperature, delta = simplex._map_arguments
    options = {name: getattr(simplex, name) for name in option_names}
    tau = model_temperature if temperature is None or same_map else temperature
    build = functools.partial(family, temperature=tau, delta=delta, **options)
    return {"loc": prior.loc, "scale": prior.scale * init_scale}, build


def _straight_through_guide(prior, temperature, init_scale):
    # GappedST wraps a base distribution; its guide is the class of logits it builds.
    family = GappedSTCategorical if isinstance(prior, GappedST) else type(prior)
    names = getattr(prior, "_categorical_class", prior)._option_names
    options = {name: getattr(prior, name) for name in names}
    tau = _model_temperature(prior, temperature)
    build = functools.partial(family, tau, hard=prior.hard, **options)
    return {"logits": prior.logits}, build


# The guide of each relaxed family, most specific class first.
_FAMILIES = (
    (TruncatedGenGS, _gengs_guide),
    (IGRCount, functools.partial(_igr_guide, IGRCount, ("precision",))),
    (IGRStickBreaking, functools.partial(_igr_guide, IGRStickBreaking, ("precision",))),
    (IGRPlanar, functools.partial(_igr_guide, IGRPlanar, ("flows",), same_map=True)),
    (IGR, functools.partial(_igr_guide, IGR, ("hard",))),
    (_StraightThroughCategorical, _straight_through_guide),
    (_StraightThroughBernoulli, _straight_through_guide),
)


def _relaxed_prior(name, site):
    """The relaxed distribution of a latent site and the family of its guide, or a
    ``ValueError`` saying what to do."""
    fn = site["fn"]
    base = relaxed_base(fn)
    if base is None:
        raise ValueError(
            f"AutoRelaxed guides relaxed sites only, and the latent site '{name}' of the model "
            f"has a {type(fn).__name__} distribution. Guide the other sites with another "
            f"autoguide and combine the two through AutoGuideList:\n{_COMPOSITION}"
        )
    family = next((guide for cls, guide in _FAMILIES if isinstance(base, cls)), None)
    if family is None or not base.has_rsample:
        raise ValueError(
            f"AutoRelaxed has no guide for the site '{name}': {type(base).__name__} is not a "
            "reparameterized relaxation of the GenGS, IGR or straight-through families"
        )
    return base, family


def _check_repeatable(name, frame, argument, value) -> None:
    """``ValueError`` where the initial ``value`` of a site's guide parameter is held item by
    item along the subsampled plate ``frame`` (not broadcast) and excludes outcomes (``-inf``
    logits): the exclusions of the items outside the first subsample are unknown, and
    repeating the subsample's could leave an item with a guide that never reaches its own
    outcomes. Even a pattern the subsample's items share may not be the others' (a Binomial
    whose first subsample drew only items of one total count)."""
    if bool(torch.isneginf(value).any()):
        raise ValueError(
            f"AutoRelaxed: site {name!r} lies in the subsampled plate {frame.name!r} and its "
            f"prior excludes outcomes (-inf {argument}) in a parameter held item by item (as "
            "a Binomial with a total count per item has): the guide's parameters start from "
            "the first subsample's prior, and the other items' exclusions are unknown. Where "
            "every item excludes the same outcomes, give the prior its parameter unexpanded "
            "(broadcast by the plate); else write this site's guide by hand (the prior's class "
            "with learnable parameters per item, e.g. GenGSBinomial(total_count[index], tau, "
            "logits=...)), or do not subsample the plate"
        )


class AutoRelaxed(AutoGuide):
    r"""A mean-field guide that gives each relaxed latent site of a model a learnable
    relaxation of the model's own family, one per element inside plates.

    For a site :math:`s` whose prior is a GenGS relaxation over the outcomes :math:`c_s`
    (any count class, ``GenGSMultinomial`` or ``TruncatedGenGS``), an IGR relaxation, or a
    straight-through estimator, the guide is

    .. math::
        q(z) = \prod_s q_s(z_s), \qquad
        q_s = \begin{cases}
        \operatorname{GenGS}\big(\tau_s, \operatorname{softmax}(\ell_s), c_s\big)
            & \text{GenGS prior (free logits, "GenGS IMP")}, \\
        \operatorname{IGR}(\mu_s, \sigma_s, \tau_s, \delta_s)
            & \text{IGR prior (same map)}, \\
        \operatorname{ST}\big(\tau_s, \operatorname{softmax}(\ell_s)\big)
            & \text{straight-through prior (same estimator)},
        \end{cases}

    with learnable :math:`\ell_s` (logits; log-odds for the Bernoulli versions),
    :math:`\mu_s` and :math:`\sigma_s` of the site's full batch shape. The discrete
    distribution of a GenGS or straight-through guide (the limit :math:`\tau \to 0` of
    GenGS; the law of straight-through samples at every :math:`\tau`) is a free categorical
    distribution over the outcomes per element, a family that holds the exact posterior of
    the discrete model: as :math:`\tau \to 0`, the optimum of the ELBO over GenGS sites tends
    to that posterior. As :math:`\tau \to \infty`, GenGS and IGR samples tend to a point
    that does not depend on the parameters (the average outcome, a fixed point of the
    simplex) and straight-through gradients vanish.

    **The family of each prior.**

    - GenGS (``TruncatedGenGS`` and its subclasses): ``TruncatedGenGS`` with free logits, the
      model's ``outcomes`` and ``hard``, initialized to the prior's log-PMF (outcomes the
      prior excludes with a ``-inf`` logit stay excluded).
    - ``IGR``, ``IGRStickBreaking`` and ``IGRCount``: the same class with learnable
      :math:`\mu, \sigma` and the model's ``delta`` (and, where the class takes them, its
      ``hard`` (IGR) and ``precision`` (IGR-SB, IGRCount)), initialized
      to the prior's ``loc`` and ``init_scale`` times its ``scale`` (the default 1 starts the
      guide at the prior, where the KL term is 0).
    - ``IGRPlanar``: ``IGRPlanar`` with learnable :math:`\mu, \sigma` and the *model's* flows
      (the same objects, trained only if the model registers them). Planar layers have no
      closed-form inverse, so the prior scores only samples pushed through its own flows:
      neither an ``IGR`` guide nor fresh flows could be scored by the model.
    - Straight-through categoricals and their Bernoulli versions: the same class with
      learnable logits and the model's options (``hard``, ``gap``, ``num_draws``,
      ``detach_perturbations``); ``GappedST`` gets a ``GappedSTCategorical``.

    **Temperature.** Each guide uses the temperature tensor of its model site (for GenGS and
    the straight-through estimators, a view of the tensor the model passed without the
    dimensions the batch added; for IGR, the object passed), read once from the first trace
    of the model. A schedule that anneals that tensor in place, such as
    :class:`~pyro_relax.schedules.ExponentialDecay`, therefore anneals the guide too; a model
    that builds a new temperature tensor at each call leaves the guide at the first one's
    value (pass the same tensor, or ``temperature=``).

    **KL divergences.** ``TraceMeanField_ELBO`` finds one in closed form for every pair the
    guide makes: GenGS to GenGS, IGR to IGR, IGR-SB and ``IGRCount`` to the same class (they
    share the temperature and ``delta``), ``IGRPlanar`` through torch's rule for transformed
    distributions with the same transforms, and the categorical and Bernoulli KLs of the
    straight-through estimators. With a ``precision``, or another ``temperature`` than the
    model's, IGR-SB and ``IGRCount`` have none, and the ELBO falls back to Monte Carlo.

    **Plates and subsampling.** As for ``AutoNormal``: the parameters have the site's full
    batch shape, with the full size of each subsampled plate (initialized by repeating the
    subsample's prior periodically), and each call uses the rows of the subsample drawn by
    the plates the guide creates (or ``create_plates`` returns). A prior that excludes
    outcomes (``-inf`` logits) in a parameter held item by item along a subsampled plate (a
    Binomial with a total count per item; a shared mask applied to per-item logits) raises
    ``ValueError``: the other items' exclusions are unknown, and repeating the subsample's
    could leave an item unable to reach its own outcomes. Give a shared exclusion unexpanded
    (broadcast by the plate). (Where the first subsample excludes nothing but other items do,
    those items start with mass on outcomes their prior excludes, and the model scores those
    draws about -1e30: write such a site's guide by hand.)

    **Other latent sites.** A latent site that is not relaxed raises ``ValueError``. Guide it
    with another autoguide and combine the two, hiding the relaxed sites from the other one
    (Pyro's ``AutoGuideList`` takes parts built from blocked versions of the model)::

        relaxed = AutoRelaxed.relaxed_sites(model, *args)
        guide = AutoGuideList(model)
        guide.append(AutoRelaxed(poutine.block(model, expose=relaxed)))
        guide.append(AutoNormal(poutine.block(model, hide=relaxed)))

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/1912.09588

        Automatic Differentiation Variational Inference.
        Alp Kucukelbir, Dustin Tran, Rajesh Ranganath, Andrew Gelman, David M. Blei, 2016.
        https://arxiv.org/abs/1603.00788

    Arguments:
        model: a Pyro model whose latent sites are all relaxed (block the others).
        init_scale (float): the factor :math:`\sigma_s / \sigma_s^{\text{prior}} > 0` of the
            IGR guides at initialization (default 1.0).
        temperature (float or Tensor): the temperature :math:`\tau_s` of every guide, in place
            of the model's (default ``None``: the model's, shared as above). ``IGRPlanar``
            sites keep the model's: their prior scores only samples of its own map.
        create_plates: as for Pyro's autoguides, a function of the model's
            arguments returning the plates (or a plate) to use, for subsampling.

    Example:
        >>> import pyro
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> from pyro_relax import GenGSPoisson
        >>> def model(x):
        ...     z = pyro.sample("z", GenGSPoisson(torch.tensor(3.0), 0.3, 15))
        ...     pyro.sample("x", pyro.distributions.Normal(z, 1.0), obs=x)
        >>> pyro.clear_param_store()
        >>> guide = AutoRelaxed(model)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
        >>> loss = svi.step(torch.tensor(7.0))
        >>> guide(torch.tensor(7.0))["z"].shape, guide.discrete()["z"].probs.shape
        (torch.Size([]), torch.Size([15]))
    """

    def __init__(self, model, *, init_scale=1.0, temperature=None, create_plates=None):
        check_number("AutoRelaxed", "init_scale", init_scale)
        super().__init__(model, create_plates=create_plates)
        # After the module's set-up: a tensor assigned before it raised AttributeError
        # ('_pyro_params').
        self._init_scale = float(init_scale)
        self._temperature = temperature

    @staticmethod
    def relaxed_sites(model, *args, **kwargs) -> list:
        """The names of the relaxed latent sites of ``model``, traced once with ``*args,
        **kwargs``, in the order it samples them: the sites to expose to ``AutoRelaxed`` and
        hide from another autoguide, as in the recipe of the class's documentation."""
        model = poutine.block(model, hide_fn=AutoGuide._prototype_hide_fn)
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        return [name for name, site in trace.iter_stochastic_nodes() if site_is_relaxed(site)]

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self._site_guides = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            self._site_guides[name] = self._setup_site(name, site)
        if not self._site_guides:
            raise ValueError(
                "AutoRelaxed found no latent site in the model: it has nothing to guide"
            )

    def _setup_site(self, name, site):
        """Registers the parameters of one site's guide and returns how to build it."""
        (base, family), fn = _relaxed_prior(name, site), site["fn"]
        # Dimensions `to_event` made events are batch dimensions of the relaxed guide.
        reinterpreted = len(fn.event_shape) - len(base.event_shape)
        batch_shape = fn.batch_shape + fn.event_shape[:reinterpreted]
        prior = base if base.batch_shape == batch_shape else base.expand(batch_shape)
        initial, build = family(prior, self._temperature, self._init_scale)
        for argument, value in initial.items():
            self._register(name, site, argument, value)
        return _SiteGuide(build, tuple(initial), reinterpreted)

    def _register(self, name, site, argument, value):
        # (Strides read before the copy: an expanded value is the same for every item.)
        shared = [
            size == 1 or stride == 0
            for size, stride in zip(value.shape, value.stride(), strict=True)
        ]
        value = value.detach().clone(memory_format=torch.contiguous_format)
        event_dim = value.dim() - len(site["fn"].batch_shape)
        # As AutoNormal: a subsampled plate's parameters get the plate's full size.
        for frame in site["cond_indep_stack"]:
            full_size = frame.full_size or frame.size
            if full_size != frame.size:
                if not shared[frame.dim - event_dim]:
                    _check_repeatable(name, frame, argument, value)
                value = periodic_repeat(value, full_size, frame.dim - event_dim).contiguous()
        container, constraint = _PARAMETERS[argument]
        deep_setattr(self, f"{container}.{name}", PyroParam(value, constraint, event_dim))

    def _relaxed_guide(self, name, detach=False):
        """The relaxed guide of site ``name`` (before ``to_event``), with the parameters of the
        subsample of the enclosing plates (``detach``: without their gradient, also for what a
        distribution computes from them later, such as a Bernoulli's ``probs``)."""
        site_guide = self._site_guides[name]
        parameters = {
            argument: attrgetter(f"{_PARAMETERS[argument][0]}.{name}")(self)
            for argument in site_guide.parameters
        }
        if detach:
            parameters = {argument: value.detach() for argument, value in parameters.items()}
        return site_guide.build(**parameters)

    def forward(self, *args, **kwargs):
        """An automatic guide with the same ``*args, **kwargs`` as the model.

        Returns:
            dict: each relaxed site's name and its sampled value.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                posterior = self._relaxed_guide(name)
                reinterpreted = self._site_guides[name].reinterpreted
                if reinterpreted:
                    posterior = posterior.to_event(reinterpreted)
                result[name] = pyro.sample(name, posterior)
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict:
        """The median of each site's discrete distribution (:meth:`discrete`): the smallest
        outcome whose cumulative probability reaches 1/2, for sites with scalar values (counts,
        the outcomes of a ``TruncatedGenGS``, Bernoulli variables). A site with vector values
        (one-hot categories, count vectors) has no median: it gets its most probable outcome.
        Values have the full batch shape of the parameters, as ``AutoNormal``'s medians; the
        model's arguments are needed only before the guide's first call. This is what Pyro's
        ``AutoGuideList.median`` asks of each part.

        Returns:
            dict: each relaxed site's name and its median.
        """
        result = {}
        for name, posterior in self.discrete(*args, **kwargs).items():
            discrete = _unwrapped(posterior)
            if _has_scalar_values(discrete):
                result[name] = _quantiles(discrete, torch.tensor([0.5]))[0]
            else:
                result[name] = _mode(discrete)
        return result

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict:
        """The quantiles of each site's discrete distribution (:meth:`discrete`): for each
        level :math:`q`, the smallest outcome whose cumulative probability reaches :math:`q`.
        Sites with vector values (one-hot categories, count vectors) have no quantiles: as in
        :meth:`median`, they get their most probable outcome at every level (so that Pyro's
        ``AutoGuideList.quantiles``, which asks every part, gives the other parts' quantiles).
        The model's arguments are needed only before the guide's first call.

        Arguments:
            quantiles (list or Tensor): levels in :math:`[0, 1]`.

        Returns:
            dict: each relaxed site's name and its quantiles, one per level along a first
            dimension, as ``AutoNormal.quantiles``.
        """
        levels = torch.as_tensor(quantiles, dtype=torch.float64).reshape(-1)
        if not levels.numel() or not bool(((levels >= 0) & (levels <= 1)).all()):
            raise ValueError(
                f"AutoRelaxed.quantiles: the levels must lie in [0, 1], got {quantiles!r}"
            )
        result = {}
        for name, posterior in self.discrete(*args, **kwargs).items():
            discrete = _unwrapped(posterior)
            if _has_scalar_values(discrete):
                result[name] = _quantiles(discrete, levels)
            else:
                mode = _mode(discrete)
                result[name] = mode.expand((len(levels),) + mode.shape).clone()
        return result

    @torch.no_grad()
    def discrete(self, *args, **kwargs) -> dict:
        """The discrete distribution each site's guide stands for (its ``discrete()``: the
        limit :math:`\\tau \\to 0` of GenGS and IGR, the law of straight-through samples), with
        the full batch shape of the parameters: for a GenGS site, the guide's PMF over the
        outcomes. The model's arguments are needed only before the guide's first call."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result = {}
        for name, site_guide in self._site_guides.items():
            posterior = self._relaxed_guide(name, detach=True).discrete()
            if site_guide.reinterpreted:
                posterior = posterior.to_event(site_guide.reinterpreted)
            result[name] = posterior
        return result


def _unwrapped(posterior):
    """The distribution inside ``to_event``: the values and their shape are the same."""
    while isinstance(posterior, Independent):
        posterior = posterior.base_dist
    return posterior


def _has_scalar_values(discrete) -> bool:
    return isinstance(discrete, Bernoulli) or (
        isinstance(discrete, FiniteDiscrete) and discrete.outcomes.dim() == 1
    )


def _quantiles(discrete, levels: torch.Tensor) -> torch.Tensor:
    """For each level :math:`q`, the smallest value :math:`x` with :math:`P(X \\le x) \\ge q`,
    stacked along a first dimension; ``discrete`` is a Bernoulli or a ``FiniteDiscrete`` over
    scalar outcomes."""
    if isinstance(discrete, Bernoulli):
        probs = discrete.probs
        levels = levels.to(probs.device, probs.dtype).reshape((-1,) + (1,) * probs.dim())
        levels = levels.clamp(min=torch.finfo(probs.dtype).tiny)  # as below: 1 where p = 1
        return ((1 - probs) < levels).to(probs.dtype)  # P(X <= 0) = 1 - p
    levels = levels.to(discrete.probs.device, discrete.probs.dtype)
    return discrete.icdf(levels.reshape((-1,) + (1,) * len(discrete.batch_shape)))


def _mode(discrete) -> torch.Tensor:
    """The most probable outcome of a distribution over vectors."""
    index = discrete.probs.argmax(-1)
    if isinstance(discrete, FiniteDiscrete):
        return discrete.outcomes[index]
    if isinstance(discrete, OneHotCategorical):
        return torch.nn.functional.one_hot(index, discrete.probs.shape[-1]).to(discrete.probs)
    raise NotImplementedError(f"AutoRelaxed: no median for {type(discrete).__name__}")

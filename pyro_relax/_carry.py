"""The one record a relaxed sample carries to ``log_prob``, and its public accessor."""

import dataclasses
import weakref

import torch
from pyro.ops.provenance import ProvenanceTensor, extract_provenance

# The public names; `carry` and `carried` serve the distributions.
__all__ = ["Relaxation", "relaxation_of", "with_relaxation"]

# The one attribute by which a tensor carries its record.
_ATTRIBUTE = "_pyro_relax"
# The version of a copied record whose value had changed in place before the copy: counters
# are never negative, so relaxation_of finds the copy's record void.
_VOID = -1


@dataclasses.dataclass(frozen=True)
class Relaxation:
    r"""What a relaxed sample carries so that ``log_prob`` can score it exactly.

    A relaxed value is a deterministic function of a richer latent: GenGS maps a relaxed
    one-hot :math:`w` onto the outcomes, IGR pushes a Gaussian pre-image :math:`y` through
    softmax++. ``log_prob`` needs that latent, which the value alone loses (a convex
    combination of outcomes does not say which weights made it; a coordinate of :math:`z` can
    underflow to 0 in float32 while :math:`\log z` stays finite). ``rsample`` therefore attaches
    this record to the tensor it returns; for example GenGS scores a sample by the soft log-PMF
    and IGR-I by its density through the pre-image:

    .. math::
        \log p(z) = \sum_k w_k \log \pi_k, \qquad
        \log q(z) = \log \mathcal{N}(y; \mu, \sigma) + (K - 1) \log \tau - \sum_k \log z_k.

    Operations that make a new tensor (``clone``, ``detach``, ``.to``, arithmetic) drop the
    record: :func:`relaxation_of` then returns ``None``, and each distribution documents what
    its ``log_prob`` does with a value without one (it scores a plain outcome by the discrete
    PMF, inverts the map, or raises ``ValueError`` under validation). To move a sample and keep
    its record, attach it again with :func:`with_relaxation`.

    Every field is ``None`` unless the family that drew the sample sets it. A straight-through
    draw carries a record with no field set (soft STGS: its log-weights and scores): the
    record itself tells Pyro's estimators that the value was drawn by ``rsample``, also where
    no gradient was recorded (``SVI.evaluate_loss``), as opposed to a value Pyro enumerated.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/1912.09588

    Attributes:
        weights (Tensor): the relaxed one-hot :math:`w` over the outcomes (GenGS).
        log_weights (Tensor): :math:`\log` of the relaxed one-hot or simplex point the value
            stands for (soft STGS, softmax++ and the IGR family).
        preimage (Tensor): the pre-image :math:`y` of the map that made the value (the
            Gaussian draw of the IGR family; the input of a sigmoid stick-breaking).
        scores (Tensor): the tempered scores :math:`(l + g) / \tau` whose softmax a soft STGS
            sample is (its density reads them, not :math:`\tau` times the rounded
            log-weights).
        source (tuple): what made the pre-image, ``(family, map parameters, versions)``
            (IGR family); ``versions`` are the parameters' version counters at the draw (see
            :meth:`current_source`).
        kept_sticks (Tensor): how many sticks each sample kept (IGR-SB with ``precision``).
        simplex (Tensor): the simplex point a relaxed count was mapped from (``IGRCount``).
        outcomes (Tensor): the outcomes :math:`c` the weights are over, where they are not the
            counts :math:`0, \dots, n - 1` (GenGS): a scorer pairs them with its own by value.
        shape (torch.Size): the shape of the value the record describes (set when attached);
            :func:`with_relaxation` refuses the record for a value of another shape.
        version (int): the value's version counter when the record was attached: an in-place
            operation on the value (``add_``, ``clamp_``, an assignment to a slice) advances
            it, and the record no longer describes the value (:func:`relaxation_of` then gives
            ``None``). A copy of the sample, or one loaded from a file, keeps its record
            (not one made after such a change), and takes the copy's counter when first read:
            an in-place change of the copy after that voids it too. Inference tensors
            (``torch.inference_mode``) keep no counter: there an in-place change goes
            unnoticed.

    Example:
        >>> import pyro_relax as pr
        >>> z = pr.GenGSPoisson(torch.tensor(2.0), temperature=0.5, truncation=12).rsample()
        >>> pr.relaxation_of(z).weights.shape
        torch.Size([12])
        >>> pr.relaxation_of(z.clone()) is None
        True
    """

    weights: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None
    preimage: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    source: tuple | None = None
    kept_sticks: torch.Tensor | None = None
    simplex: torch.Tensor | None = None
    outcomes: torch.Tensor | None = None
    shape: torch.Size | None = None
    version: int | None = None

    def current_source(self) -> tuple | None:
        """``(family, map parameters)`` of :attr:`source`, or ``None`` where a parameter was
        updated in place since the draw (an annealed temperature, a flow's optimizer step):
        its values at the draw are gone, and the value must be inverted instead. A record
        copied or loaded from a file, or drawn or read under ``torch.compile`` (whose version
        counters are symbolic), trusts its parameters as they stand."""
        if self.source is None:
            return None
        family, parameters, versions = self.source
        if versions is not None and not torch.compiler.is_compiling():
            if versions != tensor_versions(parameters):
                return None
        return family, parameters

    def __getstate__(self):
        # A copy's parameters are new tensors with counters of their own: it keeps the source
        # as it stands now (unversioned), or none if the parameters have changed since.
        state = dict(self.__dict__)
        current = self.current_source()
        state["source"] = None if current is None else (*current, None)
        # The copy's counter is its own: it trusts the record, unless the value it describes
        # was changed in place before the copy (a version no counter has marks it void).
        described = state.pop("_described", None)
        value = None if described is None else described()
        stale = value is not None and self.version is not None and _version(value) != self.version
        state["version"] = _VOID if stale else None
        return state


def tensor_versions(objects: tuple) -> tuple | None:
    """The version counter of each tensor in ``objects`` (``None`` for another object, and for
    an inference tensor, which keeps none): an in-place update of a tensor advances it.
    ``None`` under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return None
    return tuple(_version(value) if torch.is_tensor(value) else None for value in objects)


def _version(tensor: torch.Tensor) -> int | None:
    """The version counter of ``tensor``, ``None`` for an inference tensor (which keeps none)
    and under ``torch.compile`` (where it is symbolic)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor
        return None


def allow_in_torch_load(*classes) -> None:
    """Lets ``torch.load``'s default (``weights_only=True``, torch 2.6 on) read a saved relaxed
    sample: its record and the classes a record names (a torch without the allow-list needs
    nothing)."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:
        add_safe_globals(list(classes))


allow_in_torch_load(Relaxation)


def relaxation_of(value) -> Relaxation | None:
    r"""The :class:`Relaxation` record a relaxed sample carries, or ``None``.

    ``None`` for a value that no relaxed distribution drew, whose record was dropped by an
    operation that makes a new tensor (``clone``, ``detach``, ``.to``, arithmetic), or that
    was changed in place since (its record no longer describes it). The record
    holds what ``log_prob`` needs to score the sample exactly, such as the relaxed one-hot
    :math:`w` of a GenGS sample

    .. math::
        z = \sum_k w_k c_k.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Example:
        >>> import pyro_relax as pr
        >>> z = pr.IGR(torch.zeros(3), torch.ones(3), temperature=0.1).rsample()
        >>> pr.relaxation_of(z).preimage.shape
        torch.Size([3])
    """
    record = getattr(value, _ATTRIBUTE, None)
    if record is None and isinstance(value, ProvenanceTensor):
        # Pyro's dependency tracking (pyro.infer.inspect, TraceGraph_ELBO) wraps sample values
        # in a new tensor object; the record is on the value it wraps, sharing its data.
        value = extract_provenance(value)[0]
        record = getattr(value, _ATTRIBUTE, None)
    if record is None:
        return None
    current = _version(value)
    if record.version is None:
        if current is not None:
            # A copy's record (deepcopy, torch.load) meets its value's counter at the first
            # read: from then on an in-place change voids it, as the original's.
            object.__setattr__(record, "version", current)
            object.__setattr__(record, "_described", weakref.ref(value))
        return record
    return record if current is None or current == record.version else None


def with_relaxation(value: torch.Tensor, relaxation: Relaxation | None) -> torch.Tensor:
    r"""Attaches ``relaxation`` to ``value`` (in place) and returns it.

    For a sample moved or copied on purpose: the record must describe the same draw, on the
    value's device. A record of a value of another shape raises ``ValueError`` (it would score
    another draw, or broadcast to the wrong shape); one of the same shape is taken on trust.
    ``relaxation`` may be ``None`` (nothing is attached). With it, a GenGS
    sample :math:`z = \sum_k w_k c_k` is again scored by its soft log-PMF

    .. math::
        \log p(z) = \sum_k w_k \log \pi_k.

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Example:
        >>> import pyro_relax as pr
        >>> d = pr.GenGSPoisson(torch.tensor(2.0), temperature=0.5, truncation=12)
        >>> z = d.rsample()
        >>> copy = pr.with_relaxation(z.detach().clone(), pr.relaxation_of(z))
        >>> bool(d.log_prob(copy) == d.log_prob(z))
        True
    """
    if not torch.is_tensor(value):
        raise TypeError(f"with_relaxation: `value` must be a tensor, got {type(value).__name__}")
    if relaxation is None:
        return value
    if not isinstance(relaxation, Relaxation):
        raise TypeError(
            "with_relaxation: `relaxation` must be a Relaxation (from relaxation_of) or None, got "
            f"{type(relaxation).__name__}"
        )
    if relaxation.shape is not None and relaxation.shape != value.shape:
        raise ValueError(
            f"with_relaxation: the record describes a value of shape {tuple(relaxation.shape)}, "
            f"not this value's {tuple(value.shape)}: a record must describe the same draw"
        )
    _attach(value, dataclasses.replace(relaxation, version=_version(value)))
    return value


def _attach(value: torch.Tensor, record: Relaxation) -> None:
    """Sets ``record`` on ``value``, with a weak reference back to it while its version counter
    is kept (so that a copy made after an in-place change knows the record is stale)."""
    if record.version is not None:
        object.__setattr__(record, "_described", weakref.ref(value))
    setattr(value, _ATTRIBUTE, record)
    if isinstance(value, ProvenanceTensor):
        # Pyro wraps such a value again in a new object (tracking its dependencies): the record
        # goes on the tensor it wraps too (a copy of its own, whose weak reference outlives the
        # wrapper), where relaxation_of looks through the wrapper.
        _attach(extract_provenance(value)[0], dataclasses.replace(record))


def carry(value: torch.Tensor, **fields) -> torch.Tensor:
    """Sets ``fields`` of the record ``value`` carries (adding one if it has none), in place,
    and returns ``value``."""
    record = relaxation_of(value)
    fields.update(shape=value.shape, version=_version(value))
    record = Relaxation(**fields) if record is None else dataclasses.replace(record, **fields)
    _attach(value, record)
    return value


def drawn_by(value, family):
    """The map parameters with which ``family`` drew ``value``, from its record; ``None``
    without a record, for another family's draw, or where the parameters were updated in
    place since the draw."""
    record = relaxation_of(value)
    source = None if record is None else record.current_source()
    return None if source is None or source[0] is not family else source[1]


def carried(value, field: str):
    """One field of the record ``value`` carries, or ``None``."""
    record = relaxation_of(value)
    return None if record is None else getattr(record, field)

"""An effect handler that puts the discrete distribution in place of every relaxed site."""

import functools

from pyro.poutine.messenger import Messenger

from pyro_relax.infer._sites import relaxed_base, rewrap

__all__ = ["discretize"]


class DiscretizeMessenger(Messenger):
    """The messenger behind :func:`discretize`: at every sample site whose distribution is a
    relaxation, it puts that relaxation's ``discrete()`` distribution in its place, inside the
    same ``to_event``, ``mask`` and ``expand`` wrappers."""

    def _pyro_sample(self, msg):
        if relaxed_base(msg["fn"]) is not None:
            msg["fn"] = rewrap(msg["fn"], lambda relaxed: relaxed.discrete())


def discretize(fn=None):
    r"""A Pyro effect handler that replaces every relaxed site by the discrete distribution it
    stands for, the limit :math:`\tau \to 0` of its relaxation; for a GenGS over outcomes
    :math:`c_k` with PMF :math:`\pi`,

    .. math::
        z = \sum_k w_k c_k, \quad w = \operatorname{softmax}\big((\log \pi + g) / \tau\big)
        \qquad \longrightarrow \qquad P(z = c_k) = \pi_k.

    Per family:

    - GenGS (:class:`~pyro_relax.distributions.TruncatedGenGS` and the count classes): a
      :class:`~pyro_relax.distributions.FiniteDiscrete` with the PMF :math:`\pi` over the
      outcomes, whose values are the outcomes themselves (integer counts as floating-point
      numbers; a count class's PMF is truncated, its last outcome holding the tail);
    - IGR: the one-hot categorical of the recovered probabilities (Proposition 2 of the IGR
      paper; by quadrature for IGR-I, by Monte Carlo for stick-breaking and planar flows), and
      ``IGRCount`` the counts with those probabilities;
    - the straight-through classes (GST, ST, STGS and GR-MCK, hard or soft):
      ``OneHotCategorical`` or ``Bernoulli`` with the same logits.

    Everything else is left alone. Under it, Pyro's own tools work on the discrete model the
    relaxation stands for: ``Predictive`` returns exact integer or one-hot draws, ``Trace_ELBO``
    estimates the discrete ELBO (``TraceGraph_ELBO`` trains the discrete model by REINFORCE),
    ``TraceEnum_ELBO`` enumerates the discrete sites, ``Importance`` weights discrete draws.
    :func:`~pyro_relax.infer.discrete_elbo` and
    :func:`~pyro_relax.infer.discrete_log_likelihood` are built on it.

    Apply it to the model *and* the guide: the guide's discrete draws are scored by the
    model's discrete distributions. Like every Pyro handler it wraps a function or serves as a
    context manager. Put ``config_enumerate`` outside it, ``config_enumerate(discretize(fn))``:
    inside, it would see the relaxed distributions, which cannot be enumerated, and mark
    nothing (``TraceEnum_ELBO`` then warns that it found no site to enumerate).

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

        Invertible Gaussian Reparameterization: Revisiting the Gumbel-Softmax.
        Andres Potapczynski, Gabriel Loaiza-Ganem, John P. Cunningham, 2020.
        https://arxiv.org/abs/1912.09588

    Arguments:
        fn: a model or guide; ``None`` gives the messenger, for a ``with`` block.

    Example:
        >>> import pyro
        >>> import torch
        >>> import pyro_relax as pr
        >>> def model():
        ...     return pyro.sample("z", pr.GenGSPoisson(torch.tensor(3.0), 0.5, 20))
        >>> z = model()  # a relaxed count
        >>> bool(z == z.round())
        False
        >>> z = discretize(model)()  # a count
        >>> bool(z == z.round())
        True
    """
    messenger = DiscretizeMessenger()
    if fn is None:
        return messenger
    if not callable(fn):
        raise ValueError(f"discretize: {fn!r} is not callable")
    return functools.update_wrapper(messenger(fn), fn, updated=())

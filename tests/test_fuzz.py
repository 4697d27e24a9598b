"""Generated bad, extreme and foreign inputs for every registry example.

Each case changes the parameters of one example (a value to NaN or infinity, zero, a negative
or a huge number; one outcome excluded by a logit of -inf; integer tensors, nested lists,
Python numbers; non-contiguous and stride-0 views; a parameter on another device; half
precision; ``torch.autocast``), builds the distribution with validation on, and then draws
``rsample`` values, scores them, adds the registered KLs and differentiates. A case passes
when either

- it is refused at once with a ``ValueError`` or ``TypeError`` whose message names the argument
  (and, for mixed devices, both devices), or
- everything it computes is finite: samples, log-probabilities, KLs and gradients.

Anything else (a silent NaN or infinity, another exception, an unnamed error) fails the test.
Some inputs must be refused (NaN or infinite parameters, mixed devices). The cases are seeded
and bounded: a few per parameter and mode, three samples each. ``conftest.py`` prints how
many cases ran and how they ended.
"""

import collections
import contextlib
import math
import re
import warnings

import pytest
import torch
from registry import EXAMPLES
from torch.distributions import kl_divergence

from pyro_relax import TruncationWarning

# What the cases ended as, summed over the run; conftest.py prints it.
OUTCOMES = collections.Counter()

# Values put in one parameter at a time: (label, value, must it be refused?). A -inf logit is an
# excluded outcome, legitimate wherever another outcome keeps some mass.
_VALUES = [
    ("nan", math.nan, True),
    ("+inf", math.inf, True),
    ("-inf", -math.inf, True),
    ("zero", 0.0, False),
    ("negative", -1.0, False),
    ("huge", 1e30, False),
    ("tiny", 1e-30, False),
]
_MAY_BE_MINUS_INF = {"logits"}


class _Case:
    """One generated input: ``mutate`` maps fresh parameters to the arguments passed; ``name``
    is the argument an error must name (``None``: none in particular); ``expect`` is "refuse",
    "run" or "either"."""

    def __init__(self, label, mutate, name=None, expect="either", context=None):
        self.label, self.mutate, self.name = label, mutate, name
        self.expect, self.context = expect, context


def _cases(example):
    names = list(example.params)
    cases = []
    for name in names:
        for label, number, refuse in _VALUES:
            if label == "-inf" and name in _MAY_BE_MINUS_INF:
                refuse = False

            def set_value(params, name=name, number=number):
                params[name] = torch.full_like(params[name].detach(), number)
                return params

            cases.append(
                _Case(
                    f"{name}={label}",
                    set_value,
                    name,
                    "refuse" if refuse else "either",
                )
            )

        def as_int(params, name=name):
            params[name] = params[name].detach().round().long()
            return params

        def as_list(params, name=name):
            params[name] = params[name].detach().tolist()
            return params

        def on_meta(params, name=name):
            params[name] = params[name].detach().to("meta")
            return params

        def strided(params, name=name):
            # The same values in a non-contiguous layout (every other element of a buffer).
            value = params[name]
            params[name] = torch.stack([value, torch.zeros_like(value)], -1)[..., 0]
            return params

        def expanded(params, name=name):
            # Two batch elements sharing one memory location each (stride 0), as a plate's
            # expand makes them: in-place writes into it would raise.
            params[name] = params[name].expand((2, *params[name].shape))
            return params

        def one_excluded(params, name=name):
            # One outcome excluded (logit -inf), the others kept: a legitimate input, which
            # must give finite samples, scores, KLs and gradients.
            value = params[name].detach().clone()
            value[..., 0] = -math.inf
            params[name] = value.requires_grad_()
            return params

        if name in _MAY_BE_MINUS_INF and example.params[name].dim() >= 1:
            cases.append(_Case(f"one {name} -inf", one_excluded, name))
        cases.append(_Case(f"{name} as int64", as_int, name))
        if name not in example.through:
            cases += [
                _Case(f"{name} as a strided view", strided, name, expect="run"),
                _Case(f"{name} expanded with stride 0", expanded, name),
            ]
        if name not in example.through:  # lists and devices are the other library's to parse
            cases += [
                _Case(f"{name} as a list", as_list, name),
                _Case(
                    f"{name} on the meta device",
                    on_meta,
                    name,
                    "refuse" if len(names) > 1 else "either",
                    context="devices",
                ),
            ]
    for dtype in (torch.bfloat16, torch.float16):

        def half(params, dtype=dtype):
            # What the factory hands to another library's object (a planar flow, say) is in
            # float32, the dtype the library computes half-precision parameters in.
            return {
                n: v.detach()
                .to(torch.float32 if n in example.through else dtype)
                .requires_grad_(v.requires_grad)
                for n, v in params.items()
            }

        cases.append(_Case(f"all parameters in {dtype}", half, expect="run"))
    cases.append(
        _Case("under torch.autocast(bfloat16)", lambda p: p, expect="run", context="autocast")
    )
    return cases


def _finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t))


def _kl_or_none(d, make_partner):
    try:
        return kl_divergence(d, make_partner())
    except NotImplementedError:  # documented: no closed form here (say, other temperatures)
        return None


def _exercise(example, arguments):
    """Everything a training step does with the distribution; returns the tensors it made."""
    d = example.factory(validate_args=True, **arguments)
    value = d.rsample((3,))
    log_prob = d.log_prob(value)
    loss = log_prob.sum() + value.double().square().sum()
    kls = [kl for kl in (_kl_or_none(d, make) for make in example.kl_partners) if kl is not None]
    loss = loss + sum(kl.double().sum() for kl in kls)
    leaves = [a for a in arguments.values() if torch.is_tensor(a) and a.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if leaves else ()
    return [value, log_prob, *kls, *(g for g in grads if g is not None)]


def _run(example, case):
    torch.manual_seed(0)
    arguments = case.mutate(example.parameters(requires_grad=True))
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.ExitStack() as stack:
            warnings.simplefilter("always", TruncationWarning)
            # A temperature left in its dtype while another parameter's changed is copied.
            warnings.filterwarnings("always", message=_COPIED_TEMPERATURE)
            if case.context == "autocast":
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            made = _exercise(example, arguments)
    except (ValueError, TypeError) as error:
        message = str(error)
        # A parameter the factory passes through another library's object may be named by
        # either (torch names its own parameters).
        names = {case.name, example.through.get(case.name)} - {None}
        clear = case.name is None or any(name in message for name in names)
        if case.context == "devices":
            clear = clear and "meta" in message and "cpu" in message
        if case.expect == "run":
            return f"refused an input it must take: {type(error).__name__}: {message[:300]}"
        if clear:
            return "refused with a clear error"
        return f"unclear {type(error).__name__}: {message[:300]}"
    except Exception as error:  # noqa: BLE001 (any other exception is the finding)
        return f"{type(error).__name__}: {str(error)[:300]}"
    if case.expect == "refuse":
        return "accepted an input it must refuse"
    if not _finite(*made):
        return "silent non-finite value"
    if any(issubclass(w.category, TruncationWarning) for w in caught):
        return "ran with finite results and a TruncationWarning"
    if any(re.match(_COPIED_TEMPERATURE, str(w.message)) for w in caught):
        return "ran with finite results and a warning that the temperature is copied"
    return "ran with finite results"


_COPIED_TEMPERATURE = r".*: the temperature tensor \(torch\.\w+\) is copied to"

_GOOD = {
    "refused with a clear error",
    "ran with finite results",
    "ran with finite results and a TruncationWarning",
    "ran with finite results and a warning that the temperature is copied",
}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_generated_inputs_are_refused_clearly_or_give_finite_results(example):
    failures = []
    for case in _cases(example):
        outcome = _run(example, case)
        OUTCOMES[outcome if outcome in _GOOD else "failed"] += 1
        if outcome not in _GOOD:
            failures.append(f"{case.label}: {outcome}")
    assert not failures, "\n".join(failures)

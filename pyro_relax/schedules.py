"""Temperature schedules that anneal a temperature tensor in place."""

import math

import torch

from pyro_relax._numerics import check_count, check_number

__all__ = ["ExponentialDecay"]


class ExponentialDecay:
    r"""Exponential decay of a temperature to a floor, updated in place.

    .. math::
        \tau_t = \max\big(\tau_{\min},\ \tau_0 \, e^{-r t}\big), \qquad
        r = \log(\tau_0 / \tau_{\min}) / T,

    so the temperature reaches the floor after :math:`T` steps and stays there. The tensor
    :attr:`temperature` keeps its identity, so distributions built from it each step see the
    current value without being rebuilt differently (the GenGS paper anneals 1.0 to 0.1).

    References:
        Generalized Gumbel-Softmax Gradient Estimator for Generic Discrete Random Variables.
        Weonyoung Joo, Dongjun Kim, Seungjae Shin, Il-Chul Moon, 2020.
        https://arxiv.org/abs/2003.01847

    Arguments:
        initial (float): :math:`\tau_0 > 0`.
        floor (float): :math:`\tau_{\min}`, with :math:`0 < \tau_{\min} \leq \tau_0`.
        steps (int): :math:`T \geq 1`, the number of steps to reach the floor.
        device (torch.device): where the temperature tensor lives (the parameters' device).
        dtype (torch.dtype): the temperature tensor's dtype: the parameters' dtype, float32
            for half-precision ones (the distributions compute those in float32, and a
            temperature of another dtype is copied, where :meth:`step` does not reach it).

    Attributes:
        temperature (Tensor): the current :math:`\tau_t`, a 0-dimensional tensor that
            :meth:`step` updates in place; pass it to the distributions.

    Example:
        >>> schedule = ExponentialDecay(1.0, 0.1, steps=2)
        >>> [round(float(schedule.step()), 4) for _ in range(3)]
        [0.3162, 0.1, 0.1]

    A checkpoint keeps :meth:`state_dict`, as for torch's learning-rate schedulers; a schedule
    built alike resumes from it with :meth:`load_state_dict`:

        >>> resumed = ExponentialDecay(1.0, 0.1, steps=2)
        >>> resumed.load_state_dict(schedule.state_dict())
        >>> resumed.step_count, round(float(resumed.temperature), 4)
        (3, 0.1)
    """

    def __init__(self, initial=1.0, floor=0.1, steps=1000, *, device=None, dtype=None):
        check_number("ExponentialDecay", "initial", initial)
        check_number(
            "ExponentialDecay", "floor", floor, "lie in (0, initial]", lambda f: 0 < f <= initial
        )
        steps = check_count("ExponentialDecay", "steps", steps)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"ExponentialDecay: `dtype` must be a torch.dtype, got {dtype!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(
                f"ExponentialDecay: `dtype` must be a floating torch.dtype, got {dtype!r}"
            )
        if (dtype or torch.get_default_dtype()) in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"ExponentialDecay: `dtype` {dtype or torch.get_default_dtype()}: the "
                "distributions compute half-precision "
                "parameters in float32 and would copy such a temperature, where step() does not "
                "reach it; pass torch.float32"
            )
        info = torch.finfo(dtype or torch.get_default_dtype())
        if not info.tiny <= floor <= initial <= info.max:
            raise ValueError(
                f"ExponentialDecay: `initial` and `floor` must be normal numbers of {info.dtype} "
                f"(in [{info.tiny:.3g}, {info.max:.3g}]), got {initial} and {floor}"
            )
        self.initial, self.floor, self.steps = float(initial), float(floor), steps
        self.rate = math.log(self.initial / self.floor) / steps
        self.step_count = 0
        self.temperature = torch.tensor(self.initial, device=device, dtype=dtype)

    def __repr__(self):
        return (
            f"ExponentialDecay(initial={self.initial}, floor={self.floor}, steps={self.steps}, "
            f"step_count={self.step_count})"
        )

    def value_at(self, step: int) -> float:
        """The temperature after ``step >= 0`` steps."""
        step = check_count("ExponentialDecay.value_at", "step", step, minimum=0)
        if step >= self.steps:  # exactly the floor (the exponential rounds near it)
            return self.floor
        return max(self.floor, self.initial * math.exp(-self.rate * step))

    def step(self) -> torch.Tensor:
        """Advances one step and returns the (same) temperature tensor."""
        self.step_count += 1
        self.temperature.fill_(self.value_at(self.step_count))
        return self.temperature

    def state_dict(self) -> dict:
        """The schedule's state: its parameters and the steps taken (plain Python numbers)."""
        return {
            "initial": self.initial,
            "floor": self.floor,
            "steps": self.steps,
            "step_count": self.step_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes from a :meth:`state_dict`: sets the steps taken and the temperature (in place,
        so distributions built from it see the value). Raises ``ValueError`` for the state of a
        schedule with other parameters, which would resume on another curve."""
        if not isinstance(state, dict):
            raise TypeError(
                f"ExponentialDecay.load_state_dict: `state` must be the dict state_dict() "
                f"returns, got {type(state).__name__}"
            )
        mine = self.state_dict()
        differing = [
            name for name in ("initial", "floor", "steps") if state.get(name) != mine[name]
        ]
        if differing:
            shown = ", ".join(
                f"{name} {state.get(name)!r} (here {mine[name]!r})" for name in differing
            )
            raise ValueError(f"ExponentialDecay.load_state_dict: a schedule of other {shown}")
        self.step_count = check_count(
            "ExponentialDecay.load_state_dict", "step_count", state.get("step_count"), minimum=0
        )
        self.temperature.fill_(self.value_at(self.step_count))

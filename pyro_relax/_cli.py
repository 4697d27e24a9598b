"""Argument types for the command line: numbers checked where they are parsed, so that a bad
value gives argparse's one-line usage error instead of a traceback later."""

import argparse
import math

__all__ = [
    "decay",
    "device",
    "fraction",
    "integer_at_least",
    "positive_float",
    "positive_int",
    "seed",
    "temperature_value",
]


def integer_at_least(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be an integer of at least {minimum}, got {text}"
            )
        return value

    parse.__name__ = f"integer at least {minimum}"
    return parse


positive_int = integer_at_least(1)


def positive_float(text: str) -> float:
    """An argparse type: a finite positive number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text}")
    return value


def seed(text: str) -> int:
    """An argparse type: a seed NumPy accepts, an integer in [0, 2**32)."""
    value = integer_at_least(0)(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2**32, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    value = positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def decay(text: str) -> float:
    """An argparse type: a factor in (0, 1] by which something decays (1: it does not)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1] (1: no decay), got {text}")
    return value


# The temperatures the relaxations accept in float32, the experiments' dtype: within [eps,
# 1 / eps] (beyond, a relaxation is numerically its hard or uniform limit).
_FLOAT32_EPS = 2.0**-23


def temperature_value(text: str) -> float:
    """An argparse type: a temperature the relaxations accept in float32."""
    value = positive_float(text)
    if not _FLOAT32_EPS <= value <= 1 / _FLOAT32_EPS:
        raise argparse.ArgumentTypeError(
            f"must lie within float32's [{_FLOAT32_EPS:.2g}, {1 / _FLOAT32_EPS:.2g}], the "
            f"temperatures the relaxations accept, got {text}"
        )
    return value


def device(text: str) -> str:
    """An argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:N``...),
    in one spelling per device, so that the records of one run do not differ by it: ``cpu``
    for any ``cpu:N`` (torch has one CPU device), ``cuda:N`` for ``cuda`` (the current one)."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"is not a torch device, got {text!r}") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type == "meta":
        raise argparse.ArgumentTypeError(
            f"{text}: the meta device holds no values; the experiments compute numbers"
        )
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text}: torch {torch.__version__} sees no CUDA device on this machine"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        return f"cuda:{index}"
    backend = getattr(torch, parsed.type, None)
    if backend is None or not backend.is_available():
        raise argparse.ArgumentTypeError(f"{text}: not available on this machine")
    return str(parsed)

"""Argument types for the command line: numbers checked where they are parsed, so that a bad
value gives argparse's one-line usage error instead of a traceback later."""

import argparse
import math

__all__ = ["integer_at_least", "positive_float", "positive_int"]


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

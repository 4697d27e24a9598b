"""Shared fixtures, and reports of the generated-input test at the end of a run."""

import pyro
import pytest


@pytest.fixture
def fresh_pyro():
    """An empty param store and Pyro's random state (torch, numpy, Python) seeded with 0, and
    the store emptied again afterwards; a test module opts in with
    ``pytestmark = pytest.mark.usefixtures("fresh_pyro")``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def pytest_terminal_summary(terminalreporter):
    import sys

    fuzz = sys.modules.get("test_fuzz")
    if fuzz is None or not fuzz.OUTCOMES:
        return
    outcomes = fuzz.OUTCOMES
    parts = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
    terminalreporter.write_line(f"generated inputs: {sum(outcomes.values())} cases tried: {parts}")

"""The README's quick start runs as written and does what the README says."""

import pathlib
import re

import pyro
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_quick_start_learns_the_posterior_rate():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    namespace = {}
    exec(compile(_quick_start(), str(README), "exec"), namespace)
    # The README's claim: within 0.5 of the KL-optimal Poisson rate 5.83 (computed with scipy
    # in tests/test_pyro_integration.py).
    assert float(pyro.param("rate").detach()) == pytest.approx(5.83, abs=0.5)
    pyro.clear_param_store()

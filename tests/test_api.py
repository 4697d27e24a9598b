"""The public API: every name documented, with a runnable example, and the papers cited."""

import inspect

import pytest
from pyro.distributions import TorchDistribution

import pyro_relax
import pyro_relax.distributions
import pyro_relax.transforms

PUBLIC = sorted(
    {
        (module.__name__, name)
        for module in (pyro_relax, pyro_relax.distributions, pyro_relax.transforms)
        for name in module.__all__
    }
)
DISTRIBUTIONS = [
    name
    for name, obj in vars(pyro_relax.distributions).items()
    if name in pyro_relax.distributions.__all__
    and inspect.isclass(obj)
    and issubclass(obj, TorchDistribution)
]


def _obj(module_name, name):
    return getattr(__import__(module_name, fromlist=[name]), name)


@pytest.mark.parametrize("module_name, name", PUBLIC, ids=lambda x: str(x))
def test_public_names_are_documented(module_name, name):
    # A class docstring built by concatenating strings is no docstring (``__doc__`` is None),
    # and its example would silently never run.
    obj = _obj(module_name, name)
    assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"
    if not (inspect.isclass(obj) and issubclass(obj, Warning)):
        assert ">>>" in obj.__doc__, f"{module_name}.{name} has no runnable example"


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_distributions_cite_their_paper(name):
    assert "arxiv.org/abs/" in getattr(pyro_relax.distributions, name).__doc__

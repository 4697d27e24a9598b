"""The public API: every name documented, with a runnable example, and the papers cited."""

import inspect
import re

import pytest
import torch

import pyro_relax
import pyro_relax.distributions
import pyro_relax.infer
import pyro_relax.transforms

PUBLIC = sorted(
    {
        (module.__name__, name)
        for module in (
            pyro_relax,
            pyro_relax.distributions,
            pyro_relax.infer,
            pyro_relax.transforms,
        )
        for name in module.__all__
    }
)


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


@pytest.mark.parametrize("module_name, name", PUBLIC, ids=lambda x: str(x))
def test_public_names_cite_their_paper(module_name, name):
    obj = _obj(module_name, name)
    if not (inspect.isclass(obj) and issubclass(obj, Warning)):
        assert "arxiv.org/abs/" in obj.__doc__, f"{name} does not cite the paper it comes from"


_SECTION = re.compile(
    r"^(References|Arguments|Args|Example|Examples|Returns|Raises|Notes?|Warnings?|Yields):$"
)


@pytest.mark.parametrize("module_name, name", PUBLIC, ids=lambda x: str(x))
def test_docstrings_render_in_sphinx(module_name, name):
    obj = _obj(module_name, name)
    if inspect.isclass(obj) and issubclass(obj, Warning):
        return
    lines = inspect.getdoc(obj).splitlines()
    # The API reference shows each name's defining equation.
    assert ".. math::" in obj.__doc__, f"{name} has no defining equation"
    # Napoleon turns "Args:" into a section only after a blank line; otherwise the reader sees
    # a literal ".. rubric::" glued to the previous paragraph.
    for before, line in zip(lines, lines[1:], strict=False):
        if _SECTION.match(line):
            assert not before.strip(), f"{name}: no blank line before {line!r}"


@pytest.mark.parametrize("module_name, name", PUBLIC, ids=lambda x: str(x))
def test_distributions_with_their_own_init_define_expand(module_name, name):
    # One expand pattern (docs/architecture.md): torch's _get_checked_instance in every class
    # that defines __init__, so that expand never builds an instance of the wrong class.
    obj = _obj(module_name, name)
    if inspect.isclass(obj) and issubclass(obj, torch.distributions.Distribution):
        if "__init__" in vars(obj):
            assert "expand" in vars(obj), f"{name} defines __init__ but not expand"
            assert "_get_checked_instance" in inspect.getsource(obj.expand)


# Distributions the generic suites do not run, and why; every other public distribution class
# must be what some registry example builds, or a new one would pass by never being tested.
_NOT_IN_THE_REGISTRY = {
    "FiniteDiscrete": "no relaxation: what discrete() returns, tested in test_finite_discrete.py",
}


def test_every_public_distribution_is_in_the_registry():
    from registry import EXAMPLES

    built = {type(example.build()).__name__ for example in EXAMPLES}
    public = {
        name
        for module_name, name in PUBLIC
        if inspect.isclass(obj := _obj(module_name, name))
        and issubclass(obj, torch.distributions.Distribution)
    }
    assert public - built == set(_NOT_IN_THE_REGISTRY), "add an Example to tests/examples_*.py"

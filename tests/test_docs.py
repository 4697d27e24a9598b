"""The Sphinx docs cover the public API, their examples run, and their inventories are sound.

Building the docs is CI's ``make docs`` step (Sphinx with warnings as errors); these checks need
no Sphinx.
"""

import pathlib
import re
import sys
import zlib

import pyro
import pytest
import torch

import pyro_relax

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
DIRECTIVE = re.compile(r"^\.\. auto(?:class|function|exception):: (\w+)$", re.MULTILINE)


def test_api_reference_lists_every_public_name_once():
    documented = [
        name for page in DOCS.glob("api/*.rst") for name in DIRECTIVE.findall(page.read_text())
    ]
    assert sorted(documented) == sorted(pyro_relax.__all__)


def _python_blocks(page):
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.DOTALL)


def test_installation_check_runs(capsys):
    (block,) = _python_blocks("installation.md")
    exec(compile(block, "installation.md", "exec"), {})
    assert capsys.readouterr().out.strip() == pyro_relax.__version__


def test_getting_started_plate_example_learns_each_item(capsys):
    # The page's quick start is the README's, tested in test_readme.py; this is its own example.
    (block,) = _python_blocks("getting_started.md")
    pyro.set_rng_seed(0)
    namespace = {}
    exec(compile(block, "getting_started.md", "exec"), namespace)
    rates = pyro.param("rates").detach()
    pyro.clear_param_store()
    # What the page claims: the item observed at 7 gets the largest rate. The posterior means
    # under a Poisson(3) prior and unit noise order the items as their observations do.
    assert int(rates.argmax()) == int(namespace["x"].argmax())
    assert torch.equal(rates.argsort(), namespace["x"].argsort())
    assert "tensor(" in capsys.readouterr().out


def _read_inventory(path):
    raw = pathlib.Path(path).read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = raw.index(b"\n", header_end) + 1
    assert raw[:header_end].startswith(b"# Sphinx inventory version 2\n")
    entries = {}
    for line in zlib.decompress(raw[header_end:]).decode().splitlines():
        name, role, priority, uri, display = line.split(" ")
        entries[name, role] = uri
    return entries


@pytest.fixture(scope="module")
def inventories(tmp_path_factory):
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from local_inventories import intersphinx_mapping
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    return intersphinx_mapping(tmp_path_factory.mktemp("inventories"))


def test_torch_inventory_uses_the_defining_module_anchor(inventories):
    base, path = inventories["torch"]
    entries = _read_inventory(path)
    anchor = "distributions.html#torch.distributions.poisson.Poisson"
    assert entries["torch.distributions.Poisson", "py:class"] == anchor
    assert entries["torch.distributions.poisson.Poisson", "py:class"] == anchor
    assert entries["torch.Tensor", "py:class"] == "tensors.html#torch.Tensor"
    assert base.startswith("https://")


def test_pyro_inventory_covers_what_the_docs_link_to(inventories):
    entries = _read_inventory(inventories["pyro"][1])
    assert entries["pyro.distributions.TorchDistribution", "py:class"].endswith(
        "#pyro.distributions.TorchDistribution"
    )
    # Sphinx resolves a base class by its defining module.
    assert ("pyro.distributions.torch_distribution.TorchDistribution", "py:class") in entries
    assert entries["pyro.infer.Trace_ELBO", "py:class"] == (
        "inference_algos.html#pyro.infer.trace_elbo.Trace_ELBO"
    )
    assert ("pyro.plate", "py:class") in entries

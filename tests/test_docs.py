"""The Sphinx docs cover the public API, their examples run, their inventories are sound, and
the helpers in ``docs/_ext`` do what the build relies on.

Building the docs is CI's ``make docs`` step (Sphinx with warnings as errors and every reference
resolved, then ``docs/_ext/check_offline.py`` on the pages); these checks need no Sphinx.
"""

import importlib
import inspect
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
    assert sorted(documented) == sorted(pyro_relax.__all__ + pyro_relax.infer.__all__)


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


def _docs_extension(name):
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(DOCS / "_ext"))


@pytest.fixture(scope="module")
def inventories(tmp_path_factory):
    intersphinx_mapping = _docs_extension("local_inventories").intersphinx_mapping
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


OFFLINE_PAGE = """<html><head>
<link rel="stylesheet" href="_static/pygments.css">
<link rel="canonical" href="https://pyro-relax.example.org/index.html">
<script>window.MathJax = {"options": {"processHtmlClass": "math"}}</script>
<script defer src="_static/mathjax/tex-chtml.js"></script>
<style>@font-face { font-family: M; src: url(_static/m.woff2); }</style>
</head><body><a href="https://arxiv.org/abs/2003.01847">the paper</a></body></html>"""

ONLINE_PAGE = """<html><head>
<script defer src="https://cdn.example.org/mathjax@4/tex-mml-chtml.js"></script>
<link rel="stylesheet" href="//fonts.example.org/css?family=Lato">
<script>window.MathJax = {"loader": {"paths": {"mathjax": "https://cdn.example.org/mj"}}}</script>
<style>@import "https://fonts.example.org/more.css";</style>
<div style="background: url('http://images.example.org/x.png')"></div>
</head><body></body></html>"""


def test_offline_check_accepts_local_loads_and_outbound_links():
    check_offline = _docs_extension("check_offline")
    assert check_offline.remote_loads_in_page(OFFLINE_PAGE) == []


def test_offline_check_names_each_remote_script_stylesheet_font_and_config():
    check_offline = _docs_extension("check_offline")
    loads = check_offline.remote_loads_in_page(ONLINE_PAGE)
    assert len(loads) == 5
    for address in ("cdn.example.org/mathjax@4", "//fonts.example.org/css", "example.org/mj"):
        assert any(address in load for load in loads), (address, loads)


def test_offline_check_reads_stylesheets_and_sets_the_exit_status(tmp_path, capsys):
    check_offline = _docs_extension("check_offline")
    (tmp_path / "index.html").write_text(OFFLINE_PAGE)
    (tmp_path / "_static").mkdir()
    font = tmp_path / "_static" / "theme.css"
    font.write_text('@font-face { src: url("https://fonts.example.org/a.woff2") }')
    assert check_offline.remote_loads(tmp_path) == [
        (font, "url(https://fonts.example.org/a.woff2)")
    ]
    assert check_offline.main([str(tmp_path)]) == 1
    font.write_text("@font-face { src: url(a.woff2) }")
    assert check_offline.main([str(tmp_path)]) == 0
    assert "a.woff2" in capsys.readouterr().err


def _public_classes():
    return [obj for obj in map(pyro_relax.__dict__.get, pyro_relax.__all__) if inspect.isclass(obj)]


def test_api_pages_show_public_bases_that_are_ancestors():
    public_api = _docs_extension("public_api")
    for cls in _public_classes():
        shown = public_api.public_bases(list(cls.__bases__))
        assert shown and all(issubclass(cls, base) for base in shown), cls
        assert not any(base.__name__.startswith("_") for base in shown), (cls, shown)


def test_api_pages_inherit_members_only_from_private_bases():
    excluded = set(_docs_extension("public_api").classes_not_to_inherit_from().split(","))
    for cls in _public_classes():
        for ancestor in cls.__mro__:
            private = ancestor.__name__.startswith("_") and ancestor.__module__.startswith(
                "pyro_relax"
            )
            assert (ancestor.__name__ in excluded) != private, ancestor


def test_submodule_paths_resolve_to_the_public_names():
    public_target = _docs_extension("public_api").public_target
    for cls in _public_classes():
        path = f"{cls.__module__}.{cls.__qualname__}"
        assert public_target(path) == f"pyro_relax.{cls.__name__}"
        assert public_target(f"{path}.log_prob") == f"pyro_relax.{cls.__name__}.log_prob"
    assert public_target("pyro_relax.distributions.NotAName") is None
    assert public_target("torch.distributions.Poisson") is None

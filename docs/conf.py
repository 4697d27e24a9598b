"""Sphinx configuration: furo, napoleon, MathJax, intersphinx to torch and Pyro, and the
tutorials rendered from their stored outputs (they are executed by ``tutorials/execute.py``,
never by the docs build)."""

import shutil
import sys
from pathlib import Path

import pyro_relax

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

from local_inventories import intersphinx_mapping as _local_inventories  # noqa: E402

project = "pyro-relax"
author = "the pyro-relax developers"
copyright = "2026, the pyro-relax developers"
release = version = pyro_relax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "myst_nb",
]
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store"]

# The API reference: class docstrings in Google style with ``.. math::`` blocks; the constructor
# signature belongs to the class.
autodoc_default_options = {"show-inheritance": True}
autodoc_class_signature = "mixed"
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False


# No network when the docs are built: inventories come from the installed torch and Pyro.
intersphinx_mapping = _local_inventories(DOCS / "_build" / "inventories")
intersphinx_timeout = 5

# Notebooks are shown with the outputs stored in them; CI executes them separately.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
suppress_warnings = ["mystnb.unknown_mime_type"]

html_theme = "furo"
html_title = f"pyro-relax {release}"
html_static_path = []


def _copy_tutorials():
    """Sphinx reads sources only under ``docs/``: copy the notebooks there (git ignores it)."""
    target = DOCS / "tutorials"
    target.mkdir(exist_ok=True)
    for stale in target.glob("*.ipynb"):
        stale.unlink()
    for notebook in sorted((ROOT / "tutorials").glob("[0-9]*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


_copy_tutorials()

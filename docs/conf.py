"""Sphinx configuration: furo, napoleon, MathJax served from the build, intersphinx to torch and
Pyro, and the tutorials rendered from their stored outputs (they are executed by
``tutorials/execute.py``, never by the docs build)."""

import shutil
import sys
from pathlib import Path

import pyro_relax

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

from local_inventories import intersphinx_mapping as _local_inventories  # noqa: E402
from public_api import classes_not_to_inherit_from  # noqa: E402

project = "pyro-relax"
author = "the pyro-relax developers"
copyright = "2026, the pyro-relax developers"
release = version = pyro_relax.__version__
REPOSITORY = "https://github.com/pyro-relax/pyro-relax"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "myst_nb",
    "local_mathjax",
    "public_api",
]
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store"]

# The API reference: class docstrings in Google style with ``.. math::`` blocks; the constructor
# signature belongs to the class. A member is listed when pyro_relax documents it: torch's
# generic docstrings (``expand``, ``log_prob``) are not inherited, and members come from the
# class itself or from a private base (see _ext/public_api.py), never from torch or Pyro.
autodoc_default_options = {
    "show-inheritance": True,
    "inherited-members": classes_not_to_inherit_from(),
}
autodoc_inherit_docstrings = False
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
# A training loop prints many lines: one output box per cell, not one per print.
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
suppress_warnings = ["mystnb.unknown_mime_type"]
# Code blocks without a language (tables of results, command output) are plain text.
highlight_language = "text"

html_theme = "furo"
html_title = f"pyro-relax {release}"
html_static_path = ["_static"]
html_css_files = ["notebook-tables.css"]
html_theme_options = {
    "footer_icons": [
        {"name": "Source code", "url": REPOSITORY, "html": "Source code", "class": ""},
    ],
}


def _copy_tutorials():
    """Sphinx reads sources only under ``docs/``: copy the notebooks there (git ignores it)."""
    target = DOCS / "tutorials"
    target.mkdir(exist_ok=True)
    for stale in target.glob("*.ipynb"):
        stale.unlink()
    for notebook in sorted((ROOT / "tutorials").glob("[0-9]*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


_copy_tutorials()

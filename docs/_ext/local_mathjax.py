"""Serve MathJax from the built docs, so that equations render with no network.

Sphinx's MathJax extension loads MathJax from a CDN; opened from disk or behind a firewall, the
pages then show raw LaTeX. The ``django-static-mathjax`` package (in the ``docs`` extra) ships
MathJax 3.2.2's browser build (the ``es5`` folder of ``mathjax-full``) as plain files. This
extension copies the TeX-to-HTML bundle and the folders it loads from at run time (TeX packages
loaded on first use, fonts, the context menu and its accessibility tools) to
``_static/mathjax/`` and points ``mathjax_path`` there. MathJax finds those folders relative to
the bundle's own address, so no further configuration is needed.
"""

import shutil
from pathlib import Path

BUNDLE = "tex-chtml.js"


def mathjax_source():
    """The installed ``es5`` folder of MathJax."""
    try:
        import mathjax
    except ImportError as error:
        raise ImportError(
            "the docs serve MathJax from the django-static-mathjax package: "
            'pip install -e ".[docs]"'
        ) from error
    source = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (source / BUNDLE).is_file():
        raise FileNotFoundError(f"no MathJax bundle at {source / BUNDLE}")
    return source


def _other_bundles(directory, names):
    # The top level holds a dozen combined bundles of 1 to 2 MB each; one is loaded.
    if Path(directory) != mathjax_source():
        return []
    return [name for name in names if name.endswith(".js") and name != BUNDLE]


def _use_local_copy(app, config):
    config.mathjax_path = f"mathjax/{BUNDLE}"


def _copy_mathjax(app, exception):
    if exception is None and app.builder.format == "html":
        target = Path(app.outdir) / "_static" / "mathjax"
        shutil.copytree(mathjax_source(), target, ignore=_other_bundles, dirs_exist_ok=True)


def setup(app):
    app.setup_extension("sphinx.ext.mathjax")
    mathjax_source()  # fail at the start of a build, not at its end
    app.connect("config-inited", _use_local_copy)
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""Show the API as ``pyro_relax`` exports it, not as its modules are laid out.

- A private base class (``_IGRBase``) is an implementation detail: the "Bases:" line shows its
  first public ancestor instead, and the members documented on it appear on each public subclass
  (``autodoc_default_options["inherited-members"]`` names every other class, see
  :func:`classes_not_to_inherit_from`).
- ``pyro_relax.distributions.gengs.TruncatedGenGS`` (how autodoc names a class it meets in a
  signature, and how some docstrings refer to it) resolves to the documented
  ``pyro_relax.TruncatedGenGS``.
- The short type names of the docstrings' argument lists, ``(float or Tensor)``, link to torch's
  documentation (:data:`TYPE_ALIASES`).
- A class docstring's mention of the class's own member, ``:meth:`log_prob```, links to the
  member's entry when it has one; a member with no docstring of its own has no entry (torch's
  generic docstrings are not repeated), and the mention is shown as code without a link. A name
  that is no member of the class still warns.
"""

import ast
import importlib
import inspect
import textwrap
from functools import cache

import pyro_relax

PACKAGE = pyro_relax.__name__

# Bare class names in docstrings (napoleon's argument types, return types) and what they mean.
TYPE_ALIASES = {
    "Tensor": "torch.Tensor",
    "Categorical": "torch.distributions.Categorical",
    "OneHotCategorical": "torch.distributions.OneHotCategorical",
}


def _is_private(cls):
    return cls.__name__.startswith("_")


def public_bases(bases):
    """``bases`` with each private class replaced by its first public ancestor, in order."""
    shown = []
    for base in bases:
        if _is_private(base):
            base = next(ancestor for ancestor in base.__mro__ if not _is_private(ancestor))
        if base not in shown:
            shown.append(base)
    return shown


def classes_not_to_inherit_from():
    """The names of every class above a public class except pyro_relax's private ones: passed as
    ``inherited-members``, autodoc then shows inherited members only when a private base defines
    them."""
    names = set()
    public = [getattr(pyro_relax, name) for name in pyro_relax.__all__]
    public += [getattr(pyro_relax.infer, name) for name in pyro_relax.infer.__all__]
    for obj in public:
        if inspect.isclass(obj):
            for ancestor in obj.__mro__:
                if not (ancestor.__module__.startswith(PACKAGE) and _is_private(ancestor)):
                    names.add(ancestor.__name__)
    return ",".join(sorted(names))


def public_target(target):
    """``pyro_relax.<submodules>.Name[.member]`` as ``pyro_relax.Name[.member]`` when
    ``pyro_relax.Name`` is that same object; ``None`` for any other target."""
    parts = target.split(".")
    if parts[0] != PACKAGE:
        return None
    for depth in range(2, len(parts)):
        name = parts[depth]
        if name not in pyro_relax.__all__:
            continue
        try:
            module = importlib.import_module(".".join(parts[:depth]))
        except ImportError:
            return None
        if getattr(module, name, None) is getattr(pyro_relax, name):
            return ".".join([PACKAGE, *parts[depth:]])
    return None


@cache
def _assigned_on_self(cls):
    """Attribute names that methods of ``cls`` assign as ``self.NAME = ...``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return frozenset(
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def is_own_member(module_name, class_name, member):
    """Whether ``member`` is an attribute of the class ``module_name.class_name``: defined on the
    class or one of its bases, or set on instances by a pyro_relax class's method."""
    if not (module_name or "").startswith(PACKAGE) or not class_name:
        return False
    obj = importlib.import_module(module_name)
    for name in class_name.split("."):
        obj = getattr(obj, name, None)
    if not inspect.isclass(obj):
        return False
    if hasattr(obj, member):
        return True
    ours = (cls for cls in obj.__mro__ if cls.__module__.startswith(PACKAGE))
    return any(member in _assigned_on_self(cls) for cls in ours)


def _show_public_bases(app, name, obj, options, bases):
    bases[:] = public_bases(bases)


def _resolve_as(app, env, node, contnode, target):
    """Resolve ``node`` as if it named ``target``: in these docs, then through intersphinx."""
    from sphinx.ext.intersphinx import missing_reference

    written = node["reftarget"]
    node["reftarget"] = target
    try:
        domain = env.get_domain("py")
        found = domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], target, node, contnode
        )
        return found if found is not None else missing_reference(app, env, node, contnode)
    finally:
        node["reftarget"] = written


def _resolve(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    meant = public_target(target)
    if meant is None and node["reftype"] in ("class", "obj"):
        meant = TYPE_ALIASES.get(target)
    if meant is not None:
        return _resolve_as(app, env, node, contnode, meant)
    if node["reftype"] in ("meth", "attr") and "." not in target:
        if is_own_member(node.get("py:module"), node.get("py:class"), target):
            return contnode
    return None


def setup(app):
    app.connect("autodoc-process-bases", _show_public_bases)
    app.connect("missing-reference", _resolve)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

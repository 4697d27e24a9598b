"""Intersphinx inventories for torch and Pyro, written from the installed packages.

The docs build runs where no network is reachable, so Sphinx cannot fetch ``objects.inv`` from
pytorch.org or docs.pyro.ai. This module lists the names our docs refer to from the installed
``torch`` and ``pyro`` and writes inventories in Sphinx's format, with the anchors those sites use:
torch documents each distribution under its defining module (``torch.distributions.poisson.Poisson``
on ``distributions.html``); Pyro documents its distributions under ``pyro.distributions`` and its
inference algorithms under their defining modules.
"""

import inspect
import zlib
from pathlib import Path

TORCH_URL = "https://docs.pytorch.org/docs/stable/"
PYRO_URL = "https://docs.pyro.ai/en/stable/"


def _classes(module):
    for name in getattr(module, "__all__", dir(module)):
        obj = getattr(module, name, None)
        if inspect.isclass(obj):
            yield name, obj


def torch_entries():
    import torch
    import torch.distributions as td
    import torch.distributions.transforms as tt

    yield "torch.Tensor", "py:class", "tensors.html#torch.Tensor"
    yield "torch.Size", "py:class", "size.html#torch.Size"
    for name in ("dtype", "device"):
        yield f"torch.{name}", "py:class", f"tensor_attributes.html#torch.{name}"
    yield "torch.nn.Module", "py:class", "generated/torch.nn.Module.html#torch.nn.Module"
    yield "torch.distributions.constraints", "py:module", "distributions.html#module-$"
    for name in ("kl_divergence", "register_kl"):
        anchor = f"torch.distributions.kl.{name}"
        for alias in (f"torch.distributions.{name}", anchor):
            yield alias, "py:function", f"distributions.html#{anchor}"
    for module, prefix in ((td, "torch.distributions"), (tt, "torch.distributions.transforms")):
        for name, cls in _classes(module):
            anchor = f"{cls.__module__}.{cls.__qualname__}"
            for alias in {f"{prefix}.{name}", anchor}:
                yield alias, "py:class", f"distributions.html#{anchor}"
    del torch


def pyro_entries():
    import pyro
    import pyro.distributions as pd
    import pyro.infer as pi

    for name, cls in _classes(pd):
        anchor = f"pyro.distributions.{name}"
        for alias in {anchor, f"{cls.__module__}.{cls.__qualname__}"}:
            yield alias, "py:class", f"distributions.html#{anchor}"
    for name, _ in _classes(pd.transforms):
        anchor = f"pyro.distributions.transforms.{name}"
        yield anchor, "py:class", f"distributions.html#{anchor}"
    for name, cls in _classes(pi):
        anchor = f"{cls.__module__}.{cls.__qualname__}"
        for alias in {f"pyro.infer.{name}", anchor}:
            yield alias, "py:class", f"inference_algos.html#{anchor}"
    for name, cls in _classes(pi.autoguide):
        anchor = f"pyro.infer.autoguide.{name}"
        for alias in {anchor, f"{cls.__module__}.{cls.__qualname__}"}:
            yield alias, "py:class", f"infer.autoguide.html#{anchor}"
    for name in ("sample", "param", "plate", "module", "factor", "deterministic"):
        anchor = f"pyro.primitives.{name}"
        role = "py:class" if name == "plate" else "py:function"
        for alias in (f"pyro.{name}", anchor):
            yield alias, role, f"primitives.html#{anchor}"
    del pyro


def write_inventory(path, project, version, entries):
    lines = sorted({f"{name} {role} 1 {uri} -" for name, role, uri in entries})
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode() + zlib.compress("\n".join(lines).encode() + b"\n"))
    return path


def intersphinx_mapping(directory):
    """Write both inventories under ``directory``; return a value for ``intersphinx_mapping``."""
    import pyro
    import torch

    directory = Path(directory)
    torch_inv = write_inventory(
        directory / "torch.inv", "PyTorch", torch.__version__, torch_entries()
    )
    pyro_inv = write_inventory(directory / "pyro.inv", "Pyro", pyro.__version__, pyro_entries())
    return {"torch": (TORCH_URL, str(torch_inv)), "pyro": (PYRO_URL, str(pyro_inv))}

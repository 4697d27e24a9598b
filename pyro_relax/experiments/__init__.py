"""Experiments reproducing the papers' results through Pyro SVI: ``pyro-relax experiment NAME``.

Each experiment is a module with ``DESCRIPTION`` (its ``--help`` text),
``add_arguments(parser)`` and ``run(args)`` (returning an exit code). The command line adds the
options every experiment shares: ``--seed``, ``--smoke`` (a few seconds, for CI), ``--results``
(the directory the results go to), ``--device`` and ``args.command_line`` (the exact command,
stored with each result).
"""

import importlib

__all__ = ["EXPERIMENTS", "load"]

# name: (module, one-line summary). Modules are imported only when their experiment runs.
EXPERIMENTS = {
    "synthetic": (
        "pyro_relax.experiments.synthetic",
        "gradient bias and variance of count estimators on a synthetic loss (GenGS paper 6.1)",
    ),
    "vae": (
        "pyro_relax.experiments.vae",
        "a VAE with count latents on MNIST (GenGS paper 6.2, Table 1)",
    ),
    "topic": (
        "pyro_relax.experiments.topic",
        "a neural Poisson deep exponential family topic model (GenGS paper 6.3)",
    ),
    "gst-vae": (
        "pyro_relax.experiments.gst_vae",
        "a VAE with 30 categorical latents on MNIST: GST, STGS, ST, GR-MCK (GST paper, Tables 2-3)",
    ),
    "igr-vae": (
        "pyro_relax.experiments.igr_vae",
        "the linear discrete VAE on MNIST: IGR-I, IGR-SB, IGR-Planar and GS (IGR paper, Table 1)",
    ),
    "neyman": (
        "pyro_relax.experiments.neyman",
        "a Neyman Type A regression of doctor visits (RAND HIE): GenGS pairs and their bias",
    ),
}


def load(name: str):
    """The module of experiment ``name``."""
    return importlib.import_module(EXPERIMENTS[name][0])

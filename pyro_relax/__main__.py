"""Command-line interface: ``python -m pyro_relax COMMAND``, also installed as ``pyro-relax``."""

import argparse
import sys

from pyro_relax.demo import DemoConfig, MissingDependencyError, run_demo

__all__ = ["build_parser", "main"]

# A few steps of each run: enough to exercise every code path, for tests.
_SMOKE = {"epochs": 2, "steps_per_epoch": 3, "eval_samples": 2}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _run_demo(args) -> int:
    settings = _SMOKE if args.smoke else {"epochs": args.epochs}
    try:
        run_demo(DemoConfig(seed=args.seed, **settings), args.output)
    except MissingDependencyError as error:
        print(f"pyro-relax demo: {error}", file=sys.stderr)
        return 1
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a Poisson-latent VAE on the digits with GenGS and with REINFORCE",
        description="Trains a VAE with Poisson count latents on scikit-learn's 8x8 digits "
        "twice, with GenGS and with REINFORCE (score function with a baseline), prints the "
        "ELBO of the discrete model for each and plots the training curves.",
    )
    parser.add_argument(
        "--epochs", type=_positive_int, default=DemoConfig.epochs, help="training epochs"
    )
    parser.add_argument("--seed", type=int, default=DemoConfig.seed, help="random seed")
    parser.add_argument(
        "--output", default="demo_elbo.png", help="PNG file for the training curves"
    )
    parser.add_argument("--smoke", action="store_true", help="run a few steps only (tests)")
    parser.set_defaults(run=_run_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subcommand per task."""
    parser = argparse.ArgumentParser(
        prog="pyro-relax", description="Demos and experiments of pyro-relax."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(subparsers)
    return parser


def main(argv=None) -> int:
    """Runs the command in ``argv`` (default: the process's arguments); returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command-line interface: ``python -m pyro_relax COMMAND``, also installed as ``pyro-relax``."""

import argparse
import os
import shlex
import sys
from pathlib import Path

from pyro_relax._cli import device, positive_int, seed
from pyro_relax.demo import DemoConfig, MissingDependencyError, run_demo

__all__ = ["build_parser", "main"]

# A few steps of each run: enough to exercise every code path, for tests.
_SMOKE = {"epochs": 2, "steps_per_epoch": 3, "eval_samples": 2, "snr_draws": 3}
# Where experiments write unless told otherwise: not the repository's committed results/, which
# only a deliberate `--results results` updates.
_DEFAULT_RESULTS = "pyro-relax-results"


def _run_demo(args) -> int:
    output = Path(args.output)
    # Checked before training: the plot is written at the end.
    if output.suffix.lower() != ".png" or not output.parent.is_dir() or output.is_dir():
        problem = "must be a .png file in an existing directory"
    elif not os.access(output.parent, os.W_OK):
        problem = "is in a folder this user cannot write"
    else:
        problem = None
    if problem:
        print(f"pyro-relax demo: --output {args.output}: {problem}", file=sys.stderr)
        return 1
    settings = _SMOKE if args.smoke else {"epochs": args.epochs}
    try:
        run_demo(DemoConfig(seed=args.seed, **settings), args.output)
    except MissingDependencyError as error:
        print(f"pyro-relax demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyro-relax demo: interrupted", file=sys.stderr)
        return 130
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a Poisson-latent VAE on the digits with GenGS, GenGS-IMP and REINFORCE",
        description="Trains a VAE with Poisson count latents on scikit-learn's 8x8 digits "
        "three times, with GenGS, with GenGS-IMP (free logits over the outcomes) and with "
        "REINFORCE (score function with a baseline), prints the ELBO of the discrete model and "
        "the encoder's gradient signal-to-noise ratio for each and plots both per epoch.",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=DemoConfig.epochs, help="training epochs"
    )
    parser.add_argument("--seed", type=seed, default=DemoConfig.seed, help="random seed")
    parser.add_argument(
        "--output", default="demo_elbo.png", help="PNG file for the training curves"
    )
    parser.add_argument("--smoke", action="store_true", help="run a few steps only (tests)")
    parser.set_defaults(run=_run_demo)


def _add_experiments(subparsers, argv) -> None:
    from pyro_relax import experiments

    parser = subparsers.add_parser(
        "experiment",
        help="reproduce a paper's experiment through Pyro SVI",
        description="Experiments that reproduce the papers' results through Pyro SVI. Results "
        "go to --results as JSON (one record per run, merged with earlier runs), a Markdown "
        "table and plots; an interrupted run resumes from its checkpoint.",
    )
    names = parser.add_subparsers(dest="experiment", required=True, metavar="NAME")
    # Only the experiment being run is imported (each pulls in its own dependencies).
    chosen = argv[1] if len(argv) > 1 and argv[0] == "experiment" else None
    for name, (_, summary) in experiments.EXPERIMENTS.items():
        sub = names.add_parser(name, help=summary, description=summary)
        if name != chosen:
            continue
        sub.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
        sub.add_argument(
            "--smoke", action="store_true", help="tiny settings that run in seconds (CI)"
        )
        sub.add_argument(
            "--results",
            default=_DEFAULT_RESULTS,
            help=f"directory for results (default: {_DEFAULT_RESULTS}; the repository's "
            "committed results are updated with --results results)",
        )
        sub.add_argument("--device", type=device, default="cpu", help="torch device (default: cpu)")
        module = experiments.load(name)
        sub.description = module.DESCRIPTION
        module.add_arguments(sub)
        sub.set_defaults(run=_run_experiment, run_experiment=module.run)


def _run_experiment(args) -> int:
    """Runs the chosen experiment. A problem the user can fix (a damaged or missing file) is
    one line on stderr and exit status 1, not a traceback; so is Ctrl-C, with status 130."""
    from pyro_relax.experiments.common import Checkpoint, ExperimentError

    try:
        # Made before training: results and checkpoints are written only after the first
        # epoch, which a folder that cannot be made or written to would lose.
        try:
            Path(args.results).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ExperimentError(
                f"--results {args.results}: cannot be made a folder ({error.strerror})"
            ) from None
        if not os.access(args.results, os.W_OK):
            raise ExperimentError(f"--results {args.results}: a folder this user cannot write")
        Checkpoint.touched.clear()  # this command's, for the message below
        return args.run_experiment(args)
    except ExperimentError as error:
        print(f"pyro-relax experiment {args.experiment}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C is how a run is stopped: the checkpoints and the merged results are written
        # atomically, so what was saved is whole.
        kept = sorted(path for path in Checkpoint.touched if path.exists())
        if kept:
            resume = f"resume from {', '.join(map(str, kept))}"
        else:
            resume = "start again (no checkpoint was saved yet)"
        print(
            f"pyro-relax experiment {args.experiment}: interrupted; run the same command "
            f"again to {resume}",
            file=sys.stderr,
        )
        return 130  # the shell's status for a process stopped by SIGINT


def build_parser(argv=()) -> argparse.ArgumentParser:
    """The argument parser, with one subcommand per task (``argv`` selects the experiment whose
    options are loaded)."""
    parser = argparse.ArgumentParser(
        prog="pyro-relax", description="Demos and experiments of pyro-relax."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(subparsers)
    _add_experiments(subparsers, list(argv))
    return parser


def main(argv=None) -> int:
    """Runs the command in ``argv`` (default: the process's arguments); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    args.command_line = shlex.join(["pyro-relax", *argv])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

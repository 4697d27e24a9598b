"""Memory and time of ``discrete()`` of IGR-I and IGR-SB, by batch size.

``IGR.discrete()`` integrates the categorical of the limit tau -> 0 by quadrature
(``igr_log_probs``), ``IGRStickBreaking.discrete()`` (and IGR-Planar's, IGRCount's) estimates
it from 10,000 draws; ``discretize``, ``discrete_elbo`` and ``AutoRelaxed.median`` call them.
Each size runs in a fresh process, which reports its peak resident memory before and after the
call (``ru_maxrss``) and the call's time (``--clock``), so that one size's peak does not hide
the next's. Run it against another version of the library with ``PYTHONPATH=<that checkout>``.

    python benchmarks/discrete_memory.py [--family IGR IGRStickBreaking] [--batch 10 100]
        [--latents 20] [--categories 10] [--clock wall]
"""

import argparse
import json
import resource
import shlex
import subprocess
import sys

import torch
from bench_gengs import add_clock_option, machine, time_per_call, use_clock

import pyro_relax as pr
from pyro_relax._cli import integer_at_least, positive_int

CPU = torch.device("cpu")


FAMILIES = ("IGR", "IGRStickBreaking")


def _measure(family: str, batch: int, latents: int, categories: int) -> dict:
    torch.manual_seed(0)
    shape = (batch, latents, categories - 1)
    d = getattr(pr, family)(torch.zeros(shape), torch.ones(shape), 0.5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = time_per_call(d.discrete, CPU, 1) / 1e3
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "before_mib": before / 1024, "after_mib": after / 1024}


def _measure_in_child(command) -> dict:
    """The measurement a child process ``command`` prints; its error output if it fails."""
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        raise SystemExit(
            f"discrete_memory: the size's process failed with exit status {run.returncode} "
            f"(its error output above): {shlex.join(command)}"
        )
    return json.loads(run.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[10, 100])
    parser.add_argument("--latents", type=positive_int, default=20)
    parser.add_argument("--categories", type=integer_at_least(2), default=10)
    parser.add_argument(
        "--threads", type=positive_int, help="torch.set_num_threads (default: torch's)"
    )
    add_clock_option(parser)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process's size
    args = parser.parse_args(argv)
    clock = use_clock(args.clock, CPU)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.one is not None:
        [family] = args.family
        print(json.dumps(_measure(family, args.one, args.latents, args.categories)))
        return
    print(machine(CPU))  # with this process's thread count: the children's
    print(clock)
    print(
        f"discrete(): batch x {args.latents} latents x {args.categories} categories, float32 "
        "(IGRStickBreaking: 10,000 draws)"
    )
    header = f"{'family':>16} {'batch':>6} {'seconds':>9} {'peak MiB before':>16} {'after':>6}"
    print(header, flush=True)
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    for family in args.family:
        for batch in args.batch:
            command = [sys.executable, __file__, "--family", family, "--one", str(batch),
                       "--latents", str(args.latents), "--categories", str(args.categories),
                       "--clock", args.clock, *threads]  # fmt: skip
            result = _measure_in_child(command)
            print(
                f"{family:>16} {batch:>6} {result['seconds']:>9.2f} "
                f"{result['before_mib']:>16.0f} {result['after_mib']:>6.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

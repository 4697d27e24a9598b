"""Memory and time of the Monte Carlo ``discrete()`` of IGR-SB, by batch size.

``IGRStickBreaking.discrete()`` (and IGR-Planar's, IGRCount's) estimates the categorical of the
limit tau -> 0 from 10,000 draws; ``discretize``, ``discrete_elbo`` and ``AutoRelaxed.median``
call it. Each size runs in a fresh process, which reports its peak resident memory before and
after the call (``ru_maxrss``) and the call's time (``--clock``), so that one size's peak does
not hide the next's. Run it against another version of the library with
``PYTHONPATH=<that checkout>``.

    python benchmarks/discrete_memory.py [--batch 10 100] [--latents 20] [--categories 10]
        [--clock wall]
"""

import argparse
import json
import resource
import subprocess
import sys

import torch
from bench_gengs import add_clock_option, machine, time_per_call, use_clock

import pyro_relax as pr

CPU = torch.device("cpu")


def _measure(batch: int, latents: int, categories: int) -> dict:
    torch.manual_seed(0)
    shape = (batch, latents, categories - 1)
    d = pr.IGRStickBreaking(torch.zeros(shape), torch.ones(shape), 0.5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = time_per_call(d.discrete, CPU, 1) / 1e3
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "before_mib": before / 1024, "after_mib": after / 1024}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--latents", type=int, default=20)
    parser.add_argument("--categories", type=int, default=10)
    add_clock_option(parser)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process's size
    args = parser.parse_args(argv)
    clock = use_clock(args.clock, CPU)
    if args.one is not None:
        print(json.dumps(_measure(args.one, args.latents, args.categories)))
        return
    print(machine(CPU))
    print(clock)
    print(
        f"IGRStickBreaking(...).discrete(): batch x {args.latents} latents x "
        f"{args.categories} categories, 10,000 draws, float32"
    )
    print(f"{'batch':>6} {'seconds':>9} {'peak MiB before':>16} {'peak MiB after':>15}")
    for batch in args.batch:
        command = [sys.executable, __file__, "--one", str(batch), "--latents",
                   str(args.latents), "--categories", str(args.categories),
                   "--clock", args.clock]  # fmt: skip
        result = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
        print(
            f"{batch:>6} {result['seconds']:>9.2f} {result['before_mib']:>16.0f} "
            f"{result['after_mib']:>15.0f}"
        )


if __name__ == "__main__":
    main()

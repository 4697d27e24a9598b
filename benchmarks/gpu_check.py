"""The GPU check: the CUDA test set and every benchmark on one device, in one run, one report.

Every GPU figure in benchmarks/README.md and the docs comes from one run of this script on a
machine with CUDA, so that a short loan of a GPU gives all of them::

    python benchmarks/gpu_check.py                  # or: make gpu-check
    python benchmarks/gpu_check.py --out gpu-check --data ../shared/data/mnist

Steps, each a subprocess with its own time limit (``--timeout``), run in this order:

- ``tests``: ``pytest tests/test_cuda.py tests/test_no_host_copies.py`` (every registry example
  and every experiment's smoke run on the device; no host synchronization under torch's sync
  debug mode "error");
- ``bench_gengs``, ``bench_igr``, ``bench_gst``, ``bench_training``: the benchmarks with
  ``--device``; ``bench_gengs`` adds its large sizes (up to 10^6 x 128) on CUDA;
- ``kernel_counts``: the operators dispatched per call, counted on the CPU (the proxy of the
  GPU's kernel launches at small sizes);
- ``compile``: ``bench_gengs --compile`` without its large sizes, the GenGS step compiled by
  ``torch.compile`` against eager (fused kernels: what a launch-bound step may gain).

With ``--budget`` the whole run keeps to that many seconds: each step's limit is cut to what is
left, and a step that would start with less than ``MIN_STEP_SECONDS`` left is not run (the
report says so). A lent GPU machine holds one command for a few minutes only: the budget makes
the run end inside that limit with every finished step reported.

The report, ``OUT/report.md``, starts with the machine (GPU name, driver, torch and CUDA
versions, the commit) and gives each step's command, seconds, exit status and output. It is
rewritten after every step, so an interrupted run keeps the steps that finished. The exit
status is 1 if a step failed or timed out. ``--device cpu --quick`` runs the same steps with
tiny settings on the CPU (the test suite does, so that this script cannot rot).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_gengs import machine as describe_machine  # the benchmarks' one description

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
STEPS = (
    "tests",
    "bench_gengs",
    "bench_igr",
    "bench_gst",
    "bench_training",
    "kernel_counts",
    "compile",
)

# A step is not started with less time than this left of --budget.
MIN_STEP_SECONDS = 20
NOT_RUN = "not run"  # the status of a step that the budget left out

# Tiny settings per step for --quick (seconds on a CPU; the figures mean nothing).
QUICK = {
    "tests": ["-k", "GenGSPoisson or gst-vae"],
    "bench_gengs": ["--repeats", "2", "--number", "2", "--sizes", "1e3x16", "--scale-repeats", "2"],
    "bench_igr": ["--repeats", "2", "--number", "2"],
    "bench_gst": ["--steps", "2", "--warmup", "1", "--num-draws", "10"],
    "bench_training": ["--smoke"],
    "kernel_counts": ["--batch", "10", "5", "--outcomes", "8"],
    "compile": ["--repeats", "2", "--number", "2"],
}


def commands(device: str, quick: bool, data: str | None) -> dict:
    """The command line of each step."""
    python = sys.executable
    result = {
        "tests": [
            python,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/test_cuda.py",
            "tests/test_no_host_copies.py",
        ]
    }
    for name in ("bench_gengs", "bench_igr", "bench_gst", "bench_training"):
        result[name] = [python, str(BENCHMARKS / f"{name}.py"), "--device", device]
    if data is not None:
        result["bench_gst"] += ["--data", data]
    result["kernel_counts"] = [python, str(BENCHMARKS / "kernel_counts.py")]
    result["compile"] = result["bench_gengs"] + ["--sizes", "--compile"]
    if quick:
        for name, options in QUICK.items():
            result[name] = result[name] + options
    return result


def machine(device: str) -> str:
    """The benchmarks' description of the machine, with the date and the GPU's driver."""
    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, device {device}"]
    lines += describe_machine(torch.device(device)).splitlines()
    smi = _run_quietly(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv"])
    if smi:
        lines.append(f"nvidia-smi: {smi.replace(chr(10), '; ')}")
    return "\n".join(f"- {line}" for line in lines)


def _run_quietly(command) -> str:
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def run_step(command, timeout: float, env) -> tuple[int | None, float, str]:
    """(exit status or None if it timed out, seconds, stdout and stderr)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
        )
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as stopped:
        status = None
        output = "".join(
            part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
            for part in (stopped.stdout, stopped.stderr)
        )
    # The profiler's tracing library prints a line per session on stderr; noise in a report.
    lines = [line for line in output.splitlines() if not line.startswith("USDT:")]
    return status, time.perf_counter() - start, "\n".join(lines)


def _shown(status) -> str:
    if status == NOT_RUN:
        return "not run: the budget was spent"
    return "timed out" if status is None else f"exit status {status}"


def report(header: str, sections: list) -> str:
    run = [section for section in sections if section[2] != NOT_RUN]
    failed = [name for name, _, status, _, _ in run if status != 0]
    left_out = [name for name, _, status, _, _ in sections if status == NOT_RUN]
    parts = ["failed: " + ", ".join(failed)] if failed else []
    if left_out:
        parts.append("not run (budget spent): " + ", ".join(left_out))
    summary = "; ".join(parts) or "all steps passed"
    parts = [f"# GPU check\n\n{header}\n\n**{summary}** ({len(run)} steps run)\n"]
    for name, command, status, seconds, output in sections:
        if status == NOT_RUN:
            parts.append(f"## {name}\n\n`{' '.join(command)}`: {_shown(status)}\n")
            continue
        parts.append(
            f"## {name}\n\n`{' '.join(command)}`: {_shown(status)}, {seconds:.0f} s\n\n"
            f"```\n{output.rstrip()}\n```\n"
        )
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (default cuda)")
    parser.add_argument("--out", default="gpu-check", help="folder of report.md")
    parser.add_argument("--data", help="MNIST IDX folder for bench_gst (default: its own)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--timeout", type=float, default=300, help="seconds per step")
    parser.add_argument(
        "--budget", type=float, help="seconds for the whole run (default: no limit)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings (checks the script)")
    args = parser.parse_args(argv)
    start = time.perf_counter()  # the budget counts from here
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check: torch {torch.__version__} sees no CUDA device; run on a machine with "
            "a GPU, or pass --device cpu (with --quick to check the script)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYRO_RELAX_TEST_DEVICE=args.device, PYTHONUNBUFFERED="1")
    # The benchmarks import each other and the tests their registry by folder.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), str(BENCHMARKS), os.environ.get("PYTHONPATH")])
    )
    header = machine(args.device)
    print(header, flush=True)
    lines = commands(args.device, args.quick, args.data)
    sections = []
    for name in args.steps:
        timeout = args.timeout
        if args.budget is not None:
            timeout = min(timeout, args.budget - (time.perf_counter() - start))
        if timeout < min(MIN_STEP_SECONDS, args.timeout):
            print(f"\n== {name}: not run, {max(timeout, 0):.0f} s of the budget left", flush=True)
            status, seconds, output = NOT_RUN, 0.0, ""
        else:
            print(f"\n== {name}: {' '.join(lines[name])}", flush=True)
            status, seconds, output = run_step(lines[name], timeout, env)
            print(output, flush=True)
            print(f"== {name}: {_shown(status)} after {seconds:.0f} s", flush=True)
        sections.append((name, lines[name], status, seconds, output))
        (out / "report.md").write_text(report(header, sections))
    print(f"\nreport: {out / 'report.md'}")
    return 0 if all(status == 0 for _, _, status, _, _ in sections) else 1


if __name__ == "__main__":
    sys.exit(main())

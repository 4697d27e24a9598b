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
- ``compile``: ``bench_gengs --compile`` without its large sizes and small-size tables (the
  ``bench_gengs`` step prints those), the GenGS step compiled by ``torch.compile`` against
  eager (fused kernels: what a launch-bound step may gain).

With ``--budget`` the whole run keeps to that many seconds: each step's limit is cut to what is
left, and a step that would start with less than ``MIN_STEP_SECONDS`` left is not run (the
report says so). A lent GPU machine holds one command for a few minutes only: the budget makes
the run end inside that limit with every finished step reported.

The report, ``OUT/report.md``, starts with the machine (GPU name, driver, torch and CUDA
versions, the commit) and a summary, which names the tests that pytest skipped (a GPU report
whose sync checks skipped is not complete), and gives each step's command (quoted for a shell),
seconds, exit status and output. It is rewritten after every step, so an interrupted run keeps
the steps that finished; Ctrl-C (SIGINT) stops the running step, and the report says which it
was and which steps never ran. The exit status is 1 if a step failed or timed out, 130 if the
run was interrupted. ``--device cpu --quick`` runs the same steps with
tiny settings on the CPU (the test suite does, so that this script cannot rot).
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_gengs import machine as describe_machine  # the benchmarks' one description

from pyro_relax._cli import device as device_name

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
INTERRUPTED = "interrupted"  # the status of the step that Ctrl-C stopped
NEVER_RUN = "never run"  # the status of the steps after it
# pytest's line per skip reason under -rs: "SKIPPED [5] tests/test_x.py:56: needs CUDA".
SKIPPED = re.compile(r"^SKIPPED \[(\d+)\] (.*)$", re.MULTILINE)

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
    result["compile"] = result["bench_gengs"] + ["--sizes", "--no-small", "--compile"]
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
    if status == INTERRUPTED:
        return "interrupted (Ctrl-C): its output is lost"
    if status == NEVER_RUN:
        return "never run: the check was interrupted before it"
    return "timed out" if status is None else f"exit status {status}"


def _skips(output: str) -> str:
    """The tests pytest skipped, with the reasons, from its ``-rs`` lines ("" if none)."""
    found = SKIPPED.findall(output)
    if not found:
        return ""
    count = sum(int(number) for number, _ in found)
    reasons = "; ".join(f"{where} ({number})" for number, where in found)
    return f"{count} tests skipped: {reasons}"


def report(header: str, sections: list) -> str:
    run = [section for section in sections if section[2] not in (NOT_RUN, NEVER_RUN)]
    failed = [name for name, _, status, _, _ in run if status not in (0, INTERRUPTED)]
    left_out = [name for name, _, status, _, _ in sections if status == NOT_RUN]
    stopped = [name for name, _, status, _, _ in sections if status == INTERRUPTED]
    never = [name for name, _, status, _, _ in sections if status == NEVER_RUN]
    parts = [f"interrupted during {stopped[0]}"] if stopped else []
    if never:
        parts.append("never run: " + ", ".join(never))
    if failed:
        parts.append("failed: " + ", ".join(failed))
    if left_out:
        parts.append("not run (budget spent): " + ", ".join(left_out))
    summary = "; ".join(parts) or "all steps passed"
    skips = [f"{name}: {_skips(output)}" for name, _, _, _, output in run if _skips(output)]
    if skips:
        summary += "; " + "; ".join(skips)
    parts = [f"# GPU check\n\n{header}\n\n**{summary}** ({len(run)} steps run)\n"]
    for name, command, status, seconds, output in sections:
        if status in (NOT_RUN, NEVER_RUN):
            parts.append(f"## {name}\n\n`{shlex.join(command)}`: {_shown(status)}\n")
            continue
        parts.append(
            f"## {name}\n\n`{shlex.join(command)}`: {_shown(status)}, {seconds:.0f} s\n\n"
            f"```\n{output.rstrip()}\n```\n"
        )
    return "\n".join(parts)


def _device(text: str) -> str:
    """``pyro_relax._cli.device``, with how to check the script on a machine without it."""
    try:
        return device_name(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(
            f"{error}; run on a machine with a GPU, or pass --device cpu (with --quick to check "
            "the script)"
        ) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", type=_device, default="cuda", help="cuda, cuda:N, or cpu (default cuda)"
    )
    parser.add_argument("--out", default="gpu-check", help="folder of report.md")
    parser.add_argument("--data", help="MNIST IDX folder for bench_gst (default: its own)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--timeout", type=float, default=300, help="seconds per step")
    parser.add_argument(
        "--budget", type=float, help="seconds for the whole run (default: no limit)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings (checks the script)")
    args = parser.parse_args(argv)  # the device checked before the folder is made
    start = time.perf_counter()  # the budget counts from here
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
    for position, name in enumerate(args.steps):
        timeout = args.timeout
        if args.budget is not None:
            timeout = min(timeout, args.budget - (time.perf_counter() - start))
        if timeout < min(MIN_STEP_SECONDS, args.timeout):
            print(f"\n== {name}: not run, {max(timeout, 0):.0f} s of the budget left", flush=True)
            status, seconds, output = NOT_RUN, 0.0, ""
        else:
            print(f"\n== {name}: {shlex.join(lines[name])}", flush=True)
            began = time.perf_counter()
            try:
                status, seconds, output = run_step(lines[name], timeout, env)
            except KeyboardInterrupt:
                # subprocess.run has stopped the step; the report must not read as complete.
                sections.append((name, lines[name], INTERRUPTED, time.perf_counter() - began, ""))
                sections += [
                    (rest, lines[rest], NEVER_RUN, 0.0, "") for rest in args.steps[position + 1 :]
                ]
                (out / "report.md").write_text(report(header, sections))
                print(
                    f"gpu_check: interrupted during {name}; report: {out / 'report.md'}",
                    file=sys.stderr,
                )
                return 130
            print(output, flush=True)
            print(f"== {name}: {_shown(status)} after {seconds:.0f} s", flush=True)
        sections.append((name, lines[name], status, seconds, output))
        (out / "report.md").write_text(report(header, sections))
    print(f"\nreport: {out / 'report.md'}")
    return 0 if all(status == 0 for _, _, status, _, _ in sections) else 1


if __name__ == "__main__":
    sys.exit(main())

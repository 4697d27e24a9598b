"""Execute the tutorials top to bottom, in smoke mode (CI) or in full (the stored outputs).

    python tutorials/execute.py --smoke             # every notebook, small loops, outputs dropped
    python tutorials/execute.py --in-place FILE...  # full settings, outputs written back

A notebook fails when a cell raises or when anything it prints to stderr mentions a warning:
stored outputs are what readers see, so they must be clean. ``--in-place`` records in the
notebook's metadata how long the run took and on what machine, and writes the file atomically.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from traitlets.config import Config

TUTORIALS = Path(__file__).resolve().parent


def _machine():
    import torch

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def _warnings_printed(nb):
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("name") == "stderr" and "warning" in output.get("text", "").lower():
                yield index, output["text"].strip()


def execute(path, smoke, timeout):
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    if smoke:
        env["CI"] = "1"
    else:
        env.pop("CI", None)
    # The kernel inherits this process's environment: that is how the notebook's
    # `smoke_test = "CI" in os.environ` switch is set.
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    sockets = tempfile.TemporaryDirectory()
    try:
        start = time.perf_counter()
        # IPC sockets: the kernel stays on this machine, and ipykernel does not warn that
        # its TCP transport is unencrypted.
        config = Config({"KernelManager": {"transport": "ipc", "ip": f"{sockets.name}/k"}})
        client = NotebookClient(
            nb,
            kernel_name="python3",
            config=config,
            timeout=timeout,
            resources={"metadata": {"path": path.parent}},
        )
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sockets.cleanup()
    problems = list(_warnings_printed(nb))
    if problems:
        index, text = problems[0]
        raise RuntimeError(f"{path.name}: cell {index} printed a warning:\n{text}")
    return nb, seconds


def _write_atomically(nb, path):
    mode = path.stat().st_mode & 0o777
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".ipynb", delete=False) as f:
        nbformat.write(nb, f)
    os.chmod(f.name, mode)  # a temporary file is private (0600); keep the notebook's mode
    os.replace(f.name, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every tutorial")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--smoke", action="store_true", help="set CI=1: small loops, nothing saved")
    mode.add_argument("--in-place", action="store_true", help="full settings, save the outputs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(TUTORIALS.glob("[0-9]*.ipynb"))
    if not paths:
        parser.error(f"no notebooks in {TUTORIALS}")
    total = 0.0
    for path in paths:
        path = path.resolve()
        nb, seconds = execute(path, smoke=args.smoke, timeout=args.timeout)
        total += seconds
        print(f"{path.name}: {seconds:.1f} s ({'smoke' if args.smoke else 'full'})", flush=True)
        if args.in_place:
            nb.metadata["pyro_relax"] = {
                "smoke_test": False,
                "seconds": round(seconds, 1),
                "machine": _machine(),
            }
            _write_atomically(nb, path)
    print(f"{len(paths)} notebook(s) in {total:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Machinery shared by the experiments: seeds, progress bars, checkpoints and atomic results."""

import contextlib
import fcntl
import json
import os
import platform
import random
import sys
import tempfile
from pathlib import Path

import pyro
import torch
from tqdm import tqdm

__all__ = [
    "Checkpoint",
    "atomic_write_text",
    "machine",
    "markdown_table",
    "progress",
    "save_figure",
    "seed_everything",
    "torch_threads",
    "update_records",
]


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's generators (through Pyro)."""
    pyro.set_rng_seed(seed)


@contextlib.contextmanager
def torch_threads(count: int | None):
    """Runs the block with ``count`` torch threads (``None``: unchanged), then restores them.

    On a small shared machine one thread is often faster for these small networks: waking the
    other threads costs more than they save."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine() -> str:
    """A one-line description of the hardware and software a figure was measured on."""
    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    parts = [f"{cpu}, {os.cpu_count()} logical CPUs"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    parts.append(f"Python {platform.python_version()}, torch {torch.__version__}")
    parts.append(f"pyro-ppl {pyro.__version__}")
    return "; ".join(parts)


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr, refreshed at most once a second."""
    kwargs.setdefault("mininterval", 1.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, **kwargs)


def atomic_write_text(path, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers see the old file or the new one, never a
    partial one: a temporary file in the same directory, flushed to disk, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, 0o644)  # temporary files are private; results are for everyone to read
    os.replace(f.name, path)


def save_figure(figure, path, dpi: int = 110) -> None:
    """Saves a matplotlib figure as a PNG atomically, like :func:`atomic_write_text`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".png", delete=False
    ) as f:
        figure.savefig(f, format="png", dpi=dpi)
    os.chmod(f.name, 0o644)  # temporary files are private; results are for everyone to read
    os.replace(f.name, path)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_records(path, records, key) -> list:
    """Merges ``records`` (dicts) into the JSON list at ``path`` and returns the merged list.

    A stored record with the same values of the fields ``key`` as a new one is replaced, so a
    rerun updates its row. Concurrent runs are serialized by a lock file next to ``path``, and
    the file is replaced atomically.
    """
    path = Path(path)
    with _locked(path):
        stored = json.loads(path.read_text()) if path.exists() else []
        new_keys = {tuple(record[k] for k in key) for record in records}
        merged = [r for r in stored if tuple(r.get(k) for k in key) not in new_keys]
        merged.extend(records)
        atomic_write_text(path, json.dumps(merged, indent=2) + "\n")
    return merged


def markdown_table(records, columns, formats=None) -> str:
    """A Markdown table of ``records`` with the given columns (``formats`` maps a column to a
    format spec such as ``".2f"``; missing values print as an em dash)."""
    formats = formats or {}

    def cell(record, column):
        value = record.get(column)
        if value is None:
            return "—"
        return format(value, formats.get(column, ""))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


class Checkpoint:
    """Training state saved atomically after each epoch, so that an interrupted run resumes.

    The state is a dict of anything ``torch.save`` accepts; :meth:`save` adds the random number
    generators' states and :meth:`load` restores them, so a resumed run draws the same noise as
    an uninterrupted one.
    """

    def __init__(self, path):
        self.path = Path(path)

    def save(self, state: dict) -> None:
        state = dict(state, _rng=_rng_state())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.path.parent, delete=False) as f:
            torch.save(state, f)
        os.replace(f.name, self.path)

    def load(self):
        """The saved state (RNGs restored), or ``None`` when there is none."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False)
        _set_rng_state(state.pop("_rng"))
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _rng_state():
    import numpy as np

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

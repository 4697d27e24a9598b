"""Machinery shared by the experiments: seeds, progress bars, the settings that identify a run,
checkpoints, results merged atomically, and the errors a user can fix."""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import traceback
from pathlib import Path

import pyro
import torch
from tqdm import tqdm

__all__ = [
    "Checkpoint",
    "CorruptFileError",
    "DivergedError",
    "ExperimentError",
    "atomic_write_text",
    "checkpoint_path",
    "describe",
    "differing_settings",
    "diverging",
    "machine",
    "markdown_table",
    "private_rng",
    "progress",
    "read_records",
    "save_figure",
    "seed_everything",
    "settings_digest",
    "torch_threads",
    "update_records",
]


class ExperimentError(Exception):
    """A problem the user can fix, such as a corrupt or missing file. Its message is one line
    that names the file and says what to do; ``pyro-relax experiment`` prints it, without a
    traceback, and exits with status 1."""


class CorruptFileError(ExperimentError, ValueError):
    """A file that an experiment reads is damaged: a results file, a checkpoint or data (a
    ``ValueError`` too, as any malformed input)."""


class DivergedError(ExperimentError):
    """Training diverged: a loss, a parameter or a quantity computed from the parameters became
    infinite, NaN or too large to compute with (usually a learning rate too high for the run);
    see :func:`diverging`."""


@contextlib.contextmanager
def diverging(where: str, quantities, lr: float):
    """Around a stretch of training (an epoch, an evaluation interval): :class:`DivergedError`
    naming ``where`` and the first diverged entry of ``quantities()`` (a callable giving
    ``(name, tensor)`` pairs: the parameters, and what the model computes from them where that
    can overflow while they stay finite), checked when the stretch ends and when it raises
    (a distribution refusing a parameter, an overflow in a score; chained to that error). A
    tensor has diverged when an entry is infinite, NaN or larger in magnitude than its bound: a
    third item of the pair where given (``math.inf``: finite is enough, for a quantity that may
    grow large in a healthy run), else ``1 / eps`` of its dtype (8.4e6 in float32, beyond which
    neighbouring floats lie more than 1 apart; IGR refuses a ``loc`` or ``scale`` that large).
    Pass the trained parameters, not Pyro's score-function baselines (running averages of a
    cost, which may be large). An error raised while no quantity has diverged passes through
    unchanged (a bug is not reported as a divergence), unless it is a distribution refusing the
    value of a parameter or a sample (the library's ``check_constraint``, torch's argument
    checks): in an experiment, whose data are checked when loaded, such a value comes from
    training, and a few images or the checked quantities need not show it (a guide's scale
    collapsing below eps on one batch). The message suggests a
    learning rate below ``lr`` (``--lr``). Losses and scores, numbers rather than tensors, are
    checked by :func:`finite`."""
    try:
        yield
    except ExperimentError:
        raise
    except Exception as error:
        what = _first_diverged(quantities())
        if what is None:
            if not _refused_a_value(error):
                raise
            what = "a distribution refused a value computed in training"
        message = _diverged(where, f"{what} ({describe(error)})", lr)
        raise DivergedError(message) from error
    what = _first_diverged(quantities())
    if what is not None:
        raise DivergedError(_diverged(where, what, lr))


def finite(value, what: str, where: str, lr: float) -> float:
    """``value`` (a number or a one-element tensor; ``what``, such as "the loss") as a float,
    or :class:`DivergedError` when it is infinite or NaN (see :func:`diverging`)."""
    value = float(value)
    if not math.isfinite(value):
        raise DivergedError(_diverged(where, f"{what} is {value}", lr))
    return value


def _refused_a_value(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is a ``ValueError`` raised where a
    distribution checks the value of a parameter or a sample."""
    checks = {
        (os.path.join("pyro_relax", "_numerics.py"), "check_constraint"),
        (os.path.join("torch", "distributions", "distribution.py"), "__init__"),
        (os.path.join("torch", "distributions", "distribution.py"), "_validate_sample"),
    }
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ValueError):
            for frame, _ in traceback.walk_tb(error.__traceback__):
                code = frame.f_code
                if any(
                    code.co_filename.endswith(file) and code.co_name == name
                    for file, name in checks
                ):
                    return True
        error = error.__cause__ or error.__context__
    return False


def _diverged(where: str, what: str, lr: float) -> str:
    shown = f"{lr:g}" if float(f"{lr:g}") == lr else repr(lr)  # never rounded above the given
    return (
        f"{where}: training diverged: {what}; a learning rate below {shown} (--lr) may keep it "
        "finite"
    )


def _first_diverged(named_tensors):
    """What is wrong with the first floating tensor of ``named_tensors`` (``(name, tensor)`` or
    ``(name, tensor, bound)`` tuples) that has an infinite or NaN entry or one larger in
    magnitude than its bound (default ``1 / eps`` of its dtype), or ``None``."""
    for name, tensor, *bound in named_tensors:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        largest = float(tensor.detach().abs().max())  # NaN when an entry is NaN
        if not math.isfinite(largest):
            return f"{name} is not finite"
        limit = bound[0] if bound else 1 / torch.finfo(tensor.dtype).eps
        if largest > limit:
            beyond = f"{limit:g}" if bound else "1/eps of its dtype"
            return f"{name} has an entry of magnitude {largest:.3g}, beyond {beyond}"
    return None


def add_estimators_option(parser, estimators) -> None:
    """``--estimators NAME ...``: which of ``estimators`` to train (default: all)."""
    parser.add_argument(
        "--estimators",
        nargs="+",
        choices=estimators,
        default=list(estimators),
        metavar="NAME",
        help=f"estimators to train, from {', '.join(estimators)} (default: all)",
    )


def both_defaults(full, smoke, name: str) -> str:
    """The help text of an option whose default is ``None`` (see :func:`given_options`): the
    value of config field ``name`` in the ``full`` and in the ``smoke`` config."""
    return f"default {getattr(full, name)}; --smoke {getattr(smoke, name)}"


def given_options(base, args, fields: dict):
    """``base`` (the full or the ``--smoke`` config, a dataclass) with the seed and every option
    given on the command line: ``fields`` maps a config field to its option's attribute, whose
    default is ``None`` (so that an option given with ``--smoke`` is used, not dropped)."""
    given = {field: getattr(args, name) for field, name in fields.items()}
    given = {field: value for field, value in given.items() if value is not None}
    return dataclasses.replace(base, seed=args.seed, **given)


def describe(error: BaseException) -> str:
    r"""``Type: first line of its message``, to quote an error inside a one-line message; a
    first line that ends in a colon (Pyro's "Error while computing log_prob at site 'z':"
    before the error it wraps) runs on into the next.

    Example:
        >>> describe(ValueError("bad value\nmore detail"))
        'ValueError: bad value'
        >>> describe(ValueError("at site 'z':\nbad value\nmore detail"))
        "ValueError: at site 'z': bad value"
    """
    lines = [line.strip() for line in str(error).strip().splitlines()]
    if not lines:
        return type(error).__name__
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        first = f"{first} {lines[1]}"
    return f"{type(error).__name__}: {first}"


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's generators (through Pyro)."""
    pyro.set_rng_seed(seed)


@contextlib.contextmanager
def private_rng(seed: int, device):
    """Runs the block with torch's generators (the CPU's, and ``device``'s if it is a GPU)
    seeded with ``seed``, and puts them back as they were: an evaluation draws its own noise
    and leaves training's alone."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


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


# --- The settings that identify a run -------------------------------------------------------


def _canonical(settings) -> str:
    """One string per set of settings: JSON with sorted keys, so that a tuple and the list it
    is stored as in a results file compare equal (as do dicts built in any order)."""
    return json.dumps(settings, sort_keys=True, default=str)


def settings_digest(settings: dict) -> str:
    """A short hash of a run's ``settings``: equal settings, equal digests.

    Example:
        >>> settings_digest({"lr": 0.001, "hidden": (8, 4)}) == settings_digest(
        ...     {"hidden": [8, 4], "lr": 0.001}
        ... )
        True
    """
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:16]


def checkpoint_path(results, label: str, settings: dict) -> Path:
    """Where the run with ``settings`` keeps its checkpoint: ``results/checkpoints``, a file
    named after ``label`` (for people) and the digest of the settings (so that runs of other
    settings, concurrent or not, never share a checkpoint)."""
    name = re.sub(r"[^\w.]+", "-", label).strip("-")
    return Path(results) / "checkpoints" / f"{name}-{settings_digest(settings)}.pt"


# --- Results ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_records(path, write_reports=None) -> list:
    """The records stored in the results file ``path`` (a JSON list of objects), or an empty
    list if there is no such file.

    A file that is not such a list raises :class:`CorruptFileError` and is left as it is: it
    may hold the only copy of finished runs. So does a file whose records
    ``write_reports(folder, records)`` (the function that writes an experiment's reports of its
    merged records after it trains: tables, figures) cannot show: a value edited by hand into a
    string, or a record without a field that only the figure reads, which would otherwise stop
    the run after it trained, at every rerun. The reports are written into a scratch folder
    here and thrown away. The experiments read their results files so before they train, so
    that a damaged file stops a run before it costs anything.
    """
    path = Path(path)
    if not path.exists():
        return []
    advice = "it was left untouched: repair it or move it away, then run again"
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise CorruptFileError(
            f"{path} is not a readable results file ({describe(error)}); {advice}"
        ) from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CorruptFileError(f"{path} is not a JSON list of records; {advice}")
    if write_reports is not None:
        with tempfile.TemporaryDirectory() as scratch:
            try:
                write_reports(Path(scratch), records)
            except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
                raise CorruptFileError(
                    f"{path} holds a record its reports cannot show ({describe(error)}); {advice}"
                ) from None
    return records


def update_records(path, records, key, report=None) -> list:
    """Merges ``records`` (dicts) into the JSON list at ``path`` and returns the merged list.

    ``key`` gives the settings of the run that made a record: a function of the record, or the
    names of the record's fields that hold them. A stored record with the same settings as a
    new one is replaced, so a rerun updates its row; records of other settings are kept.
    Concurrent runs are serialized by a lock file next to ``path`` and the file is replaced
    atomically. ``report(merged)``, which writes the reports of the merged records (tables,
    figures), runs under the same lock: a run that finished first cannot overwrite them
    afterwards with a list that lacks the other's record. A damaged file raises
    :class:`CorruptFileError` and is left as it is.
    """
    if not callable(key):
        names = tuple(key)

        def key(record):
            return {name: record.get(name) for name in names}

    path = Path(path)
    with _locked(path):
        stored = read_records(path)
        new_keys = {_canonical(key(record)) for record in records}
        merged = [r for r in stored if _canonical(key(r)) not in new_keys]
        merged.extend(records)
        atomic_write_text(path, json.dumps(merged, indent=2) + "\n")
        if report is not None:
            report(merged)
    return merged


def differing_settings(records, settings_of, shown=()) -> list:
    """One string per record naming the settings in which ``records`` differ, such as
    ``"lr=0.01, steps=3"``, leaving out the names in ``shown`` (those a table has columns for);
    empty strings where the records agree on every other setting. ``settings_of(record)`` gives
    a record's settings, as a results file identifies its run.

    A results file keeps the records of every setting, and a table shows a few of them: rows of
    runs that differ elsewhere would look alike (and would be averaged together as seeds).
    Tables add these strings as a column, and summaries group by them.

    Example:
        >>> records = [{"lr": 0.1, "seed": 0}, {"lr": 0.1, "seed": 1}, {"lr": 0.3, "seed": 0}]
        >>> differing_settings(records, lambda r: r, shown=("seed",))
        ['lr=0.1', 'lr=0.1', 'lr=0.3']
        >>> differing_settings(records[:2], lambda r: r, shown=("seed",))
        ['', '']
    """
    settings = [settings_of(record) for record in records]
    names = sorted({name for each in settings for name in each} - set(shown))
    differing = [n for n in names if len({_canonical(each.get(n)) for each in settings}) > 1]

    def value(setting):
        return json.dumps(setting, default=str) if isinstance(setting, (list, dict)) else setting

    return [", ".join(f"{n}={value(each.get(n))}" for n in differing) for each in settings]


def markdown_table(records, columns, formats=None, settings=None) -> str:
    """A Markdown table of ``records`` with the given columns (``formats`` maps a column to a
    format spec such as ``".2f"``; missing values print as an em dash). ``settings``, one
    string per record (:func:`differing_settings`), adds a last column ``settings`` where any
    is not empty."""
    formats = formats or {}
    if settings is not None and any(settings):
        records = [dict(r, settings=s) for r, s in zip(records, settings, strict=True)]
        columns = [*columns, "settings"]

    def cell(record, column):
        value = record.get(column)
        if value is None:
            return "—"
        return format(value, formats.get(column, ""))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


# --- Checkpoints ------------------------------------------------------------------------------


class Checkpoint:
    """The state of a run, saved atomically after each unit of work so that an interrupted run
    resumes, and removed by the run only once its records are merged into the results (or kept
    as the trained model, by a run that scores it again on request: ``igr-vae``).

    A finished run saves its record(s) here before merging them, so that a merge that fails
    (a damaged results file) loses nothing: the next run merges the saved record instead of
    training again. The state is a dict of anything ``torch.save`` accepts; :meth:`save` adds
    the random number generators' states and :meth:`load` restores them, so a resumed run
    draws the same noise as an uninterrupted one. ``settings`` are the run's (see
    :func:`checkpoint_path`); a file saved with other settings is refused, not overwritten.
    """

    # The checkpoints this process saved or resumed from (what an interrupted command resumes).
    touched: set = set()

    def __init__(self, path, settings=None):
        self.path = Path(path)
        self.settings = settings

    def save(self, state: dict) -> None:
        state = dict(state, _rng=_rng_state(), _settings=self.settings)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A hidden temporary name: a run killed while saving leaves no file that looks like a
        # checkpoint, and the last complete checkpoint stays in place.
        with tempfile.NamedTemporaryFile(
            dir=self.path.parent, prefix=f".{self.path.name}.", delete=False
        ) as f:
            try:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                os.unlink(f.name)
                raise
        os.replace(f.name, self.path)
        Checkpoint.touched.add(self.path)

    def load(self):
        """The saved state (RNGs restored), or ``None`` when there is none.

        An unreadable file (truncated, say) raises :class:`CorruptFileError`, and a file saved
        with other settings :class:`ExperimentError`; both name the file and leave it alone.
        """
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, weights_only=False)
            rng, settings = state.pop("_rng"), state.pop("_settings", None)
        # A damaged file fails in many ways: the zip reader's RuntimeError, an
        # UnpicklingError, an EOFError, a state that is not a dict or lacks its generators.
        except Exception as error:
            raise CorruptFileError(
                f"{self.path} is not a readable checkpoint ({describe(error)}); delete it to "
                "start this run over"
            ) from None
        if _canonical(settings) != _canonical(self.settings):
            raise ExperimentError(
                f"{self.path} holds a run with other settings; delete it or move it away to "
                "start this run"
            )
        _set_rng_state(rng)
        Checkpoint.touched.add(self.path)
        return _SavedState(self.path, state)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        Checkpoint.touched.discard(self.path)


class _SavedState(dict):
    """A loaded checkpoint's state: a dict whose missing entries raise :class:`ExperimentError`
    naming the file, not a ``KeyError``. A checkpoint written by another version of the
    library may lack an entry that the run restores (the temperature schedule's state, say):
    the user is told what to delete instead of getting a traceback."""

    def __init__(self, path, state):
        super().__init__(state)
        self.path = path

    def __missing__(self, key):
        raise ExperimentError(
            f"{self.path} lacks the entry {key!r} that this version of pyro-relax restores (it "
            "was written by another version); delete it to start this run over"
        )

    @contextlib.contextmanager
    def restoring(self):
        """Where a run restores itself from this state: an entry that does not fit it (a
        network's weights of other names or shapes, written by another version of the
        library) raises :class:`CorruptFileError` naming the file, not a traceback."""
        try:
            yield self
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as error:
            # (Running out of memory says nothing about the file.)
            if isinstance(error, (ExperimentError, getattr(torch, "OutOfMemoryError", ()))):
                raise
            raise CorruptFileError(
                f"{self.path} does not fit this run ({describe(error)}; written by another "
                "version of pyro-relax?); delete it to start this run over"
            ) from None


def _rng_state():
    import numpy as np

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():  # a run that never used the GPU draws nothing there
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""The experiments' shared machinery: results merged atomically, checkpoints, the command line,
and the guarantees every experiment keeps: a finished result is never lost or overwritten."""

import argparse
import fcntl
import importlib
import json
import math
import multiprocessing
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_relax import IGR, IGRCount
from pyro_relax.__main__ import build_parser, main
from pyro_relax.experiments import EXPERIMENTS, common
from pyro_relax.experiments.common import (
    Checkpoint,
    CorruptFileError,
    ExperimentError,
    atomic_write_text,
    checkpoint_path,
    markdown_table,
    read_records,
    save_figure,
    torch_threads,
    update_records,
)

REPOSITORY = Path(__file__).resolve().parents[1]

KEY = ("prior", "estimator")


def test_update_records_replaces_a_rerun_and_keeps_the_others(tmp_path):
    path = tmp_path / "runs.json"
    update_records(path, [{"prior": "a", "estimator": "x", "value": 1}], KEY)
    update_records(path, [{"prior": "b", "estimator": "x", "value": 2}], KEY)
    merged = update_records(path, [{"prior": "a", "estimator": "x", "value": 3}], KEY)
    assert json.loads(path.read_text()) == merged
    assert sorted((r["prior"], r["value"]) for r in merged) == [("a", 3), ("b", 2)]


def test_the_committed_results_are_strict_json():
    # The committed gst_vae.json held 537 `Infinity` tokens (grad_snr of a zero variance),
    # which Python's json writes and strict JSON readers refuse.
    committed = sorted((Path(__file__).resolve().parents[1] / "results").glob("*.json"))
    assert committed, "no committed results/*.json"
    for results in committed:

        def refuse(name, results=results):
            raise AssertionError(f"{results.name} holds {name}")

        json.loads(results.read_text(), parse_constant=refuse)


def test_an_infinite_mean_gradient_snr_is_recorded_as_none(monkeypatch):
    # gst-vae's mean signal-to-noise ratio is infinite once an encoder element's gradient is
    # exact; it went into the results file as Infinity.
    from pyro_relax.experiments import gst_vae
    from pyro_relax.infer.gradients import GradientMoments

    def moments(*args, **kwargs):
        mean = torch.tensor([1.0, 2.0])
        return {"w": GradientMoments(mean, torch.tensor([0.0, 4.0]), 10)}

    monkeypatch.setattr(gst_vae, "gradient_moments", moments)
    encoder = torch.nn.Linear(1, 1)
    found = gst_vae.encoder_gradient_variance(
        None, None, encoder, torch.zeros(1), num_draws=10, seed=0
    )
    assert found == {"grad_variance": 4.0, "grad_snr": None}


def test_update_records_keeps_the_records_of_other_settings(tmp_path):
    # The key is a function of the record; a stored record that lacks a setting gets the value
    # it ran with.
    def settings(record):
        return {"prior": record["prior"], "lr": record.get("lr", 0.001), "hidden": record["hidden"]}

    path = tmp_path / "runs.json"
    path.write_text(json.dumps([{"prior": "a", "hidden": [8, 4], "value": 1}]))
    update_records(path, [{"prior": "a", "lr": 0.002, "hidden": (8, 4), "value": 2}], settings)
    merged = update_records(
        path, [{"prior": "a", "lr": 0.001, "hidden": (8, 4), "value": 3}], settings
    )
    assert sorted(r["value"] for r in merged) == [2, 3]  # the old record was the lr 0.001 run


@pytest.mark.parametrize("content", ['[{"prior": ', "{}", "[1, 2]", "\udcff"])
def test_a_damaged_results_file_is_refused_and_left_alone(tmp_path, content):
    path = tmp_path / "runs.json"
    path.write_text(content, errors="surrogateescape")
    before = path.read_bytes()
    for attempt in (
        lambda: read_records(path),
        lambda: update_records(path, [{"prior": "a", "estimator": "x"}], KEY),
    ):
        with pytest.raises(CorruptFileError) as error:
            attempt()
        assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert path.read_bytes() == before
    assert read_records(tmp_path / "absent.json") == []


def _writer(path, index):
    update_records(path, [{"prior": str(index), "estimator": "x"}], KEY)


def test_concurrent_runs_lose_no_record(tmp_path):
    path = tmp_path / "runs.json"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(path, i)) for i in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sorted(int(r["prior"]) for r in json.loads(path.read_text())) == list(range(6))


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "table.md"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["table.md"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_markdown_table_formats_and_marks_missing_values():
    table = markdown_table(
        [{"a": 1.23456, "b": "x"}, {"a": None, "b": "y"}], ["a", "b"], {"a": ".2f"}
    )
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | x |", "| — | y |"]


def test_checkpoint_restores_state_and_random_generators(tmp_path):
    checkpoint = Checkpoint(tmp_path / "run.pt")
    assert checkpoint.load() is None
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    checkpoint.save({"epoch": 3, "weights": torch.arange(4.0)})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5)  # the generators move on
    state = checkpoint.load()
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.arange(4.0))
    resumed = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(resumed[0], expected[0]) and resumed[1:] == expected[1:]
    checkpoint.remove()
    assert not checkpoint.path.exists()


@pytest.mark.parametrize(
    "damage",
    [lambda raw: raw[: len(raw) // 2], lambda raw: b"not a checkpoint", lambda raw: b""],
    ids=["truncated", "garbage", "empty"],
)
def test_a_damaged_checkpoint_is_refused_and_left_alone(tmp_path, damage):
    checkpoint = Checkpoint(tmp_path / "run.pt", {"lr": 0.001})
    checkpoint.save({"epoch": 3, "weights": torch.arange(1000.0)})
    checkpoint.path.write_bytes(damage(checkpoint.path.read_bytes()))
    before = checkpoint.path.read_bytes()
    with pytest.raises(CorruptFileError) as error:
        checkpoint.load()
    message = str(error.value)
    assert str(checkpoint.path) in message and "delete it" in message and "\n" not in message
    assert checkpoint.path.read_bytes() == before


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    Checkpoint(tmp_path / "run.pt", {"lr": 0.001}).save({"epoch": 3})
    with pytest.raises(ExperimentError, match="other settings"):
        Checkpoint(tmp_path / "run.pt", {"lr": 0.002}).load()
    assert Checkpoint(tmp_path / "run.pt", {"lr": 0.001}).load()["epoch"] == 3


def test_an_entry_missing_from_a_checkpoint_is_a_clear_error(tmp_path):
    # A checkpoint of another version, without an entry this version restores, raised a bare
    # KeyError from deep inside the experiment (the schedule's state, added in a later version).
    checkpoint = Checkpoint(tmp_path / "run.pt", {"lr": 0.001})
    checkpoint.save({"epoch": 3})
    state = checkpoint.load()
    assert state["epoch"] == 3 and state.get("schedule") is None and "schedule" not in state
    with pytest.raises(ExperimentError) as error:
        state["schedule"]
    message = str(error.value)
    assert str(checkpoint.path) in message and "'schedule'" in message and "delete it" in message
    assert "\n" not in message


@pytest.mark.skipif(not hasattr(torch, "OutOfMemoryError"), reason="torch.OutOfMemoryError is new")
def test_running_out_of_memory_while_restoring_is_not_called_a_corrupt_checkpoint(tmp_path):
    # An entry that does not fit the run (torch's RuntimeError for other shapes) means the
    # file is of another version: CorruptFileError, "delete it". Running out of memory (also a
    # RuntimeError) says nothing about the file, and the advice would delete a valid one: it
    # passes through as it was.
    checkpoint = Checkpoint(tmp_path / "run.pt", {"lr": 0.001})
    checkpoint.save({"epoch": 3})
    state = checkpoint.load()
    with pytest.raises(CorruptFileError, match="delete it"):
        with state.restoring():
            raise RuntimeError("size mismatch for weight")
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        with state.restoring():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_checkpoint_save_leaves_no_temporary_file(tmp_path):
    checkpoint = Checkpoint(tmp_path / "run.pt")
    checkpoint.save({"epoch": 1})
    checkpoint.save({"epoch": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]


def test_checkpoint_paths_differ_in_every_setting(tmp_path):
    settings = {"prior": "Pois(2)", "lr": 0.001, "hidden": (8, 4), "device": "cpu"}
    path = checkpoint_path(tmp_path, "vae-Pois(2)-seed0", settings)
    assert path.parent == tmp_path / "checkpoints" and path.name.startswith("vae-Pois-2-seed0-")
    assert checkpoint_path(tmp_path, "vae-Pois(2)-seed0", dict(settings, hidden=[8, 4])) == path
    for name, other in [("lr", 0.002), ("hidden", (8,)), ("device", "cuda")]:
        assert (
            checkpoint_path(tmp_path, "vae-Pois(2)-seed0", dict(settings, **{name: other})) != path
        )


def test_command_line_imports_only_the_experiment_it_runs():
    # Another experiment's dependencies must not be needed to run the demo or an experiment.
    code = (
        "import sys; from pyro_relax.__main__ import build_parser; "
        "build_parser(['demo']).parse_args(['demo', '--smoke']); "
        "print(sorted(m for m in sys.modules if m.startswith('pyro_relax.experiments.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_takes_the_shared_options(name):
    argv = ["experiment", name, "--smoke", "--seed", "3", "--results", "somewhere"]
    args = build_parser(argv).parse_args(argv)
    assert (args.smoke, args.seed, args.results, args.device) == (True, 3, "somewhere", "cpu")
    assert callable(args.run)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_option_of_every_experiment_has_help(name):
    # topic's --estimators and neyman's --gradient-temperatures had none (--help listed them
    # bare, without their choices or default).
    argv = ["experiment", name]
    parser = build_parser(argv)
    experiment = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ).choices["experiment"]
    subparsers = next(
        action for action in experiment._actions if isinstance(action, argparse._SubParsersAction)
    )
    bare = [
        action.option_strings[0]
        for action in subparsers.choices[name]._actions
        if action.option_strings and not action.help
    ]
    assert bare == []


def test_torch_threads_are_restored_even_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("interrupted")
    assert torch.get_num_threads() == before


def test_save_figure_replaces_the_png_and_leaves_no_temporary_file(tmp_path):
    from matplotlib.figure import Figure

    path = tmp_path / "curves.png"
    for _ in range(2):
        figure = Figure()
        figure.add_subplot().plot([0, 1], [1, 0])
        save_figure(figure, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_the_default_results_folder_is_not_the_committed_one(name):
    argv = ["experiment", name]
    results = Path(build_parser(argv).parse_args(argv).results)
    assert results == Path("pyro-relax-results")
    assert (REPOSITORY / results).resolve() != (REPOSITORY / "results").resolve()


# --- Every experiment: a finished result is never lost ---------------------------------------

# Each experiment's smoke run (quick options), its results files, and a function that it calls
# only to train or score (forbidden where a run must not train).
RUNS = {
    "vae": (["--estimator", "GenGS"], ["gengs_vae.json"], "discrete_neg_elbo"),
    "synthetic": (
        ["--distributions", "poisson", "binomial"],
        ["synthetic.json", "synthetic_bias.json"],
        "optimize",
    ),
    "topic": (["--estimators", "GenGS"], ["topic.json"], "perplexity"),
    "gst-vae": (
        ["--estimator", "STGS", "--temperature", "1.0"],
        ["gst_vae.json"],
        "discrete_neg_elbo",
    ),
    "igr-vae": (
        ["--estimator", "IGR-I", "--temperature-pair", "0.5"],
        ["igr_vae.json"],
        "evaluate",
    ),
}
DAMAGED = [(name, file) for name, (_, files, _) in RUNS.items() for file in files]


def _smoke(name, results):
    options, _, _ = RUNS[name]
    return main(["experiment", name, "--smoke", "--results", str(results), *options])


def _forbid(monkeypatch, name):
    """Makes ``name``'s training (or scoring) fail, to show that a run does none."""
    module = importlib.import_module(EXPERIMENTS[name][0])

    def fail(*args, **kwargs):
        raise AssertionError("the run trained")

    monkeypatch.setattr(module, RUNS[name][2], fail)


def _error_lines(capsys) -> list:
    return [
        line for line in capsys.readouterr().err.splitlines() if "pyro-relax experiment" in line
    ]


@pytest.mark.parametrize(
    "content",
    # A record the reports cannot show (a number edited by hand into words, here in a record of
    # nothing else) passed the check, and stopped the run with a traceback after it trained,
    # at every rerun.
    # A record that only a figure reads the curves of (a hand-made record, or one from another
    # version) passed the check of the tables alone, and stopped the run the same way.
    [
        '[{"finished": ',
        '[{"test_neg_elbo": "48.85 (checked)"}]',
        '[{"history": [{"loss": 1.0}]}]',
    ],
    ids=["bad-json", "record-the-report-cannot-show", "curves-the-figure-cannot-show"],
)
@pytest.mark.parametrize("name, file", DAMAGED)
def test_a_damaged_results_file_stops_a_run_before_it_trains(
    tmp_path, monkeypatch, capsys, name, file, content
):
    path = tmp_path / file
    path.write_text(content)
    _forbid(monkeypatch, name)
    assert _smoke(name, tmp_path) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(path) in error and "left untouched" in error
    assert path.read_text() == content
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("saved", [False, True], ids=["nothing-saved", "checkpoint-saved"])
@pytest.mark.parametrize("name", sorted(RUNS))
def test_ctrl_c_is_one_line_saying_how_to_go_on(tmp_path, monkeypatch, capsys, name, saved):
    # Ctrl-C, the way a run is stopped, printed a traceback from deep inside Pyro and exited
    # with status 1, as for a failure.
    module = importlib.import_module(EXPERIMENTS[name][0])

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, RUNS[name][2], interrupt)
    if saved:  # a checkpoint of an earlier interrupted run
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "run.pt").write_bytes(b"")
    assert _smoke(name, tmp_path) == 130
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"pyro-relax experiment {name}: interrupted; run the same command")
    # Only a checkpoint of this run is one to resume from (igr-vae is interrupted in its
    # scoring, after it saved its trained model); another run's in the folder is not.
    resumable = name == "igr-vae"
    assert ("resume from " in line) == resumable
    if resumable:
        [checkpoint] = (tmp_path / "checkpoints").glob("igr*.pt")
        assert str(checkpoint) in line
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_finished_run_survives_a_failed_merge(tmp_path, monkeypatch, capsys, name):
    # The results file is damaged while the run trains: the merge fails, the run says so in
    # one line and keeps its checkpoint; once the file is repaired, the next run merges the
    # finished record without training again.
    merge = common.update_records

    def damage_then_merge(path, records, key, report=None):
        path.write_text("[")
        return merge(path, records, key, report)

    monkeypatch.setattr(common, "update_records", damage_then_merge)
    assert _smoke(name, tmp_path) == 1
    [line] = _error_lines(capsys)
    damaged = tmp_path / RUNS[name][1][0]
    assert str(damaged) in line
    assert list((tmp_path / "checkpoints").glob("*.pt"))

    damaged.unlink()
    monkeypatch.setattr(common, "update_records", merge)
    if name == "topic":
        # Each run is merged as it finishes, so the failed merge stopped the sweep after its
        # first run (GenGS): that one must come from its checkpoint, the true model's may train.
        module = importlib.import_module(EXPERIMENTS[name][0])
        train = module.train

        def train_only_the_true_model(*args, decoder=None, **kwargs):
            if decoder is None:
                with monkeypatch.context() as patch:
                    _forbid(patch, name)
                    return train(*args, decoder=decoder, **kwargs)
            return train(*args, decoder=decoder, **kwargs)

        monkeypatch.setattr(module, "train", train_only_the_true_model)
    else:
        _forbid(monkeypatch, name)
    assert _smoke(name, tmp_path) == 0
    assert json.loads(damaged.read_text())
    kept = list((tmp_path / "checkpoints").glob("*.pt"))
    if name == "igr-vae":  # keeps its trained model, with the record it merged
        assert kept and all("record" in torch.load(path, weights_only=False) for path in kept)
    else:
        assert not kept


@pytest.mark.parametrize(
    "argv",
    [
        ["experiment", "synthetic", "--samples", "1"],
        ["experiment", "synthetic", "--lr", "nan"],
        ["experiment", "synthetic", "--bias-temperatures", "0.5", "-1"],
        ["experiment", "vae", "--epochs", "0"],
        ["experiment", "topic", "--truncation", "1"],
        ["experiment", "topic", "--lr", "abc"],
        ["demo", "--epochs", "-3"],
        # A temperature beyond float32's [eps, 1 / eps] failed inside the first step with a
        # traceback (gst-vae), or wrote a row of a zero gradient (synthetic); a learning rate
        # "decay" above 1 grew the rate until the run failed.
        ["experiment", "gst-vae", "--temperature", "1e-9"],
        ["experiment", "gst-vae", "--temperature", "1e9"],
        ["experiment", "synthetic", "--temperatures", "1e-9"],
        ["experiment", "neyman", "--gradient-temperatures", "1e8"],
        ["experiment", "synthetic", "--lr-decay", "1.5"],
    ],
)
def test_bad_numbers_on_the_command_line_are_usage_errors(argv, capsys):
    # argparse's one-line usage error (exit status 2) where the number is parsed, not a
    # traceback once the run has started.
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module, results",
    [("vae", "gengs_vae"), ("gst_vae", "gst_vae"), ("igr_vae", "igr_vae")],
)
def test_image_vae_tables_tell_runs_of_other_settings_apart(module, results):
    # Runs that differed only in, say, the learning rate are kept as records of their own, but
    # their rows showed the same settings next to different numbers. With a copy of every
    # committed record at another learning rate, every row of every table names its rate.
    experiment = importlib.import_module(f"pyro_relax.experiments.{module}")
    records = json.loads((REPOSITORY / "results" / f"{results}.json").read_text())
    rate = records[0]["lr"]
    assert all(r["lr"] == rate for r in records)
    page = experiment._markdown([*records, *(dict(r, lr=0.5) for r in records)])
    rows = [
        line
        for line in page.splitlines()
        if line.startswith("| ") and not line.startswith(("| dataset |", "|---"))
    ]
    assert rows
    ends = [row.rsplit("|", 2)[1].strip() for row in rows]
    assert {end.split(", ")[-1] for end in ends} == {f"lr={rate}", "lr=0.5"}
    assert sum(end.endswith("lr=0.5") for end in ends) == len(rows) // 2
    assert "| settings |" not in experiment._markdown(records).split("## ")[0]


def test_reports_are_written_under_the_results_lock(tmp_path):
    # Two runs finishing together: each wrote its tables and figure after releasing the lock,
    # from the list it had merged, so the one that wrote last left reports without the other's
    # record. The reports are now written while the merge holds the lock.
    path = tmp_path / "results.json"
    seen = []

    def report(merged):
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            with pytest.raises(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append([r["run"] for r in merged])

    update_records(path, [{"run": 1}], ["run"], report)
    update_records(path, [{"run": 2}], ["run"], report)
    assert seen == [[1], [1, 2]]


# --- Every experiment: a run that diverges stops with one line -------------------------------

# Each experiment with one estimator and a learning rate far too high: every one of them crashed
# with a traceback from deep inside a distribution's parameter check (a NaN or overflowing
# parameter at the next step) or from an overflow in a score (the topic model's perplexity),
# or went on with a NaN loss where validation was off.
DIVERGING = {
    "vae": ["--estimator", "GenGS-IMP"],
    "synthetic": ["--distributions", "poisson"],
    "topic": ["--estimators", "REINFORCE"],
    "gst-vae": ["--estimator", "GST-1.0", "--temperature", "1.0"],
    "igr-vae": ["--estimator", "IGR-I", "--temperature-pair", "0.5"],
    "neyman": ["--estimators", "GenGS"],
}


def _diverging_run(tmp_path, capsys, name, options):
    """The exit status and the one line a run printed (``None`` when it printed none)."""
    status = main(["experiment", name, "--smoke", "--results", str(tmp_path), *options])
    error = capsys.readouterr().err
    assert "Traceback" not in error
    lines = [line for line in error.splitlines() if line.startswith("pyro-relax experiment")]
    assert len(lines) <= 1
    return status, (lines[0] if lines else None)


@pytest.mark.parametrize(
    "name, validation",
    # With validation off (the image VAEs' --no-validation) the loss became NaN and training
    # went on.
    [(name, True) for name in sorted(DIVERGING)]
    + [(name, False) for name in ("gst-vae", "igr-vae", "vae")],
)
def test_a_diverging_run_stops_with_one_line_and_saves_nothing(tmp_path, capsys, name, validation):
    options = [*DIVERGING[name], "--lr", "1e8"] + ([] if validation else ["--no-validation"])
    status, line = _diverging_run(tmp_path, capsys, name, options)
    assert status == 1 and line.startswith(f"pyro-relax experiment {name}: ")
    assert "training diverged" in line and "a learning rate below 1e+08 (--lr)" in line
    assert not list(tmp_path.glob("*.json"))  # no record of a diverged run


@pytest.mark.parametrize(
    "name, options, what",
    [
        # The weights stay moderate while what the networks compute from them overflows: IGR's
        # scale (the exponential of an encoder output), a geometric guide's mean (whose draws
        # wrapped around as integers); both ended in a traceback from a parameter check.
        ("igr-vae", ["--estimator", "IGR-I", "--temperature-pair", "0.5", "--lr", "1"], "scale"),
        ("vae", ["--estimator", "REINFORCE", "--prior", "Geom(.5)", "--lr", "1"], "mean count"),
        # The gradient's variance overflowed after a finite epoch and went into the results as
        # Infinity (not JSON).
        ("gst-vae", ["--estimator", "GST-1.0", "--temperature", "0.5", "--lr", "1e4"], "variance"),
        # Stopped after the whole optimization, without saying at which step.
        ("synthetic", ["--distributions", "poisson", "--lr", "8"], "step 9: "),
        # A prior rate of 3e7 doctor visits: scoring it without truncation took 16 GB.
        ("neyman", ["--estimators", "exact", "--gradient-points", "--lr", "0.5"], "rate"),
        # IGR's scale collapsing below eps (which IGR refuses) ended in a traceback.
        (
            "igr-vae",
            ["--estimator", "IGR-I", "--temperature-pair", "0.5", "--lr", "0.3", "--epochs", "3"]
            + ["--steps-per-epoch", "10"],
            "`scale` must be finite, positive and within [eps, 1/eps]",
        ),
    ],
)
def test_a_run_diverging_at_a_moderate_rate_names_what_overflowed(
    tmp_path, capsys, name, options, what
):
    status, line = _diverging_run(tmp_path, capsys, name, options)
    assert status == 1 and "training diverged" in line and what in line


@pytest.mark.parametrize(
    "name, options, finished",
    [
        # GenGS finishes, then REINFORCE diverges.
        ("topic", ["--lr", "3"], {"GenGS"}),
        # Four estimators finish, then GenGS-IMP diverges.
        ("neyman", ["--lr", "1", "--gradient-points"], {"GenGS", "GenGS-ST+Poisson"}),
    ],
)
@pytest.mark.filterwarnings("ignore:.*mass lies beyond the last outcome")  # topic at lr 3
def test_a_sweep_keeps_the_runs_finished_before_one_diverges(
    tmp_path, capsys, name, options, finished
):
    # topic and neyman merged their records only once every run was done: a run that diverged
    # left the finished ones out of the results (in checkpoints only).
    status, line = _diverging_run(tmp_path, capsys, name, options)
    assert status == 1 and "training diverged" in line
    records = json.loads((tmp_path / f"{name}.json").read_text())
    assert finished <= {record["estimator"] for record in records}


@pytest.mark.parametrize(
    "name, options",
    [
        # A score-function baseline (a running average of a cost) passed 1/eps: no weight did,
        # and the run ends finite.
        ("vae", ["--estimator", "REINFORCE", "--lr", "10"]),
    ],
)
def test_a_poor_but_finite_run_is_not_called_diverged(tmp_path, capsys, name, options):
    status, line = _diverging_run(tmp_path, capsys, name, options)
    assert status == 0 and line is None


def test_diverging_names_what_diverged_and_lets_other_errors_through():
    values = {"w": torch.ones(3)}

    def quantities():
        return values.items()

    with pytest.raises(KeyError, match="a bug"):  # nothing diverged: the error as it was
        with common.diverging("run A, epoch 2", quantities, 0.1):
            raise KeyError("a bug")
    with pytest.raises(ValueError, match="shapes"):  # a ValueError from no value check, too
        with common.diverging("run A, epoch 2", quantities, 0.1):
            raise ValueError("shapes do not match")
    # A distribution refusing a value computed in training (the library's check, torch's)
    # is a divergence even where the checked quantities look fine.
    for refusal in (
        lambda: IGR(torch.zeros(3), torch.full((3,), 1e-9), 0.5, validate_args=True),
        lambda: torch.distributions.Normal(0.0, torch.tensor(-1.0), validate_args=True),
        lambda: torch.distributions.Poisson(1.0, validate_args=True).log_prob(torch.tensor(-3.0)),
    ):
        with pytest.raises(common.DivergedError, match="a distribution refused a value"):
            with common.diverging("run A, epoch 2", quantities, 0.1):
                refusal()
    for bad, what in [
        (float("nan"), "w is not finite"),
        (float("-inf"), "w is not finite"),
        (1e7, "w has an entry of magnitude 1e+07, beyond 1/eps"),
    ]:
        values["w"] = torch.tensor([0.0, bad])
        with pytest.raises(common.DivergedError) as caught:
            with common.diverging("run A, epoch 2", quantities, 0.1):
                raise ValueError("refused a parameter")
        message = str(caught.value)
        assert message.startswith(f"run A, epoch 2: training diverged: {what}")
        assert "(ValueError: refused a parameter)" in message and "below 0.1 (--lr)" in message
        assert isinstance(caught.value.__cause__, ValueError)
        with pytest.raises(common.DivergedError, match=re.escape(what)):  # a quiet stretch
            with common.diverging("run A, epoch 2", quantities, 0.1):
                pass
    values["w"] = torch.tensor([8e6, -8e6])  # below 1/eps of float32 (8.4e6): fine
    with common.diverging("run A", quantities, 0.1):
        pass
    # A quantity given its own bound: finite is enough with math.inf, a smaller bound is kept.
    with common.diverging("run A", lambda: [("rate", torch.tensor([1e30]), math.inf)], 0.1):
        pass
    with pytest.raises(common.DivergedError, match="rate has an entry of magnitude 3, beyond 2;"):
        with common.diverging("run A", lambda: [("rate", torch.tensor([3.0]), 2.0)], 0.1):
            pass
    # The learning rate in the advice is never rounded above the one given.
    with pytest.raises(common.DivergedError, match=re.escape("below 12.3456789 (--lr)")):
        common.finite(math.inf, "the loss", "run A", 12.3456789)
    assert common.finite(torch.tensor(2.5), "the loss", "run A", 0.1) == 2.5
    with pytest.raises(common.DivergedError, match="run A: training diverged: the loss is nan"):
        common.finite(float("nan"), "the loss", "run A", 0.1)


def test_diverging_finds_a_refusal_re_raised_without_its_cause():
    # IGRCount re-raises its stick-breaking distribution's refusal under its own name, `from
    # None`: the original error is then the context, not the cause, and a collapsed scale
    # (0 after training) is still a divergence.
    with pytest.raises(common.DivergedError, match="a distribution refused a value"):
        with common.diverging("run A, epoch 3", lambda: [], 0.01):
            IGRCount(torch.zeros(3), torch.tensor([1.0, 1.0, 0.0]), 0.5, validate_args=True)

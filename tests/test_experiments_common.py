"""The experiments' shared machinery: results merged atomically, checkpoints, the command line."""

import json
import multiprocessing
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_relax.__main__ import build_parser
from pyro_relax.experiments import EXPERIMENTS
from pyro_relax.experiments.common import (
    Checkpoint,
    atomic_write_text,
    markdown_table,
    save_figure,
    torch_threads,
    update_records,
)

KEY = ("prior", "estimator")


def test_update_records_replaces_a_rerun_and_keeps_the_others(tmp_path):
    path = tmp_path / "runs.json"
    update_records(path, [{"prior": "a", "estimator": "x", "value": 1}], KEY)
    update_records(path, [{"prior": "b", "estimator": "x", "value": 2}], KEY)
    merged = update_records(path, [{"prior": "a", "estimator": "x", "value": 3}], KEY)
    assert json.loads(path.read_text()) == merged
    assert sorted((r["prior"], r["value"]) for r in merged) == [("a", 3), ("b", 2)]


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

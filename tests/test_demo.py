"""The demo command, in smoke mode: table, plot, and runs that train."""

import math
import sys

import pytest

import pyro_relax.__main__ as cli
from pyro_relax import demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def recorded_results(monkeypatch):
    """Runs of the demo that ``main`` starts, kept for inspection."""
    results = []

    def run_and_record(config, output):
        results.extend(demo.run_demo(config, output))
        return results

    monkeypatch.setattr(cli, "run_demo", run_and_record)
    return results


def test_demo_smoke(tmp_path, monkeypatch, capsys, recorded_results):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--smoke", "--output", "curves.png"]) == 0

    with open(tmp_path / "curves.png", "rb") as png:
        assert png.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    table = capsys.readouterr().out
    assert all(method in table for method in demo.METHODS)
    assert [result.method for result in recorded_results] == list(demo.METHODS)
    for result in recorded_results:
        assert result.params_changed and len(result.curve) == 2
        assert math.isfinite(result.final_elbo) and result.final_elbo_se > 0
        # Measured once, after the last epoch; a ratio of magnitudes is positive.
        assert [epoch for epoch, _ in result.snr_curve] == [2] and result.final_snr > 0


def test_demo_defaults():
    args = cli.build_parser().parse_args(["demo"])
    assert args.output == "demo_elbo.png" and args.epochs == demo.DemoConfig.epochs


def test_demo_without_optional_dependencies(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes the import machinery find none
    assert cli.main(["demo", "--smoke"]) == 1
    assert 'pip install "pyro-relax[demo]"' in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--seed", "-1"], "at least 0"),
        (["demo", "--seed", str(2**32)], "below 2**32"),
        (["experiment", "synthetic", "--seed", "-1"], "at least 0"),
        (["experiment", "synthetic", "--device", "nonsense"], "is not a torch device"),
        # The meta device was accepted, and training failed with a traceback.
        (["experiment", "synthetic", "--device", "meta"], "holds no values"),
    ],
)
def test_seeds_and_devices_are_checked_where_they_are_parsed(argv, message, capsys):
    # A seed NumPy refuses (pyro.set_rng_seed seeds NumPy too) and a device torch does not know
    # were tracebacks after the data had loaded; now argparse's usage error.
    with pytest.raises(SystemExit):
        cli.build_parser(argv).parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text", ["cpu", "cpu:0", "cpu:1"])
def test_one_spelling_per_device(text):
    # "cpu" and "cpu:0" name one device; the records of one run differed by the spelling.
    argv = ["experiment", "synthetic", "--device", text]
    assert cli.build_parser(argv).parse_args(argv).device == "cpu"


def test_a_cuda_device_without_cuda_is_a_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["experiment", "synthetic", "--device", "cuda"]
    with pytest.raises(SystemExit):
        cli.build_parser(argv).parse_args(argv)
    assert "sees no CUDA device" in capsys.readouterr().err


def test_output_paths_are_checked_before_training(tmp_path, capsys):
    # They failed only when the plot or the first results were written, after the training.
    assert cli.main(["demo", "--smoke", "--output", str(tmp_path / "missing" / "x.png")]) == 1
    assert cli.main(["demo", "--smoke", "--output", str(tmp_path / "x.txt")]) == 1
    (tmp_path / "d.png").mkdir()  # a folder named like a figure: IsADirectoryError at the end
    assert cli.main(["demo", "--smoke", "--output", str(tmp_path / "d.png")]) == 1
    assert capsys.readouterr().err.count("must be a .png file in an existing directory") == 3
    results = tmp_path / "a_file"
    results.write_text("")
    # A folder inside a file failed only when the first checkpoint was saved, after an epoch.
    for folder in (results, results / "sub"):
        argv = ["experiment", "synthetic", "--smoke", "--results", str(folder)]
        assert cli.main(argv) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "cannot be made a folder" in error, error

"""The training-step benchmark runs, prints every row, and its hand-written PyTorch loop computes
the loss that Pyro's ELBO computes for the same model and guide; the GPU check runs its steps and
reports each one's outcome."""

import argparse
import importlib
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO

from pyro_relax.transforms import SoftmaxPlusPlusTransform

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

pytestmark = pytest.mark.usefixtures("fresh_pyro")


@pytest.fixture
def bench_training(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import each other by name
    import bench_training

    return bench_training


def test_smoke_run_prints_every_row(bench_training):
    command = [sys.executable, str(BENCHMARKS / "bench_training.py"), "--smoke", "--threads", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")]
    printed = {tuple(cell.strip("| ") for cell in row[:3]) for row in rows[1:]}
    expected = set()
    for model_name, estimator in bench_training.CASES:
        pyro_sides = (
            bench_training.SCORE_FUNCTION_SIDES
            if estimator == "REINFORCE"
            else bench_training.REPARAMETERIZED_SIDES
        )
        # Each Pyro side (name, ELBO, the torch loop it is compared with), and those loops.
        for name, _, torch_loop in pyro_sides:
            expected |= {(model_name, estimator, name), (model_name, estimator, torch_loop)}
    assert printed == expected
    assert "pyro_relax: none" in result.stdout  # no warning raised by the library's files


def _case(bench_training, model_name, estimator):
    builder = bench_training.count_case if model_name == "count VAE" else bench_training.gst_case
    return builder(estimator, bench_training.SMOKE, torch.device("cpu"))


@pytest.mark.parametrize(
    "model_name, estimator", [("count VAE", "GenGS-IMP"), ("GST VAE", "GST-1.0")]
)
def test_torch_losses_equal_pyros(bench_training, model_name, estimator):
    case = _case(bench_training, model_name, estimator)
    x = torch.bernoulli(torch.full((bench_training.SMOKE["batch"], 784), 0.3))
    pairs = [(bench_training.monte_carlo_loss, Trace_ELBO)]
    pairs += [(bench_training.analytic_kl_loss, TraceMeanField_ELBO)]
    with pyro.validation_enabled(False):
        for loss, elbo in pairs:
            pyro.set_rng_seed(1)
            expected = elbo(max_plate_nesting=1).loss(case.model, case.guide, x)
            pyro.set_rng_seed(1)
            assert loss(case)(x).item() == pytest.approx(expected, rel=1e-5)


def _gradients(case, compute):
    for parameter in case.parameters:
        parameter.grad = None
    pyro.set_rng_seed(1)
    compute()
    return [parameter.grad.clone() for parameter in case.parameters]


def test_score_function_loss_has_tracegraph_elbos_gradient(bench_training):
    # Three steps: the decaying-average baseline starts at zero, then follows the costs.
    case = _case(bench_training, "count VAE", "REINFORCE")
    x = torch.bernoulli(torch.full((bench_training.SMOKE["batch"], 784), 0.3))
    loss, elbo = bench_training.score_function_loss(case), TraceGraph_ELBO(max_plate_nesting=1)
    with pyro.validation_enabled(False):
        for _ in range(3):
            ours = _gradients(case, lambda: loss(x).backward())
            pyros = _gradients(case, lambda: elbo.loss_and_grads(case.model, case.guide, x))
            for a, b in zip(ours, pyros, strict=True):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# torch 2.13 deprecates torch.jit.trace, which Pyro's JIT ELBOs call (not our code).
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_repaired_jit_mean_field_elbo_traces_once(bench_training, monkeypatch):
    traces = []
    trace = torch.jit.trace

    def counting_trace(*args, **kwargs):
        traces.append(args[0])
        return trace(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", counting_trace)
    case = _case(bench_training, "GST VAE", "STGS")
    x = torch.bernoulli(torch.full((bench_training.SMOKE["batch"], 784), 0.3))
    elbo = bench_training.CachedJitTraceMeanField_ELBO(
        max_plate_nesting=1, ignore_jit_warnings=True
    )
    with pyro.validation_enabled(False):
        for _ in range(3):
            elbo.loss_and_grads(case.model, case.guide, x)
    assert len(traces) == 1


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    return gpu_check


def test_gpu_check_refuses_without_cuda(gpu_check, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as refused:
        gpu_check.main(["--out", str(tmp_path / "out")])
    assert refused.value.code == 2
    assert "--device cpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpu_check_reports_every_step_and_fails_on_any(gpu_check, monkeypatch, tmp_path):
    # Fake steps (one passes, one fails, one outlives its time limit): the report names each
    # outcome, is written before the next step starts, and the run's status is a failure.
    python = [sys.executable, "-c"]
    fake = {
        "tests": python + ["print('passed')"],
        "bench_gengs": python + ["import sys; print('broken'); sys.exit(3)"],
        "bench_igr": python + ["import time; print('slow', flush=True); time.sleep(30)"],
    }
    monkeypatch.setattr(gpu_check, "commands", lambda device, quick, data: fake)
    argv = ["--device", "cpu", "--out", str(tmp_path), "--timeout", "3", "--steps", *fake]
    assert gpu_check.main(argv) == 1
    report = (tmp_path / "report.md").read_text()
    assert "**failed: bench_gengs, bench_igr** (3 steps run)" in report
    assert "exit status 0" in report and "exit status 3" in report and "timed out" in report
    assert "passed" in report and "broken" in report
    assert "device cpu" in report


def test_gpu_check_keeps_to_its_budget(gpu_check, monkeypatch, tmp_path):
    # A budget of 3 s with a minimum step of 1 s: the first step sleeps past what is left and
    # is stopped at the budget, not at --timeout; the next would start with nothing left and
    # is reported as not run. The whole run ends well inside --timeout.
    monkeypatch.setattr(gpu_check, "MIN_STEP_SECONDS", 1)
    python = [sys.executable, "-c"]
    fake = {
        "tests": python + ["import time; print('slow', flush=True); time.sleep(60)"],
        "bench_gengs": python + ["print('never')"],
    }
    monkeypatch.setattr(gpu_check, "commands", lambda device, quick, data: fake)
    argv = ["--device", "cpu", "--out", str(tmp_path), "--timeout", "60", "--budget", "3"]
    start = time.perf_counter()
    assert gpu_check.main([*argv, "--steps", *fake]) == 1
    assert time.perf_counter() - start < 30
    report = (tmp_path / "report.md").read_text()
    assert "**failed: tests; not run (budget spent): bench_gengs** (1 steps run)" in report
    assert "timed out" in report and "not run: the budget was spent" in report
    assert report.count("never") == 1  # in its command line only: it did not run


def test_gpu_check_runs_a_real_step_on_the_cpu(gpu_check, tmp_path):
    # The real command line of one step, with the paths and environment the script sets up.
    argv = ["--device", "cpu", "--quick", "--out", str(tmp_path), "--steps", "kernel_counts"]
    assert gpu_check.main(argv) == 0
    report = (tmp_path / "report.md").read_text()
    assert "**all steps passed** (1 steps run)" in report
    assert "GenGSPoisson rsample+backward" in report


def test_gpu_check_compile_step_runs_on_the_cpu(gpu_check, tmp_path):
    # torch.compile (TorchInductor, a C++ compiler on the CPU) of the GenGS step: it compiles
    # in one graph and its value and gradient match eager's (bench_gengs prints the largest
    # differences; the report must hold a finite one per n).
    argv = ["--device", "cpu", "--quick", "--out", str(tmp_path), "--steps", "compile"]
    assert gpu_check.main(argv) == 0
    report = (tmp_path / "report.md").read_text()
    # The bench_gengs step prints the small-size tables; this step only the compiled one.
    assert "validate_args=True" not in report and "torch.compile" in report
    rows = [line.split() for line in report.splitlines()]
    rows = [row for row in rows if len(row) == 7 and row[0] in ("15", "50")]
    assert [row[0] for row in rows] == ["15", "50"], report
    for row in rows:
        value_diff, grad_diff = float(row[5]), float(row[6])
        assert value_diff < 1e-2 and grad_diff < 1e-3, row


@pytest.fixture
def bench_gengs(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gengs

    monkeypatch.setattr(bench_gengs, "clock", bench_gengs.clock)  # restored after the test
    return bench_gengs


def test_the_cpu_clock_does_not_count_waiting(bench_gengs):
    # A step that only waits: the wall clock sees 50 ms, the process's CPU time almost nothing
    # (what another job holding the core would look like to the benchmark).
    import time

    cpu = torch.device("cpu")
    assert "wall" in bench_gengs.use_clock("wall", cpu)
    wall_ms = bench_gengs.time_per_call(lambda: time.sleep(0.05), cpu, 2)
    assert "CPU time" in bench_gengs.use_clock("cpu", cpu)
    cpu_ms = bench_gengs.time_per_call(lambda: time.sleep(0.05), cpu, 2)
    assert wall_ms >= 50 and cpu_ms < 10


def test_every_timing_script_takes_the_clock_option():
    # docs/performance.md and benchmarks/README.md: --clock is in every timing script;
    # rloo_variance.py timed with time.perf_counter and had no --clock.
    for script in sorted(BENCHMARKS.glob("*.py")):
        if script.name in ("bench_gengs.py", "gpu_check.py"):
            continue  # the clocks themselves; a budget's wall time
        source = script.read_text()
        assert "perf_counter" not in source and "process_time" not in source, script.name
        if any(name in source for name in ("time_per_call", "alternate", "clock()")):
            assert "add_clock_option(parser)" in source, script.name


def test_the_cpu_clock_is_refused_for_a_gpu(bench_gengs):
    with pytest.raises(SystemExit, match="wall clock"):
        bench_gengs.use_clock("cpu", torch.device("cuda"))


class _PlainInvertibleGaussian:
    """A stand-in for relaxit's class (not installed here): softmax++ without a shift."""

    def __init__(self, loc, scale, temperature, validate_args=None):
        self.loc, self.scale, self.temperature = loc, scale, temperature

    def rsample(self):
        weights = ((self.loc + self.scale * torch.randn_like(self.loc)) / self.temperature).exp()
        z = weights / (weights.sum(-1, keepdim=True) + 1)
        return torch.cat([z, 1 - z.sum(-1, keepdim=True)], -1)

    def log_prob(self, value):
        return value.log().sum(-1)


def test_relaxit_table_times_every_step_and_the_row_maximum(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_igr

    table = bench_igr.relaxit_table(_PlainInvertibleGaussian, torch.device("cpu"), 1, 1)
    header, *rows = table.splitlines()
    # Each column name ends where its figures do (the header's step column was 2 narrower).
    for name, end in (("relaxit ms", 58), ("IGR ms", 69), ("IGR/relaxit", 82)):
        assert header.index(name) + len(name) == end
    assert all(len(row) == 82 for row in rows)
    sampled = ["rsample + backward", "rsample + log_prob + backward"]
    steps = ["construction only", *sampled, *(f"{step}, validated" for step in sampled)]
    steps += ["IGR's operators alone", "IGR's arithmetic, one node", "stable, no accuracy fixes"]
    steps += ["row maximum alone (IGR side)"]
    expected = [(k, step) for step in steps for k in bench_igr.CATEGORIES]
    assert [(int(row[:4]), row[6:46].strip()) for row in rows] == expected
    for row in rows:
        theirs, ours, ratio = (float(cell) for cell in row[46:].split())
        # One call per side: a slow first call of relaxit's can make the ratio print as 0.00.
        assert ours > 0 and ratio >= 0
        if theirs >= 0.1:  # milliseconds printed to three decimals: the ratio, to 1%
            assert ratio == pytest.approx(ours / theirs, rel=0.01, abs=0.01)


class _RefusingInvertibleGaussian(_PlainInvertibleGaussian):
    """A stand-in whose validated log_prob refuses every value, as relaxit's does for its own
    samples whose last coordinate rounds below zero."""

    def __init__(self, loc, scale, temperature, validate_args=None):
        super().__init__(loc, scale, temperature)
        self.validate_args = validate_args

    def log_prob(self, value):
        if self.validate_args:
            raise ValueError("Sample value must be in the range [0, 1]")
        return super().log_prob(value)


def test_relaxit_table_reports_a_refused_sample_and_goes_on(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_igr

    table = bench_igr.relaxit_table(_RefusingInvertibleGaussian, torch.device("cpu"), 1, 1)
    refused = [row for row in table.splitlines() if "failed validation" in row]
    assert [row[6:46].strip() for row in refused] == 2 * [
        "rsample + log_prob + backward, validated"
    ]
    assert all(row.endswith("Sample value must be in the range [0, 1]") for row in refused)
    assert "row maximum alone (IGR side)" in table.splitlines()[-1]


@pytest.mark.parametrize("device", ["one node", "stable, no accuracy fixes"])
def test_bench_igrs_measuring_devices_compute_what_igr_computes(monkeypatch, device):
    # bench_igr's single-node draw bounds what fusing IGR could gain, and its cheapest stable
    # map measures what the library's guarantees cost, only if each computes the same sample
    # (and log z, where it gives one) and gradients as the library's softmax++ of the same
    # pre-image (float64, away from the float32 limits those guarantees are for).
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_igr

    generator = torch.Generator().manual_seed(0)
    loc = torch.randn(4, 6, dtype=torch.float64, generator=generator).requires_grad_()
    scale = (0.5 + torch.rand(4, 6, dtype=torch.float64, generator=generator)).requires_grad_()
    eps = torch.randn(4, 6, dtype=torch.float64, generator=generator)
    weights = torch.randn(4, 7, dtype=torch.float64, generator=generator)
    temperature = torch.tensor(0.5, dtype=torch.float64)
    softmax = SoftmaxPlusPlusTransform(temperature)
    if device == "one node":
        log_delta = torch.zeros(1, dtype=torch.float64)
        measured = bench_igr._OneNode.apply(loc, scale, eps, temperature, log_delta)
    else:
        log_delta = torch.zeros((), dtype=torch.float64)
        measured = (bench_igr._without_correction(loc, scale, eps, temperature, log_delta),)
    library = softmax.simplex_and_log(torch.addcmul(loc, eps, scale))[: len(measured)]

    def with_gradients(outputs):
        loss = (outputs[0] * weights).sum() + sum(extra.sum() for extra in outputs[1:])
        return (*outputs, *torch.autograd.grad(loss, (loc, scale)))

    for a, b in zip(with_gradients(measured), with_gradients(library), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# TorchInductor's own deprecation warning while it compiles (torch 2.13).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_kernel_counts_add_generated_kernels_to_dispatched_operators(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import kernel_counts

    x = torch.randn(8, 5, requires_grad=True)
    weights = torch.randn(5)
    eager = kernel_counts.step_count(lambda: ((x * 2).exp() @ weights).sum())
    compiled = kernel_counts.compiled_step_count(lambda: ((x * 2).exp() @ weights).sum())
    # Eager: mul, exp, the product, the sum and their backward, each its own operator; compiled,
    # Inductor fuses them into a few kernels, but at least one forward and one backward.
    assert 2 <= compiled < eager

    def graph_break():
        torch._dynamo.graph_break()
        return x.sum()

    with pytest.raises(Exception, match="graph_break|Graph break|graph break"):
        kernel_counts.compiled_step_count(graph_break)


@pytest.mark.parametrize(
    "work, expected",
    [
        # An operator whose only callee computes nothing still launches its own kernel.
        (lambda x: x.clone().clamp_(min=-1.0), {"aten::copy_": 1, "aten::clamp_": 1}),
        (lambda x: torch.where(x > 0, x, 0.0), {"aten::gt": 1, "aten::where": 1}),
        (lambda x: torch.arange(5.0) + x[:5], {"aten::arange": 1, "aten::add": 1}),
        # Views and a conversion to the dtype a tensor already has: no kernel.
        (lambda x: x.view(2, 5).t().unsqueeze(0).to(x.dtype), {}),
        # A real conversion is its copy.
        (lambda x: x.to(torch.float64), {"aten::copy_": 1}),
    ],
    ids=["clamp_", "where", "arange", "views", "conversion"],
)
def test_kernel_counts_count_each_computing_call_once(monkeypatch, work, expected):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import kernel_counts

    x = torch.randn(10)
    assert dict(kernel_counts.kernel_operators(lambda: work(x))) == expected


def test_the_machine_line_names_the_librarys_commit(bench_gengs, monkeypatch, tmp_path):
    # Comparisons run the scripts of one checkout against the library of another (PYTHONPATH
    # to a git worktree of an older commit): the line named the scripts' commit for both.
    outside = tmp_path / "pyro_relax" / "__init__.py"
    outside.parent.mkdir()
    monkeypatch.setattr(bench_gengs.pyro_relax, "__file__", str(outside))
    assert bench_gengs._revision() == ""  # a library outside any repository has no commit


def test_discrete_memory_prints_a_row_per_batch():
    command = [
        sys.executable, str(BENCHMARKS / "discrete_memory.py"),
        "--batch", "1", "3", "--latents", "2", "--categories", "3", "--clock", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[-4:]]
    assert [row[:2] for row in rows] == [
        ["IGR", "1"], ["IGR", "3"], ["IGRStickBreaking", "1"], ["IGRStickBreaking", "3"]
    ]  # fmt: skip
    assert all(float(row[2]) >= 0 and float(row[4]) >= float(row[3]) > 0 for row in rows)


# --- Options: a bad value is argparse's one-line usage error, before anything runs or prints.

# Each case adds the tiny settings that keep a run short were the bad option let through.
BAD_OPTIONS = [
    ("bench_gengs", ["--repeats", "0", "--number", "1"], "--repeats"),
    ("bench_gengs", ["--repeats", "-1", "--number", "1"], "--repeats"),
    ("bench_gengs", ["--number", "0", "--repeats", "1"], "--number"),
    ("bench_gengs", ["--scale-repeats", "0", "--repeats", "1", "--number", "1"], "--scale-repeats"),
    ("bench_gengs", ["--threads", "0", "--repeats", "1", "--number", "1"], "--threads"),
    ("bench_gengs", ["--sizes", "0x16", "--repeats", "1", "--number", "1"], "--sizes"),
    ("bench_gengs", ["--sizes", "1e3x1", "--repeats", "1", "--number", "1"], "--sizes"),
    ("bench_gengs", ["--device", "cuda:99", "--clock", "cpu"], "--device"),
    ("bench_gengs", ["--device", "nonsense"], "--device"),
    ("bench_igr", ["--repeats", "0", "--number", "1"], "--repeats"),
    ("bench_igr", ["--number", "0", "--repeats", "1"], "--number"),
    ("bench_igr", ["--threads", "-2", "--repeats", "1", "--number", "1"], "--threads"),
    ("bench_igr", ["--device", "cuda:99"], "--device"),
    ("bench_gst", ["--steps", "1", "--warmup", "0", "--num-draws", "2"], "--steps"),
    ("bench_gst", ["--steps", "0", "--warmup", "0", "--num-draws", "2"], "--steps"),
    ("bench_gst", ["--warmup", "-1", "--steps", "2", "--num-draws", "2"], "--warmup"),
    ("bench_gst", ["--threads", "0", "--steps", "2", "--num-draws", "2"], "--threads"),
    ("bench_gst", ["--num-draws", "0", "--steps", "2"], "--num-draws"),
    ("bench_gst", ["--temperature", "-1", "--steps", "2", "--num-draws", "2"], "--temperature"),
    ("bench_gst", ["--device", "cuda:99"], "--device"),
    ("bench_gst", ["--data", "/nonexistent", "--steps", "2", "--num-draws", "2"], "--data"),
    ("bench_training", ["--threads", "0", "--smoke"], "--threads"),
    ("bench_training", ["--device", "cuda:99", "--smoke"], "--device"),
    ("bench_training", ["--device", "nonsense", "--smoke"], "--device"),
    ("discrete_memory", ["--batch", "0", "--latents", "2", "--categories", "3"], "--batch"),
    ("discrete_memory", ["--batch", "-1", "--latents", "2", "--categories", "3"], "--batch"),
    ("discrete_memory", ["--categories", "1", "--batch", "1", "--latents", "2"], "--categories"),
    ("discrete_memory", ["--latents", "0", "--batch", "1", "--categories", "3"], "--latents"),
    ("kernel_counts", ["--batch", "0", "5", "--outcomes", "3"], "--batch"),
    ("kernel_counts", ["--outcomes", "1", "--batch", "2", "2"], "--outcomes"),
    ("kernel_counts", ["--top", "-1", "--batch", "2", "2", "--outcomes", "3"], "--top"),
    ("rloo_variance", ["--draws", "20", "--repeats", "1", "--table", "fixed"], "--draws"),
    ("rloo_variance", ["--draws", "30", "--repeats", "1", "--table", "fixed"], "--draws"),
    ("rloo_variance", ["--draws", "0", "--repeats", "1", "--table", "fixed"], "--draws"),
    ("rloo_variance", ["--minibatch-draws", "20", "--table", "minibatch"], "--minibatch-draws"),
    ("rloo_variance", ["--repeats", "0", "--draws", "40", "--table", "fixed"], "--repeats"),
    ("gpu_check", ["--device", "nonsense", "--steps", "kernel_counts"], "--device"),
    ("gpu_check", ["--device", "mps", "--steps", "kernel_counts"], "--device"),
]


@pytest.mark.parametrize(
    "script, argv, option", BAD_OPTIONS, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD_OPTIONS]
)
def test_a_bad_option_is_a_usage_error(monkeypatch, capsys, tmp_path, script, argv, option):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    main = importlib.import_module(script).main
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--out", str(out)] if script == "gpu_check" else argv)
    printed = capsys.readouterr()
    assert refused.value.code == 2, printed.err
    assert printed.out == ""  # refused before the machine line or anything else
    *usage, message = printed.err.strip().splitlines()
    assert (
        usage[0].startswith("usage:")
        and f"error: argument {option}" in message
        or (
            f"error: {option}" in message  # a check after parsing (bench_gst's --data)
        )
    ), printed.err
    assert not out.exists()  # gpu_check: the device checked before the folder is made


# --- bench_igr: only a validation check's refusal is "failed validation".


@pytest.fixture
def bench_igr(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_igr

    return bench_igr


TORCH_REFUSAL = "Expected value argument (Tensor of shape (100, 20, 10)) to be within the support"


@pytest.mark.parametrize("validate_args", [False, True])
@pytest.mark.parametrize(
    "error", [ValueError("a bug"), statistics.StatisticsError("no median for empty data")]
)
def test_igr_table_lets_other_errors_through(bench_igr, monkeypatch, validate_args, error):
    def compare(*args):
        raise error

    monkeypatch.setattr(bench_igr, "compare", compare)
    with pytest.raises(ValueError, match=str(error)):
        bench_igr.table(torch.device("cpu"), 1, 1, validate_args)


def test_igr_table_reports_a_validation_refusal_only_with_validation_on(bench_igr, monkeypatch):
    def compare(*args):
        raise ValueError(TORCH_REFUSAL + "\nmore")

    monkeypatch.setattr(bench_igr, "compare", compare)
    lines = bench_igr.table(torch.device("cpu"), 1, 1, True).splitlines()[1:]
    assert lines == [f"{k:>4}  failed validation: {TORCH_REFUSAL}" for k in bench_igr.CATEGORIES]
    with pytest.raises(ValueError, match="Expected value argument"):
        bench_igr.table(torch.device("cpu"), 1, 1, False)  # no check runs: not a refusal


class _BrokenInvertibleGaussian(_PlainInvertibleGaussian):
    """A stand-in whose log_prob raises a ValueError that is no validation check's."""

    def log_prob(self, value):
        raise ValueError("a bug in log_prob")


def test_relaxit_table_lets_other_errors_through(bench_igr):
    with pytest.raises(ValueError, match="a bug in log_prob"):
        bench_igr.relaxit_table(_BrokenInvertibleGaussian, torch.device("cpu"), 1, 1)


# --- bench_gengs


def test_bench_gengs_compile_table_gives_the_largest_difference_of_z(bench_gengs, monkeypatch):
    # A stand-in for torch.compile that returns eager's step with one coordinate of z moved by
    # 0.5: the column "max |dz|" must read 0.5 (it read the difference of a weighted sum).
    def compile(fn, fullgraph):
        def moved(rate):
            value, loss = fn(rate)
            bump = torch.zeros_like(value)
            bump.view(-1)[7] = 0.5
            return value + bump, loss

        return moved

    monkeypatch.setattr(torch, "compile", compile)
    rows = [
        line.split() for line in bench_gengs.compile_table(torch.device("cpu"), 1, 1).split("\n")
    ]
    assert [row[0] for row in rows[1:]] == ["15", "50"]
    assert all(float(row[5]) == 0.5 and float(row[6]) == 0 for row in rows[1:])
    # The table sets Inductor's fallback_random for itself only: a global setting would change
    # what every later torch.compile in the process draws.
    from torch._inductor import config as inductor_config

    assert inductor_config.fallback_random is False


def test_bench_gengs_can_leave_out_the_small_tables(bench_gengs, capsys):
    bench_gengs.main(["--no-small", "--sizes", "--repeats", "1", "--number", "1"])
    out = capsys.readouterr().out
    assert "validate_args" not in out and "batch 100 x 50" in out


# --- bench_gst


def test_bench_gst_cuda_peak_is_this_steps_rise_plus_this_variants_tensors(monkeypatch):
    # Fake CUDA statistics: 10 MiB allocated before the step (other variants' models, every
    # batch), 13 MiB at its peak. The step's own peak is 3 MiB, and "peak" adds this variant's
    # tensors, as on the CPU (it read 13 MiB: every variant's models and batches counted).
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gst

    monkeypatch.setattr(bench_gst, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 10 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 13 * 2**20)
    torch.manual_seed(0)
    model = bench_gst.VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = torch.bernoulli(torch.full((bench_gst.BATCH, 784), 0.3))
    posterior = bench_gst.variants(1.0, 2)["STGS"]
    bench_gst.train_step(model, optimizer, batch, posterior)  # Adam's states, as after the runs
    peak, step = bench_gst.measure_memory(model, optimizer, batch, posterior, torch.device("cuda"))
    assert step == 3 * 2**20
    assert peak == bench_gst.live_tensor_bytes(model, optimizer, batch) + 3 * 2**20


def test_bench_gst_prints_the_machine_before_the_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gst

    class Stop(Exception):
        pass

    events = []
    monkeypatch.setattr(bench_gst, "machine", lambda device: events.append("machine") or "")

    def train_step(*args):
        events.append("step")
        raise Stop

    monkeypatch.setattr(bench_gst, "train_step", train_step)
    with pytest.raises(Stop):
        bench_gst.main(["--steps", "2", "--num-draws", "2"])
    assert events == ["machine", "step"]


# --- discrete_memory


def _fake_child(tmp_path, code):
    child = tmp_path / "child.py"
    child.write_text(f"import json, sys\n{code}\n")
    return child


def test_discrete_memory_shows_why_a_size_failed(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import discrete_memory

    child = _fake_child(tmp_path, "sys.exit('the reason it failed')")
    monkeypatch.setattr(discrete_memory, "__file__", str(child))
    with pytest.raises(SystemExit) as stopped:
        discrete_memory.main(["--family", "IGR", "--batch", "1", "--latents", "2"])
    assert "exit status 1" in str(stopped.value.code)
    assert "the reason it failed" in capsys.readouterr().err


def test_discrete_memory_passes_its_threads_on(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import discrete_memory

    argv_file = tmp_path / "argv"
    result = {"seconds": 0.5, "before_mib": 1.0, "after_mib": 2.0}
    code = f"open({str(argv_file)!r}, 'w').write(' '.join(sys.argv)); print(json.dumps({result}))"
    monkeypatch.setattr(discrete_memory, "__file__", str(_fake_child(tmp_path, code)))
    threads = str(torch.get_num_threads())  # this process's own: the test leaves it as it was
    discrete_memory.main(["--family", "IGR", "--batch", "1", "--threads", threads])
    assert f"--threads {threads}" in argv_file.read_text()
    assert capsys.readouterr().out.splitlines()[-1].split() == ["IGR", "1", "0.50", "1", "2"]


# --- rloo_variance


@pytest.fixture
def rloo_variance(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import rloo_variance

    return rloo_variance


def test_rloo_variance_never_reports_a_nan_error_as_zero(rloo_variance, monkeypatch, capsys):
    # The NaN second: max(0.01, nan) is 0.01, and max(0.0, nan) 0.0.
    errors = iter([0.01, math.nan, 0.02] * 4)
    monkeypatch.setattr(rloo_variance, "row", lambda *args: ("| row |", next(errors)))
    rloo_variance.fixed_table(argparse.Namespace(draws=40, repeats=1))
    assert capsys.readouterr().out.splitlines()[-1].endswith("above: nan%")
    monkeypatch.setattr(
        rloo_variance, "minibatch_rows", lambda *args: ("| a |", "| b |", next(errors))
    )
    rloo_variance.minibatch_table(argparse.Namespace(spread=1.0, seed=0, minibatch_draws=40))
    assert capsys.readouterr().out.splitlines()[-1].endswith("above: nan%")


def test_rloo_variance_fixed_estimators_need_no_plate_guess(rloo_variance):
    # Pyro logs its guess ("INFO Guessed max_plate_nesting") into the printed table; given, the
    # nesting is the model's plate and the particles' (as the minibatch estimators have it).
    for elbo, _, _ in rloo_variance.estimators(2).values():
        assert elbo.max_plate_nesting == 2


# --- gpu_check


def test_gpu_check_reports_an_interrupted_run(gpu_check, monkeypatch, tmp_path, capsys):
    # Ctrl-C during the second step: the report names it and the step that never ran, and never
    # says that all steps passed; one line on stderr, exit status 130.
    python = [sys.executable, "-c"]
    fake = {name: python + ["print('ran')"] for name in ("tests", "bench_gengs", "bench_igr")}
    monkeypatch.setattr(gpu_check, "commands", lambda device, quick, data: fake)
    run_step = gpu_check.run_step
    calls = []

    def interrupted_second(command, timeout, env):
        calls.append(command)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_step(command, timeout, env)

    monkeypatch.setattr(gpu_check, "run_step", interrupted_second)
    argv = ["--device", "cpu", "--out", str(tmp_path), "--steps", *fake]
    try:
        status = gpu_check.main(argv)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped gpu_check.main")
    assert status == 130
    report = (tmp_path / "report.md").read_text()
    assert "**interrupted during bench_gengs; never run: bench_igr** (2 steps run)" in report
    assert "all steps passed" not in report
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gpu_check: interrupted during bench_gengs; report: {tmp_path / 'report.md'}"
    ]


def test_gpu_check_summary_names_skipped_tests(gpu_check, monkeypatch, tmp_path):
    pytest_output = "5 passed, 5 skipped\nSKIPPED [5] tests/test_no_host_copies.py:56: needs CUDA"
    fake = {"tests": [sys.executable, "-c", f"print({pytest_output!r})"]}
    monkeypatch.setattr(gpu_check, "commands", lambda device, quick, data: fake)
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--steps", "tests"]) == 0
    summary = (tmp_path / "report.md").read_text().split("**")[1]
    assert summary == (
        "all steps passed; tests: 5 tests skipped: tests/test_no_host_copies.py:56: needs CUDA (5)"
    )


def test_gpu_check_report_commands_paste_into_a_shell(gpu_check, monkeypatch, tmp_path):
    command = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "-k", "GenGS or gst-vae"]
    monkeypatch.setattr(gpu_check, "commands", lambda device, quick, data: {"tests": command})
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--steps", "tests"]) == 0
    report = (tmp_path / "report.md").read_text()
    shown = report.split("## tests\n\n`")[1].split("`: exit status")[0]
    assert shlex.split(shown) == command


# --- kernel_counts and the README


def test_kernel_counts_header_names_its_counting_rule(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import kernel_counts

    kernel_counts.main(["--batch", "2", "2", "--outcomes", "3"])
    header = capsys.readouterr().out.splitlines()[4]
    assert header.endswith("; innermost computing aten operators per call")


def test_the_readme_names_the_scripts_that_take_a_device():
    # It said that every script takes --device cuda; three have no --device.
    readme = " ".join((BENCHMARKS / "README.md").read_text().split())
    scripts = sorted(BENCHMARKS.glob("*.py"))

    def has_device(script):
        text = script.read_text()
        return '"--device"' in text or "add_timing_options(parser)" in text

    takes = [f"`{script.name}`" for script in scripts if has_device(script)]
    others = [f"`{script.name}`" for script in scripts if not has_device(script)]
    assert f"{', '.join(takes[:-1])} and {takes[-1]} take `--device cuda`" in readme
    assert f"{', '.join(others[:-1])} and {others[-1]} run on the CPU only" in readme


def test_rloo_variance_times_its_variants_in_rotated_turns(rloo_variance, monkeypatch):
    # The variants ran in one fixed order every round, so a drift in the machine's load fell on
    # the same one; now which goes first rotates, as in the other timing scripts.
    calls = []
    monkeypatch.setattr(rloo_variance, "gradients", lambda elbo, infer, copies: calls.append(elbo))
    variants = {name: (name, None, 0) for name in ("a", "b", "c")}
    medians = rloo_variance.milliseconds(variants, repeats=3)
    assert list(medians) == ["a", "b", "c"]
    firsts = calls[3::3]  # after one warm-up call of each
    assert firsts == ["a", "b", "c"]


def test_interquartile_ranges_stay_within_the_times(bench_training):
    # With few steps, statistics.quantiles' default ("exclusive") extrapolated beyond the
    # measured times: an IQR of 0.50 - 3.50 for times 1 and 3.
    side = bench_training.Side("torch", None, times=[1.0, 3.0], first_ms=5.0)
    [row] = bench_training.table_rows("m", "e", [side], torch.device("cpu"))
    low, high = (float(x) for x in row[4].split(" - "))
    assert 1.0 <= low <= high <= 3.0

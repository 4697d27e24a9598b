"""The training-step benchmark runs, prints every row, and its hand-written PyTorch loop computes
the loss that Pyro's ELBO computes for the same model and guide; the GPU check runs its steps and
reports each one's outcome."""

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


def test_gpu_check_refuses_without_cuda(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "--device cpu" in capsys.readouterr().err


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
    rows = table.splitlines()[1:]
    sampled = ["rsample + backward", "rsample + log_prob + backward"]
    steps = ["construction only", *sampled, *(f"{step}, validated" for step in sampled)]
    steps += ["IGR's operators alone", "IGR's arithmetic, one node", "stable, no accuracy fixes"]
    steps += ["row maximum alone (IGR side)"]
    expected = [(k, step) for step in steps for k in bench_igr.CATEGORIES]
    assert [(int(row[:4]), row[6:46].strip()) for row in rows] == expected
    for row in rows:
        theirs, ours, ratio = (float(cell) for cell in row[46:].split())
        assert ours > 0 and ratio > 0
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

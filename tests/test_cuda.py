"""The CUDA path, end to end: every registry example and every experiment's smoke run on a GPU.

These tests skip where there is no GPU; ``benchmarks/gpu_check.py`` runs them (with the
sync-free checks of ``test_no_host_copies.py`` and every benchmark) on a machine that has one.
``PYRO_RELAX_TEST_DEVICE`` names another device to run them on (``cpu`` checks the tests
themselves on a machine without a GPU).
"""

import os

import pytest
import torch
from registry import EXAMPLES
from torch.distributions import kl_divergence

from pyro_relax.__main__ import main

DEVICE = torch.device(os.environ.get("PYRO_RELAX_TEST_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"
    ),
    pytest.mark.usefixtures("fresh_pyro"),
]


def _on_device(tensor):
    return tensor.device.type == DEVICE.type


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_example_samples_scores_and_backpropagates_on_the_device(example):
    params = example.parameters(requires_grad=True, device=DEVICE)
    d = example.build(params)
    value = d.rsample((3,))
    log_prob = d.log_prob(value)
    assert _on_device(value) and _on_device(log_prob)
    assert log_prob.shape == (3,) + d.batch_shape
    assert torch.isfinite(log_prob).all()
    learnable = [params[name] for name in example.learnable]
    if learnable and value.requires_grad:
        # A fixed linear function of the sample: a nonconstant loss for every support.
        weights = torch.linspace(0.5, 1.5, value.numel(), device=DEVICE, dtype=value.dtype)
        loss = (value.reshape(-1) * weights).sum() - log_prob.sum()
        grads = torch.autograd.grad(loss, learnable, allow_unused=True)
        for grad in grads:
            assert grad is None or (_on_device(grad) and torch.isfinite(grad).all())
    expanded = d.expand((2,) + d.batch_shape).rsample()
    assert _on_device(expanded)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kl_partners], ids=lambda e: e.id)
def test_registered_kls_agree_with_the_cpu(example):
    # Each partner is built twice, on the CPU and with the device as torch's default (the
    # partners make their tensors with torch's factories), so a device-only branch of a KL (a
    # comparison that cannot read the host, say) must give the CPU's number.
    on_cpu = example.build(validate_args=False)
    on_device = example.build(example.parameters(device=DEVICE), validate_args=False)
    compared = 0
    for partner in example.kl_partners:
        try:
            expected = kl_divergence(on_cpu, partner())
        except NotImplementedError:
            continue
        with DEVICE:
            actual = kl_divergence(on_device, partner())
        assert _on_device(actual)
        tolerance = 1e-10 if actual.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(actual.cpu(), expected, rtol=tolerance, atol=tolerance)
        compared += 1
    assert compared


@pytest.mark.parametrize(
    "name, options",
    [
        ("vae", ["--estimator", "GenGS", "GenGS-IMP"]),
        ("gst-vae", ["--estimator", "STGS", "GST-1.0", "--temperature", "1.0"]),
        ("igr-vae", ["--estimator", "IGR-I", "IGR-SB", "GS", "--temperature-pair", "0.5"]),
        ("topic", ["--estimators", "GenGS"]),
    ],
)
def test_experiment_smoke_run_on_the_device(name, options, tmp_path):
    argv = ["experiment", name, "--smoke", "--device", str(DEVICE), "--results", str(tmp_path)]
    assert main(argv + options) == 0
    assert list(tmp_path.glob("*.json"))

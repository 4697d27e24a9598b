"""No Python data is copied to an accelerator while a distribution is built, sampled, scored,
expanded or compared: each such copy is a blocking host-to-device transfer on a GPU.

On the meta device (an accelerator without data), torch's factories that take Python data,
``torch.tensor`` and ``torch.as_tensor``, are patched to fail when they would put that data on a
non-CPU device; ``torch.full`` and the like, which fill memory on the device, stay allowed.
"""

import pytest
import torch
from registry import EXAMPLES
from torch.distributions import kl_divergence

static = [e for e in EXAMPLES if e.static_shapes]


@pytest.fixture
def no_python_data_to_devices(monkeypatch):
    def guarded(factory):
        def call(data, *args, **kwargs):
            result = factory(data, *args, **kwargs)
            if result.device.type != "cpu" and not torch.is_tensor(data):
                raise AssertionError(f"{factory.__name__} copied Python data to {result.device}")
            return result

        return call

    monkeypatch.setattr(torch, "tensor", guarded(torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", guarded(torch.as_tensor))


def _exercise(d):
    value = d.rsample((2,))
    d.log_prob(value)
    d.expand((3,) + d.batch_shape).rsample()
    try:
        kl_divergence(d, d)
    except NotImplementedError:
        pass


@pytest.mark.parametrize("example", static, ids=lambda e: e.id)
def test_no_python_data_reaches_the_device(example, no_python_data_to_devices):
    params = example.parameters(device="meta")
    _exercise(example.build(params, validate_args=False))
    # A Python-number temperature, as a guide rebuilt at every step would pass it.
    if "temperature" in params and params["temperature"].dim() == 0:
        _exercise(example.build(params, validate_args=False, temperature=0.5))


def test_the_guard_catches_a_copy(no_python_data_to_devices):
    with pytest.raises(AssertionError, match="copied Python data"):
        torch.tensor([1.0, 2.0], device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("example", static, ids=lambda e: e.id)
def test_no_host_synchronization_on_cuda(example):
    # torch's sync debug mode raises on every synchronizing call. One warm-up pass first: the
    # multinomial outcome table is copied to the device once, then cached.
    params = example.parameters(device="cuda")
    _exercise(example.build(params, validate_args=False))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _exercise(example.build(params, validate_args=False))
    finally:
        torch.cuda.set_sync_debug_mode(0)

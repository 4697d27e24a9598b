"""Shared fixtures, and reports of the generated-input test at the end of a run."""

import pyro
import pytest


@pytest.fixture
def fresh_pyro():
    """An empty param store and Pyro's random state (torch, numpy, Python) seeded with 0, and
    the store emptied again afterwards; a test module opts in with
    ``pytestmark = pytest.mark.usefixtures("fresh_pyro")``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def rerun_after_interruption(monkeypatch, tmp_path):
    """``rerun(module, command, again=command)``: runs ``command()`` (an experiment of two runs
    of two epochs each, results in ``tmp_path``) interrupted at the second run's first epoch
    through ``module._after_epoch``, checks that both checkpoints are kept (the finished run's
    record, the other's state), runs ``again()`` and returns the epochs that trained then."""

    class Interrupt(Exception):
        pass

    def rerun(module, command, again=None):
        epochs = []

        def interrupt_the_second_run(epoch):
            epochs.append(epoch)
            if len(epochs) == 3:
                raise Interrupt

        monkeypatch.setattr(module, "_after_epoch", interrupt_the_second_run)
        with pytest.raises(Interrupt):
            command()
        assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 2
        epochs.clear()
        monkeypatch.setattr(module, "_after_epoch", epochs.append)
        (again or command)()
        assert not list((tmp_path / "checkpoints").glob("*.pt"))
        return epochs

    return rerun


def pytest_terminal_summary(terminalreporter):
    import sys

    fuzz = sys.modules.get("test_fuzz")
    if fuzz is None or not fuzz.OUTCOMES:
        return
    outcomes = fuzz.OUTCOMES
    parts = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
    terminalreporter.write_line(f"generated inputs: {sum(outcomes.values())} cases tried: {parts}")

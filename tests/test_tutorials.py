"""The tutorials are stored as they ran in full, and their executor enforces what CI relies on.

CI executes every notebook in smoke mode (``make tutorials``); these checks cover what that run
cannot see: the outputs committed for readers.
"""

import importlib.util
import json
import pathlib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("[0-9]*.ipynb"))
SMOKE_SWITCH = 'smoke_test = "CI" in os.environ'


def _executor():
    spec = importlib.util.spec_from_file_location("execute", ROOT / "tutorials" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_four_tutorials_linked_from_both_readmes():
    assert len(NOTEBOOKS) == 4
    for readme in (ROOT / "README.md", ROOT / "tutorials" / "README.md"):
        text = readme.read_text()
        for notebook in NOTEBOOKS:
            assert f"{notebook.name})" in text, f"{readme} does not link {notebook.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_stored_as_a_full_run_top_to_bottom(path):
    nb = json.loads(path.read_text())
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert SMOKE_SWITCH in "".join(code[0]["source"])
    # Executed once, in order, in one kernel.
    assert [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1))
    outputs = [output for cell in code for output in cell["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert not [
        o for o in outputs if o.get("name") == "stderr" and "warning" in "".join(o["text"]).lower()
    ]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot stored"
    run = nb["metadata"]["pyro_relax"]
    assert run["smoke_test"] is False and run["machine"] and run["seconds"] > 0


@pytest.fixture(scope="module")
def executor():
    return _executor()


def _notebook(tmp_path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    path = tmp_path / "example.ipynb"
    nbformat.write(nb, path)
    return path


def test_executor_sets_the_smoke_switch_and_records_the_run(executor, tmp_path):
    path = _notebook(tmp_path, "import os\n" + SMOKE_SWITCH + "\nprint(smoke_test)")
    nb, _ = executor.execute(path, smoke=True, timeout=60)
    assert nb.cells[0].outputs[0]["text"].strip() == "True"
    executor.main([str(path), "--in-place"])
    stored = json.loads(path.read_text())
    assert "".join(stored["cells"][0]["outputs"][0]["text"]).strip() == "False"
    assert stored["metadata"]["pyro_relax"]["smoke_test"] is False


def test_executor_rejects_a_printed_warning(executor, tmp_path):
    path = _notebook(tmp_path, "import warnings\nwarnings.warn('stale API')")
    with pytest.raises(RuntimeError, match="printed a warning"):
        executor.execute(path, smoke=True, timeout=60)

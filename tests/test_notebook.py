"""notebooks/quickstart.ipynb runs top to bottom and draws its figure; it is committed without outputs."""

import json
import os
import sys

import pytest

from conftest import ROOT
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_notebook():
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)


def test_notebook_is_committed_without_outputs():
    code_cells = [cell for cell in _read_notebook()["cells"] if cell["cell_type"] == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell["outputs"] == [] and cell["execution_count"] is None, \
            f"clear the notebook's outputs before committing (cell: {''.join(cell['source'])[:60]!r})"


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    # a kernel spec of our own, so the notebook runs in this interpreter (this venv), whatever
    # other `python3` kernels the machine has
    kernels = tmp_path / "kernels"
    (kernels / "elmojax-test").mkdir(parents=True)
    (kernels / "elmojax-test" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "elmojax test", "language": "python"}))
    km = KernelManager(kernel_name="elmojax-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))

    figure = tmp_path / "figure.png"
    monkeypatch.setenv("ELMOJAX_NOTEBOOK_FIGURE", str(figure))  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": ROOT}})  # cwd: the root
    client.execute(cleanup_kc=True)  # raises CellExecutionError, with the traceback, if a cell fails

    errors = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert not errors
    assert all(cell.execution_count is not None for cell in nb.cells if cell.cell_type == "code")
    assert figure.exists() and figure.stat().st_size > 1000
    assert figure.read_bytes()[:8] == PNG_SIGNATURE

"""Every notebook runs top to bottom on the CPU (nbclient), and is stored without outputs."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
PATHS = sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))


def test_there_are_notebooks():
    names = [os.path.basename(p)[:2] for p in PATHS]
    assert names == [f"{i:02d}" for i in range(1, len(PATHS) + 1)] and len(names) >= 8


@pytest.mark.parametrize("path", PATHS, ids=os.path.basename)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "from lcx import colab" in code[0].source  # the Colab setup cell comes first


@pytest.mark.notebook
@pytest.mark.parametrize("path", PATHS, ids=os.path.basename)
def test_notebook_runs_on_the_cpu(path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(path, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": NOTEBOOKS}}).execute()  # fmt: skip
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 1, "a notebook shows pictures"

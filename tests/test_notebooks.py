"""Every notebook in notebooks/ executes top to bottom without error (outputs are not committed).

Notebooks that train keep their run lengths in a cell tagged ``parameters`` (the papermill
convention); here a cell after it shortens them, so the test checks that every cell runs, not
the converged numbers (run the notebook itself for those).
"""

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


# Shorter runs for the test, injected after the notebook's "parameters" cell.
QUICK = {
    "02_serial_tasks.ipynb": "STEPS = 40",
    "03_low_precision_training.ipynb": "STEPS = 60",
}


def _inject_quick(nb, name: str, nbformat) -> None:
    if name not in QUICK:
        return
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(QUICK[name]))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name}: commit notebooks without outputs"
    _inject_quick(nb, path.name, nbformat)
    env_before = dict(os.environ)
    # Notebooks run on one CPU device, in a scratch directory, headless plotting.
    os.environ["MPLBACKEND"] = "Agg"
    os.environ.pop("XLA_FLAGS", None)
    try:
        client = nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)

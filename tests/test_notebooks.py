"""Every notebook runs top to bottom on the embedded model (a broken notebook fails CI), and is stored with
its outputs (small images), so that a reader of the repository page sees the pictures.

Each notebook opens with a cell tagged `parameters` (papermill's convention) that sets its sizes. The test runs
it with tiny sizes, injected as a cell right after that one (as papermill does), so that every cell runs and
draws its pictures in seconds; the stored outputs come from the full sizes.
Refresh them after changing a notebook: `OMP_NUM_THREADS=2 PYTHONPATH=. python tests/test_notebooks.py`.
"""

import copy
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_BYTES = 800_000  # per notebook, outputs included: small figures only (60 dpi)
# The fewest images and steps with which every cell still runs its code paths and draws its figures.
TINY = {
    "01_quickstart": "CLASSES, PER_CLASS = 2, 1\nSTEPS = 3",
    "02_strategy_explorer": "CLASSES = 3\nSTEPS = 3\nSCALES = [1.5, 6.0]\nTHRESHOLDS = [0.99, 0.9995]",
    "03_evaluation": "NUM_IMAGES, STEPS = 4, 2",
}


def execute(nb, folder, timeout: int = 900) -> None:
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def image_count(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def with_parameters(nb, source: str):
    """A copy of `nb` without outputs and with `source` run right after its `parameters` cell."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, injected)
    return nb


def test_notebooks_exist():
    assert NOTEBOOKS
    assert sorted(TINY) == [p.stem for p in NOTEBOOKS], "give every notebook its tiny parameters in TINY"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    stored = nbformat.read(path, as_version=4)
    assert image_count(stored) > 0, f"{path.name} is stored without its pictures; refresh it (see the docstring)"
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes; keep the figures small"
    assert not [o for o in outputs(stored) if o.output_type == "error"]
    nb = with_parameters(stored, TINY[path.stem])
    execute(nb, tmp_path)
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert image_count(nb) == image_count(stored)  # the stored pictures are the ones the code draws


if __name__ == "__main__":
    import tempfile

    for path in (Path(p) for p in sys.argv[1:]) if sys.argv[1:] else NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        execute(nb, tempfile.mkdtemp(), timeout=3600)  # per cell; a shared machine can be slow
        nbformat.write(nb, path)
        print(f"{path}: {path.stat().st_size} bytes, {image_count(nb)} images")

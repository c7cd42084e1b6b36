"""The example notebooks run top to bottom (any cell error fails), and are stored without outputs.

Each notebook runs in a fresh python3 kernel with nbclient, in a temporary working folder (the
notebooks write files there), with one intra-op thread like the rest of the suite. Figures and
HTML outputs are produced but not kept. Set ``$GRADSCOPE_REVIEW_DIR`` to also save the PNG figures
the notebooks displayed, for looking at them.
"""
import base64
import json
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbformat, nbclient, ipykernel)")
pytest.importorskip("ipykernel", reason="pip install -e '.[dev]' (nbformat, nbclient, ipykernel)")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 120  # seconds per cell; each notebook takes well under a minute on 2 cores


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_fused_lstm.ipynb", "03_checkpoint.ipynb", "04_attention.ipynb",
            "05_seed_remedies.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    book = json.loads(path.read_text(encoding="utf-8"))
    assert book["metadata"]["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(book["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {i} of {path.name} has stored outputs"
            assert cell["execution_count"] is None, f"cell {i} of {path.name} has an execution count"
    nbformat.validate(nbformat.reads(path.read_text(encoding="utf-8"), as_version=4))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: torch starts with one thread
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    book = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(book, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, when a cell raises
    seconds = time.perf_counter() - t0
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    pngs = [o["data"]["image/png"] for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert pngs, f"{path.name} displayed no figure"
    review = os.environ.get("GRADSCOPE_REVIEW_DIR")
    if review:
        os.makedirs(review, exist_ok=True)
        for i, data in enumerate(pngs):
            with open(os.path.join(review, f"nb_{path.stem}_{i:02d}.png"), "wb") as f:
                f.write(base64.b64decode(data))
    assert seconds < 120, f"{path.name} took {seconds:.0f} s; keep the examples small"

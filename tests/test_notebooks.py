"""The example notebooks: stored with their outputs, and they still run top to bottom.

The stored copies carry outputs (figures visible on a code host; made by ``notebooks/execute.py``).
Each notebook is also executed again here, from a copy with its outputs cleared, in a fresh python3
kernel with one intra-op thread, from inside ``notebooks/``: any cell error fails, and the run must
write nothing into ``notebooks/``. Set ``$GRADSCOPE_REVIEW_DIR`` to also save the PNG figures the
notebooks displayed, for looking at them.
"""
import base64
import importlib.util
import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbformat, nbclient, ipykernel)")
pytest.importorskip("ipykernel", reason="pip install -e '.[dev]' (nbformat, nbclient, ipykernel)")

HERE = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("nb_execute", HERE / "execute.py")
nb_execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nb_execute)


def _pngs(cells):
    return [o["data"]["image/png"] for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_fused_lstm.ipynb", "03_checkpoint.ipynb", "04_attention.ipynb",
            "05_seed_remedies.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_with_outputs(path):
    book = json.loads(path.read_text(encoding="utf-8"))
    assert book["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in book["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert None not in counts and counts == sorted(counts), f"{path.name}: run notebooks/execute.py"
    assert _pngs(book["cells"]), f"{path.name} is stored without figures"
    errors = [o for c in code for o in c["outputs"] if o.get("output_type") == "error"]
    assert not errors, f"{path.name} is stored with an error output"
    nbformat.validate(nbformat.reads(path.read_text(encoding="utf-8"), as_version=4))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_writes_nothing_beside_itself(path):
    before = sorted(p.name for p in HERE.iterdir())
    book, seconds = nb_execute.execute(path, cwd=HERE)
    assert sorted(p.name for p in HERE.iterdir()) == before, "the notebook wrote files into notebooks/"
    pngs = _pngs(book.cells)
    assert pngs, f"{path.name} displayed no figure"
    review = os.environ.get("GRADSCOPE_REVIEW_DIR")
    if review:
        os.makedirs(review, exist_ok=True)
        for i, data in enumerate(pngs):
            with open(os.path.join(review, f"nb_{path.stem}_{i:02d}.png"), "wb") as f:
                f.write(base64.b64decode(data))
    assert seconds < 120, f"{path.name} took {seconds:.0f} s; keep the examples small"

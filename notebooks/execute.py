"""Execute the example notebooks and store them with their outputs (figures visible on a code host).

Each notebook runs top to bottom in a fresh ``python3`` kernel (nbclient) with one intra-op thread,
its working folder set to ``notebooks/``; the notebooks write their files into a temporary folder,
never here. Run after changing a notebook or what it shows:

    python notebooks/execute.py            # every notebook
    python notebooks/execute.py 01         # those whose name contains "01"

``tests/test_notebooks.py`` executes them again (from a copy without outputs) and checks the stored
copies carry outputs.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CELL_TIMEOUT = 120  # seconds per cell


def execute(path: Path, cwd: Path = HERE):
    """The notebook at ``path`` executed (outputs cleared first); returns ``(notebook, seconds)``."""
    import nbclient
    import nbformat

    book = nbformat.read(str(path), as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    os.environ.setdefault("OMP_NUM_THREADS", "1")        # the kernel inherits it: one torch thread
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(book, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(cwd)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, when a cell raises
    return book, time.perf_counter() - t0


def main(argv=None) -> None:
    import nbformat

    want = (argv if argv is not None else sys.argv[1:]) or [""]
    for path in sorted(HERE.glob("*.ipynb")):
        if any(w in path.name for w in want):
            book, seconds = execute(path)
            book.metadata.pop("widgets", None)
            nbformat.write(book, str(path))
            print(f"{path.name}: {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()

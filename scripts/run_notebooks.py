"""Execute the notebooks top to bottom, full size, saving their figures.

    MISA_NB_FIGDIR=docs/figures/notebooks MISA_IMPORTANCE_JSON=runs/<run>/importance.json \\
        python scripts/run_notebooks.py            # all of notebooks/0*.ipynb, or name some

``MISA_NB_SMALL=1`` gives the small setting the test suite uses.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def _absolute_env_paths() -> None:
    """Make relative MISA_NB_FIGDIR / MISA_IMPORTANCE_JSON absolute: the kernels run in notebooks/, not here."""
    for key in ("MISA_NB_FIGDIR", "MISA_IMPORTANCE_JSON"):
        if os.environ.get(key):
            os.environ[key] = str(Path(os.environ[key]).resolve())


def main(names: list[str]) -> int:
    """Run each named notebook (default: every ``notebooks/0*.ipynb``) in a fresh kernel; print its time."""
    _absolute_env_paths()
    paths = [NB_DIR / n for n in names] if names else sorted(NB_DIR.glob("0*.ipynb"))
    for path in paths:
        t0 = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(NB_DIR)}}).execute()
        print(f"{path.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

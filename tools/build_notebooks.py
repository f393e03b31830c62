#!/usr/bin/env python
"""Build the notebooks: execute each jupytext source in notebooks/src/ and write notebooks/NAME.ipynb
with its outputs, so they read well on GitHub without running.

    python tools/build_notebooks.py [NAME ...]

The sources (percent-format .py files) are what to edit; tests/test_notebooks.py executes them again
and fails when a committed .ipynb no longer matches its source or its outputs.
Needs the `notebooks` extra (jupytext, nbclient, ipykernel, matplotlib).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
TIMEOUT = 300


def execute(source: Path) -> nbformat.NotebookNode:
    """The notebook of ``source``, executed in notebooks/ (so relative paths are the same for readers)."""
    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    for cell in nb.cells:  # keep diffs quiet: no timestamps
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


def main(argv: list[str]) -> int:
    names = set(argv)
    for source in sorted(SOURCES.glob("*.py")):
        if names and source.stem not in names:
            continue
        nb = execute(source)
        target = NOTEBOOKS / f"{source.stem}.ipynb"
        nbformat.write(nb, target)
        print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The notebooks: each committed .ipynb matches its jupytext source, executes, and shows the same text
outputs (plots are checked for presence only: PNG bytes depend on the matplotlib build)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import jupytext
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))
spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "tools" / "build_notebooks.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


def summary(nb) -> list[tuple[str, str, list]]:
    """Per cell: type, source, and its outputs reduced to text (images as a marker)."""
    out = []
    for cell in nb.cells:
        outputs = []
        for o in cell.get("outputs", []):
            if o["output_type"] == "stream":
                if outputs and outputs[-1][0] == "stream" and outputs[-1][1] == o["name"]:
                    outputs[-1] = ("stream", o["name"], outputs[-1][2] + o["text"])  # the kernel may split a stream
                else:
                    outputs.append(("stream", o["name"], o["text"]))
            elif o["output_type"] in ("display_data", "execute_result"):
                data = o["data"]
                outputs.append(("image",) if "image/png" in data else ("text", data.get("text/plain")))
            elif o["output_type"] == "error":
                outputs.append(("error", o["ename"], o["evalue"]))
        out.append((cell.cell_type, cell.source, outputs))
    return out


def test_there_are_notebooks():
    assert len(SOURCES) >= 3


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_committed_notebook_matches_its_source_and_its_outputs(source):
    committed_path = ROOT / "notebooks" / f"{source.stem}.ipynb"
    assert committed_path.is_file(), f"{committed_path.name} missing: run python tools/build_notebooks.py"
    committed = nbformat.read(committed_path, as_version=4)
    fresh_source = jupytext.read(source)
    assert [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in fresh_source.cells], f"{committed_path.name} is stale: rebuild it"
    executed = build.execute(source)
    got, want = summary(executed), summary(committed)
    for (kind, src, outs), (_, _, committed_outs) in zip(got, want):
        assert not any(o[0] == "error" for o in outs), f"{source.stem}: a cell failed: {outs}"
        assert outs == committed_outs, f"{source.stem}: outputs changed in cell:\n{src[:200]}"
    assert any(o for _, _, o in want), "committed without outputs"

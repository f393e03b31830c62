"""The notebooks: each committed .ipynb matches its jupytext source, executes, and shows the same text
outputs up to floating-point noise (plots are checked for presence only: PNG bytes depend on the
matplotlib build)."""

from __future__ import annotations

import importlib.util
import re
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


NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def same_text(a: str, b: str) -> bool:
    """The same output up to floating-point noise: the text between numbers is identical, integers are equal,
    and decimal numbers agree to 1e-3 relative, or are both below 1e-4 (rounding-error magnitudes such as
    1.2e-07 differ between BLAS builds and CPUs)."""
    if NUMBER.sub("#", a) != NUMBER.sub("#", b):
        return False
    for x, y in zip(NUMBER.findall(a), NUMBER.findall(b)):
        if x == y:
            continue
        if not any(c in x + y for c in ".eE"):
            return False  # integers (ids, counts, shapes) are exact
        fx, fy = float(x), float(y)
        if max(abs(fx), abs(fy)) < 1e-4 or abs(fx - fy) <= 1e-3 * max(abs(fx), abs(fy)):
            continue
        return False
    return True


def same_outputs(got: list, want: list) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g[0] != w[0] or len(g) != len(w):
            return False
        if g[0] in ("stream", "text") and not same_text(str(g[-1]), str(w[-1])):
            return False
    return True


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
        assert same_outputs(outs, committed_outs), f"{source.stem}: outputs changed in cell:\n{src[:200]}"
    assert any(o for _, _, o in want), "committed without outputs"

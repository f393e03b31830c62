"""Every ```python block in README.md and docs/*.md runs (blocks of one file share a namespace, in order,
from the repository root), and the numbers in the docs that come from code are current."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(path)):
        exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)


def test_the_readme_has_python_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 3


def test_numerics_table_is_current():
    """docs/numerics.md's table is what tools/fixture_report.py prints today."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "tools" / "fixture_report.py")], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    doc = (ROOT / "docs" / "numerics.md").read_text(encoding="utf-8")
    doc_rows = {r.split("|")[1].strip(): r for r in doc.splitlines() if r.startswith("| ") and "e-0" in r}
    rows = [r for r in out.splitlines() if r.startswith("| ") and "e-0" in r]
    assert rows and set(doc_rows) == {r.split("|")[1].strip() for r in rows}, "fixture cases changed"
    for row in rows:
        ours = row.split("|")[1:-1]
        theirs = doc_rows[row.split("|")[1].strip()].split("|")[1:-1]
        for a, b in zip(ours, theirs):
            a, b = a.strip(), b.strip()
            if re.fullmatch(r"[0-9.]+e-\d+", a):  # measured errors: the same order of magnitude
                assert 1 / 3 < float(a) / float(b) < 3, f"docs/numerics.md is stale ({a} vs {b}): run tools/fixture_report.py"
            else:
                assert a == b, f"docs/numerics.md is stale ({a!r} vs {b!r}): run tools/fixture_report.py"

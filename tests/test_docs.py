"""Every ```python block in README.md and docs/*.md runs, from an empty temporary directory (so the examples
work from anywhere): README.md's each on its own (a reader copies one), a docs page's in order in one namespace
(a page reads as one session); and the numbers in the docs that come from code are current."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(path)):
        if path.name == "README.md":
            namespace = {"__name__": "__docs__"}
        exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)


def test_the_readme_has_python_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 3


def test_numerics_tables_are_current():
    """docs/numerics.md's tables are what tools/fixture_report.py prints today (measured errors within a
    factor of 3, everything else identical)."""
    import json
    import subprocess
    import sys

    cases = set(json.loads((ROOT / "tests" / "golden" / "manifest.json").read_text())["cases"])
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "fixture_report.py")], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    doc = (ROOT / "docs" / "numerics.md").read_text(encoding="utf-8")

    def rows(text):
        return [r.split("|")[1:-1] for r in text.splitlines()
                if r.startswith("| ") and r.split("|")[1].strip() in cases]

    ours, theirs = rows(out), rows(doc)
    assert ours and len(ours) == len(theirs), "docs/numerics.md is stale: run tools/fixture_report.py"
    for row, doc_row in zip(ours, theirs):
        for a, b in zip(row, doc_row):
            a, b = a.strip(), b.strip()
            if re.fullmatch(r"[0-9.]+e[-+]\d+", a) and float(a) and float(b):  # measured: same magnitude
                assert 1 / 3 < float(a) / float(b) < 3, f"docs/numerics.md is stale ({a} vs {b})"
            else:
                assert a == b, f"docs/numerics.md is stale ({a!r} vs {b!r}): run tools/fixture_report.py"


def test_generated_sections_are_current():
    """The generated parts of the docs (layer patterns, ...) are what tools/make_docs.py writes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "tools" / "make_docs.py")
    make_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_docs)
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        assert make_docs.render(text) == text, f"{path.name} is stale: run python tools/make_docs.py"
    assert "<!-- generated:layer-patterns -->" in (ROOT / "docs" / "architecture.md").read_text()


def test_relative_links_resolve():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"

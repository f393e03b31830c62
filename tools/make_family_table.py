"""Regenerate docs/family.md from the calculators: ``python tools/make_family_table.py``.

tests/test_calc.py compares the committed file with :func:`lfm2np.calc_cli.family_markdown` and fails when
they differ, so run this after changing a preset, a quantisation rule or the table itself.
"""

from pathlib import Path

from lfm2np.calc_cli import family_markdown

if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "docs" / "family.md"
    path.write_text(family_markdown(), encoding="utf-8")
    print(f"wrote {path}")

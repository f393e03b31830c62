#!/usr/bin/env python
"""Regenerate the generated parts of the docs (between `<!-- generated:NAME -->` and `<!-- end -->`).

tests/test_docs.py fails when a committed doc differs from what this script writes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lfm2np  # noqa: E402
from lfm2np import presets  # noqa: E402


def layer_patterns() -> str:
    rows = ["```", "model            layers  pattern (C conv, A attention, S sliding-window attention; lower case: MoE FFN)"]
    for name in presets.RELEASED:
        c = lfm2np.load_config(name)
        rows.append(f"{name:16s} {c.num_hidden_layers:6d}  {c.layer_pattern()}")
    rows.append("```")
    return "\n".join(rows)


def cli_reference() -> str:
    """`lfm2np --help` and every subcommand's --help, as the parser prints them (80 columns)."""
    import os

    from lfm2np.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        text = _helps(parser)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return text


def _helps(parser) -> str:
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    parts = ["```", parser.format_help().rstrip(), "```"]
    for name, p in sub.choices.items():
        parts += ["", f"### lfm2np {name}", "", "```", p.format_help().rstrip(), "```"]
    return "\n".join(parts)


GENERATED = {"layer-patterns": layer_patterns, "cli-reference": cli_reference}


def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        return f"<!-- generated:{m.group(1)} -->\n{GENERATED[m.group(1)]()}\n<!-- end -->"

    return re.sub(r"<!-- generated:([\w-]+) -->\n.*?<!-- end -->", fill, text, flags=re.S)


def main() -> int:
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Regenerate the generated parts of the docs (between `<!-- generated:NAME -->` and `<!-- end -->`).

tests/test_docs.py fails when a committed doc differs from what this script writes, when a section names no
generator here, or when a generator here has no section. (docs/cli.md's options table and usages have their own
markers and writer, tests/cli_reference.py.)
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


#: one generator per section name; docs/cli.md's command reference is written by tests/cli_reference.py
GENERATED = {"layer-patterns": layer_patterns}


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

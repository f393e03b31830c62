"""The command line's reference in docs/cli.md, written from the parsers: one table with every argument and
option once (its aliases, the commands that take it, what it does in each), then each command's usage.
tests/test_docs.py fails when the committed page differs from what this writes.

    python tests/cli_reference.py docs/cli.md      # rewrite the section between its two markers

(It reads argparse's private lists of actions, which the package itself never does: so it lives here.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lfm2np.cli import build_parser  # noqa: E402

BEGIN = "<!-- options: written by `python tests/cli_reference.py docs/cli.md` from the parsers -->"
END = "<!-- end of the options -->"
WIDTH = "100"  #: the columns the usage lines are wrapped to


def _spelling(action: argparse.Action, option: str) -> str:
    """``--ids ID ...``, ``--layers [LAYER ...]``, ``--dtype {float32,...}``, ``--json``."""
    if action.nargs == 0:
        return option
    metavar = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                                 else action.dest.upper())
    if action.nargs == "+":
        return f"{option} {metavar} ..."
    if action.nargs == "*":
        return f"{option} [{metavar} ...]"
    return f"{option} {metavar}"


def commands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command, a group's subcommands as ``group sub`` (``conformance make``) in place of the group."""
    out = []
    for name, sub in parser.commands.items():  # type: ignore[attr-defined]
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        out += [(f"{name} {n}", s) for n, s in nested[0].choices.items()] if nested else [(name, sub)]
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def options_table(parser: argparse.ArgumentParser) -> str:
    """Every argument and option of every command, once: the first long spelling names it; aliases that only
    some commands take say which."""
    rows: dict[str, dict] = {}
    for command, sub in commands(parser):
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.dest == "model_option":  # -m MODEL: an alias of the positional MODEL, one row
                row = rows["MODEL"]
                for alias in action.option_strings:
                    row["aliases"].setdefault(alias, []).append(command)
                continue
            if action.option_strings:
                longs = [o for o in action.option_strings if o.startswith("--")]
                key = longs[0] if longs else action.option_strings[0]
                spelled, aliases = _spelling(action, key), [o for o in action.option_strings if o != key]
            else:  # a positional argument
                key = action.dest.upper()
                spelled, aliases = key, []
            row = rows.setdefault(key, {"spelled": spelled, "aliases": {}, "commands": [], "helps": {}})
            for alias in aliases:
                row["aliases"].setdefault(alias, []).append(command)
            row["commands"].append(command)
            row["helps"].setdefault(_cell(action.help or ""), []).append(command)
    lines = ["| argument or option (upper case: positional) | aliases | commands | what |", "|---|---|---|---|"]
    for row in rows.values():
        aliases = ", ".join(f"`{a}`" + ("" if set(row["commands"]) <= set(cmds) else f" ({', '.join(cmds)})")
                            for a, cmds in row["aliases"].items())
        helps = row["helps"]
        what = next(iter(helps)) if len(helps) == 1 else "; ".join(f"{', '.join(c)}: {h}" for h, c in helps.items())
        lines.append(f"| `{row['spelled']}` | {aliases} | {', '.join(row['commands'])} | {what} |")
    return "\n".join(lines)


def usages(parser: argparse.ArgumentParser) -> str:
    """Each command's usage line and description (its arguments are in the table)."""
    parts = []
    for command, sub in commands(parser):
        parts += [f"### lfm2np {command}", "", _cell(sub.description or ""), "", "```",
                  sub.format_usage().strip(), "```", ""]
    return "\n".join(parts).rstrip()


def reference() -> str:
    """The section between :data:`BEGIN` and :data:`END` (usage lines wrapped to :data:`WIDTH` columns)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser()
        return f"{options_table(parser)}\n\n{usages(parser)}"
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def render(text: str) -> str:
    """``text`` with the section between the markers written anew."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return f"{text[:start]}\n{reference()}\n{text[end:]}"


def main(argv: list[str]) -> int:
    for name in argv:
        path = Path(name)
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
